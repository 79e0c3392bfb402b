"""Generation: whole pieces sampled with bounded memory, on a CPU or a GPU.

`loop` samples pieces (`generate`, `generate_batch`) through an `IncrementalDecoder` (`decoder`: fixed-size
key/value buffers, the model's own block), with the options of `sampling` and the prompts of `prompts`; on a
CPU, `precision` keeps the projections in float16 or int8 and `fused` runs such a model's whole one-token
step in one C++ call (dsmr.kernels)."""

from dsmr.generation.decoder import IncrementalDecoder, compile_available
from dsmr.generation.fused import FusedStep
from dsmr.generation.loop import GenerationResult, batch_summary, generate, generate_batch
from dsmr.generation.precision import (HalfWeightLinear, Int8WeightLinear, decoding_state_dtype, default_cpu_precision,
                                       half_weight_model, int8_weight_model, resolve_precision, with_precision)
from dsmr.generation.prompts import MusicClock, crop_seconds, load_prompt
from dsmr.generation.sampling import (SamplingConfig, banned_mask, pitch_bans, pitch_range_bans, sample_next)
from dsmr.generation.settings import playing_sampling

__all__ = [
    "IncrementalDecoder", "compile_available", "FusedStep", "GenerationResult", "batch_summary", "generate",
    "generate_batch", "HalfWeightLinear", "Int8WeightLinear", "decoding_state_dtype", "default_cpu_precision",
    "half_weight_model", "int8_weight_model", "resolve_precision", "with_precision", "MusicClock", "crop_seconds", "load_prompt",
    "SamplingConfig", "banned_mask", "pitch_bans", "pitch_range_bans", "sample_next", "playing_sampling",
]
