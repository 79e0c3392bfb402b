"""The schedule study (dsmr.study, `dsmr study`): a tiny study on Bach chorales, resume, merge, errors."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest

from dsmr import study
from dsmr.cli import main as cli_main
from dsmr.errors import DsmrError
from dsmr.study import StudyConfig, default_variants
from dsmr.train import make_run_schedule


# A study small enough for the test suite: every variant trains a few steps of a 2-layer model.
TINY = dict(layers=2, d_model=32, heads=2, segment=32, batch_size=2, horizon=64, budget=80, long_layers=1,
            short=16, steps=4, eval_every=2, val_pieces=2, threads=1)
TINY_ARGS = ["--layers", "2", "--d-model", "32", "--heads", "2", "--segment", "32", "--batch-size", "2",
             "--horizon", "64", "--budget", "80", "--long-layers", "1", "--short", "16", "--steps", "4",
             "--eval-every", "2", "--val-pieces", "2"]
VARIANTS = [v.name for v in default_variants(StudyConfig(**TINY))]
PNG = b"\x89PNG\r\n\x1a\n"


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _check_outputs(folder, expected):
    """Every output file exists; the table holds every (variant, seed) with finite numbers."""
    for name in ("results.csv", "results.md", "study.json"):
        assert (folder / name).is_file(), name
    for figure in ("schedules", "ppl_vs_memory", "val_curves", "gates"):
        assert (folder / "figures" / f"{figure}.png").read_bytes()[:8] == PNG, figure
    rows = _csv_rows(folder / "results.csv")
    assert sorted((r["variant"], int(r["seed"])) for r in rows) == sorted(expected)
    for r in rows:
        for key in ("val_ppl", "val_nll", "train_tokens_per_s", "train_peak_memory_bytes", "state_bytes",
                    "val_ppl_vs_full", "train_tokens_per_s_vs_full", "train_peak_memory_bytes_vs_full"):
            assert math.isfinite(float(r[key])), (r["variant"], key, r[key])
        assert float(r["val_ppl"]) > 1
    markdown = (folder / "results.md").read_text()
    for variant, _ in expected:
        assert f"| `{variant}` |" in markdown
    return rows


def test_study_runs_resumes_and_merges(bach_cache, tmp_path, monkeypatch, capsys):
    cfg = StudyConfig(**TINY)
    out = tmp_path / "study"
    records = study.run_study(bach_cache.path, out, cfg, fresh_process=False, progress=False, command="test")
    assert [r["variant"] for r in records] == VARIANTS
    rows = _check_outputs(out, [(v, 0) for v in VARIANTS])
    by_name = {r["variant"]: r for r in rows}
    assert float(by_name["full"]["val_ppl_vs_full"]) == 1.0
    assert float(by_name["none"]["state_bytes"]) == 0
    # the budgeted variants hold the same state; `full` more
    budgeted = {by_name[v]["state_bytes"] for v in ("uniform", "two-scale", "two-scale-inverse", "binary-lower",
                                                   "binary-upper")}
    assert len(budgeted) == 1 and float(budgeted.pop()) < float(by_name["full"]["state_bytes"])
    gated = json.loads((out / "results" / "gate-ste-seed0.json").read_text())
    assert gated["gate_curve"] and len(gated["gate_curve"][-1]["gates"]) == TINY["layers"]
    assert [p["step"] for p in gated["val_curve"]] == [2, 4]
    assert gated["environment"]["torch"] and gated["environment"]["cpu_count"]

    # running again trains nothing: every variant is finished
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}

    def no_training(spec):
        raise AssertionError(f"{spec['variant']} trained again")

    monkeypatch.setattr(study, "run_variant", no_training)
    again = study.run_study(bach_cache.path, out, cfg, fresh_process=False, progress=False)
    assert [r["val_ppl"] for r in again] == [r["val_ppl"] for r in records]
    assert {p: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")} == mtimes
    monkeypatch.undo()

    # one variant alone with another seed, through the CLI and a fresh worker process
    other = tmp_path / "other"
    env = dict(os.environ, PYTHONPATH=str(study.Path(study.__file__).parents[1]))
    done = subprocess.run([sys.executable, "-m", "dsmr", "study", "--cache", str(bach_cache.path), "--out",
                           str(other), "--variants", "none", "--seed", "1", "--no-progress", "--json", *TINY_ARGS],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert [r["variant"] for r in printed["results"]] == ["none"]
    assert "dsmr study --cache" in json.loads((other / "results" / "none-seed1.json").read_text())["command"]

    merged = tmp_path / "merged"
    assert cli_main(["study", "merge", str(merged), str(out), str(other)]) == 0
    capsys.readouterr()
    _check_outputs(merged, [(v, 0) for v in VARIANTS] + [("none", 1)])
    assert "seed 0 / 1" in (merged / "results.md").read_text()  # the per-seed column appears

    # the same variant and seed in two folders is ambiguous
    with pytest.raises(DsmrError, match="seed 0 is in both .*study/results/.*merged/results/"):
        study.merge_studies(tmp_path / "bad", [out, merged])


def test_default_variants_compare_like_with_like():
    cfg = StudyConfig(layers=6, segment=128, batch_size=8, horizon=512, budget=1536, long_layers=2, short=128)
    variants = {v.name: v for v in default_variants(cfg)}
    horizons = {name: make_run_schedule(study.train_config(cfg, v)).horizons for name, v in variants.items()}
    assert horizons["full"] == (512,) * 6
    assert horizons["two-scale"] == (512, 512, 128, 128, 128, 128)
    assert horizons["two-scale-inverse"] == tuple(reversed(horizons["two-scale"]))
    assert horizons["binary-lower"] == (512, 512, 512, 0, 0, 0)
    assert horizons["binary-upper"] == (0, 0, 0, 512, 512, 512)
    for name in ("uniform", "two-scale", "two-scale-inverse", "binary-lower", "binary-upper"):
        assert sum(horizons[name]) == cfg.budget, name
    assert horizons["none"] == (0,) * 6
    assert variants["gate-soft"].options["gate"] == "soft" and horizons["gate-ste"] == horizons["full"]
    excerpt = study.train_config(cfg, variants["excerpt"])
    assert excerpt.baseline == "excerpt" and excerpt.context == 512
    assert excerpt.batch_size * excerpt.context == cfg.batch_size * cfg.segment  # same tokens per step
    # every variant shares the model, data order, seed and steps
    shared = {(c.layers, c.d_model, c.heads, c.seed, c.steps, c.lr) for c in
              (study.train_config(cfg, v) for v in variants.values())}
    assert len(shared) == 1


def test_bad_input_says_what(bach_cache, tmp_path):
    with pytest.raises(DsmrError, match="unknown study variants \\['two_scale'\\]"):
        study.select_variants(StudyConfig(), ["two_scale"])
    with pytest.raises(DsmrError, match="steps must be a positive integer"):
        study.run_study(bach_cache.path, tmp_path / "s", StudyConfig(steps=0), progress=False)
    with pytest.raises(DsmrError, match="holds no study results"):
        study.merge_studies(tmp_path / "m", [tmp_path])
    # a folder started with other options is not mixed with new ones
    out = tmp_path / "s"
    study.run_study(bach_cache.path, out, StudyConfig(**TINY), variants=["none"], fresh_process=False,
                    progress=False)
    with pytest.raises(DsmrError, match="d_model: 32 then, 48 now"):
        study.run_study(bach_cache.path, out, StudyConfig(**dict(TINY, d_model=48)), variants=["none"],
                        fresh_process=False, progress=False)
    assert cli_main(["study", "merge", str(tmp_path / "m")]) == 2  # merge needs at least one folder


def test_final_evaluation_and_recipe_options_reach_the_table(bach_cache, tmp_path):
    """--test: each final model over the whole validation and test splits; recipe options and the
    curriculum variant go through to the runs; the state size follows the memory representation."""
    cfg = StudyConfig(**dict(TINY, val_pieces=1, test=True, head_dim=8, tie_embeddings=False, memory="hidden"))
    records = study.run_study(bach_cache.path, tmp_path / "s", cfg, variants=["two-scale-curriculum", "none"],
                              fresh_process=False, progress=False)
    by_name = {r["variant"]: r for r in records}
    curriculum = by_name["two-scale-curriculum"]
    assert curriculum["train_config"]["horizon_warmup"] == 2 and curriculum["train_config"]["memory"] == "hidden"
    assert curriculum["state_bytes"] == sum(curriculum["horizons"]) * 32 * 4  # d_model values per position
    for r in records:
        assert r["val_pieces"] == 1 and r["val_all_pieces"] == bach_cache.num_pieces("validation") > 1
        assert r["test_pieces"] == bach_cache.num_pieces("test") and math.isfinite(r["test_ppl"])
    markdown = (tmp_path / "s" / "results.md").read_text()
    assert "test PPL" in markdown and "val PPL, all pieces" in markdown and "untied output head" in markdown


def test_epochs_train_every_variant_for_whole_passes(bach_cache, tmp_path):
    """--epochs N: the steps of N passes of the full-piece lanes over the training split, the same count
    `dsmr train --epochs N` trains for those lanes, segment and seed; recorded in study.json."""
    from dsmr.stream import PieceStream
    from dsmr.train import TrainConfig, total_steps

    cfg = StudyConfig(**dict(TINY, batch_size=8, segment=64, epochs=1, eval_every=1000, val_pieces=1))
    steps = study.epoch_steps(bach_cache, cfg)
    assert steps >= bach_cache.num_tokens("train") / (8 * 64)  # every token once, padding at lane ends
    tok = bach_cache.tokenizer
    lanes = PieceStream(bach_cache.pieces("train"), 8, 64, tok.bos_id, tok.eos_id, tok.pad_id, seed=0)
    assert steps == total_steps(TrainConfig(steps=None, epochs=1, batch_size=8, segment=64), lanes)
    assert study.epoch_steps(bach_cache, StudyConfig(**dict(TINY, batch_size=8, segment=64, epochs=2))) > steps
    records = study.run_study(bach_cache.path, tmp_path / "s", cfg, variants=["none"], fresh_process=False,
                              progress=False)
    assert records[0]["steps"] == steps
    recorded = json.loads((tmp_path / "s" / "study.json").read_text())["config"]
    assert recorded["epochs"] == 1 and recorded["steps"] == steps
    with pytest.raises(DsmrError, match="epochs must be a positive integer"):
        StudyConfig(epochs=0).validate()


def test_status_says_where_each_variant_stands(bach_cache, tmp_path, capsys):
    """`dsmr study status`: a finished variant's figures; an unfinished one's last step, validation so far,
    speed and time left from its metrics (a resumed run's jump back and a line cut short by a kill ignored)."""
    out = tmp_path / "s"
    [done] = study.run_study(bach_cache.path, out, StudyConfig(**TINY), variants=["none"], fresh_process=False,
                             progress=False)
    spec = {"variant": "two-scale", "train": {"seed": 0, "steps": 100}, "run_dir": "/elsewhere/runs/two-scale-seed0"}
    (out / "results" / "two-scale-seed0.spec.json").write_text(json.dumps(spec))
    run = out / "runs" / "two-scale-seed0"
    run.mkdir(parents=True)
    logged = [10, 20, 30, 20, 30, 40]  # resumed from a checkpoint at step 10 after logging step 30
    lines = [json.dumps({"step": s, "loss": 3.0, "tokens": 100, "tokens_per_s": 50.0}) for s in logged]
    lines.insert(3, json.dumps({"step": 30, "val_ppl": 40.0, "val_nll": 3.7}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4')
    rows = {r["variant"]: r for r in study.study_status([out])}
    assert rows["none"]["state"] == "finished" and rows["none"]["val_ppl"] == done["val_ppl"]
    assert rows["none"]["step"] == rows["none"]["steps"] == 4 and rows["none"]["hours_left"] == 0
    unfinished = rows["two-scale"]
    assert unfinished["state"] == "unfinished" and unfinished["step"] == 40 and not unfinished["resumable"]
    assert unfinished["val_curve"] == [{"step": 30, "val_ppl": 40.0}] and unfinished["val_ppl"] == 40.0
    assert unfinished["train_tokens_per_s"] == pytest.approx(50.0)
    assert unfinished["hours_left"] * 3600 == pytest.approx(60 * 0.2)  # 60 steps left at 2 s per 10 steps
    assert cli_main(["study", "status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "finished" in printed and "40/100" in printed and "no checkpoint yet" in printed
    assert cli_main(["study", "status", str(tmp_path)]) == 2  # not a study folder
