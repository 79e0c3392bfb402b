"""Building a token cache (dsmr.data.cache): tokenize a corpus once, in parallel, into memory-mappable arrays and
a manifest.

A build writes into a hidden temporary folder beside the cache and renames it into place when complete,
so an interrupted build never leaves a folder that looks like a finished cache. A rebuild reuses the
tokens of every file whose content hash is unchanged and tokenizes only the others.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import inspect
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from dsmr import __version__
from dsmr.core.atomic import atomic_path, atomic_write_json
from dsmr.data.sources import SPLITS, SourceFile
from dsmr.data.corpora import limit_files
from dsmr.core.files import sha256_file
from dsmr.errors import DsmrError
from dsmr.core.files import MAX_FILE_BYTES
from dsmr.core.files import MAX_PIECE_SECONDS as DEFAULT_MAX_SECONDS

from dsmr.data.cache import FORMAT_VERSION, MANIFEST, CacheSummary, TokenCache, cache_name, default_workers, token_dtype


# ---------------------------------------------------------------------------------------------------
# Tokenizing one file (in this process or in a pool worker)

_worker_tokenizer = None
_worker_limits: dict = {}


def _init_worker(tokenizer, limits: dict) -> None:
    global _worker_tokenizer, _worker_limits
    _worker_tokenizer, _worker_limits = tokenizer, limits
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it cancels the pool


def default_limits() -> dict:
    """Per-file limits of a build: the longest piece (seconds) and the largest file (bytes) accepted."""
    return {"max_seconds": DEFAULT_MAX_SECONDS, "max_file_bytes": MAX_FILE_BYTES}


def _encode(tokenizer, path: str, limits: dict | None = None) -> tuple[np.ndarray | None, str | None]:
    """(ids in the cache dtype, None) or (None, reason the file is skipped). Never raises for bad files."""
    limits = limits or default_limits()
    try:
        if _takes_limits(tokenizer):
            ids = np.asarray(tokenizer.encode_file(path, max_seconds=limits["max_seconds"],
                                                   max_bytes=limits["max_file_bytes"]))
        else:  # a tokenizer written for the older interface: encode_file(path)
            ids = np.asarray(tokenizer.encode_file(path))
        if ids.size == 0:
            return None, f"no events to encode (the MIDI file has no notes): {path}"
        if ids.ndim != 1 or ids.min() < 0 or ids.max() >= tokenizer.vocab_size:
            return None, f"tokenizer returned ids outside 0..{tokenizer.vocab_size - 1} for {path}"
        return ids.astype(token_dtype(tokenizer.vocab_size)), None
    except DsmrError as err:
        return None, str(err)
    except MemoryError:
        return None, f"out of memory while tokenizing {path}"
    except Exception as err:  # a parser bug on a strange file must not stop a build of thousands
        return None, f"cannot tokenize {path}: {type(err).__name__}: {err}"


def _takes_limits(tokenizer) -> bool:
    try:
        params = inspect.signature(tokenizer.encode_file).parameters
    except (TypeError, ValueError):
        return False
    return "max_seconds" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _encode_in_worker(path: str) -> tuple[np.ndarray | None, str | None]:
    return _encode(_worker_tokenizer, path, _worker_limits)


def _tokenize(tokenizer, paths: list[str], workers: int, bar,
              limits: dict | None = None) -> list[tuple[np.ndarray | None, str | None]]:
    """Results for `paths`, in order. One worker runs in this process; more use a process pool."""
    limits = limits or default_limits()
    if workers <= 1 or len(paths) <= 1:
        results = []
        for p in paths:
            results.append(_encode(tokenizer, p, limits))
            bar.update()
        return results
    results: list = [None] * len(paths)
    # Biggest files first, so that the pool does not wait on one long piece at the end.
    order = sorted(range(len(paths)), key=lambda i: -_size_or_zero(paths[i]))
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=min(workers, len(paths)), initializer=_init_worker, initargs=(tokenizer, limits)
    )
    try:
        futures = {pool.submit(_encode_in_worker, paths[i]): i for i in order}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
            bar.update()
    except concurrent.futures.process.BrokenProcessPool as err:
        raise DsmrError(f"a tokenizer worker process died ({err}); rerun with --workers 1 to find the file")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def _size_or_zero(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------------------
# Building


def _remove_stale_builds(out_root: Path, name: str) -> None:
    """Delete temporary folders that crashed builds of this cache left behind (their process is gone)."""
    for tmp in out_root.glob(f".{name}.*-*"):
        match = re.search(r"\.(?:tmp|old)-(\d+)-", tmp.name)
        if match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # an earlier build of this same process that failed
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _previous(final: Path, limits: dict) -> TokenCache | None:
    """The existing cache at `final`, if it is complete, undamaged and built with the same limits."""
    if not (final / MANIFEST).is_file():
        return None
    try:
        cache = TokenCache(final)
        if cache.manifest.get("limits") != limits:
            return None  # a file skipped (or kept) under other limits must be looked at again
        cache.verify()
        for split in cache.splits:
            cache._split_tokens(split)  # ids checked against the vocabulary
        return cache
    except DsmrError:
        return None


def build_cache(files: Sequence[SourceFile], out_root: str | os.PathLike, tokenizer, workers: int | None = None,
                limit: int | None = None, progress: bool = True, source: dict | None = None,
                skipped: Sequence[dict] = (), max_seconds: float | None = DEFAULT_MAX_SECONDS,
                max_file_bytes: int | None = MAX_FILE_BYTES) -> CacheSummary:
    """Tokenize `files` into a cache folder under `out_root` and return its summary. `source` describes the
    corpus (at least {"corpus": name}); with the tokenizer config it names the folder. `skipped`: files the
    corpus listing already set aside (reported in the manifest). Unreadable, corrupt, empty and non-MIDI
    files are skipped with the reason, and so are files that are not regular files (FIFOs, devices), larger
    than `max_file_bytes`, or whose piece lasts longer than `max_seconds` (a tiny file can describe thousands
    of hours: bounded before encoding); the build goes on."""
    from tqdm import tqdm

    start = time.perf_counter()
    limits = _build_limits(max_seconds, max_file_bytes)
    workers = default_workers() if workers is None else max(1, int(workers))
    source = dict(source or {"corpus": "custom"})
    files = limit_files(files, limit)
    if not files:
        raise DsmrError(f"no files to tokenize for corpus {source.get('corpus', 'custom')!r}")
    out_root = _make_out_root(out_root)
    name = cache_name(tokenizer, source)
    final = out_root / name
    _remove_stale_builds(out_root, name)
    previous = _previous(final, limits)
    reusable = previous.reusable() if previous else {}

    entries, all_skipped = _identify(files, limits["max_file_bytes"], skipped)
    todo, reused = _to_tokenize(entries, reusable)

    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=out_root))
    try:
        with tqdm(total=reused + len(todo), initial=reused, unit="file", desc=f"tokenize {name}",
                  file=sys.stderr, disable=not progress) as bar:
            results = _tokenize(tokenizer, [e["path"] for e in todo.values()], workers, bar, limits)
        fresh = {sha: (ids, reason, todo[sha]["path"]) for sha, (ids, reason) in zip(todo, results)}
        pieces, kept = _gather_pieces(entries, fresh, previous, reusable, all_skipped)
        if not kept:
            first = all_skipped[0]["reason"] if all_skipped else "no files"
            raise DsmrError(f"every one of the {len(files)} files was skipped (first: {first})")
        dtype = token_dtype(tokenizer.vocab_size)
        counts, checksums = _write_splits(tmp, pieces, dtype)
        manifest = _manifest(name, source, tokenizer, dtype, limit, limits, counts, checksums, kept,
                             all_skipped)
        atomic_write_json(tmp / MANIFEST, manifest, indent=1)  # last: its presence marks a complete cache
        _apply_umask(tmp)
        _swap_into_place(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    return CacheSummary(cache=final, pieces={s: c["pieces"] for s, c in counts.items()},
                        tokens={s: c["tokens"] for s, c in counts.items()},
                        skipped=[{"path": s["path"], "reason": s["reason"]} for s in all_skipped],
                        seconds=time.perf_counter() - start, tokenized=len(todo), reused=reused, workers=workers)


def _to_tokenize(entries: list[dict], reusable: dict) -> tuple[dict[str, dict], int]:
    """The files to tokenize, by content (sha256 -> the first entry with it: duplicates tokenize once), and
    how many entries the previous build already holds."""
    todo: dict[str, dict] = {}
    for e in entries:
        if e["sha256"] not in reusable:
            todo.setdefault(e["sha256"], e)
    return todo, sum(e["sha256"] in reusable for e in entries)


def _build_limits(max_seconds, max_file_bytes) -> dict:
    """The per-file limits of a build, checked (recorded in the manifest: a rebuild under other limits
    looks at every file again)."""
    limits = {"max_seconds": None if max_seconds is None else float(max_seconds),
              "max_file_bytes": None if max_file_bytes is None else int(max_file_bytes)}
    if limits["max_seconds"] is not None and not (0 < limits["max_seconds"] < float("inf")):
        raise DsmrError(f"max_seconds must be a positive number of seconds, got {max_seconds!r}")
    if limits["max_file_bytes"] is not None and limits["max_file_bytes"] < 1:
        raise DsmrError(f"max_file_bytes must be a positive number of bytes, got {max_file_bytes!r}")
    return limits


def _make_out_root(out_root) -> Path:
    out_root = Path(out_root).expanduser()
    try:
        out_root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DsmrError(f"cannot create the cache folder {out_root}: {err.strerror or err}")
    return out_root.resolve()


def _identify(files: Sequence[SourceFile], max_file_bytes: int | None,
              skipped: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(one entry per readable file, identified by its content hash; the skipped files so far). Unchanged
    files are recognised by their hash and reuse their tokens (or their skip reason)."""
    entries: list[dict] = []
    all_skipped = [dict(s) for s in skipped]
    for f in files:
        try:
            entry = {"name": f.name, "path": str(f.path), "split": f.split,
                     "size": f.path.stat().st_size, "sha256": sha256_file(f.path, max_file_bytes)}
        except DsmrError as err:  # a FIFO, a device, a link loop, too large
            all_skipped.append({"path": str(f.path), "name": f.name, "reason": str(err)})
            continue
        except OSError as err:
            all_skipped.append({"path": str(f.path), "name": f.name,
                                "reason": f"cannot read {f.path}: {err.strerror or err}"})
            continue
        entries.append(entry)
    return entries, all_skipped


