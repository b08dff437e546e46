"""Shard writer: real webdataset tars, manifest offsets/checksums, skip report, determinism, resume, CLI."""
import hashlib
import io
import json
import os
import re
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
BAD_IDS = {"missing_image": ["missing"], "bad_image": ["truncated", "notimage"], "empty_image": ["zero"],
           "empty": ["empty_conv"], "no_assistant_turn": ["no_answer"], "image_count": ["more_tags", "fewer_tags"],
           "non_utf8": ["bad_utf8"], "unknown_role": ["bad_role"]}


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
    assert m["skipped"] == BAD and m["skipped_ids"] == BAD_IDS  # ids in input order, whatever shard they fell in
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
    assert 'bad_image: 2; ids "truncated", "notimage"\n' in r.stderr and 'unknown_role: 1; ids "bad_role"' in r.stderr
    assert json.load(open(out / "manifest.json"))["num_samples"] == len(GOOD)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_shards.py"), str(tmp_path / "none.json"),
                        "--source", "x", "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "none.json" in r.stderr


# ----------------------------------------------------------------------------------------------------------------
# Inputs that are wrong as a whole, skip ids, roles, image paths outside the root, JSON errors.
# ----------------------------------------------------------------------------------------------------------------

def make_shards(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_shards.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_missing_image_root_fails_at_start(tmp_path):
    path, img_root, _ = build_inputs(tmp_path)
    out = tmp_path / "out"
    for root, what in ((tmp_path / "no_such_dir", "does not exist"), (path, "is not a directory")):
        with pytest.raises(S.ShardError, match=f"image root '{root}' {what}: .*--image-root"):
            S.write_shards([path], str(out), "x", str(root), log=lambda _: None)
    assert not out.exists()  # nothing written, not a run that skips every sample
    r = make_shards(path, "--image-root", tmp_path / "no_such_dir", "--source", "x", "--out", out)
    assert r.returncode == 2 and f"image root '{tmp_path / 'no_such_dir'}' does not exist" in r.stderr
    with pytest.raises(S.ShardError, match="input .*nope.json does not exist"):
        S.write_shards([path, str(tmp_path / "nope.json")], str(out), "x", img_root, log=lambda _: None)


def test_skipped_ids_first_100_per_reason_index_when_no_id(tmp_path):
    a = write_json(tmp_path / "a.json", [{"image": f"{i}.jpg", "conversations": qa()} for i in range(130)])
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps({"conversations": qa("Hi", "Hello")}) + "\n\n"
                 + json.dumps({"id": 7, "conversations": [turn("human", "hi"), turn("robot", "beep")]}) + "\n"
                 + json.dumps({"conversations": [turn("human", "hi"), turn("robot", "beep")]}) + "\n")
    logs = []
    m = S.write_shards([a, str(b)], str(tmp_path / "out"), "x", str(tmp_path), max_samples_per_shard=1,
                       log=logs.append)
    assert m["skipped"] == {"missing_image": 130, "unknown_role": 2} and m["num_samples"] == 1
    # several inputs: "<file>:<index in that file>" (blank lines are not records); an own id is kept as it is
    assert m["skipped_ids"] == {"missing_image": [f"a.json:{i}" for i in range(100)], "unknown_role": [7, "b.jsonl:2"]}
    (key,) = m["shards"][0]["keys"]
    raw = (tmp_path / "out" / m["shards"][0]["name"]).read_bytes()
    assert json.loads(members_of(raw)[f"{key}.json"])["id"] == "b.jsonl:0"  # the stored original id
    assert ('make_shards:   missing_image: 130; ids "a.json:0", "a.json:1", "a.json:2", "a.json:3", "a.json:4", ... '
            "(first 100 in manifest.json 'skipped_ids')") in logs
    assert 'make_shards:   unknown_role: 2; ids 7, "b.jsonl:2"' in logs
    one = S.write_shards([a], str(tmp_path / "one"), "x", str(tmp_path), log=lambda _: None)
    assert one["skipped_ids"]["missing_image"] == list(range(100))  # one input: the index itself


