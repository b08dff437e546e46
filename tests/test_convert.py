"""Checkpoint conversion (tools/convert_checkpoint.py, megallava/convert/): HF <-> megallava at any TP/PP.

Small random HF models built from configs (no hub). One converted model is shared by the tests (module fixtures).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from megallava import config as C
from megallava.convert import dcp, hf_names
from megallava.convert.errors import ConversionError
from megallava.convert.hf_to_megatron import hf_to_megatron
from megallava.convert.megatron_to_hf import megatron_to_hf
from megallava.convert.tensor_files import TensorFiles
from megallava.convert.verify import make_batch, megallava_logits, verify
from tests.conftest import randomise_hf
from tests.multirank import run_ranks

transformers = pytest.importorskip("transformers")
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          LlavaConfig, LlavaForConditionalGeneration)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
VOCAB, IMAGE_TOKEN, IMAGE, PATCH = 500, 499, 56, 14  # vocab not a multiple of 128: exercises the padding
QUIET = lambda *a, **k: None  # noqa: E731


def text_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return LlamaConfig(**{**base, **kw})


def vision_config():
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                            image_size=IMAGE, patch_size=PATCH, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def make_hub_tokenizer(d, vocab=VOCAB):
    """A llava-hf-like HF tokenizer directory: a LLaMA-like sentencepiece BPE of ``vocab - 1`` pieces (trained on
    the demo text) as a transformers fast tokenizer, plus ``<image>`` at id ``vocab - 1`` (added by
    megallava.data.tokenizer.add_image_token, as llava-hf does)."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend
    from megallava.data.demo_data import demo_samples, tokenizer_texts
    from megallava.data.tokenizer import add_image_token, train_sentencepiece

    sp_dir = os.path.join(str(d) + "_sp")
    train_sentencepiece(tokenizer_texts(demo_samples()), os.path.join(sp_dir, "tokenizer"), vocab - 1)
    TokenizersBackend.from_pretrained(sp_dir, legacy=True).save_pretrained(sp_dir + "_hf")
    out = add_image_token(sp_dir + "_hf", str(d))
    assert (out["vocab_size"], out["image_token_id"]) == (vocab, vocab - 1), out
    return str(d)


def write_tokenizer(d, hub_tok):
    for name in os.listdir(hub_tok):
        shutil.copy(os.path.join(hub_tok, name), os.path.join(d, name))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def hub_tok(work):
    return make_hub_tokenizer(work / "hub_tokenizer")


@pytest.fixture(scope="module")
def hf_llava(work, hub_tok):
    """A llava-hf directory written by transformers' save_pretrained (sharded: index + several files), with a hub
    tokenizer and, like llava-1.5-7b-hf, a top-level pad_token_id and vision_feature_layer -2."""
    cfg = LlavaConfig(vision_config=vision_config(), text_config=text_config(), image_token_index=IMAGE_TOKEN,
                      projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = randomise_hf(LlavaForConditionalGeneration(cfg).float().eval())
    d = str(work / "llava_hf")
    model.save_pretrained(d, max_shard_size="100KB")
    _edit_config(d, pad_token_id=0)
    write_tokenizer(d, hub_tok)
    return d


@pytest.fixture(scope="module")
def converted(work, hf_llava):
    out = str(work / "meg")
    hf_to_megatron(hf_llava, out, log=QUIET)
    return out


@pytest.fixture(scope="module")
def parts(work, hf_llava, hub_tok):
    """The same weights as a CLIP directory, a LLaMA directory and original-LLaVA checkpoints."""
    model = LlavaForConditionalGeneration.from_pretrained(hf_llava, dtype=torch.float32)
    vision = str(work / "clip")
    vit = CLIPVisionModel(model.config.vision_config)
    vit.load_state_dict(model.model.vision_tower.state_dict())
    vit.save_pretrained(vision)
    llama_dir = str(work / "llama")
    llm = LlamaForCausalLM(model.config.text_config)
    llm.model.load_state_dict(model.model.language_model.state_dict())
    llm.lm_head.load_state_dict(model.lm_head.state_dict())
    llm.save_pretrained(llama_dir)
    write_tokenizer(llama_dir, hub_tok)
    proj = model.model.multi_modal_projector
    projector = {"model.mm_projector.0.weight": proj.linear_1.weight, "model.mm_projector.0.bias": proj.linear_1.bias,
                 "model.mm_projector.2.weight": proj.linear_2.weight, "model.mm_projector.2.bias": proj.linear_2.bias}
    projector_bin = str(work / "mm_projector.bin")
    torch.save({k: v.detach().clone() for k, v in projector.items()}, projector_bin)
    out = {"vision": vision, "llama": llama_dir, "projector_bin": projector_bin}
    from safetensors.torch import save_file

    for kind in ("mlp2x_gelu", "linear"):
        d = str(work / f"llava_{kind}")
        os.makedirs(d)
        sd = {k: v.detach().clone() for k, v in llm.state_dict().items()}
        if kind == "mlp2x_gelu":
            sd.update({k: v.detach().clone() for k, v in projector.items()})
        else:
            gen = torch.Generator().manual_seed(3)
            sd["model.mm_projector.weight"] = 0.05 * torch.randn(64, 32, generator=gen)
            sd["model.mm_projector.bias"] = 0.1 * torch.randn(64, generator=gen)
        save_file(sd, os.path.join(d, "model.safetensors"))
        cfg = llm.config.to_dict()
        cfg.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama",
                   mm_vision_tower="openai/clip-vit-large-patch14-336", mm_projector_type=kind,
                   mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_hidden_size=32)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f)
        write_tokenizer(d, hub_tok)
        out[kind] = d
    return out


