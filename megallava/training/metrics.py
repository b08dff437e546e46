"""Per-iteration metrics: ``<run_dir>/metrics.jsonl`` (one JSON object per logged iteration), TensorBoard events in
``<run_dir>/tb/``, and a concise progress line. Written by global rank 0 only."""
import json
import os
from typing import Dict, Optional


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

    def log(self, record: Dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record["iteration"]
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
        print(format_progress(record), flush=True)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def format_progress(r: Dict, total: Optional[int] = None) -> str:
    return (f"iter {r['iteration']:>6} | loss {r['loss']:.4f} | lr {r['lr']:.3e} | grad_norm {r['grad_norm']:.3f} | "
            f"tokens {r['trained_tokens']} | {r['step_time_s'] * 1000:.0f} ms")
