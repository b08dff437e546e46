"""Fused output layer + vocab-parallel cross-entropy that never holds the logits of all tokens.

Contract: ``fused_vocab_parallel_cross_entropy(hidden, weight, labels, vocab_size)`` equals
``vocab_parallel_cross_entropy((hidden @ weight.T).float() with padding columns at -inf, labels)`` zeroed where the
label is -100 (the path in ``llava.py``), as a per-token loss [s, b] in fp32, differentiable wrt hidden and weight.
``hidden`` must already be inside the tensor-parallel region (copy_to_tensor_model_parallel_region, or
gather_from_sequence_parallel_region): those functions reduce the input gradient over TP ranks, so this one doesn't.

Why: at LLaVA-7B shapes (8192 tokens x 32000 vocab) the unfused path holds 1 GiB of fp32 logits for backward, plus
same-size temporaries (bf16 logits, exp, softmax). Here the tokens are processed ``chunk_tokens`` at a time and only
[chunk, V_local] buffers exist at once.

Why the gradients are computed in forward (as Liger-Kernel does): the softmax of a chunk is in hand right after its
loss, so d = softmax - onehot gives grad_hidden = d @ W and grad_weight = sum d^T h with no second logits GEMM and
nothing of size [N, V] kept. Saved for backward: grad_hidden [N, h] (input dtype), grad_weight [V_local, h] (fp32),
the per-token log-sum-exp [N], and references to hidden and weight (no copies). The weight grad is a *fixed* sum, so
scaling it by the upstream gradient is exact only when that gradient is one constant c at every trained token -- what
training does (megatron backprops ``per_token_loss.sum()`` times a constant). Backward checks this with one host sync;
for any other upstream gradient it recomputes each chunk's logits from hidden, weight and the saved log-sum-exp (no
collectives) and forms sum_i g_i d_i^T h_i exactly. grad_hidden = saved row * g_i is exact for any g.
"""
import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _chunk_logits(h, weight, pad):
    """[c, h] x [V, h] -> fp32 [c, V] logits (GEMM in the input dtype), padding columns at -inf."""
    z = (h @ weight.t()).float()
    return z.masked_fill_(pad, float("-inf")) if pad is not None else z


def _subtract_onehot(d, local, owned):
    """d[i, label_i] -= 1 where this rank owns the label row, without a host sync."""
    return d.scatter_add_(1, local.clamp(0, d.shape[1] - 1)[:, None], -owned.to(d.dtype)[:, None])


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_size, chunk_tokens, grad_enabled):
        tp = parallel_state.get_tensor_model_parallel_world_size()
        group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
        v_local, h_dim = weight.shape
        start = parallel_state.get_tensor_model_parallel_rank() * v_local
        pad = (torch.arange(start, start + v_local, device=weight.device) >= vocab_size
               if start + v_local > vocab_size else None)
        flat, lab = hidden.reshape(-1, h_dim), labels.reshape(-1)  # copies only a non-contiguous hidden
        n = flat.shape[0]
        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]
        loss = torch.zeros(n, dtype=torch.float32, device=flat.device)
        lse = torch.empty(n, dtype=torch.float32, device=flat.device)
        grad_h = torch.zeros_like(flat) if need_h else None
        grad_w = torch.zeros(v_local, h_dim, dtype=torch.float32, device=weight.device) if need_w else None

        for i in range(0, n, chunk_tokens):
            h, y = flat[i:i + chunk_tokens], lab[i:i + chunk_tokens]
            valid, local = y >= 0, y - start
            owned = valid & (local >= 0) & (local < v_local)
            z = _chunk_logits(h, weight, pad)
            zmax = z.max(dim=-1).values
            if group is not None:
                dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
            z.sub_(zmax[:, None])
            target = torch.where(owned, z.gather(1, local.clamp(0, v_local - 1)[:, None]).squeeze(1), 0.0)
            z.exp_()
            stats = torch.stack([z.sum(dim=-1), target])  # one SUM all-reduce for [sumexp, target logit]
            if group is not None:
                dist.all_reduce(stats, group=group)
            log_sumexp = stats[0].log()
            loss[i:i + chunk_tokens] = (log_sumexp - stats[1]).masked_fill_(~valid, 0.0)
            lse[i:i + chunk_tokens] = zmax + log_sumexp
            if need_h or need_w:  # softmax - onehot; dividing by inf zeroes the rows of ignored tokens
                d = z.div_(torch.where(valid, stats[0], float("inf"))[:, None])
                d = _subtract_onehot(d, local, owned).to(flat.dtype)
                del z  # fp32 inputs: d is z, still referenced
                if need_h:
                    torch.mm(d, weight, out=grad_h[i:i + chunk_tokens])
                if need_w:
                    if d.dtype == torch.float32:
                        grad_w.addmm_(d.t(), h)
                    else:
                        grad_w += torch.mm(d.t(), h)

        ctx.chunk_tokens, ctx.start, ctx.pad = chunk_tokens, start, pad
        ctx.save_for_backward(grad_h, grad_w, lse, labels, hidden, weight)
        return loss.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, lse, labels, hidden, weight = ctx.saved_tensors
        g, lab = grad_loss.reshape(-1), labels.reshape(-1)
        valid = lab >= 0
        gmin, gmax = torch.stack([torch.where(valid, g, float("inf")).min(),
                                  torch.where(valid, g, float("-inf")).max()]).tolist()  # the one host sync
        uniform = gmin == gmax or gmin == float("inf")  # inf: no trained token; a NaN takes the exact path
        c = gmin if gmin == gmax else 0.0
        gh = gw = None
        if grad_h is not None:
            gh = (grad_h * c if uniform else (grad_h * g[:, None]).to(grad_h.dtype)).view(hidden.shape)
        if grad_w is not None:
            gw = grad_w * c if uniform else _weight_grad_recompute(ctx, hidden, weight, lab, lse,
                                                                   torch.where(valid, g, 0.0))
            gw = gw.to(weight.dtype)
        return gh, gw, None, None, None, None


def _weight_grad_recompute(ctx, hidden, weight, lab, lse, g):
    """Exact sum_i g_i d_i^T h_i for a non-uniform upstream gradient: recompute each chunk's softmax from the
    saved global log-sum-exp (so no collectives), one chunk at a time."""
    flat = hidden.reshape(-1, weight.shape[1])
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for i in range(0, flat.shape[0], ctx.chunk_tokens):
        h, y, gi = flat[i:i + ctx.chunk_tokens], lab[i:i + ctx.chunk_tokens], g[i:i + ctx.chunk_tokens]
        local = y - ctx.start
        owned = (y >= 0) & (local >= 0) & (local < weight.shape[0])
        d = _chunk_logits(h, weight, ctx.pad).sub_(lse[i:i + ctx.chunk_tokens, None]).exp_()
        d = _subtract_onehot(d, local, owned).mul_(gi[:, None]).to(flat.dtype)  # g_i = 0 at ignored tokens
        grad_w += torch.mm(d.t(), h)
    return grad_w


def fused_vocab_parallel_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                       vocab_size: int, chunk_tokens: int = 4096) -> torch.Tensor:
    """hidden [s, b, h] (bf16 or fp32) inside the TP region; weight [V_local, h], this TP rank's rows of the output
    layer (rank r holds global rows [r*V_local, (r+1)*V_local)); labels [s, b] int64, -100 = ignored; rows >=
    ``vocab_size`` are padding and never enter the softmax. Returns per-token loss [s, b] fp32, 0 at ignored tokens."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return _FusedLinearCrossEntropy.apply(hidden, weight, labels, vocab_size, chunk_tokens, torch.is_grad_enabled())
