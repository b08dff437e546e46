"""Checks that run after the process group is up and before any model is built, so that a run which cannot
finish fails in seconds, not at its first save or after the model build.

Contract (``check(cfg, env)``, collective; every rank raises the same error):
- rank 0 locks ``train.run_dir`` and ``checkpoint.dir`` (training/locks.py) and checks that both are writable (by
  writing a probe file: permission bits say nothing for root or read-only mounts) and that ``checkpoint.dir`` has
  room for one checkpoint, estimated from the parameter counts of the config (``parameter_counts``: closed-form
  shapes, equal to the built model's; no model is built);
- every rank checks each shard source's files against its manifest (present, with the manifest's byte sizes);
- rank 0 checks ``data.seq_length`` against the shortest possible sample of each shard source: the template's
  fixed text (system prompt, role tags), its images (per-sample counts from the manifest when it has them, else
  one) and 16 tokens of text, tokenized with ``data.tokenizer``; the tokenizer's size against
  ``model.vocab_size``; and ``model.image_token_id`` against the tokenizer (data/tokenizer.image_token_problems).
Config problems raise ConfigError (exit 2, like validate); the others PreflightError (exit 2), all problems at
once, each with its fix.
"""
import os
import shutil
import uuid
from typing import List, Tuple

import torch

from megallava import config as C
from megallava.training import faults
from megallava.training.locks import LockError, RunLock

TEXT_ROOM = 16  # tokens of text a sample needs besides the template and its images
MARGIN = 1.10   # free space required over the estimated checkpoint size (metadata, common state, tokenizer)


class PreflightError(faults.RunError):
    collective = True
    exit_code = faults.EXIT_CONFIG

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__(self.problems)

    def __str__(self):
        n = len(self.problems)
        return f"cannot start ({n} problem{'' if n == 1 else 's'}):\n" + "\n".join(f"  - {p}" for p in self.problems)


