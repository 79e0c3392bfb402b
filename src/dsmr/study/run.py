"""Running a study: each variant trained (in a fresh process by default), evaluated over the whole
validation and test splits, and its result written; finished variants are never trained again."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dsmr import __version__
from dsmr.core.atomic import atomic_write_json
from dsmr.errors import DsmrError
from dsmr.study.variants import (RESULTS_DIR, RUNS_DIR, STUDY_FILE, StudyConfig, comparable, fmt, read_json, say,
                                 default_variants, result_name, select_variants,
                                 train_config)
from dsmr.study.report import collect_results, write_report


def environment(device: str = "cpu") -> dict:
    """What the figures were measured on: enough to reproduce (and to judge) them."""
    import torch

    from dsmr.core.runtime import resolve_device

    resolved = resolve_device(device)
    env = {
        "dsmr": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device": str(resolved),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": git_commit(),
    }
    if resolved.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(resolved)
    return env


def git_commit() -> str | None:
    """The commit of the dsmr checkout this code runs from (with '+dirty' for local changes), if any."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_variant(spec: dict) -> dict:
    """Train and evaluate one variant (spec: see `_variant_spec`) and write its result file.

    Runs in the worker process (or in-process with fresh_process=False)."""
    import torch

    from dsmr.data.cache import TokenCache
    from dsmr.sharing.run_folder import TRAINER_STATE_FILE
    from dsmr.training.trainer import train
    from dsmr.training.config import TrainConfig, make_model_config, make_run_schedule

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    train_cfg = TrainConfig.from_dict(spec["train"])
    run_dir = Path(spec["run_dir"])
    resume = (run_dir / TRAINER_STATE_FILE).is_file()
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # a run that died before its first checkpoint: nothing to resume
    started = time.time()
    result = train(train_cfg, TokenCache(spec["cache"]), run_dir, progress=spec.get("progress", True),
                   resume=resume)
    if result["interrupted"]:
        raise KeyboardInterrupt
    schedule = make_run_schedule(train_cfg)
    final = _final_evaluation(spec, train_cfg, run_dir) if spec["study"].get("test") else {}
    record = {
        "variant": spec["variant"], "description": spec["description"], "seed": train_cfg.seed,
        "schedule": schedule.name, "horizons": list(schedule.horizons), "budget": schedule.budget,
        "baseline": train_cfg.baseline, "context": train_cfg.segment_len if train_cfg.baseline else None,
        "gate": train_cfg.gate,
        "val_ppl": result["ppl"], "val_nll": result["nll"], "val_tokens": result["tokens"],
        "val_pieces": result["pieces"], "best_val_nll": result["best_val_nll"],
        "val_nll_by_position": result["nll_by_position"],
        "train_loss": result["train_loss"], "train_tokens_per_s": result["train_tokens_per_s"],
        "train_peak_memory_bytes": result["train_peak_memory_bytes"],
        "train_memory_method": result["train_memory_method"],
        "state_bytes": make_model_config(train_cfg, 1).state_bytes(1, 4), **final,
        "train_state_bytes": result["train_state_bytes"],
        "steps": result["steps"], "seconds": time.time() - started, "resumed": resume,
        **_curves(run_dir / "metrics.jsonl"),
        "train_config": train_cfg.to_dict(), "study_config": spec["study"],
        "cache": spec["cache"], "run_dir": str(run_dir), "command": spec.get("command"),
        "environment": environment(train_cfg.device),
    }
    atomic_write_json(spec["result_path"], record)
    return record


def _final_evaluation(spec: dict, train_cfg, run_dir: Path) -> dict:
    """The final model over the whole validation split (when training validated on a subset) and the whole
    test split: val_all_* and test_* fields of the result."""
    from dsmr.data.cache import TokenCache
    from dsmr.sharing.loader import load_model
    from dsmr.evaluation.perplexity import evaluate
    from dsmr.core.runtime import resolve_device

    cache = TokenCache(spec["cache"])
    model = load_model(run_dir, device=str(resolve_device(train_cfg.device)), which="latest")
    tokenizer = model.tokenizer
    splits = (["validation"] if train_cfg.val_pieces else []) + ["test"]
    fields = {}
    for split in splits:
        if split not in cache.splits or not cache.num_pieces(split):
            continue
        pieces = cache.pieces(split)
        report = evaluate(model, pieces, train_cfg.eval_batch_size or train_cfg.batch_size,
                          model.segment_len, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id,
                          eos_id=tokenizer.eos_id, notes=tokenizer.count_notes(pieces),
                          progress=spec.get("progress", False))
        prefix = "test" if split == "test" else "val_all"
        fields.update({f"{prefix}_ppl": report["ppl"], f"{prefix}_nll": report["nll"],
                       f"{prefix}_notes": report["notes"], f"{prefix}_nll_per_note": report["nll_per_note"],
                       f"{prefix}_tokens": report["tokens"], f"{prefix}_pieces": report["pieces"],
                       f"{prefix}_nll_by_position": report["nll_by_position"]})
    return fields


def _curves(metrics_path: Path) -> dict:
    """Validation PPL, training loss and gate values over steps, from a run's metrics.jsonl."""
    val, loss, gates = [], [], []
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if "val_ppl" in r:
                val.append({"step": r["step"], "val_ppl": r["val_ppl"], "val_nll": r["val_nll"]})
            if "loss" in r:
                loss.append({"step": r["step"], "loss": r["loss"]})
            if r.get("gates") is not None:
                gates.append({"step": r["step"], "gates": r["gates"]})
    return {"val_curve": val, "loss_curve": loss, "gate_curve": gates}


