"""One pipeline chunk of a LLaVA model: [ViT -> projector -> embedding merge] (first chunk only), LLaMA layers,
[final norm -> vocab-parallel output + loss] (last chunk only)."""
from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import (
    TransformerBlock, TransformerBlockSubmodules, get_num_layers_to_build)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megallava.config import KernelsConfig
from megallava.model import fused
from megallava.model.attention import packed_attention_mask
from megallava.model.cross_entropy import fused_vocab_parallel_cross_entropy
from megallava.model.llama import llm_layer_spec, llm_norm, padded_vocab_size, rotary_freqs
from megallava.model.projector import Projector
from megallava.model.vision import CLIPVisionTower, vision_transformer_config


def _no_init(_):
    pass


class LLaVAChunk(MegatronModule):
    def __init__(self, model_cfg, config: TransformerConfig, pre_process: bool, post_process: bool,
                 vp_stage: Optional[int] = None, kernels=None, lora=None):
        """``kernels``: the config's kernels section (null switches = on with CUDA); ``lora``: the lora section when
        LoRA is on (megallava.model.lora), else None."""
        super().__init__(config=config)
        self.model_cfg = model_cfg
        self.kernels = fused.resolve(kernels if kernels is not None else KernelsConfig())
        # Read by megatron's schedules and finalize_model_grads: LLaMA's embedding and lm_head are untied.
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        self.pre_process, self.post_process, self.vp_stage = pre_process, post_process, vp_stage
        tp = config.tensor_model_parallel_size
        self.vocab_size = model_cfg.vocab_size
        self.padded_vocab_size = padded_vocab_size(model_cfg.vocab_size, model_cfg.make_vocab_size_divisible_by, tp)
        self.vision_calls = 0  # counted so tests can assert a text-only micro-batch never runs the ViT

        if pre_process:
            self.embedding = tensor_parallel.VocabParallelEmbedding(
                self.padded_vocab_size, config.hidden_size, init_method=_no_init, config=config)
            vconfig = vision_transformer_config(model_cfg.vision, config)
            self.vision = CLIPVisionTower(model_cfg.vision, vconfig)
            self.projector = Projector(model_cfg.projector, model_cfg.vision.hidden_size, config.hidden_size, vconfig)

        num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
        self.layer_offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
        norm = self.kernels.fused_rmsnorm
        self.decoder = TransformerBlock(
            config, TransformerBlockSubmodules(layer_specs=[llm_layer_spec(norm, lora)] * num_layers,
                                               layer_norm=llm_norm(norm)),
            pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)

        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, self.padded_vocab_size, config=config, init_method=_no_init, bias=False,
                gather_output=False)

    def set_input_tensor(self, input_tensor):
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    # --- first chunk -------------------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor, images: Optional[torch.Tensor]) -> torch.Tensor:
        """tokens [b, s] with ``image_token_id`` runs (one id per image feature); images [n, 3, H, W] in order of
        appearance. Returns decoder input [s, b, h] (scattered over TP ranks under sequence parallelism)."""
        is_image = tokens == self.model_cfg.image_token_id
        emb = self.embedding(tokens.masked_fill(is_image, 0))  # [b, s, h]
        n_images = 0 if images is None else images.shape[0]
        n_slots = int(is_image.sum())
        if n_slots != n_images * self.vision.num_patches:
            raise ValueError(f"micro-batch has {n_slots} image placeholder tokens but {n_images} images x "
                             f"{self.vision.num_patches} features: expand each <image> to exactly that many ids")
        if n_images:
            self.vision_calls += 1
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.model_cfg.train_vision):
                features = self.vision(images)
            features = self.projector(features)  # [n, p, h]
            emb = emb.masked_scatter(is_image.unsqueeze(-1), features.to(emb.dtype))
        emb = emb.transpose(0, 1).contiguous()
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
        return emb

    # --- last chunk --------------------------------------------------------------------------------------------
    def vocab_parallel_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[s, b, h] -> [s, b, padded_vocab / tp] with padding columns at -inf so they never enter the softmax."""
        logits, _ = self.output_layer(hidden)
        part = logits.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * part
        if start + part > self.vocab_size:
            pad = torch.arange(start, start + part, device=logits.device) >= self.vocab_size
            logits = logits.masked_fill(pad, float("-inf"))
        return logits

    def forward(self, tokens: Optional[torch.Tensor] = None, images: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None):
        """Returns per-token loss [b, s] (0 where label is -100) on the last chunk when labels are given, vocab-parallel
        logits [b, s, v/tp] on the last chunk otherwise, and hidden states on other chunks.

        Packed rows (data.packing): ``position_ids`` [b, s] give each token's RoPE position (restarting at 0 per
        sample) and ``segment_ids`` [b, s] which sample of the row it belongs to; attention is then causal within a
        segment only. Both cover the full sequence, also under sequence parallelism (attention sees it gathered)."""
        hidden = self.embed(tokens, images) if self.pre_process else None
        local = hidden if hidden is not None else self.decoder.input_tensor
        seq_length = local.shape[0] * (self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1)
        rope = rotary_freqs(seq_length, self.config.kv_channels, self.model_cfg.rope_theta, device=local.device)
        if position_ids is not None:
            rope = rope[:, 0, 0][position_ids.t().to(local.device)].unsqueeze(2)  # [s, 1, 1, d] -> [s, b, 1, d]
        mask = None
        if segment_ids is not None:  # one mask per micro-batch, shared by every layer
            # A BlockMask is no tensor and cannot pass megatron's recompute (checkpoint) functions: dense mask then.
            flex = self.kernels.flex_attention and self.config.recompute_granularity is None
            mask = packed_attention_mask(segment_ids.to(local.device), use_flex=flex)
        hidden = self.decoder(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rope)
        if not self.post_process:
            return hidden
        if labels is None:
            return self.vocab_parallel_logits(hidden).transpose(0, 1).contiguous()
        target = labels.transpose(0, 1).contiguous()
        if self.kernels.fused_cross_entropy:
            loss = fused_vocab_parallel_cross_entropy(self._output_layer_input(hidden), self.output_layer.weight,
                                                      target, self.vocab_size, self.kernels.cross_entropy_chunk)
            return loss.transpose(0, 1).contiguous()
        logits = self.vocab_parallel_logits(hidden)
        ignore = target < 0
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), target.masked_fill(ignore, 0))
        return loss.masked_fill(ignore, 0.0).transpose(0, 1).contiguous()

    # --- generation ------------------------------------------------------------------------------------------
    def forward_inference(self, tokens: Optional[torch.Tensor], images: Optional[torch.Tensor], rope: torch.Tensor,
                          attention_mask: torch.Tensor, context) -> torch.Tensor:
        """One generation step over megatron's KV cache (``context``: a StaticInferenceContext whose
        ``sequence_len_offset`` is the number of positions already cached). tokens [b, s_step] on the first chunk
        (later chunks take the previous stage's hidden states through ``set_input_tensor``); rope [S, b, 1, d] the
        angles of positions 0 .. offset + s_step - 1 (megatron slices the new ones); attention_mask [b, 1, s_step,
        offset + s_step] (True = masked out: padding keys, and the future during the prompt).
        Returns the last position's logits over the real vocab [b, V] in fp32 on the last chunk (gathered over TP:
        every TP rank holds them), hidden states [s_step, b, h] elsewhere. No sequence parallelism."""
        hidden = self.embed(tokens, images) if self.pre_process else None
        hidden = self.decoder(hidden_states=hidden, attention_mask=attention_mask, rotary_pos_emb=rope,
                              inference_context=context)
        if not self.post_process:
            return hidden
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(self.vocab_parallel_logits(hidden[-1:]))
        return logits[0, :, :self.vocab_size].float()

    def _output_layer_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """What ColumnParallelLinear does to its input before the GEMM, for the fused cross-entropy that uses the
        output layer's weight directly: gather the sequence (SP; reduce-scatter of the grad) or enter the TP region
        (all-reduce of the grad)."""
        if self.config.sequence_parallel:
            return tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
        if self.config.tensor_model_parallel_size > 1:
            return tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
        return hidden
