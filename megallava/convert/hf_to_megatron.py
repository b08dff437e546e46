"""HF (llava-hf, original LLaVA, or LLaMA + CLIP) -> a layout-free megallava checkpoint, streamed one tensor at a
time: peak memory is a few tensors, not the model.

Output ROOT::

    ROOT/latest, ROOT/iter_0000000/     weights-only torch_dist checkpoint (checkpoint.load=ROOT at any TP/PP/VPP)
    ROOT/megallava_model.yaml           the model: section of a megallava config
    ROOT/tokenizer/                     the tokenizer / processor files of the input (LLaMA + CLIP: with <image>
                                        added where the conversion put it, see convert/sources.py)
    ROOT/source_config.json             the input's HF config(s), so megatron-to-hf can restore token ids etc.
    ROOT/hf_extra/                      what megallava does not build, for megatron-to-hf to give back: every input
                                        tensor the checkpoint does not hold (ViT layers above the selected one,
                                        post_layernorm, buffers) in model.safetensors (short names, input dtypes),
                                        the input's config.json (+ vision_config.json), extra.json (the model they
                                        belong to)

The checkpoint's common state records ``hf_source`` = ROOT (absolute), so megatron-to-hf finds ROOT from this
checkpoint; trainer checkpoints that started from it find it through ``--source ROOT`` (or their own common state,
when the trainer carries ``hf_source`` over into its saves).
"""
import json
import os
import shutil
import tempfile
import time

import torch

from megallava.convert import dcp, hf_config, hf_names
from megallava.convert.errors import ConversionError, atomic_output, check_output
from megallava.convert.sources import open_source
from megallava.convert.tensor_files import write_safetensors
from megallava.convert.geometry import padded_vocab_size, vision_num_layers_built

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKENIZER_DIR = "tokenizer"
SOURCE_CONFIG = "source_config.json"
HF_EXTRA = "hf_extra"
EXTRA_JSON = "extra.json"


def extra_tensors(source) -> list:
    """Short names of the input tensors the megallava checkpoint does not hold (kept in hf_extra/)."""
    wanted = {s for hf, _, _, _ in hf_names.plan(source.model) for s in hf}
    return sorted(s for s in source.tensors if s not in wanted)


def write_extra(dest: str, source, out_dtype, log) -> int:
    """hf_extra/: the unbuilt tensors (streamed one at a time), the input's configs, and what model they go with."""
    os.makedirs(dest)
    names = extra_tensors(source)
    entries = []
    for s in names:
        shape, dt = source.meta(s)
        dt = out_dtype if out_dtype is not None and dt.is_floating_point else dt
        entries.append((s, tuple(shape), dt, lambda s=s, dt=dt: source.get(s).to(dt)))
    write_safetensors(dest, entries, 2 * 10 ** 9, log)
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(source.hf_configs.get("config", {}), f, indent=2)
    if source.hf_configs.get("vision_config") is not None:
        with open(os.path.join(dest, "vision_config.json"), "w") as f:
            json.dump(source.hf_configs["vision_config"], f, indent=2)
    with open(os.path.join(dest, EXTRA_JSON), "w") as f:
        json.dump({"flavour": source.flavour, "input": os.path.abspath(source.path),
                   "vision_dir": os.path.abspath(source.vision_dir) if source.vision_dir else None,
                   "model": hf_config.model_dict(source.model), "tensors": names}, f, indent=2)
    return len(names)


def plan_chunks(source, out_dtype=None):
    """One dcp.Chunk per (canonical tensor, layer), each converting its HF tensors when written."""
    model = source.model
    padded = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, 1)
    stacked = {"decoder": model.num_layers, "vision.encoder": vision_num_layers_built(model.vision)}
    chunks = []
    for hf, can, kind, geo in hf_names.plan(model):
        metas = [source.meta(s) for s in hf]
        dtype = out_dtype or metas[0][1]
        shape = hf_names.fused_shape(kind, [m[0] for m in metas])
        key, layer = dcp.dcp_key(can)

        def produce(hf=hf, can=can, kind=kind, geo=geo, dtype=dtype, layer=layer):
            t = hf_names.fuse(kind, [source.get(s).to(dtype) for s in hf], geo, can)
            if can in ("embedding.weight", "output_layer.weight"):
                t = torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])])
            return t.unsqueeze(0) if layer is not None else t

        if layer is not None:
            n = stacked[key.split(".layers.")[0]]
            chunk = dcp.Chunk(key, (layer,) + (0,) * len(shape), (1,) + shape, (n,) + shape, dtype, produce, can)
        else:
            if can in ("embedding.weight", "output_layer.weight"):
                shape = (padded,) + shape[1:]
            chunk = dcp.Chunk(key, (0,) * len(shape), shape, shape, dtype, produce, can)
        chunks.append(chunk)
    return chunks


def copy_tokenizer(files, dest: str) -> list:
    os.makedirs(dest, exist_ok=True)
    for path in files:
        shutil.copy2(path, os.path.join(dest, os.path.basename(path)))
    return [os.path.basename(p) for p in files]


