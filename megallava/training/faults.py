"""Fail fast, never hang: how a rank reports a failure and ends, and the watchdog that ends a stuck rank.

Contract:
- Every failure ends the process with a non-zero exit status within a bounded time, on every rank:
  ``report()`` prints the failure once, labelled ``[rank N]``, root cause first (errors that name their fix print
  without a traceback; a rank that only lost a peer says so instead of printing a gloo traceback), then
  ``hard_exit()`` SIGKILLs this rank's data-loader workers, releases its locks and ends the process with
  ``os._exit``. Nothing on that path waits on a peer or a child: Python's exit handlers would join the loader
  workers, which ignore SIGTERM (so that a preempted trainer can still save), and destroying a process group waits
  on peers that may be dead or hung.
- ``Watchdog``: the main path runs in named phases, each with a budget (``phase()``); a phase that overruns its
  budget (a collective whose peer is hung, a p2p receive, which gloo never times out, a stalled filesystem) prints
  what this rank was doing and the stacks of its threads, then ``hard_exit(EXIT_TIMEOUT)``. Collectives also carry
  a process-group timeout (``collective_timeout()``), which normally fires first and names the collective. A main
  thread stuck while holding the GIL would starve the watchdog thread: faulthandler's C timer then dumps the stacks
  and exits (status 1) ``BACKSTOP_S`` later.
- Ctrl-C and a second SIGTERM end a rank within ``SIGNAL_GRACE_S`` even while it is blocked in a collective
  (``_relay_signals``).
- ``FaultInjector``: the test hook ``MEGALLAVA_FAULT="RANK:ITERATION:KIND[,...]"`` (see its docstring).

Exit status: 1 error, 2 invalid configuration or preflight problem, 124 watchdog timeout, 130 interrupted,
143 second SIGTERM, 75 stopped by SIGTERM after saving (also for a SIGTERM that comes after that save:
``set_sigterm_exit``).
"""
import contextlib
import errno
import faulthandler
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from typing import Callable, List, Optional

EXIT_ERROR, EXIT_CONFIG, EXIT_TIMEOUT, EXIT_INTERRUPT, EXIT_SIGTERM = 1, 2, 124, 130, 143
EXIT_PREEMPTED = 75   # stopped by SIGTERM after saving, with iterations left (job scripts requeue on it)
SIGNAL_GRACE_S = 2.0  # Ctrl-C / second SIGTERM: the main thread's own handling gets this long (see _relay_signals)
BACKSTOP_S = 30.0     # faulthandler's exit after a watchdog deadline, in case the watchdog thread cannot run

_rank: Optional[int] = None
_cleanups: List[Callable[[], None]] = []
_watchdog: Optional["Watchdog"] = None
_failed_in: Optional[str] = None  # the phase the first exception left
_sigterm_exit = EXIT_SIGTERM      # the status a further SIGTERM ends the rank with (see set_sigterm_exit)


class RunError(RuntimeError):
    """A failure whose message names the problem and its fix: reported without a traceback. ``collective``: every
    rank raises the same error (it was agreed on), so rank 0 alone prints it."""
    collective = False
    exit_code = EXIT_ERROR


def set_rank(rank: int) -> None:
    global _rank
    _rank = rank


def set_sigterm_exit(code: int) -> None:
    """The exit status of a rank that a further SIGTERM ends (the signal relay's, below): EXIT_SIGTERM, or
    EXIT_PREEMPTED once a preempted run has saved (nothing is lost by stopping then; see training/preemption.py)."""
    global _sigterm_exit
    _sigterm_exit = code


def label() -> str:
    return f"[rank {_rank if _rank is not None else '?'}]"


def on_hard_exit(fn: Callable[[], None]) -> Callable[[], None]:
    """Register ``fn`` (must not block: e.g. remove a lock file) to run on ``hard_exit``; returns an unregister."""
    _cleanups.append(fn)
    return lambda: fn in _cleanups and _cleanups.remove(fn)


def kill_workers() -> None:
    """SIGKILL this process's data-loader workers (they ignore SIGTERM; see megallava.data.loader)."""
    loader = sys.modules.get("megallava.data.loader")
    if loader is not None:
        loader.kill_workers()


