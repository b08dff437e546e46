"""Layout planner: which TP x PP x VPP x DP x micro-batch x recompute layout of a LLaVA run fits on the GPUs, and
which is fastest. ``python -m megallava.plan --help`` (or ``tools/plan.py``); the model is in ``docs/planner.md``.

What it predicts, per GPU, for every candidate layout:

- **Parameters, gradients, optimizer states: exact.** Each pipeline stage's chunk is built at TP 1 on the meta
  device (nothing is allocated, even at 70B) from the same code the trainer runs (``LLaVAChunk``, LoRA/QLoRA
  included); tensor-parallel parameters (megatron's ``tensor_model_parallel`` / ``partition_dim`` attributes) are
  divided by tp exactly (the vocab rows as ``padded_vocab_size`` pads them at that tp). megatron's DDP grad buffer
  (params padded to 64 elements, buckets to lcm(dp, 128) under the distributed optimizer), its param buffer, the
  distributed optimizer's per-DP-rank shard (fp32 master copies of bf16 params, Adam moments, step counters) and
  QLoRA's NF4 bases (megallava.model.nf4: 0.5 byte + block statistics per weight) are simulated element by element,
  so the bytes equal what the trainer allocates (tests/test_plan.py checks every rank of TP2xPP2 and TP1xPP2xDP2).
- **Activations**: the saved-for-backward tensors of one micro-batch, counted tensor by tensor along the code path
  in the manner of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"), for
  recompute none / selective / full, with sequence parallelism and tensor parallelism; attention is SDPA/flash, so
  there is no s^2 term (only the log-sum-exp, fp32 [b, n, s]). The ViT, projector and embedding live on pipeline
  stage 0 (its first virtual chunk), the final norm and the loss on the last. Micro-batches in flight come from
  simulating megatron's schedule on each pipeline rank (1F1B: stage r holds min(p - r, m); interleaved: its warm-up
  count, per virtual chunk). A transient workspace (one layer's backward, the recomputed layer, the loss) is added.
- **Step time**: executed FLOPs (``megallava.training.flops`` conventions, plus recompute and LoRA's skipped weight
  gradients) / (peak x an efficiency calibrated on the measured H200 bench, bench/README.md), the pipeline bubble
  (p - 1) / (v m) (per stage, so an unbalanced stage 0 shows), TP traffic (4 all-reduces of b s h per layer per
  micro-batch, REFERENCE.md section 5; 2 more under full recompute), pipeline p2p, DP gradient reduce-scatter and
  parameter all-gather (not overlapped unless ``parallel.overlap_grad_reduce``) and the optimizer step (HBM-bound,
  calibrated on the same bench).

The recommendation is the fastest layout that fits; every other candidate is reported with why it loses: memory
(by how much), bubble, communication, recompute.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from megallava import config as C

GIB = 2 ** 30

# ------------------------------------------------------------------------------------------------------------------
# Presets: GPUs, clusters, models (the paper's and llava-hf's shapes), the paper's recipe.
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    """One accelerator. Bandwidths are per GPU, in GB/s, as bus bandwidth (what nccl-tests reports as busbw: the
    time of an all-reduce of B bytes over k GPUs is 2 (k-1)/k B / busbw)."""
    name: str
    memory_gib: float
    peak_tflops: float            # dense bf16
    hbm_gb_s: float
    nvlink_gb_s: float            # inside a node
    internode_gb_s: float         # between nodes (the GPU's share of the node's NICs)


# Nominal figures: memory as the device reports it (nvidia-smi MiB / 1024), dense bf16 peak, HBM bandwidth from the
# data sheets; NVLink and inter-node bus bandwidths are typical nccl-tests all-reduce results on DGX-class nodes
# (A100: NVLink3 + 8 x 200 Gb/s HDR; H100/H200: NVLink4 + 8 x 400 Gb/s NDR). Override them for your cluster.
GPUS: Dict[str, GPU] = {
    "a100-40gb": GPU("A100-SXM4-40GB", 40.0, 312.0, 1555.0, 230.0, 23.0),
    "a100-80gb": GPU("A100-SXM4-80GB", 80.0, 312.0, 2039.0, 230.0, 23.0),
    "h100-80gb": GPU("H100-SXM5-80GB", 79.6, 989.0, 3350.0, 360.0, 45.0),
    "h200-141gb": GPU("H200-SXM-141GB", 140.4, 989.0, 4800.0, 360.0, 45.0),
}


@dataclass(frozen=True)
class Cluster:
    gpu: GPU
    nodes: int = 1
    gpus_per_node: int = 8
    # memory the allocator cannot give to tensors: CUDA context, NCCL buffers, fragmentation
    reserve_gib: float = 2.0
    reserve_fraction: float = 0.05

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable_gib(self) -> float:
        return self.gpu.memory_gib * (1 - self.reserve_fraction) - self.reserve_gib


def cluster(gpu: str = "a100-80gb", nodes: int = 1, gpus_per_node: int = 8, nvlink_gb_s: Optional[float] = None,
            internode_gb_s: Optional[float] = None, memory_gib: Optional[float] = None,
            peak_tflops: Optional[float] = None) -> Cluster:
    g = GPUS[gpu.lower()]
    g = dataclasses.replace(g, **{k: v for k, v in (("nvlink_gb_s", nvlink_gb_s), ("internode_gb_s", internode_gb_s),
                                                     ("memory_gib", memory_gib), ("peak_tflops", peak_tflops))
                                  if v is not None})
    return Cluster(g, nodes, gpus_per_node)


# LLaMA-family shapes: LLaMA-7B/13B (Vicuna), Vicuna-33B v1.3, the paper's in-house Vicuna-65B (LLaMA-65B shape),
# LLaMA-2-70B(-Chat, GQA). Vocab 32000 for all.
MODELS: Dict[str, dict] = {
    "7b": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32),
    "13b": dict(num_layers=40, hidden_size=5120, ffn_hidden_size=13824, num_attention_heads=40),
    "33b": dict(num_layers=60, hidden_size=6656, ffn_hidden_size=17920, num_attention_heads=52),
    "65b": dict(num_layers=80, hidden_size=8192, ffn_hidden_size=22016, num_attention_heads=64),
    "70b": dict(num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64,
                num_query_groups=8, rms_norm_eps=1e-5),
}
BASE_LLM = {"7b": "Vicuna-7B v1.3", "13b": "Vicuna-13B v1.3", "33b": "Vicuna-33B v1.3",
            "65b": "Vicuna-65B (the paper's in-house LLaMA-65B fine-tune)", "70b": "LLaMA-2-70B-Chat"}
TEMPLATE = {"70b": "llama_2"}   # others: vicuna_v1

# The paper's recipe (REFERENCE.md section 1). Stage 1's global batch is not stated there: LLaVA's 256 is used.
PAPER_NODES = {"full": {"7b": 4, "13b": 4, "33b": 4, "65b": 4, "70b": 4},
               "lora": {"7b": 1, "13b": 1, "33b": 1, "65b": 2, "70b": 2}}
STAGE1_GLOBAL_BATCH = 256


def parse_method(method: str) -> Tuple[str, int, bool]:
    """'full' | 'lora-R' | 'qlora-R' (also 'lora' = lora-64) -> (kind, rank, quantize)."""
    m = method.lower().replace("_", "-")
    if m == "full":
        return "full", 0, False
    for kind, quant in (("qlora", True), ("lora", False)):
        if m == kind:
            return kind, 64, quant
        if m.startswith(kind + "-") and m[len(kind) + 1:].isdigit():
            return kind, int(m[len(kind) + 1:]), quant
    raise ValueError(f"unknown method {method!r}: use full, lora-R or qlora-R (e.g. lora-64, qlora-64)")


def workload_config(model: str = "7b", stage: int = 2, method: str = "full", seq_length: int = 2048,
                    image_size: int = 336, sharegpt: bool = False, projector: str = "linear",
                    global_batch: Optional[int] = None) -> C.Config:
    """A megallava Config for a paper setting: the LLM preset, CLIP ViT-L/14 at ``image_size``, the stage (1 =
    projector only, lr 1e-4; 2 = instruction tuning: full lr 2e-5 global 512, LoRA/QLoRA lr 1e-4, alpha 2 x rank,
    global 64), bf16 with fp32 master weights and the distributed optimizer. Data paths are placeholders."""
    key = model.lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {model!r}: use one of {', '.join(MODELS)}")
    kind, rank, quantize = parse_method(method)
    if stage == 1 and kind != "full":
        raise ValueError("stage 1 trains the projector only: method must be 'full'")
    cfg = C.Config()
    for k, v in MODELS[key].items():
        setattr(cfg.model, k, v)
    cfg.model.vocab_size = 32000
    cfg.model.projector = projector
    cfg.model.vision.image_size = image_size
    cfg.model.train_llm = stage == 2
    cfg.lora.rank, cfg.lora.quantize = rank, quantize
    t = cfg.train
    t.precision = "bf16"
    t.weight_decay = 0.0
    t.lr_warmup_fraction = 0.03
    if stage == 1:
        t.lr, t.lr_decay_style, t.global_batch_size = 1e-4, "linear", global_batch or STAGE1_GLOBAL_BATCH
    elif kind == "full":
        t.lr, t.lr_decay_style, t.global_batch_size = 2e-5, "cosine", global_batch or 512
    else:
        t.lr, t.lr_decay_style, t.global_batch_size = 1e-4, "cosine", global_batch or 64
    # one epoch: LCS-558K (558,128 pairs) for stage 1; LLaVA-80K, plus its ShareGPT share when mixed (0.8 / 0.2)
    samples = 558_128 if stage == 1 else (100_000 if sharegpt else 80_000)
    t.iters = math.ceil(samples / t.global_batch_size)
    d = cfg.data
    d.source, d.seq_length = "shards", seq_length
    template = "plain" if stage == 1 else TEMPLATE.get(key, "vicuna_v1")
    if stage == 1:
        d.sources = [C.SourceConfig(path="data/shards/lcs558k", weight=1.0, template=template)]
    elif sharegpt:
        d.sources = [C.SourceConfig(path="data/shards/llava_instruct_80k", weight=0.8, template=template),
                     C.SourceConfig(path="data/shards/sharegpt", weight=0.2, template=template)]
    else:
        d.sources = [C.SourceConfig(path="data/shards/llava_instruct_80k", weight=1.0, template=template)]
    d.tokenizer = f"checkpoints/{key}/tokenizer.model"
    return cfg


def resolve_kernels(cfg, gpu: bool = True) -> C.Config:
    """A copy of ``cfg`` whose null ``kernels.*`` switches are resolved as the trainer resolves them on a GPU (on)
    or on a CPU (off): the activation model depends on them (fused RMSNorm and SwiGLU save less)."""
    c = copy.deepcopy(cfg)
    for f in dataclasses.fields(C.KernelsConfig):
        if f.name != "cross_entropy_chunk" and getattr(c.kernels, f.name) is None:
            setattr(c.kernels, f.name, gpu)
    return c


def plan_dtype_bytes(cfg) -> int:
    """Bytes per parameter / activation element on the GPU: bf16 unless train.precision=fp32."""
    return 4 if cfg.train.precision == "fp32" else 2


# ------------------------------------------------------------------------------------------------------------------
# Calibration from the measured H200 bench (bench/README.md, bench/results/h200/).
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Calibration:
    compute_efficiency: float         # model FLOPs / (peak x compute time), optimizer step excluded
    optimizer_s_per_param: float      # fused Adam step (+ grad norm, master copy) per trainable param on this rank
    optimizer_hbm_gb_s: float         # ... measured on a GPU with this HBM bandwidth (scaled to others)
    source: str


# The defaults path of bench/train_vs_hf.py on one H200 (LLaMA-7B layer shape x 8 layers + CLIP ViT-L/14-336 +
# mlp2x, seq 2048, micro-batch 4, one optimizer step per micro-batch): 214.7 ms per step for 91.07 TFLOP of model
# FLOPs (42.9% MFU), of which the optimizer kernels take 38.3 ms (bench/README.md profile; 1.908B trainable params).
BENCH_H200 = dict(step_s=0.21466390530000012, model_tflop=91.072185614336, optimizer_s=0.0383,
                  trainable=1_908_486_144, peak_tflops=989.0, hbm_gb_s=4800.0,
                  recompute_full_step_s=0.2572373409000022)


def calibration(bench_dir: Optional[str] = None) -> Calibration:
    """From ``bench_dir``/headline_megallava.json when given and present, else the constants above (the same
    numbers)."""
    b = dict(BENCH_H200)
    src = "bench/README.md (H200, megallava defaults)"
    if bench_dir:
        path = os.path.join(bench_dir, "headline_megallava.json")
        if os.path.isfile(path):
            with open(path) as f:
                r = json.load(f)["results"]["megallava"]
            b["step_s"], b["model_tflop"] = r["step_s"], r["model_tflop_per_step"]
            src = path
    compute_s = b["step_s"] - b["optimizer_s"]
    eff = b["model_tflop"] / (b["peak_tflops"] * compute_s)
    return Calibration(eff, b["optimizer_s"] / b["trainable"], b["hbm_gb_s"], src)


# ------------------------------------------------------------------------------------------------------------------
# Parameters of a pipeline chunk: built on the meta device at TP 1, cached on disk.
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    name: str
    numel: int           # at TP 1
    tp: bool             # split over tensor-parallel ranks (megatron's tensor_model_parallel attribute)
    dim: int             # its partition_dim (-1 when replicated)
    trainable: bool
    nf4: bool = False    # QLoRA base weight: stored as NF4 after quantize_bases
    vocab: bool = False  # embedding / output layer: rows = padded vocab (padded per tp)
    cols: int = 0        # the last dimension at TP 1 (NF4: whether a TP shard's rows are whole 64-value blocks)


def _cache_dir() -> str:
    return os.environ.get("MEGALLAVA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megallava", "plan")


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    """Hash of the model code and this file (which defines Param), and megatron's version: a change to any of them
    invalidates cached structures."""
    h = hashlib.sha256()
    model_dir = os.path.join(os.path.dirname(__file__), "model")
    for path in [os.path.join(model_dir, n) for n in sorted(os.listdir(model_dir)) if n.endswith(".py")] + [__file__]:
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + f.read())
    try:
        from importlib.metadata import version
        h.update(version("megatron-core").encode())
    except Exception:  # noqa: BLE001
        pass
    return h.hexdigest()[:16]


def _structure_key(cfg) -> dict:
    m = dataclasses.asdict(cfg.model)
    m.pop("num_layers")
    lora = dataclasses.asdict(cfg.lora) if cfg.lora.rank > 0 else None
    return {"model": m, "lora": lora, "code": _code_version()}


class _meta_factories:
    """For a meta-device build: torch.cuda.current_device() is the meta device (megatron passes it explicitly), and
    the tensor factories are torch's own for the duration (megallava.cpu_compat wraps them on CPU hosts, which hides
    them from the ``torch.device`` context's constructor list)."""
    NAMES = ("empty", "zeros", "ones", "full", "tensor", "arange")

    def __enter__(self):
        import torch
        import torch.utils._device as tdev
        self._saved = {n: getattr(torch, n) for n in self.NAMES}
        self._device = torch.cuda.current_device
        for n, f in self._saved.items():
            setattr(torch, n, getattr(f, "__wrapped__", f))
        torch.cuda.current_device = lambda: torch.device("meta")
        getattr(tdev._device_constructors, "cache_clear", lambda: None)()
        return self

    def __exit__(self, *exc):
        import torch
        import torch.utils._device as tdev
        for n, f in self._saved.items():
            setattr(torch, n, f)
        torch.cuda.current_device = self._device
        getattr(tdev._device_constructors, "cache_clear", lambda: None)()


