"""Training entry point: ``torchrun --nproc-per-node N -m megallava.train --config FILE [key=value ...]``."""
import argparse
import os
import shutil
import sys
import time
from typing import Optional, Tuple

import torch

from megallava import config as C
from megallava.distributed import LaunchEnv, init_distributed, launch_env, shutdown


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="megallava.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every key, with its default and a comment: megallava/config.py, or --print-config (the resolved config "
               "as YAML). Overrides are section.key=value (YAML values: parallel.pipeline_layers=[1,3]); key=null "
               "unsets a key (back to its default). Paths may use ${ENV_VARS}.\n\n" + C.key_help())
    parser.add_argument("--config", required=True, help="YAML config file (examples/configs/)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (every key, defaults included) and exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 train.iters=20")
    return parser.parse_args(argv)


def load_and_validate(argv, env: LaunchEnv) -> C.Config:
    args = parse_args(argv)
    cfg = C.load_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        if env.rank == 0:
            print(yaml.safe_dump(C.to_dict(cfg), sort_keys=False), end="", flush=True)
        raise SystemExit(0)
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


def validation_config(cfg):
    """The config that reads data.valid_sources exactly like training reads data.sources (same templates, packing,
    layout-invariant global batches from 0 every time, so every validation sees the same samples), in the training
    process (no loader workers to start and stop each time); None without validation."""
    import copy

    if not cfg.train.eval_interval or not cfg.data.valid_sources:
        return None
    vcfg = copy.deepcopy(cfg)
    vcfg.data.sources, vcfg.data.valid_sources, vcfg.data.num_workers = list(cfg.data.valid_sources), [], 0
    return vcfg


def validate_loss(vcfg, model, chunks, n_micro: int) -> dict:
    """Forward-only over ``train.eval_iters`` global batches of held-out data: the loss overall and per source
    (over trained tokens), on every rank."""
    from megatron.core import parallel_state
    from megallava.data.loader import source_names
    from megallava.training.step import eval_step

    names = source_names(vcfg)
    iterators = data_iterators(vcfg, chunks, parallel_state.get_data_parallel_rank(),
                               parallel_state.get_data_parallel_world_size(), 0)
    totals = None
    for _ in range(vcfg.train.eval_iters):
        stats = eval_step(model, iterators, n_micro, vcfg.train.micro_batch_size, vcfg.data.seq_length, len(names))
        totals = stats if totals is None else totals + stats
    t = totals.tolist()
    n = len(names)
    out = {"valid/loss": t[0] / max(t[1], 1.0), "valid/trained_tokens": int(t[1])}
    for i, name in enumerate(names):
        out[f"valid/loss/{name}"] = t[2 + i] / t[2 + n + i] if t[2 + n + i] else None
    return out


def data_metrics_layout(cfg):
    """(source names, skip reasons) reported per iteration: per-source loss and skipped-sample counters."""
    if cfg.data.source != "shards":
        return [], []
    from megallava.data.loader import SKIP_REASONS, source_names

    return source_names(cfg), list(SKIP_REASONS)


def truncate_metrics(run_dir: str, after: int) -> None:
    """metrics.jsonl stays one history across restarts: a run that starts after iteration ``after`` (0 = fresh)
    drops the lines a previous run logged past that point (they are about to be trained again)."""
    import json

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if int(json.loads(line)["iteration"]) <= after:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            pass  # a line cut off by a crash
    if len(keep) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


def _purge_tensorboard(metrics, after: int) -> None:
    """TensorBoard's own restart marker (SummaryWriter's purge_step): hide events of a previous run past ``after``."""
    tb = getattr(metrics, "_tb", None)
    if tb is None:
        return
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    tb.file_writer.add_event(Event(step=after + 1, session_log=SessionLog(status=SessionLog.START)))


PREEMPTED = 75                      # exit status after a SIGTERM save with iterations left (faults.EXIT_PREEMPTED)
PREEMPTED_MARKER = "PREEMPTED"      # the same, as a file in run_dir (torchrun maps worker exit codes to 1)


