"""LoRA (and QLoRA) on megatron's tensor-parallel linears, as drop-in layer-spec submodules.

``LoRAColumnParallelLinear`` / ``LoRARowParallelLinear`` take ColumnParallelLinear's / RowParallelLinear's
constructor (so a ModuleSpec swaps them in for linear_qkv, linear_fc1 / linear_proj, linear_fc2 and the layer code
stays one path) plus ``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``quantize`` (QLoRA) and ``kind``. They add
``scale * B(A(dropout(x)))`` to the frozen base output, scale = alpha / rank (PEFT's convention).

Fused linears carry one adapter per HF projection, as PEFT puts them on LLaMA (and as the paper counts: LoRA-64
on every linear = 0.256B / 0.49B / 0.81B trainable at 13B / 33B / 65B): ``kind="qkv"`` holds q, k and v adapters,
``kind="gated"`` (fc1 = [gate; up]) gate and up. ``lora_a`` stacks their A matrices [n*r, in]; ``lora_b`` has the
base weight's rows and layout (per query group q, k, v rows; per rank [gate; up]), each row reading its own
adapter's r-slice, so it shards exactly like the base weight and maps 1:1 onto PEFT's q_proj/k_proj/... adapters.

Tensor parallelism, with the base's sharding unchanged:
- column-parallel base (output split): A [r, in] replicated, B [out/tp, r] split like the base's output rows
  (gated fc1: [gate slice; up slice] per rank, like the base). A's rank-r output enters the TP region
  (identity forward, all-reduce of its gradient), or under sequence parallelism is all-gathered from the local
  sequence shard (reduce-scattered gradient; A's grad is then per-shard and megatron all-reduces it over TP, as for
  norm weights: ``sequence_parallel`` attribute).
- row-parallel base (input split): A [r, in/tp] split like the base's input columns, B [out, r] replicated. The
  partial rank-r products are summed over TP (all-reduce; reduce-scatter to the sequence shard under SP) before B.
So the only communication LoRA adds is one collective of the rank-r activations per layer and direction: r / h of
the base's (1.6% at r 64, h 4096). Fusing it into the base's own collective would need megatron's linear autograd
function to be re-implemented.

Frozen base: megatron's linears already skip the weight-gradient GEMM for a weight with requires_grad=False
(``linear_with_frozen_weight``), DDP gives it no grad buffer and the optimizer no state or master copy.
QLoRA: the base weight is replaced by its NF4 form (megallava.model.nf4, ~0.52 bytes/param; each TP shard quantised
as part of the full weight, so every TP size trains the same model) and dequantised to the compute dtype inside an autograd function that saves only the quantised weight, so no dense copy of a frozen
weight outlives its own forward or backward.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megallava.model import nf4


class _NF4Linear(torch.autograd.Function):
    """y = x @ dequantize(w).T with only the NF4 weight saved; dgrad only (the base is frozen)."""

    @staticmethod
    def forward(ctx, x, quantized, dtype):
        ctx.quantized, ctx.dtype = quantized, dtype
        return F.linear(x, nf4.dequantize(quantized, dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad.matmul(nf4.dequantize(ctx.quantized, ctx.dtype)), None, None


class _LoRAMixin:
    """The adapter state and the pieces shared by the column and row variants."""

    def _init_lora(self, config, in_size: int, out_size: int, rank: int, alpha: Optional[float], dropout: float,
                   quantize: bool, kind: str, a_split: bool, b_split: bool):
        if rank < 1:
            raise ValueError(f"lora_rank={rank} must be >= 1")
        adapters = {"plain": 1, "gated": 2, "qkv": 3}[kind]
        self.lora_kind, self.lora_rank = kind, rank
        self.lora_scale = (2.0 * rank if alpha is None else alpha) / rank
        self.lora_dropout = dropout
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if kind == "qkv":  # this rank's query groups, query heads per group, head dim
            self.lora_qkv = (config.num_query_groups // tp, config.num_attention_heads // config.num_query_groups,
                             config.kv_channels)
        dtype = config.params_dtype
        self.lora_a = torch.nn.Parameter(torch.empty(adapters * rank, in_size // tp if a_split else in_size,
                                                     dtype=dtype, device=self.weight.device))
        self.lora_b = torch.nn.Parameter(torch.zeros(out_size // tp if b_split else out_size, rank, dtype=dtype,
                                                     device=self.weight.device))
        for p, split, dim in ((self.lora_a, a_split, 1), (self.lora_b, b_split, 0)):
            set_tensor_model_parallel_attributes(p, is_parallel=split, dim=dim, stride=1)
            # A replicated param whose grad differs per TP rank under SP: megatron all-reduces it over TP.
            p.sequence_parallel = bool(config.sequence_parallel) and not split
        torch.nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # PEFT's init; megallava.model.init redraws it
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.qlora = quantize  # the base is quantised by quantize_bases() once its real weights are in
        self.quantized = None

    def quantize_base(self) -> bool:
        """QLoRA: replace this rank's base weight shard by its NF4 form, quantised as part of the full weight (the
        same dequantised values at every TP size: nf4.quantize_shard; collective over the TP group). Returns False
        when that is impossible (the shard's row width is not a multiple of 64) and the shard was quantised alone."""
        w = self.weight.data
        tp = parallel_state.get_tensor_model_parallel_world_size()
        blocks = self._shard_blocks(tp) if tp > 1 and w.shape[1] % nf4.BLOCK == 0 else None
        if tp == 1 or blocks is None:
            self.quantized = nf4.quantize(w)
        else:
            full_rows = w.shape[0] if isinstance(self, RowParallelLinear) else w.shape[0] * tp
            self.quantized = nf4.quantize_shard(w, blocks, full_rows, parallel_state.get_tensor_model_parallel_group())
        self.weight.data = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)
        return tp == 1 or blocks is not None

    def _shard_blocks(self, tp: int) -> "nf4.ShardBlocks":
        """Where this rank's base shard sits in the TP 1 weight (megatron's layouts: row-parallel = a column slice;
        column-parallel = a row slice, or for fc1 [gate; up] one slice of gate and one of up)."""
        rank = parallel_state.get_tensor_model_parallel_rank()
        rows, width = self.weight.shape
        per_row = width // nf4.BLOCK
        if isinstance(self, RowParallelLinear):
            return nf4.ShardBlocks(((0, rows, 0),), per_row * tp, rank * per_row)
        if self.lora_kind == "gated":
            f = rows // 2
            return nf4.ShardBlocks(((0, f, rank * f), (f, f, f * tp + rank * f)), per_row, 0)
        return nf4.ShardBlocks(((0, rows, rank * rows),), per_row, 0)

    def _lora_sharded_state_dict(self, prefix, sharded_offsets, metadata, axes, gated=False):
        state_dict = {k: v for k, v in self.state_dict(prefix="", keep_vars=True).items()
                      if not (self.quantized is not None and k == "weight")}
        sd = make_sharded_tensors_for_checkpoint(state_dict, prefix, axes, sharded_offsets, tp_group=self.tp_group,
                                                 dp_cp_group=metadata["dp_cp_group"])
        if gated:  # [gate; up] per rank, like the base weight (the MLP applies this to weight and bias only)
            key = f"{prefix}lora_b"
            sd[key] = apply_swiglu_sharded_factory(sd[key], sharded_offsets,
                                                   (metadata or {}).get("singleton_local_shards", False))
        return sd

    def _down(self, x):
        if self.training and self.lora_dropout > 0:
            x = F.dropout(x, self.lora_dropout)
        return F.linear(x, self.lora_a)

    def _up(self, t):
        """t [..., n*r] (one r-slice per adapter) -> [..., out] in the base weight's row layout."""
        b, r = self.lora_b, self.lora_rank
        if self.lora_kind == "plain":
            out = F.linear(t, b)
        elif self.lora_kind == "gated":  # rows [gate; up]
            f = b.shape[0] // 2
            out = torch.cat([F.linear(t[..., :r], b[:f]), F.linear(t[..., r:], b[f:])], dim=-1)
        else:  # rows per query group: its q heads, then k, then v
            groups, q_per_group, d = self.lora_qkv
            grouped = b.view(groups, (q_per_group + 2) * d, r)
            parts = []
            for i, (lo, hi) in enumerate(((0, q_per_group * d), (q_per_group * d, (q_per_group + 1) * d),
                                          ((q_per_group + 1) * d, (q_per_group + 2) * d))):
                y = F.linear(t[..., i * r:(i + 1) * r], grouped[:, lo:hi].reshape(-1, r))
                parts.append(y.view(*y.shape[:-1], groups, hi - lo))
            out = torch.cat(parts, dim=-1).flatten(-2)
        return out * self.lora_scale