def _meta_chunk_params(cfg, n_layers: int, pre: bool, post: bool) -> List[Param]:
    """Build one chunk (n_layers LLM layers, [ViT + projector + embedding] if pre, [norm + output] if post) at TP 1
    on the meta device in this process (megatron's parallel_state must be TP 1 / PP 1 here)."""
    import torch
    from megallava.model.build import lora_settings, set_trainable
    from megallava.model.llama import llm_transformer_config
    from megallava.model.llava import LLaVAChunk
    from megallava.model.lora import _LoRAMixin

    c = copy.deepcopy(cfg)
    c.model.num_layers = n_layers
    c.parallel = C.ParallelConfig()
    c.kernels = C.KernelsConfig(**{k.name: False for k in dataclasses.fields(C.KernelsConfig)
                                   if k.name != "cross_entropy_chunk"})
    c.train.precision = "fp32"
    config = llm_transformer_config(c, None, torch.float32)
    # perform_initialization=True: megatron sets the TP attributes (partition_dim, ...) only when it initialises;
    # on meta tensors initialising costs nothing. use_cpu_initialization=False: no full-size master weight.
    config = dataclasses.replace(config, use_cpu_initialization=False, perform_initialization=True)
    lora = lora_settings(c)
    # megatron allocates its linears' weights on torch.cuda.current_device() explicitly (overriding the default
    # device): point that at the meta device for the build, so nothing is allocated (on CPU and on GPU hosts)
    with _meta_factories():
        with torch.device("meta"):
            chunk = LLaVAChunk(c.model, config, pre_process=pre, post_process=post, kernels=c.kernels, lora=lora)
    set_trainable(chunk, c.model, lora)
    not_meta = [name for name, p in chunk.named_parameters() if p.device.type != "meta"]
    if not_meta:
        raise RuntimeError(f"meta build allocated real parameters: {not_meta[:3]}")
    nf4_weights = set()
    for mod_name, mod in chunk.named_modules():
        if isinstance(mod, _LoRAMixin) and mod.qlora:
            nf4_weights.add(f"{mod_name}.weight")
    out = []
    for name, p in chunk.named_parameters():
        tp = bool(getattr(p, "tensor_model_parallel", False))
        out.append(Param(name, p.numel(), tp, int(getattr(p, "partition_dim", -1)) if tp else -1, p.requires_grad,
                         name in nf4_weights, name in ("embedding.weight", "output_layer.weight"), p.shape[-1]))
    return out


def _tp1_state_ready() -> bool:
    try:
        import torch
        from megatron.core import parallel_state
        return (torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized()
                and parallel_state.get_tensor_model_parallel_world_size() == 1
                and parallel_state.get_pipeline_model_parallel_world_size() == 1)
    except Exception:  # noqa: BLE001
        return False


def _build_in_tp1_process(cfg, specs: List[Tuple[int, bool, bool]]) -> List[List[Param]]:
    """Meta-build each (n_layers, pre, post) in a process whose megatron state is one rank at TP 1 / PP 1: this one
    if it already is, else a forked child (so the caller's torch.distributed state is never touched)."""
    if _tp1_state_ready():
        return [_meta_chunk_params(cfg, *s) for s in specs]
    from megallava.local_ranks import run_ranks

    def fn(rank, env):
        from megallava.distributed import init_distributed
        from megallava.distributed import LaunchEnv
        init_distributed(1, 1, None, 0, LaunchEnv(0, 1, 0, "127.0.0.1", 0))
        return [[dataclasses.astuple(p) for p in _meta_chunk_params(cfg, *s)] for s in specs]

    rows = run_ranks(1, fn, timeout=900)[0]
    return [[Param(*r) for r in chunk] for chunk in rows]


class StructureCache:
    """Parameter lists of (n_layers, pre, post) chunks of one model/LoRA setting, memoised and kept on disk."""

    def __init__(self, cfg):
        self.cfg = cfg
        key = json.dumps(_structure_key(cfg), sort_keys=True)
        self.digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        self.path = os.path.join(_cache_dir(), f"{self.digest}.json")
        self.data: Dict[str, List[Param]] = {}
        if os.path.isfile(self.path):
            try:
                with open(self.path) as f:
                    raw = json.load(f)
                self.data = {k: [Param(*r) for r in v] for k, v in raw.items()}
            except (OSError, ValueError, TypeError):
                self.data = {}

    @staticmethod
    def _key(n, pre, post) -> str:
        return f"{n}:{int(pre)}:{int(post)}"

    def ensure(self, specs: Iterable[Tuple[int, bool, bool]]) -> None:
        missing = sorted({s for s in specs if self._key(*s) not in self.data})
        if not missing:
            return
        for s, params in zip(missing, _build_in_tp1_process(self.cfg, missing)):
            self.data[self._key(*s)] = params
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({k: [dataclasses.astuple(p) for p in v] for k, v in self.data.items()}, f)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only home: memoised in this process only

    def get(self, n, pre, post) -> List[Param]:
        self.ensure([(n, pre, post)])
        return self.data[self._key(n, pre, post)]


@functools.lru_cache(maxsize=64)
def _structure_cache(digest_key: str, cfg_json: str) -> StructureCache:
    return StructureCache(_config_from_json(cfg_json))


def _config_from_json(text: str) -> C.Config:
    data = json.loads(text)
    cfg = C.Config()
    C._apply_mapping(cfg, data, "", problems := [])
    if problems:
        raise C.ConfigError(problems)
    return cfg


def structures(cfg) -> StructureCache:
    text = json.dumps(C.to_dict(cfg), sort_keys=True)
    return _structure_cache(json.dumps(_structure_key(cfg), sort_keys=True), text)


# ------------------------------------------------------------------------------------------------------------------
# Layouts and pipeline stages
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    dp: int = 1
    micro_batch: int = 1
    recompute: str = "none"                       # none | selective | full
    recompute_modules: Tuple[str, ...] = ("core_attn",)
    sequence_parallel: bool = False
    pipeline_layers: Optional[Tuple[int, ...]] = None
    distributed_optimizer: bool = True
    overlap: bool = False                         # overlap_grad_reduce + overlap_param_gather

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def chunks(self) -> int:
        return self.pp * (self.vpp or 1)

    def label(self) -> str:
        s = f"TP{self.tp} PP{self.pp}" + (f" VPP{self.vpp}" if self.vpp else "") + f" DP{self.dp} mb{self.micro_batch}"
        if self.sequence_parallel:
            s += " SP"
        if self.recompute == "selective":
            s += " rc:" + "+".join(self.recompute_modules)
        elif self.recompute == "full":
            s += " rc:full"
        if self.pipeline_layers and len(set(self.pipeline_layers)) > 1:
            s += " split" + "/".join(map(str, self.pipeline_layers))
        return s

    def overrides(self) -> List[str]:
        """The trainer's dotted overrides for this layout."""
        out = [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}",
               f"parallel.vpp={self.vpp if self.vpp else 'null'}",
               f"parallel.sequence_parallel={'true' if self.sequence_parallel else 'false'}",
               f"parallel.use_distributed_optimizer={'true' if self.distributed_optimizer else 'false'}",
               f"train.micro_batch_size={self.micro_batch}", f"train.recompute={self.recompute}"]
        if self.recompute == "selective":
            out.append(f"train.recompute_modules=[{','.join(self.recompute_modules)}]")
        if self.pipeline_layers and len(set(self.pipeline_layers)) > 1:
            out.append(f"parallel.pipeline_layers=[{','.join(map(str, self.pipeline_layers))}]")
        if self.overlap:
            out += ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"]
        return out


