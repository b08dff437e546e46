"""The train command line: bad configs fail fast with one message and no traceback; launch environments parse."""
import json
import os
import subprocess
import sys

import pytest

from megallava.distributed import launch_env
from megallava.training import train as train_mod

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml")


def test_bad_config_fails_before_any_model_is_built(monkeypatch, capsys):
    monkeypatch.setattr(train_mod, "run", lambda *a, **k: pytest.fail("run() reached with an invalid config"))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    rc = train_mod.main(["--config", TINY, "parallel.tp=3", "train.lr=-1", "parallel.vpp=2", "parallel.pp=1",
                         "model.vision.image_size=225", "parallel.tpp=2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown key 'parallel.tpp' (did you mean 'parallel.tp'?)" in err  # load problems are reported first
    rc = train_mod.main(["--config", TINY, "parallel.tp=3", "train.lr=-1", "parallel.vpp=2", "parallel.pp=1",
                         "model.vision.image_size=225"])
    err = capsys.readouterr().err
    assert rc == 2
    for text in ("parallel.tp=3 does not divide model.num_attention_heads=4", "train.lr", "parallel.vpp=2",
                 "model.vision.image_size=225"):
        assert text in err, f"{text!r} missing from:\n{err}"


def test_missing_config_file_message():
    proc = subprocess.run([sys.executable, "-m", "megallava.train", "--config", "/nonexistent/run.yaml"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "config file not found: /nonexistent/run.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_single_process_run_writes_metrics_and_config(tmp_path):
    """Without torchrun the trainer runs as one rank and writes the run-directory contract."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "megallava.train", "--config", TINY, "parallel.tp=1",
                           "parallel.pp=1", "train.iters=3", f"train.run_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert all({"loss", "lr", "grad_norm"} <= set(r) and r["loss"] > 0 for r in rows)
    assert os.listdir(tmp_path / "tb")
    from megallava import config as C
    saved = C.load_config(str(tmp_path / "config.yaml"))
    assert saved.train.iters == 3 and saved.parallel.tp == 1


def test_launch_env_torchrun_slurm_and_single():
    t = launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (t.rank, t.world_size, t.local_rank, t.master_addr, t.master_port) == (3, 8, 1, "n1", 1234)
    s = launch_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
                    "SLURM_JOB_NODELIST": "gpu[012-015,020]"})
    assert (s.rank, s.world_size, s.local_rank, s.master_addr) == (9, 16, 1, "gpu012")
    assert s.master_port == 20000 + (4242 * 101) % 30000
    steps = {launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": str(i)})
             .master_port for i in range(4)}
    assert len(steps) == 4  # one allocation's srun steps rendezvous on different ports
    assert launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "node7"}).master_addr == "node7"
    one = launch_env({})
    assert (one.rank, one.world_size) == (0, 1)
