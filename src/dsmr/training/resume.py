"""Saving and resuming a training run: `save_checkpoint` (weights and trainer state, in an order a kill
cannot break), the trainer state's checks, `prepare_run` (may this run start, or resume, in this folder? from
which saved state?), `check_resume` (the options a resume may not change), the RNG states.

`trainer_state.pt` is the resumable unit: it holds a copy of the weights of its step, so a resume never
depends on two files being renamed together. A save writes both files in full, then renames
`trainer_state.pt` and then `model.safetensors`; a kill between the two renames leaves weights one save
behind, which the next resume rewrites from the trainer state. Temporary files of killed saves are deleted
when the run is resumed. The trainer state must have its keys, a numeric step and an optimizer state of this
model's shapes; anything else is a DsmrError naming the file (and never suggests unpickling it).
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import numpy as np
import torch

from dsmr.core.atomic import atomic_path, atomic_write_json, remove_stale_temporaries
from dsmr.errors import DsmrError
from dsmr.sharing.run_folder import (BEST_FILE, CONFIG_FILE, LATEST_FILE, RUN_FILES, TRAINER_STATE_FILE, check_finite,
                                     first_line, load_weights, model_config_from, read_config, save_weights,
                                     weights_step, write_weights)

TRAINER_STATE_KEYS = ("step", "best_val_nll", "optimizer", "scheduler", "stream")


def save_checkpoint(run_dir, model: torch.nn.Module, config: dict, trainer_state: dict | None = None,
                    best: bool = False) -> Path:
    """Write config.json and the weights (best.safetensors when `best`, else model.safetensors and, when
    given, trainer_state.pt). Returns the weights path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / CONFIG_FILE, config)
    step = None if trainer_state is None else trainer_state.get("step")
    weights = run_dir / (BEST_FILE if best else LATEST_FILE)
    if trainer_state is not None and not best:
        # The trainer state carries its own copy of the weights, so it is resumable on its own. Both files
        # are written in full first; the state is renamed before the weights (the inner context exits
        # first), so a kill between the renames leaves a state one save ahead of model.safetensors, which
        # resume_weights repairs.
        unit = dict(trainer_state, model={k: v.detach().cpu() for k, v in model.state_dict().items()})
        with atomic_path(weights) as weights_tmp, atomic_path(run_dir / TRAINER_STATE_FILE) as state_tmp:
            write_weights(model, weights_tmp, step)
            torch.save(unit, state_tmp)
    else:
        save_weights(model, weights, step=step)
    return weights


def load_trainer_state(run_dir) -> dict:
    """The resumable state of a run, checked: its keys, a numeric step, finite weights of its own (or, for
    runs saved before the state held weights, latest weights of the same step)."""
    run_dir = Path(run_dir)
    path = run_dir / TRAINER_STATE_FILE
    if not path.is_file():
        raise DsmrError(f"no {TRAINER_STATE_FILE} in {run_dir}: nothing to resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt or foreign pickle
        raise DsmrError(f"{path} is damaged or not a dsmr trainer state ({first_line(err)})") from None
    if not isinstance(state, dict):
        raise DsmrError(f"{path} is damaged: it holds a {type(state).__name__}, not a trainer state")
    missing = [k for k in TRAINER_STATE_KEYS if k not in state]
    if "rng" not in state and "ranks" not in state:
        missing.append("rng")
    if missing:
        raise DsmrError(f"{path} is damaged: it lacks {', '.join(missing)}")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise DsmrError(f"{path} is damaged: its step {step!r:.40} is not a whole number >= 0")
    best = state["best_val_nll"]
    if isinstance(best, bool) or not isinstance(best, (int, float)) or math.isnan(best):
        raise DsmrError(f"{path} is damaged: best_val_nll {best!r:.40} is not a number")
    optimizer = state["optimizer"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        raise DsmrError(f"{path} is damaged: its optimizer state is not an optimizer state dict")
    if "model" in state:
        if not isinstance(state["model"], dict):
            raise DsmrError(f"{path} is damaged: its weights are not a dict of tensors")
        check_finite(state["model"], path)
        return state
    # saved before the trainer state held the weights: the latest weights must be of the same step
    latest = run_dir / LATEST_FILE
    if not latest.is_file():
        raise DsmrError(f"{run_dir}: {TRAINER_STATE_FILE} without {LATEST_FILE}")
    if weights_step(latest) != state.get("step"):
        raise DsmrError(f"{run_dir}: {LATEST_FILE} (step {weights_step(latest)}) and {TRAINER_STATE_FILE} "
                        f"(step {state.get('step')}) disagree; the last save was interrupted")
    return state


def resume_weights(model: torch.nn.Module, run_dir, state: dict, device="cpu") -> None:
    """Load the weights of a resume into `model`: the trainer state's own copy (then model.safetensors is
    rewritten when a kill left it one save behind), or for older runs model.safetensors."""
    run_dir = Path(run_dir)
    weights = state.get("model")
    if weights is None:
        load_weights(model, run_dir / LATEST_FILE, device=device)
        return
    path = run_dir / TRAINER_STATE_FILE
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)}
    if saved != expected:
        problems = [f"{k}: saved {saved.get(k)}, model {v}" for k, v in expected.items() if saved.get(k) != v]
        problems += [f"unexpected tensor {k}" for k in saved if k not in expected]
        raise DsmrError(f"{path} does not fit this model config: " + "; ".join(problems[:6]))
    model.load_state_dict(weights)
    latest = run_dir / LATEST_FILE
    try:
        current = weights_step(latest) if latest.is_file() else None
    except DsmrError:
        current = None
    if current != state["step"]:
        save_weights(model, latest, step=state["step"])