def layout_from_config(cfg, world_size: int) -> Layout:
    p, t = cfg.parallel, cfg.train
    return Layout(p.tp, p.pp, p.vpp if p.pp > 1 else None, world_size // (p.tp * p.pp), t.micro_batch_size,
                  t.recompute, tuple(t.recompute_modules), p.sequence_parallel,
                  tuple(p.pipeline_layers) if p.pipeline_layers else None, p.use_distributed_optimizer,
                  p.overlap_grad_reduce)


def apply_layout(cfg, layout: Layout) -> C.Config:
    c = copy.deepcopy(cfg)
    c.parallel.tp, c.parallel.pp = layout.tp, layout.pp
    c.parallel.vpp = layout.vpp
    c.parallel.sequence_parallel = layout.sequence_parallel
    c.parallel.pipeline_layers = list(layout.pipeline_layers) if layout.pipeline_layers else None
    c.parallel.use_distributed_optimizer = layout.distributed_optimizer
    c.parallel.overlap_grad_reduce = c.parallel.overlap_param_gather = layout.overlap
    c.train.micro_batch_size = layout.micro_batch
    c.train.recompute = layout.recompute
    c.train.recompute_modules = list(layout.recompute_modules)
    return c


def stage_layers(cfg, layout: Layout) -> List[int]:
    """LLM layers per (virtual) stage in layer order (virtual stage k = chunk k // pp of pipeline rank k % pp)."""
    if layout.pp == 1:
        return [cfg.model.num_layers]
    if layout.pipeline_layers:
        return list(layout.pipeline_layers)
    n = layout.chunks
    return [cfg.model.num_layers // n] * n


def rank_chunks(cfg, layout: Layout, pp_rank: int) -> List[Tuple[int, bool, bool]]:
    """(n_layers, pre, post) of each model chunk on pipeline rank ``pp_rank``, in chunk order."""
    layers = stage_layers(cfg, layout)
    v = layout.vpp or 1
    n = len(layers)
    return [(layers[vp * layout.pp + pp_rank], vp * layout.pp + pp_rank == 0, vp * layout.pp + pp_rank == n - 1)
            for vp in range(v)]


# ------------------------------------------------------------------------------------------------------------------
# Static memory: params, grads, optimizer states, per rank, simulated as megatron allocates them.
# ------------------------------------------------------------------------------------------------------------------

def nf4_bytes(p: Param, tp: int = 1) -> int:
    """Bytes of a QLoRA base weight's NF4 form on one TP rank (megallava.model.lora.quantize_base): a shard quantised
    as part of the full weight keeps the full weight's second-level scales; one whose rows are not whole 64-value
    blocks is quantised alone."""
    from megallava.model import nf4

    n = p.numel // tp
    width = p.cols // tp if p.dim == 1 else p.cols
    return nf4.storage_bytes(n, p.numel if tp > 1 and width % nf4.BLOCK == 0 else None)


def local_numel(p: Param, tp: int, model_cfg) -> int:
    if p.vocab:
        from megallava.model.llama import padded_vocab_size
        rows = padded_vocab_size(model_cfg.vocab_size, model_cfg.make_vocab_size_divisible_by, tp)
        return rows // tp * model_cfg.hidden_size
    if p.tp:
        if p.numel % tp:
            raise ValueError(f"{p.name}: {p.numel} elements are not divisible by tp={tp}")
        return p.numel // tp
    return p.numel


def _lcm(a, b):
    return a * b // math.gcd(a, b)


def grad_buffer(numels: Sequence[int], dp: int, distributed_optimizer: bool, bucket_size: Optional[int]):
    """megatron's _ParamAndGradBuffer layout for trainable params given in named_parameters order: returns
    (total elements, [(start, end) per param in the given order], [(start, end) per bucket])."""
    def pad(x, d):
        return -(-x // d) * d

    ranges = [None] * len(numels)
    buckets = []
    start = bucket_start = 0
    in_bucket = 0
    end = 0
    for i in reversed(range(len(numels))):
        if distributed_optimizer:
            start = pad(start, 64)
        end = start + numels[i]
        ranges[i] = (start, end)
        in_bucket += 1
        if bucket_size is not None and end - bucket_start >= bucket_size:
            b_end = pad(end, _lcm(dp, 128)) if distributed_optimizer else end
            buckets.append((bucket_start, b_end))
            bucket_start = start = b_end
            in_bucket = 0
        else:
            start = end
    if in_bucket:
        b_end = pad(end, _lcm(dp, 128)) if distributed_optimizer else end
        buckets.append((bucket_start, b_end))
    total = buckets[-1][1] if buckets else 0
    return total, ranges, buckets


@dataclass
class StaticMemory:
    params: int = 0           # bytes of parameter storage (param buffer for trainable params under dist. opt.)
    grads: int = 0            # DDP main_grad buffers
    optimizer: int = 0        # master weights + Adam moments + step counters
    trainable: int = 0        # trainable parameters on this rank (elements)
    total_params: int = 0     # parameters on this rank (elements)
    shard_params: int = 0     # trainable elements whose optimizer state this rank holds
    nf4: int = 0              # bytes of QLoRA's NF4 bases (part of ``params``)
    nf4_params: int = 0       # base weight elements they hold

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def static_memory(cfg, layout: Layout, pp_rank: int, dp_rank: int = 0, structure: Optional[StructureCache] = None,
                  param_bytes: Optional[int] = None) -> StaticMemory:
    """Exact bytes of parameters, DDP grad buffers and optimizer state on one rank (any TP rank: they are equal)."""
    st = structure or structures(cfg)
    t = cfg.train
    pbytes = param_bytes or plan_dtype_bytes(cfg)
    grad_fp32 = t.master_weights if t.grad_reduce_in_fp32 is None else t.grad_reduce_in_fp32
    gbytes = 4 if grad_fp32 else pbytes
    master = 4 if (pbytes == 2 and t.master_weights) else 0
    sbytes = 4 if (pbytes == 4 or t.master_weights) else 2
    dp, dist = layout.dp, layout.distributed_optimizer
    out = StaticMemory()
    for ci, (n, pre, post) in enumerate(rank_chunks(cfg, layout, pp_rank)):
        params = st.get(n, pre, post)
        numels = []
        for p in params:
            k = local_numel(p, layout.tp, cfg.model)
            out.total_params += k
            if p.trainable:
                numels.append(k)
            elif p.nf4:
                b = nf4_bytes(p, layout.tp)
                out.params += b
                out.nf4 += b
                out.nf4_params += k
            else:
                out.params += k * pbytes
        out.trainable += sum(numels)
        if not numels:
            continue
        bucket = None
        if layout.overlap and ci == 0 and pp_rank == 0:
            bucket = max(40_000_000, 1_000_000 * dp)
        total, ranges, buckets = grad_buffer(numels, dp, dist, bucket)
        out.grads += total * gbytes
        if dist:
            out.params += total * pbytes
            owned = 0
            for b0, b1 in buckets:
                size = (b1 - b0) // dp
                s0, s1 = b0 + dp_rank * size, b0 + (dp_rank + 1) * size
                for r0, r1 in ranges:
                    if b0 <= r0 < b1:
                        k = min(r1, s1) - max(r0, s0)
                        if k > 0:
                            owned += k
                            out.optimizer += k * (master + 2 * sbytes) + 4
            out.shard_params += owned
        else:
            out.params += sum(numels) * pbytes
            out.optimizer += sum(k * (master + 2 * sbytes) + 4 for k in numels)
            out.shard_params += sum(numels)
    return out


# ------------------------------------------------------------------------------------------------------------------
# Activations: saved-for-backward bytes of one micro-batch per chunk (Korthikanti et al. 2022, this code path).
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tokens:
    """One micro-batch: b samples padded to s tokens, ``images`` images of ``patches`` features each."""
    b: int
    s: int
    images: int


def _flags(cfg):
    lora = cfg.lora.rank > 0
    full = cfg.model.train_llm and not lora
    targets = set(cfg.lora.targets) if lora and cfg.model.train_llm else set()
    return full, targets


def layer_activation_bytes(cfg, layout: Layout, tok: Tokens, e: int, recompute: Optional[str] = None) -> Dict[str, int]:
    """Saved tensors of one LLaMA layer for one micro-batch, by term (bytes). Notation: T = b s tokens, U = T h / ts
    (ts = tp under sequence parallelism, else 1: the hidden stream), Q = T h / tp, K = T g d / tp, F = T ffn / tp."""
    m = cfg.model
    tp = layout.tp
    ts = tp if layout.sequence_parallel else 1
    T = tok.b * tok.s
    h, f, n = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads
    g = m.num_query_groups or n
    d = h // n
    U, Q, K, F = T * h // ts, T * h // tp, T * g * d // tp, T * f // tp
    QKV = Q + 2 * K
    R = T // ts
    full, targets = _flags(cfg)
    r = cfg.lora.rank
    saves_in = {name: full or name in targets for name in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")}
    kern = cfg.kernels
    fused_norm = bool(kern.fused_rmsnorm)
    fused_swiglu = bool(kern.fused_swiglu)
    fused_rope = bool(kern.fused_rope)
    rc = recompute or layout.recompute
    modules = set(layout.recompute_modules) if rc == "selective" else set()
    out: Dict[str, int] = {}
    if rc == "full":
        out["layer input (full recompute)"] = U * e
        return out

    def norm(prefix):
        # HF LlamaRMSNorm: x.float(); x * rsqrt(mean(x^2) + eps); weight * x.to(dtype)
        if fused_norm:
            out[f"{prefix} input"] = U * e
        else:
            out[f"{prefix} input (fp32)"] = U * 4
            if full and e == 4:
                out[f"{prefix} normalised"] = U * 4
            elif full:
                out[f"{prefix} normalised (cast)"] = U * e
        out[f"{prefix} rsqrt"] = R * 4

    norm("norm1")
    if saves_in["linear_qkv"]:
        out["qkv input"] = U * e
    if "linear_qkv" in targets:
        out["lora qkv down"] = T * 3 * r * e
        out["lora qkv B slices"] = (n + 2 * g) * d // tp * r * e   # q/k/v row blocks of lora_b, copied
    if not fused_rope:
        out["rope cos/sin"] = 4 * tok.s * d * e
    if "core_attn" in modules:   # megatron's checkpoint saves its inputs: q, k (after RoPE), v (a view of qkv)
        out["q (rope)"] = Q * e
        out["k (rope)"] = K * e
        out["qkv output (v view)"] = QKV * e
        out["mask type"] = 4
    else:
        out["q (rope)"] = Q * e
        if g < n:
            out["k, v expanded (GQA)"] = 2 * Q * e
        else:
            out["k (rope)"] = K * e
            out["qkv output (v view)"] = QKV * e
        # SDPA's output [b, n, s, d] is laid out [b, s, n, d] (flash, cuDNN, memory-efficient and CPU kernels): the
        # [s, b, n d] view linear_proj saves shares its storage
        out["attention output (= proj input)"] = Q * e
        out["log-sum-exp"] = T * n // tp * 4
    if "core_attn" in modules and saves_in["linear_proj"]:
        out["attention output (= proj input)"] = Q * e
    if "linear_proj" in targets:
        out["lora proj down"] = R * r * e
    norm("norm2")
    if "mlp" in modules:
        out["mlp input (recompute)"] = U * e
        return out
    if saves_in["linear_fc1"]:
        out["fc1 input"] = U * e
    if "linear_fc1" in targets:
        out["lora fc1 down"] = T * 2 * r * e
    if fused_swiglu:
        out["fc1 output"] = 2 * F * e
    else:
        out["fc1 output"] = 2 * F * e
        out["silu output"] = F * e
        out["up (+ offset)"] = F * e
    if saves_in["linear_fc2"]:
        out["fc2 input"] = F * e
    if "linear_fc2" in targets:
        out["lora fc2 down"] = R * r * e
    return out


def chunk_activation_bytes(cfg, layout: Layout, tok: Tokens, e: int, n_layers: int, pre: bool,
                           post: bool) -> Dict[str, int]:
    """Saved bytes of one micro-batch in one chunk, by term: its layers, [embedding + projector] if ``pre``,
    [final norm + loss] if ``post``; a chunk that is not the model's last also keeps its output (megatron keeps the
    pipeline output tensors of in-flight micro-batches)."""
    m, v = cfg.model, cfg.model.vision
    tp = layout.tp
    ts = tp if layout.sequence_parallel else 1
    T = tok.b * tok.s
    h = m.hidden_size
    U = T * h // ts
    full, _ = _flags(cfg)
    out: Dict[str, int] = {}
    per_layer = layer_activation_bytes(cfg, layout, tok, e)
    out["layers"] = n_layers * sum(per_layer.values())
    if layout.recompute == "full":
        out["rope table"] = tok.s * (h // m.num_attention_heads) * 4
    elif bool(cfg.kernels.fused_rope):
        out["rope table"] = tok.s * (h // m.num_attention_heads) * 4
    unfused_bf16_norm = not cfg.kernels.fused_rmsnorm and e == 2 and layout.recompute != "full"
    if not pre and unfused_bf16_norm:
        out["received input"] = U * e     # kept by the schedule; the norm saved an fp32 copy
    if pre and ts > 1 and not unfused_bf16_norm:
        # scatter_to_sequence_parallel_region returns a (viewless) slice of the full [s, b, h] embedding output:
        # saving layer 0's input keeps the whole storage
        out["embedding output (full storage under SP)"] = (T * h - U) * e
    if pre:
        patches = (v.image_size // v.patch_size) ** 2
        n_img = tok.images
        if full:
            out["embedding indices"] = T * 8 + (T if tp > 1 else 0)
        if n_img:
            out["image mask"] = T
            if m.train_projector:
                hv = v.hidden_size
                out["projector input (ViT output)"] = n_img * (patches + 1) * hv * e
                if m.projector == "mlp2x_gelu":
                    out["projector hidden"] = 2 * n_img * patches * h // tp * e
    if post:
        from megallava.model.llama import padded_vocab_size
        vp = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp)
        fused_norm = bool(cfg.kernels.fused_rmsnorm)
        if fused_norm:
            out["final norm input"] = U * e
        else:
            out["final norm input (fp32)"] = U * 4
            if full:
                out["final norm normalised"] = U * 4 if e == 4 else U * e
        out["final norm rsqrt"] = T // ts * 4
        if cfg.kernels.fused_cross_entropy:
            out["loss: hidden"] = T * h * e if (full or tp > 1 or ts > 1) else 0
            out["loss: grad of hidden"] = T * h * e
            if full:
                out["loss: grad of output layer (fp32)"] = vp // tp * h * 4
            out["loss: lse, labels"] = T * 4 + T * 8
        else:
            if full:
                out["output layer input"] = U * e
            out["loss: softmax (fp32)"] = T * vp // tp * 4
            out["loss: masks, targets"] = T + T * 8 + T + (vp // tp if vp > m.vocab_size else 0)
    else:
        out["pipeline output"] = U * e
    return out


def schedule_peak(pp: int, vpp: Optional[int], m: int, rank: int, chunk_bytes: Sequence[int]) -> Tuple[int, List[int]]:
    """Peak bytes of activations held by pipeline rank ``rank`` under megatron's schedule (1F1B, or interleaved
    with ``vpp`` chunks), given each of its chunks' bytes per micro-batch. Returns (peak, in-flight count per chunk
    at the peak)."""
    v = vpp or 1
    if pp == 1:
        return max(chunk_bytes), [1] * len(chunk_bytes)
    total = m * v
    if v == 1:
        warm = min(pp - rank - 1, m)
    else:
        warm = min((pp - rank - 1) * 2 + (v - 1) * pp, total)

    def fwd_chunk(k):
        return (k % (pp * v)) // pp

    def bwd_chunk(k):
        return v - 1 - (k % (pp * v)) // pp

    held = [0] * v
    cur = peak = 0
    peak_held = list(held)
    f = b = 0
    order = ["F"] * warm
    for _ in range(total - warm):
        order += ["F", "B"]
    order += ["B"] * warm
    for op in order:
        if op == "F":
            c = fwd_chunk(f)
            f += 1
            held[c] += 1
            cur += chunk_bytes[c]
            if cur > peak:
                peak, peak_held = cur, list(held)
        else:
            c = bwd_chunk(b)
            b += 1
            held[c] -= 1
            cur -= chunk_bytes[c]
    return peak, peak_held


LOSS_TERMS = ("final norm", "loss", "output layer input")


def workspace_bytes(cfg, layout: Layout, tok: Tokens, e: int, pre: bool, post: bool) -> Dict[str, int]:
    """Transient memory on top of the saved activations of the micro-batches in flight, the larger of two phases:
    - forward: the loss' logits (the whole fp32 softmax unfused, two chunks fused) while every saved tensor is held;
    - backward of one layer: its activation grads (~3 ffn-wide tensors + the hidden grad), the layer (or the
      sub-modules) recomputed under full (selective) recompute, a weight grad before it is added to main_grad, a
      QLoRA base dequantised, less what the loss saved (freed once the loss' backward ran).
    Returns {"forward": bytes, "backward": bytes, "workspace": the larger}."""
    m = cfg.model
    tp = layout.tp
    ts = tp if layout.sequence_parallel else 1
    T = tok.b * tok.s
    h, f = m.hidden_size, m.ffn_hidden_size
    F, U = T * f // tp, T * h // ts
    fwd = 0
    if post:
        from megallava.model.llama import padded_vocab_size
        vp = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp)
        if cfg.kernels.fused_cross_entropy:
            fwd = 2 * min(T, cfg.kernels.cross_entropy_chunk) * vp // tp * 4
        else:
            fwd = T * vp // tp * e
    bwd = (3 * F + U) * e
    if layout.recompute == "full":
        bwd += sum(layer_activation_bytes(cfg, layout, tok, e, recompute="none").values())
    elif layout.recompute == "selective":
        full_layer = sum(layer_activation_bytes(cfg, layout, tok, e, recompute="none").values())
        bwd += full_layer - sum(layer_activation_bytes(cfg, layout, tok, e).values())
    biggest = max(h * 2 * f, h * (h + 2 * (m.num_query_groups or m.num_attention_heads) * h
                                  // m.num_attention_heads)) // tp
    full, _ = _flags(cfg)
    if full:
        bwd += biggest * e
    if cfg.lora.rank > 0 and cfg.lora.quantize:
        bwd += biggest * e
        fwd += biggest * e
    if post:
        saved = chunk_activation_bytes(cfg, layout, tok, e, 0, False, True)
        bwd -= sum(v for k, v in saved.items() if k.startswith(LOSS_TERMS))
        if not cfg.kernels.fused_cross_entropy:
            bwd = max(bwd, T * vp // tp * (4 + e))   # the loss' own backward: fp32 grad of the logits + cast
    return {"forward": fwd, "backward": bwd, "workspace": max(fwd, bwd, 0)}


# ------------------------------------------------------------------------------------------------------------------
# FLOPs per stage and the step time.
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    """What a step trains: ``global_batch`` samples of ``tokens_per_sample`` unpadded tokens (image placeholders
    included; micro-batches are padded to ``seq_length`` for memory) with ``images_per_sample`` images on average
    (LLaVA-80K: 1; a ShareGPT mix: the multimodal share)."""
    global_batch: int
    seq_length: int
    tokens_per_sample: int
    images_per_sample: float = 1.0


def default_workload(cfg, tokens_per_sample: Optional[int] = None, images_per_sample: Optional[float] = None):
    if images_per_sample is None:
        images_per_sample = 1.0
        if cfg.data.source == "shards" and len(cfg.data.sources) > 1:
            total = sum(s.weight for s in cfg.data.sources)
            images_per_sample = sum(s.weight for s in cfg.data.sources if "sharegpt" not in s.path.lower()) / total
    return Workload(cfg.train.global_batch_size, cfg.data.seq_length, tokens_per_sample or cfg.data.seq_length,
                    images_per_sample)


def _layer_fwd_flops(cfg, tokens: float, s: float) -> Tuple[float, float, float]:
    """(dense qkv+o, mlp, attention) forward FLOPs of one layer for ``tokens`` tokens in samples of length s."""
    m = cfg.model
    h, n = m.hidden_size, m.num_attention_heads
    g = m.num_query_groups or n
    attn_dense = 2 * (h * (h + 2 * h * g / n) + h * h) * tokens
    mlp = 2 * 3 * h * m.ffn_hidden_size * tokens
    attention = tokens * 4 * (s / 2) * h
    return attn_dense, mlp, attention


def _lora_fwd_flops(cfg, tokens: float) -> float:
    if cfg.lora.rank <= 0:
        return 0.0
    m, r = cfg.model, cfg.lora.rank
    h, f, n = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads
    g = m.num_query_groups or n
    qkv_out = h + 2 * h * g // n
    per = {"linear_qkv": 3 * r * h + r * qkv_out, "linear_proj": r * h + r * h,
           "linear_fc1": 2 * r * h + r * 2 * f, "linear_fc2": r * f + r * h}
    return 2 * tokens * sum(per[t] for t in cfg.lora.targets)


def stage_flops(cfg, layout: Layout, n_layers: int, pre: bool, post: bool, samples: float, s: float,
                images: float) -> Dict[str, float]:
    """Executed FLOPs of one chunk for ``samples`` samples (forward + backward + recompute), by part."""
    m, v = cfg.model, cfg.model.vision
    tokens = samples * s
    full, _ = _flags(cfg)
    lora = cfg.lora.rank > 0 and m.train_llm
    upstream = m.train_projector or m.train_vision
    mult = 3 if full else (2 if (lora or upstream) else 1)
    dense, mlp, attention = _layer_fwd_flops(cfg, tokens, s)
    out = {"llm": n_layers * (dense + mlp + attention) * mult}
    if lora:
        out["lora"] = n_layers * _lora_fwd_flops(cfg, tokens) * 3
    rc = layout.recompute
    if rc == "full":
        out["recompute"] = n_layers * (dense + mlp + attention + _lora_fwd_flops(cfg, tokens))
    elif rc == "selective":
        extra = (attention if "core_attn" in layout.recompute_modules else 0) + \
                (mlp if "mlp" in layout.recompute_modules else 0)
        out["recompute"] = n_layers * extra
    if post:
        out["logits"] = 2 * m.hidden_size * m.vocab_size * tokens * (3 if full else 2)
    if pre and images:
        from megallava.training.flops import step_flops
        per_image = step_flops(cfg, [0], 1)
        out["vit"] = per_image["vit"] * images
        out["projector"] = per_image["projector"] * images
    return out


def model_flops_per_step(cfg, wl: Workload) -> Dict[str, float]:
    """Model FLOPs of one global batch, exactly as the trainer counts them (megallava.training.flops.step_flops)."""
    from megallava.training.flops import step_flops
    n_img = wl.global_batch * wl.images_per_sample
    whole = int(n_img)
    f = step_flops(cfg, [wl.tokens_per_sample] * wl.global_batch, whole)
    if n_img != whole:  # fractional images: scale the per-image parts
        one = step_flops(cfg, [0], 1)
        for k in ("vit", "projector"):
            f[k] += one[k] * (n_img - whole)
        f["total"] = f["llm"] + f["vit"] + f["projector"]
    return f


def _allreduce_s(nbytes: float, k: int, bw_gb_s: float) -> float:
    return 0.0 if k <= 1 else 2 * (k - 1) / k * nbytes / (bw_gb_s * 1e9)


def _gather_s(nbytes: float, k: int, bw_gb_s: float) -> float:
    """All-gather or reduce-scatter of a buffer of ``nbytes`` (full size) over k ranks."""
    return 0.0 if k <= 1 else (k - 1) / k * nbytes / (bw_gb_s * 1e9)


@dataclass
class Estimate:
    layout: Layout
    memory_gib: float                      # the most loaded GPU
    memory_by_stage: List[Dict[str, float]]
    fits: bool
    step_s: float
    time: Dict[str, float]                 # compute, bubble, tp_comm, pp_comm, dp_comm, optimizer (seconds)
    bubble_fraction: float                 # of the step, (p-1)/(v m + p - 1) for balanced stages
    tokens_per_s: float
    mfu: float                             # model FLOPs as the trainer counts them (flops.step_flops) / peak
    hfu: float                             # executed FLOPs (recompute, LoRA's skipped weight grads) / peak
    model_tflop: float
    microbatches: int
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layout"] = dataclasses.asdict(self.layout)
        d["label"] = self.layout.label()
        return d


def estimate(cfg, layout: Layout, cl: Cluster, wl: Optional[Workload] = None, calib: Optional[Calibration] = None,
             structure: Optional[StructureCache] = None) -> Estimate:
    """Memory per GPU and step time of ``cfg`` at ``layout`` on ``cl``."""
    wl = wl or default_workload(cfg)
    calib = calib or calibration()
    st = structure or structures(cfg)
    c = resolve_kernels(apply_layout(cfg, layout), gpu=True)
    e = plan_dtype_bytes(cfg)
    g = cl.gpu
    m_count = wl.global_batch // (layout.micro_batch * layout.dp)
    img_mb = layout.micro_batch * wl.images_per_sample
    tok = Tokens(layout.micro_batch, wl.seq_length, math.ceil(img_mb))
    notes: List[str] = []
    # ---------------- memory per pipeline rank (the most loaded DP rank)
    mem_stages = []
    for r in range(layout.pp):
        chunks = rank_chunks(c, layout, r)
        sm = max((static_memory(c, layout, r, j, st) for j in
                  ([0, layout.dp - 1] if layout.dp > 1 else [0])), key=lambda x: x.total)
        acts = [sum(chunk_activation_bytes(c, layout, tok, e, n, pre, post).values()) for n, pre, post in chunks]
        peak, held = schedule_peak(layout.pp, layout.vpp, m_count, r, acts)
        ws = max(workspace_bytes(c, layout, tok, e, pre, post)["workspace"] for n, pre, post in chunks)
        mem_stages.append({"params": sm.params / GIB, "grads": sm.grads / GIB, "optimizer": sm.optimizer / GIB,
                           "activations": peak / GIB, "workspace": ws / GIB, "in_flight": sum(held),
                           "total": (sm.total + peak + ws) / GIB, "trainable": sm.trainable,
                           "params_on_rank": sm.total_params, "shard_params": sm.shard_params})
    mem = max(s["total"] for s in mem_stages)
    fits = mem <= cl.usable_gib
    # ---------------- time
    per_gpu_peak = g.peak_tflops * 1e12 * calib.compute_efficiency
    s = wl.tokens_per_sample
    samples_mb = layout.micro_batch
    stage_t = []
    stage_tp = []
    stage_pp = []
    layers = stage_layers(c, layout)
    h = c.model.hidden_size
    ts = layout.tp if layout.sequence_parallel else 1
    # TP all-reduces of [b, s, h] per layer per micro-batch: 2 forward + 2 backward (+2 recompute forward)
    ar_per_layer = 4 + (2 if layout.recompute == "full" else 0)
    tp_bw = g.nvlink_gb_s if layout.tp <= cl.gpus_per_node else g.internode_gb_s
    act_bytes_mb = samples_mb * s * h * e
    # Megatron's rank order: tp fastest, then dp, then pp: a pp boundary crosses nodes when tp*dp >= gpus per node
    pp_bw = g.internode_gb_s if layout.tp * layout.dp >= cl.gpus_per_node and cl.nodes > 1 else g.nvlink_gb_s
    executed = 0.0
    for r in range(layout.pp):
        t_r = tp_r = pp_r = 0.0
        for n, pre, post in rank_chunks(c, layout, r):
            fl = stage_flops(c, layout, n, pre, post, samples_mb, s, img_mb if pre else 0)
            executed += sum(fl.values()) * m_count * layout.dp
            t_r += sum(fl.values()) / layout.tp / per_gpu_peak
            if c.lora.rank > 0 and c.lora.quantize:
                # QLoRA: every base weight is dequantised (read 0.52 B, write a bf16 copy) in forward and backward
                base = sum(local_numel(p, layout.tp, c.model) for p in st.get(n, pre, post) if p.nf4)
                t_r += 2 * base * (0.52 + 2 * e) / (g.hbm_gb_s * 1e9)
            tp_r += n * ar_per_layer * _allreduce_s(act_bytes_mb, layout.tp, tp_bw)
            if pre and layout.tp > 1 and img_mb:
                vv = c.model.vision
                tv = (vv.image_size // vv.patch_size) ** 2 + 1
                vit_layers = vv.num_layers + vv.select_layer + 1
                tp_r += vit_layers * 2 * _allreduce_s(img_mb * tv * vv.hidden_size * e, layout.tp, tp_bw)
            if layout.pp > 1:
                pp_r += 2 * act_bytes_mb / ts / (pp_bw * 1e9)
        stage_t.append(t_r)
        stage_tp.append(tp_r)
        stage_pp.append(pp_r)
    per_mb = [a + b + cc for a, b, cc in zip(stage_t, stage_tp, stage_pp)]
    v = layout.vpp or 1
    slowest = max(per_mb)
    if layout.pp == 1:
        pipeline = m_count * slowest
        bubble = 0.0
    else:
        pipeline = m_count * slowest + (layout.pp - 1) / v * (sum(per_mb) / len(per_mb))
        bubble = pipeline - m_count * slowest
    worst = per_mb.index(slowest)
    compute = m_count * stage_t[worst]
    tp_comm = m_count * stage_tp[worst]
    pp_comm = m_count * stage_pp[worst]
    # DP: reduce-scatter (dist. opt.) or all-reduce of the grad buffer, all-gather of the params
    sm0 = static_memory(c, layout, worst, 0, st)
    dp_bw = g.internode_gb_s if layout.tp * layout.dp > cl.gpus_per_node else g.nvlink_gb_s
    if layout.distributed_optimizer:
        dp_comm = _gather_s(sm0.grads, layout.dp, dp_bw) + \
            _gather_s(sm0.trainable * e, layout.dp, dp_bw)
    else:
        dp_comm = _allreduce_s(sm0.grads, layout.dp, dp_bw)
    if layout.overlap and layout.dp > 1:
        # the reduce overlaps the backward and the gather the next forward: what does not fit is exposed
        dp_comm = max(0.0, dp_comm - 0.9 * compute)
    optimizer = sm0.shard_params * calib.optimizer_s_per_param * calib.optimizer_hbm_gb_s / g.hbm_gb_s
    step = pipeline + dp_comm + optimizer
    flops = model_flops_per_step(c, wl)
    tokens = wl.global_batch * wl.tokens_per_sample
    mfu = flops["total"] / step / layout.gpus / (g.peak_tflops * 1e12)
    time = {"compute": compute, "bubble": bubble, "tp_comm": tp_comm, "pp_comm": pp_comm, "dp_comm": dp_comm,
            "optimizer": optimizer}
    hfu = executed / step / layout.gpus / (g.peak_tflops * 1e12)
    return Estimate(layout, mem, mem_stages, fits, step, time, bubble / step if step else 0.0, tokens / step, mfu,
                    hfu, flops["total"] / 1e12, m_count, notes)


def predicted_bubble_fraction(pp: int, vpp: Optional[int], m: int) -> float:
    """Idle share of a step with balanced stages: (p-1)/(v m) of the ideal time, i.e. (p-1)/(v m + p - 1) of the
    step."""
    x = (pp - 1) / ((vpp or 1) * m)
    return x / (1 + x)


# ------------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO emulation (the paper's setting): memory per GPU of data parallelism alone.
# ------------------------------------------------------------------------------------------------------------------

def zero_memory_gib(cfg, zero_stage: int, dp: int, micro_batch: int = 1, seq_length: Optional[int] = None,
                    structure: Optional[StructureCache] = None, recompute: str = "full") -> Dict[str, float]:
    """Per-GPU memory under DeepSpeed ZeRO-2/3 with bf16 params, fp32 master weights and Adam (HF Trainer + DeepSpeed,
    as LLaVA's scripts run it): ZeRO-2 keeps every parameter on every GPU and shards grads (bf16) and optimizer
    states (12 bytes per trainable parameter) over the dp GPUs; ZeRO-3 also shards the parameters. QLoRA bases are
    NF4. Activations: LLaVA's gradient checkpointing (the layer inputs) plus one layer's working set."""
    st = structure or structures(cfg)
    lay = Layout(1, 1, None, dp, micro_batch, recompute)
    params = st.get(cfg.model.num_layers, True, True)
    frozen = sum(nf4_bytes(p) if p.nf4 else 2 * p.numel for p in params if not p.trainable)
    trainable = sum(p.numel for p in params if p.trainable)
    weights = frozen + 2 * trainable
    if zero_stage >= 3:
        weights /= dp
    grads = 2 * trainable / dp
    optim = 12 * trainable / dp
    tok = Tokens(micro_batch, seq_length or cfg.data.seq_length, micro_batch)
    c = resolve_kernels(apply_layout(cfg, lay), gpu=True)
    acts = sum(chunk_activation_bytes(c, lay, tok, 2, cfg.model.num_layers, True, True).values())
    ws = workspace_bytes(c, lay, tok, 2, True, True)["workspace"]
    total = weights + grads + optim + acts + ws
    return {"weights": weights / GIB, "grads": grads / GIB, "optimizer": optim / GIB, "activations": acts / GIB,
            "workspace": ws / GIB, "total": total / GIB, "trainable": trainable,
            "params": sum(p.numel for p in params)}


# ------------------------------------------------------------------------------------------------------------------
# Candidate layouts and the recommendation.
# ------------------------------------------------------------------------------------------------------------------

RECOMPUTE_CANDIDATES = (("none", ("core_attn",)), ("selective", ("core_attn",)), ("selective", ("core_attn", "mlp")),
                        ("full", ("core_attn",)))


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_tp(cfg, gpus_per_node: int) -> List[int]:
    m, v = cfg.model, cfg.model.vision
    out = []
    for tp in _divisors(gpus_per_node):
        dims = [m.num_attention_heads, m.num_query_groups or m.num_attention_heads, m.ffn_hidden_size,
                v.num_attention_heads, v.ffn_hidden_size]
        if all(x % tp == 0 for x in dims):
            if cfg.lora.rank > 0 and (m.num_query_groups or m.num_attention_heads) % tp:
                continue
            out.append(tp)
    return out


def enumerate_layouts(cfg, world: int, gpus_per_node: int = 8, global_batch: Optional[int] = None,
                      micro_batches: Sequence[int] = (1, 2, 4, 8, 16), max_pp: int = 16,
                      recompute: Sequence[Tuple[str, Tuple[str, ...]]] = RECOMPUTE_CANDIDATES,
                      vpps: Sequence[Optional[int]] = (None, 2, 4)) -> List[Layout]:
    """Every layout the trainer accepts at this world size (config.validate's rules): tp within a node dividing the
    head/ffn sizes, pp dividing the layers (even split), vpp with m divisible by pp, micro-batches dividing the
    global batch; sequence parallelism on whenever tp > 1; overlapped DP communication whenever dp > 1."""
    gb = global_batch or cfg.train.global_batch_size
    L = cfg.model.num_layers
    out = []
    for tp in valid_tp(cfg, gpus_per_node):
        for pp in _divisors(world // tp) if world % tp == 0 else []:
            if pp > max_pp or pp > L or L % pp:
                continue
            dp = world // (tp * pp)
            for mb in micro_batches:
                if gb % (mb * dp):
                    continue
                m = gb // (mb * dp)
                for vpp in (vpps if pp > 1 else (None,)):
                    if vpp is not None and (L % (pp * vpp) or m % pp):
                        continue
                    for rc, mods in recompute:
                        out.append(Layout(tp, pp, vpp, dp, mb, rc, mods, tp > 1, None, True, dp > 1))
    return out


@dataclass
class PlanResult:
    cfg: C.Config
    cluster: Cluster
    workload: Workload
    estimates: List[Estimate]
    best: Optional[Estimate]
    calib: Calibration

    def fitting(self) -> List[Estimate]:
        return [e for e in self.estimates if e.fits]


TIE = 0.005


def plan(cfg, cl: Cluster, wl: Optional[Workload] = None, calib: Optional[Calibration] = None,
         layouts: Optional[Sequence[Layout]] = None, **enum_kwargs) -> PlanResult:
    """Evaluate every candidate layout; the best is the fastest that fits (within 0.5%: the one with the least
    memory)."""
    wl = wl or default_workload(cfg)
    calib = calib or calibration()
    layouts = list(layouts) if layouts is not None else enumerate_layouts(
        cfg, cl.world_size, cl.gpus_per_node, wl.global_batch, **enum_kwargs)
    st = structures(cfg)
    specs = set()
    for lay in layouts:
        for r in range(lay.pp):
            specs.update(rank_chunks(apply_layout(cfg, lay), lay, r))
    st.ensure(specs)
    ests = [estimate(cfg, lay, cl, wl, calib, st) for lay in layouts]
    ests.sort(key=lambda e: (not e.fits, e.step_s, e.memory_gib))
    best = None
    if ests and ests[0].fits:
        # layouts within TIE of the fastest are equally fast for this model: take the one with the most headroom
        near = [e for e in ests if e.fits and e.step_s <= ests[0].step_s * (1 + TIE)]
        best = min(near, key=lambda e: (e.memory_gib, e.step_s))
        ests.remove(best)
        ests.insert(0, best)
    return PlanResult(cfg, cl, wl, ests, best, calib)


def why_loses(e: Estimate, best: Estimate, cl: Cluster) -> str:
    """One line: the main reason ``e`` is not the recommendation."""
    if not e.fits:
        worst = max(e.memory_by_stage, key=lambda s: s["total"])
        parts = sorted(((k, worst[k]) for k in ("params", "grads", "optimizer", "activations", "workspace")),
                       key=lambda kv: -kv[1])
        top = ", ".join(f"{k} {v:.1f}" for k, v in parts[:3])
        return f"out of memory: {e.memory_gib:.1f} GiB > {cl.usable_gib:.1f} usable ({top})"
    slower = e.step_s / best.step_s - 1
    if slower <= TIE:
        return (f"as fast ({100 * slower:+.1f}%) but needs {e.memory_gib:.1f} GiB vs {best.memory_gib:.1f}: "
                f"less headroom")
    diffs = {k: e.time[k] - best.time.get(k, 0.0) for k in e.time}
    k = max(diffs, key=diffs.get)
    compute = ("recompute" if e.layout.recompute != "none" else
               "unbalanced stages (stage 0 also runs the ViT, the last the logits)" if e.layout.pp > 1 else
               "compute (GEMM efficiency at this micro-batch size)")
    names = {"compute": compute, "bubble": "pipeline bubble",
             "tp_comm": "TP communication", "pp_comm": "pipeline p2p", "dp_comm": "DP communication",
             "optimizer": "optimizer step (less sharding)"}
    return f"{100 * slower:+.1f}% step time, mostly {names[k]} (+{1000 * diffs[k]:.0f} ms)"


def format_plan(res: PlanResult, top: int = 12) -> str:
    cfg, cl, wl = res.cfg, res.cluster, res.workload
    m = cfg.model
    lines = []
    method = "full" if cfg.lora.rank == 0 else f"{'QLoRA' if cfg.lora.quantize else 'LoRA'}-{cfg.lora.rank}"
    stage = 2 if m.train_llm else 1
    lines.append(f"model: {m.num_layers} layers, h {m.hidden_size}, ffn {m.ffn_hidden_size}, heads "
                 f"{m.num_attention_heads}/{m.num_query_groups or m.num_attention_heads}, ViT {m.vision.image_size}px, "
                 f"projector {m.projector}; stage {stage}, {method}; global batch {wl.global_batch}, seq "
                 f"{wl.seq_length} ({wl.tokens_per_sample} tokens/sample, {wl.images_per_sample:g} images/sample)")
    lines.append(f"cluster: {cl.nodes} x {cl.gpus_per_node} {cl.gpu.name} ({cl.gpu.memory_gib:g} GiB, "
                 f"{cl.usable_gib:.1f} usable; {cl.gpu.peak_tflops:g} TFLOP/s; NVLink {cl.gpu.nvlink_gb_s:g} GB/s, "
                 f"inter-node {cl.gpu.internode_gb_s:g} GB/s per GPU); efficiency "
                 f"{100 * res.calib.compute_efficiency:.1f}% of peak ({res.calib.source})")
    lines.append(f"{len(res.estimates)} layouts, {len(res.fitting())} fit")
    if res.best is None:
        lines.append("NOTHING FITS. Closest:")
        for e in sorted(res.estimates, key=lambda e: e.memory_gib)[:5]:
            lines.append(f"  {e.layout.label():40s} {e.memory_gib:7.1f} GiB  ({why_loses(e, e, cl)})")
        return "\n".join(lines)
    b = res.best
    lines.append("")
    lines.append(f"RECOMMENDED: {b.layout.label()}")
    lines.append(f"  step {b.step_s:.3f} s ({b.microbatches} micro-batches), {b.tokens_per_s:,.0f} tokens/s, "
                 f"{b.tokens_per_s / b.layout.gpus:,.0f} tokens/s/GPU, MFU {100 * b.mfu:.1f}% (HFU "
                 f"{100 * b.hfu:.1f}%), peak {b.memory_gib:.1f} GiB/GPU")
    lines.append("  time: " + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in b.time.items() if v > 0))
    worst = max(b.memory_by_stage, key=lambda s: s["total"])
    lines.append("  memory (most loaded stage): " + ", ".join(
        f"{k} {worst[k]:.1f}" for k in ("params", "grads", "optimizer", "activations", "workspace"))
        + f" GiB, {worst['in_flight']} micro-batches in flight")
    lines.append("  overrides: " + " ".join(b.layout.overrides()))
    lines.append("")
    lines.append(f"{'layout':44s} {'GiB':>7s} {'step s':>8s} {'tok/s/GPU':>10s} {'MFU':>6s}  why not")
    # one row per TP x PP x VPP shape; at one given shape (--tp/--pp/--dp), one per micro-batch x recompute
    one_shape = len({(e.layout.tp, e.layout.pp, e.layout.vpp, e.layout.dp) for e in res.estimates}) == 1

    def key_of(lay):
        return (lay.micro_batch, lay.recompute, lay.recompute_modules) if one_shape else (lay.tp, lay.pp, lay.vpp)

    shown = {key_of(b.layout)}
    rows = []
    for e in res.estimates:
        key = key_of(e.layout)
        if key in shown or e is b:
            continue
        shown.add(key)
        rows.append(e)
    for e in rows[:top]:
        lines.append(f"{e.layout.label():44s} {e.memory_gib:7.1f} {e.step_s:8.3f} "
                     f"{e.tokens_per_s / e.layout.gpus:10,.0f} {100 * e.mfu:5.1f}%  {why_loses(e, b, cl)}")
    return "\n".join(lines)


def gpu_hours(e: Estimate, samples: int, global_batch: int) -> float:
    steps = math.ceil(samples / global_batch)
    return steps * e.step_s * e.layout.gpus / 3600


# ------------------------------------------------------------------------------------------------------------------
# One given layout; full / LoRA / QLoRA side by side
# ------------------------------------------------------------------------------------------------------------------

# --recompute names -> (train.recompute, train.recompute_modules)
RECOMPUTE_CHOICES = {"none": ("none", ("core_attn",)), "core_attn": ("selective", ("core_attn",)),
                     "core_attn+mlp": ("selective", ("core_attn", "mlp")), "full": ("full", ("core_attn",))}


def layout_problems(cfg, layout: Layout) -> List[str]:
    """What the trainer's own validation (``config.validate``) says of ``cfg`` at ``layout``; data and checkpoint
    paths are left out (a plan reads neither)."""
    c = apply_layout(cfg, layout)
    c.data.source, c.data.valid_sources, c.train.eval_interval = "synthetic", [], 0
    c.checkpoint = C.CheckpointConfig()
    try:
        C.validate(c, layout.gpus)
    except C.ConfigError as e:
        return list(e.problems)
    return []


def fixed_layouts(cfg, tp: int = 1, pp: int = 1, vpp: Optional[int] = None, dp: int = 1,
                  micro_batches: Optional[Sequence[int]] = None, recompute: Optional[Sequence[str]] = None,
                  global_batch: Optional[int] = None) -> List[Layout]:
    """Every way to run exactly TP x PP x VPP x DP: each micro-batch size (default 1-16, those dividing the global
    batch per DP rank) x each recompute setting (default all of ``RECOMPUTE_CHOICES``), with sequence parallelism
    when tp > 1 and overlapped DP communication when dp > 1, as the trainer runs them; a pipeline split that is not
    even is the trainer's balanced one (stage 0 fewest). Raises ValueError with the trainer's reasons when the
    config cannot run at this layout."""
    gb = global_batch or cfg.train.global_batch_size
    L = cfg.model.num_layers
    chunks = pp * (vpp or 1)
    split = tuple(C.balanced_split(L, chunks)) if pp > 1 and L >= chunks and L % chunks else None
    out: List[Layout] = []
    problems: List[str] = []
    for mb in micro_batches or (1, 2, 4, 8, 16):
        if gb % (mb * dp):
            if micro_batches:
                problems.append(f"train.micro_batch_size={mb} x dp {dp} does not divide the global batch {gb}")
            continue
        for name in recompute or RECOMPUTE_CHOICES:
            rc, mods = RECOMPUTE_CHOICES[name]
            lay = Layout(tp, pp, vpp, dp, mb, rc, mods, tp > 1, split, True, dp > 1)
            why = layout_problems(cfg, lay)
            problems += [w for w in why if w not in problems]
            if not why:
                out.append(lay)
    if not out:
        raise ValueError(f"TP{tp} PP{pp}" + (f" VPP{vpp}" if vpp else "") + f" DP{dp} cannot run this config: "
                         + ("; ".join(problems) or f"no micro-batch size divides the global batch {gb} / dp {dp}"))
    return out


def model_params(cfg, layout: Layout, structure: Optional[StructureCache] = None) -> Tuple[int, int]:
    """(parameters, trainable parameters) of the whole model: TP 1 counts summed over its pipeline chunks (the
    paper's count: LoRA-64 on every linear of 33B = 0.49B trainable)."""
    st = structure or structures(cfg)
    total = trainable = 0
    for r in range(layout.pp):
        for spec in rank_chunks(cfg, layout, r):
            for p in st.get(*spec):
                total += p.numel
                trainable += p.numel if p.trainable else 0
    return total, trainable


def static_by_rank(cfg, layout: Layout, structure: Optional[StructureCache] = None) -> List[dict]:
    """``static_memory`` (bytes) of every pipeline rank, for DP rank 0 and the last DP rank (which owns the
    distributed optimizer's padding, so its shard can be smaller); TP ranks hold the same bytes."""
    st = structure or structures(cfg)
    out = []
    for r in range(layout.pp):
        for d in sorted({0, layout.dp - 1}):
            sm = static_memory(cfg, layout, r, d, st)
            out.append({"pp_rank": r, "dp_rank": d, "params_bytes": sm.params, "grads_bytes": sm.grads,
                        "optimizer_bytes": sm.optimizer, "total_bytes": sm.total, "trainable": sm.trainable,
                        "params": sm.total_params, "nf4_bytes": sm.nf4, "nf4_params": sm.nf4_params})
    return out


def compare_methods(cfgs: Dict[str, C.Config], cl: Cluster, layouts=None, workload=None,
                    calib: Optional[Calibration] = None) -> List[dict]:
    """One row per method (``{"full": cfg, "lora-64": cfg, ...}``): trainable parameters of the whole model and per
    GPU, and the exact weight / grad / optimizer bytes of the most loaded GPU, at ``layouts(cfg)`` (a fixed
    TP/PP/DP: its micro-batch and recompute choices) or, when None, at the layout the planner recommends for that
    method; plus that layout's predicted peak memory and speed. Everything is computed from meta-device builds:
    nothing is allocated."""
    calib = calib or calibration()
    rows = []
    for method, cfg in cfgs.items():
        wl = workload(cfg) if workload else default_workload(cfg)
        res = plan(cfg, cl, wl, calib, layouts=layouts(cfg) if layouts else None)
        e = res.best or min(res.estimates, key=lambda x: x.memory_gib)
        st = structures(cfg)
        c = apply_layout(cfg, e.layout)
        ranks = static_by_rank(c, e.layout, st)
        worst = max(ranks, key=lambda x: x["total_bytes"])
        total, trainable = model_params(c, e.layout, st)
        nf4_b, nf4_n = worst["nf4_bytes"], worst["nf4_params"]
        rows.append({"method": method, "global_batch": wl.global_batch, "layout": e.layout.label(),
                     "layout_fields": dataclasses.asdict(e.layout), "overrides": e.layout.overrides(),
                     "gpus": e.layout.gpus, "params": total, "trainable": trainable, "ranks": ranks,
                     "most_loaded": worst, "nf4_bytes_per_param": nf4_b / nf4_n if nf4_n else None,
                     "fits": e.fits, "peak_gib": e.memory_gib, "step_s": e.step_s,
                     "tokens_per_s_per_gpu": e.tokens_per_s / e.layout.gpus, "layouts_evaluated": len(res.estimates),
                     "layouts_fit": len(res.fitting())})
    return rows


def _billions(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e8 else f"{n / 1e6:.3g}M" if n >= 1e5 else f"{n:,}"


def format_methods(rows: List[dict], cl: Cluster, fixed: Optional[str] = None) -> str:
    """The per-method table: trainable parameters, per-GPU weights / grads / optimizer states (GiB of the exact
    bytes; ``--json`` has the bytes), then the layout's predicted peak and speed."""
    where = (f"at {fixed}" if fixed else "at each method's recommended layout") + \
        f" on {cl.nodes} x {cl.gpus_per_node} {cl.gpu.name} ({cl.usable_gib:.1f} GiB usable)"
    lines = [f"Trainable parameters and memory by method {where}; per GPU = the most loaded rank (GiB = 2^30 "
             f"bytes; exact bytes: --json)",
             f"{'method':10s} {'trainable (whole model)':>27s} {'per GPU':>8s} {'weights':>8s} {'grads':>7s} "
             f"{'optim':>7s} {'W+G+O':>7s} | {'layout (best micro-batch, recompute)':38s} {'peak':>6s} {'fits':>4s} "
             f"{'tok/s/GPU':>9s}"]
    for r in rows:
        w = r["most_loaded"]
        trained = f"{r['trainable']:,} ({_billions(r['trainable'])})"
        lines.append(f"{r['method']:10s} {trained:>27s} {_billions(w['trainable']):>8s} "
                     f"{w['params_bytes'] / GIB:8.2f} {w['grads_bytes'] / GIB:7.2f} {w['optimizer_bytes'] / GIB:7.2f} "
                     f"{w['total_bytes'] / GIB:7.2f} | {r['layout']:38s} {r['peak_gib']:6.1f} "
                     f"{'yes' if r['fits'] else 'NO':>4s} {r['tokens_per_s_per_gpu']:9,.0f}")
    for r in rows:
        if r["nf4_bytes_per_param"]:
            w = r["most_loaded"]
            lines.append(f"{r['method']}: NF4 bases {w['nf4_bytes'] / GIB:.2f} GiB for {_billions(w['nf4_params'])} "
                         f"base parameters on that GPU = {r['nf4_bytes_per_param']:.3f} bytes/parameter")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# Measuring what the planner predicts (tests; calibration on a real machine)
# ------------------------------------------------------------------------------------------------------------------

class SavedTensorBytes:
    """Context manager: bytes of the distinct storages autograd saves for backward while it is active (parameters
    excluded), i.e. the activation memory a forward pass leaves behind.

        with SavedTensorBytes(model.parameters()) as saved:
            loss = model(...)
        saved.bytes
    """

    def __init__(self, params=()):
        import torch
        self._exclude = {p.untyped_storage().data_ptr() for p in params}
        self.storages: Dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _pack(self, t):
        try:
            s = t.untyped_storage()
            ptr = s.data_ptr()
            if ptr not in self._exclude and ptr != 0:
                self.storages[ptr] = s.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def measured_static_bytes(model, optimizer) -> Dict[str, int]:
    """Bytes of the distinct storages behind a built, wrapped and stepped model on this rank: parameters (and their
    DDP param buffer), DDP main_grad buffers, optimizer state (Adam moments, steps, fp32 master copies) and QLoRA's
    NF4 bases. Storages are counted once however many tensors view them."""
    import torch
    from megallava.training.optimizer import torch_adams
    seen: Dict[int, int] = {}
    parts = {"params": 0, "grads": 0, "optimizer": 0}

    def add(part, t):
        if t is None or not isinstance(t, torch.Tensor):
            return
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if s.nbytes() == 0 or ptr in seen:
            return
        seen[ptr] = s.nbytes()
        parts[part] += s.nbytes()

    for ddp in model:
        for buf in getattr(ddp, "buffers", []):
            add("params", buf.param_data)
            add("grads", buf.grad_data)
        for p in ddp.module.parameters():
            add("params", p.data)
            add("grads", getattr(p, "main_grad", None))
        for mod in ddp.module.modules():
            q = getattr(mod, "quantized", None)
            if q is not None:
                for t in (q.packed, q.absmax_codes, q.absmax2, q.offset):
                    add("params", t)
    for adam in torch_adams(optimizer):
        for group in adam.param_groups:
            for p in group["params"]:
                add("optimizer", p.data)
        for state in adam.state.values():
            for t in state.values():
                add("optimizer", t)
    parts["total"] = sum(parts.values())
    return parts


# ------------------------------------------------------------------------------------------------------------------
# The paper's grid as ready configs
# ------------------------------------------------------------------------------------------------------------------

PAPER_METHODS = ("full", "lora-8", "lora-64", "qlora-64")


def paper_grid() -> List[dict]:
    """Every setting of the paper's grid: (model, stage, image size, ShareGPT mix, method)."""
    out = []
    for model in MODELS:
        for size in (224, 336):
            out.append(dict(model=model, stage=1, image_size=size, sharegpt=False, method="full"))
            for mix in (False, True):
                for method in PAPER_METHODS:
                    out.append(dict(model=model, stage=2, image_size=size, sharegpt=mix, method=method))
    return out


def paper_config_name(s: dict) -> str:
    if s["stage"] == 1:
        return f"llava-{s['model']}-stage1-{s['image_size']}px.yaml"
    return (f"llava-{s['model']}-stage2-{s['image_size']}px-{'sharegpt-' if s['sharegpt'] else ''}"
            f"{s['method']}.yaml")


def paper_nodes(s: dict) -> int:
    kind = parse_method(s["method"])[0]
    return PAPER_NODES["full" if kind == "full" else "lora"][s["model"]]


def _yaml_value(v):
    import yaml
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def render_paper_config(s: dict, res: PlanResult, path: str = "THIS_FILE") -> str:
    """One YAML file: a header comment (setting, recommended layout and why, launch commands for SLURM and torchrun,
    placeholders) and the keys that differ from the defaults plus the layout. ``path``: the file, as the launch
    commands name it."""
    import yaml
    cfg = apply_layout(res.cfg, res.best.layout) if res.best else res.cfg
    b = res.best
    kind, rank, quant = parse_method(s["method"])
    method = {"full": "full fine-tuning" if s["stage"] == 2 else "projector only",
              "lora": f"LoRA r{rank} (alpha {2 * rank})", "qlora": f"QLoRA r{rank} (alpha {2 * rank}, NF4 bases)"}[kind]
    cl = res.cluster
    nodes = cl.nodes
    lines = [f"# LLaVA-{s['model'].upper()} ({BASE_LLM[s['model']]} + CLIP ViT-L/14-{s['image_size']} + linear "
             f"projector), stage {s['stage']}: {method}",
             f"# {'LLaVA-80K + ShareGPT (0.8 / 0.2)' if s['sharegpt'] else ('LCS-558K captions' if s['stage'] == 1 else 'LLaVA-80K')}"
             f", seq 2048, lr {cfg.train.lr:g}, global batch {cfg.train.global_batch_size}, one epoch = "
             f"{cfg.train.iters} iterations (the paper's recipe, REFERENCE.md section 1).",
             f"# Generated by `python -m megallava.plan paper-configs` for {nodes} node(s) x 8 A100-80GB."]
    if b:
        lines.append(f"# Planner's layout: {b.layout.label()}: predicted {b.memory_gib:.1f} GiB/GPU "
                     f"(of {cl.usable_gib:.0f} usable),")
        lines.append(f"#   {b.step_s:.2f} s/step, {b.tokens_per_s / b.layout.gpus:,.0f} tokens/s/GPU at full "
                     f"2048-token samples, MFU {100 * b.mfu:.0f}% (executed FLOPs: {100 * b.hfu:.0f}% of peak).")
        runners = [e for e in res.estimates if e.fits and e is not b][:1]
        oom = [e for e in res.estimates if not e.fits]
        if runners:
            lines.append(f"#   runner-up {runners[0].layout.label()}: {why_loses(runners[0], b, cl)}")
        if oom:
            small = min(oom, key=lambda e: e.layout.tp * e.layout.pp)
            lines.append(f"#   {small.layout.label()}: {why_loses(small, b, cl)}")
    else:
        lines.append("# The planner finds no layout that fits on these nodes.")
    start = ("checkpoints/" + s["model"] + "-base-megallava") if s["stage"] == 1 else \
        f"checkpoints/llava-{s['model']}-stage1-{s['image_size']}px"
    lines += [f"# Launch on SLURM ({nodes} node(s) x 8 GPUs, one task per GPU; see examples/slurm/train.sbatch):",
              f"#   sbatch --nodes={nodes} examples/slurm/train.sbatch {path}",
              "#   (checkpoint.load=auto resumes the job's own checkpoints after a requeue; the first start, with "
              "none yet,",
              "#   takes the weights of checkpoint.pretrained, as a fine-tune: iteration 1, fresh optimizer and "
              "schedule.)",
              f"# Or with torchrun on each node: torchrun --nnodes {nodes} --nproc-per-node 8 --node-rank $NODE_RANK "
              f"--master-addr $MASTER",
              f"#   --master-port 29500 -m megallava.train --config {path}",
              "# PLACEHOLDERS to replace: data.sources[*].path (shards from tools/make_shards.py), data.tokenizer,",
              "# checkpoint.pretrained (stage 1: the LLM + CLIP converted with tools/convert_checkpoint.py "
              "hf-to-megatron;",
              "# stage 2: the stage-1 checkpoint), checkpoint.dir and train.run_dir (train.sbatch sets both per job);",
              "# train.iters = samples / global batch."]
    d = C.to_dict(cfg)
    default = C.to_dict(C.Config())
    body = {}
    for section in ("model", "parallel", "train", "lora", "data", "checkpoint"):
        diff = {}
        for k, v in d[section].items():
            if k in ("vision",):
                vd = {kk: vv for kk, vv in v.items() if vv != default[section][k][kk]}
                if vd:
                    diff[k] = vd
            elif v != default[section][k] or (section == "parallel" and k in ("tp", "pp", "vpp")):
                diff[k] = v
        if section == "train":
            for k in ("iters", "lr", "min_lr", "lr_warmup_fraction", "lr_decay_style", "weight_decay"):
                diff[k] = d[section][k]
            diff["run_dir"] = f"runs/{paper_config_name(s)[:-5]}"
            diff = {k: diff[k] for k in d[section] if k in diff}
        if section == "checkpoint":
            # auto: a requeue resumes this run's checkpoints; the first start takes the weights of pretrained with
            # finetune semantics (stage 2 after stage 1's last iteration needs them; for stage 1's converted base
            # it is what happens anyway)
            diff = {"dir": f"checkpoints/{paper_config_name(s)[:-5]}", "interval": 500, "keep": 2, "load": "auto",
                    "pretrained": start}
        if section == "lora" and cfg.lora.rank == 0:
            continue
        if diff:
            body[section] = diff
    text = yaml.safe_dump(body, sort_keys=False, default_flow_style=False, width=120)
    return "\n".join(lines) + "\n" + text


def write_paper_configs(out_dir: str, gpu: str = "a100-80gb", tokens_per_sample: Optional[int] = None,
                        log=print) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for s in paper_grid():
        cfg = workload_config(s["model"], s["stage"], s["method"], image_size=s["image_size"], sharegpt=s["sharegpt"])
        cl = cluster(gpu, nodes=paper_nodes(s))
        res = plan(cfg, cl, default_workload(cfg, tokens_per_sample))
        path = os.path.join(out_dir, paper_config_name(s))
        with open(path, "w") as f:
            f.write(render_paper_config(s, res, os.path.normpath(path)))
        written.append(path)
        if log:
            log(f"{path}: {res.best.layout.label() if res.best else 'nothing fits'}")
    return written


# ------------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------------

def _parser():
    p = argparse.ArgumentParser(prog="python -m megallava.plan", description=(
        "Recommend the fastest TP/PP/VPP/DP/micro-batch/recompute layout that fits. Examples:\n"
        "  python -m megallava.plan --model 33b --method qlora-64 --nodes 1 --gpu a100-80gb\n"
        "  python -m megallava.plan --config run.yaml --nodes 4 --gpu h100-80gb\n"
        "  python -m megallava.plan --model 65b --method lora-64 --nodes 2 --zero 2   # DeepSpeed ZeRO-2 memory\n"
        "  python -m megallava.plan --model 33b --method full,lora-64,qlora-64 --tp 2 --pp 2 --dp 2   # one layout\n"
        "  python -m megallava.plan paper-configs --out examples/configs/paper"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="plan", choices=("plan", "paper-configs"))
    p.add_argument("--config", help="a megallava YAML config (its model, lora, train and data sections)")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to --config / the preset")
    p.add_argument("--model", default="7b", choices=sorted(MODELS), help="preset LLM (without --config)")
    p.add_argument("--stage", type=int, default=2, choices=(1, 2))
    p.add_argument("--method", help="full | lora-R | qlora-R (e.g. lora-64, qlora-64), or a comma list "
                                    "(full,lora-64,qlora-64): a table of trainable parameters and per-GPU weight, "
                                    "grad and optimizer memory per method (default: full, or --config's own)")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--image-size", type=int, default=336, choices=(224, 336))
    p.add_argument("--projector", default="linear", choices=("linear", "mlp2x_gelu"))
    p.add_argument("--global-batch", type=int, help="default: the paper's (512 full, 64 LoRA, 256 stage 1)")
    p.add_argument("--tokens-per-sample", type=int, help="average unpadded tokens per sample (default: seq length)")
    p.add_argument("--images-per-sample", type=float)
    p.add_argument("--samples", type=int, default=80000, help="samples per epoch for the GPU-hour estimate")
    p.add_argument("--gpu", default="a100-80gb", choices=sorted(GPUS))
    p.add_argument("--nodes", type=int, help="default 1, or enough for --tp x --pp x --dp")
    g = p.add_argument_group("a given layout (instead of searching every one)")
    g.add_argument("--tp", type=int, help="tensor-parallel size")
    g.add_argument("--pp", type=int, help="pipeline-parallel size (default 1)")
    g.add_argument("--vpp", type=int, help="virtual pipeline chunks per pipeline rank (interleaved 1F1B)")
    g.add_argument("--dp", type=int, help="data-parallel size (default: the GPUs / (tp x pp))")
    g.add_argument("--micro-batch", type=int, help="default: the fastest of 1-16 that fits")
    g.add_argument("--recompute", choices=sorted(RECOMPUTE_CHOICES), help="default: the fastest that fits")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nvlink-gbps", type=float, help="intra-node bus bandwidth per GPU, GB/s")
    p.add_argument("--internode-gbps", type=float, help="inter-node bus bandwidth per GPU, GB/s")
    p.add_argument("--memory-gib", type=float, help="override the GPU memory")
    p.add_argument("--zero", type=int, choices=(2, 3), help="also report DeepSpeed ZeRO-2/3 memory (data parallel)")
    p.add_argument("--top", type=int, default=12, help="other layouts to list")
    p.add_argument("--json", help="write every estimate to this JSON file")
    p.add_argument("--out", default="examples/configs/paper", help="paper-configs: output directory")
    return p


def _method_configs(args) -> Dict[str, C.Config]:
    """{method: config}: the preset (or --config) once per --method entry."""
    methods = [m.strip() for m in (args.method or "").split(",") if m.strip()]
    if args.config and not methods:
        return {"config": C.load_config(args.config, args.overrides)}
    out = {}
    for method in methods or ["full"]:
        kind, rank, quant = parse_method(method)
        if args.config:
            cfg = C.load_config(args.config, args.overrides)
            cfg.lora.rank, cfg.lora.quantize = rank, quant
        else:
            cfg = workload_config(args.model, args.stage, method, args.seq_length, args.image_size,
                                  projector=args.projector, global_batch=args.global_batch)
            for o in args.overrides:
                C._apply_override(cfg, o, problems := [])
                if problems:
                    raise SystemExit("\n".join(problems))
        if args.global_batch:
            cfg.train.global_batch_size = args.global_batch
        out[method] = cfg
    return out


def _fixed(args) -> Optional[dict]:
    """The given layout (--tp/--pp/--vpp/--dp/--micro-batch/--recompute), or None to search every layout; sets
    args.nodes when only the layout says how many GPUs there are."""
    keys = ("tp", "pp", "vpp", "dp", "micro_batch", "recompute")
    if all(getattr(args, k) is None for k in keys):
        args.nodes = args.nodes or 1
        return None
    tp, pp = args.tp or 1, args.pp or 1
    if args.dp is None:
        world = (args.nodes or 1) * args.gpus_per_node
        if world % (tp * pp):
            raise SystemExit(f"--tp {tp} x --pp {pp} does not divide the {world} GPUs of {args.nodes or 1} node(s): "
                             f"give --dp or --nodes")
        dp = world // (tp * pp)
        args.nodes = args.nodes or 1
    else:
        dp = args.dp
        need = -(-tp * pp * dp // args.gpus_per_node)
        if args.nodes is not None and args.nodes < need:
            raise SystemExit(f"TP{tp} x PP{pp} x DP{dp} = {tp * pp * dp} GPUs do not fit on {args.nodes} node(s) of "
                             f"{args.gpus_per_node}")
        args.nodes = args.nodes or need
    return {"tp": tp, "pp": pp, "vpp": args.vpp, "dp": dp,
            "micro_batches": [args.micro_batch] if args.micro_batch else None,
            "recompute": [args.recompute] if args.recompute else None}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "paper-configs":
        write_paper_configs(args.out, args.gpu, args.tokens_per_sample)
        return 0
    cfgs = _method_configs(args)
    fixed = _fixed(args)
    cl = cluster(args.gpu, args.nodes, args.gpus_per_node, args.nvlink_gbps, args.internode_gbps, args.memory_gib)

    def workload(cfg):
        return default_workload(cfg, args.tokens_per_sample, args.images_per_sample)

    def layouts(cfg):
        try:
            return fixed_layouts(cfg, global_batch=workload(cfg).global_batch, **fixed)
        except ValueError as e:
            raise SystemExit(f"megallava.plan: {e}")

    out = {}
    if len(cfgs) > 1:
        rows = compare_methods(cfgs, cl, layouts if fixed else None, workload)
        label = None
        if fixed:
            label = f"TP{fixed['tp']} PP{fixed['pp']}" + (f" VPP{fixed['vpp']}" if fixed["vpp"] else "") + \
                f" DP{fixed['dp']}"
        print(format_methods(rows, cl, label))
        out["methods"] = rows
    else:
        (method, cfg), = cfgs.items()
        wl = workload(cfg)
        res = plan(cfg, cl, wl, layouts=layouts(cfg) if fixed else None)
        print(format_plan(res, args.top))
        if res.best:
            hours = gpu_hours(res.best, args.samples, wl.global_batch)
            print(f"\n{args.samples:,} samples (one epoch) at {wl.tokens_per_sample} tokens/sample: "
                  f"{hours:.1f} GPU-hours = {hours / cl.gpus_per_node:.2f} node-hours, "
                  f"{hours / res.best.layout.gpus:.2f} h wall on {res.best.layout.gpus} GPUs")
        if fixed:
            rows = compare_methods(cfgs, cl, layouts, workload, res.calib)
            print()
            print(format_methods(rows, cl, res.best.layout.label() if res.best else None))
            out["methods"] = rows
        out.update({"best": res.best.to_dict() if res.best else None,
                    "estimates": [e.to_dict() for e in res.estimates]})
    if args.zero:
        for method, cfg in cfgs.items():
            z = zero_memory_gib(cfg, args.zero, cl.world_size)
            verdict = "fits" if z["total"] <= cl.usable_gib else "OUT OF MEMORY"
            print(f"\n{method}: DeepSpeed ZeRO-{args.zero} on {cl.world_size} GPUs (mb 1, gradient checkpointing): "
                  f"{z['total']:.1f} GiB/GPU ({verdict}; weights {z['weights']:.1f}, grads {z['grads']:.1f}, "
                  f"optimizer {z['optimizer']:.1f}, activations {z['activations'] + z['workspace']:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
