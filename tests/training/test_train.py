"""The streaming trainer and run folders: learning, exact resume, Ctrl-C, checkpoints, isolation, baseline."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dsmr.sharing.run_folder import check_tokenizer, read_config, save_weights
from dsmr.training.resume import load_trainer_state
from dsmr.sharing.loader import load_model
from dsmr.errors import DsmrError
from dsmr.model import DSMR, DSMRConfig
from dsmr.data.stream import IGNORE_INDEX, PieceStream
from dsmr.data.tokenizers.performance import PerformanceTokenizer
from dsmr.training.trainer import train
from dsmr.training.config import TrainConfig


def tiny(**overrides) -> TrainConfig:
    base = dict(layers=2, d_model=32, heads=2, segment=32, batch_size=3, schedule="two-scale", budget=96,
                long_layers=1, short=32, lr=3e-3, warmup_steps=2, steps=8, eval_every=0, log_every=1,
                val_pieces=1, tensorboard=False)
    base.update(overrides)
    return TrainConfig(**base)


def losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def interrupt_at(monkeypatch, call: int, action):
    """Run `action` inside the `call`-th training step (in gradient clipping, after the backward pass)."""
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def clip(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)


def test_validation_ppl_drops_on_chorales(bach_cache, tmp_path):
    cfg = tiny(d_model=64, segment=64, batch_size=4, budget=192, short=64, steps=40, warmup_steps=4,
               eval_at_start=True, val_pieces=None, log_every=10)
    result = train(cfg, bach_cache, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["step"] == 0 and "val_ppl" in r)["val_ppl"]
    assert start > 200  # an untrained model is close to uniform over 391 ids
    assert result["ppl"] < start / 4, (start, result["ppl"])
    assert result["steps"] == 40 and not result["interrupted"]
    assert result["tokens"] == sum(len(p) + 1 for p in bach_cache.pieces("validation"))
    for name in ("config.json", "model.safetensors", "best.safetensors", "trainer_state.pt"):
        assert (tmp_path / "run" / name).is_file()
    model = load_model(tmp_path / "run")
    tokenizer, config = model.tokenizer, model.run_config
    assert config["model"]["horizons"] == [128, 64] and tokenizer.vocab_size == model.cfg.vocab_size


# dropout and soft gates make the RNG and gate parameters part of what a resume must restore;
# accumulation over 2 segments checks that the stream and state rewind together.
RESUME_CFG = dict(dropout=0.1, gate="soft", gate_lambda=0.01, grad_accum=2, steps=10)


@pytest.fixture(scope="module")
def uninterrupted(bach_cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(tiny(**RESUME_CFG), bach_cache, run, progress=False)
    return run


def assert_same_run(a, b):
    assert losses(a) == losses(b) and len(losses(a)) == 10
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_keyboard_interrupt_saves_and_resume_is_exact(bach_cache, uninterrupted, tmp_path, monkeypatch):
    run = tmp_path / "run"

    def ctrl_c():
        raise KeyboardInterrupt

    interrupt_at(monkeypatch, 5, ctrl_c)  # inside step 5: rewinds to the end of step 4
    result = train(tiny(**RESUME_CFG), bach_cache, run, progress=False)
    assert result["interrupted"] and result["steps"] == 4
    assert load_trainer_state(run)["step"] == 4
    monkeypatch.undo()
    resumed = train(tiny(**RESUME_CFG), bach_cache, run, progress=False, resume=True)
    assert resumed["steps"] == 10 and not resumed["interrupted"]
    assert_same_run(uninterrupted, run)
    gates = [json.loads(line)["gates"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in line]
    assert all(len(g) == 2 for g in gates) and gates[0] != gates[-1]  # per-layer gate values, learning


def test_sigint_stops_at_a_step_boundary(bach_cache, uninterrupted, tmp_path, monkeypatch):
    run = tmp_path / "run"
    interrupt_at(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGINT))
    result = train(tiny(**RESUME_CFG), bach_cache, run, progress=False)
    assert result["interrupted"] and result["steps"] == 3  # the signalled step finished, then it stopped
    monkeypatch.undo()
    train(tiny(**RESUME_CFG), bach_cache, run, progress=False, resume=True)
    assert_same_run(uninterrupted, run)


def test_resume_refuses_another_config_and_fresh_run_refuses_a_used_folder(bach_cache, uninterrupted, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(uninterrupted, run)
    with pytest.raises(DsmrError, match="d_model: run 32, now 64"):
        train(tiny(**dict(RESUME_CFG, d_model=64)), bach_cache, run, progress=False, resume=True)
    with pytest.raises(DsmrError, match="already holds a run"):
        train(tiny(**RESUME_CFG), bach_cache, run, progress=False)
    with pytest.raises(DsmrError, match="nothing to resume|not a dsmr run"):
        train(tiny(), bach_cache, tmp_path / "empty", progress=False, resume=True)
    # more steps is an allowed change: the run continues from step 10
    more = train(tiny(**dict(RESUME_CFG, steps=12)), bach_cache, run, progress=False, resume=True)
    assert more["steps"] == 12 and max(losses(run)) == 12


def test_a_run_that_died_before_its_first_save_can_be_resumed(bach_cache, uninterrupted, tmp_path, monkeypatch):
    # a validation at step 2 writes config.json and best.safetensors; the first resumable save would be at 100
    cfg = tiny(**dict(RESUME_CFG, eval_every=2, save_every=100))
    run = tmp_path / "died"
    from dsmr.training.run_log import MetricsLog

    real_log = MetricsLog.log

    def crash_at_step_3(self, record):
        if record.get("step") == 3:
            raise RuntimeError("simulated crash")
        return real_log(self, record)

    monkeypatch.setattr(MetricsLog, "log", crash_at_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, bach_cache, run, progress=False)
    monkeypatch.undo()
    assert (run / "config.json").exists() and not (run / "trainer_state.pt").exists()
    with pytest.raises(DsmrError, match="already holds a run: resume it"):
        train(cfg, bach_cache, run, progress=False)
    # --resume starts it again from step 0 and gives the run an uninterrupted training gives
    train(cfg, bach_cache, run, progress=False, resume=True)
    assert losses(run) == losses(uninterrupted) and (run / "trainer_state.pt").exists()


def test_checkpoint_of_another_config_is_a_clear_error(bach_cache, uninterrupted, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(uninterrupted, run)
    config = read_config(run)
    config["model"]["d_model"] = 64
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(DsmrError, match=r"embedding.weight: file \(391, 32\), config \(391, 64\)"):
        load_model(run)
    other = PerformanceTokenizer(velocity_bins=16)
    with pytest.raises(DsmrError, match="vocab 375"):
        check_tokenizer(read_config(uninterrupted), other, "the cache X")
    check_tokenizer(read_config(uninterrupted), bach_cache.tokenizer, "the cache")  # same: no error
    with pytest.raises(DsmrError, match="checkpoint not found"):
        load_model(tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "config.json").write_text(json.dumps(read_config(uninterrupted)))
    with pytest.raises(DsmrError, match="not a readable safetensors"):
        load_model(tmp_path / "bad.safetensors")
    # weights of another step than the trainer state (a kill between the renames of a save): the state
    # holds its own weights, so it resumes, and model.safetensors is rewritten from it
    model = load_model(uninterrupted)
    _, _ = model.tokenizer, model.run_config
    save_weights(model, run / "model.safetensors", step=3)
    state = load_trainer_state(run)
    from dsmr.sharing.run_folder import weights_step
    from dsmr.training.resume import resume_weights
    resume_weights(model, run, state)
    assert weights_step(run / "model.safetensors") == state["step"]
    # a trainer state saved before states held weights must agree with model.safetensors
    del state["model"]
    torch.save(state, run / "trainer_state.pt")
    save_weights(model, run / "model.safetensors", step=3)
    with pytest.raises(DsmrError, match="disagree"):
        load_trainer_state(run)


def test_a_failed_save_leaves_the_previous_resumable_pair(uninterrupted, tmp_path, monkeypatch):
    import dsmr.training.resume as checkpoint

    run = tmp_path / "copy"
    shutil.copytree(uninterrupted, run)
    before = load_trainer_state(run)["step"]
    model = load_model(run, which="latest")
    _, config = model.tokenizer, model.run_config

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_checkpoint(run, model, config, {"step": before + 5})
    monkeypatch.undo()
    assert load_trainer_state(run)["step"] == before  # weights and state still agree: resumable
    assert sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) == []


def test_streamed_lanes_are_isolated_and_padding_changes_nothing():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    pieces = [rng.integers(10, 50, size=n) for n in (70, 5, 33, 120, 16)]
    for i, p in enumerate(pieces):
        p[0] = 3 + i  # the first event names the piece
    model = DSMR(DSMRConfig(vocab_size=50, n_layers=3, d_model=32, n_heads=2, horizons=(40, 16, 0))).eval()

    def per_piece(batch_size, scramble_padding=False):
        """Logits of each piece (keyed by its first event) and the summed NLL, streamed in `batch_size` lanes."""
        stream = PieceStream(pieces, batch_size, 16, bos_id=1, eos_id=2, pad_id=0, shuffle=False)
        current, key, done, state, nll = {}, {}, {}, None, 0.0
        with torch.no_grad():
            for b in stream.epoch_batches():
                ids = b.ids.clone()
                if scramble_padding:
                    ids[~b.token_mask] = torch.randint(10, 50, (int((~b.token_mask).sum()),))
                logits, state = model(ids, b.positions, b.reset, state, b.token_mask)
                nll += float(torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), b.targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"))
                for lane in range(batch_size):
                    n = int(b.token_mask[lane].sum())
                    if n == 0:
                        continue
                    if b.reset[lane]:
                        current[lane], key[lane] = [], int(b.targets[lane, 0])
                    current[lane].append(logits[lane, :n])
                    if b.targets[lane, n - 1] == 2:  # EOS: the piece is complete
                        done[key[lane]] = torch.cat(current[lane])
        return done, nll

    alone, nll_alone = per_piece(1)
    together, nll_together = per_piece(3)
    scrambled, nll_scrambled = per_piece(3, scramble_padding=True)
    assert sorted(alone) == sorted(together) == list(range(3, 3 + len(pieces)))
    for k in alone:
        assert together[k].shape == (len(pieces[k - 3]) + 1, 50)
        torch.testing.assert_close(together[k], alone[k], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(scrambled[k], together[k], atol=2e-5, rtol=1e-4)
    assert nll_together == pytest.approx(nll_alone, rel=1e-5)
    assert nll_scrambled == pytest.approx(nll_together, rel=1e-6)


def test_excerpt_baseline_trains_without_memory(bach_cache, tmp_path):
    cfg = tiny(baseline="excerpt", context=48, steps=4, schedule="two-scale")
    result = train(cfg, bach_cache, tmp_path / "run", progress=False)
    config = read_config(tmp_path / "run")
    assert config["model"]["horizons"] == [0, 0] and config["segment_len"] == 48
    assert result["state_bytes"] == 0 and result["ppl"] is not None and result["steps"] == 4


def test_epochs_mode_runs_whole_epochs(bach_cache, tmp_path):
    cfg = tiny(steps=None, epochs=1, segment=256, batch_size=8, budget=320, short=64, val_pieces=1)
    stream = PieceStream(bach_cache.pieces("train"), 8, 256, 1, 2, 0, seed=0, refill=True)
    segments = sum(-(-(len(p) + 1) // 256) for p in bach_cache.pieces("train"))
    result = train(cfg, bach_cache, tmp_path / "run", progress=False)
    # the full batches that hold one epoch's segments (the lanes refill across the epoch's end)
    assert result["steps"] == stream.steps_for_epochs(1) == -(-segments // 8)


def test_bad_config_is_a_clear_error(bach_cache, tmp_path):
    with pytest.raises(DsmrError, match="give steps or epochs"):
        train(tiny(epochs=1), bach_cache, tmp_path / "a", progress=False)
    with pytest.raises(DsmrError, match="two-scale"):
        train(tiny(budget=40), bach_cache, tmp_path / "b", progress=False)
    with pytest.raises(DsmrError, match="grad_accum"):
        train(tiny(grad_accum=0), bach_cache, tmp_path / "c", progress=False)


def test_horizon_curriculum_and_hidden_memory_resume_exactly(bach_cache, tmp_path, monkeypatch):
    """Horizons grow from 0 over the first steps (logged with each record); with hidden memory and gates,
    a run interrupted mid-curriculum and resumed equals an uninterrupted one; the saved model has the full
    schedule."""
    cfg = dict(RESUME_CFG, horizon_warmup=6, memory="hidden", head_dim=24, rotary_fraction=0.5, steps=10)
    whole = tmp_path / "whole"
    train(tiny(**cfg), bach_cache, whole, progress=False)
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    horizons = [r["horizons"] for r in records if "loss" in r]
    assert horizons[0] == [0, 0] and horizons[2] == [21, 10] and horizons[-1] == [64, 32]  # steps 1, 3, 10
    assert read_config(whole)["model"]["horizons"] == [64, 32]

    def ctrl_c():
        raise KeyboardInterrupt

    run = tmp_path / "run"
    interrupt_at(monkeypatch, 4, ctrl_c)
    assert train(tiny(**cfg), bach_cache, run, progress=False)["steps"] == 3
    monkeypatch.undo()
    train(tiny(**cfg), bach_cache, run, progress=False, resume=True)
    assert_same_run(whole, run)


def test_a_run_folder_from_before_the_recipe_options_loads_and_resumes(bach_cache, tmp_path):
    """config.json written before head_dim, memory, horizon_warmup ... existed: loads and resumes with the
    values those runs had (kv memory)."""
    run = tmp_path / "old"
    train(tiny(memory="kv", init_std=0.02, steps=4), bach_cache, run, progress=False)
    config = json.loads((run / "config.json").read_text())
    for key in ("head_dim", "rotary_fraction", "init_std", "memory"):
        config["model"].pop(key)
    for key in ("head_dim", "rotary_fraction", "norm", "init_std", "memory", "horizon_warmup", "embedding_decay"):
        config["train"].pop(key)
    (run / "config.json").write_text(json.dumps(config))
    model = load_model(run)
    _, _ = model.tokenizer, model.run_config
    assert model.cfg.head_dim == 16 and model.cfg.memory == "kv"
    more = train(tiny(memory="kv", init_std=0.02, steps=5), bach_cache, run, progress=False, resume=True)
    assert more["steps"] == 5
    with pytest.raises(DsmrError, match="memory: run 'kv', now 'hidden'"):
        train(tiny(memory="hidden", init_std=0.02, steps=6), bach_cache, run, progress=False, resume=True)


def test_the_gate_choices_of_the_options_are_the_models():
    from dsmr.model.config import GATES
    from dsmr.training.config import GATE_KINDS

    assert GATE_KINDS == GATES


def test_initial_weights_scale_with_width_unless_given():
    """--init-std defaults to 1 / sqrt(d_model) (0.02 is GPT-2's value for width 768); a given value wins, and
    the model's weights are drawn with it."""
    from dsmr.training.config import make_model_config

    for d_model in (64, 256):
        cfg = make_model_config(TrainConfig(d_model=d_model, heads=4), vocab_size=50)
        assert cfg.init_std == pytest.approx(d_model ** -0.5)
        torch.manual_seed(0)
        weights = DSMR(cfg).blocks[0].mlp[0].weight
        assert weights.std().item() == pytest.approx(d_model ** -0.5, rel=0.05)
    assert make_model_config(TrainConfig(init_std=0.03), vocab_size=50).init_std == 0.03


def test_a_diverging_run_stops_with_an_error_and_keeps_its_last_good_checkpoint(bach_cache, tmp_path, monkeypatch):
    import dsmr.training.trainer as train_module
    from dsmr.training.optimization import TrainingDiverged

    # an update that throws a weight to 1e12 in the first step (finite loss, finite gradients): not saved
    real_clip = torch.nn.utils.clip_grad_norm_

    def explode(params, *args, **kwargs):
        params = list(params)
        norm = real_clip(params, *args, **kwargs)
        with torch.no_grad():
            params[0].mul_(1e12)
        return norm

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.utils, "clip_grad_norm_", explode)
        with pytest.raises(TrainingDiverged, match="diverged by step 1: weight"):
            train(tiny(steps=30, save_every=1), bach_cache, tmp_path / "wild", progress=False)
    assert not (tmp_path / "wild" / "model.safetensors").exists()

    # a loss that turns NaN at the third step: the run stops there, the second step's checkpoint stays
    real, calls = train_module.token_nll, {"n": 0}

    def nan_at_third(logits, targets):
        calls["n"] += 1
        nll = real(logits, targets)
        return nll * float("nan") if calls["n"] == 3 else nll

    monkeypatch.setattr(train_module, "token_nll", nan_at_third)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="diverged at step 3"):
        train(tiny(steps=30, save_every=1), bach_cache, run, progress=False)
    saved = load_model(run).state_dict()
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert load_trainer_state(run)["step"] == 2


