"""Models in the format researchers share them: a Hugging Face Hub-style model folder.

An exported model folder (`dsmr export RUN OUT`, or `save_pretrained`) holds

    config.json          model config, schedule, tokenizer config + hash, segment length, training
                         hyperparameters, the dataset, the export's dtype and the run's measured figures
    model.safetensors    the weights, float32 or float16 (metadata: the training step)
    README.md            a model card with the Hub's metadata header (license, datasets, tags, library)

It is also a run folder as far as `dsmr.load_model` is concerned (config.json + weights), so every
command that takes a model accepts it; `dsmr.sharing.export.export_run` writes one from a run. Where a model is named by a Hub repo id (`owner/name`) and no
such local path exists, `resolve_model_ref` finds it through `huggingface_hub` (its cache first; with
HF_HUB_OFFLINE=1 only its cache).
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

from dsmr.core.atomic import atomic_write_json, atomic_write_text
from dsmr.errors import DsmrError
from dsmr.sharing.run_folder import (CONFIG_FILE, LATEST_FILE, METRICS_FILE, first_line, read_config, resolve_weights,
                                     save_weights)

MODEL_FILE = LATEST_FILE  # an exported folder holds the latest weights file of a run folder only
CARD_FILE = "README.md"
EXPORT_FORMAT = "dsmr-model"
DTYPES = ("float32", "float16")
HUB_FILES = [CONFIG_FILE, MODEL_FILE, CARD_FILE]

# Licences that a model inherits from its training data (Hub license identifiers).
CORPUS_LICENSES = {"maestro": "cc-by-nc-sa-4.0"}
CORPUS_NAMES = {"maestro": "MAESTRO v3.0.0 (Hawthorne et al., 2019)",
                "bach": "Bach chorales (music21 corpus)", "folder": "a folder of MIDI files"}
FEW_PIECES = 10  # a split figure over fewer pieces says so
# Hub tags a card takes from its training corpus (besides the ones every dsmr model has).
CORPUS_TAGS = {"maestro": ("piano", "classical-music", "maestro"), "bach": ("bach", "chorales", "classical-music")}
MODEL_TAGS = ("symbolic-music", "midi", "music-generation", "recurrent-transformer", "dsmr")
# owner/name as the Hub spells repo ids: letters, digits, '-', '_', '.'; no leading '.' or '-'.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


# ----------------------------------------------------------------------------------------- resolving


def is_repo_id(ref) -> bool:
    s = str(ref)
    return bool(_REPO_ID.match(s)) and not s.endswith((".safetensors", ".json")) and ".." not in s


def resolve_model_ref(ref, *, revision: str | None = None, cache_dir=None,
                      local_files_only: bool | None = None) -> Path:
    """A local path for a model reference: an existing path as it is, else a Hub repo id's snapshot folder.

    The Hub is asked only for a reference that is not a local path and looks like `owner/name`;
    huggingface_hub's cache is used first, and only it when offline (HF_HUB_OFFLINE=1 or
    `local_files_only`)."""
    path = Path(ref)
    if not path.exists() and shipped_model(ref) is not None:
        return shipped_model(ref)
    if path.exists() or not is_repo_id(ref) or path.parent.is_dir():
        return path  # a missing local path (its folder exists: "runs/typo"): the caller says "not found"
    try:
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError as err:  # pragma: no cover - a dependency of miditok, normally present
        raise DsmrError(f"{ref}: no such local path; loading a Hub repo id needs `pip install huggingface_hub`"
                        ) from err
    offline = bool(local_files_only) or constants.HF_HUB_OFFLINE
    cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    try:
        folder = huggingface_hub.snapshot_download(
            str(ref), revision=revision, cache_dir=cache_dir, allow_patterns=HUB_FILES,
            local_files_only=offline)
    except LocalEntryNotFoundError as err:
        raise DsmrError(
            f"{ref}: no such local path, and the Hub repo '{ref}'{_rev(revision)} is not in the Hub cache "
            f"{cache} (offline{' because HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE else ''}): "
            f"download it once with network access, or give a local model folder") from err
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise DsmrError(f"{ref}: no such local path, and no Hub repo '{ref}'{_rev(revision)} "
                        f"(or it is private: log in with `hf auth login`)") from err
    except (EntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise DsmrError(f"{ref}: no such local path, and the Hub repo could not be downloaded "
                        f"({first_line(err)})") from err
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / MODEL_FILE).is_file():
        raise DsmrError(f"Hub repo '{ref}'{_rev(revision)} ({folder}) has no {CONFIG_FILE} and {MODEL_FILE}: "
                        "not a dsmr model")
    return folder


def read_model_config(ref, which: str = "best") -> dict:
    """config.json of a model reference (a run or model folder, a weights file, a Hub repo id), without
    loading its weights."""
    _, run_dir = resolve_weights(resolve_model_ref(ref), which)
    return read_config(run_dir)


SHIPPED_MODELS = Path(__file__).resolve().parents[3] / "models"  # in a checkout of the repository


def shipped_model(ref) -> Path | None:
    """The folder of a model the repository ships, for `models/NAME` (or `NAME`) from any working folder;
    None when `ref` names none of them (or dsmr is not installed from a checkout)."""
    parts = Path(str(ref)).parts
    if len(parts) == 2 and parts[0] == "models":
        parts = parts[1:]
    if len(parts) != 1 or parts[0] in (".", ".."):
        return None
    folder = SHIPPED_MODELS / parts[0]
    return folder if (folder / CONFIG_FILE).is_file() else None


def _rev(revision) -> str:
    return f" at revision {revision!r}" if revision else ""


# ------------------------------------------------------------------------------------- loading, saving


def save_pretrained(model, out, config: dict, *, dtype: str = "float32", card: str | None = None,
                    step: int | None = None) -> Path:
    """Write an exported model folder: config.json (`config`, the model section taken from `model`),
    model.safetensors in `dtype` and, when given, README.md. Returns the folder."""
    import torch


    if dtype not in DTYPES:
        raise DsmrError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for key in ("tokenizer", "segment_len"):
        if key not in config:
            raise DsmrError(f"save_pretrained: the config has no {key!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {**config, "format": EXPORT_FORMAT, "model": model.cfg.to_dict(), "dtype": dtype}
    weights = model
    if dtype != "float32":
        weights = copy.deepcopy(model).to(getattr(torch, dtype))
        overflow = [k for k, v in weights.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if overflow:
            raise DsmrError(f"weights {', '.join(overflow[:3])} exceed the {dtype} range: export as float32")
    save_weights(weights, out / MODEL_FILE, step=step)
    atomic_write_json(out / CONFIG_FILE, config)
    if card is not None:
        atomic_write_text(out / CARD_FILE, card)
    return out


def corpus_of(config: dict) -> str | None:
    """The corpus a run was trained on: from config.json, else the manifest of the cache it names."""
    known = (config.get("dataset") or {}).get("corpus")
    if known:
        return known
    cache = config.get("cache")
    if cache:
        manifest = Path(cache) / "manifest.json"
        try:
            return (json.loads(manifest.read_text()).get("source") or {}).get("corpus")
        except (OSError, ValueError):
            return None
    return None


def license_for(corpus: str | None, license: str | None) -> str:
    inherited = CORPUS_LICENSES.get(corpus or "")
    if inherited and license and license != inherited:
        raise DsmrError(f"a model trained on {corpus} inherits its data's licence {inherited}; "
                        f"--license {license} is not allowed")
    return inherited or license or "other"


def run_figures(run_dir, config: dict, step: int | None, evals=()) -> dict:
    """Figures for the model card: steps and tokens trained, validation PPL (metrics.jsonl), the PPL of
    every `dsmr eval --json` result given, and the schedule."""

    figures: dict = {"step": step}
    records = []
    path = Path(run_dir) / METRICS_FILE
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    train = [r for r in records if "loss" in r]
    vals = [r for r in records if r.get("val_ppl") is not None]
    if train:
        figures["train_steps"] = max(r["step"] for r in train)
        figures["train_tokens"] = int(sum(r.get("tokens") or 0 for r in train))
    if vals:
        best = min(vals, key=lambda r: r["val_nll"])
        figures["best_validation_ppl"] = best["val_ppl"]
        figures["best_validation_step"] = best["step"]
        if step is not None:
            at = [r for r in vals if r["step"] == step]
            if at:
                figures["validation_ppl_in_training"] = at[-1]["val_ppl"]
    for result in evals:
        split = result.get("split", "eval")
        if result.get("ppl") is None:
            raise DsmrError(f"an --eval result for split {split!r} has no ppl (expected `dsmr eval --json`)")
        figures[f"{split}_ppl"] = result["ppl"]
        figures[f"{split}_tokens"] = result.get("tokens")
        figures[f"{split}_pieces"] = result.get("pieces")
        if result.get("nll_per_note") is not None:
            figures[f"{split}_nll_per_note"] = result["nll_per_note"]
            figures[f"{split}_notes"] = result.get("notes")
    counts = _cache_counts(config.get("cache"))
    if counts:
        figures["train_pieces"] = counts.get("train")
    val_pieces = (config.get("train") or {}).get("val_pieces")
    if vals:
        figures["validation_pieces_in_training"] = val_pieces or (counts or {}).get("validation")
    schedule = config.get("schedule") or {}
    figures["schedule"] = schedule.get("name")
    figures["horizons"] = list((config.get("model") or {}).get("horizons") or [])
    figures["segment_len"] = config.get("segment_len")
    return figures


def _cache_counts(cache) -> dict | None:
    """Pieces per split of the cache a run was trained from (its manifest), None where it is gone."""
    if not cache:
        return None
    try:
        manifest = json.loads((Path(cache) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        return None
    return {name: split.get("pieces") for name, split in splits.items() if isinstance(split, dict)}


def _pieces(n) -> str:
    return f"{n} piece" if n == 1 else f"{n} pieces"


def model_card(config: dict, name: str, dtype: str, ref: str | None = None) -> str:
    """README.md for the Hub: YAML metadata header, then what the model is, its figures and how to use it
    (`ref`: how the usage lines name the model, default `name`)."""
    ref = ref or name
    dataset = config.get("dataset") or {}
    corpus, license = dataset.get("corpus"), dataset.get("license", "other")
    # no `datasets:` entry: the Hub expects dataset repo ids there, and the corpora are named in the text
    header = ["---", f"license: {license}", "library_name: dsmr", "tags:"]
    header += [f"- {t}" for t in (*MODEL_TAGS, *CORPUS_TAGS.get(corpus or "", ()))]
    header += ["---", ""]
    lines = [f"# {name}", "",
             "A Depth-Structured Music Recurrence (DSMR) model: a recurrent Transformer that models whole "
             "pieces of symbolic music segment by segment, each layer keeping a memory of its own horizon "
             "(bounded state however long the piece).", ""]
    source = (config.get("train") or {}).get("init_from")
    if corpus:
        lines.append(f"{'Fine-tuned' if source else 'Trained'} on {CORPUS_NAMES.get(corpus, corpus)}"
                     + (f", starting from the model `{source}`." if source else "."))
    elif source:
        lines.append(f"Fine-tuned from the model `{source}`.")
    if license == "cc-by-nc-sa-4.0":
        lines.append("The training data is licensed CC BY-NC-SA 4.0, and so is this model: non-commercial use "
                     "only, with attribution, and derivatives under the same licence.")
    elif license == "other":
        lines.append("Licence: not set (a model's licence follows its training data; export with --license).")
    lines += ["", "## Figures (measured)", "", "| what | value |", "| --- | --- |"]
    lines += [f"| {what} | {value} |" for what, value in _figure_rows(config, dtype) if value is not None]
    lines += ["", "## Use", "", "With dsmr installed (`pip install -e .` in its repository):", "",
              "```bash",
              f"dsmr generate {ref} --prompt prompt.mid --max-seconds 30 --out continuation.mid",
              "```", "", "```python", "from dsmr import load_model", "",
              f'model = load_model("{ref}")  # a local folder or a Hub repo id',
              "tokenizer = model.tokenizer", "```", ""]
    return "\n".join(header + lines)


def _ppl(v):
    return None if v is None or not math.isfinite(v) else f"{v:.3f}"


def _figure_rows(config: dict, dtype: str) -> list[tuple[str, object]]:
    """The card's table: (what, value) pairs, value None where the export does not know it."""
    figures, model, tok = config.get("figures") or {}, config.get("model") or {}, config.get("tokenizer") or {}
    rows = [("training steps (these weights)", figures.get("step")),
            ("tokens trained on", None if figures.get("train_tokens") is None else f"{figures['train_tokens']:,}"),
            ("training pieces", figures.get("train_pieces"))]
    during = figures.get("validation_pieces_in_training")
    during = f"the first {_pieces(during)} of the validation split" if during else "the validation split"
    # (exports before the split evaluations had their own keys called it validation_ppl, without pieces)
    in_training = figures.get("validation_ppl_in_training",
                              None if "validation_pieces" in figures else figures.get("validation_ppl"))
    rows.append((f"validation PPL during training, over {during} (these weights)", _ppl(in_training)))
    rows.append((f"best validation PPL during training, over {during} (step)",
                 None if figures.get("best_validation_ppl") is None else
                 f"{_ppl(figures['best_validation_ppl'])} ({figures.get('best_validation_step')})"))
    splits = [k for k in figures if k.endswith("_ppl") and k != "best_validation_ppl"
              and (k != "validation_ppl" or "validation_pieces" in figures)]
    for key in sorted(splits, key=lambda k: (k != "validation_ppl", k)):  # validation first, then test
        split = key[:-4]
        pieces = figures.get(split + "_pieces")
        few = (f"; only {_pieces(pieces)}: a rough figure" if isinstance(pieces, int) and pieces < FEW_PIECES
               else "")
        rows.append((f"{split} PPL (full pieces)", f"{_ppl(figures[key])} ({_pieces(pieces)}, "
                                                  f"{figures.get(split + '_tokens'):,} tokens{few})"))
        if figures.get(split + "_nll_per_note") is not None:
            rows.append((f"{split} NLL per note (nats; compares across encodings)",
                         f"{figures[split + '_nll_per_note']:.3f} ({figures.get(split + '_notes'):,} notes)"))
    state = figures.get("state_bytes_fp32")
    return rows + [
        ("schedule", f"{figures.get('schedule')}, horizons {figures.get('horizons')}"),
        ("segment length", figures.get("segment_len")),
        ("parameters", None if figures.get("parameters") is None else f"{figures['parameters']:,}"),
        ("recurrent state per piece (float32)", None if state is None else f"{state:,} bytes"),
        ("layers x width x heads", f"{model.get('n_layers')} x {model.get('d_model')} x {model.get('n_heads')}"),
        ("tokenizer", f"{tok.get('kind')} (vocabulary {model.get('vocab_size')})"),
        ("weights", dtype)]


