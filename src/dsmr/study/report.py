"""Putting studies together and reporting them: merged results, the status of running studies, results.csv,
results.md and the figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

from dsmr.core.atomic import atomic_write_json, atomic_write_text
from dsmr.errors import DsmrError
from dsmr.study.variants import (FIGURES_DIR, REFERENCE, RESULTS_DIR, RUNS_DIR, STUDY_FILE, StudyConfig, comparable,
                                 fmt, read_json, default_variants, result_name)
from dsmr.study.summary import mean, ratio, summarize
from dsmr.study.figures import plot_all
from dsmr.study.paired import comparison_table, with_notes


def collect_results(study_dirs) -> list[dict]:
    """Every result record in the study folders, in the order of the default variants, then by seed.

    DsmrError when a folder has no results, when one variant and seed is in two folders, or when the
    folders used different model or memory options."""
    records: dict[tuple[str, int], dict] = {}
    where: dict[tuple[str, int], Path] = {}
    configs: dict[Path, dict] = {}
    for folder in map(Path, study_dirs):
        results = sorted((folder / RESULTS_DIR).glob("*.json"))
        results = [p for p in results if not p.name.endswith(".spec.json")]
        if not results:
            raise DsmrError(f"{folder} holds no study results ({folder / RESULTS_DIR}/*.json)")
        for path in results:
            record = read_json(path)
            if "variant" not in record or "seed" not in record:
                raise DsmrError(f"{path} is not a study result (no variant/seed)")
            key = (record["variant"], record["seed"])
            if key in records and where[key] != path:
                raise DsmrError(f"variant {key[0]} seed {key[1]} is in both {where[key]} and {path}")
            records[key], where[key] = record, path
            configs.setdefault(folder, record.get("study_config") or {})
    shared = [comparable(c) for c in configs.values()]
    if any(c != shared[0] for c in shared[1:]):
        folders = ", ".join(map(str, configs))
        raise DsmrError(f"the studies {folders} used different model, memory or training options: "
                        "their results are not comparable")
    order = {name: i for i, name in enumerate(v.name for v in default_variants(StudyConfig()))}
    return sorted(records.values(), key=lambda r: (order.get(r["variant"], len(order)), r["variant"], r["seed"]))


def study_status(study_dirs, recent: int = 20) -> list[dict]:
    """Where every started variant of the study folders stands, while a long study runs or after it was
    stopped: finished (the result's figures), or unfinished (the last logged step, the validation curve so
    far, whether a checkpoint exists to resume from, and the training time left at the speed of the last
    `recent` logged intervals; validations not counted)."""
    rows = []
    for folder in map(Path, study_dirs):
        results, runs = folder / RESULTS_DIR, folder / RUNS_DIR
        if not (folder / STUDY_FILE).is_file() and not results.is_dir():
            raise DsmrError(f"{folder} is not a study folder (no {STUDY_FILE}, no {RESULTS_DIR}/)")
        # a variant's spec exists while its process runs; a stopped one leaves its run folder
        names = {p.name.removesuffix(".spec.json").removesuffix(".json") for p in results.glob("*.json")}
        names |= {p.name for p in runs.glob("*-seed*") if p.is_dir()}
        for name in sorted(names):
            if (results / f"{name}.json").is_file():
                result = read_json(results / f"{name}.json")
                rows.append({"study": str(folder), "variant": result["variant"], "seed": result["seed"],
                             "state": "finished", "step": result["steps"], "steps": result["steps"],
                             "val_ppl": result["val_ppl"], "test_ppl": result.get("test_ppl"),
                             "val_curve": result.get("val_curve", []),
                             "train_tokens_per_s": result["train_tokens_per_s"], "hours_left": 0.0})
                continue
            variant, seed = name.rsplit("-seed", 1)
            rows.append({"study": str(folder), "variant": variant, "seed": int(seed),
                         **_progress(runs / name, _planned_steps(results / f"{name}.spec.json", runs / name),
                                     recent)})
    return rows


def _planned_steps(spec_path: Path, run_dir: Path) -> int | None:
    """The steps a variant trains for: from its spec while it runs, else from its run's config.json."""
    for path in (spec_path, run_dir / "config.json"):  # both keep the TrainConfig under "train"
        if path.is_file():
            return read_json(path).get("train", {}).get("steps")
    return None


