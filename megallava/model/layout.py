"""Canonical (unsharded) parameter layout and the tensor-parallel sharding rules.

The canonical layout is what a TP1 x PP1 model holds, with global layer numbers and the vocab unpadded. Every
layout-dependent operation (layout-independent init, gathering weights for tests, resharding, HF conversion) goes
through ``shard`` / ``unshard`` so the fused-layout rules live in one place:
- column-parallel weights split along dim 0, row-parallel along dim 1 (megatron's ``partition_dim``);
- ``linear_qkv`` is grouped per query group (q heads, k, v of group 0, then group 1, ...), so a contiguous split
  gives each rank whole groups;
- the LLM's gated ``linear_fc1`` holds [gate; up]; each rank holds [its gate slice; its up slice], not a contiguous
  slice of the concatenation;
- vocab-parallel embedding / output weights are padded with zero rows to the padded vocab before splitting.
"""
import torch

VOCAB_PARAMS = ("embedding.weight", "output_layer.weight")


def canonical_name(local_name: str, layer_offset: int) -> str:
    """'decoder.layers.1.mlp...' in a chunk whose first layer is global layer ``layer_offset`` -> global index."""
    if local_name.startswith("decoder.layers."):
        rest = local_name[len("decoder.layers."):]
        idx, tail = rest.split(".", 1)
        return f"decoder.layers.{int(idx) + layer_offset}.{tail}"
    return local_name


def is_gated_fc1(name: str) -> bool:
    """The LLM's fc1 weight and its LoRA B hold [gate; up] rows."""
    return name.startswith("decoder.") and name.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.lora_b"))


def is_tensor_parallel(param) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def canonical_shape(name: str, param, tp: int, vocab_size: int):
    shape = list(param.shape)
    if not is_tensor_parallel(param):
        return shape
    shape[param.partition_dim] *= tp
    if name in VOCAB_PARAMS:
        shape[0] = vocab_size
    return shape


def shard(full: torch.Tensor, name: str, tensor_parallel: bool, partition_dim: int, tp_rank: int, tp: int,
          padded_vocab: int = 0) -> torch.Tensor:
    if not tensor_parallel or tp == 1 and name not in VOCAB_PARAMS:
        return full
    if name in VOCAB_PARAMS:
        full = torch.cat([full, full.new_zeros(padded_vocab - full.shape[0], *full.shape[1:])])
    if is_gated_fc1(name):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, 0)[tp_rank], up.chunk(tp, 0)[tp_rank]])
    return full.chunk(tp, dim=partition_dim)[tp_rank].contiguous()


def unshard(pieces, name: str, tensor_parallel: bool, partition_dim: int, vocab_size: int = 0) -> torch.Tensor:
    """Inverse of ``shard``: pieces are the per-TP-rank tensors in rank order."""
    if not tensor_parallel:
        return pieces[0]
    if is_gated_fc1(name):
        halves = [p.chunk(2, dim=0) for p in pieces]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    full = torch.cat(list(pieces), dim=partition_dim)
    if name in VOCAB_PARAMS:
        full = full[:vocab_size]
    return full


def local_pieces(chunks, names, tp_rank: int, use_main_grad: bool = False):
    """This rank's shards of the named canonical parameters (or of their main_grad):
    {name: (tp_rank, tensor, tensor_parallel, partition_dim)}."""
    from megallava.model.init import iter_canonical_params

    out = {}
    for name, param in iter_canonical_params(chunks):
        if name in names:
            t = param
            if use_main_grad:  # frozen parameters have no grad buffer: their gradient is zero by definition
                t = getattr(param, "main_grad", None)
                t = torch.zeros_like(param) if t is None else t
            out[name] = (tp_rank, t.detach().clone().float().cpu(), is_tensor_parallel(param),
                         getattr(param, "partition_dim", 0))
    return out


def assemble(per_rank_pieces, vocab_size: int):
    """Merge ``local_pieces`` from every rank (DP replicas give identical copies) into canonical tensors."""
    by_name = {}
    for pieces in per_rank_pieces:
        for name, (tp_rank, tensor, tp_flag, dim) in pieces.items():
            by_name.setdefault(name, {})[tp_rank] = (tensor, tp_flag, dim)
    full = {}
    for name, ranks in by_name.items():
        ordered = [ranks[r][0] for r in sorted(ranks)]
        _, tp_flag, dim = ranks[0]
        full[name] = unshard(ordered, name, tp_flag, dim, vocab_size)
    return full
