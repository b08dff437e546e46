"""Training throughput on one GPU: megallava vs HF transformers' LlavaForConditionalGeneration (SDPA), same shape,
same data, in the same run (one system after the other; each is deleted before the next is built).

    python bench/train_vs_hf.py                      # megallava (fused kernels) vs HF pure-bf16 and HF bf16-master
    python bench/train_vs_hf.py --systems megallava,megallava-unfused,hf-pure-bf16 --micro-batch 8
    python bench/train_vs_hf.py --systems megallava-packed,megallava-halves      # packing's per-token cost
    python bench/train_vs_hf.py --set train.recompute=full --systems megallava   # any config override
    python bench/train_vs_hf.py --profile --systems megallava                    # + where the GPU time goes
    python bench/train_vs_hf.py --tiny               # tiny shape on CPU (< 1 min): exercises the script only

Systems (``--systems``, comma list): ``hf-pure-bf16`` / ``hf-bf16-master`` (HF's two precision policies; ``hf`` =
the one named by --precision), and megallava presets (``PRESETS`` below: ``megallava`` = the config defaults, where
every kernels.* switch is on with CUDA; ``megallava-unfused`` = every switch off, the path before the fused kernels;
``megallava-no-<lever>`` = one switch off; memory settings). ``megallava-packed`` trains the same samples as
``megallava-halves`` (2 x micro-batch samples of seq/2 tokens, one image each), packed two per row of seq tokens:
the per-token time ratio of the two is packing's overhead. LoRA/QLoRA (issue 10):

    python bench/train_vs_hf.py --systems megallava,megallava-lora64,megallava-qlora64,hf-peft-lora64,hf-peft-qlora64

``megallava-lora64`` / ``megallava-qlora64`` (LoRA-64, alpha 128, every LLM linear; NF4 bases) against megallava's own
full fine-tuning and HF + PEFT LoRA-64 / QLoRA-64 (bitsandbytes NF4; CUDA + bitsandbytes only, otherwise reported as
skipped with the reason), with the targets (LoRA >= 1.3x full FT and >= 2x PEFT LoRA tokens/s; the 4-bit bases'
measured bytes per base parameter <= 0.56) in the JSON's ``targets`` and the printout.

Both sides are charged the same model FLOPs (megallava.training.flops.step_flops: unpadded tokens, causal attention
counted at s/2, LLM / ViT / projector separately), so tokens/s, TFLOP/s and MFU compare like for like. See README.md.
"""
import argparse
import gc
import itertools
import json
import math
import os
import platform
import re
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megallava.training import flops as F  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed deprecations inside megatron
warnings.filterwarnings("ignore", message="full scope is deprecated")

# LLaMA-7B layer shape cut to 8 layers + CLIP ViT-L/14-336 (REFERENCE.md section 4) / a tiny CPU shape.
SHAPES = {
    "default": dict(layers=8, hidden=4096, ffn=11008, heads=32, kv_heads=32, vocab=32000, image=336, patch=14,
                    vit_layers=24, vit_hidden=1024, vit_ffn=4096, vit_heads=16, seq=2048, micro_batch=4),
    "tiny": dict(layers=2, hidden=64, ffn=176, heads=4, kv_heads=4, vocab=500, image=56, patch=14,
                 vit_layers=2, vit_hidden=32, vit_ffn=64, vit_heads=2, seq=128, micro_batch=2),
}

LEVERS = {"rmsnorm": "kernels.fused_rmsnorm", "swiglu": "kernels.fused_swiglu", "rope": "kernels.fused_rope",
          "ce": "kernels.fused_cross_entropy", "adam": "kernels.fused_adam", "flex": "kernels.flex_attention"}
