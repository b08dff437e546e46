"""Streaming, deterministic, layout-invariant micro-batches from webdataset shards (``data.source: shards``).

The sequence of global batches is a pure function of (train.seed, data): global sample slot ``j`` (global batch
``t`` holds slots ``t*G .. t*G+G-1``) picks a source by a seeded weighted draw, and the k-th draw of a source takes
position ``k mod N`` of that source's seeded permutation for epoch ``k div N`` (every sample once per epoch of its
source). DP rank ``d`` takes slots ``t*G + d*G/dp ...`` split into micro-batches in order, exactly like
``batching.microbatch_iterator``, so the global batch does not depend on dp, workers or the TP/PP layout, and a
resumed run (``start_iteration``) continues the uninterrupted sequence.

Each DataLoader worker builds whole micro-batches: it seeks to its samples by the manifest's byte offsets, checks
their CRC, decodes images, applies the source's template and the overlong policy, and collates (or, with
``data.packing``, packs the micro-batch's samples into fewer rows: ``batching.pack``). Samples that fail
are skipped and counted per reason in ``batch["skipped"]``; the micro-batch is then smaller (under the interleaved
schedule, whose pipeline buffers have a fixed row count, padding rows that train nothing take their place; a
micro-batch with no sample left is one such row, ``batch["empty"] = True``). Every skip decision
is taken from bytes and text that the first and the last pipeline stage both read (``with_images=False`` never
decodes images), so both stages always build the same micro-batch. A shard whose size differs from its manifest
(a cut-off copy) stops the loader at start with an error naming the shard; damaged bytes inside a complete shard
fail their CRC and are skipped as ``corrupt_sample``. Each skipped sample is also listed in
``batch["skipped_samples"]`` as (reason, shard path, key, original id), so the trainer can name it; the original id
is the ``id`` make_shards stored from the input JSON (for a corrupt sample, read from its damaged bytes when its
``.json`` member still parses; else None).

Workers never outlive their rank: they ignore SIGTERM (a preempted trainer still needs its data to finish the
iteration and save), so they ask the kernel to SIGKILL them when the rank dies (PR_SET_PDEATHSIG), and the rank's
error path SIGKILLs them itself (``kill_workers``) instead of letting Python's exit handler SIGTERM and join them,
which would wait forever. ``close_all`` shuts them down cleanly at the end of a run.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import multiprocessing.connection
import os
import signal
import tarfile
import weakref
from collections import Counter, OrderedDict
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from megallava.config import image_tokens_per_image
from megallava.data.batching import IGNORE_INDEX, collate, pack
from megallava.data.images import ImageError, load_image
from megallava.data.shards import ShardError, load_manifest, parse_sample, read_sample
from megallava.data.templates import REASONS, TemplateError, encode_conversation

WORKER_TIMEOUT_S = 600   # a hung worker raises after this long instead of stalling every rank forever
MIX_BLOCK = 4096         # slots per seeded block of source draws (random access without replaying from slot 0)
# Every reason a sample can be skipped at read time (the keys of batch["skipped"]).
SKIP_REASONS = ("corrupt_sample", "bad_image", "too_long") + REASONS


class DataError(RuntimeError):
    """A data problem that cannot be skipped consistently; the message names the sample and the fix."""


def image_tokens(cfg) -> int:
    return image_tokens_per_image(cfg)


def skip_counts(batch: Dict) -> torch.Tensor:
    """batch["skipped"] as a float64 vector in SKIP_REASONS order, ready to sum over micro-batches and all-reduce."""
    return torch.tensor([float(batch["skipped"].get(r, 0)) for r in SKIP_REASONS], dtype=torch.float64)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


class Source:
    """One shard directory: where each of its samples sits (shard, byte offset, size, CRC32)."""

    def __init__(self, path: str, name: Optional[str] = None):
        manifest = load_manifest(path)
        self.name = name or manifest["source"]
        self.paths = [os.path.join(path, s["name"]) for s in manifest["shards"]]
        counts = [s["num_samples"] for s in manifest["shards"]]
        self.shard = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        cat = lambda k, dt: np.array([x for s in manifest["shards"] for x in s[k]], dtype=dt)  # noqa: E731
        self.offset, self.size, self.crc = cat("offsets", np.int64), cat("sizes", np.int64), cat("crc32", np.uint32)
        self.keys = [k for s in manifest["shards"] for k in s["keys"]]
        self.path, self.image_size, self.image_mode = path, manifest.get("image_size"), manifest.get("image_mode")
        self.n = len(self.keys)
        if self.n == 0:
            raise ShardError(f"{path}: the manifest lists no samples (all skipped? see its 'skipped' report)")


class Mixture:
    """Global slot -> (source index, sample index); a pure function of the seed, the weights and the source sizes."""

    def __init__(self, weights: List[float], sizes: List[int], seed: int, shuffle: bool):
        w = torch.tensor(weights, dtype=torch.float64)
        self.cum = torch.cumsum(w / w.sum(), 0)
        self.sizes, self.seed, self.shuffle = sizes, seed, shuffle
        self._blocks: "OrderedDict[int, torch.Tensor]" = OrderedDict()
        self._prefix = [torch.zeros(len(sizes), dtype=torch.long)]  # draws per source before block b
        self._perms: "OrderedDict[Tuple[int, int], torch.Tensor]" = OrderedDict()

    def _block(self, b: int) -> torch.Tensor:
        if b not in self._blocks:
            g = torch.Generator().manual_seed(_seed(self.seed, "mix", b))
            u = torch.rand(MIX_BLOCK, generator=g, dtype=torch.float64)
            self._blocks[b] = torch.searchsorted(self.cum, u, right=True).clamp_(max=len(self.sizes) - 1)
            if len(self._blocks) > 4:
                self._blocks.popitem(last=False)
        return self._blocks[b]

    def _draws_before(self, b: int) -> torch.Tensor:
        while len(self._prefix) <= b:
            i = len(self._prefix) - 1
            self._prefix.append(self._prefix[i] + torch.bincount(self._block(i), minlength=len(self.sizes)))
        return self._prefix[b]

    def _perm(self, s: int, epoch: int) -> torch.Tensor:
        if (s, epoch) not in self._perms:
            n = self.sizes[s]
            g = torch.Generator().manual_seed(_seed(self.seed, "perm", s, epoch))
            self._perms[(s, epoch)] = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
            if len(self._perms) > 2 * len(self.sizes):
                self._perms.popitem(last=False)
        return self._perms[(s, epoch)]

    def locate(self, slot: int) -> Tuple[int, int]:
        b, r = divmod(slot, MIX_BLOCK)
        block = self._block(b)
        s = int(block[r])
        k = int(self._draws_before(b)[s]) + int((block[:r] == s).sum())  # this is the k-th draw of source s
        epoch, pos = divmod(k, self.sizes[s])
        return s, int(self._perm(s, epoch)[pos])


class MicroBatches(torch.utils.data.Dataset):
    """Map-style: index q = this DP rank's q-th micro-batch (counting from global batch 0)."""

    def __init__(self, cfg, dp_rank: int, dp_size: int, with_images: bool, pad_multiple: int = 1,
                 packing: bool = False):
        d, t = cfg.data, cfg.train
        self.sources = [Source(s.path, s.name) for s in d.sources]
        for src in self.sources:  # shards written with --image-size hold pixels for one resolution only
            if src.image_size and (src.image_size, src.image_mode) != (cfg.model.vision.image_size, d.image_mode):
                raise DataError(f"{src.path} holds images preprocessed for image_size={src.image_size}, "
                                f"mode {src.image_mode}, but model.vision.image_size={cfg.model.vision.image_size}, "
                                f"data.image_mode={d.image_mode}: match them or re-shard with other --image-size")
        self.templates = [s.template for s in d.sources]
        self.mix = Mixture([s.weight for s in d.sources], [s.n for s in self.sources], t.seed, d.shuffle)
        self.G, self.mbs, self.dp_rank = t.global_batch_size, t.micro_batch_size, dp_rank
        self.per_rank = self.G // dp_size
        self.n_micro = self.per_rank // self.mbs
        self.with_images, self.pad_multiple, self.packing = with_images, pad_multiple, packing
        self.seq_length, self.overlong, self.image_mode = d.seq_length, d.overlong, d.image_mode
        self.image_size, self.image_tokens = cfg.model.vision.image_size, image_tokens_per_image(cfg)
        self.image_token_id, self.tokenizer_path = cfg.model.image_token_id, d.tokenizer
        # Under PP the last stage never decodes images, so it cannot mirror a decode-time skip: fail loudly instead.
        self.strict_images = cfg.parallel.pp > 1
        self.fixed_rows = cfg.parallel.pp > 1 and cfg.parallel.vpp is not None
        self._tok, self._files = None, OrderedDict()

    def __getstate__(self):  # open files and the tokenizer stay per process (spawned workers reopen them)
        return {**self.__dict__, "_tok": None, "_files": OrderedDict()}

    def slots(self, q: int) -> range:
        t, i = divmod(q, self.n_micro)
        first = t * self.G + self.dp_rank * self.per_rank + i * self.mbs
        return range(first, first + self.mbs)

    @property
    def tokenizer(self):
        if self._tok is None:  # loaded lazily: once per worker process
            from megallava.data.tokenizer import load_tokenizer
            self._tok = load_tokenizer(self.tokenizer_path)
        return self._tok

    def _file(self, path: str):
        f = self._files.pop(path, None) or open(path, "rb")
        self._files[path] = f
        if len(self._files) > 32:
            self._files.popitem(last=False)[1].close()
        return f

    def sample(self, s: int, k: int) -> Tuple[Optional[Dict], Optional[str]]:
        """(sample, None) or (None, skip reason)."""
        src = self.sources[s]
        path = src.paths[src.shard[k]]
        members = read_sample(self._file(path), int(src.offset[k]), int(src.size[k]), int(src.crc[k]))
        if members is None or "json" not in members:
            return None, "corrupt_sample"
        record = json.loads(members["json"])
        n_img = int(record["num_images"])
        try:
            enc = encode_conversation(record["conversations"], self.templates[s], self.tokenizer,
                                      self.image_token_id, self.image_tokens, n_img)
        except TemplateError as e:
            return None, e.reason
        tokens, labels = enc.tokens, enc.shifted_labels()
        if len(tokens) > self.seq_length:
            last_image = max((i for i, x in enumerate(tokens) if x == self.image_token_id), default=-1)
            if self.overlong == "drop" or last_image >= self.seq_length:  # never cut through an image's run
                return None, "too_long"
            tokens, labels = tokens[:self.seq_length], labels[:self.seq_length]
        if all(x == IGNORE_INDEX for x in labels):
            return None, "no_trained_tokens"  # e.g. truncation removed every answer: never feed an all-masked row
        if self.with_images:
            try:
                blobs = [members[e] for e in sorted((e for e in members if e.startswith("img")),
                                                    key=lambda e: int(e.split(".")[0][3:]))]
                pix = [load_image(b, self.image_size, self.image_mode) for b in blobs]
            except ImageError as e:
                if self.strict_images:
                    raise DataError(f"sample {src.keys[k]} in {path} matches its manifest CRC but its image does "
                                    f"not decode ({e}); with pipeline parallelism the last stage cannot skip it "
                                    f"in step: re-run tools/make_shards.py (it validates every image)") from e
                return None, "bad_image"
            images = torch.stack(pix) if len(pix) > 1 else (pix[0][None] if pix else  # [None]: no copy
                                                             torch.zeros(0, 3, self.image_size, self.image_size))
        else:
            images = torch.zeros(n_img, 0)  # only the count travels (batch["num_images"])
        return {"tokens": torch.tensor(tokens, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
                "images": images, "source": s, "key": src.keys[k]}, None

    def original_id(self, s: int, k: int):
        """The id of sample ``k`` of source ``s`` in its input JSON (its ``.json`` member's ``id``), read without the
        CRC check so that a damaged sample can still be named; None where that member does not parse either."""
        src = self.sources[s]
        f = self._file(src.paths[src.shard[k]])
        f.seek(int(src.offset[k]))
        try:
            record = json.loads(parse_sample(f.read(int(src.size[k])))["json"])
        except (tarfile.HeaderError, IndexError, KeyError, ValueError):
            return None
        return record.get("id") if isinstance(record, dict) else None

    def __getitem__(self, q: int) -> Dict:
        samples, skipped, named = [], Counter(), []
        for slot in self.slots(q):
            s, k = self.mix.locate(slot)
            sample, reason = self.sample(s, k)
            if sample is None:
                skipped[reason] += 1
                src = self.sources[s]
                named.append((reason, src.paths[src.shard[k]], src.keys[k], self.original_id(s, k)))
            else:
                samples.append(sample)
        empty = not samples
        shape = (0, 3, self.image_size, self.image_size) if self.with_images else (0, 0)
        padding = {"tokens": torch.zeros(1, dtype=torch.long), "labels": torch.full((1,), IGNORE_INDEX),
                   "images": torch.zeros(shape), "source": -1, "key": None}
        if self.packing:
            # Packed rows vary in number anyway: the interleaved schedule's fixed row count is restored by padding
            # rows in training/step.py; only a micro-batch with no sample left needs one padding row here.
            samples += [padding] * (1 - min(len(samples), 1))
            batch = pack(samples, self.seq_length, self.pad_multiple, self.with_images)
        else:
            # A padding row (trains nothing) stands in for skipped samples when a micro-batch would be empty, and
            # for every skipped sample under the interleaved schedule, whose pipeline buffers have a fixed row count.
            rows = self.mbs if self.fixed_rows else max(len(samples), 1)
            samples += [padding] * (rows - len(samples))
            batch = collate(samples, self.pad_multiple, self.with_images)
        batch.update(source_ids=torch.tensor([s["source"] for s in samples], dtype=torch.long),
                     keys=[s["key"] for s in samples], skipped=dict(skipped), skipped_samples=named, empty=empty,
                     iteration=q // self.n_micro,
                     lengths=[0 if s["key"] is None else n for s, n in zip(samples, batch["lengths"])])
        return batch


class _From:
    """Endless micro-batch indices from ``start`` (the DataLoader's sampler)."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        q = self.start
        while True:
            yield q
            q += 1


def source_names(cfg) -> List[str]:
    """Display names of cfg.data.sources, indexed like ``batch["source_ids"]``."""
    return [s.name or load_manifest(s.path)["source"] for s in cfg.data.sources]


def build_microbatch_iterator(cfg, dp_rank: int, dp_size: int, start_iteration: int, with_images: bool,
                              pad_multiple: int = 1, packing: bool = False) -> Iterator[dict]:
    """Endless micro-batches of this DP rank from global batch ``start_iteration`` on (see the module doc); packed
    (``batching.pack``) when ``packing`` is true: the trainer passes ``cfg.data.packing``, the preview shows one
    sample per row either way (packing only regroups the same samples)."""
    ds = MicroBatches(cfg, dp_rank, dp_size, with_images, pad_multiple, packing)
    vocab = ds.tokenizer.vocab_size
    if vocab > cfg.model.vocab_size:
        raise DataError(f"tokenizer {cfg.data.tokenizer} has {vocab} tokens but model.vocab_size="
                        f"{cfg.model.vocab_size}: raise model.vocab_size or use the model's tokenizer")
    workers = cfg.data.num_workers
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, sampler=_From(start_iteration * ds.n_micro), num_workers=workers,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=functools.partial(_worker_init, os.getpid()), timeout=WORKER_TIMEOUT_S if workers > 0 else 0)
    it = iter(loader)
    if workers > 0:
        _LIVE.append((os.getpid(), weakref.ref(it)))
    return _stop_workers_on_error(it)


# Multi-process loader iterators (their workers) by creating process: a forked rank inherits its parent's entries,
# whose workers are not its children.
_LIVE: List[Tuple[int, "weakref.ref"]] = []
PR_SET_PDEATHSIG = 1


def _worker_init(parent_pid: int, _worker_id: int) -> None:
    # SLURM (preemption, scancel) and torchrun send SIGTERM to every process of the job. The trainer then saves at the
    # end of the current iteration, which needs its data: workers keep serving until the trainer shuts them down.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # ... but they must never outlive the rank (SIGKILLed, or ended by its error path): the kernel kills them then.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: torch's own parent check ends them within a few seconds
        pass
    if os.getppid() != parent_pid:  # the rank died before prctl took effect
        os._exit(1)
    torch.set_num_threads(1)  # workers share the cores with the ranks; torch's own pool would oversubscribe them


def _iterators() -> list:
    """This process's live loader iterators."""
    _LIVE[:] = [(pid, ref) for pid, ref in _LIVE if ref() is not None]
    return [ref() for pid, ref in _LIVE if pid == os.getpid()]


def worker_pids() -> List[int]:
    """PIDs of this process's live loader workers."""
    return [w.pid for it in _iterators() for w in getattr(it, "_workers", []) if w.is_alive()]


def _untrack(it) -> None:
    # Untrack the workers first, or torch's SIGCHLD handler reports their death instead of the real error.
    if getattr(it, "_worker_pids_set", False):
        torch.utils.data._utils.signal_handling._remove_worker_pids(id(it))
        it._worker_pids_set = False


def kill_workers() -> None:
    """SIGKILL every loader worker of this process now (the error path: never waits on them)."""
    for it in _iterators():
        _untrack(it)
        for w in getattr(it, "_workers", []):
            try:
                w.kill()
            except (OSError, ValueError, AttributeError):
                pass


def close_all() -> None:
    """Shut this process's loader workers down (end of a run); any that does not stop is SIGKILLed."""
    for it in _iterators():
        try:
            it._shutdown_workers()
        finally:
            _untrack(it)
            for w in getattr(it, "_workers", []):
                if w.is_alive():
                    w.kill()
                    w.join(timeout=5)
    _LIVE[:] = [(pid, ref) for pid, ref in _LIVE if pid != os.getpid()]


def _stop_workers_on_error(it):
    """Re-raise a worker's error (or the timeout) after stopping the workers now, so the rank exits promptly: a hung
    worker would be joined for 5 s before being killed, and left to the garbage collector (the re-raised
    traceback's reference cycle) the shutdown waits out that join for every worker."""
    owner = os.getpid()
    try:
        yield from it
    except BaseException as err:
        # Only the multi-process iterator has workers, and only its own process may stop them: a process forked
        # from it (a test's forked rank) that garbage-collects its copy of this generator must leave them alone.
        if hasattr(it, "_shutdown_workers") and os.getpid() == owner:
            handover = isinstance(err, _HANDOVER_ERRORS)
            dead = _dead_worker(it, wait_s=WORKER_EXIT_WAIT_S if handover else 0.0)
            _untrack(it)  # SIGKILL: workers ignore SIGTERM (see _worker_init)
            for w in it._workers:
                w.kill()
            it._shutdown_workers()
            if handover and dead:
                pid, code = dead
                how = f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
                raise DataError(f"DataLoader worker (pid {pid}) {how} while handing a batch to this rank "
                                f"({type(err).__name__}); the kernel's OOM killer is the usual cause (see dmesg): "
                                f"lower data.num_workers, or give the job more host memory") from err
        raise


# A worker that dies while the rank receives a batch from it shows as a closed socket or pipe (the tensors' file
# descriptors travel over one), not as torch's "DataLoader worker ... exited unexpectedly". Such an error waits up
# to WORKER_EXIT_WAIT_S for a worker's exit (the socket closes a moment before the process can be reaped) to name it.
_HANDOVER_ERRORS = (ConnectionError, EOFError)
WORKER_EXIT_WAIT_S = 2.0


def _dead_worker(it, wait_s: float) -> Optional[Tuple[int, int]]:
    """(pid, exit code; negative: the signal) of a loader worker that has ended, waiting up to ``wait_s``."""
    workers = list(getattr(it, "_workers", []))
    if wait_s > 0 and workers:
        multiprocessing.connection.wait([w.sentinel for w in workers], timeout=wait_s)
    return next(((w.pid, w.exitcode) for w in workers if w.exitcode is not None), None)