def hard_exit(code: int) -> None:
    """End this process now: flush, kill loader workers, run the registered cleanups, ``os._exit(code)``."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not stop the exit
            pass
    kill_workers()
    for fn in list(_cleanups):
        try:
            fn()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


# ---------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------

_PEER_SIGNS = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out", "timeout",
               "connection refused", "socket closed", "read error", "write error", "nccl communicator was aborted",
               "watchdog caught collective operation timeout")


def lost_peer(err: BaseException) -> bool:
    """True for the error a rank gets when a peer died or hung (gloo: closed connection or timeout; NCCL: abort)."""
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())) and not isinstance(err, RunError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and not isinstance(err, RunError) and any(s in text for s in _PEER_SIGNS) \
        and ("gloo" in text or "nccl" in text or "pair.cc" in text or "peer" in text)


def _known(err: BaseException) -> bool:
    """Errors whose message is the whole story (names the file / sample / key and the fix)."""
    names = {c.__name__ for c in type(err).__mro__}
    return isinstance(err, RunError) or bool(names & {"ConfigError", "ShardError", "DataError", "ConversionError"})


def report(err: BaseException, rank: int, phase: Optional[str] = None) -> int:
    """Print ``err`` for this rank (root cause first) and return the exit status to end with."""
    from megallava.config import ConfigError

    where = f" during {phase}" if phase else ""
    if isinstance(err, KeyboardInterrupt):
        print(f"{label()} interrupted{where}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPT
    if isinstance(err, ConfigError):
        if rank == 0:
            print(f"megallava.train: {err}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    if _known(err):
        if getattr(err, "collective", False):  # the same on every rank, and self-explanatory: print it once
            if rank == 0:
                print(f"megallava.train: {err}", file=sys.stderr, flush=True)
        else:
            print(f"{label()} error{where}: {err}", file=sys.stderr, flush=True)
        return getattr(err, "exit_code", EXIT_ERROR)
    if lost_peer(err):
        first = str(err).strip().splitlines()[0][:400] if str(err).strip() else type(err).__name__
        print(f"{label()} stopping{where}: lost contact with another rank ({type(err).__name__}: {first}). "
              f"That rank failed, was killed or hung first: its error is the root cause.", file=sys.stderr,
              flush=True)
        return EXIT_ERROR
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    print(f"{label()} error{where}: {type(err).__name__}: {err}\n" +
          "".join(f"{label()} {line}\n" for line in tb.rstrip().splitlines()), file=sys.stderr, flush=True)
    return EXIT_ERROR


_WRITE_FAILED = ("unexpected pos", "file write failed", "write failed")  # torch's serializer on a short write


def disk_full(err: BaseException, free_bytes: Optional[int] = None) -> bool:
    """True if ``err`` (or anything it wraps) is ENOSPC/EDQUOT, or a write failure of torch's serializer (which
    loses the errno: "unexpected pos 704 vs 598") while the filesystem has under 64 MiB free (``free_bytes``,
    measured before the partial files are removed)."""
    short = free_bytes is not None and free_bytes < 64 << 20
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if isinstance(e, (tuple, list)):  # torch DCP's CheckpointException.failures values: (exception, traceback)
            todo += list(e)
            continue
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e).lower()
        if "no space left" in text or "disk quota" in text or (short and any(w in text for w in _WRITE_FAILED)):
            return True
        failures = getattr(e, "failures", None)
        todo += [e.__cause__, e.__context__, *getattr(e, "args", ())]
        todo += list(failures.values()) if isinstance(failures, dict) else []
    return False


# ---------------------------------------------------------------------------------------------------------------
# Timeouts: process-group timeouts and the watchdog
# ---------------------------------------------------------------------------------------------------------------

def set_collective_timeout(seconds: float) -> None:
    """Set the timeout of every process group this rank belongs to (gloo raises, NCCL aborts the communicator after
    it: see distributed.init_distributed). gloo's point-to-point receives ignore it: the watchdog covers those."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if not dist.is_initialized():
        return
    for group in list(getattr(getattr(c10d, "_world", None), "pg_map", {})):  # private: absent -> no-op
        try:
            c10d._set_pg_timeout(timedelta(seconds=seconds), group)
        except (ValueError, RuntimeError, AttributeError, AssertionError):
            pass  # a group this rank is not part of, or a backend without a settable timeout


@contextlib.contextmanager
def collective_timeout(seconds: float, restore: float):
    set_collective_timeout(seconds)
    try:
        yield
    finally:
        set_collective_timeout(restore)


