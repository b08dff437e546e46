"""Name and fused-layout conversion between the canonical megallava layout (model/layout.py) and HF transformers'
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
``post_layernorm`` are not part of the plan (hf_to_megatron keeps them in ``hf_extra/`` and megatron_to_hf writes
them back from there).

Per-tensor API (the streaming converters in convert/ use it): ``plan`` lists every (HF short names, canonical name,
kind) of a model, ``hf_shapes`` the shapes a config implies, ``fuse`` / ``split`` convert one entry.
``hf_to_canonical`` / ``canonical_to_hf`` are the whole-dict versions.
"""
import re

import torch

from megallava.convert.geometry import vision_num_layers_built

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


def plan(model_cfg):
    """Every (hf short names, canonical name, kind, qkv geometry) of this model, in canonical order of sections.
    HF names are short ("lm.", "head.", "vit.", "proj." sections; ``long_name`` spells them out). kind is "copy",
    "qkv" (3 HF tensors fused per query group) or "fc1" ([gate; up]). A ``linear`` projector has linear_1 only
    (it exists in original-LLaVA checkpoints, not in HF's LlavaForConditionalGeneration)."""
    if model_cfg.projector not in ("linear", "mlp2x_gelu"):
        raise ValueError(f"unknown projector {model_cfg.projector!r}: use linear or mlp2x_gelu")
    v = model_cfg.vision
    llm_geo = (model_cfg.num_attention_heads, model_cfg.num_query_groups or model_cfg.num_attention_heads,
               model_cfg.hidden_size // model_cfg.num_attention_heads)
    vit_geo = (v.num_attention_heads, v.num_attention_heads, v.hidden_size // v.num_attention_heads)
    entries = []

    def add(table, geo, **fmt):
        for hf, can, kind in table:
            if model_cfg.projector == "linear" and can.startswith("projector.linear_2."):
                continue
            for w in (("weight", "bias") if "{w}" in can else (None,)):
                f = dict(fmt, w=w)
                entries.append((tuple(h.format(**f) for h in hf), can.format(**f), kind, geo))

    add(_GLOBAL, None)
    for i in range(vision_num_layers_built(v)):
        add(_VIT_LAYER, vit_geo, i=i)
    for i in range(model_cfg.num_layers):
        add(_LLM_LAYER, llm_geo, i=i)
    return entries


def _plan(model_cfg):
    if model_cfg.projector != "mlp2x_gelu":
        raise ValueError(f"model.projector={model_cfg.projector!r} has no HF LLaVA equivalent: HF's "
                         f"multi_modal_projector is always Linear-GELU-Linear (mlp2x_gelu)")
    return plan(model_cfg)


def hf_shapes(model_cfg) -> dict:
    """Short HF name -> the shape the config implies, for every tensor ``plan`` reads."""
    m, v = model_cfg, model_cfg.vision
    h, heads = m.hidden_size, m.num_attention_heads
    d = h // heads
    groups = m.num_query_groups or heads
    vh, vf = v.hidden_size, v.ffn_hidden_size
    patches = (v.image_size // v.patch_size) ** 2
    shapes = {"lm.embed_tokens.weight": (m.vocab_size, h), "lm.norm.weight": (h,), "head.weight": (m.vocab_size, h),
              "vit.embeddings.patch_embedding.weight": (vh, v.num_channels, v.patch_size, v.patch_size),
              "vit.embeddings.class_embedding": (vh,), "vit.embeddings.position_embedding.weight": (patches + 1, vh),
              "vit.pre_layrnorm.weight": (vh,), "vit.pre_layrnorm.bias": (vh,),
              "proj.linear_1.weight": (h, vh), "proj.linear_1.bias": (h,),
              "proj.linear_2.weight": (h, h), "proj.linear_2.bias": (h,)}
    layer = {"input_layernorm.weight": (h,), "self_attn.q_proj.weight": (heads * d, h),
             "self_attn.k_proj.weight": (groups * d, h), "self_attn.v_proj.weight": (groups * d, h),
             "self_attn.o_proj.weight": (h, heads * d), "post_attention_layernorm.weight": (h,),
             "mlp.gate_proj.weight": (m.ffn_hidden_size, h), "mlp.up_proj.weight": (m.ffn_hidden_size, h),
             "mlp.down_proj.weight": (h, m.ffn_hidden_size)}
    vit_layer = {"layer_norm1": (vh,), "layer_norm2": (vh,), "mlp.fc1.bias": (vf,), "mlp.fc1.weight": (vf, vh),
                 "mlp.fc2.weight": (vh, vf), "mlp.fc2.bias": (vh,)}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        vit_layer[f"self_attn.{proj}.weight"], vit_layer[f"self_attn.{proj}.bias"] = (vh, vh), (vh,)
    for i in range(m.num_layers):
        shapes.update({f"lm.layers.{i}.{k}": s for k, s in layer.items()})
    for i in range(vision_num_layers_built(v)):
        for k, s in vit_layer.items():
            if k.startswith("layer_norm"):
                shapes[f"vit.encoder.layers.{i}.{k}.weight"] = shapes[f"vit.encoder.layers.{i}.{k}.bias"] = s
            else:
                shapes[f"vit.encoder.layers.{i}.{k}"] = s
    return shapes


def fused_shape(kind: str, shapes) -> tuple:
    """Canonical shape of the tensor fused from HF tensors of ``shapes``."""
    if kind == "copy":
        return tuple(shapes[0])
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def fuse(kind: str, tensors, geo, name: str) -> torch.Tensor:
    """HF tensors of one plan entry -> the canonical tensor."""
    if kind == "copy":
        return tensors[0]
    return _fuse_qkv(*tensors, geo, name) if kind == "qkv" else torch.cat(tensors)


def split(kind: str, tensor, geo, name: str) -> list:
    """Inverse of ``fuse``: the canonical tensor -> HF tensors (no shared storage)."""
    if kind == "copy":
        return [tensor]
    return _split_qkv(tensor, geo, name) if kind == "qkv" else [c.clone() for c in tensor.chunk(2)]


def short_name(hf_name: str) -> str:
    for prefix, tag in _HF_PREFIXES:
        if hf_name.startswith(prefix):
            return tag + hf_name[len(prefix):]
    raise KeyError(f"unexpected HF tensor {hf_name!r}: not under a LLaVA prefix "
                   f"({', '.join(p for p, _ in _HF_PREFIXES)})")


def long_name(short: str) -> str:
    """Short name -> the transformers 5.x in-memory HF name."""
    tag, rest = short.split(".", 1)
    return _HF_OUT[tag + "."] + rest


def is_ignored(short: str, vit_layers_built: int) -> bool:
    """HF tensors megallava has no use for (the unbuilt ViT tail, buffers)."""
    m = re.match(r"vit\.encoder\.layers\.(\d+)\.", short)
    return bool(_IGNORED.match(short)) or (m is not None and int(m.group(1)) >= vit_layers_built)


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
        s = short_name(name)
        if s in short:
            raise ValueError(f"HF tensor {name!r} appears twice under different prefixes")
        short[s] = (name, t)
    built = vision_num_layers_built(model_cfg.vision)
    out = {}
    for hf_names, can, kind, geo in _plan(model_cfg):
        missing = [h for h in hf_names if h not in short]
        if missing:
            raise KeyError(f"HF state_dict lacks {', '.join(map(long_name, missing))} (needed for {can})")
        out[can] = fuse(kind, [short.pop(h)[1] for h in hf_names], geo, can)
    extra = [name for s, (name, _) in short.items() if not is_ignored(s, built)]
    if extra:
        raise ValueError(f"unexpected HF tensors (not in this model config): {', '.join(sorted(extra))}")
    return out


def canonical_to_hf(canonical: dict, model_cfg) -> dict:
    """Canonical megallava tensors -> HF LlavaForConditionalGeneration state_dict (transformers 5.x names), without
    the ViT layers / post_layernorm megallava does not build."""
    entries = _plan(model_cfg)
    expected = {can for _, can, _, _ in entries}
    missing, extra = sorted(expected - set(canonical)), sorted(set(canonical) - expected)
    if missing:
        raise KeyError(f"canonical state lacks {', '.join(missing)}")
    if extra:
        raise ValueError(f"unexpected canonical tensors (not in this model config): {', '.join(extra)}")
    out = {}
    for hf_names, can, kind, geo in entries:
        out.update(zip(map(long_name, hf_names), split(kind, canonical[can], geo, can)))
    return out
