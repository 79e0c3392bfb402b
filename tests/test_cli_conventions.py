"""Every command spells shared options the same way (dsmr.cli.common); old spellings still parse, with a
deprecation message."""

from __future__ import annotations

import argparse

import pytest

from dsmr.cli import build_parser


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


def test_device_defaults_to_auto_everywhere():
    with_device = {name for name, p in _subparsers().items() if "--device" in _options(p)}
    assert {"eval", "generate", "study", "app", "train"} <= with_device
    for name in with_device:
        action = _options(_subparsers()[name])["--device"]
        # train reads None as "not given": TrainConfig.device (auto) or the resumed run's
        assert action.default == "auto" or (name == "train" and action.default is None), name


def test_no_progress_is_one_convention():
    for name, p in _subparsers().items():
        action = _options(p).get("--no-progress")
        if action is not None:
            assert action.dest == "progress" and action.default is True and action.const is False, name
    for sub in (("data", "build"), ("data", "download")):
        parser = _subparsers()[sub[0]]
        inner = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[sub[1]]
        action = _options(inner)["--no-progress"]
        assert action.dest == "progress" and action.default is True, sub


@pytest.mark.parametrize("argv", [
    ["eval", "RUN", "--cache", "C"],
    ["generate", "RUN", "--out", "x.mid"],
    ["export", "RUN", "OUT"],
])
def test_weights_and_the_deprecated_which(argv, capsys):
    parser = build_parser()
    assert parser.parse_args(argv).weights == "best"
    assert parser.parse_args(argv + ["--weights", "latest"]).weights == "latest"
    assert capsys.readouterr().err == ""
    assert parser.parse_args(argv + ["--which", "latest"]).weights == "latest"
    err = capsys.readouterr().err
    assert "--which is deprecated" in err and "--weights" in err
    with pytest.raises(SystemExit):
        parser.parse_args(argv + ["--which", "newest"])
