"""HF configs (LlamaConfig, CLIPVisionConfig, LlavaConfig, original-LLaVA config.json) <-> megallava's ModelConfig,
and the ``megallava_model.yaml`` written next to a converted checkpoint."""
import dataclasses
import os

import yaml

from megallava import config as C
from megallava.convert.errors import ConversionError
from megallava.convert.geometry import vision_num_layers_built

MODEL_YAML = "megallava_model.yaml"
# ModelConfig keys that describe the architecture (the rest - init_std, train_* - are training choices).
_ARCH_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "vocab_size",
              "make_vocab_size_divisible_by", "rms_norm_eps", "rope_theta", "image_token_id", "projector", "vision")
LLAVA_IMAGE_TOKEN_INDEX = -200  # original LLaVA's IMAGE_TOKEN_INDEX (not a vocab id)


def rope_theta_of(text) -> float:
    params = getattr(text, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(text, "rope_theta", None) or 10000.0))


def text_problems(text, where: str) -> list:
    """What megallava's LLaMA cannot represent in a HF LlamaConfig."""
    p = []
    act = getattr(text, "hidden_act", "silu")
    if act != "silu":
        p.append(f"{where}: hidden_act={act!r}; megallava's LLaMA uses SwiGLU (silu)")
    for key in ("attention_bias", "mlp_bias"):
        if getattr(text, key, False):
            p.append(f"{where}: {key}=true; megallava's LLaMA has no biases")
    heads, hidden = text.num_attention_heads, text.hidden_size
    head_dim = getattr(text, "head_dim", None)
    if heads and hidden % heads:
        p.append(f"{where}: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    elif head_dim is not None and head_dim != hidden // heads:
        p.append(f"{where}: head_dim={head_dim} differs from hidden_size / num_attention_heads = {hidden // heads}; "
                 f"megallava needs head_dim = hidden_size / heads")
    kv = getattr(text, "num_key_value_heads", None) or heads
    if heads % kv:
        p.append(f"{where}: num_key_value_heads={kv} does not divide num_attention_heads={heads}")
    params = getattr(text, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        p.append(f"{where}: rope_type={rope_type!r} (RoPE scaling) is not supported; megallava implements plain RoPE")
    return p


def vision_problems(vision, where: str) -> list:
    p = []
    if getattr(vision, "model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
        p.append(f"{where}: vision model_type={vision.model_type!r}; megallava's vision tower is CLIP")
    if getattr(vision, "hidden_act", "quick_gelu") != "quick_gelu":
        p.append(f"{where}: vision hidden_act={vision.hidden_act!r}; megallava's CLIP uses quick_gelu")
    if vision.hidden_size % vision.num_attention_heads:
        p.append(f"{where}: vision hidden_size={vision.hidden_size} is not divisible by num_attention_heads="
                 f"{vision.num_attention_heads}")
    return p


def select_layer_from_hf(feature_layer, num_layers: int, where: str) -> int:
    """HF hidden_states index (negative, or k = after k layers) -> megallava select_layer (negative)."""
    if not isinstance(feature_layer, int) or isinstance(feature_layer, bool):
        raise ConversionError(f"{where}: vision feature layer {feature_layer!r} (several layers) is not supported: "
                              f"megallava takes one layer")
    if feature_layer < 0:
        select = feature_layer
    else:
        select = feature_layer - (num_layers + 1)
    if not -num_layers <= select <= -1:
        raise ConversionError(f"{where}: vision feature layer {feature_layer} is outside the ViT's {num_layers} "
                              f"layers (megallava needs one of the layer outputs, not the patch embeddings)")
    return select


def model_from_hf(text, vision, *, projector: str, feature_layer, image_token_id: int, where: str,
                  vision_where: str = None) -> C.ModelConfig:
    problems = text_problems(text, where) + vision_problems(vision, vision_where or where)
    if problems:
        raise ConversionError(problems)
    select = select_layer_from_hf(feature_layer, vision.num_hidden_layers, vision_where or where)
    model = C.ModelConfig(
        num_layers=text.num_hidden_layers, hidden_size=text.hidden_size, ffn_hidden_size=text.intermediate_size,
        num_attention_heads=text.num_attention_heads,
        num_query_groups=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        vocab_size=text.vocab_size, rms_norm_eps=float(text.rms_norm_eps), rope_theta=rope_theta_of(text),
        image_token_id=int(image_token_id), projector=projector,
        vision=C.VisionConfig(image_size=vision.image_size, patch_size=vision.patch_size,
                              num_layers=vision.num_hidden_layers, hidden_size=vision.hidden_size,
                              ffn_hidden_size=vision.intermediate_size,
                              num_attention_heads=vision.num_attention_heads,
                              layer_norm_eps=float(vision.layer_norm_eps), select_layer=select,
                              num_channels=getattr(vision, "num_channels", 3)))
    check_model(model, where)
    return model


def check_model(model: C.ModelConfig, where: str, tp: int = 1, pp: int = 1) -> None:
    """megallava's own validation of the model section (and of tp / pp when given)."""
    cfg = C.Config(model=model)
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    cfg.data.max_images_per_sample = 0  # the sequence length is a training choice, not the checkpoint's
    try:
        C.validate(cfg, tp * pp)
    except C.ConfigError as err:
        raise ConversionError([f"{where}: {p}" for p in err.problems]) from None


def model_dict(model: C.ModelConfig) -> dict:
    d = dataclasses.asdict(model)
    return {k: d[k] for k in _ARCH_KEYS}


def write_model_yaml(path: str, model: C.ModelConfig, note: str) -> None:
    with open(path, "w") as f:
        f.write(f"# megallava model section, written by tools/convert_checkpoint.py ({note}).\n"
                f"# Use it as --config or copy it into your training config; training keys go in the other sections.\n")
        yaml.safe_dump({"model": model_dict(model)}, f, sort_keys=False)


def read_model_config(path: str) -> C.ModelConfig:
    """The model section of any megallava config file (megallava_model.yaml, a run's config.yaml, a recipe)."""
    if not os.path.isfile(path):
        raise ConversionError(f"model config {path} not found")
    try:
        return C.load_config(path).model
    except C.ConfigError as err:
        raise ConversionError([f"{path}: {p}" for p in err.problems]) from None


# ---------------------------------------------------------------------------------------------------------------
# megallava -> HF configs
# ---------------------------------------------------------------------------------------------------------------

def hf_text_config(model: C.ModelConfig, source: dict = None):
    """LlamaConfig of the LLM; ``source`` (the original HF text config, when known) supplies what megallava does
    not model: token ids, max_position_embeddings, initializer_range."""
    from transformers import LlamaConfig

    keep = {k: source[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings",
                                   "initializer_range") if source and k in source}
    return LlamaConfig(
        vocab_size=model.vocab_size, hidden_size=model.hidden_size, intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups or model.num_attention_heads, hidden_act="silu",
        rms_norm_eps=model.rms_norm_eps, rope_theta=model.rope_theta, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, **keep)


def hf_vision_config(model: C.ModelConfig, source: dict = None, full: bool = False):
    """CLIPVisionConfig of the layers megallava builds (the unbuilt top layers are not in a megallava checkpoint:
    read features from its last layer, which is the configured select_layer of the full tower), or of the full
    tower (``full``: when the unbuilt layers come back from the conversion's hf_extra/)."""
    from transformers import CLIPVisionConfig

    v = model.vision
    keep = {k: source[k] for k in ("projection_dim", "initializer_range", "initializer_factor")
            if source and k in source}
    return CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size,
        num_hidden_layers=v.num_layers if full else vision_num_layers_built(v),
        num_attention_heads=v.num_attention_heads, num_channels=v.num_channels, image_size=v.image_size,
        patch_size=v.patch_size, hidden_act="quick_gelu", layer_norm_eps=v.layer_norm_eps, **keep)