def run_study(cache, out_dir, cfg: StudyConfig | None = None, variants: list[str] | None = None,
              fresh_process: bool = True, progress: bool = True, command: str | None = None) -> list[dict]:
    """Train (or reuse) every selected variant into `out_dir`, then write the tables and figures.

    Returns the result records of the selected variants. A variant with a result file from the same
    options is reused; one trained with other options is refused (DsmrError): use another folder.
    """
    from dsmr.data.cache import TokenCache

    cfg = cfg or StudyConfig()
    cfg.validate()
    out_dir = Path(out_dir)
    cache = TokenCache(cache)
    cache_path = cache.path
    if cfg.epochs:
        cfg = dataclasses.replace(cfg, steps=epoch_steps(cache, cfg))
    selected = select_variants(cfg, variants)
    _write_study_file(out_dir, cfg, command, cache_path)
    records = []
    for i, variant in enumerate(selected, 1):
        train_cfg = train_config(cfg, variant)
        name = result_name(variant.name, cfg.seed)
        result_path = out_dir / RESULTS_DIR / f"{name}.json"
        done = _finished(result_path, train_cfg.to_dict())
        if done is not None:
            say(progress, f"study: [{i}/{len(selected)}] {variant.name}: finished before (val ppl "
                           f"{fmt(done['val_ppl'])}), not trained again")
            records.append(done)
            continue
        say(progress, f"study: [{i}/{len(selected)}] {variant.name}: {variant.description}; training "
                       f"{cfg.steps} steps")
        spec = {"variant": variant.name, "description": variant.description, "train": train_cfg.to_dict(),
                "study": cfg.to_dict(), "cache": str(cache_path), "run_dir": str(out_dir / RUNS_DIR / name),
                "result_path": str(result_path), "threads": cfg.threads, "progress": progress,
                "command": command}
        started = time.time()
        record = _run_in_process(spec) if fresh_process else run_variant(spec)
        say(progress, f"study: [{i}/{len(selected)}] {variant.name}: val ppl {fmt(record['val_ppl'])}, "
                       f"{fmt(record['train_tokens_per_s'], '.0f')} train tokens/s, "
                       f"{time.time() - started:.0f} s")
        records.append(record)
    write_report(out_dir, collect_results([out_dir]), command=command)
    return records


def epoch_steps(cache, cfg: StudyConfig) -> int:
    """Optimizer steps of `cfg.epochs` passes over the training split: the full batches of the refilling
    full-piece lanes every variant reads: `dsmr train --epochs`'s count for the same lanes and seed."""
    from dsmr.training.inputs import training_stream
    from dsmr.training.config import TrainConfig

    lanes = TrainConfig(batch_size=cfg.batch_size, segment=cfg.segment, seed=cfg.seed)
    return training_stream(lanes, cache.pieces("train"), cache.tokenizer).steps_for_epochs(cfg.epochs)


def _run_in_process(spec: dict) -> dict:
    """Run one variant in a fresh Python process (a clean peak-RSS meter); its progress goes to stderr."""
    path = Path(spec["result_path"])
    spec_path = path.with_suffix(".spec.json")
    atomic_write_json(spec_path, spec)
    try:
        proc = subprocess.run([sys.executable, "-m", "dsmr.study", str(spec_path)], stdout=sys.stderr)
    finally:
        spec_path.unlink(missing_ok=True)
    if proc.returncode == 130:
        raise KeyboardInterrupt
    if proc.returncode or not path.is_file():
        raise DsmrError(f"study variant {spec['variant']} failed (exit status {proc.returncode}); its run "
                        f"folder is {spec['run_dir']} (run the study again to resume it)")
    return json.loads(path.read_text())


def _finished(result_path: Path, train_cfg: dict) -> dict | None:
    if not result_path.is_file():
        return None
    record = read_json(result_path)
    if record.get("train_config") != train_cfg:
        diffs = [f"{k}: {record.get('train_config', {}).get(k)!r} then, {v!r} now"
                 for k, v in train_cfg.items() if record.get("train_config", {}).get(k) != v]
        raise DsmrError(f"{result_path} was trained with other options ({'; '.join(diffs)}); "
                        "give the study another --out")
    return record


def _write_study_file(out_dir: Path, cfg: StudyConfig, command: str | None, cache_path: Path) -> None:
    path = out_dir / STUDY_FILE
    study = {"config": cfg.to_dict(), "cache": str(cache_path), "command": command,
             "variants": [dataclasses.asdict(v) for v in default_variants(cfg)]}
    if path.is_file():
        # options that change what is trained would mix incomparable results in one table
        old, now = comparable(read_json(path).get("config", {})), comparable(cfg.to_dict())
        if old != now:
            diffs = [f"{k}: {old.get(k)!r} then, {now.get(k)!r} now" for k in now if old.get(k) != now.get(k)]
            raise DsmrError(f"the study in {out_dir} used other options ({'; '.join(diffs)}); give another --out")
    atomic_write_json(path, study)



def main(argv: list[str] | None = None) -> int:
    """Worker entry point: `python -m dsmr.study SPEC.json` trains one variant (see _run_in_process)."""
    argv = sys.argv[1:] if argv is None else argv
    spec = read_json(Path(argv[0]))
    try:
        run_variant(spec)
    except KeyboardInterrupt:
        return 130
    except DsmrError as err:
        print(f"dsmr study: error: {err}", file=sys.stderr)
        return 2
    return 0
