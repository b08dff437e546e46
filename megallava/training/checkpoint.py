"""Checkpoints on megatron dist_checkpointing: model, optimizer, LR scheduler, iteration, RNG and data position.

Layout of ``checkpoint.dir``::

    iter_0000010/          one complete checkpoint (dist_checkpointing format, loadable at any TP/PP/DP)
    iter_0000020/
    latest                 text file: "iter_0000020", replaced atomically after the directory is complete

A save writes ``iter_N.partial/`` and renames it only after every rank finished, then replaces ``latest``. A crash or
SIGKILL mid-save leaves at most a ``.partial`` directory, which is never loaded and is removed by the next save.
The data position is the number of consumed global batches (= iteration): the loaders are pure functions of
(seed, data, global batch index), so a resumed run sees exactly the samples an uninterrupted one would.
"""
import os
import queue
import random
import shutil
from functools import partial
from typing import Dict, List, Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import filesystem_async, torch as mcore_torch_strategy

from megallava.model.init import unwrap

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
            results_queue.put(results)

        # The stock staging step copies GPU tensors to host memory before writing (a no-op on CPU).
        stage = partial(self.preload_tensors, self.write_buckets, True)
        return write_all, stage, [torch.distributed.get_rank(), self.write_buckets, self.results_queue]


mcore_torch_strategy.FileSystemWriterAsync = InProcessWriter


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


def _sharded_state_dict(model: List, optimizer, scheduler, iteration: int, with_optimizer: bool,
                        is_loading: bool) -> Dict:
    metadata = {"distrib_optim_sharding_type": "fully_reshardable"}
    sd = {"format_version": FORMAT_VERSION, "iteration": iteration, "layout": _layout()}
    for i, m in enumerate(model):  # keys of the bare chunk: the DDP wrapper would add "module."
        sd[f"model{i}" if len(model) > 1 else "model"] = _without_extra_state(
            unwrap(m).sharded_state_dict(metadata=metadata))
    if with_optimizer:
        model_sd = {k: v for k, v in sd.items() if k.startswith("model")}
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
        sd["scheduler"] = scheduler.state_dict()
    # RNG differs per (pp, tp) position; DP replicas hold the same state, so dp rank 0 writes it.
    pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    sd["rng"] = ShardedObject("rng_state", _rng_state(), (_layout()["pp"], _layout()["tp"]), (pp, tp),
                              replica_id=parallel_state.get_data_parallel_rank())
    return sd


def _barrier():
    torch.distributed.barrier()


def remove_partial(ckpt_dir: str) -> None:
    if torch.distributed.get_rank() == 0 and os.path.isdir(ckpt_dir):
        for name in os.listdir(ckpt_dir):
            if name.endswith(".partial"):
                shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def complete_iterations(ckpt_dir: str) -> List[int]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n[5:]) for n in os.listdir(ckpt_dir) if n.startswith("iter_") and n[5:].isdigit())


def save(ckpt_dir: str, model: List, optimizer, scheduler, iteration: int, keep: Optional[int] = None) -> str:
    """Save on all ranks (collective). Returns the final directory."""
    final = os.path.join(ckpt_dir, iter_dirname(iteration))
    partial = final + ".partial"
    if torch.distributed.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    _barrier()
    sd = _sharded_state_dict(model, optimizer, scheduler, iteration, with_optimizer=True, is_loading=False)
    dist_checkpointing.save(sd, partial)
    _barrier()
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)  # re-saving the same iteration replaces it
        os.replace(partial, final)
        _write_latest(ckpt_dir, iter_dirname(iteration))
        _prune(ckpt_dir, keep)
        remove_partial(ckpt_dir)
    _barrier()
    return final


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
        with open(latest) as f:
            return os.path.join(path, f.read().strip())
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    raise FileNotFoundError(f"checkpoint.load={path}: no '{LATEST}' file and not a checkpoint directory "
                            f"(expected {path}/{LATEST} or {path}/metadata.json)")


def load(path: str, model: List, optimizer, scheduler, load_optimizer: bool = True) -> int:
    """Load a checkpoint saved at any layout; returns the iteration to resume after. Optimizer, scheduler and RNG
    state are restored when ``load_optimizer``; RNG only when the layout is unchanged (it is per TP/PP rank).
    A weights-only checkpoint (``"weights_only": True`` in its common state, e.g. from tools/convert_checkpoint.py)
    loads its weights only and starts at iteration 0, whatever ``load_optimizer`` says."""
    ckpt = resolve(path)
    common = dist_checkpointing.load_common_state_dict(ckpt)
    weights_only = bool(common.get("weights_only", False))
    if weights_only:
        load_optimizer = False
    saved_layout, iteration = common.get("layout"), 0 if weights_only else int(common["iteration"])
    same_layout = not weights_only and saved_layout == _layout()
    if load_optimizer:
        _materialise_optimizer_state(optimizer)
    sd = _sharded_state_dict(model, optimizer, scheduler, iteration, with_optimizer=load_optimizer,
                             is_loading=True)
    if not same_layout:
        del sd["rng"]
    try:
        loaded = dist_checkpointing.load(sd, ckpt)
    except Exception as err:  # noqa: BLE001 - re-raised with the fix named
        if load_optimizer and not same_layout:
            raise RuntimeError(
                f"could not load optimizer state from {ckpt} (saved at {saved_layout}, now {_layout()}): {err}. "
                f"Resume with weights only: checkpoint.load_optimizer=false") from err
        raise
    for i, m in enumerate(model):
        result = unwrap(m).load_state_dict(loaded[f"model{i}" if len(model) > 1 else "model"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("._extra_state")]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"checkpoint {ckpt} does not match the model: missing {missing}, "
                               f"unexpected {list(result.unexpected_keys)}")
    if load_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
        scheduler.load_state_dict(loaded["scheduler"])
        if same_layout:
            _set_rng_state(loaded["rng"])
    return iteration