def _progress(run_dir: Path, steps: int | None, recent: int) -> dict:
    """An unfinished run's last step, validation curve, speed and training time left, from metrics.jsonl."""
    from dsmr.sharing.run_folder import TRAINER_STATE_FILE

    records = []
    metrics = run_dir / "metrics.jsonl"
    for line in metrics.read_text(errors="replace").splitlines() if metrics.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a damaged line (training drops it too when it resumes)
    train = [r for r in records if r.get("tokens_per_s")]
    span = seconds = tokens = 0
    for prev, r in list(zip([{"step": 0}] + train, train))[-recent:]:
        # the first record after a resume counts from the checkpoint's step, not from the record before it
        span += r.get("interval_steps", r["step"] - prev["step"])
        seconds += r["tokens"] / r["tokens_per_s"]
        tokens += r["tokens"]
    step = records[-1]["step"] if records else 0
    val = [{"step": r["step"], "val_ppl": r["val_ppl"]} for r in records if "val_ppl" in r]
    return {"state": "unfinished", "step": step, "steps": steps, "val_curve": val,
            "val_ppl": val[-1]["val_ppl"] if val else None, "test_ppl": None,
            "resumable": (run_dir / TRAINER_STATE_FILE).is_file(),
            "train_tokens_per_s": tokens / seconds if seconds else None,
            "hours_left": (steps - step) * seconds / span / 3600 if span and steps else None}


def merge_studies(out_dir, study_dirs, command: str | None = None, cache=None) -> list[dict]:
    """Put the results of several study folders (e.g. one per variant or per seed) into `out_dir`; with a
    TokenCache `cache` (the one they were evaluated on), results without per-note figures get them."""
    out_dir = Path(out_dir)
    records = collect_results(study_dirs)
    if cache is not None:
        records = with_notes(records, cache)
    atomic_write_json(out_dir / STUDY_FILE, {"config": records[0].get("study_config"), "command": command,
                                             "merged_from": [str(d) for d in study_dirs]})
    for record in records:
        target = out_dir / RESULTS_DIR / f"{result_name(record['variant'], record['seed'])}.json"
        atomic_write_json(target, record)
    write_report(out_dir, records, command=command, sources=[str(d) for d in study_dirs])
    return records


CSV_FIELDS = ("variant", "seed", "horizons", "budget", "context", "val_ppl", "val_nll", "val_tokens", "val_pieces",
              "val_all_ppl", "val_all_nll", "val_all_tokens", "val_all_pieces",
              "test_ppl", "test_nll", "test_tokens", "test_pieces", "val_all_notes", "val_all_nll_per_note",
              "test_notes", "test_nll_per_note",
              "train_tokens_per_s", "train_peak_memory_bytes", "state_bytes", "val_ppl_vs_full",
              "train_tokens_per_s_vs_full", "train_peak_memory_bytes_vs_full", "state_bytes_vs_full", "steps",
              "train_loss", "seconds", "device")


def results_csv(records: list[dict]) -> str:
    """One row per variant and seed; ratios against `full` of the same seed (or of the lowest seed that
    has one, for a seed run without `full`)."""
    import csv
    import io

    refs = {r["seed"]: r for r in records if r["variant"] == REFERENCE}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in records:
        ref = refs.get(r["seed"]) or (refs[min(refs)] if refs else None)
        row = {k: r.get(k) for k in CSV_FIELDS}
        row["horizons"] = " ".join(map(str, r["horizons"]))
        row["device"] = r.get("environment", {}).get("device")
        for key in ("val_ppl", "train_tokens_per_s", "train_peak_memory_bytes", "state_bytes"):
            row[f"{key}_vs_full"] = ratio(r.get(key), ref.get(key)) if ref else None
        writer.writerow(row)
    return buf.getvalue()


