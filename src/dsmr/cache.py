"""Token cache: tokenize a corpus once, in parallel, into memory-mappable arrays and a manifest.

Layout of one cache folder, `ROOT/{corpus}-{tokenizer kind}-{key}` where `key` hashes the tokenizer
config hash and the source description (so a changed tokenizer builds a new cache instead of mixing):

    manifest.json             written last: tokenizer config + hash + vocabulary, source, every input
                              file (name, path, split, size, sha256, tokens), per-split counts, skipped files,
                              the per-file limits of the build, and the SHA-256 of every file below
    {split}.tokens            the event ids of all pieces of the split, concatenated (raw uint16, or
                              uint32 when the vocabulary needs it)
    {split}.offsets.npy       int64, n_pieces + 1: piece i is tokens[offsets[i]:offsets[i + 1]]

A build writes into a hidden temporary folder beside the cache and renames it into place when
complete, so an interrupted build never leaves a folder that looks like a finished cache. A rebuild
reuses the tokens of every file whose content hash is unchanged and tokenizes only the others.

Opening a cache checks its structure (cheap: the manifest's types, offsets against token file sizes,
token ids against the vocabulary when a split is first read, the tokenizer against the recorded
vocabulary); `TokenCache.verify()` (`dsmr data info --verify`, and the start of training) also checks
every file against the checksum recorded when it was written. A damaged cache is a DsmrError that names
the file; `dsmr data build` with the same options rebuilds it.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import errno
import hashlib
import inspect
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from dsmr import __version__
from dsmr.atomic import atomic_path, atomic_write_json
from dsmr.corpora import SPLITS, SourceFile, limit_files, sha256_file
from dsmr.errors import DsmrError
from dsmr.files import MAX_FILE_BYTES
from dsmr.files import MAX_PIECE_SECONDS as DEFAULT_MAX_SECONDS

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def default_cache_root() -> Path:
    """$DSMR_CACHE, or ~/.cache/dsmr."""
    return Path(os.environ.get("DSMR_CACHE") or "~/.cache/dsmr").expanduser()


def default_workers() -> int:
    """The CPU cores this process may use (at most 8: tokenizing is quick, more mostly adds start-up)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def cache_name(tokenizer, source: dict) -> str:
    """Folder name of the cache for this tokenizer and source: `{corpus}-{kind}-{8 hex digits}`."""
    key = json.dumps({"tokenizer": tokenizer.config_hash(), "source": source}, sort_keys=True)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]
    corpus = re.sub(r"[^A-Za-z0-9_.]+", "_", str(source.get("corpus", "custom"))) or "custom"
    cfg = tokenizer.config()
    params = cfg.get("params") if isinstance(cfg.get("params"), dict) else {}
    kind = str(params.get("tokenization") or cfg.get("kind") or "tokens").lower()  # "remi" beats "miditok"
    kind = re.sub(r"[^A-Za-z0-9_.]+", "_", kind)
    return f"{corpus}-{kind}-{digest}"


@dataclass
class CacheSummary:
    cache: Path
    pieces: dict[str, int]
    tokens: dict[str, int]
    skipped: list[dict]
    seconds: float = 0.0
    tokenized: int = 0  # files this build ran the tokenizer on (including ones it then skipped)
    reused: int = 0  # files whose tokens came from the previous cache
    workers: int = 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cache"] = str(self.cache)
        d["seconds"] = round(self.seconds, 3)
        return d


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


def build_cache(
    files: Sequence[SourceFile],
    out_root: str | os.PathLike,
    tokenizer,
    workers: int | None = None,
    limit: int | None = None,
    progress: bool = True,
    source: dict | None = None,
    skipped: Sequence[dict] = (),
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    max_file_bytes: int | None = MAX_FILE_BYTES,
) -> CacheSummary:
    """Tokenize `files` into a cache folder under `out_root` and return its summary.

    `source` describes the corpus (at least {"corpus": name}); with the tokenizer config it names the
    folder. `skipped` are files the corpus listing already set aside (reported in the manifest).
    Unreadable, corrupt, empty and non-MIDI files are skipped with the reason; the build goes on. So are
    files that are not regular files (FIFOs, devices), larger than `max_file_bytes`, or whose piece lasts
    longer than `max_seconds` (a tiny file can describe thousands of hours: bounded before encoding).
    """
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
    todo: dict[str, dict] = {}  # sha256 -> first entry with that content (duplicates tokenize once)
    for e in entries:
        if e["sha256"] not in reusable:
            todo.setdefault(e["sha256"], e)
    reused = sum(e["sha256"] in reusable for e in entries)

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

    return CacheSummary(
        cache=final,
        pieces={s: c["pieces"] for s, c in counts.items()},
        tokens={s: c["tokens"] for s, c in counts.items()},
        skipped=[{"path": s["path"], "reason": s["reason"]} for s in all_skipped],
        seconds=time.perf_counter() - start,
        tokenized=len(todo),
        reused=reused,
        workers=workers,
    )


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