def shorts(path):
    """{short HF name: tensor} of every tensor in a HF directory (read with our reader, spelled by hf_names)."""
    files = TensorFiles.from_dir(path)
    return {hf_names.short_name(n): files.get(n) for n in files.names()}


# ---------------------------------------------------------------------------------------------------------------

def test_geometry_and_format_agree_with_the_trainer():
    from megallava.convert import geometry
    from megallava.model.llama import padded_vocab_size
    from megallava.model.vision import vision_num_layers_built
    from megallava.training.checkpoint import FORMAT_VERSION

    assert dcp.FORMAT_VERSION == FORMAT_VERSION
    for v in (500, 32000, 32064, 128256):
        for tp in (1, 2, 4, 8):
            assert geometry.padded_vocab_size(v, 128, tp) == padded_vocab_size(v, 128, tp) == \
                   geometry.padded_vocab_size(v, 128, 1)
    vc = C.VisionConfig(num_layers=24, select_layer=-2)
    assert geometry.vision_num_layers_built(vc) == vision_num_layers_built(vc) == 23


def test_output_layout_and_dcp_metadata(converted):
    assert open(os.path.join(converted, "latest")).read().strip() == "iter_0000000"
    it = os.path.join(converted, "iter_0000000")
    assert json.load(open(os.path.join(it, "metadata.json"))) == dcp.MEGATRON_METADATA
    common = torch.load(os.path.join(it, "common.pt"), weights_only=False)
    assert common["weights_only"] is True and common["iteration"] == 0
    assert sorted(os.listdir(os.path.join(converted, "tokenizer"))) == [
        "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    # hf_extra/: the input tensors megallava does not build (ViT layer 2 of 3, post_layernorm) and its config
    extra = json.load(open(os.path.join(converted, "hf_extra", "extra.json")))
    assert extra["flavour"] == "llava-hf" and len(extra["tensors"]) == 16 + 2
    assert all(t.startswith(("vit.encoder.layers.2.", "vit.post_layernorm.")) for t in extra["tensors"])
    assert json.load(open(os.path.join(converted, "hf_extra", "config.json"))) == \
        json.load(open(os.path.join(converted, "..", "llava_hf", "config.json")))
    assert common["hf_source"] == os.path.abspath(converted)
    model = C.load_config(os.path.join(converted, "megallava_model.yaml")).model
    assert (model.num_layers, model.num_query_groups, model.vocab_size, model.image_token_id) == (4, 2, VOCAB,
                                                                                                  IMAGE_TOKEN)
    assert model.vision.select_layer == -2 and model.vision.num_layers == 3
    md = dcp.CheckpointReader(converted).metadata.state_dict_metadata
    assert tuple(md["decoder.layers.self_attention.linear_qkv.weight"].size) == (4, (4 + 2 * 2) * 16, 64)
    assert tuple(md["decoder.layers.mlp.linear_fc1.weight"].size) == (4, 2 * 176, 64)
    assert tuple(md["vision.encoder.layers.mlp.linear_fc1.weight"].size) == (2, 64, 32)  # 2 of 3 ViT layers built
    assert tuple(md["embedding.weight"].size) == tuple(md["output_layer.weight"].size) == (1024, 64)
    assert not any("_extra_state" in k for k in md)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_logit_parity_through_the_trainer_loader(hf_llava, converted, tp, pp):
    r = verify(hf_llava, converted, tp=tp, pp=pp, tolerance=1e-4, log=QUIET)
    print(f"tp{tp}pp{pp}: max |logit diff| {r['max_abs_diff']:.2e}, loss {r['megallava_loss']:.7f} vs HF "
          f"{r['hf_loss']:.7f}")
    assert r["max_abs_logit"] > 1.0  # logits are not vanishingly small, so 1e-4 is a real bound
    assert r["ok"] and r["max_abs_diff"] < 1e-4
    assert r["megallava_loss"] == pytest.approx(r["hf_loss"], rel=1e-5)


@pytest.fixture(scope="module")
def trainer_saved(work, converted):
    """The converted checkpoint loaded and saved again by the trainer (checkpoint.load / save) at TP2 x PP2."""
    out = str(work / "trainer_ckpt")
    yaml_path = os.path.join(converted, "megallava_model.yaml")

    def fn(rank, env):
        from megallava.distributed import init_distributed
        from megallava.model.build import build_chunks
        from megallava.training import checkpoint
        from megallava.training.optimizer import build_optimizer, wrap_ddp

        cfg = C.load_config(yaml_path, ["parallel.tp=2", "parallel.pp=2", "train.precision=fp32"])
        init_distributed(2, 2, None, seed=0, env=env)
        model = wrap_ddp(build_chunks(cfg), cfg)
        optimizer, scheduler = build_optimizer(model, cfg)
        start = checkpoint.load(converted, model, optimizer, scheduler, load_optimizer=True)
        # The trainer saves after optimizer steps; before the first one Adam has no state to save yet.
        checkpoint._materialise_optimizer_state(optimizer)
        checkpoint.save(out, model, optimizer, scheduler, 7)
        return start

    assert run_ranks(4, fn) == [0, 0, 0, 0]  # weights-only: iteration 0 whatever load_optimizer says
    return out


def _same_tensors(a_dir, b_dir):
    a, b = shorts(a_dir), shorts(b_dir)
    assert set(a) == set(b), (set(a) ^ set(b))
    for s in a:
        assert a[s].dtype == b[s].dtype and torch.equal(a[s], b[s]), s
    return len(a)


def test_hub_round_trip_gives_back_every_tensor_and_config_field(work, hf_llava, converted):
    """HF -> megallava -> HF of an unmodified conversion: every tensor (ViT layer 2, which megallava does not build,
    and post_layernorm included) bitwise, config.json field for field (vision_feature_layer -2, num_hidden_layers,
    top-level pad_token_id), and the input's tokenizer files verbatim."""
    out = str(work / "hub_back")
    r = megatron_to_hf(converted, out, log=QUIET)
    assert r["full_tower"] and r["verbatim"] and r["source"] == os.path.abspath(converted)
    assert _same_tensors(hf_llava, out) == len(TensorFiles.from_dir(hf_llava).names())
    a, b = (json.load(open(os.path.join(d, "config.json"))) for d in (hf_llava, out))
    assert a == b and b["vision_feature_layer"] == -2 and b["pad_token_id"] == 0
    assert b["vision_config"]["num_hidden_layers"] == 3
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert open(os.path.join(hf_llava, name), "rb").read() == open(os.path.join(out, name), "rb").read()
    _, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_round_trip_via_trainer_is_bitwise(work, hf_llava, converted, trainer_saved):
    out = str(work / "hf_back")
    # The model config, the conversion's hf_extra/ and tokenizer are found next to --config (the converted root).
    r = megatron_to_hf(trainer_saved, out, config=os.path.join(converted, "megallava_model.yaml"),
                       max_shard_size="60KB", log=QUIET)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))  # sharded by --max-shard-size
    assert r["full_tower"] and not r["verbatim"] and r["parity"] is None and r["template"] == "vicuna_v1"
    _same_tensors(hf_llava, out)  # the trainer's iteration-7 save of unchanged weights: all tensors come back
    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    a, b = LlavaConfig.from_pretrained(hf_llava), model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "rope_parameters", "max_position_embeddings", "bos_token_id",
                "eos_token_id", "tie_word_embeddings", "hidden_act"):
        assert getattr(a.text_config, key) == getattr(b.text_config, key), key
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "image_size", "patch_size",
                "layer_norm_eps", "hidden_act", "num_channels", "num_hidden_layers"):
        assert getattr(a.vision_config, key) == getattr(b.vision_config, key), key
    assert json.load(open(os.path.join(out, "config.json"))) == json.load(open(os.path.join(hf_llava, "config.json")))
    # a trained checkpoint gets megallava's processor / chat template (the trainer's), not the hub's files
    assert os.path.isfile(os.path.join(out, "processor_config.json"))
    assert json.load(open(os.path.join(out, "tokenizer_config.json")))["add_bos_token"] is True
    # ... and the exported model computes what the original computes.
    r = verify(out, trainer_saved, config=os.path.join(converted, "megallava_model.yaml"), tolerance=1e-4,
               log=QUIET)
    assert r["ok"]