class Watchdog:
    """A daemon thread that ends the process when the current phase overruns its budget; it also runs periodic
    ``heartbeat`` callbacks (e.g. refreshing the run lock)."""

    def __init__(self, rank: int, heartbeat_s: float = 30.0, backstop: bool = False):
        self.rank, self.heartbeat_s, self.backstop = rank, heartbeat_s, backstop
        self._cv = threading.Condition()
        self._what, self._budget, self._deadline = None, 0.0, None
        self._beats: List[Callable[[], None]] = []
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="megallava-watchdog", daemon=True)
        self._thread.start()

    def arm(self, what: str, budget_s: float) -> None:
        self._set(what, budget_s, time.monotonic() + budget_s)

    def _set(self, what: Optional[str], budget: float, deadline: Optional[float]) -> None:
        with self._cv:
            self._what, self._budget, self._deadline = what, budget, deadline
            self._cv.notify()
        # Backstop for a main thread that blocks while holding the GIL (this thread then cannot run): faulthandler's
        # C timer dumps the stacks and _exit(1)s BACKSTOP_S after the deadline. Only in the command line's process:
        # the timer is process-wide, and a process forked while it is armed cannot cancel it.
        if not self.backstop:
            return
        try:
            faulthandler.cancel_dump_traceback_later()
            if deadline is not None:
                faulthandler.dump_traceback_later(max(deadline - time.monotonic(), 0) + BACKSTOP_S, exit=True)
        except (RuntimeError, ValueError, OSError):  # no usable stderr
            pass

    def note(self, what: str) -> None:
        """Rename the current phase (same deadline): what the rank is doing now, for the timeout message."""
        with self._cv:
            self._what = what

    def disarm(self) -> None:
        self._set(None, 0.0, None)

    @property
    def what(self) -> Optional[str]:
        return self._what

    def heartbeat(self, fn: Callable[[], None]) -> None:
        self._beats.append(fn)

    def stop(self) -> None:
        self.disarm()
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        next_beat = time.monotonic() + self.heartbeat_s
        while True:
            with self._cv:
                if self._stopped:
                    return
                now = time.monotonic()
                if self._deadline is not None and now >= self._deadline:
                    self._fire(self._what, self._budget)
                wake = min(next_beat, self._deadline if self._deadline is not None else next_beat)
                self._cv.wait(timeout=max(wake - now, 0.01))
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.heartbeat_s
                for fn in list(self._beats):
                    try:
                        fn()
                    except Exception:  # noqa: BLE001 - a failed heartbeat must not kill the watchdog
                        pass

    def _fire(self, what: str, budget: float) -> None:
        print(f"{label()} watchdog: {what} did not finish within {budget:.0f} s: this rank, or a rank it waits for, "
              f"is stuck (or the filesystem stalls). Stacks of this rank follow; exiting with status {EXIT_TIMEOUT}. "
              f"If this phase "
              f"is legitimately that slow, raise train.fault_timeout_s (steps), train.startup_timeout_s (start, "
              f"first iteration) or checkpoint.timeout_s (saves).", file=sys.stderr, flush=True)
        try:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        except Exception:  # noqa: BLE001
            pass
        hard_exit(EXIT_TIMEOUT)


_relay_installed = False


def _relay_signals() -> None:
    """Ctrl-C, or a second SIGTERM, ends the rank even while its main thread is blocked inside a collective, where
    Python cannot run signal handlers: the signal's byte on Python's wakeup fd reaches this thread anyway. It gives
    the main thread's own handling SIGNAL_GRACE_S, then exits."""
    global _relay_installed
    if _relay_installed or threading.current_thread() is not threading.main_thread():
        return
    try:
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except (ValueError, OSError):
        return
    _relay_installed = True

    def relay():
        terms = 0
        while True:
            for signum in os.read(r, 64):
                if signum == signal.SIGTERM:
                    terms += 1
                if signum == signal.SIGINT or (signum == signal.SIGTERM and terms >= 2):
                    time.sleep(SIGNAL_GRACE_S)  # normally the main thread has ended the process by now
                    what = ("interrupted (Ctrl-C)" if signum == signal.SIGINT else "second SIGTERM"
                            if _sigterm_exit != EXIT_PREEMPTED else "SIGTERM after the preemption save")
                    doing = _watchdog.what if _watchdog is not None else None
                    print(f"{label()} {what} while blocked in {doing or 'start-up'}: exiting now",
                          file=sys.stderr, flush=True)
                    hard_exit(EXIT_INTERRUPT if signum == signal.SIGINT else _sigterm_exit)

    threading.Thread(target=relay, name="megallava-signals", daemon=True).start()


