"""Conversion benchmark (not a test): time and peak RSS of HF -> megallava -> HF for a random LLaMA-shaped LLaVA.

    python bench/convert.py                      # 1.9 B: h 2048, 32 layers, ffn 5632, vocab 32000, MHA, bf16, + ViT-B/14
    python bench/convert.py --layers 4 --vocab 8000   # a quick run

Writes a random llava-hf directory (one safetensors shard per layer) under --workdir, then runs
``tools/convert_checkpoint.py hf-to-megatron`` and ``megatron-to-hf`` each in a fresh interpreter that reports its
wall time, its RSS before converting (interpreter + torch + transformers) and its peak RSS (VmHWM). Also checks that
the round trip is bitwise for every tensor the export holds.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

_CHILD = """
import json, sys, time
from megallava.convert import cli, hf_to_megatron, megatron_to_hf  # noqa: F401
from transformers import LlavaConfig  # noqa: F401

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

before = status("VmRSS")
t0 = time.perf_counter()
rc = cli.main(json.loads(sys.argv[1]))
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0, "before_mib": before, "peak_mib": status("VmHWM")}))
"""


def make_model(path, args):
    """A random llava-hf directory, written one layer at a time (bounded memory here too)."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    h, f, v = args.hidden, args.ffn, args.vocab
    kv = args.kv_heads or args.heads
    d = h // args.heads
    vh, vf, vl = args.vit_hidden, args.vit_ffn, args.vit_layers
    text = LlamaConfig(vocab_size=v, hidden_size=h, intermediate_size=f, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=kv, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=vh, intermediate_size=vf, num_hidden_layers=vl,
                              num_attention_heads=vh // 64, image_size=args.image_size, patch_size=14)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_index=v - 1)
    os.makedirs(path)
    cfg.save_pretrained(path)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: (torch.randn(*s, generator=gen) * 0.02).to(dtype)  # noqa: E731
    weight_map, total = {}, 0

    def put(tensors, name):
        nonlocal total
        save_file(tensors, os.path.join(path, name))
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() for t in tensors.values())

    patches = (args.image_size // 14) ** 2
    vit = {"vision_tower.vision_model.embeddings.class_embedding": rnd(vh),
           "vision_tower.vision_model.embeddings.patch_embedding.weight": rnd(vh, 3, 14, 14),
           "vision_tower.vision_model.embeddings.position_embedding.weight": rnd(patches + 1, vh),
           "vision_tower.vision_model.pre_layrnorm.weight": rnd(vh), "vision_tower.vision_model.pre_layrnorm.bias": rnd(vh),
           "vision_tower.vision_model.post_layernorm.weight": rnd(vh),
           "vision_tower.vision_model.post_layernorm.bias": rnd(vh)}
    for i in range(vl):
        p = f"vision_tower.vision_model.encoder.layers.{i}."
        for n in ("layer_norm1", "layer_norm2"):
            vit[p + n + ".weight"], vit[p + n + ".bias"] = rnd(vh), rnd(vh)
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            vit[p + f"self_attn.{n}.weight"], vit[p + f"self_attn.{n}.bias"] = rnd(vh, vh), rnd(vh)
        vit[p + "mlp.fc1.weight"], vit[p + "mlp.fc1.bias"] = rnd(vf, vh), rnd(vf)
        vit[p + "mlp.fc2.weight"], vit[p + "mlp.fc2.bias"] = rnd(vh, vf), rnd(vh)
    put(vit, "model-vision.safetensors")
    del vit
    put({"multi_modal_projector.linear_1.weight": rnd(h, vh), "multi_modal_projector.linear_1.bias": rnd(h),
         "multi_modal_projector.linear_2.weight": rnd(h, h), "multi_modal_projector.linear_2.bias": rnd(h),
         "language_model.model.embed_tokens.weight": rnd(v, h), "language_model.model.norm.weight": rnd(h),
         "language_model.lm_head.weight": rnd(v, h)}, "model-embed.safetensors")
    for i in range(args.layers):
        p = f"language_model.model.layers.{i}."
        put({p + "input_layernorm.weight": rnd(h), p + "post_attention_layernorm.weight": rnd(h),
             p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv * d, h),
             p + "self_attn.v_proj.weight": rnd(kv * d, h), p + "self_attn.o_proj.weight": rnd(h, h),
             p + "mlp.gate_proj.weight": rnd(f, h), p + "mlp.up_proj.weight": rnd(f, h),
             p + "mlp.down_proj.weight": rnd(h, f)}, f"model-layer{i:03d}.safetensors")
    elem = torch.empty((), dtype=dtype).element_size()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total * elem}, "weight_map": weight_map}, fh)
    largest = max(2 * f * h, v * h, (h + 2 * kv * d) * h) * elem
    return total, total * elem, largest


def run(argv):
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(argv)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--vit-hidden", type=int, default=768)
    ap.add_argument("--vit-ffn", type=int, default=3072)
    ap.add_argument("--vit-layers", type=int, default=12)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--max-shard-size", default="2GB")
    ap.add_argument("--workdir", default="/tmp/megallava_bench_convert")
    ap.add_argument("--keep", action="store_true", help="keep the generated and converted checkpoints")
    args = ap.parse_args()

    shutil.rmtree(args.workdir, ignore_errors=True)
    hf, meg, back = (os.path.join(args.workdir, n) for n in ("hf", "megallava", "hf_back"))
    t0 = time.perf_counter()
    params, nbytes, largest = make_model(hf, args)
    print(f"random llava-hf model: {params / 1e9:.2f} B parameters, {nbytes / 2 ** 30:.2f} GiB {args.dtype} "
          f"(largest fused tensor {largest / 2 ** 20:.0f} MiB), written in {time.perf_counter() - t0:.1f} s", flush=True)
    results = {
        "hf-to-megatron": run(["hf-to-megatron", "--input", hf, "--output", meg, "--quiet"]),
        "megatron-to-hf": run(["megatron-to-hf", "--weights-only", "--input", meg, "--output", back, "--quiet",
                               "--max-shard-size", args.max_shard_size]),
    }
    print(f"{'direction':16s} {'time s':>8s} {'GiB/s':>7s} {'RSS before MiB':>15s} {'peak RSS MiB':>13s} "
          f"{'peak - before':>14s}")
    for name, r in results.items():
        print(f"{name:16s} {r['seconds']:8.1f} {nbytes / 2 ** 30 / r['seconds']:7.2f} {r['before_mib']:15.0f} "
              f"{r['peak_mib']:13.0f} {r['peak_mib'] - r['before_mib']:14.0f}")
    print(f"model {nbytes / 2 ** 20:.0f} MiB; peak RSS above the idle interpreter stays a few tensors "
          f"({largest / 2 ** 20:.0f} MiB largest)")

    # Round trip: every tensor of the export equals the input's (the unbuilt ViT top layer is not exported).
    import torch
    from megallava.convert import hf_names
    from megallava.convert.tensor_files import TensorFiles

    a, b = TensorFiles.from_dir(hf), TensorFiles.from_dir(back)
    amap = {hf_names.short_name(n): n for n in a.names()}
    same = 0
    for n in b.names():
        s = hf_names.short_name(n)
        if s.startswith("vit.post_layernorm."):
            continue
        if not torch.equal(a.get(amap[s]), b.get(n)):
            raise SystemExit(f"round trip differs: {n}")
        same += 1
    print(f"round trip: {same} tensors bitwise identical")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