@pytest.mark.parametrize("option,value", [("lr", math.inf), ("lr", math.nan), ("gate_lambda", math.inf),
                                          ("gate_init", math.nan), ("init_std", 1e12), ("seed", -1)])
def test_non_finite_and_absurd_training_options_are_refused_up_front(option, value):
    with pytest.raises(DsmrError, match=option):
        tiny(**{option: value}).validate()


def test_resume_of_a_run_killed_in_its_first_save_starts_it_from_step_0(bach_cache, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # what a kill at the first rename of the first save leaves: temporaries, no config.json, no state
    (run / ".config.json.abc123.tmp").write_text("{")
    (run / ".model.safetensors.def456.tmp").write_bytes(b"\0" * 1000)
    result = train(tiny(steps=3, save_every=1), bach_cache, run, progress=False, resume=True)
    assert result["steps"] == 3 and load_trainer_state(run)["step"] == 3
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")], "a finished run leaves no temporaries"


def test_a_run_folder_has_one_writer(bach_cache, tmp_path, monkeypatch):
    """A second trainer into a folder in use (fresh or --resume) is refused with the holder's PID, while a
    reader of the folder keeps working; the lock dies with its holder, so a killed run never locks it."""
    import subprocess
    import sys

    from dsmr.training.run_lock import LOCK_FILE

    run = tmp_path / "run"
    train(tiny(steps=2, save_every=1), bach_cache, run, progress=False)
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from dsmr.training.run_lock import run_folder_writer
with run_folder_writer({str(run)!r}):
    print("held", flush=True)
    time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for resume in (True, False):
            with pytest.raises(DsmrError, match=rf"in use: another dsmr train \(PID {holder.pid}\)"):
                train(tiny(steps=4, save_every=1), bach_cache, run, progress=False, resume=resume)
        with pytest.raises(DsmrError, match="in use"):
            train(tiny(steps=4), bach_cache, run, progress=False)
        assert load_model(run).cfg.n_layers == 2  # readers take no lock
        assert load_trainer_state(run)["step"] == 2  # nothing was written by the refused trainers
    finally:
        holder.kill()
        holder.wait()
    # the holder died (SIGKILL): the folder is free again, with no clean-up
    assert train(tiny(steps=4, save_every=1), bach_cache, run, progress=False, resume=True)["steps"] == 4
    assert (run / LOCK_FILE).is_file()
    with pytest.raises(DsmrError, match="nothing to resume"):
        train(tiny(), bach_cache, tmp_path / "missing", progress=False, resume=True)
    assert not (tmp_path / "missing").exists()
