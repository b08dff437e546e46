"""Generation (megallava.generate): KV-cache decoding equals full recomputation token for token, and greedy answers
are the same at TP1xPP1 and TP2xPP2; prompts are the training template's; answer files are LLaVA's format."""
import json
import os

import pytest
import torch

from megallava import config as C
from tests.multirank import run_ranks

DEMO = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "demo.yaml")


def _data_overrides(demo_data):
    return [f"data.tokenizer={demo_data}/tokenizer.model",
            f"data.sources=[{{path: {demo_data}/shards/instruct, weight: 0.75}}, "
            f"{{path: {demo_data}/shards/sharegpt, weight: 0.25}}]", "data.num_workers=0"]


@pytest.fixture(scope="module")
def demo_checkpoint(demo_data, tmp_path_factory):
    """The demo model (fp32) saved by the trainer at TP1 after one step that barely moves it: random weights give
    varied, request-dependent tokens, so any difference between decoding paths shows."""
    out = tmp_path_factory.mktemp("gen")

    def fn(rank, env):
        from megallava.training.train import run

        cfg = C.load_config(DEMO, _data_overrides(demo_data) + [
            "parallel.tp=1", "parallel.pp=1", "train.iters=1", "train.lr=1e-30", "train.min_lr=0",
            f"train.run_dir={out}/run",
            f"checkpoint.dir={out}/run/ckpt"])
        run(cfg, env)

    run_ranks(1, fn)
    return out / "run" / "ckpt"


def _requests(demo_data):
    from megallava.generate import Request

    image = str(next(p for p in sorted((demo_data / "images").iterdir()) if p.suffix in (".png", ".jpg")))
    return [Request(text="What is in this picture?", images=[image], question_id=0),
            Request(text="Tell me something about cats.", question_id=1),  # language-only, shorter prompt
            Request(text="Describe the image in detail, please.", images=[image], question_id=2)]


def _generate(world, tp, pp, checkpoint, demo_data, **kwargs):
    def fn(rank, env):
        from megallava.generate import load

        gen = load(str(checkpoint), tp, pp, env=env)
        requests = _requests(demo_data)
        out = {"ids": gen.generate(requests, max_new_tokens=12, **kwargs)}
        out["prompt_ids"] = [gen.encode(r)[0] for r in requests]
        return out

    return run_ranks(world, fn)[0]


def test_kv_cache_equals_recomputation_and_layouts_agree(demo_checkpoint, demo_data):
    cached = _generate(1, 1, 1, demo_checkpoint, demo_data)
    full = _generate(1, 1, 1, demo_checkpoint, demo_data, use_cache=False)
    assert cached["ids"] == full["ids"]
    assert all(len(x) > 0 for x in cached["ids"])
    assert len({tuple(x) for x in cached["ids"]}) > 1  # the answers depend on the request
    tp2pp2 = _generate(4, 2, 2, demo_checkpoint, demo_data)
    assert tp2pp2["ids"] == cached["ids"]
    sampled = _generate(1, 1, 1, demo_checkpoint, demo_data, temperature=1.0, top_p=0.9, seed=3)
    sampled_tp2pp2 = _generate(4, 2, 2, demo_checkpoint, demo_data, temperature=1.0, top_p=0.9, seed=3)
    assert sampled["ids"] == sampled_tp2pp2["ids"]  # seeded sampling: the same draws at any layout


def test_prompt_is_the_training_template(demo_data):
    """The prompt is training's rendering of the conversation cut where the answer starts."""
    from megallava.data.templates import encode_conversation, encode_prompt, render_prompt, prompt_segments
    from megallava.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(demo_data / "tokenizer.model"))
    conv = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]
    trained = encode_conversation(conv, "vicuna_v1", tok, -200, 16, 1)
    prompt = encode_prompt(conv[:1], "vicuna_v1", tok, -200, 16, 1)
    answer_start = trained.trained.index(True)
    assert prompt == trained.tokens[:answer_start]
    text = "".join(t for _, t, _ in prompt_segments(conv[:1], "vicuna_v1")[1:])
    assert render_prompt(conv, "vicuna_v1").startswith(text) and text.endswith("ASSISTANT:")


def test_answer_file_has_llavas_fields(tmp_path):
    from megallava.generate import Request, answer_record, read_questions

    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 7, "image": "a.jpg", "text": "What?", "category": "conv"}) + "\n")
    (request,) = read_questions(str(q), image_folder="/imgs")
    assert request.images == ["/imgs/a.jpg"] and request.question_id == 7
    rec = answer_record(request, "An answer.", "megallava-demo")
    assert list(rec) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
    assert rec["prompt"] == "What?" and rec["text"] == "An answer." and isinstance(rec["answer_id"], str)
    assert Request(text="Hi", images=["x.png"]).turns() == [{"from": "human", "value": "<image>\nHi"}]


QUESTIONS = [
    {"subject": "astronomy", "question": "Which is a planet?", "choices": ["Mars", "Sirius", "Vega", "Rigel"],
     "answer": "A"},
    {"subject": "astronomy", "question": "What orbits the Earth?", "choices": ["The Sun", "The Moon"], "answer": 1},
    {"subject": "cooking", "question": "What do you boil pasta in?", "choices": ["water", "sand", "air"],
     "answer": "A"},
]
DEV = [{"subject": "astronomy", "question": "Is the Sun a star?", "choices": ["yes", "no"], "answer": 0}]


