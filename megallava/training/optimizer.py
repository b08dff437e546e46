"""DDP wrapping (megatron DistributedDataParallel), the (distributed) Adam optimizer and the LR schedule.

Memory per trainable parameter (bf16 training), the model the planner and README state:
- ``train.master_weights=true`` (default): bf16 param 2 + fp32 main grad 4 + fp32 master weight 4 + fp32 Adam
  moments 8 = 18 bytes (16 with ``train.grad_reduce_in_fp32=false``); the distributed optimizer (default) shards
  the 12 bytes of master weight and moments over data-parallel ranks, so a rank holds 6 + 12/dp.
- ``train.master_weights=false``: bf16 param 2 + bf16 grad 2 + bf16 moments 4 = 8 bytes, HF's pure-bf16 policy
  (the update is rounded to bf16: small steps on large weights are lost). Not sharded.
Frozen parameters (the ViT, or the LLM in stage 1) cost their weights only.
"""
import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer import clip_grads
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.utils import local_multi_tensor_l2_norm

from megallava.model import fused


def grad_reduce_in_fp32(cfg) -> bool:
    t = cfg.train
    return t.master_weights if t.grad_reduce_in_fp32 is None else t.grad_reduce_in_fp32


def wrap_ddp(chunks, cfg):
    config = chunks[0].config
    p = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32(cfg),
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    # Bucketing only for the first chunk, as Megatron-LM does with interleaving.
    return [DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)]


def build_optimizer(model, cfg):
    """Adam (fp32 master weights for bf16 params unless ``train.master_weights=false``); no weight decay on biases
    and norms (1-D params)."""
    config = model[0].config
    t = cfg.train
    opt_config = OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad,
        bf16=config.bf16 and t.master_weights, params_dtype=config.params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_config, model)
    if not t.master_weights:  # megatron's FP32Optimizer: Adam steps the bf16 params themselves
        allow_bf16_grad_clipping()
    if fused.enabled(cfg.kernels.fused_adam):
        use_fused_adam(optimizer)
        use_foreach_grad_norm()
    warmup = int(round(t.lr_warmup_fraction * t.iters))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=t.iters, lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay, end_wd=t.weight_decay,
        wd_incr_steps=t.iters, wd_incr_style="constant")
    # The pipeline schedules call these hooks: loss scaling, grad sync control, and the final grad reduction
    # (which divides by the number of trained tokens in the global batch: per-token loss).
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    if cfg.parallel.overlap_grad_reduce:  # as Megatron-LM: the schedules start each chunk's reduce when it is done
        config.grad_sync_func = [m.start_grad_sync for m in model] if len(model) > 1 else model[0].start_grad_sync
    config.finalize_model_grads_func = finalize_model_grads
    return optimizer, scheduler


def sync_params(model, cfg) -> None:
    """With ``parallel.overlap_param_gather`` the updated weights reach the model only as the next forward gathers
    them; gather them now (before a checkpoint is written, and at the end of a run)."""
    if cfg.parallel.overlap_param_gather:
        for m in model:
            m.start_param_sync(force_sync=True)


def _clip_grads(parameters, max_norm: float, total_norm: float, use_decoupled_grad: bool = False) -> None:
    """megatron's clip_grad_by_total_norm_fp32 (scale every grad by max_norm / total_norm when that is < 1) for
    grads of any float dtype: with ``train.master_weights=false`` Adam steps bf16 params with their bf16 grads, and
    megatron's version asserts fp32 grads."""
    grads = [getattr(p, "decoupled_grad" if use_decoupled_grad else "grad") for p in parameters]
    grads = [g.detach() for g in grads if g is not None]
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0 and grads:
        torch._foreach_mul_(grads, coeff)


def allow_bf16_grad_clipping() -> None:
    from megatron.core.optimizer import optimizer as mcore_optimizer

    mcore_optimizer.clip_grad_by_total_norm_fp32 = _clip_grads


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for megatron's local multi_tensor_l2norm fallback, which takes one norm kernel and one host sync per
    tensor: per-tensor norms in fp32 with one foreach call, their norm on the device, no sync."""
    norms = torch._foreach_norm(tensor_lists[0], 2, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for megatron's local multi_tensor_scale fallback (dst = src * scale): one foreach call."""
    src, dst = tensor_lists
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def use_foreach_grad_norm() -> None:
    """Grad norm and clipping on foreach kernels where megatron fell back to its per-tensor loops (no
    TransformerEngine / apex multi-tensor kernels): process-wide, same results up to summation order."""
    if clip_grads.l2_norm_impl is local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _foreach_l2_norm
        clip_grads.multi_tensor_scale_impl = _foreach_scale


def torch_adams(optimizer):
    """torch.optim.Adam/AdamW instances inside megatron's (chained) optimizer wrappers; megatron falls back to
    torch's Adam when neither TransformerEngine nor apex is installed (their FusedAdam is fused already)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Adam) or isinstance(inner, torch.optim.AdamW):
            yield inner


def use_fused_adam(optimizer) -> None:
    """Switch torch's Adam from its default multi-tensor (foreach) step to the fused one: a single kernel reads
    param, grad and moments once per step. Same update (tests/test_kernels.py). Megatron builds torch's Adam with
    default flags, so the switch is made on the param groups, which is what Adam.step reads."""
    for adam in torch_adams(optimizer):
        for group in adam.param_groups:
            group["fused"], group["foreach"] = True, False
