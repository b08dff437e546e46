"""CLIP ViT (HF CLIPVisionModel semantics) on megatron-core's TransformerBlock, tensor-parallel like the LLM.

Only the layers up to ``select_layer`` are built (penultimate by default: LLaVA's ``mm_vision_select_layer -2``),
so no compute or memory is spent on layers whose output the LLM never sees. The CLS token is dropped.
"""
import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from torch import nn

from megallava.model.norms import LayerNorm
from megallava.model.specs import COMMON_CONFIG, transformer_layer_spec


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's activation. Ours, not megatron's: that one is torch.compile'd, which costs ~25 s on the first CPU step."""
    return x * torch.sigmoid(1.702 * x)


def vision_num_layers_built(vcfg) -> int:
    return vcfg.num_layers + vcfg.select_layer + 1


def vision_transformer_config(vcfg, llm_config: TransformerConfig) -> TransformerConfig:
    """Same TP size and dtype as the LLM; never pipelined, never sequence-parallel (it runs before the SP scatter)."""
    return TransformerConfig(
        num_layers=vision_num_layers_built(vcfg),
        hidden_size=vcfg.hidden_size,
        ffn_hidden_size=vcfg.ffn_hidden_size,
        num_attention_heads=vcfg.num_attention_heads,
        kv_channels=vcfg.hidden_size // vcfg.num_attention_heads,
        normalization="LayerNorm",
        layernorm_epsilon=vcfg.layer_norm_eps,
        gated_linear_unit=False,
        activation_func=quick_gelu,
        add_bias_linear=True,
        add_qkv_bias=True,
        tensor_model_parallel_size=llm_config.tensor_model_parallel_size,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        params_dtype=llm_config.params_dtype,
        pipeline_dtype=llm_config.params_dtype,
        bf16=llm_config.bf16,
        **COMMON_CONFIG,
    )


def vision_layer_spec() -> ModuleSpec:
    return transformer_layer_spec(LayerNorm, AttnMaskType.no_mask)


class CLIPVisionTower(MegatronModule):
    def __init__(self, vcfg, config: TransformerConfig):
        super().__init__(config=config)
        h = vcfg.hidden_size
        self.num_patches = (vcfg.image_size // vcfg.patch_size) ** 2
        dtype = config.params_dtype
        self.patch_embedding = nn.Conv2d(vcfg.num_channels, h, kernel_size=vcfg.patch_size,
                                         stride=vcfg.patch_size, bias=False, dtype=dtype)
        self.class_embedding = nn.Parameter(torch.zeros(h, dtype=dtype))
        self.position_embedding = nn.Parameter(torch.zeros(self.num_patches + 1, h, dtype=dtype))
        self.pre_layernorm = LayerNorm(config, h, eps=vcfg.layer_norm_eps)
        n = vision_num_layers_built(vcfg)
        self.encoder = TransformerBlock(
            config, TransformerBlockSubmodules(layer_specs=[vision_layer_spec()] * n, layer_norm=None),
            pre_process=True, post_process=False)

    def set_input_tensor(self, input_tensor):  # never pipelined
        pass

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [n, 3, H, W] -> patch features [n, num_patches, hidden] (CLS dropped)."""
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [n, h, g, g]
        x = x.flatten(2).transpose(1, 2)  # [n, p, h]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding
        x = self.pre_layernorm(x)
        x = self.encoder(x.transpose(0, 1).contiguous(), attention_mask=None)  # [s, n, h]
        return x[1:].transpose(0, 1)
