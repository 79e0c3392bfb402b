"""Reading input files safely: only regular files, never more than a size limit.

A FIFO, a device (`/dev/zero`), a socket or a folder named `*.mid` would hang or exhaust a reader that
just opens and reads it; a symbolic link loop or a dangling link reads as "not found". These helpers
resolve links, refuse anything that is not a regular file with a reason that names the path and what it
is, and read at most a given number of bytes. Errors are DsmrError (the path and what is wrong).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import BinaryIO, Iterator

from dsmr.errors import DsmrError

# Largest input file read (a MIDI file of real music is well under 10 MB; MAESTRO's largest is ~0.3 MB).
MAX_FILE_BYTES = 64 << 20
# Longest piece accepted for encoding (real pieces last minutes; MAESTRO's longest is under an hour).
MAX_PIECE_SECONDS = 6 * 3600.0


def file_kind(mode: int) -> str:
    """What a stat mode describes, in words."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: str | os.PathLike, what: str = "file") -> os.stat_result:
    """The stat of `path` (links followed); DsmrError when it is missing, a link loop, a dangling link,
    unreadable, or not a regular file. Never opens the file."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise DsmrError(f"{what} {path} is a symbolic link loop") from None
        if err.errno == errno.ENOENT and os.path.islink(path):
            raise DsmrError(f"{what} {path} is a broken symbolic link (to {os.readlink(path)})") from None
        if err.errno == errno.ENOENT:
            raise DsmrError(f"{what} not found: {path}") from None
        raise DsmrError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DsmrError(f"{what} {path} is {file_kind(st.st_mode)}, not a regular file")
    return st


@contextlib.contextmanager
def open_regular(path: str | os.PathLike, what: str = "file") -> Iterator[BinaryIO]:
    """Open a regular file for reading (binary). The type is checked before opening (opening a FIFO
    blocks) and again on the open descriptor (the path could have been swapped in between)."""
    check_regular(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise DsmrError(f"cannot read {what} {path}: {err.strerror or err}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise DsmrError(f"{what} {path} is {file_kind(mode)}, not a regular file")
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def read_regular(path: str | os.PathLike, max_bytes: int | None = MAX_FILE_BYTES, what: str = "file") -> bytes:
    """The bytes of a regular file; DsmrError when it is not one or is larger than `max_bytes`."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise DsmrError(f"{what} {path} is {size:,} bytes, more than the limit of {max_bytes:,} bytes")
        try:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        except OSError as err:
            raise DsmrError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if max_bytes is not None and len(data) > max_bytes:  # grew while we read it
        raise DsmrError(f"{what} {path} is more than the limit of {max_bytes:,} bytes")
    return data


def printable(text: str) -> str:
    """`text` safe to print on any stream: a file name that is not valid UTF-8 (Python keeps its bytes as
    lone surrogates) shows its bytes as \\xNN instead of raising UnicodeEncodeError."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") \
            if _only_escapes(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _only_escapes(text: str) -> bool:
    try:
        text.encode("utf-8", "surrogateescape")
        return True
    except UnicodeEncodeError:
        return False


def _nearest_existing(path: Path) -> Path:
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    return existing


def check_output_file(path: str | os.PathLike, option: str) -> None:
    """DsmrError naming the user's path when an output file cannot be written there: it is a folder, a
    folder on its way is a file, or the folder it goes in is not writable. Creates nothing."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise DsmrError(f"{option} {path} is a folder; give a file name (e.g. {path / 'out.mid'})")
    if os.path.lexists(path) and not (path.is_file() or path.is_symlink()):
        raise DsmrError(f"{option} {path} is not a regular file (a device, FIFO or socket): give a file name")
    if path.resolve().parts[1:2] in (("proc",), ("sys",)):
        raise DsmrError(f"{option} {path} is in the kernel's {path.resolve().parts[1]} file system: give a file "
                        "name in a real folder")
    _check_writable_parent(path, option)


def check_output_folder(path: str | os.PathLike, option: str) -> None:
    """DsmrError naming the user's path when an output folder cannot be used: it is a file (or a link
    loop), a folder on its way is a file, or it (or the folder it would be made in) is not writable."""
    path = Path(path).expanduser()
    if os.path.lexists(path) and not path.is_dir():
        what = "a symbolic link loop or broken link" if not path.exists() else "a file"
        raise DsmrError(f"{option} {path} is {what}, not a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise DsmrError(f"{option} {path}: the folder is not writable")
        return
    _check_writable_parent(path, option)


def _check_writable_parent(path: Path, option: str) -> None:
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise DsmrError(f"{option} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DsmrError(f"{option} {path}: the folder {existing} is not writable")


HASH_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike, max_bytes: int | None = None) -> str:
    """Hex SHA-256 of a regular file's content, read in chunks; DsmrError for a FIFO, a device, a link
    loop (which would hang or never end) or a file larger than `max_bytes`."""
    digest = hashlib.sha256()
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise DsmrError(f"file {path} is {size:,} bytes, more than the limit of {max_bytes:,} bytes")
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
