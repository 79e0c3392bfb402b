"""Token cache: a tokenized corpus as memory-mappable arrays and a manifest; `TokenCache` reads one
(`dsmr.data.cache_build.build_cache` writes it).

Layout of one cache folder, `ROOT/{corpus}-{tokenizer kind}-{key}` where `key` hashes the tokenizer
config hash and the source description (so a changed tokenizer builds a new cache instead of mixing):

    manifest.json             written last: tokenizer config + hash + vocabulary, source, every input
                              file (name, path, split, size, sha256, tokens), per-split counts, skipped files,
                              the per-file limits of the build, and the SHA-256 of every file below
    {split}.tokens            the event ids of all pieces of the split, concatenated (raw uint16, or
                              uint32 when the vocabulary needs it)
    {split}.offsets.npy       int64, n_pieces + 1: piece i is tokens[offsets[i]:offsets[i + 1]]

Opening a cache checks its structure (cheap: the manifest's types, offsets against token file sizes,
token ids against the vocabulary when a split is first read, the tokenizer against the recorded
vocabulary); `TokenCache.verify()` (`dsmr data info --verify`, and the start of training) also checks
every file against the checksum recorded when it was written. A damaged cache is a DsmrError that names
the file; `dsmr data build` with the same options rebuilds it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from dsmr.core.files import sha256_file
from dsmr.errors import DsmrError



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
        from dsmr.data.tokenizers.registry import tokenizer_from_config

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
