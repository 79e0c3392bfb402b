"""Command-line values are validated where they enter (issue 12): NaN, infinities, negative seeds, outputs
that are folders or files, damaged caches: one-line errors that name the user's path, exit 2."""

from __future__ import annotations

import os
import shutil

import pytest

from dsmr.cli import main


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("option, value, message", [
    ("--seed", "-1", "--seed must be a whole number >= 0"),
    ("--gate-init", "nan", "--gate-init must be a finite number"),
    ("--lr", "inf", "--lr must be a finite number"),
    ("--dropout", "nan", "--dropout must be a finite number"),
    ("--betas", "nan,0.9", "--betas must be finite"),
])
def test_train_refuses_non_finite_and_negative_values(bach_cache, tmp_path, capsys, option, value, message):
    code, err = run(capsys, "train", "--cache", bach_cache.path, "--out", tmp_path / "run", option, value)
    assert code == 2 and message in err
    assert not (tmp_path / "run").exists()


def test_train_out_that_is_a_file_or_under_a_file(bach_cache, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run(capsys, "train", "--cache", bach_cache.path, "--out", tmp_path / "file")
    assert code == 2 and f"--out {tmp_path / 'file'} is a file, not a folder" in err
    code, err = run(capsys, "train", "--cache", bach_cache.path, "--out", tmp_path / "file" / "run")
    assert code == 2 and str(tmp_path / "file" / "run") in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_train_out_in_an_unwritable_folder(bach_cache, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, err = run(capsys, "train", "--cache", bach_cache.path, "--out", locked / "run")
    finally:
        locked.chmod(0o755)
    assert code == 2 and "not writable" in err and str(locked) in err


def test_train_cache_that_is_a_file(tmp_path, capsys):
    (tmp_path / "cache.txt").write_text("x")
    code, err = run(capsys, "train", "--cache", tmp_path / "cache.txt", "--out", tmp_path / "run")
    assert code == 2 and "is a file, not a cache folder" in err and str(tmp_path / "cache.txt") in err


def test_train_refuses_a_cache_whose_bytes_changed(bach_cache, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(bach_cache.path, cache)
    tokens = cache / "train.tokens"
    data = bytearray(tokens.read_bytes())
    data[10] ^= 1
    tokens.write_bytes(bytes(data))
    code, err = run(capsys, "train", "--cache", cache, "--out", tmp_path / "run", "--steps", "1")
    assert code == 2 and "train.tokens" in err and "dsmr data build" in err


@pytest.mark.parametrize("argv, message", [
    (["--max-seconds", "inf", "--ignore-eos"], "--max-seconds must be a finite number"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--seed", "-1"], "--seed must be a whole number >= 0"),
])
def test_generate_refuses_unbounded_and_non_finite_values(tmp_path, capsys, argv, message):
    code, err = run(capsys, "generate", tmp_path / "no-run", "--out", tmp_path / "x.mid", *argv)
    assert code == 2 and message in err


def test_generate_out_that_is_a_folder_names_it(tmp_path, capsys):
    (tmp_path / "outdir").mkdir()
    code, err = run(capsys, "generate", tmp_path / "no-run", "--out", tmp_path / "outdir")
    assert code == 2 and f"--out {tmp_path / 'outdir'} is a folder" in err and ".tmp" not in err
