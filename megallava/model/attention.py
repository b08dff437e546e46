"""Core attention on torch's scaled_dot_product_attention (flash / memory-efficient kernels on GPU), and on
FlexAttention for packed rows.

Drop-in for megatron-core's DotProductAttention (same constructor and forward signature), which materialises the
[b, n, s, s] score matrix with baddbmm + softmax: 0.61x HF's speed at 2x its memory on an H100 (REFERENCE.md).

Two mask kinds reach ``SDPACoreAttention.forward`` (``packed_attention_mask`` builds either, once per micro-batch;
every layer shares it):
- a dense bool tensor [b, 1, s, s] (megatron's convention: True = masked out), or None (causal / no mask): torch SDPA.
  On CUDA SDPA may only pick a fused kernel (flash, memory-efficient, cuDNN): its math fallback materialises
  [b, n, s, s] scores, so a case no fused kernel supports raises instead of silently running at 2x memory. A dense
  mask rules out flash, so packed rows run the memory-efficient kernel with the mask read from memory.
- a FlexAttention ``BlockMask`` (``segment_block_mask``): the packed-row document mask as a function plus its
  128 x 128 block sparsity, so blocks across samples are skipped and no [s, s] mask is read. On CUDA it runs a
  module-level ``torch.compile(flex_attention, dynamic=True)``; on CPU torch's unfused reference (it materialises the
  scores, like the dense path: for tests and debugging, not speed). FlexAttention has no dropout. On an H200 (bf16,
  b=4, s=2048, 32/8 heads, d=128, samples of 16..1023 tokens) it runs forward+backward in 2.4 ms vs 3.8 ms for the
  dense mask (flash without any mask: 1.7 ms).
On CPU the SDPA path is unchanged (no kernel restriction).
"""
import contextlib
import math
import warnings
from typing import Optional, Union

import torch
import torch.fx.experimental._config as _fx_config
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# SDPA backends allowed on CUDA: every fused one, never MATH.
_FUSED_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]

# dynamic=True: the packed micro-batch shape [rows, s] changes from step to step (rows = how many rows its samples
# fill, s = its longest row). Static shapes would recompile on each new (rows, s) (~10 s each) and, past dynamo's
# recompile limit (8), silently run flex_attention eagerly, which materialises fp32 [b, n, s, s] scores. Padding s to
# a multiple of 128 would not fix the row count and costs up to 127 padded positions per row; the kernel handles a
# ragged last block itself (it masks positions >= s and bounds the mask_mod's indices; checked on torch 2.11 CUDA),
# so the BlockMask is built at the exact row length and nothing is padded. What still recompiles: rows == 1 (dynamo
# always specialises size 1), grad mode (train / eval) and dtype: on an H200, 13 packed shapes (b 1..8, s 129..2048)
# compiled 2 graphs for training and 2 for eval, ~10 s each, once.
_flex_compiled = torch.compile(flex_attention, dynamic=True)


