"""HF-side inputs of a conversion, auto-detected from config.json, all read lazily (one tensor at a time):

- ``llava-hf``: a transformers ``LlavaForConditionalGeneration`` directory (4.x hub layout or 5.x save_pretrained);
- ``llava``: an original-LLaVA (haotian-liu/LLaVA) checkpoint: LLaMA weights + ``model.mm_projector.*``, config.json
  with ``mm_vision_tower`` / ``mm_projector_type`` / ``mm_vision_select_layer``; the vision tower is named, not stored,
  so its CLIP directory comes from ``--vision`` (or ``mm_vision_tower`` when that is a local directory);
- ``llama+clip``: a plain HF LLaMA directory + ``--vision`` CLIP directory (+ ``--projector mm_projector.bin``), for
  stage 1 from scratch; without ``--projector`` the projector is freshly initialised (seeded, std 0.02, zero biases).
  The image token is in the vocab, as llava-hf has it (``image_token=None``, the default): the tokenizer's own
  ``<image>`` if it has one, else the first id after its last token; when that id is the LLM's vocab size (LLaMA:
  32000 tokens, vocab 32000) the embedding and output layer grow by one row, initialised to the mean of the
  existing rows (accumulated in float64: deterministic), and hf-to-megatron adds ``<image>`` to the tokenizer copy
  it carries. ``image_token=-200`` keeps original LLaVA's out-of-vocab placeholder and the vocab as it is.
  Original-LLaVA inputs keep -200; llava-hf inputs their ``image_token_index``.

Every tensor is addressed by its short HF name (``lm.``, ``head.``, ``vit.``, ``proj.``; see convert/hf_names.py).
"""
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from megallava.convert import hf_config, hf_names
from megallava.convert.errors import ConversionError
from megallava.convert.tensor_files import TensorFiles, open_file
from megallava.convert.geometry import vision_num_layers_built

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja",
                   "processor_config.json", "preprocessor_config.json", "generation_config.json")
_CLIP_SKIP = re.compile(r"(text_model\.|logit_scale$|text_projection\.|visual_projection\.)")


class _Generated:
    """A freshly initialised projector: seeded by (seed, name), std 0.02 weights, zero biases."""
    path = "<fresh projector init>"

    def __init__(self, shapes: Dict[str, tuple], dtype: torch.dtype, seed: int, std: float = 0.02):
        self.shapes, self.dtype, self.seed, self.std = shapes, dtype, seed, std

    def names(self):
        return list(self.shapes)

    def file_of(self, name):
        return self.path

    def meta(self, name):
        return self.shapes[name], self.dtype

    def get(self, name):
        if name.endswith(".bias"):
            return torch.zeros(self.shapes[name], dtype=self.dtype)
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))
        return (torch.randn(self.shapes[name], generator=gen) * self.std).to(self.dtype)


class _Grown:
    """Vocab-row tensors (embedding, output layer) of another store with ``rows`` rows appended, each the mean of the
    existing rows (summed in float64 blocks, then cast: the same rows on every run)."""
    path = "<grown vocab>"

    def __init__(self, store, rows: int):
        self.store, self.rows = store, rows

    def file_of(self, name):
        return self.store.file_of(name)

    def meta(self, name):
        shape, dtype = self.store.meta(name)
        return (shape[0] + self.rows,) + tuple(shape[1:]), dtype

    def get(self, name):
        t = self.store.get(name)
        return torch.cat([t, mean_row(t).expand(self.rows, *t.shape[1:])])


