"""Token cache: layout, skipped inputs, atomic and incremental builds, memory-mapped reading."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import symusic

from dsmr.data.cache import MANIFEST, TokenCache, cache_name
from dsmr.data.cache_build import build_cache
from dsmr.data.sources import SourceFile
from dsmr.data.maestro import maestro_files
from dsmr.errors import DsmrError
from dsmr.data.tokenizers.registry import make_tokenizer
from dsmr.data.tokenizers.performance import PerformanceTokenizer

SOURCE = {"corpus": "folder", "root": "test"}


def tiny_midi(path: Path, pitch: int = 60, n: int = 6) -> Path:
    score = symusic.Score(480)
    track = symusic.Track("piano", program=0)
    for i in range(n):
        track.notes.append(symusic.Note(i * 240, 200, pitch + i % 4, 40 + 10 * (i % 5)))
    score.tracks.append(track)
    path.parent.mkdir(parents=True, exist_ok=True)
    score.dump_midi(str(path))
    return path


def corpus(folder: Path, n: int = 9) -> list[SourceFile]:
    """n tiny distinct MIDI files, three per split (explicit splits keep the tests independent of hashes)."""
    splits = ["train", "validation", "test"]
    return [SourceFile(tiny_midi(folder / f"p{i}.mid", pitch=40 + 3 * i, n=4 + i).resolve(), splits[i % 3], f"p{i}.mid")
            for i in range(n)]


def fingerprint(paths) -> dict:
    return {str(p): (hashlib.sha256(Path(p).read_bytes()).hexdigest(), os.stat(p).st_mtime_ns) for p in paths}


def count_calls(monkeypatch, tok, fail_after: int | None = None) -> list[str]:
    """Record (and optionally interrupt) the tokenizer's encode_file calls in this process."""
    calls: list[str] = []
    original = tok.encode_file

    def encode_file(path):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt  # what Ctrl-C raises in the middle of a build
        calls.append(str(path))
        return original(path)

    monkeypatch.setattr(tok, "encode_file", encode_file)
    return calls


