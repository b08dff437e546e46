"""megallava checkpoints (megatron dist_checkpointing, ``torch_dist`` backend = PyTorch DCP) written and read one
(tensor, layer) chunk at a time, in one process, without megatron or a process group.

On disk (what ``megallava.training.checkpoint.save`` writes, minus optimizer / RNG / ``_extra_state``)::

    ROOT/latest                 "iter_0000000"
    ROOT/iter_0000000/.metadata  DCP metadata: every key's global shape and chunks
    ROOT/iter_0000000/__0_0.distcp
    ROOT/iter_0000000/metadata.json   megatron's backend record
    ROOT/iter_0000000/common.pt       torch.save of the non-tensor state (format_version, iteration, layout, ...)

DCP keys are the canonical names (model/layout.py) with the layers stacked on a leading axis:
``decoder.layers.<param>`` has global shape (num_layers, ...), ``vision.encoder.layers.<param>`` (built ViT layers,
...); ``embedding.weight`` / ``output_layer.weight`` hold the padded vocab (zero rows), the same at every tp <= 8.
dist_checkpointing reshards on load, so such a checkpoint loads at any TP / PP / VPP.
"""
import json
import os
import re
from torch.futures import Future
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (LoadPlan, LoadPlanner, SavePlan, SavePlanner, TensorWriteData,
                                                  WriteItem, WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.storage import WriteResult

from megallava.convert.errors import ConversionError

LATEST = "latest"
FORMAT_VERSION = 1  # = megallava.training.checkpoint.FORMAT_VERSION (tests/test_convert.py checks they agree)
MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                     "common_backend_version": 1}
_LAYER = re.compile(r"^(decoder|vision\.encoder)\.layers\.(\d+)\.(.+)$")


def iter_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def dcp_key(canonical: str) -> Tuple[str, Optional[int]]:
    """'decoder.layers.3.mlp.linear_fc1.weight' -> ('decoder.layers.mlp.linear_fc1.weight', 3)."""
    m = _LAYER.match(canonical)
    if m:
        return f"{m.group(1)}.layers.{m.group(3)}", int(m.group(2))
    return canonical, None


@dataclass
class Chunk:
    """One piece of the checkpoint: ``produce()`` makes it (shape ``sizes``) when the writer gets to it."""
    key: str
    offsets: Tuple[int, ...]
    sizes: Tuple[int, ...]
    global_size: Tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]
    label: str


class StreamingSavePlanner(SavePlanner):
    """Plans one WriteItem per chunk and makes each chunk's tensor only when the writer asks for it."""

    def __init__(self, chunks: List[Chunk], log=print):
        self.chunks = {(c.key, tuple(c.offsets)): c for c in chunks}
        if len(self.chunks) != len(chunks):
            raise ValueError("duplicate checkpoint chunks")
        self.order = chunks
        self.log = log
        self.done = 0
        self.bytes = 0

    def set_up_planner(self, state_dict=None, storage_meta=None, is_coordinator: bool = True, *args, **kwargs):
        pass

    def create_local_plan(self) -> SavePlan:
        items = []
        for c in self.order:
            stacked = tuple(c.sizes) != tuple(c.global_size)
            items.append(WriteItem(
                index=MetadataIndex(c.key, torch.Size(c.offsets)),
                type=WriteItemType.SHARD if stacked else WriteItemType.TENSOR,
                tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets),
                                                                       sizes=torch.Size(c.sizes)),
                                            properties=TensorProperties(dtype=c.dtype),
                                            size=torch.Size(c.global_size))))
        return SavePlan(items)

    def create_global_plan(self, all_plans):
        return create_default_global_save_plan(all_plans, rewrite_index_hints=False)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem):
        c = self.chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        t = c.produce()
        if tuple(t.shape) != tuple(c.sizes) or t.dtype != c.dtype:
            raise RuntimeError(f"{c.label}: produced {list(t.shape)} {t.dtype}, planned {list(c.sizes)} {c.dtype}")
        self.done += 1
        self.bytes += t.nbytes
        self.log(f"  [{self.done}/{len(self.order)}] {c.label} {list(t.shape)} {str(t.dtype)[6:]} "
                 f"({self.bytes / 2 ** 20:.1f} MiB)")
        return t.contiguous()


