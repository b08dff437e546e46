"""megallava.data.demo_data: the embedded real dataset builds deterministically and every sample is usable."""
import json
import os
import subprocess
import sys

import pytest

from megallava.data.demo_data import IMAGES, build_demo_dataset
from megallava.data.images import load_image
from megallava.data.templates import IMAGE_PLACEHOLDER, encode_conversation
from megallava.data.tokenizer import load_tokenizer

TEMPLATES_FOR = {"llava_stage1": ("plain", "vicuna_v1", "llama_2"), "llava_instruct": ("vicuna_v1", "llama_2"),
                 "sharegpt": ("vicuna_v1", "llama_2")}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return build_demo_dataset(str(out)), out


def load(paths, name):
    with open(paths[name], encoding="utf-8") as f:
        return json.load(f)


def test_layout_and_sizes(built):
    paths, out = built
    assert set(paths) == {"root", "images", "llava_stage1", "llava_instruct", "sharegpt", "tokenizer"}
    assert sorted(os.listdir(paths["images"])) == sorted(i["name"] + os.path.splitext(i["file"])[1] for i in IMAGES)
    stage1, instruct, sharegpt = (load(paths, n) for n in ("llava_stage1", "llava_instruct", "sharegpt"))
    assert len(IMAGES) >= 15 and len(stage1) >= 2 * len(IMAGES) and len(instruct) >= 2 * len(IMAGES)
    assert len(sharegpt) >= 30 and all("image" not in s for s in sharegpt)
    for samples in (stage1, instruct, sharegpt):
        assert len({s["id"] for s in samples}) == len(samples)
    for s in stage1:
        assert s["conversations"][0] == {"from": "human", "value": IMAGE_PLACEHOLDER} and len(s["conversations"]) == 2
    # some conversations bring the image in a later turn
    assert any(IMAGE_PLACEHOLDER not in s["conversations"][0]["value"] for s in instruct)
    assert 1000 <= load_tokenizer(paths["tokenizer"]).vocab_size <= 2000


def test_images_are_the_original_bytes_and_decode(built):
    paths, _ = built
    from megallava.data.demo_data import skimage_data_dir
    for item in IMAGES:
        path = os.path.join(paths["images"], item["name"] + os.path.splitext(item["file"])[1])
        data = open(path, "rb").read()
        assert data == open(os.path.join(skimage_data_dir(), item["file"]), "rb").read()
        x = load_image(data, 336)
        assert x.shape == (3, 336, 336) and x.isfinite().all()


def test_every_sample_encodes_with_every_template(built):
    paths, out = built
    tok = load_tokenizer(paths["tokenizer"])
    image_id = tok.vocab_size  # the placeholder lies outside the text vocabulary
    for name, templates in TEMPLATES_FOR.items():
        for s in load(paths, name):
            tags = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in s["conversations"])
            n = 1 if "image" in s else 0
            assert tags == n, s["id"]
            if n:
                assert os.path.isfile(os.path.join(str(out), s["image"]))
            answers = [t["value"] for t in s["conversations"] if t["from"] in ("gpt", "assistant")]
            for template in templates:
                enc = encode_conversation(s["conversations"], template, tok, image_id, 576, n)
                assert enc.tokens.count(image_id) == 576 * n and any(enc.trained)
                if template == "vicuna_v1":  # the trained runs are exactly the answers, each + EOS
                    runs, cur = [], []
                    for t, m in zip(enc.tokens + [None], enc.trained + [False]):
                        if m:
                            cur.append(t)
                        elif cur:
                            runs.append(cur)
                            cur = []
                    assert [tok.decode(r[:-1]) for r in runs] == answers, s["id"]
                    assert all(r[-1] == tok.eos_id for r in runs)


def test_deterministic_and_cli(built, tmp_path):
    paths, out = built
    again = tmp_path / "again"
    res = subprocess.run([sys.executable, "-m", "megallava.data.demo_data", str(again)], capture_output=True,
                         text=True, check=True)
    assert json.loads(res.stdout)["tokenizer"] == str(again / "tokenizer.model")
    for root, _, files in os.walk(out):
        for f in files:
            a = os.path.join(root, f)
            b = os.path.join(again, os.path.relpath(a, out))
            assert open(a, "rb").read() == open(b, "rb").read(), f