def parameter_counts(cfg) -> Tuple[int, int]:
    """(all parameters, trainable parameters) of the model as saved (canonical shapes, padded vocab)."""
    from megallava.model.llama import padded_vocab_size
    from megallava.model.vision import vision_num_layers_built

    m, v = cfg.model, cfg.model.vision
    h, f, n = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads
    g = m.num_query_groups or n
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, cfg.parallel.tp)
    layer = 2 * h + h * (h + 2 * h * g // n) + h * h + 3 * h * f
    llm = 2 * vocab * h + m.num_layers * layer + h
    H, F = v.hidden_size, v.ffn_hidden_size
    patches = (v.image_size // v.patch_size) ** 2
    vit_layer = 4 * H + (3 * H * H + 3 * H) + (H * H + H) + (F * H + F) + (H * F + H)
    vit = H * v.num_channels * v.patch_size ** 2 + H + (patches + 1) * H + 2 * H + \
        vision_num_layers_built(v) * vit_layer
    proj = H * h + h + (h * h + h if m.projector == "mlp2x_gelu" else 0)
    trainable = llm * m.train_llm + proj * m.train_projector + vit * m.train_vision
    return llm + vit + proj, trainable


def checkpoint_bytes(cfg) -> int:
    """Estimated size of one checkpoint: every weight in its training dtype, plus for each trainable one the fp32
    master copy and both Adam moments (12 bytes), or the bf16 copy and moments (6) without master weights."""
    from megallava.model.build import params_dtype

    total, trainable = parameter_counts(cfg)
    weight = torch.finfo(params_dtype(cfg)).bits // 8
    optim = 12 if cfg.train.master_weights or weight == 4 else 3 * weight
    return total * weight + trainable * optim


def _size(n: float) -> str:
    """Bytes for a message: GiB from 1 GiB up, else MiB (a small model's checkpoint is not '0.00 GiB')."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def _probe(directory: str) -> str:
    """'' if a file can be created, written, synced and removed in ``directory``, else why not."""
    path = os.path.join(directory, f".megallava-probe-{uuid.uuid4().hex}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(path)
        return ""
    except OSError as e:
        return f"{e.strerror or e}"


def _directories(cfg, locks: List[RunLock]) -> List[str]:
    problems, unwritable = [], set()
    dirs = [(cfg.train.run_dir, "train.run_dir")]
    if cfg.checkpoint.dir and os.path.realpath(cfg.checkpoint.dir) != os.path.realpath(cfg.train.run_dir):
        dirs.append((cfg.checkpoint.dir, "checkpoint.dir"))
    for directory, key in dirs:
        why = _probe(directory)
        if why:
            unwritable.add(os.path.realpath(directory))
            problems.append(f"{key}={directory} is not writable ({why}): fix its permissions or mount, or choose "
                            f"another directory")
            continue
        lock = RunLock(directory, key)
        try:
            warning = lock.acquire()
        except LockError as e:
            problems.append(str(e))
            continue
        locks.append(lock)
        if warning:
            print(warning, flush=True)
    ck = cfg.checkpoint.dir
    if ck and os.path.realpath(ck) not in unwritable:
        need = checkpoint_bytes(cfg) * MARGIN
        free = shutil.disk_usage(ck).free
        if free < need:
            problems.append(f"checkpoint.dir={ck} has {_size(free)} free but one checkpoint needs about "
                            f"{_size(need)} ({_count(parameter_counts(cfg)[0])} parameters with their "
                            f"optimizer state): free space or choose a larger filesystem")
    return problems


def _shards(cfg) -> List[str]:
    from megallava.data.shards import ShardError, load_manifest

    problems = []
    for i, s in enumerate(cfg.data.sources):
        try:
            load_manifest(s.path)
        except (ShardError, OSError, ValueError, KeyError) as e:
            problems.append(f"data.sources[{i}]: {e}")
    return problems


def _seq_length(cfg) -> List[str]:
    """Config problems: seq_length against the shortest sample of each source; tokenizer size against the vocab."""
    from megallava.data.shards import load_manifest
    from megallava.data.templates import TemplateError, encode_conversation
    from megallava.data.tokenizer import image_token_problems, load_tokenizer

    d, m = cfg.data, cfg.model
    try:
        tok = load_tokenizer(d.tokenizer)
    except ValueError as e:
        return [f"data.tokenizer: {e}"]
    problems = []
    if tok.vocab_size > m.vocab_size:
        problems.append(f"data.tokenizer {d.tokenizer} has {tok.vocab_size} tokens but model.vocab_size="
                        f"{m.vocab_size}: raise model.vocab_size or use the model's tokenizer")
    problems += image_token_problems(tok, d.tokenizer, m.vocab_size, m.image_token_id)
    per_image = C.image_tokens_per_image(cfg)
    for i, s in enumerate(d.sources):
        try:
            n = C.images_per_sample(load_manifest(s.path))
        except Exception:  # noqa: BLE001 - reported by the shard check
            continue
        turns = [{"from": "human", "value": "<image>\n" * n + "?"}, {"from": "gpt", "value": "ok"}]
        try:
            shortest = len(encode_conversation(turns, s.template, tok, m.image_token_id, per_image, n).tokens)
        except (TemplateError, ValueError):
            continue
        need = shortest + TEXT_ROOM
        if d.seq_length < need:
            problems.append(
                f"data.seq_length={d.seq_length} is too short for data.sources[{i}] ({s.path}): with template "
                f"{s.template!r} a sample with {n} image(s) of {per_image} tokens takes at least {shortest} tokens "
                f"(system prompt, role tags, images), plus {TEXT_ROOM} for text; shorter rows skip every such "
                f"sample. Use data.seq_length >= {need}" + (", or a smaller model.vision.image_size" if n else ""))
    return problems


def check(cfg, env) -> List[RunLock]:
    """Collective. Returns the locks taken (release them at the end of the run); raises ConfigError /
    PreflightError on every rank if any rank found a problem."""
    rank = torch.distributed.get_rank()
    locks: List[RunLock] = []
    config_problems, problems = [], []
    try:
        if rank == 0:
            problems += _directories(cfg, locks)
        if cfg.data.source == "shards":
            problems += _shards(cfg)
            if rank == 0 and not problems:
                config_problems += _seq_length(cfg)
    except Exception as e:  # noqa: BLE001 - a check that crashes still must not leave peers waiting below
        problems.append(f"preflight check failed on rank {rank}: {type(e).__name__}: {e}")
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (config_problems, problems))
    config_problems = list(dict.fromkeys(p for c, _ in gathered for p in c))
    problems = list(dict.fromkeys(p for _, ps in gathered for p in ps))
    if config_problems or problems:
        for lock in locks:
            lock.release()
        if config_problems and not problems:
            raise C.ConfigError(config_problems)
        raise PreflightError(problems + config_problems)
    return locks
