"""Atomic file writes: write to a temporary name in the same folder, fsync, then rename.

A reader never sees a half-written file, and an interrupted or failed write (Ctrl-C, full disk) leaves
the previous version in place and removes the temporary file. A process killed outright (kill -9, power
loss) can leave a temporary file `.NAME.XXXX.tmp`; `remove_stale_temporaries` deletes those.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from dsmr.errors import DsmrError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`.

    Use it for writers that want a filename (torch.save, safetensors, symusic's dump_midi, savefig).
    """
    path = Path(path)
    if os.path.lexists(path) and not (path.is_file() or path.is_symlink()):
        # a rename would put the file in place of a device (/dev/full), a FIFO or a socket
        raise DsmrError(f"{path} exists and is not a regular file: refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp creates the file 0600; give it the mode a plain open() would (0666 less the umask)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp = Path(tmp)
    try:
        yield tmp
        # again: some writers (safetensors) replace the file we made, with a private mode
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.filename is None:  # say where: a write() error names no file
            raise OSError(err.errno, f"{err.strerror} (writing {path})") from err
        raise
    except Exception as err:
        # writers in C++ (torch.save, safetensors) report a full disk in their own words
        if _disk_full(path.parent):
            raise OSError(errno.ENOSPC, f"no space left on the device (writing {path}); the earlier file, "
                                        f"if any, is unchanged") from err
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _disk_full(folder: Path, margin: int = 1 << 20) -> bool:
    try:
        stat = os.statvfs(folder)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < margin


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def temporary_names(name: str) -> str:
    """The glob pattern of the temporary files `atomic_path` makes for a file called `name`."""
    return f".{name}.*.tmp"


def remove_stale_temporaries(folder: str | os.PathLike, names) -> list[Path]:
    """Delete the temporary files that killed writers of `names` (files of `folder`) left behind; only
    call it when no other process is writing those files. Returns what was removed."""
    removed = []
    for name in names:
        for tmp in Path(folder).glob(temporary_names(name)):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def save_figure(fig, png_path) -> Path:
    """Lay out a matplotlib figure (unless it has a layout engine of its own) and write it as a PNG
    atomically; returns the path."""
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    return png_path
