"""Full-piece evaluation: perplexity over every token of every piece, NLL by position, efficiency meters.

Pieces are streamed left to right with the model's own schedule (a PieceStream without shuffling), so a
token is predicted from exactly the context it would have at training time: its memory horizons plus the
segment so far. A model trained on fixed-length excerpts (horizons 0) is evaluated the same way with
`segment_len` = its context: non-overlapping windows.

Peak memory (`peak_memory_bytes`, `memory_method` says which) is measured by dsmr.core.runtime.PeakMemory; its
docstring says how on each device.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import torch

from dsmr.errors import DsmrError
from dsmr.model.losses import ppl_by_bucket, token_nll
from dsmr.core.runtime import PeakMemory, autocast, resolve_device, state_bytes
from dsmr.data.stream import IGNORE_INDEX, PieceStream

# Left edges of the position-in-piece buckets; the last bucket is open-ended.
NLL_BUCKETS = (0, 512, 2048, 8192)


@torch.no_grad()
def evaluate(model, pieces: Sequence[np.ndarray], batch_size: int, segment_len: int, *, pad_id: int = 0,
             bos_id: int = 1, eos_id: int = 2, device: str | torch.device | None = None, amp: bool = True,
             buckets: Sequence[int] = NLL_BUCKETS, notes: int | None = None, progress: bool = False) -> dict:
    """Perplexity of `model` over every token of `pieces` (event ids without BOS/EOS), streamed in full.

    The position of a target is its index in the piece's target sequence (0 = the first event, predicted
    from BOS alone). Returns ppl, nll, tokens, pieces, tokens_per_s, seconds, peak_memory_bytes,
    memory_method, state_bytes (per lane), state_bytes_batch, and nll_by_position: one entry per bucket
    with start, end (None = open), tokens, nll and ppl (None for an empty bucket).

    `notes` (the notes the pieces hold, `tokenizer.count_notes(pieces)`) adds `notes` and `nll_per_note`:
    the total NLL over the split divided by its notes, the scale on which models in encodings with different
    tokens per note compare (`per_note`).
    """
    if len(pieces) == 0:
        raise DsmrError("evaluate: no pieces to evaluate")
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    use_amp = amp and device.type == "cuda"
    model_was_training = model.training
    model.eval()
    stream = PieceStream(pieces, batch_size, segment_len, bos_id, eos_id, pad_id, shuffle=False)
    edges = torch.tensor(list(buckets)[1:], device=device)
    n_buckets = len(buckets)
    nll_sum = torch.zeros(n_buckets, dtype=torch.float64, device=device)
    counts = torch.zeros(n_buckets, dtype=torch.float64, device=device)
    batches = stream.epoch_batches()
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=stream.count_batches(), desc="eval", unit="seg", leave=False)
    state = None
    start = time.perf_counter()
    try:
        with PeakMemory(device) as meter:
            for batch in batches:
                batch = batch.to(device, non_blocking=True)
                with autocast(device, use_amp):
                    logits, state = model(batch.ids, batch.positions, batch.reset, state, batch.token_mask)
                nll = token_nll(logits, batch.targets, reduction="none")
                keep = batch.targets.flatten() != IGNORE_INDEX
                bucket = torch.bucketize(batch.positions.flatten()[keep], edges, right=True)
                nll_sum.index_add_(0, bucket, nll[keep].double())
                counts.index_add_(0, bucket, torch.ones_like(bucket, dtype=torch.float64))
            del state
    finally:
        model.train(model_was_training)
    seconds = time.perf_counter() - start
    nll_sum, counts = nll_sum.cpu().tolist(), counts.cpu().tolist()
    tokens = int(sum(counts))
    nll, by_position = ppl_by_bucket(nll_sum, counts, list(buckets))
    bpv = 2 if use_amp else None
    return {
        "ppl": math.exp(nll), "nll": nll, "tokens": tokens, "pieces": len(pieces),
        "tokens_per_s": tokens / seconds if seconds > 0 else float("inf"), "seconds": seconds,
        "peak_memory_bytes": meter.peak_bytes, "memory_method": meter.method,
        "state_bytes": state_bytes(model, 1, bpv), "state_bytes_batch": state_bytes(model, batch_size, bpv),
        "batch_size": batch_size, "segment_len": segment_len, "horizons": list(model.cfg.horizons),
        "device": str(device), "nll_by_position": by_position, **per_note(nll, tokens, notes),
    }


def per_note(nll: float, tokens: int, notes: int | None) -> dict:
    """`notes` and `nll_per_note` (total NLL / notes, nats) from a mean NLL per token; {} without notes."""
    if not notes:
        return {}
    return {"notes": int(notes), "nll_per_note": nll * tokens / notes}


def format_report(result: dict, title: str = "evaluation") -> str:
    """A short human-readable summary of an `evaluate` result."""
    mib = 1024 * 1024
    lines = [
        f"{title}: ppl {result['ppl']:.4f}  nll {result['nll']:.4f}  "
        f"({result['tokens']} tokens, {result['pieces']} pieces)"
        + (f"\nper note: {result['nll_per_note']:.4f} nats ({result['notes']} notes, "
           f"{result['tokens'] / result['notes']:.2f} tokens per note)" if result.get("notes") else ""),
        f"speed: {result['tokens_per_s']:.0f} tokens/s on {result['device']}  "
        + (f"peak memory: {result['peak_memory_bytes'] / mib:.1f} MiB ({result['memory_method']})  "
           if result["peak_memory_bytes"] else "peak memory: no more than the process already held  ")
        + f"state: {result['state_bytes'] / mib:.2f} MiB per lane",
        "NLL by position in piece:",
    ]
    for b in result["nll_by_position"]:
        end = "inf" if b["end"] is None else b["end"]
        value = f"nll {b['nll']:.4f}  ppl {b['ppl']:.3f}" if b["nll"] is not None else "-"
        lines.append(f"  [{b['start']:>6}, {end:>6})  {b['tokens']:>10} tokens  {value}")
    return "\n".join(lines)