def results_markdown(records: list[dict], command: str | None = None, sources=None, figures=None) -> str:
    rows = summarize(records)
    seeds = sorted({r["seed"] for r in records})
    first = records[0]
    cfg = first.get("study_config", {})
    lines = ["# Schedule study: results", ""]
    lines += [f"{len(rows)} variants, seeds {', '.join(map(str, seeds))}. Model: {cfg.get('layers')} layers, "
              f"d_model {cfg.get('d_model')}, {cfg.get('heads')} heads"
              + (f" of dim {cfg['head_dim']}" if cfg.get("head_dim") else "")
              + (", untied output head" if cfg.get("tie_embeddings") is False else "")
              + (f", {cfg['memory']} memory" if cfg.get("memory", "kv") != "kv" else "")
              + f"; segment {cfg.get('segment')}, "
              f"{cfg.get('batch_size')} lanes, {cfg.get('steps')} steps, lr {cfg.get('lr')}. Validation: "
              + (f"{first['val_pieces']} validation pieces (the first of the split, each in full; "
                 f"{first['val_tokens']:,} tokens)." if first.get("val_pieces") else "none."), ""]
    with_test = any(row["test_ppl"] is not None for row in rows)
    lines += _main_table(rows, seeds)
    lines += ["", "val PPL: exp(mean NLL per token) over every token of the validation pieces, streamed with "
              "each variant's own schedule (the excerpt baseline: non-overlapping windows of its context). "
              "Mean over seeds. train tok/s: real training targets per second of training steps. Peak train "
              f"memory: {first.get('train_memory_method')}, measured in a fresh process per variant. State: "
              "the recurrent memory of one lane in fp32 as trained (budget x 2 x heads x head dim for keys + "
              "values, budget x d_model for hidden memory; x 4 bytes). GPU MiB (analytic): the activations "
              "a training step keeps for its backward pass plus the state of every lane, at bf16, logits left "
              "out (DSMRConfig.training_bytes): what the schedule costs on a GPU, computed, not measured."
              + (f" val PPL, all pieces / test PPL: the final model over all {first.get('val_all_pieces')} "
                 f"validation / {first.get('test_pieces')} test pieces." if with_test else ""), ""]
    lines += _position_table(records)
    for key, label in (("val_all_ppl", "validation PPL over all pieces"), ("test_ppl", "test PPL over all pieces"),
                       ("val_all_nll_per_note", "validation NLL per note (nats)"),
                       ("test_nll_per_note", "test NLL per note (nats)")):
        if len({r["seed"] for r in records if r.get(key) is not None}) > 1:
            lines += comparison_table(records, key, label)
    lines += _variants_figures_and_commands(records, rows, command, sources, figures)
    return "\n".join(lines)


