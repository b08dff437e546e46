"""Typed run configuration: YAML file + dotted ``key=value`` overrides, validated before any rank works.

Every key a user can set lives in one of the dataclasses below; ``validate()`` collects every problem at once
and names the fix, so a bad config fails in one message before a model is built.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Union

import yaml


@dataclass
class VisionConfig:
    """CLIP ViT (HF CLIPVisionModel semantics). The LLM sees the output of layer ``num_layers + select_layer + 1``
    (select_layer -2 = penultimate), CLS token dropped; later layers are not built."""
    image_size: int = 336
    patch_size: int = 14
    num_layers: int = 24
    hidden_size: int = 1024
    ffn_hidden_size: int = 4096
    num_attention_heads: int = 16
    layer_norm_eps: float = 1e-5
    select_layer: int = -2
    num_channels: int = 3


@dataclass
class ModelConfig:
    """LLaMA-family decoder + vision tower + projector."""
    num_layers: int = 32
    hidden_size: int = 4096
    ffn_hidden_size: int = 11008
    num_attention_heads: int = 32
    num_query_groups: Optional[int] = None          # GQA kv heads; None = num_attention_heads (MHA)
    vocab_size: int = 32000
    make_vocab_size_divisible_by: int = 128          # padded vocab is a multiple of this x tp
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    init_std: float = 0.02
    image_token_id: int = -200                       # placeholder id in input_ids (LLaVA's IMAGE_TOKEN_INDEX)
    projector: str = "mlp2x_gelu"                    # "linear" | "mlp2x_gelu"
    vision: VisionConfig = field(default_factory=VisionConfig)
    train_vision: bool = False                       # ViT frozen by default (LLaVA)
    train_projector: bool = True
    train_llm: bool = True                           # False = stage 1 (projector alignment)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None                        # virtual pipeline chunks per pp rank (interleaved 1F1B)
    sequence_parallel: bool = False
    pipeline_layers: Optional[List[int]] = None      # LLM layers per (virtual) stage, in layer order; len = pp*vpp
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False                # DP grad reduce-scatter/all-reduce overlapped with backward
    overlap_param_gather: bool = False               # distributed optimizer's param all-gather overlapped with forward


@dataclass
class TrainConfig:
    iters: int = 10
    micro_batch_size: int = 1
    global_batch_size: int = 8
    lr: float = 2e-5
    min_lr: float = 0.0
    lr_warmup_fraction: float = 0.03                 # of train.iters (LLaVA: 3% warm-up)
    lr_decay_style: str = "cosine"                   # "cosine" | "linear" | "constant"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    precision: str = "auto"                          # "auto" (bf16 on GPU, fp32 on CPU) | "bf16" | "fp32"
    run_dir: str = "runs/default"
    log_interval: int = 1
    exit_interval: Optional[int] = None              # stop (and save) after this iteration; schedule spans iters
    eval_interval: int = 0                           # validation loss on data.valid_sources every N iterations (0: off)
    eval_iters: int = 1                              # global batches per validation (the same ones every time)
    peak_tflops: Optional[float] = None              # per-GPU peak for MFU; None = detect (H100/H200 989, A100 312)
    master_weights: bool = True                      # bf16: fp32 master weights + fp32 Adam states (false: all bf16)
    grad_reduce_in_fp32: Optional[bool] = None       # fp32 main grads / DP reduction; null = same as master_weights
    recompute: str = "none"                          # activation recompute: "none" | "selective" | "full"
    recompute_modules: List[str] = field(default_factory=lambda: ["core_attn"])  # selective: megatron's modules
    fault_timeout_s: float = 60.0                    # longest wait on a peer (collective timeout) once running; a
                                                     # step this much slower than the slowest so far ends the rank
    startup_timeout_s: float = 900.0                 # rendezvous, preflight, build, checkpoint load, first iteration


@dataclass
class LoRAConfig:
    """LoRA / QLoRA on the LLM's linears (megallava.model.lora); the projector stays fully trained, the ViT, the
    embedding and the output layer frozen (the paper's setting)."""
    rank: int = 0                                    # 0 = full fine-tuning; the paper: 8 or 64
    alpha: Optional[float] = None                    # null = 2 x rank (the paper's choice; scale = alpha / rank)
    dropout: float = 0.0
    targets: List[str] = field(default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    quantize: bool = False                           # QLoRA: frozen base weights in NF4 (4-bit, double-quantised)


@dataclass
class KernelsConfig:
    """Fused paths, each switchable and each equal to the reference path it replaces (tests/test_kernels.py).
    null = auto: on with CUDA, off on CPU (compiling costs more there than it saves)."""
    fused_rmsnorm: Optional[bool] = None             # torch.compile'd RMSNorm
    fused_swiglu: Optional[bool] = None              # megatron's compiled SwiGLU (bias_activation_fusion)
    fused_rope: Optional[bool] = None                # compiled RoPE in megatron's apply_rope_fusion slot
    fused_cross_entropy: Optional[bool] = None       # chunked output layer + CE: never holds the full fp32 logits
    cross_entropy_chunk: int = 4096                  # tokens per chunk of the fused cross-entropy
    fused_adam: Optional[bool] = None                # torch's fused AdamW step (apex/TE's own when installed)
    flex_attention: Optional[bool] = None            # packed rows: FlexAttention block mask (null: with CUDA and no
                                                     # recompute), not a dense [b, 1, s, s] mask


@dataclass
class SourceConfig:
    """One shard directory (tools/make_shards.py output) in the data mix."""
    path: str = ""                                   # directory holding manifest.json and the .tar shards
    weight: float = 1.0                              # relative share of samples drawn from this source
    template: str = "vicuna_v1"                      # conversation template (megallava.data.templates.TEMPLATES)
    name: Optional[str] = None                       # label in metrics; default: the manifest's source name


@dataclass
class DataConfig:
    source: str = "synthetic"                        # "synthetic" | "shards" (webdataset shards, data.sources)
    seq_length: int = 2048
    num_samples: int = 100000                        # synthetic epoch size
    text_only_fraction: float = 0.25                 # synthetic: share of language-only samples
    max_images_per_sample: int = 1                   # synthetic: images per multimodal sample (1..n)
    sources: List[SourceConfig] = field(default_factory=list)  # shards: the mix, e.g. [{path: shards/x, weight: 0.8}]
    valid_sources: List[SourceConfig] = field(default_factory=list)  # held-out shards for train.eval_interval
    tokenizer: Optional[str] = None                  # shards: sentencepiece .model file or HF tokenizer directory
    image_mode: str = "pad"                          # shards: "pad" (LLaVA expand-to-square) | "resize"
    num_workers: int = 2                             # shards: DataLoader worker processes per data iterator
    overlong: str = "truncate"                       # shards: "truncate" (never through an image) | "drop"
    packing: bool = False                            # several whole samples per row, attention kept per sample
    shuffle: bool = True                             # shards: a seeded permutation of each source per epoch
    max_skip_fraction: float = 0.01                  # stop when more of the samples read are skipped (after 100)


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    interval: int = 0                                # 0 = only at the end (when dir is set)
    load: Optional[str] = None                       # a checkpoint root (uses its `latest`), one iter_N dir, or
                                                     # "auto": checkpoint.dir's latest if any, else start fresh
    keep: Optional[int] = None                       # keep only the newest N checkpoints (None = all)
    load_optimizer: bool = True                      # false = weights-only resume (e.g. after a layout change)
    finetune: bool = False                           # weights from checkpoint.load, then iteration 0 with a fresh
                                                     # optimizer, LR schedule and data order (Megatron's --finetune)
    pretrained: Optional[str] = None                 # the weights a new run starts from when checkpoint.load finds
                                                     # nothing (load: auto and an empty dir): finetune semantics, and
                                                     # a requeue resumes its own checkpoints (--pretrained-checkpoint)
    load_projector: Optional[str] = None             # then the projector only from this checkpoint (LLaVA's
                                                     # --pretrain_mm_mlp_adapter: a stage-1 projector, another LLM)
    overwrite: bool = False                          # allow starting over a checkpoint.dir that holds checkpoints
    fallback: bool = False                           # latest damaged/incomplete: load the newest intact one (loudly)
    timeout_s: float = 900.0                         # longest one save (write + checksums) may take on any rank


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


# ----------------------------------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides, type-checked against the dataclass annotations above.
# ----------------------------------------------------------------------------------------------------------------

class ConfigError(Exception):
    """Every problem found at once, so a user fixes a config in one round trip."""

    def __init__(self, problems: Sequence[str] | str):
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(self.problems)  # args=(problems,) keeps the error picklable across ranks

    def __str__(self) -> str:
        n = len(self.problems)
        head = f"invalid configuration ({n} problem{'' if n == 1 else 's'}):"
        return "\n".join([head] + [f"  - {p}" for p in self.problems])


_BAD = object()  # coercion failure marker (None is a legitimate value)


def _hints(cls: type) -> dict[str, Any]:
    # `from __future__ import annotations` makes annotations strings; resolve them to real types.
    return typing.get_type_hints(cls)


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or null"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, raw: str | None = None) -> Any:
    """Return ``value`` converted to ``hint`` or ``_BAD``. ``raw`` is the override text, used for str fields so
    that ``train.run_dir=2024`` or ``data.source=off`` (YAML 1.1 reads int / bool) keep the literal text."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), raw)
    if origin is list:
        if not isinstance(value, list):
            return _BAD
        items = [_coerce(x, args[0]) for x in value]
        return _BAD if any(x is _BAD for x in items) else items
    if hint is bool:
        return value if isinstance(value, bool) else _BAD
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _BAD
    if hint is float:
        if isinstance(value, bool):
            return _BAD
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                return _BAD
        return _BAD
    if hint is str:
        if isinstance(value, str):
            return value
        if raw is not None and isinstance(value, (bool, int, float)):
            return raw
        return _BAD
    raise TypeError(f"unsupported config field type {hint!r}")  # a dataclass above uses a type we don't handle


def _unknown(prefix: str, name: Any, valid: Sequence[str]) -> str:
    full = f"{prefix}{name}"
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
    return f"unknown key '{full}' ({hint})"


def _set(obj: Any, name: str, value: Any, key: str, problems: list[str], raw: str | None = None) -> None:
    hint = _hints(type(obj))[name]
    item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
    if dataclasses.is_dataclass(item):  # a list of sections (data.sources): each item is checked like a section
        if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
            problems.append(f"{key}: expected a list of mappings, got {value!r}")
            return
        items = [item() for _ in value]
        for i, (obj_i, data) in enumerate(zip(items, value)):
            _apply_mapping(obj_i, data, f"{key}[{i}].", problems)
        setattr(obj, name, items)
        return
    if dataclasses.is_dataclass(hint):
        if value is None:  # an empty section (`checkpoint:`) keeps the defaults
            return
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping of keys, got {value!r}")
            return
        _apply_mapping(getattr(obj, name), value, key + ".", problems)
        return
    if value is None and typing.get_origin(hint) is not Union:  # `key=null` unsets a key: back to its default
        f = next(f for f in dataclasses.fields(obj) if f.name == name)
        setattr(obj, name, f.default_factory() if f.default is dataclasses.MISSING else f.default)
        return
    coerced = _coerce(value, hint, raw)
    if coerced is _BAD:
        problems.append(f"{key}: expected {_type_name(hint)}, got {value!r}")
    else:
        setattr(obj, name, coerced)


def _apply_mapping(obj: Any, data: dict, prefix: str, problems: list[str]) -> None:
    valid = list(_hints(type(obj)))
    for name, value in data.items():
        if name not in valid:
            problems.append(_unknown(prefix, name, valid))
        else:
            _set(obj, name, value, prefix + name, problems)


def _apply_override(cfg: Config, text: str, problems: list[str]) -> None:
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        problems.append(f"override {text!r} is not of the form section.key=value")
        return
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problems.append(f"override {key}: cannot parse value {raw!r} ({e.__class__.__name__})")
        return
    obj, parts = cfg, key.split(".")
    for i, name in enumerate(parts):
        prefix = "".join(p + "." for p in parts[:i])
        valid = list(_hints(type(obj)))
        if name not in valid:
            problems.append(_unknown(prefix, name, valid))
            return
        if i == len(parts) - 1:
            _set(obj, name, value, key, problems, raw)
            return
        obj = getattr(obj, name)
        if not dataclasses.is_dataclass(obj):
            problems.append(f"override {key}: '{prefix}{name}' is a value, not a section")
            return


def load_config(path: str | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file (if ``path``) <- ``section.key=value`` overrides, in order. Raises ConfigError listing
    every load problem (missing file, bad YAML, unknown keys, wrong types); semantic checks are ``validate()``."""
    cfg, problems = Config(), []
    if path is not None:
        if not os.path.isfile(path):
            problems.append(f"config file not found: {path}")
        else:
            try:
                with open(path) as f:
                    data = yaml.safe_load(f)
            except yaml.YAMLError as e:
                problems.append(f"config file {path} is not valid YAML: {e}")
                data = None
            if isinstance(data, dict):
                _apply_mapping(cfg, data, "", problems)
            elif data is not None:
                problems.append(f"config file {path}: top level must be a mapping of sections (model, parallel, "
                                f"train, data, checkpoint, kernels, lora), got {type(data).__name__}")
    for text in overrides:
        _apply_override(cfg, text, problems)
    if problems:
        raise ConfigError(problems)
    expand_paths(cfg)
    return cfg


def expand_paths(cfg: Config) -> None:
    """``${VAR}`` / ``$VAR`` in train.run_dir and the checkpoint paths are filled from the environment (e.g.
    ``runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}``); a variable that is not set stays and ``validate`` names it."""
    cfg.train.run_dir = os.path.expandvars(cfg.train.run_dir)
    for name in ("dir", "load", "pretrained", "load_projector"):
        value = getattr(cfg.checkpoint, name)
        if isinstance(value, str):
            setattr(cfg.checkpoint, name, os.path.expandvars(value))


# ----------------------------------------------------------------------------------------------------------------
# Validation: semantic checks that need the world size; every problem names the key, the values and the fix.
# ----------------------------------------------------------------------------------------------------------------

def _divisors(n: int, limit: int = 64) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


class _Checks:
    """Collects problems; the helpers return whether the value passed, so later checks can skip what failed."""

    def __init__(self):
        self.problems: list[str] = []

    def append(self, problem: str) -> None:
        self.problems.append(problem)

    def at_least(self, key: str, value: Any, lo: int, why: str = "") -> bool:
        if not value >= lo:  # `not >=` also catches NaN
            self.problems.append(f"{key}={value} must be >= {lo}{why}")
            return False
        return True

    def in_range(self, key: str, value: float, lo: float, hi: float) -> None:
        if not lo <= value <= hi:
            self.problems.append(f"{key}={value} must be in [{lo}, {hi}]")

    def one_of(self, key: str, value: str, allowed: Sequence[str]) -> bool:
        if value not in allowed:
            self.problems.append(f"{key}={value!r} is not supported: use one of {', '.join(allowed)}")
            return False
        return True


def validate(cfg: Config, world_size: int) -> None:
    """Every semantic problem of ``cfg`` at once (ConfigError), each naming the key, the values and the fix."""
    p = _Checks()
    ok = _validate_model(cfg, p)
    dp = _validate_parallel(cfg, world_size, ok, p)
    _validate_train(cfg, dp, p)
    _validate_data(cfg, ok, p)
    _validate_checkpoint(cfg, p)
    _validate_valid(cfg, p)
    _validate_kernels(cfg, p)
    _validate_lora(cfg, p)
    if p.problems:
        raise ConfigError(p.problems)


def _validate_model(cfg: Config, p: _Checks) -> dict:
    """Sizes, attention shapes, the vision tower and projector. Returns which sizes passed (later checks divide)."""
    m, v = cfg.model, cfg.model.vision
    ok = {k: p.at_least(f"model.{k}", getattr(m, k), 1) for k in (
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
        "make_vocab_size_divisible_by")}
    ok.update({f"vision.{k}": p.at_least(f"model.vision.{k}", getattr(v, k), 1) for k in (
        "image_size", "patch_size", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
        "num_channels")})
    for key, value in (("model.rms_norm_eps", m.rms_norm_eps), ("model.rope_theta", m.rope_theta),
                       ("model.init_std", m.init_std), ("model.vision.layer_norm_eps", v.layer_norm_eps)):
        if not value > 0:
            p.append(f"{key}={value} must be > 0")
    # image_token_id may be negative (LLaVA's -200) or a real vocab id (llava-hf adds <image> to the vocab).

    groups = m.num_query_groups
    ok["groups"] = groups is not None and p.at_least("model.num_query_groups", groups, 1, " (or null for MHA)")
    if ok["groups"] and ok["num_attention_heads"] and m.num_attention_heads % groups:
        p.append(f"model.num_query_groups={groups} does not divide model.num_attention_heads={m.num_attention_heads}: "
                 f"choose num_query_groups in {_divisors(m.num_attention_heads)}")
    for key, h, n, good in (("model", m.hidden_size, m.num_attention_heads,
                             ok["hidden_size"] and ok["num_attention_heads"]),
                            ("model.vision", v.hidden_size, v.num_attention_heads,
                             ok["vision.hidden_size"] and ok["vision.num_attention_heads"])):
        if good and h % n:
            p.append(f"{key}.hidden_size={h} is not divisible by {key}.num_attention_heads={n}: "
                     f"choose num_attention_heads in {_divisors(h)}")

    ok["image"] = ok["vision.image_size"] and ok["vision.patch_size"]
    if ok["image"] and v.image_size % v.patch_size:
        lo = v.image_size // v.patch_size * v.patch_size
        fix = f"use {lo} or {lo + v.patch_size}" if lo else f"use {v.patch_size}"
        p.append(f"model.vision.image_size={v.image_size} is not divisible by patch_size={v.patch_size}: {fix}")
        ok["image"] = False
    if ok["vision.num_layers"] and not -v.num_layers <= v.select_layer <= -1:
        p.append(f"model.vision.select_layer={v.select_layer} must be in [-{v.num_layers}, -1] "
                 f"(-1 = last layer, -2 = penultimate)")
    p.one_of("model.projector", m.projector, ("linear", "mlp2x_gelu"))
    if not (m.train_llm or m.train_projector or m.train_vision):
        p.append("nothing to train: set at least one of model.train_llm, model.train_projector, "
                 "model.train_vision to true")
    return ok


def _validate_parallel(cfg: Config, world_size: int, ok: dict, p: _Checks) -> Optional[int]:
    """TP/PP/VPP sizes against the world size and the model; the pipeline split. Returns dp (None if unknown)."""
    m, v, par = cfg.model, cfg.model.vision, cfg.parallel
    tp_ok, pp_ok = p.at_least("parallel.tp", par.tp, 1), p.at_least("parallel.pp", par.pp, 1)
    dp = None
    if not world_size >= 1:
        p.append(f"world size {world_size} must be >= 1")
    elif tp_ok and pp_ok:
        mp = par.tp * par.pp
        if world_size % mp:
            p.append(f"world size {world_size} is not divisible by tp*pp={mp}: launch a multiple of {mp} ranks "
                     f"or change parallel.tp/parallel.pp")
        else:
            dp = world_size // mp
    if tp_ok:
        for key, n, good in (("model.num_attention_heads", m.num_attention_heads, ok["num_attention_heads"]),
                             ("model.num_query_groups", m.num_query_groups, ok["groups"]),
                             ("model.ffn_hidden_size", m.ffn_hidden_size, ok["ffn_hidden_size"]),
                             ("model.vision.num_attention_heads", v.num_attention_heads,
                              ok["vision.num_attention_heads"]),
                             ("model.vision.ffn_hidden_size", v.ffn_hidden_size, ok["vision.ffn_hidden_size"])):
            if good and n % par.tp:
                p.append(f"parallel.tp={par.tp} does not divide {key}={n}: choose tp in {_divisors(n)}")
    if par.sequence_parallel and par.tp == 1:
        p.append("parallel.sequence_parallel=true needs parallel.tp > 1: set it to false or raise parallel.tp")
    if par.overlap_param_gather and not par.use_distributed_optimizer:
        p.append("parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true (only the "
                 "distributed optimizer gathers parameters): enable it or set overlap_param_gather=false")

    vpp_ok = par.vpp is None or p.at_least("parallel.vpp", par.vpp, 1, " (or null to disable interleaving)")
    if par.vpp is not None and par.pp == 1:
        p.append(f"parallel.vpp={par.vpp} needs parallel.pp > 1: raise parallel.pp or set parallel.vpp=null")
    if pp_ok and ok["num_layers"] and par.pp > m.num_layers:
        p.append(f"parallel.pp={par.pp} exceeds model.num_layers={m.num_layers}: use pp <= {m.num_layers}")
    chunks = par.pp * (par.vpp or 1) if pp_ok and vpp_ok else None
    label = "parallel.pp*parallel.vpp" if par.vpp is not None else "parallel.pp"
    pl = par.pipeline_layers
    if pl is not None:
        if par.pp == 1:
            p.append("parallel.pipeline_layers is set but parallel.pp=1: remove it or set parallel.pp > 1")
        elif chunks and len(pl) != chunks:
            p.append(f"parallel.pipeline_layers has {len(pl)} entries but {label}={chunks}: "
                     f"give one layer count per (virtual) pipeline stage")
        if any(x < 0 for x in pl):
            p.append(f"parallel.pipeline_layers={pl} has negative entries: layer counts must be >= 0")
        elif ok["num_layers"] and sum(pl) != m.num_layers:
            p.append(f"parallel.pipeline_layers={pl} sums to {sum(pl)} but model.num_layers={m.num_layers}: "
                     f"the counts must add up to num_layers")
    elif chunks and par.pp > 1 and ok["num_layers"] and m.num_layers < chunks:
        p.append(f"model.num_layers={m.num_layers} is fewer than the {label}={chunks} pipeline chunks: "
                 f"lower parallel.pp / parallel.vpp")
    return dp


RECOMPUTE = ("none", "selective", "full")
# megatron's selective-recompute modules that apply to a dense LLM without TransformerEngine ("layernorm" needs TE's
# FP8 state manager in megatron-core 0.16)
RECOMPUTE_MODULES = ("core_attn", "mlp")


def _validate_train(cfg: Config, dp: Optional[int], p: _Checks) -> None:
    """Batch and schedule, optimizer, precision and recompute."""
    t, par = cfg.train, cfg.parallel
    ok_iters = [p.at_least(f"train.{k}", getattr(t, k), 1)
                for k in ("iters", "micro_batch_size", "global_batch_size", "log_interval")]
    if dp and all(ok_iters):
        per = t.micro_batch_size * dp
        if t.global_batch_size % per:
            p.append(f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size*dp = {per} "
                     f"(train.micro_batch_size={t.micro_batch_size}, dp={dp}): use a multiple of {per}")
        elif par.pp > 1 and par.vpp is not None and (t.global_batch_size // per) % par.pp:
            p.append(f"{t.global_batch_size // per} micro-batches per step (train.global_batch_size / "
                     f"(micro_batch_size*dp)) is not divisible by parallel.pp={par.pp}, as the interleaved schedule "
                     f"(parallel.vpp={par.vpp}) requires: make train.global_batch_size a multiple of {per * par.pp}")

    if not t.lr > 0:
        p.append(f"train.lr={t.lr} must be > 0")
    elif not 0 <= t.min_lr <= t.lr:
        p.append(f"train.min_lr={t.min_lr} must be in [0, train.lr={t.lr}]")
    p.in_range("train.lr_warmup_fraction", t.lr_warmup_fraction, 0, 1)
    p.at_least("train.weight_decay", t.weight_decay, 0)
    p.at_least("train.clip_grad", t.clip_grad, 0, " (0 disables clipping)")
    for key, beta in (("train.adam_beta1", t.adam_beta1), ("train.adam_beta2", t.adam_beta2)):
        if not 0 <= beta < 1:
            p.append(f"{key}={beta} must be in [0, 1)")
    if not t.adam_eps > 0:
        p.append(f"train.adam_eps={t.adam_eps} must be > 0")
    p.one_of("train.lr_decay_style", t.lr_decay_style, ("cosine", "linear", "constant"))
    p.one_of("train.precision", t.precision, ("auto", "bf16", "fp32"))
    if t.exit_interval is not None:
        p.at_least("train.exit_interval", t.exit_interval, 1, " (or null to run all train.iters)")
    for key in ("fault_timeout_s", "startup_timeout_s"):
        if not getattr(t, key) > 0:
            p.append(f"train.{key}={getattr(t, key)} must be > 0 (seconds)")

    if not t.master_weights:
        if t.precision == "fp32":
            p.append("train.master_weights=false keeps the weights in the training dtype, but train.precision=fp32 "
                     "has no lower-precision copy: use train.precision=bf16 or master_weights=true")
        if par.use_distributed_optimizer:
            p.append("train.master_weights=false keeps no fp32 optimizer state to shard: set "
                     "parallel.use_distributed_optimizer=false (or keep master_weights=true and shard the fp32 "
                     "state over data-parallel ranks)")
        if t.grad_reduce_in_fp32:
            p.append("train.grad_reduce_in_fp32=true needs fp32 master weights (the optimizer steps the bf16 "
                     "weights with their own-dtype grads): set train.master_weights=true or grad_reduce_in_fp32=null")
    if p.one_of("train.recompute", t.recompute, RECOMPUTE) and t.recompute == "selective":
        bad = [x for x in t.recompute_modules if x not in RECOMPUTE_MODULES]
        if bad or not t.recompute_modules:
            p.append(f"train.recompute_modules={t.recompute_modules} must be a non-empty list of "
                     f"{', '.join(RECOMPUTE_MODULES)}")


def _validate_data(cfg: Config, ok: dict, p: _Checks) -> None:
    d = cfg.data
    if d.source not in ("synthetic", "shards"):
        p.append(f"data.source={d.source!r} is not supported: allowed values are 'synthetic', 'shards'")
    if d.source == "shards":
        _validate_shard_data(d, p)
    seq_ok = p.at_least("data.seq_length", d.seq_length, 1)
    p.at_least("data.num_samples", d.num_samples, 1)
    images_ok = p.at_least("data.max_images_per_sample", d.max_images_per_sample, 0)
    p.in_range("data.text_only_fraction", d.text_only_fraction, 0, 1)
    p.in_range("data.max_skip_fraction", d.max_skip_fraction, 0, 1)
    if seq_ok and images_ok and ok["image"] and d.source == "synthetic" and d.max_images_per_sample >= 1:
        tokens = image_tokens_per_image(cfg)
        need = d.max_images_per_sample * tokens + 16  # images plus room for some text
        if d.seq_length < need:
            p.append(f"data.seq_length={d.seq_length} is too short for data.max_images_per_sample="
                     f"{d.max_images_per_sample} image(s) of {tokens} tokens plus 16 text tokens: use seq_length >= "
                     f"{need}, or lower max_images_per_sample / model.vision.image_size")
    elif seq_ok and ok["image"] and d.source == "shards":
        # Shards: the most images of one sample (per-sample counts in the manifest when it has them, else 1); the
        # preflight check (training/preflight.py) adds the template's own tokens, which need the tokenizer.
        tokens = image_tokens_per_image(cfg)
        for i, s in enumerate(d.sources):
            n = _shard_images_per_sample(s.path)
            if n and d.seq_length < n * tokens + 16:
                p.append(f"data.seq_length={d.seq_length} is too short for data.sources[{i}] ({s.path}): a sample has "
                         f"up to {n} image(s) of {tokens} tokens, plus 16 text tokens: use seq_length >= "
                         f"{n * tokens + 16}, or a smaller model.vision.image_size")


def images_per_sample(manifest: dict) -> int:
    """Most images of one sample of a shard source: from per-sample counts when its manifest has them (a
    ``num_images`` list per shard, or a top-level ``max_images``), else 1."""
    if "max_images" in manifest:
        return int(manifest["max_images"])
    counts = [c for s in manifest.get("shards", []) for c in s.get("num_images", [])]
    return max(counts) if counts else 1


def _shard_images_per_sample(path: str) -> int:
    """images_per_sample of a shard directory (0 if its manifest is unreadable: reported elsewhere)."""
    import json
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            return images_per_sample(json.load(f))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def _validate_valid(cfg: Config, p: _Checks) -> None:
    d, t = cfg.data, cfg.train
    p.at_least("train.eval_interval", t.eval_interval, 0, " (0 = no validation)")
    p.at_least("train.eval_iters", t.eval_iters, 1)
    if t.eval_interval and not d.valid_sources:
        p.append(f"train.eval_interval={t.eval_interval} needs data.valid_sources (held-out shard directories, like "
                 f"data.sources)")
    if d.valid_sources and d.source != "shards":
        p.append("data.valid_sources needs data.source=shards")
    for i, s in enumerate(d.valid_sources):
        key = f"data.valid_sources[{i}]"
        if not s.path or not os.path.isfile(os.path.join(s.path, "manifest.json")):
            p.append(f"{key}.path={s.path!r} has no manifest.json: write it with tools/make_shards.py --out {s.path}")
        if s.template not in _templates():
            p.append(f"{key}.template={s.template!r} is not supported: use one of {', '.join(_templates())}")


def _templates():
    from megallava.data.templates import TEMPLATES
    return TEMPLATES


def _validate_checkpoint(cfg: Config, p: _Checks) -> None:
    ck = cfg.checkpoint
    if not ck.timeout_s > 0:
        p.append(f"checkpoint.timeout_s={ck.timeout_s} must be > 0 (seconds)")
    p.at_least("checkpoint.interval", ck.interval, 0, " (0 = save only at the end)")
    if ck.keep is not None:
        p.at_least("checkpoint.keep", ck.keep, 1, " (or null to keep every checkpoint)")
    if ck.interval and not ck.dir:
        p.append(f"checkpoint.interval={ck.interval} needs checkpoint.dir (where to save)")
    if ck.load == "auto":
        if not ck.dir:
            p.append("checkpoint.load=auto resumes from checkpoint.dir: set checkpoint.dir")
        if ck.finetune:
            p.append("checkpoint.finetune=true with checkpoint.load=auto would restart every requeue at iteration 0: "
                     "fine-tune from a fixed checkpoint.load, or resume with finetune=false")
    elif ck.load is not None and not os.path.exists(ck.load):
        p.append(f"checkpoint.load={ck.load} does not exist")
    if ck.finetune and not ck.load:
        p.append("checkpoint.finetune=true needs checkpoint.load (the weights to start from)")
    if ck.pretrained is not None:
        if not os.path.exists(ck.pretrained):
            p.append(f"checkpoint.pretrained={ck.pretrained} does not exist")
        if ck.load not in (None, "auto"):
            p.append(f"checkpoint.pretrained={ck.pretrained} is used only when checkpoint.load finds nothing, and "
                     f"checkpoint.load={ck.load} always finds a checkpoint: set checkpoint.load=auto (resume this "
                     f"run's checkpoints, else start from checkpoint.pretrained) or drop one of the two")
    if ck.load_projector is not None and not os.path.exists(ck.load_projector):
        p.append(f"checkpoint.load_projector={ck.load_projector} does not exist")
    for key in ("train.run_dir", "checkpoint.dir", "checkpoint.load", "checkpoint.pretrained",
                "checkpoint.load_projector"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if isinstance(value, str) and "$" in value:
            p.append(f"{key}={value}: the environment variable in it is not set (templates such as "
                     f"runs/${{SLURM_JOB_NAME}}-${{SLURM_JOB_ID}} are filled from the environment)")


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def _validate_lora(cfg: Config, p: _Checks) -> None:
    lo = cfg.lora
    p.at_least("lora.rank", lo.rank, 0, " (0 = full fine-tuning)")
    if lo.rank <= 0:
        if lo.quantize:
            p.append("lora.quantize=true (QLoRA) needs LoRA adapters: set lora.rank (e.g. 64)")
        return
    if lo.alpha is not None and not lo.alpha > 0:
        p.append(f"lora.alpha={lo.alpha} must be > 0 (or null for 2 x rank)")
    p.in_range("lora.dropout", lo.dropout, 0, 1)
    bad = [x for x in lo.targets if x not in LORA_TARGETS]
    if bad or not lo.targets:
        p.append(f"lora.targets={lo.targets} must be a non-empty list of {', '.join(LORA_TARGETS)}")
    if not cfg.model.train_llm:
        p.append("lora.rank > 0 adapts the LLM, but model.train_llm=false (stage 1 trains the projector only): "
                 "set lora.rank=0 for stage 1")


def _validate_kernels(cfg: Config, p: _Checks) -> None:
    p.at_least("kernels.cross_entropy_chunk", cfg.kernels.cross_entropy_chunk, 1, " (tokens per chunk)")
    if cfg.kernels.flex_attention and cfg.train.recompute != "none":
        p.append(f"kernels.flex_attention=true cannot be combined with train.recompute={cfg.train.recompute!r} (a "
                 f"FlexAttention block mask cannot pass megatron's recompute functions): set flex_attention=null "
                 f"(dense masks under recompute) or train.recompute=none")


def _validate_shard_data(d: DataConfig, p: _Checks) -> None:
    """data.source=shards: the mix, the tokenizer and the loader options."""
    from megallava.data.templates import TEMPLATES
    if not d.sources:
        p.append("data.source=shards needs data.sources: a list of shard directories, e.g. "
                 "[{path: shards/instruct, weight: 0.8}, {path: shards/sharegpt, weight: 0.2}]")
    for i, s in enumerate(d.sources):
        key = f"data.sources[{i}]"
        if not s.path:
            p.append(f"{key}.path is empty: give the shard directory written by tools/make_shards.py")
        elif not os.path.isfile(os.path.join(s.path, "manifest.json")):
            what = "does not exist" if not os.path.exists(s.path) else "has no manifest.json"
            p.append(f"{key}.path={s.path} {what}: write it with tools/make_shards.py --out {s.path}")
        if not s.weight > 0:
            p.append(f"{key}.weight={s.weight} must be > 0")
        if s.template not in TEMPLATES:
            p.append(f"{key}.template={s.template!r} is not supported: use one of {', '.join(TEMPLATES)}")
    if not d.tokenizer:
        p.append("data.source=shards needs data.tokenizer: a sentencepiece .model file or an HF tokenizer directory")
    elif not os.path.exists(d.tokenizer):
        p.append(f"data.tokenizer={d.tokenizer} does not exist")
    for key, value, allowed in (("data.image_mode", d.image_mode, ("pad", "resize")),
                                ("data.overlong", d.overlong, ("truncate", "drop"))):
        if value not in allowed:
            p.append(f"{key}={value!r} is not supported: use one of {', '.join(allowed)}")
    if not d.num_workers >= 0:
        p.append(f"data.num_workers={d.num_workers} must be >= 0 (0 = read in the training process)")


# ----------------------------------------------------------------------------------------------------------------
# Derived values used by the trainer (assume a validated config).
# ----------------------------------------------------------------------------------------------------------------

def image_tokens_per_image(cfg: Config) -> int:
    v = cfg.model.vision
    return (v.image_size // v.patch_size) ** 2


def data_parallel_size(cfg: Config, world_size: int) -> int:
    mp = cfg.parallel.tp * cfg.parallel.pp
    if world_size % mp:
        raise ConfigError(f"world size {world_size} is not divisible by tp*pp={mp}")
    return world_size // mp


def resolved_pipeline_layers(cfg: Config) -> list[int] | None:
    """LLM layers per (virtual) pipeline stage in layer order; None without pipeline parallelism."""
    par = cfg.parallel
    if par.pp == 1:
        return None
    if par.pipeline_layers is not None:
        return list(par.pipeline_layers)
    return balanced_split(cfg.model.num_layers, par.pp * (par.vpp or 1))


def balanced_split(layers: int, chunks: int) -> list[int]:
    """Layers per pipeline chunk when none are given: as even as possible, the extra layers on the last chunks, so
    stage 0 (which also runs the ViT and the projector) carries the fewest: 5 layers on 2 -> [2, 3]."""
    base, extra = divmod(layers, chunks)
    return [base] * (chunks - extra) + [base + 1] * extra


def num_microbatches(cfg: Config, world_size: int) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * data_parallel_size(cfg, world_size))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def key_help(width: int = 116) -> str:
    """Every key with its default, one paragraph per section (``python -m megallava.train --help``)."""
    import textwrap

    def walk(obj: Any, prefix: str):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from walk(value, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}={_show(value)}"

    entry = " ".join(walk(SourceConfig(), ""))
    lines = [f"Keys (section.key=default; each entry of data.sources / data.valid_sources: {entry}):"]
    cfg = Config()
    for f in dataclasses.fields(cfg):
        lines.append(textwrap.fill(" ".join(walk(getattr(cfg, f.name), f.name + ".")), width, initial_indent="  ",
                                   subsequent_indent="    ", break_on_hyphens=False))
    return "\n".join(lines)


def dump_yaml(cfg: Config, path: str) -> None:
    """Write the resolved config (every key) so a run can be reproduced with ``load_config(path)``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
