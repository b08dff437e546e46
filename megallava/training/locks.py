"""One run per directory: a lock file in ``train.run_dir`` and in ``checkpoint.dir``, taken by rank 0 at start.

Contract:
- The lock is ``<dir>/.megallava.lock``, created with O_EXCL (atomic on local filesystems, NFS v3+ and Lustre;
  flock is not reliable across hosts on shared filesystems) and holding the holder's host, pid, process start
  time and command line. A second run on the same directory refuses to start, naming the holder.
- A lock from a dead run is taken over with a warning: on the same host when its pid is gone (or reused by a
  process started later); from another host when its heartbeat (the file's mtime, refreshed every 30 s by the
  watchdog thread) is older than ``STALE_AFTER_S``, since the pid cannot be checked there.
- Released at the end of the run, on the error path (``faults.hard_exit``) and by the watchdog's exit; only a
  SIGKILLed or crashed host leaves one behind, for the rules above.
"""
import json
import os
import socket
import sys
import time
from typing import Dict, Optional

from megallava.training import faults

LOCK_NAME = ".megallava.lock"
STALE_AFTER_S = 300.0


class LockError(faults.RunError):
    """Another run holds the directory."""
    exit_code = faults.EXIT_CONFIG


def _process_start(pid: int) -> Optional[float]:
    try:
        import psutil
        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - no such process, or psutil unavailable
        return None


def _alive(holder: Dict, mtime: float) -> bool:
    if holder.get("host") != socket.gethostname():
        return time.time() - mtime < STALE_AFTER_S
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    started, recorded = _process_start(pid), holder.get("pid_start")
    return not (started and recorded and abs(started - recorded) > 1.0)  # a reused pid is not the holder


def describe(holder: Dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("start_time", 0)))
    return f"host {holder.get('host')} pid {holder.get('pid')} (started {when}: {holder.get('command', '?')})"


class RunLock:
    def __init__(self, directory: str, purpose: str):
        self.directory, self.purpose = directory, purpose
        self.path = os.path.join(directory, LOCK_NAME)
        self.held = False

    def _read(self):
        try:
            mtime = os.path.getmtime(self.path)
            with open(self.path) as f:
                return json.load(f), mtime
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError):
            return {}, os.path.getmtime(self.path) if os.path.exists(self.path) else time.time()

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a warning when a stale lock was taken over. Raises LockError if held."""
        os.makedirs(self.directory, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
              "start_time": time.time(), "command": " ".join(sys.argv)[:300], "purpose": self.purpose}
        warning = None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, mtime = self._read()
                if holder is None:
                    continue  # released meanwhile
                if not holder and time.time() - mtime < 10:  # being written right now
                    raise LockError(f"{self.purpose} {self.directory} is being locked by another run right now "
                                    f"({self.path}): use another directory or wait for that run to end")
                if holder and _alive(holder, mtime):
                    raise LockError(f"{self.purpose} {self.directory} is in use by another run: {describe(holder)}. "
                                    f"Wait for it to end, use another directory, or, if that run is dead, delete "
                                    f"{self.path}")
                warning = (f"warning: taking over the stale lock {self.path} of a dead run"
                           + (f" ({describe(holder)})" if holder else ""))
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return warning
        raise LockError(f"could not take the lock {self.path}: another run keeps re-creating it")

    def refresh(self) -> None:
        if self.held:
            os.utime(self.path)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder, _ = self._read()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
