"""What `dsmr generate` and `dsmr app` play with unless told otherwise: one place, so that the two agree.

Standard library only: command-line parsers read it, and `dsmr --help` must not import torch. The library's
own `SamplingConfig` keeps plain sampling (top-p 1, no guard) as its default; these are the choices made for
music, each measured in docs/generation.md.
"""

from __future__ import annotations

TEMPERATURE = 1.0
MAX_TEMPERATURE = 5.0  # beyond it every event is about as likely as any other
TOP_P = 0.95
MIN_PITCH, MAX_PITCH = 21, 108  # the piano's keys
# The note guard (dsmr.generation.note_guard), for encodings whose notes end with a NOTE_OFF: the longest a note may
# sound, and the most notes at once (0: no limit).
MAX_NOTE_SECONDS = 4.0
MAX_POLYPHONY = 8
# For encodings that give each note its length at its onset (the duration encoding): no note can hang, but a
# model can still choose a length no pianist holds; the longest allowed.
MAX_NOTE_SECONDS_LENGTHS_AT_ONSET = 10.0
# How decoding keeps the projection weights (dsmr.generation.precision): "auto" is int8 on a CPU where dsmr's
# kernels load (float16 where they do not), float32 elsewhere.
PRECISIONS = ("float32", "float16", "int8")
PRECISION = "auto"


def sampling_defaults(run_config: dict | None, temperature: float | None = None,
                      top_p: float | None = None) -> dict:
    """The temperature and top-p a model plays with: the ones given, else a model folder's config.json may
    name them under "playing" (what its card measured best for that model), else this module's values."""
    from dsmr.errors import DsmrError

    chosen = {"temperature": TEMPERATURE, "top_p": TOP_P}
    own = (run_config or {}).get("playing") or {}
    if not isinstance(own, dict):
        raise DsmrError(f'config.json: "playing" must be an object like {chosen}, got {own!r}')
    for key, (low, high) in (("temperature", (0.0, MAX_TEMPERATURE)), ("top_p", (1e-6, 1.0))):
        value = own.get(key, chosen[key])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise DsmrError(f'config.json: "playing"."{key}" must be a number in [{low:g}, {high:g}], got {value!r}')
        chosen[key] = float(value)
    given = {"temperature": temperature, "top_p": top_p}
    return {key: value if given[key] is None else given[key] for key, value in chosen.items()}

