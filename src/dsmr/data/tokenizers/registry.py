"""The encodings by name: `make_tokenizer("performance" | "duration" | a miditok encoding)` and
`tokenizer_from_config` (what cache manifests and run folders record). Above every encoding module
(dsmr.data.tokenizers.performance, dsmr.data.tokenizers.duration), so that none of them imports another's registry.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from dsmr.data.tokenizers.duration import DURATION_ENCODING_VERSION, DurationTokenizer
from dsmr.errors import DsmrError
from dsmr.data.tokenizers.miditok_bridge import MidiTokTokenizer, default_miditok_config, miditok_class
from dsmr.data.tokenizers.base import Tokenizer
from dsmr.data.tokenizers.performance import PERFORMANCE_ENCODING_VERSION
from dsmr.data.tokenizers.performance import PerformanceTokenizer


def make_tokenizer(name: str = "performance", **options: Any) -> Tokenizer:
    """Build a tokenizer by name: "performance" (options: PerformanceTokenizer's arguments), "duration" (the
    same notes with their lengths at their onsets: dsmr.data.tokenizers.duration.DurationTokenizer) or a miditok
    encoding ("remi", "tsd", "midilike", "structured", ...; options: `sustain` and TokenizerConfig fields
    overriding dsmr's piano defaults)."""
    if name.lower() == "performance":
        try:
            return PerformanceTokenizer(**options)
        except TypeError as err:
            raise DsmrError(f"bad option for the performance tokenizer: {err}") from err
    if name.lower() == "duration":
        try:
            return DurationTokenizer(**options)
        except TypeError as err:
            raise DsmrError(f"bad option for the duration tokenizer: {err}") from err
    cls = miditok_class(name)
    sustain = options.pop("sustain", True)
    config = default_miditok_config(**options)
    try:
        tokenizer = cls(config)
    except Exception as err:  # miditok raises KeyError/ValueError for configs an encoding cannot use
        raise DsmrError(f"cannot build miditok {cls.__name__} from these options ({type(err).__name__}: "
                        f"{err}); pass the TokenizerConfig fields it needs as options") from err
    return MidiTokTokenizer(tokenizer, sustain=sustain)


def _own_encoding(cls, version_now: int, cfg: dict) -> Tokenizer:
    """One of dsmr's own encodings from its config (without 'kind'): the version must be this code's."""
    version = cfg.pop("version", version_now)
    if version != version_now:
        raise DsmrError(f"{cls.kind} tokenizer config has encoding version {version}; this dsmr implements "
                        f"version {version_now} (re-tokenize the data)")
    try:
        return cls(**cfg)
    except TypeError as err:
        raise DsmrError(f"bad {cls.kind} tokenizer config: {err}") from err


def tokenizer_from_config(cfg: dict) -> Tokenizer:
    """Rebuild a tokenizer from its `config()` (as saved in cache manifests and checkpoints)."""
    if not isinstance(cfg, dict) or "kind" not in cfg:
        raise DsmrError(f"tokenizer config must be a dict with a 'kind', got {cfg!r:.200}")
    cfg = dict(cfg)
    kind = cfg.pop("kind")
    if kind == PerformanceTokenizer.kind:
        return _own_encoding(PerformanceTokenizer, PERFORMANCE_ENCODING_VERSION, cfg)
    if kind == DurationTokenizer.kind:
        return _own_encoding(DurationTokenizer, DURATION_ENCODING_VERSION, cfg)
    if kind == MidiTokTokenizer.kind:
        params = cfg.get("params")
        if not isinstance(params, dict) or "tokenization" not in params:
            raise DsmrError("miditok tokenizer config needs 'params' with a 'tokenization'")
        cls = miditok_class(params["tokenization"])
        # miditok rebuilds a tokenizer (with any trained model) only from a params file.
        with tempfile.TemporaryDirectory(prefix="dsmr-miditok-") as tmp:
            params_path = Path(tmp) / "tokenizer.json"
            params_path.write_text(json.dumps(params))
            try:
                tokenizer = cls(params=params_path)
            except Exception as err:  # miditok raises KeyError/ValueError/TypeError for bad params
                raise DsmrError(f"bad miditok {cls.__name__} params in tokenizer config "
                                f"({type(err).__name__}: {err})") from err
        return MidiTokTokenizer(tokenizer, sustain=cfg.get("sustain", True))
    raise DsmrError(f"unknown tokenizer kind {kind!r} (known: performance, duration, miditok)")
