"""What ``python -m megallava.train`` prints: --print-config (every key resolved, defaults included, key=null
unsetting a YAML key), --help (every key with its default), a missing --config (exit 2, no model), and on a tiny
1-rank run the start banner, the save / load lines, the end summary, and no library warnings (warnings come from
rank 0 only)."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest
import yaml

from megallava import config as C
from megallava.training import train as train_mod
from tests.multirank import run_ranks

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml")
RUN = ["parallel.tp=1", "parallel.pp=1", "train.global_batch_size=2", "train.micro_batch_size=2"]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "megallava.train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=_env())


def _keys(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_print_config_resolves_defaults_and_null_unsets_a_yaml_key():
    raw = yaml.safe_load(open(TINY))
    assert raw["data"]["max_images_per_sample"] == 2 and raw["model"]["num_query_groups"] == 2  # set in the YAML
    proc = _cli("--config", TINY, "--print-config", "data.max_images_per_sample=null", "model.num_query_groups=null",
                "train.iters=7")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed == C.to_dict(C.load_config(TINY, ["data.max_images_per_sample=null", "model.num_query_groups=null",
                                                     "train.iters=7"]))
    assert sorted(_keys(C.load_config(TINY))) == sorted(
        f"{s}.{k}" if not isinstance(v, dict) else f"{s}.{k}.{kk}" for s, sec in printed.items()
        for k, v in sec.items() for kk in (v if isinstance(v, dict) else [None]))  # every key, nested ones too
    assert printed["data"]["max_images_per_sample"] == C.DataConfig().max_images_per_sample == 1  # back to default
    assert printed["model"]["num_query_groups"] is None
    assert printed["model"]["vocab_size"] == 500 and printed["train"]["iters"] == 7  # YAML, override
    assert printed["train"]["adam_beta2"] == 0.999 and printed["checkpoint"]["timeout_s"] == 900.0  # defaults
    assert not proc.stderr


def test_help_lists_every_key_and_config_is_required(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(train_mod, "run", lambda *a, **k: pytest.fail("run() reached"))
    with pytest.raises(SystemExit) as exit_:
        train_mod.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for key in _keys(C.Config()):
        default = C._show(eval("C.Config()." + key))  # noqa: S307 - our own dataclass path
        assert f"{key}={default}" in out, key
    assert "each entry of data.sources / data.valid_sources: path= weight=1.0 template=vicuna_v1" in out
    with pytest.raises(SystemExit) as exit_:
        train_mod.main(["train.iters=1"])  # no --config: never the 7B default model
    assert exit_.value.code == 2
    assert "the following arguments are required: --config" in capsys.readouterr().err


def test_run_prints_banner_saves_loads_and_summary(tmp_path, capfd):
    run_dir, ck = tmp_path / "run", tmp_path / "ck"
    common = RUN + ["train.iters=3", f"train.run_dir={run_dir}", f"checkpoint.dir={ck}"]
    # 1. the real command line, a fresh interpreter: stops after iteration 2 (exit_interval) with a checkpoint
    proc = _cli("--config", TINY, *common, "checkpoint.interval=1", "train.exit_interval=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    banner = out[0]
    assert re.match(r"megallava: 1 ranks = TP1 x PP1 x DP1; stage 2 \(projector \+ LLM\), full; rank 0's stage: "
                    r"[\d,]+ parameters, [\d,]+ trained; precision fp32; data synthetic, seq 128; iterations 1\.\.3 "
                    r"of global batch 2; run_dir .*run, checkpoints .*ck$", banner), banner
    total, trained = (int(x.replace(",", "")) for x in re.findall(r"([\d,]+) (?:parameters|trained)", banner))
    assert 0 < trained < total  # the ViT is frozen
    saves = [line for line in out if line.startswith("saved ")]
    assert [s.split()[1] for s in saves] == [str(ck / "iter_0000001"), str(ck / "iter_0000002")]
    assert all(re.search(r" in \d+\.\d s$", s) for s in saves)
    assert [line.split("|")[0].strip() for line in out if line.startswith("iter ")] == ["iter 1/3", "iter 2/3"]
    assert f"stopping: stopped after iteration 2; saved to {ck}" in out
    done = out.index(next(line for line in out if line.startswith("done: ")))
    assert out[done].startswith("done: 2 iterations, last loss ") and \
        f"metrics {run_dir}/metrics.jsonl, TensorBoard {run_dir}/tb, config {run_dir}/config.yaml" in out[done]
    assert out[done + 1] == (f"checkpoints in {ck}; export: python tools/convert_checkpoint.py megatron-to-hf --input "
                             f"{ck} --output OUT_DIR; chat: python -m megallava.generate --checkpoint {ck} "
                             f"--prompt '...'")
    assert "Warning" not in proc.stderr and "warn" not in proc.stderr.lower(), proc.stderr  # megatron noise silenced

    # 2. the resume (the same main(), on a forked rank): the load line, then iteration 3 and its save
    capfd.readouterr()

    def resume(rank, env):
        return train_mod.main(["--config", TINY, *common, "checkpoint.load=auto"])

    assert run_ranks(1, resume) == [0]
    out = capfd.readouterr().out.splitlines()
    assert f"loaded {ck / 'iter_0000002'}: resuming after iteration 2" in out
    assert out.index(f"loaded {ck / 'iter_0000002'}: resuming after iteration 2") < \
        out.index(next(line for line in out if line.startswith("megallava: ")))
    assert "iterations 3..3 of global batch 2 from " + str(ck / "iter_0000002") in \
        next(line for line in out if line.startswith("megallava: "))
    assert any(line == f"saved {ck / 'iter_0000003'}" or line.startswith(f"saved {ck / 'iter_0000003'} in ")
               for line in out)
    assert any(line.startswith("done: 1 iterations") for line in out)


def test_library_warnings_come_from_rank_0_only():
    """Every rank runs the same library code: a warning it raises is shown by rank 0 and ignored elsewhere."""
    def fn(rank, env):
        import warnings

        warnings.resetwarnings()  # as in a fresh interpreter (pytest's configuration ignores FutureWarning)
        warnings.simplefilter("default")
        assert train_mod.main(["--config", TINY, "parallel.tp=3"]) == 2  # invalid: stops after the warning setup
        with warnings.catch_warnings(record=True) as seen:
            warnings.warn_explicit("deprecated thing", FutureWarning, "megatron/core/x.py", 1, module="megatron.core.x")
        return len(seen)

    assert run_ranks(2, fn) == [1, 0]
