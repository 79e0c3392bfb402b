"""Hostile but fair inputs: expansion-bomb MIDI, FIFOs and devices named *.mid, fuzzed bytes,
corrupt caches, odd paths. Nothing may crash, hang or exhaust memory; every refusal names the file."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import stat
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsmr.data.cache import MANIFEST, TokenCache

from dsmr.data.cache_build import build_cache
from dsmr.cli import main
from dsmr.data.sources import SourceFile
from dsmr.data.corpora import check_fractions, folder_listing
from dsmr.data.maestro import download_maestro
from dsmr.errors import DsmrError
from dsmr.core.files import read_regular
from dsmr.data.tokenizers.registry import make_tokenizer
from dsmr.data.tokenizers.performance import PerformanceTokenizer
from dsmr.data.midi import load_midi
from tests.midi_factory import write_midi_file

TOK = PerformanceTokenizer()


# ---- raw MIDI bytes

def vlq(n: int) -> bytes:
    out = [n & 0x7F]
    n >>= 7
    while n:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    return bytes(reversed(out))


def raw_midi(events: list[tuple[int, bytes]], division: int = 480) -> bytes:
    """A format-0 MIDI file: (delta ticks, event bytes) pairs, then end of track."""
    track = b"".join(vlq(d) + e for d, e in events) + b"\x00\xff\x2f\x00"
    return (b"MThd" + struct.pack(">IHHH", 6, 0, 1, division & 0xFFFF)
            + b"MTrk" + struct.pack(">I", len(track)) + track)


def note(delta_off: int, division: int = 480, tempo_us: int | None = None) -> bytes:
    events = [] if tempo_us is None else [(0, b"\xff\x51\x03" + tempo_us.to_bytes(3, "big"))]
    return raw_midi(events + [(0, b"\x90\x3c\x40"), (delta_off, b"\x80\x3c\x00")], division)


BOMBS = {
    "division1.mid": note(0x0FFFFFFF, division=1),  # 37 bytes, 268M quarter notes
    "huge_delta.mid": note(0x0FFFFFFF),  # 37 bytes, ~77 hours at 120 qpm
    "slow_tempo.mid": note(480 * 20_000, tempo_us=0xFFFFFF),  # 20,000 quarters of 16.7 s: ~93 hours
}


@contextlib.contextmanager
def no_hang(seconds: int = 20):
    """Fail (instead of hanging the suite) when the body takes longer than `seconds`."""
    def expired(signum, frame):
        raise TimeoutError(f"hung for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def good_files(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_midi_file(folder / f"good{i}.mid", [(j * 0.25, j * 0.25 + 0.2, 50 + i + j % 5, 70)
                                                      for j in range(6 + i)]) for i in range(n)]


# ---- expansion bombs (item 2), division 0 (item 4)

@pytest.mark.parametrize("name", sorted(BOMBS))
def test_expansion_bomb_is_refused_before_allocating(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BOMBS[name])
    with no_hang(), pytest.raises(DsmrError, match=r"hours") as err:
        TOK.encode_file(path)
    assert str(path) in str(err.value)
    with no_hang(), pytest.raises(DsmrError, match=r"hours"):
        make_tokenizer("remi").encode_file(path)


def test_bombs_are_skipped_by_a_build_that_goes_on(tmp_path):
    files = [SourceFile(p, "train", p.name) for p in good_files(tmp_path / "in")]
    for name, data in BOMBS.items():
        (tmp_path / "in" / name).write_bytes(data)
        files.append(SourceFile(tmp_path / "in" / name, "train", name))
    with no_hang(60):
        summary = build_cache(files, tmp_path / "cache", TOK, workers=1, progress=False)
    assert summary.pieces == {"train": 3}
    reasons = {Path(s["path"]).name: s["reason"] for s in summary.skipped}
    assert set(reasons) == set(BOMBS) and all("hours" in r and "limit" in r for r in reasons.values())
    assert (summary.cache / "train.tokens").stat().st_size < 10_000


def test_max_seconds_option_sets_the_limit(tmp_path, capsys):
    folder = tmp_path / "in"
    good_files(folder, 3)
    write_midi_file(folder / "long.mid", [(0.0, 0.5, 60, 70), (100.0, 100.5, 62, 70)])  # 100 s
    code = main(["data", "build", "--corpus", "folder", "--root", str(folder), "--cache", str(tmp_path / "c"),
                 "--workers", "1", "--max-seconds", "50", "--json", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    [skipped] = json.loads(out)["skipped"]
    assert skipped["path"].endswith("long.mid") and "lasts 100 seconds" in skipped["reason"]
    for bad in ("0", "-5", "nan", "inf"):
        assert main(["data", "build", "--corpus", "folder", "--root", str(folder), "--max-seconds", bad]) == 2


def test_division_zero_is_a_dsmr_error(tmp_path):
    path = tmp_path / "div0.mid"
    path.write_bytes(note(100, division=0))
    with pytest.raises(DsmrError, match="division is 0"):
        TOK.encode_file(path)


# ---- FIFOs, devices, link loops, size limit (item 3)

def test_fifo_device_and_link_loop_named_mid_are_skipped_not_read(tmp_path):
    folder = tmp_path / "in"
    good_files(folder, 3)
    os.mkfifo(folder / "pipe.mid")  # opening it for reading would block forever
    (folder / "zero.mid").symlink_to("/dev/zero")  # reading it would never end
    (folder / "loop.mid").symlink_to(folder / "loop.mid")
    (folder / "dir.mid").mkdir()
    with no_hang():
        files, skipped = folder_listing(folder)
    assert sorted(f.name for f in files) == ["good0.mid", "good1.mid", "good2.mid"]
    reasons = {Path(s["path"]).name: s["reason"] for s in skipped}
    assert "FIFO" in reasons["pipe.mid"] and "character device" in reasons["zero.mid"]
    assert "link loop" in reasons["loop.mid"]
    assert all(name in reasons[name] for name in reasons)
    # Listed by someone else (a MAESTRO metadata row): the build skips them too, and so does encode_file.
    odd = [SourceFile(folder / n, "train", n) for n in ("pipe.mid", "zero.mid", "loop.mid")]
    with no_hang():
        summary = build_cache(files + odd, tmp_path / "cache", TOK, workers=1, progress=False)
        for f in odd:
            with pytest.raises(DsmrError, match="not a regular file|link loop"):
                TOK.encode_file(f.path)
    assert sorted(Path(s["path"]).name for s in summary.skipped) == ["loop.mid", "pipe.mid", "zero.mid"]


def test_file_size_limit(tmp_path):
    [path] = good_files(tmp_path, 1)
    with pytest.raises(DsmrError, match="more than the limit of 10 bytes"):
        read_regular(path, max_bytes=10)
    with pytest.raises(DsmrError, match="more than the limit"):
        load_midi(path, max_bytes=10)
    files, skipped = folder_listing(tmp_path, max_bytes=10)
    assert files == [] and "more than the limit" in skipped[0]["reason"]


# ---- every failure of encode_file is a DsmrError (item 4): a property over mutated real MIDI bytes

def _seed_midi() -> bytes:
    import symusic

    from tests.midi_factory import make_score

    score = make_score([(i * 0.13, i * 0.13 + 0.4, 40 + (7 * i) % 40, 30 + i) for i in range(24)],
                       pedals=[(0.5, 1.5), (2.0, None)])
    score.tempos.append(symusic.Tempo(1.0, qpm=90.0, ttype="second"))
    return score.dumps_midi()


SEED = _seed_midi()


@st.composite
def mutated_midi(draw) -> bytes:
    data = bytearray(SEED)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "header", "delta"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "header" and len(data) >= 14:  # format, track count, division
            offset = draw(st.sampled_from([8, 10, 12]))
            data[offset:offset + 2] = draw(st.integers(0, 0xFFFF)).to_bytes(2, "big")
        elif kind == "delta" and len(data) > 30:  # a huge variable-length delta time
            data[pos:pos] = draw(st.sampled_from([b"\xff\xff\xff\x7f", b"\x8f\xff\xff\x7f", b"\x81\x80\x80\x00"]))
    return bytes(data)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(data=mutated_midi())
def test_encode_file_is_a_dsmr_error_or_valid_ids(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz", numbered=True) / "x.mid"
    path.write_bytes(data)
    try:
        ids = TOK.encode_file(path, max_seconds=600)
    except DsmrError as err:
        assert str(path) in str(err)
        return
    assert ids.ndim == 1 and ids.dtype == np.int64 and ids.size > 0
    assert ids.min() >= 0 and ids.max() < TOK.vocab_size
    # bounded: at most a few events per byte plus one time shift per second of the 600 s limit
    assert ids.size <= 4 * len(data) + 700


# ---- corrupt caches are detected (item 5)

@pytest.fixture()
def built(tmp_path) -> Path:
    files = [SourceFile(p, ("train", "validation", "test")[i % 3], p.name)
             for i, p in enumerate(good_files(tmp_path / "in", 6))]
    return build_cache(files, tmp_path / "cache", TOK, workers=1, progress=False).cache


def _edit_manifest(cache: Path, change) -> None:
    m = json.loads((cache / MANIFEST).read_text())
    m = change(m)
    (cache / MANIFEST).write_text(json.dumps(m))


def _save_offsets(cache: Path, array) -> None:
    with open(cache / "train.offsets.npy", "wb") as f:
        np.save(f, array)


DAMAGES = {
    "manifest is a list": lambda c: _edit_manifest(c, lambda m: [m]),
    "tokenizer null": lambda c: _edit_manifest(c, lambda m: {**m, "tokenizer": None}),
    "vocab_size a string": lambda c: _edit_manifest(c, lambda m: {**m, "vocab_size": "391"}),
    "split name escapes": lambda c: _edit_manifest(c, lambda m: {**m, "splits": {"../x": m["splits"]["train"]}}),
    "offsets empty": lambda c: _save_offsets(c, np.zeros(0, np.int64)),
    "offsets float": lambda c: _save_offsets(c, np.load(c / "train.offsets.npy").astype(np.float64)),
    "offsets not npy": lambda c: (c / "train.offsets.npy").write_bytes(b"garbage"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_structurally_corrupt_cache_is_refused_on_open(built, damage):
    DAMAGES[damage](built)
    with pytest.raises(DsmrError, match="corrupt|cannot read") as err:
        TokenCache(built)
    assert str(built) in str(err.value) and "dsmr data build" in str(err.value)


def test_token_ids_outside_the_vocabulary_are_refused(built):
    tokens = built / "train.tokens"
    data = bytearray(tokens.read_bytes())
    data[2:4] = (65535).to_bytes(2, "little")
    tokens.write_bytes(bytes(data))
    cache = TokenCache(built)  # sizes still agree: caught when the split is read
    with pytest.raises(DsmrError, match="outside the vocabulary") as err:
        cache.pieces("train")
    assert "train.tokens" in str(err.value)


def test_tokenizer_that_disagrees_with_the_vocabulary_is_refused(built):
    _edit_manifest(built, lambda m: {**m, "tokenizer": {**m["tokenizer"], "velocity_bins": 16}})
    with pytest.raises(DsmrError, match="corrupt.*vocab"):
        TokenCache(built).tokenizer


def test_changed_token_bytes_fail_verify_and_a_rebuild_repairs(built, tmp_path, capsys):
    assert main(["data", "info", str(built), "--verify"]) == 0
    assert "match their checksums" in capsys.readouterr().out
    tokens = built / "train.tokens"
    data = bytearray(tokens.read_bytes())
    data[0] ^= 1  # still a valid id: only the checksum can tell
    tokens.write_bytes(bytes(data))
    TokenCache(built).pieces("train")  # the cheap checks pass
    assert main(["data", "info", str(built), "--verify"]) == 2
    err = capsys.readouterr().err
    assert "train.tokens" in err and "dsmr data build" in err and "Traceback" not in err
    # the rebuild does not reuse the damaged tokens
    files = [SourceFile(p, ("train", "validation", "test")[i % 3], p.name)
             for i, p in enumerate(sorted((tmp_path / "in").glob("*.mid")))]
    summary = build_cache(files, tmp_path / "cache", TOK, workers=1, progress=False)
    assert summary.reused == 0 and TokenCache(summary.cache).verify()


def test_nan_fractions_are_refused(tmp_path, capsys):
    with pytest.raises(DsmrError, match="finite"):
        check_fractions((float("nan"),) * 3)
    good_files(tmp_path / "in", 3)
    assert main(["data", "build", "--corpus", "folder", "--root", str(tmp_path / "in"),
                 "--cache", str(tmp_path / "c"), "--fractions", "nan,nan,nan"]) == 2
    assert "fractions" in capsys.readouterr().err


# ---- errors name the user's path (item 8)

def test_cache_path_that_is_a_file_or_a_link_loop(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DsmrError, match="is a file, not a cache folder"):
        TokenCache(tmp_path / "file")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(DsmrError, match="symbolic link loop"):
        TokenCache(tmp_path / "loop")


def test_duplicate_content_skip_reason_names_each_file(tmp_path):
    folder = tmp_path / "in"
    paths = good_files(folder, 3)
    for name in ("a_broken.mid", "b_broken.mid"):
        (folder / name).write_bytes(b"MThd not really")
    files = [SourceFile(p, "train", p.name) for p in paths + [folder / "a_broken.mid", folder / "b_broken.mid"]]
    summary = build_cache(files, tmp_path / "cache", TOK, workers=1, progress=False)
    for s in summary.skipped:
        assert s["path"] in s["reason"], s
    # and again when the reasons come from the previous build
    (folder / "c_broken.mid").write_bytes(b"MThd not really")
    files.append(SourceFile(folder / "c_broken.mid", "train", "c_broken.mid"))
    summary = build_cache(files, tmp_path / "cache", TOK, workers=1, progress=False)
    assert summary.reused == 6 and all(s["path"] in s["reason"] for s in summary.skipped)


def test_file_name_not_utf8_does_not_crash_the_summary(tmp_path, capfd):
    folder = tmp_path / "in"
    good_files(folder, 3)
    with open(os.fsencode(folder) + b"/bad\xff.mid", "wb") as f:
        f.write(b"not midi")
    code = main(["data", "build", "--corpus", "folder", "--root", str(folder), "--cache", str(tmp_path / "c"),
                 "--workers", "1", "--no-progress"])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert "bad\\xff.mid" in out


def test_decode_out_folder_names_the_users_path(built, tmp_path, capsys):
    (tmp_path / "outdir").mkdir()
    assert main(["data", "decode", str(built), "--split", "train", "--index", "0",
                 "--out", str(tmp_path / "outdir")]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'outdir'} is a folder" in err and ".tmp" not in err


def test_zip_with_a_symlink_entry_is_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("maestro-v3.0.0/maestro-v3.0.0.csv", "midi_filename,split\n")
        link = zipfile.ZipInfo("maestro-v3.0.0/2004")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc")
        zf.writestr("maestro-v3.0.0/2004/x.midi", b"data")
    archive = tmp_path / "m.zip"
    archive.write_bytes(buf.getvalue())
    data = archive.read_bytes()
    dest = tmp_path / "dest"
    with pytest.raises(DsmrError, match="symbolic link"):
        download_maestro(dest, url=archive.as_uri(), sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                         progress=False)
    assert list(dest.iterdir()) == []
