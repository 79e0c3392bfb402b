"""The study's options (StudyConfig, presets) and its variants: which schedules it trains and how each
becomes a training run."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

from dsmr.core.configs import dataclass_from_dict
from dsmr.errors import DsmrError
from dsmr.model.config import MEMORIES, fan_in_std, recipe_default
from dsmr.core.options import option, out_of_bounds, wrong_types
from dsmr.training.config import TrainConfig


STUDY_FILE = "study.json"
RESULTS_DIR = "results"
RUNS_DIR = "runs"
FIGURES_DIR = "figures"
REFERENCE = "full"
BASELINE = "excerpt"


# The study options of `dsmr study`, in the order its help lists them.
SHARED_OPTIONS = ("layers", "d_model", "heads", "head_dim", "tie_embeddings", "init_std", "memory", "curriculum",
                  "test", "segment", "batch_size", "horizon", "budget", "long_layers", "short", "context", "gate_init",
                  "gate_lambda", "transpose", "stretch", "velocity_shift", "steps", "epochs", "lr", "eval_every",
                  "val_pieces", "eval_batch_size", "seed")


@dataclass
class StudyConfig:
    """Options every variant shares. The model's recipe (output head, initial std, memory) defaults to
    DSMRConfig's, like `dsmr train`; PRESETS name other option sets (the first study's old recipe)."""

    BOUNDS: ClassVar[dict] = {name: TrainConfig.BOUNDS[name] for name in (
        "layers", "d_model", "heads", "head_dim", "init_std", "segment", "batch_size", "horizon", "budget",
        "long_layers", "short", "context", "gate_init", "gate_lambda", "steps", "epochs", "lr", "eval_every",
        "val_pieces", "eval_batch_size", "seed", "transpose", "stretch", "velocity_shift")} | {"curriculum": (1e-6, 1.0)}

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
    # augmentation of the training pieces (dsmr train --help; the excerpt baseline trains without it)
    transpose: int = option(0, "transpose each training piece by up to N semitones", metavar="N", default_text="0: off")
    stretch: float = option(0.0, "stretch each training piece's time by a factor in [1 - F, 1 + F]", metavar="F",
                            default_text="0: off")
    velocity_shift: int = option(0, "move each training piece's velocities by up to N MIDI steps", metavar="N",
                                 default_text="0: off")
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
    from dsmr.model.schedule import make_schedule

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
    from dsmr.training.config import TrainConfig

    base = dict(layers=cfg.layers, d_model=cfg.d_model, heads=cfg.heads, head_dim=cfg.head_dim,
                tie_embeddings=cfg.tie_embeddings, init_std=cfg.resolved_init_std, memory=cfg.memory, segment=cfg.segment,
                batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr, eval_every=cfg.eval_every,
                val_pieces=cfg.val_pieces, eval_batch_size=cfg.eval_batch_size or cfg.batch_size,
                seed=cfg.seed, device=cfg.device, tensorboard=False, log_every=10, transpose=cfg.transpose,
                stretch=cfg.stretch, velocity_shift=cfg.velocity_shift)
    options = dict(base, **variant.options)
    if options.get("baseline"):
        options["memory"] = "kv"  # the excerpt baseline has no memory to represent
        options.update(transpose=0, stretch=0.0, velocity_shift=0)  # nor full pieces to augment
    train_cfg = TrainConfig(**options)
    train_cfg.validate()
    return train_cfg


def result_name(variant: str, seed: int) -> str:
    return f"{variant}-seed{seed}"


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise DsmrError(f"cannot read {path}: {err}") from err


def say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def comparable(config: dict) -> dict:
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
                       "epochs": None, "test": False, "transpose": 0, "stretch": 0.0, "velocity_shift": 0}
