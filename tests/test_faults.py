"""Fault handling: every failure ends every rank, within a bound, non-zero, root cause first; damaged or mismatched
checkpoints are refused (or fall back when asked); problems are found before the model is built.

Launcher tests run the real command line (torchrun, or plain ranks with RANK/WORLD_SIZE or SLURM_* as srun sets
them) with faults injected by MEGALLAVA_FAULT (training/faults.py); the others fork ranks in-process. Each asserts a
wall-clock bound on the whole job, start-up included (~3-5 s per launch on 2 cores): BOUND_S for crashes,
HANG_BOUND_S where a configured timeout must fire first; launcher tests also measure the time from the fault (the
injector prints when it fires) to the end of the job, bounded by FAULT_S."""
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from megallava import config as C
from megallava.distributed import free_port
from megallava.training import checkpoint as ckpt_mod, integrity
from megallava.training.fingerprint import TOKENIZER_DIR, compare, tokenizer_sha256
from megallava.training.locks import LOCK_NAME, STALE_AFTER_S, LockError, RunLock
from tests.multirank import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml")
DEMO = os.path.join(ROOT, "examples", "configs", "demo.yaml")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
BOUND_S = 20       # a crash (exception, SIGKILL, full disk, dead worker) ends the whole job in this, start-up included
HANG_BOUND_S = 60  # a hung rank: train.fault_timeout_s (6 s here) must fire first (the target is 60 s)
FAULT_S = 10       # from the injected fault to the end of the job (measured: 0.1-1.5 s)
TP1 = ["parallel.tp=1", "parallel.pp=1"]
BASE = ["train.global_batch_size=8", "train.micro_batch_size=2", "train.lr_warmup_fraction=0",
        "train.lr_decay_style=linear"]


def shard_args(demo_data, workers=2):
    return [f"data.tokenizer={demo_data}/tokenizer.model", f"data.num_workers={workers}",
            f"data.sources=[{{path: {demo_data}/shards/instruct, weight: 0.75}}, "
            f"{{path: {demo_data}/shards/sharegpt, weight: 0.25}}]"]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MEGALLAVA_FAULT")
           and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def launch(commands, marker, bound=BOUND_S):
    """Run [(argv, env)] concurrently; return (exit codes, combined output, seconds). Checks afterwards that no
    process of this job (ranks or their loader workers: their command lines hold ``marker``) is left. The time the
    last process ended is kept in ``launch.ended`` (for ``fault_to_end``)."""
    t0 = time.monotonic()
    procs = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for argv, env in commands]
    outs, codes = [], []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(bound + t0 - time.monotonic(), 1))
            outs.append(out)
            codes.append(p.returncode)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the job did not end within {bound} s")
    elapsed, launch.ended = time.monotonic() - t0, time.time()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # workers die with their rank (PR_SET_PDEATHSIG): give the kernel a moment
        left = [p for p in psutil.process_iter(["cmdline", "status"])
                if p.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(p.info["cmdline"] or [])]
        if not left:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"processes outlived the job: {[p.pid for p in left]}")
    return codes, "\n".join(outs), elapsed


def fault_to_end(out, what, limit=FAULT_S):
    """Seconds from the injected fault (the injector's 'MEGALLAVA_FAULT: ... at unix time T' line) to the end of the
    job launched last; asserted under FAULT_S and printed (pytest -s shows the measurements)."""
    fired = float(re.search(r"MEGALLAVA_FAULT: \w+ in iteration \d+ at unix time (\d+\.\d+)", out).group(1))
    seconds = launch.ended - fired
    print(f"time to failure, {what}: {seconds:.2f} s")
    assert 0 <= seconds < limit, (what, seconds)
    return seconds


def trainer(config, overrides):
    return [sys.executable, "-m", "megallava.train", "--config", config] + overrides