def clear_preempted(run_dir: str) -> None:
    """Remove a ``PREEMPTED`` marker left by a previous (preempted) run of ``run_dir``, first thing at start: a run
    that then fails at start-up (preflight, checkpoint load, model build) must not look preempted, or job scripts
    that requeue on the marker would requeue it forever."""
    try:
        os.remove(os.path.join(run_dir, PREEMPTED_MARKER))
    except FileNotFoundError:
        pass
    except OSError as e:  # e.g. a read-only run_dir: preflight names the problem
        print(f"warning: cannot remove the stale {os.path.join(run_dir, PREEMPTED_MARKER)} ({e.strerror or e})",
              file=sys.stderr, flush=True)


class Records(list):
    """Per-iteration records; ``preempted``: the run stopped on SIGTERM (and saved) with iterations left."""
    preempted = False


def _inside(path: str, directory: str) -> bool:
    """``path`` is ``directory`` or lies below it (whole path components: ``ckpt2`` is not inside ``ckpt``)."""
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def resolve_load(cfg) -> Tuple[Optional[str], bool]:
    """What this run loads and whether as a fine-tune start: checkpoint.load with ``auto`` resolved (checkpoint.dir's
    latest, or nothing); when that finds nothing, checkpoint.pretrained with finetune semantics (iteration 0, fresh
    optimizer, schedule and data order). So one command line serves a new run and every requeue of it: the first
    start takes the pretrained weights, a requeue resumes its own checkpoints.

    Refuses first to start over a checkpoint.dir that holds another run's checkpoints (its ``latest`` would be
    replaced) unless checkpoint.overwrite."""
    from megallava.training import checkpoint

    ck = cfg.checkpoint
    existing = ck.dir and os.path.isfile(os.path.join(ck.dir, checkpoint.LATEST))
    load = (ck.dir if existing else None) if ck.load == "auto" else ck.load
    inside = bool(load) and existing and _inside(load, ck.dir)
    start = load or ck.pretrained
    if existing and not inside and not ck.overwrite:
        raise checkpoint.CheckpointError(
            f"checkpoint.dir={ck.dir} already holds checkpoints (latest: {checkpoint.resolve(ck.dir)}), and this run "
            f"would {'start from ' + start if start else 'start fresh'} and replace them: resume with "
            f"checkpoint.load=auto (or checkpoint.load={ck.dir}), choose another checkpoint.dir, or set "
            f"checkpoint.overwrite=true", collective=True)
    return (load, ck.finetune) if load else (ck.pretrained, ck.pretrained is not None)


def banner(cfg, chunks, world: int, start: int, loaded) -> str:
    """The start line: layout, parameters (total and trainable, this rank's stage), data, precision, outputs."""
    p, t, d = cfg.parallel, cfg.train, cfg.data
    # QLoRA's quantised bases are no longer parameters (their weight is an empty tensor): counted from the NF4 shape
    nf4 = sum(m.quantized.shape.numel() for c in chunks for m in c.modules()
              if getattr(m, "quantized", None) is not None)
    total = sum(x.numel() for c in chunks for x in c.parameters()) + nf4
    trainable = sum(x.numel() for c in chunks for x in c.parameters() if x.requires_grad)
    method = "full" if cfg.lora.rank == 0 else f"{'QLoRA' if cfg.lora.quantize else 'LoRA'}-{cfg.lora.rank}"
    stage = "stage 2 (projector + LLM)" if cfg.model.train_llm else "stage 1 (projector)"
    data = (", ".join(f"{s.path} (x{s.weight:g}, {s.template})" for s in d.sources) if d.source == "shards"
            else "synthetic")
    split = C.resolved_pipeline_layers(cfg)
    return (f"megallava: {world} ranks = TP{p.tp} x PP{p.pp}" + (f" x VPP{p.vpp}" if p.vpp else "") +
            (f" (LLM layers per stage {split}{'' if p.pipeline_layers else ', balanced'})" if split else "") +
            f" x DP{world // (p.tp * p.pp)}{' + SP' if p.sequence_parallel else ''}; {stage}, {method}; "
            f"rank 0's stage: {total:,} parameters" + (f" ({nf4:,} of them NF4)" if nf4 else "") +
            f", {trainable:,} trained; "
            f"precision {t.precision}{'' if t.master_weights else ' (no master weights)'}; data {data}, seq "
            f"{d.seq_length}{' packed' if d.packing else ''}; iterations {start + 1}..{t.iters} of global batch "
            f"{t.global_batch_size}" + (f" from {loaded}" if loaded else "") + f"; run_dir {t.run_dir}" +
            (f", checkpoints {cfg.checkpoint.dir}" if cfg.checkpoint.dir else ""))


