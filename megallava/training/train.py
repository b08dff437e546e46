"""Training entry point: ``torchrun --nproc-per-node N -m megallava.train --config FILE [key=value ...]``."""
import argparse
import sys
import time

import torch

from megallava import config as C
from megallava.distributed import LaunchEnv, init_distributed, launch_env, shutdown


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="megallava.train", description=__doc__)
    parser.add_argument("--config", help="YAML config file (see examples/configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 train.iters=20")
    return parser.parse_args(argv)


def load_and_validate(argv, env: LaunchEnv) -> C.Config:
    args = parse_args(argv)
    cfg = C.load_config(args.config, args.overrides)
    C.validate(cfg, env.world_size)
    return cfg


def data_iterators(cfg, chunks, dp_rank: int, dp_size: int, start_iteration: int = 0):
    """One iterator per model chunk that needs data: the first chunk (tokens, images) and the last (labels).
    All read the same deterministic stream; only the first decodes images. With ``data.packing`` every chunk needs
    the rows' positions and segments (RoPE and the attention mask), so middle chunks read the labels-only stream
    too; without packing they read nothing (None)."""
    from megallava.data.batching import microbatch_iterator
    from megallava.data.synthetic import SyntheticConversations

    pad = cfg.parallel.tp if cfg.parallel.sequence_parallel else 1
    packing = cfg.data.packing
    if cfg.data.source == "shards":
        from megallava.data.loader import build_microbatch_iterator

        make = lambda chunk: build_microbatch_iterator(cfg, dp_rank, dp_size, start_iteration,  # noqa: E731
                                                       with_images=chunk.pre_process, pad_multiple=pad,
                                                       packing=packing)
    else:
        m, d = cfg.model, cfg.data
        source = SyntheticConversations(cfg.train.seed, m.vocab_size, d.seq_length, m.vision.image_size,
                                        C.image_tokens_per_image(cfg), m.image_token_id, d.text_only_fraction,
                                        d.max_images_per_sample)
        make = lambda chunk: microbatch_iterator(source.sample, d.num_samples, cfg.train.global_batch_size,  # noqa: E731
                                                 cfg.train.micro_batch_size, dp_rank, dp_size, start_iteration,
                                                 pad, with_images=chunk.pre_process,
                                                 pack_length=d.seq_length if packing else None)
    return [make(c) if (c.pre_process or c.post_process or packing) else None for c in chunks]


def data_metrics_layout(cfg):
    """(source names, skip reasons) reported per iteration: per-source loss and skipped-sample counters."""
    if cfg.data.source != "shards":
        return [], []
    from megallava.data.loader import SKIP_REASONS, source_names

    return source_names(cfg), list(SKIP_REASONS)


def run(cfg: C.Config, env: LaunchEnv, on_iteration=None) -> list:
    """Train up to ``cfg.train.iters`` iterations (resuming from ``checkpoint.load``); returns this run's
    per-iteration records (on every rank)."""
    from megatron.core import parallel_state
    from megallava.model.build import build_chunks
    from megallava.training import checkpoint, flops
    from megallava.training.metrics import MetricsWriter
    from megallava.training.optimizer import build_optimizer, sync_params, wrap_ddp
    from megallava.training.preemption import PreemptionHandler
    from megallava.training.step import train_step

    p, ck = cfg.parallel, cfg.checkpoint
    init_distributed(p.tp, p.pp, p.vpp, cfg.train.seed, env)
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        C.dump_yaml(cfg, f"{cfg.train.run_dir}/config.yaml")
    chunks = build_chunks(cfg)
    model = wrap_ddp(chunks, cfg)
    optimizer, scheduler = build_optimizer(model, cfg)
    start = checkpoint.load(ck.load, model, optimizer, scheduler, ck.load_optimizer) if ck.load else 0
    dp_size = parallel_state.get_data_parallel_world_size()
    iterators = data_iterators(cfg, chunks, parallel_state.get_data_parallel_rank(), dp_size, start)
    # Count what the token-reading chunk consumes: real (unpadded) tokens and images drive FLOPs and MFU.
    counter = None
    if chunks[0].pre_process:
        iterators[0] = counter = flops.BatchCounter(iterators[0])
    peak_tflops = flops.peak_tflops_per_gpu(cfg.train.peak_tflops)
    n_micro = C.num_microbatches(cfg, env.world_size)
    sources, skip_reasons = data_metrics_layout(cfg)
    skip_counter = None
    if skip_reasons:
        from megallava.data.loader import skip_counts as skip_counter
    skipped_total = dict.fromkeys(skip_reasons, 0)
    metrics = MetricsWriter(cfg.train.run_dir, enabled=rank0)
    preemption = PreemptionHandler(enabled=ck.dir is not None)
    records = []
    for iteration in range(start + 1, cfg.train.iters + 1):
        t0 = time.perf_counter()
        out = train_step(model, optimizer, scheduler, iterators, n_micro, cfg.train.micro_batch_size,
                         cfg.data.seq_length, len(sources), skip_counter, len(skip_reasons))
        step_time = time.perf_counter() - t0
        stats = out["loss_stats"].tolist()
        loss_sum, tokens = stats[:2]
        record = {"iteration": iteration, "loss": loss_sum / max(tokens, 1.0), "lr": out["lr"],
                  "grad_norm": out["grad_norm"], "trained_tokens": int(tokens), "step_time_s": step_time}
        n = len(sources)
        for i, name in enumerate(sources):  # per-source loss over that source's trained tokens (null if none)
            record[f"loss/{name}"] = stats[2 + i] / stats[2 + n + i] if stats[2 + n + i] else None
            record[f"trained_tokens/{name}"] = int(stats[2 + n + i])
        for i, reason in enumerate(skip_reasons):  # cumulative skipped samples by reason
            skipped_total[reason] += int(stats[2 + 2 * n + i])
            record[f"skipped_{reason}"] = skipped_total[reason]
        record.update(flops.step_metrics(cfg, counter, step_time, peak_tflops))  # collective, every rank
        records.append(record)
        if iteration % cfg.train.log_interval == 0 or iteration == cfg.train.iters:
            metrics.log(record, total=cfg.train.iters)
        if on_iteration is not None:
            on_iteration(iteration, model, out)
        stop = (preemption.should_stop() if ck.dir else False) or iteration == cfg.train.exit_interval
        if ck.dir and (stop or (ck.interval and iteration % ck.interval == 0) or iteration == cfg.train.iters):
            sync_params(model, cfg)
            checkpoint.save(ck.dir, model, optimizer, scheduler, iteration, ck.keep)
        if stop:
            if rank0:
                print(f"stopping after iteration {iteration}" + (f"; saved to {ck.dir}" if ck.dir else ""), flush=True)
            break
    sync_params(model, cfg)
    preemption.restore()
    metrics.close()
    return records


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    env = launch_env()
    try:
        cfg = load_and_validate(argv, env)
    except C.ConfigError as err:
        # Every rank validates the same config; one prints. No traceback: the message names each fix.
        if env.rank == 0:
            print(f"megallava.train: {err}", file=sys.stderr)
        return 2
    try:
        run(cfg, env)
    finally:
        if torch.distributed.is_initialized():
            shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