UNFUSED = [f"{key}=false" for key in LEVERS.values()]
BF16_STATES = ["train.master_weights=false", "parallel.use_distributed_optimizer=false"]
PRESETS = {  # megallava systems: config overrides on top of --set
    "megallava": [],
    "megallava-unfused": UNFUSED,
    **{f"megallava-no-{name}": [f"{key}=false"] for name, key in LEVERS.items()},
    "megallava-recompute": ["train.recompute=full"],
    "megallava-bf16-states": BF16_STATES,
    "megallava-bf16-states-recompute": BF16_STATES + ["train.recompute=full"],
    "megallava-packed": [],
    "megallava-halves": [],
    # the paper's cheap path: LoRA-64 (alpha 128) on every LLM linear, projector trained; QLoRA = NF4 bases
    "megallava-lora64": ["lora.rank=64"],
    "megallava-qlora64": ["lora.rank=64", "lora.quantize=true"],
}
HF_POLICIES = {
    "pure-bf16": "bf16 params, grads and AdamW states",
    "bf16-master": "fp32 params, grads and AdamW states + torch.autocast(bf16) (HF Trainer's bf16=True)",
    "peft-lora64": "bf16 params; PEFT LoRA r64 alpha 128 on every LLM linear (q,k,v,o,gate,up,down), projector "
                   "trained (modules_to_save); AdamW states for the trained params only",
    "peft-qlora64": "as peft-lora64 with the LLM linears' bases as bitsandbytes Linear4bit (BitsAndBytesConfig: NF4, "
                    "double quantisation, bf16 compute; ViT, projector and lm_head not quantised); no "
                    "prepare_model_for_kbit_training (no fp32 upcast, no gradient checkpointing: the others' setting)",
}
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qlora_unavailable(device) -> str:
    """Why hf-peft-qlora64 cannot run here ('' when it can): it needs CUDA and bitsandbytes."""
    if device.type != "cuda":
        return "needs CUDA (bitsandbytes' 4-bit kernels are what the peer is measured with); this run is on CPU"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        return f"bitsandbytes is not importable ({e}): install its wheel (DEVELOPERS.md) to measure the peer"
    return ""


