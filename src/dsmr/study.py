"""The schedule study: how should recurrent memory be spread across depth?

Trains a set of variants (memory schedules, learned gates, the full-attention excerpt baseline) with the
same model size, data order, seed and number of steps, evaluates each over full validation pieces, and
writes the comparison: results.csv, results.md and matplotlib figures.

A study folder holds:

    study.json               the shared options (StudyConfig), the variants and the command
    runs/NAME/               each variant's run folder (dsmr.train; resumable)
    results/NAME-seedS.json  each finished variant: its horizons, validation and training figures, its
                             curves (validation PPL, loss, gates over steps) and the environment it ran in
    results.csv, results.md, figures/*.png

A variant with a result file is finished and never trained again; an interrupted one resumes from its last
checkpoint. Each variant trains in a fresh Python process by default, because the CPU peak-memory meter
is the rise of the process's peak RSS (dsmr.evaluate.PeakMemory), which memory kept from an earlier
variant would hide. `variants` may name a subset, so a study can be spread over processes or machines and
put together with `merge_studies`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

from dsmr import __version__
from dsmr.atomic import atomic_path, atomic_write_json, atomic_write_text
from dsmr.configs import dataclass_from_dict
from dsmr.errors import DsmrError
from dsmr.model_config import MEMORIES, fan_in_std, recipe_default
from dsmr.options import option, out_of_bounds, wrong_types
from dsmr.train_config import TrainConfig

STUDY_FILE = "study.json"
RESULTS_DIR = "results"
RUNS_DIR = "runs"
FIGURES_DIR = "figures"
REFERENCE = "full"
BASELINE = "excerpt"


# The study options of `dsmr study`, in the order its help lists them.
SHARED_OPTIONS = ("layers", "d_model", "heads", "head_dim", "tie_embeddings", "init_std", "memory", "curriculum",
                  "test", "segment", "batch_size", "horizon", "budget", "long_layers", "short", "context", "gate_init",
                  "gate_lambda", "steps", "epochs", "lr", "eval_every", "val_pieces", "eval_batch_size", "seed")


@dataclass
class StudyConfig:
    """Options every variant shares. The model's recipe (output head, initial std, memory) defaults to
    DSMRConfig's, like `dsmr train`; PRESETS name other option sets (the first study's old recipe)."""

    BOUNDS: ClassVar[dict] = {name: TrainConfig.BOUNDS[name] for name in (
        "layers", "d_model", "heads", "head_dim", "init_std", "segment", "batch_size", "horizon", "budget",
        "long_layers", "short", "context", "gate_init", "gate_lambda", "steps", "epochs", "lr", "eval_every",
        "val_pieces", "eval_batch_size", "seed")} | {"curriculum": (1e-6, 1.0)}

    # model
    layers: int = option(4, "decoder blocks")
    d_model: int = option(128, "model width")
    heads: int = option(4, "attention heads")
    head_dim: int | None = option(None, "width of each head", default_text="d-model / heads")
    tie_embeddings: bool = option(recipe_default("tie_embeddings"), "output head tied to the token embedding",
                                  negative="--no-tie-embeddings", negative_help="a separate output head (the default)")
    init_std: float | None = option(recipe_default("init_std"), "std of the initial weights",
                                    default_text="1 / sqrt(d-model)")
    memory: str = option(recipe_default("memory"), "what the memory holds in training (see dsmr train --help)",
                         choices=MEMORIES)
    # data: every variant reads the same lanes of whole pieces in the same order (same seed)
    segment: int = option(128, "tokens per segment")
    batch_size: int = option(8, "lanes")
    # memory: `full` gives every layer `horizon`; the budgeted variants share `budget` KV positions
    horizon: int = option(512, "every layer's horizon in `full` and the gated variants")
    budget: int = option(1152, "KV positions of the budgeted variants")  # two-scale: 2 x 512 + 2 x 64
    long_layers: int = option(2, "two-scale: layers with the long horizon")
    short: int = option(64, "two-scale: the short horizon")
    context: int | None = option(None, "excerpt baseline length", default_text="--horizon, the reach of `full`")
    # learned gates (gate-soft, gate-ste on the full schedule)
    # sigmoid(1) = 0.73: close enough to 0.5 for a short run to cross it
    gate_init: float = option(1.0, "initial gate logit")
    gate_lambda: float = option(0.01, "gate budget penalty weight")
    curriculum: float = option(0.5, "the *-curriculum variants grow their horizons from 0 over this fraction of "
                                    "the steps")
    # optimization and evaluation
    steps: int = option(6000, "optimizer steps per variant")
    epochs: int | None = option(None, "instead of --steps: the steps of this many passes of the lanes over every "
                                      "training piece (the same for every variant)")
    lr: float = option(1e-3, "peak learning rate")
    eval_every: int = option(500, "steps between validations, for the curves")
    # the first N validation pieces, each in full (None here, 0 on the command line: all)
    val_pieces: int | None = option(6, "validate on the first N validation pieces, each in full",
                                    default_text="6; 0 = all")
    eval_batch_size: int | None = option(None, "lanes for validation", default_text="--batch-size")
    test: bool = option(False, "also evaluate every final model over the whole validation and test splits "
                               "(in the tables)")
    seed: int = option(0, "seed for initialization and data order")
    # runtime: the command line spells these as every command does (dsmr.cli.common)
    device: str = "auto"            # what `--device` says: cuda where there is one, else cpu
    threads: int | None = 1          # torch CPU threads per variant (1 is fastest for small models; None: torch's)

    def validate(self) -> None:
        problems = wrong_types(self)
        if problems:
            raise DsmrError("study config: " + "; ".join(problems))
        for name in ("layers", "d_model", "heads", "segment", "batch_size", "horizon", "long_layers", "steps",
                     "epochs", "context", "val_pieces", "eval_batch_size", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            problems.append(f"budget must be a positive integer, got {self.budget!r}")
        if not 0 < self.curriculum <= 1:
            problems.append(f"curriculum must be a fraction in (0, 1], got {self.curriculum}")
        if self.layers < 2:
            problems.append("the study compares lower and upper layers: it needs at least 2 layers")
        # the ranges (lr, gate options, init std, seed; NaN and infinities included), where not reported above
        reported = {p.split()[0] for p in problems}
        problems += [p for p in out_of_bounds(self) if p.split()[0] not in reported]
        if problems:
            raise DsmrError("study config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StudyConfig":
        return dataclass_from_dict(cls, d, "study config")

    @property
    def excerpt_context(self) -> int:
        return self.context or self.horizon

    @property
    def resolved_init_std(self) -> float:
        return self.init_std if self.init_std is not None else fan_in_std(self.d_model)


# Named option sets of `dsmr study --preset NAME` (options given on the command line override them).
PRESETS = {
    # The first study (docs/study/first-study): GPT-2's tied head and init std 0.02, key/value memory, 800 steps.
    "first-study": {"tie_embeddings": True, "init_std": 0.02, "memory": "kv", "steps": 800, "eval_every": 200},
}


def preset_config(name: str, **options) -> StudyConfig:
    """StudyConfig of the preset `name`, with `options` on top."""
    if name not in PRESETS:
        raise DsmrError(f"unknown study preset {name!r}; expected one of {', '.join(PRESETS)}")
    return StudyConfig(**{**PRESETS[name], **options})


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    options: dict = field(default_factory=dict)   # TrainConfig fields on top of the shared ones


def default_variants(cfg: StudyConfig) -> list[Variant]:
    """The variants of the study, `full` (the reference) first and the excerpt baseline last."""
    from dsmr.schedule import make_schedule

    L = cfg.layers
    two_scale = make_schedule("two-scale", L, budget=cfg.budget, long_layers=cfg.long_layers, short=cfg.short)
    lower, upper = list(range(L // 2)), list(range(L // 2, L))
    full = {"schedule": "full", "horizon": cfg.horizon}
    warmup = max(1, round(cfg.curriculum * cfg.steps))
    # Same tokens per step as the streaming variants: `batch_size * segment` targets.
    excerpt_batch = max(1, cfg.batch_size * cfg.segment // cfg.excerpt_context)
    return [
        Variant("full", f"every layer {cfg.horizon} (reference)", full),
        Variant("uniform", f"budget {cfg.budget} spread evenly", {"schedule": "uniform", "budget": cfg.budget}),
        Variant("two-scale", f"lowest {cfg.long_layers} layers long, the others {cfg.short}",
                {"schedule": "two-scale", "budget": cfg.budget, "long_layers": cfg.long_layers,
                 "short": cfg.short}),
        Variant("two-scale-inverse", "two-scale upside down: long memory in the upper layers",
                {"schedule": "explicit", "horizons": list(reversed(two_scale.horizons))}),
        Variant("binary-lower", f"budget {cfg.budget} shared by layers {_span(lower)}, the others 0",
                {"schedule": "binary", "budget": cfg.budget, "binary_layers": lower}),
        Variant("binary-upper", f"budget {cfg.budget} shared by layers {_span(upper)}, the others 0",
                {"schedule": "binary", "budget": cfg.budget, "binary_layers": upper}),
        Variant("none", "no memory: each segment alone", {"schedule": "none"}),
        Variant("full-curriculum", f"full, every horizon grown from 0 over the first {cfg.curriculum:.0%} of the steps",
                dict(full, horizon_warmup=warmup)),
        Variant("two-scale-curriculum", f"two-scale, horizons grown from 0 over the first {cfg.curriculum:.0%} "
                                        "of the steps",
                {"schedule": "two-scale", "budget": cfg.budget, "long_layers": cfg.long_layers,
                 "short": cfg.short, "horizon_warmup": warmup}),
        Variant("gate-soft", "full schedule with learned soft gates per layer",
                dict(full, gate="soft", gate_init=cfg.gate_init, gate_lambda=cfg.gate_lambda)),
        Variant("gate-ste", "full schedule with straight-through (hard) gates per layer",
                dict(full, gate="ste", gate_init=cfg.gate_init, gate_lambda=cfg.gate_lambda)),
        Variant(BASELINE, f"no memory, full attention over excerpts of {cfg.excerpt_context} tokens "
                          f"({excerpt_batch} per batch: the same tokens per step)",
                {"baseline": "excerpt", "context": cfg.excerpt_context, "batch_size": excerpt_batch}),
    ]


def _span(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def select_variants(cfg: StudyConfig, names: list[str] | None) -> list[Variant]:
    variants = default_variants(cfg)
    if not names:
        return variants
    by_name = {v.name: v for v in variants}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise DsmrError(f"unknown study variants {unknown}; expected some of {', '.join(by_name)}")
    return [by_name[n] for n in dict.fromkeys(names)]


def train_config(cfg: StudyConfig, variant: Variant):
    """The TrainConfig of `variant`: the shared options, then the variant's own."""
    from dsmr.train import TrainConfig

    base = dict(layers=cfg.layers, d_model=cfg.d_model, heads=cfg.heads, head_dim=cfg.head_dim,
                tie_embeddings=cfg.tie_embeddings, init_std=cfg.resolved_init_std, memory=cfg.memory, segment=cfg.segment,
                batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr, eval_every=cfg.eval_every,
                val_pieces=cfg.val_pieces, eval_batch_size=cfg.eval_batch_size or cfg.batch_size,
                seed=cfg.seed, device=cfg.device, tensorboard=False, log_every=10)
    options = dict(base, **variant.options)
    if options.get("baseline"):
        options["memory"] = "kv"  # the excerpt baseline has no memory to represent
    train_cfg = TrainConfig(**options)
    train_cfg.validate()
    return train_cfg


