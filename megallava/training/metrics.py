"""Per-iteration metrics: ``<run_dir>/metrics.jsonl`` (one JSON object per logged iteration), TensorBoard events in
``<run_dir>/tb/``, and a concise progress line. Written by global rank 0 only.

A record is a flat dict with ``iteration`` plus any keys; values may be None (unknown, e.g. ``mfu`` on a CPU), which
JSON keeps as null and TensorBoard skips. A nested dict (e.g. per-source losses) becomes TensorBoard tags
``key/sub``."""
import json
import numbers
import os
from typing import Dict, Iterator, Optional, Tuple


class MetricsWriter:
    def __init__(self, run_dir: str, enabled: bool):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._file = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
        except ImportError:  # tensorboard is optional at run time
            self._tb = None

    def log(self, record: Dict, total: Optional[int] = None) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record, default=_to_json) + "\n")
        if self._tb is not None:
            step = int(record["iteration"])
            for tag, value in _scalars(record):
                if tag != "iteration":
                    self._tb.add_scalar(tag, value, step)
        print(format_progress(record, total), flush=True)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()
            self.enabled = False


def _to_json(value):
    """numpy / 0-d torch scalars -> Python numbers (json cannot write them natively)."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"metrics value of type {type(value).__name__} is not JSON serialisable")


def _scalars(record: Dict, prefix: str = "") -> Iterator[Tuple[str, float]]:
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif hasattr(value, "item") and getattr(value, "ndim", 0) == 0 and not isinstance(value, numbers.Number):
            yield f"{prefix}{key}", float(value.item())  # 0-d tensor
        elif isinstance(value, numbers.Real):  # bools log as 0/1; None and strings are skipped
            yield f"{prefix}{key}", float(value)


def _si(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


# Progress-line fields in order: record key -> how to show its value.
_PROGRESS_FIELDS = (
    ("loss", lambda v: f"loss {v:.4f}"),
    ("valid/loss", lambda v: f"valid loss {v:.4f}"),
    ("lr", lambda v: f"lr {v:.2e}"),
    ("grad_norm", lambda v: f"gnorm {v:.3f}"),
    ("step_time_s", lambda v: f"{v * 1000:.0f} ms"),
    ("tokens_per_s", lambda v: f"{_si(v)} tok/s"),
    ("tflops_per_gpu", lambda v: f"{v:.1f} TFLOP/s/gpu"),
    ("mfu", lambda v: f"MFU {100 * v:.1f}%"),
    ("mem_gib", lambda v: f"{v:.1f} GiB"),
)


def format_progress(r: Dict, total: Optional[int] = None) -> str:
    """One line per logged iteration; fields whose key is missing or None are left out."""
    parts = [f"iter {r['iteration']}" + (f"/{total}" if total else "")]
    parts += [show(r[key]) for key, show in _PROGRESS_FIELDS if isinstance(r.get(key), numbers.Real)]
    skipped = [f"{k[len('skipped_'):]} {r[k]}" for k in sorted(r) if k.startswith("skipped_") and r[k]]
    if skipped:
        parts.append("skipped " + ", ".join(skipped))
    return " | ".join(parts)