def quantize_hf_4bit(model, dtype=torch.bfloat16):
    """The QLoRA paper's model: ``model``'s weights reloaded through transformers' bitsandbytes integration with
    BitsAndBytesConfig(load_in_4bit, nf4, double quantisation, bf16 compute), the ViT, projector and lm_head kept
    dense (LLaVA's QLoRA setting). From the in-memory state dict, no disk. Returns the quantised model."""
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype,
                               # transformers matches these from the start of the module name (4.x: no "model.")
                               llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector",
                                                      "vision_tower", "multi_modal_projector", "lm_head"])
    device = next(model.parameters()).device
    kwargs = {"device_map": {"": device.index or 0}} if device.type == "cuda" else {}
    q = LlavaForConditionalGeneration.from_pretrained(None, config=model.config, state_dict=model.state_dict(),
                                                      quantization_config=quant, dtype=dtype, **kwargs)
    import bitsandbytes as bnb
    four_bit = [n for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    wrong = [n for n in four_bit if "language_model" not in n or not n.endswith(tuple(PEFT_TARGETS))]
    if wrong or len(four_bit) != 7 * model.config.text_config.num_hidden_layers:
        raise RuntimeError(f"4-bit layers are not exactly the LLM's linears: {len(four_bit)}, e.g. {wrong[:3]}")
    q.train()
    q.model.vision_tower.requires_grad_(False)
    return q


def hf_4bit_bytes(model):
    """(bytes, base parameters) of the bitsandbytes 4-bit weights: packed codes, absmax (8-bit codes under double
    quantisation), the second-level absmax, offset and code tables, each storage counted once."""
    import bitsandbytes as bnb

    seen, total, params = set(), 0, 0
    for m in model.modules():
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        qs = m.weight.quant_state
        params += m.in_features * m.out_features
        tensors = [m.weight.data, qs.absmax, qs.code, qs.offset]
        if qs.state2 is not None:
            tensors += [qs.state2.absmax, qs.state2.code]
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
    return total, params


def megallava_policy(cfg) -> str:
    from megallava.model.fused import resolve

    if cfg.train.precision == "fp32":
        precision = "fp32 everywhere (CPU run)"
    elif cfg.train.master_weights:
        precision = "bf16 params/activations, fp32 main grads + fp32 master weights + fp32 Adam states"
    else:
        precision = "bf16 params, grads and Adam states (train.master_weights=false)"
    k = resolve(cfg.kernels)
    on = [name for name, key in LEVERS.items() if getattr(k, key.split(".")[1])]
    return f"{precision}; fused: {', '.join(on) or 'none'}; recompute {cfg.train.recompute}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shape (CPU, < 1 min): checks the script, not speed")
    p.add_argument("--systems", default="megallava,hf-pure-bf16,hf-bf16-master",
                   help=f"comma list of hf, hf-pure-bf16, hf-bf16-master, {', '.join(PRESETS)}")
    p.add_argument("--precision", choices=list(HF_POLICIES), default="pure-bf16", help="HF's policy for `hf`")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="megallava config override for every megallava system (repeatable)")
    p.add_argument("--cpu-fp32", action="store_true", help="on CPU run both sides in fp32 instead of bf16")
    p.add_argument("--layers", type=int, help="LLM layers (default 8; tiny 2)")
    p.add_argument("--micro-batch", type=int, help="samples per step (default 4; tiny 2)")
    p.add_argument("--seq", type=int, help="tokens per sample incl. image tokens (default 2048; tiny 128)")
    p.add_argument("--projector", choices=["mlp2x_gelu", "linear"], default="mlp2x_gelu",
                   help="linear exists only on the megallava side (HF's projector is always mlp2x)")
    p.add_argument("--warmup", type=int, help="untimed iterations (default 3; tiny 1)")
    p.add_argument("--iters", type=int, help="timed iterations (default 10; tiny 3)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--clip-grad", type=float, default=1.0, help="both sides clip the global grad norm")
    p.add_argument("--peak-tflops", type=float, help="MFU denominator per GPU (default: detect, H100/H200 989)")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile 3 steps per system: GPU time by kernel class and the top kernels")
    p.add_argument("--init", choices=["device", "canonical"], default=None,
                   help="megallava weights: 'canonical' = the trainer's layout-invariant CPU draw (slow at 2B "
                        "params), 'device' = the same distribution drawn on the GPU (default on GPU)")
    p.add_argument("--out", help="JSON results (default bench/results/train_vs_hf[_tiny].json)")
    args = p.parse_args(argv)
    shape = dict(SHAPES["tiny" if args.tiny else "default"])
    for key in ("layers", "micro_batch", "seq"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    args.shape = shape
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 3)
    args.iters = args.iters if args.iters is not None else (3 if args.tiny else 10)
    args.init = args.init or ("device" if torch.cuda.is_available() else "canonical")
    here = os.path.dirname(os.path.abspath(__file__))
    args.out = args.out or os.path.join(here, "results", f"train_vs_hf{'_tiny' if args.tiny else ''}.json")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces: config, data, timing
# ----------------------------------------------------------------------------------------------------------------

def megallava_config(args, bf16: bool, overrides=()):
    from megallava import config as C

    s = args.shape
    cfg = C.load_config(None, [
        f"model.num_layers={s['layers']}", f"model.hidden_size={s['hidden']}", f"model.ffn_hidden_size={s['ffn']}",
        f"model.num_attention_heads={s['heads']}", f"model.num_query_groups={s['kv_heads']}",
        f"model.vocab_size={s['vocab']}", "model.rms_norm_eps=1e-5", f"model.projector={args.projector}",
        f"model.vision.image_size={s['image']}", f"model.vision.patch_size={s['patch']}",
        f"model.vision.num_layers={s['vit_layers']}", f"model.vision.hidden_size={s['vit_hidden']}",
        f"model.vision.ffn_hidden_size={s['vit_ffn']}", f"model.vision.num_attention_heads={s['vit_heads']}",
        "model.vision.select_layer=-2",
        f"train.micro_batch_size={s['micro_batch']}", f"train.global_batch_size={s['micro_batch']}",
        f"train.iters={args.warmup + args.iters}", f"train.lr={args.lr}", "train.lr_warmup_fraction=0",
        "train.lr_decay_style=constant", f"train.clip_grad={args.clip_grad}",
        f"train.precision={'bf16' if bf16 else 'fp32'}", f"data.seq_length={s['seq']}", *overrides])
    C.validate(cfg, 1)
    return cfg


