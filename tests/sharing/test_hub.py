"""Exported model folders (dsmr export / save_pretrained / from_pretrained), Hub repo ids through a local
Hub cache (offline), and --push failing clearly without the network. Nothing here downloads."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from dsmr.training.resume import save_checkpoint
from dsmr.sharing.export import export_run
from dsmr.sharing.loader import load_model
from dsmr.cli import main
from dsmr.errors import DsmrError
from dsmr.sharing.hub import (is_repo_id, model_card,
                      resolve_model_ref, save_pretrained)
from dsmr.model import DSMR, DSMRConfig
from dsmr.data.tokenizers.registry import make_tokenizer
from tests.midi_factory import tiny_midi

SEG = 8
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test may reach the network: huggingface_hub offline, its cache in the test's folder."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("performance")


def _run(path, tok, corpus="maestro", seed=3):
    """A tiny trained-looking run folder: config.json, best + latest weights, metrics.jsonl, a cache manifest."""
    torch.manual_seed(seed)
    model = DSMR(DSMRConfig(vocab_size=tok.vocab_size, n_layers=2, d_model=16, n_heads=2, horizons=(16, 4)))
    cache = path.parent / f"{path.name}-cache"
    cache.mkdir(parents=True)
    (cache / "manifest.json").write_text(json.dumps({"source": {"corpus": corpus, "root": "/somewhere"}}))
    config = {"dsmr_version": "0.1.0", "model": model.cfg.to_dict(),
              "schedule": {"name": "two-scale", "horizons": [16, 4], "budget": 20},
              "tokenizer": tok.config(), "tokenizer_hash": tok.config_hash(), "segment_len": SEG,
              "train": {"batch_size": 2, "segment": SEG, "amp": False}, "cache": str(cache)}
    save_checkpoint(path, model, config, {"step": 20})
    best = DSMR(model.cfg)  # best.safetensors: other weights than the latest, so `which` shows
    save_checkpoint(path, best, config, {"step": 10}, best=True)
    records = [{"step": 10, "loss": 5.0, "tokens": 100}, {"step": 10, "val_nll": 1.5, "val_ppl": 4.4817},
               {"step": 20, "loss": 4.0, "tokens": 120}, {"step": 20, "val_nll": 1.6, "val_ppl": 4.953}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok):
    return _run(tmp_path_factory.mktemp("runs") / "run", tok)


def _logits(model, n=20):
    ids = torch.randint(3, model.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids, torch.arange(n)[None])[0]


def test_export_round_trip_equal_logits(run_dir, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(run_dir), str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 10 and summary["license"] == "cc-by-nc-sa-4.0" and summary["dataset"] == "maestro"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert {"model", "schedule", "tokenizer", "tokenizer_hash", "segment_len"} <= set(config)
    assert "cache" not in config and config["format"] == "dsmr-model" and config["dtype"] == "float32"
    assert config["figures"]["best_validation_ppl"] == pytest.approx(4.4817)
    assert config["figures"]["train_tokens"] == 220

    original = load_model(run_dir)  # best weights
    for loaded in (load_model(out), load_model(str(out)), load_model(out)):
        assert torch.equal(_logits(loaded), _logits(original))
    model = load_model(out)
    assert model.tokenizer == make_tokenizer("performance") and model.run_config["segment_len"] == SEG
    assert model.segment_len == SEG and DSMR(model.cfg).tokenizer is None  # a model built here comes with none
    # the latest weights instead of the best
    assert main(["export", str(run_dir), str(tmp_path / "latest"), "--which", "latest"]) == 0
    assert torch.equal(_logits(load_model(tmp_path / "latest")), _logits(load_model(run_dir, which="latest")))


def test_model_card_has_hub_metadata_and_figures(run_dir, tmp_path):
    evals = [{"split": "test", "ppl": 5.25, "tokens": 1234, "pieces": 3, "notes": 300,
              "nll_per_note": 1.658 * 1234 / 300}, {"split": "validation", "ppl": 5.0, "tokens": 5000, "pieces": 12}]
    export_run(run_dir, tmp_path / "m", evals=evals, name="someone/dsmr-maestro-small")
    card = (tmp_path / "m" / "README.md").read_text()
    header, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "license: cc-by-nc-sa-4.0" in header and "library_name: dsmr" in header
    assert "- symbolic-music" in header and "- piano" in header and "datasets:" not in header  # not a Hub id
    assert "CC BY-NC-SA 4.0" in body and "non-commercial" in body
    for text in ("| test PPL (full pieces) | 5.250 (3 pieces, 1,234 tokens; only 3 pieces: a rough figure) |",
                 "| test NLL per note (nats; compares across encodings) | 6.820 (300 notes) |",
                 "| validation PPL (full pieces) | 5.000 (12 pieces, 5,000 tokens) |",
                 "| validation PPL during training, over the validation split (these weights) | 4.482 |",
                 "| training steps (these weights) | 10 |",
                 "| best validation PPL during training, over the validation split (step) | 4.482 (10) |",
                 "| tokens trained on | 220 |",
                 "two-scale, horizons [16, 4]", "dsmr generate someone/dsmr-maestro-small"):
        assert text in body
    with pytest.raises(DsmrError, match="inherits its data's licence cc-by-nc-sa-4.0"):
        export_run(run_dir, tmp_path / "n", license="mit")
    one = [{"split": "test", "ppl": 5.25, "tokens": 99, "pieces": 1}]
    export_run(run_dir, tmp_path / "one", evals=one)
    assert "(1 piece, 99 tokens; only 1 piece: a rough figure)" in (tmp_path / "one" / "README.md").read_text()
    # no repo id: the usage lines name the folder, never this machine's path
    export_run(run_dir, tmp_path / "local-model")
    card = (tmp_path / "local-model" / "README.md").read_text()
    assert str(tmp_path) not in card and "dsmr generate local-model " in card


def test_other_corpus_licence(tmp_path, tok):
    run = _run(tmp_path / "bach", tok, corpus="bach")
    assert export_run(run, tmp_path / "a")["license"] == "other"
    assert "Licence: not set" in (tmp_path / "a" / "README.md").read_text()
    assert export_run(run, tmp_path / "b", license="mit")["license"] == "mit"
    assert "license: mit" in (tmp_path / "b" / "README.md").read_text()


def test_float16_export(run_dir, tmp_path):
    export_run(run_dir, tmp_path / "f32")
    export_run(run_dir, tmp_path / "f16", dtype="float16")
    f32, f16 = tmp_path / "f32" / "model.safetensors", tmp_path / "f16" / "model.safetensors"
    assert f16.stat().st_size < 0.6 * f32.stat().st_size
    from safetensors import safe_open

    with safe_open(str(f16), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    half = load_model(tmp_path / "f16")
    assert next(half.parameters()).dtype == torch.float32  # loaded back as float32
    a, b = _logits(half), _logits(load_model(tmp_path / "f32"))
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=1e-2)  # measured 3.5e-3 (logits up to 4.4)
    assert "| weights | float16 |" in (tmp_path / "f16" / "README.md").read_text()


def test_save_pretrained_api(tmp_path, tok):
    model = DSMR(DSMRConfig(vocab_size=tok.vocab_size, n_layers=1, d_model=16, n_heads=2, horizons=(8,))).eval()
    config = {"tokenizer": tok.config(), "tokenizer_hash": tok.config_hash(), "segment_len": SEG}
    save_pretrained(model, tmp_path / "p", config, card=model_card({**config, "model": model.cfg.to_dict()},
                                                                    name="p", dtype="float32"))
    assert torch.equal(_logits(load_model(tmp_path / "p")), _logits(model))
    with pytest.raises(DsmrError, match="segment_len"):
        save_pretrained(model, tmp_path / "q", {"tokenizer": tok.config()})
    with pytest.raises(DsmrError, match="dtype"):
        save_pretrained(model, tmp_path / "q", config, dtype="int8")


def test_export_refuses_a_folder_with_other_files(run_dir, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["export", str(run_dir), str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(run_dir), str(run_dir)]) == 2
    out = tmp_path / "again"  # a previous export is overwritten
    assert main(["export", str(run_dir), str(out)]) == 0
    assert main(["export", str(run_dir), str(out), "--dtype", "float16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert main(["export", str(run_dir), str(tmp_path / "x"), "--eval", str(bad)]) == 2
    assert "dsmr eval --json" in capsys.readouterr().err


def _hub_cache(cache, repo_id, folder):
    """Lay out `folder` as huggingface_hub's cache lays out a downloaded repo: blobs named by content hash,
    snapshots/<commit>/ of symlinks to them, refs/main naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_repo_id_from_the_local_hub_cache(run_dir, tmp_path):
    export_run(run_dir, tmp_path / "exported")
    cache = tmp_path / "hf-cache"
    snapshot = _hub_cache(cache, "someone/dsmr-tiny", tmp_path / "exported")
    assert resolve_model_ref("someone/dsmr-tiny") == snapshot
    model = load_model("someone/dsmr-tiny")
    assert torch.equal(_logits(model), _logits(load_model(run_dir)))
    assert resolve_model_ref("someone/dsmr-tiny", revision=COMMIT) == snapshot
    with pytest.raises(DsmrError, match="not in the Hub cache .*offline.*HF_HUB_OFFLINE"):
        load_model("someone/unknown-model")
    with pytest.raises(DsmrError, match="not in the Hub cache"):
        load_model("someone/dsmr-tiny-typo")


