"""A megallava checkpoint (converted, or saved by the trainer at any TP/PP/VPP/DP) -> HF, streamed one (tensor,
layer) chunk at a time into safetensors shards.

Two output formats:
- ``llava-hf``: a transformers ``LlavaForConditionalGeneration`` directory (the llava-hf hub file layout:
  ``language_model.model.*``, ``language_model.lm_head.*``, ``vision_tower.vision_model.*``, ``multi_modal_projector.*``).
  Needs the ``mlp2x_gelu`` projector (HF's projector is always Linear-GELU-Linear) and an image token id inside the
  vocab (HF embeds input_ids before replacing the image rows).
- ``llava``: the original-LLaVA layout (LLaMA weights + ``model.mm_projector.*``, config.json with the ``mm_*`` keys,
  ``model_type: llava_llama``) with the vision tower as a CLIPVisionModel directory in ``OUT/vision_tower/`` (config key
  ``mm_vision_tower: vision_tower``, relative to OUT). Used for a ``linear`` projector or an out-of-vocab image token
  (LLaVA's -200).

megallava builds the ViT only up to ``select_layer``; its checkpoints do not hold the layers above nor CLIP's
``post_layernorm``. The export therefore describes the truncated tower: ``num_hidden_layers`` = built layers and
features read from its last layer (``vision_feature_layer: -1`` / ``mm_vision_select_layer: -1``), which is exactly
the configured layer of the full tower. ``post_layernorm`` (unused by LLaVA: features are taken before it) is
written as the identity (weight 1, bias 0) so HF loads the model without missing-key warnings.
"""
import json
import os
import shutil
import time

import torch

from megallava.convert import dcp, hf_config, hf_names
from megallava.convert.errors import ConversionError, atomic_output, check_output
from megallava.convert.hf_to_megatron import DTYPES, SOURCE_CONFIG, TOKENIZER_DIR
from megallava.convert.tensor_files import parse_size, write_safetensors
from megallava.convert.geometry import padded_vocab_size, vision_num_layers_built

FORMATS = ("auto", "llava-hf", "llava")
VISION_SUBDIR = "vision_tower"
_LLAVA_HF_DISK = {"lm.": "language_model.model.", "head.": "language_model.lm_head.",
                  "vit.": "vision_tower.vision_model.", "proj.": "multi_modal_projector."}


def _llava_hf_name(short: str) -> str:
    tag, rest = short.split(".", 1)
    return _LLAVA_HF_DISK[tag + "."] + rest


def _llava_name(short: str, projector: str) -> str:
    tag, rest = short.split(".", 1)
    if tag == "lm":
        return "model." + rest
    if tag == "head":
        return "lm_head." + rest
    if tag == "vit":
        return "vision_model." + rest  # in the vision_tower/ directory (CLIPVisionModel)
    layer, w = rest.split(".")  # proj: linear_1.weight
    if projector == "linear":
        return f"model.mm_projector.{w}"
    return f"model.mm_projector.{0 if layer == 'linear_1' else 2}.{w}"


def choose_format(model, fmt: str) -> tuple:
    in_vocab = 0 <= model.image_token_id < model.vocab_size
    if fmt == "auto":
        if model.projector != "mlp2x_gelu":
            return "llava", (f"projector {model.projector!r}: HF LlavaForConditionalGeneration cannot hold it "
                             f"(its projector is always Linear-GELU-Linear); writing the original-LLaVA layout")
        if not in_vocab:
            return "llava", (f"image_token_id {model.image_token_id} is not a vocab id (original-LLaVA convention); "
                             f"writing the original-LLaVA layout")
        return "llava-hf", None
    if fmt == "llava-hf":
        problems = []
        if model.projector != "mlp2x_gelu":
            problems.append(f"--format llava-hf needs the mlp2x_gelu projector, the checkpoint has "
                            f"{model.projector!r}: use --format llava")
        if not in_vocab:
            problems.append(f"--format llava-hf needs an image token id inside the vocab (0..{model.vocab_size - 1}), "
                            f"the model has {model.image_token_id}: use --format llava")
        if problems:
            raise ConversionError(problems)
    elif fmt not in FORMATS:
        raise ConversionError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    return fmt, None


