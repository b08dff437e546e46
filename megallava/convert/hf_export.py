"""Everything an HF export needs besides the weights, so that ``AutoProcessor.from_pretrained(out)`` +
``LlavaForConditionalGeneration.from_pretrained(out)`` + ``processor.apply_chat_template(...)`` + ``generate`` run
with no extra file and see exactly what the trainer saw:

- the tokenizer the model was trained with (a sentencepiece ``.model`` or an HF tokenizer directory) as a fast HF
  tokenizer (``tokenizer.json``) that (1) splits text the way ``megallava.data.tokenizer`` does per template chunk
  (every chunk between BOS / EOS / image ids gets its own dummy prefix, as sentencepiece gives it), (2) adds BOS
  iff the trainer inserts it (it does whenever the tokenizer has a BOS id), never EOS, (3) holds ``<image>`` at
  ``model.image_token_id`` (added as a special token when the tokenizer lacks it: the id must then be the
  tokenizer's size, see megallava.data.tokenizer.add_image_token);
- a Jinja chat template that renders a conversation to the trainer's exact prompt text
  (``megallava.data.templates.render_prompt``: system prompt, role tags, separators, "<image>" placement, "</s>");
- the image processor: ``LlavaImageProcessor`` with ``do_pad`` for ``data.image_mode: pad`` (LLaVA's
  expand-to-square with the CLIP-mean colour, then shortest-side bicubic resize and centre crop: pixel for pixel
  ``megallava.data.images.load_image``), ``CLIPImageProcessor`` for ``resize``; CLIP mean / std; the trained size;
- ``LlavaProcessor`` settings (patch_size, ``vision_feature_select_strategy: default``, ``num_additional_image_tokens:
  1``) so the processor expands each ``<image>`` to exactly the (image_size / patch)^2 features the model uses.

``check_prompt_parity`` tokenizes probe conversations both ways (trainer: ``encode_conversation``; HF: chat
template + tokenizer, images expanded as the processor does) and reports the first difference.
"""
import json
import os
import shutil
import tempfile
from typing import Dict, List, Optional

from megallava.convert.errors import ConversionError
from megallava.data.templates import LLAMA2_SYSTEM, TEMPLATES, VICUNA_SYSTEM, encode_conversation, render_prompt
from megallava.data.tokenizer import IMAGE_TOKEN, load_tokenizer

IMAGE_MODES = ("pad", "resize")
# Files of an HF tokenizer directory (any of them marks a directory as HF rather than a sentencepiece model).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


# ---------------------------------------------------------------------------------------------------------------
# Chat templates: the trainer's render_prompt in Jinja
# ---------------------------------------------------------------------------------------------------------------

def _q(text: str) -> str:
    """A Jinja string literal."""
    return json.dumps(text, ensure_ascii=False)