class LoRAColumnParallelLinear(_LoRAMixin, ColumnParallelLinear):
    def __init__(self, input_size, output_size, *, config, init_method, lora_rank: int, lora_alpha=None,
                 lora_dropout: float = 0.0, quantize: bool = False, kind: str = "plain", **kwargs):
        """``kind``: "qkv" (fused q, k, v), "gated" (a gated MLP's fc1, [gate; up]) or "plain"."""
        super().__init__(input_size, output_size, config=config, init_method=init_method, **kwargs)
        if self.gather_output:
            raise ValueError("LoRA on a ColumnParallelLinear with gather_output=True is not supported")
        self._init_lora(config, input_size, output_size, lora_rank, lora_alpha, lora_dropout, quantize, kind,
                        a_split=False, b_split=True)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return self._lora_sharded_state_dict(prefix, sharded_offsets, metadata, {"weight": 0, "bias": 0, "lora_b": 0},
                                             gated=self.lora_kind == "gated")

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if self.quantized is None:
            out, bias = super().forward(input_, weight, runtime_gather_output)
        else:
            if self.sequence_parallel:
                full = tensor_parallel.gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True)
            else:
                full = tensor_parallel.copy_to_tensor_model_parallel_region(input_)
            out = _NF4Linear.apply(full, self.quantized, input_.dtype)
            bias = self.bias if self.skip_bias_add else None
            if self.bias is not None and not self.skip_bias_add:
                out = out + self.bias
        t = self._down(input_)  # [s(/tp), b, r]
        if self.sequence_parallel:
            t = tensor_parallel.gather_from_sequence_parallel_region(t, tensor_parallel_output_grad=True)
        else:
            t = tensor_parallel.copy_to_tensor_model_parallel_region(t)
        return out + self._up(t), bias


