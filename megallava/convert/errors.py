"""Conversion errors and the all-or-nothing output directory."""
import contextlib
import os
import shutil


class ConversionError(Exception):
    """A bad input or option: the message names the file / tensor and the fix. The CLI prints it without a
    traceback. Several problems found at once are listed together."""

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        shown = self.problems[:25]
        more = len(self.problems) - len(shown)
        return "\n".join([f"{len(self.problems)} problems:"] + [f"  - {p}" for p in shown]
                         + ([f"  ... and {more} more"] if more else []))


def check_output(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not overwrite:
        raise ConversionError(f"output {out} already exists: choose another --output or pass --overwrite")


@contextlib.contextmanager
def atomic_output(out: str, overwrite: bool):
    """Yield a fresh ``OUT.tmp-<pid>`` directory; on success it replaces ``out``, on any failure (including
    Ctrl-C) it is removed, so a failed conversion never leaves a half-written output behind."""
    out = os.path.abspath(out)
    check_output(out, overwrite)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out):  # --overwrite: move the old output aside first, drop it once the new one is in place
        old = f"{out}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        if os.path.isdir(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)
    else:
        os.replace(tmp, out)