def test_sharegpt_assistant_roles(tmp_path):
    roles = ["gpt", "assistant", "chatgpt", "bard", "bing"]
    records = [{"id": r, "conversations": [turn("human", "Hi"), turn(r, "Hello")]} for r in roles]
    records += [{"id": "sys", "conversations": [turn("system", "Be brief."), turn("user", "Hi"), turn("bing", "Yo")]},
                {"id": "robot", "conversations": [turn("human", "Hi"), turn("robot", "beep")]},
                {"id": "late_system", "conversations": [turn("human", "Hi"), turn("system", "x"), turn("bard", "y")]},
                {"id": "no_answer", "conversations": [turn("human", "Hi"), turn("user", "Hello?")]}]
    m = S.write_shards([write_json(tmp_path / "sg.json", records)], str(tmp_path / "out"), "sg", log=lambda _: None)
    assert m["num_samples"] == 6 and m["skipped"] == {"unknown_role": 2, "no_assistant_turn": 1}
    assert m["skipped_ids"] == {"unknown_role": ["robot", "late_system"], "no_assistant_turn": ["no_answer"]}
    raw = (tmp_path / "out" / m["shards"][0]["name"]).read_bytes()
    metas = [json.loads(v) for k, v in members_of(raw).items() if k.endswith(".json")]
    assert [x["id"] for x in metas] == roles + ["sys"]
    assert metas[2]["conversations"][1] == turn("chatgpt", "Hello")  # stored as written; templates map the role