def _gather_pieces(entries: list[dict], fresh: dict, previous: TokenCache | None, reusable: dict,
                   all_skipped: list[dict]) -> tuple[dict[str, list[np.ndarray]], list[dict]]:
    """(the token arrays of every split, the manifest entries of the kept files); files without tokens
    are appended to `all_skipped` with their reason."""
    pieces: dict[str, list[np.ndarray]] = {}
    kept: list[dict] = []
    for e in entries:
        split_pieces = pieces.setdefault(e["split"], [])
        if e["sha256"] in fresh:
            ids, reason, reason_path = fresh[e["sha256"]]
        else:
            ids, reason, reason_path = previous.reused_piece(reusable[e["sha256"]])
        if ids is None:
            # the reason was found on the first file with this content: name this one
            if reason_path and reason_path != e["path"]:
                reason = reason.replace(reason_path, e["path"])
            all_skipped.append({"path": e["path"], "name": e["name"], "reason": reason, "sha256": e["sha256"]})
            continue
        kept.append({**e, "index": len(split_pieces), "tokens": int(ids.size)})
        split_pieces.append(ids)
    return pieces, kept


def _write_splits(folder: Path, pieces: dict[str, list[np.ndarray]], dtype: np.dtype) -> tuple[dict, dict]:
    """Write every split (the usual ones first); (counts per split, SHA-256 per file written)."""
    splits = [s for s in SPLITS if s in pieces] + sorted(s for s in pieces if s not in SPLITS)
    counts, checksums = {}, {}
    for split in splits:
        counts[split] = _write_split(folder, split, pieces[split], dtype)
        for file in (f"{split}.tokens", f"{split}.offsets.npy"):
            checksums[file] = sha256_file(folder / file)
    return counts, checksums