def mean_row(t: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """The mean of the rows of ``t`` [1, ...], accumulated in float64 block by block, in ``t``'s dtype."""
    acc = torch.zeros(t.shape[1:], dtype=torch.float64)
    for i in range(0, t.shape[0], block):
        acc += t[i:i + block].to(torch.float64).sum(0)
    return (acc / t.shape[0]).to(t.dtype).unsqueeze(0)


@dataclass
class ImageToken:
    """How a LLaMA + CLIP conversion places ``<image>``: ``id`` in a vocab of ``vocab`` (``old_vocab`` in the input);
    ``add_to_tokenizer``: the tokenizer lacks it and its copy gets it at ``id``; ``tokenizer``: the input tokenizer
    the id was chosen for (None: the input has none)."""
    id: int
    old_vocab: int
    vocab: int
    add_to_tokenizer: bool
    tokenizer: Optional[str]


@dataclass
class Source:
    flavour: str
    path: str
    model: object                                   # megallava ModelConfig
    tensors: Dict[str, Tuple[object, str]]          # short HF name -> (store, name in that store)
    tokenizer_files: List[str] = field(default_factory=list)
    hf_configs: Dict[str, dict] = field(default_factory=dict)  # original config.json(s), for the export
    notes: List[str] = field(default_factory=list)
    vision_dir: Optional[str] = None
    image_token: Optional[ImageToken] = None        # llama+clip: where <image> goes (None: out of vocab / given)

    def where(self, short: str) -> str:
        store, name = self.tensors[short]
        return f"{store.file_of(name)}: tensor {name!r}"

    def meta(self, short: str):
        store, name = self.tensors[short]
        return store.meta(name)

    def get(self, short: str) -> torch.Tensor:
        store, name = self.tensors[short]
        return store.get(name)

    def check(self) -> None:
        """Every tensor the model needs is present with the shape config.json implies, and nothing else is."""
        expected = hf_names.hf_shapes(self.model)
        wanted = [s for hf, _, _, _ in hf_names.plan(self.model) for s in hf]
        problems = []
        for s in wanted:
            if s not in self.tensors:
                problems.append(f"{self.path}: missing tensor {self._spell(s)} (the config has "
                                f"{self.model.num_layers} LLM layers, {vision_num_layers_built(self.model.vision)} "
                                f"used ViT layers, projector {self.model.projector})")
                continue
            shape, _ = self.meta(s)
            if tuple(shape) != tuple(expected[s]):
                problems.append(f"{self.where(s)} has shape {list(shape)}, but the config implies "
                                f"{list(expected[s])}")
        built = vision_num_layers_built(self.model.vision)
        wanted = set(wanted)
        for s in sorted(self.tensors):
            if s not in wanted and not hf_names.is_ignored(s, built):
                problems.append(f"{self.where(s)} is not part of this model (config: {self.model.num_layers} "
                                f"layers, projector {self.model.projector})")
        if problems:
            raise ConversionError(problems)

    def _spell(self, short: str) -> str:
        return {"llava-hf": hf_names.long_name(short)}.get(self.flavour, short)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConversionError(f"{path} not found: not a HF model directory")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from None


def _add(tensors: dict, store, short: str, name: str, problems: list) -> None:
    if short in tensors and tensors[short][0] is store:
        problems.append(f"{store.file_of(name)}: tensors {tensors[short][1]!r} and {name!r} both map to {short}")
    tensors[short] = (store, name)


def _llama_short(name: str) -> Optional[str]:
    """Names in LLaMA / original-LLaVA checkpoints -> short names (None: not recognised)."""
    if name.startswith("model.vision_tower.vision_tower.vision_model."):
        return "vit." + name[len("model.vision_tower.vision_tower.vision_model."):]
    m = re.match(r"(?:model\.)?mm_projector\.(.*)$", name)
    if m:
        return _projector_short(m.group(1))
    if name.startswith("model.") and not name.startswith("model.vision_tower."):
        return "lm." + name[len("model."):]
    if name.startswith("lm_head."):
        return "head." + name[len("lm_head."):]
    return None


def _projector_short(rest: str) -> Optional[str]:
    m = re.match(r"(?:(\d+)\.)?(weight|bias)$", rest)
    if not m:
        return None
    idx = {None: 1, "0": 1, "2": 2}.get(m.group(1))
    return None if idx is None else f"proj.linear_{idx}.{m.group(2)}"


def _clip_tensors(vision_dir: str, tensors: dict, problems: list) -> None:
    files = TensorFiles.from_dir(vision_dir)
    for name in files.names():
        rest = name[len("vision_model."):] if name.startswith("vision_model.") else name
        if _CLIP_SKIP.match(name):
            continue
        if not rest.startswith(("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")):
            problems.append(f"{files.file_of(name)}: tensor {name!r} is not part of a CLIP vision tower")
            continue
        _add(tensors, files, "vit." + rest, name, problems)


def _clip_config(vision_dir: str):
    from transformers import CLIPVisionConfig

    cfg = _read_json(os.path.join(vision_dir, "config.json"))
    if cfg.get("model_type") not in ("clip", "clip_vision_model"):
        raise ConversionError(f"{vision_dir}/config.json: model_type={cfg.get('model_type')!r}; --vision must be an "
                              f"HF CLIPVisionModel or CLIPModel directory")
    raw = cfg.get("vision_config", cfg) if cfg.get("model_type") == "clip" else cfg
    return CLIPVisionConfig.from_pretrained(vision_dir), raw


def _projector_tensors(path: str, tensors: dict, problems: list) -> str:
    store = open_file(path)
    kinds = set()
    for name in store.keys():
        m = re.match(r"(?:.*\.)?mm_projector\.(.*)$", name)
        short = _projector_short(m.group(1) if m else name)
        if short is None:
            problems.append(f"{path}: tensor {name!r} is not a projector weight (expected mm_projector.weight/bias "
                            f"or mm_projector.0./.2.)")
            continue
        kinds.add(short)
        _add(tensors, store, short, name, problems)
    return "mlp2x_gelu" if any(k.startswith("proj.linear_2.") for k in kinds) else "linear"


def _tokenizer_files(*dirs) -> List[str]:
    found, seen = [], set()
    for i, d in enumerate(d for d in dirs if d):
        for name in TOKENIZER_FILES:
            # From the vision tower only its image preprocessor: CLIP's own tokenizer is not the LLM's.
            if i > 0 and name != "preprocessor_config.json":
                continue
            path = os.path.join(d, name)
            if os.path.isfile(path) and name not in seen:
                seen.add(name)
                found.append(path)
    return found


def detect(path: str) -> str:
    if not os.path.isdir(path):
        raise ConversionError(f"--input {path}: not a directory")
    cfg = _read_json(os.path.join(path, "config.json"))
    arch, model_type = cfg.get("architectures") or [], cfg.get("model_type")
    if "LlavaForConditionalGeneration" in arch or (model_type == "llava" and "text_config" in cfg):
        return "llava-hf"
    if any(k in cfg for k in ("mm_vision_tower", "mm_projector_type", "mm_hidden_size")) or model_type == "llava_llama":
        return "llava"
    if model_type == "llama" or any(a.startswith("Llama") for a in arch):
        return "llama"
    raise ConversionError(
        f"{path}/config.json: unknown architecture (model_type={model_type!r}, architectures={arch}). Supported: HF "
        f"LlavaForConditionalGeneration (llava-hf), original LLaVA (config with mm_vision_tower), plain HF LLaMA "
        f"(+ --vision CLIP directory)")


def _llm_tokenizer(path: str) -> Optional[str]:
    """The LLM's tokenizer in an input directory as ``data.tokenizer`` would name it: the directory when it holds an
    HF tokenizer (what megallava.data.tokenizer.load_tokenizer reads), else its sentencepiece tokenizer.model."""
    if any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer_config.json")):
        return path
    sp = os.path.join(path, "tokenizer.model")
    return sp if os.path.isfile(sp) else None


def in_vocab_image_token(path: str, vocab: int, where: str) -> ImageToken:
    """Where ``<image>`` goes for a LLaMA of ``vocab`` rows whose directory ``path`` may hold its tokenizer."""
    from megallava.data.tokenizer import IMAGE_TOKEN, load_tokenizer

    tok_path = _llm_tokenizer(path)
    if tok_path is None:
        return ImageToken(vocab, vocab, vocab + 1, False, None)
    try:
        tok = load_tokenizer(tok_path)
    except ValueError as err:
        raise ConversionError(f"{tok_path}: cannot load the tokenizer to place {IMAGE_TOKEN} ({err}); pass "
                              f"--image-token -200 for original LLaVA's out-of-vocab placeholder") from None
    n, have = tok.vocab_size, tok.piece_to_id(IMAGE_TOKEN)
    if have is not None:
        if have >= vocab:
            raise ConversionError(f"{tok_path} holds {IMAGE_TOKEN} at id {have}, outside the vocab of {where} "
                                  f"(vocab_size={vocab}): not this model's tokenizer?")
        return ImageToken(have, vocab, vocab, False, tok_path)
    if n > vocab:
        raise ConversionError(f"{tok_path} has {n} tokens but {where} has vocab_size={vocab}: not this model's "
                              f"tokenizer?")
    return ImageToken(n, vocab, max(vocab, n + 1), True, tok_path)


def open_source(path: str, vision: str = None, projector: str = None, projector_type: str = None,
                select_layer: int = None, seed: int = 0, resolve_vision_tower: bool = True,
                image_token: Optional[int] = None) -> Source:
    """Detect the flavour of ``path`` and index its tensors (nothing is read yet). ``image_token`` (LLaMA + CLIP
    inputs): None = an in-vocab ``<image>`` (see the module docstring), a negative id = that out-of-vocab
    placeholder (original LLaVA's -200)."""
    flavour = detect(path)
    if image_token is not None:
        problem = None
        if flavour == "llava-hf":
            problem = "a llava-hf input keeps its own image_token_index"
        elif flavour == "llava" and image_token != hf_config.LLAVA_IMAGE_TOKEN_INDEX:
            problem = f"an original-LLaVA input keeps its {hf_config.LLAVA_IMAGE_TOKEN_INDEX}"
        elif image_token >= 0:
            problem = ("a vocab id is chosen by the conversion (the tokenizer's <image>, else the first free id): "
                       "leave --image-token out, or give a negative id (original LLaVA: -200)")
        if problem:
            raise ConversionError(f"--image-token {image_token} does not apply to {path}: {problem}")
    cfg = _read_json(os.path.join(path, "config.json"))
    problems: list = []
    tensors: dict = {}
    where = f"{path}/config.json"
    if flavour == "llava-hf":
        for opt, val in (("--vision", vision), ("--projector", projector), ("--projector-type", projector_type),
                         ("--select-layer", select_layer)):
            if val is not None:
                raise ConversionError(f"{opt} does not apply to {path}: a llava-hf checkpoint holds its vision tower "
                                      f"and projector")
        from transformers import LlavaConfig

        try:
            llava = LlavaConfig.from_pretrained(path)
        except Exception as err:  # noqa: BLE001
            raise ConversionError(f"{where}: transformers cannot read it as a LlavaConfig "
                                  f"({' '.join(str(err).split())})") from None
        text, vis = llava.text_config, llava.vision_config
        extra = []
        if text.model_type != "llama":
            extra.append(f"{where}: text model {text.model_type!r}; megallava's LLM is LLaMA")
        if llava.vision_feature_select_strategy != "default":
            extra.append(f"{where}: vision_feature_select_strategy={llava.vision_feature_select_strategy!r}; "
                         f"megallava drops the CLS token (\"default\")")
        if getattr(llava, "projector_hidden_act", "gelu") != "gelu":
            extra.append(f"{where}: projector_hidden_act={llava.projector_hidden_act!r}; megallava uses gelu")
        if not getattr(llava, "multimodal_projector_bias", True):
            extra.append(f"{where}: multimodal_projector_bias=false; megallava's projector has biases")
        if extra:
            raise ConversionError(extra)
        image_token = getattr(llava, "image_token_id", None)
        image_token = llava.image_token_index if image_token is None else image_token
        model = hf_config.model_from_hf(text, vis, projector="mlp2x_gelu", feature_layer=llava.vision_feature_layer,
                                        image_token_id=image_token, where=where)
        files = TensorFiles.from_dir(path)
        for name in files.names():
            try:
                _add(tensors, files, hf_names.short_name(name), name, problems)
            except KeyError:
                problems.append(f"{files.file_of(name)}: tensor {name!r} is not under a LLaVA prefix")
        tied = getattr(text, "tie_word_embeddings", False) or cfg.get("tie_word_embeddings", False)
        src = Source(flavour, path, model, tensors, _tokenizer_files(path),
                     {"config": cfg})
    else:
        from transformers import LlamaConfig

        if flavour == "llava":
            if cfg.get("model_type") not in (None, "llava_llama", "llava", "llama"):
                raise ConversionError(f"{where}: model_type={cfg['model_type']!r}; megallava's LLM is LLaMA")
            ptype = projector_type or cfg.get("mm_projector_type", "linear")
            if cfg.get("mm_vision_select_feature", "patch") != "patch":
                raise ConversionError(f"{where}: mm_vision_select_feature={cfg['mm_vision_select_feature']!r}; "
                                      f"megallava drops the CLS token (\"patch\")")
            feature_layer = select_layer if select_layer is not None else cfg.get("mm_vision_select_layer", -2)
            if vision is None and resolve_vision_tower:
                vision = _local_vision_tower(path, cfg.get("mm_vision_tower"))
        else:
            ptype = projector_type
            feature_layer = -2 if select_layer is None else select_layer
        if vision is None:
            named = cfg.get("mm_vision_tower")
            raise ConversionError(
                f"{path} does not store its vision tower" + (f" (config names {named!r})" if named else "")
                + ": download that CLIP model and pass --vision DIR (an HF CLIPVisionModel or CLIPModel directory)")
        if not os.path.isdir(vision):
            raise ConversionError(f"--vision {vision}: not a directory")
        text_dict = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}
        try:
            text = LlamaConfig.from_dict(text_dict)
        except Exception as err:  # noqa: BLE001
            raise ConversionError(f"{where}: cannot read it as a LlamaConfig ({' '.join(str(err).split())})") from None
        vis, vis_raw = _clip_config(vision)
        _clip_tensors(vision, tensors, problems)
        files = TensorFiles.from_dir(path)
        for name in files.names():
            short = _llama_short(name)
            if short is None:
                problems.append(f"{files.file_of(name)}: tensor {name!r} is not a LLaMA / LLaVA weight")
            else:
                _add(tensors, files, short, name, problems)
        notes = []
        if projector is not None:
            if not os.path.isfile(projector):
                raise ConversionError(f"--projector {projector}: file not found")
            for s in [s for s in tensors if s.startswith("proj.")]:
                del tensors[s]
            found = _projector_tensors(projector, tensors, problems)
            if ptype is not None and ptype != found:
                raise ConversionError(f"--projector {projector} holds a {found} projector but the projector type "
                                      f"is {ptype}")
            ptype = found
        has_proj = any(s.startswith("proj.") for s in tensors)
        if ptype is None:
            ptype = "mlp2x_gelu"
        if ptype not in ("linear", "mlp2x_gelu"):
            raise ConversionError(f"projector type {ptype!r} is not supported: use linear or mlp2x_gelu")
        placed = None
        if flavour == "llama" and image_token is None:
            placed = in_vocab_image_token(path, text.vocab_size, where)
            token_id = placed.id
        else:
            token_id = hf_config.LLAVA_IMAGE_TOKEN_INDEX if image_token is None else image_token
        model = hf_config.model_from_hf(text, vis, projector=ptype, feature_layer=feature_layer,
                                        image_token_id=token_id, where=where, vision_where=f"{vision}/config.json")
        if placed is not None:
            model.vocab_size = placed.vocab
        if not has_proj:
            if flavour == "llava":
                raise ConversionError(f"{path} holds no model.mm_projector.* tensors: pass --projector "
                                      f"mm_projector.bin")
            h, vh = model.hidden_size, model.vision.hidden_size
            shapes = {"proj.linear_1.weight": (h, vh), "proj.linear_1.bias": (h,)}
            if ptype == "mlp2x_gelu":
                shapes.update({"proj.linear_2.weight": (h, h), "proj.linear_2.bias": (h,)})
            emb = tensors.get("lm.embed_tokens.weight")
            gen = _Generated(shapes, emb[0].meta(emb[1])[1] if emb else torch.float32, seed)
            for s in shapes:
                tensors[s] = (gen, s)
            notes.append(f"projector {ptype} freshly initialised (seed {seed}, std 0.02, zero biases)")
        tied = text.tie_word_embeddings
        src = Source(flavour if flavour == "llava" else "llama+clip", path, model, tensors,
                     _tokenizer_files(path, vision), {"config": cfg, "vision_config": vis_raw}, notes,
                     vision_dir=vision, image_token=placed)
    if problems:
        raise ConversionError(problems)
    if tied and "head.weight" not in tensors and "lm.embed_tokens.weight" in tensors:
        tensors["head.weight"] = tensors["lm.embed_tokens.weight"]
        src.notes.append("tied embeddings: output layer initialised from embed_tokens (megallava's are untied)")
    grow = src.model.vocab_size - (src.image_token.old_vocab if src.image_token else src.model.vocab_size)
    if grow:
        for s in ("lm.embed_tokens.weight", "head.weight"):
            if s in tensors:
                store, name = tensors[s]
                tensors[s] = (_Grown(store, grow), name)
    if src.image_token:
        t = src.image_token
        src.notes.append(
            f"image token <image> at id {t.id}" + (
                ", added to the tokenizer copy" if t.add_to_tokenizer else
                " (the tokenizer's own)" if t.tokenizer else f" (no tokenizer in {path}: train with one of "
                                                              f"{t.old_vocab} tokens)") +
            (f"; vocab {t.old_vocab} -> {t.vocab}: embedding and output layer grow by {grow} row(s), each the mean "
             f"of the others" if grow else "") + " (--image-token -200 keeps original LLaVA's placeholder)")
    return src


def _local_vision_tower(path: str, named) -> Optional[str]:
    if not named:
        return None
    for cand in (named, os.path.join(path, named)):
        if os.path.isfile(os.path.join(cand, "config.json")):
            return cand
    return None
