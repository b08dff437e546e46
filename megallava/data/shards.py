"""LLaVA / ShareGPT JSON -> webdataset ``.tar`` shards plus ``manifest.json`` (the writer behind tools/make_shards.py).

One sample = tar members ``<key>.json`` (``id``, ``source``, ``conversations``, ``num_images``) followed by
``<key>.img0.jpg``, ``<key>.img1.png``, ... (the original image bytes). The manifest records, per shard, the byte
offset and size of every sample inside the tar plus a CRC32 of those bytes, so a reader seeks straight to its own
samples (as megatron-energon does) and detects corrupted bytes without decoding anything.

Bad records are skipped and counted by reason (``manifest["skipped"]``), never a crash halfway through. Output is
deterministic: tar headers carry no time or owner, records are processed in fixed-size chunks and written in input
order, so the shards (and their sha256) do not depend on ``workers``. A run is resumable: every finished shard is
renamed into place and appended to ``progress.jsonl``; a re-run with the same inputs keeps the shards whose checksum
still matches and continues after the last of them.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import tarfile
import time
import zlib
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

MANIFEST, PROGRESS = "manifest.json", "progress.jsonl"
FORMAT_VERSION = 1
CHUNK = 32                      # records per pool task: fixed, so output never depends on the worker count
BLOCK = tarfile.BLOCKSIZE       # 512
USER_ROLES, ASSISTANT_ROLES, SYSTEM_ROLES = {"human", "user"}, {"gpt", "assistant"}, {"system"}
IMAGE_TAG = "<image>"
SKIP_REASONS = ("bad_record", "empty", "no_assistant_turn", "unknown_role", "non_utf8", "image_count",
                "missing_image", "empty_image", "bad_image")


class ShardError(Exception):
    """A shard directory or file that cannot be used; the message names the file and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Reading the inputs and checking one record (runs in pool workers).
# ----------------------------------------------------------------------------------------------------------------