def run(cfg: C.Config, env: LaunchEnv, on_iteration=None) -> list:
    """Train up to ``cfg.train.iters`` iterations (resuming from ``checkpoint.load``); returns this run's
    per-iteration records (on every rank).

    Every phase runs under the watchdog (training/faults.py): start-up (rendezvous, preflight, model build,
    checkpoint load, first iteration) within ``train.startup_timeout_s``, each later iteration within
    ``train.fault_timeout_s`` plus twice the slowest iteration so far, each save within ``checkpoint.timeout_s``;
    collectives time out after the same budgets. Raises on failure (``main`` turns that into a bounded exit)."""
    from megallava.training import faults
    from megallava.training.preemption import PreemptionHandler

    if env.rank == 0:  # before anything that can fail: a stale marker would make job scripts requeue a failure
        clear_preempted(cfg.train.run_dir)
    own_watchdog = faults.watchdog() is None
    faults.set_rank(env.rank)
    faults.start_watchdog(env.rank)
    locks, unregister = [], []
    loader = lambda: sys.modules.get("megallava.data.loader")  # noqa: E731 - imported only for shard data
    # Installed before the loader workers fork, so that they inherit a SIGTERM handler until their own SIG_IGN.
    preemption = PreemptionHandler(enabled=cfg.checkpoint.dir is not None)
    try:
        records = _run(cfg, env, on_iteration, locks, unregister, preemption)
        if loader():
            loader().close_all()
        return records
    except BaseException:
        if loader():
            loader().kill_workers()  # never wait on them on the error path
        raise
    finally:
        preemption.restore()
        for lock in locks:
            lock.release()
        for fn in unregister:
            fn()
        if own_watchdog:
            faults.stop_watchdog()


