"""Generation: whole pieces sampled with bounded memory, on a CPU or a GPU.

`loop` samples pieces (`generate`, `generate_batch`) through an `IncrementalDecoder` (`decoder`: fixed-size
key/value buffers, the model's own block), with the options of `sampling` and the prompts of `prompts`; on a
CPU, `precision` keeps the projections in float16 or int8 and dsmr.backends.cpu runs such a model's whole
one-token step in one C++ call. `defaults` holds the settings a model plays with when none are given and
`settings.playing_sampling` resolves them; `note_guard` keeps notes from hanging; `render` writes WAV and
piano rolls; `live` is the duet engine and its MIDI ports.

The names below load on first use, so that the torch-free modules of this package (`defaults`) import
without torch.
"""

from __future__ import annotations

import importlib

# name -> the module that defines it
_API = {
    **dict.fromkeys(("IncrementalDecoder", "compile_available"), "dsmr.generation.decoder"),
    "FusedStep": "dsmr.backends.cpu.fused",
    **dict.fromkeys(("GenerationResult", "batch_summary", "generate", "generate_batch"), "dsmr.generation.loop"),
    **dict.fromkeys(("decoding_state_dtype", "default_cpu_precision", "half_weight_model", "int8_weight_model",
                     "resolve_precision", "with_precision"), "dsmr.generation.precision"),
    **dict.fromkeys(("HalfWeightLinear", "Int8WeightLinear"), "dsmr.backends.cpu.quantized"),
    **dict.fromkeys(("MusicClock", "crop_seconds", "load_prompt"), "dsmr.generation.prompts"),
    **dict.fromkeys(("SamplingConfig", "banned_mask", "pitch_bans", "pitch_range_bans", "sample_next"),
                    "dsmr.generation.sampling"),
    "playing_sampling": "dsmr.generation.settings",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dsmr.generation' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
