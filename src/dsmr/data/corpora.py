"""Corpora: where the MIDI files of a piece collection are and which split each belongs to.

Three sources, each giving a list of `SourceFile` (path, split, stable name):

- MAESTRO from a local root (official metadata, v1/v2/v3 layouts) or downloaded from its official URL
  with the published size and SHA-256 checked before anything is extracted;
- a folder of MIDI files, split deterministically by a hash of each file's content (so a duplicate
  file always lands in the same split as its twin);
- the Bach chorales bundled with music21, converted to MIDI once into a cache folder.

Problems with single files (listed but missing, unreadable, not convertible) are reported as
`{"path", "reason"}` dicts, never fatal; problems with the corpus as a whole raise DsmrError.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import math
import os
import sys
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

from dsmr.core.atomic import atomic_path
from dsmr.core.files import MAX_FILE_BYTES, sha256_file
from dsmr.data.maestro import maestro_listing
from dsmr.data.sources import MIDI_SUFFIXES, SPLITS, SourceFile
from dsmr.errors import DsmrError

CORPORA = ("maestro", "folder", "bach")


# ---------------------------------------------------------------------------------------------------
# Deterministic splits


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate (train, validation, test) fractions: three non-negative numbers summing to 1."""
    try:
        values = tuple(float(x) for x in fractions)
    except (TypeError, ValueError):
        raise DsmrError(f"split fractions must be three numbers (train, validation, test), got {fractions!r}")
    if (len(values) != 3 or not all(math.isfinite(x) and x >= 0 for x in values)
            or abs(sum(values) - 1.0) > 1e-6):
        raise DsmrError(
            f"split fractions must be three finite non-negative numbers summing to 1 (train, validation, "
            f"test), got {fractions!r}"
        )
    return values  # type: ignore[return-value]


def _unit(key: str) -> float:
    """Map a string to a uniform number in [0, 1) through SHA-256 (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_by_hash(keys: Sequence[str], fractions: Sequence[float] = (0.9, 0.05, 0.05)) -> list[str]:
    """Assign each key a split by the hash of the key; the same key always gets the same split.

    With at least three keys, a split whose fraction is positive never comes out empty: the key with
    the highest hash among the donors moves there (this only matters for tiny corpora).
    """
    fractions = check_fractions(fractions)
    units = [_unit(k) for k in keys]
    bounds = (fractions[0], fractions[0] + fractions[1])
    splits = [SPLITS[0] if u < bounds[0] else SPLITS[1] if u < bounds[1] else SPLITS[2] for u in units]
    if len(keys) >= 3:
        for target, frac in ((2, fractions[2]), (1, fractions[1])):
            if frac <= 0 or SPLITS[target] in splits:
                continue
            counts = {s: splits.count(s) for s in SPLITS}
            donors = [i for i, s in enumerate(splits) if counts[s] > 1]
            if donors:
                splits[max(donors, key=lambda i: (units[i], keys[i]))] = SPLITS[target]
    return splits


# ---------------------------------------------------------------------------------------------------
# MAESTRO


# ---------------------------------------------------------------------------------------------------
# A folder of MIDI files


def _midi_paths(root: Path) -> list[Path]:
    """Every .mid/.midi file under root (case-insensitive), skipping hidden files and folders."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(MIDI_SUFFIXES):
                paths.append(Path(dirpath) / name)
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


def folder_listing(
    root: str | os.PathLike, fractions: Sequence[float] = (0.9, 0.05, 0.05), max_bytes: int | None = MAX_FILE_BYTES
) -> tuple[list[SourceFile], list[dict]]:
    """MIDI files under `root`, split by content hash: (files, [{"path", "reason"}] for the unreadable
    ones, those that are not regular files (FIFOs, devices, link loops) and those over `max_bytes`)."""
    fractions = check_fractions(fractions)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DsmrError(f"MIDI folder {root} does not exist or is not a folder")
    root = root.resolve()
    paths = _midi_paths(root)
    if not paths:
        raise DsmrError(f"no .mid or .midi files under {root}")
    readable, digests, skipped = [], [], []
    for path in paths:  # only regular files (links followed) of at most max_bytes are listed
        try:
            digests.append(sha256_file(path, max_bytes))
            readable.append(path)
        except DsmrError as err:
            skipped.append({"path": str(path), "reason": str(err)})
        except OSError as err:
            skipped.append({"path": str(path), "reason": f"cannot read {path}: {err.strerror or err}"})
    splits = split_by_hash(digests, fractions)
    files = [
        SourceFile(path=p, split=s, name=p.relative_to(root).as_posix()) for p, s in zip(readable, splits)
    ]
    return files, skipped


def folder_files(root: str | os.PathLike, fractions: Sequence[float] = (0.9, 0.05, 0.05)) -> list[SourceFile]:
    """MIDI files under `root` (recursive, .mid/.midi), split deterministically by file-content hash."""
    return folder_listing(root, fractions)[0]


# ---------------------------------------------------------------------------------------------------
# Bach chorales bundled with music21


def bach_chorale_names() -> list[str]:
    """music21 corpus names of the Riemenschneider chorales, each file once (e.g. 'bach/bwv269').

    The 371 Riemenschneider numbers refer to 350 distinct files: a few chorales appear twice in the
    collection. Keeping each once keeps a chorale from sitting in two splits.
    """
    from music21.corpus import chorales

    names = chorales.Iterator(returnType="filename")
    return list(dict.fromkeys(names))


