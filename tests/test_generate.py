"""Generation (megallava.generate): KV-cache decoding equals full recomputation token for token, and greedy answers
are the same at TP1xPP1 and TP2xPP2; prompts are the training template's; answer files are LLaVA's format; decoding
stops at EOS; the generate / evaluate command lines write what they promise (evaluate on a model built so that its
answers are known)."""
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


# ------------------------------------------------------------------------------------- the command lines
ROOT = os.path.join(os.path.dirname(__file__), "..")


def _cli(module, *args):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_generate_cli_writes_llavas_answer_file(demo_checkpoint, demo_data, tmp_path):
    """python -m megallava.generate on a LLaVA question file (one question, with an image relative to
    --image-folder): the answer file holds LLaVA's fields with LLaVA's types, and the answer is the last line of
    stdout; it is the greedy answer the library computes for the same request."""
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question_id": 17, "image": "astronaut.png", "text": "What is in this picture?",
                                     "category": "detail"}) + "\n")
    answers = tmp_path / "out" / "answers.jsonl"
    proc = _cli("megallava.generate", "--checkpoint", str(demo_checkpoint), "--requests", str(questions),
                "--image-folder", str(demo_data / "images"), "--answers", str(answers), "--max-new-tokens", "8",
                "--model-id", "llava-demo")
    (record,) = [json.loads(line) for line in answers.read_text().splitlines()]
    assert list(record) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
    assert record["question_id"] == 17 and isinstance(record["question_id"], int)
    assert record["prompt"] == "What is in this picture?" and record["model_id"] == "llava-demo"
    assert isinstance(record["text"], str) and record["text"]
    assert isinstance(record["answer_id"], str) and len(record["answer_id"]) == 22 and record["metadata"] == {}
    assert proc.stdout.splitlines()[-1] == record["text"]

    def fn(rank, env):
        from megallava.generate import Request, load

        gen = load(str(demo_checkpoint), 1, 1, env=env)
        request = Request(text="What is in this picture?", images=[str(demo_data / "images" / "astronaut.png")])
        return gen.decode(gen.generate([request], max_new_tokens=8)[0])

    assert run_ranks(1, fn)[0] == record["text"]


def test_generation_stops_at_eos(demo_checkpoint, demo_data):
    """With the tokenizer's EOS set to a token the model generates at step k, each request's answer is its greedy
    answer cut before that token's first occurrence, and decoding stops once every request has ended (fewer
    forward steps than max_new_tokens); without EOS in sight every answer has max_new_tokens tokens."""
    def fn(rank, env):
        from megallava.generate import load

        gen = load(str(demo_checkpoint), 1, 1, env=env)
        requests = _requests(demo_data)
        steps = []
        forward = gen._forward
        gen._forward = lambda *a, **k: steps.append(1) or forward(*a, **k)
        free = gen.generate(requests, max_new_tokens=12)
        free_steps = len(steps)
        first = free[0]
        k = next(i for i in range(2, len(first)) if first[i] not in first[:i])  # a token first generated at step k
        real = type(gen.tokenizer)

        class Eos(real):  # the same tokenizer, with that token as its EOS
            eos_id = first[k]

        gen.tokenizer.__class__ = Eos
        cut = gen.generate(requests, max_new_tokens=12)
        steps.clear()
        alone = gen.generate(requests[:1], max_new_tokens=12)
        return free, free_steps, first[k], k, cut, alone, len(steps)

    free, free_steps, eos, k, cut, alone, alone_steps = run_ranks(1, fn)[0]
    assert free_steps == 12 and all(len(x) == 12 for x in free)  # the demo model never says EOS in 12 tokens
    for full, got in zip(free, cut):
        assert got == (full[:full.index(eos)] if eos in full else full)
    assert alone == [free[0][:k]] and alone_steps == k + 1 < 12  # EOS at step k + 1 ends the decoding loop


def _known_answers_model(path, demo_data, favoured: int):
    """A llava-hf model of the demo tokenizer's vocab whose every position predicts ``favoured``: all embedding rows
    are one vector e and every layer's output projections are zero, so the final hidden state is RMSNorm(e) = h at
    every position; the output layer is zero except row ``favoured`` = 10 h / |h|^2 (logit 10, all others 0)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=1537, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14, hidden_act="quick_gelu")
    model = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_index=1536,
                                                      vision_feature_layer=-1)).float()
    gen = torch.Generator().manual_seed(0)
    e = torch.randn(64, generator=gen, dtype=torch.float64)
    h = e / torch.sqrt((e ** 2).mean() + 1e-5)
    with torch.no_grad():
        lm = model.model.language_model
        lm.embed_tokens.weight.copy_(e.float().expand(1537, 64))
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        lm.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[favoured] = (10 * h / h.dot(h)).float()
    model.save_pretrained(str(path))
    import shutil

    shutil.copy(demo_data / "tokenizer.model", path / "tokenizer.model")
    return str(path)


def test_evaluate_cli_on_a_model_with_known_answers(demo_data, tmp_path):
    """python -m megallava.evaluate on a converted model that always favours " B": it picks B for every question, so
    the per-subject accuracy is the share of questions whose key is B (1 and 0.5 here), printed per subject, with
    the overall accuracy as the last line."""
    from megallava.convert.hf_to_megatron import hf_to_megatron
    from megallava.data.tokenizer import load_tokenizer
    from megallava.evaluate import continuation_rows, mmlu_prompt

    tok = load_tokenizer(str(demo_data / "tokenizer.model"))
    questions = [
        {"subject": "astronomy", "question": "Which is a planet?", "choices": ["Sirius", "Mars", "Vega"],
         "answer": "B"},
        {"subject": "astronomy", "question": "What orbits the Earth?", "choices": ["The Sun", "The Moon"], "answer": 1},
        {"subject": "cooking", "question": "What do you boil pasta in?", "choices": ["water", "sand"], "answer": "A"},
        {"subject": "cooking", "question": "What is a spice?", "choices": ["glass", "pepper", "tin", "ice"],
         "answer": "B"}]
    (ids, n), = continuation_rows(tok, mmlu_prompt(questions[0]), [" B"])
    assert n == 1
    root = str(tmp_path / "meg")
    hf_to_megatron(_known_answers_model(tmp_path / "hf", demo_data, ids[-1]), root, log=lambda *a, **k: None)
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps(x) + "\n" for x in questions))
    dev = tmp_path / "dev.jsonl"
    dev.write_text(json.dumps({"subject": "cooking", "question": "Is salt salty?", "choices": ["yes", "no"],
                               "answer": 0}) + "\n")
    out = tmp_path / "results.json"
    proc = _cli("megallava.evaluate", "--checkpoint", root, "--questions", str(q), "--dev", str(dev), "--shots", "1",
                "--out", str(out))
    lines = proc.stdout.splitlines()
    assert lines[-3:] == ["astronomy: 1.0000", "cooking: 0.5000", json.dumps({"accuracy": 0.75, "n": 4})]
    res = json.load(open(out))
    assert [r["prediction"] for r in res["questions"]] == [1, 1, 1, 1]
    for r in res["questions"]:  # log p(" B") = 10 - log(e^10 + 1536), every other letter -log(e^10 + 1536)
        want = [-torch.log(torch.tensor(2.718281828 ** 10 + 1536.0, dtype=torch.float64)).item()] * len(r["scores"])
        want[1] += 10
        torch.testing.assert_close(torch.tensor(r["scores"], dtype=torch.float64),
                                   torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-3)
