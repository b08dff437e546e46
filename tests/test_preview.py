"""megallava.data.preview names samples by their original id (old shards without one: by key), and reports a damaged
manifest as a plain error."""
import json
import os

import pytest
import yaml

from megallava.data import preview, shards as S
from megallava.data.templates import VICUNA_SYSTEM
from megallava.data.tokenizer import train_sentencepiece
from tests.test_shards import make_image, qa, turn, write_json


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shards of 6 records (own ids, no id, a chatgpt answer, an image) written now and as before the id was stored."""
    tmp = tmp_path_factory.mktemp("preview")
    (tmp / "img").mkdir()
    make_image(tmp / "img" / "a.jpg")
    records = [{"id": "cat-1", "image": "a.jpg", "conversations": qa("<image>\nWhat is it?", "A small red square.")},
               {"id": 42, "conversations": qa("Say hello.", "Hello there!")},
               {"conversations": [turn("human", "Who are you?"), turn("chatgpt", "A helpful assistant.")]},
               {"id": "bard-2", "conversations": [turn("human", "Any tips?"), turn("bard", "Sleep well.")]},
               {"conversations": qa("Count to three.", "One two three.")},
               {"id": "dog-3", "conversations": qa("And a dog?", "A brown dog.")}]
    path = write_json(tmp / "in.json", records)
    S.write_shards([path], str(tmp / "new"), "new", str(tmp / "img"), max_samples_per_shard=4, log=lambda _: None)
    meta = S._sample_meta
    try:  # shards as written before: the json member has no "id"
        S._sample_meta = lambda rid, *a: {k: v for k, v in meta(rid, *a).items() if k != "id"}
        S.write_shards([path], str(tmp / "old"), "old", str(tmp / "img"), max_samples_per_shard=4,
                       log=lambda _: None)
    finally:
        S._sample_meta = meta
    corpus = [t["value"] for r in records for t in r["conversations"]] + ["USER: ASSISTANT:", VICUNA_SYSTEM] * 5
    tok = train_sentencepiece(corpus * 4, str(tmp / "tok"), 320)
    return tmp, tok


def config(tmp_path, data, source):
    tmp, tok = data
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"vision": {"image_size": 28}}, "train": {"global_batch_size": 6},
                                    "data": {"source": "shards", "tokenizer": tok, "num_workers": 0, "shuffle": False,
                                             "sources": [{"path": str(tmp / source), "weight": 1.0}]}}))
    return ["--config", str(path), "--n", "6"]


def test_preview_shows_original_ids(data, tmp_path, capsys):
    assert preview.main(config(tmp_path, data, "new") + ["--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    keys = [k for s in S.load_manifest(str(data[0] / "new"))["shards"] for k in s["keys"]]
    assert sorted(r["key"] for r in rows) == keys and len(rows) == 6  # every sample once (one epoch)
    ids = {r["key"]: r["id"] for r in rows}
    assert [ids[k] for k in keys] == ["cat-1", 42, 2, "bard-2", 4, "dog-3"]  # no id: the index in the input file
    assert preview.main(config(tmp_path, data, "new")) == 0
    out = capsys.readouterr().out
    for rid, key in zip(["cat-1", 42, 2, "bard-2"], keys):
        assert f"| source new | id {rid} (key {key}) |" in out
    # the chatgpt and bard answers are trained
    assert "ASSISTANT:[[A helpful assistant.</s>]]" in out and "ASSISTANT:[[Sleep well.</s>]]" in out


def test_preview_of_shards_without_ids_shows_keys(data, tmp_path, capsys):
    assert preview.main(config(tmp_path, data, "old") + ["--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 6 and all(r["id"] == r["key"] and r["key"].startswith("old_") for r in rows)
    assert preview.main(config(tmp_path, data, "old")) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 6 and "| source old | old_000000000 |" in out and "| id " not in out


def test_preview_reports_a_damaged_manifest_plainly(data, tmp_path, capsys):
    import shutil
    shutil.copytree(data[0] / "new", tmp_path / "new")
    m = json.load(open(tmp_path / "new" / "manifest.json"))
    m["shards"][0]["num_samples"] += 2
    (tmp_path / "new" / "manifest.json").write_text(json.dumps(m))
    args = config(tmp_path, (tmp_path, data[1]), "new")
    assert preview.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"megallava.data.preview: {os.path.join(tmp_path, 'new', 'manifest.json')}: shard 0 ")
    assert "re-run tools/make_shards.py" in err and "Traceback" not in err