def read_records(path: str) -> List[dict]:
    """A JSON list (LLaVA, ShareGPT) or JSON lines. Invalid UTF-8 bytes survive as lone surrogates so that only the
    records containing them are skipped (reason ``non_utf8``), not the whole file."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="surrogateescape")
    if path.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ShardError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _utf8_ok(value) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return True
        except UnicodeEncodeError:
            return False
    if isinstance(value, dict):
        return all(_utf8_ok(k) and _utf8_ok(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_utf8_ok(v) for v in value)
    return True


def check_record(record) -> Tuple[Optional[str], list, List[str]]:
    """(skip reason or None, conversations as [{"from", "value"}], image paths). Pure structure, no file access."""
    if not isinstance(record, dict):
        return "bad_record", [], []
    turns = record.get("conversations", record.get("messages"))
    images = record.get("image", record.get("images")) or []
    images = [images] if isinstance(images, str) else images
    if not isinstance(turns, list) or not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        return "bad_record", [], []
    if not _utf8_ok(record):
        return "non_utf8", [], []
    conv = []
    for t in turns:  # ShareGPT dumps use from/value or role/content
        if not isinstance(t, dict):
            return "bad_record", [], []
        role, value = t.get("from", t.get("role")), t.get("value", t.get("content"))
        if not isinstance(role, str) or not isinstance(value, str):
            return "bad_record", [], []
        conv.append({"from": role, "value": value})
    if not conv or not any(t["value"].strip() for t in conv):
        return "empty", conv, images
    if any(t["from"] not in USER_ROLES | ASSISTANT_ROLES and not (i == 0 and t["from"] in SYSTEM_ROLES)
           for i, t in enumerate(conv)):  # a system turn only opens a conversation (as templates.py accepts)
        return "unknown_role", conv, images
    if not any(t["from"] in ASSISTANT_ROLES for t in conv):
        return "no_assistant_turn", conv, images
    if sum(t["value"].count(IMAGE_TAG) for t in conv) != len(images):
        return "image_count", conv, images
    return None, conv, images


def _image_ext(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return {"jpeg": "jpg"}.get(ext, ext) if re.fullmatch(r"[a-z0-9]{1,5}", ext or "") else "img"


def _member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # no time/owner: identical bytes on every run
    return info.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % BLOCK)


def preprocess_image(data: bytes, size: int, mode: str, fmt: str = "png") -> bytes:
    """The image exactly as load_image sees it before normalising (decoded, RGB, padded, resized, cropped), stored
    lossless: load_image on it gives the same pixels as on the original without decoding the full image and
    resizing it (most of the loader's time). "png" is compact; "ppm" is raw pixels (3 x size^2 bytes), about 4x
    faster again to load."""
    from megallava.data import images
    img = images.to_rgb(images._open(data, draft_size=size))
    img = images._resize_crop(images.expand2square(img) if mode == "pad" else img, size)
    buf = io.BytesIO()
    img.save(buf, fmt.upper())
    return buf.getvalue()


def _encode_sample(job) -> tuple:
    """One record -> ("ok", key, tar bytes, crc32) or ("skip", reason, record id)."""
    from megallava.data.images import ImageError, validate_image
    index, record, source, key_prefix, image_root, prep = job
    rid = record.get("id", index) if isinstance(record, dict) else index
    reason, conv, paths = check_record(record)
    if reason:
        return ("skip", reason, str(rid))
    blobs = []
    for path in paths:
        full = os.path.join(image_root or "", path)
        try:
            with open(full, "rb") as f:
                data = f.read()
        except OSError:
            return ("skip", "missing_image", str(rid))
        if not data:
            return ("skip", "empty_image", str(rid))
        try:
            validate_image(data)
            blobs.append((prep[2], preprocess_image(data, *prep)) if prep else (_image_ext(path), data))
        except ImageError:
            return ("skip", "bad_image", str(rid))
    key = f"{key_prefix}{index:09d}"
    meta = {"id": rid, "source": source, "conversations": conv, "num_images": len(blobs)}
    body = _member(f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
    body += b"".join(_member(f"{key}.img{i}.{ext}", data) for i, (ext, data) in enumerate(blobs))
    return ("ok", key, body, zlib.crc32(body))


def _encode_chunk(jobs) -> list:
    return [_encode_sample(j) for j in jobs]


# ----------------------------------------------------------------------------------------------------------------
# Writing shards.
# ----------------------------------------------------------------------------------------------------------------

def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fingerprint(inputs: Sequence[str], **options) -> str:
    h = hashlib.sha256(json.dumps({"version": FORMAT_VERSION, **options}, sort_keys=True).encode())
    for path in inputs:
        h.update(_sha256(path).encode())
    return h.hexdigest()


def _shard_ok(out_dir: str, entry: dict) -> bool:
    path = os.path.join(out_dir, entry["name"])
    return os.path.isfile(path) and os.path.getsize(path) == entry["bytes"] and _sha256(path) == entry["sha256"]


def _load_progress(out_dir: str, fingerprint: str) -> List[dict]:
    path = os.path.join(out_dir, PROGRESS)
    if not os.path.isfile(path):
        return []
    entries = []
    with open(path) as f:
        lines = f.read().splitlines()
    try:
        if not lines or json.loads(lines[0]).get("fingerprint") != fingerprint:
            return []
        for line in lines[1:]:
            entries.append(json.loads(line))
    except json.JSONDecodeError:  # a line cut by a crash: keep what parsed
        pass
    return entries


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "data"


def write_shards(inputs: Sequence[str], out_dir: str, source: str, image_root: Optional[str] = None,
                 max_samples_per_shard: int = 10000, max_shard_bytes: Optional[int] = None, workers: int = 1,
                 log=print, image_size: Optional[int] = None, image_mode: str = "pad",
                 image_format: str = "png") -> dict:
    """Write the shards of one source; returns the manifest (also written to ``out_dir/manifest.json``).
    ``image_size``: store images preprocessed for that training resolution and ``image_mode`` (see
    preprocess_image) instead of the original bytes; the loader then requires the same model.vision.image_size."""
    if max_samples_per_shard is not None and max_samples_per_shard < 1:
        raise ShardError(f"max_samples_per_shard={max_samples_per_shard} must be >= 1")
    if image_mode not in ("pad", "resize") or image_format not in ("png", "ppm"):
        raise ShardError(f"image_mode={image_mode!r}, image_format={image_format!r}: use pad or resize, png or ppm")
    os.makedirs(out_dir, exist_ok=True)
    image_root = os.path.abspath(image_root) if image_root else None
    prep = (image_size, image_mode, image_format) if image_size else None
    fingerprint = _fingerprint(inputs, source=source, image_root=image_root, max_samples=max_samples_per_shard,
                               max_bytes=max_shard_bytes, preprocess=prep)
    prefix = _safe(source)

    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.isfile(manifest_path):  # idempotent: same inputs and every shard intact -> nothing to do
        with open(manifest_path) as f:
            old = json.load(f)
        if old.get("fingerprint") == fingerprint and all(_shard_ok(out_dir, s) for s in old["shards"]):
            log(f"make_shards: {out_dir} is up to date ({old['num_samples']} samples, {len(old['shards'])} shards)")
            return old
        os.remove(manifest_path)  # being rewritten: no reader may take the directory for complete meanwhile

    done = []
    for entry in _load_progress(out_dir, fingerprint):  # resume after the last intact shard
        if not _shard_ok(out_dir, entry):
            break
        done.append(entry)
    if not done:
        with open(os.path.join(out_dir, PROGRESS), "w") as f:
            f.write(json.dumps({"fingerprint": fingerprint}) + "\n")
    else:
        with open(os.path.join(out_dir, PROGRESS), "w") as f:  # drop entries past the first bad shard
            f.write(json.dumps({"fingerprint": fingerprint}) + "\n")
            f.writelines(json.dumps(e) + "\n" for e in done)
    start = done[-1]["record_end"] if done else 0

    records: List[dict] = []
    for path in inputs:
        records.extend(read_records(path))
    total = len(records)
    if done:
        log(f"make_shards: resuming after {len(done)} intact shard(s) at record {start}/{total}")
    jobs = [(i, records[i], source, prefix + "_", image_root, prep) for i in range(start, total)]
    chunks = [jobs[i:i + CHUNK] for i in range(0, len(jobs), CHUNK)]

    state = {"shard": None, "t0": time.time()}
    tail = Counter()  # skips since the last sample: they go to the shard that closes next (resume restarts after it)

    def open_shard():
        name = f"{prefix}-{len(done):06d}.tar"
        tmp = os.path.join(out_dir, name + ".tmp")
        state["shard"] = {"name": name, "tmp": tmp, "f": open(tmp, "wb"), "hash": hashlib.sha256(), "size": 0,
                          "keys": [], "offsets": [], "sizes": [], "crc32": [], "skipped": Counter()}

    def close_shard(record_end: int):
        s = state["shard"]
        s["skipped"].update(tail)
        tail.clear()
        end = b"\0" * (2 * BLOCK)  # end-of-archive; no padding to 10 KiB records, so --max-shard-bytes is exact
        s["f"].write(end)
        s["hash"].update(end)
        s["f"].close()
        os.replace(s["tmp"], os.path.join(out_dir, s["name"]))  # a shard only exists under its name when complete
        entry = {"name": s["name"], "num_samples": len(s["offsets"]), "bytes": s["size"] + len(end),
                 "sha256": s["hash"].hexdigest(), "keys": s["keys"], "offsets": s["offsets"], "sizes": s["sizes"],
                 "crc32": s["crc32"], "record_end": record_end, "skipped": dict(s["skipped"])}
        with open(os.path.join(out_dir, PROGRESS), "a") as f:
            f.write(json.dumps(entry) + "\n")
        done.append(entry)
        state["shard"] = None
        rate = (record_end - start) / max(time.time() - state["t0"], 1e-9)
        skipped = sum(sum(e["skipped"].values()) for e in done)
        log(f"make_shards: {entry['name']}: {entry['num_samples']} samples, {entry['bytes'] / 1e6:.1f} MB; "
            f"{record_end}/{total} records ({100 * record_end / max(total, 1):.0f}%), {rate:.0f} records/s, "
            f"{skipped} skipped")

    import megallava.data.images  # noqa: F401  (imported once here; the forked workers inherit it)
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_encode_chunk, chunks) if pool else map(_encode_chunk, chunks)
        index = start
        for chunk_result in results:
            for r in chunk_result:
                index += 1
                if r[0] == "skip":
                    tail[r[1]] += 1
                    continue
                _, key, body, crc = r
                s = state["shard"]
                if s is not None and max_shard_bytes and s["size"] + len(body) + 2 * BLOCK > max_shard_bytes:
                    close_shard(index - 1)
                    s = None
                if s is None:
                    open_shard()
                    s = state["shard"]
                s["keys"].append(key)
                s["offsets"].append(s["size"])
                s["sizes"].append(len(body))
                s["crc32"].append(crc)
                s["f"].write(body)
                s["hash"].update(body)
                s["size"] += len(body)
                if max_samples_per_shard and len(s["offsets"]) >= max_samples_per_shard:
                    close_shard(index)
        if state["shard"] is not None:
            close_shard(index)
    finally:
        if state["shard"] is not None:  # interrupted: leave no half-written shard under its final name
            state["shard"]["f"].close()
        if pool:
            pool.terminate()

    skipped = Counter(tail)
    for e in done:
        skipped.update(e["skipped"])
    manifest = {"version": FORMAT_VERSION, "source": source, "fingerprint": fingerprint,
                "inputs": [os.path.abspath(p) for p in inputs], "image_root": image_root, "records": total,
                "image_size": image_size, "image_mode": image_mode if image_size else None,
                "num_samples": sum(e["num_samples"] for e in done), "skipped": dict(sorted(skipped.items())),
                "shards": [{k: e[k] for k in ("name", "num_samples", "bytes", "sha256", "keys", "offsets", "sizes",
                                              "crc32")} for e in done]}
    tmp = manifest_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f)
    os.replace(tmp, manifest_path)
    keep = {s["name"] for s in manifest["shards"]}
    for name in os.listdir(out_dir):  # shards of an older, longer run of this source
        if re.fullmatch(re.escape(prefix) + r"-\d{6}\.tar(\.tmp)?", name) and name not in keep:
            os.remove(os.path.join(out_dir, name))
    log(f"make_shards: wrote {manifest['num_samples']} samples in {len(done)} shards to {out_dir}; skipped "
        f"{sum(skipped.values())} of {total} records" + (f" ({dict(skipped)})" if skipped else ""))
    return manifest


# ----------------------------------------------------------------------------------------------------------------
# Reading (used by the loader and the tests).
# ----------------------------------------------------------------------------------------------------------------

def load_manifest(shard_dir: str) -> dict:
    path = os.path.join(shard_dir, MANIFEST)
    if not os.path.isfile(path):
        raise ShardError(f"{path} not found: write the shards with tools/make_shards.py --out {shard_dir}")
    with open(path) as f:
        manifest = json.load(f)
    for s in manifest["shards"]:  # a cut-off copy fails here, naming the shard, not later in a worker
        tar = os.path.join(shard_dir, s["name"])
        size = os.path.getsize(tar) if os.path.isfile(tar) else None
        if size != s["bytes"]:
            state = "missing" if size is None else f"truncated or changed ({size} bytes, manifest says {s['bytes']})"
            raise ShardError(f"shard {tar} is {state}: re-copy it or re-run tools/make_shards.py for {shard_dir}")
    return manifest


def parse_sample(data: bytes) -> Dict[str, bytes]:
    """The members of one sample's tar bytes -> {extension: bytes}, e.g. {"json": ..., "img0.jpg": ...}."""
    out, pos = {}, 0
    while pos + BLOCK <= len(data):
        info = tarfile.TarInfo.frombuf(data[pos:pos + BLOCK], "utf-8", "surrogateescape")  # checks the header sum
        pos += BLOCK
        out[info.name.split(".", 1)[1]] = data[pos:pos + info.size]
        pos += info.size + (-info.size % BLOCK)
    return out


def read_sample(f, offset: int, size: int, crc: Optional[int] = None) -> Optional[Dict[str, bytes]]:
    """Seek to one sample in an open shard; None when its bytes are damaged (CRC or tar header mismatch)."""
    f.seek(offset)
    data = f.read(size)
    if len(data) != size or (crc is not None and zlib.crc32(data) != crc):
        return None
    try:
        return parse_sample(data)
    except (tarfile.HeaderError, IndexError):
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="make_shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="LLaVA-format and/or ShareGPT JSON (a list) or JSONL files")
    parser.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    parser.add_argument("--source", required=True, help="source name recorded in every sample and the manifest")
    parser.add_argument("--image-root", help="directory the records' image paths are relative to")
    parser.add_argument("--max-samples-per-shard", type=int, default=10000)
    parser.add_argument("--max-shard-bytes", type=float, default=None, help="e.g. 1e9 for ~1 GB shards")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    parser.add_argument("--image-size", type=int, help="store images preprocessed for this training resolution "
                        "(lossless PNG, same pixels; much faster to load); default: original bytes")
    parser.add_argument("--image-mode", default="pad", choices=("pad", "resize"), help="with --image-size")
    parser.add_argument("--image-format", default="png", choices=("png", "ppm"),
                        help="with --image-size: png (compact) or ppm (raw pixels, fastest to load)")
    args = parser.parse_args(argv)
    try:
        write_shards(args.inputs, args.out, args.source, args.image_root, args.max_samples_per_shard,
                     int(args.max_shard_bytes) if args.max_shard_bytes else None, args.workers,
                     log=lambda m: print(m, file=sys.stderr, flush=True), image_size=args.image_size,
                     image_mode=args.image_mode, image_format=args.image_format)
    except (ShardError, OSError, json.JSONDecodeError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    return 0
