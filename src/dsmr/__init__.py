"""dsmr: Depth-Structured Music Recurrence for full-piece symbolic music modeling.

The names most programs need, importable from the package itself (loaded on first use, so that
`import dsmr` and `dsmr --help` stay fast):

    from dsmr import DSMR, DSMRConfig, make_schedule, make_tokenizer, TokenCache, TrainConfig
    from dsmr import SamplingConfig, generate_batch, load_model

The package is laid out by stage (docs/architecture.md): `core` (files, options, devices), `data` (MIDI,
tokenizers, corpora, the token cache, lanes), `backends` (CPU kernels), `model`, `evaluation`, `sharing` (run
and model folders, the loader, the Hub), `training`, `generation` (sampling, the note guard, rendering, the
live duet), then `study`, `app` and `cli`. The training loop, evaluation and generation of one piece:
`dsmr.training.trainer.train`, `dsmr.evaluation.perplexity.evaluate`, `dsmr.generation.generate`. Module
paths of dsmr 0.1 (`dsmr.tokenizer`, `dsmr.train`, ...) still import, with a DeprecationWarning (dsmr._moved).
"""

from __future__ import annotations

import importlib

from dsmr import _moved

__version__ = "0.1.0"
_moved.install()

# name -> the module that defines it
_API = {
    "DSMR": "dsmr.model.network", "DSMRConfig": "dsmr.model.config", "make_schedule": "dsmr.model.schedule",
    "Schedule": "dsmr.model.schedule", "make_tokenizer": "dsmr.data.tokenizers.registry", "TokenCache": "dsmr.data.cache",
    "build_cache": "dsmr.data.cache_build", "TrainConfig": "dsmr.training.config", "SamplingConfig": "dsmr.generation",
    "generate_batch": "dsmr.generation", "load_model": "dsmr.sharing.loader", "NoteGuard": "dsmr.generation.note_guard",
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
