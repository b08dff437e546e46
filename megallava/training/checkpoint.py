"""Checkpoints on megatron dist_checkpointing: model, optimizer, LR scheduler, iteration, RNG and data position.

Layout of ``checkpoint.dir``::

    iter_0000010/          one complete checkpoint (dist_checkpointing format, loadable at any TP/PP/DP)
    iter_0000020/
        __<rank>_<n>.distcp, .metadata, common.pt, metadata.json    dist_checkpointing's files
        fingerprint.json   the model definition, tensor shapes and tokenizer hash (training/fingerprint.py)
        tokenizer/         a copy of data.tokenizer (when set), for export without the training data
        integrity.json     size and CRC32 of every other file, written last (training/integrity.py)
    latest                 text file: "iter_0000020", replaced atomically after the directory is complete

A save writes ``iter_N.partial/`` and renames it only after every rank finished, then replaces ``latest``. A crash or
SIGKILL mid-save leaves at most a ``.partial`` directory, which is never loaded and is removed by the next save (or
at once by the rank whose save failed). A load verifies the files against ``integrity.json`` first and refuses a
damaged or incomplete checkpoint naming each file (``checkpoint.fallback=true``: the newest intact one instead, with
a loud warning), then refuses a checkpoint of a different model or tokenizer naming both values.
The data position is the number of consumed global batches (= iteration): the loaders are pure functions of
(seed, data, global batch index), so a resumed run sees exactly the samples an uninterrupted one would.
"""
import os
import queue
import random
import shutil
import sys
from functools import partial
from typing import Sequence, Dict, List, Optional, Tuple

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import filesystem_async, torch as mcore_torch_strategy

from megallava.model.init import unwrap
from megallava.training import faults, fingerprint as fingerprint_mod, integrity

LATEST = "latest"
FORMAT_VERSION = 1


class InProcessWriter(filesystem_async.FileSystemWriterAsync):
    """megatron's torch_dist writer, but writing in the calling process.

    The stock writer forks one process per file bucket and collects results through a `spawn` multiprocessing
    Manager, started on the first save (~13 s on our CPU machines) and impossible in a daemonic process. Our saves
    are synchronous, so the workers buy nothing; each rank writes its own files, still in parallel across ranks.
    """

    def prepare_write_data(self, plan, planner):
        filesystem_async._results_queue = filesystem_async._results_queue or queue.Queue()
        super().prepare_write_data(plan, planner)

    def get_save_function_and_args(self):
        if not self.write_buckets:
            return None, None, []
        transforms = [self.transforms] if hasattr(self, "transforms") else []

        def write_all(rank, buckets, results_queue):
            results = {}
            for i, bucket in enumerate(buckets):
                local, done = queue.Queue(), queue.Queue()
                done.put(i)
                self.write_preloaded_data(transforms, i, bucket, local, done, True)
                idx, out = local.get()
                if isinstance(out, Exception):
                    results_queue.put(out)
                    return
                results[idx] = out
                _WRITTEN.append(bucket[0])  # checksummed by checkpoint.save
            results_queue.put(results)

        # The stock staging step copies GPU tensors to host memory before writing (a no-op on CPU).
        stage = partial(self.preload_tensors, self.write_buckets, True)
        return write_all, stage, [torch.distributed.get_rank(), self.write_buckets, self.results_queue]


mcore_torch_strategy.FileSystemWriterAsync = InProcessWriter
_WRITTEN: List[str] = []  # the files this rank wrote in the current save


def _set_states_present(self, model_param, tensors):
    """megatron-core 0.16 copies every key of the live Adam state, but the 'fully_reshardable' format stores only
    param / exp_avg / exp_avg_sq: torch's own Adam (no apex / TransformerEngine) also keeps a per-param 'step',
    which megatron restores from the param groups instead. Copy the keys the checkpoint has."""
    group_index, group_order = self.model_param_group_index_map[model_param]
    if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        return _original_set_states(self, model_param, tensors)
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    destinations = {"param": main_param, **self.optimizer.state[main_param]}
    for key, value in tensors.items():
        destinations[key].copy_(value)


