"""The options of a training run (TrainConfig), defined once: each field holds its default, its help and
its command-line spelling (dsmr.core.options), and `dsmr train` builds its options from them. Also what a run
derives from them: its memory schedule, its model config and its config.json.

Standard library only at import time (plus dsmr.model.schedule): `dsmr --help` must not import torch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

from dsmr import __version__
from dsmr.core.configs import dataclass_from_dict
from dsmr.errors import DsmrError
from dsmr.model.config import MEMORIES, fan_in_std, recipe_default
from dsmr.core.options import float_pair, int_list, option, out_of_bounds, wrong_types
from dsmr.model.schedule import KINDS, Schedule, make_schedule

DEFAULT_STEPS = 1000  # when neither steps nor epochs is given
# Options that may change when a run is resumed: they do not change what the model computes.
RESUMABLE_CHANGES = ("steps", "epochs", "eval_every", "eval_at_start", "val_pieces", "eval_batch_size",
                     "log_every", "save_every", "device", "tensorboard", "compile")
# Values that reproduce runs saved before an option existed (config.json files without its key).
LEGACY_DEFAULTS = {"head_dim": None, "rotary_fraction": 1.0, "norm": "layernorm", "init_std": 0.02, "memory": "kv",
                   "horizon_warmup": 0, "embedding_decay": True, "transpose": 0, "stretch": 0.0, "velocity_shift": 0,
                   "init_from": None}
GATE_KINDS = ("none", "soft", "ste")  # dsmr.model.network.GATES, spelled here so that parsers need not import torch

# The groups of options, in the order `dsmr train --help` lists them.
SCHEDULE_OPTIONS = ("schedule", "budget", "long_layers", "short", "horizon", "binary_layers", "horizons")
MODEL_OPTIONS = ("layers", "d_model", "heads", "d_ff", "dropout", "tie_embeddings", "head_dim", "rotary_fraction",
                 "norm", "init_std", "memory", "horizon_warmup")
GATE_OPTIONS = ("gate", "gate_per_head", "gate_init", "gate_lambda")
DATA_OPTIONS = ("segment", "batch_size", "baseline", "context")
AUGMENT_OPTIONS = ("transpose", "stretch", "velocity_shift")
OPTIMIZATION_OPTIONS = ("lr", "min_lr_ratio", "warmup_steps", "weight_decay", "embedding_decay", "betas",
                        "grad_clip", "grad_accum")
LENGTH_OPTIONS = ("steps", "epochs")  # one or the other
EVALUATION_OPTIONS = ("eval_every", "eval_at_start", "val_split", "val_pieces", "eval_batch_size", "log_every",
                      "save_every", "tensorboard")
RUNTIME_OPTIONS = ("seed", "device", "amp", "compile")
FINE_TUNING_OPTIONS = ("init_from",)
# What fine-tuning keeps from the model it starts from: what its weights mean (dropout, the horizon curriculum
# and everything about optimization and data stay the fine-tuning run's own).
KEPT_BY_FINE_TUNING = tuple(n for n in MODEL_OPTIONS + SCHEDULE_OPTIONS if n not in ("dropout", "horizon_warmup")) \
    + ("segment", "baseline", "context")
# Fine-tuning's own defaults: a third of the from-scratch peak learning rate (the weights are already
# good; a full one undoes them faster than the new pieces teach), a short warmup, 1,000 steps.
FINE_TUNING_DEFAULTS = {"lr": 3e-4, "warmup_steps": 50, "steps": 1000}


BIG = 10**9  # a count no run reaches (steps, cadences)


@dataclass
class TrainConfig:
    # the numbers each option may take (dsmr.core.options.out_of_bounds; the command line refuses others)
    BOUNDS: ClassVar[dict] = {
        "layers": (1, 256), "d_model": (1, 16384), "heads": (1, 256), "d_ff": (1, 262144), "head_dim": (2, 4096),
        "dropout": (0.0, 0.99), "rotary_fraction": (0.0, 1.0), "init_std": (1e-6, 10.0), "budget": (1, 2**24),
        "long_layers": (0, 256), "short": (0, 2**22), "horizon": (0, 2**22), "horizon_warmup": (0, BIG),
        "gate_init": (-100.0, 100.0), "gate_lambda": (0.0, 1e6), "segment": (1, 65536), "batch_size": (1, 65536),
        "context": (1, 2**20), "lr": (1e-12, 10.0), "min_lr_ratio": (0.0, 1.0), "warmup_steps": (0, BIG),
        "weight_decay": (0.0, 100.0), "grad_clip": (0.0, 1e6), "grad_accum": (1, 4096), "steps": (1, BIG),
        "epochs": (1, 10**4), "eval_every": (0, BIG), "val_pieces": (0, 10**6), "eval_batch_size": (1, 65536),
        "log_every": (1, BIG), "save_every": (1, BIG), "seed": (0, 2**32 - 1),
        "transpose": (0, 24), "stretch": (0.0, 0.5), "velocity_shift": (0, 64),
    }

    # model
    # the model's defaults are DSMRConfig's (dsmr.model.config), the one place they are declared
    layers: int = option(recipe_default("n_layers"), "decoder blocks")
    d_model: int = option(recipe_default("d_model"), "model width")
    heads: int = option(recipe_default("n_heads"), "attention heads")
    d_ff: int | None = option(recipe_default("d_ff"), "feed-forward width", default_text="4 x d-model")
    dropout: float = option(recipe_default("dropout"), "dropout", default_text="0")
    tie_embeddings: bool = option(recipe_default("tie_embeddings"),
                                  "output head tied to the token embedding (default: a separate head)",
                                  negative="--no-tie-embeddings", negative_help="a separate output head (the default)")
    head_dim: int | None = option(recipe_default("head_dim"), "width of each attention head",
                                  default_text="d-model / heads")
    rotary_fraction: float = option(recipe_default("rotary_fraction"), "share of each head's dims rotated by RoPE",
                                    default_text="1")
    norm: str = option(recipe_default("norm"), "normalization layers", choices=("layernorm", "rmsnorm"))
    init_std: float | None = option(recipe_default("init_std"), "std of the initial weights",
                                    default_text="1 / sqrt(d-model)")
    memory: str = option(recipe_default("memory"), "what the memory holds in training: hidden = detached layer "
                                                   "inputs, projected with the current weights every segment; kv = "
                                                   "detached keys/values, nothing re-projected (docs/training.md)",
                         choices=MEMORIES)
    # memory schedule (dsmr.model.schedule.make_schedule): two-scale 2 x 1024 + 4 x 128 = 2560 by default
    schedule: str = option("two-scale", "how the budget is spread over layers", choices=KINDS)
    budget: int | None = option(2560, "total horizon in KV positions for uniform/two-scale/binary")
    long_layers: int | None = option(2, "two-scale: number of lowest layers with the long horizon")
    short: int | None = option(128, "two-scale: horizon of the other layers")
    horizon: int | None = option(1024, "full: horizon of every layer")
    binary_layers: tuple[int, ...] | None = option(
        None, "binary: the layers (0 = lowest) that share the budget", type=int_list, metavar="I,J,...",
        deprecated=("--memory-layers",))
    horizons: tuple[int, ...] | None = option(None, "explicit: one horizon per layer, lowest first", type=int_list,
                                              metavar="H0,H1,...")
    # learned gates on memory attention
    gate: str = option("none", "gate on memory attention", choices=GATE_KINDS)
    gate_per_head: bool = option(False, "one gate per head, not per layer")
    gate_init: float = option(3.0, "initial gate logit", default_text="3: sigmoid ~ 0.95")
    gate_lambda: float = option(0.0, "weight of the budget penalty", default_text="0")
    horizon_warmup: int = option(0, "horizon curriculum: every layer's horizon grows linearly from 0 to its schedule "
                                    "over the first STEPS steps", metavar="STEPS",
                                 default_text="0: the full schedule from the start")
    # data
    segment: int = option(256, "tokens per segment")
    batch_size: int = option(8, "lanes per batch")
    baseline: str | None = option(None, "full-attention reference: no memory, fixed-length excerpts of --context "
                                        "tokens", choices=("excerpt",))
    context: int | None = option(None, "excerpt length for --baseline excerpt", default_text="--segment")
    # augmentation (dsmr.data.augment): each training piece is changed as a lane takes it; evaluation never is
    transpose: int = option(0, "transpose each training piece by up to N semitones each way (never out of the "
                               "encoding's or the piano's range)", metavar="N", default_text="0: off")
    stretch: float = option(0.0, "stretch each training piece's time by a factor drawn from [1 - F, 1 + F]",
                            metavar="F", default_text="0: off")
    velocity_shift: int = option(0, "move each training piece's velocities by up to N MIDI steps each way "
                                    "(4 = one velocity bin)", metavar="N", default_text="0: off")
    # optimization
    lr: float = option(1e-3, "peak learning rate", default_text="1e-3")
    min_lr_ratio: float = option(0.1, "cosine decay floor as a fraction of --lr")
    warmup_steps: int | None = option(None, "linear warmup steps", default_text="5%% of the steps, <= 500")
    weight_decay: float = option(0.1, "AdamW weight decay")
    embedding_decay: bool = option(True, "no weight decay on the token embedding (matrices of the blocks keep it; "
                                         "norms and gates never have it)")
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas", type=float_pair, metavar="B1,B2",
                                        default_text="0.9,0.95")
    grad_clip: float = option(1.0, "gradient norm clip, 0 = off")
    grad_accum: int = option(1, "segment batches per optimizer step")
    steps: int | None = option(None, "optimizer steps", default_text=str(DEFAULT_STEPS))
    epochs: int | None = option(None, "passes over every training piece")
    # evaluation and logging
    eval_every: int = option(250, "steps between full-piece validations, 0 = end only")
    eval_at_start: bool = option(False, "also validate the untrained model (step 0)")
    val_split: str | None = option("validation", "split to validate on")  # None: no validation (benchmarks)
    val_pieces: int | None = option(None, "validate on the first N pieces only", default_text="all")
    eval_batch_size: int | None = option(None, "lanes for validation", default_text="--batch-size")
    log_every: int = option(10, "steps between metrics.jsonl records")
    save_every: int | None = option(None, "steps between checkpoint saves", default_text="--eval-every")
    tensorboard: bool = option(True, "no TensorBoard logs even when tensorboard is installed")
    # runtime
    seed: int = option(0, "seed for initialization and data order")
    device: str = option("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    amp: bool = option(True, "no bf16 autocast on CUDA (CPU stays fp32 anyway)")
    compile: bool = option(False, "torch.compile the model for training (worth it on GPUs for long runs)")
    # fine-tuning
    init_from: str | None = option(None, "fine-tune: start from this model folder's, run's or Hub repo's weights, "
                                         "with its architecture, schedule, segment and tokenizer (the cache must "
                                         "use the same tokenizer); lr 3e-4, 50 warmup steps and 1000 steps unless "
                                         "given", flag="--from", metavar="MODEL_OR_RUN")

    def __post_init__(self) -> None:
        for name in ("binary_layers", "horizons", "betas"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(value))

    def validate(self) -> None:
        problems = wrong_types(self)
        if problems:  # a config.json with "lr": "abc": nothing below can compare it
            raise DsmrError("train config: " + "; ".join(problems))

        def positive(name):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                problems.append(f"{name} must be a positive integer, got {value!r}")

        for name in ("layers", "d_model", "heads", "segment", "batch_size", "grad_accum", "steps", "epochs",
                     "context", "val_pieces", "eval_batch_size", "log_every", "save_every"):
            positive(name)
        if self.steps is not None and self.epochs is not None:
            problems.append("give steps or epochs, not both")
        if self.baseline not in (None, "excerpt"):
            problems.append(f"baseline must be 'excerpt' or unset, got {self.baseline!r}")
        if self.gate not in GATE_KINDS:
            problems.append(f"gate must be one of {', '.join(GATE_KINDS)}, got {self.gate!r}")
        if self.baseline and self.gate != "none":
            problems.append("the excerpt baseline has no memory, so no gates")
        if self.baseline and self.augmentation.active:
            problems.append("augmentation is for full-piece training; the excerpt baseline does not take it")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("weight_decay", "grad_clip", "gate_lambda", "eval_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not isinstance(self.horizon_warmup, int) or self.horizon_warmup < 0:
            problems.append(f"horizon_warmup must be an integer >= 0, got {self.horizon_warmup!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {self.betas}")
        # the ranges (NaN and infinities included), for the fields the checks above did not already report
        reported = {p.split()[0] for p in problems}
        problems += [p for p in out_of_bounds(self) if p.split()[0] not in reported]
        if problems:
            raise DsmrError("train config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists, as in config.json

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """From a config.json "train" section; keys it lacks (older runs) take their LEGACY_DEFAULTS."""
        return dataclass_from_dict(cls, {**LEGACY_DEFAULTS, **d}, "train config")

    @property
    def augmentation(self):
        """The training pieces' augmentation (dsmr.data.augment.Augmentation)."""
        from dsmr.data.augment import Augmentation

        return Augmentation(self.transpose, self.stretch, self.velocity_shift)

    @property
    def segment_len(self) -> int:
        """Tokens per segment in training and evaluation (the context for the excerpt baseline)."""
        return (self.context or self.segment) if self.baseline else self.segment


