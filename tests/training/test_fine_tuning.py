"""`dsmr train --from`: fine-tuning starts from a model's weights with its architecture, schedule and tokenizer,
refuses what would change them, resumes exactly, and its exported card says where it started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsmr.sharing.run_folder import read_config
from dsmr.errors import DsmrError
from dsmr.sharing.hub import read_model_config
from dsmr.training.trainer import train
from dsmr.training.config import FINE_TUNING_DEFAULTS, fine_tuning_config
from tests.evaluation.test_evaluate import TINY, run_cli
from tests.training.test_train import assert_same_run, interrupt_at

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base_run(bach_cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("base") / "run"
    code = __import__("dsmr.cli", fromlist=["main"]).main(
        ["train", "--cache", str(bach_cache.path), "--out", str(run), "--steps", "6", "--eval-every", "0", *TINY])
    assert code == 0
    return run


def test_fine_tuning_starts_from_the_models_weights_with_its_architecture(bach_cache, base_run, tmp_path, capsys):
    out = tmp_path / "ft"
    code, _, err = run_cli(capsys, "train", "--from", str(base_run), "--cache", str(bach_cache.path), "--out", str(out),
                           "--steps", "1", "--lr", "1e-12", "--warmup-steps", "0", "--eval-every", "0",
                           "--val-pieces", "2", "--no-progress", "--no-tensorboard", "--json")
    assert code == 0, err
    train_cfg, base_cfg = read_config(out)["train"], read_config(base_run)["train"]
    assert train_cfg["init_from"] == str(base_run)
    for name in ("layers", "d_model", "heads", "segment", "schedule", "budget", "long_layers", "short"):
        assert train_cfg[name] == base_cfg[name], name
    assert read_config(out)["model"]["horizons"] == read_config(base_run)["model"]["horizons"]
    # one step at a vanishing learning rate: the weights are the base model's, not a fresh initialization
    before, after = load_file(base_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)


def test_fine_tuning_defaults_and_given_options():
    source = read_model_config(REPO / "models" / "maestro-small")
    cfg = fine_tuning_config(source, {}, "models/maestro-small")
    assert (cfg.lr, cfg.warmup_steps, cfg.steps) == (FINE_TUNING_DEFAULTS["lr"], FINE_TUNING_DEFAULTS["warmup_steps"],
                                                    FINE_TUNING_DEFAULTS["steps"])
    assert cfg.layers == source["train"]["layers"] and cfg.budget == source["train"]["budget"]
    cfg = fine_tuning_config(source, {"lr": 1e-4, "steps": 50, "transpose": 2, "layers": source["train"]["layers"]},
                             "m")
    assert (cfg.lr, cfg.steps, cfg.transpose) == (1e-4, 50, 2)
    with pytest.raises(DsmrError, match=r"drop --layers 6 \(the model has 4\); --segment 64"):
        fine_tuning_config(source, {"layers": 6, "segment": 64}, "m")
    with pytest.raises(DsmrError, match='no "train" section'):
        fine_tuning_config({"model": {}}, {}, "m")


def test_a_cache_of_another_encoding_is_refused(bach_cache, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--from", str(REPO / "models" / "maestro-duration-small"), "--cache",
                           str(bach_cache.path), "--out", str(tmp_path / "ft"), "--steps", "2", "--no-progress")
    assert code == 2 and err.count("\n") == 1
    assert "tokenizer performance" in err and "trained with duration" in err and "--tokenizer duration" in err
    assert not (tmp_path / "ft" / "model.safetensors").exists()


def test_a_fine_tuning_run_resumes_exactly_and_its_card_names_the_base(bach_cache, base_run, tmp_path, monkeypatch,
                                                                      capsys):
    source = read_model_config(base_run)
    cfg = lambda: fine_tuning_config(source, {"steps": 10, "eval_every": 0, "val_pieces": 1, "log_every": 1,
                                              "tensorboard": False, "warmup_steps": 2, "dropout": 0.1},
                                     str(base_run))
    whole = tmp_path / "whole"
    train(cfg(), bach_cache, whole, progress=False)

    def ctrl_c():
        raise KeyboardInterrupt

    run = tmp_path / "run"
    interrupt_at(monkeypatch, 5, ctrl_c)
    assert train(cfg(), bach_cache, run, progress=False)["steps"] == 4
    monkeypatch.undo()
    train(cfg(), bach_cache, run, progress=False, resume=True)
    assert_same_run(whole, run)

    code, _, err = run_cli(capsys, "export", str(run), str(tmp_path / "exported"))
    assert code == 0, err
    card = (tmp_path / "exported" / "README.md").read_text()
    assert f"starting from the model `{base_run}`" in card
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["train"]["init_from"] == str(base_run)