def _mc(world, tp, pp, checkpoint, score):
    def fn(rank, env):
        from megallava.evaluate import continuation_rows, evaluate_multiple_choice, mmlu_prompt
        from megallava.generate import load

        model = load(str(checkpoint), tp, pp, env=env)
        res = evaluate_multiple_choice(model.chunks, model.tokenizer, QUESTIONS, DEV, shots=1, score=score,
                                       micro_batch_size=3)
        if tp == pp == 1:  # an independent computation: the model's logits, log-softmax, summed by hand
            chunk, manual = model.chunk, []
            for q in QUESTIONS:
                conts = [f" {x}" for x in ("ABCD"[:len(q["choices"])] if score == "letter" else q["choices"])]
                s = []
                for ids, n in continuation_rows(model.tokenizer, mmlu_prompt(q, [d for d in DEV if
                                                                                 d["subject"] == q["subject"]]),
                                                conts):
                    with torch.no_grad():
                        logp = torch.log_softmax(chunk(tokens=torch.tensor([ids]))[0].double(), -1)
                    ll = sum(float(logp[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids)))
                    s.append(ll / n if score == "text" else ll)
                manual.append(s)
            res["manual"] = manual
        return res

    return run_ranks(world, fn)[0]


@pytest.mark.parametrize("score", ["letter", "text"])
def test_multiple_choice_likelihoods(demo_checkpoint, score):
    ref = _mc(1, 1, 1, demo_checkpoint, score)
    for got, manual in zip(ref["questions"], ref["manual"]):
        torch.testing.assert_close(torch.tensor(got["scores"], dtype=torch.float64),
                                   torch.tensor(manual, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    # accuracy is exactly the share of questions whose key matches the model's best choice
    preds = [max(range(len(m)), key=m.__getitem__) for m in ref["manual"]]
    keys = [0, 1, 0]
    assert ref["accuracy"] == pytest.approx(sum(p == k for p, k in zip(preds, keys)) / 3)
    assert set(ref["per_subject"]) == {"astronomy", "cooking"}
    tp2pp2 = _mc(4, 2, 2, demo_checkpoint, score)
    for a, b in zip(tp2pp2["questions"], ref["questions"]):
        torch.testing.assert_close(torch.tensor(a["scores"]), torch.tensor(b["scores"]), rtol=1e-5, atol=1e-5)
    assert tp2pp2["accuracy"] == ref["accuracy"]


@pytest.fixture(scope="module")
def exported(demo_checkpoint, tmp_path_factory):
    """The demo checkpoint as an HF directory (megatron-to-hf; model config and tokenizer come from the checkpoint)."""
    from transformers import LlavaForConditionalGeneration
    from megallava.convert.megatron_to_hf import megatron_to_hf

    out = str(tmp_path_factory.mktemp("export") / "hf")
    megatron_to_hf(str(demo_checkpoint), out, log=lambda *a, **k: None)
    return LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()


def test_multiple_choice_equals_hf_loglikelihoods(demo_checkpoint, exported):
    """An independent computation: transformers' forward of the exported model, log-softmax, summed."""
    from megallava.evaluate import continuation_rows, mmlu_prompt

    def fn(rank, env):
        from megallava.evaluate import evaluate_multiple_choice
        from megallava.generate import load

        model = load(str(demo_checkpoint), 1, 1, env=env)
        res = evaluate_multiple_choice(model.chunks, model.tokenizer, QUESTIONS, DEV, shots=1, score="text")
        rows = [continuation_rows(model.tokenizer, mmlu_prompt(q, [d for d in DEV if d["subject"] == q["subject"]]),
                                  [f" {c}" for c in q["choices"]]) for q in QUESTIONS]
        return res, rows

    res, rows = run_ranks(1, fn)[0]
    for got, q_rows in zip(res["questions"], rows):
        want = []
        for ids, n in q_rows:
            with torch.no_grad():
                logp = torch.log_softmax(exported(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            want.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids))) / n)
        torch.testing.assert_close(torch.tensor(got["scores"], dtype=torch.float64),
                                   torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_greedy_tokens_equal_hf_generate_on_the_export(demo_checkpoint, demo_data, exported):
    """The exported model (megatron-to-hf) under transformers' own generate() produces megallava's greedy tokens."""
    model = exported

    def fn(rank, env):
        from megallava.generate import load

        gen = load(str(demo_checkpoint), 1, 1, env=env)
        requests = _requests(demo_data)
        return gen.generate(requests, max_new_tokens=12), [gen.encode(r) for r in requests], gen.tokenizer.eos_id

    ours, encoded, eos = run_ranks(1, fn)[0]
    for want, (ids, images) in zip(ours, encoded):
        with torch.no_grad():
            extra = {"pixel_values": images} if images is not None else {}
            got = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=eos,
                                 pad_token_id=0, **extra)[0, len(ids):].tolist()
        if eos in got:
            got = got[:got.index(eos)]
        assert got == want
