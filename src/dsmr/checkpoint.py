"""Run folders: weights in safetensors, resumable trainer state, and loading a model from either.

A run folder holds

    config.json          model config, schedule, tokenizer config + hash, train config, segment length
    model.safetensors    latest weights (metadata: step)
    best.safetensors     weights with the best validation NLL so far
    trainer_state.pt     optimizer, LR scheduler, RNG states, stream position, recurrent state, step
    metrics.jsonl        one JSON object per logged step / evaluation

Every file is written atomically (dsmr.atomic), so an interrupted save leaves the previous version.
`model.safetensors` and `trainer_state.pt` are both written before either is renamed into place, and both
carry the step; a resume refuses a pair that disagrees.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_model as _st_save_model

from dsmr.atomic import atomic_path, atomic_write_json
from dsmr.errors import DsmrError

CONFIG_FILE = "config.json"
LATEST_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
TRAINER_STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"


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
        # Both files are written in full before either is renamed into place (the renames are
        # microseconds apart), so a crash while saving leaves the previous consistent pair.
        with atomic_path(weights) as weights_tmp, atomic_path(run_dir / TRAINER_STATE_FILE) as state_tmp:
            _write_weights(model, weights_tmp, step)
            torch.save(trainer_state, state_tmp)
    else:
        save_weights(model, weights, step=step)
    return weights


def save_weights(model: torch.nn.Module, path, step: int | None = None) -> None:
    with atomic_path(path) as tmp:
        _write_weights(model, tmp, step)


def _write_weights(model: torch.nn.Module, path, step: int | None) -> None:
    # save_model (not save_file) drops the aliases of tied tensors (embedding = output head).
    metadata = {"format": "dsmr"} if step is None else {"format": "dsmr", "step": str(step)}
    _st_save_model(model, str(path), metadata=metadata)


def weights_step(path) -> int | None:
    """The training step recorded in a weights file (None when it has none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            step = (f.metadata() or {}).get("step")
    except (SafetensorError, OSError) as err:
        raise DsmrError(f"{path}: not a readable safetensors file ({err})") from err
    return None if step is None else int(step)


def load_weights(model: torch.nn.Module, path, device="cpu") -> None:
    """Load a weights file into `model`; DsmrError naming every tensor that is missing or of another shape."""
    path = Path(path)
    if not path.is_file():
        raise DsmrError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise DsmrError(f"{path}: not a readable safetensors file ({err})") from err
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"{k}: checkpoint {saved[k]}, model {shape}" for k, shape in expected.items()
                if k in saved and saved[k] != shape]
    problems += [f"unexpected tensor {k}" for k in saved if k not in expected]
    if problems:
        raise DsmrError(f"{path} does not fit this model config: " + "; ".join(problems[:6])
                        + (f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""))
    try:
        _st_load_model(model, str(path), strict=True, device=str(device))
    except RuntimeError as err:  # a tensor missing from the file (tied aliases are handled by safetensors)
        raise DsmrError(f"{path} does not fit this model config: {err}") from err


def read_config(run_dir) -> dict:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise DsmrError(f"no {CONFIG_FILE} in {Path(run_dir)}: not a dsmr run folder")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DsmrError(f"{path}: corrupt JSON ({err})") from err
    for key in ("model", "tokenizer"):
        if key not in config:
            raise DsmrError(f"{path}: missing the {key!r} section")
    return config


def load_trainer_state(run_dir) -> dict:
    """The resumable state of a run, checked against the latest weights (same step)."""
    run_dir = Path(run_dir)
    path = run_dir / TRAINER_STATE_FILE
    if not path.is_file():
        raise DsmrError(f"no {TRAINER_STATE_FILE} in {run_dir}: nothing to resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt or foreign pickle
        raise DsmrError(f"{path}: unreadable trainer state ({err})") from err
    latest = run_dir / LATEST_FILE
    if not latest.is_file():
        raise DsmrError(f"{run_dir}: {TRAINER_STATE_FILE} without {LATEST_FILE}")
    if weights_step(latest) != state.get("step"):
        raise DsmrError(f"{run_dir}: {LATEST_FILE} (step {weights_step(latest)}) and {TRAINER_STATE_FILE} "
                        f"(step {state.get('step')}) disagree; the last save was interrupted")
    return state


def model_config_from(config: dict):
    from dsmr.model import DSMRConfig

    return DSMRConfig.from_dict(dict(config["model"]))


def resolve_weights(path, which: str = "best") -> tuple[Path, Path]:
    """(weights file, run folder) for a run folder or a .safetensors file that has config.json beside it."""
    path = Path(path)
    if which not in ("best", "latest"):
        raise DsmrError(f"which must be 'best' or 'latest', got {which!r}")
    if path.is_dir():
        order = [BEST_FILE, LATEST_FILE] if which == "best" else [LATEST_FILE]
        for name in order:
            if (path / name).is_file():
                return path / name, path
        raise DsmrError(f"no {' or '.join(order)} in {path}")
    if path.suffix == ".safetensors" and path.is_file():
        return path, path.parent
    if not path.exists():
        raise DsmrError(f"checkpoint not found: {path}")
    raise DsmrError(f"{path}: expected a run folder or a .safetensors file")


def load_model(path, device="cpu", which: str = "best"):
    """(model in eval mode, tokenizer, run config) from a run folder, an exported model folder (dsmr.hub),
    a .safetensors checkpoint, or a Hugging Face Hub repo id (owner/name, through huggingface_hub's cache).

    `which="best"` takes best.safetensors when the run has one, else the latest weights.
    """
    from dsmr.hub import resolve_model_ref
    from dsmr.model import DSMR
    from dsmr.tokenizer import tokenizer_from_config

    weights, run_dir = resolve_weights(resolve_model_ref(path), which)
    config = read_config(run_dir)
    try:
        model = DSMR(model_config_from(config))
    except TypeError as err:
        raise DsmrError(f"{run_dir / CONFIG_FILE}: invalid model config ({err})") from err
    load_weights(model, weights)
    tokenizer = tokenizer_from_config(config["tokenizer"])
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise DsmrError(f"{run_dir / CONFIG_FILE}: tokenizer vocabulary {tokenizer.vocab_size} != model "
                        f"vocab_size {model.cfg.vocab_size}")
    return model.to(device).eval(), tokenizer, config


def check_tokenizer(config: dict, tokenizer, where) -> None:
    """DsmrError when data tokenized by `tokenizer` (from `where`) is not what the run was trained on."""
    want = config.get("tokenizer_hash")
    have = tokenizer.config_hash()
    if want is not None and want != have:
        theirs = config["tokenizer"]
        raise DsmrError(
            f"{where} uses tokenizer {tokenizer.config().get('kind')} (vocab {tokenizer.vocab_size}, hash "
            f"{have[:12]}) but the checkpoint was trained with {theirs.get('kind')} (vocab "
            f"{config['model'].get('vocab_size')}, hash {want[:12]})")
