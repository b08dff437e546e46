"""Logit parity between a HF checkpoint (run with transformers) and a megallava checkpoint (run by the trainer's
model code at a chosen TP x PP (x VPP, uneven pipeline_layers) on forked gloo ranks), on one text + image batch.

The HF side is ``LlavaForConditionalGeneration`` for llava-hf directories; for original-LLaVA and LLaMA + CLIP
inputs it is HF's ``LlamaForCausalLM`` and ``CLIPVisionModel`` composed the way LLaVA does (features of the
selected layer, CLS dropped, projector, placeholder rows of the embeddings replaced).

Bounded memory: the two models never coexist. megallava runs first on forked ranks (this process holds nothing large
when it forks) and only the logits come back; the ranks exit; then the HF model is built here and run. Each side
holds one copy of the weights in the compared dtype plus a tensor or two: both load one tensor at a time with plain
file reads (no memory-mapped safetensors, whose touched pages stay resident until the file is closed, no
transformers ``from_pretrained`` which keeps every shard mapped until the end, and not megatron's
``dist_checkpointing.load``, which materialises every layer's [gate; up] halves before merging them). The
megallava ranks read each canonical (tensor, layer) from the checkpoint (any saved layout) and keep their shard,
with the trainer's sharding rules (model/layout.py); ``trainer_loader=True`` uses the trainer's own
``checkpoint.load`` instead (exactly the resume path; more memory).
"""
import gc

import torch

from megallava import config as C
from megallava.convert import dcp, hf_config, hf_names
from megallava.convert.errors import ConversionError
from megallava.convert.megatron_to_hf import find_model_config
from megallava.convert.sources import _Generated, detect, open_source
from megallava.convert.geometry import vision_num_layers_built
from megallava.convert.tensor_files import TensorFiles
from megallava.local_ranks import run_ranks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _status():
    """(RSS, peak RSS) of this process in bytes (Linux /proc; None elsewhere)."""
    try:
        vals = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    vals[line.split(":")[0]] = int(line.split()[1]) * 1024
        return vals["VmRSS"], vals["VmHWM"]
    except (OSError, KeyError):
        return None


def _reset_peak() -> None:
    """Reset this process's peak-RSS mark (VmHWM) to its current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
# bf16 on both sides: each implementation rounds differently and the difference grows with depth and logit scale;
# a mis-mapped tensor gives differences of order 1 and more.
DEFAULT_TOLERANCE = {"fp32": 1e-3, "bf16": 1e-1}


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
# HF reference, loaded one tensor at a time
# ---------------------------------------------------------------------------------------------------------------

def load_hf(cls, config, directory: str, dtype: torch.dtype, key_map=None):
    """``cls`` built from ``config`` without initialising weights, in ``dtype``, eval mode, eager attention; every
    parameter copied in from ``directory``'s files one tensor at a time. ``key_map(model keys)`` returns the
    function file tensor name -> model key (None: not part of this model); default: the same name. Peak: the model
    plus one tensor."""
    from transformers.initialization import no_init_weights

    config._attn_implementation = "eager"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(dtype).eval()
    state = model.state_dict(keep_vars=True)
    key_of = key_map(set(state)) if key_map else (lambda name: name if name in state else None)
    files = TensorFiles.from_dir(directory)
    loaded = set()
    with torch.no_grad():
        for name in files.names():
            key = key_of(name)
            if key is None:
                continue
            target = state[key]
            if tuple(files.meta(name)[0]) != tuple(target.shape):
                raise ConversionError(f"{files.file_of(name)}: tensor {name!r} has shape {list(files.meta(name)[0])}, "
                                      f"the model built from {directory}/config.json has {list(target.shape)}")
            target.data.copy_(files.get(name))
            loaded.add(id(target))
    missing = [n for n, p in model.named_parameters() if id(p) not in loaded]  # tied weights appear once
    if missing:
        raise ConversionError(f"{directory}: no weights for {', '.join(missing[:10])}" +
                              (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    return model


def _short(name):
    try:
        return hf_names.short_name(name)
    except KeyError:
        return None


def _llava_hf_keys(keys):
    """File names (any llava-hf spelling) -> the keys of transformers' in-memory model, matched by short name."""
    index = {_short(k): k for k in keys if _short(k) is not None}
    return lambda name: index.get(_short(name))


