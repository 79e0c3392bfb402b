"""A model folder is untrusted input (it may come from a Hub repo id): sizes in config.json are checked
against the weights before anything is allocated, wrong types and wrong dtypes are refused with exit 2."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsmr.sharing.loader import load_model
from dsmr.cli import main
from dsmr.errors import DsmrError
from tests.sharing.test_hub import _run


@pytest.fixture()
def folder(tmp_path):
    from dsmr.data.tokenizers.registry import make_tokenizer

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


def test_flipped_bytes_that_stay_finite_are_found_by_the_checksum(folder, capsys):
    path = folder / "best.safetensors"
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + 101] ^= 0x01  # the lowest mantissa bit of one weight: finite, tiny
    path.write_bytes(bytes(data))
    with pytest.raises(DsmrError, match="do not match the checksum"):
        load_model(folder)
    assert main(["generate", str(folder), "--out", str(folder.parent / "g.mid"), "--max-tokens", "5"]) == 2
    assert "checksum" in capsys.readouterr().err
    load_model(folder, which="latest")  # the other weights file is intact


def copy_cache(bach_cache, tmp_path):
    import shutil

    dst = tmp_path / "cache"
    shutil.copytree(bach_cache.path, dst)
    return dst


def test_a_cache_without_checksums_or_with_a_bad_tokenizer_is_not_verified(bach_cache, tmp_path, capsys):
    cache = copy_cache(bach_cache, tmp_path)
    manifest = json.loads((cache / "manifest.json").read_text())
    bare = dict(manifest)
    del bare["checksums"]
    (cache / "manifest.json").write_text(json.dumps(bare))
    code = main(["train", "--cache", str(cache), "--out", str(tmp_path / "run"), "--steps", "1", "--layers", "2",
                 "--d-model", "32", "--heads", "2", "--no-progress"])
    assert code == 2 and "no recorded checksums" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model.safetensors").exists()
    tampered = dict(manifest, tokenizer=dict(manifest["tokenizer"], velocity_bins=7))
    (cache / "manifest.json").write_text(json.dumps(tampered))
    assert main(["data", "info", str(cache), "--verify"]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_a_train_section_with_words_for_numbers_is_refused():
    from dsmr.training.config import TrainConfig

    with pytest.raises(DsmrError, match="lr must be a number, got 'abc'"):
        TrainConfig.from_dict({"lr": "abc"}).validate()


def test_a_damaged_midi_file_is_described_in_plain_words(tmp_path):
    from dsmr.data.midi import load_midi

    truncated = tmp_path / "cut.mid"
    truncated.write_bytes(b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x01\xe0MTrk\x00\x00\x10\x00\x90")
    not_midi = tmp_path / "notes.mid"
    not_midi.write_bytes(b"this is a text file")
    with pytest.raises(DsmrError, match="ends before the end of its data") as caught:
        load_midi(truncated)
    assert "MiniMidi" not in str(caught.value) and "iostream" not in str(caught.value)
    with pytest.raises(DsmrError, match="does not start with a MIDI header"):
        load_midi(not_midi)