def _flex_cuda(q, k, v, block_mask: BlockMask, scale: float) -> torch.Tensor:
    """The compiled kernel. Duck shaping is off while it may trace: with it, sizes that happen to be equal in the
    first micro-batch (rows == number of 128-blocks) get one symbol and an equality guard, so a later micro-batch
    where they differ recompiles once more."""
    old, _fx_config.use_duck_shape = _fx_config.use_duck_shape, False
    try:
        return _flex_compiled(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
    finally:
        _fx_config.use_duck_shape = old


# CPU runs flex_attention eagerly on purpose (above); its "called without torch.compile()" warning is silenced once
# here rather than per call.
warnings.filterwarnings("ignore", message=r"flex_attention called without torch\.compile", category=UserWarning)

try:  # torch's reference implementation with its autograd (see _flex_eager)
    from torch._higher_order_ops.flex_attention import flex_attention as _flex_hop
    from torch.nn.attention.flex_attention import _apply_kernel_options, _identity
except ImportError:  # pragma: no cover - a torch without these private names: CPU flex is then inference-only
    _flex_hop = None


def segment_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] segment ids -> [b, 1, s, s] bool mask in megatron's convention (True = masked out): a token attends to
    earlier-or-same positions of its own segment only. Padding (segment 0) attends to padding, so no query row is
    fully masked (SDPA would return NaN there) and real tokens never see it."""
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril_()
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    return ~allowed[:, None]


def segment_block_mask(segment_ids: torch.Tensor, block_size: int = 128) -> BlockMask:
    """[b, s] segment ids -> FlexAttention BlockMask with exactly ``segment_attention_mask``'s semantics (causal and
    same segment; padding 0 attends to padding), on the ids' device, shared by all heads.

    Any s works: the block grid is ceil(s / block_size) and the partial last block is evaluated at positions < s
    only, so it never counts as full and mask_mod always decides there. Building it evaluates the mask once over
    [b, s, s] (like the dense mask, but freed at once: only the block indices and the ids stay alive)."""
    ids = segment_ids.contiguous()
    b, s = ids.shape

    def same_segment_causal(batch, head, q_idx, kv_idx):
        return (ids[batch, q_idx] == ids[batch, kv_idx]) & (q_idx >= kv_idx)

    return create_block_mask(same_segment_causal, b, None, s, s, device=ids.device, BLOCK_SIZE=block_size)


def packed_attention_mask(segment_ids: torch.Tensor, use_flex: bool) -> Union[torch.Tensor, BlockMask]:
    """The attention mask of a packed micro-batch, built once and shared by every layer: a BlockMask for
    FlexAttention (``use_flex``) or the dense [b, 1, s, s] mask for SDPA. Both give the same attention.

    A BlockMask is no tensor: it cannot pass through megatron's activation-checkpoint functions
    (tensor_parallel.checkpoint saves its arguments with save_for_backward), so use the dense mask with
    ``train.recompute`` other than "none"."""
    return segment_block_mask(segment_ids) if use_flex else segment_attention_mask(segment_ids)


def _flex_eager(q, k, v, block_mask: BlockMask, scale: float) -> torch.Tensor:
    """torch's unfused FlexAttention reference (CPU). Its public flex_attention refuses CPU inputs that require grad;
    the operator it dispatches to (the same reference, with autograd) has a backward, so training calls it directly."""
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):  # detached: no grad is needed
        return flex_attention(q.detach(), k.detach(), v.detach(), block_mask=block_mask, scale=scale, enable_gqa=True)
    if _flex_hop is None:  # pragma: no cover
        raise NotImplementedError("FlexAttention has no CPU backward in this torch: use the dense mask on CPU "
                                  "(packed_attention_mask(..., use_flex=False))")
    options = _apply_kernel_options(q, k, v, False, None, None)
    out, _, _ = _flex_hop(q, k, v, _identity, block_mask.as_tuple(), scale, options)
    return out


class SDPACoreAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        assert config.context_parallel_size == 1, "context parallelism is not supported by SDPACoreAttention"
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [sq, b, nq, d], key/value [sk, b, ng, d] (GQA: ng divides nq) -> [sq, b, nq * d].

        ``attention_mask``: None, a dense bool [b, 1, sq, sk] (True = masked out) or a BlockMask (which then alone
        defines the attention; the mask type is ignored)."""
        assert packed_seq_params is None and attention_bias is None, "not supported by SDPACoreAttention"
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        if isinstance(attention_mask, BlockMask):
            if self.training and self.dropout_p > 0:
                raise ValueError(f"attention dropout {self.dropout_p} is not supported with FlexAttention (packed "
                                 f"rows with a BlockMask): set attention_dropout=0 or use the dense mask")
            if q.is_cuda:
                out = _flex_cuda(q, k, v, attention_mask, self.softmax_scale)
            else:
                out = _flex_eager(q, k, v, attention_mask, self.softmax_scale)
        else:
            if k.shape[1] != q.shape[1]:
                # Expand kv heads; SDPA's enable_gqa path has no fused kernel for every backend.
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            mask = None
            if attention_mask is not None:
                mask = ~attention_mask  # megatron: True = masked out; SDPA: True = attend
            is_causal = mask is None and mask_type == AttnMaskType.causal
            with sdpa_kernel(_FUSED_SDPA) if q.is_cuda else contextlib.nullcontext():
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0,
                    is_causal=is_causal, scale=self.softmax_scale)
        b, n, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, n * d)
