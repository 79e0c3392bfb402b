"""Loading a model: from a run folder, an exported folder, a .safetensors file with config.json beside it, or
a Hugging Face Hub repo id. The one loader: every command, the app, export and the benchmarks use it."""

from __future__ import annotations

from typing import Optional

import torch

from dsmr.data.tokenizers.registry import tokenizer_from_config
from dsmr.errors import DsmrError
from dsmr.model.network import DSMR
from dsmr.sharing.hub import resolve_model_ref
from dsmr.sharing import run_folder


def load_model(ref, device="cpu", *, which: str = "best", revision: Optional[str] = None, cache_dir=None,
               local_files_only: Optional[bool] = None) -> DSMR:
    """The model (eval mode, on `device`) that `ref` names, with `tokenizer` (the encoding it was trained on),
    `run_config` (config.json) and `segment_len`. `which="best"` takes best.safetensors where the run has
    one, else the latest weights; `revision`, `cache_dir`, `local_files_only` as in huggingface_hub."""
    path = resolve_model_ref(ref, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    weights, run_dir = run_folder.resolve_weights(path, which)
    config = run_folder.read_config(run_dir)
    where = run_dir / run_folder.CONFIG_FILE
    try:
        model_cfg = run_folder.model_config_from(config)
    except DsmrError as err:
        raise DsmrError(f"{where}: {err}") from err
    with torch.device("meta"):  # the shapes the config gives, before allocating what it asks for
        shapes = {k: tuple(v.shape) for k, v in DSMR(model_cfg).state_dict().items()}
    run_folder.check_weights_fit(weights, shapes)
    model = DSMR(model_cfg)
    run_folder.load_weights(model, weights)
    tokenizer = tokenizer_from_config(config["tokenizer"])
    recorded = config.get("tokenizer_hash")
    if recorded is not None and recorded != tokenizer.config_hash():  # every user of the model gets this check
        raise DsmrError(f"{where}: its tokenizer (hash {tokenizer.config_hash()[:12]}) is not the one the model was "
                        f"trained with (hash {recorded[:12]}): restore the run's original config.json, or retrain "
                        f"with this tokenizer")
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise DsmrError(f"{where}: tokenizer vocabulary {tokenizer.vocab_size} != model vocab_size "
                        f"{model.cfg.vocab_size}")
    model.tokenizer, model.run_config = tokenizer, config
    segment_len = config.get("segment_len") or (config.get("train") or {}).get("segment")
    if isinstance(segment_len, bool) or not isinstance(segment_len, int) or segment_len < 1:
        raise DsmrError(f"{where}: no segment_len (a positive integer): not a dsmr run or model folder")
    model.segment_len = segment_len
    return model.to(device).eval()
