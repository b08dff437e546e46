"""Data-loader benchmark (not a test): samples/s per CPU core, full path at 336 px, on the embedded demo data.

  python bench/data_loader.py [--passes 3] [--image-size 336] [--top 12]

ours:      megallava.data.loader.MicroBatches, one micro-batch of 1 per sample: seek into the shard, CRC, decode,
           pad to square, resize, crop, normalise (data/images.py), vicuna_v1 template tokenised once with offsets
           and masked (data/templates.py), <image> expanded to its placeholder run, collate. Three shardings of
           the same data: original image bytes; images stored already padded/resized for 336 px as PNG
           (make_shards --image-size 336) or as raw PPM (--image-format ppm); all three give identical pixels.
llava:     a LLaVA-style map dataset (haotian-liu/LLaVA LazySupervisedDataset + preprocess_v1): open the image file
           with PIL, expand2square, HF CLIPImageProcessor, render the vicuna_v1 prompt, tokenise it, then tokenise
           every round twice more to build the mask. Its tokeniser is the raw sentencepiece processor (faster than
           the HF LlamaTokenizer wrapper LLaVA uses), so the baseline is, if anything, flattered.
Both run in this one process with one torch thread, timed by process CPU time, so the numbers are per core.
"""
import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

IMAGE_TOKEN_INDEX = -200