def _run(cfg, env, on_iteration, locks, unregister, preemption) -> list:
    from megatron.core import parallel_state
    from megallava.model.build import build_chunks
    from megallava.training import checkpoint, faults, flops, preflight
    from megallava.training.data_health import SkipLog, SkipMonitor
    from megallava.training.fingerprint import model_fingerprint
    from megallava.training.metrics import MetricsWriter
    from megallava.training.optimizer import build_optimizer, sync_params, wrap_ddp
    from megallava.training.step import train_step

    p, ck, t = cfg.parallel, cfg.checkpoint, cfg.train
    faults.watchdog().arm("start-up: rendezvous (init_process_group)", t.startup_timeout_s)
    init_distributed(p.tp, p.pp, p.vpp, t.seed, env, timeout_s=t.startup_timeout_s)
    faults.set_collective_timeout(t.startup_timeout_s)  # megatron's subgroups too
    rank0 = torch.distributed.get_rank() == 0
    faults.note("start-up: preflight checks (directories, locks, free space, shards, seq_length)")
    locks += preflight.check(cfg, env)
    for lock in locks:
        faults.watchdog().heartbeat(lock.refresh)
        unregister.append(faults.on_hard_exit(lock.release))
    if rank0:
        C.dump_yaml(cfg, f"{t.run_dir}/config.yaml")
    fingerprint = model_fingerprint(cfg)
    load_path, finetune = resolve_load(cfg)
    # checkpoint.overwrite=true over another run's checkpoints: they are removed after this run's first save (until
    # then 'latest' still names the old run's, which a failed start leaves as they were). Left in place, the old
    # run's higher iterations would outrank the new ones: checkpoint.keep would prune the new run's checkpoints.
    replaced = (checkpoint.complete_iterations(ck.dir) if ck.dir and ck.overwrite and
                os.path.isfile(os.path.join(ck.dir, checkpoint.LATEST)) and
                not (load_path and _inside(load_path, ck.dir)) else [])
    to_load = None
    if load_path:  # damaged, incomplete or another model's: refused before minutes go into building a model
        faults.note(f"start-up: verifying checkpoint {load_path}")
        to_load = checkpoint.select(load_path, ck.fallback)
        checkpoint.check_fingerprint(to_load, fingerprint, ck.load_optimizer and not finetune)
        done = checkpoint.saved_iteration(to_load)
        if not finetune and done >= t.iters:
            raise checkpoint.CheckpointError(
                f"checkpoint {to_load} is at iteration {done} and train.iters={t.iters}: nothing left to train. To "
                f"start a new stage from its weights set checkpoint.finetune=true (iteration 0, fresh optimizer and "
                f"schedule); to train longer raise train.iters", collective=True)
    faults.note("start-up: building the model")
    chunks = build_chunks(cfg)
    model = wrap_ddp(chunks, cfg)
    optimizer, scheduler = build_optimizer(model, cfg)
    start = 0
    if to_load:
        faults.note(f"start-up: loading checkpoint {to_load}")
        start = checkpoint.load(to_load, model, optimizer, scheduler, ck.load_optimizer, verified=True,
                                finetune=finetune)
        if rank0:
            how = "checkpoint.finetune" if ck.finetune else "checkpoint.pretrained: nothing to resume"
            print(f"loaded {to_load}: " + (f"weights only, starting at iteration 1 ({how})"
                                           if finetune else f"resuming after iteration {start}"), flush=True)
    if ck.load_projector and (finetune or not to_load):  # a resumed run's checkpoint holds its trained projector
        faults.note(f"start-up: loading the projector from {ck.load_projector}")
        checkpoint.load(ck.load_projector, model, None, None, load_optimizer=False, only=("projector.",))
        if rank0:
            print(f"loaded the projector from {ck.load_projector}", flush=True)
    lora_base = checkpoint.lora_base_for(to_load) if cfg.lora.rank > 0 else None
    if cfg.lora.quantize:
        from megallava.model.lora import quantize_bases

        held, alone = quantize_bases(chunks)
        if rank0:
            print(f"QLoRA: base weights quantised to NF4 ({held / 2 ** 20:.1f} MiB on rank 0)", flush=True)
            if alone:
                print(f"QLoRA: {len(alone)} base weights (e.g. {alone[0]}) have per-rank rows that are not whole "
                      f"64-value NF4 blocks at tp={parallel_state.get_tensor_model_parallel_world_size()}: each shard "
                      f"was quantised alone, so this model differs slightly from the same QLoRA run at another tp",
                      flush=True)
    if rank0:
        print(banner(cfg, chunks, env.world_size, start, to_load), flush=True)
    faults.note("start-up: starting the data loaders")
    dp_size = parallel_state.get_data_parallel_world_size()
    iterators = data_iterators(cfg, chunks, parallel_state.get_data_parallel_rank(), dp_size, start)
    # Count what the token-reading chunk consumes: real (unpadded) tokens and images drive FLOPs and MFU.
    counter = None
    if chunks[0].pre_process:
        iterators[0] = counter = flops.BatchCounter(iterators[0])
    skip_log = None
    if cfg.data.source == "shards" and chunks[-1].post_process:  # every sample is read once on its last stage
        iterators[-1] = skip_log = SkipLog(iterators[-1], log=parallel_state.get_tensor_model_parallel_rank() == 0)
    injector = faults.FaultInjector(env.rank)
    if injector:
        k = next((i for i, it in enumerate(iterators) if it is not None), None)
        if k is not None:
            iterators[k] = injector.wrap(iterators[k])
    peak_tflops = flops.peak_tflops_per_gpu(t.peak_tflops)
    n_micro = C.num_microbatches(cfg, env.world_size)
    sources, skip_reasons = data_metrics_layout(cfg)
    skip_counter = None
    if skip_reasons:
        from megallava.data.loader import skip_counts as skip_counter
    skipped_total = dict.fromkeys(skip_reasons, 0)
    monitor = SkipMonitor(cfg.data.max_skip_fraction, t.global_batch_size, skip_reasons, skip_log)
    vcfg = validation_config(cfg)
    if rank0:
        truncate_metrics(t.run_dir, start)
    metrics = MetricsWriter(t.run_dir, enabled=rank0)
    if start:
        _purge_tensorboard(metrics, start)
    faults.watchdog().disarm()  # the first iteration has the start-up budget, every phase below its own
    records, slowest, collective_s = Records(), 0.0, t.startup_timeout_s
    for iteration in range(start + 1, t.iters + 1):
        first = iteration == start + 1
        budget = t.startup_timeout_s if first else t.fault_timeout_s + 2 * slowest
        with faults.phase(f"iteration {iteration} (forward/backward, gradient reduction, optimizer step)", budget):
            injector.start_iteration(iteration)
            t0 = time.perf_counter()
            out = train_step(model, optimizer, scheduler, iterators, n_micro, t.micro_batch_size,
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
            skipped_now = {}
            for i, reason in enumerate(skip_reasons):  # cumulative skipped samples by reason
                skipped_now[reason] = int(stats[2 + 2 * n + i])
                skipped_total[reason] += skipped_now[reason]
                record[f"skipped_{reason}"] = skipped_total[reason]
            faults.note(f"iteration {iteration}: metrics (all-reduce)")
            record.update(flops.step_metrics(cfg, counter, step_time, peak_tflops))  # collective, every rank
            if vcfg is not None and (iteration % t.eval_interval == 0 or iteration == t.iters):
                faults.note(f"iteration {iteration}: validation (forward-only over data.valid_sources)")
                record.update(validate_loss(vcfg, model, chunks, n_micro))
            records.append(record)
            if iteration % t.log_interval == 0 or iteration == t.iters:
                metrics.log(record, total=t.iters)
            monitor.check(iteration, int(tokens), skipped_now)  # collective when it raises
            if on_iteration is not None:
                on_iteration(iteration, model, out)
            faults.note(f"iteration {iteration}: SIGTERM agreement (all-reduce)")
            stop = (preemption.should_stop() if ck.dir else False) or iteration == t.exit_interval
            slowest = max(slowest, time.perf_counter() - t0) if not first else slowest
        if first:  # past kernel compilation and warm-up: peers now answer within fault_timeout_s
            collective_s = t.fault_timeout_s
            faults.set_collective_timeout(collective_s)
        if ck.dir and (stop or (ck.interval and iteration % ck.interval == 0) or iteration == t.iters):
            with faults.phase(f"checkpoint save of iteration {iteration}", ck.timeout_s), \
                    faults.collective_timeout(ck.timeout_s, restore=collective_s), injector.saving(iteration):
                sync_params(model, cfg)
                t_save = time.perf_counter()
                saved = checkpoint.save(ck.dir, model, optimizer, scheduler, iteration, None if replaced else ck.keep,
                                        fingerprint=fingerprint, tokenizer=cfg.data.tokenizer, lora_base=lora_base,
                                        extra_files=[os.path.join(t.run_dir, "config.yaml")])
                if replaced and rank0:
                    old = [checkpoint.iter_dirname(i) for i in replaced if i != iteration]
                    for name in old:
                        shutil.rmtree(os.path.join(ck.dir, name), ignore_errors=True)
                    print(f"checkpoint.overwrite=true: removed the previous run's {len(old)} checkpoint(s) from "
                          f"{ck.dir}", flush=True)
                replaced = []
                if rank0:
                    print(f"saved {saved} in {time.perf_counter() - t_save:.1f} s", flush=True)
        if stop:
            preempted = iteration != t.exit_interval and iteration < t.iters
            if rank0:
                print(f"{'preempted (SIGTERM)' if preempted else 'stopping'}: stopped after iteration {iteration}"
                      + (f"; saved to {ck.dir}" if ck.dir else ""), flush=True)
                if preempted:  # for job scripts (torchrun turns exit codes into 1): requeue me
                    with open(os.path.join(t.run_dir, PREEMPTED_MARKER), "w") as f:
                        f.write(f"{iteration}\n")
            records.preempted = preempted
            break
    with faults.phase("final parameter sync", t.fault_timeout_s + 2 * slowest):
        sync_params(model, cfg)
    metrics.close()
    if records.preempted:  # saved, past the last collective: a SIGTERM now (srun or torchrun ending us) -> exit 75
        preemption.saved()
    return records


def main(argv=None) -> int:
    """The command line. A failure on any rank ends this process within a bounded time with a non-zero status
    (see training/faults.py): it never returns then, it exits (os._exit), so that nothing waits on a dead peer or
    on data-loader workers that ignore SIGTERM."""
    from megallava.training import faults

    argv = sys.argv[1:] if argv is None else argv
    # Whole lines only: under a launcher stdout is a pipe shared with stderr and the other ranks, and a block-
    # buffered stdout flushes mid-line, so a rank's labelled error line could be glued onto half a log line.
    if hasattr(sys.stdout, "reconfigure"):  # not under pytest's capture
        sys.stdout.reconfigure(line_buffering=True)
    env = launch_env()
    faults.set_rank(env.rank)
    if env.rank != 0:  # library warnings come once, from rank 0; errors still come from the rank that failed
        import warnings

        warnings.simplefilter("ignore")
    try:
        cfg = load_and_validate(argv, env)
    except C.ConfigError as err:
        # Every rank validates the same config; one prints. No traceback: the message names each fix.
        if env.rank == 0:
            print(f"megallava.train: {err}", file=sys.stderr)
        return 2
    faults.start_watchdog(env.rank, backstop=True)
    try:
        records = run(cfg, env)
        if env.rank == 0:
            print(summary(cfg, records), flush=True)
        with faults.phase("shutdown (destroying process groups)", cfg.train.fault_timeout_s):
            if torch.distributed.is_initialized():
                shutdown()
    except BaseException as err:  # noqa: BLE001 - every failure ends the process the same bounded way
        code = faults.report(err, env.rank, faults.failed_phase())
        if os.environ.get("TORCHELASTIC_ERROR_FILE") and not faults.lost_peer(err):
            try:  # torchrun's failure summary then shows this rank's error, not "To enable traceback see ..."
                from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
                ErrorHandler().record_exception(err)
            except Exception:  # noqa: BLE001 - never let the report stop the exit
                pass
        faults.hard_exit(code)
    faults.stop_watchdog()
    if records.preempted:
        # os._exit, not the interpreter's shutdown: that resets signal handlers to their defaults, and the SIGTERM
        # that srun --kill-on-bad-exit / torchrun sends the other ranks once the first one has exited 75 then killed
        # them mid-exit (status 143). Everything is saved, closed and flushed by now.
        faults.hard_exit(PREEMPTED)
    return 0


def summary(cfg, records) -> str:
    """The end line: where the outputs are and what to run next."""
    t, ck = cfg.train, cfg.checkpoint
    last = records[-1] if records else None
    lines = [f"done: {len(records)} iterations" + (f", last loss {last['loss']:.4f}" if last else "") +
             f"; metrics {t.run_dir}/metrics.jsonl, TensorBoard {t.run_dir}/tb, config {t.run_dir}/config.yaml"]
    if ck.dir:
        lines.append(f"checkpoints in {ck.dir}; export: python tools/convert_checkpoint.py megatron-to-hf --input "
                     f"{ck.dir} --output OUT_DIR" + (" --merge-lora" if cfg.lora.rank else "") +
                     f"; chat: python -m megallava.generate --checkpoint {ck.dir} --prompt '...'")
    if records.preempted:
        lines.append(f"preempted: exit status {PREEMPTED}; resume with checkpoint.load=auto")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
