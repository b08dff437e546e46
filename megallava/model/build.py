"""Build this rank's model chunks (one per virtual pipeline stage), set what trains, and initialise weights."""
from typing import List

import torch
from megatron.core import parallel_state

from megallava import config as C
from megallava.model.init import init_weights
from megallava.model.llama import llm_transformer_config
from megallava.model.llava import LLaVAChunk


def params_dtype(cfg) -> torch.dtype:
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def lora_settings(cfg):
    """The config's lora section when LoRA is on (lora.rank > 0), else None."""
    lora = getattr(cfg, "lora", None)
    return lora if lora is not None and lora.rank > 0 else None


def set_trainable(chunk: LLaVAChunk, model_cfg, lora=None) -> None:
    """LLaVA's stages: stage 1 trains the projector only; stage 2 the projector and LLM; the ViT optionally.
    With LoRA, "the LLM" means its adapters: base weights, norms, embedding and output layer stay frozen (the
    paper's setting)."""
    for name, param in chunk.named_parameters():
        if name.startswith("vision."):
            param.requires_grad_(model_cfg.train_vision)
        elif name.startswith("projector."):
            param.requires_grad_(model_cfg.train_projector)
        elif lora is not None:
            param.requires_grad_(model_cfg.train_llm and (name.endswith(".lora_a") or name.endswith(".lora_b")))
        else:
            param.requires_grad_(model_cfg.train_llm)


def build_chunks(cfg, init_seed=None) -> List[LLaVAChunk]:
    config = llm_transformer_config(cfg, C.resolved_pipeline_layers(cfg), params_dtype(cfg))
    vpp = cfg.parallel.vpp if cfg.parallel.pp > 1 else None
    lora = lora_settings(cfg)
    chunks = []
    for vp in range(vpp or 1):
        vp_stage = vp if vpp else None
        chunk = LLaVAChunk(cfg.model, config,
                           pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                           post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                           vp_stage=vp_stage, kernels=cfg.kernels, lora=lora)
        set_trainable(chunk, cfg.model, lora)
        chunks.append(chunk)
    init_weights(chunks, cfg.train.seed if init_seed is None else init_seed, cfg.model.init_std)
    # QLoRA bases are quantised by the trainer once the base weights are loaded (megallava.model.lora.quantize_bases)
    if torch.cuda.is_available():
        chunks = [c.cuda() for c in chunks]
    return chunks


def parameter_counts(cfg) -> dict:
    """Parameters of the whole model (canonical, TP1 x PP1) from its config alone: the chunk is built on the meta
    device, so nothing is allocated, even at 70B. Needs megatron's parallel_state (one rank is enough). Returns
    {"total", "trainable", "vision", "projector", "llm", "lora"} (lora: adapter parameters; llm: the rest of the
    LLM, embedding and output layer included; the vocab padding is counted, as it is stored)."""
    import dataclasses

    config = llm_transformer_config(cfg, None, params_dtype(cfg))
    config = dataclasses.replace(config, use_cpu_initialization=True, perform_initialization=False,
                                 pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
                                 pipeline_model_parallel_layout=None, tensor_model_parallel_size=1,
                                 sequence_parallel=False)
    lora = lora_settings(cfg)
    with torch.device("meta"):
        chunk = LLaVAChunk(cfg.model, config, pre_process=True, post_process=True, kernels=cfg.kernels, lora=lora)
    set_trainable(chunk, cfg.model, lora)
    counts = dict.fromkeys(("total", "trainable", "vision", "projector", "llm", "lora"), 0)
    for name, p in chunk.named_parameters():
        n = p.numel()
        counts["total"] += n
        counts["trainable"] += n if p.requires_grad else 0
        part = ("lora" if name.endswith((".lora_a", ".lora_b")) else name.split(".")[0]
                if name.startswith(("vision.", "projector.")) else "llm")
        counts[part] += n
    return counts