# Normalisation shared by every template, as megallava.data.templates._normalize does it: roles human/user ->
# user, gpt/assistant -> assistant; a first "system" message overrides the system prompt (anywhere else: an error);
# content is a string or a list of {"type": "image"} / {"type": "text", "text": ...} parts (images become "<image>",
# texts are concatenated); a turn with images gets them moved to the front as "<image>\n" each (then stripped);
# consecutive turns of one role are joined with "\n"; assistant turns before the first user turn are dropped.
_NORMALISE = (
    "{%- set ns = namespace(turns=[], system=none) -%}"
    "{%- for message in messages -%}"
    "{%- set role = {'human': 'user', 'user': 'user', 'gpt': 'assistant', 'assistant': 'assistant', "
    "'system': 'system'}.get(message['role'], '') -%}"
    "{%- if message['content'] is string -%}{%- set value = message['content'] -%}"
    "{%- elif message['content'] is none -%}{%- set value = '' -%}"
    "{%- else -%}{%- set parts = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set parts.text = parts.text + '<image>' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set parts.text = parts.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set value = parts.text -%}{%- endif -%}"
    "{%- if role == 'system' -%}"
    "{%- if loop.first -%}{%- set ns.system = value -%}"
    "{%- else -%}{{- raise_exception('a system message is only allowed as the first message') -}}{%- endif -%}"
    "{%- elif role == '' -%}{{- raise_exception('unknown role ' + message['role'] + ' (use user / assistant / "
    "system)') -}}"
    "{%- else -%}"
    "{%- set n = value.count('<image>') -%}"
    "{%- if n > 0 -%}{%- set value = ('<image>\\n' * n + value.replace('<image>', '').strip()).strip() -%}"
    "{%- endif -%}"
    "{%- if ns.turns and ns.turns[-1][0] == role -%}"
    "{%- set ns.turns = ns.turns[:-1] + [[role, ns.turns[-1][1] + '\\n' + value]] -%}"
    "{%- elif ns.turns or role == 'user' -%}{%- set ns.turns = ns.turns + [[role, value]] -%}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

_RENDER = {
    # SYSTEM + " " + "USER: " + q1 + " " + "ASSISTANT: " + a1 + "</s>" + "USER: " + q2 + ...; prompt ends "ASSISTANT:"
    "vicuna_v1": (
        "{{- (ns.system if ns.system is not none else " + _q(VICUNA_SYSTEM) + ") + ' ' -}}"
        "{%- for turn in ns.turns -%}"
        "{%- if turn[0] == 'user' -%}{{- 'USER: ' + turn[1] + ' ' -}}"
        "{%- else -%}{{- 'ASSISTANT: ' + turn[1] + eos_token -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"),
    # "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{q1} [/INST] {a1} </s><s>[INST] {q2} [/INST] {a2} </s>"
    "llama_2": (
        "{%- set system = ns.system if ns.system is not none else " + _q(LLAMA2_SYSTEM) + " -%}"
        "{%- for turn in ns.turns -%}"
        "{%- if turn[0] == 'user' -%}"
        "{%- set value = turn[1] -%}"
        "{%- if loop.first and system -%}{%- set value = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + value -%}"
        "{%- endif -%}"
        "{%- if not loop.first -%}{{- bos_token -}}{%- endif -%}"
        "{{- '[INST] ' + value + ' [/INST]' -}}"
        "{%- else -%}{{- ' ' + turn[1] + ' ' + eos_token -}}{%- endif -%}"
        "{%- endfor -%}"),
    # "<image>" + caption + "\n" (stage 1): the user's text is dropped, its images kept
    "plain": (
        "{%- set p = namespace(pending=0) -%}"
        "{%- for turn in ns.turns -%}"
        "{%- if turn[0] == 'user' -%}{%- set p.pending = p.pending + turn[1].count('<image>') -%}"
        "{%- else -%}{{- '<image>' * p.pending + turn[1] + '\\n' -}}{%- set p.pending = 0 -%}{%- endif -%}"
        "{%- endfor -%}"
        "{{- '<image>' * p.pending -}}"),
}


def chat_template(template: str) -> str:
    """The Jinja chat template that renders what ``render_prompt(conversation, template)`` renders (BOS excluded:
    the tokenizer adds it, as the trainer inserts it)."""
    if template not in TEMPLATES:
        raise ConversionError(f"--template {template!r}: use one of {', '.join(TEMPLATES)}")
    return _NORMALISE + _RENDER[template]


# ---------------------------------------------------------------------------------------------------------------
# Image processor
# ---------------------------------------------------------------------------------------------------------------

def image_processor(image_size: int, image_mode: str):
    """LlavaImageProcessor(do_pad) for pad mode, CLIPImageProcessor for resize mode (PIL backends: they need no
    torchvision and compute exactly megallava.data.images.load_image; the saved type names carry no backend)."""
    if image_mode not in IMAGE_MODES:
        raise ConversionError(f"image mode {image_mode!r}: use one of {', '.join(IMAGE_MODES)}")
    kwargs = dict(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                  resample=3, do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255,
                  do_normalize=True, do_convert_rgb=True)
    from megallava.data.images import CLIP_MEAN, CLIP_STD

    kwargs.update(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    if image_mode == "pad":
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        return LlavaImageProcessorPil(do_pad=True, **kwargs)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------

def tokenizer_path(path: str) -> str:
    """What ``data.tokenizer`` would be for these files: a sentencepiece ``.model`` file, or an HF tokenizer
    directory. A directory holding only one ``.model`` (the trainer's copy of a sentencepiece tokenizer) is that
    file."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise ConversionError(f"tokenizer {path}: no such file or directory")
    names = os.listdir(path)
    if any(n in names for n in HF_TOKENIZER_FILES):
        return path
    models = [n for n in names if n.endswith(".model")]
    if len(models) == 1:
        return os.path.join(path, models[0])
    raise ConversionError(f"tokenizer {path}: neither an HF tokenizer directory ({' / '.join(HF_TOKENIZER_FILES)}) "
                          f"nor one sentencepiece .model file (found {sorted(names) or 'nothing'})")


def _always_prefix(node) -> bool:
    """Metaspace(prepend_scheme="first") -> "always" anywhere in a tokenizer.json pre_tokenizer: the trainer
    tokenizes each template chunk with its own call, so each chunk gets the prefix."""
    changed = False
    if isinstance(node, dict):
        if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
            node["prepend_scheme"] = "always"
            changed = True
        for v in node.values():
            changed |= _always_prefix(v)
    elif isinstance(node, list):
        for v in node:
            changed |= _always_prefix(v)
    return changed


def build_hf_tokenizer(path: str, model, log=print):
    """(HF fast tokenizer for the export, the trainer's megallava tokenizer) of ``path`` (a ``data.tokenizer``)."""
    from tokenizers import AddedToken, Tokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    path = tokenizer_path(path)
    try:
        trainer_tok = load_tokenizer(path)
    except ValueError as err:
        raise ConversionError(f"tokenizer {path} cannot be loaded as the trainer loads it ({err})") from None
    if os.path.isfile(path):
        # transformers builds a fast tokenizer from the sentencepiece proto (legacy: every chunk between added
        # tokens gets the dummy prefix, and text starting with a space gets "▁▁", exactly as sentencepiece)
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copyfile(path, os.path.join(tmp, "tokenizer.model"))
            tok = TokenizersBackend.from_pretrained(tmp, legacy=True)
        backend = json.loads(tok.backend_tokenizer.to_str())
    else:
        backend = json.loads(trainer_tok.tok.backend_tokenizer.to_str())
        if _always_prefix(backend.get("pre_tokenizer")):
            log("note: tokenizer pre-tokenizer Metaspace prepend_scheme first -> always (the trainer tokenizes each "
                "chunk between special tokens on its own)")
        tok = trainer_tok.tok
    special = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
               if getattr(tok, k, None) is not None}
    if "pad_token" not in special:  # the trainer pads with pad, else unk (megallava.data.tokenizer)
        special["pad_token"] = special.get("unk_token", special.get("eos_token"))
    bos = trainer_tok.bos_id is not None  # the templates insert BOS whenever the tokenizer has one
    hf = TokenizersBackend(tokenizer_object=Tokenizer.from_str(json.dumps(backend)), add_bos_token=bos,
                           add_eos_token=False, padding_side="left", clean_up_tokenization_spaces=False,
                           **{k: str(v) for k, v in special.items() if v is not None})
    hf.update_post_processor()
    if 0 <= model.image_token_id < model.vocab_size:
        have = hf.convert_tokens_to_ids(IMAGE_TOKEN)
        has_it = isinstance(have, int) and hf.convert_ids_to_tokens(have) == IMAGE_TOKEN and \
            have != hf.unk_token_id
        if not has_it and model.image_token_id != len(hf):
            taken = (f"id {model.image_token_id} is the token {hf.convert_ids_to_tokens(model.image_token_id)!r}"
                     if model.image_token_id < len(hf) else f"the tokenizer has only {len(hf)} tokens")
            raise ConversionError(
                f"model.image_token_id={model.image_token_id} but tokenizer {path} has no {IMAGE_TOKEN} token and "
                f"{taken}: an in-vocab image token is the id after the tokenizer's last one ({len(hf)}); see "
                f"python -m megallava.data.tokenizer image-token-settings {path}")
        hf.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        got = hf.convert_tokens_to_ids(IMAGE_TOKEN)
        if got != model.image_token_id:
            raise ConversionError(f"tokenizer {path} holds {IMAGE_TOKEN} at id {got}, but model.image_token_id="
                                  f"{model.image_token_id}: export with the tokenizer the model was trained with")
    if len(hf) > model.vocab_size:
        raise ConversionError(f"tokenizer {path} has {len(hf)} tokens, the model's vocab only {model.vocab_size}: "
                              f"not the tokenizer this model was trained with")
    return hf, trainer_tok


def _probes(template: str, with_image: bool) -> List[List[Dict]]:
    """Conversations that exercise every template path: images, several rounds, system override, digits,
    non-ASCII, newlines, leading spaces."""
    img = [{"type": "image"}] if with_image else []
    first = {"role": "user", "content": img + [{"type": "text", "text": "What is shown here? Answer in 2 lines."}]}
    convs = [[first, {"role": "assistant", "content": "A tabby cat (about 3 years old) lies on a café chair.\nIt "
                                                      "looks at the camera."},
              {"role": "user", "content": "And  the colour of its eyes?"},
              {"role": "assistant", "content": " Yellow-green: 100% sure."}],
             [{"role": "system", "content": "Be brief."}, first,
              {"role": "assistant", "content": "A cat."}]]
    if template == "plain":
        convs = [[{"role": "user", "content": img}, {"role": "assistant", "content": "A cat on a chair, 2 ears."}]]
    return convs


def _trainer_messages(messages: List[Dict]) -> List[Dict]:
    out = []
    for m in messages:
        c = m["content"]
        if not isinstance(c, str):
            c = "".join(IMAGE_TOKEN if p["type"] == "image" else p.get("text", "") for p in c)
        out.append({"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": c})
    return out


def check_prompt_parity(hf_tok, trainer_tok, template: str, model) -> Optional[str]:
    """None if the HF side (chat template + tokenizer, each <image> expanded to the model's feature count, as the
    processor does) gives the trainer's token ids and prompt text for the probe conversations; else what
    differs."""
    in_vocab = 0 <= model.image_token_id < model.vocab_size
    v = model.vision
    image_tokens = (v.image_size // v.patch_size) ** 2
    for conv in _probes(template, in_vocab):
        raw = _trainer_messages(conv)
        n_images = sum(m["value"].count(IMAGE_TOKEN) for m in raw)
        want = encode_conversation(raw, template, trainer_tok, model.image_token_id, image_tokens, n_images).tokens
        text = hf_tok.apply_chat_template(conv, chat_template=chat_template(template), tokenize=False)
        if text != render_prompt(raw, template):
            return f"{template}: chat template renders {text!r}, the trainer {render_prompt(raw, template)!r}"
        got = list(hf_tok(text.replace(IMAGE_TOKEN, IMAGE_TOKEN * image_tokens))["input_ids"])
        if got != want:
            i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            return (f"{template}: token {i} differs (HF {got[max(0, i - 3):i + 3]}, trainer {want[max(0, i - 3):i + 3]}"
                    f"; {len(got)} vs {len(want)} tokens) for {text!r}")
    return None


def write_processor(out: str, model, tokenizer: str, template: str, image_mode: str, fmt: str,
                    model_max_length: Optional[int] = None, log=print) -> Dict:
    """Write tokenizer, chat template, image processor (and for llava-hf the LlavaProcessor config) into ``out``
    (for the original-LLaVA layout the image processor goes to ``out/vision_tower``, where LLaVA's code reads it).
    Returns {"parity": None or the difference, "bos": ...}."""
    hf_tok, trainer_tok = build_hf_tokenizer(tokenizer, model, log)
    template_text = chat_template(template)
    hf_tok.chat_template = template_text
    if model_max_length:
        hf_tok.model_max_length = int(model_max_length)
    v = model.vision
    # original LLaVA pads itself (image_aspect_ratio: pad) and then runs the vision tower's CLIPImageProcessor
    ip = image_processor(v.image_size, image_mode if fmt == "llava-hf" else "resize")
    if fmt == "llava-hf":
        from transformers import LlavaProcessor

        proc = LlavaProcessor(image_processor=ip, tokenizer=hf_tok, patch_size=v.patch_size,
                              vision_feature_select_strategy="default", chat_template=template_text,
                              image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
        proc.save_pretrained(out)
        ip.save_pretrained(out)  # preprocessor_config.json too (transformers 4.x reads the image processor there)
    else:
        hf_tok.save_pretrained(out)
        ip.save_pretrained(os.path.join(out, "vision_tower"))
    _tidy_tokenizer_config(out, hf_tok)
    parity = check_prompt_parity(hf_tok, trainer_tok, template, model)
    return {"parity": parity, "bos": hf_tok.add_bos_token, "vocab": len(hf_tok),
            "generation": generation_config(hf_tok)}


def _tidy_tokenizer_config(out: str, tok) -> None:
    """A class every transformers version knows (the tokenizer.json holds the whole pipeline), the BOS / EOS
    settings spelled out, no machine-local keys."""
    path = os.path.join(out, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    for k in ("is_local", "local_files_only", "name_or_path"):
        cfg.pop(k, None)
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=bool(tok.add_bos_token), add_eos_token=False,
               padding_side="left")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def generation_config(hf_tok) -> Dict:
    return {k: v for k, v in (("bos_token_id", hf_tok.bos_token_id), ("eos_token_id", hf_tok.eos_token_id),
                              ("pad_token_id", hf_tok.pad_token_id)) if v is not None}
