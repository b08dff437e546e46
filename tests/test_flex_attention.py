"""FlexAttention for packed rows: the BlockMask is exactly the dense segment mask, and attention through it (torch's
reference implementation on CPU, fp32) gives the dense-mask SDPA outputs and q/k/v gradients to float rounding, at
row lengths that are not multiples of the 128 block, with trailing padding, GQA and per-row layouts. The compiled
CUDA kernel and the strict fused-SDPA selection need a GPU and are not exercised here."""
import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from torch.nn.attention.flex_attention import BlockMask, create_mask

from megallava.model.attention import (SDPACoreAttention, _flex_eager, packed_attention_mask, segment_attention_mask,
                                       segment_block_mask)

# fp32, s <= 300: the two paths differ by summation order only (measured: outputs <= 6e-7, gradients <= 6e-6 where
# they reach 8, with unit-normal upstream gradients).
TOL = dict(atol=2e-5, rtol=1e-5)

# Sample lengths per row; the rest of each row is padding (segment 0). Segments straddle the 128-position block
# boundary, one row is a single sample filling it, one is padding only (a row pad_batch adds).
LAYOUTS = {
    200: [[50, 90, 30, 20], [200], [7] * 25, [130, 3]],
    300: [[130, 70, 60], [300], [5, 250], []],
}


def segment_ids(lengths_per_row, s):
    ids = torch.zeros(len(lengths_per_row), s, dtype=torch.long)
    for row, lengths in enumerate(lengths_per_row):
        start = 0
        for seg, n in enumerate(lengths, 1):
            ids[row, start:start + n] = seg
            start += n
        assert start <= s
    return ids


def qkv(b, s, nq=4, ng=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, s, d, generator=g, requires_grad=True) for n in (nq, ng, ng))


def grads(out, inputs, seed=1):
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, inputs, upstream)


def dense_reference(q, k, v, ids, scale):
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=~segment_attention_mask(ids), scale=scale)


@pytest.mark.parametrize("s", [128, 200, 300, 1])
def test_block_mask_is_exactly_the_dense_segment_mask(s):
    ids = segment_ids(LAYOUTS[s], s) if s in LAYOUTS else segment_ids([[s], [s // 2 + 1], []], s)
    b = ids.shape[0]
    bm = segment_block_mask(ids)
    dense = segment_attention_mask(ids)  # True = masked out
    assert bm.seq_lengths == (s, s) and bm.BLOCK_SIZE == (128, 128)
    # element level: the mask_mod over every (q, kv) pair is the dense mask's complement
    assert torch.equal(create_mask(bm.mask_mod, b, 1, s, s), ~dense)
    # block level: a block is visited iff something in it is allowed; it skips the mask_mod ("full") iff
    # everything in it is allowed (a ragged last block is padded with "masked", so it is never full)
    nb = -(-s // 128)
    allowed = F.pad(~dense, (0, nb * 128 - s, 0, nb * 128 - s)).view(b, 1, nb, 128, nb, 128)
    any_allowed, all_allowed = allowed.any(5).any(3), allowed.all(5).all(3)
    assert torch.equal(bm.to_dense().bool(), any_allowed)
    full = BlockMask.from_kv_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, BLOCK_SIZE=128, seq_lengths=(s, s))
    assert torch.equal(full.to_dense().bool(), all_allowed)
    if s == 300:
        # blocks across samples are skipped: row 0's last query block (sample 3 and padding) never visits block 0
        # (sample 1), so fewer blocks are visited than causal attention would (the 6 of a 3-block lower triangle)
        assert not any_allowed[0, 0, 2, 0] and any_allowed.sum() < b * 6
        # a padding-only row attends causally: blocks below the diagonal are full, the ragged last one is not
        assert all_allowed[3, 0, 1, 0] and not all_allowed[3, 0, 2, 0] and any_allowed[3, 0, 2].all()


@pytest.mark.parametrize("s", [200, 300])
def test_flex_matches_dense_sdpa_outputs_and_grads(s):
    ids = segment_ids(LAYOUTS[s], s)
    q, k, v = qkv(ids.shape[0], s)
    scale = 0.3
    bm = segment_block_mask(ids)
    out = _flex_eager(q, k, v, bm, scale)  # with autograd
    ref = dense_reference(q, k, v, ids, scale)
    torch.testing.assert_close(out, ref, **TOL)
    for g, g_ref in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(g, g_ref, **TOL)
    # inference (torch's public flex_attention; it refuses CPU inputs that require grad) gives the same output
    with torch.no_grad():
        inference = _flex_eager(q, k, v, bm, scale)
    torch.testing.assert_close(inference, ref.detach(), **TOL)
    assert torch.isfinite(out).all()


def _core(dropout=0.0):
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                               attention_dropout=dropout)
    return SDPACoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal)


def test_core_attention_gives_the_same_output_with_either_mask():
    s = 200
    ids = segment_ids(LAYOUTS[s], s)
    core = _core()
    assert core.softmax_scale == 0.25  # kv_channels 64 / 4 = 16
    q, k, v = (t.permute(2, 0, 1, 3).detach().requires_grad_() for t in qkv(ids.shape[0], s, seed=3))  # [s, b, n, d]
    flex_mask, dense_mask = packed_attention_mask(ids, use_flex=True), packed_attention_mask(ids, use_flex=False)
    assert isinstance(flex_mask, BlockMask) and torch.equal(dense_mask, segment_attention_mask(ids))
    out_flex, out_dense = core(q, k, v, flex_mask), core(q, k, v, dense_mask)
    assert out_flex.shape == out_dense.shape == (s, ids.shape[0], 4 * 16)
    torch.testing.assert_close(out_flex, out_dense, **TOL)
    for g, g_ref in zip(grads(out_flex, (q, k, v)), grads(out_dense, (q, k, v))):
        torch.testing.assert_close(g, g_ref, **TOL)
    # without packing (no mask, causal) a single full-row sample gives the same as its BlockMask
    full_row = segment_ids([[s]] * ids.shape[0], s)
    torch.testing.assert_close(core(q, k, v, None), core(q, k, v, segment_block_mask(full_row)), **TOL)


def test_flex_with_attention_dropout_in_training_raises():
    s = 200
    ids = segment_ids(LAYOUTS[s], s)
    core = _core(dropout=0.1).train()
    q, k, v = (t.detach().permute(2, 0, 1, 3) for t in qkv(ids.shape[0], s))
    with pytest.raises(ValueError, match="dropout 0.1 is not supported with FlexAttention"):
        core(q, k, v, segment_block_mask(ids))
    core(q, k, v, segment_attention_mask(ids))  # the dense mask keeps dropout
    torch.testing.assert_close(core.eval()(q, k, v, segment_block_mask(ids)),  # no dropout in eval: fine
                               core(q, k, v, segment_attention_mask(ids)), **TOL)
