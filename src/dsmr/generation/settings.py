"""How a model plays unless told otherwise, resolved in one place for `dsmr generate`, the page, the
yardstick and Python programs: the model folder's own temperature and top-p (dsmr.generation.defaults.sampling_defaults),
its encoding's note guard (dsmr.generation.note_guard.guard_for) and the piano's keys."""

from __future__ import annotations

import dataclasses
from typing import Optional

from dsmr.generation import defaults
from dsmr.generation.sampling import SamplingConfig, pitch_bans


def playing_sampling(model, *, temperature: Optional[float] = None, top_p: Optional[float] = None,
                     max_note_seconds: Optional[float] = None, max_polyphony: Optional[int] = None,
                     min_pitch: int = defaults.MIN_PITCH, max_pitch: int = defaults.MAX_PITCH,
                     **fields) -> SamplingConfig:
    """The SamplingConfig `dsmr generate` samples `model` with (a model from `dsmr.load_model`, which
    carries its `run_config` and `tokenizer`). None takes the model's own value or the encoding's default;
    0 turns a note limit off; `fields` are other SamplingConfig fields (max_seconds, seed, ...)."""
    from dsmr.generation.note_guard import guard_for

    config, tokenizer = getattr(model, "run_config", None), model.tokenizer
    sampling = SamplingConfig(**fields)
    sampling = dataclasses.replace(sampling, **defaults.sampling_defaults(config, temperature, top_p),
                                   **guard_for(tokenizer, max_note_seconds, max_polyphony),
                                   banned_ids=pitch_bans(tokenizer, min_pitch, max_pitch))
    sampling.validate(tokenizer.vocab_size)
    return sampling