def make_run_schedule(cfg: TrainConfig) -> Schedule:
    if cfg.baseline:
        return make_schedule("none", cfg.layers)
    return make_schedule(cfg.schedule, cfg.layers, horizon=cfg.horizon, budget=cfg.budget,
                         long_layers=cfg.long_layers, short=cfg.short, layers=cfg.binary_layers,
                         horizons=cfg.horizons)


def make_model_config(cfg: TrainConfig, vocab_size: int):
    """The DSMRConfig of a run."""
    from dsmr.model.config import DSMRConfig

    return DSMRConfig(vocab_size=vocab_size, n_layers=cfg.layers, d_model=cfg.d_model, n_heads=cfg.heads,
                      d_ff=cfg.d_ff, dropout=cfg.dropout, tie_embeddings=cfg.tie_embeddings,
                      horizons=make_run_schedule(cfg).horizons, gate=cfg.gate, gate_per_head=cfg.gate_per_head,
                      gate_init=cfg.gate_init, norm=cfg.norm, head_dim=cfg.head_dim,
                      rotary_fraction=cfg.rotary_fraction, init_std=init_std(cfg), memory=cfg.memory)


def init_std(cfg: TrainConfig) -> float:
    """The std of a run's initial weights: --init-std, else 1 / sqrt(d_model) (fan-in scaling)."""
    return cfg.init_std if cfg.init_std is not None else fan_in_std(cfg.d_model)


