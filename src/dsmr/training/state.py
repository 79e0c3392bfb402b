"""The trainer's bookkeeping: the current logging interval and the state a run carries between steps."""


from __future__ import annotations

import math
from dataclasses import dataclass, field


from dsmr.model.memory import LayerMemory


@dataclass
class Interval:
    """Training figures since the last metrics record."""

    nll: float = 0.0      # summed over this rank's targets
    targets: int = 0      # of every rank
    seconds: float = 0.0


@dataclass
class TrainerState:
    """Where a run stands. step, best_nll and memory go into trainer_state.pt (with the optimizer, the LR
    schedule, the stream position and the RNG states); the rest is this process's account of the run."""

    step: int = 0
    best_nll: float = math.inf
    memory: list[LayerMemory] | None = None   # the recurrent state carried into the next segment batch
    interval: Interval = field(default_factory=Interval)
    train_targets: int = 0
    train_seconds: float = 0.0                # in optimization steps only (no validations, no saves)
    last_loss: float | None = None            # mean NLL of the last logged interval
    last_eval: dict | None = None             # the last validation result, with its step
    saved_step: int | None = None             # the step of the last resumable save
    resumed_from: int | None = None           # the step a resume began at, until the first record after it
    interrupted: bool = False