def test_export_without_the_conversion_describes_the_truncated_tower(work, converted, trainer_saved, hub_tok):
    """No hf_extra/ to be found: the export holds the built ViT layers only, reads features from its last layer
    and writes post_layernorm as the identity; it computes the same logits."""
    cfg_dir = work / "elsewhere"
    cfg_dir.mkdir()
    yaml_path = str(cfg_dir / "model.yaml")
    shutil.copy(os.path.join(converted, "megallava_model.yaml"), yaml_path)
    ckpt = _copy(os.path.join(trainer_saved, "iter_0000007"), cfg_dir / "iter_0000007")
    # trainer checkpoints carry the conversion they descend from (hf_source): forget it here, as an older one would
    common = torch.load(os.path.join(ckpt, "common.pt"), weights_only=False)
    assert common.pop("hf_source") == os.path.abspath(converted)
    common.pop("integrity", None)
    torch.save(common, os.path.join(ckpt, "common.pt"))
    if os.path.exists(os.path.join(ckpt, "integrity.json")):
        os.remove(os.path.join(ckpt, "integrity.json"))
    out = str(work / "hf_truncated")
    r = megatron_to_hf(ckpt, out, config=yaml_path, tokenizer=hub_tok, log=QUIET)
    assert r["source"] is None and not r["full_tower"]
    back = shorts(out)
    assert not any(s.startswith("vit.encoder.layers.2.") for s in back)
    assert torch.equal(back["vit.post_layernorm.weight"], torch.ones(32))
    assert torch.equal(back["vit.post_layernorm.bias"], torch.zeros(32))
    cfg = LlavaConfig.from_pretrained(out)
    assert (cfg.vision_config.num_hidden_layers, cfg.vision_feature_layer) == (2, -1)
    assert verify(out, ckpt, config=yaml_path, tolerance=1e-4, log=QUIET)["ok"]
    # a run config that started from the conversion (load: auto, pretrained: CONVERTED) leads back to it
    with open(yaml_path) as f:
        raw = yaml.safe_load(f)
    raw["checkpoint"] = {"load": "auto", "pretrained": str(converted)}
    run_cfg = str(cfg_dir / "config.yaml")
    with open(run_cfg, "w") as f:
        yaml.safe_dump(raw, f)
    r = megatron_to_hf(ckpt, str(work / "hf_found"), config=run_cfg, tokenizer=hub_tok, log=QUIET)
    assert r["source"] == os.path.abspath(converted) and r["full_tower"], r


