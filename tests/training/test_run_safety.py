"""Run folders under kills and damage: a kill at any point of a save leaves a resumable run
whose result equals an uninterrupted one; damaged checkpoints are DsmrErrors naming the file; metrics
survive resumes; every file of a run has the same permissions."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsmr.core.atomic
from dsmr.sharing.run_folder import weights_step
from dsmr.training.resume import load_trainer_state
from dsmr.sharing.loader import load_model
from dsmr.cli import main
from dsmr.errors import DsmrError
from dsmr.training.trainer import train
from tests.training.test_train import tiny

SAVE_CFG = dict(steps=6, save_every=1, log_every=1, val_pieces=1)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_result(run: Path, reference: Path) -> None:
    a, b = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # every step logged exactly once, with the loss of the uninterrupted run
    losses = [(r["step"], r["loss"]) for r in records(run) if "loss" in r]
    assert losses == [(r["step"], r["loss"]) for r in records(reference) if "loss" in r]


@pytest.fixture(scope="module")
def reference(bach_cache, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    train(tiny(**SAVE_CFG), bach_cache, run, progress=False)
    return run


class Killed(BaseException):
    """Stands for kill -9 in-process: nothing after it runs (no save, no metrics flush)."""


def kill_after_rename(monkeypatch, n: int) -> list[str]:
    """Make the n-th atomic rename happen and then 'kill' the process."""
    real = os.replace
    done: list[str] = []

    def replace(src, dst):
        real(src, dst)
        done.append(Path(dst).name)
        if len(done) == n:
            raise Killed(Path(dst).name)

    monkeypatch.setattr(dsmr.core.atomic.os, "replace", replace)
    return done


# renames per save: metrics.jsonl, config.json, trainer_state.pt, model.safetensors; kills after each of
# them in the first save and after the second save's ones that matter
@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 7, 8])
def test_a_kill_at_any_point_of_a_save_leaves_a_resumable_run(bach_cache, reference, tmp_path, monkeypatch, n):
    run = tmp_path / "run"
    done = kill_after_rename(monkeypatch, n)
    with pytest.raises(Killed):
        train(tiny(**SAVE_CFG), bach_cache, run, progress=False)
    monkeypatch.undo()
    assert len(done) == n
    (run / ".trainer_state.pt.x1y2z3.tmp").write_bytes(b"half a file")  # what a real kill leaves
    train(tiny(**SAVE_CFG), bach_cache, run, progress=False, resume=True)
    assert_same_result(run, reference)
    assert not list(run.glob(".*.tmp"))


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)  # as the in-process reference trains (conftest): the same summation order
import dsmr.core.atomic
from dsmr.data.cache import TokenCache
from dsmr.training.trainer import train
from dsmr.training.config import TrainConfig
real = os.replace
def replace(src, dst):
    real(src, dst)
    if Path(dst).name == "trainer_state.pt":
        seen = Path(dst).with_name("seen")
        seen.write_text(seen.read_text() + "x" if seen.exists() else "x")
        if seen.read_text() == "xx":  # the second save: right after the state is renamed, before the weights
            os.kill(os.getpid(), signal.SIGKILL)
dsmr.core.atomic.os.replace = replace
cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in eval(sys.argv[3]).items()})
train(cfg, TokenCache(sys.argv[1]), sys.argv[2], progress=False)
"""


def test_kill_9_right_after_the_trainer_state_rename(bach_cache, reference, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny(**SAVE_CFG).to_dict()
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(bach_cache.path), str(run), repr(cfg)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    (run / "seen").unlink()
    assert list(run.glob(".model.safetensors.*.tmp"))  # the killed save left its weights file half-done
    assert weights_step(run / "model.safetensors") != torch.load(run / "trainer_state.pt")["step"]
    train(tiny(**SAVE_CFG), bach_cache, run, progress=False, resume=True)
    assert_same_result(run, reference)
    assert not list(run.glob(".*.tmp"))


def test_first_interval_after_a_resume_is_labelled(bach_cache, tmp_path):
    run = tmp_path / "run"
    train(tiny(steps=3, log_every=4, val_pieces=1), bach_cache, run, progress=False)
    train(tiny(steps=8, log_every=4, val_pieces=1), bach_cache, run, progress=False, resume=True)
    by_step = {r["step"]: r for r in records(run) if "loss" in r}
    assert sorted(by_step) == [3, 4, 8]
    assert by_step[4]["resumed_from"] == 3 and by_step[4]["interval_steps"] == 1
    assert "resumed_from" not in by_step[8]


def test_every_file_of_a_run_has_the_same_permissions(reference):
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in reference.iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes


# ---- damaged checkpoints

@pytest.fixture()
def run(reference, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    return copy


def _damage_weights(path: Path, change) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("damage, message", [
    ("nan", "NaN or infinite"),
    ("huge", "far beyond any trained weight"),
    ("step", "metadata step 'abc' is not a number"),
])
def test_damaged_weights_are_refused_by_load_eval_and_resume(bach_cache, run, capsys, damage, message):
    def change(tensors, metadata):
        name = next(k for k in tensors if k.endswith("weight") and tensors[k].dim() == 2)
        if damage == "nan":
            tensors[name][0, 0] = float("nan")
        elif damage == "huge":
            tensors[name][0, 0] = 3e38  # what a flipped exponent bit does
        else:
            metadata["step"] = "abc"

    for name in ("model.safetensors", "best.safetensors"):
        _damage_weights(run / name, change)
    if damage != "step":
        with pytest.raises(DsmrError, match=message) as err:
            load_model(run)
        assert "best.safetensors" in str(err.value)
        assert main(["eval", str(run), "--cache", str(bach_cache.path), "--max-pieces", "1", "--no-progress"]) == 2
        assert message.split()[0] in capsys.readouterr().err
    else:
        with pytest.raises(DsmrError, match=message):
            weights_step(run / "model.safetensors")


def test_nan_weights_in_the_trainer_state_stop_a_resume(bach_cache, run):
    state = torch.load(run / "trainer_state.pt", weights_only=True)
    next(iter(state["model"].values())).view(-1)[0] = float("nan")
    torch.save(state, run / "trainer_state.pt")
    with pytest.raises(DsmrError, match="trainer_state.pt is damaged: tensor .* NaN"):
        train(tiny(**SAVE_CFG, ), bach_cache, run, progress=False, resume=True)


@pytest.mark.parametrize("damage", ["no keys", "step text", "not a dict", "foreign object", "garbage"])
def test_damaged_trainer_state_is_a_clear_error(run, damage):
    path = run / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    if damage == "no keys":
        torch.save({"step": state["step"]}, path)
    elif damage == "step text":
        torch.save({**state, "step": "6"}, path)
    elif damage == "not a dict":
        torch.save([1, 2, 3], path)
    elif damage == "foreign object":
        torch.save({**state, "extra": Path("x")}, path)  # needs unpickling an arbitrary class
    else:
        path.write_bytes(os.urandom(200))
    with pytest.raises(DsmrError) as err:
        load_trainer_state(run)
    assert str(path) in str(err.value) and "weights_only" not in str(err.value)


def test_optimizer_state_of_another_shape_is_refused(bach_cache, run):
    state = torch.load(run / "trainer_state.pt", weights_only=True)
    first = state["optimizer"]["state"][0]
    first["exp_avg"] = torch.zeros(3, 3)
    torch.save(state, run / "trainer_state.pt")
    with pytest.raises(DsmrError, match="trainer_state.pt is damaged or from another model: optimizer exp_avg"):
        train(tiny(**SAVE_CFG), bach_cache, run, progress=False, resume=True)
