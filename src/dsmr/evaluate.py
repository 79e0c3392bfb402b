"""Full-piece evaluation: perplexity over every token of every piece, NLL by position, efficiency meters.

Pieces are streamed left to right with the model's own schedule (a PieceStream without shuffling), so a
token is predicted from exactly the context it would have at training time: its memory horizons plus the
segment so far. A model trained on fixed-length excerpts (horizons 0) is evaluated the same way with
`segment_len` = its context: non-overlapping windows.

Peak memory (`peak_memory_bytes`, `memory_method` says which):
  * CUDA: `torch.cuda.max_memory_allocated` after a reset of the peak counter: bytes held by tensors,
    weights included.
  * CPU (Linux): the rise of the process's resident-set high-water mark (VmHWM, reset through
    /proc/self/clear_refs) above its resident size when the measurement starts: the memory the measured
    work itself needed, without the interpreter and libraries already loaded. Memory the allocator kept
    from earlier work in the same process is reused without counting, so compare runs made in fresh
    processes (the benchmark does).
  * elsewhere: the same rise, from a thread sampling the resident size every 5 ms (psutil).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dsmr.errors import DsmrError
from dsmr.stream import IGNORE_INDEX, PieceStream

# Left edges of the position-in-piece buckets; the last bucket is open-ended.
NLL_BUCKETS = (0, 512, 2048, 8192)


class PeakMemory:
    """Measures the peak memory of a block: `with PeakMemory(device) as m: ...; m.peak_bytes`.

    Meters nest (an evaluation inside a training run): resetting the process-wide peak counter for an
    inner meter first hands the counter's value to the meters already running.
    """

    _active: list["PeakMemory"] = []

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.method = ""
        self._carried = 0  # the peak counter's value before an inner meter reset it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _counter(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return _hwm_bytes() if self.method == "cpu_rss_high_water_mark_rise" else 0

    def __enter__(self) -> "PeakMemory":
        for outer in PeakMemory._active:
            outer._carried = max(outer._carried, outer._counter())
        PeakMemory._active.append(self)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda_max_memory_allocated"
            return self
        self._start_rss = _rss_bytes()
        if _reset_hwm():
            self.method = "cpu_rss_high_water_mark_rise"
            return self
        self.method = "cpu_rss_sampled_rise"
        self._sampled = self._start_rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, _rss_bytes())

    def __exit__(self, *exc) -> None:
        PeakMemory._active.remove(self)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(self._carried, self._counter())
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(0, max(self._sampled, _rss_bytes()) - self._start_rss)
        else:
            self.peak_bytes = max(0, max(self._carried, self._counter()) - self._start_rss)


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False where unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _hwm_bytes() > 0
    except OSError:
        return False


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise DsmrError(f"unknown device {device!r}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DsmrError(f"device {device} requested but CUDA is not available")
    return device


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op elsewhere (CPU runs stay fp32 and reproducible)."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def state_bytes(model, batch: int = 1, bytes_per_value: int | None = None) -> int:
    """Bytes of the model's recurrent state for `batch` lanes (its schedule at the parameters' dtype)."""
    if bytes_per_value is None:
        bytes_per_value = next(model.parameters()).element_size()
    return model.cfg.state_bytes(batch, bytes_per_value)


@torch.no_grad()
def evaluate(model, pieces: Sequence[np.ndarray], batch_size: int, segment_len: int, *, pad_id: int = 0,
             bos_id: int = 1, eos_id: int = 2, device: str | torch.device | None = None, amp: bool = True,
             buckets: Sequence[int] = NLL_BUCKETS, progress: bool = False) -> dict:
    """Perplexity of `model` over every token of `pieces` (event ids without BOS/EOS), streamed in full.

    The position of a target is its index in the piece's target sequence (0 = the first event, predicted
    from BOS alone). Returns ppl, nll, tokens, pieces, tokens_per_s, seconds, peak_memory_bytes,
    memory_method, state_bytes (per lane), state_bytes_batch, and nll_by_position: one entry per bucket
    with start, end (None = open), tokens, nll and ppl (None for an empty bucket).
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
                nll = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(),
                                      ignore_index=IGNORE_INDEX, reduction="none")
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
    nll = sum(nll_sum) / tokens
    bpv = 2 if use_amp else None
    by_position = []
    edges_out = list(buckets) + [None]
    for i in range(n_buckets):
        b_nll = nll_sum[i] / counts[i] if counts[i] else None
        by_position.append({"start": edges_out[i], "end": edges_out[i + 1], "tokens": int(counts[i]),
                            "nll": b_nll, "ppl": math.exp(b_nll) if b_nll is not None else None})
    return {
        "ppl": math.exp(nll), "nll": nll, "tokens": tokens, "pieces": len(pieces),
        "tokens_per_s": tokens / seconds if seconds > 0 else float("inf"), "seconds": seconds,
        "peak_memory_bytes": meter.peak_bytes, "memory_method": meter.method,
        "state_bytes": state_bytes(model, 1, bpv), "state_bytes_batch": state_bytes(model, batch_size, bpv),
        "batch_size": batch_size, "segment_len": segment_len, "horizons": list(model.cfg.horizons),
        "device": str(device), "nll_by_position": by_position,
    }


def format_report(result: dict, title: str = "evaluation") -> str:
    """A short human-readable summary of an `evaluate` result."""
    mib = 1024 * 1024
    lines = [
        f"{title}: ppl {result['ppl']:.4f}  nll {result['nll']:.4f}  "
        f"({result['tokens']} tokens, {result['pieces']} pieces)",
        f"speed: {result['tokens_per_s']:.0f} tokens/s on {result['device']}  "
        f"peak memory: {result['peak_memory_bytes'] / mib:.1f} MiB ({result['memory_method']})  "
        f"state: {result['state_bytes'] / mib:.2f} MiB per lane",
        "NLL by position in piece:",
    ]
    for b in result["nll_by_position"]:
        end = "inf" if b["end"] is None else b["end"]
        value = f"nll {b['nll']:.4f}  ppl {b['ppl']:.3f}" if b["nll"] is not None else "-"
        lines.append(f"  [{b['start']:>6}, {end:>6})  {b['tokens']:>10} tokens  {value}")
    return "\n".join(lines)