def _clip_keys(keys):
    """CLIPVisionModel / CLIPModel files with or without the "vision_model." level (4.x / 5.x) -> model keys."""
    plain = lambda n: n[len("vision_model."):] if n.startswith("vision_model.") else n  # noqa: E731
    index = {plain(k): k for k in keys}
    return lambda name: index.get(plain(name)) if not name.startswith(("text_model.", "text_projection",
                                                                      "visual_projection", "logit_scale")) else None


class _Composed(torch.nn.Module):
    """LLaVA on HF parts: CLIPVisionModel -> hidden_states[k] (CLS dropped) -> projector -> LlamaForCausalLM."""

    def __init__(self, llm, vit, projector: dict, kind: str, feature_layer: int, image_token_id: int):
        super().__init__()
        self.llm, self.vit, self.kind = llm, vit, kind
        self.feature_layer, self.image_token_id = feature_layer, image_token_id
        dtype = next(llm.parameters()).dtype
        h, vh = projector["proj.linear_1.weight"].shape
        self.linear_1 = torch.nn.Linear(vh, h, dtype=dtype)
        self.linear_1.weight.data.copy_(projector["proj.linear_1.weight"])
        self.linear_1.bias.data.copy_(projector["proj.linear_1.bias"])
        if kind == "mlp2x_gelu":
            self.linear_2 = torch.nn.Linear(h, h, dtype=dtype)
            self.linear_2.weight.data.copy_(projector["proj.linear_2.weight"])
            self.linear_2.bias.data.copy_(projector["proj.linear_2.bias"])

    def forward(self, input_ids, pixel_values, labels=None):
        is_image = input_ids == self.image_token_id
        emb = self.llm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        pixel_values = pixel_values.to(emb.dtype)
        hidden = self.vit(pixel_values, output_hidden_states=True).hidden_states[self.feature_layer][:, 1:]
        feats = self.linear_1(hidden)
        if self.kind == "mlp2x_gelu":
            feats = self.linear_2(torch.nn.functional.gelu(feats))
        emb = emb.masked_scatter(is_image.unsqueeze(-1), feats.to(emb.dtype))
        return self.llm(inputs_embeds=emb, labels=labels)


def hf_reference(source, ckpt_reader, dtype: torch.dtype = torch.float32, log=print):
    """The HF model of ``source`` (sources.open_source) in ``dtype``, eval mode. A freshly initialised projector
    (LLaMA + CLIP input without --projector) is taken from the megallava checkpoint."""
    from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                              LlavaForConditionalGeneration)

    if source.flavour == "llava-hf":
        return load_hf(LlavaForConditionalGeneration, LlavaConfig.from_pretrained(source.path), source.path, dtype,
                       _llava_hf_keys)
    cfg = {k: v for k, v in source.hf_configs["config"].items() if k not in ("model_type", "architectures")}
    llm = load_hf(LlamaForCausalLM, LlamaConfig.from_dict(cfg), source.path, dtype)
    if source.model.vocab_size != llm.config.vocab_size:  # the conversion appended <image> rows (their mean)
        llm.resize_token_embeddings(source.model.vocab_size, mean_resizing=False)
        with torch.no_grad():
            llm.get_input_embeddings().weight.copy_(source.get("lm.embed_tokens.weight"))
            llm.get_output_embeddings().weight.copy_(source.get("head.weight"))
    vit = load_hf(CLIPVisionModel, CLIPVisionConfig.from_pretrained(source.vision_dir), source.vision_dir, dtype,
                  _clip_keys)
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
# megallava side: forked gloo ranks, the trainer's model code
# ---------------------------------------------------------------------------------------------------------------

def run_config(model, tp: int, pp: int, vpp: int = None, pipeline_layers=None, dtype: str = "fp32") -> C.Config:
    cfg = C.Config(model=model)
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp = tp, pp, vpp
    cfg.parallel.pipeline_layers = list(pipeline_layers) if pipeline_layers else None
    cfg.train.precision = dtype
    cfg.data.max_images_per_sample = 0
    return cfg


def check_run_config(cfg: C.Config) -> None:
    par = cfg.parallel
    try:
        C.validate(cfg, par.tp * par.pp)
    except C.ConfigError as err:
        layout = f"tp={par.tp} pp={par.pp}" + (f" vpp={par.vpp}" if par.vpp else "") + \
                 (f" pipeline_layers={par.pipeline_layers}" if par.pipeline_layers else "")
        raise ConversionError([f"megallava at {layout}: {p}" for p in err.problems]) from None


