"""Name and fused-layout conversion between the canonical megallava layout (convert/layout.py) and HF transformers'
``LlavaForConditionalGeneration`` state_dict. Pure tensor-dict functions: no model, no I/O, no parallelism.

HF keys come in several spellings; all are read, and ``canonical_to_hf`` writes the transformers 5.x in-memory one:
- 5.x in memory: ``model.language_model.*``, ``lm_head.*``, ``model.vision_tower.*`` (5.x drops CLIPVisionModel's
  ``vision_model.`` level), ``model.multi_modal_projector.*``;
- 4.x / llava-hf checkpoints on disk: ``language_model.model.*``, ``language_model.lm_head.*``,
  ``vision_tower.vision_model.*``, ``multi_modal_projector.*`` (5.x save_pretrained: ``vision_tower.*``).

Two tensors are fused differently in megatron-core:
- ``linear_qkv`` (LLaMA with GQA, and CLIP where groups = heads) is grouped per query group: for each group its
  q heads, then its k head, then its v head (so a contiguous TP split gives every rank whole groups);
- the LLaMA ``linear_fc1`` is [gate; up].
megallava builds only the ViT layers the LLM sees (``vision_num_layers_built``): HF's later ViT layers and its
``post_layernorm`` are dropped on read and absent on write.
"""
import re

import torch

from megallava.model.vision import vision_num_layers_built

# Accepted HF prefixes -> short section tag; order matters (more specific first).
_HF_PREFIXES = (
    ("model.language_model.", "lm."), ("language_model.model.", "lm."),
    ("language_model.lm_head.", "head."), ("lm_head.", "head."),
    ("model.vision_tower.vision_model.", "vit."), ("vision_tower.vision_model.", "vit."),
    ("model.vision_tower.", "vit."), ("vision_tower.", "vit."),
    ("model.multi_modal_projector.", "proj."), ("multi_modal_projector.", "proj."),
)
_HF_OUT = {"lm.": "model.language_model.", "head.": "lm_head.", "vit.": "model.vision_tower.",
           "proj.": "model.multi_modal_projector."}

# (HF tensors, canonical tensor, kind). {i}: layer index; {w}: weight and bias. "qkv"/"fc1" entries are fused.
_LLM_LAYER = (
    (("lm.layers.{i}.input_layernorm.weight",), "decoder.layers.{i}.input_layernorm.weight", "copy"),
    (("lm.layers.{i}.self_attn.q_proj.weight", "lm.layers.{i}.self_attn.k_proj.weight",
      "lm.layers.{i}.self_attn.v_proj.weight"), "decoder.layers.{i}.self_attention.linear_qkv.weight", "qkv"),
    (("lm.layers.{i}.self_attn.o_proj.weight",), "decoder.layers.{i}.self_attention.linear_proj.weight", "copy"),
    (("lm.layers.{i}.post_attention_layernorm.weight",), "decoder.layers.{i}.pre_mlp_layernorm.weight", "copy"),
    (("lm.layers.{i}.mlp.gate_proj.weight", "lm.layers.{i}.mlp.up_proj.weight"),
     "decoder.layers.{i}.mlp.linear_fc1.weight", "fc1"),
    (("lm.layers.{i}.mlp.down_proj.weight",), "decoder.layers.{i}.mlp.linear_fc2.weight", "copy"),
)
_VIT_LAYER = (
    (("vit.encoder.layers.{i}.layer_norm1.{w}",), "vision.encoder.layers.{i}.input_layernorm.{w}", "copy"),
    (("vit.encoder.layers.{i}.self_attn.q_proj.{w}", "vit.encoder.layers.{i}.self_attn.k_proj.{w}",
      "vit.encoder.layers.{i}.self_attn.v_proj.{w}"), "vision.encoder.layers.{i}.self_attention.linear_qkv.{w}",
     "qkv"),
    (("vit.encoder.layers.{i}.self_attn.out_proj.{w}",), "vision.encoder.layers.{i}.self_attention.linear_proj.{w}",
     "copy"),
    (("vit.encoder.layers.{i}.layer_norm2.{w}",), "vision.encoder.layers.{i}.pre_mlp_layernorm.{w}", "copy"),
    (("vit.encoder.layers.{i}.mlp.fc1.{w}",), "vision.encoder.layers.{i}.mlp.linear_fc1.{w}", "copy"),
    (("vit.encoder.layers.{i}.mlp.fc2.{w}",), "vision.encoder.layers.{i}.mlp.linear_fc2.{w}", "copy"),
)
_GLOBAL = (
    (("lm.embed_tokens.weight",), "embedding.weight", "copy"),
    (("lm.norm.weight",), "decoder.final_layernorm.weight", "copy"),
    (("head.weight",), "output_layer.weight", "copy"),
    (("vit.embeddings.patch_embedding.weight",), "vision.patch_embedding.weight", "copy"),
    (("vit.embeddings.class_embedding",), "vision.class_embedding", "copy"),
    (("vit.embeddings.position_embedding.weight",), "vision.position_embedding", "copy"),
    (("vit.pre_layrnorm.{w}",), "vision.pre_layernorm.{w}", "copy"),
    (("proj.linear_1.{w}",), "projector.linear_1.{w}", "copy"),
    (("proj.linear_2.{w}",), "projector.linear_2.{w}", "copy"),
)
# HF tensors megallava has no use for: unused ViT tail, non-parameter buffers some checkpoints carry.
_IGNORED = re.compile(r"vit\.post_layernorm\.|vit\.embeddings\.position_ids$|lm\.rotary_emb\.|lm\.layers\.\d+\."
                      r"self_attn\.rotary_emb\.")


