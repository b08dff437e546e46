"""Layout-independent initialisation: every parameter is drawn in its canonical (unsharded) shape from a generator
seeded by (seed, canonical name), then sharded. The same seed gives the same model at any TP/PP/VPP/DP layout."""
import zlib

import torch
from megatron.core import parallel_state

from megallava.model.layout import canonical_name, canonical_shape, is_tensor_parallel, shard


def _draw(name: str, shape, std: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))
    if name.endswith("layernorm.weight") or name.endswith("final_layernorm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias") or name.endswith(".lora_b"):  # LoRA: B = 0, so the adapted model starts as the base
        return torch.zeros(shape)
    if name.endswith(".lora_a"):  # PEFT's kaiming_uniform(a=sqrt(5)) per adapter: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1.0 / shape[1] ** 0.5
        return (torch.rand(shape, generator=gen) * 2 - 1) * bound
    return torch.randn(shape, generator=gen) * std


def iter_canonical_params(chunks):
    """Yield (canonical_name, param) for every parameter of this rank's model chunks."""
    for chunk in chunks:
        chunk = unwrap(chunk)
        for local, param in chunk.named_parameters():
            yield canonical_name(local, chunk.layer_offset), param


def unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


@torch.no_grad()
def init_weights(chunks, seed: int, std: float) -> None:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    first = unwrap(chunks[0])
    for name, param in iter_canonical_params(chunks):
        full = _draw(name, canonical_shape(name, param, tp, first.vocab_size), std, seed)
        local = shard(full, name, is_tensor_parallel(param), getattr(param, "partition_dim", 0), tp_rank, tp,
                      first.padded_vocab_size)
        param.copy_(local)