def _convert_chorale(corpus_name: str, out: str) -> str | None:
    """Parse one chorale with music21 and write it as MIDI; returns an error message or None."""
    try:
        from music21 import corpus
        from music21.midi import translate

        data = translate.music21ObjectToMidiFile(corpus.parse(corpus_name)).writestr()
        with atomic_path(out) as tmp:
            tmp.write_bytes(data)
        return None
    except Exception as err:  # music21 raises many kinds; a failed work is reported, never fatal
        return f"music21 could not convert {corpus_name}: {type(err).__name__}: {err}"


def bach_files(
    cache_dir: str | os.PathLike,
    limit: int | None = None,
    workers: int = 1,
    progress: bool = True,
    fractions: Sequence[float] = (0.9, 0.05, 0.05),
) -> tuple[list[SourceFile], list[dict]]:
    """The music21 Bach chorales as MIDI files in `cache_dir` (converted once), split by name hash.

    Returns (files, skipped) where skipped lists the works music21 could not convert, with the reason.
    `limit` keeps the first N chorales (Riemenschneider order) so a quick run converts only those.
    """
    from tqdm import tqdm

    cache_dir = Path(cache_dir).expanduser().resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    names = bach_chorale_names()
    if limit is not None:
        names = names[: max(0, int(limit))]
    targets = {n: cache_dir / f"{PurePosixPath(n).name}.mid" for n in names}
    todo = [n for n in names if not targets[n].is_file()]
    errors: dict[str, str] = {}
    with tqdm(total=len(todo), unit="work", desc="bach -> midi", file=sys.stderr,
              disable=not progress or not todo) as bar:
        if workers > 1 and len(todo) > 1:
            with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
                results = pool.map(_convert_chorale, todo, [str(targets[n]) for n in todo], chunksize=4)
                for name, err in zip(todo, results):
                    if err:
                        errors[name] = err
                    bar.update()
        else:
            for name in todo:
                if err := _convert_chorale(name, str(targets[name])):
                    errors[name] = err
                bar.update()
    kept = [n for n in names if n not in errors]
    splits = split_by_hash([targets[n].name for n in kept], fractions)
    files = [SourceFile(path=targets[n], split=s, name=targets[n].name) for n, s in zip(kept, splits)]
    skipped = [{"path": n, "reason": errors[n]} for n in names if n in errors]
    return files, skipped


# ---------------------------------------------------------------------------------------------------
# One entry point for the CLI and the cache


def limit_files(files: Sequence[SourceFile], limit: int | None) -> list[SourceFile]:
    """At most `limit` files, keeping every split represented in proportion (listing order kept)."""
    files = list(files)
    if limit is None or limit >= len(files):
        return files
    if limit <= 0:
        return []
    by_split: dict[str, list[SourceFile]] = {}
    for f in files:
        by_split.setdefault(f.split, []).append(f)
    quota = {s: max(1, limit * len(v) // len(files)) for s, v in by_split.items()}
    rank = {s: SPLITS.index(s) if s in SPLITS else len(SPLITS) for s in by_split}  # train first
    while sum(quota.values()) > limit:  # more splits than files allowed: test goes before validation
        quota[max(quota, key=lambda s: (quota[s], rank[s]))] -= 1
    while sum(quota.values()) < limit:  # hand out the rest where most files remain
        room = {s: len(by_split[s]) - quota[s] for s in quota}
        quota[max(room, key=lambda s: (room[s], -rank[s]))] += 1
    keep = {id(f) for s, v in by_split.items() for f in v[: quota[s]]}
    return [f for f in files if id(f) in keep]


def corpus_files(
    corpus: str,
    root: str | os.PathLike | None = None,
    *,
    fractions: Sequence[float] = (0.9, 0.05, 0.05),
    limit: int | None = None,
    workers: int = 1,
    progress: bool = True,
    max_bytes: int | None = MAX_FILE_BYTES,
) -> tuple[list[SourceFile], list[dict]]:
    """Files of a named corpus and the files skipped while listing it.

    maestro: `root` is the folder holding the metadata; folder: the MIDI folder; bach: the folder the
    converted chorales are cached in (required). `limit` trims the list (for bach it also limits the
    conversion).
    """
    if corpus not in CORPORA:
        raise DsmrError(f"unknown corpus {corpus!r}: choose one of {', '.join(CORPORA)}")
    if root is None:
        hint = "a folder for the converted chorales" if corpus == "bach" else f"the {corpus} folder"
        raise DsmrError(f"corpus {corpus!r} needs a root: {hint}")
    if corpus == "maestro":
        files, skipped = maestro_listing(root)
    elif corpus == "folder":
        files, skipped = folder_listing(root, fractions, max_bytes)
    else:
        files, skipped = bach_files(root, limit=limit, workers=workers, progress=progress, fractions=fractions)
    return limit_files(files, limit), skipped


def split_counts(files: Iterable[SourceFile]) -> dict[str, int]:
    """Number of files per split, in the canonical split order."""
    counts = {s: 0 for s in SPLITS}
    for f in files:
        counts[f.split] = counts.get(f.split, 0) + 1
    return counts