def plain_ranks(world, config, overrides, slurm=False, **env):
    port = str(free_port())
    out = []
    for r in range(world):
        e = dict(SLURM_PROCID=str(r), SLURM_NTASKS=str(world), SLURM_LOCALID=str(r), SLURM_JOB_NODELIST="127.0.0.1",
                 MASTER_PORT=port) if slurm else dict(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        out.append((trainer(config, overrides), clean_env(**env, **e)))
    return out


def first_error(output):
    """The first labelled failure line of the job, from its label on (a label the launcher's pipe glued after
    another process's partial line still counts)."""
    for line in output.splitlines():
        at = line.find("[rank ")
        if at >= 0 and any(w in line[at:] for w in (" error", " stopping", "watchdog")):
            return line[at:]
    raise AssertionError("no labelled '[rank N] error/stopping/watchdog' line in the job's output:\n" + output[-4000:])


def assert_intact(ckpt_dir, name):
    assert (ckpt_dir / "latest").read_text().strip() == name
    root = str(ckpt_dir / name)
    assert integrity.check(root, integrity.read_manifest(root)) == []
    assert not [n for n in os.listdir(ckpt_dir) if n.endswith(".partial")]


# ---------------------------------------------------------------------------------------------------------------
# Launchers: exception, SIGKILL, hang, worker crash
# ---------------------------------------------------------------------------------------------------------------

SHARD_ITERS = ["train.iters=4", "checkpoint.interval=1"]  # the fault hits iteration 3: latest = iter_0000002


@pytest.fixture(scope="module")
def shard_reference(demo_data, tmp_path_factory):
    """The launcher tests' run (demo model on the demo shards, 2 ranks, DP2) uninterrupted: [(iteration, loss)].
    Forked in-process ranks, no loader workers: the losses do not depend on the launcher or the worker count."""
    d = tmp_path_factory.mktemp("shard_reference")
    return train(2, TP1 + shard_args(demo_data, workers=0) + ["train.iters=4"], d, config=DEMO)


def assert_resume_is_exact(run_dir, demo_data, reference):
    """After a fault at iteration 3: checkpoint.load=auto resumes from iter_0000002 and trains iterations 3-4 with the
    uninterrupted run's losses, bitwise; metrics.jsonl holds one history 1-4 with the reference's losses."""
    resumed = train(2, TP1 + shard_args(demo_data, workers=0) + SHARD_ITERS + [
        f"checkpoint.dir={run_dir}/ckpt", "checkpoint.load=auto"], run_dir, config=DEMO)
    assert resumed == reference[2:]
    logged = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [(r["iteration"], r["loss"]) for r in logged] == reference


def test_exception_in_one_rank_mid_step_torchrun(demo_data, shard_reference, tmp_path):
    args = TP1 + BASE + shard_args(demo_data) + SHARD_ITERS + [f"train.run_dir={tmp_path}",
                                                              f"checkpoint.dir={tmp_path}/ckpt"]
    codes, out, elapsed = launch([([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "megallava.train",
                                    "--config", DEMO] + args, clean_env(MEGALLAVA_FAULT="1:3:raise"))], str(tmp_path))
    tail = out[-4000:]
    assert codes[0] != 0 and elapsed < BOUND_S, tail
    fault_to_end(out, "exception in rank 1 of 2 (torchrun)")
    assert first_error(out).startswith("[rank 1] error during iteration 3") and "injected fault" in out, tail
    assert "[rank 0] stopping during iteration 3 (" in out and "lost contact with another rank" in out, tail
    assert_intact(tmp_path / "ckpt", "iter_0000002")
    assert not (tmp_path / LOCK_NAME).exists() and not (tmp_path / "ckpt" / LOCK_NAME).exists(), tail
    assert_resume_is_exact(tmp_path, demo_data, shard_reference)


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_sigkill_of_one_rank(launcher, demo_data, shard_reference, tmp_path):
    """The killed rank prints nothing; the survivor notices the closed connection at once; the killed rank's loader
    workers die with it (they ignore SIGTERM, so nothing else would end them). Under torchrun, the resume after it
    reproduces the uninterrupted run."""
    args = TP1 + BASE + shard_args(demo_data) + SHARD_ITERS + [f"train.run_dir={tmp_path}",
                                                              f"checkpoint.dir={tmp_path}/ckpt"]
    if launcher == "torchrun":
        commands = [([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "megallava.train", "--config", DEMO]
                     + args, clean_env(MEGALLAVA_FAULT="1:3:sigkill"))]
    else:
        commands = plain_ranks(2, DEMO, args, slurm=True, MEGALLAVA_FAULT="1:3:sigkill")
    codes, out, elapsed = launch(commands, str(tmp_path))
    assert all(c != 0 for c in codes) and elapsed < BOUND_S, out[-4000:]
    fault_to_end(out, f"SIGKILL of rank 1 of 2 ({launcher})")
    line = first_error(out)
    assert line.startswith("[rank 0] stopping during iteration 3 (") and "lost contact with another rank" in line, \
        out[-4000:]
    assert_intact(tmp_path / "ckpt", "iter_0000002")
    if launcher == "torchrun":
        assert_resume_is_exact(tmp_path, demo_data, shard_reference)


def test_hung_rank_ends_the_job_plain_launch(tmp_path):
    """Rank 1 stops responding mid-step: rank 0's collective times out after train.fault_timeout_s, rank 1's
    watchdog ends it (status 124) with its stacks."""
    args = TP1 + BASE + ["train.iters=6", f"train.run_dir={tmp_path}", "train.fault_timeout_s=6"]
    codes, out, elapsed = launch(plain_ranks(2, TINY, args, MEGALLAVA_FAULT="1:3:hang"), str(tmp_path),
                                 bound=HANG_BOUND_S)
    assert codes == [1, 124] and elapsed < HANG_BOUND_S, out[-4000:]
    assert fault_to_end(out, "hung rank 1 of 2 (fault_timeout_s=6)", limit=6 + FAULT_S) >= 6
    assert "[rank 0] stopping during iteration 3 (" in out and "lost contact with another rank" in out
    assert "Timed out" in out
    assert re.search(r"\[rank 1\] watchdog: iteration 3 \(forward/backward.*\) did not finish within [67] s", out)
    assert "Current thread" in out or "Thread 0x" in out  # the hung rank's stacks


def test_ctrl_c_ends_a_rank_blocked_in_a_collective(tmp_path):
    """Python runs signal handlers only between bytecodes, so a rank blocked in a gloo collective would ignore
    Ctrl-C until the collective times out; the signal relay thread ends it within SIGNAL_GRACE_S (2 s)."""
    args = TP1 + BASE + ["train.iters=6", f"train.run_dir={tmp_path}", "train.fault_timeout_s=60"]
    procs = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for argv, env in plain_ranks(2, TINY, args, MEGALLAVA_FAULT="1:3:hang")]
    try:
        for line in procs[0].stdout:  # rank 1 hangs in iteration 3; rank 0 then blocks in its gradient all-reduce
            if line.startswith("iter 2/6"):
                break
        time.sleep(1)
        out, elapsed = [], []
        for p in procs:  # rank 0 first: it is the one blocked in C
            t0 = time.monotonic()
            p.send_signal(signal.SIGINT)
            out.append(p.communicate(timeout=10)[0])
            elapsed.append(time.monotonic() - t0)
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [130, 130] and max(elapsed) < 5, out
    assert "[rank 0] interrupted (Ctrl-C) while blocked in iteration 3" in out[0]
    assert "[rank 1] interrupted during iteration 3" in out[1]  # in Python: the main thread handles it itself


