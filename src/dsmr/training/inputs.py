"""What a run reads and how it stops: the validation pieces, the training stream of lanes, the number of
steps, the seeds, and a stop requested by SIGINT/SIGTERM (finish the step, save, exit)."""


from __future__ import annotations

import random
import signal
import threading

import numpy as np
import torch

from dsmr.data.augment import PieceAugmenter
from dsmr.errors import DsmrError
from dsmr.data.stream import ExcerptStream, PieceStream
from dsmr.training.config import DEFAULT_STEPS, TrainConfig


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def training_stream(cfg: TrainConfig, pieces, tokenizer, rank: int = 0, world_size: int = 1):
    """The shuffled training batches: excerpts for the baseline, otherwise full-piece lanes that refill
    across epoch boundaries (every batch full)."""
    common = dict(shuffle=True, seed=cfg.seed, rank=rank, world_size=world_size)
    ids = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    if cfg.baseline:
        return ExcerptStream(pieces, cfg.batch_size, cfg.segment_len, *ids, **common)
    return PieceStream(pieces, cfg.batch_size, cfg.segment_len, *ids, refill=True,
                       augment=PieceAugmenter(cfg.augmentation, tokenizer), **common)


def total_steps(cfg: TrainConfig, stream) -> int:
    if cfg.steps is not None:
        return cfg.steps
    if cfg.epochs is not None:
        return max(1, -(-stream.steps_for_epochs(cfg.epochs) // cfg.grad_accum))
    return DEFAULT_STEPS