def add_image_token_to_copy(dest: str, want: int) -> None:
    """Add ``<image>`` at id ``want`` to the tokenizer copy in ``dest``: to its HF form (tokenizer.json /
    tokenizer_config.json: a special added token) and to its sentencepiece tokenizer.model (a CONTROL piece), so
    whichever form is read holds it at the same id (megallava.data.tokenizer.add_image_token)."""
    from megallava.data.tokenizer import add_image_token, image_token_settings

    sp = os.path.join(dest, "tokenizer.model")
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(dest))) as tmp:
        forms = []
        if any(os.path.isfile(os.path.join(dest, n)) for n in ("tokenizer.json", "tokenizer_config.json")):
            out = add_image_token(dest, os.path.join(tmp, "hf"))
            forms.append(("HF tokenizer", out["image_token_id"]))
            for name in os.listdir(out["path"]):
                if name != "tokenizer.model":  # the sentencepiece file gets the token below
                    shutil.copy2(os.path.join(out["path"], name), os.path.join(dest, name))
        if os.path.isfile(sp):
            out = add_image_token(sp, os.path.join(tmp, "tokenizer.model"))
            forms.append(("tokenizer.model", out["image_token_id"]))
            os.replace(out["path"], sp)
    wrong = [f"{form} put it at id {got}" for form, got in forms if got != want]
    if wrong:
        raise ConversionError(f"adding <image> at id {want} to the tokenizer: {'; '.join(wrong)} (its forms disagree "
                              f"on the vocab size): pass --image-token -200, or fix the input's tokenizer files")
    for form, _ in forms:
        path = dest if form == "HF tokenizer" else sp
        assert image_token_settings(path)["image_token_id"] == want, path


def write_fingerprint(iter_dir: str, model) -> None:
    """The trainer's fingerprint.json for a converted checkpoint: the model definition (a run with another
    vocab_size / image_token_id is refused at load, even where the padded shapes agree) and the saved shapes."""
    import dataclasses

    from megallava.training import fingerprint as fp

    fp.write(iter_dir, {"model": {k: getattr(model, k) for k in fp.MODEL_KEYS},
                        "vision": dataclasses.asdict(model.vision), "tokenizer": None},
             {k: list(v) for k, v in sorted(fp.saved_shapes(iter_dir).items())})


def settings_text(model) -> str:
    """The model keys a training config must use with this checkpoint (besides the rest of megallava_model.yaml)."""
    return f"model.vocab_size: {model.vocab_size}, model.image_token_id: {model.image_token_id}"


def hf_to_megatron(input: str, output: str, dtype: str = None, overwrite: bool = False, vision: str = None,
                   projector: str = None, projector_type: str = None, select_layer: int = None, seed: int = 0,
                   image_token: int = None, log=print) -> dict:
    t0 = time.perf_counter()
    check_output(output, overwrite)  # before any reading: a wrong --output fails fast
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    source = open_source(input, vision=vision, projector=projector, projector_type=projector_type,
                         select_layer=select_layer, seed=seed, image_token=image_token)
    source.check()
    model = source.model
    log(f"input: {source.flavour} checkpoint {input}" + (f" + vision tower {source.vision_dir}"
                                                          if source.vision_dir else ""))
    for note in source.notes:
        log(f"note: {note}")
    chunks = plan_chunks(source, DTYPES.get(dtype))
    total = sum(torch.Size(c.sizes).numel() * torch.empty((), dtype=c.dtype).element_size() for c in chunks)
    log(f"model: {model.num_layers} layers, hidden {model.hidden_size}, vocab {model.vocab_size}, projector "
        f"{model.projector}, ViT {vision_num_layers_built(model.vision)}/{model.vision.num_layers} layers used; "
        f"{len(chunks)} chunks, {total / 2 ** 30:.2f} GiB")
    common = {"format_version": dcp.FORMAT_VERSION, "iteration": 0,
              "layout": {"tp": 1, "pp": 1, "vpp": 1, "dp": 1}, "weights_only": True,
              "converted_from": {"flavour": source.flavour, "input": os.path.abspath(input)},
              "hf_source": os.path.abspath(output)}
    with atomic_output(output, overwrite) as tmp:
        name = dcp.iter_dirname(0)
        dcp.write_checkpoint(os.path.join(tmp, name), chunks, common, log)
        write_fingerprint(os.path.join(tmp, name), model)
        dcp.write_latest(tmp, name)
        hf_config.write_model_yaml(os.path.join(tmp, hf_config.MODEL_YAML), model,
                                   f"from {source.flavour} {os.path.abspath(input)}")
        copied = copy_tokenizer(source.tokenizer_files, os.path.join(tmp, TOKENIZER_DIR))
        if source.image_token and source.image_token.add_to_tokenizer:
            add_image_token_to_copy(os.path.join(tmp, TOKENIZER_DIR), source.image_token.id)
        with open(os.path.join(tmp, SOURCE_CONFIG), "w") as f:
            json.dump({"flavour": source.flavour, **source.hf_configs}, f, indent=2)
        n_extra = write_extra(os.path.join(tmp, HF_EXTRA), source, DTYPES.get(dtype), log)
    log(f"kept {n_extra} input tensors megallava does not build (and the input's config) in "
        f"{os.path.join(output, HF_EXTRA)}: megatron-to-hf gives them back")
    if not copied:
        log(f"warning: no tokenizer files found in {input}")
    seconds = time.perf_counter() - t0
    log(f"wrote {output} ({total / 2 ** 30:.2f} GiB in {seconds:.1f} s); train from it with "
        f"--config {os.path.join(output, hf_config.MODEL_YAML)} checkpoint.load={output} (any parallel.tp/pp/vpp)")
    log(f"the training config must use {settings_text(model)}" + (
        f" (the LLM's vocab was {source.image_token.old_vocab}; data.tokenizer: "
        f"{os.path.join(output, TOKENIZER_DIR)} holds <image>, or the input's tokenizer)"
        if source.image_token and source.image_token.vocab != source.image_token.old_vocab else ""))
    return {"output": output, "bytes": total, "seconds": seconds, "flavour": source.flavour, "model": model}
