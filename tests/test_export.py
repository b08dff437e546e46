"""megatron-to-hf writes a directory that chats with no extra file (AutoProcessor + LlavaForConditionalGeneration +
apply_chat_template + generate) and sees exactly what the trainer saw; verify runs at uneven / interleaved pipeline
layouts, in bf16 and in bounded memory; an interrupted save (.partial) is refused.

The tokenizer is the demo's sentencepiece model (trained on the demo text, with the in-vocab <image> added at id
1536) and the image a real photograph from scikit-image; models are small random ones built from configs.
"""
import json
import os
import shutil

import pytest
import torch
import yaml

from megallava import config as C
from megallava.convert import hf_export
from megallava.convert.errors import ConversionError
from megallava.convert.hf_to_megatron import hf_to_megatron
from megallava.convert.megatron_to_hf import megatron_to_hf
from megallava.convert.verify import make_batch, megallava_logits, verify
from megallava.data.images import load_image
from megallava.data.templates import TEMPLATES, TemplateError, encode_conversation, render_prompt
from megallava.data.tokenizer import add_image_token, image_token_settings, load_tokenizer
from tests.conftest import randomise_hf

transformers = pytest.importorskip("transformers")
from transformers import (AutoProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,  # noqa: E402
                          LlavaForConditionalGeneration)

QUIET = lambda *a, **k: None  # noqa: E731
DEMO_VOCAB = 1536          # megallava.data.demo_data.TOKENIZER_VOCAB
IMAGE_ID = DEMO_VOCAB      # the in-vocab <image>: the id after the tokenizer's last one
IMAGE, PATCH = 56, 14      # 16 image tokens


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def demo(work):
    from megallava.data.demo_data import build_demo_dataset

    return build_demo_dataset(str(work / "demo"))


def tiny_llava(path, layers=2, vocab=DEMO_VOCAB + 1, image_token=IMAGE_ID, feature_layer=-2, seed=0):
    text = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=IMAGE, patch_size=PATCH, hidden_act="quick_gelu")
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_index=image_token,
                      vision_feature_layer=feature_layer, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = randomise_hf(LlavaForConditionalGeneration(cfg).float().eval())
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def run(work, demo):
    """A trainer-like run: the converted model saved again as iteration 5 of another checkpoint directory, carrying
    the tokenizer copy the trainer writes into every checkpoint (<iter_dir>/tokenizer/tokenizer.model), and the
    run's resolved config.yaml (template, image mode, checkpoint.load = the converted root)."""
    hf = tiny_llava(work / "hf")
    meg = str(work / "meg")
    hf_to_megatron(hf, meg, log=QUIET)
    ckpt = str(work / "run" / "ckpt")
    it = os.path.join(ckpt, "iter_0000005")
    shutil.copytree(os.path.join(meg, "iter_0000000"), it)
    common = torch.load(os.path.join(it, "common.pt"), weights_only=False)
    for key in ("weights_only", "converted_from", "hf_source"):  # what a trainer save holds
        common.pop(key)
    torch.save(dict(common, iteration=5), os.path.join(it, "common.pt"))
    with open(os.path.join(ckpt, "latest"), "w") as f:
        f.write("iter_0000005\n")
    os.makedirs(os.path.join(it, "tokenizer"))
    shutil.copy(demo["tokenizer"], os.path.join(it, "tokenizer", "tokenizer.model"))
    cfg = yaml.safe_load(open(os.path.join(meg, "megallava_model.yaml")))
    cfg.update(data={"source": "shards", "tokenizer": demo["tokenizer"], "image_mode": "pad",
                     "sources": [{"path": "shards/instruct", "template": "vicuna_v1"},
                                 {"path": "shards/sharegpt", "template": "vicuna_v1"}]},
               checkpoint={"load": meg})
    config = str(work / "run" / "config.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    return {"hf": hf, "meg": meg, "ckpt": ckpt, "config": config,
            "model": C.load_config(config).model}


# ---------------------------------------------------------------------------------------------------------------

def test_image_token_helper(work, demo):
    """The demo tokenizer has 1536 pieces: an in-vocab <image> is id 1536, model.vocab_size 1537."""
    assert image_token_settings(demo["tokenizer"]) == {"vocab_size": DEMO_VOCAB + 1, "image_token_id": IMAGE_ID}
    out = add_image_token(demo["tokenizer"], str(work / "with_image.model"))
    assert (out["vocab_size"], out["image_token_id"]) == (DEMO_VOCAB + 1, IMAGE_ID)
    tok, orig = load_tokenizer(out["path"]), load_tokenizer(demo["tokenizer"])
    assert tok.vocab_size == DEMO_VOCAB + 1 and tok.sp.piece_to_id("<image>") == IMAGE_ID
    text = "USER: <image>\nWhat is it? </s>"
    assert tok.encode(text) == orig.encode(text) and IMAGE_ID not in tok.encode(text)  # text never encodes to it
    assert image_token_settings(out["path"]) == {"vocab_size": DEMO_VOCAB + 1, "image_token_id": IMAGE_ID}
    again = add_image_token(out["path"], str(work / "again.model"))  # already there: unchanged
    assert open(again["path"], "rb").read() == open(out["path"], "rb").read()