def run_config(cfg: TrainConfig, model_cfg, tokenizer, cache) -> dict:
    """The config.json of a run: enough to rebuild the model and tokenizer, and to check a resume."""
    schedule = make_run_schedule(cfg)
    return {
        "dsmr_version": __version__,
        "model": model_cfg.to_dict(),
        "schedule": schedule.to_dict(),
        "tokenizer": tokenizer.config(),
        "tokenizer_hash": tokenizer.config_hash(),
        "segment_len": cfg.segment_len,
        "train": cfg.to_dict(),
        "cache": str(cache.path),
    }


def fine_tuning_config(source: dict, given: dict, ref: str) -> TrainConfig:
    """The TrainConfig of a run that fine-tunes the model `ref` (its config.json `source`): the model's
    architecture, schedule and segment, then FINE_TUNING_DEFAULTS, then the options `given`. DsmrError when
    a given option would change what the model's weights mean."""
    if not isinstance(source.get("train"), dict):
        raise DsmrError(f"--from {ref}: its config.json has no \"train\" section, so its architecture is unknown")
    base = TrainConfig.from_dict(source["train"])
    kept = {name: getattr(base, name) for name in KEPT_BY_FINE_TUNING}
    clashes = [f"--{name.replace('_', '-')} {_spelled(given[name])} (the model has {_spelled(kept[name])})"
               for name in KEPT_BY_FINE_TUNING if name in given and _spelled(given[name]) != _spelled(kept[name])]
    if clashes:
        raise DsmrError(f"--from {ref}: fine-tuning keeps the model's architecture, schedule and segment; "
                        f"drop {'; '.join(clashes)}")
    return TrainConfig(**{**kept, **FINE_TUNING_DEFAULTS, **given, "init_from": str(ref)})


def _spelled(value):
    return list(value) if isinstance(value, tuple) else value