def test_sigterm_saves_and_exits_75(tmp_path):
    """SIGTERM (SLURM's preemption or --signal=TERM@N) to a running trainer: it finishes its iteration, saves, writes
    run_dir/PREEMPTED (for torchrun, which turns exit codes into 1) and exits with status 75, iterations left."""
    ck = tmp_path / "ckpt"
    args = TP1 + BASE + ["train.iters=100000", f"train.run_dir={tmp_path}", f"checkpoint.dir={ck}"]
    proc = subprocess.Popen(trainer(TINY, args), cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + BOUND_S
        while not ((tmp_path / "metrics.jsonl").exists() and (tmp_path / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "no iteration logged"
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=BOUND_S)[0]
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == 75 and elapsed < BOUND_S, out[-4000:]
    stopped = int((tmp_path / "PREEMPTED").read_text())
    logged = [json.loads(line)["iteration"] for line in open(tmp_path / "metrics.jsonl")]
    assert logged == list(range(1, stopped + 1))  # it stopped after the iteration it was in
    assert_intact(ck, f"iter_{stopped:07d}")
    assert f"preempted (SIGTERM): stopped after iteration {stopped}; saved to {ck}" in out
    assert "preempted: exit status 75; resume with checkpoint.load=auto" in out
    print(f"SIGTERM -> saved iteration {stopped} and exited 75 in {elapsed:.2f} s")


def test_loader_worker_crash(demo_data, tmp_path):
    args = TP1 + BASE + shard_args(demo_data) + ["train.iters=6", f"train.run_dir={tmp_path}"]
    codes, out, elapsed = launch([(trainer(DEMO, args), clean_env(MEGALLAVA_FAULT="0:3:worker"))], str(tmp_path))
    assert codes == [1] and elapsed < BOUND_S, out[-4000:]
    fault_to_end(out, "loader worker SIGKILLed (1 rank)")
    assert first_error(out).startswith("[rank 0] error during iteration 3") and "DataLoader worker" in out


# ---------------------------------------------------------------------------------------------------------------
# Saves: disk full (injected in one rank, and a real full tmpfs), then an exact resume
# ---------------------------------------------------------------------------------------------------------------

def train(world, overrides, run_dir, fault=None, config=TINY):
    """Forked in-process ranks; [(iteration, loss)] of rank 0. A run with a fault must end within BOUND_S."""
    def fn(rank, env):
        from megallava.training.train import run

        if fault:
            os.environ["MEGALLAVA_FAULT"] = fault
        cfg = C.load_config(config, BASE + [f"train.run_dir={run_dir}"] + overrides)
        C.validate(cfg, env.world_size)
        return [(r["iteration"], r["loss"]) for r in run(cfg, env)]

    return run_ranks(world, fn, timeout=BOUND_S if fault else 180)[0]


TP2 = ["parallel.tp=2", "parallel.pp=1"]  # both ranks write checkpoint files (under DP only rank 0 does)


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory):
    """4 uninterrupted iterations on 2 ranks (TP2), a checkpoint after each (with a tokenizer copy: the synthetic
    data does not read it, but the checkpoints then hold every file kind)."""
    d = tmp_path_factory.mktemp("reference")
    return train(2, TP2 + ["train.iters=4", f"checkpoint.dir={d}/ckpt", "checkpoint.interval=1",
                           f"data.tokenizer={demo_data}/tokenizer.model"], d), d / "ckpt"


def test_disk_full_in_one_rank_then_exact_resume(reference, tmp_path):
    full, _ = reference
    ck = tmp_path / "ckpt"
    args = TP2 + ["train.iters=4", f"checkpoint.dir={ck}", "checkpoint.interval=1"]
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        train(2, args, tmp_path, fault="1:3:enospc")
    assert time.monotonic() - t0 < BOUND_S
    assert f"no space left on device on rank 1 while saving iteration 3 to {ck}" in str(e.value)
    assert "'latest' still names iter_0000002, which is intact" in str(e.value)
    assert_intact(ck, "iter_0000002")
    resumed = train(2, args + [f"checkpoint.load={ck}"], tmp_path)
    assert resumed == full[2:]  # bitwise
    logged = [json.loads(line)["iteration"] for line in open(tmp_path / "metrics.jsonl")]
    assert logged == [1, 2, 3, 4]  # the failed run's iteration 3 was dropped: one clean history


def _tmpfs_problem():
    """'' if this process can mount a tmpfs in a private mount namespace, else why not (the skip reason)."""
    if sys.platform != "linux" or not shutil.which("unshare"):
        return "needs Linux and unshare (util-linux) to mount a tmpfs in a private mount namespace"
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True,
                       text=True)
    return "" if r.returncode == 0 else (f"SKIPPED: cannot mount a tmpfs in a private mount namespace (unshare -m; "
                                         f"needs root or CAP_SYS_ADMIN): {r.stderr.strip()[-200:]}")


