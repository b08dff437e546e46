"""Training throughput on one GPU: megallava vs HF transformers' LlavaForConditionalGeneration (SDPA), same shape,
same data, same precision policy, in the same run (one after the other; the first is deleted before the second).

    python bench/train_vs_hf.py                      # LLaMA-7B layer shape x 8 layers + CLIP ViT-L/14-336, mb 4
    python bench/train_vs_hf.py --precision bf16-master --micro-batch 8
    python bench/train_vs_hf.py --tiny               # tiny shape on CPU (< 1 min): exercises the script only

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

POLICIES = {
    "megallava": "bf16 params/activations, fp32 main grads + fp32 master weights in megatron's optimizer "
                 "(train.precision=bf16, megallava's only bf16 mode)",
    "hf/pure-bf16": "bf16 params, grads and AdamW states",
    "hf/bf16-master": "fp32 params, grads and AdamW states + torch.autocast(bf16) (HF Trainer's bf16=True)",
    "fp32": "fp32 everywhere (CPU run)",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shape (CPU, < 1 min): checks the script, not speed")
    p.add_argument("--precision", choices=["pure-bf16", "bf16-master"], default="pure-bf16",
                   help="HF's policy (megallava always runs bf16 params + fp32 master weights)")
    p.add_argument("--cpu-fp32", action="store_true", help="on CPU run both sides in fp32 instead of bf16")
    p.add_argument("--systems", default="megallava,hf", help="comma list: megallava, hf")
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
    p.add_argument("--out", help="JSON results (default bench/results/train_vs_hf[_tiny].json)")
    args = p.parse_args(argv)
    shape = dict(SHAPES["tiny" if args.tiny else "default"])
    for key in ("layers", "micro_batch", "seq"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    args.shape = shape
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 3)
    args.iters = args.iters if args.iters is not None else (3 if args.tiny else 10)
    here = os.path.dirname(os.path.abspath(__file__))
    args.out = args.out or os.path.join(here, "results", f"train_vs_hf{'_tiny' if args.tiny else ''}.json")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces: config, data, timing
# ----------------------------------------------------------------------------------------------------------------

def megallava_config(args, bf16: bool):
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
        f"train.precision={'bf16' if bf16 else 'fp32'}", f"data.seq_length={s['seq']}"])
    C.validate(cfg, 1)
    return cfg


def make_data(args, patches: int, device):
    """One fixed batch: each sample = `patches` image placeholders, then random text. Returns token ids with the
    image positions marked, megallava's pre-shifted labels, HF's unshifted labels, and pixels."""
    s, b, vocab = args.shape["seq"], args.shape["micro_batch"], args.shape["vocab"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab - 1, (b, s), generator=gen)  # vocab-1 is HF's image token
    is_image = torch.zeros(b, s, dtype=torch.bool)
    is_image[:, :patches] = True
    hf_labels = ids.masked_fill(is_image, -100)                # HF shifts inside the loss
    labels = torch.full((b, s), -100)                          # megallava's labels are pre-shifted
    labels[:, :-1] = hf_labels[:, 1:]
    pixels = torch.randn(b, 3, args.shape["image"], args.shape["image"], generator=gen)
    return {k: v.to(device) for k, v in dict(ids=ids, is_image=is_image, labels=labels, hf_labels=hf_labels,
                                              pixels=pixels).items()}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step, warmup: int, iters: int):
    """Mean seconds per step over `iters` after `warmup`; losses of every step (a sanity check that both train)."""
    losses = [step() for _ in range(warmup)]
    sync()
    start = time.perf_counter()
    losses += [step() for _ in range(iters)]
    sync()
    return (time.perf_counter() - start) / iters, [float(x) for x in losses]


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------------------------------------------
# The two systems
# ----------------------------------------------------------------------------------------------------------------

def run_megallava(args, cfg, data):
    """The real training path: init_distributed (one rank), build_chunks, wrap_ddp, build_optimizer, train_step."""
    from megallava.distributed import LaunchEnv, init_distributed, shutdown
    from megallava.model.build import build_chunks
    from megallava.training.optimizer import build_optimizer, wrap_ddp
    from megallava.training.step import train_step

    init_distributed(1, 1, None, cfg.train.seed, LaunchEnv(0, 1, 0, "127.0.0.1", 0))
    try:
        model = wrap_ddp(build_chunks(cfg), cfg)
        optimizer, scheduler = build_optimizer(model, cfg)
        b, s = data["ids"].shape
        batch = {"tokens": data["ids"].masked_fill(data["is_image"], cfg.model.image_token_id),
                 "labels": data["labels"], "images": data["pixels"], "lengths": [s] * b, "num_images": b}
        iterators = [itertools.repeat(batch)]

        def step():
            out = train_step(model, optimizer, scheduler, iterators, 1, b, s)
            loss_sum, tokens = out["loss_stats"].tolist()
            return loss_sum / tokens

        free_memory()
        step_s, losses = timed(step, args.warmup, args.iters)
        mem = F.peak_memory_gib()
        inner = getattr(optimizer, "chained_optimizers", [optimizer])[0]  # megatron wraps torch's / apex's Adam
        adam = type(inner.optimizer)
        return {"step_s": step_s, "losses": losses, "mem_gib": mem,
                "optimizer": f"megatron {type(inner).__name__} over {adam.__module__}.{adam.__name__}"}
    finally:
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


def run_hf(args, data, policy: str):
    device = data["ids"].device
    autocast = policy == "bf16-master"
    dtype = torch.bfloat16 if policy == "pure-bf16" else torch.float32
    model = hf_model(args, device, dtype)
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
        step_s, losses = timed(step, args.warmup, args.iters)
        return {"step_s": step_s, "losses": losses, "mem_gib": F.peak_memory_gib(),
                "optimizer": f"torch.optim.AdamW(fused={device.type == 'cuda'})"}
    finally:
        model = optimizer = params = None
        free_memory()


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = cuda or not args.cpu_fp32
    systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    cfg = megallava_config(args, bf16)
    from megallava.config import image_tokens_per_image

    patches = image_tokens_per_image(cfg)
    data = make_data(args, patches, device)
    b, s = args.shape["micro_batch"], args.shape["seq"]
    flops = F.step_flops(cfg, [s] * b, b)
    tokens = b * s
    peak = F.peak_tflops_per_gpu(args.peak_tflops)
    hf_policy = args.precision if bf16 else "fp32"
    if args.projector != "mlp2x_gelu" and "hf" in systems:
        sys.exit("HF's LLaVA projector is always mlp2x: use --projector mlp2x_gelu or --systems megallava")

    results = {}
    for name in systems:
        t0 = time.perf_counter()
        if name == "megallava":
            r = run_megallava(args, cfg, data)
            r["policy"] = POLICIES["megallava"] if bf16 else POLICIES["fp32"]
        elif name == "hf":
            r = run_hf(args, data, hf_policy)
            r["policy"] = POLICIES[f"hf/{hf_policy}"] if bf16 else POLICIES["fp32"]
        else:
            sys.exit(f"unknown system {name!r}: use megallava, hf")
        r.update(F.throughput(flops, tokens, r["step_s"], 1, peak))
        r["wall_s"] = time.perf_counter() - t0
        r["residual_gib_after"] = torch.cuda.memory_allocated() / 2 ** 30 if cuda else None
        results[name] = r

    ratio = None
    if {"megallava", "hf"} <= set(results):
        m, h = results["megallava"], results["hf"]
        ratio = {"tokens_per_s": m["tokens_per_s"] / h["tokens_per_s"], "mem_gib": m["mem_gib"] / h["mem_gib"]}

    import transformers
    import megatron.core
    report = {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, "
                                                            f"{torch.get_num_threads()} threads)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "megatron_core": megatron.core.__version__, "python": platform.python_version()},
        "shape": args.shape, "projector": args.projector, "image_tokens": patches, "warmup": args.warmup,
        "iters": args.iters, "precision_arg": args.precision, "peak_tflops": peak,
        "tokens_per_step": tokens, "model_tflop_per_step": {k: v / 1e12 for k, v in flops.items()},
        "flop_convention": "megallava.training.flops: unpadded tokens, causal attention at s/2, ViT layers built "
                           "by megallava (select_layer -2; HF also runs the last ViT layer, uncounted), frozen ViT 1x, "
                           "trained LLM/projector 3x",
        "memory": "torch.cuda.max_memory_allocated, reset per system" if cuda else
                  "peak RSS of the process (not resettable: the second system includes the first)",
        "results": results, "ratio_megallava_over_hf": ratio,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print_table(report)
    print(f"wrote {args.out}")


def print_table(rep):
    s = rep["shape"]
    print(f"\n{rep['device']} | LLM {s['layers']}L h{s['hidden']} ffn{s['ffn']} heads {s['heads']}/{s['kv_heads']} "
          f"vocab {s['vocab']} | ViT {s['vit_layers']}L h{s['vit_hidden']} @{s['image']}px ({rep['image_tokens']} "
          f"image tokens) | {rep['projector']} | seq {s['seq']} x micro-batch {s['micro_batch']}")
    t = rep["model_tflop_per_step"]
    print(f"model TFLOP/step: total {t['total']:.4g} = LLM {t['llm']:.4g} + ViT {t['vit']:.4g} + projector "
          f"{t['projector']:.4g} | warm-up {rep['warmup']}, timed {rep['iters']} | peak "
          f"{rep['peak_tflops'] or 'n/a'} TFLOP/s/GPU")
    print(f"{'system':<10} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8} {'step ms':>8}  "
          f"{'loss first->last':<17} policy")
    for name, r in rep["results"].items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        loss = f"{r['losses'][0]:.3f}->{r['losses'][-1]:.3f}"
        tf = r["tflops_per_gpu"]
        print(f"{name:<10} {r['tokens_per_s']:>10,.0f} {tf:>8.{1 if tf >= 10 else 4}f} {mfu:>6} {r['mem_gib']:>8.2f} "
              f"{1000 * r['step_s']:>8.1f}  {loss:<17} {r['policy']}; {r['optimizer']}")
        if not all(math.isfinite(x) for x in r["losses"]):
            print(f"WARNING: {name} produced a non-finite loss")
    if rep["ratio_megallava_over_hf"]:
        q = rep["ratio_megallava_over_hf"]
        print(f"megallava / HF: tokens/s {q['tokens_per_s']:.2f}x, peak memory {q['mem_gib']:.2f}x")


if __name__ == "__main__":
    main()
