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
an approximate search that puts ~0.4% of the absmax codes one level off the nearest, so those differ by one level. On GPU,
``dequantize`` runs as ordinary torch ops (a lookup and a multiply per value).
"""
from dataclasses import dataclass
from functools import lru_cache

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


@dataclass
class NF4Tensor:
    """A quantised weight: packed codes [ceil(n/2)] uint8, absmax codes [blocks] uint8, absmax2 [blocks2] fp32,
    offset (fp32 scalar), shape and dtype of the original."""
    packed: torch.Tensor
    absmax_codes: torch.Tensor
    absmax2: torch.Tensor
    offset: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.absmax_codes, self.absmax2, self.offset))

    def to(self, device) -> "NF4Tensor":
        return NF4Tensor(self.packed.to(device), self.absmax_codes.to(device), self.absmax2.to(device),
                         self.offset.to(device), self.shape, self.dtype)


def quantize(weight: torch.Tensor) -> NF4Tensor:
    """weight (any float dtype, any shape) -> NF4 with double-quantised absmax (bitsandbytes' quantize_4bit with
    blocksize=64, compress_statistics=True, quant_type='nf4')."""
    flat = weight.detach().reshape(-1).float()
    absmax, scaled = _blockwise(flat, BLOCK)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = _nearest(scaled, _levels(flat.device)).to(torch.uint8)
    packed = (q[::2] << 4) | q[1::2]
    offset = absmax.mean()
    absmax2, scaled2 = _blockwise(absmax - offset, BLOCK2)
    absmax_codes = _nearest(scaled2, dynamic_map().to(flat.device)).to(torch.uint8)
    return NF4Tensor(packed, absmax_codes, absmax2, offset, weight.shape, weight.dtype)


def dequantize_absmax(t: NF4Tensor) -> torch.Tensor:
    code = dynamic_map().to(t.absmax_codes.device)[t.absmax_codes.long()]
    n = code.numel()
    blocks2 = t.absmax2.numel()
    padded = torch.nn.functional.pad(code, (0, blocks2 * BLOCK2 - n)).view(blocks2, BLOCK2)
    return (padded * t.absmax2[:, None]).reshape(-1)[:n] + t.offset


def bnb_quant_state(t: NF4Tensor):
    """The same quantised weight as a bitsandbytes QuantState (for its fused dequantisation kernel)."""
    from bitsandbytes.functional import QuantState

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
