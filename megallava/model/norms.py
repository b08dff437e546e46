"""Norm modules with megatron's (config, hidden_size, eps) constructor signature.

Our own RMSNorm exists because megatron-core's torch fallback refuses sequence parallelism: with SP every TP rank
normalises a different slice of the sequence, so the weight's grad must be all-reduced over TP, which megatron does
for parameters marked ``sequence_parallel``.
"""
import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x):
        # Normalise in fp32 like HF LlamaRMSNorm, then cast back before the weight multiply.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm with bias (CLIP). Marks its parameters for the SP grad all-reduce like RMSNorm."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in (self.weight, self.bias):
            p.sequence_parallel = bool(config.sequence_parallel)
