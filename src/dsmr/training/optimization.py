"""One optimization step's parts: the learning-rate schedule, the horizon curriculum, the optimizer and its
parameter groups, and the module whose forward is the loss."""


from __future__ import annotations

import math

import torch

from dsmr.errors import DsmrError
from dsmr.model.network import DSMR
from dsmr.training.config import TrainConfig


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


class TrainingDiverged(DsmrError):
    """A non-finite loss or gradient: the run stops before the weights take it."""


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
