"""The schedule study (dsmr.study, `dsmr study`): a tiny study on Bach chorales, resume, merge, errors."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dsmr
from dsmr import study
from dsmr.study import run as study_run
from dsmr.cli import main as cli_main
from dsmr.errors import DsmrError
from dsmr.study import StudyConfig, default_variants
from dsmr.training.config import make_run_schedule


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
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown):  # every figure it shows exists
        assert (folder / link).is_file(), link
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

    monkeypatch.setattr(study_run, "run_variant", no_training)
    again = study.run_study(bach_cache.path, out, cfg, fresh_process=False, progress=False)
    assert [r["val_ppl"] for r in again] == [r["val_ppl"] for r in records]
    assert {p: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")} == mtimes
    monkeypatch.undo()

    # one variant alone with another seed, through the CLI and a fresh worker process
    other = tmp_path / "other"
    env = dict(os.environ, PYTHONPATH=str(Path(dsmr.__file__).parents[1]))
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
    cfg = StudyConfig(**dict(TINY, val_pieces=1, test=True, head_dim=8, tie_embeddings=False, memory="hidden",
                             init_std=0.05))
    records = study.run_study(bach_cache.path, tmp_path / "s", cfg, variants=["two-scale-curriculum", "none"],
                              fresh_process=False, progress=False)
    by_name = {r["variant"]: r for r in records}
    curriculum = by_name["two-scale-curriculum"]
    assert curriculum["train_config"]["horizon_warmup"] == 2 and curriculum["train_config"]["memory"] == "hidden"
    assert curriculum["train_config"]["init_std"] == 0.05
    assert curriculum["state_bytes"] == sum(curriculum["horizons"]) * 32 * 4  # d_model values per position
    for r in records:
        assert r["val_pieces"] == 1 and r["val_all_pieces"] == bach_cache.num_pieces("validation") > 1
        assert r["test_pieces"] == bach_cache.num_pieces("test") and math.isfinite(r["test_ppl"])
    markdown = (tmp_path / "s" / "results.md").read_text()
    assert "test PPL" in markdown and "val PPL, all pieces" in markdown and "untied output head" in markdown
    # no gated variant: no gates figure, and no link to one
    assert "gates.png" not in markdown and not (tmp_path / "s" / "figures" / "gates.png").exists()


def test_epochs_train_every_variant_for_whole_passes(bach_cache, tmp_path):
    """--epochs N: the steps of N passes of the full-piece lanes over the training split, the same count
    `dsmr train --epochs N` trains for those lanes, segment and seed; recorded in study.json."""
    from dsmr.training.inputs import total_steps, training_stream
    from dsmr.training.config import TrainConfig

    cfg = StudyConfig(**dict(TINY, batch_size=8, segment=64, epochs=1, eval_every=1000, val_pieces=1))
    steps = study.epoch_steps(bach_cache, cfg)
    assert steps >= bach_cache.num_tokens("train") / (8 * 64)  # every token once, padding at piece ends
    train_cfg = TrainConfig(steps=None, epochs=1, batch_size=8, segment=64)
    lanes = training_stream(train_cfg, bach_cache.pieces("train"), bach_cache.tokenizer)
    assert steps == total_steps(train_cfg, lanes)
    assert study.epoch_steps(bach_cache, StudyConfig(**dict(TINY, batch_size=8, segment=64, epochs=2))) > steps
    records = study.run_study(bach_cache.path, tmp_path / "s", cfg, variants=["none"], fresh_process=False,
                              progress=False)
    assert records[0]["steps"] == steps
    recorded = json.loads((tmp_path / "s" / "study.json").read_text())["config"]
    assert recorded["epochs"] == 1 and recorded["steps"] == steps
    with pytest.raises(DsmrError, match="epochs must be a positive integer"):
        StudyConfig(epochs=0).validate()
    # the curriculum grows its horizons over its fraction of the epoch's steps
    curriculum = [v for v in default_variants(dataclasses.replace(cfg, steps=steps)) if v.name == "full-curriculum"]
    assert curriculum[0].options["horizon_warmup"] == round(cfg.curriculum * steps)
    # another seed's epoch has its own step count, and still belongs in the same study
    seed1 = dataclasses.replace(cfg, seed=1)
    [other] = study.run_study(bach_cache.path, tmp_path / "s", seed1, variants=["none"], fresh_process=False,
                              progress=False)
    assert other["steps"] == study.epoch_steps(bach_cache, seed1)
    assert len(study.collect_results([tmp_path / "s"])) == 2


def test_a_study_folder_from_older_code_continues(bach_cache, tmp_path):
    """study.json written before an option existed (here --epochs) compares with its default, not as a change."""
    out = tmp_path / "s"
    study.run_study(bach_cache.path, out, StudyConfig(**TINY), variants=["none"], fresh_process=False, progress=False)
    written = json.loads((out / "study.json").read_text())
    del written["config"]["epochs"]
    (out / "study.json").write_text(json.dumps(written))
    result = out / "results" / "none-seed0.json"
    record = json.loads(result.read_text())
    del record["study_config"]["epochs"]
    result.write_text(json.dumps(record))
    records = study.run_study(bach_cache.path, out, StudyConfig(**TINY), variants=["none"], fresh_process=False,
                              progress=False)
    assert records[0]["steps"] == 4


def test_status_says_where_each_variant_stands(bach_cache, tmp_path, capsys):
    """`dsmr study status`: a finished variant's figures; a running one's last step, validation so far, speed
    and time left (the first record after a resume counts from the checkpoint); a stopped one (its spec gone)
    from its run folder."""
    import shutil

    out = tmp_path / "s"
    [done] = study.run_study(bach_cache.path, out, StudyConfig(**TINY), variants=["none"], fresh_process=False,
                             progress=False)
    # running: the spec its process wrote; resumed from a checkpoint at step 25 after logging step 20
    spec = {"variant": "two-scale", "train": {"seed": 0, "steps": 100}, "run_dir": "/elsewhere/runs/two-scale-seed0"}
    (out / "results" / "two-scale-seed0.spec.json").write_text(json.dumps(spec))
    run = out / "runs" / "two-scale-seed0"
    run.mkdir(parents=True)
    logged = [{"step": 10, "tokens": 100}, {"step": 20, "tokens": 100}, {"step": 25, "val_ppl": 40.0},
              {"step": 30, "tokens": 50, "interval_steps": 5, "resumed_from": 25}]
    lines = [json.dumps(dict(r, tokens_per_s=50.0) if "tokens" in r else r) for r in logged]
    (run / "metrics.jsonl").write_text("\n".join(lines[:2]) + '\n{"step": 2\n' + "\n".join(lines[2:]) + "\n")
    # stopped before its result: no spec, a run folder with a checkpoint (a finished run's, copied)
    shutil.copytree(out / "runs" / "none-seed0", out / "runs" / "full-seed1")
    rows = {r["variant"]: r for r in study.study_status([out])}
    assert rows["none"]["state"] == "finished" and rows["none"]["val_ppl"] == done["val_ppl"]
    assert rows["none"]["step"] == rows["none"]["steps"] == 4 and rows["none"]["hours_left"] == 0
    running = rows["two-scale"]
    assert running["state"] == "unfinished" and running["step"] == 30 and not running["resumable"]
    assert running["val_curve"] == [{"step": 25, "val_ppl": 40.0}] and running["val_ppl"] == 40.0
    assert running["train_tokens_per_s"] == pytest.approx(50.0)
    assert running["hours_left"] * 3600 == pytest.approx(70 * 0.2)  # 25 steps took 5 s; 70 left
    stopped = rows["full"]
    assert stopped["seed"] == 1 and stopped["state"] == "unfinished" and stopped["resumable"]
    assert stopped["step"] == stopped["steps"] == 4
    assert cli_main(["study", "status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "finished" in printed and "30/100" in printed and "no checkpoint yet" in printed
    assert "validation PPL by step" in printed and "two-scale/0" in printed
    assert any(line.split()[:1] == ["25"] and "40.00" in line for line in printed.splitlines())
    assert cli_main(["study", "status", str(tmp_path)]) == 2  # not a study folder


def test_study_list_aligns_its_columns(capsys):
    from dsmr.cli import main

    assert main(["study", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("two-scale-curriculum ") for line in lines)  # the longest name
    columns = {tuple(m.start() for m in list(re.finditer(r"\S+", line))[1:3]) for line in lines}
    assert len(columns) == 1, lines  # the horizons and the descriptions start at the same place on every line


def test_paired_differences_of_placements():
    from dsmr.study.paired import comparisons, paired_difference, with_notes

    diff = paired_difference({0: 15.0, 1: 15.5, 2: 15.2, 3: 15.1}, {0: 15.4, 1: 15.6, 2: 15.9, 3: 15.3, 4: 1.0})
    assert diff["seeds"] == [0, 1, 2, 3] and diff["differences"] == pytest.approx([-0.4, -0.1, -0.7, -0.2])
    assert diff["mean"] == pytest.approx(-0.35) and diff["same_sign"]
    sd = (sum((x + 0.35) ** 2 for x in (-0.4, -0.1, -0.7, -0.2)) / 3) ** 0.5
    assert diff["low"] == pytest.approx(-0.35 - 3.182 * sd / 2) and diff["high"] == pytest.approx(-0.35 + 3.182 * sd / 2)
    assert diff["p_sign_flip"] == pytest.approx(2 / 16)  # all four the same sign: the smallest p four seeds give
    mixed = paired_difference({0: 1.0, 1: 2.0}, {0: 2.0, 1: 1.0})
    assert mixed["mean"] == 0 and mixed["p_sign_flip"] == 1.0 and not mixed["same_sign"]
    assert paired_difference({0: 1.0}, {1: 1.0}) is None
    one = paired_difference({0: 1.0}, {0: 0.5})
    assert one["low"] is None and one["mean"] == 0.5
    records = [{"variant": v, "seed": s, "val_all_ppl": p} for v, s, p in
               [("two-scale", 0, 15.0), ("two-scale", 1, 15.5), ("uniform", 0, 15.2), ("uniform", 1, 15.1),
                ("none", 0, 17.0)]]
    rows = comparisons(records, "val_all_ppl")
    assert [(r["a"], r["b"]) for r in rows] == [("two-scale", "uniform")]  # `none` shares no budget

    class Cache:  # two validation pieces of 3 and 4 events, 2 and 1 of them notes
        splits = ("validation",)

        class tokenizer:
            @staticmethod
            def count_notes(pieces):
                return 3

        @staticmethod
        def pieces(split):
            return [[1, 2, 3], [1, 2, 3, 4]]

    filled = with_notes([{"variant": "x", "seed": 0, "val_all_nll": 2.0, "val_all_tokens": 9},
                         {"variant": "y", "seed": 0, "val_all_nll": 2.0, "val_all_tokens": 10}], Cache)
    assert filled[0]["val_all_nll_per_note"] == pytest.approx(2.0 * 9 / 3) and filled[0]["val_all_notes"] == 3
    assert "val_all_nll_per_note" not in filled[1]  # other tokens than the cache's split: not filled in
