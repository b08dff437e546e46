"""Runs that learn nothing fail: too many skipped samples, or an iteration without a trained token, stop the run.

Contract:
- ``SkipLog`` wraps the data iterator of the chunk that computes the loss, on tensor-parallel rank 0: every sample
  is read there by exactly one rank, which logs each damaged sample (``corrupt_sample``, ``bad_image``) once,
  naming its shard, key and original id (the input JSON's ``id``, where readable), and remembers one example
  (shard, key, id) per skip reason.
- ``SkipMonitor.check`` runs after every iteration on the global (all-reduced) counts, so every rank decides alike:
  it raises DataHealthError when an iteration trained no token, when a whole global batch was skipped, or when more
  than ``data.max_skip_fraction`` of the samples read by this run were skipped (once ``MIN_SAMPLES`` were read).
  The message names the top skip reasons and an example sample of each.
"""
import sys
from collections import Counter
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from megallava.training import faults

MIN_SAMPLES = 100
LOGGED = ("corrupt_sample", "bad_image")  # damage worth a line each; the other reasons are policy, only counted


class DataHealthError(faults.RunError):
    collective = True


def describe(shard: str, key: str, rid=None) -> str:
    """'sample KEY (id ID) in SHARD': the shard key, and the id of the record in the input JSON where known."""
    return f"sample {key}" + (f" (id {rid!r})" if rid is not None else "") + f" in {shard}"


class SkipLog:
    def __init__(self, iterator: Iterable[Dict], log: bool):
        self._it, self.log = iter(iterator), log
        self.examples: Dict[str, Tuple] = {}
        self._seen = set()

    def __iter__(self):
        return self

    def __next__(self) -> Dict:
        batch = next(self._it)
        for reason, shard, key, *rid in batch.get("skipped_samples", ()):
            example = (shard, key, rid[0] if rid else None)
            self.examples.setdefault(reason, example)
            if self.log and reason in LOGGED and (shard, key) not in self._seen:
                self._seen.add((shard, key))
                print(f"{faults.label()} skipped {reason}: {describe(*example)}", file=sys.stderr, flush=True)
        return batch


class SkipMonitor:
    def __init__(self, max_fraction: float, global_batch_size: int, reasons: List[str],
                 skip_log: Optional[SkipLog] = None):
        self.max_fraction, self.G, self.reasons, self.skip_log = max_fraction, global_batch_size, reasons, skip_log
        self.read, self.skipped = 0, Counter()

    def _examples(self) -> Dict[str, Tuple]:
        """Collective: one example (shard, key, original id) per reason, from whichever rank saw one."""
        mine = self.skip_log.examples if self.skip_log is not None else {}
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, mine)
        out = {}
        for part in gathered:
            for reason, example in part.items():
                out.setdefault(reason, example)
        return out

    def check(self, iteration: int, trained_tokens: int, skipped: Dict[str, int]) -> None:
        """Collective when it raises (every rank takes the same decision from the global counts)."""
        now = sum(skipped.values())
        self.read += self.G
        self.skipped.update({k: v for k, v in skipped.items() if v})
        problem = None
        if now >= self.G:
            problem = f"iteration {iteration}: every sample of the global batch ({self.G}) was skipped"
        elif trained_tokens == 0:
            problem = f"iteration {iteration} trained no token (every label is masked)"
        elif self.read >= MIN_SAMPLES and sum(self.skipped.values()) > self.max_fraction * self.read:
            total = sum(self.skipped.values())
            problem = (f"{total} of the {self.read} samples read by this run ({100 * total / self.read:.1f}%) were "
                       f"skipped, more than data.max_skip_fraction={self.max_fraction}")
        if problem is None:
            return
        examples = self._examples()
        top = ", ".join(f"{r} {n}" + (f" (e.g. {describe(*examples[r])})" if r in examples else "")
                        for r, n in self.skipped.most_common(3))
        raise DataHealthError(
            f"{problem}" + (f"; skipped so far: {top}" if top else "") + ". The run would learn nothing from them: "
            f"check data.seq_length (too_long), data.overlong, the shards (tools/make_shards.py reports bad samples) "
            f"and the templates, or raise data.max_skip_fraction if this rate is expected.")
