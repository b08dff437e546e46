"""Shard writer: real webdataset tars, manifest offsets/checksums, skip report, determinism, resume, CLI."""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from megallava.data import shards as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_image(path, fmt="JPEG", size=(24, 20), color=(200, 30, 60)):
    img = Image.new("RGB", size, color)
    for x in range(size[0]):  # some structure so JPEG bytes are not trivial
        img.putpixel((x, x % size[1]), (x * 9 % 255, 80, 160))
    img.save(path, fmt)
    with open(path, "rb") as f:
        return f.read()


def turn(role, value):
    return {"from": role, "value": value}


def qa(q="<image>\nWhat is in the picture?", a="A red square with a stripe."):
    return [turn("human", q), turn("gpt", a)]


def write_json(path, records, raw_replace=None):
    text = json.dumps(records, ensure_ascii=False).encode("utf-8")
    for old, new in (raw_replace or {}).items():  # splice raw (non-UTF-8) bytes into the file
        text = text.replace(old.encode(), new)
    with open(path, "wb") as f:
        f.write(text)
    return str(path)


GOOD = ["good_jpg", "good_png", "two_images", "text_only", "multi_round"]
BAD = {"missing_image": 1, "bad_image": 2, "empty_image": 1, "empty": 1, "no_assistant_turn": 1,
       "image_count": 2, "non_utf8": 1, "unknown_role": 1}