def start_watchdog(rank: int, backstop: bool = False) -> Watchdog:
    global _watchdog
    if _watchdog is None:
        _watchdog = Watchdog(rank, backstop=backstop)
    _relay_signals()
    return _watchdog


def stop_watchdog() -> None:
    global _watchdog, _failed_in
    _failed_in = None
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None


def watchdog() -> Optional[Watchdog]:
    return _watchdog


def failed_phase() -> Optional[str]:
    """What the rank was doing when the exception being handled left its phase (see ``phase``)."""
    return _failed_in or (_watchdog.what if _watchdog is not None else None)


@contextlib.contextmanager
def phase(what: str, budget_s: float):
    """Run the block as the watched phase ``what`` (no-op without a watchdog); the previous phase resumes after."""
    global _failed_in
    wd = _watchdog
    if wd is None:
        yield
        return
    previous = (wd._what, wd._budget, wd._deadline)
    wd.arm(what, budget_s)
    try:
        yield
    except BaseException:
        _failed_in = _failed_in or wd._what  # the innermost label, as last set by note()
        raise
    finally:
        wd._set(*previous)


def note(what: str) -> None:
    if _watchdog is not None:
        _watchdog.note(what)


# ---------------------------------------------------------------------------------------------------------------
# Test hook
# ---------------------------------------------------------------------------------------------------------------

class FaultInjector:
    """``MEGALLAVA_FAULT="RANK:ITERATION:KIND[,...]"``: global rank RANK fails at ITERATION (tests only; unset, it
    does nothing). KIND:
      raise   RuntimeError from its data iterator, in the middle of the step (after the step's first micro-batch)
      sigkill SIGKILL itself at the same point
      hang    stop responding at the same point (a hung rank: the timeouts must end the job)
      worker  SIGKILL one of its data-loader workers before the step
      enospc  its checkpoint writer fails with ENOSPC in the save after ITERATION
    Each fault first prints ``[rank R] MEGALLAVA_FAULT: KIND in iteration N at unix time T`` (flushed), so that a
    test can measure the time from the fault to the end of the job.
    """

    def __init__(self, rank: int, spec: Optional[str] = None):
        spec = os.environ.get("MEGALLAVA_FAULT", "") if spec is None else spec
        self.faults = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            r, it, kind = item.split(":")
            if int(r) == rank:
                self.faults[int(it)] = kind
        self.iteration, self._calls = 0, 0

    def __bool__(self):
        return bool(self.faults)

    @staticmethod
    def _announce(kind: str, iteration: int) -> None:
        print(f"{label()} MEGALLAVA_FAULT: {kind} in iteration {iteration} at unix time {time.time():.3f}",
              file=sys.stderr, flush=True)

    def start_iteration(self, iteration: int) -> None:
        self.iteration, self._calls = iteration, 0
        if self.faults.get(iteration) == "worker":
            self._announce("worker", iteration)
            import megallava.data.loader as loader
            pids = loader.worker_pids()
            if pids:
                os.kill(pids[0], signal.SIGKILL)

    def wrap(self, iterator):
        """The rank's data iterator, failing mid-step at the chosen iteration."""
        for item in iterator:
            self._calls += 1
            kind = self.faults.get(self.iteration)
            if self._calls == 2 and kind in ("raise", "sigkill", "hang"):
                self._announce(kind, self.iteration)
                if kind == "raise":
                    raise RuntimeError(f"injected fault (MEGALLAVA_FAULT) in iteration {self.iteration}")
                if kind == "sigkill":
                    os.kill(os.getpid(), signal.SIGKILL)
                threading.Event().wait()  # hang: never returns
            yield item

    @contextlib.contextmanager
    def saving(self, iteration: int):
        """During the save after ``iteration``: with ``enospc``, every file this rank writes fails with ENOSPC."""
        if self.faults.get(iteration) != "enospc":
            yield
            return
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

        self._announce("enospc", iteration)
        original = fa._write_item

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        fa._write_item = full
        try:
            yield
        finally:
            fa._write_item = original
