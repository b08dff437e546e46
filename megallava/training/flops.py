"""Model FLOPs of a LLaVA training step from the real (unpadded) token and image counts, and throughput / MFU.

Megatron-LM's own TFLOP/s log is wrong for VLMs (it takes the image-token count as the sequence length and ignores
the ViT), so the LLM, the ViT and the projector are counted separately here. Padding is never counted: these are
*model* FLOPs of the work the data asks for, not the FLOPs the kernels happen to execute.

Convention (forward FLOPs; a multiply-add = 2 FLOPs; h = hidden, n_h = heads, g = kv heads, V = real vocab):
- LLaMA layer, per token:   2*(h*(h + 2*h*g/n_h) [qkv] + h*h [o] + 3*h*ffn [SwiGLU])
                            + attention 4*s_eff*h with s_eff = s/2 (causal mask: each query sees half the keys on
                            average), s = that SAMPLE's unpadded length. Attention is quadratic per sample:
                            sum over samples of s * 4*(s/2)*h per layer.
- logits, per token:        2*h*V (V unpadded: vocab padding for TP is not model work).
- ViT, per image:           L layers (only those built: num_layers + select_layer + 1, the penultimate by default)
                            of t tokens (t = patches + 1 for CLS), per layer per token 2*(4*hv*hv) [qkv + o]
                            + 2*(2*hv*fv) [fc1 + fc2] + attention 4*t*hv (not causal); plus the patch embedding
                            2*(c*p*p)*hv per patch (c = channels).
- projector, per image feature (patch): mlp2x_gelu 2*(hv*h + h*h); linear 2*hv*h.
Training multipliers: a trained part costs 3x forward (forward + activation grads + weight grads); a frozen part
that something upstream of it trains still back-propagates activation grads, 2x (e.g. the LLM in stage 1); a
frozen part with nothing trainable upstream runs forward only, 1x (the frozen ViT). Norms, activations, RoPE,
embedding lookups and the loss are not counted (second order).

Peer numbers (REFERENCE.md section 4, Megatron-LM's formula) count s_eff = s: at seq 2048 their 44.7% MFU is
43.2% here (bench/README.md restates them).
"""
from __future__ import annotations

import resource
import sys
from typing import Dict, Iterable, List, Optional

import torch

from megallava.config import image_tokens_per_image


def _multiplier(trains: bool, upstream_trains: bool) -> int:
    return 3 if trains else (2 if upstream_trains else 1)


def step_flops(cfg, sample_lengths: List[int], num_images: int) -> Dict[str, float]:
    """Model FLOPs of one training step whose global batch has these unpadded sample lengths (image placeholder
    tokens included) and ``num_images`` images in total. Additive over samples: the FLOPs of a batch split over
    ranks sum to those of the whole batch."""
    m, v = cfg.model, cfg.model.vision
    h, n_h, g = m.hidden_size, m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    dense_per_token = m.num_layers * 2 * (h * (h + 2 * h * g / n_h) + h * h + 3 * h * m.ffn_hidden_size) \
        + 2 * h * m.vocab_size
    tokens = sum(sample_lengths)
    attention = sum(m.num_layers * s * 4 * (s / 2) * h for s in sample_lengths)
    llm_fwd = tokens * dense_per_token + attention

    hv, fv = v.hidden_size, v.ffn_hidden_size
    patches = image_tokens_per_image(cfg)
    t = patches + 1
    layers = v.num_layers + v.select_layer + 1
    vit_fwd_per_image = layers * t * (2 * 4 * hv * hv + 2 * 2 * hv * fv + 4 * t * hv) \
        + patches * 2 * v.num_channels * v.patch_size ** 2 * hv
    proj_per_feature = 2 * (hv * h + h * h) if m.projector == "mlp2x_gelu" else 2 * hv * h

    vit = num_images * vit_fwd_per_image * _multiplier(m.train_vision, False)
    projector = num_images * patches * proj_per_feature * _multiplier(m.train_projector, m.train_vision)
    llm = llm_fwd * _multiplier(m.train_llm, m.train_projector or m.train_vision)
    return {"llm": float(llm), "vit": float(vit), "projector": float(projector),
            "total": float(llm + vit + projector)}


