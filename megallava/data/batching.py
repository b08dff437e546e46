"""Samples -> micro-batches for one data-parallel rank.

A sample is a dict: ``tokens`` [L] (long, each <image> already expanded to one placeholder id per image feature),
``labels`` [L] (long, the target for each position, -100 where nothing is trained), ``images`` [n, 3, H, W] (n >= 0).
The sequence of global batches is a function of the seed and the data only: global batch ``it`` holds samples
``it * G .. it * G + G - 1``; DP rank d takes a contiguous 1/dp of it, split into micro-batches in order. The
token-weighted loss is therefore the same at any DP size.

Packing (``data.packing``): the unit stays the micro-batch of ``micro_batch_size`` sample slots (so the samples of
every micro-batch and step, and hence the loss, are the same as unpacked, at any DP size or layout); ``pack``
only lays those samples out in fewer, fuller rows, greedy first-fit in slot order into rows of at most
``seq_length`` tokens. Each sample keeps its own labels (its last position never predicts the next sample's first
token), and the batch carries ``position_ids`` (restarting at 0 per sample) and ``segment_ids`` (1, 2, ... per
sample of a row, 0 for padding) from which the model builds RoPE angles and a block-diagonal causal mask.
"""
from typing import Callable, Dict, Iterator, List, Optional

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


def pack_rows(lengths: List[int], seq_length: int) -> List[List[int]]:
    """Greedy first-fit in order: each sample goes to the first row that still has room for all of it (a new row
    otherwise). Returns the sample indices of each row, in order within the row. Deterministic in ``lengths``."""
    rows: List[List[int]] = []
    used: List[int] = []
    for i, n in enumerate(lengths):
        if n > seq_length:
            raise ValueError(f"sample {i} has {n} tokens, more than seq_length={seq_length}: truncate or drop it "
                             f"before packing")
        for r, u in enumerate(used):
            if u + n <= seq_length:
                rows[r].append(i)
                used[r] += n
                break
        else:
            rows.append([i])
            used.append(n)
    return rows


def pack(samples: List[Dict], seq_length: int, pad_multiple: int = 1, with_images: bool = True) -> Dict:
    """Pack whole samples into rows of at most ``seq_length`` tokens (``pack_rows``), right-padded to the longest row
    (rounded up to ``pad_multiple``). Besides collate's keys (``lengths`` and ``num_images`` per sample, in sample
    order) the batch holds ``position_ids`` and ``segment_ids`` [rows, s], ``sample_rows`` / ``sample_offsets``
    (where each sample sits) and, when the samples carry a ``source``, ``source_token_ids`` [rows, s] (-1 on
    padding). Images are concatenated in the order their placeholders appear in the rows (row by row)."""
    lengths = [s["tokens"].numel() for s in samples]
    rows = pack_rows(lengths, seq_length)
    longest = max(sum(lengths[i] for i in row) for row in rows)
    length = max(-(-longest // pad_multiple) * pad_multiple, 1)
    shape = (len(rows), length)
    tokens = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    with_sources = all("source" in s for s in samples)
    source_token_ids = torch.full(shape, -1, dtype=torch.long) if with_sources else None
    sample_rows, sample_offsets = [0] * len(samples), [0] * len(samples)
    order = []
    for r, row in enumerate(rows):
        offset = 0
        for k, i in enumerate(row):
            s, n = samples[i], lengths[i]
            tokens[r, offset:offset + n] = s["tokens"]
            labels[r, offset:offset + n] = s["labels"]
            position_ids[r, offset:offset + n] = torch.arange(n)
            segment_ids[r, offset:offset + n] = k + 1
            if with_sources:
                source_token_ids[r, offset:offset + n] = s["source"]
            sample_rows[i], sample_offsets[i] = r, offset
            order.append(i)
            offset += n
    batch = {"tokens": tokens, "labels": labels, "position_ids": position_ids, "segment_ids": segment_ids,
             "lengths": lengths, "num_images": sum(int(s["images"].shape[0]) for s in samples),
             "sample_rows": sample_rows, "sample_offsets": sample_offsets}
    if with_sources:
        batch["source_token_ids"] = source_token_ids
    if with_images:
        images = [samples[i]["images"] for i in order if samples[i]["images"].shape[0] > 0]
        batch["images"] = torch.cat(images) if images else None
    return batch


# Per-position keys of a (packed) batch and their padding values.
_PADDING = {"tokens": 0, "labels": IGNORE_INDEX, "position_ids": 0, "segment_ids": 0, "source_token_ids": -1}


def pad_batch(batch: Dict, length: int, rows: Optional[int] = None) -> Dict:
    """Right-pad a collated or packed batch to ``length`` positions (pad id 0, label -100, position 0, segment 0)
    and, if ``rows`` is given, to that many rows with rows of padding that train nothing."""
    extra = length - batch["tokens"].shape[1]
    extra_rows = 0 if rows is None else rows - batch["tokens"].shape[0]
    if extra <= 0 and extra_rows <= 0:
        return batch
    out = dict(batch)
    for key, value in _PADDING.items():
        if batch.get(key) is not None:
            out[key] = torch.nn.functional.pad(batch[key], (0, max(extra, 0), 0, max(extra_rows, 0)), value=value)
    return out


def microbatch_iterator(get_sample: Callable[[int, bool], Dict], num_samples: int, global_batch_size: int,
                        micro_batch_size: int, dp_rank: int, dp_size: int, start_iteration: int = 0,
                        pad_multiple: int = 1, with_images: bool = True,
                        pack_length: Optional[int] = None) -> Iterator[Dict]:
    """Endless micro-batches of this DP rank, starting at global batch ``start_iteration``; packed into rows of at
    most ``pack_length`` tokens when it is given (``pack``), one sample per row otherwise (``collate``)."""
    per_rank = global_batch_size // dp_size
    iteration = start_iteration
    while True:
        base = iteration * global_batch_size + dp_rank * per_rank
        for j in range(per_rank // micro_batch_size):
            first = base + j * micro_batch_size
            idx = [(first + k) % num_samples for k in range(micro_batch_size)]
            samples = [get_sample(i, with_images) for i in idx]
            if pack_length is None:
                yield collate(samples, pad_multiple, with_images)
            else:
                yield pack(samples, pack_length, pad_multiple, with_images)
        iteration += 1