def visible(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def test_build_and_read(tmp_path):
    files = corpus(tmp_path / "midi")
    tok = PerformanceTokenizer()
    summary = build_cache(files, tmp_path / "cache", tok, workers=1, progress=False, source=SOURCE)
    assert summary.cache == tmp_path / "cache" / cache_name(tok, SOURCE)
    assert summary.pieces == {"train": 3, "validation": 3, "test": 3}
    assert summary.skipped == [] and summary.tokenized == 9 and summary.reused == 0

    cache = TokenCache(tmp_path / "cache")  # a root with exactly one cache
    assert cache.path == summary.cache and cache.splits == ["train", "validation", "test"]
    for split in cache.splits:
        expected = [tok.encode_file(f.path) for f in files if f.split == split]
        assert cache.num_pieces(split) == 3
        assert cache.num_tokens(split) == sum(len(e) for e in expected) == summary.tokens[split]
        for i, e in enumerate(expected):
            piece = cache.piece(split, i)
            assert piece.dtype == np.uint16 and isinstance(piece, np.memmap)
            np.testing.assert_array_equal(piece, e)
        assert [cache.piece_name(split, i) for i in range(3)] == [f.name for f in files if f.split == split]
    assert len(cache.pieces("test")) == 3
    built, read = summary.to_dict(), cache.summary()
    assert {k: read[k] for k in ("pieces", "tokens", "skipped", "cache")} == {
        k: built[k] for k in ("pieces", "tokens", "skipped", "cache")}
    assert cache.tokenizer == tok
    manifest = cache.manifest
    assert manifest["tokenizer_hash"] == tok.config_hash() and manifest["vocabulary"] == tok.vocabulary()
    assert {f["name"]: f["sha256"] for f in manifest["files"]} == {
        f.name: hashlib.sha256(f.path.read_bytes()).hexdigest() for f in files}
    assert visible(tmp_path / "cache") == [summary.cache.name]
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")] == []


def test_parallel_build_matches_serial(tmp_path):
    files = corpus(tmp_path / "midi", n=12)
    tok = PerformanceTokenizer()
    one = TokenCache(build_cache(files, tmp_path / "a", tok, workers=1, progress=False, source=SOURCE).cache)
    two = TokenCache(build_cache(files, tmp_path / "b", tok, workers=2, progress=False, source=SOURCE).cache)
    for split in one.splits:
        for a, b in zip(one.pieces(split), two.pieces(split), strict=True):
            np.testing.assert_array_equal(a, b)
    assert one.manifest["files"] == two.manifest["files"]


def test_bad_inputs_are_skipped_with_reasons_and_never_modified(tmp_path):
    folder = tmp_path / "midi"
    good = corpus(folder, n=6)
    (folder / "empty.mid").write_bytes(b"")
    (folder / "text.mid").write_text("this is not a MIDI file\n")
    (folder / "corrupt.mid").write_bytes(good[0].path.read_bytes()[:30])  # truncated mid-track
    silent = symusic.Score(480)
    silent.tracks.append(symusic.Track("piano"))
    silent.dump_midi(str(folder / "silent.mid"))
    bad_names = ["empty.mid", "text.mid", "corrupt.mid", "silent.mid"]
    files = good + [SourceFile((folder / n).resolve(), "train", n) for n in bad_names]
    before = fingerprint(f.path for f in files)

    for workers in (1, 2):
        summary = build_cache(files, tmp_path / f"cache{workers}", PerformanceTokenizer(), workers=workers,
                              progress=False, source=SOURCE, skipped=[{"path": "gone.mid", "reason": "missing"}])
        reasons = {Path(s["path"]).name: s["reason"] for s in summary.skipped}
        assert set(reasons) == set(bad_names) | {"gone.mid"}
        assert "empty" in reasons["empty.mid"]
        assert "MIDI" in reasons["text.mid"] and "MIDI" in reasons["corrupt.mid"]
        assert "no notes" in reasons["silent.mid"]
        assert summary.pieces == {"train": 2, "validation": 2, "test": 2}
        assert len(TokenCache(summary.cache).manifest["skipped"]) == 5
    assert fingerprint(f.path for f in files) == before


def test_all_skipped_is_an_error(tmp_path):
    (tmp_path / "a.mid").write_text("nope")
    with pytest.raises(DsmrError, match="every one of the 1 files was skipped"):
        build_cache([SourceFile(tmp_path / "a.mid", "train", "a.mid")], tmp_path / "c", PerformanceTokenizer(),
                    workers=1, progress=False)
    assert visible(tmp_path / "c") == [] and list((tmp_path / "c").iterdir()) == []


def test_interrupted_build_leaves_no_complete_looking_cache(tmp_path, monkeypatch):
    files = corpus(tmp_path / "midi")
    root = tmp_path / "cache"
    tok = PerformanceTokenizer()
    calls = count_calls(monkeypatch, tok, fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        build_cache(files, root, tok, workers=1, progress=False, source=SOURCE)
    assert len(calls) == 4
    assert list(root.rglob(MANIFEST)) == [] and visible(root) == []
    with pytest.raises(DsmrError, match="no token cache"):
        TokenCache(root)

    monkeypatch.undo()
    summary = build_cache(files, root, tok, workers=1, progress=False, source=SOURCE)
    assert sum(summary.pieces.values()) == 9 and TokenCache(root).path == summary.cache

    # An interrupted rebuild keeps the previous cache as it was.
    before = fingerprint(p for p in summary.cache.iterdir())
    tiny_midi(files[0].path, pitch=90)
    count_calls(monkeypatch, tok, fail_after=0)
    with pytest.raises(KeyboardInterrupt):
        build_cache(files, root, tok, workers=1, progress=False, source=SOURCE)
    assert fingerprint(p for p in summary.cache.iterdir()) == before
    assert sorted(p.name for p in root.iterdir()) == [summary.cache.name]


def test_stale_temp_folder_of_a_crashed_build_is_removed(tmp_path):
    files = corpus(tmp_path / "midi", n=3)
    tok = PerformanceTokenizer()
    root = tmp_path / "cache"
    stale = root / f".{cache_name(tok, SOURCE)}.tmp-999999999-abc"  # no such process
    stale.mkdir(parents=True)
    (stale / "train.tokens").write_bytes(b"\0\0")
    build_cache(files, root, tok, workers=1, progress=False, source=SOURCE)
    assert not stale.exists()


def test_incremental_rebuild_tokenizes_only_changed_files(tmp_path, monkeypatch):
    files = corpus(tmp_path / "midi")
    root = tmp_path / "cache"
    tok = PerformanceTokenizer()
    first = build_cache(files, root, tok, workers=1, progress=False, source=SOURCE)
    calls = count_calls(monkeypatch, tok)

    os.utime(files[2].path, ns=(1, 1))  # touched, same content: nothing to do
    again = build_cache(files, root, tok, workers=1, progress=False, source=SOURCE)
    assert calls == [] and again.reused == 9 and again.tokens == first.tokens

    tiny_midi(files[4].path, pitch=100, n=20)  # new content
    new_file = SourceFile(tiny_midi(tmp_path / "midi" / "new.mid", pitch=20).resolve(), "test", "new.mid")
    summary = build_cache(files + [new_file], root, tok, workers=1, progress=False, source=SOURCE)
    assert sorted(calls) == sorted([str(files[4].path), str(new_file.path)])
    assert summary.tokenized == 2 and summary.reused == 8
    cache = TokenCache(summary.cache)
    assert cache.path == first.cache and visible(root) == [first.cache.name]
    np.testing.assert_array_equal(cache.piece("validation", 1), tok.encode_file(files[4].path))
    np.testing.assert_array_equal(cache.piece("test", 3), tok.encode_file(new_file.path))
    np.testing.assert_array_equal(cache.piece("train", 0), tok.encode_file(files[0].path))


def test_changed_tokenizer_config_builds_a_new_cache(tmp_path):
    files = corpus(tmp_path / "midi", n=3)
    root = tmp_path / "cache"
    a = build_cache(files, root, PerformanceTokenizer(), workers=1, progress=False, source=SOURCE)
    b = build_cache(files, root, PerformanceTokenizer(min_pitch=21, max_pitch=108), workers=1, progress=False,
                    source=SOURCE)
    assert a.cache != b.cache and b.tokenized == 3
    assert visible(root) == sorted([a.cache.name, b.cache.name])
    assert TokenCache(a.cache).manifest["vocab_size"] == 391 and TokenCache(b.cache).manifest["vocab_size"] == 311
    with pytest.raises(DsmrError, match="holds 2 caches"):
        TokenCache(root)


def test_miditok_tokenizer_cache(tmp_path):
    files = corpus(tmp_path / "midi", n=3)
    tok = make_tokenizer("remi")
    summary = build_cache(files, tmp_path / "cache", tok, workers=1, progress=False, source=SOURCE)
    assert summary.cache.name.startswith("folder-remi-")
    cache = TokenCache(summary.cache)
    np.testing.assert_array_equal(cache.piece("train", 0), tok.encode_file(files[0].path))
    assert cache.tokenizer.config() == tok.config()


def test_limit_keeps_every_split(tmp_path):
    files = corpus(tmp_path / "midi", n=12)
    summary = build_cache(files, tmp_path / "cache", PerformanceTokenizer(), workers=1, limit=4, progress=False,
                          source=SOURCE)
    assert sum(summary.pieces.values()) == 4 and all(n >= 1 for n in summary.pieces.values())
    assert TokenCache(summary.cache).manifest["limit"] == 4


def test_reader_errors(tmp_path):
    with pytest.raises(DsmrError, match="does not exist"):
        TokenCache(tmp_path / "nowhere")
    files = corpus(tmp_path / "midi", n=3)
    cache = TokenCache(build_cache(files, tmp_path / "cache", PerformanceTokenizer(), workers=1, progress=False,
                                   source=SOURCE).cache)
    with pytest.raises(DsmrError, match="no split 'holdout'"):
        cache.piece("holdout", 0)
    with pytest.raises(DsmrError, match="out of range"):
        cache.piece("test", 1)
    with pytest.raises(DsmrError, match="out of range"):
        cache.piece_name("test", -1)
    tokens = cache.path / "train.tokens"
    tokens.write_bytes(tokens.read_bytes()[:-2])
    with pytest.raises(DsmrError, match="corrupt"):
        TokenCache(cache.path)
    (cache.path / MANIFEST).write_text("{")
    with pytest.raises(DsmrError, match="cannot read the cache manifest"):
        TokenCache(cache.path)


@pytest.mark.maestro
def test_real_maestro_sample(maestro_root, tmp_path):
    files = maestro_files(maestro_root)
    tok = PerformanceTokenizer()
    summary = build_cache(files, tmp_path, tok, workers=2, limit=6, progress=False,
                          source={"corpus": "maestro", "root": str(maestro_root)})
    assert summary.skipped == [] and sum(summary.pieces.values()) == 6
    cache = TokenCache(summary.cache)
    name = cache.piece_name("validation", 0)
    path = next(f.path for f in files if f.name == name)
    np.testing.assert_array_equal(cache.piece("validation", 0), tok.encode_file(path))
    assert cache.num_tokens("train") > 10_000
