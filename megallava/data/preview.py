"""Show what the model is trained on: ``python -m megallava.data.preview --config FILE [--n N] [--json] [k=v ...]``.

Prints the first N samples in global batch order exactly as the loader builds them (template, truncation, skips),
with the trained tokens wrapped in [[...]] (green on a terminal) and each image's placeholder run collapsed to
``<image x576>``. Each sample is named by its original id (the record's ``id`` in the input JSON, or its index
there) and its shard key; shards written before the id was stored show the key only. ``--json`` prints one object per
sample: source, id, key, input_ids, labels, num_images.
"""
import argparse
import json
import os
import sys
from collections import Counter

from megallava import config as C
from megallava.data.batching import IGNORE_INDEX


def render(tokens, labels, tokenizer, image_token_id: int, color: bool) -> str:
    """Text with trained spans marked; a token is trained when the previous position's label predicts it."""
    trained = [False] + [x != IGNORE_INDEX for x in labels[:-1]]
    kind = ["image" if t == image_token_id else ("train" if tr else "text") for t, tr in zip(tokens, trained)]
    out, i = [], 0
    while i < len(tokens):
        j = i
        while j < len(tokens) and kind[j] == kind[i]:
            j += 1
        if kind[i] == "image":
            out.append(f"<image x{j - i}>")
        else:  # EOS shown as </s> (decode drops it): whether it is trained matters
            pieces = [[]]
            for t in tokens[i:j]:
                if t == tokenizer.eos_id:
                    pieces.append([])
                else:
                    pieces[-1].append(t)
            text = "</s>".join(tokenizer.decode(p) for p in pieces)
            if kind[i] == "train":
                text = f"\033[32m{text}\033[0m" if color else f"[[{text}]]"
            out.append(text)
        i = j
    return "".join(out)


class OriginalIds:
    """(source index, shard key) -> the sample's original id, read from its ``<key>.json`` member through the
    manifest's byte offsets; None for shards that do not store it."""

    def __init__(self, paths):
        self.paths, self._where = list(paths), {}

    def __call__(self, source: int, key: str):
        from megallava.data.shards import load_manifest, read_sample
        if source not in self._where:
            path = self.paths[source]
            self._where[source] = {k: (os.path.join(path, s["name"]), o, n, c) for s in load_manifest(path)["shards"]
                                   for k, o, n, c in zip(s["keys"], s["offsets"], s["sizes"], s["crc32"])}
        where = self._where[source].get(key)
        if where is None:
            return None
        with open(where[0], "rb") as f:
            members = read_sample(f, *where[1:])
        try:
            record = json.loads(members["json"]) if members and "json" in members else None
        except ValueError:
            return None
        return record.get("id") if isinstance(record, dict) else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megallava.data.preview", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--n", type=int, default=4, help="samples to show")
    parser.add_argument("--json", action="store_true", help="one JSON object per sample")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.seq_length=1024")
    args = parser.parse_args(argv)
    try:
        cfg = C.load_config(args.config, args.overrides)
        C.validate(cfg, cfg.parallel.tp * cfg.parallel.pp)  # one data-parallel replica
        if cfg.data.source != "shards":
            raise C.ConfigError("data.source must be 'shards' to preview shard data")
    except C.ConfigError as err:
        print(f"megallava.data.preview: {err}", file=sys.stderr)
        return 2
    from megallava.data.loader import DataError, build_microbatch_iterator, source_names
    from megallava.data.shards import ShardError
    from megallava.data.tokenizer import load_tokenizer
    try:
        names, tok = source_names(cfg), load_tokenizer(cfg.data.tokenizer)
        it = build_microbatch_iterator(cfg, 0, 1, 0, with_images=False)  # images are only counted, never decoded
    except (ShardError, DataError) as err:  # a damaged manifest, mismatched shards: the message says what to do
        print(f"megallava.data.preview: {err}", file=sys.stderr)
        return 2
    per_image = C.image_tokens_per_image(cfg)
    original_id = OriginalIds(s.path for s in cfg.data.sources)
    color = sys.stdout.isatty() and not args.json
    shown, skipped = 0, Counter()
    for _ in range(max(100, 20 * args.n)):  # bounded: a source whose samples all fail must not spin forever
        if shown >= args.n:
            break
        batch = next(it)
        skipped.update(batch["skipped"])
        if batch["empty"]:
            continue
        for i, n in enumerate(batch["lengths"]):
            if shown >= args.n:
                break
            tokens, labels = batch["tokens"][i, :n].tolist(), batch["labels"][i, :n].tolist()
            s, key = int(batch["source_ids"][i]), batch["keys"][i]
            rid = original_id(s, key)
            images = sum(t == cfg.model.image_token_id for t in tokens) // per_image
            if args.json:
                print(json.dumps({"source": names[s], "id": key if rid is None else rid, "key": key,
                                  "input_ids": tokens, "labels": labels, "num_images": images}))
            else:
                trained = sum(x != IGNORE_INDEX for x in labels)
                name = key if rid is None else f"id {rid} (key {key})"
                print(f"--- sample {shown} | source {names[s]} | {name} | {n} tokens, {trained} trained, "
                      f"{images} image(s)")
                print(render(tokens, labels, tok, cfg.model.image_token_id, color))
            shown += 1
    if skipped:
        print(f"skipped while reading: {dict(skipped)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