def peak_tflops_per_gpu(override: Optional[float] = None) -> Optional[float]:
    """Dense bf16 peak of this GPU in TFLOP/s (the MFU denominator); ``override`` wins; None when unknown or CPU."""
    if override is not None:
        return float(override)
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    if "H100" in name or "H200" in name:
        return 989.0
    if "A100" in name:
        return 312.0
    return None


def throughput(flops: Dict[str, float], tokens: int, step_time_s: float, world_size: int,
               peak_tflops: Optional[float]) -> Dict[str, Optional[float]]:
    """``tokens``: unpadded tokens of the global batch (whole job); tokens_per_s is for the whole job, tflops_per_gpu
    and mfu are per GPU (model FLOPs / step time / world size); mfu is None without a known peak."""
    tflops = flops["total"] / step_time_s / world_size / 1e12
    return {"tokens_per_s": tokens / step_time_s, "tflops_per_gpu": tflops,
            "mfu": tflops / peak_tflops if peak_tflops else None}


def peak_memory_gib() -> float:
    """Peak allocated GPU memory of this process (torch.cuda.max_memory_allocated), else its peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2 ** 30 if sys.platform == "darwin" else rss / 2 ** 20


# ----------------------------------------------------------------------------------------------------------------
# Trainer integration: count what the first pipeline stage consumed, reduce over ranks.
# ----------------------------------------------------------------------------------------------------------------

class BatchCounter:
    """Wraps the data iterator of the chunk that reads tokens (pre_process); remembers the unpadded sample lengths
    and image counts of every micro-batch it hands out until ``take()``."""

    def __init__(self, iterator: Iterable[Dict]):
        self._it = iter(iterator)
        self.lengths: List[int] = []
        self.num_images = 0

    def __iter__(self):
        return self

    def __next__(self) -> Dict:
        batch = next(self._it)
        self.lengths.extend(int(n) for n in batch["lengths"])
        self.num_images += int(batch["num_images"])
        return batch

    def take(self):
        out = (self.lengths, self.num_images)
        self.lengths, self.num_images = [], 0
        return out


def step_metrics(cfg, counter: Optional[BatchCounter], step_time_s: float,
                 peak_tflops: Optional[float]) -> Dict[str, Optional[float]]:
    """Collective: every rank calls it once per step (``counter`` None where no chunk reads tokens). Sums FLOPs,
    tokens and images over the ranks that read data (first pipeline stage, TP rank 0: one per DP replica) and takes
    the max peak memory over all ranks. Returns the record keys tokens, images, tokens_per_s, tflops_per_gpu,
    tflops_llm / tflops_vit / tflops_projector (per GPU, summing to tflops_per_gpu), mfu, mem_gib."""
    from megatron.core import parallel_state

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    stats = torch.zeros(5, dtype=torch.float64, device=device)  # llm, vit, projector, tokens, images
    lengths, images = counter.take() if counter is not None else ([], 0)
    if counter is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
        f = step_flops(cfg, lengths, images)
        stats += torch.tensor([f["llm"], f["vit"], f["projector"], sum(lengths), images], dtype=torch.float64,
                              device=device)
    mem = torch.tensor([peak_memory_gib()], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(stats)
        torch.distributed.all_reduce(mem, op=torch.distributed.ReduceOp.MAX)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    llm, vit, proj, tokens, images = stats.tolist()
    flops = {"llm": llm, "vit": vit, "projector": proj, "total": llm + vit + proj}
    out = {"tokens": int(tokens), "images": int(images)}
    out.update(throughput(flops, int(tokens), step_time_s, world, peak_tflops))
    for part in ("llm", "vit", "projector"):
        out[f"tflops_{part}"] = flops[part] / step_time_s / world / 1e12
    out["mem_gib"] = float(mem.item())
    return out
