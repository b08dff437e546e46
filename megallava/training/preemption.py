"""SIGTERM (SLURM preemption, `scancel`, torchrun shutdown) -> save a checkpoint at the end of the current iteration,
then exit. Ranks agree through an all-reduce, so all of them save at the same iteration even if the signal reached
only some."""
import signal

import torch


class PreemptionHandler:
    def __init__(self, enabled: bool):
        self.received = False
        self._previous = None
        if enabled:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
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