def _hf_messages(conv, as_parts):
    out = []
    for t in conv:
        role = {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"])
        value = t["value"]
        if as_parts:
            parts = []
            for i, piece in enumerate(value.split("<image>")):
                if i:
                    parts.append({"type": "image"})
                if piece:
                    parts.append({"type": "text", "text": piece})
            value = parts
        out.append({"role": role, "content": value})
    return out


def test_chat_templates_render_the_trainers_prompts(demo):
    """Every demo conversation (and edge cases: system override, merged turns, leading assistant turn, empty answer,
    several images) in all three templates, with string or list-of-parts content: the chat template renders
    render_prompt's text and the exported tokenizer gives encode_conversation's ids."""
    model = C.ModelConfig(vocab_size=DEMO_VOCAB + 1, image_token_id=IMAGE_ID)
    model.vision.image_size, model.vision.patch_size = IMAGE, PATCH
    hf_tok, trainer_tok = hf_export.build_hf_tokenizer(demo["tokenizer"], model, QUIET)
    assert hf_tok("Hi")["input_ids"][0] == trainer_tok.bos_id == 1 and len(hf_tok) == DEMO_VOCAB + 1
    convs = []
    for name in ("llava_stage1", "llava_instruct", "sharegpt"):
        convs += [s["conversations"] for s in json.load(open(demo[name]))]
    convs += [
        [{"from": "gpt", "value": "dropped"}, {"from": "human", "value": "q1"},
         {"from": "human", "value": "q2 <image> more"}, {"from": "gpt", "value": "a"}, {"from": "gpt", "value": ""}],
        [{"from": "system", "value": ""}, {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "  two"}],
        [{"from": "human", "value": "<image> <image>x  "}, {"from": "gpt", "value": "y"},
         {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "z 12345 café"}],
    ]
    checked = 0
    for template in TEMPLATES:
        chat = hf_export.chat_template(template)
        for conv in convs:
            want = render_prompt(conv, template)
            n_images = sum(t["value"].count("<image>") for t in conv)
            try:
                ids = encode_conversation(conv, template, trainer_tok, IMAGE_ID, 16, n_images).tokens
            except TemplateError:
                ids = None
            for as_parts in (False, True):
                text = hf_tok.apply_chat_template(_hf_messages(conv, as_parts), chat_template=chat, tokenize=False)
                assert text == want, (template, conv)
                if ids is not None:
                    assert hf_tok(text.replace("<image>", "<image>" * 16))["input_ids"] == ids, (template, conv)
                    checked += 1
    assert checked > 3 * 2 * 50
    with pytest.raises(Exception, match="only allowed as the first"):
        hf_tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
                                   chat_template=hf_export.chat_template("vicuna_v1"), tokenize=False)


def test_export_chats_with_no_extra_file_and_matches_megallava(work, demo, run):
    """AutoProcessor + LlavaForConditionalGeneration + apply_chat_template + generate on the export of a trainer
    checkpoint: the processor's input ids and pixels are the trainer's for the same sample (a non-square photograph:
    the pad path), and the first greedy step's logits equal megallava's forward (TP2) within 1e-4."""
    out = str(work / "exported")
    lines = []
    r = megatron_to_hf(run["ckpt"], out, config=run["config"], log=lines.append)
    assert (r["template"], r["image_mode"], r["parity"], r["full_tower"]) == ("vicuna_v1", "pad", None, True)
    assert r["source"] == os.path.abspath(run["meg"])  # found through the run config's checkpoint.load
    assert any("iter_0000005/tokenizer" in line and "trainer's copy" in line for line in lines)
    for name in ("preprocessor_config.json", "processor_config.json", "chat_template.jinja", "tokenizer.json",
                 "tokenizer_config.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    proc = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.vision_feature_layer == -2 and model.config.vision_config.num_hidden_layers == 3

    from PIL import Image

    path = os.path.join(demo["images"], "chelsea.png")  # 451 x 300: padded to a square by the mean colour
    question, answer = "What animal is this?", "It is a cat."
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(path)},
                                             {"type": "text", "text": question}]}]
    inputs = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    # the trainer's sample: encode_conversation + load_image on the same bytes
    conv = [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]
    enc = encode_conversation(conv, "vicuna_v1", load_tokenizer(demo["tokenizer"]), IMAGE_ID, 16, 1)
    prompt = enc.tokens[:enc.trained.index(True)]
    pixels = load_image(open(path, "rb").read(), IMAGE, "pad")
    assert inputs["input_ids"][0].tolist() == prompt and prompt[0] == 1
    assert torch.equal(inputs["pixel_values"][0], pixels)
    full = proc.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=True,
                                    return_dict=True)
    assert list(full["input_ids"][0]) == enc.tokens
    # processor(text=rendered prompt, images=...) is the same (llava-hf's usual two-step call)
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    assert proc(text=text, images=Image.open(path), return_tensors="pt")["input_ids"][0].tolist() == prompt

    gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    hf_first = gen.logits[0][0].float()
    ids = torch.tensor([prompt])
    ours, _ = megallava_logits(run["ckpt"], run["model"], (ids, pixels[None], torch.full_like(ids, -100)), tp=2,
                               with_loss=False)
    diff = (ours[0, -1] - hf_first).abs().max().item()
    print(f"first greedy step: max |logit diff| HF vs megallava {diff:.2e} (max |logit| "
          f"{hf_first.abs().max():.2f})")
    assert hf_first.abs().max() > 1.0 and diff < 1e-4
    assert gen.sequences[0, len(prompt)].item() == ours[0, -1].argmax().item()