class LoRARowParallelLinear(_LoRAMixin, RowParallelLinear):
    def __init__(self, input_size, output_size, *, config, init_method, lora_rank: int, lora_alpha=None,
                 lora_dropout: float = 0.0, quantize: bool = False, **kwargs):
        super().__init__(input_size, output_size, config=config, init_method=init_method, **kwargs)
        if not self.input_is_parallel:
            raise ValueError("LoRA on a RowParallelLinear needs input_is_parallel=True")
        self._init_lora(config, input_size, output_size, lora_rank, lora_alpha, lora_dropout, quantize, "plain",
                        a_split=True, b_split=False)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return self._lora_sharded_state_dict(prefix, sharded_offsets, metadata, {"weight": 1, "lora_a": 1})

    def forward(self, input_):
        if self.quantized is None:
            out, bias = super().forward(input_)
        else:
            partial = _NF4Linear.apply(input_, self.quantized, input_.dtype)
            if self.sequence_parallel:
                out = tensor_parallel.reduce_scatter_to_sequence_parallel_region(partial)
            else:
                out = tensor_parallel.reduce_from_tensor_model_parallel_region(partial)
            bias = self.bias if self.skip_bias_add else None
            if self.bias is not None and not self.skip_bias_add:
                out = out + self.bias
        t = self._down(input_)  # partial sums over this rank's input slice
        if self.sequence_parallel:
            t = tensor_parallel.reduce_scatter_to_sequence_parallel_region(t)
        else:
            t = tensor_parallel.reduce_from_tensor_model_parallel_region(t)
        return out + self._up(t), bias


def quantize_bases(chunks):
    """QLoRA: quantise every LoRA layer's base weight (after the weights were initialised or loaded; collective over
    the TP group). Returns (bytes now held by the quantised bases on this rank, names of the weights quantised per
    shard because their shard rows are not whole 64-value blocks: those differ from the TP 1 model's)."""
    total, alone = 0, []
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if isinstance(module, _LoRAMixin) and module.qlora and module.quantized is None:
                if not module.quantize_base():
                    alone.append(f"{name}.weight")
                total += module.quantized.nbytes
    return total, alone
