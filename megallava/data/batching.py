"""Samples -> micro-batches for one data-parallel rank.

A sample is a dict: ``tokens`` [L] (long, each <image> already expanded to one placeholder id per image feature),
``labels`` [L] (long, the target for each position, -100 where nothing is trained), ``images`` [n, 3, H, W] (n >= 0).
The sequence of global batches is a function of the seed and the data only: global batch ``it`` holds samples
``it * G .. it * G + G - 1``; DP rank d takes a contiguous 1/dp of it, split into micro-batches in order. The
token-weighted loss is therefore the same at any DP size.
"""
from typing import Callable, Dict, Iterator, List

import torch

IGNORE_INDEX = -100


def collate(samples: List[Dict], pad_multiple: int = 1, with_images: bool = True) -> Dict:
    """Right-pad to the longest sample (rounded up to ``pad_multiple``); concatenate images in sample order."""
    longest = max(s["tokens"].numel() for s in samples)
    length = -(-longest // pad_multiple) * pad_multiple
    tokens = torch.zeros(len(samples), length, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(samples):
        n = s["tokens"].numel()
        tokens[i, :n] = s["tokens"]
        labels[i, :n] = s["labels"]
    batch = {"tokens": tokens, "labels": labels,
             "lengths": [s["tokens"].numel() for s in samples],  # unpadded, for FLOP and token accounting
             "num_images": sum(int(s["images"].shape[0]) for s in samples)}
    if with_images:
        images = [s["images"] for s in samples if s["images"].shape[0] > 0]
        batch["images"] = torch.cat(images) if images else None
    return batch


def pad_batch(batch: Dict, length: int) -> Dict:
    """Right-pad a collated batch to ``length`` positions (pad id 0, label -100)."""
    extra = length - batch["tokens"].shape[1]
    if extra <= 0:
        return batch
    out = dict(batch)
    out["tokens"] = torch.nn.functional.pad(batch["tokens"], (0, extra), value=0)
    out["labels"] = torch.nn.functional.pad(batch["labels"], (0, extra), value=IGNORE_INDEX)
    return out


def microbatch_iterator(get_sample: Callable[[int, bool], Dict], num_samples: int, global_batch_size: int,
                        micro_batch_size: int, dp_rank: int, dp_size: int, start_iteration: int = 0,
                        pad_multiple: int = 1, with_images: bool = True) -> Iterator[Dict]:
    """Endless micro-batches of this DP rank, starting at global batch ``start_iteration``."""
    per_rank = global_batch_size // dp_size
    iteration = start_iteration
    while True:
        base = iteration * global_batch_size + dp_rank * per_rank
        for j in range(per_rank // micro_batch_size):
            first = base + j * micro_batch_size
            idx = [(first + k) % num_samples for k in range(micro_batch_size)]
            yield collate([get_sample(i, with_images) for i in idx], pad_multiple, with_images)
        iteration += 1