from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as _DistOpt  # noqa: E402

_original_set_states = _DistOpt._set_main_param_and_optimizer_states
_DistOpt._set_main_param_and_optimizer_states = _set_states_present


def _state_dict_any_rank(self):
    """megatron-core 0.16 asserts that torch Adam's per-param 'step' has one value on this rank; a rank that trains
    nothing (a later pipeline stage in stage 1, where only the projector on stage 0 trains) has no state and failed
    every save there. Such a rank reports step 0: only rank 0's copy of this common state is saved, and on load an
    empty rank has no parameter to step. It reports the step the others report (the scheduler's update count,
    ``_STEP``), so that all ranks' common state agrees."""
    inner = getattr(self, "optimizer", None)
    if inner is None or inner.state or not isinstance(inner, torch.optim.Optimizer):
        return _original_state_dict(self)
    inner.state["_megallava_no_params"] = {"step": torch.tensor(float(_STEP[0]))}
    try:
        return _original_state_dict(self)
    finally:
        del inner.state["_megallava_no_params"]


_STEP = [0]
_original_state_dict = _DistOpt.state_dict
_DistOpt.state_dict = _state_dict_any_rank


def iter_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _layout() -> Dict[str, int]:
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "vpp": parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
            "dp": parallel_state.get_data_parallel_world_size()}


def _rng_state() -> Dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: Dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _materialise_optimizer_state(optimizer) -> None:
    """torch's Adam creates its state (and the 'step' the DistributedOptimizer's state_dict reads) lazily at the
    first step; a fresh optimizer must have it before a checkpoint can be loaded into it. The dummy values are
    overwritten in place by the load."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _unshare_adam_steps(optimizer) -> None:
    """megatron-core 0.16 restores torch Adam's per-param 'step' as ONE tensor shared by every param; Adam then
    increments it in place once per param per step, so the bias correction drifts after a resume. Give each
    param its own copy."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def _without_extra_state(model_sd: Dict) -> Dict:
    """megatron's linear layers add ``*._extra_state`` objects (TransformerEngine's FP8 metadata; None for our local
    layers): neither saved nor loaded, so converted checkpoints need not carry them."""
    return {k: v for k, v in model_sd.items() if not k.endswith("._extra_state")}


def _drop_empty_param_state(opt_sd):
    """A rank that trains nothing has an empty ``param_state`` (its distributed-optimizer shard): drop it, so it is
    neither saved as a rank-specific "common" entry (megatron then warns that common states differ) nor looked for
    on load."""
    from megallava.training.fingerprint import sharded_shapes

    parts = opt_sd.values() if isinstance(opt_sd, dict) and "param_state" not in opt_sd else [opt_sd]
    for part in parts:
        if isinstance(part, dict) and "param_state" in part and not sharded_shapes({"p": part["param_state"]}):
            del part["param_state"]
    return opt_sd


def _trainable(entry) -> bool:
    data = getattr(entry, "data", None)
    return bool(getattr(data, "requires_grad", False))


def _sharded_state_dict(model: List, optimizer, scheduler, iteration: int, with_optimizer: bool,
                        is_loading: bool, keep=None) -> Dict:
    """``keep(entry)``: which model entries to include (default: all)."""
    metadata = {"distrib_optim_sharding_type": "fully_reshardable"}
    sd = {"format_version": FORMAT_VERSION, "iteration": iteration, "layout": _layout()}
    for i, m in enumerate(model):  # keys of the bare chunk: the DDP wrapper would add "module."
        part = _without_extra_state(unwrap(m).sharded_state_dict(metadata=metadata))
        sd[f"model{i}" if len(model) > 1 else "model"] = {k: v for k, v in part.items() if keep is None or keep(v)}
    if with_optimizer:
        model_sd = {k: v for k, v in sd.items() if k.startswith("model")}
        _STEP[0] = scheduler.num_steps
        sd["optimizer"] = _drop_empty_param_state(
            optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata))
        sd["scheduler"] = scheduler.state_dict()
    # RNG differs per (pp, tp) position; DP replicas hold the same state, so dp rank 0 writes it.
    pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    sd["rng"] = ShardedObject("rng_state", _rng_state(), (_layout()["pp"], _layout()["tp"]), (pp, tp),
                              replica_id=parallel_state.get_data_parallel_rank())
    return sd


