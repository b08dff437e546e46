"""Norm modules with megatron's (config, hidden_size, eps) constructor signature.

Our own RMSNorm exists because megatron-core's torch fallback refuses sequence parallelism: with SP every TP rank
normalises a different slice of the sequence, so the weight's grad must be all-reduced over TP, which megatron does
for parameters marked ``sequence_parallel``.
"""
import torch
from torch import nn

from megallava.model.fused import rms_norm, rms_norm_reference


class RMSNorm(nn.Module):
    """HF LlamaRMSNorm semantics (normalise in fp32, cast back, scale). ``fused`` (kernels.fused_rmsnorm, set
    through the layer spec's params) runs it as one compiled kernel."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, fused: bool = False):
        super().__init__()
        self.eps = eps
        self.fused = fused
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x):
        return (rms_norm if self.fused else rms_norm_reference)(x, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """LayerNorm with bias (CLIP). Marks its parameters for the SP grad all-reduce like RMSNorm."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in (self.weight, self.bias):
            p.sequence_parallel = bool(config.sequence_parallel)