# ------------------------------------------------------------------------------------------------- push


def push_to_hub(folder, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload an exported folder to the Hub repo `repo_id` (created when missing). Returns its URL."""
    try:
        from huggingface_hub import HfApi, constants, get_token
    except ImportError as err:  # pragma: no cover
        raise DsmrError("--push needs `pip install huggingface_hub`") from err
    if not is_repo_id(repo_id):
        raise DsmrError(f"--push {repo_id!r}: a Hub repo id is owner/name")
    if constants.HF_HUB_OFFLINE:
        raise DsmrError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set (uploading needs the network); "
                        f"the exported folder {folder} is complete, push it later with "
                        f"`hf upload {repo_id} {folder}`")
    token = token or get_token()
    if not token:
        raise DsmrError(f"cannot push to {repo_id}: no Hugging Face token (run `hf auth login` or set HF_TOKEN)")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=HUB_FILES,
                                   commit_message="dsmr export")
    except Exception as err:  # network errors come as several types (httpx, OSError, HfHubHTTPError)
        raise DsmrError(f"could not push {folder} to the Hub repo {repo_id} ({first_line(err)}); the exported folder is complete, retry with "
                        f"`hf upload {repo_id} {folder}`") from err
    return getattr(commit, "repo_url", None) or f"https://huggingface.co/{repo_id}"

