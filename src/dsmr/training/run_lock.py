"""One writer per run folder: a trainer holds an flock on `RUN/.writer.lock` for the whole run.

The system releases an flock when its holder dies (even by SIGKILL), so a killed run never leaves the folder
locked, and nothing has to be cleaned up by hand. A second `dsmr train --out RUN` (fresh or `--resume`) is
refused at once with the PID of the one that holds it. Readers (`dsmr eval`, `dsmr generate`, export) take no
lock: every file they read is replaced atomically, so they see the last complete save.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from dsmr.errors import DsmrError

LOCK_FILE = ".writer.lock"


@contextlib.contextmanager
def run_folder_writer(run_dir, create: bool = True):
    """Hold the right to write into `run_dir` until the block ends; DsmrError naming the holder's PID when
    another process has it. A missing folder is created, or with `create=False` (a resume) left for the
    caller to refuse."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows has no flock; runs there are not guarded
        yield
        return
    run_dir = Path(run_dir)
    if not create and not run_dir.is_dir():
        yield
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK_FILE, "a+")
    except OSError as err:
        raise DsmrError(f"cannot write into the run folder {run_dir}: {err.strerror or err}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise DsmrError(f"{run_dir} is in use: another dsmr train (PID {holder}) is writing into it; wait for "
                            f"it to end, or train into another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
