"""LLaVA / ShareGPT JSON -> webdataset ``.tar`` shards plus ``manifest.json`` (the writer behind tools/make_shards.py).

One sample = tar members ``<key>.json`` (``id``, ``source``, ``conversations``, ``num_images``) followed by
``<key>.img0.jpg``, ``<key>.img1.png``, ... (the original image bytes). ``id`` is the record's own ``id`` field, or,
when it has none, its index in its input file (``"<file name>:<index>"`` when there are several input files); the
key (``<source>_<global index>``) only names the sample inside the shards. The manifest records, per shard, the byte
offset and size of every sample inside the tar plus a CRC32 of those bytes, so a reader seeks straight to its own
samples (as megatron-energon does) and detects corrupted bytes without decoding anything.

Bad records are skipped and counted by reason (``manifest["skipped"]``, with the ids of the first
``SKIPPED_IDS_KEPT`` skipped records of each reason in ``manifest["skipped_ids"]``), never a crash halfway through.
Image paths must stay inside the image root as written (no ``..`` or absolute path leading out: skipped as
``outside_image_root`` unless ``allow_outside_image_root``, and such a file is never opened); symlinks inside the
root are followed. Output is deterministic: tar headers carry no time or owner, records are processed in fixed-size
chunks and written in input order, so the shards (and their sha256) do not depend on ``workers``. A run is
resumable: every finished shard is renamed into place and appended to ``progress.jsonl``; a re-run with the same
inputs keeps the shards whose checksum still matches and continues after the last of them. ``load_manifest`` checks a manifest in full before any reader relies on it.
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
FORMAT_VERSION = 2              # 2: manifest["skipped_ids"]; load_manifest reads 1 and 2
CHUNK = 32                      # records per pool task: fixed, so output never depends on the worker count
BLOCK = tarfile.BLOCKSIZE       # 512
# Conversation roles -> user / assistant (templates.py normalises with this same table). ShareGPT raw dumps name the
# assistant chatgpt, bard or bing besides gpt. "system" is accepted only as the first turn.
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "bard": "assistant", "bing": "assistant"}
USER_ROLES = {r for r, v in ROLES.items() if v == "user"}
ASSISTANT_ROLES = {r for r, v in ROLES.items() if v == "assistant"}
SYSTEM_ROLES = {"system"}
IMAGE_TAG = "<image>"
SKIP_REASONS = ("bad_record", "empty", "no_assistant_turn", "unknown_role", "non_utf8", "image_count",
                "outside_image_root", "missing_image", "empty_image", "bad_image")
SKIPPED_IDS_KEPT = 100          # ids of the first N skipped records per reason, in manifest["skipped_ids"]


class ShardError(Exception):
    """A shard directory or file that cannot be used; the message names the file and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Reading the inputs and checking one record (runs in pool workers).
# ----------------------------------------------------------------------------------------------------------------

def json_error(path: str, err: json.JSONDecodeError, line: Optional[int] = None) -> str:
    """"FILE: invalid JSON at line L column C (reason)" for a JSONDecodeError; ``line`` overrides the error's own
    line (a JSON-lines file parses one line at a time). Says when the error is at the very end (a cut-off file)."""
    at_end = not err.doc[err.pos:].strip() or err.msg.startswith("Unterminated string")  # (only raised at the end)
    return (f"{path}: invalid JSON at line {err.lineno if line is None else line} column {err.colno} ({err.msg})"
            + ("; the text ends before the JSON does: the file looks truncated" if at_end else ""))


