"""The files of a run or model folder: their names, weights in safetensors (saved with their step, checked on
load: they must fit the model and be finite), config.json, which weights file a reference means, and whether a
tokenizer is the one a folder was trained with.

A run folder holds

    config.json          model config, schedule, tokenizer config + hash, train config, segment length
    model.safetensors    latest weights (metadata: step)
    best.safetensors     weights with the best validation NLL so far
    trainer_state.pt     optimizer, LR scheduler, RNG states, stream position, recurrent state, step
                         (dsmr.training.resume)
    metrics.jsonl        one JSON object per logged step / evaluation (dsmr.training.run_log)
    tb/                  TensorBoard logs, when the tensorboard package is installed

An exported model folder (dsmr.sharing.hub) holds config.json, model.safetensors and README.md. Every file is
written atomically (dsmr.core.atomic); anything damaged is a DsmrError naming the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import _remove_duplicate_names as _st_duplicate_names
from safetensors.torch import save_model as _st_save_model

from dsmr.core.atomic import atomic_path
from dsmr.errors import DsmrError

CONFIG_FILE = "config.json"
LATEST_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
TRAINER_STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
RUN_FILES = (CONFIG_FILE, LATEST_FILE, BEST_FILE, TRAINER_STATE_FILE, METRICS_FILE)
MAX_ABS_WEIGHT = 1e8


def save_weights(model: torch.nn.Module, path, step: int | None = None) -> None:
    with atomic_path(path) as tmp:
        write_weights(model, tmp, step)


def write_weights(model: torch.nn.Module, path, step: int | None) -> None:
    # the tensors save_model writes: it drops the aliases of tied tensors (embedding = output head)
    state = model.state_dict()
    for aliases in _st_duplicate_names(state).values():
        for name in aliases:
            del state[name]
    metadata = {"format": "dsmr", "sha256": weights_digest(state)}
    if step is not None:
        metadata["step"] = str(step)
    _st_save_model(model, str(path), metadata=metadata)


def weights_digest(tensors: dict) -> str:
    """SHA-256 of a weights file's tensors (names, dtypes, shapes and bytes, in name order): written into its
    metadata, checked on load, so that flipped bytes that stay finite are found too."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def weights_step(path) -> int | None:
    """The training step recorded in a weights file (None when it has none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            step = (f.metadata() or {}).get("step")
    except (SafetensorError, OSError) as err:
        raise DsmrError(f"{path}: not a readable safetensors file ({err})") from err
    if step is None:
        return None
    try:
        return int(step)
    except ValueError:
        raise DsmrError(f"{path} is damaged: its metadata step {step!r:.40} is not a number") from None


def check_finite(tensors: dict, path) -> None:
    """DsmrError naming the file and the tensor when a float tensor holds NaN, infinity, or values no
    trained network has (|x| > MAX_ABS_WEIGHT: a flipped exponent bit)."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            if not bool(torch.isfinite(t).all()):
                raise DsmrError(f"{path} is damaged: tensor {name} holds NaN or infinite values; use another "
                                f"checkpoint (best.safetensors, or resume from an earlier copy of the run)")
            top = float(t.detach().abs().max())
            if top > MAX_ABS_WEIGHT:
                raise DsmrError(f"{path} is damaged: tensor {name} holds a value of magnitude {top:.3g}, "
                                f"far beyond any trained weight; use another checkpoint")


FLOAT_DTYPES = ("F32", "F16", "BF16")  # safetensors' names of the dtypes weights may have


def check_weights_fit(path, expected: dict) -> str | None:
    """DsmrError unless every tensor of the weights file has its shape in `expected` ({name: shape}) and a
    floating-point dtype. Reads only the file's header. Returns the SHA-256 written with the file (None for
    files from before checksums)."""
    path = Path(path)
    if not path.is_file():
        raise DsmrError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            saved = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
            digest = (f.metadata() or {}).get("sha256")
    except (SafetensorError, OSError) as err:
        raise DsmrError(f"{path}: not a readable safetensors file ({err})") from err
    problems = [f"{k}: file {saved[k][0]}, config {shape}" for k, shape in expected.items()
                if k in saved and saved[k][0] != shape]
    problems += [f"tensor {k} is {dtype}, not floating point" for k, (_, dtype) in saved.items()
                 if dtype not in FLOAT_DTYPES]
    problems += [f"unexpected tensor {k}" for k in saved if k not in expected]
    if problems:
        raise DsmrError(f"{path} does not fit its config.json: " + "; ".join(problems[:6])
                        + (f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""))
    return digest


def load_weights(model: torch.nn.Module, path, device="cpu") -> None:
    """Load a weights file into `model`; DsmrError naming every tensor that is missing, of another shape or
    not floating point, and for damaged values or a failed checksum."""
    path = Path(path)
    digest = check_weights_fit(path, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    try:
        _st_load_model(model, str(path), strict=True, device=str(device))
    except RuntimeError as err:  # a tensor missing from the file (tied aliases are handled by safetensors)
        raise DsmrError(f"{path} does not fit this model config: {err}") from err
    except (SafetensorError, OSError, ValueError) as err:  # a truncated or damaged data section
        raise DsmrError(f"{path} is damaged: {err}") from err
    check_finite(model.state_dict(), path)
    if digest is not None:  # last: NaN or huge values get their own, plainer message above
        with safe_open(str(path), framework="pt") as f:
            if weights_digest({k: f.get_tensor(k) for k in f.keys()}) != digest:
                raise DsmrError(f"{path} is damaged: its tensors do not match the checksum written with them "
                                f"(flipped bytes?); use another checkpoint (best.safetensors, or resume the run)")


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


def first_line(err: Exception) -> str:
    """An exception's first line, without torch's advice to unpickle an untrusted file."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "weights_only" in str(err) or "Weights only load failed" in text:
        return "it holds objects other than tensors and plain values, which dsmr does not load"
    return f"{type(err).__name__}: {text[:200]}"


def model_config_from(config: dict):
    from dsmr.model.config import DSMRConfig

    model = config["model"]
    return DSMRConfig.from_dict(dict(model) if isinstance(model, dict) else model)


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
