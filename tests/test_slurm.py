"""The SLURM templates on a real single-node SLURM 22.05 (examples/slurm/local_cluster.sh starts slurmctld, slurmd
and munge on this machine): a job completes with the losses of the same torchrun run (train.sbatch, and
train_torchrun.sbatch's one torchrun per node); a job preempted with `scancel --signal=TERM` saves, exits 75,
requeues itself and finishes with the uninterrupted losses and one metrics history; a requeued job that fails at
start with a stale PREEMPTED marker fails instead of requeueing forever; a job with one rank SIGKILLed ends within a
bound; sweep_array.sbatch runs one training run per array task. Plus a 2-"node" torchrun rendezvous on localhost.

Needs the Debian packages slurm-wlm and munge and root (.ci/run installs them); without them the SLURM tests are
skipped with that reason, never passed silently.
"""
import json
import os
import re
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
SBATCH_TORCHRUN = os.path.join(ROOT, "examples", "slurm", "train_torchrun.sbatch")
SWEEP = os.path.join(ROOT, "examples", "slurm", "sweep_array.sbatch")
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


def submit(tmp_path, name, overrides, script=SBATCH, tasks=("--cpus-per-task=1", "--ntasks-per-node=4"),
           options=(), env=None, args=None, output=None):
    """sbatch SCRIPT with the tests' resources (no GPUs; --gpus-per-node=0 overrides the template's 8); returns the
    job id."""
    env = dict(os.environ, PYTHON=PY, RUN_ROOT=str(tmp_path), OMP_NUM_THREADS="1", **(env or {}))
    output = output or f"{tmp_path}/{name}.log"
    out = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", *tasks, *options,
                          f"--job-name={name}", f"--chdir={tmp_path}", f"--output={output}",
                          script, *(args if args is not None else [TINY, *ARGS, *overrides])],
                         capture_output=True, text=True, env=env, check=True)
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


def task_exits(log):
    """{task: how it ended} from srun's 'srun: error: NODE: tasks 0-1,3: Exited with exit code N' lines."""
    out = {}
    for tasks, how in re.findall(r"srun: error: \S+: tasks? ([0-9,-]+): (.+)", log):
        for part in tasks.split(","):
            lo, _, hi = part.partition("-")
            out.update({t: how.strip() for t in range(int(lo), int(hi or lo) + 1)})
    return out


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
    # GPU_BIND: the template's srun --gpu-bind option (no GPUs here: only that srun accepts the line)
    job = submit(tmp_path, "done", ["train.iters=4"], env={"GPU_BIND": "closest"})
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
    # And slurmd refuses a launch credential created in the same second as its revocation of the old one (slurm_cred:
    # revoked if ctime <= revoke time, whole seconds: "Job credential revoked", the job FAILS): start a second later.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+1"], check=True)
    state, restarts = wait(job, 300)
    log = open(tmp_path / "pre.log").read()
    assert state == "COMPLETED" and restarts == 1, log[-3000:]
    assert task_exits(log.split("preempted and saved; requeueing")[0]) == {t: "Exited with exit code 75" for t in
                                                                          range(4)}  # every task saved and exited 75
    assert "preempted and saved; requeueing" in log and "loaded " in log and "resuming after iteration" in log
    rows = metrics(run_dir)
    assert [r["iteration"] for r in rows] == list(range(1, iters + 1))  # one history, nothing logged twice
    assert [r["loss"] for r in rows] == reference  # bitwise: same data, same state
    assert not os.path.exists(run_dir / "PREEMPTED")


def test_failed_start_with_a_stale_marker_does_not_requeue(slurm, tmp_path):
    """A requeued job's run directory holds the PREEMPTED marker of its preempted run; if the relaunch then fails
    before the trainer starts (here: an invalid config, exit 2), the template must not take the old marker for a new
    preemption and requeue the job forever: it removes the marker before the launch, and the job FAILS."""
    job = submit(tmp_path, "stale", ["train.iters=0"], options=["--hold"])
    run_dir = tmp_path / f"stale-{job}"
    run_dir.mkdir()
    (run_dir / "PREEMPTED").write_text("2\n")
    subprocess.run(["scontrol", "release", job], check=True)
    state, restarts = wait(job, 120)
    log = open(tmp_path / "stale.log").read()
    assert state == "FAILED" and restarts == 0, (state, restarts, log[-2000:])
    # srun reports the tasks it ended after the first bad exit as Terminated (its own status is then 143)
    assert "train.iters=0 must be >= 1" in log and "Exited with exit code 2" in log and "trainer exited with" in log
    assert "requeueing" not in log and not (run_dir / "PREEMPTED").exists()


def test_torchrun_template_completes_like_torchrun(slurm, reference, tmp_path):
    """train_torchrun.sbatch: one srun task per node running torchrun with 4 workers (c10d rendezvous)."""
    job = submit(tmp_path, "tr", ["train.iters=4"], script=SBATCH_TORCHRUN,
                 tasks=("--cpus-per-task=4", "--ntasks-per-node=1"),
                 env={"TORCHRUN": TORCHRUN, "PROCS_PER_NODE": "4"})
    state, restarts = wait(job, 240)
    log = open(tmp_path / "tr.log").read()
    assert state == "COMPLETED" and restarts == 0, log[-3000:]
    assert [r["loss"] for r in metrics(tmp_path / f"tr-{job}")] == reference[:4]
    assert "0: megallava: 4 ranks = TP2 x PP2" in log and "trainer exited with 0" in log


def test_sweep_array_runs_one_layout_per_task(slurm, tmp_path):
    """sweep_array.sbatch with a 2-line layouts file (what tools/sweep.py --emit-slurm writes): array task i trains
    line i's layout into OUT/NAME, with its own metrics and launch.json."""
    layouts = tmp_path / "layouts.txt"
    layouts.write_text("tp2 2 parallel.tp=2 parallel.pp=1 train.iters=2\n"
                       "pp2 2 parallel.tp=1 parallel.pp=2 train.iters=2\n")
    out = tmp_path / "sweep"
    job = submit(tmp_path, "sweep", [], script=SWEEP, tasks=("--cpus-per-task=1", "--ntasks-per-node=2"),
                 options=["--array=0-1"], args=[TINY, str(layouts), str(out)], output=f"{tmp_path}/sweep-%a.log")
    states = [wait(f"{job}_{i}", 240) for i in range(2)]
    assert states == [("COMPLETED", 0)] * 2, (states, [open(p).read()[-1500:] for p in tmp_path.glob("sweep*.log")])
    for name, layout in (("tp2", "TP2 x PP1"), ("pp2", "TP1 x PP2")):
        rows = metrics(out / name)
        assert [r["iteration"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows), name
        launch = json.load(open(out / name / "launch.json"))
        assert launch["world_size"] == 2 and launch["status"] == "ok" and launch["launcher"] == "slurm", launch
        assert launch["job"] in (f"{job}_0", f"{job}_1")
    log = "".join(open(p).read() for p in tmp_path.glob("sweep*.log"))
    assert "megallava: 2 ranks = TP2 x PP1" in log and "megallava: 2 ranks = TP1 x PP2" in log


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
