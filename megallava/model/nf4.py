"""4-bit NormalFloat (NF4) with double quantisation: the QLoRA paper's storage format, in bitsandbytes' layout.

A weight is flattened row-major and cut into blocks of 64 values. Each block keeps its absmax; each value becomes
the index (4 bits) of the nearest of the 16 NF4 levels (quantiles of N(0, 1), normalised to [-1, 1]) to
value / absmax. Two indices share a byte, the first in the high nibble. Double quantisation stores the fp32 absmax
values themselves in 8 bits: minus their mean (``offset``), in blocks of 256, each block scaled by its own absmax2
(fp32) onto bitsandbytes' signed dynamic 8-bit map. Per weight: 0.5 byte + 1/64 byte (absmax code) + 4/(64*256)
byte (absmax2) ~= 0.516 bytes per parameter.

Pure torch, the format's definition: every value (4-bit codes and 8-bit absmax codes) goes to its nearest level,
as bitsandbytes' reference ("default" backend) kernels do. Against bitsandbytes 0.50.2's own CPU kernels
(tests/test_lora.py): the packed 4-bit codes, absmax2 and offset are bitwise equal; its 8-bit absmax quantiser is
an approximate search that puts ~0.4% of the absmax codes one level off the nearest, so those differ by one level. On
CUDA with bitsandbytes installed, ``dequantize`` runs its fused kernel (same values); otherwise torch ops.

Tensor parallelism (``quantize_shard``): a TP rank holds a shard of the weight, and quantising the shard alone would
give other blocks, another offset and other second-level groups than the whole weight, so QLoRA would train a
different model at every TP size. Instead each rank quantises its shard *as part of the whole (TP 1) weight*: when
the shard's rows are whole 64-value blocks of the full weight's rows (the input width per rank a multiple of 64:
true of every LLaMA shape up to TP 8 but 7B's fc2 at TP 8), the 4-bit codes and absmax values are the full weight's
own; the absmax values are all-gathered over the TP group (1/64 of the weight, once at load) to place them in the full
weight's order, and the double quantisation runs on that full vector. Each rank keeps its blocks' 8-bit codes, the
full weight's absmax2 (1/16384 of its elements) and offset, and where its blocks sit in the full weight
(``ShardBlocks``), so its dequantised shard is bitwise the TP 1 weight's slice.
"""
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Tuple

import torch

BLOCK = 64          # values per absmax (bitsandbytes' default for QLoRA)
BLOCK2 = 256        # absmax values per second-level scale

# bitsandbytes' NF4 table (create_normal_map(offset=0.9677083, use_extra_value=True)), sorted, 0 exactly at index 7.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


@lru_cache(maxsize=None)
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (create_dynamic_map(signed=True, max_exponent_bits=7)): 256 sorted
    levels in [-1, 1], dense near 0."""
    data = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    data += [0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _levels(device) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def _blockwise(x: torch.Tensor, block: int):
    """Flat fp32 x -> (per-block absmax, x / absmax clamped to [-1, 1]); a last partial block has its own absmax."""
    n = x.numel()
    blocks = -(-n // block)
    padded = torch.nn.functional.pad(x, (0, blocks * block - n)).view(blocks, block)
    absmax = padded.abs().amax(dim=1)
    scaled = torch.clamp(padded * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)[:n]
    return absmax, scaled


def _nearest(scaled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (levels sorted): bucketize over the midpoints, as bitsandbytes' reference does."""
    return torch.bucketize(scaled, (levels[:-1] + levels[1:]) / 2, out_int32=True)


@dataclass(frozen=True)
class ShardBlocks:
    """Where a TP shard's blocks sit in the full weight (2-D, blocks of 64 along its rows): ``rows`` = ranges
    (local first row, count, full first row) covering the shard's rows in order, ``blocks_per_row`` of the full
    weight, ``col0`` = the full block column of the shard's first block."""
    rows: Tuple[Tuple[int, int, int], ...]
    blocks_per_row: int
    col0: int

    def index(self, local_blocks_per_row: int, device) -> torch.Tensor:
        """Full-weight block index of each local block, in the shard's row-major order."""
        full_rows = torch.cat([torch.arange(f, f + n, device=device) for _, n, f in self.rows])
        cols = torch.arange(self.col0, self.col0 + local_blocks_per_row, device=device)
        return (full_rows[:, None] * self.blocks_per_row + cols).reshape(-1)


@dataclass
class NF4Tensor:
    """A quantised weight: packed codes [ceil(n/2)] uint8, absmax codes [blocks] uint8, absmax2 [blocks2] fp32,
    offset (fp32 scalar), shape and dtype of the original; ``blocks`` when it is a TP shard quantised as part of the
    full weight (absmax2 and offset are then the full weight's), None for a whole weight in bitsandbytes' layout."""
    packed: torch.Tensor
    absmax_codes: torch.Tensor
    absmax2: torch.Tensor
    offset: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocks: Optional[ShardBlocks] = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.absmax_codes, self.absmax2, self.offset))

    def to(self, device) -> "NF4Tensor":
        return NF4Tensor(self.packed.to(device), self.absmax_codes.to(device), self.absmax2.to(device),
                         self.offset.to(device), self.shape, self.dtype, self.blocks)


