"""`dsmr data build | info | decode`: JSON shape, readable summary, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import symusic

from dsmr.cli import main
from tests.midi_factory import tiny_midi


@pytest.fixture()
def midi_folder(tmp_path) -> Path:
    folder = tmp_path / "midi"
    for i in range(8):
        tiny_midi(folder / ("a" if i % 2 else "b") / f"piece{i}.mid", pitch=30 + 5 * i, n=5 + i)
    (folder / "broken.mid").write_text("not midi")
    return folder


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_build_json_shape_then_info_and_decode(tmp_path, midi_folder, capsys):
    code, out, err = run(capsys, "data", "build", "--corpus", "folder", "--root", str(midi_folder),
                         "--cache", str(tmp_path / "cache"), "--workers", "1", "--fractions", "0.5,0.25,0.25",
                         "--json")
    assert code == 0, err
    result = json.loads(out)  # exactly one JSON object on stdout
    assert set(result["pieces"]) == {"train", "validation", "test"} and sum(result["pieces"].values()) == 8
    assert all(result["tokens"][s] > 0 for s in result["pieces"])
    [skipped] = result["skipped"]
    assert skipped["path"] == str((midi_folder / "broken.mid").resolve()) and "MIDI" in skipped["reason"]
    cache = Path(result["cache"])
    assert cache.parent == (tmp_path / "cache").resolve() and cache.name.startswith("folder-performance-")
    assert isinstance(result["seconds"], float) and result["tokenized"] == 9 and result["reused"] == 0

    code, out, _ = run(capsys, "data", "info", str(tmp_path / "cache"), "--json")
    info = json.loads(out)
    assert code == 0 and {k: info[k] for k in ("pieces", "tokens", "skipped", "cache")} == {
        k: result[k] for k in ("pieces", "tokens", "skipped", "cache")}

    code, out, _ = run(capsys, "data", "info", str(cache))
    assert code == 0 and "total" in out and "broken.mid" in out and f"{sum(result['tokens'].values()):,}" in out

    midi_out = tmp_path / "out" / "piece.mid"
    code, out, err = run(capsys, "data", "decode", str(cache), "--split", "train", "--index", "0",
                         "--out", str(midi_out))
    assert code == 0, err
    assert "wrote" in out and symusic.Score(str(midi_out)).note_num() >= 5


def test_readable_summary_and_rebuild(tmp_path, midi_folder, capsys, monkeypatch):
    monkeypatch.setenv("DSMR_CACHE", str(tmp_path / "env-cache"))
    args = ["data", "build", "--corpus", "folder", "--root", str(midi_folder), "--workers", "2", "--no-progress"]
    code, out, _ = run(capsys, *args)
    assert code == 0
    assert str(tmp_path / "env-cache") in out and "train" in out and "9 files tokenized" in out
    code, out, _ = run(capsys, *args)
    assert code == 0 and "0 files tokenized, 9 reused" in out


@pytest.mark.parametrize("argv,message", [
    ("build --corpus maestro --root {tmp}/nowhere --cache {tmp}/c", "does not exist"),
    ("build --corpus folder --cache {tmp}/c", "needs --root"),
    ("build --corpus folder --root {tmp} --cache {tmp}/c --fractions 0.9,0.2", "fractions"),
    ("build --corpus folder --root {tmp} --cache {tmp}/c --tokenizer nope", "unknown tokenizer"),
    ("build --corpus folder --root {tmp} --cache {tmp}/c --workers 0", "--workers"),
    ("info {tmp}/nowhere --json", "no token cache"),
])
def test_errors_are_one_liners(tmp_path, capsys, argv, message):
    code, out, err = run(capsys, "data", *argv.format(tmp=tmp_path).split())
    assert code == 2 and out == ""
    assert err.startswith("dsmr data: error:") and message in err and err.count("\n") == 1


def test_decode_bad_index(tmp_path, midi_folder, capsys):
    run(capsys, "data", "build", "--corpus", "folder", "--root", str(midi_folder), "--cache", str(tmp_path / "c"),
        "--workers", "1", "--no-progress")
    code, _, err = run(capsys, "data", "decode", str(tmp_path / "c"), "--split", "test", "--index", "99",
                       "--out", str(tmp_path / "x.mid"))
    assert code == 2 and "piece index 99 is out of range" in err and not (tmp_path / "x.mid").exists()


def test_bach_default_corpus_with_limit(tmp_path, capsys):
    code, out, err = run(capsys, "data", "build", "--cache", str(tmp_path / "cache"), "--limit", "3", "--workers", "1",
                         "--json", "--no-progress")
    assert code == 0, err
    result = json.loads(out)
    assert result["corpus"] == "bach" and result["pieces"] == {"train": 1, "validation": 1, "test": 1}
    assert len(list((tmp_path / "cache" / "sources" / "bach-chorales").glob("*.mid"))) == 3


def test_download_then_build(tmp_path, capsys):
    """`dsmr data download` against a server on 127.0.0.1, then a build from what it printed."""
    import functools
    import hashlib
    import http.server
    import io
    import threading
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        rows = ["split,midi_filename"]
        for i, split in enumerate(["train", "validation", "test"]):
            midi = tiny_midi(tmp_path / "src" / f"{i}.midi", pitch=50 + i)
            zf.write(midi, f"maestro-v3.0.0/2018/{i}.midi")
            rows.append(f"{split},2018/{i}.midi")
        zf.writestr("maestro-v3.0.0/maestro-v3.0.0.csv", "\n".join(rows) + "\n")
    served = tmp_path / "served"
    served.mkdir()
    (served / "m.zip").write_bytes(buf.getvalue())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/m.zip"
        code, _, err = run(capsys, "data", "download", "--dest", str(tmp_path / "d"), "--url", url)
        assert code == 2 and "--url needs --sha256 and --size" in err
        code, out, err = run(capsys, "data", "download", "--dest", str(tmp_path / "d"), "--url", url, "--no-progress",
                             "--sha256", hashlib.sha256(buf.getvalue()).hexdigest(), "--size", str(len(buf.getvalue())))
    finally:
        server.shutdown()
        server.server_close()
    assert code == 0, err
    root = out.strip()
    assert Path(root) == (tmp_path / "d" / "maestro-v3.0.0").resolve()
    code, out, err = run(capsys, "data", "build", "--corpus", "maestro", "--root", root, "--cache",
                         str(tmp_path / "c"), "--workers", "1", "--json", "--no-progress")
    assert code == 0, err
    assert json.loads(out)["pieces"] == {"train": 1, "validation": 1, "test": 1}


def test_json_stdout_is_clean_in_a_real_process(tmp_path, midi_folder):
    """Progress bars and worker output go to stderr; stdout holds exactly one JSON object."""
    proc = subprocess.run(
        [sys.executable, "-m", "dsmr", "data", "build", "--corpus", "folder", "--root", str(midi_folder),
         "--cache", str(tmp_path / "cache"), "--workers", "2", "--json"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1 and json.loads(proc.stdout)["pieces"]
    assert "tokenize" in proc.stderr  # the progress bar
