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


def test_threads_is_one_convention():
    """--threads N: torch's CPU threads, 0 = one per idle core; the default is the command's (dsmr.cli.common)."""
    defaults = {"train": 0, "eval": 0, "generate": 1, "live": 1, "study": 1, "app": 1}
    for name, p in _subparsers().items():
        action = _options(p).get("--threads")
        if action is None:
            continue
        assert action.type("3") == 3 and "0 = one per idle core" in action.help, name
        assert action.default == defaults.pop(name), name
    assert not defaults  # every command above has it


def test_precision_weights_and_json_are_one_convention():
    """--precision takes dsmr.generation.defaults's choices everywhere; the commands that decode (generate, the app) default
    to the same; --weights and --json mean the same in every command that has them."""
    from dsmr.generation import defaults
    from dsmr.app.models import ModelStore

    commands = _subparsers()
    with_precision = {name for name, p in commands.items() if "--precision" in _options(p)}
    assert with_precision == {"eval", "generate", "live", "app"}
    for name in with_precision:
        action = _options(commands[name])["--precision"]
        assert set(defaults.PRECISIONS) <= set(action.choices), name
        assert action.default == ("float32" if name == "eval" else defaults.PRECISION), name
    assert ModelStore().precision == _options(commands["app"])["--precision"].default == defaults.PRECISION
    for name in ("generate", "app", "eval", "export"):
        assert _options(commands[name])["--weights"].default == "best", name
    for name, p in commands.items():
        action = _options(p).get("--json")
        if action is not None:
            assert action.nargs == 0 and action.const is True and "JSON object" in action.help, name


def test_set_threads(monkeypatch):
    import torch

    from dsmr.cli.common import set_threads
    from dsmr.errors import DsmrError

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    set_threads(3)
    assert calls == [3]  # 0 and None: test_threads_0_leaves_the_cores_other_work_keeps_busy
    with pytest.raises(DsmrError, match="--threads must be >= 0"):
        set_threads(-1)


@pytest.mark.parametrize("argv", [["schedule", "show"], ["train", "--cache", "C", "--out", "R"]])
def test_binary_layers_and_the_deprecated_memory_layers(argv, capsys):
    parser = build_parser()
    assert parser.parse_args(argv + ["--binary-layers", "0,2"]).binary_layers == [0, 2]
    assert capsys.readouterr().err == ""
    assert parser.parse_args(argv + ["--memory-layers", "1,3"]).binary_layers == [1, 3]
    err = capsys.readouterr().err
    assert "--memory-layers is deprecated" in err and "--binary-layers" in err


def test_options_come_from_the_config_fields():
    """dsmr train and schedule show take their defaults and help from TrainConfig, dsmr study from StudyConfig."""
    import dataclasses

    from dsmr.study import SHARED_OPTIONS, StudyConfig
    from dsmr.training.config import TrainConfig

    train = _options(_subparsers()["train"])
    for field in dataclasses.fields(TrainConfig):
        flags = [a for a in train.values() if a.dest == field.name]
        assert flags, field.name  # every option of a run can be given on the command line
        assert all(a.default is None for a in flags), field.name  # "not given", for --resume
    schedule = build_parser().parse_args(["schedule", "show"])
    assert (schedule.layers, schedule.budget, schedule.short) == (TrainConfig.layers, TrainConfig.budget,
                                                                  TrainConfig.short)
    from dsmr.cli.study import _config

    study = build_parser().parse_args(["study"])
    for name in SHARED_OPTIONS:
        assert getattr(study, name) is None, name  # "not given": --preset may fill it
    assert _config(study) == StudyConfig()


def test_study_merge_is_a_subcommand():
    parser = build_parser()
    args = parser.parse_args(["study", "merge", "OUT", "A", "B", "--json"])
    assert (args.func.__name__, args.out, args.dirs, args.json) == ("run_merge", "OUT", ["A", "B"], True)
    args = parser.parse_args(["study", "--cache", "C", "--out", "S"])
    assert args.func.__name__ == "run" and args.out == "S"


def test_threads_0_leaves_the_cores_other_work_keeps_busy(monkeypatch, capsys):
    """On a machine whose cores are busy, training takes one thread (not torch's all-cores default, which
    crawls there), says so, and a torchrun launch shares the idle cores between its processes."""
    import torch

    from dsmr.core import runtime
    from dsmr.cli.common import set_threads

    before = torch.get_num_threads()
    monkeypatch.setattr(runtime, "usable_cores", lambda: 8)
    try:
        monkeypatch.setattr(runtime, "busy_cores", lambda: 7.6)
        assert set_threads(0, say="dsmr train") == 1 and torch.get_num_threads() == 1
        assert capsys.readouterr().err == ("dsmr train: 1 CPU thread (8 cores, 7.6 kept busy by other work; "
                                           "--threads N to choose)\n")
        monkeypatch.setattr(runtime, "busy_cores", lambda: 1.2)
        assert set_threads(None) == 7 and capsys.readouterr().err == ""
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert set_threads(0) == 3
        assert set_threads(2) == 2 and torch.get_num_threads() == 2  # given: as given
    finally:
        torch.set_num_threads(before)
    monkeypatch.undo()
    assert 0 <= runtime.busy_cores(0.05) <= (runtime.os.cpu_count() or 1) + 0.01
