"""The token loss and its summaries, shared by training, evaluation and the multi-process reduction."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from dsmr.data.stream import IGNORE_INDEX


def token_nll(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy (nats) of logits [B, T, V] against targets [B, T], in float32, skipping IGNORE_INDEX
    targets (padding). `reduction` as in F.cross_entropy: "sum", "mean" or "none" (one value per target,
    flattened to B*T, 0 where ignored)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def ppl_by_bucket(nll_sums: Sequence[float], counts: Sequence[float], starts: Sequence[int]) -> tuple[float, list]:
    """Mean NLL over all buckets and one entry per bucket (start, end (None = open), tokens, nll, ppl; nll and
    ppl None for an empty bucket) from per-bucket NLL sums and token counts; `starts` are the buckets' left
    edges, the last bucket open-ended."""
    tokens = sum(counts)
    nll = sum(nll_sums) / tokens
    ends = list(starts[1:]) + [None]
    by_position = []
    for start, end, s, c in zip(starts, ends, nll_sums, counts):
        b_nll = s / c if c else None
        by_position.append({"start": start, "end": end, "tokens": int(c), "nll": b_nll,
                            "ppl": math.exp(b_nll) if b_nll is not None else None})
    return nll, by_position