TMPFS_PROBLEM = _tmpfs_problem()


@pytest.mark.skipif(bool(TMPFS_PROBLEM), reason=TMPFS_PROBLEM)
def test_real_disk_full_on_a_small_tmpfs(tmp_path):
    """A real full filesystem: torch's serializer reports "unexpected pos"; we say what it is. The tmpfs holds one
    checkpoint (preflight passes) but not two."""
    ck = tmp_path / "ckpt"
    ck.mkdir()
    cmd = " ".join(trainer(TINY, TP1 + BASE + ["train.iters=4", f"train.run_dir={tmp_path}", f"checkpoint.dir={ck}",
                                               "checkpoint.interval=1"]))
    script = f"mount -t tmpfs -o size=9m tmpfs {ck} && {cmd}; echo rc=$?; ls -a {ck}; cat {ck}/latest"
    codes, out, elapsed = launch([(["unshare", "-m", "sh", "-c", script], clean_env())], str(tmp_path))
    assert "rc=1" in out and elapsed < BOUND_S, out[-4000:]
    assert f"no space left on device while saving iteration 2 to {ck}" in out
    listing = out.strip().splitlines()[-5:]  # ls -a and cat latest, after the run
    assert listing == [".", "..", "iter_0000001", "latest", "iter_0000001"], listing


@pytest.mark.skipif(bool(TMPFS_PROBLEM), reason=TMPFS_PROBLEM)
def test_preflight_refuses_a_filesystem_too_small_for_one_checkpoint(tmp_path):
    """A 1 MiB tmpfs as checkpoint.dir: refused at start (exit 2, before the model is built) with the free space and
    the estimated size of one checkpoint (the parameter count's weights + optimizer state, +10%)."""
    from megallava.training.preflight import MARGIN, checkpoint_bytes, parameter_counts

    ck = tmp_path / "ckpt"
    ck.mkdir()
    overrides = TP1 + BASE + ["train.iters=4", f"train.run_dir={tmp_path}", f"checkpoint.dir={ck}"]
    script = f"mount -t tmpfs -o size=1m tmpfs {ck} && {' '.join(trainer(TINY, overrides))}; echo rc=$?"
    codes, out, elapsed = launch([(["unshare", "-m", "sh", "-c", script], clean_env())], str(tmp_path))
    assert "rc=2" in out and elapsed < BOUND_S and "Traceback" not in out, out[-4000:]
    cfg = C.load_config(TINY, overrides)
    need, params = checkpoint_bytes(cfg) * MARGIN, parameter_counts(cfg)[0]
    m = re.search(rf"checkpoint.dir={ck} has ([0-9.]+) MiB free but one checkpoint needs about ([0-9.]+) MiB "
                  rf"\({params / 1e6:.3f}M parameters with their optimizer state\): free space or choose a larger "
                  r"filesystem", out)
    assert m, out[-4000:]
    assert 0.9 < float(m.group(1)) <= 1.0 and float(m.group(2)) == round(need / 2**20, 1) > 1.0
    assert "megallava: 1 ranks" not in out  # no banner: refused before the model was built


# ---------------------------------------------------------------------------------------------------------------
# Loading: damaged files, fallback, mismatched model or tokenizer
# ---------------------------------------------------------------------------------------------------------------

def _flip(path, offset=None):
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at:at + 64] = bytes(b ^ 0xFF for b in data[at:at + 64])
    path.write_bytes(bytes(data))


