"""One training iteration on megatron-core's pipeline schedules (no pipelining, 1F1B, or interleaved 1F1B)."""
from functools import partial
from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megallava.data.batching import pad_batch
from megallava.model.init import unwrap


def loss_func(labels: torch.Tensor, per_token_loss: torch.Tensor):
    """Sum of the token losses and their count; megatron divides by the global token count (calculate_per_token_loss),
    so the loss is averaged over trained tokens across micro-batches and DP ranks, not a mean of means."""
    n = (labels >= 0).sum()
    loss_sum = per_token_loss.sum()
    return loss_sum, n.to(torch.int), {"lm loss": torch.stack([loss_sum.detach().float(), n.float()])}


def forward_step(data_iterator, model):
    chunk = unwrap(model)
    batch = next(data_iterator) if data_iterator is not None else None
    device = next(chunk.parameters()).device
    tokens = images = labels = None
    if chunk.pre_process:
        tokens = batch["tokens"].to(device)
        images = batch["images"].to(device) if batch["images"] is not None else None
    if chunk.post_process:
        labels = batch["labels"].to(device)
    output = model(tokens=tokens, images=images, labels=labels)
    return output, partial(loss_func, labels)


def train_step(model: List, optimizer, scheduler, data_iterators: List[Optional[object]], num_microbatches: int,
               micro_batch_size: int, seq_length: int) -> Dict:
    """Forward/backward over all micro-batches, optimizer step. Returns the global loss (sum / trained tokens),
    the trained-token count, grad norm and lr; identical on every rank."""
    for m in model:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    config = model[0].config
    if not config.variable_seq_lengths:
        data_iterators, seq_length = _pad_step_to_common_length(data_iterators, num_microbatches,
                                                                config.sequence_parallel)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterators if len(model) > 1 else data_iterators[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=False)
    lr = optimizer.param_groups[0]["lr"]  # the rate this update uses (the scheduler moves it afterwards)
    update_ok, grad_norm, _ = optimizer.step()
    if update_ok:
        scheduler.step(increment=1)
    return {"loss_stats": _global_loss_stats(losses), "grad_norm": float(grad_norm or 0.0), "lr": lr,
            "update_ok": bool(update_ok)}


def _pad_step_to_common_length(data_iterators, num_microbatches: int, sequence_parallel: bool):
    """Static pipeline shapes for the interleaved schedule: fetch this step's micro-batches, agree on the longest
    over the pipeline group (middle stages read no data and contribute 0), pad every micro-batch to it."""
    fetched = [None if it is None else [next(it) for _ in range(num_microbatches)] for it in data_iterators]
    longest = max([b["tokens"].shape[1] for chunk in fetched if chunk for b in chunk] or [0])
    length = torch.tensor([longest], dtype=torch.long,
                          device="cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.all_reduce(length, op=torch.distributed.ReduceOp.MAX,
                                 group=parallel_state.get_pipeline_model_parallel_group())
    seq_length = int(length.item())
    if sequence_parallel:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        seq_length = -(-seq_length // tp) * tp
    padded = [None if chunk is None else iter([pad_batch(b, seq_length) for b in chunk]) for chunk in fetched]
    return padded, seq_length


def _global_loss_stats(losses) -> torch.Tensor:
    """[loss_sum, trained_tokens] over the global batch, on every rank: last-stage TP-rank-0 ranks (one per DP
    replica) contribute their micro-batch sums, everyone else zeros."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    stats = torch.zeros(2, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and \
            parallel_state.get_tensor_model_parallel_rank() == 0:
        for entry in losses:
            stats += entry["lm loss"].to(stats)
    torch.distributed.all_reduce(stats)
    return stats
