"""The image token against the tokenizer: training's preflight refuses an ``model.image_token_id`` that would turn
a text token into image slots, disagree with the tokenizer's ``<image>``, or fall outside ``model.vocab_size``
(before any model is built, every problem with its fix); -200 (original LLaVA) and the in-vocab id after the
tokenizer's last one pass. The HF export refuses the same mismatches.

The tokenizer is the demo's sentencepiece model: 1536 pieces, no ``<image>``; the demo config uses 1536 / 1537."""
import os

import pytest

from megallava import config as C
from megallava.convert import hf_export
from megallava.convert.errors import ConversionError
from megallava.data.tokenizer import add_image_token, load_tokenizer
from tests.multirank import run_ranks

DEMO = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "demo.yaml")
N = 1536  # pieces of the demo tokenizer


def _overrides(demo_data, tokenizer, run_dir):
    return [f"data.tokenizer={tokenizer}", "data.num_workers=0", f"train.run_dir={run_dir}",
            f"data.sources=[{{path: {demo_data}/shards/instruct, weight: 0.75}}, "
            f"{{path: {demo_data}/shards/sharegpt, weight: 0.25}}]", "parallel.tp=1", "parallel.pp=1"]


def test_preflight_checks_the_image_token_against_the_tokenizer(demo_data, tmp_path):
    plain = str(demo_data / "tokenizer.model")
    with_image = add_image_token(plain, str(tmp_path / "with_image.model"))["path"]  # <image> at 1536
    assert load_tokenizer(plain).id_to_piece(5) == "<0x02>" and load_tokenizer(plain).id_to_piece(1500) != "<image>"
    cases = {  # (tokenizer, vocab_size, image_token_id): the texts the one problem list must hold (None: passes)
        "text piece 5": (plain, 1537, 5, ["model.image_token_id=5 is the text token '<0x02>'",
                                          "use model.image_token_id=1536 and model.vocab_size=1537",
                                          "image-token-settings", "-200"]),
        "text piece 1500": (plain, 1537, 1500, ["model.image_token_id=1500 is the text token",
                                                "use model.image_token_id=1536 and model.vocab_size=1537"]),
        "vocab too small": (plain, 1536, 1536, ["model.image_token_id=1536 is outside the model's vocab "
                                                "(model.vocab_size=1536", "raise model.vocab_size to 1537"]),
        "past the vocab": (plain, 1537, 1537, ["model.image_token_id=1537 is not the id after",
                                               "model.image_token_id=1537 is outside the model's vocab",
                                               "use model.image_token_id=1536 and model.vocab_size=1537"]),
        "gap": (plain, 1600, 1540, ["model.image_token_id=1540 is not the id after data.tokenizer",
                                    "the HF export adds <image> at id 1536",
                                    "use model.image_token_id=1536 and model.vocab_size=1600"]),
        "tokenizer's <image> elsewhere": (with_image, 1538, 1537, [
            "model.image_token_id=1537 but data.tokenizer", "holds <image> at id 1536",
            "use model.image_token_id=1536 and model.vocab_size=1538"]),
        "tokenizer's <image> vs a text id": (with_image, 1537, 7, ["holds <image> at id 1536 (id 7 is the token"]),
        "demo config": (plain, 1537, 1536, None),
        "tokenizer holding <image>": (with_image, 1537, 1536, None),
        "original LLaVA": (plain, 1536, -200, None),
        "original LLaVA, tokenizer with <image>": (with_image, 1537, -200, None),
    }

    def fn(rank, env):
        from megallava.distributed import init_distributed
        from megallava.training import preflight

        init_distributed(1, 1, None, 0, env)
        out = {}
        for name, (tok, vocab, image, _) in cases.items():
            cfg = C.load_config(DEMO, _overrides(demo_data, tok, tmp_path / "run") + [
                f"model.vocab_size={vocab}", f"model.image_token_id={image}"])
            try:
                for lock in preflight.check(cfg, env):
                    lock.release()
                out[name] = None
            except C.ConfigError as err:
                out[name] = err.problems
        return out

    got = run_ranks(1, fn)[0]
    for name, (_, _, image, want) in cases.items():
        if want is None:
            assert got[name] is None, (name, got[name])
            continue
        assert got[name] is not None, f"{name}: image_token_id={image} passed"
        text = "\n".join(got[name])
        for w in want:
            assert w in text, f"{name}: {w!r} not in:\n{text}"
    assert len(got["past the vocab"]) == 2 and len(got["text piece 5"]) == 1  # each problem once


def test_trainer_refuses_before_building_a_model(demo_data, tmp_path):
    """Through the trainer: the run ends at preflight with the problem, and no model is ever built."""
    def fn(rank, env):
        from megallava.model import build
        from megallava.training.train import run

        def refuse(*a, **k):
            raise AssertionError("a model was built")

        build.build_chunks = refuse
        cfg = C.load_config(DEMO, _overrides(demo_data, demo_data / "tokenizer.model", tmp_path / "run") +
                            ["model.image_token_id=5", "train.iters=1"])
        try:
            run(cfg, env)
        except C.ConfigError as err:
            return str(err)
        return "ran"

    err = run_ranks(1, fn)[0]
    assert "model.image_token_id=5 is the text token" in err and "model.image_token_id=1536" in err, err


def test_export_refuses_an_image_token_the_tokenizer_contradicts(demo_data, tmp_path):
    """megatron-to-hf's tokenizer step (hf_export.build_hf_tokenizer) on the same mismatches."""
    plain = str(demo_data / "tokenizer.model")
    with_image = add_image_token(plain, str(tmp_path / "with_image.model"))["path"]

    def model(vocab, image):
        m = C.ModelConfig(vocab_size=vocab, image_token_id=image)
        m.vision.image_size, m.vision.patch_size = 56, 14
        return m

    quiet = lambda *a, **k: None  # noqa: E731
    for tok, m, pattern in (
            (plain, model(1537, 5), r"model.image_token_id=5 but tokenizer .* has no <image> token and id 5 is the "
                                    r"token '<0x02>': an in-vocab image token is the id after the tokenizer's last "
                                    r"one \(1536\)"),
            (plain, model(1600, 1540), r"no <image> token and the tokenizer has only 1536 tokens"),
            (with_image, model(1538, 1537), r"holds <image> at id 1536, but model.image_token_id=1537"),
            (plain, model(1000, -200), r"has 1536 tokens, the model's vocab only 1000")):
        with pytest.raises(ConversionError, match=pattern):
            hf_export.build_hf_tokenizer(tok, m, quiet)
    hf, _ = hf_export.build_hf_tokenizer(plain, model(1537, N), quiet)  # the demo's settings: <image> added at 1536
    assert hf.convert_tokens_to_ids("<image>") == N and len(hf) == N + 1