DAMAGE = {  # what to do to the latest checkpoint -> what the error must say
    "flip_distcp": (lambda d: _flip(d / "__0_0.distcp"), "__0_0.distcp is damaged: CRC32"),
    "truncate_distcp": (lambda d: os.truncate(d / "__1_0.distcp", 100), "__1_0.distcp has 100 bytes"),
    "delete_distcp": (lambda d: os.remove(d / "__0_1.distcp"), "__0_1.distcp is missing"),
    "flip_common": (lambda d: _flip(d / "common.pt"), "common.pt is damaged"),
    "truncate_common": (lambda d: os.truncate(d / "common.pt", 50), "common.pt has 50 bytes"),
    "delete_common": (lambda d: os.remove(d / "common.pt"), "common.pt is missing"),
    "flip_metadata": (lambda d: _flip(d / ".metadata"), ".metadata is damaged"),
    "truncate_metadata": (lambda d: os.truncate(d / ".metadata", 10), ".metadata has 10 bytes"),
    "delete_metadata": (lambda d: os.remove(d / ".metadata"), ".metadata is missing"),
    "delete_metadata_json": (lambda d: os.remove(d / "metadata.json"), "metadata.json is missing"),
    "delete_fingerprint": (lambda d: os.remove(d / "fingerprint.json"), "fingerprint.json is missing"),
    "flip_fingerprint": (lambda d: _flip(d / "fingerprint.json"), "fingerprint.json is damaged"),
    "truncate_fingerprint": (lambda d: os.truncate(d / "fingerprint.json", 5), "fingerprint.json has 5 bytes"),
    "flip_tokenizer": (lambda d: _flip(d / TOKENIZER_DIR / "tokenizer.model"), "tokenizer/tokenizer.model is damaged"),
    "delete_tokenizer": (lambda d: os.remove(d / TOKENIZER_DIR / "tokenizer.model"),
                         "tokenizer/tokenizer.model is missing"),
    "delete_manifest": (lambda d: os.remove(d / integrity.MANIFEST), "integrity.json is missing"),
    "truncate_manifest": (lambda d: os.truncate(d / integrity.MANIFEST, 10), "integrity.json is unreadable"),
}


def test_damaged_checkpoint_is_refused_naming_the_file_or_falls_back(reference, tmp_path):
    full, ck = reference
    roots = {}
    for kind, (damage, _) in DAMAGE.items():
        roots[kind] = tmp_path / kind
        for name in ("iter_0000003", "iter_0000004", "latest"):  # the damaged latest and the one to fall back to
            (shutil.copytree if name.startswith("iter") else shutil.copy)(ck / name, roots[kind] / name)
        damage(roots[kind] / "iter_0000004")
    (tmp_path / "bad_latest").mkdir()
    shutil.copytree(ck / "iter_0000003", tmp_path / "bad_latest" / "iter_0000003")
    (tmp_path / "bad_latest" / "latest").write_text("iter_0000009\n")

    def fn(rank, env):
        from megallava.distributed import init_distributed

        init_distributed(1, 1, None, 0, env)
        out = {}
        for kind, root in list(roots.items()) + [("bad_latest", tmp_path / "bad_latest")]:
            try:
                ckpt_mod.select(str(root))
                out[kind] = ("loaded", None)
            except ckpt_mod.CheckpointError as e:
                out[kind] = (str(e), ckpt_mod.select(str(root), fallback=True))
        return out

    t0 = time.monotonic()
    results = run_ranks(1, fn, timeout=BOUND_S)[0]
    assert time.monotonic() - t0 < 20
    for kind, (_, expected) in DAMAGE.items():
        message, fallback = results[kind]
        assert expected in message and str(roots[kind] / "iter_0000004") in message, (kind, message)
        assert "checkpoint.fallback=true" in message
        assert fallback == str(roots[kind] / "iter_0000003"), kind
    message, fallback = results["bad_latest"]
    assert "names 'iter_0000009', which is not a directory" in message
    assert fallback == str(tmp_path / "bad_latest" / "iter_0000003")

    # A resume with checkpoint.fallback=true loads iteration 3 (loudly) and reproduces the uninterrupted run.
    root = roots["flip_distcp"]
    resumed = train(2, TP2 + ["train.iters=4", f"checkpoint.load={root}", "checkpoint.fallback=true"], tmp_path / "r")
    assert resumed == full[3:]


def test_preflight_size_estimate_counts_the_saved_parameters(reference):
    """The free-space check counts parameters from the config (closed form, no model built): exactly what is saved."""
    from megallava.training.preflight import checkpoint_bytes, parameter_counts

    _, ck = reference
    saved = json.loads((ck / "iter_0000004" / "fingerprint.json").read_text())["params"]
    cfg = C.load_config(TINY, TP2)
    total = sum(math.prod(shape) for shape in saved.values())
    assert parameter_counts(cfg)[0] == total
    on_disk = sum(f.stat().st_size for f in (ck / "iter_0000004").rglob("*") if f.is_file())
    assert 0.85 * on_disk < checkpoint_bytes(cfg) < on_disk  # the rest is metadata: preflight adds 10%


MISMATCH = {  # this run's overrides, weights-only load? -> what the refusal must say (checkpoint value, this run's)
    "vocab_size": (["model.vocab_size=600"], False, "model.vocab_size: checkpoint 500, this run 600"),
    "image_token_id": (["model.image_token_id=499"], False, "model.image_token_id: checkpoint -200, this run 499"),
    "image_token_id_weights_only": (["model.image_token_id=499"], True,
                                    "model.image_token_id: checkpoint -200, this run 499"),
    "ffn_hidden_size": (["model.ffn_hidden_size=128"], False, "model.ffn_hidden_size: checkpoint 176, this run 128"),
    "vision": (["model.vision.image_size=28"], False, "model.vision.image_size: checkpoint 56, this run 28"),
    "tokenizer": (["data.tokenizer=OTHER"], False, "data.tokenizer: checkpoint sha256 "),
}


