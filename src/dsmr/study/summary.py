"""One row per variant from the results of its seeds: means, spreads and the ratios to the reference."""

from __future__ import annotations


from dsmr.errors import DsmrError
from dsmr.model.config import DSMRConfig
from dsmr.study.variants import REFERENCE


def summarize(records: list[dict]) -> list[dict]:
    """One row per variant: the mean over seeds of each figure, the per-seed PPLs, ratios against `full`."""
    rows: dict[str, dict] = {}
    for r in records:
        rows.setdefault(r["variant"], {"variant": r["variant"], "runs": []})["runs"].append(r)
    out = []
    for row in rows.values():
        runs = row["runs"]
        first = runs[0]
        out.append({
            "variant": row["variant"], "description": first["description"], "horizons": first["horizons"],
            "budget": first["budget"], "context": first.get("context"), "seeds": [r["seed"] for r in runs],
            "val_ppl": mean(r["val_ppl"] for r in runs), "val_ppl_runs": [r["val_ppl"] for r in runs],
            "val_ppl_spread": spread([r["val_ppl"] for r in runs]),
            "val_all_ppl": mean(r.get("val_all_ppl") for r in runs),
            "val_all_ppl_runs": [r.get("val_all_ppl") for r in runs],
            "test_ppl": mean(r.get("test_ppl") for r in runs),
            "val_all_nll_per_note": mean(r.get("val_all_nll_per_note") for r in runs),
            "test_nll_per_note": mean(r.get("test_nll_per_note") for r in runs),
            "train_tokens_per_s": mean(r["train_tokens_per_s"] for r in runs),
            "train_peak_memory_bytes": mean(r["train_peak_memory_bytes"] for r in runs),
            "state_bytes": first["state_bytes"], "gpu_bytes": gpu_bytes(first),
        })
    ref = next((r for r in out if r["variant"] == REFERENCE), None)
    for row in out:
        for key in ("val_ppl", "train_tokens_per_s", "train_peak_memory_bytes", "state_bytes", "gpu_bytes"):
            row[f"{key}_vs_full"] = ratio(row[key], ref[key]) if ref else None
    return out


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def spread(values) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) - min(values) if len(values) > 1 else None


def ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def gpu_bytes(record: dict) -> int | None:
    """The activations and state a GPU would hold for one training step of the variant, analytically
    (DSMRConfig.training_bytes at bf16, logits left out: the same for every variant); None where the record
    lacks the model's options."""
    tc = record.get("train_config") or {}
    try:
        cfg = DSMRConfig(vocab_size=1, n_layers=tc["layers"], d_model=tc["d_model"], n_heads=tc["heads"],
                         d_ff=tc.get("d_ff"), head_dim=tc.get("head_dim"), horizons=tuple(record["horizons"]),
                         memory=tc.get("memory") or "kv")
        batch, segment = tc["batch_size"], tc["segment"]
    except (KeyError, TypeError, DsmrError):
        return None
    if record.get("context"):  # the excerpt baseline: fewer, longer rows, the same tokens per step
        batch, segment = max(1, batch * segment // record["context"]), record["context"]
    return cfg.training_bytes(batch, segment, vocab=False)
