"""Recipe and memory ablations on the study setting: one change at a time, each a `dsmr train` run.

    python benchmarks/recipe_ablation.py --cache runs/cache/maestro-... --out runs/ablation --variants base,untied
    python benchmarks/recipe_ablation.py --out runs/ablation --table docs/ablation.md   # tabulate what finished

Every variant trains the study's model (4 layers, d_model 128, 4 heads, segment 128, 8 lanes, lr 1e-3, AdamW
(0.9, 0.95), weight decay 0.1, 5% warmup, cosine to 0.1x, clip 1, seed 0) for --steps steps, validating on
the first 6 validation pieces, each in its own process (`--threads 1`). A finished variant
(OUT/NAME.json) is not trained again, so several invocations with disjoint --variants can share the cores.
The table gives parameters, validation PPL and its difference to the variant's reference (`base` for
`none` models, `full` for memory models), and training tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

STUDY = ["--layers", "4", "--d-model", "128", "--heads", "4", "--segment", "128", "--batch-size", "8",
         "--lr", "1e-3", "--eval-every", "400", "--val-pieces", "6", "--threads", "1", "--no-tensorboard",
         # the recipe the study was published with; variants override these (the last option wins)
         "--tie-embeddings", "--memory", "kv", "--init-std", "0.02"]
NONE = ["--schedule", "none"]
FULL = ["--schedule", "full", "--horizon", "512"]
TWO_SCALE = ["--schedule", "two-scale", "--budget", "1152", "--long-layers", "2", "--short", "64"]
ADOPTED = ["--head-dim", "64", "--no-tie-embeddings"]  # what the recipe ablation adopted (docs/training.md)

# name: (what changes, reference variant, options)
VARIANTS = {
    "base": ("the study's recipe (tied head, head dim 32), no memory", "base", NONE),
    "untied": ("untied output head", "base", NONE + ["--no-tie-embeddings"]),
    "head64": ("head dim 64 (attention width 256)", "base", NONE + ["--head-dim", "64"]),
    "head64-ff256": ("head dim 64, feed-forward 256: the parameters of base", "base",
                     NONE + ["--head-dim", "64", "--d-ff", "256"]),
    "init04": ("init std 0.04", "base", NONE + ["--init-std", "0.04"]),
    "init08": ("init std 0.08", "base", NONE + ["--init-std", "0.08"]),
    "lr2e-3": ("learning rate 2e-3", "base", NONE + ["--lr", "2e-3"]),
    "beta2-0.99": ("AdamW beta2 0.99", "base", NONE + ["--betas", "0.9,0.99"]),
    "warmup10": ("warmup 10% of the steps", "base", NONE + ["--warmup-steps", "240"]),
    "rope-half": ("rotary on half of each head's dims", "base", NONE + ["--rotary-fraction", "0.5"]),
    "no-emb-decay": ("no weight decay on the embedding", "base", NONE + ["--no-embedding-decay"]),
    "rmsnorm": ("RMSNorm instead of LayerNorm", "base", NONE + ["--norm", "rmsnorm"]),
    "adopted": ("head dim 64 + untied head, no memory", "base", NONE + ADOPTED),
    "adopted-init04": ("adopted recipe, init std 0.04, no memory", "adopted", NONE + ADOPTED + ["--init-std", "0.04"]),
    # memory
    "full": ("the study's recipe, full memory 512 (kv)", "full", FULL),
    "full-hidden": ("full memory 512, hidden (re-projected)", "full", FULL + ["--memory", "hidden"]),
    "full-head64": ("full memory 512 (kv), head dim 64", "full", FULL + ["--head-dim", "64"]),
    "adopted-full": ("adopted recipe, full memory 512 (kv)", "adopted", FULL + ADOPTED),
    "adopted-full-hidden": ("adopted recipe, full memory 512 (hidden)", "adopted", FULL + ADOPTED + ["--memory", "hidden"]),
    "init04-two-scale": ("init std 0.04, two-scale 512,512,64,64 (hidden)", "init04",
                         TWO_SCALE + ["--init-std", "0.04", "--memory", "hidden"]),
    "adopted-two-scale": ("adopted recipe, two-scale 512,512,64,64", "adopted", TWO_SCALE + ADOPTED),
    "adopted-full-curriculum": ("adopted recipe, full memory 512 (hidden), horizons grown over the first half",
                                "adopted", FULL + ADOPTED + ["--memory", "hidden", "--horizon-warmup", "1200"]),
}


def run_name(name: str, seed: int) -> str:
    """Seed 0 keeps the plain name, so results from before seeds were added still count."""
    return name if seed == 0 else f"{name}-seed{seed}"


def run_variant(name: str, cache: str, out: Path, steps: int, seed: int) -> None:
    result = out / f"{run_name(name, seed)}.json"
    if result.is_file():
        return
    _, _, options = VARIANTS[name]
    run_dir = out / run_name(name, seed)
    cmd = [sys.executable, "-m", "dsmr", "train", "--cache", cache, "--out", str(run_dir), *STUDY, *options,
           "--steps", str(steps), "--seed", str(seed), "--json", "--no-progress"]
    if (run_dir / "trainer_state.pt").exists():
        cmd.append("--resume")
    print(" ".join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    tmp = result.with_suffix(".tmp")
    tmp.write_text(done.stdout.strip().splitlines()[-1] + "\n")
    os.replace(tmp, result)


def _parameters(run_dir: Path) -> int:
    from dsmr.model import DSMR, DSMRConfig

    config = json.loads((run_dir / "config.json").read_text())
    return DSMR(DSMRConfig.from_dict(config["model"])).num_parameters()


def _results(out: Path, name: str) -> dict[int, dict]:
    """{seed: result} of the finished runs of one variant."""
    found = {}
    for seed in range(10):
        path = out / f"{run_name(name, seed)}.json"
        if path.is_file():
            found[seed] = json.loads(path.read_text())
    return found


def table(out: Path) -> str:
    """Mean validation PPL over the seeds that finished; the difference is taken over the seeds both share."""
    results = {name: _results(out, name) for name in VARIANTS}
    lines = ["| variant | change | parameters | seeds | val PPL (each seed) | mean | vs reference (same seeds) "
             "| train tok/s |", "|---|---|---:|---:|---|---:|---:|---:|"]
    for name, (what, reference, _) in VARIANTS.items():
        mine = results[name]
        if not mine:
            continue
        ppl = {seed: r["ppl"] for seed, r in mine.items()}
        mean = sum(ppl.values()) / len(ppl)
        shared = sorted(set(ppl) & set(results[reference]))
        delta = "—"
        if reference != name and shared:
            diff = sum(ppl[s] - results[reference][s]["ppl"] for s in shared) / len(shared)
            delta = f"{diff:+.2f} vs `{reference}` ({len(shared)} seed{'s' if len(shared) > 1 else ''})"
        each = " / ".join(f"{ppl[s]:.2f}" for s in sorted(ppl))
        speed = sum(r["train_tokens_per_s"] for r in mine.values()) / len(mine)
        first = out / run_name(name, min(mine))
        lines.append(f"| `{name}` | {what} | {_parameters(first):,} | {len(mine)} | {each} | {mean:.2f} | {delta} "
                     f"| {speed:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", help="MAESTRO token cache (dsmr data build --corpus maestro)")
    p.add_argument("--out", required=True, type=Path, help="folder for the runs and their results")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (default: all)")
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--seeds", default="0", help="comma-separated seeds; seed 0's runs keep the plain name")
    p.add_argument("--table", type=Path, help="write the markdown table of finished variants here (no training)")
    args = p.parse_args()
    if args.table:
        args.table.write_text(table(args.out))
        print(args.table.read_text())
        return
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not args.cache:
        p.error(f"unknown variants {unknown} (known: {', '.join(VARIANTS)})" if unknown else "--cache is required")
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in names:
            run_variant(name, args.cache, args.out, args.steps, seed)
    print(table(args.out))


if __name__ == "__main__":
    main()