class LlavaStyleDataset:
    """The per-sample work of LLaVA's LazySupervisedDataset.__getitem__ with image_aspect_ratio=pad, conv vicuna_v1."""

    def __init__(self, records, image_folder, processor, sp):
        from megallava.data.templates import VICUNA_SYSTEM
        self.records, self.folder, self.processor, self.sp = records, image_folder, processor, sp
        self.system = VICUNA_SYSTEM

    def tokenizer_image_token(self, prompt):
        chunks = [[self.sp.bos_id()] + self.sp.encode(c) for c in prompt.split("<image>")]
        ids = [chunks[0][0]]
        for i, c in enumerate(chunks):
            if i:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(c[1:])
        return ids

    def __getitem__(self, i):
        rec = self.records[i]
        image = Image.open(os.path.join(self.folder, rec["image"])).convert("RGB")
        w, h = image.size
        if w != h:  # expand2square with the processor's mean colour
            side = max(w, h)
            sq = Image.new(image.mode, (side, side), tuple(int(x * 255) for x in self.processor.image_mean))
            sq.paste(image, ((side - w) // 2, (side - h) // 2))
            image = sq
        pixels = self.processor.preprocess(image, return_tensors="pt")["pixel_values"][0]
        conv = []
        for t in rec["conversations"]:  # preprocess_multimodal: "<image>" first, on its own line
            v = t["value"]
            if "<image>" in v:
                v = "<image>\n" + v.replace("<image>", "").strip()
            conv.append(("USER" if t["from"] == "human" else "ASSISTANT", v))
        prompt = self.system + " "  # conv_vicuna_v1.get_prompt(), SeparatorStyle.TWO
        for j, (role, msg) in enumerate(conv):
            prompt += role + ": " + msg + (" " if j % 2 == 0 else "</s>")
        input_ids = torch.tensor(self.tokenizer_image_token(prompt))
        target = input_ids.clone()
        sep, cur = " ASSISTANT: ", 1
        target[:cur] = -100
        for rou in prompt.split("</s>"):
            if rou == "":
                break
            parts = rou.split(sep)
            if len(parts) != 2:
                break
            parts[0] += sep
            round_len = len(self.tokenizer_image_token(rou))
            instruction_len = len(self.tokenizer_image_token(parts[0])) - 2
            target[cur:cur + instruction_len] = -100
            cur += round_len
        target[cur:] = -100
        return {"input_ids": input_ids, "labels": target, "image": pixels}


def rate(fn, n, passes):
    t0, w0 = time.process_time(), time.perf_counter()
    for _ in range(passes):
        for i in range(n):
            fn(i)
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    return n * passes / cpu, n * passes / wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import sentencepiece as spm
    from transformers import CLIPImageProcessor
    from transformers.utils import logging as hf_logging
    from megallava import config as C
    from megallava.data.demo_data import build_demo_dataset
    from megallava.data.images import CLIP_MEAN, CLIP_STD
    from megallava.data.loader import MicroBatches
    from megallava.data.shards import write_shards

    tmp = tempfile.mkdtemp(prefix="megallava-bench-")
    paths = build_demo_dataset(tmp)
    with open(paths["llava_instruct"]) as f:
        records = json.load(f)

    def shard_loader(name, **prep):
        out = os.path.join(tmp, name)
        write_shards([paths["llava_instruct"]], out, "instruct", image_root=tmp, log=lambda _: None, **prep)
        cfg = C.load_config(None, ["data.source=shards", f"data.tokenizer={paths['tokenizer']}",
                                   "data.seq_length=4096", f"model.vision.image_size={args.image_size}",
                                   "data.num_workers=0", "train.micro_batch_size=1", "train.global_batch_size=1",
                                   "data.shuffle=false"])
        cfg.data.sources = [C.SourceConfig(path=out)]
        ds = MicroBatches(cfg, 0, 1, with_images=True)
        assert ds.sources[0].n == len(records), "the bench expects every demo record to be sharded"
        return ds

    ours = shard_loader("shards")  # original image bytes
    ours_png = shard_loader("shards_png", image_size=args.image_size)  # make_shards --image-size 336
    ours_ppm = shard_loader("shards_ppm", image_size=args.image_size, image_format="ppm")  # ... --image-format ppm
    n = len(records)

    hf_logging.set_verbosity_error()
    processor = CLIPImageProcessor(size={"shortest_edge": args.image_size}, resample=3, do_center_crop=True,
                                   crop_size={"height": args.image_size, "width": args.image_size},
                                   image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    llava = LlavaStyleDataset(records, tmp, processor, spm.SentencePieceProcessor(model_file=paths["tokenizer"]))

    # Same samples in the same order (shuffle off, nothing skipped): compare pixels with HF's processor. PNGs
    # decode identically; RGBA is composited on white (LLaVA keeps the hidden colour); JPEGs at least twice the
    # target size take a reduced-DCT decode in ours (data/images.py).
    diffs = [(ours[q]["images"][0] - llava[q]["image"]).abs().max().item() for q in range(n)]
    same = all(torch.equal(ours[q]["images"], pre[q]["images"]) for q in range(n) for pre in (ours_png, ours_ppm))

    for ds in (ours, ours_png, ours_ppm, llava):
        ds[0]  # warm-up: tokenizer load, page cache
    results = {name: rate(ds.__getitem__, n, args.passes) for name, ds in
               (("ours", ours), ("ours_png", ours_png), ("ours_ppm", ours_ppm), ("llava", llava))}
    base = results["llava"][0]
    print(f"demo llava_instruct: {n} samples, each with an image (mostly PNG photos, 300-741 px), "
          f"{args.image_size} px, {args.passes} passes, 1 torch thread")
    for name, label in (("ours", "ours, original image bytes"), ("ours_png", f"ours, --image-size {args.image_size}"),
                        ("ours_ppm", "ours, ... --image-format ppm"), ("llava", "LLaVA-style map dataset")):
        cpu, wall = results[name]
        ratio = "" if name == "llava" else f"  {cpu / base:.2f}x LLaVA-style (target >= 3x)"
        print(f"  {label:32s} {cpu:7.1f} samples/s per core ({wall:.1f}/s wall){ratio}")
    print(f"  pixels vs CLIPImageProcessor: max |diff| {max(diffs):.4f}, median {sorted(diffs)[n // 2]:.4f} "
          f"(normalised units); preprocessed shards give identical pixels: {same}")

    prof = cProfile.Profile()
    prof.enable()
    for q in range(n):
        ours[q]
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (calls, ncalls, own time, cumulative, callers)}
    total = sum(v[2] for v in stats.values())
    print(f"\nprofile of one pass of ours (original bytes): {1000 * total / n:.1f} ms/sample; top {args.top} by own time:")
    for (file, line, name), v in sorted(stats.items(), key=lambda kv: -kv[1][2])[:args.top]:
        where = name if file == "~" else f"{os.path.basename(file)}:{line}({name})"
        print(f"  {100 * v[2] / total:5.1f}%  {1000 * v[2] / n:6.2f} ms/sample  {v[1]:6d} calls  {where}")


if __name__ == "__main__":
    main()