def check_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer, path) -> None:
    """DsmrError naming `path` when a saved optimizer state does not belong to this model's parameters
    (other groups, other shapes) or holds non-finite moments."""
    groups = optimizer.param_groups
    saved_groups = saved["param_groups"]
    if len(saved_groups) != len(groups) or any(
            not isinstance(g, dict) or len(g.get("params", ())) != len(h["params"])
            for g, h in zip(saved_groups, groups)):
        raise DsmrError(f"{path} is damaged or from another model: its optimizer has other parameter groups")
    params = [p for h in groups for p in h["params"]]
    ids = [i for g in saved_groups for i in g["params"]]
    for index, param in zip(ids, params):
        entry = saved["state"].get(index)
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise DsmrError(f"{path} is damaged: optimizer state {index} is not a dict")
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                continue
            if key != "step" and tuple(value.shape) != tuple(param.shape):
                raise DsmrError(f"{path} is damaged or from another model: optimizer {key} of parameter "
                                f"{index} has shape {tuple(value.shape)}, the parameter {tuple(param.shape)}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise DsmrError(f"{path} is damaged: optimizer {key} of parameter {index} holds NaN or "
                                f"infinite values")


def remove_run_temporaries(run_dir) -> list[Path]:
    """Delete the temporary files that a killed save left in a run folder (call before resuming it)."""
    return remove_stale_temporaries(run_dir, RUN_FILES)


def prepare_run(run_dir, config: dict, resume: bool, world_size: int) -> dict | None:
    """The checks before training into `run_dir` (rank 0): the saved trainer state to resume from, or None
    for a fresh run. DsmrError when a fresh run would overwrite one, or a resume would change the run."""
    run_dir = Path(run_dir)
    if not resume:
        if (run_dir / CONFIG_FILE).exists() or (run_dir / TRAINER_STATE_FILE).exists():
            raise DsmrError(f"{run_dir} already holds a run: resume it (--resume) or choose another --out")
        if run_dir.is_dir():
            remove_run_temporaries(run_dir)
        return None
    if not run_dir.is_dir():
        raise DsmrError(f"nothing to resume: {run_dir} does not exist (start the run without --resume)")
    remove_run_temporaries(run_dir)  # left by a save that was killed
    if not (run_dir / CONFIG_FILE).exists() and not (run_dir / TRAINER_STATE_FILE).exists():
        # never saved, or killed inside its first save (before config.json was renamed into place)
        print(f"dsmr train: {run_dir} holds no save to resume (the run stopped before or in its first save); "
              f"starting it from step 0", file=sys.stderr)
        return None
    check_resume(run_dir, config)
    if not (run_dir / TRAINER_STATE_FILE).exists():
        # The run stopped before its first resumable save (a validation may have written config.json and
        # best.safetensors): nothing to continue from, so train it again from step 0.
        print(f"dsmr train: {run_dir} has no {TRAINER_STATE_FILE} (the run stopped before its first save); "
              f"starting it again from step 0", file=sys.stderr)
        return None
    saved = load_trainer_state(run_dir)
    saved_world = int(saved.get("world_size", 1))
    if saved_world != world_size:
        raise DsmrError(
            f"cannot resume {run_dir} with {world_size} process{'es' if world_size > 1 else ''}: it was "
            f"trained with {saved_world}, and its data order and recurrent state belong to that many ranks; "
            f"resume with {saved_world} (dsmr train --nproc {saved_world} ..., or torchrun with "
            f"{saved_world} processes in all)")
    return saved


def check_resume(run_dir, new: dict) -> dict:
    """The saved config.json of `run_dir`; DsmrError when the new run config `new` differs where it matters
    (any train option but dsmr.training.config.RESUMABLE_CHANGES, the tokenizer, the model)."""
    from dsmr.training.config import RESUMABLE_CHANGES, TrainConfig

    old = read_config(run_dir)
    diffs = []
    old_train = TrainConfig.from_dict(old.get("train", {})).to_dict() if "train" in old else {}
    new_train = new["train"]
    for key in sorted(set(old_train) | set(new_train)):
        if key not in RESUMABLE_CHANGES and old_train.get(key) != new_train.get(key):
            diffs.append(f"{key}: run {old_train.get(key)!r}, now {new_train.get(key)!r}")
    if old.get("tokenizer_hash") != new["tokenizer_hash"]:
        diffs.append(f"tokenizer: run {old['tokenizer'].get('kind')} ({str(old.get('tokenizer_hash'))[:12]}), "
                     f"cache {new['tokenizer'].get('kind')} ({new['tokenizer_hash'][:12]})")
    old_model = model_config_from(old).to_dict() if "model" in old else None
    if old_model != new["model"] and not diffs:
        diffs.append("model config differs")
    if diffs:
        raise DsmrError(f"cannot resume {run_dir} with a different config: " + "; ".join(diffs))
    return old


def rng_state() -> dict:
    """Every random number generator's state (torch, Python, NumPy, CUDA): saved so a resume draws the same."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