def storage_bytes(numel: int, full_numel: Optional[int] = None) -> int:
    """Bytes of an NF4Tensor of ``numel`` values: packed 4-bit codes, an 8-bit absmax code per 64, an fp32 absmax2
    per 256 blocks (of the full weight's ``full_numel`` values for a shard quantised as part of it) and the offset."""
    blocks = -(-(full_numel or numel) // BLOCK)
    return -(-numel // 2) + -(-numel // BLOCK) + 4 * -(-blocks // BLOCK2) + 4


def _codes(weight: torch.Tensor):
    """The 4-bit half: packed codes and the fp32 absmax of each 64-value block of the flattened weight."""
    flat = weight.detach().reshape(-1).float()
    absmax, scaled = _blockwise(flat, BLOCK)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = _nearest(scaled, _levels(flat.device)).to(torch.uint8)
    return (q[::2] << 4) | q[1::2], absmax


def _double_quant(absmax: torch.Tensor):
    """The 8-bit half: absmax values minus their mean, in blocks of 256, each on the signed dynamic map."""
    offset = absmax.mean()
    absmax2, scaled2 = _blockwise(absmax - offset, BLOCK2)
    return _nearest(scaled2, dynamic_map().to(absmax.device)).to(torch.uint8), absmax2, offset


def quantize(weight: torch.Tensor) -> NF4Tensor:
    """weight (any float dtype, any shape) -> NF4 with double-quantised absmax (bitsandbytes' quantize_4bit with
    blocksize=64, compress_statistics=True, quant_type='nf4')."""
    packed, absmax = _codes(weight)
    return NF4Tensor(packed, *_double_quant(absmax), weight.shape, weight.dtype)


def quantize_shard(shard: torch.Tensor, blocks: ShardBlocks, full_rows: int, group) -> NF4Tensor:
    """This rank's shard of a 2-D weight, quantised as part of the full weight (module docstring): collective over
    ``group`` (every rank holding a shard of the weight, with equal shard shapes). The shard's row width must be a
    multiple of 64."""
    import torch.distributed as dist

    rows, width = shard.shape
    if width % BLOCK:
        raise ValueError(f"a shard row of {width} values is not a whole number of {BLOCK}-value blocks")
    packed, absmax = _codes(shard)
    index = blocks.index(width // BLOCK, absmax.device)
    world = dist.get_world_size(group)
    absmaxes, indices = [torch.empty_like(absmax) for _ in range(world)], [torch.empty_like(index) for _ in range(world)]
    dist.all_gather(absmaxes, absmax, group=group)
    dist.all_gather(indices, index, group=group)
    full = torch.full((full_rows * blocks.blocks_per_row,), float("nan"), device=absmax.device)
    full[torch.cat(indices)] = torch.cat(absmaxes)
    if torch.isnan(full).any():
        raise RuntimeError("quantize_shard: the shards do not cover the full weight (wrong ShardBlocks)")
    codes, absmax2, offset = _double_quant(full)
    return NF4Tensor(packed, codes[index], absmax2, offset, shard.shape, shard.dtype, blocks)


def dequantize_absmax(t: NF4Tensor) -> torch.Tensor:
    code = dynamic_map().to(t.absmax_codes.device)[t.absmax_codes.long()]
    if t.blocks is not None:
        group = t.blocks.index(t.shape[-1] // BLOCK, code.device) // BLOCK2
        return code * t.absmax2[group] + t.offset
    n = code.numel()
    blocks2 = t.absmax2.numel()
    padded = torch.nn.functional.pad(code, (0, blocks2 * BLOCK2 - n)).view(blocks2, BLOCK2)
    return (padded * t.absmax2[:, None]).reshape(-1)[:n] + t.offset


def bnb_quant_state(t: NF4Tensor):
    """The same quantised weight as a bitsandbytes QuantState (for its fused dequantisation kernel). A shard's
    second-level groups are the full weight's, not bitsandbytes' contiguous ones: its absmax goes in dequantised."""
    from bitsandbytes.functional import QuantState

    if t.blocks is not None:
        return QuantState(absmax=dequantize_absmax(t), shape=t.shape, code=_levels(t.packed.device), blocksize=BLOCK,
                          quant_type="nf4", dtype=t.dtype)
    state2 = QuantState(absmax=t.absmax2, code=dynamic_map().to(t.absmax2.device), blocksize=BLOCK2,
                        dtype=torch.float32)
    return QuantState(absmax=t.absmax_codes, shape=t.shape, code=_levels(t.packed.device), blocksize=BLOCK,
                      quant_type="nf4", dtype=t.dtype, offset=t.offset, state2=state2)


@lru_cache(maxsize=None)
def _bnb_available() -> bool:
    try:
        import bitsandbytes.functional  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or present without a usable native library
        return False
    return True


def dequantize(t: NF4Tensor, dtype: torch.dtype = None) -> torch.Tensor:
    """NF4Tensor -> dense tensor of its original shape, in ``dtype`` (default: the original dtype). The scaling is
    done in fp32, as bitsandbytes does, then cast once. On CUDA with bitsandbytes installed, its fused kernel does
    the same computation (its dequantised values equal these: tests/test_lora.py)."""
    if t.packed.is_cuda and _bnb_available():
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(t.packed.view(-1, 1), bnb_quant_state(t)).to(dtype or t.dtype)
    n = t.shape.numel()
    q = torch.stack([t.packed >> 4, t.packed & 0xF], dim=1).reshape(-1)[:n].long()
    values = _levels(t.packed.device)[q]
    absmax = dequantize_absmax(t)
    blocks = absmax.numel()
    values = torch.nn.functional.pad(values, (0, blocks * BLOCK - n)).view(blocks, BLOCK) * absmax[:, None]
    return values.reshape(-1)[:n].view(t.shape).to(dtype or t.dtype)
