"""A model folder is untrusted input (it may come from a Hub repo id): sizes in config.json are checked
against the weights before anything is allocated, wrong types and wrong dtypes are refused with exit 2."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsmr.checkpoint import load_model
from dsmr.cli import main
from dsmr.errors import DsmrError
from tests.test_hub import _run


@pytest.fixture()
def folder(tmp_path):
    from dsmr.tokenizer import make_tokenizer

    return _run(tmp_path / "run", make_tokenizer("performance"))


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for dotted, value in changes.items():
        section, _, key = dotted.rpartition("__")
        (config[section] if section else config)[key] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    ({"model__d_model": 10**6}, "d_model must be a whole number in"),
    ({"model__vocab_size": 10**9}, "vocab_size must be a whole number in"),
    ({"model__d_ff": 10**9}, "d_ff must be a whole number in"),
    ({"model__head_dim": 10**6}, "head_dim must be a whole number in"),
    ({"model__horizons": [10**9, 4]}, "horizons must be at most"),
    ({"model__horizons": "abc"}, "horizons must be whole numbers"),
    ({"model__d_model": "64"}, "d_model must be a whole number"),
    ({"model__rotary_fraction": "abc"}, "wrong type"),
    ({"model": None}, "model config: expected an object"),
    ({"model__d_model": 32}, "does not fit its config.json"),   # sane, but not what the weights hold
])
def test_hostile_configs_are_refused_before_allocation(folder, changes, message):
    edit_config(folder, **changes)
    start = time.perf_counter()
    with pytest.raises(DsmrError, match=message):
        load_model(folder)
    assert time.perf_counter() - start < 5, "refused at once, nothing huge allocated"


def test_weights_of_an_integer_dtype_are_refused(folder, capsys):
    for name in ("model.safetensors", "best.safetensors"):
        tensors = load_file(folder / name)
        save_file({k: v.to(torch.int32) for k, v in tensors.items()}, folder / name)
    with pytest.raises(DsmrError, match="is I32, not floating point"):
        load_model(folder)
    assert main(["eval", str(folder), "--cache", str(folder.parent / "nothing")]) == 2
    assert main(["generate", str(folder), "--out", str(folder.parent / "g.mid"), "--max-tokens", "5"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "not floating point" in err
    assert not (folder.parent / "g.mid").exists()


def test_a_segment_length_of_the_wrong_type_is_refused_by_generate(folder, capsys):
    edit_config(folder, segment_len="64")
    assert main(["generate", str(folder), "--out", str(folder.parent / "g.mid"), "--max-tokens", "5"]) == 2
    assert "segment_len" in capsys.readouterr().err