@pytest.mark.parametrize("kind", list(MISMATCH))
def test_mismatched_fingerprint_table(kind, reference, tmp_path):
    """check_fingerprint (what the trainer runs before building the model) against the reference checkpoint."""
    from megallava.training.fingerprint import model_fingerprint

    _, ck = reference
    overrides, weights_only, expected = MISMATCH[kind]
    other = tmp_path / "other.model"
    other.write_bytes(b"not the checkpoint's tokenizer")
    cfg = C.load_config(TINY, TP2 + [o.replace("OTHER", str(other)) for o in overrides])
    with pytest.raises(ckpt_mod.CheckpointError) as e:
        ckpt_mod.check_fingerprint(str(ck / "iter_0000004"), model_fingerprint(cfg), load_optimizer=not weights_only)
    assert f"checkpoint {ck / 'iter_0000004'} does not match this run:\n  - {expected}" in str(e.value)
    assert len(str(e.value).split("\n  - ")) == 2  # this difference alone


def test_resolve_load_decides_inside_by_whole_path_components(tmp_path):
    """checkpoint.dir=ckpt holds checkpoints: loading ckpt/iter_N (or ckpt itself) resumes it, but ckpt2 is another
    directory: starting from it would replace ckpt's checkpoints, refused unless checkpoint.overwrite=true."""
    from megallava.training.train import _inside, resolve_load

    (tmp_path / "ckpt" / "iter_0000001").mkdir(parents=True)
    (tmp_path / "ckpt" / "latest").write_text("iter_0000001\n")
    (tmp_path / "ckpt2").mkdir()
    assert _inside(f"{tmp_path}/ckpt/iter_0000001", f"{tmp_path}/ckpt")
    assert _inside(f"{tmp_path}/ckpt/", f"{tmp_path}/ckpt")
    assert not _inside(f"{tmp_path}/ckpt2", f"{tmp_path}/ckpt") and not _inside(f"{tmp_path}", f"{tmp_path}/ckpt")

    def resolve(*overrides):
        return resolve_load(C.load_config(TINY, [f"checkpoint.dir={tmp_path}/ckpt", *overrides]))

    assert resolve("checkpoint.load=auto") == (f"{tmp_path}/ckpt", False)
    assert resolve(f"checkpoint.load={tmp_path}/ckpt/iter_0000001") == (f"{tmp_path}/ckpt/iter_0000001", False)
    # checkpoint.pretrained: used (as a fine-tune start) only when checkpoint.load=auto finds nothing
    assert resolve("checkpoint.load=auto", f"checkpoint.pretrained={tmp_path}/ckpt2") == (f"{tmp_path}/ckpt", False)
    assert resolve_load(C.load_config(TINY, [f"checkpoint.dir={tmp_path}/new", "checkpoint.load=auto",
                                             f"checkpoint.pretrained={tmp_path}/ckpt2"])) == (f"{tmp_path}/ckpt2", True)
    assert resolve_load(C.load_config(TINY, [f"checkpoint.dir={tmp_path}/new"])) == (None, False)
    with pytest.raises(ckpt_mod.CheckpointError, match=re.escape(f"would start from {tmp_path}/ckpt2 and replace")):
        resolve(f"checkpoint.pretrained={tmp_path}/ckpt2")
    with pytest.raises(ckpt_mod.CheckpointError, match=re.escape(f"would start from {tmp_path}/ckpt2 and replace")):
        resolve(f"checkpoint.load={tmp_path}/ckpt2")
    with pytest.raises(ckpt_mod.CheckpointError, match="would start fresh and replace them"):
        resolve()
    assert resolve(f"checkpoint.load={tmp_path}/ckpt2", "checkpoint.overwrite=true") == (f"{tmp_path}/ckpt2", False)


def test_overwrite_starts_fresh_and_replaces_the_old_checkpoints(reference, tmp_path):
    """checkpoint.overwrite=true over a dir with another run's iterations 1-4: this run starts at iteration 1 (the
    uninterrupted losses), and its first save removes the old run's checkpoints, so that checkpoint.keep=2 keeps
    this run's (the old iter_0000004 would otherwise outrank them and the new iter_0000001 be pruned at once)."""
    full, ck = reference
    shutil.copytree(ck, tmp_path / "ck")
    args = TP2 + ["train.iters=4", "train.exit_interval=2", f"checkpoint.dir={tmp_path}/ck", "checkpoint.interval=1",
                  "checkpoint.keep=2"]
    with pytest.raises(RuntimeError, match="checkpoint.overwrite=true"):
        train(2, args, tmp_path / "refused")
    assert sorted(os.listdir(tmp_path / "ck")) == sorted(os.listdir(ck))  # a refused start changes nothing
    assert train(2, args + ["checkpoint.overwrite=true"], tmp_path / "run") == full[:2]
    assert sorted(os.listdir(tmp_path / "ck")) == ["iter_0000001", "iter_0000002", "latest"]
    assert_intact(tmp_path / "ck", "iter_0000002")


