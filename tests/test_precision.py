"""bf16 parameters with fp32 master weights (the GPU default) also run on CPU: same path, checked here."""
import os

import torch

from megallava import config as C
from tests.multirank import run_ranks

TINY = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "tiny_cpu.yaml")


def _run(precision, tmp_path):
    def fn(rank, env):
        from megallava.model.init import unwrap
        from megallava.training.train import run

        cfg = C.load_config(TINY, ["train.iters=3", f"train.precision={precision}", f"train.run_dir={tmp_path}"])
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
