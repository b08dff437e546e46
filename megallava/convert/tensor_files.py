"""Lazy, bounded-memory tensor files: read one tensor at a time from safetensors (or torch .bin) checkpoints, and
write sharded safetensors one tensor at a time.

The safetensors reader reads each tensor's byte range with plain file reads instead of memory-mapping the file: a
mapped page stays in the process's resident set once touched, so mapping a 14 GB shard and reading every tensor
would show up as 14 GB of RSS. Reads validate the header against the file size first, so a truncated or corrupt
file fails with its name and the first tensor it cannot hold before anything is converted.
"""
import json
import os
from typing import Callable, Dict, Iterable, List, Tuple

import torch

from megallava.convert.errors import ConversionError

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


class SafetensorsFile:
    """One .safetensors file: header parsed and checked on open, tensors read on demand."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header "
                                      f"length): the file is truncated or corrupt; re-download it")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_HEADER):
                raise ConversionError(f"{path}: corrupt or truncated safetensors file (header claims {n} bytes, the "
                                      f"file has {size}); re-download it")
            try:
                header = json.loads(f.read(n))
            except ValueError as err:
                raise ConversionError(f"{path}: corrupt safetensors header ({err}); re-download it") from None
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self.tensors: Dict[str, Tuple[torch.dtype, Tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = _ST_DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ConversionError(f"{path}: tensor {name!r} has an unreadable header entry {info!r} "
                                      f"(unsupported dtype or corrupt file)") from None
            if end - begin != _nbytes(shape, dtype):
                raise ConversionError(f"{path}: tensor {name!r} spans {end - begin} bytes but shape {list(shape)} "
                                      f"{info['dtype']} needs {_nbytes(shape, dtype)}: corrupt file")
            if self.data_start + end > size:
                raise ConversionError(f"{path} is truncated: tensor {name!r} needs bytes up to "
                                      f"{self.data_start + end}, the file has {size}; re-download or re-copy it")
            self.tensors[name] = (dtype, shape, begin, end)

    def keys(self) -> List[str]:
        return list(self.tensors)

    def meta(self, name: str):
        dtype, shape, _, _ = self.tensors[name]
        return shape, dtype

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.tensors[name]
        out = torch.empty(shape, dtype=dtype)
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + begin)
            got = 0
            while got < end - begin:
                n = f.readinto(buf[got:])
                if not n:
                    raise ConversionError(f"{self.path}: unexpected end of file reading tensor {name!r}")
                got += n
        return out


class TorchBinFile:
    """A torch.save'd state dict (pytorch_model*.bin, mm_projector.bin), memory-mapped (zip format) or loaded."""

    def __init__(self, path: str):
        self.path = path
        try:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be mapped
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
            raise ConversionError(f"{path}: cannot read this torch checkpoint ({type(err).__name__}: {err}); "
                                  f"the file is truncated or corrupt") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise ConversionError(f"{path}: expected a dict of tensors, found {type(sd).__name__}")
        self.tensors = {k: v for k, v in sd.items() if torch.is_tensor(v)}

    def keys(self) -> List[str]:
        return list(self.tensors)

    def meta(self, name: str):
        t = self.tensors[name]
        return tuple(t.shape), t.dtype

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name].clone()


def open_file(path: str):
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: file not found")
    return SafetensorsFile(path) if path.endswith(".safetensors") else TorchBinFile(path)