def _barrier():
    torch.distributed.barrier()


class CheckpointError(faults.RunError):
    """A checkpoint that cannot be saved or loaded; the message names the file, what is wrong and the fix."""

    def __init__(self, message: str, collective: bool = False):
        super().__init__(message)
        self.collective = collective

    def __reduce__(self):
        return CheckpointError, (str(self), self.collective)


def remove_partial(ckpt_dir: str) -> None:
    if torch.distributed.get_rank() == 0 and os.path.isdir(ckpt_dir):
        for name in os.listdir(ckpt_dir):
            if name.endswith(".partial"):
                shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def complete_iterations(ckpt_dir: str) -> List[int]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n[5:]) for n in os.listdir(ckpt_dir) if n.startswith("iter_") and n[5:].isdigit())


def _gather(obj) -> list:
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _latest_name(ckpt_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(ckpt_dir, LATEST)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def save(ckpt_dir: str, model: List, optimizer, scheduler, iteration: int, keep: Optional[int] = None,
         fingerprint: Optional[Dict] = None, tokenizer: Optional[str] = None, lora_base: Optional[str] = None,
         extra_files: Sequence[str] = ()) -> str:
    """Save on all ranks (collective). Returns the final directory.

    ``lora_base``: the checkpoint a LoRA run's frozen weights came from; then only the trained parameters (adapters,
    projector) and the optimizer are written, plus that path (a LoRA-64 33B checkpoint is ~1 GB instead of ~66 GB;
    ``load`` reads the frozen weights from the base again). ``extra_files`` (rank 0) are copied into the iteration
    directory (the run's config.yaml, so the checkpoint alone describes the model for export and generation).

    Order: rank 0 creates ``iter_N.partial/``; every rank writes its shards and checksums them; rank 0 adds the
    fingerprint and the tokenizer copy, writes the integrity manifest last, renames the directory and replaces
    ``latest``. On any failure this rank removes the partial directory (it is never loaded) and raises; a full
    disk raises a CheckpointError saying so."""
    final = os.path.join(ckpt_dir, iter_dirname(iteration))
    partial = final + ".partial"
    rank = torch.distributed.get_rank()
    what = f"checkpoint save of iteration {iteration}"
    try:
        faults.note(f"{what}: creating {partial}")
        if rank == 0:
            os.makedirs(ckpt_dir, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
        _barrier()
        sd = _sharded_state_dict(model, optimizer, scheduler, iteration, with_optimizer=True, is_loading=False,
                                 keep=_trainable if lora_base else None)
        if lora_base:
            sd["lora_base"] = os.path.abspath(lora_base)
            sd["lora_base_identity"] = integrity.identity(lora_base)
        if hf_source.get():
            sd["hf_source"] = hf_source.get()
        sd["integrity"] = integrity.MANIFEST  # a checkpoint that says this and lacks the manifest is incomplete
        faults.note(f"{what}: writing shards (dist_checkpointing.save)")
        _WRITTEN.clear()
        dist_checkpointing.save(sd, partial)
        faults.note(f"{what}: checksumming this rank's files")
        entries = integrity.digests(partial, list(_WRITTEN))
        if rank == 0:
            for path in extra_files:
                if os.path.isfile(path):
                    shutil.copy2(path, os.path.join(partial, os.path.basename(path)))
            if tokenizer:
                fingerprint_mod.copy_tokenizer(tokenizer, partial)
            if fingerprint is not None:
                shapes = fingerprint_mod.saved_shapes(partial)
                fingerprint_mod.write(partial, fingerprint, {k: list(v) for k, v in sorted(shapes.items())
                                                             if not k.startswith(("optimizer.", "rng_state"))})
        faults.note(f"{what}: gathering checksums")
        gathered = _gather(entries)
        if rank == 0:
            merged = {k: v for part in gathered for k, v in part.items()}
            integrity.write_manifest(partial, merged)  # checksums whatever no rank listed (common files, extras)
            shutil.rmtree(final, ignore_errors=True)  # re-saving the same iteration replaces it
            os.replace(partial, final)
            _write_latest(ckpt_dir, iter_dirname(iteration))
            _prune(ckpt_dir, keep)
            remove_partial(ckpt_dir)
        faults.note(f"{what}: waiting for rank 0 to publish it")
        _barrier()
    except BaseException as err:
        free = shutil.disk_usage(ckpt_dir).free if os.path.isdir(ckpt_dir) else None
        shutil.rmtree(partial, ignore_errors=True)  # frees the space now; never loaded anyway
        latest = _latest_name(ckpt_dir)
        after = (f"The incomplete {os.path.basename(partial)} was removed; " +
                 (f"'{LATEST}' still names {latest}, which is intact." if latest else
                  f"there is no earlier checkpoint in {ckpt_dir}."))
        ranks = _failed_ranks(err)
        on = f" on rank {', '.join(map(str, ranks))}" if ranks and ranks != [rank] else ""
        if faults.disk_full(err, free):
            raise CheckpointError(
                f"no space left on device{on} while saving iteration {iteration} to {ckpt_dir} "
                f"({(free or 0) / 2**20:.1f} MiB free here when it failed): free space, lower checkpoint.keep or set "
                f"checkpoint.dir to a larger filesystem. {after}") from err
        if ranks == []:  # torch DCP reports every rank's write failure on the coordinator only
            raise CheckpointError(f"saving iteration {iteration} to {ckpt_dir} failed on some rank; rank 0's error "
                                  f"names the cause. {after}") from err
        raise
    return final


def _failed_ranks(err: BaseException) -> Optional[List[int]]:
    """The ranks a torch.distributed.checkpoint CheckpointException in ``err``'s chain blames, or None."""
    while err is not None:
        if isinstance(getattr(err, "failures", None), dict):
            return sorted(err.failures)
        err = err.__cause__ or err.__context__
    return None


def _write_latest(ckpt_dir: str, name: str) -> None:
    tmp = os.path.join(ckpt_dir, f".{LATEST}.tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ckpt_dir, LATEST))
    dir_fd = os.open(ckpt_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a crash
    finally:
        os.close(dir_fd)


def _prune(ckpt_dir: str, keep: Optional[int]) -> None:
    if not keep:
        return
    for iteration in complete_iterations(ckpt_dir)[:-keep]:
        shutil.rmtree(os.path.join(ckpt_dir, iter_dirname(iteration)), ignore_errors=True)


def resolve(path: str) -> str:
    """``path`` is a checkpoint root (with ``latest``) or one ``iter_N`` directory."""
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        name = _latest_name(path)
        if not name or not os.path.isdir(os.path.join(path, name)):
            raise CheckpointError(f"{latest} names {name!r}, which is not a directory in {path}: restore it, point "
                                  f"checkpoint.load at an iter_N directory, or set checkpoint.fallback=true",
                                  collective=True)
        return os.path.join(path, name)
    if os.path.isfile(os.path.join(path, "metadata.json")) or os.path.isfile(os.path.join(path, integrity.MANIFEST)):
        return path
    raise CheckpointError(f"checkpoint.load={path}: no '{LATEST}' file and not a checkpoint directory "
                          f"(expected {path}/{LATEST} or {path}/metadata.json)", collective=True)


def _candidates(path: str, fallback: bool) -> List[str]:
    """The checkpoint to load, then (with ``fallback``, for a root with ``latest``) the older complete ones."""
    if not fallback or not os.path.isfile(os.path.join(path, LATEST)):
        return [resolve(path)]
    name = _latest_name(path)
    first = [os.path.join(path, name)] if name else []
    older = [os.path.join(path, iter_dirname(i)) for i in reversed(complete_iterations(path))]
    return first + [d for d in older if d not in first and (not name or os.path.basename(d) < name)]


def _local_problems(ckpt: str, rank: int, world: int) -> Tuple[List[str], bool]:
    """(this rank's share of the problems of ``ckpt``, whether it has a manifest at all)."""
    if not os.path.isdir(ckpt):
        return [f"{ckpt} does not exist"], True
    try:
        manifest = integrity.read_manifest(ckpt)
    except ValueError as e:
        return [str(e)], True
    if manifest is None:
        common_path = os.path.join(ckpt, "common.pt")
        if not os.path.isfile(common_path):
            return [f"{common_path} is missing (and there is no {integrity.MANIFEST}: the save never completed)"], True
        try:
            common = torch.load(common_path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is damaged
            return [f"{common_path} is unreadable ({type(e).__name__}: {e})"], True
        if isinstance(common, dict) and common.get("integrity"):
            return [f"{os.path.join(ckpt, integrity.MANIFEST)} is missing: the checkpoint was written with "
                    f"checksums but has lost them (a partial copy?)"], True
        return [], False  # converted or older checkpoint: nothing to verify against
    return integrity.check(ckpt, integrity.share(manifest, rank, world)), True


def verify(ckpt: str) -> List[str]:
    """Collective: every problem of ``ckpt`` (missing files, wrong sizes, wrong checksums), the same on every rank;
    each rank checks a round-robin share of the files (see training/integrity.py for the cost)."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    problems, has_manifest = _local_problems(ckpt, rank, world)
    gathered = _gather((problems, has_manifest))
    if not all(h for _, h in gathered) and rank == 0:
        print(f"warning: {ckpt} has no {integrity.MANIFEST} (converted or written by an older megallava): its files "
              f"cannot be verified before loading", file=sys.stderr, flush=True)
    return sorted({p for ps, _ in gathered for p in ps})


def select(path: str, fallback: bool = False) -> str:
    """Collective: the checkpoint to load from ``path``: the one ``path`` names if it is intact; with ``fallback``
    the newest intact one (loudly), else a CheckpointError naming each damaged file and the fix."""
    try:
        candidates = _candidates(path, fallback)
    except CheckpointError:
        if not fallback:
            raise
        candidates = [os.path.join(path, iter_dirname(i)) for i in reversed(complete_iterations(path))]
    rejected = []
    for ckpt in candidates:
        faults.note(f"verifying checkpoint {ckpt}")
        problems = verify(ckpt)
        if not problems:
            if rejected and torch.distributed.get_rank() == 0:
                print("WARNING: checkpoint.fallback=true: " + "; ".join(
                    f"{c} is damaged or incomplete ({'; '.join(p)})" for c, p in rejected) +
                    f". LOADING THE OLDER {ckpt} INSTEAD: the iterations after it will be trained again.",
                    file=sys.stderr, flush=True)
            return ckpt
        if not fallback:
            raise CheckpointError(f"checkpoint {ckpt} is damaged or incomplete:\n" +
                                  "".join(f"  - {p}\n" for p in problems) +
                                  f"Restore these files, load an older checkpoint (checkpoint.load={path}/iter_N), or "
                                  f"set checkpoint.fallback=true to load the newest intact one.", collective=True)
        rejected.append((ckpt, problems))
    raise CheckpointError(f"no intact checkpoint in {path}: " + "; ".join(
        f"{c}: {'; '.join(p)}" for c, p in rejected) if rejected else f"no checkpoint in {path}", collective=True)


def _refuse(ckpt: str, problems: List[str], weights_only: bool) -> None:
    how = "use a model of the checkpoint's shape" if weights_only else "train with the checkpoint's settings"
    raise CheckpointError(f"checkpoint {ckpt} does not match this run:\n" + "".join(f"  - {p}\n" for p in problems) +
                          f"Fix: {how}, or start from scratch (no checkpoint.load)" +
                          ("" if weights_only else "; a weights-only load (checkpoint.load_optimizer=false) accepts a "
                           "new tokenizer or non-shape settings with a warning"), collective=True)


def check_fingerprint(ckpt: str, fingerprint: Dict, load_optimizer: bool = True) -> None:
    """Refuse ``ckpt`` if its fingerprint differs from this run's (``fingerprint.model_fingerprint(cfg)``): every
    difference on a resume; vocab_size / image_token_id on a weights-only load, which only warns about the rest.
    Needs no model (run it before building one); every rank reads the same files, so all decide alike."""
    saved = fingerprint_mod.read(ckpt)
    if saved is None:
        return  # converted or older checkpoint: the tensor shapes are still checked at load
    weights_only = not load_optimizer or bool(dist_checkpointing.load_common_state_dict(ckpt).get("weights_only"))
    errors, warnings = fingerprint_mod.compare(saved, fingerprint, weights_only)
    if warnings and torch.distributed.get_rank() == 0:
        print(f"warning: loading weights only from {ckpt}, which was trained with a different setup:\n" +
              "".join(f"  - {w}\n" for w in warnings), file=sys.stderr, flush=True)
    if errors:
        _refuse(ckpt, errors, weights_only)


def _check_shapes(ckpt: str, sd: Dict, weights_only: bool) -> None:
    """Collective: refuse a checkpoint whose tensors do not have this model's global shapes (each rank checks its
    own tensors against the checkpoint's DCP metadata; the problems are gathered)."""
    model_sd = {k: v for k, v in sd.items() if k.startswith("model")}
    mine = fingerprint_mod.shape_problems(fingerprint_mod.sharded_shapes(model_sd), fingerprint_mod.saved_shapes(ckpt))
    problems = list(dict.fromkeys(p for ps in _gather(mine) for p in ps))
    if problems:
        _refuse(ckpt, problems, weights_only)


def _is_adapter(key: str) -> bool:
    return key.endswith((".lora_a", ".lora_b"))


def load(path: str, model: List, optimizer, scheduler, load_optimizer: bool = True,
         fingerprint: Optional[Dict] = None, fallback: bool = False, verified: bool = False,
         finetune: bool = False, only: Optional[Tuple[str, ...]] = None) -> int:
    """Load a checkpoint saved at any layout; returns the iteration to resume after. Optimizer, scheduler and RNG
    state are restored when ``load_optimizer``; RNG only when the layout is unchanged (it is per TP/PP rank).
    A weights-only checkpoint (``"weights_only": True`` in its common state, e.g. from tools/convert_checkpoint.py)
    loads its weights only and starts at iteration 0, whatever ``load_optimizer`` says.

    Before anything is read into the model: the files are verified against the integrity manifest (``select``:
    damaged -> CheckpointError, or with ``fallback`` the newest intact checkpoint), the fingerprint is compared with
    this run's (``fingerprint``: ``fingerprint.model_fingerprint(cfg)``), and the tensor shapes with the model's.
    ``verified``: ``path`` is the iter directory ``select`` returned and ``check_fingerprint`` passed (the trainer
    does both before building the model).

    ``finetune``: weights only, and the run starts at iteration 0 (returns 0). ``only``: load just the model
    entries whose names start with one of these prefixes (e.g. ("projector.",)), weights only. LoRA: adapters
    missing from a checkpoint (a base model) keep their initialisation (B = 0) on a weights-only load; a LoRA
    checkpoint that holds only the trained parameters (saved with ``lora_base``) first loads the frozen weights from
    that base."""
    ckpt = path if verified else select(path, fallback)
    if fingerprint is not None and not verified:
        check_fingerprint(ckpt, fingerprint, load_optimizer and not finetune and not only)
    faults.note(f"loading checkpoint {ckpt}")
    common = dist_checkpointing.load_common_state_dict(ckpt)
    weights_only = bool(common.get("weights_only", False)) or finetune or bool(only)
    if weights_only:
        load_optimizer = False
    if common.get("hf_source") and not only:
        hf_source.set(common["hf_source"])
    base = common.get("lora_base")
    if base and not only:
        if not os.path.exists(base):
            raise CheckpointError(f"LoRA checkpoint {ckpt} holds only the trained parameters; its frozen weights come "
                                  f"from {base}, which does not exist: restore it (the path is in its common.pt)",
                                  collective=True)
        want, have = common.get("lora_base_identity"), integrity.identity(base)
        if want is not None and want != have:
            raise CheckpointError(f"LoRA checkpoint {ckpt} was trained on the frozen weights in {base} (identity "
                                  f"{want}), but that directory now holds other files (identity {have}): the "
                                  f"adapters belong to the old weights. Restore the original base at that path, or "
                                  f"train new adapters from this base (checkpoint.load={base} "
                                  f"checkpoint.finetune=true)", collective=True)
        faults.note(f"loading the frozen base weights of {ckpt} from {base}")
        load(base, model, None, None, load_optimizer=False)
    saved_layout, iteration = common.get("layout"), 0 if weights_only else int(common["iteration"])
    same_layout = not weights_only and saved_layout == _layout()
    if load_optimizer:
        _materialise_optimizer_state(optimizer)
    sd = _sharded_state_dict(model, optimizer, scheduler, iteration, with_optimizer=load_optimizer,
                             is_loading=True)
    present = set(fingerprint_mod.saved_shapes(ckpt))
    skipped = set()
    for part, entries in [(k, v) for k, v in sd.items() if k.startswith("model")]:
        for local, entry in list(entries.items()):
            absent = not set(fingerprint_mod.sharded_shapes({local: entry})) <= present
            if (only and not local.startswith(only)) or (absent and base and not _trainable(entry)) or \
                    (absent and not load_optimizer and _is_adapter(local)):
                del entries[local]
                skipped.add(local)
    _check_shapes(ckpt, sd, weights_only=not load_optimizer)
    if not same_layout:
        del sd["rng"]
    try:
        loaded = dist_checkpointing.load(sd, ckpt)
    except Exception as err:  # noqa: BLE001 - re-raised with the fix named
        if load_optimizer:
            why = (f"saved at {saved_layout}, now {_layout()}" if not same_layout else
                   "it trained other parameters than this run does, e.g. stage 1 -> stage 2, or LoRA <-> full")
            raise CheckpointError(
                f"could not load the optimizer state of {ckpt} ({why}): {str(err).splitlines()[-1][:300]}. "
                f"Start a new stage from its weights with checkpoint.finetune=true, or resume with weights only: "
                f"checkpoint.load_optimizer=false", collective=True) from err
        raise
    for i, m in enumerate(model):
        result = unwrap(m).load_state_dict(loaded[f"model{i}" if len(model) > 1 else "model"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("._extra_state") and k not in skipped]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"checkpoint {ckpt} does not match the model: missing {missing}, "
                               f"unexpected {list(result.unexpected_keys)}")
    if load_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
        scheduler.load_state_dict(loaded["scheduler"])
        if same_layout:
            _set_rng_state(loaded["rng"])
    return 0 if finetune else iteration


def saved_iteration(ckpt: str) -> int:
    """The iteration a checkpoint was saved after (0 for a weights-only, e.g. converted, checkpoint)."""
    common = dist_checkpointing.load_common_state_dict(ckpt)
    return 0 if common.get("weights_only") else int(common.get("iteration", 0))


def lora_base_for(ckpt: Optional[str]) -> Optional[str]:
    """Where a LoRA run's frozen weights come from, for its saves: the loaded checkpoint's own ``lora_base``, or
    the loaded checkpoint itself when it holds no adapters (a base model); None (save everything) otherwise."""
    if ckpt is None:
        return None
    common = dist_checkpointing.load_common_state_dict(ckpt)
    if common.get("lora_base"):
        return common["lora_base"]
    return None if any(_is_adapter(k) for k in fingerprint_mod.saved_shapes(ckpt)) else os.path.abspath(ckpt)


class _HFSource:
    """The HF conversion a model descends from (``hf_to_megatron`` records it), carried from checkpoint to checkpoint
    so that megatron-to-hf can write back what megallava does not build."""
    value: Optional[str] = None

    def get(self) -> Optional[str]:
        return self.value

    def set(self, value: Optional[str]) -> None:
        self.value = value


hf_source = _HFSource()
