"""Paired comparisons of placements: every seed of a study reads the same data in the same order, so two
variants compare seed by seed. For each pair, the per-seed differences of a figure, their mean, a 95%
t-interval and an exact two-sided sign-flip (permutation) test of the mean; and the per-note figures that a
study records (or that `with_notes` fills in from the cache).
"""

from __future__ import annotations

import itertools
import math

# Student's t, 97.5% quantile, by degrees of freedom: the half-width of a 95% interval is t * sd / sqrt(n)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 20: 2.086, 30: 2.042}
# the placements that share one budget, in the order the comparison tables list them
PLACEMENTS = ("two-scale", "two-scale-inverse", "uniform", "binary-lower", "binary-upper")


def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """`a` minus `b` over the seeds both have: differences, mean, 95% t-interval (None with one seed) and the
    exact sign-flip p-value of the mean (the smallest it can be with n seeds is 2 / 2^n)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [a[s] - b[s] for s in seeds]
    n, m = len(d), sum(d) / len(d)
    low = high = None
    if n > 1:
        sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
        t = T_975.get(n - 1) or T_975[max(k for k in T_975 if k <= n - 1)]
        low, high = m - t * sd / math.sqrt(n), m + t * sd / math.sqrt(n)
    flips = [sum(s * x for s, x in zip(signs, d)) / n for signs in itertools.product((1, -1), repeat=n)]
    p = sum(abs(f) >= abs(m) - 1e-12 for f in flips) / len(flips)
    return {"seeds": seeds, "differences": d, "mean": m, "low": low, "high": high, "p_sign_flip": p,
            "same_sign": all(x > 0 for x in d) or all(x < 0 for x in d)}


def by_seed(records: list[dict], variant: str, key: str) -> dict[int, float]:
    return {r["seed"]: r[key] for r in records if r["variant"] == variant and r.get(key) is not None}


def comparisons(records: list[dict], key: str, variants=PLACEMENTS) -> list[dict]:
    """Every pair of `variants` with a seed in common: {"a", "b", **paired_difference} of `key`."""
    present = [v for v in variants if by_seed(records, v, key)]
    out = []
    for a, b in itertools.combinations(present, 2):
        diff = paired_difference(by_seed(records, a, key), by_seed(records, b, key))
        if diff is not None:
            out.append({"a": a, "b": b, **diff})
    return out


def comparison_table(records: list[dict], key: str, label: str) -> list[str]:
    """A Markdown table of `comparisons` (empty when no pair shares a seed)."""
    rows = comparisons(records, key)
    if not rows:
        return []
    lines = [f"Paired differences of {label} (a - b; negative: a is better), per seed, with their mean, 95% "
             "t-interval and exact sign-flip p-value", "",
             "| a | b | seeds | a - b per seed | mean | 95% interval | p (sign flip) |", "|---|---|---:|---|---:|---|---:|"]
    for r in rows:
        interval = "-" if r["low"] is None else f"[{r['low']:+.3f}, {r['high']:+.3f}]"
        lines.append(f"| `{r['a']}` | `{r['b']}` | {len(r['seeds'])} | "
                     + " / ".join(f"{x:+.3f}" for x in r["differences"])
                     + f" | {r['mean']:+.3f} | {interval} | {r['p_sign_flip']:.3f} |")
    return lines + [""]


def with_notes(records: list[dict], cache) -> list[dict]:
    """Records with val_all_/test_ `notes` and `nll_per_note` filled in from `cache` where they lack them
    (results of studies run before the per-note figures), each checked to cover exactly that split's
    tokens. The total NLL is the mean per token times the tokens."""
    notes, tokens = {}, {}
    for split in ("validation", "test"):
        if split in cache.splits:
            pieces = cache.pieces(split)
            notes[split] = cache.tokenizer.count_notes(pieces)
            tokens[split] = sum(len(p) + 1 for p in pieces)
    out = []
    for record in records:
        record = dict(record)
        for prefix, split in (("val_all", "validation"), ("test", "test")):
            nll, count = record.get(f"{prefix}_nll"), record.get(f"{prefix}_tokens")
            if record.get(f"{prefix}_nll_per_note") is None and nll is not None and count == tokens.get(split):
                record[f"{prefix}_notes"] = notes[split]
                record[f"{prefix}_nll_per_note"] = nll * count / notes[split]
        out.append(record)
    return out