class TensorFiles:
    """Every tensor of a HF model directory (sharded with an index, or single-file), by name, read lazily."""

    def __init__(self, files: Iterable, where: str):
        self.where = where
        self.index: Dict[str, object] = {}
        for f in files:
            for name in f.keys():
                if name in self.index:
                    raise ConversionError(f"tensor {name!r} appears in both {self.index[name].path} and {f.path}")
                self.index[name] = f

    @classmethod
    def from_dir(cls, path: str) -> "TensorFiles":
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_path = os.path.join(path, index_name)
            if os.path.isfile(index_path):
                try:
                    with open(index_path) as f:
                        weight_map = json.load(f)["weight_map"]
                except (ValueError, KeyError) as err:
                    raise ConversionError(f"{index_path}: not a valid index ({err})") from None
                files = {}
                for shard in sorted(set(weight_map.values())):
                    shard_path = os.path.join(path, shard)
                    if not os.path.isfile(shard_path):
                        raise ConversionError(f"{index_path} lists {shard}, which is missing from {path}")
                    files[shard] = open_file(shard_path)
                tf = cls(files.values(), path)
                for name, shard in weight_map.items():
                    if name not in files[shard].keys():
                        raise ConversionError(f"{index_path} puts tensor {name!r} in {shard}, which lacks it")
                return tf
        names = sorted(os.listdir(path))
        st = [n for n in names if n.endswith(".safetensors")]
        if st:
            return cls([open_file(os.path.join(path, n)) for n in st], path)
        bins = [n for n in names if n.startswith("pytorch_model") and n.endswith(".bin")]
        if bins:
            return cls([open_file(os.path.join(path, n)) for n in bins], path)
        raise ConversionError(f"{path}: no weights found (expected model.safetensors, model-*.safetensors with "
                              f"model.safetensors.index.json, or pytorch_model*.bin)")

    def names(self) -> List[str]:
        return list(self.index)

    def file_of(self, name: str) -> str:
        return self.index[name].path

    def meta(self, name: str):
        return self.index[name].meta(name)

    def get(self, name: str) -> torch.Tensor:
        return self.index[name].get(name)


# ---------------------------------------------------------------------------------------------------------------
# Streaming safetensors writer
# ---------------------------------------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB', '1000' -> bytes."""
    t = text.strip().upper()
    units = (("GIB", 2 ** 30), ("MIB", 2 ** 20), ("KIB", 2 ** 10), ("GB", 10 ** 9), ("MB", 10 ** 6), ("KB", 10 ** 3),
             ("B", 1))
    for suffix, mult in units:
        if t.endswith(suffix):
            try:
                return int(float(t[:-len(suffix)]) * mult)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise ConversionError(f"--max-shard-size {text!r}: use a size like 2GB, 500MB or 5GiB") from None


def write_safetensors(out_dir: str, entries: List[Tuple[str, tuple, torch.dtype, Callable[[], torch.Tensor]]],
                      max_shard_bytes: int, log=print, prefix: str = "model") -> Dict[str, str]:
    """Write ``entries`` (name, shape, dtype, produce) as safetensors shards of at most ``max_shard_bytes`` (a
    larger tensor gets a shard of its own), producing and writing one tensor at a time. Writes
    ``{prefix}.safetensors`` or ``{prefix}-0000i-of-0000n.safetensors`` + ``{prefix}.safetensors.index.json``.
    Returns the weight map."""
    shards, current, size = [], [], 0
    for e in entries:
        nbytes = _nbytes(e[1], e[2])
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += nbytes
    if current or not shards:
        shards.append(current)
    n = len(shards)
    names = [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total, done = {}, 0, 0
    count = sum(len(s) for s in shards)
    for fname, shard in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype, _ in shard:
            nbytes = _nbytes(shape, dtype)
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(os.path.join(out_dir, fname), "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for name, shape, dtype, produce in shard:
                t = produce()
                if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    raise RuntimeError(f"{name}: produced {list(t.shape)} {t.dtype}, planned {list(shape)} {dtype}")
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
                weight_map[name] = fname
                done += 1
                total += t.nbytes
                log(f"  [{done}/{count}] {name} {list(shape)} {str(dtype)[6:]} -> {fname} ({total / 2 ** 20:.1f} MiB)")
                del t
            f.flush()
            os.fsync(f.fileno())
    if n > 1:
        with open(os.path.join(out_dir, f"{prefix}.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return weight_map
