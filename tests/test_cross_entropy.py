"""fused_vocab_parallel_cross_entropy against the unfused path of llava.py (logits = hidden @ W.T, padding at -inf,
megatron's vocab_parallel_cross_entropy on fp32 logits, 0 at ignored labels): losses, both gradients for uniform
and non-uniform upstream gradients, TP2 vs TP1, bf16, what is saved for backward, all-ignored labels.
Every check runs on ranks forked by run_ranks (megatron's parallel_state needs a process group, even at TP1)."""
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.multirank import run_ranks

S, B, H, ROWS, VOCAB = 37, 3, 16, 512, 500  # N = 111 tokens; rows 500..511 are vocab padding


def make_data(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, H, generator=g).transpose(0, 1)  # [s, b, h], a non-contiguous view
    weight = torch.randn(ROWS, H, generator=g) * 0.5
    labels = torch.randint(0, VOCAB, (S, B), generator=g)
    labels[torch.rand(S, B, generator=g) < 0.3] = -100
    labels[:6] = -100  # tokens 0..17: the whole first chunk at chunk_tokens=16 is ignored
    labels[6:8] = torch.tensor([[0, 255, 256], [499, 1, 300]])  # both TP2 shards' edges, the last real row
    return hidden.to(dtype), weight.to(dtype), labels


def reference(hidden, weight, labels):
    from megatron.core import tensor_parallel

    pad = torch.arange(weight.shape[0]) >= VOCAB
    logits = (hidden @ weight.t()).masked_fill(pad, float("-inf"))
    ignore = labels < 0
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.masked_fill(ignore, 0))
    return loss.masked_fill(ignore, 0.0)


def fused(chunk_tokens):
    from megallava.model.cross_entropy import fused_vocab_parallel_cross_entropy

    return lambda h, w, y: fused_vocab_parallel_cross_entropy(h, w, y, VOCAB, chunk_tokens)


def loss_and_grads(loss_fn, hidden, weight, labels, upstream):
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = loss_fn(h, w, labels)
    (loss * upstream).sum().backward()
    return loss.detach(), h.grad, w.grad


def count_recomputes():
    """Counts calls of the exact (non-uniform upstream) weight-grad path; patched in the forked rank only."""
    from megallava.model import cross_entropy as ce

    calls, inner = [], ce._weight_grad_recompute
    ce._weight_grad_recompute = lambda *a: calls.append(1) or inner(*a)
    return calls


def on_ranks(world, fn):
    def rank_fn(rank, env):
        from megallava.distributed import init_distributed

        init_distributed(world, 1, None, 0, env)
        return fn(rank)
    return run_ranks(world, rank_fn)


def assert_rel(got, ref, rel=1e-6):
    torch.testing.assert_close(got, ref, rtol=rel, atol=rel * ref.abs().max().item())


def test_fp32_matches_reference_uniform_and_weighted_upstream():
    weights = torch.rand(S, B, generator=torch.Generator().manual_seed(1))

    def fn(_):
        calls = count_recomputes()
        hidden, weight, labels = make_data()
        out = {}
        for up_name, upstream in (("uniform", 0.25), ("weighted", weights)):
            out[up_name, "ref"] = loss_and_grads(reference, hidden, weight, labels, upstream)
            for chunk in (16, 1000):  # 16 does not divide N = 111; 1000 >= N
                out[up_name, chunk] = loss_and_grads(fused(chunk), hidden, weight, labels, upstream)
            out[up_name, "recomputes"] = len(calls)
        with torch.no_grad():
            out["no_grad"] = fused(16)(hidden, weight, labels)
        return out

    out = on_ranks(1, fn)[0]
    ref_loss = out["uniform", "ref"][0]
    assert (ref_loss[:6] == 0).all() and ref_loss.max() > 1.0
    assert out["uniform", "recomputes"] == 0 and out["weighted", "recomputes"] == 2  # once per chunk size
    torch.testing.assert_close(out["no_grad"], ref_loss, rtol=0, atol=1e-6)
    for up_name in ("uniform", "weighted"):
        ref = out[up_name, "ref"]
        for chunk in (16, 1000):
            loss, gh, gw = out[up_name, chunk]
            torch.testing.assert_close(loss, ref[0], rtol=0, atol=1e-6)
            assert_rel(gh, ref[1])
            assert_rel(gw, ref[2])
            assert gw[VOCAB:].abs().max() == 0  # padding rows get no gradient


