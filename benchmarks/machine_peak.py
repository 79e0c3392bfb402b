"""Shared by the benchmarks: this machine's measured float32 matmul peak, and the model FLOPs of one
training token of a DSMR model (for model-FLOP/s as a fraction of that peak, "MFU"); its measured read
bandwidth at a given working-set size (the roofline of one-token decoding, which reads every weight and the
whole recurrent state once per event).

    .venv/bin/python benchmarks/machine_peak.py --threads 2     # the peak alone, as JSON
    .venv/bin/python benchmarks/machine_peak.py --threads 1 --bandwidth 18000000
"""

from __future__ import annotations

import argparse
import json
import time


def matmul_peak(threads: int | None = None, n: int = 2048, repeats: int = 10) -> float:
    """Measured float32 FLOP/s of an n x n matmul on `threads` threads (torch's default: None); the best
    of `repeats` (other work on the machine only ever slows a repeat down)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / _best_seconds(lambda: a @ b, repeats)


def read_bandwidth(nbytes: int, threads: int | None = None, repeats: int = 20) -> float:
    """Measured bytes/s of reading a float32 buffer of `nbytes` over and over (a vectorised sum, so the
    read is all the work), the best of `repeats`: a buffer that fits a cache level is read from it, as a
    decoder's weights and state are from one token to the next."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    buffer = torch.ones(max(nbytes // 4, 1))
    return buffer.numel() * 4 / _best_seconds(buffer.sum, repeats)


def _best_seconds(run, repeats: int) -> float:
    """The fastest of `repeats` timed calls of `run`, after one untimed warm-up call (other work on the
    machine only ever slows a call down)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def training_flops_per_token(cfg, segment: int, horizons=None) -> float:
    """Model FLOPs of one training token, forward + backward (= 3 x forward), of a DSMRConfig-like `cfg`
    (d_model, n_layers, attn_dim, ff_dim, vocab_size, memory) with per-layer memory `horizons` (default
    cfg.horizons) and segments of `segment` tokens: the matmuls of the projections, MLP and head, and
    attention (scores and weighted values) over the layer's memory plus the causal half of the segment.
    Hidden memory also projects its memory to keys and values again every segment (h_l / T per token).
    Norms, softmax, embeddings and the optimizer are not counted (the usual MFU convention)."""
    d, a = cfg.d_model, cfg.attn_dim
    horizons = cfg.horizons if horizons is None else horizons
    per_layer = d * 3 * a + a * d + 2 * d * cfg.ff_dim  # weights multiplied once per token
    forward = 2 * (len(horizons) * per_layer + d * cfg.vocab_size)
    for h in horizons:
        forward += 2 * 2 * a * (h + segment / 2)
        if getattr(cfg, "memory", "kv") == "hidden":
            forward += 2 * d * 2 * a * h / segment
    return 3 * forward


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--bandwidth", type=int, metavar="BYTES", help="also the read bandwidth at this working set")
    args = parser.parse_args()
    result = {"threads": args.threads, "matmul_peak_flops": matmul_peak(args.threads)}
    if args.bandwidth:
        result["read_bytes_per_s"] = read_bandwidth(args.bandwidth, args.threads)
    print(json.dumps(result))
