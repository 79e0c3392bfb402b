"""The study's figures (matplotlib): schedules, PPL against memory and state, validation curves, gates."""

from __future__ import annotations

from pathlib import Path

from dsmr.core.atomic import atomic_path
from dsmr.study.summary import summarize


def plot_all(records: list[dict], folder) -> list[Path]:
    """The study's figures as PNG files in `folder` (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (("schedules", _plot_schedules), ("ppl_vs_memory", _plot_ppl_vs_memory),
                       ("val_curves", _plot_val_curves), ("gates", _plot_gates)):
        fig = draw(plt, records)
        if fig is None:
            continue
        path = folder / f"{name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _memory_rows(records):
    return [r for r in summarize(records) if not r["context"]]


def _plot_schedules(plt, records):
    """Layer x variant grid, each cell shaded and labelled with the layer's horizon."""
    import numpy as np

    rows = _memory_rows(records)
    if not rows:
        return None
    grid = np.array([row["horizons"] for row in rows], dtype=float).T  # [layers, variants]
    n_layers = grid.shape[0]
    fig, ax = plt.subplots(figsize=(1.1 * len(rows) + 2, 0.55 * n_layers + 1.6))
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap="Blues", vmin=0, vmax=max(grid.max(), 1))
    for layer in range(n_layers):
        for j in range(len(rows)):
            h = int(grid[layer, j])
            dark = grid[layer, j] > 0.6 * grid.max()
            ax.text(j, layer, str(h), ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(rows)), [f"{r['variant']}\n(B={r['budget']})" for r in rows], rotation=45,
                  ha="right", fontsize=8)
    ax.set_yticks(range(n_layers), [f"layer {i}" for i in range(n_layers)], fontsize=8)
    ax.set_title("memory horizon h_l per layer (KV positions)")
    fig.colorbar(image, ax=ax, label="horizon")
    return fig


PALETTE = [f"C{i}" for i in range(10) if i != 7]  # matplotlib's cycle without its gray (the baseline's)


def _plot_ppl_vs_memory(plt, records):
    """The paper's Figure 4 and its companions: PPL against peak training memory (measured, and analytic for a
    GPU), recurrent-state size and training throughput. PPL over the whole validation split where every
    variant has it, else over the pieces validated during training."""
    rows = [r for r in summarize(records) if r["val_ppl"] is not None]
    if not rows:
        return None
    whole = all(r["val_all_ppl"] is not None for r in rows)
    ppl, runs = ("val_all_ppl", "val_all_ppl_runs") if whole else ("val_ppl", "val_ppl_runs")
    mib = 1024 * 1024
    markers = "osD^v<>pP*hX"
    fig, axes = plt.subplots(2, 2, figsize=(12, 9), sharey=True)
    panels = (("train_peak_memory_bytes", mib, "peak training memory (MiB, measured)"),
              ("gpu_bytes", mib, "GPU activations + state per step (MiB, analytic, bf16)"),
              ("state_bytes", 1024, "recurrent state per lane (KiB, fp32)"),
              ("train_tokens_per_s", 1, "training tokens/s"))
    for ax, (key, unit, label) in zip(axes.flat, panels):
        for i, row in enumerate(rows):
            if row[key] is None:
                continue
            if row["context"]:  # the excerpt baseline: a reference line too
                ax.axhline(row[ppl], color="gray", linestyle="--", linewidth=1)
            # one marker and colour per variant, named in the legend: many variants share an x
            color = "gray" if row["context"] else PALETTE[i % len(PALETTE)]
            values = [v for v in row[runs] if v is not None]
            lo, hi = min(values), max(values)
            name = f"{row['variant']} ({row['context']} tokens)" if row["context"] else row["variant"]
            ax.errorbar(row[key] / unit, row[ppl], yerr=[[row[ppl] - lo], [hi - row[ppl]]],
                        fmt=markers[i % len(markers)], color=color, capsize=3, markersize=7, label=name)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    which = "whole validation split" if whole else "validation pieces"
    for ax in axes[:, 0]:
        ax.set_ylabel(f"PPL, {which} (bars: range over seeds)")
    axes[0, 1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("quality against memory and speed (dashed: the full-attention excerpt baseline)")
    fig.tight_layout()
    return fig


def _plot_val_curves(plt, records):
    curves = [r for r in records if r.get("val_curve")]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    names = list(dict.fromkeys(r["variant"] for r in curves))
    seeds = sorted({r["seed"] for r in curves})
    styles = ["-", "--", ":", "-."]
    for r in curves:
        color = f"C{names.index(r['variant']) % 10}"
        style = styles[seeds.index(r["seed"]) % len(styles)]
        steps = [p["step"] for p in r["val_curve"]]
        ppl = [p["val_ppl"] for p in r["val_curve"]]
        label = r["variant"] if r["seed"] == seeds[0] else None
        ax.plot(steps, ppl, style, color=color, marker="o", markersize=3, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation PPL")
    title = "validation PPL over training"
    if len(seeds) > 1:
        title += " (" + ", ".join(f"seed {s}: {styles[i % len(styles)]}" for i, s in enumerate(seeds)) + ")"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return fig


def _plot_gates(plt, records):
    import numpy as np

    gated = [r for r in records if r.get("gate_curve")]
    if not gated:
        return None
    fig, axes = plt.subplots(1, len(gated), figsize=(5 * len(gated), 4), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], gated):
        steps = [p["step"] for p in r["gate_curve"]]
        values = np.array([np.mean(np.asarray(p["gates"], dtype=float).reshape(len(p["gates"]), -1), axis=1)
                           for p in r["gate_curve"]])  # [points, layers] (heads averaged)
        for layer in range(values.shape[1]):
            ax.plot(steps, values[:, layer], label=f"layer {layer}")
        if r.get("gate") == "ste":
            ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)  # below it the hard gate drops the memory
        ax.set_title(f"{r['variant']} (seed {r['seed']})")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("gate g = sigmoid(theta)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("learned memory gates per layer")
    return fig
