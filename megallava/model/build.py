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


def set_trainable(chunk: LLaVAChunk, model_cfg) -> None:
    """LLaVA's stages: stage 1 trains the projector only; stage 2 the projector and LLM; the ViT optionally."""
    for name, param in chunk.named_parameters():
        if name.startswith("vision."):
            param.requires_grad_(model_cfg.train_vision)
        elif name.startswith("projector."):
            param.requires_grad_(model_cfg.train_projector)
        else:
            param.requires_grad_(model_cfg.train_llm)


def build_chunks(cfg, init_seed=None) -> List[LLaVAChunk]:
    config = llm_transformer_config(cfg, C.resolved_pipeline_layers(cfg), params_dtype(cfg))
    vpp = cfg.parallel.vpp if cfg.parallel.pp > 1 else None
    chunks = []
    for vp in range(vpp or 1):
        vp_stage = vp if vpp else None
        chunk = LLaVAChunk(cfg.model, config,
                           pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                           post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                           vp_stage=vp_stage, kernels=cfg.kernels)
        set_trainable(chunk, cfg.model)
        chunks.append(chunk)
    init_weights(chunks, cfg.train.seed if init_seed is None else init_seed, cfg.model.init_std)
    if torch.cuda.is_available():
        chunks = [c.cuda() for c in chunks]
    return chunks