def test_export_settings(work, demo, run):
    """resize mode writes CLIPImageProcessor (pixels = load_image resize); llama_2 / plain templates; at 336 px
    the processor expands <image> to 576 ids (CLS dropped)."""
    from PIL import Image

    path = os.path.join(demo["images"], "coffee.png")
    out = str(work / "exported_resize")
    r = megatron_to_hf(run["ckpt"], out, config=run["config"], image_mode="resize", template="llama_2", log=QUIET)
    assert (r["image_mode"], r["template"], r["parity"]) == ("resize", "llama_2", None)
    proc = AutoProcessor.from_pretrained(out)
    assert json.load(open(os.path.join(out, "preprocessor_config.json")))["image_processor_type"] == \
        "CLIPImageProcessor"
    assert torch.equal(proc(images=Image.open(path), text="<image>", return_tensors="pt")["pixel_values"][0],
                       load_image(open(path, "rb").read(), IMAGE, "resize"))
    assert proc.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True).startswith(
        "[INST] <<SYS>>\n")
    # 336 px, patch 14: 576 features per image
    big = C.ModelConfig(vocab_size=DEMO_VOCAB + 1, image_token_id=IMAGE_ID)
    d = str(work / "processor_336")
    info = hf_export.write_processor(d, big, demo["tokenizer"], "plain", "pad", "llava-hf", log=QUIET)
    assert info["parity"] is None
    p336 = AutoProcessor.from_pretrained(d)
    msgs = [{"role": "user", "content": [{"type": "image", "image": Image.open(path)}]}]
    batch = p336.apply_chat_template(msgs, tokenize=True, return_dict=True, return_tensors="pt")
    assert (batch["input_ids"] == IMAGE_ID).sum().item() == 576 and batch["pixel_values"].shape[-1] == 336
    assert batch["input_ids"][0].tolist() == [1] + [IMAGE_ID] * 576  # plain: BOS + the image, then the caption


def test_tokenizer_is_required(work, run):
    """No --tokenizer, no <iter_dir>/tokenizer/, no usable tokenizer beside the conversion: an error naming both
    (--weights-only writes the model alone)."""
    with pytest.raises(ConversionError, match=r"no tokenizer for the export.*iter_0000000/tokenizer.*--tokenizer"):
        megatron_to_hf(run["meg"], str(work / "no_tok"), log=QUIET)
    assert not os.path.exists(str(work / "no_tok"))
    megatron_to_hf(run["meg"], str(work / "no_tok"), weights_only=True, log=QUIET)
    assert sorted(os.listdir(str(work / "no_tok"))) == ["config.json", "model.safetensors"]