def find_model_config(root: str, config: str = None):
    if config:
        return hf_config.read_model_config(config), config
    path = os.path.join(root, hf_config.MODEL_YAML)
    if os.path.isfile(path):
        return hf_config.read_model_config(path), path
    raise ConversionError(f"{root} has no {hf_config.MODEL_YAML}: pass --config FILE (the {hf_config.MODEL_YAML} "
                          f"written by hf-to-megatron, or a training run's config.yaml) so the model shape is known")


def check_checkpoint(reader: dcp.CheckpointReader, model, where: str) -> None:
    """Every tensor the config implies is in the checkpoint with the implied global shape."""
    padded = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, 1)
    stacked = {"decoder": model.num_layers, "vision.encoder": vision_num_layers_built(model.vision)}
    shapes = hf_names.hf_shapes(model)
    expected = {}
    for hf, can, kind, _ in hf_names.plan(model):
        shape = hf_names.fused_shape(kind, [shapes[s] for s in hf])
        key, layer = dcp.dcp_key(can)
        if layer is not None:
            shape = (stacked[key.split(".layers.")[0]],) + shape
        elif can in ("embedding.weight", "output_layer.weight"):
            shape = (padded,) + shape[1:]
        expected[key] = shape
    problems = []
    for key, shape in expected.items():
        md = reader.tensor_meta(key)
        if md is None:
            problems.append(f"{reader.dir}: no tensor {key!r}, which the model config ({where}) needs")
        elif tuple(md.size) != tuple(shape):
            problems.append(f"{reader.dir}: tensor {key!r} has shape {list(md.size)}, the model config ({where}) "
                            f"implies {list(shape)}")
    if problems:
        raise ConversionError(problems + [f"(is {where} the config this checkpoint was trained with?)"])


class _Canonical:
    """Reads canonical tensors from the checkpoint, keeping only the last one (q, k, v share one read)."""

    def __init__(self, reader, model, dtype):
        self.reader, self.model, self.dtype = reader, model, dtype
        self.key, self.value = None, None

    def get(self, can: str) -> torch.Tensor:
        if can != self.key:
            self.value = None
            key, layer = dcp.dcp_key(can)
            t = self.reader.read(key, layer)
            if can in ("embedding.weight", "output_layer.weight"):
                t = t[:self.model.vocab_size]
            self.key, self.value = can, t.to(self.dtype) if self.dtype else t
        return self.value


def _entries(reader, model, dtype, name_of):
    """(hf name, shape, dtype, produce) for every HF tensor, in plan order."""
    shapes = hf_names.hf_shapes(model)
    canonical = _Canonical(reader, model, dtype)
    out = []
    for hf, can, kind, geo in hf_names.plan(model):
        key, _ = dcp.dcp_key(can)
        src_dtype = dtype or reader.tensor_meta(key).properties.dtype
        for i, s in enumerate(hf):
            def produce(can=can, kind=kind, geo=geo, i=i):
                return hf_names.split(kind, canonical.get(can), geo, can)[i].contiguous()
            out.append((name_of(s), shapes[s], src_dtype, produce, s))
    return out


def _post_layernorm(model, dtype, name_of):
    vh = model.vision.hidden_size
    return [(name_of("vit.post_layernorm.weight"), (vh,), dtype, lambda: torch.ones(vh, dtype=dtype),
             "vit.post_layernorm.weight"),
            (name_of("vit.post_layernorm.bias"), (vh,), dtype, lambda: torch.zeros(vh, dtype=dtype),
             "vit.post_layernorm.bias")]


def _copy_tokenizer(src_dir: str, dest: str, log) -> list:
    if not src_dir or not os.path.isdir(src_dir):
        return []
    names = sorted(n for n in os.listdir(src_dir) if os.path.isfile(os.path.join(src_dir, n)))
    for n in names:
        shutil.copy2(os.path.join(src_dir, n), os.path.join(dest, n))
    return names