class SequentialFileWriter(FileSystemWriter):
    """FileSystemWriter that writes the items one after the other into one file and keeps no reference to a
    written tensor (the stock loop keeps one tensor per key alive until the file is done)."""

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        name = f"{plan.storage_data.prefix}0.distcp"
        results = []
        with open(os.path.join(str(self.path), name), "wb") as f:
            for item in plan.items:
                t = planner.resolve_data(item)
                offset = f.tell()
                torch.save(t, f)
                length = f.tell() - offset
                results.append(WriteResult(index=item.index, size_in_bytes=length,
                                           storage_data=_StorageInfo(relative_path=name, offset=offset,
                                                                     length=length)))
                del t
            f.flush()
            os.fsync(f.fileno())
        fut: Future = Future()
        fut.set_result(results)
        return fut


def write_checkpoint(iter_dir: str, chunks: List[Chunk], common: Dict, log=print) -> None:
    """Write a megatron torch_dist checkpoint directory from ``chunks`` (made one at a time) + ``common``."""
    os.makedirs(iter_dir, exist_ok=True)
    writer = SequentialFileWriter(iter_dir, single_file_per_rank=True, thread_count=1, sync_files=True)
    try:
        dcp_save(state_dict={}, storage_writer=writer, planner=StreamingSavePlanner(chunks, log), no_dist=True)
    except CheckpointException as err:  # DCP wraps what went wrong (a bad input tensor, a full disk): re-raise it
        failures = list(err.failures.values())
        if failures and isinstance(failures[0], tuple) and isinstance(failures[0][0], Exception):
            raise failures[0][0] from None
        raise
    torch.save(common, os.path.join(iter_dir, "common.pt"))
    with open(os.path.join(iter_dir, "metadata.json"), "w") as f:
        json.dump(MEGATRON_METADATA, f)


