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
``post_layernorm``. When the checkpoint descends from an hf-to-megatron conversion (its ``hf_extra/`` is found:
``--source``, the checkpoint's ``hf_source``, the checkpoint root, next to ``--config``, or the run config's
``checkpoint.load`` / ``checkpoint.pretrained``), those tensors and the input's config come back: a round trip
returns every tensor and config field it was given. Otherwise the export describes the truncated tower:
``num_hidden_layers`` = built layers and features read from its last layer (``vision_feature_layer: -1`` /
``mm_vision_select_layer: -1``), which is exactly the configured layer of the full tower, and ``post_layernorm``
(unused by LLaVA: features are taken before it) is written as the identity (weight 1, bias 0) so HF loads the model
without missing-key warnings.

Besides the weights the output holds what makes it usable alone (convert/hf_export.py): the tokenizer the model was
trained with (``--tokenizer``, else the checkpoint's ``iter_N/tokenizer/``, else the converted root's
``tokenizer/``), the trainer's chat template (``--template``, else the run config's ``data.sources[*].template``,
else vicuna_v1), the image processor (``--image-mode``, else the run config's ``data.image_mode``, else pad) and the
LlavaProcessor settings. The unmodified conversion of a model (iteration 0, weights only) gets the input's own
tokenizer / processor files back instead, unless --template or --tokenizer is given.
"""
import json
import os
import shutil
import time

import torch
import yaml

from megallava import config as C
from megallava.convert import dcp, hf_config, hf_export, hf_names
from megallava.convert.errors import ConversionError, atomic_output, check_output
from megallava.convert.lora_export import LoRAReader, write_peft_adapter
from megallava.convert.hf_to_megatron import DTYPES, EXTRA_JSON, HF_EXTRA, SOURCE_CONFIG, TOKENIZER_DIR
from megallava.convert.tensor_files import TensorFiles, parse_size, write_safetensors
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


def find_model_config(root: str, config: str = None, iter_dir: str = None):
    """The model section: --config, else ROOT/megallava_model.yaml (a conversion), else the model definition the
    trainer records in every checkpoint (<iter_dir>/fingerprint.json)."""
    if config:
        return hf_config.read_model_config(config), config
    path = os.path.join(root, hf_config.MODEL_YAML)
    if os.path.isfile(path):
        return hf_config.read_model_config(path), path
    fp = os.path.join(iter_dir, "fingerprint.json") if iter_dir else None
    if fp and os.path.isfile(fp):
        try:
            with open(fp) as f:
                saved = json.load(f)
            model = C.ModelConfig(**saved["model"], vision=C.VisionConfig(**saved["vision"]))
        except (ValueError, KeyError, TypeError) as err:
            raise ConversionError(f"{fp}: cannot read the model definition ({err}): pass --config FILE") from None
        return model, fp
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

    def __init__(self, reader, model, dtype, lora=None):
        """``lora``: a LoRAReader whose adapters are merged into the base weights (``--merge-lora``), or None."""
        self.reader, self.model, self.dtype, self.lora = reader, model, dtype, lora
        self.key, self.value = None, None

    def get(self, can: str) -> torch.Tensor:
        if can != self.key:
            self.value = None
            key, layer = dcp.dcp_key(can)
            t = self.reader.read(key, layer)
            if can in ("embedding.weight", "output_layer.weight"):
                t = t[:self.model.vocab_size]
            if self.lora:
                t = self.lora.merged(can, t, self.dtype)
            self.key, self.value = can, t.to(self.dtype) if self.dtype else t
        return self.value


def _entries(reader, model, dtype, name_of, lora=None):
    """(hf name, shape, dtype, produce) for every HF tensor, in plan order (LoRA merged in when ``lora``)."""
    shapes = hf_names.hf_shapes(model)
    canonical = _Canonical(reader, model, dtype, lora)
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


# ---------------------------------------------------------------------------------------------------------------
# Where things come from: the run config, the conversion the checkpoint descends from, the tokenizer
# ---------------------------------------------------------------------------------------------------------------

RUN_CONFIG = "config.yaml"
_PROCESSOR_FILES = ("chat_template.jinja", "chat_template.json", "processor_config.json", "preprocessor_config.json")


def _raw_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def run_configs(reader, config: str = None) -> list:
    """(path, raw YAML) of the megallava configs that describe this checkpoint's run: --config, and a config.yaml
    stored in the iteration directory or the checkpoint root."""
    paths = [config] if config else []
    paths += [os.path.join(d, RUN_CONFIG) for d in (reader.dir, reader.root)]
    seen, out = set(), []
    for p in paths:
        if p and os.path.isfile(p) and os.path.abspath(p) not in seen:
            seen.add(os.path.abspath(p))
            out.append((p, _raw_yaml(p)))
    return out


def resolve_template(template: str, runs: list) -> tuple:
    """(template, where it came from): --template, else the one template of the run's data.sources, else
    vicuna_v1."""
    if template:
        hf_export.chat_template(template)  # validates the name
        return template, "--template"
    for path, raw in runs:
        data = raw.get("data") or {}
        sources = data.get("sources") or []
        if data.get("source", "shards" if sources else None) != "shards" or not sources:
            continue
        names = sorted({(s or {}).get("template", "vicuna_v1") for s in sources})
        if len(names) > 1:
            raise ConversionError(f"{path}: data.sources use several templates ({', '.join(names)}): pass --template "
                                  f"with the one the exported model should be prompted with")
        return names[0], f"{path} data.sources"
    return "vicuna_v1", "default (pass --template if the model was trained with another)"


def resolve_image_mode(image_mode: str, runs: list) -> tuple:
    if image_mode:
        if image_mode not in hf_export.IMAGE_MODES:
            raise ConversionError(f"--image-mode {image_mode!r}: use one of {', '.join(hf_export.IMAGE_MODES)}")
        return image_mode, "--image-mode"
    for path, raw in runs:
        data = raw.get("data") or {}
        if data.get("image_mode"):
            return data["image_mode"], f"{path} data.image_mode"
    return "pad", "default"


def _ckpt_root(path: str) -> str:
    path = os.path.abspath(path)
    return os.path.dirname(path) if dcp._ITER_DIR.match(os.path.basename(path)) else path


class SourceHome:
    """An hf-to-megatron output root the checkpoint descends from: its source_config.json, tokenizer/ and
    hf_extra/ (the tensors megallava does not build and the input's config)."""

    def __init__(self, root: str, model, where: str, explicit: bool, log):
        self.root, self.where = root, where
        self.config = {}
        path = os.path.join(root, SOURCE_CONFIG)
        if os.path.isfile(path):
            with open(path) as f:
                self.config = json.load(f)
        self.extra, self.extra_files, self.original = None, None, {}
        extra_dir = os.path.join(root, HF_EXTRA)
        if os.path.isfile(os.path.join(extra_dir, EXTRA_JSON)):
            with open(os.path.join(extra_dir, EXTRA_JSON)) as f:
                extra = json.load(f)
            if extra.get("model") != hf_config.model_dict(model):
                msg = (f"{extra_dir} belongs to another model ({extra.get('model')}) than the checkpoint's "
                       f"({hf_config.model_dict(model)})")
                if explicit:
                    raise ConversionError(f"--source {root}: {msg}")
                log(f"note: {msg}: not used")
            else:
                self.extra = extra
                self.extra_files = TensorFiles.from_dir(extra_dir) if extra["tensors"] else None
                for name in ("config", "vision_config"):
                    p = os.path.join(extra_dir, name + ".json")
                    if os.path.isfile(p):
                        with open(p) as f:
                            self.original[name] = json.load(f)

    @property
    def flavour(self):
        return (self.extra or self.config).get("flavour")


def find_source(reader, model, config: str, source: str, runs: list, log) -> "SourceHome | None":
    candidates = []
    if source:
        if not (os.path.isfile(os.path.join(source, SOURCE_CONFIG)) or os.path.isdir(os.path.join(source, HF_EXTRA))):
            raise ConversionError(f"--source {source}: not an hf-to-megatron output (no {SOURCE_CONFIG} / {HF_EXTRA}/)")
        candidates.append((source, "--source", True))
    if reader.common.get("hf_source"):
        candidates.append((reader.common["hf_source"], f"{reader.dir} common state hf_source", False))
    candidates.append((reader.root, "the checkpoint root", False))
    if config:
        candidates.append((os.path.dirname(os.path.abspath(config)), "next to --config", False))
    for path, raw in runs:
        for key in ("load", "pretrained"):  # the run's start weights (load=auto resumed its own checkpoints)
            start = (raw.get("checkpoint") or {}).get(key)
            if start and start != "auto":
                candidates.append((_ckpt_root(start), f"{path} checkpoint.{key}", False))
    for root, where, explicit in candidates:
        if os.path.isfile(os.path.join(root, SOURCE_CONFIG)) or os.path.isdir(os.path.join(root, HF_EXTRA)):
            return SourceHome(os.path.abspath(root), model, where, explicit, log)
    return None


def resolve_tokenizer(tokenizer: str, reader, home, runs=()) -> tuple:
    """(data.tokenizer-like path, where): --tokenizer, else the checkpoint's own copy (the trainer saves
    <iter_dir>/tokenizer/), else the run config's data.tokenizer, else the converted root's tokenizer/."""
    if tokenizer:
        return hf_export.tokenizer_path(tokenizer), "--tokenizer"
    own = os.path.join(reader.dir, TOKENIZER_DIR)
    if os.path.isdir(own) and os.listdir(own):
        path = hf_export.tokenizer_path(own)
        _check_tokenizer_copy(reader.dir, path)
        return path, f"{own} (the trainer's copy of data.tokenizer)"
    for cfg_path, raw in runs:
        tok = (raw.get("data") or {}).get("tokenizer")
        if tok and os.path.exists(tok):
            return hf_export.tokenizer_path(tok), f"{cfg_path} data.tokenizer"
    tried = [own]
    if home is not None:
        theirs = os.path.join(home.root, TOKENIZER_DIR)
        tried.append(theirs)
        if os.path.isdir(theirs):
            try:
                return hf_export.tokenizer_path(theirs), f"{theirs} (the converted model's)"
            except ConversionError:
                pass
    raise ConversionError(
        f"no tokenizer for the export: the checkpoint has no {own} (trainer checkpoints carry a copy of "
        f"data.tokenizer there) and no usable tokenizer was found in {', '.join(tried[1:]) or 'a converted root'}. "
        f"Pass --tokenizer PATH (the run's data.tokenizer: a sentencepiece .model file or an HF tokenizer directory)")


def _check_tokenizer_copy(iter_dir: str, path: str) -> None:
    """The copy matches the sha256 the trainer recorded for data.tokenizer (fingerprint.json), if it did."""
    fp = os.path.join(iter_dir, "fingerprint.json")
    if not os.path.isfile(fp):
        return
    try:
        from megallava.training.fingerprint import tokenizer_sha256

        with open(fp) as f:
            want = (json.load(f).get("tokenizer") or {}).get("sha256")
    except (ImportError, ValueError, OSError):
        return
    if want and tokenizer_sha256(path) != want:
        raise ConversionError(f"{path}: its sha256 differs from the one the trainer recorded for data.tokenizer in "
                              f"{fp} (a damaged or replaced copy): pass --tokenizer with the run's data.tokenizer")


def _verbatim_files(reader, home, template, tokenizer) -> list:
    """The input's tokenizer / processor files, when the checkpoint is the unmodified conversion itself and none
    of --template / --tokenizer asks for megallava's."""
    if template or tokenizer or home is None or not reader.common.get("converted_from") or \
            not reader.common.get("weights_only") or os.path.abspath(home.root) != os.path.abspath(reader.root):
        return []
    d = os.path.join(home.root, TOKENIZER_DIR)
    if not os.path.isdir(d):
        return []
    names = sorted(n for n in os.listdir(d) if os.path.isfile(os.path.join(d, n)))
    try:
        hf_export.tokenizer_path(d)
    except ConversionError:
        return []
    return [os.path.join(d, n) for n in names]


# ---------------------------------------------------------------------------------------------------------------
# Tensors megallava does not build (hf_extra/)
# ---------------------------------------------------------------------------------------------------------------

def _extra_entries(home, dtype, name_of):
    if home is None or home.extra_files is None:
        return []
    files = home.extra_files
    out = []
    for s in home.extra["tensors"]:
        shape, dt = files.meta(s)
        dt = dtype if dtype is not None and dt.is_floating_point else dt

        def produce(s=s, dt=dt):
            return files.get(s).to(dt)
        out.append((name_of(s), tuple(shape), dt, produce, s))
    return out


def _with_extra(model, extra):
    """(extra entries to write, whether the tower is complete): the unbuilt ViT layers only go back with the whole
    tail, else the export describes the truncated tower (and post_layernorm is the identity)."""
    full = _full_tower(model, extra)
    if not full:
        extra = [e for e in extra if not e[4].startswith(("vit.encoder.layers.", "vit.post_layernorm."))]
    return extra, full


def _full_tower(model, extra_entries) -> bool:
    """The unbuilt ViT layers and post_layernorm all came back: the export holds the whole tower."""
    have = {e[4] for e in extra_entries}
    v = model.vision
    per_layer = [f"vit.encoder.layers.{{i}}.{n}.{w}" for n in ("layer_norm1", "layer_norm2", "self_attn.q_proj",
                 "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
                 for w in ("weight", "bias")]
    need = {n.format(i=i) for i in range(vision_num_layers_built(v), v.num_layers) for n in per_layer}
    need |= {"vit.post_layernorm.weight", "vit.post_layernorm.bias"}
    return need <= have


def _set_dtype(cfg: dict, dtype) -> dict:
    """An original config.json with its dtype keys set to the export's."""
    name = str(dtype).replace("torch.", "")
    for d in [cfg] + [cfg[k] for k in ("text_config", "vision_config") if isinstance(cfg.get(k), dict)]:
        for key in ("torch_dtype", "dtype"):
            if key in d:
                d[key] = name
    return cfg


def megatron_to_hf(input: str, output: str, config: str = None, tokenizer: str = None, dtype: str = None,
                   max_shard_size: str = "2GB", fmt: str = "auto", overwrite: bool = False, template: str = None,
                   image_mode: str = None, source: str = None, weights_only: bool = False, merge_lora: bool = False,
                   log=print) -> dict:
    t0 = time.perf_counter()
    check_output(output, overwrite)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    reader = dcp.CheckpointReader(input)
    model, where = find_model_config(reader.root, config, reader.dir)
    hf_config.check_model(model, where)
    check_checkpoint(reader, model, where)
    fmt, why = choose_format(model, fmt)
    if why:
        log(f"note: {why}")
    out_dtype = DTYPES.get(dtype)
    runs = run_configs(reader, config)
    lora = LoRAReader(reader, model, runs)
    if merge_lora and not lora:
        raise ConversionError(f"--merge-lora: {reader.dir} holds no LoRA adapters (lora_a / lora_b tensors)")
    if lora:
        log(f"LoRA: rank {lora.rank}, alpha {lora.alpha:g} on {', '.join(lora.linears)}: "
            + ("merged into the base weights" if merge_lora else "base written unmerged + PEFT adapter in adapter/"))
    merged = lora if merge_lora else None
    home = find_source(reader, model, config, source, runs, log)
    source_cfg = home.config if home is not None else {}
    text_src = source_cfg.get("config", {})
    vision_src = source_cfg.get("vision_config")
    if source_cfg.get("flavour") == "llava-hf":
        text_src, vision_src = text_src.get("text_config", {}), text_src.get("vision_config", {})
    verbatim = [] if weights_only else _verbatim_files(reader, home, template, tokenizer)
    if not verbatim and not weights_only:
        tok_path, tok_where = resolve_tokenizer(tokenizer, reader, home, runs)
        template, template_where = resolve_template(template, runs)
        image_mode, mode_where = resolve_image_mode(image_mode, runs)
    weight_dtype = out_dtype or reader.tensor_meta("embedding.weight").properties.dtype
    log(f"input: megallava checkpoint {reader.dir} (iteration {reader.common.get('iteration', '?')}), model config "
        f"{where}; output format {fmt}")
    if home is not None:
        log(f"conversion source: {home.root} ({home.where})" + (
            f"; {len(home.extra['tensors'])} tensors megallava does not build come back from {HF_EXTRA}/"
            if home.extra else ""))
    if weights_only:
        log("--weights-only: no tokenizer, processor or chat template written (the output needs them to be used)")
    elif verbatim:
        log(f"tokenizer / processor: the unmodified conversion's own files, verbatim ({len(verbatim)} files from "
            f"{os.path.join(home.root, TOKENIZER_DIR)}; --template or --tokenizer writes megallava's instead)")
    else:
        log(f"tokenizer: {tok_path} [{tok_where}]; chat template {template} [{template_where}]; image mode "
            f"{image_mode} [{mode_where}]")
    info = {}
    with atomic_output(output, overwrite) as tmp:
        if fmt == "llava-hf":
            name_of = _llava_hf_name
            extra, full = _with_extra(model, _extra_entries(home, out_dtype, name_of))
            entries = _entries(reader, model, out_dtype, name_of, merged) + extra
            if not full:
                entries += _post_layernorm(model, weight_dtype, name_of)
            write_safetensors(tmp, [e[:4] for e in entries], max_bytes, log)
            if full and home.flavour == "llava-hf" and home.original.get("config"):
                with open(os.path.join(tmp, "config.json"), "w") as f:
                    json.dump(_set_dtype(home.original["config"], weight_dtype) if out_dtype else
                              home.original["config"], f, indent=2)
                    f.write("\n")
            else:
                from transformers import LlavaConfig

                text_cfg = hf_config.hf_text_config(model, text_src)
                vision_cfg = hf_config.hf_vision_config(model, vision_src, full=full)
                patches = (model.vision.image_size // model.vision.patch_size) ** 2
                cfg = LlavaConfig(text_config=text_cfg, vision_config=vision_cfg,
                                  image_token_index=model.image_token_id,
                                  vision_feature_layer=model.vision.select_layer if full else -1,
                                  vision_feature_select_strategy="default", projector_hidden_act="gelu",
                                  image_seq_length=patches, multimodal_projector_bias=True, tie_word_embeddings=False)
                cfg.architectures = ["LlavaForConditionalGeneration"]
                cfg.dtype = weight_dtype
                cfg.save_pretrained(tmp)
        else:
            name_of = lambda s: _llava_name(s, model.projector)  # noqa: E731
            extra, full = _with_extra(model, _extra_entries(home, out_dtype, name_of))
            entries = _entries(reader, model, out_dtype, name_of, merged) + extra
            llm = [e for e in entries if not e[4].startswith("vit.")]
            vit = [e for e in entries if e[4].startswith("vit.")]
            if not full:
                vit += _post_layernorm(model, weight_dtype, name_of)
            write_safetensors(tmp, [e[:4] for e in llm], max_bytes, log)
            vdir = os.path.join(tmp, VISION_SUBDIR)
            os.makedirs(vdir)
            write_safetensors(vdir, [e[:4] for e in vit], max_bytes, log)
            raw_vision = home.original.get("vision_config") if home is not None and full else None
            if raw_vision:
                vd = dict(raw_vision, model_type="clip_vision_model", architectures=["CLIPVisionModel"])
                if out_dtype:
                    _set_dtype(vd, weight_dtype)
                with open(os.path.join(vdir, "config.json"), "w") as f:
                    json.dump(vd, f, indent=2)
            else:
                vision_cfg = hf_config.hf_vision_config(model, vision_src, full=full)
                vision_cfg.architectures = ["CLIPVisionModel"]
                vision_cfg.dtype = weight_dtype
                vision_cfg.save_pretrained(vdir)
            select = model.vision.select_layer if full else -1
            original = home.original.get("config") if home is not None and full and \
                home.flavour in ("llava", "llama+clip") else None
            if original:
                d = _set_dtype(dict(original), weight_dtype) if out_dtype else dict(original)
                d["vocab_size"] = model.vocab_size  # a LLaMA + CLIP conversion may have grown it by <image>
            else:
                text_cfg = hf_config.hf_text_config(model, text_src)
                text_cfg.dtype = weight_dtype
                d = text_cfg.to_dict()
            d.update({"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
                      "mm_vision_tower": VISION_SUBDIR, "mm_projector_type": model.projector,
                      "mm_hidden_size": model.vision.hidden_size, "mm_vision_select_layer": select,
                      "mm_vision_select_feature": "patch"})
            for k, val in (("mm_use_im_start_end", False), ("mm_use_im_patch_token", False),
                           ("mm_patch_merge_type", "flat")):
                d.setdefault(k, val)
            # LLaVA's process_images: "pad" = expand2square with the mean colour; anything else = the CLIP
            # processor's resize + centre crop
            if verbatim or weights_only:
                d.setdefault("image_aspect_ratio", "pad")
            else:
                d["image_aspect_ratio"] = "pad" if image_mode == "pad" else "square"
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(d, f, indent=2, sort_keys=True)
        if lora and not merge_lora:
            if fmt != "llava-hf":
                raise ConversionError("a PEFT adapter is written for the llava-hf format only: use --merge-lora")
            projector = {n[len("projector."):]: reader.read(n).to(out_dtype or weight_dtype)
                         for n in ("projector.linear_1.weight", "projector.linear_1.bias",
                                   "projector.linear_2.weight", "projector.linear_2.bias")}
            written = write_peft_adapter(lora, os.path.join(tmp, "adapter"), projector, out_dtype or weight_dtype)
            log(f"PEFT adapter: {written['tensors']} tensors, {written['parameters']:,} parameters in adapter/ "
                f"(peft.PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(OUT), OUT/adapter))")
        if verbatim:
            for path in verbatim:
                shutil.copy2(path, os.path.join(tmp, os.path.basename(path)))
            if fmt == "llava" and os.path.isfile(os.path.join(tmp, "preprocessor_config.json")):
                shutil.copy2(os.path.join(tmp, "preprocessor_config.json"), os.path.join(tmp, VISION_SUBDIR))
        elif not weights_only:
            info = hf_export.write_processor(tmp, model, tok_path, template, image_mode, fmt, log=log)
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump(info["generation"], f, indent=2)
    if info.get("parity"):
        log(f"warning: the exported tokenizer + chat template do not reproduce the trainer's token ids: "
            f"{info['parity']}")
    elif info:
        log(f"checked: the chat template + tokenizer give the trainer's prompt text and token ids ({template}, BOS "
            f"{'added' if info['bos'] else 'not added'}, {info['vocab']} tokens)")
    seconds = time.perf_counter() - t0
    log(f"wrote {fmt} checkpoint {output} in {seconds:.1f} s")
    return {"output": output, "format": fmt, "seconds": seconds, "model": model, "template": template,
            "image_mode": image_mode, "source": home.root if home is not None else None,
            "full_tower": full, "verbatim": bool(verbatim), "parity": info.get("parity")}
