"""Fused elementwise kernels (torch.compile regions) and the ``kernels.*`` switches that select them.

Each fused path computes the same function as the reference it replaces, in one kernel instead of several memory
round trips: RMSNorm (upcast, mean of squares, rsqrt, scale: five kernels eager) and RoPE (cos, sin, rotate-half,
two multiplies and an add per q and k). SwiGLU uses megatron's own compiled kernel (``bias_activation_fusion``),
the cross-entropy lives in cross_entropy.py and packed attention in attention.py. ``null`` switches mean "on with
CUDA": on CPU, compiling costs seconds per shape and saves little, so tests switch them on explicitly.

torch.compile is applied lazily (first call), so importing this module costs nothing and a CPU run that keeps the
switches off never starts the compiler.
"""
import dataclasses
import functools
from typing import Optional

import torch

SWITCHES = ("fused_rmsnorm", "fused_swiglu", "fused_rope", "fused_cross_entropy", "fused_adam", "flex_attention")


def enabled(switch: Optional[bool]) -> bool:
    """A ``kernels.*`` switch: null = on with CUDA, off on CPU."""
    return torch.cuda.is_available() if switch is None else bool(switch)


def resolve(kernels):
    """The ``kernels`` config section with every null switch decided for this machine."""
    return dataclasses.replace(kernels, **{k: enabled(getattr(kernels, k)) for k in SWITCHES})


# ------------------------------------------------------------------------------------------------ RMSNorm
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: normalise in fp32, cast back to the input dtype, then scale by the weight."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


if not torch.cuda.is_available():
    # Fork-safe compiling on CPU (ours, and megatron's compiled SwiGLU): inductor's pool of compile workers does not
    # survive a fork, so a rank forked after its parent compiled would wait on the dead pool forever
    # (megallava.local_ranks forks ranks). CPU compiles run in the calling process; CUDA keeps the parallel pool.
    import torch._inductor.config as _inductor_config

    _inductor_config.compile_threads = 1


def _compile(fn):
    return torch.compile(fn, dynamic=None)


@functools.cache
def _compiled_rms_norm():
    return _compile(rms_norm_reference)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm_reference as one fused kernel (and one for its backward)."""
    return _compiled_rms_norm()(x, weight, eps)


# ------------------------------------------------------------------------------------------------ RoPE
def rope_reference(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on t [s, b, n, d] with angles freqs [s, 1 or b, 1, d], in fp32, cast back to t's dtype."""
    t32 = t.float()
    half = t32.shape[-1] // 2
    rotated = torch.cat((-t32[..., half:], t32[..., :half]), dim=-1)
    return (t32 * freqs.cos() + rotated * freqs.sin()).to(t.dtype)


@functools.cache
def _compiled_rope():
    return _compile(rope_reference)


def fused_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """megatron's ``fused_apply_rotary_pos_emb`` signature (TransformerEngine's), for its apply_rope_fusion path."""
    if interleaved:
        raise ValueError("megallava's fused RoPE is the rotate-half form (LLaMA); rotary_interleaved is not supported")
    if freqs.shape[-1] != t.shape[-1]:
        raise ValueError(f"fused RoPE rotates the whole head: angles of dim {freqs.shape[-1]} for heads of dim "
                         f"{t.shape[-1]} (partial rotary is not supported)")
    return _compiled_rope()(t, freqs)


def install_rope_fusion() -> None:
    """Fill megatron's fused-RoPE slot (TransformerEngine's kernel when TE is installed, else empty and then
    ``apply_rope_fusion`` is refused) with ours. TE's own kernel, when present, is kept."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_rope