@torch.no_grad()
def stream_load(ckpt: str, chunks) -> None:
    """Fill this rank's parameters from the checkpoint one canonical (tensor, layer) at a time: read it whatever
    layout saved it, keep this rank's TP shard (the trainer's rules, model/layout.py)."""
    from megatron.core import parallel_state
    from megallava.model.layout import is_tensor_parallel, shard
    from megallava.model.init import iter_canonical_params, unwrap

    reader = dcp.CheckpointReader(ckpt)
    tp, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    first = unwrap(chunks[0])
    for name, param in iter_canonical_params(chunks):
        key, layer = dcp.dcp_key(name)
        if reader.tensor_meta(key) is None:
            raise ConversionError(f"{reader.dir}: no tensor {key!r} for the model's {name}")
        full = reader.read(key, layer)
        if name in ("embedding.weight", "output_layer.weight"):
            full = full[:first.vocab_size]
        local = shard(full, name, is_tensor_parallel(param), getattr(param, "partition_dim", 0), tp_rank, tp,
                      first.padded_vocab_size)
        if tuple(local.shape) != tuple(param.shape):
            raise ConversionError(f"{reader.dir}: {name} gives a shard of shape {list(local.shape)}, the model at "
                                  f"tp={tp} has {list(param.shape)}")
        param.copy_(local)
        del full, local


