"""The only adaptation of megatron-core to CPU + gloo. A no-op when CUDA is available.

megatron-core 0.16 assumes CUDA in a handful of places: tensors created with ``device="cuda"`` or
``torch.cuda.current_device()`` (schedules' loss accumulators, p2p receive buffers, grad buffers, optimizer and
grad-clip scalars, sequence-parallel gather buffers), ``.cuda()`` copies, ``torch.cuda.synchronize()``, dtype checks
written as ``param.type() == 'torch.cuda.FloatTensor'``, and the CUDA RNG tracker that attention always forks.

Rather than rewriting every operator through a TorchFunctionMode (measured ~25% slower per step), we redirect only
the few entry points those call sites use: the tensor factories, ``torch.cuda.current_device``, ``Tensor.cuda``,
``Tensor.type``, the RNG tracker and the generator state recompute saves. Hot-path ops (matmuls, activations) are untouched.
"""
from __future__ import annotations

import contextlib
import functools

import torch

_INSTALLED = False
_CPU = torch.device("cpu")


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return _CPU  # an int device means a CUDA ordinal in megatron's code
    dev = torch.device(device)
    return _CPU if dev.type == "cuda" else dev


def _redirect_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapper


def _tensor_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    return self


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _wrap_tensor_type(orig):
    # megatron's optimizer and grad clipping assert e.g. param.type() == 'torch.cuda.FloatTensor'.
    @functools.wraps(orig)
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = orig(self)
            return _CUDA_TYPE_NAMES.get(name, name)
        if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
            dtype = dtype.replace("torch.cuda.", "torch.")
        return orig(self, dtype, non_blocking, **kwargs)

    return type_


class CpuRNGStatesTracker:
    """Stand-in for megatron's CudaRNGStatesTracker that forks the CPU generator.

    Named states (e.g. 'model-parallel-rng') give tensor-parallel ranks different dropout masks while the default
    generator stays identical across them, as on GPU.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def install() -> None:
    """Install the CPU redirections (idempotent). Does nothing when CUDA is available."""
    global _INSTALLED
    if _INSTALLED or not on_cpu():
        return
    _INSTALLED = True
    for name in ("empty", "zeros", "ones", "full", "tensor", "arange"):
        setattr(torch, name, _redirect_factory(getattr(torch, name)))
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    torch.Tensor.cuda = _tensor_cuda
    torch.Tensor.type = _wrap_tensor_type(torch.Tensor.type)

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mcore_random.initialize_rng_tracker(force_reset=True)
    # Activation recompute (CheckpointFunction) saves and restores the "CUDA" generator next to the CPU one: on CPU
    # both are the default generator.
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    # model_parallel_cuda_manual_seed seeds the default generator through torch.cuda.manual_seed.
    torch.cuda.manual_seed = torch.manual_seed


def device() -> torch.device:
    return _CPU if on_cpu() else torch.device("cuda", torch.cuda.current_device())
