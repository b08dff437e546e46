"""SIGTERM (SLURM preemption, `scancel`, torchrun shutdown) -> save a checkpoint at the end of the current iteration,
then exit. Ranks agree through an all-reduce, so all of them save at the same iteration even if the signal reached
only some. A second SIGTERM ends the rank at once (no save): whoever sends it twice does not want to wait; while the
main thread is blocked in a collective, where Python cannot run this handler, the signal relay of training/faults.py
does it instead.

Once a preempted run has saved and every rank is past the last collective (``saved``), a further SIGTERM ends the
rank at once with the preemption status 75 instead: that is what reaches the other tasks when the first one exits
75 (srun --kill-on-bad-exit=1 counts any non-zero exit as bad and SIGTERMs the rest; torchrun stops the other
workers), and they have nothing left to do but exit. Without it they died with 143 mid-shutdown."""
import signal
import sys

import torch

from megallava.training import faults


class PreemptionHandler:
    def __init__(self, enabled: bool):
        self.received = False
        self._saved = False
        self._previous = None
        if enabled:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        if self._saved:
            faults.hard_exit(faults.EXIT_PREEMPTED)
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

    def saved(self) -> None:
        """The run stopped on SIGTERM, its checkpoint is complete and no collective is left: a further SIGTERM now
        ends the rank with status 75 (this handler stays installed until the process exits)."""
        self._saved = True
        faults.set_sigterm_exit(faults.EXIT_PREEMPTED)

    def restore(self):
        if self._previous is not None and not self._saved:
            signal.signal(signal.SIGTERM, self._previous)
