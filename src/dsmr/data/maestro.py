"""MAESTRO: its metadata (official splits), its MIDI files, and downloading its archive (checksummed, resumable
into a folder of the user's choice)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
import urllib.parse
import zipfile
from pathlib import Path, PurePosixPath

from dsmr.core.files import HASH_CHUNK
from dsmr.data.sources import SPLITS, SourceFile
from dsmr.errors import DsmrError


# The MIDI-only MAESTRO v3.0.0 archive (about 56 MB) and its published size and SHA-256.
MAESTRO_URL = "https://storage.googleapis.com/magentadata/datasets/maestro/v3.0.0/maestro-v3.0.0-midi.zip"
MAESTRO_SHA256 = "70470ee253295c8d2c71e6d9d4a815189e35c89624b76d22fce5a019d5dde12c"
MAESTRO_SIZE = 58_416_533
# Metadata files, newest layout first; every version has the same columns for what we need.
_MAESTRO_METADATA = [f"maestro-v{v}.0.0.{ext}" for v in (3, 2, 1) for ext in ("csv", "json")]


def _read_metadata(meta: Path) -> list[dict]:
    """Rows of a MAESTRO metadata file: CSV, column-oriented JSON (v3) or a list of records (v1/v2)."""
    try:
        if meta.suffix == ".csv":
            with open(meta, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, csv.Error, json.JSONDecodeError) as err:
        raise DsmrError(f"cannot read MAESTRO metadata {meta}: {err}")
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and all(isinstance(col, dict) for col in data.values()):
        index = sorted(next(iter(data.values()), {}), key=lambda k: int(k) if str(k).isdigit() else k)
        return [{col: values.get(i) for col, values in data.items()} for i in index]
    raise DsmrError(f"MAESTRO metadata {meta} is neither a list of records nor column-oriented JSON")


def maestro_metadata_path(root: str | os.PathLike) -> Path:
    """The metadata file of a MAESTRO root (v3, then v2, then v1; CSV before JSON)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DsmrError(f"MAESTRO root {root} does not exist or is not a folder")
    for name in _MAESTRO_METADATA:
        if (root / name).is_file():
            return root / name
    raise DsmrError(
        f"no MAESTRO metadata in {root}: expected one of {', '.join(_MAESTRO_METADATA[:4])} "
        f"(the folder that holds the year folders and the metadata file)"
    )


def maestro_listing(root: str | os.PathLike) -> tuple[list[SourceFile], list[dict]]:
    """All MAESTRO files listed in the metadata: (present files, [{"path", "reason"}] for missing ones)."""
    meta = maestro_metadata_path(root)
    root = meta.parent.resolve()
    files: list[SourceFile] = []
    missing: list[dict] = []
    for row_number, row in enumerate(_read_metadata(meta), start=1):
        name, split = row.get("midi_filename"), row.get("split")
        if not name or split not in SPLITS:
            raise DsmrError(
                f"{meta}, row {row_number}: needs midi_filename and a split in {SPLITS}, "
                f"got midi_filename={name!r} split={split!r}"
            )
        rel = PurePosixPath(str(name))
        if rel.is_absolute() or ".." in rel.parts:
            raise DsmrError(f"{meta}, row {row_number}: midi_filename {name!r} points outside {root}")
        path = root.joinpath(*rel.parts)
        if path.is_file():
            files.append(SourceFile(path=path, split=split, name=rel.as_posix()))
        else:
            missing.append({"path": str(path), "reason": f"listed in {meta.name} but missing"})
    if not files:
        raise DsmrError(f"none of the {len(missing)} MIDI files listed in {meta} exist under {root}")
    return files, missing


def maestro_files(root: str | os.PathLike) -> list[SourceFile]:
    """MAESTRO files with their official splits (files listed but missing are left out)."""
    return maestro_listing(root)[0]


def _zip_member_target(name: str, target: Path) -> Path:
    """Where a zip entry would land inside `target`; DsmrError if it escapes (absolute, '..', drive)."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise DsmrError(f"refusing zip entry {name!r}: it would be written outside {target}")
    dest = target.joinpath(*parts).resolve()
    if dest != target.resolve() and target.resolve() not in dest.parents:
        raise DsmrError(f"refusing zip entry {name!r}: it would be written outside {target}")
    return dest


def _fetch(url: str, out: Path, size: int | None, progress: bool) -> str:
    """Stream `url` into `out` and return its SHA-256; DsmrError on network errors or a wrong size."""
    import urllib.error
    import urllib.request  # here, not at the top: it costs `dsmr --help` 20 ms

    from tqdm import tqdm

    digest = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(out, "wb") as f:
            total = size or int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="download", file=sys.stderr,
                      disable=not progress) as bar:
                while chunk := response.read(HASH_CHUNK):
                    if size is not None and received + len(chunk) > size:
                        raise DsmrError(f"{url} sent more than the expected {size} bytes")
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as err:
        raise DsmrError(f"cannot download {url}: {err}")
    if size is not None and received != size:
        raise DsmrError(f"{url} gave {received} bytes, expected {size}: incomplete or wrong download")
    return digest.hexdigest()


def download_maestro(
    dest: str | os.PathLike,
    url: str = MAESTRO_URL,
    sha256: str | None = MAESTRO_SHA256,
    size: int | None = MAESTRO_SIZE,
    progress: bool = True,
) -> Path:
    """Download and extract the MAESTRO MIDI archive into `dest`; returns the folder with the metadata.

    The archive is streamed to a temporary file and its size and SHA-256 are checked before anything is
    extracted; every zip entry must stay inside the target folder; extraction goes to a temporary
    folder that is renamed into place only when complete. An existing extracted copy is reused.
    """
    dest = Path(dest).expanduser().resolve()
    dest.mkdir(parents=True, exist_ok=True)
    stem = PurePosixPath(urllib.parse.urlparse(url).path).name.removesuffix(".zip").removesuffix("-midi")
    for candidate in (dest / stem, dest):
        try:
            return maestro_metadata_path(candidate).parent
        except DsmrError:
            pass

    fd, tmp_name = tempfile.mkstemp(prefix=".download-", suffix=".zip", dir=dest)
    os.close(fd)
    archive = Path(tmp_name)
    workdir = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        got = _fetch(url, archive, size, progress)
        if sha256 is not None and got != sha256.lower():
            raise DsmrError(f"checksum mismatch for {url}: SHA-256 {got}, expected {sha256}; nothing extracted")
        try:
            with zipfile.ZipFile(archive) as zf:
                members = zf.infolist()
                for member in members:  # check every entry before writing any
                    _zip_member_target(member.filename, workdir)
                    kind = (member.external_attr >> 16) & 0o170000
                    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                        raise DsmrError(f"refusing zip entry {member.filename!r} of {url}: it is a symbolic link "
                                        f"or special file, not a regular file or folder")
                zf.extractall(workdir)
        except zipfile.BadZipFile as err:
            raise DsmrError(f"{url} is not a valid zip archive: {err}")
        except OSError as err:
            raise DsmrError(f"cannot extract {url} into {dest}: {err.strerror or err} "
                            f"({err.filename or 'an entry'})") from None
        tops = list(workdir.iterdir())
        if len(tops) == 1 and tops[0].is_dir():
            source, final = tops[0], dest / tops[0].name
        else:
            source, final = workdir, dest / stem
        if final.exists():
            raise DsmrError(f"{final} already exists but holds no MAESTRO metadata; move it away and retry")
        os.replace(source, final)
        return maestro_metadata_path(final).parent
    finally:
        archive.unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
