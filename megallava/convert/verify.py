"""Logit parity between a HF checkpoint (run with transformers) and a megallava checkpoint (loaded through the
trainer's own ``checkpoint.load`` at a chosen TP x PP on forked gloo ranks), on one text + image batch.

The HF side is ``LlavaForConditionalGeneration`` for llava-hf directories; for original-LLaVA and LLaMA + CLIP
inputs it is HF's ``LlamaForCausalLM`` and ``CLIPVisionModel`` composed the way LLaVA does (features of the
selected layer, CLS dropped, projector, placeholder rows of the embeddings replaced).
"""
import gc
import os

import torch

from megallava import config as C
from megallava.convert import dcp, hf_config
from megallava.convert.errors import ConversionError
from megallava.convert.megatron_to_hf import find_model_config
from megallava.convert.sources import _Generated, open_source
from megallava.convert.geometry import vision_num_layers_built
from megallava.local_ranks import run_ranks


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------

def make_batch(model, seed: int = 0, text_tokens: int = 12):
    """Two sequences: one with an image placeholder run (one id per image feature), one text only."""
    v = model.vision
    patches = (v.image_size // v.patch_size) ** 2
    gen = torch.Generator().manual_seed(seed)
    s = patches + text_tokens
    ids = torch.randint(0, model.vocab_size, (2, s), generator=gen)
    if 0 <= model.image_token_id < model.vocab_size:  # random text must not contain the placeholder id
        ids[ids == model.image_token_id] = (model.image_token_id + 1) % model.vocab_size
    ids[0, 3:3 + patches] = model.image_token_id
    is_image = ids == model.image_token_id
    hf_labels = ids.masked_fill(is_image, -100)
    hf_labels[1, :5] = -100
    labels = torch.cat([hf_labels[:, 1:], torch.full((2, 1), -100)], dim=1)  # megallava's labels are pre-shifted
    pixels = torch.randn(1, v.num_channels, v.image_size, v.image_size, generator=gen)
    return ids, pixels, hf_labels, labels


# ---------------------------------------------------------------------------------------------------------------
# HF reference
# ---------------------------------------------------------------------------------------------------------------

class _Composed(torch.nn.Module):
    """LLaVA on HF parts: CLIPVisionModel -> hidden_states[k] (CLS dropped) -> projector -> LlamaForCausalLM."""

    def __init__(self, llm, vit, projector: dict, kind: str, feature_layer: int, image_token_id: int):
        super().__init__()
        self.llm, self.vit, self.kind = llm, vit, kind
        self.feature_layer, self.image_token_id = feature_layer, image_token_id
        h, vh = projector["proj.linear_1.weight"].shape
        self.linear_1 = torch.nn.Linear(vh, h)
        self.linear_1.weight.data.copy_(projector["proj.linear_1.weight"])
        self.linear_1.bias.data.copy_(projector["proj.linear_1.bias"])
        if kind == "mlp2x_gelu":
            self.linear_2 = torch.nn.Linear(h, h)
            self.linear_2.weight.data.copy_(projector["proj.linear_2.weight"])
            self.linear_2.bias.data.copy_(projector["proj.linear_2.bias"])

    def forward(self, input_ids, pixel_values, labels=None):
        is_image = input_ids == self.image_token_id
        emb = self.llm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        hidden = self.vit(pixel_values, output_hidden_states=True).hidden_states[self.feature_layer][:, 1:]
        feats = self.linear_1(hidden)
        if self.kind == "mlp2x_gelu":
            feats = self.linear_2(torch.nn.functional.gelu(feats))
        emb = emb.masked_scatter(is_image.unsqueeze(-1), feats.to(emb.dtype))
        return self.llm(inputs_embeds=emb, labels=labels)


def hf_reference(source, ckpt_reader, log=print):
    """The HF model of ``source`` (sources.open_source) in fp32 eval mode. A freshly initialised projector (LLaMA +
    CLIP input without --projector) is taken from the megallava checkpoint."""
    from transformers import CLIPVisionModel, LlamaForCausalLM, LlavaForConditionalGeneration

    if source.flavour == "llava-hf":
        ref = LlavaForConditionalGeneration.from_pretrained(source.path, dtype=torch.float32,
                                                            attn_implementation="eager")
        return ref.eval()
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # an original-LLaVA dir read as plain LLaMA: its mm_projector is expected
    try:
        llm = LlamaForCausalLM.from_pretrained(source.path, dtype=torch.float32, attn_implementation="eager")
        vit = CLIPVisionModel.from_pretrained(source.vision_dir, dtype=torch.float32, attn_implementation="eager")
    finally:
        hf_logging.set_verbosity(verbosity)
    if any(isinstance(store, _Generated) for store, _ in source.tensors.values()):
        log("note: the HF side has no projector: using the megallava checkpoint's (only the LLM and ViT are compared)")
        proj = {f"proj.{n}": ckpt_reader.read(f"projector.{n}").float()
                for n in ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")
                if ckpt_reader.tensor_meta(f"projector.{n}") is not None}
        kind = "mlp2x_gelu" if "proj.linear_2.weight" in proj else "linear"
    else:
        proj = {s: source.get(s).float() for s in source.tensors if s.startswith("proj.")}
        kind = source.model.projector
    # hidden_states[k] = output of k layers: the HF side's own choice of layer (of its possibly truncated tower).
    feature_layer = vision_num_layers_built(source.model.vision)
    return _Composed(llm, vit, proj, kind, feature_layer, source.model.image_token_id).eval()


# ---------------------------------------------------------------------------------------------------------------
# megallava side: forked gloo ranks, the trainer's checkpoint.load
# ---------------------------------------------------------------------------------------------------------------

def run_config(model, tp: int, pp: int) -> C.Config:
    cfg = C.Config(model=model)
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    cfg.train.precision = "fp32"
    cfg.data.max_images_per_sample = 0
    return cfg


def megallava_logits(ckpt: str, model, batch, tp: int = 1, pp: int = 1):
    """(logits [b, s, vocab] fp32, mean token loss) of the checkpoint loaded by the trainer at TP x PP."""
    ids, pixels, labels = batch
    cfg = run_config(model, tp, pp)
    try:
        C.validate(cfg, tp * pp)
    except C.ConfigError as err:
        raise ConversionError([f"megallava at tp={tp} pp={pp}: {p}" for p in err.problems]) from None

    def fn(rank, env):
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megallava.distributed import init_distributed
        from megallava.model.build import build_chunks
        from megallava.training import checkpoint

        init_distributed(tp, pp, None, seed=0, env=env)
        chunks = build_chunks(cfg)
        checkpoint.load(ckpt, chunks, None, None, load_optimizer=False)
        for c in chunks:
            c.eval()

        def run(with_labels):
            def step(data_iterator, model):
                return model(tokens=ids, images=pixels, labels=labels if with_labels else None), None

            with torch.no_grad():
                out = get_forward_backward_func()(
                    forward_step_func=step, data_iterator=iter([None]), model=chunks[0], num_microbatches=1,
                    seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=True)
            return out[0].float().cpu() if out else None

        return {"tp_rank": parallel_state.get_tensor_model_parallel_rank(),
                "last": parallel_state.is_pipeline_last_stage(), "logits": run(False), "token_loss": run(True)}

    results = [r for r in run_ranks(tp * pp, fn) if r["last"]]
    results.sort(key=lambda r: r["tp_rank"])
    logits = torch.cat([r["logits"] for r in results], dim=-1)[..., :model.vocab_size]
    n = (labels >= 0).sum()
    return logits, float(results[0]["token_loss"].sum() / n)


def verify(hf_dir: str, ckpt: str, tp: int = 1, pp: int = 1, tolerance: float = 1e-3, config: str = None,
           vision: str = None, projector: str = None, seed: int = 0, log=print) -> dict:
    reader = dcp.CheckpointReader(ckpt)
    model, where = find_model_config(reader.root, config)
    hf_config.check_model(model, where, tp, pp)  # e.g. tp=3 with 4 heads: named before any work
    ids, pixels, hf_labels, labels = make_batch(model, seed)
    source = open_source(hf_dir, vision=vision, projector=projector)
    source.check()
    if source.model.vocab_size != model.vocab_size or source.model.image_token_id != model.image_token_id:
        raise ConversionError(f"{hf_dir} (vocab {source.model.vocab_size}, image token {source.model.image_token_id})"
                              f" and {where} (vocab {model.vocab_size}, image token {model.image_token_id}) describe "
                              f"different models")
    # megallava first: its ranks are forked, best before this process has run anything heavy.
    logits, loss = megallava_logits(reader.dir, model, (ids, pixels, labels), tp, pp)
    ref = hf_reference(source, reader, log)
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=pixels, labels=hf_labels)
    hf_logits, hf_loss = out.logits.float(), float(out.loss)
    del ref, out
    gc.collect()
    if logits.shape != hf_logits.shape:
        raise ConversionError(f"logit shapes differ: HF {list(hf_logits.shape)}, megallava {list(logits.shape)}")
    diff = (logits - hf_logits).abs()
    result = {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(), "hf_loss": hf_loss,
              "megallava_loss": loss, "loss_diff": abs(loss - hf_loss), "max_abs_logit": hf_logits.abs().max().item(),
              "tp": tp, "pp": pp, "tolerance": tolerance, "flavour": source.flavour}
    result["ok"] = result["max_abs_diff"] <= tolerance and result["loss_diff"] <= tolerance
    log(f"verify {source.flavour} {hf_dir} vs megallava {reader.dir} at tp={tp} pp={pp}: "
        f"max |logit diff| {result['max_abs_diff']:.3e}, mean {result['mean_abs_diff']:.3e} "
        f"(max |logit| {result['max_abs_logit']:.2f}); loss HF {hf_loss:.6f} megallava {loss:.6f} "
        f"(diff {result['loss_diff']:.3e}) -> {'OK' if result['ok'] else 'FAIL'} (tolerance {tolerance:g})")
    return result
