"""The SLURM templates on a real single-node SLURM 22.05 (examples/slurm/local_cluster.sh starts slurmctld, slurmd
and munge on this machine): a job completes with the losses of the same torchrun run; a job preempted with
`scancel --signal=TERM` saves, requeues itself and finishes with the uninterrupted losses and one metrics history;
a job with one rank SIGKILLed ends within a bound. Plus a 2-"node" torchrun rendezvous on localhost.

Needs the Debian packages slurm-wlm and munge and root (.ci/run installs them); without them the SLURM tests are
skipped with that reason, never passed silently.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PY = sys.executable
TORCHRUN = os.path.join(os.path.dirname(PY), "torchrun")
TINY = os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml")
SBATCH = os.path.join(ROOT, "examples", "slurm", "train.sbatch")
CLUSTER = os.path.join(ROOT, "examples", "slurm", "local_cluster.sh")
# A constant LR: the first N losses of a longer run are those of an N-iteration run, so one reference serves all.
ARGS = ["parallel.tp=2", "parallel.pp=2", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.lr_warmup_fraction=0", "train.lr_decay_style=constant"]
ITERS = 20


@pytest.fixture(scope="module")
def slurm():
    missing = [c for c in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(c) is None and
               not os.path.exists(f"/usr/sbin/{c}")]
    if missing:
        pytest.skip(f"SLURM tests SKIPPED: {', '.join(missing)} not installed (apt-get install slurm-wlm munge; "
                    f".ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("SLURM tests SKIPPED: starting a local slurmctld/slurmd needs root")
    r = subprocess.run(["bash", CLUSTER, "start", "8"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"SLURM tests SKIPPED: the local cluster did not start: {r.stderr.strip()[-300:]}")
    yield
    subprocess.run(["bash", CLUSTER, "stop"], capture_output=True, timeout=60)


def submit(tmp_path, name, overrides):
    env = dict(os.environ, PYTHON=PY, RUN_ROOT=str(tmp_path), OMP_NUM_THREADS="1")
    out = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--ntasks-per-node=4",
                          f"--job-name={name}", f"--chdir={tmp_path}", f"--output={tmp_path}/{name}.log",
                          SBATCH, TINY, *ARGS, *overrides], capture_output=True, text=True, env=env, check=True)
    return out.stdout.strip().split(";")[0]


def job_state(job):
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get("JobState"), int(fields.get("Restarts", 0))


def wait(job, timeout, done=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state, restarts = job_state(job)
        if state in done:
            return state, restarts
        time.sleep(0.5)
    raise AssertionError(f"job {job} not finished within {timeout} s (state {job_state(job)})")


def metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same model and data under torchrun, ITERS iterations uninterrupted."""
    run_dir = tmp_path_factory.mktemp("torchrun")
    subprocess.run([TORCHRUN, "--nproc-per-node", "4", "-m", "megallava.train", "--config", TINY, *ARGS,
                    f"train.iters={ITERS}", f"train.run_dir={run_dir}"], check=True, capture_output=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    return [r["loss"] for r in metrics(run_dir)]


def test_job_completes_like_torchrun(slurm, reference, tmp_path):
    job = submit(tmp_path, "done", ["train.iters=4"])
    state, restarts = wait(job, 240)
    log = open(tmp_path / "done.log").read()
    assert state == "COMPLETED" and restarts == 0, log[-2000:]
    run_dir = tmp_path / f"done-{job}"
    assert [r["loss"] for r in metrics(run_dir)] == reference[:4]
    assert "0: megallava: 4 ranks = TP2 x PP2" in log  # srun --label: every line carries its task
    assert log.count("megallava: 4 ranks") == 1  # the banner and library warnings come from rank 0 only
    assert "saved " in log and "trainer exited with 0" in log


def test_preempted_job_requeues_and_resumes_bitwise(slurm, reference, tmp_path):
    iters = ITERS
    job = submit(tmp_path, "pre", [f"train.iters={iters}"])
    run_dir = tmp_path / f"pre-{job}"
    deadline = time.monotonic() + 240
    while len(metrics(run_dir)) < 2:
        assert time.monotonic() < deadline, "the job never started training"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=TERM", job], check=True)  # what --signal=TERM@N sends before the time limit
    # SLURM makes a requeued job eligible again only ~2 minutes later; a busy cluster would wait longer anyway.
    # Waive that delay once the job is pending again (the requeue itself is the template's: asserted below).
    deadline = time.monotonic() + 120
    while job_state(job) != ("PENDING", 1):
        assert time.monotonic() < deadline and job_state(job)[0] != "COMPLETED", job_state(job)
        time.sleep(0.2)
    # SLURM's delay covers the old instance's cleanup: slurmd refuses to relaunch a job while a slurmstepd of its
    # previous run is still ending its tasks ("already killed, do not launch"). Waive it only once they are gone.
    while subprocess.run(["pgrep", "-f", rf"slurmstepd: \[{job}\."], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the preempted instance's slurmstepd never ended"
        time.sleep(0.2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    state, restarts = wait(job, 300)
    log = open(tmp_path / "pre.log").read()
    assert state == "COMPLETED" and restarts == 1, log[-3000:]
    assert "preempted and saved; requeueing" in log and "loaded " in log and "resuming after iteration" in log
    rows = metrics(run_dir)
    assert [r["iteration"] for r in rows] == list(range(1, iters + 1))  # one history, nothing logged twice
    assert [r["loss"] for r in rows] == reference  # bitwise: same data, same state
    assert not os.path.exists(run_dir / "PREEMPTED")


def test_sigkilled_rank_ends_the_job(slurm, tmp_path):
    job = submit(tmp_path, "kill", ["train.iters=100000"])
    run_dir = tmp_path / f"kill-{job}"
    deadline = time.monotonic() + 240
    while len(metrics(run_dir)) < 2:
        assert time.monotonic() < deadline, "the job never started training"
        time.sleep(0.2)
    pids = [int(p) for p in subprocess.run(["pgrep", "-f", f"megallava.train.*{run_dir}"], capture_output=True,
                                           text=True).stdout.split()]
    assert len(pids) >= 4
    t0 = time.monotonic()
    os.kill(pids[-1], signal.SIGKILL)
    state, _ = wait(job, 90)
    elapsed = time.monotonic() - t0
    assert state in ("FAILED", "CANCELLED") and elapsed < 60, (state, elapsed)
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", f"megallava.train.*{run_dir}"], capture_output=True, text=True).stdout
    assert not left.strip(), f"processes left after the job ended: {left}"
    print(f"job with a SIGKILLed rank ended in {elapsed:.1f} s")


def test_two_node_torchrun_matches_one_node(reference, tmp_path):
    """Two torchrun agents (--nnodes 2, c10d rendezvous on localhost) give the single-node losses."""
    from megallava.distributed import free_port

    port = free_port()
    runs = []
    for node in range(2):
        runs.append(subprocess.Popen(
            [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
             f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "--max-restarts", "0", "-m", "megallava.train",
             "--config", TINY, *ARGS, "train.iters=3", f"train.run_dir={tmp_path}/two"],
            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in runs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-2000:]
    assert [r["loss"] for r in metrics(tmp_path / "two")] == reference[:3]