def make_samples(args, n: int, length: int, patches: int, seed: int = 0):
    """n samples of `length` tokens: `patches` image placeholders (one image) then random text. Each sample holds
    megallava's pre-shifted labels and HF's unshifted ones (HF shifts inside its loss)."""
    vocab = args.shape["vocab"]
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        ids = torch.randint(0, vocab - 1, (length,), generator=gen)  # vocab-1 is HF's image token
        is_image = torch.zeros(length, dtype=torch.bool)
        is_image[:patches] = True
        hf_labels = ids.masked_fill(is_image, -100)
        labels = torch.full((length,), -100)
        labels[:-1] = hf_labels[1:]
        pixels = torch.randn(1, 3, args.shape["image"], args.shape["image"], generator=gen)
        samples.append(dict(ids=ids, is_image=is_image, labels=labels, hf_labels=hf_labels, images=pixels))
    return samples


def megallava_batch(samples, image_token_id: int, seq_length: int, packed: bool, device):
    """The trainer's micro-batch (megallava.data.batching): padded rows, or whole samples packed into rows."""
    from megallava.data.batching import collate, pack

    items = [{"tokens": s["ids"].masked_fill(s["is_image"], image_token_id), "labels": s["labels"],
              "images": s["images"]} for s in samples]
    batch = pack(items, seq_length) if packed else collate(items)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def hf_batch(samples, device):
    stack = lambda key: torch.stack([s[key] for s in samples]).to(device)  # noqa: E731
    return {"ids": stack("ids"), "is_image": stack("is_image"), "hf_labels": stack("hf_labels"),
            "pixels": torch.cat([s["images"] for s in samples]).to(device)}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step, warmup: int, iters: int):
    """Mean seconds per step over `iters` after `warmup` (the first includes compiling); losses of every step (a
    sanity check that both train)."""
    t0 = time.perf_counter()
    losses = [step() for _ in range(warmup)]
    sync()
    warmup_s = time.perf_counter() - t0
    start = time.perf_counter()
    losses += [step() for _ in range(iters)]
    sync()
    return (time.perf_counter() - start) / iters, [float(x) for x in losses], warmup_s


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# Kernel classes for the profile, first match wins (inductor names its kernels after the fused ops).
KERNEL_CLASSES = [
    ("attention", r"flash|fmha|attention|sdpa|flex"),
    ("gemm", r"gemm|xmma|cutlass|cublas|nvjet|matmul|^aten::(mm|addmm|bmm|linear)$"),
    ("optimizer", r"adam|multi_tensor|foreach|l2norm|lamb"),
    ("communication", r"nccl|all_reduce|allreduce|reduce_scatter|all_gather|broadcast"),
    ("cross_entropy", r"cross_entropy|log_softmax|nll_loss|logsumexp|softmax"),
    ("norm", r"rsqrt|rms|norm"),
    ("rope", r"cos|sin"),
    ("swiglu/gelu", r"silu|sigmoid|gelu"),
    ("copy/cast", r"copy|cast|cat|convert|fill|zero"),
    ("other", r""),
]


def kernel_class(name: str) -> str:
    low = name.lower()
    return next(c for c, rx in KERNEL_CLASSES if re.search(rx, low))