def megatron_to_hf(input: str, output: str, config: str = None, tokenizer: str = None, dtype: str = None,
                   max_shard_size: str = "2GB", fmt: str = "auto", overwrite: bool = False, log=print) -> dict:
    t0 = time.perf_counter()
    check_output(output, overwrite)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    reader = dcp.CheckpointReader(input)
    model, where = find_model_config(reader.root, config)
    hf_config.check_model(model, where)
    check_checkpoint(reader, model, where)
    fmt, why = choose_format(model, fmt)
    if why:
        log(f"note: {why}")
    out_dtype = DTYPES.get(dtype)
    # The converted root's extras (the HF source config, tokenizer) sit next to the checkpoint or next to --config
    # (a trainer checkpoint saved elsewhere from a converted one).
    homes = [reader.root] + ([os.path.dirname(os.path.abspath(config))] if config else [])
    source_cfg = {}
    src_path = next((p for p in (os.path.join(h, SOURCE_CONFIG) for h in homes) if os.path.isfile(p)), None)
    if src_path:
        with open(src_path) as f:
            source_cfg = json.load(f)
    text_src = source_cfg.get("config", {})
    vision_src = source_cfg.get("vision_config")
    if source_cfg.get("flavour") == "llava-hf":
        text_src, vision_src = text_src.get("text_config", {}), text_src.get("vision_config", {})
    weight_dtype = out_dtype or reader.tensor_meta("embedding.weight").properties.dtype
    log(f"input: megallava checkpoint {reader.dir} (iteration {reader.common.get('iteration', '?')}), model config "
        f"{where}; output format {fmt}")
    if tokenizer is None:
        tokenizer = next((p for p in (os.path.join(h, TOKENIZER_DIR) for h in homes) if os.path.isdir(p)),
                         os.path.join(reader.root, TOKENIZER_DIR))
    with atomic_output(output, overwrite) as tmp:
        text_cfg = hf_config.hf_text_config(model, text_src)
        vision_cfg = hf_config.hf_vision_config(model, vision_src)
        if fmt == "llava-hf":
            from transformers import LlavaConfig

            entries = _entries(reader, model, out_dtype, _llava_hf_name) + _post_layernorm(model, weight_dtype,
                                                                                            _llava_hf_name)
            write_safetensors(tmp, [e[:4] for e in entries], max_bytes, log)
            patches = (model.vision.image_size // model.vision.patch_size) ** 2
            cfg = LlavaConfig(text_config=text_cfg, vision_config=vision_cfg, image_token_index=model.image_token_id,
                              vision_feature_layer=-1, vision_feature_select_strategy="default",
                              projector_hidden_act="gelu", image_seq_length=patches, multimodal_projector_bias=True,
                              tie_word_embeddings=False)
            cfg.architectures = ["LlavaForConditionalGeneration"]
            cfg.dtype = weight_dtype
            cfg.save_pretrained(tmp)
        else:
            entries = _entries(reader, model, out_dtype, lambda s: _llava_name(s, model.projector))
            llm = [e for e in entries if not e[4].startswith("vit.")]
            vit = [e for e in entries if e[4].startswith("vit.")] + _post_layernorm(
                model, weight_dtype, lambda s: _llava_name(s, model.projector))
            write_safetensors(tmp, [e[:4] for e in llm], max_bytes, log)
            vdir = os.path.join(tmp, VISION_SUBDIR)
            os.makedirs(vdir)
            write_safetensors(vdir, [e[:4] for e in vit], max_bytes, log)
            vision_cfg.architectures = ["CLIPVisionModel"]
            vision_cfg.dtype = weight_dtype
            vision_cfg.save_pretrained(vdir)
            text_cfg.dtype = weight_dtype
            d = text_cfg.to_dict()
            d.update({"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
                      "mm_vision_tower": VISION_SUBDIR, "mm_projector_type": model.projector,
                      "mm_hidden_size": model.vision.hidden_size, "mm_vision_select_layer": -1,
                      "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
                      "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat", "image_aspect_ratio": "pad"})
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(d, f, indent=2, sort_keys=True)
        copied = _copy_tokenizer(tokenizer, tmp, log)
    if not copied:
        log(f"warning: no tokenizer files in {tokenizer}: pass --tokenizer DIR to include them")
    seconds = time.perf_counter() - t0
    log(f"wrote {fmt} checkpoint {output} in {seconds:.1f} s")
    return {"output": output, "format": fmt, "seconds": seconds, "model": model}
