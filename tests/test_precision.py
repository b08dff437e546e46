"""bf16 parameters with fp32 master weights (the GPU default) also run on CPU: same path, checked here."""
import os

import torch

from megallava import config as C
from tests.multirank import run_ranks

TINY = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "tiny_cpu.yaml")


def _run(precision, tmp_path, extra=()):
    def fn(rank, env):
        from megallava.model.init import unwrap
        from megallava.training.train import run

        cfg = C.load_config(TINY, ["train.iters=3", f"train.precision={precision}", f"train.run_dir={tmp_path}",
                                   *extra])
        dtypes = {}

        def hook(iteration, model, out):
            chunk = unwrap(model[0])
            dtypes["param"] = next(chunk.decoder.parameters()).dtype
            dtypes["main_grad"] = next(p for p in chunk.decoder.parameters()).main_grad.dtype

        records = run(cfg, env, on_iteration=hook)
        return [r["loss"] for r in records], dtypes

    return run_ranks(4, fn)[0]


def test_bf16_params_fp32_grads_track_fp32(tmp_path):
    fp32, fp32_types = _run("fp32", tmp_path / "fp32")
    bf16, bf16_types = _run("bf16", tmp_path / "bf16")
    assert fp32_types == {"param": torch.float32, "main_grad": torch.float32}
    assert bf16_types == {"param": torch.bfloat16, "main_grad": torch.float32}  # grads reduced in fp32
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(fp32), rtol=2e-2, atol=0)
    assert bf16 != fp32  # it really ran in bf16
    bf16_grads, types = _run("bf16", tmp_path / "bf16_grads", ["train.grad_reduce_in_fp32=false"])
    assert types == {"param": torch.bfloat16, "main_grad": torch.bfloat16}  # grads accumulated / reduced in bf16
    torch.testing.assert_close(torch.tensor(bf16_grads), torch.tensor(fp32), rtol=2e-2, atol=0)


def _run_bf16_weights(tmp_path, extra):
    """train.master_weights=false at TP2xPP2: bf16 params, grads and Adam moments, no fp32 copy anywhere."""
    def fn(rank, env):
        from megallava.model.init import unwrap
        from megallava.training.train import run

        cfg = C.load_config(TINY, ["train.iters=4", "train.precision=bf16", f"train.run_dir={tmp_path}",
                                   "train.master_weights=false", "parallel.use_distributed_optimizer=false",
                                   "train.lr_warmup_fraction=0", "train.lr_decay_style=linear", *extra])
        C.validate(cfg, env.world_size)
        seen = {}

        def hook(iteration, model, out):
            chunk = unwrap(model[0])
            trainable = [p for p in chunk.parameters() if p.requires_grad]
            seen["dtypes"] = {str(p.dtype) for p in trainable} | {str(p.main_grad.dtype) for p in trainable}
            seen["weights"] = {n: p.detach().float().clone() for n, p in chunk.named_parameters() if p.requires_grad}

        records = run(cfg, env, on_iteration=hook)
        return [r["loss"] for r in records], seen

    return run_ranks(4, fn)


def test_bf16_weights_without_master_copy_train_and_resume_exactly(tmp_path):
    full = _run_bf16_weights(tmp_path / "full", [])
    losses, seen = full[0]
    assert seen["dtypes"] == {"torch.bfloat16"}  # params and grads: nothing kept in fp32
    fp32, _ = _run("fp32", tmp_path / "fp32")
    torch.testing.assert_close(torch.tensor(losses[:3]), torch.tensor(fp32), rtol=2e-2, atol=0)
    assert losses[-1] < losses[0]
    first = _run_bf16_weights(tmp_path / "a", ["train.exit_interval=2", f"checkpoint.dir={tmp_path}/ck"])
    assert first[0][0] == losses[:2]
    resumed = _run_bf16_weights(tmp_path / "b", [f"checkpoint.dir={tmp_path}/ck", f"checkpoint.load={tmp_path}/ck"])
    assert resumed[0][0] == losses[2:]  # bitwise: the bf16 Adam moments were saved and restored
    for rank in range(4):
        for name, w in full[rank][1]["weights"].items():
            assert torch.equal(resumed[rank][1]["weights"][name], w), (rank, name)