def test_incomplete_checkpoints_are_refused(work, run, capsys):
    """An iter_N.partial (a save that was interrupted, even with every file present) or a renamed copy is refused by
    megatron-to-hf and verify, before anything is written."""
    it = os.path.join(run["ckpt"], "iter_0000005")
    partial = str(work / "crashed" / "iter_0000006.partial")
    shutil.copytree(it, partial)
    renamed = str(work / "crashed" / "snapshot")
    shutil.copytree(it, renamed)
    out = str(work / "from_partial")
    for bad, pattern in ((partial, r"incomplete save.*iter_0000006\.partial to iter_0000006"),
                         (renamed, r"snapshot: not a complete checkpoint directory")):
        with pytest.raises(ConversionError, match=pattern):
            megatron_to_hf(bad, out, config=run["config"], log=QUIET)
        with pytest.raises(ConversionError, match=pattern):
            verify(run["hf"], bad, config=run["config"], log=QUIET)
        assert not os.path.exists(out)
    from megallava.convert.cli import main

    assert main(["megatron-to-hf", "--input", partial, "--output", out, "--config", run["config"]]) == 2
    err = capsys.readouterr().err
    assert "incomplete save" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def five_layers(work):
    hf = tiny_llava(work / "hf5", layers=5, seed=1)
    meg = str(work / "meg5")
    hf_to_megatron(hf, meg, log=QUIET)
    return hf, meg


def test_verify_uneven_and_interleaved_pipelines(five_layers):
    hf, meg = five_layers
    with pytest.raises(ConversionError, match=r"num_layers=5 is fewer than the parallel.pp=8 pipeline chunks"):
        verify(hf, meg, pp=8, log=QUIET)
    for kw in ({"pp": 2}, {"pp": 2, "pipeline_layers": [2, 3]},  # pp=2 alone: the balanced split [2, 3] {"pp": 2, "vpp": 2, "pipeline_layers": [1, 1, 2, 1]},
               {"tp": 2, "pp": 2, "pipeline_layers": [3, 2]}):
        r = verify(hf, meg, tolerance=1e-4, log=QUIET, **kw)
        print(kw, f"max |logit diff| {r['max_abs_diff']:.2e}")
        assert r["ok"] and r["max_abs_logit"] > 1.0, (kw, r)
    from megallava.convert.cli import main

    assert main(["verify", "--hf", hf, "--megatron", meg, "--pp", "2", "--pipeline-layers", "2,3",
                 "--tolerance", "1e-4"]) == 0


def test_verify_bf16_and_loaders(five_layers):
    """bf16 on both sides passes its default tolerance (and really is bf16: not the fp32 numbers); the streaming
    loader and the trainer's checkpoint.load give the same logits bitwise."""
    hf, meg = five_layers
    fp32 = verify(hf, meg, log=QUIET)
    bf16 = verify(hf, meg, dtype="bf16", log=QUIET)
    print(f"fp32 max |logit diff| {fp32['max_abs_diff']:.2e}; bf16 {bf16['max_abs_diff']:.2e} "
          f"(tolerance {bf16['tolerance']})")
    assert bf16["ok"] and bf16["tolerance"] == 0.1 and bf16["max_abs_diff"] > 10 * fp32["max_abs_diff"]
    assert bf16["weights_bytes"] * 2 == fp32["weights_bytes"]
    model = C.load_config(os.path.join(meg, "megallava_model.yaml")).model
    ids, pixels, _, labels = make_batch(model)
    a, loss_a = megallava_logits(meg, model, (ids, pixels, labels), tp=2)
    b, loss_b = megallava_logits(meg, model, (ids, pixels, labels), tp=2, trainer_loader=True)
    assert torch.equal(a, b) and loss_a == loss_b


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS accounting")
def test_verify_memory_is_one_copy(work):
    """Neither side holds more than ~1.2x one copy of the weights (the HF model is loaded tensor by tensor, the
    megallava ranks read (tensor, layer) chunks, and the two never coexist)."""
    from safetensors.torch import save_file

    h, ffn, layers, vocab = 512, 1408, 8, 16000
    d = str(work / "mid_hf")
    text = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE, patch_size=PATCH, hidden_act="quick_gelu")
    LlavaConfig(text_config=text, vision_config=vision, image_token_index=vocab - 1).save_pretrained(d)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlavaForConditionalGeneration(LlavaConfig.from_pretrained(d)).state_dict()
                  .items()}
    gen = torch.Generator().manual_seed(0)
    save_file({k: (torch.randn(s, generator=gen) * 0.05).to(torch.bfloat16) for k, s in shapes.items()},
              os.path.join(d, "model.safetensors"))
    meg = str(work / "mid_meg")
    hf_to_megatron(d, meg, log=QUIET)
    r = verify(d, meg, log=QUIET)
    copy = r["weights_bytes"]
    print(f"one fp32 copy {copy / 2 ** 20:.0f} MiB; peak RSS growth HF {r['hf_peak_growth'] / 2 ** 20:.0f} MiB, "
          f"megallava {r['megallava_peak_growth'] / 2 ** 20:.0f} MiB")
    assert r["ok"] and copy > 100 * 2 ** 20
    assert r["hf_peak_growth"] < 1.2 * copy + 48 * 2 ** 20
    assert r["megallava_peak_growth"] < 1.2 * copy + 160 * 2 ** 20  # + megatron / gloo start-up in the rank