def test_trainer_checkpoint_reshards(converted, trainer_saved):
    model = C.load_config(os.path.join(converted, "megallava_model.yaml")).model
    ids, pixels, _, labels = make_batch(model)
    base, base_loss = megallava_logits(trainer_saved, model, (ids, pixels, labels), 2, 2)
    for tp, pp in ((1, 4), (1, 1)):
        logits, loss = megallava_logits(trainer_saved, model, (ids, pixels, labels), tp, pp)
        torch.testing.assert_close(logits, base, rtol=0, atol=1e-5)
        assert loss == pytest.approx(base_loss, rel=1e-6)
    one, _ = megallava_logits(trainer_saved, model, (ids, pixels, labels), 1, 1)
    assert torch.equal(logits, one)  # TP1 x PP4 and TP1 x PP1: the same arithmetic, bitwise


def test_original_llava_and_llama_clip_inputs(work, parts, hf_llava, converted):
    # original LLaVA (mlp2x_gelu): the vision tower is named, not stored -> --vision
    with pytest.raises(ConversionError, match="does not store its vision tower.*--vision"):
        hf_to_megatron(parts["mlp2x_gelu"], str(work / "x"), log=QUIET)
    out = str(work / "from_llava")
    hf_to_megatron(parts["mlp2x_gelu"], out, vision=parts["vision"], log=QUIET)
    assert verify(parts["mlp2x_gelu"], out, vision=parts["vision"], tolerance=1e-4, log=QUIET)["ok"]
    # Same weights as the llava-hf model except the image token convention (-200): identical tensors.
    a, b = dcp.CheckpointReader(out), dcp.CheckpointReader(converted)
    for key in ("decoder.layers.self_attention.linear_qkv.weight", "projector.linear_2.weight",
                "vision.encoder.layers.self_attention.linear_qkv.bias"):
        assert torch.equal(a.read(key), b.read(key)), key

    # original LLaVA with a linear projector (LLaVA v1, the paper's 33B/65B) -> exported in the LLaVA layout
    lin = str(work / "from_linear")
    hf_to_megatron(parts["linear"], lin, vision=parts["vision"], dtype="bf16", log=QUIET)
    r = verify(parts["linear"], lin, vision=parts["vision"], tolerance=5e-2, log=QUIET)  # bf16 weights vs fp32
    assert r["ok"], r
    exported = str(work / "linear_export")
    lines = []
    megatron_to_hf(lin, exported, log=lines.append)
    assert any("original-LLaVA layout" in line for line in lines)
    cfg = json.load(open(os.path.join(exported, "config.json")))
    # the whole CLIP tower comes back from hf_extra/ (bf16 like the rest), with the input's select layer
    assert (cfg["mm_projector_type"], cfg["mm_vision_tower"], cfg["mm_vision_select_layer"]) == \
           ("linear", "vision_tower", -2)
    vit, info = CLIPVisionModel.from_pretrained(os.path.join(exported, "vision_tower"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and vit.config.num_hidden_layers == 3
    clip = TensorFiles.from_dir(parts["vision"])
    tower = TensorFiles.from_dir(os.path.join(exported, "vision_tower"))
    plain = lambda n: n[len("vision_model."):] if n.startswith("vision_model.") else n  # noqa: E731 (4.x / 5.x)
    ours = {plain(n): n for n in tower.names()}
    assert sorted(ours) == sorted(map(plain, clip.names()))
    for n in clip.names():
        assert torch.equal(tower.get(ours[plain(n)]), clip.get(n).to(torch.bfloat16)), n
    again = str(work / "linear_again")
    hf_to_megatron(exported, again, log=QUIET)  # mm_vision_tower resolves to the exported vision_tower/
    x, y = dcp.CheckpointReader(lin), dcp.CheckpointReader(again)
    for key, md in x.metadata.state_dict_metadata.items():
        assert torch.equal(x.read(key), y.read(key)), key
    assert verify(exported, lin, tolerance=1e-4, log=QUIET)["ok"]

    # plain LLaMA + CLIP: stage 1 from scratch (fresh projector) or with LLaVA's mm_projector.bin
    fresh = str(work / "from_llama")
    hf_to_megatron(parts["llama"], fresh, vision=parts["vision"], projector_type="linear", seed=5, log=QUIET)
    w = dcp.CheckpointReader(fresh).read("projector.linear_1.weight")
    assert abs(w.std().item() - 0.02) < 0.004 and not dcp.CheckpointReader(fresh).read("projector.linear_1.bias").any()
    assert verify(parts["llama"], fresh, vision=parts["vision"], tolerance=1e-4, log=QUIET)["ok"]
    staged = str(work / "from_llama_projector")
    hf_to_megatron(parts["llama"], staged, vision=parts["vision"], projector=parts["projector_bin"], log=QUIET)
    assert verify(parts["llama"], staged, vision=parts["vision"], projector=parts["projector_bin"],
                  tolerance=1e-4, log=QUIET)["ok"]
    assert torch.equal(dcp.CheckpointReader(staged).read("projector.linear_2.weight"),
                       b.read("projector.linear_2.weight"))


@pytest.fixture(scope="module")
def plain_llama(work, hub_tok):
    """A LLaMA whose tokenizer fills its vocab and has no <image> (as LLaMA-7B..70B: 32000 tokens, vocab 32000): the
    hub tokenizer's 499 pieces before <image> was added, in both forms a hub LLaMA directory carries (tokenizer.json
    + tokenizer_config.json, and the sentencepiece tokenizer.model)."""
    d = str(work / "llama_plain")
    torch.manual_seed(1)
    randomise_hf(LlamaForCausalLM(text_config(vocab_size=VOCAB - 1)).float()).save_pretrained(d)
    write_tokenizer(d, hub_tok + "_sp_hf")
    shutil.copy(os.path.join(hub_tok + "_sp", "tokenizer.model"), os.path.join(d, "tokenizer.model"))
    return d


def test_llama_clip_gets_an_in_vocab_image_token(work, parts, plain_llama, demo_data):
    """hf-to-megatron of LLaMA + CLIP: <image> is added to the tokenizer copy at id = the old vocab (499), the
    embedding and output layer grow by one row equal to the mean of the others, the model config and fingerprint
    record vocab 500 / image token 499 and the conversion prints them; verify passes; a training run on the demo
    shards with that tokenizer copy loads it; a run with the old settings is refused although the padded shapes
    agree. --image-token -200 keeps original LLaVA's layout."""
    from safetensors.torch import load_file
    from sentencepiece import SentencePieceProcessor
    from transformers import AutoTokenizer
    from megallava.data.tokenizer import image_token_settings
    from megallava.training.fingerprint import read as read_fingerprint

    old = VOCAB - 1
    out, lines = str(work / "from_llama_plain"), []
    hf_to_megatron(plain_llama, out, vision=parts["vision"], log=lines.append)
    assert f"the training config must use model.vocab_size: {old + 1}, model.image_token_id: {old}" in "\n".join(lines)
    model = C.load_config(os.path.join(out, "megallava_model.yaml")).model
    assert (model.vocab_size, model.image_token_id) == (old + 1, old)
    fp = read_fingerprint(os.path.join(out, "iter_0000000"))
    assert (fp["model"]["vocab_size"], fp["model"]["image_token_id"]) == (old + 1, old)
    # the new rows: the mean of the LLaMA's rows (float64 accumulation, then fp32); the rest unchanged
    hf = load_file(os.path.join(plain_llama, "model.safetensors"))
    reader = dcp.CheckpointReader(out)
    for key, hf_key in (("embedding.weight", "model.embed_tokens.weight"), ("output_layer.weight", "lm_head.weight")):
        got, want = reader.read(key), hf[hf_key]
        assert got.shape == (1024, 64) and torch.equal(got[:old], want), key
        torch.testing.assert_close(got[old], want.double().mean(0).float(), rtol=0, atol=1e-7)
        assert not got[old + 1:].any() and got[old].abs().sum() > 0
    again = str(work / "from_llama_plain_again")
    hf_to_megatron(plain_llama, again, vision=parts["vision"], log=QUIET)
    assert torch.equal(dcp.CheckpointReader(again).read("embedding.weight"), reader.read("embedding.weight"))
    # the tokenizer copy holds <image> at 499 in both forms; text encodes as before
    tok_dir = os.path.join(out, "tokenizer")
    hf_tok, orig = AutoTokenizer.from_pretrained(tok_dir), AutoTokenizer.from_pretrained(plain_llama)
    assert hf_tok.convert_tokens_to_ids("<image>") == old and len(hf_tok) == old + 1
    assert hf_tok("a photo <image>", add_special_tokens=False)["input_ids"][-1] == old
    text = "USER: What is in the picture? ASSISTANT: A cat."
    assert hf_tok(text)["input_ids"] == orig(text)["input_ids"]
    assert SentencePieceProcessor(model_file=os.path.join(tok_dir, "tokenizer.model")).piece_to_id("<image>") == old
    assert image_token_settings(tok_dir) == {"vocab_size": old + 1, "image_token_id": old}
    assert image_token_settings(os.path.join(tok_dir, "tokenizer.model"))["image_token_id"] == old
    assert verify(plain_llama, out, vision=parts["vision"], tolerance=1e-4, log=QUIET)["ok"]

    def train(overrides, run_dir):
        def fn(rank, env):
            from megallava.model.layout import local_pieces
            from megallava.training.train import run

            cfg = C.load_config(os.path.join(out, "megallava_model.yaml"), [
                "train.iters=1", "train.global_batch_size=2", "train.micro_batch_size=2", "train.precision=fp32",
                "train.lr=1e-30", "train.min_lr=0", f"train.run_dir={run_dir}", f"checkpoint.load={out}"] + overrides)
            seen = {}
            try:
                records = run(cfg, env, on_iteration=lambda i, m, o: seen.update(local_pieces(m, ("embedding.weight",),
                                                                                             0)))
            except Exception as err:  # noqa: BLE001
                return {"error": str(err)}
            return {"loss": records[0]["loss"], "embedding": seen["embedding.weight"][1]}
        return run_ranks(1, fn)[0]

    shards = [f"data.sources=[{{path: {demo_data}/shards/instruct}}]", "data.source=shards", "data.num_workers=0",
              "data.seq_length=256", f"data.tokenizer={tok_dir}"]
    ran = train(shards, work / "train_plain")
    assert "error" not in ran, ran
    assert torch.isfinite(torch.tensor(ran["loss"]))
    torch.testing.assert_close(ran["embedding"][:old + 1], reader.read("embedding.weight")[:old + 1], rtol=0,
                               atol=1e-20)
    stale = train(["model.vocab_size=499", "model.image_token_id=-200"], work / "train_stale")  # padded: 1024 too
    assert "model.vocab_size: checkpoint 500, this run 499" in stale.get("error", ""), stale

    # --image-token -200: original LLaVA's placeholder, the vocab and tokenizer as they are
    kept = str(work / "from_llama_plain_200")
    hf_to_megatron(plain_llama, kept, vision=parts["vision"], image_token=-200, log=QUIET)
    m200 = C.load_config(os.path.join(kept, "megallava_model.yaml")).model
    assert (m200.vocab_size, m200.image_token_id) == (old, -200)
    assert AutoTokenizer.from_pretrained(os.path.join(kept, "tokenizer")).convert_tokens_to_ids("<image>") in (
        None, 0)  # unknown: unk
    assert torch.equal(dcp.CheckpointReader(kept).read("embedding.weight")[:old], hf["model.embed_tokens.weight"])
    assert verify(plain_llama, kept, vision=parts["vision"], tolerance=1e-4, log=QUIET)["ok"]
    for bad, flavour in ((dict(input=plain_llama, vision=parts["vision"], image_token=5), "a vocab id is chosen"),
                         (dict(input=parts["mlp2x_gelu"], vision=parts["vision"], image_token=-1), "original-LLaVA")):
        with pytest.raises(ConversionError, match=f"--image-token .* does not apply.*{flavour}"):
            hf_to_megatron(output=str(work / "x"), log=QUIET, **bad)


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: a clear error naming the file / tensor, and no output directory left behind.
# ---------------------------------------------------------------------------------------------------------------

def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_config(d, **changes):
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    for k, v in changes.items():
        target = cfg
        *parents, leaf = k.split("__")
        for p in parents:
            target = target[p]
        target[leaf] = v
    json.dump(cfg, open(path, "w"))


def _no_output(out):
    parent, name = os.path.split(out)
    return not any(n == name or n.startswith(name + ".tmp-") for n in os.listdir(parent))


def test_bad_inputs(work, hf_llava, parts, converted, capsys):
    from safetensors.torch import load_file, save_file

    bad = work / "bad"
    bad.mkdir()
    out = str(bad / "out")
    cases = []
    # missing tensor
    d = _copy(parts["mlp2x_gelu"], bad / "missing")
    sd = load_file(os.path.join(d, "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, os.path.join(d, "model.safetensors"))
    cases.append((dict(input=d, vision=parts["vision"]), r"missing tensor lm\.layers\.1\.mlp\.up_proj\.weight"))
    # shape mismatch: the config says another ffn size
    d = _copy(hf_llava, bad / "shape")
    _edit_config(d, text_config__intermediate_size=160)
    cases.append((dict(input=d), r"model-\d+-of-\d+\.safetensors: tensor 'language_model\.model\.layers\.0\.mlp"
                                 r"\.gate_proj\.weight' has shape \[176, 64\], but the config implies \[160, 64\]"))
    # heads do not divide the hidden size
    d = _copy(hf_llava, bad / "heads")
    _edit_config(d, text_config__num_attention_heads=5)
    cases.append((dict(input=d), r"heads/config\.json: .*(hidden size \(64\) is not a multiple of the number of "
                                 r"attention heads \(5\)|hidden_size=64 is not divisible by num_attention_heads=5)"))
    # unknown architecture
    d = _copy(parts["llama"], bad / "arch")
    _edit_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    cases.append((dict(input=d, vision=parts["vision"]), "unknown architecture.*gpt2"))
    # truncated safetensors file
    d = _copy(parts["mlp2x_gelu"], bad / "truncated")
    path = os.path.join(d, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    cases.append((dict(input=d, vision=parts["vision"]), r"model\.safetensors is truncated: tensor '.*' needs bytes"))
    # a llava-hf directory does not take a separate vision tower
    cases.append((dict(input=hf_llava, vision=parts["vision"]), "--vision does not apply"))
    for kwargs, pattern in cases:
        with pytest.raises(ConversionError, match=pattern):
            hf_to_megatron(output=out, log=QUIET, **kwargs)
        assert _no_output(out), kwargs
    # existing output: refused unless --overwrite
    os.makedirs(out)
    with pytest.raises(ConversionError, match="already exists.*--overwrite"):
        hf_to_megatron(hf_llava, out, log=QUIET)
    shutil.rmtree(out)
    # a failure in the middle of writing leaves nothing behind either
    from megallava.convert import sources

    original = sources.Source.get

    def fail_late(self, short):
        if short.startswith("lm.layers.3."):
            raise OSError("disk full")
        return original(self, short)

    sources.Source.get = fail_late
    try:
        with pytest.raises(OSError, match="disk full"):
            hf_to_megatron(hf_llava, out, log=QUIET)
    finally:
        sources.Source.get = original
    assert _no_output(out)
    # megatron-to-hf: wrong model config for the checkpoint
    wrong = bad / "wrong.yaml"
    wrong.write_text(open(os.path.join(converted, "megallava_model.yaml")).read().replace("num_layers: 4", "num_layers: 2"))
    with pytest.raises(ConversionError, match=r"decoder\.layers\.input_layernorm\.weight' has shape \[4, 64\], the "
                                              r"model config .* implies \[2, 64\]"):
        megatron_to_hf(converted, out, config=str(wrong), log=QUIET)
    assert _no_output(out)
    # the CLI: exit 2 and one readable line, no traceback; verify --tp 3 is named before any work
    from megallava.convert.cli import main

    assert main(["verify", "--hf", hf_llava, "--megatron", converted, "--tp", "3"]) == 2
    err = capsys.readouterr().err
    assert "parallel.tp=3 does not divide model.num_attention_heads=4" in err and "Traceback" not in err
    assert main(["hf-to-megatron", "--input", str(bad / "truncated"), "--output", out, "--vision",
                 parts["vision"]]) == 2
    assert "is truncated" in capsys.readouterr().err and _no_output(out)


# ---------------------------------------------------------------------------------------------------------------
# Memory: a ~300 MB model converts in a subprocess whose peak RSS stays within a few tensors of an idle run.
# ---------------------------------------------------------------------------------------------------------------

_CHILD = """
import json, sys
from megallava.convert import cli, hf_to_megatron, megatron_to_hf  # noqa: F401  everything the CLI imports ...
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig  # noqa: F401  ... including the HF configs

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB

out = {}
for name, argv in json.loads(sys.argv[1]):
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    assert cli.main(argv) == 0, argv
    out[name] = {"before": before, "peak": status("VmHWM")}
print(json.dumps(out))
"""


def _peak_rss(commands):
    """Run conversions in a fresh interpreter; per command, its RSS before and its peak RSS (MiB) while running.
    (Measured inside the child: the ru_maxrss of a forked-then-exec'd child still counts the parent's memory.)"""
    # A fixed mmap threshold makes glibc return every freed tensor to the OS at once; with its default dynamic
    # threshold, freed tensor-sized blocks may stay cached in the heap, adding allocator noise to the measurement.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(commands)], capture_output=True, text=True,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS accounting")
def test_peak_memory_is_a_few_tensors(work, hf_llava, hub_tok):
    from safetensors.torch import save_file

    h, ffn, layers, vocab = 1024, 2816, 12, 4000
    big = str(work / "big_hf")
    os.makedirs(big)
    text = text_config(vocab_size=vocab, hidden_size=h, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=8, num_key_value_heads=8)
    cfg = LlavaConfig(vision_config=vision_config(), text_config=text, image_token_index=vocab - 1)
    cfg.save_pretrained(big)
    small = shorts(hf_llava)  # the ViT and its shapes come from the small model; the LLM is big
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0

    def put(tensors, fname):
        nonlocal total
        save_file(tensors, os.path.join(big, fname))
        weight_map.update({k: fname for k in tensors})
        total += sum(t.nbytes for t in tensors.values())

    rnd = lambda *s: (torch.randn(*s, generator=gen) * 0.02).to(torch.bfloat16)  # noqa: E731
    put({"language_model.model.embed_tokens.weight": rnd(vocab, h), "language_model.lm_head.weight": rnd(vocab, h),
         "language_model.model.norm.weight": rnd(h),
         "multi_modal_projector.linear_1.weight": rnd(h, 32), "multi_modal_projector.linear_1.bias": rnd(h),
         "multi_modal_projector.linear_2.weight": rnd(h, h), "multi_modal_projector.linear_2.bias": rnd(h),
         **{"vision_tower.vision_model." + s[4:]: t.to(torch.bfloat16) for s, t in small.items()
            if s.startswith("vit.")}}, "model-embed.safetensors")
    for i in range(layers):
        p = f"language_model.model.layers.{i}."
        put({p + "input_layernorm.weight": rnd(h), p + "post_attention_layernorm.weight": rnd(h),
             **{p + f"self_attn.{n}_proj.weight": rnd(h, h) for n in "qkvo"},
             p + "mlp.gate_proj.weight": rnd(ffn, h), p + "mlp.up_proj.weight": rnd(ffn, h),
             p + "mlp.down_proj.weight": rnd(h, ffn)}, f"model-layer{i}.safetensors")
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(big, "model.safetensors.index.json"), "w"))
    write_tokenizer(big, hub_tok)
    largest = 2 * ffn * h * 2 / 2 ** 20  # the biggest chunk written: fused [gate; up], bf16 (11 MiB)
    # The tiny model first, in the same process: one-off costs (lazy imports, first-use allocations) land in the
    # baseline, so what the big model adds is the conversion's own working set.
    rss = _peak_rss([["warm_in", ["hf-to-megatron", "--input", hf_llava, "--output", str(work / "m_warm"), "--quiet"]],
                     ["warm_out", ["megatron-to-hf", "--input", str(work / "m_warm"), "--output",
                                   str(work / "h_warm"), "--quiet"]],
                     ["in", ["hf-to-megatron", "--input", big, "--output", str(work / "m_big"), "--quiet"]],
                     ["out", ["megatron-to-hf", "--input", str(work / "m_big"), "--output", str(work / "h_big"),
                              "--max-shard-size", "100MB", "--quiet"]]])
    model_mib = total / 2 ** 20
    grew = {k: v["peak"] - v["before"] for k, v in rss.items() if not k.startswith("warm")}
    print(f"model {model_mib:.0f} MiB, largest chunk {largest:.1f} MiB; RSS hf->megatron {rss['in']['before']:.0f} "
          f"-> peak {rss['in']['peak']:.0f} MiB (+{grew['in']:.0f}), megatron->hf {rss['out']['before']:.0f} -> peak "
          f"{rss['out']['peak']:.0f} MiB (+{grew['out']:.0f})")
    # Bound: 4 x the largest chunk above the process's RSS before converting (interpreter, torch, configs): a
    # fused tensor's HF inputs, the fused result, and one chunk being (de)serialised. The model is far larger than
    # that margin, so a converter holding it (or mapping whole files into memory) would fail.
    margin = 4 * largest
    assert model_mib >= 3 * margin
    assert grew["in"] <= margin and grew["out"] <= margin
    assert shorts(big).keys() >= {s for s in shorts(str(work / "h_big")) if not s.startswith("vit.post_layernorm")}


# ------------------------------------------------------------------------------------------------------- LoRA
LORA_LAYOUTS = {"tp2_fp32": (2, 1, "fp32"), "pp2_bf16": (1, 2, "bf16")}


@pytest.fixture(scope="module", params=list(LORA_LAYOUTS))
def lora_ckpt(request, work, converted):
    """A LoRA-4 (alpha 16) model of the converted shape, saved by the trainer with random, nonzero adapters (B = 0
    at init would make any export look right), plus the run config that records lora.rank / alpha: at TP2 in fp32,
    and at PP2 (two layers per stage) in bf16 (bf16 weights, fp32 master copies)."""
    tp, pp, precision = LORA_LAYOUTS[request.param]
    out = str(work / f"lora_ckpt_{request.param}")
    run_cfg = str(work / f"lora_run_{request.param}.yaml")
    cfg = C.load_config(os.path.join(converted, "megallava_model.yaml"),
                        [f"parallel.tp={tp}", f"parallel.pp={pp}", f"train.precision={precision}", "lora.rank=4",
                         "lora.alpha=16"])
    C.dump_yaml(cfg, run_cfg)

    def fn(rank, env):
        from megallava.distributed import init_distributed
        from megallava.model.build import build_chunks
        from megallava.training import checkpoint
        from megallava.training.optimizer import build_optimizer, wrap_ddp

        init_distributed(tp, pp, None, seed=0, env=env)
        chunks = build_chunks(cfg)
        gen = torch.Generator().manual_seed(5 + rank)  # each TP rank / stage holds its own rows of B
        with torch.no_grad():
            for name, p in chunks[0].named_parameters():
                if name.endswith(".lora_b"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
                elif name.endswith(".lora_a") and getattr(p, "tensor_model_parallel", False):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)  # row-parallel A: split over TP
        model = wrap_ddp(chunks, cfg)
        optimizer, scheduler = build_optimizer(model, cfg)
        checkpoint._materialise_optimizer_state(optimizer)
        checkpoint.save(out, model, optimizer, scheduler, 3)

    run_ranks(tp * pp, fn)
    return out, run_cfg, cfg, request.param


def _megallava_lora_logits(ckpt, cfg, ids, pixels):
    """The checkpoint's model at TP1 x PP1 in fp32 (a bf16 checkpoint's values exactly), unmerged adapters."""
    def fn(rank, env):
        from megallava.distributed import init_distributed
        from megallava.model.build import build_chunks
        from megallava.training import checkpoint

        c = C.load_config(None, [])
        c.model, c.lora = cfg.model, cfg.lora
        c.train.precision = "fp32"
        init_distributed(1, 1, None, seed=0, env=env)
        chunks = build_chunks(c)
        checkpoint.load(ckpt, chunks, None, None, load_optimizer=False)
        with torch.no_grad():
            return chunks[0].eval()(tokens=ids, images=pixels)[..., :cfg.model.vocab_size]

    return run_ranks(1, fn)[0]


def test_lora_export_merged_and_peft(work, lora_ckpt, hub_tok):
    """Merged (W + (alpha / r) B A) and PEFT-adapter exports give megallava's logits (1e-4), from a TP2 fp32 and a
    PP2 bf16 checkpoint. The bf16 one is exported in fp32 for the comparison (the merge itself is fp32, so nothing is
    rounded), and its default bf16 export holds exactly those merged weights rounded to bf16."""
    from peft import PeftModel
    from safetensors.torch import load_file

    ckpt, run_cfg, cfg, case = lora_ckpt
    bf16 = cfg.train.precision == "bf16"
    dtype = "fp32" if bf16 else None
    ids, pixels, _, _ = make_batch(cfg.model)
    want = _megallava_lora_logits(ckpt, cfg, ids, pixels)
    merged, unmerged = str(work / f"lora_merged_{case}"), str(work / f"lora_peft_{case}")
    megatron_to_hf(ckpt, merged, config=run_cfg, tokenizer=hub_tok, merge_lora=True, dtype=dtype, log=QUIET)
    megatron_to_hf(ckpt, unmerged, config=run_cfg, tokenizer=hub_tok, dtype=dtype, log=QUIET)
    assert not os.path.exists(os.path.join(merged, "adapter"))
    with torch.no_grad():
        m = LlavaForConditionalGeneration.from_pretrained(merged, dtype=torch.float32).eval()
        got_merged = m(input_ids=ids, pixel_values=pixels).logits
        base = LlavaForConditionalGeneration.from_pretrained(unmerged, dtype=torch.float32).eval()
        got_base = base(input_ids=ids, pixel_values=pixels).logits
        peft = PeftModel.from_pretrained(base, os.path.join(unmerged, "adapter")).eval()
        got_peft = peft(input_ids=ids, pixel_values=pixels).logits
    assert (got_base - want).abs().max() > 1e-2  # the adapters change the model
    torch.testing.assert_close(got_merged, want, rtol=0, atol=1e-4)
    torch.testing.assert_close(got_peft, want, rtol=0, atol=1e-4)
    cfg_json = json.load(open(os.path.join(unmerged, "adapter", "adapter_config.json")))
    assert (cfg_json["r"], cfg_json["lora_alpha"]) == (4, 16.0)
    if bf16:
        native = str(work / f"lora_merged_{case}_bf16")
        megatron_to_hf(ckpt, native, config=run_cfg, tokenizer=hub_tok, merge_lora=True, log=QUIET)
        got, exact = shorts(native), shorts(merged)
        assert got.keys() == exact.keys() and got["lm.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
        for name, t in got.items():
            assert torch.equal(t, exact[name].to(torch.bfloat16)), name
    with pytest.raises(ConversionError, match="holds no LoRA adapters"):
        megatron_to_hf(converted_dir(work), str(work / f"nolora_{case}"), merge_lora=True, tokenizer=hub_tok,
                       log=QUIET)


def converted_dir(work):
    return str(work / "meg")