def result_name(variant: str, seed: int) -> str:
    return f"{variant}-seed{seed}"


# --- running -------------------------------------------------------------------------------------------------

def environment(device: str = "cpu") -> dict:
    """What the figures were measured on: enough to reproduce (and to judge) them."""
    import torch

    from dsmr.evaluate import resolve_device

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

    from dsmr.cache import TokenCache
    from dsmr.checkpoint import TRAINER_STATE_FILE
    from dsmr.train import TrainConfig, make_model_config, make_run_schedule, train

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
    from dsmr.cache import TokenCache
    from dsmr.model import load_model
    from dsmr.evaluate import evaluate, resolve_device

    cache = TokenCache(spec["cache"])
    model = load_model(run_dir, device=str(resolve_device(train_cfg.device)), which="latest")
    tokenizer, config = model.tokenizer, model.run_config
    splits = (["validation"] if train_cfg.val_pieces else []) + ["test"]
    fields = {}
    for split in splits:
        if split not in cache.splits or not cache.num_pieces(split):
            continue
        report = evaluate(model, cache.pieces(split), train_cfg.eval_batch_size or train_cfg.batch_size,
                          model.segment_len, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id,
                          eos_id=tokenizer.eos_id, progress=spec.get("progress", False))
        prefix = "test" if split == "test" else "val_all"
        fields.update({f"{prefix}_ppl": report["ppl"], f"{prefix}_nll": report["nll"],
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
    from dsmr.cache import TokenCache

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
            _say(progress, f"study: [{i}/{len(selected)}] {variant.name}: finished before (val ppl "
                           f"{_fmt(done['val_ppl'])}), not trained again")
            records.append(done)
            continue
        _say(progress, f"study: [{i}/{len(selected)}] {variant.name}: {variant.description}; training "
                       f"{cfg.steps} steps")
        spec = {"variant": variant.name, "description": variant.description, "train": train_cfg.to_dict(),
                "study": cfg.to_dict(), "cache": str(cache_path), "run_dir": str(out_dir / RUNS_DIR / name),
                "result_path": str(result_path), "threads": cfg.threads, "progress": progress,
                "command": command}
        started = time.time()
        record = _run_in_process(spec) if fresh_process else run_variant(spec)
        _say(progress, f"study: [{i}/{len(selected)}] {variant.name}: val ppl {_fmt(record['val_ppl'])}, "
                       f"{_fmt(record['train_tokens_per_s'], '.0f')} train tokens/s, "
                       f"{time.time() - started:.0f} s")
        records.append(record)
    write_report(out_dir, collect_results([out_dir]), command=command)
    return records


def epoch_steps(cache, cfg: StudyConfig) -> int:
    """Optimizer steps of `cfg.epochs` passes over the training split: the full batches of the refilling
    full-piece lanes every variant reads: `dsmr train --epochs`'s count for the same lanes and seed."""
    from dsmr.train import TrainConfig, training_stream

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
    record = _read_json(result_path)
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
        old, now = _comparable(_read_json(path).get("config", {})), _comparable(cfg.to_dict())
        if old != now:
            diffs = [f"{k}: {old.get(k)!r} then, {now.get(k)!r} now" for k in now if old.get(k) != now.get(k)]
            raise DsmrError(f"the study in {out_dir} used other options ({'; '.join(diffs)}); give another --out")
    atomic_write_json(path, study)


def _comparable(config: dict) -> dict:
    """The options that decide what a study trains: not the seed, threads or device; the defaults for options
    a study file from older code lacks; not the steps of `--epochs` (an epoch's steps depend on the seed's
    piece order)."""
    config = {**_OLD_STUDY_DEFAULTS, **config}
    if config.get("init_std") is None:  # the default, 1 / sqrt(d_model), spelled out or not
        config["init_std"] = fan_in_std(config["d_model"])
    ignored = {"seed", "threads", "device"} | ({"steps"} if config.get("epochs") else set())
    return {k: v for k, v in config.items() if k not in ignored}


# What a study.json written before an option existed (or before its default changed) was run with.
_OLD_STUDY_DEFAULTS = {**StudyConfig(**PRESETS["first-study"]).to_dict(), "head_dim": None, "curriculum": 0.5,
                       "epochs": None, "test": False}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise DsmrError(f"cannot read {path}: {err}") from err


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


# --- merging and reporting -----------------------------------------------------------------------------------

def collect_results(study_dirs) -> list[dict]:
    """Every result record in the study folders, in the order of the default variants, then by seed.

    DsmrError when a folder has no results, when one variant and seed is in two folders, or when the
    folders used different model or memory options."""
    records: dict[tuple[str, int], dict] = {}
    where: dict[tuple[str, int], Path] = {}
    configs: dict[Path, dict] = {}
    for folder in map(Path, study_dirs):
        results = sorted((folder / RESULTS_DIR).glob("*.json"))
        results = [p for p in results if not p.name.endswith(".spec.json")]
        if not results:
            raise DsmrError(f"{folder} holds no study results ({folder / RESULTS_DIR}/*.json)")
        for path in results:
            record = _read_json(path)
            if "variant" not in record or "seed" not in record:
                raise DsmrError(f"{path} is not a study result (no variant/seed)")
            key = (record["variant"], record["seed"])
            if key in records and where[key] != path:
                raise DsmrError(f"variant {key[0]} seed {key[1]} is in both {where[key]} and {path}")
            records[key], where[key] = record, path
            configs.setdefault(folder, record.get("study_config") or {})
    shared = [_comparable(c) for c in configs.values()]
    if any(c != shared[0] for c in shared[1:]):
        folders = ", ".join(map(str, configs))
        raise DsmrError(f"the studies {folders} used different model, memory or training options: "
                        "their results are not comparable")
    order = {name: i for i, name in enumerate(v.name for v in default_variants(StudyConfig()))}
    return sorted(records.values(), key=lambda r: (order.get(r["variant"], len(order)), r["variant"], r["seed"]))


def study_status(study_dirs, recent: int = 20) -> list[dict]:
    """Where every started variant of the study folders stands, while a long study runs or after it was
    stopped: finished (the result's figures), or unfinished (the last logged step, the validation curve so
    far, whether a checkpoint exists to resume from, and the training time left at the speed of the last
    `recent` logged intervals; validations not counted)."""
    rows = []
    for folder in map(Path, study_dirs):
        results, runs = folder / RESULTS_DIR, folder / RUNS_DIR
        if not (folder / STUDY_FILE).is_file() and not results.is_dir():
            raise DsmrError(f"{folder} is not a study folder (no {STUDY_FILE}, no {RESULTS_DIR}/)")
        # a variant's spec exists while its process runs; a stopped one leaves its run folder
        names = {p.name.removesuffix(".spec.json").removesuffix(".json") for p in results.glob("*.json")}
        names |= {p.name for p in runs.glob("*-seed*") if p.is_dir()}
        for name in sorted(names):
            if (results / f"{name}.json").is_file():
                result = _read_json(results / f"{name}.json")
                rows.append({"study": str(folder), "variant": result["variant"], "seed": result["seed"],
                             "state": "finished", "step": result["steps"], "steps": result["steps"],
                             "val_ppl": result["val_ppl"], "test_ppl": result.get("test_ppl"),
                             "val_curve": result.get("val_curve", []),
                             "train_tokens_per_s": result["train_tokens_per_s"], "hours_left": 0.0})
                continue
            variant, seed = name.rsplit("-seed", 1)
            rows.append({"study": str(folder), "variant": variant, "seed": int(seed),
                         **_progress(runs / name, _planned_steps(results / f"{name}.spec.json", runs / name),
                                     recent)})
    return rows


def _planned_steps(spec_path: Path, run_dir: Path) -> int | None:
    """The steps a variant trains for: from its spec while it runs, else from its run's config.json."""
    for path in (spec_path, run_dir / "config.json"):  # both keep the TrainConfig under "train"
        if path.is_file():
            return _read_json(path).get("train", {}).get("steps")
    return None


def _progress(run_dir: Path, steps: int | None, recent: int) -> dict:
    """An unfinished run's last step, validation curve, speed and training time left, from metrics.jsonl."""
    from dsmr.checkpoint import TRAINER_STATE_FILE

    records = []
    metrics = run_dir / "metrics.jsonl"
    for line in metrics.read_text(errors="replace").splitlines() if metrics.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a damaged line (training drops it too when it resumes)
    train = [r for r in records if r.get("tokens_per_s")]
    span = seconds = tokens = 0
    for prev, r in list(zip([{"step": 0}] + train, train))[-recent:]:
        # the first record after a resume counts from the checkpoint's step, not from the record before it
        span += r.get("interval_steps", r["step"] - prev["step"])
        seconds += r["tokens"] / r["tokens_per_s"]
        tokens += r["tokens"]
    step = records[-1]["step"] if records else 0
    val = [{"step": r["step"], "val_ppl": r["val_ppl"]} for r in records if "val_ppl" in r]
    return {"state": "unfinished", "step": step, "steps": steps, "val_curve": val,
            "val_ppl": val[-1]["val_ppl"] if val else None, "test_ppl": None,
            "resumable": (run_dir / TRAINER_STATE_FILE).is_file(),
            "train_tokens_per_s": tokens / seconds if seconds else None,
            "hours_left": (steps - step) * seconds / span / 3600 if span and steps else None}


def merge_studies(out_dir, study_dirs, command: str | None = None) -> list[dict]:
    """Put the results of several study folders (e.g. one per variant or per seed) into `out_dir`."""
    out_dir = Path(out_dir)
    records = collect_results(study_dirs)
    atomic_write_json(out_dir / STUDY_FILE, {"config": records[0].get("study_config"), "command": command,
                                             "merged_from": [str(d) for d in study_dirs]})
    for record in records:
        target = out_dir / RESULTS_DIR / f"{result_name(record['variant'], record['seed'])}.json"
        atomic_write_json(target, record)
    write_report(out_dir, records, command=command, sources=[str(d) for d in study_dirs])
    return records


def summarize(records: list[dict]) -> list[dict]:
    """One row per variant: the mean over seeds of each figure, the per-seed PPLs, ratios against `full`."""
    rows: dict[str, dict] = {}
    for r in records:
        rows.setdefault(r["variant"], {"variant": r["variant"], "runs": []})["runs"].append(r)
    out = []
    for row in rows.values():
        runs = row["runs"]
        first = runs[0]
        out.append({
            "variant": row["variant"], "description": first["description"], "horizons": first["horizons"],
            "budget": first["budget"], "context": first.get("context"), "seeds": [r["seed"] for r in runs],
            "val_ppl": _mean(r["val_ppl"] for r in runs), "val_ppl_runs": [r["val_ppl"] for r in runs],
            "val_ppl_spread": _spread([r["val_ppl"] for r in runs]),
            "val_all_ppl": _mean(r.get("val_all_ppl") for r in runs),
            "test_ppl": _mean(r.get("test_ppl") for r in runs),
            "train_tokens_per_s": _mean(r["train_tokens_per_s"] for r in runs),
            "train_peak_memory_bytes": _mean(r["train_peak_memory_bytes"] for r in runs),
            "state_bytes": first["state_bytes"],
        })
    ref = next((r for r in out if r["variant"] == REFERENCE), None)
    for row in out:
        for key in ("val_ppl", "train_tokens_per_s", "train_peak_memory_bytes", "state_bytes"):
            row[f"{key}_vs_full"] = _ratio(row[key], ref[key]) if ref else None
    return out


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _spread(values) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) - min(values) if len(values) > 1 else None


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


CSV_FIELDS = ("variant", "seed", "horizons", "budget", "context", "val_ppl", "val_nll", "val_tokens", "val_pieces",
              "val_all_ppl", "val_all_nll", "val_all_tokens", "val_all_pieces",
              "test_ppl", "test_nll", "test_tokens", "test_pieces",
              "train_tokens_per_s", "train_peak_memory_bytes", "state_bytes", "val_ppl_vs_full",
              "train_tokens_per_s_vs_full", "train_peak_memory_bytes_vs_full", "state_bytes_vs_full", "steps",
              "train_loss", "seconds", "device")


def results_csv(records: list[dict]) -> str:
    """One row per variant and seed; ratios against `full` of the same seed (or of the lowest seed that
    has one, for a seed run without `full`)."""
    import csv
    import io

    refs = {r["seed"]: r for r in records if r["variant"] == REFERENCE}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in records:
        ref = refs.get(r["seed"]) or (refs[min(refs)] if refs else None)
        row = {k: r.get(k) for k in CSV_FIELDS}
        row["horizons"] = " ".join(map(str, r["horizons"]))
        row["device"] = r.get("environment", {}).get("device")
        for key in ("val_ppl", "train_tokens_per_s", "train_peak_memory_bytes", "state_bytes"):
            row[f"{key}_vs_full"] = _ratio(r.get(key), ref.get(key)) if ref else None
        writer.writerow(row)
    return buf.getvalue()


def results_markdown(records: list[dict], command: str | None = None, sources=None) -> str:
    rows = summarize(records)
    seeds = sorted({r["seed"] for r in records})
    first = records[0]
    cfg = first.get("study_config", {})
    env = first.get("environment", {})
    mib = 1024 * 1024
    lines = ["# Schedule study: results", ""]
    lines += [f"{len(rows)} variants, seeds {', '.join(map(str, seeds))}. Model: {cfg.get('layers')} layers, "
              f"d_model {cfg.get('d_model')}, {cfg.get('heads')} heads"
              + (f" of dim {cfg['head_dim']}" if cfg.get("head_dim") else "")
              + (", untied output head" if cfg.get("tie_embeddings") is False else "")
              + (f", {cfg['memory']} memory" if cfg.get("memory", "kv") != "kv" else "")
              + f"; segment {cfg.get('segment')}, "
              f"{cfg.get('batch_size')} lanes, {cfg.get('steps')} steps, lr {cfg.get('lr')}. Validation: "
              + (f"{first['val_pieces']} validation pieces (the first of the split, each in full; "
                 f"{first['val_tokens']:,} tokens)." if first.get("val_pieces") else "none."), ""]
    ppl_head = "val PPL" + (f" (seed {' / '.join(map(str, seeds))})" if len(seeds) > 1 else "")
    head = ["variant", "horizons (layer 0..L-1)", "budget", "val PPL", "x full"]
    with_test = any(row["test_ppl"] is not None for row in rows)
    if len(seeds) > 1:
        head += [ppl_head, "spread"]
    with_val_all = any(row["val_all_ppl"] is not None for row in rows)
    if with_val_all:
        head += ["val PPL, all pieces"]
    if with_test:
        head += ["test PPL"]
    head += ["train tok/s", "x full", "peak train MiB", "x full", "state KiB/lane", "x full"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|")
    for row in rows:
        horizons = f"excerpt {row['context']}" if row["context"] else ",".join(map(str, row["horizons"]))
        cells = [f"`{row['variant']}`", horizons, str(row["budget"]), _fmt(row["val_ppl"]),
                 _fmt(row["val_ppl_vs_full"])]
        if len(seeds) > 1:
            cells += [" / ".join(_fmt(v) for v in row["val_ppl_runs"]), _fmt(row["val_ppl_spread"])]
        if with_val_all:
            cells += [_fmt(row["val_all_ppl"])]
        if with_test:
            cells += [_fmt(row["test_ppl"])]
        peak = row["train_peak_memory_bytes"]
        cells += [_fmt(row["train_tokens_per_s"], ".0f"), _fmt(row["train_tokens_per_s_vs_full"], ".2f"),
                  _fmt(peak / mib if peak is not None else None, ".1f"),
                  _fmt(row["train_peak_memory_bytes_vs_full"], ".2f"),
                  _fmt(row["state_bytes"] / 1024, ".0f"), _fmt(row["state_bytes_vs_full"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "val PPL: exp(mean NLL per token) over every token of the validation pieces, streamed with "
              "each variant's own schedule (the excerpt baseline: non-overlapping windows of its context). "
              "Mean over seeds. train tok/s: real training targets per second of training steps. Peak train "
              f"memory: {first.get('train_memory_method')}, measured in a fresh process per variant. State: "
              "the recurrent memory of one lane in fp32 as trained (budget x 2 x heads x head dim for keys + "
              "values, budget x d_model for hidden memory; x 4 bytes)."
              + (f" val PPL, all pieces / test PPL: the final model over all {first.get('val_all_pieces')} "
                 f"validation / {first.get('test_pieces')} test pieces." if with_test else ""), ""]
    lines += _position_table(records)
    lines += ["## Variants", ""]
    for row in rows:
        lines.append(f"- `{row['variant']}`: {row['description']}")
    lines += ["", "## Figures", ""]
    for name, caption in FIGURES:
        lines.append(f"![{caption}]({FIGURES_DIR}/{name}.png)")
        lines.append("")
    lines += ["## Reproduce", "", "```", command or "(run through the Python API: dsmr.study.run_study)"]
    lines += [f"# from: {' '.join(sources)}"] if sources else []
    commands = sorted({r["command"] for r in records if r.get("command")})
    if commands and commands != [command]:
        lines += ["# the variants were trained with:"] + commands
    lines += ["```", "", "Environment (of the first result): " + ", ".join(
        f"{k} {v}" for k, v in env.items() if k in ("dsmr", "torch", "python", "device", "gpu", "cpu_count",
                                                     "usable_cpus", "torch_threads", "platform", "git_commit")),
              ""]
    return "\n".join(lines)


def _position_table(records: list[dict]) -> list[str]:
    """Validation PPL by position in the piece (mean NLL over seeds): where does memory pay off?"""
    buckets = next((r["val_nll_by_position"] for r in records if r.get("val_nll_by_position")), None)
    if not buckets:
        return []
    names = [f"{b['start']}-{b['end']}" if b["end"] is not None else f">= {b['start']}" for b in buckets]
    lines = ["Validation PPL by position in the piece (mean over seeds; tokens per bucket: "
             + ", ".join(f"{n} {b['tokens']:,}" for n, b in zip(names, buckets)) + ")", "",
             "| variant | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for variant in dict.fromkeys(r["variant"] for r in records):
        runs = [r["val_nll_by_position"] for r in records if r["variant"] == variant and r.get("val_nll_by_position")]
        cells = []
        for i in range(len(names)):
            nll = _mean(run[i]["nll"] for run in runs if i < len(run))
            cells.append(_fmt(math.exp(nll) if nll is not None else None, ".2f"))
        lines.append(f"| `{variant}` | " + " | ".join(cells) + " |")
    return lines + [""]


FIGURES = (
    ("schedules", "horizon per layer of every variant"),
    ("ppl_vs_memory", "validation PPL against peak training memory and recurrent-state size"),
    ("val_curves", "validation PPL over training steps"),
    ("gates", "gate values per layer over training"),
)


def write_report(out_dir, records: list[dict], command: str | None = None, sources=None) -> list[Path]:
    """results.csv, results.md and the figures of `records` into `out_dir`; returns the paths written."""
    out_dir = Path(out_dir)
    if not records:
        raise DsmrError(f"no study results to report in {out_dir}")
    written = [out_dir / "results.csv", out_dir / "results.md"]
    atomic_write_text(written[0], results_csv(records))
    atomic_write_text(written[1], results_markdown(records, command, sources))
    written += plot_all(records, out_dir / FIGURES_DIR)
    return written


# --- figures -------------------------------------------------------------------------------------------------

def plot_all(records: list[dict], folder) -> list[Path]:
    """The study's figures as PNG files in `folder` (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (("schedules", _plot_schedules), ("ppl_vs_memory", _plot_ppl_vs_memory),
                       ("val_curves", _plot_val_curves), ("gates", _plot_gates)):
        fig = draw(plt, records)
        if fig is None:
            continue
        path = folder / f"{name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _memory_rows(records):
    return [r for r in summarize(records) if not r["context"]]


def _plot_schedules(plt, records):
    """Layer x variant grid, each cell shaded and labelled with the layer's horizon."""
    import numpy as np

    rows = _memory_rows(records)
    if not rows:
        return None
    grid = np.array([row["horizons"] for row in rows], dtype=float).T  # [layers, variants]
    n_layers = grid.shape[0]
    fig, ax = plt.subplots(figsize=(1.1 * len(rows) + 2, 0.55 * n_layers + 1.6))
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap="Blues", vmin=0, vmax=max(grid.max(), 1))
    for layer in range(n_layers):
        for j in range(len(rows)):
            h = int(grid[layer, j])
            dark = grid[layer, j] > 0.6 * grid.max()
            ax.text(j, layer, str(h), ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(rows)), [f"{r['variant']}\n(B={r['budget']})" for r in rows], rotation=45,
                  ha="right", fontsize=8)
    ax.set_yticks(range(n_layers), [f"layer {i}" for i in range(n_layers)], fontsize=8)
    ax.set_title("memory horizon h_l per layer (KV positions)")
    fig.colorbar(image, ax=ax, label="horizon")
    return fig


PALETTE = [f"C{i}" for i in range(10) if i != 7]  # matplotlib's cycle without its gray (the baseline's)


def _plot_ppl_vs_memory(plt, records):
    rows = [r for r in summarize(records) if r["val_ppl"] is not None]
    if not rows:
        return None
    mib = 1024 * 1024
    markers = "osD^v<>pP*hX"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    panels = (("train_peak_memory_bytes", mib, "peak training memory (MiB)"),
              ("state_bytes", 1024, "recurrent state per lane (KiB, fp32)"))
    for ax, (key, unit, label) in zip(axes, panels):
        for i, row in enumerate(rows):
            if row[key] is None:
                continue
            if row["context"]:  # the excerpt baseline: a reference line too
                ax.axhline(row["val_ppl"], color="gray", linestyle="--", linewidth=1)
            # one marker and colour per variant, named in the legend: many variants share an x
            color = "gray" if row["context"] else PALETTE[i % len(PALETTE)]
            lo, hi = min(row["val_ppl_runs"]), max(row["val_ppl_runs"])
            name = f"{row['variant']} ({row['context']} tokens)" if row["context"] else row["variant"]
            ax.errorbar(row[key] / unit, row["val_ppl"], yerr=[[row["val_ppl"] - lo], [hi - row["val_ppl"]]],
                        fmt=markers[i % len(markers)], color=color, capsize=3, markersize=7, label=name)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation PPL (bars: range over seeds)")
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("quality against memory (dashed: the full-attention excerpt baseline)")
    return fig


def _plot_val_curves(plt, records):
    curves = [r for r in records if r.get("val_curve")]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    names = list(dict.fromkeys(r["variant"] for r in curves))
    seeds = sorted({r["seed"] for r in curves})
    styles = ["-", "--", ":", "-."]
    for r in curves:
        color = f"C{names.index(r['variant']) % 10}"
        style = styles[seeds.index(r["seed"]) % len(styles)]
        steps = [p["step"] for p in r["val_curve"]]
        ppl = [p["val_ppl"] for p in r["val_curve"]]
        label = r["variant"] if r["seed"] == seeds[0] else None
        ax.plot(steps, ppl, style, color=color, marker="o", markersize=3, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation PPL")
    title = "validation PPL over training"
    if len(seeds) > 1:
        title += " (" + ", ".join(f"seed {s}: {styles[i % len(styles)]}" for i, s in enumerate(seeds)) + ")"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return fig


def _plot_gates(plt, records):
    import numpy as np

    gated = [r for r in records if r.get("gate_curve")]
    if not gated:
        return None
    fig, axes = plt.subplots(1, len(gated), figsize=(5 * len(gated), 4), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], gated):
        steps = [p["step"] for p in r["gate_curve"]]
        values = np.array([np.mean(np.asarray(p["gates"], dtype=float).reshape(len(p["gates"]), -1), axis=1)
                           for p in r["gate_curve"]])  # [points, layers] (heads averaged)
        for layer in range(values.shape[1]):
            ax.plot(steps, values[:, layer], label=f"layer {layer}")
        if r.get("gate") == "ste":
            ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)  # below it the hard gate drops the memory
        ax.set_title(f"{r['variant']} (seed {r['seed']})")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("gate g = sigmoid(theta)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("learned memory gates per layer")
    return fig


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: `python -m dsmr.study SPEC.json` trains one variant (see _run_in_process)."""
    argv = sys.argv[1:] if argv is None else argv
    spec = _read_json(Path(argv[0]))
    try:
        run_variant(spec)
    except KeyboardInterrupt:
        return 130
    except DsmrError as err:
        print(f"dsmr study: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
