"""LoRA checkpoints -> HF: merged into the base weights (``megatron-to-hf --merge-lora``), or as a PEFT adapter
(adapter_config.json + adapter_model.safetensors, what ``peft.PeftModel.from_pretrained(hf_base, dir)`` loads).

megallava keeps one adapter per HF projection inside each fused linear (megallava.model.lora): ``lora_a`` stacks
their A matrices ([3r, h] for q/k/v, [2r, h] for gate/up, [r, in] otherwise) and ``lora_b`` has the base weight's
rows in its fused layout (per query group q, k, v rows; [gate; up]). So the same ``hf_names.split`` that splits a
fused base weight into HF's q/k/v or gate/up splits ``lora_b``, and ``lora_a`` splits into equal r-row blocks.
The update of a base weight is ``scale * B_hf @ A_hf`` per projection, scale = alpha / rank (PEFT's convention).
"""
import json
import os
from typing import Dict, Optional

import torch

from megallava.convert import dcp, hf_names

LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
PEFT_TARGETS = {"self_attention.linear_qkv": ("q_proj", "k_proj", "v_proj"), "self_attention.linear_proj": ("o_proj",),
                "mlp.linear_fc1": ("gate_proj", "up_proj"), "mlp.linear_fc2": ("down_proj",)}
_KIND = {"self_attention.linear_qkv": "qkv", "mlp.linear_fc1": "fc1"}


class LoRAReader:
    """The LoRA tensors of a checkpoint (if any) and their settings (rank, alpha) from the run config."""

    def __init__(self, reader: dcp.CheckpointReader, model, runs):
        """``runs``: (path, raw YAML) of the run configs that describe the checkpoint (megatron_to_hf.run_configs);
        the first with a lora section gives alpha (default 2 x rank, as training)."""
        self.reader, self.model = reader, model
        self.linears = [n for n in LINEARS if reader.tensor_meta(f"decoder.layers.{n}.lora_a") is not None]
        lora = next((raw["lora"] for _, raw in runs if isinstance(raw.get("lora"), dict) and raw["lora"].get("rank")),
                    None)
        self.rank = self.alpha = None
        if self.linears:
            b = reader.tensor_meta(f"decoder.layers.{self.linears[0]}.lora_b")
            self.rank = int(b.size[-1])
            alpha = (lora or {}).get("alpha")
            self.alpha = float(alpha) if alpha is not None else 2.0 * self.rank  # megallava's default: 2 x rank
        self.geo = (model.num_attention_heads, model.num_query_groups or model.num_attention_heads,
                    model.hidden_size // model.num_attention_heads)

    def __bool__(self):
        return bool(self.linears)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def adapters(self, linear: str, layer: int):
        """[(A [r, in], B [out, r]) per HF projection of ``linear`` at ``layer``], in PEFT_TARGETS order, fp32."""
        a = self.reader.read(f"decoder.layers.{linear}.lora_a", layer).float()
        b = self.reader.read(f"decoder.layers.{linear}.lora_b", layer).float()
        kind = _KIND.get(linear, "copy")
        bs = hf_names.split(kind, b, self.geo, f"{linear}.lora_b")
        return list(zip(a.split(self.rank), bs))

    def merged(self, can: str, weight: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The canonical base weight ``can`` with its LoRA update added in fp32, then cast to ``dtype`` (the
        export's; default the weight's own): a bf16 checkpoint exported in fp32 keeps the merged weights unrounded."""
        key, layer = dcp.dcp_key(can)
        linear = next((n for n in self.linears if key == f"decoder.layers.{n}.weight"), None)
        if linear is None:
            return weight
        deltas = [b @ a * self.scale for a, b in self.adapters(linear, layer)]
        delta = hf_names.fuse(_KIND.get(linear, "copy"), deltas, self.geo, can) if len(deltas) > 1 else deltas[0]
        return (weight.float() + delta).to(dtype or weight.dtype)


def write_peft_adapter(lora: LoRAReader, out_dir: str, projector_weights: Dict[str, torch.Tensor],
                       dtype: Optional[torch.dtype] = None) -> Dict[str, int]:
    """adapter_config.json + adapter_model.safetensors in PEFT's format for HF's LlavaForConditionalGeneration:
    lora_A/lora_B per targeted projection of the language model; the (trained) projector as modules_to_save."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    prefix = "base_model.model.model.language_model.layers"
    for layer in range(lora.model.num_layers):
        for linear in lora.linears:
            section = "self_attn" if linear.startswith("self_attention") else "mlp"
            for proj, (a, b) in zip(PEFT_TARGETS[linear], lora.adapters(linear, layer)):
                tensors[f"{prefix}.{layer}.{section}.{proj}.lora_A.weight"] = a
                tensors[f"{prefix}.{layer}.{section}.{proj}.lora_B.weight"] = b
    for name, t in projector_weights.items():  # "linear_1.weight" ...
        tensors[f"base_model.model.model.multi_modal_projector.{name}"] = t
    tensors = {k: v.to(dtype or v.dtype).contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    targets = sorted({p for n in lora.linears for p in PEFT_TARGETS[n]})
    config = {"peft_type": "LORA", "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": 0.0, "bias": "none",
              "target_modules": r".*language_model.*\.(" + "|".join(targets) + ")",
              "modules_to_save": ["multi_modal_projector"], "fan_in_fan_out": False, "init_lora_weights": True,
              "inference_mode": True, "task_type": None, "base_model_name_or_path": None,
              "auto_mapping": {"base_model_class": "LlavaForConditionalGeneration",
                               "parent_library": "transformers.models.llava.modeling_llava"}}
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return {"tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values())}
