"""DDP wrapping (megatron DistributedDataParallel), the (distributed) Adam optimizer and the LR schedule."""

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def wrap_ddp(chunks, cfg):
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    # Bucketing only for the first chunk, as Megatron-LM does with interleaving.
    return [DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)]


def build_optimizer(model, cfg):
    """Adam with fp32 master weights (bf16 params on GPU); no weight decay on biases and norms (1-D params)."""
    config = model[0].config
    t = cfg.train
    opt_config = OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad,
        bf16=config.bf16, params_dtype=config.params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_config, model)
    warmup = int(round(t.lr_warmup_fraction * t.iters))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=t.iters, lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay, end_wd=t.weight_decay,
        wd_incr_steps=t.iters, wd_incr_style="constant")
    # The pipeline schedules call these hooks: loss scaling, grad sync control, and the final grad reduction
    # (which divides by the number of trained tokens in the global batch: per-token loss).
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return optimizer, scheduler
