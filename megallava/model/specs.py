"""What the LLM and the ViT share: the megatron TransformerLayer spec with our norms and SDPA attention, and the
TransformerConfig flags common to both."""
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megallava.model.attention import SDPACoreAttention

COMMON_CONFIG = dict(
    hidden_dropout=0.0,
    attention_dropout=0.0,
    # megatron's jit/apex fusions are off: they need CUDA or compile on first use; SDPA is our attention kernel.
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    apply_rope_fusion=False,
    persist_layer_norm=False,
    gradient_accumulation_fusion=False,
    # megatron marks TP attributes (partition_dim, ...) only when it initialises; megallava.model.init then
    # overwrites every weight with a layout-independent draw.
    perform_initialization=True,
)


def _linear(name: str, base, lora):
    """``base`` (megatron's column/row-parallel linear), or its LoRA version when ``lora`` targets ``name``."""
    if lora is None or name not in lora.targets:
        return base
    from megallava.model.lora import LoRAColumnParallelLinear, LoRARowParallelLinear

    params = {"lora_rank": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
              "quantize": lora.quantize}
    if base is ColumnParallelLinear:
        kind = {"linear_qkv": "qkv", "linear_fc1": "gated"}[name]
        return ModuleSpec(module=LoRAColumnParallelLinear, params={**params, "kind": kind})
    return ModuleSpec(module=LoRARowParallelLinear, params=params)


def transformer_layer_spec(norm, attn_mask_type: AttnMaskType, lora=None) -> ModuleSpec:
    """Pre-norm layer: norm -> self-attention (fused QKV, SDPA) -> residual -> norm -> MLP -> residual. ``norm`` is
    a module class or a ModuleSpec carrying its params (e.g. RMSNorm's ``fused``); ``lora`` (the config's lora
    section, or None) swaps the targeted linears for their LoRA versions (megallava.model.lora)."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=_linear("linear_qkv", ColumnParallelLinear, lora), core_attention=SDPACoreAttention,
                    linear_proj=_linear("linear_proj", RowParallelLinear, lora), q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                linear_fc1=_linear("linear_fc1", ColumnParallelLinear, lora),
                linear_fc2=_linear("linear_fc2", RowParallelLinear, lora))),
            mlp_bda=get_bias_dropout_add,
        ),
    )