def build_inputs(tmp_path):
    """Images (good and broken) plus a LLaVA JSON with one record per good case and per bad input."""
    img = tmp_path / "images"
    img.mkdir()
    jpg = make_image(img / "a.jpg")
    png = make_image(img / "b.png", "PNG", (16, 30), (10, 200, 10))
    (img / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    (img / "zero.jpg").write_bytes(b"")
    (img / "text.jpg").write_bytes(b"this is not an image at all" * 10)
    records = [
        {"id": "good_jpg", "image": "a.jpg", "conversations": qa()},
        {"id": "good_png", "image": "b.png", "conversations": qa(a="A green block.")},
        {"id": "two_images", "image": ["a.jpg", "b.png"], "conversations": qa("<image>\n<image>\nCompare them.")},
        {"id": "text_only", "conversations": qa("Say hello.", "Hello!")},
        {"id": "missing", "image": "nope.jpg", "conversations": qa()},
        {"id": "truncated", "image": "trunc.jpg", "conversations": qa()},
        {"id": "zero", "image": "zero.jpg", "conversations": qa()},
        {"id": "notimage", "image": "text.jpg", "conversations": qa()},
        {"id": "empty_conv", "conversations": []},
        {"id": "no_answer", "conversations": [turn("human", "Anyone there?")]},
        {"id": "more_tags", "image": "a.jpg", "conversations": qa("<image>\n<image>\nTwo?")},
        {"id": "fewer_tags", "image": ["a.jpg", "b.png"], "conversations": qa("<image>\nOne?")},
        {"id": "bad_utf8", "conversations": qa("Q: @@BADBYTES@@", "answer")},
        {"id": "bad_role", "conversations": [turn("human", "hi"), turn("robot", "beep")]},
        {"id": "multi_round", "conversations": qa("Q1", "A1") + qa("Q2", "A2")},
    ]
    path = write_json(tmp_path / "llava.json", records, {"@@BADBYTES@@": b"\xff\xfe\xc3"})
    return path, str(img), {"a.jpg": jpg, "b.png": png}


def members_of(data: bytes):
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_round_trip_and_skip_report(tmp_path):
    path, img_root, originals = build_inputs(tmp_path)
    out = tmp_path / "shards"
    m = S.write_shards([path], str(out), "instruct", img_root, max_samples_per_shard=2, log=lambda _: None)
    assert m["skipped"] == BAD
    assert m["num_samples"] == len(GOOD) and m["records"] == len(GOOD) + sum(BAD.values())
    assert [s["num_samples"] for s in m["shards"]] == [2, 2, 1]
    assert json.load(open(out / "manifest.json")) == m
    ids = []
    for s in m["shards"]:
        tar = out / s["name"]
        assert sha(tar) == s["sha256"] and os.path.getsize(tar) == s["bytes"]
        with tarfile.open(tar) as t:  # the manifest's offsets are where tarfile finds each sample's first header
            starts = [mem.offset for mem in t.getmembers() if mem.name.endswith(".json")]
        assert starts == s["offsets"]
        raw = tar.read_bytes()
        for key, off, size in zip(s["keys"], s["offsets"], s["sizes"]):
            got = members_of(raw[off:off + size])  # exactly this sample's bytes, nothing more
            meta = json.loads(got[f"{key}.json"])
            ids.append(meta["id"])
            assert meta["source"] == "instruct" and meta["num_images"] == len(got) - 1
            if meta["id"] == "two_images":
                assert got[f"{key}.img0.jpg"] == originals["a.jpg"] and got[f"{key}.img1.png"] == originals["b.png"]
            if meta["id"] == "good_png":
                assert got[f"{key}.img0.png"] == originals["b.png"]
    assert ids == GOOD  # input order kept


def test_webdataset_reads_the_shards(tmp_path):
    import webdataset as wds
    path, img_root, originals = build_inputs(tmp_path)
    out = tmp_path / "shards"
    m = S.write_shards([path], str(out), "instruct", img_root, max_samples_per_shard=100, log=lambda _: None)
    samples = list(wds.WebDataset(str(out / m["shards"][0]["name"]), shardshuffle=False))
    assert [s["__key__"] for s in samples] == m["shards"][0]["keys"]
    two = next(s for s in samples if json.loads(s["json"])["id"] == "two_images")
    assert two["img0.jpg"] == originals["a.jpg"] and two["img1.png"] == originals["b.png"]


def test_deterministic_across_workers_and_bounded_by_bytes(tmp_path):
    path, img_root, _ = build_inputs(tmp_path)
    runs = [S.write_shards([path], str(tmp_path / f"w{n}"), "x", img_root, max_samples_per_shard=None,
                           max_shard_bytes=6000, workers=n, log=lambda _: None) for n in (1, 3)]
    assert [s["sha256"] for s in runs[0]["shards"]] == [s["sha256"] for s in runs[1]["shards"]]
    assert len(runs[0]["shards"]) > 1
    for s in runs[0]["shards"]:
        assert s["bytes"] <= 6000 or s["num_samples"] == 1


def test_resume_and_idempotence(tmp_path):
    path, img_root, _ = build_inputs(tmp_path)
    out = tmp_path / "shards"
    full = S.write_shards([path], str(tmp_path / "ref"), "x", img_root, max_samples_per_shard=2, log=lambda _: None)

    class Crash(Exception):
        pass

    def crash_after_first_shard(msg):
        if msg.startswith("make_shards: x-000000.tar"):
            raise Crash
    with pytest.raises(Crash):  # interrupted after one shard: no manifest yet
        S.write_shards([path], str(out), "x", img_root, max_samples_per_shard=2, log=crash_after_first_shard)
    assert not (out / "manifest.json").exists()
    first = os.stat(out / "x-000000.tar").st_mtime_ns
    logs = []
    m = S.write_shards([path], str(out), "x", img_root, max_samples_per_shard=2, log=logs.append)
    assert any("resuming after 1 intact shard" in line for line in logs)
    assert os.stat(out / "x-000000.tar").st_mtime_ns == first  # kept, not rewritten
    assert m == full

    logs.clear()  # same inputs again: nothing to do
    assert S.write_shards([path], str(out), "x", img_root, max_samples_per_shard=2, log=logs.append) == m
    assert "up to date" in logs[0]

    with open(out / "x-000001.tar", "r+b") as f:  # a partial shard is detected by its checksum and rewritten
        f.truncate(700)
    m2 = S.write_shards([path], str(out), "x", img_root, max_samples_per_shard=2, log=lambda _: None)
    assert m2 == m and sha(out / "x-000001.tar") == m["shards"][1]["sha256"]
    assert os.stat(out / "x-000000.tar").st_mtime_ns == first
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_truncated_tar_is_reported_with_its_name(tmp_path):
    path, img_root, _ = build_inputs(tmp_path)
    out = tmp_path / "shards"
    S.write_shards([path], str(out), "x", img_root, max_samples_per_shard=2, log=lambda _: None)
    with open(out / "x-000002.tar", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(S.ShardError, match=r"x-000002\.tar is truncated or changed \(1000 bytes"):
        S.load_manifest(str(out))


def test_cli(tmp_path):
    path, img_root, _ = build_inputs(tmp_path)
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_shards.py"), path, "--image-root", img_root,
                        "--source", "instruct", "--out", str(out), "--workers", "2", "--max-samples-per-shard", "3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "instruct-000000.tar: 3 samples" in r.stderr and "skipped 10 of 15 records" in r.stderr
    assert json.load(open(out / "manifest.json"))["num_samples"] == len(GOOD)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_shards.py"), str(tmp_path / "none.json"),
                        "--source", "x", "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "none.json" in r.stderr