def megallava_logits(ckpt: str, model, batch, tp: int = 1, pp: int = 1, vpp: int = None, pipeline_layers=None,
                     dtype: str = "fp32", trainer_loader: bool = False, with_loss: bool = True, stats: dict = None):
    """(logits [b, s, vocab] fp32, mean token loss or None) of the checkpoint run by megallava at the layout. Each
    sequence is one micro-batch (repeated to a multiple of pp under the interleaved schedule). ``stats`` (a dict)
    receives "peak_growth": the ranks' peak RSS above their RSS at start, summed (bytes; None without /proc)."""
    ids, pixels, labels = batch
    cfg = run_config(model, tp, pp, vpp, pipeline_layers, dtype)
    check_run_config(cfg)
    rows = ids.shape[0]
    n_micro = rows if not vpp else -(-rows // pp) * pp
    per_image = (model.vision.image_size // model.vision.patch_size) ** 2
    counts = [int((ids[i] == model.image_token_id).sum()) // per_image for i in range(rows)]
    starts = [sum(counts[:i]) for i in range(rows)]
    micro = [(ids[i:i + 1], pixels[starts[i]:starts[i] + counts[i]] if counts[i] else None, labels[i:i + 1])
             for i in (r % rows for r in range(n_micro))]

    def fn(rank, env):
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megallava.distributed import init_distributed
        from megallava.model.build import build_chunks
        from megallava.training import checkpoint

        _reset_peak()
        start = _status()
        init_distributed(tp, pp, vpp, seed=0, env=env)
        chunks = build_chunks(cfg)
        if trainer_loader:
            checkpoint.load(ckpt, chunks, None, None, load_optimizer=False)
        else:
            stream_load(ckpt, chunks)
        for c in chunks:
            c.eval()

        def run(with_labels):
            def step(data_iterator, model_chunk):
                t, p, lab = next(data_iterator)
                return model_chunk(tokens=t, images=p, labels=lab if with_labels else None), None

            iters = [iter(micro) for _ in chunks]
            with torch.no_grad():
                out = get_forward_backward_func()(
                    forward_step_func=step, data_iterator=iters if len(chunks) > 1 else iters[0],
                    model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=n_micro,
                    seq_length=ids.shape[1], micro_batch_size=1, forward_only=True)
            return [o.float().cpu() for o in out[:rows]] if out else None

        out = {"tp_rank": parallel_state.get_tensor_model_parallel_rank(),
               "last": parallel_state.is_pipeline_last_stage(ignore_virtual=True), "logits": run(False),
               "token_loss": run(True) if with_loss else None}
        end = _status()
        out["growth"] = end[1] - start[0] if start and end else None
        return out

    everyone = run_ranks(tp * pp, fn, timeout=3600)
    growth = [r["growth"] for r in everyone]
    if stats is not None:
        stats["peak_growth"] = sum(growth) if None not in growth else None
    results = [r for r in everyone if r["last"]]
    results.sort(key=lambda r: r["tp_rank"])
    logits = torch.cat([torch.cat([r["logits"][i] for i in range(rows)]) for r in results],
                       dim=-1)[..., :model.vocab_size]
    if not with_loss:
        return logits, None
    n = (labels >= 0).sum()
    return logits, float(torch.cat(results[0]["token_loss"]).sum() / n)


def verify(hf_dir: str, ckpt: str, tp: int = 1, pp: int = 1, tolerance: float = None, config: str = None,
           vision: str = None, projector: str = None, seed: int = 0, vpp: int = None, pipeline_layers=None,
           dtype: str = "fp32", trainer_loader: bool = False, log=print) -> dict:
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
    reader = dcp.CheckpointReader(ckpt)
    model, where = find_model_config(reader.root, config, reader.dir)
    hf_config.check_model(model, where)
    check_run_config(run_config(model, tp, pp, vpp, pipeline_layers, dtype))  # named before any work
    ids, pixels, hf_labels, labels = make_batch(model, seed)
    # a LLaMA + CLIP input converted with --image-token -200 is compared with that placeholder
    image_token = model.image_token_id if model.image_token_id < 0 and detect(hf_dir) == "llama" else None
    source = open_source(hf_dir, vision=vision, projector=projector, image_token=image_token)
    source.check()
    if source.model.vocab_size != model.vocab_size or source.model.image_token_id != model.image_token_id:
        raise ConversionError(f"{hf_dir} (vocab {source.model.vocab_size}, image token {source.model.image_token_id})"
                              f" and {where} (vocab {model.vocab_size}, image token {model.image_token_id}) describe "
                              f"different models")
    # 1. megallava on forked ranks (this process holds nothing large when they fork); only logits come back.
    stats = {}
    logits, loss = megallava_logits(reader.dir, model, (ids, pixels, labels), tp, pp, vpp, pipeline_layers, dtype,
                                    trainer_loader, stats=stats)
    megallava_growth = stats["peak_growth"]
    gc.collect()
    # 2. HF here, after the ranks have exited.
    _reset_peak()
    before = _status()
    ref = hf_reference(source, reader, DTYPES[dtype], log)
    copy_bytes = sum(p.numel() for p in ref.parameters()) * torch.empty((), dtype=DTYPES[dtype]).element_size()
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=pixels.to(DTYPES[dtype]), labels=hf_labels)
    hf_logits, hf_loss = out.logits.float(), float(out.loss)
    after = _status()
    hf_growth = after[1] - before[0] if before and after else None
    del ref, out
    gc.collect()
    if logits.shape != hf_logits.shape:
        raise ConversionError(f"logit shapes differ: HF {list(hf_logits.shape)}, megallava {list(logits.shape)}")
    diff = (logits - hf_logits).abs()
    layout = f"tp={tp} pp={pp}" + (f" vpp={vpp}" if vpp else "") + \
             (f" pipeline_layers={','.join(map(str, pipeline_layers))}" if pipeline_layers else "")
    result = {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(), "hf_loss": hf_loss,
              "megallava_loss": loss, "loss_diff": abs(loss - hf_loss), "max_abs_logit": hf_logits.abs().max().item(),
              "tp": tp, "pp": pp, "vpp": vpp, "pipeline_layers": pipeline_layers, "dtype": dtype,
              "tolerance": tolerance, "flavour": source.flavour}
    result.update(weights_bytes=copy_bytes, hf_peak_growth=hf_growth, megallava_peak_growth=megallava_growth)
    result["ok"] = result["max_abs_diff"] <= tolerance and result["loss_diff"] <= tolerance
    log(f"verify {source.flavour} {hf_dir} vs megallava {reader.dir} at {layout} in {dtype}: "
        f"max |logit diff| {result['max_abs_diff']:.3e}, mean {result['mean_abs_diff']:.3e} "
        f"(max |logit| {result['max_abs_logit']:.2f}); loss HF {hf_loss:.6f} megallava {loss:.6f} "
        f"(diff {result['loss_diff']:.3e}) -> {'OK' if result['ok'] else 'FAIL'} (tolerance {tolerance:g})")
    if hf_growth is not None and megallava_growth is not None:
        size = lambda b: f"{b / 2 ** 30:.2f} GiB" if b >= 2 ** 30 else f"{b / 2 ** 20:.0f} MiB"  # noqa: E731
        log(f"memory: one {dtype} copy of the weights {size(copy_bytes)}; peak RSS growth HF {size(hf_growth)} "
            f"({hf_growth / copy_bytes:.2f}x), megallava ranks together {size(megallava_growth)} "
            f"({megallava_growth / copy_bytes:.2f}x); never both at once")
    return result
