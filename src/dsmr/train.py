"""The full-piece streaming trainer (docs/design.md).

Lanes stream whole training pieces segment by segment (dsmr.stream.PieceStream); the recurrent state is
carried from segment to segment, detached, and one optimizer step is taken per segment batch (or per
`grad_accum` of them: the state is still carried per segment). The loss is the mean NLL over the real
targets of the step, plus `gate_lambda * gate_penalty` when the model has gates.

The full-attention reference (`baseline="excerpt"`) is the same network with no memory, trained on
fixed-length excerpts of `context` tokens (dsmr.stream.ExcerptStream) and evaluated on full pieces in
non-overlapping windows of `context` tokens.

A run folder (dsmr.checkpoint) gets config.json, model.safetensors + trainer_state.pt (latest, exactly
resumable: optimizer, LR schedule, RNG states, stream position, recurrent state), best.safetensors,
metrics.jsonl, and TensorBoard logs in tb/ when the tensorboard package is installed.

Ctrl-C: the first one finishes the current step, saves a resumable checkpoint and returns
(`interrupted: True`); a KeyboardInterrupt raised inside a step (a second Ctrl-C, or a library caller's)
rewinds to the last finished step and saves that.

Several processes (torchrun, see dsmr.distributed and docs/distributed.md): DistributedDataParallel over
one shared lane assignment; rank 0 writes; the checkpoint holds every rank's recurrent state and RNG.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsmr import __version__
from dsmr.atomic import atomic_write_text
from dsmr.checkpoint import (CONFIG_FILE, METRICS_FILE, TRAINER_STATE_FILE, check_optimizer_state,
                             load_trainer_state, read_config, remove_run_temporaries, resume_weights,
                             save_checkpoint)
from dsmr.distributed import DistContext, init_distributed, reduce_evaluation, split_pieces, wrap_model
from dsmr.configs import dataclass_from_dict
from dsmr.errors import DsmrError
from dsmr.evaluate import NLL_BUCKETS, evaluate
from dsmr.losses import token_nll
from dsmr.model import DSMR, GATES, DSMRConfig, LayerMemory
from dsmr.runtime import PeakMemory, autocast, resolve_device, state_bytes
from dsmr.schedule import Schedule, make_schedule
from dsmr.stream import ExcerptStream, PieceStream

DEFAULT_STEPS = 1000  # when neither steps nor epochs is given
# Options that may change when a run is resumed: they do not change what the model computes.
RESUMABLE_CHANGES = ("steps", "epochs", "eval_every", "eval_at_start", "val_pieces", "eval_batch_size",
                     "log_every", "save_every", "device", "tensorboard", "compile")


# Values that reproduce runs saved before an option existed (config.json files without its key).
LEGACY_DEFAULTS = {"head_dim": None, "rotary_fraction": 1.0, "norm": "layernorm", "init_std": 0.02, "memory": "kv",
                   "horizon_warmup": 0, "embedding_decay": True}


@dataclass
class TrainConfig:
    # model
    layers: int = 6
    d_model: int = 256
    heads: int = 4
    d_ff: int | None = None           # None: 4 * d_model
    dropout: float = 0.0
    tie_embeddings: bool = False      # untied output head: -1.2 PPL at +6% parameters (docs/training.md)
    head_dim: int | None = None       # None: d_model / heads
    rotary_fraction: float = 1.0      # share of each head's dims that RoPE rotates
    norm: str = "layernorm"           # "layernorm" | "rmsnorm"
    init_std: float = 0.02            # std of the initial weights
    memory: str = "hidden"            # what the state holds in training: "hidden" (re-projected each segment:
                                      # memory pays, docs/training.md) or "kv" (the paper's; faster)
    # memory schedule (dsmr.schedule.make_schedule): two-scale 2 x 1024 + 4 x 128 = 2560 by default
    schedule: str = "two-scale"
    budget: int | None = 2560         # uniform, two-scale, binary
    long_layers: int | None = 2       # two-scale
    short: int | None = 128           # two-scale
    horizon: int | None = 1024        # full
    binary_layers: tuple[int, ...] | None = None   # binary
    horizons: tuple[int, ...] | None = None        # explicit
    # learned gates on memory attention
    gate: str = "none"                # "none" | "soft" | "ste"
    gate_per_head: bool = False
    gate_init: float = 3.0
    gate_lambda: float = 0.0          # weight of the budget penalty
    horizon_warmup: int = 0           # steps over which every horizon grows linearly from 0 to its schedule
    # data
    segment: int = 256
    batch_size: int = 8               # lanes
    baseline: str | None = None       # None, or "excerpt": no memory, fixed-length excerpts
    context: int | None = None        # excerpt length (default: segment)
    # optimization
    lr: float = 1e-3
    min_lr_ratio: float = 0.1         # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int | None = None   # None: 5% of the steps, at most 500
    weight_decay: float = 0.1
    embedding_decay: bool = True      # weight decay on the embedding too (norms and gates never)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0            # 0: no clipping
    grad_accum: int = 1
    steps: int | None = None          # optimizer steps; or
    epochs: int | None = None         # passes over the training pieces (DEFAULT_STEPS when neither is set)
    # evaluation and logging
    eval_every: int = 250             # steps between validations (0: only at the end)
    eval_at_start: bool = False       # also validate the untrained model (step 0)
    val_split: str | None = "validation"  # None: no validation (benchmarks)
    val_pieces: int | None = None     # validate on the first N pieces (None: all)
    eval_batch_size: int | None = None  # default: batch_size
    log_every: int = 10
    save_every: int | None = None     # steps between latest-checkpoint saves (default: eval_every)
    tensorboard: bool = True          # when the tensorboard package is installed
    # runtime
    seed: int = 0
    device: str = "auto"
    amp: bool = True                  # bf16 autocast on CUDA (CPU stays fp32)
    compile: bool = False             # torch.compile the training step (the model, under DDP when distributed)

    def __post_init__(self) -> None:
        for name in ("binary_layers", "horizons", "betas"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(value))

    def validate(self) -> None:
        problems = []

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
        if self.gate not in GATES:
            problems.append(f"gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        if self.baseline and self.gate != "none":
            problems.append("the excerpt baseline has no memory, so no gates")
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
        if problems:
            raise DsmrError("train config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists, as in config.json

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """From a config.json "train" section; keys it lacks (older runs) take their LEGACY_DEFAULTS."""
        return dataclass_from_dict(cls, {**LEGACY_DEFAULTS, **d}, "train config")

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


def make_model_config(cfg: TrainConfig, vocab_size: int) -> DSMRConfig:
    return DSMRConfig(vocab_size=vocab_size, n_layers=cfg.layers, d_model=cfg.d_model, n_heads=cfg.heads,
                      d_ff=cfg.d_ff, dropout=cfg.dropout, tie_embeddings=cfg.tie_embeddings,
                      horizons=make_run_schedule(cfg).horizons, gate=cfg.gate, gate_per_head=cfg.gate_per_head,
                      gate_init=cfg.gate_init, norm=cfg.norm, head_dim=cfg.head_dim,
                      rotary_fraction=cfg.rotary_fraction, init_std=cfg.init_std, memory=cfg.memory)


def run_config(cfg: TrainConfig, model_cfg: DSMRConfig, tokenizer, cache) -> dict:
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


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def horizons_at(step: int, horizons: tuple[int, ...], warmup: int) -> tuple[int, ...]:
    """The horizon curriculum: each layer's horizon grows linearly from 0 at step 0 to its schedule at
    step `warmup` (and stays there); no warmup: the schedule itself."""
    if step >= warmup:
        return tuple(horizons)
    return tuple(h * step // warmup for h in horizons)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # weight decay on matrices (and the embedding unless embedding_decay is off); norms and gates never
    embedding = {id(model.embedding.weight)} if not cfg.embedding_decay else set()
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in embedding]
    no_decay = [p for p in model.parameters() if p.dim() < 2 or id(p) in embedding]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=device.type == "cuda")


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _state_to_cpu(state) -> list[dict] | None:
    if state is None:
        return None
    return [{"k": m.k.cpu(), "v": None if m.v is None else m.v.cpu(), "valid": m.valid.cpu()} for m in state]


def _state_from_cpu(saved, device) -> list[LayerMemory] | None:
    if saved is None:
        return None
    return [LayerMemory(m["k"], m["v"], m["valid"]).to(device) for m in saved]


class _StopRequest:
    """The first SIGINT asks the loop to stop at the next step boundary; a second one interrupts at once.

    Distributed, repeats are ignored: torchrun forwards the terminal's SIGINT to its workers, so each
    gets it twice, and the ranks must stop together (they vote at every step) to save a checkpoint.
    torchrun kills workers that have not exited after its grace period."""

    def __init__(self, distributed: bool = False):
        self.requested = False
        self.distributed = distributed
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested and not self.distributed:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class _Metrics:
    """metrics.jsonl: records kept in memory, the file rewritten atomically (at saves, or every 30 s)."""

    def __init__(self, path: Path, keep_until_step: int | None = None, write: bool = True):
        self.path = path
        self.write = write  # False on ranks other than 0: records are kept, nothing is written
        self.records: list[dict] = []
        if keep_until_step is not None and path.is_file():  # resume: drop what came after the checkpoint
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
                if line.strip():
                    try:
                        record = json.loads(line)
                        if not isinstance(record, dict):
                            raise ValueError("not an object")
                    except ValueError:
                        print(f"dsmr train: {path}, line {number}: damaged record dropped", file=sys.stderr)
                        continue
                    step_of = record.get("step", 0)
                    if not isinstance(step_of, (int, float)) or step_of <= keep_until_step:
                        self.records.append(record)
        self._flushed = time.monotonic()
        self._writer = None

    def open_tensorboard(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self._writer = SummaryWriter(str(folder))

    def log(self, record: dict) -> None:
        self.records.append(record)
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._writer.add_scalar(key, value, record["step"])
                elif key == "gates" and value is not None:
                    for layer, g in enumerate(value):
                        g = float(np.mean(g))
                        self._writer.add_scalar(f"gate/layer{layer}", g, record["step"])
        if time.monotonic() - self._flushed > 30:
            self.flush()

    def flush(self) -> None:
        if not self.write:
            return
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        if self._writer is not None:
            self._writer.flush()
        self._flushed = time.monotonic()

    def close(self) -> None:
        if not self.write:
            return
        self.flush()
        if self._writer is not None:
            self._writer.close()


def _check_resume(run_dir: Path, new: dict) -> dict:
    """The saved config.json of `run_dir`; DsmrError when the new run config differs where it matters."""
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
    old_model = DSMRConfig.from_dict(old["model"]).to_dict() if "model" in old else None
    if old_model != new["model"] and not diffs:
        diffs.append("model config differs")
    if diffs:
        raise DsmrError(f"cannot resume {run_dir} with a different config: " + "; ".join(diffs))
    return old


def _val_pieces(cfg: TrainConfig, cache) -> list:
    if cfg.val_split is None:
        return []
    if cfg.val_split not in cache.splits:
        raise DsmrError(f"no split {cfg.val_split!r} to validate on in the cache {cache.path}; it has "
                        f"{', '.join(cache.splits)}")
    if cache.num_pieces(cfg.val_split) == 0:
        return []
    pieces = cache.pieces(cfg.val_split)
    return pieces[: cfg.val_pieces] if cfg.val_pieces else pieces


def total_steps(cfg: TrainConfig, stream) -> int:
    if cfg.steps is not None:
        return cfg.steps
    if cfg.epochs is not None:
        batches = sum(stream.count_batches(e) for e in range(cfg.epochs))
        return max(1, -(-batches // cfg.grad_accum))
    return DEFAULT_STEPS


class TrainStep(torch.nn.Module):
    """What one training forward computes: logits, the next state and, when weighted, the gate penalty.

    The penalty is computed inside the forward so that DistributedDataParallel sees every gradient path
    to the gate parameters (a gradient reaching a parameter outside DDP's forward breaks its reducer)."""

    def __init__(self, model: DSMR, with_penalty: bool):
        super().__init__()
        self.model = model
        self.with_penalty = with_penalty

    def forward(self, ids, positions, reset, state, token_mask):
        logits, new_state = self.model(ids, positions, reset, state, token_mask)
        return logits, new_state, self.model.gate_penalty() if self.with_penalty else None


def _to_device(batch, device: torch.device):
    """Host-to-device copy; on CUDA from pinned memory, so the copy is asynchronous."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def train(cfg: TrainConfig, cache, out_dir, progress: bool = True, resume: bool = False) -> dict:
    """Train a DSMR model on the train split of `cache` (a TokenCache) into the run folder `out_dir`.

    Returns the final validation result of dsmr.evaluate.evaluate (ppl, nll, tokens, pieces, tokens_per_s,
    peak_memory_bytes, state_bytes, nll_by_position; None values when the cache has no validation
    pieces) plus steps, epoch, train_loss (mean NLL of the last logged interval), train_tokens_per_s,
    train_peak_memory_bytes, train_state_bytes, best_val_nll, interrupted, world_size and run_dir.

    Under torchrun (or in a process group the caller initialized) every process calls this with the same
    arguments; each trains its share of the lanes (dsmr.distributed) and all return the same result.
    """
    cfg.validate()
    ctx = init_distributed(resolve_device(cfg.device))
    try:
        return _train(cfg, cache, Path(out_dir), progress, resume, ctx)
    finally:
        ctx.close()


def _prepare_run(run_dir: Path, config: dict, resume: bool, world_size: int) -> dict | None:
    """Rank 0's checks before training: the saved trainer state to resume from, or None for a fresh run."""
    if not resume:
        if (run_dir / CONFIG_FILE).exists() or (run_dir / TRAINER_STATE_FILE).exists():
            raise DsmrError(f"{run_dir} already holds a run: resume it (--resume) or choose another --out")
        return None
    remove_run_temporaries(run_dir)  # left by a save that was killed
    started = (run_dir / METRICS_FILE).exists() and not (run_dir / TRAINER_STATE_FILE).exists()
    if not (run_dir / CONFIG_FILE).exists() and started:
        # killed inside its first save, after metrics.jsonl and before config.json
        print(f"dsmr train: {run_dir} has no {CONFIG_FILE} (the run stopped in its first save); starting "
              f"it again from step 0", file=sys.stderr)
        return None
    _check_resume(run_dir, config)
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


def _train(cfg: TrainConfig, cache, run_dir: Path, progress: bool, resume: bool, ctx: DistContext) -> dict:
    device = ctx.device
    use_amp = cfg.amp and device.type == "cuda"
    tokenizer = cache.tokenizer
    if "train" not in cache.splits or cache.num_pieces("train") == 0:
        raise DsmrError(f"the cache {cache.path} has no training pieces")
    train_pieces = cache.pieces("train")
    val_pieces = _val_pieces(cfg, cache)
    model_cfg = make_model_config(cfg, tokenizer.vocab_size)
    config = run_config(cfg, model_cfg, tokenizer, cache)
    main = ctx.is_main

    saved = ctx.from_main(lambda: _prepare_run(run_dir, config, resume, ctx.world_size))

    _seed_everything(cfg.seed)
    model = DSMR(model_cfg).to(device)
    if ctx.enabled:  # same initial weights (DDP broadcasts rank 0's anyway), different dropout draws
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, ctx.rank]).generate_state(1)[0]))
    optimizer = make_optimizer(model, cfg, device)
    stream_cls = ExcerptStream if cfg.baseline else PieceStream
    stream = stream_cls(train_pieces, cfg.batch_size, cfg.segment_len, tokenizer.bos_id, tokenizer.eos_id,
                        tokenizer.pad_id, shuffle=True, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size)
    total = total_steps(cfg, stream)
    ctx.check_same("the run config and training data",
                   (config["train"], config["tokenizer_hash"], len(train_pieces),
                    int(stream.inputs_per_piece.sum()), len(val_pieces), total))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(500, total // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, cfg.min_lr_ratio))

    step, best_nll, state = 0, math.inf, None
    if saved is not None:
        # rank 0 loads the weights; DistributedDataParallel hands them to the other ranks
        ctx.from_main(lambda: resume_weights(model, run_dir, saved, device=str(device)))
        saved.pop("model", None)  # a copy of the weights: not needed any more
        check_optimizer_state(saved["optimizer"], optimizer, run_dir / TRAINER_STATE_FILE)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        stream.load_state_dict(saved["stream"])  # the shared lane assignment: the same on every rank
        mine = saved["ranks"][ctx.rank] if ctx.enabled else saved
        _set_rng_state(mine["rng"])
        state = _state_from_cpu(mine["memory"], device)
        step, best_nll = int(saved["step"]), float(saved["best_val_nll"])
        if saved.get("config", {}).get("val_pieces", cfg.val_pieces) != cfg.val_pieces:
            best_nll = math.inf  # measured on other validation pieces: not comparable with what follows

    with_penalty = bool(cfg.gate_lambda) and cfg.gate != "none"
    ddp = wrap_model(TrainStep(model, with_penalty), ctx, find_unused=cfg.gate != "none")
    forward = torch.compile(ddp) if cfg.compile else ddp

    metrics = _Metrics(run_dir / METRICS_FILE, keep_until_step=step if saved is not None else None, write=main)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.tensorboard:
            metrics.open_tensorboard(run_dir / "tb")
    eval_batch = cfg.eval_batch_size or cfg.batch_size
    special = dict(pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    save_every = cfg.save_every or cfg.eval_every or None
    val_share = [val_pieces[i] for i in split_pieces([len(p) for p in val_pieces], ctx.world_size)[ctx.rank]]

    def trainer_state() -> dict | None:
        """The resumable state (rank 0; None elsewhere). Distributed, every rank's recurrent state and
        RNG go into "ranks" (a collective: every rank calls this at the same step)."""
        mine = {"rng": _rng_state(), "memory": _state_to_cpu(state)}
        ranks = ctx.gather_to_main(mine)
        if not main:
            return None
        saved_state = {"step": step, "best_val_nll": best_nll, "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "stream": stream.state_dict(), **mine,
                       "config": config["train"], "world_size": ctx.world_size}
        if ctx.enabled:
            saved_state["ranks"] = [mine] + ranks[1:]
        return saved_state

    def save_latest() -> None:
        saved_state = trainer_state()
        if main:
            metrics.flush()  # first: every record up to the checkpoint's step is on disk before it exists
            save_checkpoint(run_dir, model, config, saved_state)

    def validate() -> dict | None:
        nonlocal best_nll
        if not val_pieces:
            return None
        training_horizons = model.active_horizons()
        model.set_horizons(model_cfg.horizons)  # evaluated with the full schedule, curriculum or not
        result = (evaluate(model, val_share, eval_batch, cfg.segment_len, device=device, amp=cfg.amp, **special)
                  if val_share else None)
        model.set_horizons(training_horizons)
        result = reduce_evaluation(result, ctx, len(NLL_BUCKETS))
        metrics.log({"step": step, "val_nll": result["nll"], "val_ppl": result["ppl"],
                     "val_tokens_per_s": result["tokens_per_s"]})
        if result["nll"] < best_nll:
            best_nll = result["nll"]
            if main:
                save_checkpoint(run_dir, model, config, {"step": step}, best=True)
        return dict(result, step=step)

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, disable=not (progress and main), unit="step", desc="train",
               dynamic_ncols=True)
    last_eval = validate() if cfg.eval_at_start and step == 0 and saved is None else None
    batches = iter(stream)
    interval = {"nll": 0.0, "targets": 0, "seconds": 0.0}
    train_targets, train_seconds, last_loss, interrupted = 0, 0.0, None, False
    saved_step = step if saved is not None else None
    resumed_from = step if saved is not None else None
    bpv = 2 if use_amp else 4
    model.train()
    with _StopRequest(distributed=ctx.enabled) as stop, PeakMemory(device) as train_memory:
        while step < total:
            if stop.requested and not ctx.enabled:
                interrupted = True
                break
            rewind = (stream.state_dict(), state, _rng_state())  # where a KeyboardInterrupt goes back to
            step_start = time.perf_counter()
            if cfg.horizon_warmup:
                model.set_horizons(horizons_at(step, model_cfg.horizons, cfg.horizon_warmup))
            try:
                micro = [next(batches) for _ in range(cfg.grad_accum)]
                n_targets = sum(b.num_targets for b in micro)
                if ctx.enabled:  # the loss divides by the targets of all ranks; ranks stop together
                    n_all, stops = ctx.all_sum([n_targets, stop.requested])
                    if stops:
                        stream.load_state_dict(rewind[0])
                        interrupted = True
                        break
                    n_targets = int(n_all)
                optimizer.zero_grad(set_to_none=True)
                nll_total = 0.0
                for i, batch in enumerate(micro):
                    batch = _to_device(batch, device)
                    # gradients are all-reduced once per optimizer step, after the last micro-batch
                    last = i == len(micro) - 1
                    with (ddp.no_sync() if ctx.enabled and not last else contextlib.nullcontext()):
                        with autocast(device, use_amp):
                            logits, new_state, penalty = forward(batch.ids, batch.positions, batch.reset, state,
                                                                 batch.token_mask)
                        nll = token_nll(logits, batch.targets)
                        loss = nll / max(n_targets, 1)
                        if ctx.enabled:
                            loss = loss * ctx.world_size  # DDP averages gradients over ranks
                        if penalty is not None:
                            loss = loss + cfg.gate_lambda * penalty / cfg.grad_accum
                        loss.backward()
                    state = [m.detached() for m in new_state]
                    nll_total += float(nll.detach())
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            except KeyboardInterrupt:
                if ctx.enabled:  # other ranks may be inside a collective: no way to save together
                    raise
                stream.load_state_dict(rewind[0])
                state = rewind[1]
                _set_rng_state(rewind[2])  # dropout may have drawn numbers in the unfinished step
                interrupted = True
                break
            optimizer.step()
            scheduler.step()
            step += 1
            seconds = time.perf_counter() - step_start  # time in training steps only (no evals, saves)
            train_seconds += seconds
            interval["seconds"] += seconds
            train_targets += n_targets
            interval["nll"] += nll_total
            interval["targets"] += n_targets
            bar.update(1)

            if step % cfg.log_every == 0 or step == total:
                elapsed = interval["seconds"]
                interval_nll = ctx.all_sum([interval["nll"]])[0]  # targets are already global
                last_loss = interval_nll / max(interval["targets"], 1)
                gates = model.gate_values()
                record = {"step": step, "epoch": stream.epoch, "loss": last_loss,
                          "lr": scheduler.get_last_lr()[0], "tokens": interval["targets"],
                          "tokens_per_s": interval["targets"] / elapsed if elapsed > 0 else None,
                          "gates": gates.cpu().tolist() if gates is not None else None}
                postfix = dict(loss=f"{last_loss:.3f}", tok_s=f"{record['tokens_per_s'] or 0:.0f}")
                if cfg.horizon_warmup:
                    record["horizons"] = list(model.active_horizons())
                    postfix["mem"] = "/".join(map(str, record["horizons"]))
                if resumed_from is not None:  # this interval began at the resume, not at a log boundary
                    record.update(resumed_from=resumed_from, interval_steps=step - resumed_from)
                    resumed_from = None
                metrics.log(record)
                bar.set_postfix(**postfix)
                interval = {"nll": 0.0, "targets": 0, "seconds": 0.0}
            if cfg.eval_every and step % cfg.eval_every == 0 and val_pieces:
                last_eval = validate()
                if progress and main:
                    bar.write(f"step {step}: val ppl {last_eval['ppl']:.3f} (nll {last_eval['nll']:.4f})",
                              file=sys.stderr)
            if save_every and step % save_every == 0:
                save_latest()
                saved_step = step
    bar.close()
    model.set_horizons(model_cfg.horizons)

    if not interrupted and val_pieces and (last_eval is None or last_eval["step"] != step):
        last_eval = validate()
        saved_step = None  # best_val_nll changed: the trainer state must record it
    if saved_step != step:
        save_latest()
    metrics.close()
    # the slowest rank sets the pace; peak memory is per process (the largest of any rank)
    train_seconds, train_peak = ctx.all_max([train_seconds, train_memory.peak_bytes])
    eval_fields = dict.fromkeys(("ppl", "nll", "tokens", "pieces", "tokens_per_s", "peak_memory_bytes",
                                 "nll_by_position"))
    eval_fields["state_bytes"] = state_bytes(model, 1, bpv)
    eval_fields.update({k: v for k, v in (last_eval or {}).items() if k != "step"})
    return {
        **eval_fields,
        "steps": step,
        "epoch": stream.epoch,
        "train_loss": last_loss,
        "train_tokens_per_s": train_targets / train_seconds if train_seconds else None,
        "train_peak_memory_bytes": int(train_peak),
        "train_memory_method": train_memory.method,
        "train_state_bytes": model_cfg.state_bytes(cfg.batch_size, bpv),
        "best_val_nll": best_nll if math.isfinite(best_nll) else None,
        "interrupted": interrupted,
        "world_size": ctx.world_size,
        "run_dir": str(run_dir),
    }