def profile_steps(step, n: int = 3):
    """Profile n steps: per step the wall time, the time the GPU ran kernels (by class), idle = the rest, and the
    top kernels. On CPU the aten ops' self time stands in for kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        wall = (time.perf_counter() - t0) / n
    kernels = []
    for e in prof.key_averages():
        if cuda:
            # user annotations (e.g. "Optimizer.step#AdamW.step") carry the device time of the kernels inside them
            if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False) or "#" in e.key:
                continue
            us = e.self_device_time_total
        else:
            if not e.key.startswith("aten::"):
                continue
            us = e.self_cpu_time_total
        if us > 0:
            kernels.append((e.key, us / 1e3 / n, e.count / n))
    kernels.sort(key=lambda k: -k[1])
    busy = sum(k[1] for k in kernels)
    by_class = {}
    for name, ms, _ in kernels:
        by_class[kernel_class(name)] = by_class.get(kernel_class(name), 0.0) + ms
    return {"wall_ms": 1000 * wall, "kernel_ms": busy, "idle_ms": max(1000 * wall - busy, 0.0),
            "by_class_ms": dict(sorted(by_class.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"name": k[0][:160], "ms": k[1], "calls": k[2], "class": kernel_class(k[0])}
                            for k in kernels[:20]]}


# ----------------------------------------------------------------------------------------------------------------
# The two systems
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def device_init(chunks, seed: int, std: float) -> None:
    """Bench-only stand-in for megallava.model.init.init_weights: the same distribution (normal(0, std) weights,
    unit norms, zero biases) drawn on the GPU, so building a 2B-parameter model takes seconds, not a minute of CPU
    draws. Training speed does not depend on which normal draw the weights came from."""
    from megallava.model.init import iter_canonical_params

    gens = {}
    for name, param in iter_canonical_params(chunks):
        if name.endswith("layernorm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:  # megatron's layers are built on the GPU, ours (norms, patch embedding) on the CPU until .cuda()
            gen = gens.setdefault(param.device, torch.Generator(device=param.device).manual_seed(seed))
            param.normal_(0.0, std, generator=gen)


def run_megallava(args, cfg, batch, profile: bool):
    """The real training path: init_distributed (one rank), build_chunks, wrap_ddp, build_optimizer, train_step."""
    from megallava.distributed import LaunchEnv, init_distributed, shutdown
    from megallava.model import build
    from megallava.training.optimizer import build_optimizer, torch_adams, wrap_ddp
    from megallava.training.step import train_step

    init_distributed(1, 1, None, cfg.train.seed, LaunchEnv(0, 1, 0, "127.0.0.1", 0))
    original_init = build.init_weights
    if args.init == "device":
        build.init_weights = device_init
    model = optimizer = scheduler = iterators = None
    try:
        chunks = build.build_chunks(cfg)
        model = wrap_ddp(chunks, cfg)
        extra = {}
        if cfg.lora.quantize:  # QLoRA: the trainer quantises the bases once their weights are in
            from megallava.model.lora import _LoRAMixin, quantize_bases
            held, alone = quantize_bases(chunks)
            base = sum(math.prod(m.quantized.shape) for c in chunks for m in c.modules()
                       if isinstance(m, _LoRAMixin) and m.quantized is not None)
            extra = {"qlora_base_bytes": held, "qlora_base_params": base, "qlora_base_bytes_per_param": held / base,
                     "qlora_quantised_alone": alone}
            free_memory()
        optimizer, scheduler = build_optimizer(model, cfg)
        rows, s = batch["tokens"].shape
        iterators = [itertools.repeat(batch)]

        def step():
            out = train_step(model, optimizer, scheduler, iterators, 1, rows, s)
            loss_sum, tokens = out["loss_stats"].tolist()
            return loss_sum / tokens

        free_memory()
        step_s, losses, warmup_s = timed(step, args.warmup, args.iters)
        mem = F.peak_memory_gib()
        adams = list(torch_adams(optimizer))
        inner = getattr(optimizer, "chained_optimizers", [optimizer])[0]
        adam = type(inner.optimizer)
        fused_adam = bool(adams) and all(g.get("fused") for a in adams for g in a.param_groups)
        result = {"step_s": step_s, "losses": losses, "mem_gib": mem, "warmup_s": warmup_s,
                  "optimizer": f"megatron {type(inner).__name__} over {adam.__module__}.{adam.__name__}"
                               + (" (fused)" if fused_adam else ""), **extra}
        if profile:
            result["profile"] = profile_steps(step)
        return result
    finally:
        build.init_weights = original_init
        model = optimizer = scheduler = iterators = None
        shutdown()
        free_memory()


def hf_model(args, device, dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    s = args.shape
    text = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
                       num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                       num_key_value_heads=s["kv_heads"], rms_norm_eps=1e-5, max_position_embeddings=s["seq"],
                       tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=s["vit_hidden"], intermediate_size=s["vit_ffn"],
                              num_hidden_layers=s["vit_layers"], num_attention_heads=s["vit_heads"],
                              image_size=s["image"], patch_size=s["patch"], hidden_act="quick_gelu")
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=s["vocab"] - 1,
                         projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default", attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: a 2B-parameter CPU init takes minutes
        # Built in `dtype` (not .to(dtype) afterwards, which would also round fp32 buffers such as RoPE's inv_freq).
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    model.train()
    model.model.vision_tower.requires_grad_(False)  # LLaVA: frozen CLIP
    attn = {model.config._attn_implementation, model.config.text_config._attn_implementation,
            model.config.vision_config._attn_implementation}
    assert attn == {"sdpa"}, f"HF attention implementation is {attn}, expected sdpa"
    return model


def run_hf(args, data, policy: str, profile: bool):
    device = data["ids"].device
    autocast = policy == "bf16-master"
    dtype = torch.float32 if policy in ("bf16-master", "fp32") else torch.bfloat16
    model = hf_model(args, device, dtype)
    extra = {}
    if policy == "peft-qlora64":
        dense, model = model, None
        model = quantize_hf_4bit(dense, dtype)
        del dense
        free_memory()
        held, base = hf_4bit_bytes(model)
        extra = {"qlora_base_bytes": held, "qlora_base_params": base, "qlora_base_bytes_per_param": held / base}
    if policy in ("peft-lora64", "peft-qlora64"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=64, lora_alpha=128, lora_dropout=0.0, modules_to_save=["multi_modal_projector"],
            target_modules=r".*language_model.*\.(" + "|".join(PEFT_TARGETS) + ")"))
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
        ids = data["ids"].masked_fill(data["is_image"], args.shape["vocab"] - 1)
        pixels, labels = data["pixels"].to(dtype), data["hf_labels"]

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, pixel_values=pixels, labels=labels, use_cache=False).loss
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        free_memory()
        step_s, losses, warmup_s = timed(step, args.warmup, args.iters)
        result = {"step_s": step_s, "losses": losses, "mem_gib": F.peak_memory_gib(), "warmup_s": warmup_s,
                  "optimizer": f"torch.optim.AdamW(fused={device.type == 'cuda'})", **extra}
        if profile:
            result["profile"] = profile_steps(step)
        return result
    finally:
        model = optimizer = params = None
        free_memory()


# ----------------------------------------------------------------------------------------------------------------

def system_policy(name: str, args):
    """'hf' systems -> their precision policy; megallava systems -> None."""
    if name == "hf":
        return args.precision
    if name.startswith("hf-"):
        policy = name[3:]
        if policy not in HF_POLICIES:
            sys.exit(f"unknown system {name!r}: HF policies are {', '.join('hf-' + p for p in HF_POLICIES)}")
        return policy
    if name not in PRESETS:
        sys.exit(f"unknown system {name!r}: use hf, {', '.join('hf-' + p for p in HF_POLICIES)}, "
                 f"{', '.join(PRESETS)}")
    return None


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = cuda or not args.cpu_fp32
    systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    policies = {name: system_policy(name, args) for name in systems}
    if args.projector != "mlp2x_gelu" and any(p is not None for p in policies.values()):
        sys.exit("HF's LLaVA projector is always mlp2x: use --projector mlp2x_gelu or megallava systems only")
    from megallava.config import image_tokens_per_image

    base_cfg = megallava_config(args, bf16, args.set)
    patches = image_tokens_per_image(base_cfg)
    b, s = args.shape["micro_batch"], args.shape["seq"]
    full = make_samples(args, b, s, patches)                      # the default batch: b samples of seq tokens
    halves = make_samples(args, 2 * b, s // 2, patches, seed=1)    # 2b samples of seq/2 (packed two per row)
    peak = F.peak_tflops_per_gpu(args.peak_tflops)

    results = {}
    for name in systems:
        t0 = time.perf_counter()
        policy = policies[name]
        samples = halves if name in ("megallava-packed", "megallava-halves") else full
        cfg = base_cfg if policy is not None else megallava_config(args, bf16, args.set + PRESETS[name])
        lengths = [int(x["ids"].numel()) for x in samples]
        flops = F.step_flops(cfg, lengths, len(samples))
        skip = qlora_unavailable(device) if policy == "peft-qlora64" else ""
        if skip:  # said, never silently dropped
            results[name] = {"skipped": skip}
            print(f"[{name}] skipped: {skip}", flush=True)
            continue
        try:
            if policy is not None:
                r = run_hf(args, hf_batch(samples, device), policy if bf16 else "fp32", args.profile)
                r["policy"] = HF_POLICIES.get(policy, policy) if bf16 else "fp32 everywhere (CPU run)"
            else:
                batch = megallava_batch(samples, cfg.model.image_token_id, s, name == "megallava-packed", device)
                r = run_megallava(args, cfg, batch, args.profile)
                r["policy"] = megallava_policy(cfg)
                r["rows"] = list(batch["tokens"].shape)
        except Exception as e:  # noqa: BLE001 - one failing system must not lose the others' numbers
            import traceback

            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            free_memory()
            continue
        r.update(F.throughput(flops, sum(lengths), r["step_s"], 1, peak))
        r["ms_per_1k_tokens"] = 1000 * r["step_s"] / sum(lengths) * 1000
        r["model_tflop_per_step"] = flops["total"] / 1e12
        r["wall_s"] = time.perf_counter() - t0
        r["residual_gib_after"] = torch.cuda.memory_allocated() / 2 ** 30 if cuda else None
        results[name] = r
        print(f"[{name}] {r['tokens_per_s']:,.0f} tokens/s, {r['mem_gib']:.2f} GiB, losses "
              f"{r['losses'][0]:.4f}->{r['losses'][-1]:.4f}, {r['wall_s']:.0f} s"
              + (f", 4-bit base {r['qlora_base_bytes_per_param']:.4f} bytes/param" if "qlora_base_bytes" in r else ""),
              flush=True)

    ok = {k: v for k, v in results.items() if "error" not in v and "skipped" not in v}
    ratios = {}
    # references: HF's precision policies, the unfused path, megallava's own full fine-tuning and PEFT LoRA (the
    # LoRA group's comparisons)
    for ref in ("hf-pure-bf16", "hf-bf16-master", "hf", "megallava-unfused", "megallava", "hf-peft-lora64"):
        if ref in ok:
            ratios[f"over_{ref}"] = {k: {"tokens_per_s": v["tokens_per_s"] / ok[ref]["tokens_per_s"],
                                         "mem_gib": v["mem_gib"] / ok[ref]["mem_gib"]}
                                     for k, v in ok.items() if k != ref}
    if {"megallava-packed", "megallava-halves"} <= set(ok):
        ratios["packed_per_token_time_over_unpacked"] = (ok["megallava-packed"]["ms_per_1k_tokens"]
                                                         / ok["megallava-halves"]["ms_per_1k_tokens"])
    targets = lora_targets(ok)

    import transformers
    import megatron.core
    report = {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, "
                                                            f"{torch.get_num_threads()} threads)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "megatron_core": megatron.core.__version__, "python": platform.python_version()},
        "commit": _git_commit(), "argv": sys.argv[1:] if argv is None else list(argv),
        "shape": args.shape, "projector": args.projector, "image_tokens": patches, "warmup": args.warmup,
        "iters": args.iters, "set": args.set, "peak_tflops": peak, "init": args.init,
        "flop_convention": "megallava.training.flops: unpadded tokens, causal attention at s/2, ViT layers built "
                           "by megallava (select_layer -2; HF also runs the last ViT layer, uncounted), frozen ViT 1x, "
                           "trained LLM/projector 3x",
        "memory": "torch.cuda.max_memory_allocated, reset per system" if cuda else
                  "peak RSS of the process (not resettable: later systems include earlier ones)",
        "results": results, "ratios": ratios, "targets": targets,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print_table(report)
    print(f"wrote {args.out}")
    return report


# Issue 10's targets on the GPU: (system, reference, minimum tokens/s ratio)
LORA_TARGETS = [("megallava-lora64", "megallava", 1.3), ("megallava-lora64", "hf-peft-lora64", 2.0),
                ("megallava-qlora64", "hf-peft-qlora64", None)]
QLORA_BYTES_TARGET = 0.56   # bytes per base parameter


def lora_targets(ok: dict) -> dict:
    """The LoRA/QLoRA comparisons of the systems that ran: tokens/s ratios against the targets, and the 4-bit bases'
    measured bytes per base parameter (megallava's NF4 and bitsandbytes')."""
    out = {}
    for system, ref, target in LORA_TARGETS:
        if system in ok and ref in ok:
            ratio = ok[system]["tokens_per_s"] / ok[ref]["tokens_per_s"]
            out[f"{system}_over_{ref}"] = {"tokens_per_s": ratio, "target": target,
                                           "met": None if target is None else ratio >= target}
    for name, r in ok.items():
        if "qlora_base_bytes_per_param" in r:  # the target is megallava's; the peer's bytes are for comparison
            ours = name.startswith("megallava")
            out[f"{name}_base_bytes_per_param"] = {
                "value": r["qlora_base_bytes_per_param"], "target": QLORA_BYTES_TARGET if ours else None,
                "met": r["qlora_base_bytes_per_param"] <= QLORA_BYTES_TARGET if ours else None}
    return out


def _git_commit():
    try:
        import subprocess

        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git on the GPU host copy
        return None


def print_table(rep):
    s = rep["shape"]
    print(f"\n{rep['device']} | LLM {s['layers']}L h{s['hidden']} ffn{s['ffn']} heads {s['heads']}/{s['kv_heads']} "
          f"vocab {s['vocab']} | ViT {s['vit_layers']}L h{s['vit_hidden']} @{s['image']}px ({rep['image_tokens']} "
          f"image tokens) | {rep['projector']} | seq {s['seq']} x micro-batch {s['micro_batch']}")
    print(f"warm-up {rep['warmup']}, timed {rep['iters']} | peak {rep['peak_tflops'] or 'n/a'} TFLOP/s/GPU")
    print(f"{'system':<32} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8} {'step ms':>8}  "
          f"{'loss first->last':<17} policy")
    for name, r in rep["results"].items():
        if "error" in r:
            print(f"{name:<32} FAILED: {r['error']}")
            continue
        if "skipped" in r:
            print(f"{name:<32} SKIPPED: {r['skipped']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        loss = f"{r['losses'][0]:.3f}->{r['losses'][-1]:.3f}"
        tf = r["tflops_per_gpu"]
        print(f"{name:<32} {r['tokens_per_s']:>10,.0f} {tf:>8.{1 if tf >= 10 else 4}f} {mfu:>6} {r['mem_gib']:>8.2f} "
              f"{1000 * r['step_s']:>8.1f}  {loss:<17} {r['policy']}; {r['optimizer']}")
        if "qlora_base_bytes" in r:
            print(f"{'':<32} 4-bit base: {r['qlora_base_bytes'] / 2 ** 20:,.2f} MiB for {r['qlora_base_params']:,} "
                  f"base params = {r['qlora_base_bytes_per_param']:.4f} bytes/param")
        if not all(math.isfinite(x) for x in r["losses"]):
            print(f"WARNING: {name} produced a non-finite loss")
        if "profile" in r:
            pr = r["profile"]
            classes = ", ".join(f"{c} {ms:.1f}" for c, ms in pr["by_class_ms"].items())
            print(f"{'':<32} profile ms/step: wall {pr['wall_ms']:.1f} = kernels {pr['kernel_ms']:.1f} "
                  f"({classes}) + idle {pr['idle_ms']:.1f}")
    for ref, table in rep["ratios"].items():
        if isinstance(table, dict):
            print(f"ratios {ref}: " + "; ".join(f"{k} tokens/s {v['tokens_per_s']:.2f}x mem {v['mem_gib']:.2f}x"
                                                 for k, v in table.items()))
        else:
            print(f"{ref}: {table:.3f}")
    where = " (CPU run: checks the script, not a measurement)" if rep["device"].startswith("CPU") else ""
    for key, t in rep.get("targets", {}).items():
        value = t.get("tokens_per_s", t.get("value"))
        unit = "x tokens/s" if "tokens_per_s" in t else " bytes/param"
        goal = "" if t["target"] is None else (f" (target {'>=' if 'tokens_per_s' in t else '<='} {t['target']}"
                                              f"{'x' if 'tokens_per_s' in t else ''}: "
                                              f"{'met' if t['met'] else 'NOT met'})")
        print(f"target {key}: {value:.3f}{unit}{goal}{where}")


if __name__ == "__main__":
    main()
