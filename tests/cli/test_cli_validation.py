"""Command-line values are validated where they enter: NaN, infinities, negative seeds, outputs
that are folders or files, damaged caches: one-line errors that name the user's path, exit 2."""

from __future__ import annotations

import os
import shutil

import pytest

from dsmr.cli import main


def run(capsys, *argv) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:  # argparse's refusals (out of an option's range)
        code = stop.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("option, value, message", [
    ("--seed", "-1", "argument --seed: must be in [0, "),
    ("--gate-init", "nan", "argument --gate-init: must be in [-100, 100], got nan"),
    ("--lr", "inf", "argument --lr: must be in [1e-12, 10], got inf"),
    ("--dropout", "nan", "argument --dropout: must be in [0, 0.99], got nan"),
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
    (["--max-seconds", "inf", "--ignore-eos"], "argument --max-seconds: must be in [0.01, 21600], got inf"),
    (["--temperature", "nan"], "argument --temperature: must be in [0, 5], got nan"),
    (["--seed", "-1"], "argument --seed: must be in [0, "),
])
def test_generate_refuses_unbounded_and_non_finite_values(tmp_path, capsys, argv, message):
    code, err = run(capsys, "generate", tmp_path / "no-run", "--out", tmp_path / "x.mid", *argv)
    assert code == 2 and message in err


def test_generate_out_that_is_a_folder_names_it(tmp_path, capsys):
    (tmp_path / "outdir").mkdir()
    code, err = run(capsys, "generate", tmp_path / "no-run", "--out", tmp_path / "outdir")
    assert code == 2 and f"--out {tmp_path / 'outdir'} is a folder" in err and ".tmp" not in err


@pytest.mark.parametrize("command", [
    ["train", "--cache", "C", "--out", "R"], ["study"], ["eval", "R", "--cache", "C"],
    ["generate", "R", "--out", "o.mid"],
])
def test_every_numeric_option_refuses_absurd_values_in_one_line(command, capsys):
    """-1, nan, inf, 1e12 and a word for every numeric option: exit 2, one line naming the option."""
    import argparse

    from dsmr.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command[0]]
    numeric = [a for a in sub._actions if a.option_strings and getattr(a.type, "__name__", "") in ("int", "float")]
    assert len(numeric) >= 3
    tried = 0
    for action in numeric:
        for value in ("-1", "nan", "inf", "1e12", "word"):
            try:
                parser.parse_args([*command, action.option_strings[0], value])
            except SystemExit as stop:
                err = capsys.readouterr().err
                assert stop.code == 2 and err.count("\n") == 1 and action.option_strings[0] in err, (action, value)
                tried += 1
            else:  # accepted: then it must be a sensible value for this option
                assert value == "-1" and action.dest == "gate_init", (action.option_strings, value)  # a logit
    assert tried >= 4 * len(numeric)