def _main_table(rows: list[dict], seeds: list) -> list[str]:
    """The results table: one row per variant (means over seeds), the columns the records have figures for."""
    mib = 1024 * 1024
    lines = []
    ppl_head = "val PPL" + (f" (seed {' / '.join(map(str, seeds))})" if len(seeds) > 1 else "")
    head = ["variant", "horizons (layer 0..L-1)", "budget", "val PPL", "x full"]
    with_test = any(row["test_ppl"] is not None for row in rows)
    if len(seeds) > 1:
        head += [ppl_head, "spread"]
    with_val_all = any(row["val_all_ppl"] is not None for row in rows)
    if with_val_all:
        head += ["val PPL, all pieces"]
    if with_test:
        head += ["test PPL"]
    with_notes = any(row["test_nll_per_note"] is not None for row in rows)
    if with_notes:
        head += ["val nats/note", "test nats/note"]
    head += ["train tok/s", "x full", "peak train MiB", "x full", "GPU MiB (analytic)", "x full", "state KiB/lane",
             "x full"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|")
    for row in rows:
        horizons = f"excerpt {row['context']}" if row["context"] else ",".join(map(str, row["horizons"]))
        cells = [f"`{row['variant']}`", horizons, str(row["budget"]), fmt(row["val_ppl"]),
                 fmt(row["val_ppl_vs_full"])]
        if len(seeds) > 1:
            cells += [" / ".join(fmt(v) for v in row["val_ppl_runs"]), fmt(row["val_ppl_spread"])]
        if with_val_all:
            cells += [fmt(row["val_all_ppl"])]
        if with_test:
            cells += [fmt(row["test_ppl"])]
        if with_notes:
            cells += [fmt(row["val_all_nll_per_note"]), fmt(row["test_nll_per_note"])]
        peak = row["train_peak_memory_bytes"]
        cells += [fmt(row["train_tokens_per_s"], ".0f"), fmt(row["train_tokens_per_s_vs_full"], ".2f"),
                  fmt(peak / mib if peak is not None else None, ".1f"),
                  fmt(row["train_peak_memory_bytes_vs_full"], ".2f"),
                  fmt(row["gpu_bytes"] / mib if row["gpu_bytes"] is not None else None, ".1f"),
                  fmt(row["gpu_bytes_vs_full"], ".2f"),
                  fmt(row["state_bytes"] / 1024, ".0f"), fmt(row["state_bytes_vs_full"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _variants_figures_and_commands(records, rows, command, sources, figures) -> list[str]:
    """The variants described, the figures, the commands that reproduce the study and its environment."""
    first = records[0]
    env = first.get("environment", {})
    lines = []
    lines += ["## Variants", ""]
    for row in rows:
        lines.append(f"- `{row['variant']}`: {row['description']}")
    lines += ["", "## Figures", ""]
    for name, caption in FIGURES:
        if figures is None or name in figures:  # `figures`: the names drawn (no gates without gated variants)
            lines += [f"![{caption}]({FIGURES_DIR}/{name}.png)", ""]
    lines += ["## Reproduce", "", "```", command or "(run through the Python API: dsmr.study.run_study)"]
    lines += [f"# from: {' '.join(sources)}"] if sources else []
    commands = sorted({r["command"] for r in records if r.get("command")})
    if commands and commands != [command]:
        lines += ["# the variants were trained with:"] + commands
    lines += ["```", "", "Environment (of the first result): " + ", ".join(
        f"{k} {v}" for k, v in env.items() if k in ("dsmr", "torch", "python", "device", "gpu", "cpu_count",
                                                     "usable_cpus", "torch_threads", "platform", "git_commit")),
              ""]
    return lines


def _position_table(records: list[dict]) -> list[str]:
    """Validation PPL by position in the piece (mean NLL over seeds): where does memory pay off?"""
    buckets = next((r["val_nll_by_position"] for r in records if r.get("val_nll_by_position")), None)
    if not buckets:
        return []
    names = [f"{b['start']}-{b['end']}" if b["end"] is not None else f">= {b['start']}" for b in buckets]
    lines = ["Validation PPL by position in the piece (mean over seeds; tokens per bucket: "
             + ", ".join(f"{n} {b['tokens']:,}" for n, b in zip(names, buckets)) + ")", "",
             "| variant | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for variant in dict.fromkeys(r["variant"] for r in records):
        runs = [r["val_nll_by_position"] for r in records if r["variant"] == variant and r.get("val_nll_by_position")]
        cells = []
        for i in range(len(names)):
            nll = mean(run[i]["nll"] for run in runs if i < len(run))
            cells.append(fmt(math.exp(nll) if nll is not None else None, ".2f"))
        lines.append(f"| `{variant}` | " + " | ".join(cells) + " |")
    return lines + [""]


FIGURES = (
    ("schedules", "horizon per layer of every variant"),
    ("ppl_vs_memory", "validation PPL against peak training memory (measured; analytic for a GPU), "
                      "recurrent-state size and training throughput"),
    ("val_curves", "validation PPL over training steps"),
    ("gates", "gate values per layer over training"),
)


def write_report(out_dir, records: list[dict], command: str | None = None, sources=None) -> list[Path]:
    """results.csv, results.md and the figures of `records` into `out_dir`; returns the paths written."""
    out_dir = Path(out_dir)
    if not records:
        raise DsmrError(f"no study results to report in {out_dir}")
    figures = plot_all(records, out_dir / FIGURES_DIR)
    written = [out_dir / "results.csv", out_dir / "results.md"]
    atomic_write_text(written[0], results_csv(records))
    atomic_write_text(written[1], results_markdown(records, command, sources, {p.stem for p in figures}))
    return written + figures
