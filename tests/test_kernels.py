"""Fused paths (kernels.*) equal the reference paths they replace, forward and gradients, on CPU (where torch.compile
runs through inductor's C++ backend): compiled RMSNorm and RoPE, megatron's compiled SwiGLU, the fused Adam step,
the foreach grad norm / clipping and the bf16 (no master weights) optimizer; then whole training runs with every
switch on at TP2xPP2 and TP2+SP match the unfused single-rank run (tests/test_parallel_parity.py's reference)."""
import os

import pytest
import torch
import torch.nn.functional as F

from megallava import config as C
from megallava.model import fused
from tests.multirank import run_ranks

TINY = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "tiny_cpu.yaml")
ALL_ON = [f"kernels.{k}=true" for k in fused.SWITCHES]
ALL_OFF = [f"kernels.{k}=false" for k in fused.SWITCHES]


def _grads(fn, *inputs):
    """Output and input grads of fn under a fixed random upstream gradient."""
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype))
    return [out.detach()] + [x.grad for x in inputs]


def test_fused_rmsnorm_equals_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 3, 64, generator=gen) * 3
    w = 1 + 0.1 * torch.randn(64, generator=gen)
    got = _grads(lambda a, b: fused.rms_norm(a, b, 1e-5), x, w)
    ref = _grads(lambda a, b: fused.rms_norm_reference(a, b, 1e-5), x, w)
    for g, r in zip(got, ref):  # fp32: the compiled kernel reorders the mean's sum only
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    # bf16 input: the reference rounds x / rms to bf16 before the weight multiply; so does the kernel
    xb, wb = x.bfloat16(), w.bfloat16()
    torch.testing.assert_close(fused.rms_norm(xb, wb, 1e-5), fused.rms_norm_reference(xb, wb, 1e-5),
                               rtol=1e-2, atol=1e-2)


def test_fused_rope_equals_megatron_unfused():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megallava.model.llama import rotary_freqs

    gen = torch.Generator().manual_seed(0)
    t = torch.randn(40, 2, 4, 16, generator=gen)
    freqs = rotary_freqs(40, 16, 10000.0)                                   # [s, 1, 1, d]
    packed = freqs[:, 0, 0][torch.randint(0, 40, (2, 40), generator=gen).t()].unsqueeze(2)  # [s, b, 1, d]
    for angles in (freqs, packed):
        got = _grads(lambda a: fused.fused_rope(a, angles), t)
        ref = _grads(lambda a: _apply_rotary_pos_emb_bshd(a, angles), t)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rotary_interleaved"):
        fused.fused_rope(t, freqs, interleaved=True)


def test_megatron_swiglu_equals_reference():
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    x = torch.randn(20, 3, 2 * 48, generator=torch.Generator().manual_seed(0))

    def reference(y):
        gate, up = torch.chunk(y, 2, dim=-1)
        return F.silu(gate) * up

    for g, r in zip(_grads(lambda y: bias_swiglu_impl(y, None), x), _grads(reference, x)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_foreach_grad_norm_and_clip_equal_megatron_local():
    from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale
    from megallava import cpu_compat
    from megallava.training.optimizer import _foreach_l2_norm, _foreach_scale

    cpu_compat.install()  # megatron's local norm puts its result on "cuda"

    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=gen) for n in (3, 1000, 77)] + [torch.randn(5, 7, generator=gen)]
    ref, _ = local_multi_tensor_l2_norm(0, None, [tensors], False)
    got, _ = _foreach_l2_norm(0, None, [tensors], False)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    bf16 = [t.bfloat16() for t in tensors]  # norms of bf16 grads accumulate in fp32
    got16, _ = _foreach_l2_norm(0, None, [bf16], False)
    assert got16.dtype == torch.float32
    torch.testing.assert_close(got16, ref, rtol=1e-2, atol=0)
    a, b = [t.clone() for t in tensors], [t.clone() for t in tensors]
    local_multi_tensor_scale(0, None, [a, a], 0.25)
    _foreach_scale(0, None, [b, b], 0.25)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_fused_adam_steps_like_foreach_adam():
    """build_optimizer with kernels.fused_adam switches megatron's torch AdamW to the fused kernel; one update of
    the same grads gives the same master weights as the default foreach step."""
    def fn(rank, env):
        from megallava.distributed import init_distributed
        from megallava.model.build import build_chunks
        from megallava.training.optimizer import build_optimizer, torch_adams, wrap_ddp

        init_distributed(1, 1, None, 0, env)
        out = {}
        for switch in (False, True):
            cfg = C.load_config(TINY, ["parallel.tp=1", "parallel.pp=1", f"kernels.fused_adam={switch}"])
            model = wrap_ddp(build_chunks(cfg), cfg)
            opt, _ = build_optimizer(model, cfg)
            gen = torch.Generator().manual_seed(3)
            for p in model[0].module.parameters():
                if p.requires_grad:
                    p.main_grad.copy_(torch.randn(p.shape, generator=gen) * 1e-2)
            opt.step()
            flags = {(g["fused"], g["foreach"]) for a in torch_adams(opt) for g in a.param_groups}
            out[switch] = (flags, [p.detach().clone() for p in model[0].module.parameters()])
        return out

    out = run_ranks(1, fn)[0]
    assert out[True][0] == {(True, False)} and out[False][0] == {(None, None)}
    for a, b in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _train(world, overrides, tmp_path, iters=3):
    base = [f"train.iters={iters}", "train.global_batch_size=8", "train.micro_batch_size=4",
            f"train.run_dir={tmp_path}", "parallel.tp=1", "parallel.pp=1"]

    def fn(rank, env):
        from megallava.training.train import run

        cfg = C.load_config(TINY, base + overrides)
        C.validate(cfg, env.world_size)
        seen = {}

        def hook(iteration, model, out):
            unwrapped = model[0].module
            seen["norm_fused"] = sorted({m.fused for m in unwrapped.modules() if hasattr(m, "fused")})
            seen["swiglu"] = unwrapped.config.bias_activation_fusion
            seen["rope"] = unwrapped.config.apply_rope_fusion

        records = run(cfg, env, on_iteration=hook)
        return {"losses": [r["loss"] for r in records], "grad_norms": [r["grad_norm"] for r in records], **seen}

    return run_ranks(world, fn)[0]


@pytest.fixture(scope="module")
def unfused(tmp_path_factory):
    return _train(1, ALL_OFF, tmp_path_factory.mktemp("unfused"))


@pytest.fixture(scope="module")
def unfused_packed(tmp_path_factory):
    return _train(1, ALL_OFF + ["data.packing=true"], tmp_path_factory.mktemp("unfused_packed"))


LAYOUTS = {"tp1": (1, []), "tp2pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
           "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
           "packed_tp2pp2": (4, ["parallel.tp=2", "parallel.pp=2", "data.packing=true"])}  # FlexAttention masks


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_all_kernels_on_match_unfused_training(layout, unfused, unfused_packed, tmp_path):
    world, overrides = LAYOUTS[layout]
    unfused = unfused_packed if "data.packing=true" in overrides else unfused
    got = _train(world, ALL_ON + overrides, tmp_path)
    assert got["norm_fused"] == [True] and got["swiglu"] is True and got["rope"] is True
    assert unfused["norm_fused"] == [False] and unfused["swiglu"] is False and unfused["rope"] is False
    ref = torch.tensor(unfused["losses"], dtype=torch.float64)
    assert ref[0] > ref[-1] > 0
    torch.testing.assert_close(torch.tensor(got["losses"], dtype=torch.float64), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(unfused["grad_norms"]),
                               rtol=1e-4, atol=1e-6)
