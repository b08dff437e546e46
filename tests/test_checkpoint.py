"""Checkpoints: exact resume, crash safety (SIGKILL mid-save), SIGTERM save, retention, resharded resume."""
import os
import shutil
import signal

import pytest
import torch

from megallava import config as C
from megallava.model.layout import assemble, local_pieces
from tests.multirank import run_ranks

TINY = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "tiny_cpu.yaml")
NAMES = ("embedding.weight", "decoder.layers.1.self_attention.linear_qkv.weight",
         "decoder.layers.3.mlp.linear_fc1.weight", "output_layer.weight", "projector.linear_1.weight")
TP2PP2 = ["parallel.tp=2", "parallel.pp=2"]


def train(world, overrides, run_dir, hook=None):
    base = ["train.global_batch_size=8", "train.micro_batch_size=2", f"train.run_dir={run_dir}",
            "train.lr_warmup_fraction=0", "train.lr_decay_style=linear"]

    def fn(rank, env):
        from megatron.core import parallel_state
        from megallava.training.train import run

        cfg = C.load_config(TINY, base + overrides)
        C.validate(cfg, env.world_size)
        weights = {}

        def on_iteration(iteration, model, out):
            weights.update(local_pieces(model, NAMES, parallel_state.get_tensor_model_parallel_rank()))
            if hook:
                hook(rank, iteration)

        records = run(cfg, env, on_iteration=on_iteration)
        return {"iterations": [r["iteration"] for r in records], "losses": [r["loss"] for r in records],
                "weights": weights}

    results = run_ranks(world, fn)
    return {"iterations": results[0]["iterations"], "losses": results[0]["losses"],
            "weights": assemble([r["weights"] for r in results], C.load_config(TINY).model.vocab_size)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    return train(4, TP2PP2 + ["train.iters=4", f"checkpoint.dir={d}/ckpt", "checkpoint.interval=2"], d), d


def assert_same_weights(a, b, **tol):
    for name in NAMES:
        torch.testing.assert_close(a[name], b[name], msg=lambda m: f"{name}: {m}", **tol)


def test_exact_resume_tp2pp2_distributed_optimizer(uninterrupted, tmp_path):
    full, _ = uninterrupted
    first = train(4, TP2PP2 + ["train.iters=4", "train.exit_interval=2", f"checkpoint.dir={tmp_path}/ckpt"],
                  tmp_path / "a")
    assert first["losses"] == full["losses"][:2]
    resumed = train(4, TP2PP2 + ["train.iters=4", f"checkpoint.dir={tmp_path}/ckpt",
                                 f"checkpoint.load={tmp_path}/ckpt"], tmp_path / "b")
    assert resumed["iterations"] == [3, 4]
    assert resumed["losses"] == full["losses"][2:]  # bitwise: same layout, same data position, same state
    assert_same_weights(resumed["weights"], full["weights"], rtol=0, atol=0)


def test_overlapped_param_gather_saves_updated_weights(tmp_path):
    """parallel.overlap_param_gather: an update reaches the other DP ranks' copies only with the next forward's
    all-gather, so a save gathers first: the saved weights (what conversion exports) equal those of the same run
    without overlap, and a resumed run continues bitwise."""
    from megallava.convert.dcp import CheckpointReader

    base = ["parallel.tp=1", "parallel.pp=1"]
    overlap = base + ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"]
    plain = train(2, base + ["train.iters=2", f"checkpoint.dir={tmp_path}/plain"], tmp_path / "p")
    first = train(2, overlap + ["train.iters=2", f"checkpoint.dir={tmp_path}/ckpt"], tmp_path / "a")
    assert plain["losses"] == first["losses"]
    saved, reference = CheckpointReader(f"{tmp_path}/ckpt"), CheckpointReader(f"{tmp_path}/plain")
    keys = [k for k in reference.metadata.state_dict_metadata
            if reference.tensor_meta(k) is not None and not k.startswith("optimizer")]
    assert "decoder.layers.mlp.linear_fc1.weight" in keys
    for key in keys:
        torch.testing.assert_close(saved.read(key), reference.read(key), rtol=0, atol=1e-7, msg=key)
    full = train(2, overlap + ["train.iters=4"], tmp_path / "full")
    stopped = train(2, overlap + ["train.iters=4", "train.exit_interval=2", f"checkpoint.dir={tmp_path}/ck4"],
                    tmp_path / "s")
    resumed = train(2, overlap + ["train.iters=4", f"checkpoint.load={tmp_path}/ck4"], tmp_path / "b")
    assert stopped["losses"] + resumed["losses"] == full["losses"]


def test_sigkill_during_save_keeps_last_good_checkpoint(uninterrupted, tmp_path):
    full, _ = uninterrupted
    ckpt = tmp_path / "ckpt"

    def kill_in_second_save(rank, iteration):
        if iteration == 4 and rank == 1:
            from megatron.core import dist_checkpointing
            original = dist_checkpointing.save

            def save_then_die(*args, **kwargs):
                original(*args, **kwargs)  # shards written into iter_0000004.partial ...
                os.kill(os.getpid(), signal.SIGKILL)  # ... and the process dies before the rename

            dist_checkpointing.save = save_then_die

    with pytest.raises(RuntimeError, match="rank 1"):
        train(4, TP2PP2 + ["train.iters=4", f"checkpoint.dir={ckpt}", "checkpoint.interval=2"], tmp_path / "a",
              hook=kill_in_second_save)
    assert (ckpt / "latest").read_text().strip() == "iter_0000002"
    # The surviving ranks removed the incomplete iter_0000004.partial on their way out; one left by a crash of every
    # rank (a node failure) is never loaded and is removed by the next save:
    assert not (ckpt / "iter_0000004").exists() and not (ckpt / "iter_0000004.partial").exists()
    shutil.copytree(ckpt / "iter_0000002", ckpt / "iter_0000004.partial")
    resumed = train(4, TP2PP2 + ["train.iters=4", f"checkpoint.dir={ckpt}", f"checkpoint.load={ckpt}"],
                    tmp_path / "b")
    assert resumed["losses"] == full["losses"][2:]
    assert_same_weights(resumed["weights"], full["weights"], rtol=0, atol=0)
    assert sorted(os.listdir(ckpt)) == ["iter_0000002", "iter_0000004", "latest"]  # partial cleaned up


def test_sigterm_saves_and_stops(tmp_path):
    def preempt(rank, iteration):
        if iteration == 2 and rank == 3:  # the signal reaches one rank only; all must agree to stop
            os.kill(os.getpid(), signal.SIGTERM)

    out = train(4, TP2PP2 + ["train.iters=6", f"checkpoint.dir={tmp_path}/ckpt"], tmp_path, hook=preempt)
    assert out["iterations"] == [1, 2]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000002"


def test_keep_bounds_disk_use(tmp_path):
    train(1, ["parallel.tp=1", "parallel.pp=1", "train.iters=4", f"checkpoint.dir={tmp_path}/ckpt",
              "checkpoint.interval=1", "checkpoint.keep=2"], tmp_path)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["iter_0000003", "iter_0000004", "latest"]


@pytest.mark.parametrize("world,layout", [(1, ["parallel.tp=1", "parallel.pp=1"]),
                                          (4, ["parallel.tp=1", "parallel.pp=4"])])
def test_resharded_resume_from_tp2pp2(uninterrupted, world, layout, tmp_path):
    full, full_dir = uninterrupted
    resumed = train(world, layout + ["train.iters=4", f"checkpoint.load={full_dir}/ckpt/iter_0000002"], tmp_path)
    assert resumed["iterations"] == [3, 4]
    # Weights and (fully reshardable) optimizer state move to the new layout: the next losses match.
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(full["losses"][2:]), rtol=1e-5,
                               atol=0)
    assert_same_weights(resumed["weights"], full["weights"], rtol=1e-4, atol=1e-5)