def _plan(model_cfg):
    """Every (hf_names, canonical_name, kind, qkv_geometry) for this model, in canonical order of sections."""
    if model_cfg.projector != "mlp2x_gelu":
        raise ValueError(f"model.projector={model_cfg.projector!r} has no HF LLaVA equivalent: HF's "
                         f"multi_modal_projector is always Linear-GELU-Linear (mlp2x_gelu)")
    v = model_cfg.vision
    llm_geo = (model_cfg.num_attention_heads, model_cfg.num_query_groups or model_cfg.num_attention_heads,
               model_cfg.hidden_size // model_cfg.num_attention_heads)
    vit_geo = (v.num_attention_heads, v.num_attention_heads, v.hidden_size // v.num_attention_heads)
    entries = []

    def add(table, geo, **fmt):
        for hf, can, kind in table:
            for w in (("weight", "bias") if "{w}" in can else (None,)):
                f = dict(fmt, w=w)
                entries.append((tuple(h.format(**f) for h in hf), can.format(**f), kind, geo))

    add(_GLOBAL, None)
    for i in range(vision_num_layers_built(v)):
        add(_VIT_LAYER, vit_geo, i=i)
    for i in range(model_cfg.num_layers):
        add(_LLM_LAYER, llm_geo, i=i)
    return entries


def _short(hf_name: str) -> str:
    for prefix, tag in _HF_PREFIXES:
        if hf_name.startswith(prefix):
            return tag + hf_name[len(prefix):]
    raise KeyError(f"unexpected HF tensor {hf_name!r}: not under a LLaVA prefix "
                   f"({', '.join(p for p, _ in _HF_PREFIXES)})")


def _long(short_name: str) -> str:
    tag, rest = short_name.split(".", 1)
    return _HF_OUT[tag + "."] + rest


def _ignored(short_name: str, vit_layers_built: int) -> bool:
    m = re.match(r"vit\.encoder\.layers\.(\d+)\.", short_name)
    return bool(_IGNORED.match(short_name)) or (m is not None and int(m.group(1)) >= vit_layers_built)


def _fuse_qkv(q, k, v, geo, name):
    heads, groups, d = geo
    for t, rows, what in ((q, heads * d, "q"), (k, groups * d, "k"), (v, groups * d, "v")):
        if t.shape[0] != rows:
            raise ValueError(f"{name}: HF {what} has {t.shape[0]} rows, the config's {heads} heads / {groups} "
                             f"query groups x head dim {d} need {rows}")
    q, k, v = (t.reshape(groups, -1, *t.shape[1:]) for t in (q, k, v))
    return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])


def _split_qkv(qkv, geo, name):
    heads, groups, d = geo
    per_group = (heads // groups + 2) * d
    if qkv.shape[0] != groups * per_group:
        raise ValueError(f"{name} has {qkv.shape[0]} rows, the config's {heads} heads / {groups} query groups x "
                         f"head dim {d} need {groups * per_group}")
    parts = qkv.reshape(groups, per_group, *qkv.shape[1:]).split([heads // groups * d, d, d], dim=1)
    return [p.reshape(-1, *qkv.shape[1:]).clone() for p in parts]  # clone: no shared storage (safetensors)


def hf_to_canonical(hf_state: dict, model_cfg) -> dict:
    """HF LlavaForConditionalGeneration state_dict (any spelling above) -> canonical megallava tensors."""
    short = {}
    for name, t in hf_state.items():
        s = _short(name)
        if s in short:
            raise ValueError(f"HF tensor {name!r} appears twice under different prefixes")
        short[s] = (name, t)
    built = vision_num_layers_built(model_cfg.vision)
    out = {}
    for hf_names, can, kind, geo in _plan(model_cfg):
        missing = [h for h in hf_names if h not in short]
        if missing:
            raise KeyError(f"HF state_dict lacks {', '.join(map(_long, missing))} (needed for {can})")
        ts = [short.pop(h)[1] for h in hf_names]
        out[can] = ts[0] if kind == "copy" else _fuse_qkv(*ts, geo, can) if kind == "qkv" else torch.cat(ts)
    extra = [name for s, (name, _) in short.items() if not _ignored(s, built)]
    if extra:
        raise ValueError(f"unexpected HF tensors (not in this model config): {', '.join(sorted(extra))}")
    return out


def canonical_to_hf(canonical: dict, model_cfg) -> dict:
    """Canonical megallava tensors -> HF LlavaForConditionalGeneration state_dict (transformers 5.x names), without
    the ViT layers / post_layernorm megallava does not build."""
    plan = _plan(model_cfg)
    expected = {can for _, can, _, _ in plan}
    missing, extra = sorted(expected - set(canonical)), sorted(set(canonical) - expected)
    if missing:
        raise KeyError(f"canonical state lacks {', '.join(missing)}")
    if extra:
        raise ValueError(f"unexpected canonical tensors (not in this model config): {', '.join(extra)}")
    out = {}
    for hf_names, can, kind, geo in plan:
        t = canonical[can]
        ts = [t] if kind == "copy" else _split_qkv(t, geo, can) if kind == "qkv" else [c.clone() for c in t.chunk(2)]
        out.update(zip(map(_long, hf_names), ts))
    return out