def test_mismatched_resume_is_refused_naming_both_values(reference, demo_data, tmp_path):
    _, ck = reference
    with pytest.raises(RuntimeError) as e:
        train(1, TP1 + ["train.iters=5", "model.vocab_size=600", f"checkpoint.load={ck}"], tmp_path / "a")
    assert "does not match this run" in str(e.value)
    assert "model.vocab_size: checkpoint 500, this run 600" in str(e.value)
    with pytest.raises(RuntimeError) as e:  # weights-only loads still check shapes
        train(1, TP1 + ["train.iters=5", "model.ffn_hidden_size=128", "checkpoint.load_optimizer=false",
                        f"checkpoint.load={ck}"], tmp_path / "b")
    assert "tensor decoder.layers.mlp.linear_fc1.weight: checkpoint shape [4, 352, 64], this model [4, 256, 64]" \
        in str(e.value)

    # Shard data: the tokenizer travels with the checkpoint and a different one is refused on resume.
    shards = shard_args(demo_data, workers=0) + ["train.iters=2", f"checkpoint.dir={tmp_path}/sck"]
    train(1, TP1 + shards, tmp_path / "c", config=DEMO)
    saved = tmp_path / "sck" / "iter_0000002"
    fingerprint = json.loads((saved / "fingerprint.json").read_text())
    assert tokenizer_sha256(str(saved / TOKENIZER_DIR / "tokenizer.model")) == fingerprint["tokenizer"]["sha256"]
    from megallava.data.tokenizer import train_sentencepiece
    texts = [t["value"] for r in json.load(open(demo_data / "llava_instruct.json")) for t in r["conversations"]]
    # as many pieces as the demo tokenizer, so that the checkpoint's image_token_id (1536, the first id after them)
    # suits it too: the tokenizer is the only difference
    other = train_sentencepiece(texts, str(tmp_path / "other"), 1536)
    with pytest.raises(RuntimeError) as e:
        train(1, TP1 + shards + [f"data.tokenizer={other}", "train.iters=3", f"checkpoint.load={tmp_path}/sck"],
              tmp_path / "d", config=DEMO)
    assert f"data.tokenizer: checkpoint sha256 {fingerprint['tokenizer']['sha256'][:16]}" in str(e.value)
    assert f"this run sha256 {tokenizer_sha256(other)[:16]}" in str(e.value)
    errors, warnings = compare(fingerprint, {**fingerprint, "tokenizer": {"sha256": "0" * 64, "source": other}}, True)
    assert not errors and warnings  # a weights-only load (finetuning) may change the tokenizer, with a warning


# ---------------------------------------------------------------------------------------------------------------
# Start: locks, directories, shards and seq_length before the model is built
# ---------------------------------------------------------------------------------------------------------------

def test_second_run_on_a_directory_is_refused_naming_the_holder(tmp_path):
    holder = RunLock(str(tmp_path), "train.run_dir")
    assert holder.acquire() is None  # this test process plays the running job
    try:
        with pytest.raises(RuntimeError) as e:
            train(1, TP1 + ["train.iters=1"], tmp_path)
        assert f"train.run_dir {tmp_path} is in use by another run: host {socket.gethostname()} pid {os.getpid()}" \
            in str(e.value)
    finally:
        holder.release()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "start_time": 0}))
    lock = RunLock(str(tmp_path), "train.run_dir")
    assert "taking over the stale lock" in lock.acquire()  # a dead run's lock on this host
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    # Another host's lock: alive while its heartbeat (mtime) is fresh, stale after STALE_AFTER_S.
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "start_time": 0}))
    with pytest.raises(LockError, match="host elsewhere pid 1"):
        RunLock(str(tmp_path), "checkpoint.dir").acquire()
    os.utime(tmp_path / LOCK_NAME, (time.time() - STALE_AFTER_S - 1,) * 2)
    assert "taking over the stale lock" in RunLock(str(tmp_path), "checkpoint.dir").acquire()


def _read_only(path):
    """Make ``path`` read-only even for root (permission bits do not stop root: use the immutable attribute)."""
    os.chmod(path, 0o555)
    probe = path / "probe"
    try:
        probe.write_text("x")
    except OSError:
        return lambda: os.chmod(path, 0o755)
    probe.unlink()
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("cannot make a directory read-only for this user")
    return lambda: (subprocess.run(["chattr", "-i", str(path)]), os.chmod(path, 0o755))


def test_problems_found_before_the_model_is_built(demo_data, tmp_path):
    """A read-only checkpoint.dir, a truncated shard and a deleted shard: one message listing all three, no
    traceback, in seconds, before any model is built."""
    for source in ("instruct", "sharegpt"):
        shutil.copytree(demo_data / "shards" / source, tmp_path / source)
    truncated = sorted((tmp_path / "instruct").glob("*.tar"))[0]
    os.truncate(truncated, truncated.stat().st_size - 1000)
    deleted = sorted((tmp_path / "sharegpt").glob("*.tar"))[0]
    deleted.unlink()
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "PREEMPTED").write_text("7\n")  # a stale marker of a preempted run: removed at start
    restore = _read_only(tmp_path / "ckpt")
    try:
        args = TP1 + [f"data.tokenizer={demo_data}/tokenizer.model", f"train.run_dir={tmp_path}/run",
                      f"data.sources=[{{path: {tmp_path}/instruct}}, {{path: {tmp_path}/sharegpt}}]",
                      f"checkpoint.dir={tmp_path}/ckpt"]
        codes, out, elapsed = launch([(trainer(DEMO, args), clean_env())], str(tmp_path))
    finally:
        restore()
    assert codes == [2] and elapsed < 30 and "Traceback" not in out, out[-4000:]
    assert "megallava.train: cannot start (3 problems)" in out
    assert f"checkpoint.dir={tmp_path}/ckpt is not writable" in out
    assert f"shard {truncated} is truncated or changed" in out and f"shard {deleted} is missing" in out
    # A job script requeues on the marker (examples/slurm/*.sbatch): a run that fails at start must not leave one.
    assert not (tmp_path / "run" / "PREEMPTED").exists()