def test_repo_id_rules(tmp_path):
    assert is_repo_id("owner/name") and is_repo_id("a-b/c.d_e")
    for ref in ("name", "/abs/path", "./a/b", "a/b/c", "a/model.safetensors", "../x", "a/../b"):
        assert not is_repo_id(ref), ref
    (tmp_path / "runs").mkdir()
    os.chdir(tmp_path)
    try:  # a missing run under an existing local folder is a missing path, not a Hub look-up
        with pytest.raises(DsmrError, match="checkpoint not found: runs/typo"):
            load_model("runs/typo")
    finally:
        os.chdir(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_cli_generate_and_eval_from_a_repo_id_offline(run_dir, tmp_path, bach_cache):
    export_run(run_dir, tmp_path / "exported")
    cache = tmp_path / "hf-cache"
    _hub_cache(cache, "someone/dsmr-tiny", tmp_path / "exported")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    prompt = tiny_midi(tmp_path / "p.mid")
    cmd = [sys.executable, "-m", "dsmr", "generate", "someone/dsmr-tiny", "--prompt", str(prompt),
           "--out", str(tmp_path / "o.mid"), "--max-tokens", "20", "--seed", "1", "--json", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tokens"] == 20 and (tmp_path / "o.mid").is_file()
    proc = subprocess.run([*cmd[:4], "someone/missing"] + cmd[5:], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2 and "not in the Hub cache" in proc.stderr and "Traceback" not in proc.stderr
    # eval takes the exported folder as it takes a run folder
    assert main(["eval", str(tmp_path / "exported"), "--cache", str(bach_cache.path), "--max-pieces", "1",
                 "--json", "--no-progress"]) == 0


def test_push_offline_is_a_clear_error(run_dir, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(run_dir), str(out), "--push", "someone/dsmr-tiny"]) == 2
    err = capsys.readouterr().err
    assert "cannot push to someone/dsmr-tiny: HF_HUB_OFFLINE is set" in err and "hf upload" in err
    assert (out / "model.safetensors").is_file()  # the export itself is complete
    assert main(["export", str(run_dir), str(out), "--push", "not a repo"]) == 2
    assert "owner/name" in capsys.readouterr().err


def test_push_without_a_token(run_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from dsmr.sharing.hub import push_to_hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(DsmrError, match="no Hugging Face token"):
        push_to_hub(tmp_path, "someone/dsmr-tiny")
