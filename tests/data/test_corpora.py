"""Corpora: MAESTRO metadata (CSV/JSON, v2/v3), folder splits, download checks, Bach chorales."""

from __future__ import annotations

import csv
import functools
import hashlib
import http.server
import io
import json
import threading
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import symusic

from dsmr.data.sources import SPLITS, SourceFile
from dsmr.data.corpora import bach_files, corpus_files, folder_files, folder_listing, limit_files, split_by_hash, split_counts
from dsmr.data.maestro import download_maestro, maestro_files, maestro_listing
from dsmr.errors import DsmrError
from tests.midi_factory import tiny_midi

COLUMNS = ["canonical_composer", "canonical_title", "split", "year", "midi_filename", "audio_filename", "duration"]


def fake_maestro(root: Path, version: int = 3, fmt: str = "csv", splits=("train", "train", "validation", "test"),
                 missing: int = 0) -> list[dict]:
    """A MAESTRO-like root: year folders of tiny MIDIs and metadata in the requested layout."""
    rows = []
    for i, split in enumerate(splits):
        rel = f"20{10 + i % 2}/piece-{i}.midi"
        if i >= missing:
            tiny_midi(root / rel, pitch=50 + i)
        rows.append(dict(canonical_composer=f"C{i}", canonical_title=f"T{i}", split=split, year=2010 + i % 2,
                         midi_filename=rel, audio_filename=rel.replace(".midi", ".wav"), duration=1.5))
    meta = root / f"maestro-v{version}.0.0.{fmt}"
    if fmt == "csv":
        with open(meta, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    elif version == 3:  # column-oriented, as the real v3 JSON
        meta.write_text(json.dumps({c: {str(i): r[c] for i, r in enumerate(rows)} for c in COLUMNS}))
    else:  # v1/v2 JSON: a list of records
        meta.write_text(json.dumps(rows))
    return rows


@pytest.mark.parametrize("version,fmt", [(3, "csv"), (3, "json"), (2, "csv"), (2, "json")])
def test_maestro_splits_from_metadata(tmp_path, version, fmt):
    rows = fake_maestro(tmp_path, version=version, fmt=fmt)
    files = maestro_files(tmp_path)
    assert [(f.name, f.split) for f in files] == [(r["midi_filename"], r["split"]) for r in rows]
    assert all(f.path.is_absolute() and f.path.is_file() for f in files)
    assert split_counts(files) == {"train": 2, "validation": 1, "test": 1}


def test_maestro_missing_files_are_reported(tmp_path):
    fake_maestro(tmp_path, missing=1)
    files, missing = maestro_listing(tmp_path)
    assert len(files) == 3
    assert len(missing) == 1 and missing[0]["path"].endswith("piece-0.midi")
    assert "missing" in missing[0]["reason"]
    listed, skipped = corpus_files("maestro", tmp_path)
    assert listed == files and skipped == missing


def test_maestro_errors_name_the_path(tmp_path):
    with pytest.raises(DsmrError, match="does not exist"):
        maestro_files(tmp_path / "nowhere")
    with pytest.raises(DsmrError, match="no MAESTRO metadata in"):
        maestro_files(tmp_path)
    fake_maestro(tmp_path, missing=4)
    with pytest.raises(DsmrError, match="none of the 4 MIDI files"):
        maestro_files(tmp_path)
    (tmp_path / "maestro-v3.0.0.csv").write_text(
        "split,midi_filename\ntrain,a.midi\nholdout,b.midi\n")
    with pytest.raises(DsmrError, match="row 2"):
        maestro_files(tmp_path)
    (tmp_path / "maestro-v3.0.0.csv").write_text("split,midi_filename\ntrain,../escape.midi\n")
    with pytest.raises(DsmrError, match="outside"):
        maestro_files(tmp_path)


@pytest.mark.maestro
def test_real_maestro_split_counts(maestro_root):
    files, missing = maestro_listing(maestro_root)
    assert missing == []
    assert split_counts(files) == {"train": 962, "validation": 137, "test": 177}
    assert len({f.name for f in files}) == 1276


def test_folder_split_is_deterministic_and_follows_content(tmp_path):
    for i in range(40):
        tiny_midi(tmp_path / f"sub{i % 3}" / (f"p{i}.MID" if i % 2 else f"p{i}.midi"), pitch=30 + i, n=2 + i % 5)
    (tmp_path / "notes.txt").write_text("not a midi")
    (tmp_path / ".hidden").mkdir()
    tiny_midi(tmp_path / ".hidden" / "x.mid")
    first = folder_files(tmp_path, fractions=(0.5, 0.25, 0.25))
    assert len(first) == 40  # case-insensitive suffixes, recursive, hidden folder and .txt ignored
    assert folder_files(tmp_path, fractions=(0.5, 0.25, 0.25)) == first
    counts = split_counts(first)
    assert all(counts[s] >= 4 for s in SPLITS), counts
    # The split is a function of the content: a renamed copy lands where its twin is.
    twin = (tmp_path / "sub0" / "p0.midi").read_bytes()
    (tmp_path / "zz-copy.mid").write_bytes(twin)
    by_name = {f.name: f.split for f in folder_files(tmp_path, fractions=(0.5, 0.25, 0.25))}
    assert by_name["zz-copy.mid"] == by_name["sub0/p0.midi"]


def test_split_fractions():
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    counts = Counter(split_by_hash(keys, (0.8, 0.1, 0.1)))
    assert abs(counts["train"] / 4000 - 0.8) < 0.03
    assert abs(counts["validation"] / 4000 - 0.1) < 0.02
    assert Counter(split_by_hash(keys, (1, 0, 0))) == {"train": 4000}
    # Tiny corpora still get a non-empty validation and test split.
    assert sorted(Counter(split_by_hash(keys[:3])).values()) == [1, 1, 1]
    for bad in [(0.5, 0.5), (0.9, 0.2, -0.1), (0.5, 0.2, 0.2), ("a", 1, 0)]:
        with pytest.raises(DsmrError, match="fractions"):
            split_by_hash(keys, bad)


def test_folder_errors(tmp_path):
    with pytest.raises(DsmrError, match="does not exist"):
        folder_files(tmp_path / "missing")
    with pytest.raises(DsmrError, match="no .mid or .midi files"):
        folder_files(tmp_path)
    with pytest.raises(DsmrError, match="unknown corpus"):
        corpus_files("lakh", tmp_path)
    with pytest.raises(DsmrError, match="needs a root"):
        corpus_files("folder")


def test_unreadable_folder_file_is_skipped(tmp_path):
    tiny_midi(tmp_path / "good.mid")
    (tmp_path / "dangling.mid").symlink_to(tmp_path / "gone.mid")
    files, skipped = folder_listing(tmp_path)
    assert [f.name for f in files] == ["good.mid"]
    assert skipped[0]["path"].endswith("dangling.mid") and "broken symbolic link" in skipped[0]["reason"]


def test_limit_keeps_every_split():
    splits = ["train"] * 90 + ["validation"] * 5 + ["test"] * 5
    files = [SourceFile(Path(f"/x/{i}"), s, str(i)) for i, s in enumerate(splits)]
    assert split_counts(limit_files(files, 10)) == {"train": 8, "validation": 1, "test": 1}
    assert limit_files(files, 3) == [files[0], files[90], files[95]]
    assert limit_files(files, 2) == [files[0], files[90]]
    assert limit_files(files, None) == files and limit_files(files, 500) == files
    assert len(limit_files(files, 37)) == 37


# ---------------------------------------------------------------------------------------------------
# Download, against a server on 127.0.0.1


@pytest.fixture()
def http_dir(tmp_path):
    """Serve a folder over HTTP on 127.0.0.1 in a thread; yields (folder, base_url)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def maestro_zip(tmp_path: Path, extra: dict[str, bytes] | None = None) -> bytes:
    src = tmp_path / "zipsrc" / "maestro-v3.0.0"
    fake_maestro(src)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, p.relative_to(src.parent).as_posix())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_download_with_good_checksum(tmp_path, http_dir):
    served, base = http_dir
    data = maestro_zip(tmp_path)
    (served / "maestro-v3.0.0-midi.zip").write_bytes(data)
    dest = tmp_path / "dest"
    root = download_maestro(dest, url=f"{base}/maestro-v3.0.0-midi.zip", sha256=hashlib.sha256(data).hexdigest(),
                            size=len(data), progress=False)
    assert root == (dest / "maestro-v3.0.0").resolve()
    assert split_counts(maestro_files(root)) == {"train": 2, "validation": 1, "test": 1}
    assert sorted(p.name for p in dest.iterdir()) == ["maestro-v3.0.0"]  # no temp files left
    # A second call finds the extracted copy and does not download again.
    (served / "maestro-v3.0.0-midi.zip").unlink()
    assert download_maestro(dest, url=f"{base}/maestro-v3.0.0-midi.zip", progress=False) == root


@pytest.mark.parametrize("wrong", ["sha256", "size"])
def test_download_checksum_failure_extracts_nothing(tmp_path, http_dir, wrong):
    served, base = http_dir
    data = maestro_zip(tmp_path)
    (served / "m.zip").write_bytes(data)
    good = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    bad = {"sha256": "0" * 64, "size": len(data) - 1}
    dest = tmp_path / "dest"
    with pytest.raises(DsmrError, match="checksum mismatch" if wrong == "sha256" else "bytes"):
        download_maestro(dest, url=f"{base}/m.zip", **{**good, wrong: bad[wrong]}, progress=False)
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("entry", ["../evil.txt", "/abs/evil.txt", "maestro-v3.0.0/../../evil.txt"])
def test_download_refuses_path_traversal(tmp_path, http_dir, entry):
    served, base = http_dir
    data = maestro_zip(tmp_path, extra={entry: b"owned"})
    (served / "m.zip").write_bytes(data)
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(DsmrError, match="refusing zip entry"):
        download_maestro(dest, url=f"{base}/m.zip", sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                         progress=False)
    assert list(dest.iterdir()) == []
    assert not any(p.name == "evil.txt" for p in tmp_path.rglob("*"))


def test_download_network_error_is_a_dsmr_error(tmp_path, http_dir):
    _, base = http_dir
    with pytest.raises(DsmrError, match="cannot download"):
        download_maestro(tmp_path / "d", url=f"{base}/absent.zip", progress=False)


# ---------------------------------------------------------------------------------------------------
# Bach chorales


def test_bach_converts_a_few_chorales_once(tmp_path):
    files, skipped = bach_files(tmp_path, limit=4, workers=2, progress=False)
    assert skipped == []
    assert len(files) == 4 and {f.split for f in files} == set(SPLITS)
    for f in files:
        score = symusic.Score(str(f.path))
        assert score.note_num() > 50, f.name
    mtimes = {f.name: f.path.stat().st_mtime_ns for f in files}
    again, _ = bach_files(tmp_path, limit=4, progress=False)
    assert again == files and {f.name: f.path.stat().st_mtime_ns for f in again} == mtimes


def test_bach_failures_are_reported_not_fatal(tmp_path, monkeypatch):
    import dsmr.data.corpora as corpora

    names = corpora.bach_chorale_names()[:3]
    monkeypatch.setattr(corpora, "bach_chorale_names", lambda: names + ["bach/no-such-chorale"])
    files, skipped = bach_files(tmp_path, progress=False)
    assert len(files) == 3
    assert skipped[0]["path"] == "bach/no-such-chorale" and "could not convert" in skipped[0]["reason"]