def test_seq_length_too_short_for_shard_data(demo_data, tmp_path):
    """16 image tokens + 16 passes the arithmetic check, but the vicuna system prompt alone is longer: refused at
    start with the length that works, instead of skipping every sample. The synthetic max_images_per_sample does
    not apply to shards."""
    args = TP1 + shard_args(demo_data, workers=0) + ["data.max_images_per_sample=9"]
    C.validate(C.load_config(DEMO, args + ["data.seq_length=32"]), 1)
    with pytest.raises(C.ConfigError, match=r"data.seq_length=15 is too short for data.sources\[0\].*up to 1 "
                                            r"image\(s\) of 16 tokens, plus 16 text tokens: use seq_length >= 32"):
        C.validate(C.load_config(DEMO, args + ["data.seq_length=15"]), 1)
    with pytest.raises(RuntimeError) as e:
        train(1, args + ["data.seq_length=32", "train.iters=1"], tmp_path, config=DEMO)
    assert "ConfigError" in str(e.value) and "data.seq_length=32 is too short for data.sources[0]" in str(e.value)
    assert "with template 'vicuna_v1'" in str(e.value) and "Use data.seq_length >= " in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# Runs that learn nothing
# ---------------------------------------------------------------------------------------------------------------

def test_run_that_skips_every_sample_stops_naming_the_samples(demo_data, tmp_path, capfd):
    from megallava.data.shards import read_sample

    src = tmp_path / "instruct"
    shutil.copytree(demo_data / "shards" / "instruct", src)
    manifest = json.loads((src / "manifest.json").read_text())
    ids = {}  # key -> the record's id in the input JSON, read before the damage
    for shard in manifest["shards"]:
        with open(src / shard["name"], "rb") as f:
            for key, off, size in zip(shard["keys"], shard["offsets"], shard["sizes"]):
                ids[key] = json.loads(read_sample(f, off, size)["json"])["id"]
    for shard in manifest["shards"]:  # damage every sample's bytes (sizes unchanged: only the CRCs catch it)
        with open(src / shard["name"], "r+b") as f:
            for off, size in zip(shard["offsets"], shard["sizes"]):
                f.seek(off + size // 2)
                f.write(b"\xff\x00\xff")
    args = TP1 + [f"data.tokenizer={demo_data}/tokenizer.model", "data.num_workers=0", "train.iters=3",
                  f"data.sources=[{{path: {src}}}]"]
    with pytest.raises(RuntimeError) as e:
        train(1, args, tmp_path / "run", config=DEMO)
    message = str(e.value)
    assert "DataHealthError: iteration 1: every sample of the global batch (8) was skipped" in message
    example = re.search(r"corrupt_sample 8 \(e\.g\. sample (instruct_\d+) \(id '([^']+)'\) in (\S+)\)", message)
    assert example and example.group(2) == ids[example.group(1)], message  # shard key and original id
    assert example.group(3).startswith(f"{src}/instruct-0000")
    logged = [line for line in capfd.readouterr().err.splitlines() if "skipped corrupt_sample" in line]
    named = [re.fullmatch(rf"\[rank 0\] skipped corrupt_sample: sample (instruct_\d+) \(id '([^']+)'\) in "
                          rf"{src}/instruct-\d+\.tar", line) for line in logged]
    assert len(logged) == 8 and all(named), logged  # once each, with shard, key and the id in the input JSON
    assert all(m.group(2) == ids[m.group(1)] for m in named) and len({m.group(1) for m in named}) == 8

def test_skip_monitor_rules(monkeypatch):
    from megallava.training.data_health import DataHealthError, SkipMonitor

    monkeypatch.setattr(SkipMonitor, "_examples", lambda self: {})  # no process group here
    m = SkipMonitor(0.01, 8, ["too_long"])
    for i in range(12):  # 96 samples read, 1 skipped: under the minimum count, no verdict yet
        m.check(i + 1, 100, {"too_long": 1 if i == 0 else 0})
    m.check(13, 100, {"too_long": 0})  # 104 read, 1 skipped (0.96%): fine
    with pytest.raises(DataHealthError, match=r"2 of the 112 samples .* more than data.max_skip_fraction=0.01"):
        m.check(14, 100, {"too_long": 1})
    with pytest.raises(DataHealthError, match="iteration 1 trained no token"):
        SkipMonitor(0.01, 8, []).check(1, 0, {})