def write_latest(root: str, name: str) -> None:
    with open(os.path.join(root, LATEST), "w") as f:
        f.write(name + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------

_ITER_DIR = re.compile(r"^iter_\d+$")
PARTIAL_SUFFIX = ".partial"


def check_complete(it: str) -> None:
    """The trainer writes ``iter_N.partial/`` and renames it to ``iter_N`` only after every rank finished writing:
    the name is the completion marker. Anything else (a ``.partial``, a renamed copy) is refused."""
    name = os.path.basename(os.path.normpath(it))
    if name.endswith(PARTIAL_SUFFIX):
        final = name[:-len(PARTIAL_SUFFIX)]
        raise ConversionError(
            f"{it} is an incomplete save: the trainer renames {name} to {final} only after every rank finished "
            f"writing, so a .partial directory is what a crash or kill mid-save left behind (its files may all be "
            f"there and still be inconsistent). Use the checkpoint root (its 'latest') or a complete iter_N directory")
    if not _ITER_DIR.match(name):
        raise ConversionError(
            f"{it}: not a complete checkpoint directory (the trainer and hf-to-megatron name every complete "
            f"iteration iter_NNNNNNN; the name is its completion marker). Pass the checkpoint root or an iter_N "
            f"directory (rename a copied one back to iter_N)")


def resolve(path: str) -> Tuple[str, str]:
    """(checkpoint root, iteration directory) of a root (with ``latest``) or an ``iter_N`` directory. A
    ``iter_N.partial`` directory (an interrupted save) or any other name is refused (``check_complete``)."""
    path = os.path.abspath(path)
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        with open(latest) as f:
            it = os.path.join(path, f.read().strip())
        if not os.path.isdir(it):
            raise ConversionError(f"{latest} points to {it}, which does not exist")
        check_complete(it)
        return path, it
    if os.path.isfile(os.path.join(path, "metadata.json")) or os.path.isfile(os.path.join(path, ".metadata")):
        check_complete(path)
        return os.path.dirname(path), path
    if os.path.basename(path).endswith(PARTIAL_SUFFIX):
        check_complete(path)
    raise ConversionError(f"{path}: not a megallava checkpoint (expected {path}/{LATEST} or an iter_N directory "
                          f"with metadata.json and .metadata)")


def _narrow(t: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for dim, (off, n) in enumerate(zip(offsets, lengths)):
        t = t.narrow(dim, off, n)
    return t


class _Into(LoadPlanner):
    """Reads the planned items into one destination tensor."""

    def __init__(self, dest: torch.Tensor):
        self.dest = dest

    def set_up_planner(self, *args, **kwargs):
        pass

    def create_local_plan(self):
        return LoadPlan([])

    def create_global_plan(self, plans):
        return plans

    def finish_plan(self, plan):
        return plan

    def load_bytes(self, read_item, value):
        pass

    def resolve_tensor(self, read_item):
        return _narrow(self.dest, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item, tensor):
        pass


class CheckpointReader:
    """Reads one (tensor, layer) chunk of a torch_dist checkpoint at a time, whatever layout saved it."""

    def __init__(self, path: str):
        self.root, self.dir = resolve(path)
        meta_json = os.path.join(self.dir, "metadata.json")
        if os.path.isfile(meta_json):
            with open(meta_json) as f:
                backend = json.load(f).get("sharded_backend")
            if backend != "torch_dist":
                raise ConversionError(f"{meta_json}: sharded_backend={backend!r}; only torch_dist checkpoints "
                                      f"(what megallava saves) are supported")
        if not os.path.isfile(os.path.join(self.dir, ".metadata")):
            raise ConversionError(f"{self.dir}: no .metadata file (incomplete or not a torch_dist checkpoint)")
        self.reader = FileSystemReader(self.dir)
        try:
            self.metadata = self.reader.read_metadata()
        except Exception as err:  # noqa: BLE001
            raise ConversionError(f"{self.dir}/.metadata: unreadable ({type(err).__name__}: {err})") from None
        self.reader.set_up_storage_reader(self.metadata, True)
        common_path = os.path.join(self.dir, "common.pt")
        self.common = {}
        if os.path.isfile(common_path):
            try:
                self.common = torch.load(common_path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - older pickles with non-allowlisted objects
                self.common = torch.load(common_path, map_location="cpu", weights_only=False)
        manifest = self.common.get("integrity") if isinstance(self.common, dict) else None
        if isinstance(manifest, str) and not os.path.isfile(os.path.join(self.dir, manifest)):
            # the trainer writes its integrity manifest last, just before the rename from .partial
            raise ConversionError(f"{self.dir}: incomplete checkpoint (its common state names the integrity manifest "
                                  f"{manifest}, which the trainer writes last, and it is missing)")

    def tensor_meta(self, key: str) -> Optional[TensorStorageMetadata]:
        md = self.metadata.state_dict_metadata.get(key)
        return md if isinstance(md, TensorStorageMetadata) else None

    def read(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        md = self.tensor_meta(key)
        if md is None:
            raise ConversionError(f"{self.dir}: the checkpoint has no tensor {key!r}")
        size = tuple(md.size)
        if layer is None:
            offsets, sizes = (0,) * len(size), size
        else:
            offsets, sizes = (layer,) + (0,) * (len(size) - 1), (1,) + size[1:]
        dest = torch.empty(sizes, dtype=md.properties.dtype)
        items = create_read_items_for_chunk_list(
            key, md, [ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))])
        covered = sum(torch.Size(i.lengths).numel() for i in items)
        if covered != dest.numel():
            raise ConversionError(f"{self.dir}: tensor {key!r}" + (f" layer {layer}" if layer is not None else "")
                                  + f" is only partly stored ({covered} of {dest.numel()} elements): incomplete "
                                    f"checkpoint")
        plan = self.reader.prepare_local_plan(LoadPlan(items))
        plan = self.reader.prepare_global_plan([plan])[0]
        try:
            self.reader.read_data(plan, _Into(dest)).wait()
        except Exception as err:  # noqa: BLE001
            raise ConversionError(f"{self.dir}: cannot read tensor {key!r}" + (f" layer {layer}" if layer is not None
                                  else "") + f" ({type(err).__name__}: {err}): truncated or corrupt file") from None
        return dest[0] if layer is not None else dest
