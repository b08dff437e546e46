"""What a checkpoint was trained as: ``<iter_dir>/fingerprint.json`` and the tokenizer copy ``<iter_dir>/tokenizer/``.

Contract:
- The fingerprint holds the model definition (layer sizes, heads, ``vocab_size``, ``image_token_id``, norm eps,
  RoPE theta, projector, the whole vision config), the canonical global shape of every saved model tensor, and
  the sha256 of ``data.tokenizer`` (when set). Rank 0 writes it into each checkpoint; the integrity manifest
  covers it.
- ``data.tokenizer`` (a sentencepiece ``.model`` file, copied as ``tokenizer/tokenizer.model``, or the files of an
  HF tokenizer directory) is copied into ``<iter_dir>/tokenizer/``, so a checkpoint is self-contained for export.
- A resume refuses any difference, naming the key with both values. A weights-only load (finetuning) refuses
  differences in ``vocab_size``, ``image_token_id`` and tensor shapes (which would load garbage or fail deep in
  dist_checkpointing) and warns about the rest (a new tokenizer, say). Tensor shapes are checked against the
  checkpoint's own DCP metadata, so converted checkpoints, which carry no fingerprint, are checked too.
"""
import hashlib
import json
import os
import shutil
from typing import Dict, List, Optional, Tuple

FINGERPRINT = "fingerprint.json"
TOKENIZER_DIR = "tokenizer"
MODEL_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "vocab_size", "image_token_id", "rms_norm_eps", "rope_theta", "projector")
ALWAYS_STRICT = ("model.vocab_size", "model.image_token_id")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tokenizer_files(path: str) -> List[str]:
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(path, n) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))


def tokenizer_sha256(path: str) -> str:
    """sha256 of a tokenizer file, or of the (name, sha256) list of an HF tokenizer directory's files."""
    if os.path.isfile(path):
        return _sha256(path)
    h = hashlib.sha256()
    for f in _tokenizer_files(path):
        h.update(f"{os.path.basename(f)}\0{_sha256(f)}\n".encode())
    return h.hexdigest()


def model_fingerprint(cfg) -> Dict:
    """The config part of the fingerprint (parameter shapes are added at save from the written metadata)."""
    import dataclasses

    m = cfg.model
    out = {"model": {k: getattr(m, k) for k in MODEL_KEYS}, "vision": dataclasses.asdict(m.vision),
           "tokenizer": None}
    if cfg.data.tokenizer and os.path.exists(cfg.data.tokenizer):
        out["tokenizer"] = {"sha256": tokenizer_sha256(cfg.data.tokenizer), "source": cfg.data.tokenizer}
    return out


def copy_tokenizer(path: str, iter_dir: str) -> None:
    dest = os.path.join(iter_dir, TOKENIZER_DIR)
    os.makedirs(dest, exist_ok=True)
    if os.path.isfile(path):
        shutil.copyfile(path, os.path.join(dest, "tokenizer.model" if path.endswith(".model")
                                           else os.path.basename(path)))
    else:
        for f in _tokenizer_files(path):
            shutil.copyfile(f, os.path.join(dest, os.path.basename(f)))


def write(iter_dir: str, fingerprint: Dict, params: Dict[str, List[int]]) -> None:
    with open(os.path.join(iter_dir, FINGERPRINT), "w") as f:
        json.dump({**fingerprint, "params": params}, f, indent=1, sort_keys=True)


def read(iter_dir: str) -> Optional[Dict]:
    path = os.path.join(iter_dir, FINGERPRINT)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _flat(fp: Dict) -> Dict[str, object]:
    out = {f"model.{k}": v for k, v in fp.get("model", {}).items()}
    out.update({f"model.vision.{k}": v for k, v in fp.get("vision", {}).items()})
    return out


def compare(saved: Dict, current: Dict, weights_only: bool) -> Tuple[List[str], List[str]]:
    """(errors, warnings) for loading a checkpoint with fingerprint ``saved`` into a run with ``current``."""
    errors, warnings = [], []
    a, b = _flat(saved), _flat(current)
    for key in sorted(set(a) & set(b)):
        if a[key] != b[key]:
            msg = f"{key}: checkpoint {a[key]!r}, this run {b[key]!r}"
            (errors if not weights_only or key in ALWAYS_STRICT else warnings).append(msg)
    ts, tc = saved.get("tokenizer"), current.get("tokenizer")
    if ts and tc and ts["sha256"] != tc["sha256"]:
        msg = (f"data.tokenizer: checkpoint sha256 {ts['sha256'][:16]}... ({ts.get('source')}), this run sha256 "
               f"{tc['sha256'][:16]}... ({tc.get('source')})")
        (warnings if weights_only else errors).append(msg)
    return errors, warnings


def sharded_shapes(model_sd: Dict) -> Dict[str, Tuple[int, ...]]:
    """{DCP key: global shape} of the sharded tensors in a (model part of a) sharded state dict."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out, todo = {}, list(nested_values(model_sd))
    while todo:
        v = todo.pop()
        if isinstance(v, ShardedTensorFactory):
            built = v.build()
            todo += list(nested_values(built)) if isinstance(built, (dict, list)) else [built]
        elif isinstance(v, ShardedTensor):
            out[v.key] = tuple(v.global_shape)
    return out


def saved_shapes(iter_dir: str) -> Dict[str, Tuple[int, ...]]:
    """{DCP key: global shape} of every tensor in a checkpoint (its DCP ``.metadata``)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(iter_dir).read_metadata()
    return {k: tuple(v.size) for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def shape_problems(model_shapes: Dict[str, Tuple[int, ...]], saved: Dict[str, Tuple[int, ...]]) -> List[str]:
    problems = []
    for key, shape in sorted(model_shapes.items()):
        if key not in saved:
            problems.append(f"tensor {key}: this model has shape {list(shape)}, the checkpoint has no such tensor")
        elif tuple(saved[key]) != tuple(shape):
            problems.append(f"tensor {key}: checkpoint shape {list(saved[key])}, this model {list(shape)}")
    return problems