def test_tp2_matches_tp1_reference():
    weights = torch.rand(S, B, generator=torch.Generator().manual_seed(2))
    hidden, weight, labels = make_data()
    ref = on_ranks(1, lambda _: [loss_and_grads(reference, hidden, weight, labels, up) for up in (1.0, weights)])[0]

    def fn(rank):
        rows = weight[rank * ROWS // 2:(rank + 1) * ROWS // 2]
        return [loss_and_grads(fused(16), hidden, rows, labels, up) for up in (1.0, weights)]

    ranks = on_ranks(2, fn)
    for k in range(2):  # uniform, weighted upstream gradient
        for r in range(2):
            torch.testing.assert_close(ranks[r][k][0], ref[k][0], rtol=0, atol=1e-6)
        assert_rel(ranks[0][k][1] + ranks[1][k][1], ref[k][1])  # the caller's TP all-reduce of grad_hidden
        assert_rel(torch.cat([ranks[0][k][2], ranks[1][k][2]]), ref[k][2])


def test_bf16_within_rounding_of_fp32_reference():
    def fn(_):
        hidden, weight, labels = make_data(torch.bfloat16)
        ref = loss_and_grads(reference, hidden.float(), weight.float(), labels, 1.0)
        got = loss_and_grads(fused(16), hidden, weight, labels, 1.0)
        zmax = (hidden.float() @ weight.float().t()).abs().amax(-1)
        return ref, got, zmax

    ref, (loss, gh, gw), zmax = on_ranks(1, fn)[0]
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    # The only difference in forward is the bf16 GEMM output: each logit z is rounded to bf16, |dz| <= 2^-9 |z|.
    # loss = lse - z_target and |d lse| <= max_j |dz_j|, so |d loss| <= 2 * 2^-9 * max_j |z_j| per token.
    err = (loss - ref[0]).abs()
    assert (err <= 2 ** -8 * zmax + 1e-6).all(), (err / zmax).max()
    print(f"bf16: max |dloss| = {err.max():.2e}, bound 2^-8*max|z| = {(2 ** -8 * zmax).max():.2e}")
    # Gradients: softmax - onehot rounded to bf16 before the GEMMs, and the bf16 result: ~2^-8 relative.
    for got, r in ((gh, ref[1]), (gw, ref[2])):
        assert (got.float() - r).norm() <= 1e-2 * r.norm()


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (the forward and backward of the fused function)."""
    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_saved_for_backward_is_far_smaller_than_logits():
    s, b, h, v, chunk = 128, 8, 16, 512, 64  # N = 1024 tokens

    def saved_by(loss_fn, hidden, weight, labels):
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.untyped_storage().nbytes())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(hidden, weight, labels)
        return loss, saved

    def fn(_):
        g = torch.Generator().manual_seed(3)
        hidden = torch.randn(s, b, h, generator=g, requires_grad=True)
        weight = torch.randn(v, h, generator=g, requires_grad=True)
        labels = torch.randint(0, VOCAB, (s, b), generator=g)
        _, ref_saved = saved_by(reference, hidden, weight, labels)
        with _LargestTensor() as mode:
            loss, fused_saved = saved_by(fused(chunk), hidden, weight, labels)
            loss.sum().backward()
        return ref_saved, fused_saved, mode.largest

    ref_saved, fused_saved, largest = on_ranks(1, fn)[0]
    n = s * b
    ref_bytes = sum(nbytes for _, nbytes in ref_saved.values())
    fused_bytes = sum(nbytes for _, nbytes in fused_saved.values())
    print(f"saved for backward: reference {ref_bytes} B (fp32 logits alone {n * v * 4} B), fused {fused_bytes} B, "
          f"largest tensor in fused fwd+bwd {largest} elements (chunk x V = {chunk * v}, N x V = {n * v})")
    assert any(shape == (s, b, v) for shape, _ in ref_saved.values())
    assert not any(shape[-1] == v and math.prod(shape[:-1]) == n for shape, _ in fused_saved.values())  # no [N, V]
    # grad_hidden + grad_weight (fp32) + lse + labels + references to hidden and weight (which exist anyway)
    assert fused_bytes == n * h * 4 + v * h * 4 + n * 4 + n * 8 + n * h * 4 + v * h * 4
    assert ref_bytes > 4 * fused_bytes
    assert largest <= max(chunk * v, v * h, n * h) < n * v


def test_all_ignored_labels():
    def fn(_):
        hidden, weight, labels = make_data()
        return [loss_and_grads(fused(16), hidden, weight, torch.full_like(labels, -100), up)
                for up in (1.0, torch.rand(S, B))]

    for loss, gh, gw in on_ranks(1, fn)[0]:
        assert loss.shape == (S, B) and loss.abs().max() == 0
        assert gh.abs().max() == 0 and gw.abs().max() == 0  # abs().max() == 0 is also False for NaN
