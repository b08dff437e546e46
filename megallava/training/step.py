"""One training iteration on megatron-core's pipeline schedules (no pipelining, 1F1B, or interleaved 1F1B)."""
from functools import partial
from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megallava.data.batching import pad_batch
from megallava.model.init import unwrap


def loss_func(labels: torch.Tensor, source_ids: Optional[torch.Tensor], skipped: Optional[torch.Tensor],
              num_sources: int, per_token_loss: torch.Tensor):
    """Sum of the token losses and their count; megatron divides by the global token count (calculate_per_token_loss),
    so the loss is averaged over trained tokens across micro-batches and DP ranks, not a mean of means.
    ``extra`` carries per-source loss sums and token counts, then skip counters, for the metrics."""
    mask = labels >= 0
    n = mask.sum()
    loss_sum = per_token_loss.sum()
    report = {"lm loss": torch.stack([loss_sum.detach().float(), n.float()])}
    extra = []
    if num_sources:
        # [rows] per-sample ids (one sample per row), or [rows, s] per-token ids (packed rows: source_token_ids)
        src = source_ids.to(labels.device)
        src = (src if src.dim() == 2 else src[:, None]).expand_as(labels)[mask]
        sums = torch.zeros(num_sources, dtype=torch.float64, device=labels.device)
        sums.index_add_(0, src, per_token_loss.detach()[mask].double())
        extra += [sums, torch.bincount(src, minlength=num_sources).double()]
    if skipped is not None:
        extra.append(skipped.to(labels.device))
    if extra:
        report["extra"] = torch.cat(extra)
    return loss_sum, n.to(torch.int), report


def forward_step(data_iterator, model, num_sources: int = 0, skip_counter=None):
    chunk = unwrap(model)
    batch = next(data_iterator) if data_iterator is not None else None
    device = next(chunk.parameters()).device
    tokens = images = labels = None
    if chunk.pre_process:
        tokens = batch["tokens"].to(device)
        images = batch["images"].to(device) if batch["images"] is not None else None
    if chunk.post_process:
        labels = batch["labels"].to(device)
    # Packed batches (data.packing) carry per-token positions and segments; every chunk reads them (middle
    # pipeline stages then have an iterator too). Unpacked batches have neither and middle stages read nothing.
    packed = {k: batch[k].to(device) for k in ("position_ids", "segment_ids") if batch is not None and k in batch}
    output = model(tokens=tokens, images=images, labels=labels, **packed)
    if not chunk.post_process:
        return output, partial(loss_func, labels, None, None, 0)
    skipped = skip_counter(batch) if skip_counter is not None else None
    sources = None
    if num_sources:
        sources = batch["source_token_ids"] if "source_token_ids" in batch else batch.get("source_ids")
    return output, partial(loss_func, labels, sources, skipped, num_sources)


def train_step(model: List, optimizer, scheduler, data_iterators: List[Optional[object]], num_microbatches: int,
               micro_batch_size: int, seq_length: int, num_sources: int = 0, skip_counter=None,
               num_skip_reasons: int = 0) -> Dict:
    """Forward/backward over all micro-batches, optimizer step. Returns ``loss_stats`` = [loss sum, trained tokens,
    per-source loss sums, per-source token counts, skip counts] over the global batch, grad norm and lr; identical
    on every rank."""
    for m in model:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    config = model[0].config
    if not config.variable_seq_lengths:
        data_iterators, seq_length, micro_batch_size = _pad_step_to_common_shape(
            data_iterators, num_microbatches, config.sequence_parallel)
    losses = get_forward_backward_func()(
        forward_step_func=partial(forward_step, num_sources=num_sources, skip_counter=skip_counter),
        data_iterator=data_iterators if len(model) > 1 else data_iterators[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=False)
    lr = optimizer.param_groups[0]["lr"]  # the rate this update uses (the scheduler moves it afterwards)
    update_ok, grad_norm, _ = optimizer.step()
    if update_ok:
        scheduler.step(increment=1)
    extra = 2 * num_sources + (num_skip_reasons if skip_counter is not None else 0)
    return {"loss_stats": _global_loss_stats(losses, extra), "grad_norm": float(grad_norm or 0.0), "lr": lr,
            "update_ok": bool(update_ok)}


@torch.no_grad()
def eval_step(model: List, data_iterators: List[Optional[object]], num_microbatches: int, micro_batch_size: int,
              seq_length: int, num_sources: int = 0) -> torch.Tensor:
    """Forward-only pass over one global batch of held-out data (megatron's schedule with forward_only=True, the
    training forward and loss): [loss sum, trained tokens, per-source loss sums, per-source token counts], identical
    on every rank. Dropout is off (eval mode) and nothing is accumulated, so it does not touch the training state."""
    for m in model:
        m.eval()
    config = model[0].config
    if not config.variable_seq_lengths:
        data_iterators, seq_length, micro_batch_size = _pad_step_to_common_shape(
            data_iterators, num_microbatches, config.sequence_parallel)
    try:
        losses = get_forward_backward_func()(
            forward_step_func=partial(forward_step, num_sources=num_sources),
            data_iterator=data_iterators if len(model) > 1 else data_iterators[0],
            model=model if len(model) > 1 else model[0],
            num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
            forward_only=True)
    finally:
        for m in model:
            m.train()
    return _global_loss_stats(losses, 2 * num_sources)


def _pad_step_to_common_shape(data_iterators, num_microbatches: int, sequence_parallel: bool):
    """Static pipeline shapes for the interleaved schedule: fetch this step's micro-batches, agree on the longest
    and on the most rows over the pipeline group (middle stages read no data unless packing, and then contribute
    0), pad every micro-batch to that [rows, length]. Unpacked micro-batches already have micro_batch_size rows
    (the loader keeps them fixed); packed ones have fewer, so the step runs with the most rows any micro-batch
    packed into and pads the others with rows that train nothing."""
    fetched = [None if it is None else [next(it) for _ in range(num_microbatches)] for it in data_iterators]
    batches = [b for chunk in fetched if chunk for b in chunk]
    shape = torch.tensor([max([b["tokens"].shape[1] for b in batches] or [0]),
                          max([b["tokens"].shape[0] for b in batches] or [0])], dtype=torch.long,
                         device="cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.all_reduce(shape, op=torch.distributed.ReduceOp.MAX,
                                 group=parallel_state.get_pipeline_model_parallel_group())
    seq_length, rows = (int(x) for x in shape.tolist())
    if sequence_parallel:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        seq_length = -(-seq_length // tp) * tp
    padded = [None if chunk is None else iter([pad_batch(b, seq_length, rows) for b in chunk]) for chunk in fetched]
    return padded, seq_length, rows


def _global_loss_stats(losses, extra_size: int) -> torch.Tensor:
    """Sums of the loss reports over the global batch, on every rank: last-stage TP-rank-0 ranks (one per DP
    replica) contribute their micro-batches, everyone else zeros."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    stats = torch.zeros(2 + extra_size, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and \
            parallel_state.get_tensor_model_parallel_rank() == 0:
        for entry in losses:
            stats[:2] += entry["lm loss"].to(stats)
            if extra_size:
                stats[2:] += entry["extra"].to(stats)
    torch.distributed.all_reduce(stats)
    return stats
