"""LLaMA decoder on megatron-core: TransformerConfig from our config, and the layer spec (RMSNorm, SwiGLU, RoPE, GQA,
no biases) with SDPA core attention."""
import math

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from megallava.model import fused
from megallava.model.norms import RMSNorm
from megallava.model.specs import COMMON_CONFIG, transformer_layer_spec


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Vocab rows padded to a multiple of ``divisible_by x lcm(tp, 8)``: the same padded size at every tp <= 8, so
    a checkpoint's embedding and output layer reshard between TP sizes without conversion. Padding rows are
    zero and masked to -inf before the softmax, so they never change the loss."""
    multiple = divisible_by * math.lcm(tp, 8)
    return ((vocab_size + multiple - 1) // multiple) * multiple


def pipeline_layout(pipeline_layers):
    """megatron's layout list for per-(virtual-)stage LLM layer counts, given in layer order."""
    if pipeline_layers is None:
        return None
    layout = [["decoder"] * n for n in pipeline_layers]
    layout[0].insert(0, "embedding")
    layout[-1].append("loss")
    return layout


def recompute_config(train_cfg) -> dict:
    """train.recompute as megatron flags: ``full`` keeps only each layer's input and reruns the layer in backward;
    ``selective`` reruns the listed sub-modules (megatron's default: core attention)."""
    if train_cfg.recompute == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if train_cfg.recompute == "selective":
        return dict(recompute_granularity="selective", recompute_modules=list(train_cfg.recompute_modules))
    return {}


def llm_transformer_config(cfg, pipeline_layers, params_dtype: torch.dtype) -> TransformerConfig:
    m, p = cfg.model, cfg.parallel
    bf16 = params_dtype == torch.bfloat16
    kernels = fused.resolve(cfg.kernels)
    if kernels.fused_rope:
        fused.install_rope_fusion()  # before TransformerConfig: it refuses apply_rope_fusion with an empty slot
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups or m.num_attention_heads,
        kv_channels=m.hidden_size // m.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=m.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        init_method_std=m.init_std,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp if p.pp > 1 else None,
        pipeline_model_parallel_layout=pipeline_layout(pipeline_layers),
        sequence_parallel=p.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=bf16,
        moe_token_dispatcher_type="alltoall",  # unused (no MoE); the default refuses variable_seq_lengths
        # Micro-batches are padded to their own longest sample and stages exchange shapes first, except with vpp:
        # megatron's shape exchange is always batched (the mispairing below), so interleaving pads a step to its
        # longest micro-batch instead (training/step.py).
        variable_seq_lengths=not (p.pp > 1 and p.vpp),
        # megatron's batched p2p pairs messages per peer in issue order; at pp=2 the previous and next stage are the
        # same peer and the interleaved schedule's combined send/recv then swaps activations and gradients. The
        # unbatched path sends each direction on its own process group.
        batch_p2p_comm=False,
        calculate_per_token_loss=True,        # loss = sum over trained tokens / their count, across micro-batches and DP
        **{**COMMON_CONFIG, **recompute_config(cfg.train),
           "bias_activation_fusion": kernels.fused_swiglu,  # megatron's compiled SwiGLU (fwd and bwd)
           "apply_rope_fusion": kernels.fused_rope},
    )


def llm_norm(fused_rmsnorm: bool) -> ModuleSpec:
    return ModuleSpec(module=RMSNorm, params={"fused": fused_rmsnorm})


def llm_layer_spec(fused_rmsnorm: bool = False, lora=None) -> ModuleSpec:
    """``lora``: the config's lora section when LoRA is on (lora.rank > 0), else None."""
    return transformer_layer_spec(llm_norm(fused_rmsnorm), AttnMaskType.causal, lora)


def rotary_freqs(seq_len: int, head_dim: int, theta: float, device=None) -> torch.Tensor:
    """RoPE angles in megatron's layout [s, 1, 1, d] (rotate-half form, as HF LLaMA: no q/k permutation)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
