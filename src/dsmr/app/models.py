"""The models the page plays: which one it opens with, loading one once per reference (as `dsmr generate`
would: its precision, its weights), and the settings its sliders start at."""


from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

from dsmr.generation import defaults
from dsmr.errors import DsmrError


# the models the project ships, first the one a musician meets by default
DEFAULT_MODEL_DIRS = ("models/maestro-duration-small", "models/maestro-small")


NO_MODEL_HELP = ("No model loaded. Give one: `dsmr app RUN_OR_MODEL_FOLDER` (a run folder from `dsmr train`, "
                 "a folder from `dsmr export`, or a Hub repo id), or type its path in the Model box. To train "
                 "a small one in a few minutes: `bash scripts/demo.sh` (see README).")


def default_model() -> Path | None:
    """The shipped model: the first of DEFAULT_MODEL_DIRS under the current folder, else in the repository
    (dsmr.sharing.hub.shipped_model)."""
    from dsmr.sharing.hub import shipped_model

    for rel in DEFAULT_MODEL_DIRS:
        if (Path.cwd() / rel / "config.json").is_file():
            return Path.cwd() / rel
    return next((shipped_model(rel) for rel in DEFAULT_MODEL_DIRS if shipped_model(rel) is not None), None)


@dataclass
class Loaded:
    ref: str
    model: object
    tokenizer: object
    config: dict
    segment_len: int

    @property
    def limits_note_length(self) -> bool:
        """The page's longest-note limit applies: notes end with NOTE_OFFs or carry their length."""
        from dsmr.generation.note_guard import has_note_lengths, has_note_offs

        return has_note_offs(self.tokenizer) or has_note_lengths(self.tokenizer)

    @property
    def limits_polyphony(self) -> bool:
        """The page's most-notes-at-once limit applies: notes end with NOTE_OFFs."""
        from dsmr.generation.note_guard import has_note_offs

        return has_note_offs(self.tokenizer)


class ModelStore:
    """Loads each model once; one generation at a time (CPU-bound: parallel requests only slow each other)."""

    def __init__(self, device: str = "cpu", precision: str = defaults.PRECISION, weights: str = "best"):
        self.device, self.precision, self.weights = device, precision, weights
        self._models: dict[str, Loaded] = {}
        self.lock = threading.Lock()

    def load(self, ref) -> Loaded:
        ref = str(ref or "").strip()
        if not ref:
            raise DsmrError(NO_MODEL_HELP)
        if ref not in self._models:
            from dsmr.sharing.loader import load_model
            from dsmr.generation import with_precision

            model = load_model(ref, device=self.device, which=self.weights)
            tokenizer, config, segment_len = model.tokenizer, model.run_config, model.segment_len
            model = with_precision(model, self.precision)  # as `dsmr generate --precision`
            self._models[ref] = Loaded(ref, model, tokenizer, config, segment_len)
        return self._models[ref]


def local_playing_settings(ref) -> dict:
    """What the page's sliders start at for the model at `ref`, as `dsmr generate` would play it: its
    temperature and top-p (dsmr.generation.defaults.sampling_defaults) and its encoding's note-guard defaults (dsmr.generation.note_guard
    .guard_for; 0 = no limit), with which of the two limits apply. Read from a local folder's config.json without
    loading the model; for anything else (a Hub id, a typo) dsmr.generation.defaults's values and both limits shown."""
    path = Path(str(ref or "").strip() or ".") / "config.json"
    settings = {**defaults.sampling_defaults(None), "max_note_seconds": defaults.MAX_NOTE_SECONDS,
                "max_polyphony": defaults.MAX_POLYPHONY, "limits_note_length": True, "limits_polyphony": True}
    try:
        if not path.is_file():
            return settings
        config = json.loads(path.read_text())
        settings.update(defaults.sampling_defaults(config))
        from dsmr.data.tokenizers.registry import tokenizer_from_config
        from dsmr.generation.note_guard import guard_for, has_note_lengths, has_note_offs

        tokenizer = tokenizer_from_config(config["tokenizer"])
        guard = guard_for(tokenizer)
        settings.update(max_note_seconds=guard["max_note_seconds"] or 0.0, max_polyphony=guard["max_polyphony"] or 0,
                        limits_polyphony=has_note_offs(tokenizer),
                        limits_note_length=has_note_offs(tokenizer) or has_note_lengths(tokenizer))
    except (OSError, ValueError, KeyError, TypeError, DsmrError):
        pass  # the load itself says what is wrong with the folder
    return settings