# ---------------------------------------------------------------------------------------------------
# Reading


def resolve_cache_dir(path: str | os.PathLike) -> Path:
    """A cache folder, or the one cache inside a cache root; DsmrError otherwise."""
    path = Path(path).expanduser()
    if (path / MANIFEST).is_file():
        return path.resolve()
    if not path.is_dir():
        try:
            os.stat(path)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise DsmrError(f"no token cache at {path}: it is a symbolic link loop") from None
            if os.path.islink(path):
                raise DsmrError(f"no token cache at {path}: it is a broken symbolic link") from None
            raise DsmrError(f"no token cache at {path}: the folder does not exist") from None
        raise DsmrError(f"no token cache at {path}: it is a file, not a cache folder (give the folder "
                        f"that holds {MANIFEST}, or the cache root)")
    caches = sorted(p for p in path.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file())
    if len(caches) == 1:
        return caches[0].resolve()
    if not caches:
        raise DsmrError(f"no token cache at {path}: no {MANIFEST} there or in its subfolders "
                        "(build one with `dsmr data build`)")
    raise DsmrError(f"{path} holds {len(caches)} caches ({', '.join(p.name for p in caches)}); name one of them")


_REBUILD = "rebuild it with `dsmr data build` (the same options)"
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")


class TokenCache:
    """Read a built cache: per-split pieces as memory-mapped arrays of event ids (no BOS/EOS).

    Opening checks the structure (manifest types, offsets against the token files); the ids of a split
    are checked against the vocabulary when the split is first read, the tokenizer against the recorded
    vocabulary when it is first built; `verify()` checks the recorded checksums. Any damage is a
    DsmrError naming the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = resolve_cache_dir(path)
        manifest_path = self.path / MANIFEST
        try:
            self.manifest: dict = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DsmrError(f"cannot read the cache manifest {manifest_path}: {err}; {_REBUILD}")
        if not isinstance(self.manifest, dict):
            raise DsmrError(f"the cache manifest {manifest_path} is corrupt (not a JSON object); {_REBUILD}")
        if self.manifest.get("format") != FORMAT_VERSION:
            raise DsmrError(f"{manifest_path} has format {self.manifest.get('format')!r}; this dsmr "
                            f"reads format {FORMAT_VERSION}: rebuild the cache with `dsmr data build`")
        self._check_manifest(manifest_path)
        self.splits: list[str] = list(self.manifest["splits"])
        self._dtype = np.dtype(self.manifest["dtype"])
        self._offsets = {s: self._load_offsets(s) for s in self.splits}
        self._tokens: dict[str, np.ndarray] = {}

    def _check_manifest(self, manifest_path: Path) -> None:
        m = self.manifest
        problems = []
        splits = m.get("splits")
        if not isinstance(splits, dict) or not splits:
            problems.append("'splits' is not a non-empty object")
        else:
            for name, counts in splits.items():
                if not _SPLIT_NAME.fullmatch(name):
                    problems.append(f"split name {name!r} is not a plain name")
                elif not (isinstance(counts, dict) and all(isinstance(counts.get(k), int) and counts[k] >= 0
                                                            for k in ("pieces", "tokens"))):
                    problems.append(f"split {name!r} has no integer 'pieces' and 'tokens' counts")
        if m.get("dtype") not in ("uint16", "uint32"):
            problems.append(f"'dtype' is {m.get('dtype')!r}, not uint16 or uint32")
        vocab = m.get("vocab_size")
        if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
            problems.append(f"'vocab_size' is {vocab!r}, not a positive integer")
        elif m.get("dtype") in ("uint16", "uint32") and token_dtype(vocab) != np.dtype(m["dtype"]):
            problems.append(f"'dtype' {m['dtype']} does not fit 'vocab_size' {vocab}")
        if not isinstance(m.get("tokenizer"), dict) or not isinstance(m["tokenizer"].get("kind"), str):
            problems.append("'tokenizer' is not a tokenizer config (an object with a 'kind')")
        if "vocabulary" in m and not (isinstance(m["vocabulary"], list) and len(m["vocabulary"]) == vocab):
            problems.append(f"'vocabulary' is not a list of {vocab} names")
        if not isinstance(m.get("files", []), list) or not isinstance(m.get("skipped", []), list):
            problems.append("'files' and 'skipped' must be lists")
        elif isinstance(splits, dict):
            for f in m.get("files", []):
                if not (isinstance(f, dict) and f.get("split") in splits and isinstance(f.get("index"), int)
                        and 0 <= f["index"] < (splits[f["split"]] or {}).get("pieces", 0)
                        and isinstance(f.get("sha256"), str)):
                    problems.append(f"a 'files' entry is corrupt ({str(f)[:120]})")
                    break
            for f in m.get("skipped", []):
                if not (isinstance(f, dict) and isinstance(f.get("reason"), str) and "path" in f):
                    problems.append(f"a 'skipped' entry is corrupt ({str(f)[:120]})")
                    break
        if "checksums" in m and not (isinstance(m["checksums"], dict)
                                     and all(isinstance(v, str) for v in m["checksums"].values())):
            problems.append("'checksums' is not an object of file name -> SHA-256")
        if problems:
            raise DsmrError(f"the cache manifest {manifest_path} is corrupt: {'; '.join(problems[:4])}; {_REBUILD}")

    def _load_offsets(self, split: str) -> np.ndarray:
        path = self.path / f"{split}.offsets.npy"
        try:
            offsets = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise DsmrError(f"cannot read {path}: {err}; the cache is corrupt, {_REBUILD}")
        if not isinstance(offsets, np.ndarray) or offsets.dtype != np.int64 or offsets.ndim != 1:
            raise DsmrError(f"{path} is corrupt (expected a 1-D int64 array, got "
                            f"{getattr(offsets, 'dtype', type(offsets).__name__)} of shape "
                            f"{getattr(offsets, 'shape', '?')}); {_REBUILD}")
        tokens = self.path / f"{split}.tokens"
        size = tokens.stat().st_size if tokens.is_file() else -1
        counts = self.manifest["splits"][split]
        if (len(offsets) < 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 0)
                or size != int(offsets[-1]) * self._dtype.itemsize
                or len(offsets) - 1 != counts["pieces"] or int(offsets[-1]) != counts["tokens"]):
            raise DsmrError(f"cache split {split!r} in {self.path} is corrupt ({tokens.name} and "
                            f"{path.name} do not match each other or the manifest); {_REBUILD}")
        return offsets

    def verify(self) -> dict:
        """Check every file of the cache against the SHA-256 recorded when it was written, and every
        token id against the vocabulary. Returns {"verified": [file names]}; DsmrError naming the damaged
        files, or saying the cache has no checksums (built by an older dsmr)."""
        checksums = self.manifest.get("checksums")
        if checksums is None:
            raise DsmrError(f"the cache {self.path} has no recorded checksums (built by an older dsmr); "
                            f"{_REBUILD}")
        expected = {name for s in self.splits for name in (f"{s}.tokens", f"{s}.offsets.npy")}
        damaged = sorted(expected - set(checksums))
        for name in sorted(set(checksums) & expected):
            try:
                if sha256_file(self.path / name) != checksums[name]:
                    damaged.append(name)
            except (OSError, DsmrError):
                damaged.append(name)
        if damaged:
            raise DsmrError(f"the cache {self.path} is corrupt: {', '.join(damaged)} no longer "
                            f"match{'es' if len(damaged) == 1 else ''} what was written; {_REBUILD}")
        for split in self.splits:
            self._split_tokens(split)
        self.tokenizer  # the manifest's tokenizer section must rebuild the tokenizer that wrote the tokens
        return {"verified": sorted(expected)}

    def _check(self, split: str, i: int | None = None) -> None:
        if split not in self._offsets:
            raise DsmrError(f"no split {split!r} in the cache {self.path}; it has {', '.join(self.splits)}")
        if i is not None and not 0 <= i < self.num_pieces(split):
            raise DsmrError(f"piece index {i} is out of range for split {split!r} of {self.path} "
                            f"({self.num_pieces(split)} pieces: 0..{self.num_pieces(split) - 1})")

    def _split_tokens(self, split: str) -> np.ndarray:
        if split not in self._tokens:
            n = int(self._offsets[split][-1])
            path = self.path / f"{split}.tokens"
            try:
                tokens = (np.memmap(path, dtype=self._dtype, mode="r", shape=(n,))
                          if n else np.zeros(0, dtype=self._dtype))
            except (OSError, ValueError) as err:
                raise DsmrError(f"cannot read {path}: {err}; {_REBUILD}")
            vocab = int(self.manifest["vocab_size"])
            if n and int(tokens.max()) >= vocab:  # one pass over the split, once
                raise DsmrError(f"{path} is corrupt: it holds token id {int(tokens.max())}, outside the "
                                f"vocabulary of {vocab}; {_REBUILD}")
            self._tokens[split] = tokens
        return self._tokens[split]

    @cached_property
    def tokenizer(self):
        from dsmr.encodings import tokenizer_from_config

        where = self.path / MANIFEST
        tokenizer = tokenizer_from_config(self.manifest["tokenizer"])
        problems = []
        if tokenizer.vocab_size != self.manifest["vocab_size"]:
            problems.append(f"its tokenizer has {tokenizer.vocab_size} ids but 'vocab_size' is "
                            f"{self.manifest['vocab_size']}")
        elif "vocabulary" in self.manifest and list(tokenizer.vocabulary()) != self.manifest["vocabulary"]:
            problems.append("its tokenizer's event names differ from the recorded 'vocabulary'")
        if "tokenizer_hash" in self.manifest and tokenizer.config_hash() != self.manifest["tokenizer_hash"]:
            problems.append("its tokenizer config does not match the recorded 'tokenizer_hash'")
        if problems:
            raise DsmrError(f"the cache manifest {where} is corrupt: {'; '.join(problems)}; {_REBUILD}")
        return tokenizer

    def num_pieces(self, split: str) -> int:
        self._check(split)
        return len(self._offsets[split]) - 1

    def num_tokens(self, split: str) -> int:
        self._check(split)
        return int(self._offsets[split][-1])

    def piece(self, split: str, i: int) -> np.ndarray:
        """Memory-mapped event ids of piece i of `split` (read-only; no BOS/EOS)."""
        self._check(split, i)
        offsets = self._offsets[split]
        return self._split_tokens(split)[offsets[i]:offsets[i + 1]]

    def pieces(self, split: str) -> list[np.ndarray]:
        return [self.piece(split, i) for i in range(self.num_pieces(split))]

    @cached_property
    def _names(self) -> dict[str, list[str]]:
        names: dict[str, list[str]] = {s: [""] * self.num_pieces(s) for s in self.splits}
        for f in self.manifest.get("files", []):
            names[f["split"]][f["index"]] = str(f.get("name", ""))
        return names

    def piece_name(self, split: str, i: int) -> str:
        self._check(split, i)
        return self._names[split][i]

    def summary(self) -> dict:
        return {
            "pieces": {s: self.num_pieces(s) for s in self.splits},
            "tokens": {s: self.num_tokens(s) for s in self.splits},
            "skipped": [{"path": s["path"], "reason": s["reason"]} for s in self.manifest.get("skipped", [])],
            "cache": str(self.path),
            "tokenizer": self.manifest["tokenizer"].get("kind"),
            "vocab_size": self.manifest.get("vocab_size"),
            "source": self.manifest.get("source"),
        }

    # Used by build_cache to carry unchanged files over to a rebuild.
    def reusable(self) -> dict[str, tuple]:
        """content sha256 -> ("piece", split, index) or ("skipped", reason, path) for every known file."""
        known: dict[str, tuple] = {}
        for s in self.manifest.get("skipped", []):
            if s.get("sha256"):
                known[s["sha256"]] = ("skipped", s["reason"], str(s.get("path", "")))
        for f in self.manifest.get("files", []):
            known[f["sha256"]] = ("piece", f["split"], f["index"])
        return known

    def reused_piece(self, ref: tuple) -> tuple[np.ndarray | None, str | None, str | None]:
        """(ids, None, None) or (None, skip reason, the path the reason names)."""
        if ref[0] == "skipped":
            return None, ref[1], ref[2]
        return np.array(self.piece(ref[1], ref[2])), None, None