def _manifest(name: str, source: dict, tokenizer, dtype: np.dtype, limit: int | None, limits: dict,
              counts: dict, checksums: dict, kept: list[dict], skipped: list[dict]) -> dict:
    return {
        "format": FORMAT_VERSION,
        "name": name,
        "dsmr_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "tokenizer": tokenizer.config(),
        "tokenizer_hash": tokenizer.config_hash(),
        "vocab_size": int(tokenizer.vocab_size),
        "vocabulary": list(tokenizer.vocabulary()),
        "dtype": dtype.name,
        "limit": limit,
        "limits": limits,
        "splits": counts,
        "checksums": checksums,
        "files": kept,
        "skipped": skipped,
    }


def _write_split(folder: Path, split: str, pieces: list[np.ndarray], dtype: np.dtype) -> dict:
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    with atomic_path(folder / f"{split}.tokens") as tmp, open(tmp, "wb") as f:
        for p in pieces:
            f.write(np.ascontiguousarray(p, dtype=dtype).tobytes())
    with atomic_path(folder / f"{split}.offsets.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, offsets)
    return {"pieces": len(pieces), "tokens": int(offsets[-1])}


def _apply_umask(folder: Path) -> None:
    """Give the build folder and its files the usual permissions (temp files are created private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.iterdir():
        os.chmod(p, 0o666 & ~umask)


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished build onto `final`, moving an older cache aside first and then deleting it."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
