"""The network: `config` (DSMRConfig, torch-free), `schedule` (per-layer horizons), `attention` (memory
attention, rotary positions), `memory` (a layer's state and the memory rule), `network` (blocks and DSMR),
`losses`. The main names load on first use (`from dsmr.model import DSMR`), so the torch-free modules import
without torch."""

from __future__ import annotations

import importlib

_API = {
    "DSMR": "dsmr.model.network", "Block": "dsmr.model.network", "DSMRConfig": "dsmr.model.config",
    "LayerMemory": "dsmr.model.memory", "MemoryAttention": "dsmr.model.attention",
    "Schedule": "dsmr.model.schedule", "make_schedule": "dsmr.model.schedule",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dsmr.model' has no attribute {name!r}")
