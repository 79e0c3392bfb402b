"""Exporting a training run as a model folder researchers share (dsmr.sharing.hub's format): the chosen weights in
float32 or float16, config.json with the dataset and the run's measured figures, and a model card."""

from __future__ import annotations

from pathlib import Path

from dsmr.sharing import hub
from dsmr.sharing.run_folder import resolve_weights, weights_step
from dsmr.errors import DsmrError
from dsmr.sharing.loader import load_model


def export_run(run, out, *, which: str = "best", dtype: str = "float32", license: str | None = None,
               dataset: str | None = None, evals=(), name: str | None = None) -> dict:
    """Export the model of a run folder (or of an exported folder) to `out`. `evals` are the JSON objects
    `dsmr eval --json` printed (their split and PPL go into the card). Returns a summary."""
    run = Path(run)
    if Path(out).resolve() == run.resolve():
        raise DsmrError(f"the export folder {out} is the run folder itself")
    weights, run_dir = resolve_weights(run, which)
    model = load_model(run, which=which)
    config = model.run_config
    step = weights_step(weights)
    corpus = dataset or hub.corpus_of(config)
    license = hub.license_for(corpus, license)
    figures = hub.run_figures(run_dir, config, step, evals)
    figures["parameters"] = model.num_parameters()
    figures["state_bytes_fp32"] = model.cfg.state_bytes()
    exported = {k: v for k, v in config.items() if k not in ("cache", "format", "dtype", "export", "figures")}
    exported["dataset"] = {"corpus": corpus, "license": license}
    exported["export"] = {"from": str(run_dir.name), "weights": weights.name, "step": step}
    exported["figures"] = figures
    # usage lines name the Hub repo, or the folder by its own name: never this machine's paths
    card = hub.model_card(exported, name=name or Path(out).name, dtype=dtype,
                          ref=name if name and hub.is_repo_id(name) else Path(out).resolve().name)
    hub.save_pretrained(model, out, exported, dtype=dtype, card=card, step=step)
    return {"out": str(out), "weights": str(weights), "step": step, "dtype": dtype, "license": license,
            "dataset": corpus, "bytes": (Path(out) / hub.MODEL_FILE).stat().st_size, "figures": figures}