def read_records(path: str) -> List[dict]:
    """A JSON list (LLaVA, ShareGPT) or, for a ``.jsonl`` file, one JSON record per line. Invalid UTF-8 bytes survive
    as lone surrogates so that only the records containing them are skipped (reason ``non_utf8``), not the whole file.
    Invalid JSON raises ShardError naming the file, line and column."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="surrogateescape")
    text = text[1:] if text.startswith("\ufeff") else text  # a UTF-8 byte-order mark
    if path.endswith(".jsonl"):
        records = []
        # split on "\n" only: str.splitlines() also splits on U+2028, U+0085, ... which JSON strings may contain
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    hint = ": each line must hold exactly one JSON record" if e.msg == "Extra data" else ""
                    raise ShardError(json_error(path, e, line=n) + hint) from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = (": the file looks like JSON lines (one record per line): name it .jsonl"
                if e.msg == "Extra data" else "")
        raise ShardError(json_error(path, e) + hint) from None
    if not isinstance(data, list):
        raise ShardError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def record_id(record, index: int, label: Optional[str] = None):
    """The id a record is reported and stored under: its ``id`` field (str or int), else its index in its input file
    (``"<label>:<index>"`` when ``label`` names the file among several inputs)."""
    rid = record.get("id") if isinstance(record, dict) else None
    if rid is None or isinstance(rid, bool):
        return f"{label}:{index}" if label else index
    if isinstance(rid, str):  # lone surrogates (invalid UTF-8 in the input) cannot be printed or written as UTF-8
        return rid.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return rid if isinstance(rid, int) else json.dumps(rid, ensure_ascii=False)


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
    if any(t["from"] not in ROLES and not (i == 0 and t["from"] in SYSTEM_ROLES)
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


def resolve_image(path: str, root: str, allow_outside: bool = False) -> Tuple[Optional[str], Optional[str]]:
    """(real path, None) or (None, skip reason) for a record's image path, relative to ``root`` (absolute paths are
    taken as they are). The path as written must stay inside ``root`` (no ``..`` or absolute path leading out)
    unless ``allow_outside``; symlinks *inside* the root are followed: whoever put them there chose the target (the
    usual ``coco -> /mnt/coco`` layout). Nothing is opened here."""
    lexical = os.path.normpath(os.path.join(root, path))
    if not allow_outside and os.path.commonpath([root, lexical]) != root:
        return None, "outside_image_root"
    try:
        real = os.path.realpath(lexical)
        ok = os.path.isfile(real)  # also keeps directories and FIFOs / devices (a read would block) out
    except ValueError:  # an embedded NUL byte
        return None, "bad_record"
    return (real, None) if ok else (None, "missing_image")


def _sample_meta(rid, source: str, conv: list, num_images: int) -> dict:
    return {"id": rid, "source": source, "conversations": conv, "num_images": num_images}


def _encode_sample(job) -> tuple:
    """One record -> ("ok", key, tar bytes, crc32) or ("skip", reason, record id)."""
    from megallava.data.images import ImageError, validate_image
    index, record, rid, source, key_prefix, image_root, allow_outside, prep = job
    reason, conv, paths = check_record(record)
    if reason:
        return ("skip", reason, rid)
    blobs = []
    for path in paths:
        real, reason = resolve_image(path, image_root, allow_outside)
        if reason:
            return ("skip", reason, rid)
        try:
            with open(real, "rb") as f:
                data = f.read()
        except OSError:
            return ("skip", "missing_image", rid)
        if not data:
            return ("skip", "empty_image", rid)
        try:
            validate_image(data)
            blobs.append((prep[2], preprocess_image(data, *prep)) if prep else (_image_ext(path), data))
        except ImageError:
            return ("skip", "bad_image", rid)
    key = f"{key_prefix}{index:09d}"
    meta = _sample_meta(rid, source, conv, len(blobs))
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


PROGRESS_KEYS = ("name", "num_samples", "bytes", "sha256", "keys", "offsets", "sizes", "crc32", "record_end",
                 "skipped")


def _shard_ok(out_dir: str, entry: dict) -> bool:
    path = os.path.join(out_dir, entry["name"])
    return os.path.isfile(path) and os.path.getsize(path) == entry["bytes"] and _sha256(path) == entry["sha256"]


def _load_progress(out_dir: str, fingerprint: str) -> List[dict]:
    path = os.path.join(out_dir, PROGRESS)
    if not os.path.isfile(path):
        return []
    entries = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        if json.loads(lines[0]).get("fingerprint") != fingerprint:
            return []
        for line in lines[1:]:
            entry = json.loads(line)
            if not (isinstance(entry, dict) and all(k in entry for k in PROGRESS_KEYS)):
                break
            entries.append(entry)
    except (ValueError, AttributeError):  # a line cut by a crash (or a damaged file): keep what parsed
        pass
    return entries


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "data"


def write_shards(inputs: Sequence[str], out_dir: str, source: str, image_root: Optional[str] = None,
                 max_samples_per_shard: int = 10000, max_shard_bytes: Optional[int] = None, workers: int = 1,
                 log=print, image_size: Optional[int] = None, image_mode: str = "pad",
                 image_format: str = "png", allow_outside_image_root: bool = False) -> dict:
    """Write the shards of one source; returns the manifest (also written to ``out_dir/manifest.json``).
    ``image_root``: the directory the records' image paths are relative to (default: the current directory); an
    image path that leads outside it is skipped as ``outside_image_root`` unless ``allow_outside_image_root``.
    ``image_size``: store images preprocessed for that training resolution and ``image_mode`` (see
    preprocess_image) instead of the original bytes; the loader then requires the same model.vision.image_size."""
    if max_samples_per_shard is not None and max_samples_per_shard < 1:
        raise ShardError(f"max_samples_per_shard={max_samples_per_shard} must be >= 1")
    if image_mode not in ("pad", "resize") or image_format not in ("png", "ppm"):
        raise ShardError(f"image_mode={image_mode!r}, image_format={image_format!r}: use pad or resize, png or ppm")
    for path in inputs:  # checked before anything is written: a typo must not cost a run that skips every record
        if not os.path.isfile(path):
            raise ShardError(f"input {path} {'is not a file' if os.path.exists(path) else 'does not exist'}")
    if image_root is not None and not os.path.isdir(image_root):
        what = "is not a directory" if os.path.exists(image_root) else "does not exist"
        raise ShardError(f"image root {image_root!r} {what}: pass the directory the records' image paths are "
                         f"relative to (--image-root)")
    os.makedirs(out_dir, exist_ok=True)
    image_root = os.path.abspath(image_root) if image_root else None
    real_root = os.path.abspath(image_root or os.getcwd())  # containment is checked on the paths as written
    prep = (image_size, image_mode, image_format) if image_size else None
    fingerprint = _fingerprint(inputs, source=source, image_root=image_root, max_samples=max_samples_per_shard,
                               max_bytes=max_shard_bytes, preprocess=prep, allow_outside=allow_outside_image_root)
    prefix = _safe(source)

    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.isfile(manifest_path):  # idempotent: same inputs and every shard intact -> nothing to do
        try:
            old = load_manifest(out_dir)
            fresh = old.get("fingerprint") == fingerprint and all(_shard_ok(out_dir, s) for s in old["shards"])
        except ShardError:  # damaged, cut off or from an older run: rewritten below
            fresh = False
        if fresh:
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
    ids: list = []
    for path in inputs:
        recs = read_records(path)
        label = os.path.basename(path) if len(inputs) > 1 else None
        ids.extend(record_id(r, i, label) for i, r in enumerate(recs))
        records.extend(recs)
    total = len(records)
    if done:
        log(f"make_shards: resuming after {len(done)} intact shard(s) at record {start}/{total}")
    jobs = [(i, records[i], ids[i], source, prefix + "_", real_root, allow_outside_image_root, prep)
            for i in range(start, total)]
    chunks = [jobs[i:i + CHUNK] for i in range(0, len(jobs), CHUNK)]

    state = {"shard": None, "t0": time.time()}
    # skips since the last sample: they go to the shard that closes next (resume restarts after it)
    tail, tail_ids = Counter(), {}

    def open_shard():
        name = f"{prefix}-{len(done):06d}.tar"
        tmp = os.path.join(out_dir, name + ".tmp")
        state["shard"] = {"name": name, "tmp": tmp, "f": open(tmp, "wb"), "hash": hashlib.sha256(), "size": 0,
                          "keys": [], "offsets": [], "sizes": [], "crc32": []}

    def close_shard(record_end: int):
        s = state["shard"]
        end = b"\0" * (2 * BLOCK)  # end-of-archive; no padding to 10 KiB records, so --max-shard-bytes is exact
        s["f"].write(end)
        s["hash"].update(end)
        s["f"].close()
        os.replace(s["tmp"], os.path.join(out_dir, s["name"]))  # a shard only exists under its name when complete
        entry = {"name": s["name"], "num_samples": len(s["offsets"]), "bytes": s["size"] + len(end),
                 "sha256": s["hash"].hexdigest(), "keys": s["keys"], "offsets": s["offsets"], "sizes": s["sizes"],
                 "crc32": s["crc32"], "record_end": record_end, "skipped": dict(tail),
                 "skipped_ids": dict(tail_ids)}
        tail.clear()
        tail_ids.clear()
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
                    kept = tail_ids.setdefault(r[1], [])
                    if len(kept) < SKIPPED_IDS_KEPT:
                        kept.append(r[2])
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

    skipped, skipped_ids = Counter(), {}
    for part, part_ids in [(e["skipped"], e.get("skipped_ids", {})) for e in done] + [(tail, tail_ids)]:
        skipped.update(part)
        for reason, rids in part_ids.items():  # input order: the first SKIPPED_IDS_KEPT of each reason
            kept = skipped_ids.setdefault(reason, [])
            kept.extend(rids[:SKIPPED_IDS_KEPT - len(kept)])
    manifest = {"version": FORMAT_VERSION, "source": source, "fingerprint": fingerprint,
                "inputs": [os.path.abspath(p) for p in inputs], "image_root": image_root, "records": total,
                "image_size": image_size, "image_mode": image_mode if image_size else None,
                "num_samples": sum(e["num_samples"] for e in done), "skipped": dict(sorted(skipped.items())),
                "skipped_ids": dict(sorted(skipped_ids.items())),
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
    for line in skip_report(manifest, image_root=real_root):
        log(line)
    return manifest


def skip_report(manifest: dict, shown: int = 5, image_root: Optional[str] = None) -> List[str]:
    """Console lines: per skip reason, its count and the ids of its first ``shown`` records."""
    lines = []
    for reason, count in manifest.get("skipped", {}).items():
        rids = manifest.get("skipped_ids", {}).get(reason, [])[:shown]
        more = f", ... (first {SKIPPED_IDS_KEPT} in manifest.json 'skipped_ids')" if count > len(rids) else ""
        lines.append(f"make_shards:   {reason}: {count}; ids "
                     + ", ".join(json.dumps(r, ensure_ascii=False) for r in rids) + more)
        if reason == "outside_image_root":
            lines.append(f"make_shards:     (their image paths lead outside the image root {image_root}; "
                         "pass --allow-outside-image-root to read them anyway)")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Reading (used by the loader and the tests).
# ----------------------------------------------------------------------------------------------------------------

SHARD_KEYS = ("name", "num_samples", "bytes", "sha256", "keys", "offsets", "sizes", "crc32")
MANIFEST_KEYS = ("version", "source", "records", "num_samples", "skipped", "shards")


def load_manifest(shard_dir: str) -> dict:
    """The manifest of a shard directory, checked in full (structure, counts, every shard's lists against its
    ``num_samples``, offsets and sizes within the shard, each shard file's size). Every problem raises ShardError
    with a message naming the file and the fix: nothing surfaces later as an IndexError in a loader worker or as
    good samples silently dropped."""
    path = os.path.join(shard_dir, MANIFEST)
    if not os.path.isfile(path):
        raise ShardError(f"{path} not found: write the shards with tools/make_shards.py --out {shard_dir}")
    redo = f"re-run tools/make_shards.py on the source with --out {shard_dir}"
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
        manifest = json.loads(text)
    except OSError as e:
        raise ShardError(f"{path} cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ShardError(f"{path} is corrupt (not UTF-8 at byte {e.start}): re-copy it or {redo}") from None
    except json.JSONDecodeError as e:
        raise ShardError(f"{json_error(path, e)}: the manifest is truncated or corrupt: re-copy it or {redo}") from None
    _check_manifest(manifest, path, redo)
    for s in manifest["shards"]:  # a cut-off copy fails here, naming the shard, not later in a worker
        tar = os.path.join(shard_dir, s["name"])
        try:
            size = os.path.getsize(tar) if os.path.isfile(tar) else None
        except OSError:
            size = None
        if size != s["bytes"]:
            state = "missing" if size is None else f"truncated or changed ({size} bytes, manifest says {s['bytes']})"
            raise ShardError(f"shard {tar} is {state}: re-copy it or re-run tools/make_shards.py for {shard_dir}")
    return manifest


def _is_int(x) -> bool:
    return type(x) is int  # noqa: E721  (JSON ints; bool is not a count)


def _check_manifest(m, path: str, redo: str) -> None:
    """Raise ShardError at the first inconsistency of a parsed manifest."""
    def bad(what: str):
        raise ShardError(f"{path}: {what}: the manifest is inconsistent (damaged or edited); {redo}")

    if not isinstance(m, dict):
        bad(f"expected a JSON object, got {type(m).__name__}")
    missing = [k for k in MANIFEST_KEYS if k not in m]
    if missing:
        bad(f"missing {', '.join(map(repr, missing))}")
    if not _is_int(m["version"]) or m["version"] < 1:
        bad(f"version {m['version']!r} is not a format version")
    if m["version"] > FORMAT_VERSION:
        raise ShardError(f"{path}: format version {m['version']} was written by a newer megallava (this one reads up "
                         f"to {FORMAT_VERSION}): update megallava or {redo}")
    if not isinstance(m["source"], str):
        bad(f"'source' is {m['source']!r}, not a name")
    for k in ("records", "num_samples"):
        if not _is_int(m[k]) or m[k] < 0:
            bad(f"{k!r} is {m[k]!r}, not a count")
    skipped = m["skipped"]
    if not isinstance(skipped, dict) or not all(_is_int(v) and v >= 0 for v in skipped.values()):
        bad("'skipped' is not a {reason: count} object")
    if not isinstance(m.get("skipped_ids", {}), dict):
        bad("'skipped_ids' is not a {reason: [ids]} object")
    if m.get("image_size") is not None and not (_is_int(m["image_size"]) and m["image_size"] > 0):
        bad(f"'image_size' is {m['image_size']!r}")
    if m.get("image_mode") not in (None, "pad", "resize"):
        bad(f"'image_mode' is {m['image_mode']!r}")
    if not isinstance(m["shards"], list):
        bad("'shards' is not a list")
    names, keys = set(), set()
    for i, s in enumerate(m["shards"]):
        if not isinstance(s, dict):
            bad(f"shard {i} is not an object")
        where = f"shard {i} ({s['name']})" if isinstance(s.get("name"), str) else f"shard {i}"
        missing = [k for k in SHARD_KEYS if k not in s]
        if missing:
            bad(f"{where} has no {', '.join(map(repr, missing))}")
        name, n, size = s["name"], s["num_samples"], s["bytes"]
        if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name or name in names:
            bad(f"{where}: 'name' must be a distinct file name inside the shard directory")
        names.add(name)
        if not _is_int(n) or n < 0 or not _is_int(size) or size < 0:
            bad(f"{where}: num_samples {n!r} / bytes {size!r} are not counts")
        for k in ("keys", "offsets", "sizes", "crc32"):
            if not isinstance(s[k], list) or len(s[k]) != n:
                got = f"{len(s[k])} entries" if isinstance(s[k], list) else type(s[k]).__name__
                bad(f"{where}: {k!r} has {got} but num_samples is {n}")
        if not all(isinstance(k, str) for k in s["keys"]):
            bad(f"{where}: a key is not a string")
        keys.update(s["keys"])
        if not all(_is_int(c) and 0 <= c < 1 << 32 for c in s["crc32"]):
            bad(f"{where}: a crc32 is not a 32-bit unsigned integer")
        end = 0
        for j, (off, sz) in enumerate(zip(s["offsets"], s["sizes"])):
            if not (_is_int(off) and _is_int(sz)) or off < end or sz <= 0 or off % BLOCK or sz % BLOCK:
                bad(f"{where}: sample {j} has offset {off!r} and size {sz!r}; the samples must be 512-byte aligned, "
                    f"in increasing order and must not overlap (the previous one ends at byte {end})")
            end = off + sz
        if end > size:
            bad(f"{where}: its samples end at byte {end}, past the shard's recorded size of {size} bytes")
    total = sum(s["num_samples"] for s in m["shards"])
    if total != m["num_samples"]:
        bad(f"the shards hold {total} samples but 'num_samples' is {m['num_samples']}")
    if len(keys) != total:
        bad(f"{total - len(keys)} sample key(s) appear more than once")
    if total + sum(skipped.values()) != m["records"]:
        bad(f"{total} samples + {sum(skipped.values())} skipped != {m['records']} records")


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
    parser.add_argument("--image-root", help="directory the records' image paths are relative to (default: the "
                        "current directory); it must exist")
    parser.add_argument("--allow-outside-image-root", action="store_true",
                        help="read image paths that lead outside --image-root (.., absolute paths; symlinks inside the "
                        "root are always followed); by "
                        "default such records are skipped as outside_image_root and the files are never opened")
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
                     image_mode=args.image_mode, image_format=args.image_format,
                     allow_outside_image_root=args.allow_outside_image_root)
    except (ShardError, OSError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    return 0
