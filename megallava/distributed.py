"""Process-group setup from torchrun or SLURM, megatron parallel_state, and seeding."""
from __future__ import annotations

import os
import random
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch


@dataclass
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _first_slurm_host(nodelist: str) -> str:
    """'gpu[012-015,020],cpu1' -> 'gpu012' (what `scontrol show hostnames | head -1` prints)."""
    m = re.match(r"([^\[,]+)(\[([^\]]+)\])?", nodelist)
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def slurm_port(env) -> int:
    """A rendezvous port from the job id and the step id (SLURM_STEP_ID), so that two srun steps of one allocation,
    and two jobs sharing a node, do not collide; a requeued job (same id) gets its previous ports again."""
    job, step = int(env.get("SLURM_JOB_ID", 0)), int(env.get("SLURM_STEP_ID", 0) or 0)
    return 20000 + (job * 101 + step) % 30000


def launch_env(env=None) -> LaunchEnv:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else srun's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, else one rank."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
        port = int(env.get("MASTER_PORT") or slurm_port(env))
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         addr, port)
    return LaunchEnv(0, 1, 0, "127.0.0.1", 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(tp: int, pp: int, vpp: int | None, seed: int, env: LaunchEnv | None = None,
                     timeout_s: float = 600) -> LaunchEnv:
    """Init torch.distributed (NCCL on CUDA, gloo on CPU), megatron parallel_state and RNG seeds.

    ``timeout_s`` bounds every collective of every group (megatron's subgroups included): gloo raises after it, and
    NCCL, with ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` (set here unless the user set it), aborts the communicators and
    ends the process, instead of blocking forever on a dead or hung peer. (``TORCH_NCCL_BLOCKING_WAIT=1`` would
    raise in Python instead but makes every collective synchronous; we leave it off.) A peer that dies closes its
    gloo connections, so gloo ranks fail at once; NCCL ranks wait out the timeout. The trainer lowers the timeout
    to ``train.fault_timeout_s`` after the first iteration (training/faults.py)."""
    from megatron.core import parallel_state, tensor_parallel
    from megallava import cpu_compat

    env = env or launch_env()
    cpu_compat.install()
    if torch.cuda.is_available():
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        backend = "gloo"
    if not torch.distributed.is_initialized():
        if env.world_size == 1 and env.master_port == 0:
            store = torch.distributed.HashStore()
            torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1,
                                                 timeout=timedelta(seconds=timeout_s))
        else:
            torch.distributed.init_process_group(
                backend, init_method=f"tcp://{env.master_addr}:{env.master_port}", rank=env.rank,
                world_size=env.world_size, timeout=timedelta(seconds=timeout_s))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if pp > 1 else None,
        distributed_timeout_minutes=max(1, -(-int(timeout_s) // 60)))
    seed_everything(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return env


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