def outside_inputs(tmp_path):
    """An image root with a good image and a link to another inside it, plus paths that lead outside the root."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "img").mkdir(parents=True)
    outside.mkdir()
    make_image(root / "img" / "a.jpg")
    make_image(outside / "x.jpg")
    secret = outside / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    os.symlink(outside / "x.jpg", root / "img" / "link_out.jpg")
    os.symlink(root / "img" / "a.jpg", root / "img" / "link_in.jpg")
    os.symlink(outside, root / "dir_out")
    up = "../" * (len(str(secret).split(os.sep)) + 3)  # like ../../../../etc/passwd: climbs to / and back down
    records = [{"id": "ok", "image": "img/a.jpg", "conversations": qa()},
               {"id": "link_in", "image": "img/link_in.jpg", "conversations": qa()},
               {"id": "abs_in", "image": str(root / "img" / "a.jpg"), "conversations": qa()},
               {"id": "dotdot_in", "image": "img/../img/a.jpg", "conversations": qa()},
               {"id": "passwd", "image": up + str(secret).lstrip(os.sep), "conversations": qa()},
               {"id": "dotdot", "image": "../outside/x.jpg", "conversations": qa()},
               {"id": "abs", "image": str(outside / "x.jpg"), "conversations": qa()},
               {"id": "link", "image": "img/link_out.jpg", "conversations": qa()},
               {"id": "dir_link", "image": "dir_out/x.jpg", "conversations": qa()},
               {"id": "second", "image": ["img/a.jpg", "../outside/x.jpg"],
                "conversations": qa("<image>\n<image>\nBoth?")}]
    return write_json(tmp_path / "in.json", records), root, secret


def test_image_paths_outside_the_root_are_never_opened(tmp_path, monkeypatch):
    path, root, secret = outside_inputs(tmp_path)
    opened = []

    def spy(file, *a, **k):
        opened.append(os.path.realpath(file))
        return open(file, *a, **k)
    monkeypatch.setattr(S, "open", spy, raising=False)  # module global shadows the builtin (workers=1: same process)
    outside = ["passwd", "dotdot", "abs", "second"]
    logs = []
    m = S.write_shards([path], str(tmp_path / "out"), "x", str(root), log=logs.append)
    assert m["skipped"] == {"outside_image_root": 4} and m["skipped_ids"] == {"outside_image_root": outside}
    # paths inside the root as written (absolute, .., links placed in the root, even to elsewhere) are read
    assert m["num_samples"] == 6
    leaked = [p for p in opened if p.startswith(str(tmp_path / "outside"))]
    assert leaked == [str(tmp_path / "outside" / "x.jpg")] * len(leaked) and leaked  # only via the root's links
    assert any("pass --allow-outside-image-root" in line for line in logs)
    os.mkfifo(root / "fifo.jpg")  # opening a FIFO for reading would block the worker forever
    assert S.resolve_image("fifo.jpg", str(root)) == (None, "missing_image")
    assert S.resolve_image("a\0.jpg", str(root)) == (None, "bad_record")  # a NUL byte: open() would raise ValueError

    opened.clear()
    m = S.write_shards([path], str(tmp_path / "allowed"), "x", str(root), allow_outside_image_root=True,
                       log=lambda _: None)
    assert m["num_samples"] == 9 and m["skipped"] == {"bad_image": 1} and m["skipped_ids"] == {"bad_image": ["passwd"]}
    assert str(secret) in opened

    r = make_shards(path, "--image-root", root, "--source", "x", "--out", tmp_path / "cli", "--workers", "2")
    assert r.returncode == 0 and "outside_image_root: 4; ids \"passwd\", \"dotdot\"" in r.stderr
    r = make_shards(path, "--image-root", root, "--source", "x", "--out", tmp_path / "cli", "--workers", "2",
                    "--allow-outside-image-root")  # another option: another fingerprint, so the shards are rewritten
    assert r.returncode == 0 and json.load(open(tmp_path / "cli" / "manifest.json"))["num_samples"] == 9


def test_no_image_root_means_the_current_directory(tmp_path, monkeypatch):
    path, root, _ = outside_inputs(tmp_path)
    monkeypatch.chdir(root)
    m = S.write_shards([path], str(tmp_path / "out"), "x", log=lambda _: None)
    assert m["num_samples"] == 6 and m["skipped"] == {"outside_image_root": 4}


def test_json_errors_name_file_line_and_column(tmp_path):
    records = [{"id": f"r{i}", "conversations": qa("Hi", "Hello")} for i in range(5)]
    lines = "".join(json.dumps(r) + "\n" for r in records)
    as_json = tmp_path / "lines.json"
    as_json.write_text(lines)
    with pytest.raises(S.ShardError, match=r"lines\.json: invalid JSON at line 2 column 1 \(Extra data\): the file "
                       r"looks like JSON lines \(one record per line\): name it \.jsonl$"):
        S.read_records(str(as_json))
    good = tmp_path / "ok.jsonl"
    good.write_text(lines)
    assert S.read_records(str(good)) == records
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines.splitlines()[:2] + ["", '{"id": "x", "conversations": [}'] + lines.splitlines()[2:]))
    with pytest.raises(S.ShardError, match=r"bad\.jsonl: invalid JSON at line 4 column 31 \(Expecting value\)$"):
        S.read_records(str(bad))
    two = tmp_path / "two.jsonl"
    two.write_text(lines.splitlines()[0] + " " + lines.splitlines()[1] + "\n")
    with pytest.raises(S.ShardError, match=r"line 1 column \d+ \(Extra data\): each line must hold exactly one"):
        S.read_records(str(two))
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps(records, indent=1)[:200])
    with pytest.raises(S.ShardError, match=r"cut\.json: invalid JSON at line \d+ column \d+ .*the file looks "
                       r"truncated"):
        S.read_records(str(cut))
    # a record holding U+2028 / U+0085 (str.splitlines() would cut it in two) and a file with a byte-order mark
    odd = [{"id": "sep", "conversations": qa("a\u2028b\x85c", "d")}]
    (tmp_path / "odd.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(odd, ensure_ascii=False).encode()[1:-1])
    assert S.read_records(str(tmp_path / "odd.jsonl")) == odd
    r = make_shards(as_json, "--source", "x", "--out", tmp_path / "out")
    assert r.returncode == 2 and "lines.json: invalid JSON at line 2 column 1" in r.stderr and ".jsonl" in r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------------------------
# load_manifest validates everything the loader relies on.
# ----------------------------------------------------------------------------------------------------------------

def _shift(d, key, by):
    d[key] += by


def _set(key, value, shard=1):
    def f(m):
        m["shards"][shard][key] = value
    return f


BROKEN = {  # mutation of a good 3-shard manifest (2, 2, 1 samples) -> what the error must say
    "num_samples+2": (lambda m: _shift(m["shards"][1], "num_samples", 2), r"shard 1 \(x-000001\.tar\): 'keys' has 2 "
                      r"entries but num_samples is 4"),
    "num_samples-2": (lambda m: _shift(m["shards"][1], "num_samples", -2), r"shard 1 \(x-000001\.tar\): 'keys' has 2 "
                      r"entries but num_samples is 0"),
    "short_crc": (lambda m: m["shards"][0]["crc32"].__delitem__(-1),
                  r"shard 0 \(x-000000\.tar\): 'crc32' has 1 entries"),
    "offsets_not_list": (_set("offsets", 3), r"'offsets' has int but num_samples is 2"),
    "decreasing": (lambda m: m["shards"][0]["offsets"].reverse(), r"shard 0 .*sample 1 has offset 0 .*increasing"),
    "overlap": (lambda m: m["shards"][0]["sizes"].__setitem__(0, m["shards"][0]["sizes"][0] + 512),
                r"sample 1 has offset \d+ .*the previous one ends at byte"),
    "past_end": (lambda m: m["shards"][2]["offsets"].__setitem__(0, m["shards"][2]["bytes"]),
                 r"shard 2 .*samples end at byte \d+, past the shard's recorded size"),
    "unaligned": (lambda m: m["shards"][1]["offsets"].__setitem__(1, m["shards"][1]["offsets"][1] + 1), "aligned"),
    "bad_crc": (lambda m: m["shards"][1]["crc32"].__setitem__(0, -1), "crc32 is not a 32-bit"),
    "no_keys": (lambda m: m["shards"][1].__delitem__("keys"), r"shard 1 \(x-000001\.tar\) has no 'keys'"),
    "no_shards": (lambda m: m.__delitem__("shards"), "missing 'shards'"),
    "escaping_name": (_set("name", "../x-000001.tar"), "distinct file name inside the shard directory"),
    "duplicate_key": (lambda m: m["shards"][1]["keys"].__setitem__(0, m["shards"][0]["keys"][0]),
                      "1 sample key"),
    "total": (lambda m: _shift(m, "num_samples", 1), "the shards hold 5 samples but 'num_samples' is 6"),
    "records": (lambda m: _shift(m, "records", -1), r"5 samples \+ 10 skipped != 14 records"),
    "newer": (lambda m: m.__setitem__("version", 99), "format version 99 was written by a newer megallava"),
    "not_object": (lambda m: [m], "expected a JSON object, got list"),
}


@pytest.fixture(scope="module")
def good_shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("manifest")
    path, img_root, _ = build_inputs(tmp)
    S.write_shards([path], str(tmp / "good"), "x", img_root, max_samples_per_shard=2, log=lambda _: None)
    return tmp / "good"


def damaged_copy(good, dst, edit=None, text=None):
    import shutil
    shutil.copytree(good, dst)
    if text is None:
        m = json.load(open(good / "manifest.json"))
        text = json.dumps(edit(m) or m)  # edits change m in place or return a replacement
    (dst / "manifest.json").write_text(text)
    return str(dst)


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_load_manifest_rejects_inconsistent_manifests(good_shards, tmp_path, case):
    edit, words = BROKEN[case]
    d = damaged_copy(good_shards, tmp_path / "d", edit)
    with pytest.raises(S.ShardError) as e:
        S.load_manifest(d)
    msg = str(e.value)
    assert msg.startswith(os.path.join(d, "manifest.json") + ": ")  # names the manifest
    assert re.search(words, msg), msg
    assert "re-run tools/make_shards.py" in msg and d in msg  # and the fix


def test_load_manifest_accepts_good_and_version_1(good_shards, tmp_path):
    m = S.load_manifest(str(good_shards))
    assert m["version"] == S.FORMAT_VERSION == 2 and m["num_samples"] == len(GOOD)

    def v1(m):  # what make_shards wrote before skipped_ids
        m["version"] = 1
        del m["skipped_ids"]
    old = S.load_manifest(damaged_copy(good_shards, tmp_path / "v1", v1))
    assert old["version"] == 1 and [s["keys"] for s in old["shards"]] == [s["keys"] for s in m["shards"]]


def test_truncated_or_garbled_manifest_is_a_plain_error(good_shards, tmp_path):
    text = (good_shards / "manifest.json").read_text()
    for i, cut in enumerate((0, 1, len(text) // 3, len(text) - 1)):
        d = damaged_copy(good_shards, tmp_path / f"cut{i}", text=text[:cut])
        with pytest.raises(S.ShardError, match=r"manifest\.json: invalid JSON at line 1 column \d+ .*truncated or "
                           r"corrupt: re-copy it or re-run tools/make_shards.py .*--out " + re.escape(d)) as e:
            S.load_manifest(d)
        assert e.value.__cause__ is None and e.value.__suppress_context__  # a plain message, no chained traceback
    d = damaged_copy(good_shards, tmp_path / "bin", text="")
    (tmp_path / "bin" / "manifest.json").write_bytes(b"\xff\xfe" + text.encode()[2:])
    with pytest.raises(S.ShardError, match=r"manifest\.json is corrupt \(not UTF-8 at byte 0\)"):
        S.load_manifest(d)


def test_the_loader_refuses_an_inconsistent_manifest(good_shards, tmp_path):
    from megallava.data import loader as L
    for i, delta in enumerate((2, -2)):  # before: +2 dropped good samples as corrupt, -2 crashed a worker
        d = damaged_copy(good_shards, tmp_path / f"d{i}", lambda m: _shift(m["shards"][0], "num_samples", delta))
        with pytest.raises(S.ShardError, match=r"shard 0 \(x-000000\.tar\): 'keys' has 2 entries but num_samples"):
            L.Source(d)


def test_damaged_manifest_is_rewritten_by_make_shards(tmp_path):
    path, img_root, _ = build_inputs(tmp_path)  # same content as good_shards' inputs
    ref = S.write_shards([path], str(tmp_path / "out"), "x", img_root, max_samples_per_shard=2, log=lambda _: None)
    text = (tmp_path / "out" / "manifest.json").read_text()
    (tmp_path / "out" / "manifest.json").write_text(text[:len(text) // 2])
    logs = []
    assert S.write_shards([path], str(tmp_path / "out"), "x", img_root, max_samples_per_shard=2,
                          log=logs.append) == ref
    assert not any("up to date" in line for line in logs) and S.load_manifest(str(tmp_path / "out")) == ref
