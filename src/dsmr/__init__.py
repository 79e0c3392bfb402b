"""dsmr: Depth-Structured Music Recurrence for full-piece symbolic music modeling.

The names most programs need, importable from the package itself (loaded on first use, so that
`import dsmr` and `dsmr --help` stay fast):

    from dsmr import DSMR, DSMRConfig, make_schedule, make_tokenizer, TokenCache, TrainConfig
    from dsmr import SamplingConfig, generate_batch, load_model

The training loop, evaluation and generation of one piece are functions of the modules of the same name
(`dsmr.train.train`, `dsmr.evaluate.evaluate`, `dsmr.generation.generate`).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> the module that defines it
_API = {
    "DSMR": "dsmr.model", "DSMRConfig": "dsmr.model_config", "make_schedule": "dsmr.schedule",
    "Schedule": "dsmr.schedule", "make_tokenizer": "dsmr.encodings", "TokenCache": "dsmr.cache",
    "build_cache": "dsmr.cache_build", "TrainConfig": "dsmr.train_config", "SamplingConfig": "dsmr.generation",
    "generate_batch": "dsmr.generation", "load_model": "dsmr.model", "NoteGuard": "dsmr.note_guard",
    "StudyConfig": "dsmr.study", "run_study": "dsmr.study", "DsmrError": "dsmr.errors",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dsmr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
