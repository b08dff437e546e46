"""SIGTERM (SLURM preemption, `scancel`, torchrun shutdown) -> save a checkpoint at the end of the current iteration,
then exit. Ranks agree through an all-reduce, so all of them save at the same iteration even if the signal reached
only some. A second SIGTERM ends the rank at once (no save): whoever sends it twice does not want to wait; while the
main thread is blocked in a collective, where Python cannot run this handler, the signal relay of training/faults.py
does it instead."""
import signal
import sys

import torch

from megallava.training import faults


class PreemptionHandler:
    def __init__(self, enabled: bool):
        self.received = False
        self._previous = None
        if enabled:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.received:
            print(f"{faults.label()} second SIGTERM: exiting now without saving", file=sys.stderr, flush=True)
            faults.hard_exit(faults.EXIT_SIGTERM)
        self.received = True

    def should_stop(self) -> bool:
        """Collective: True on every rank if any rank got SIGTERM."""
        flag = torch.tensor([1.0 if self.received else 0.0],
                            device="cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
