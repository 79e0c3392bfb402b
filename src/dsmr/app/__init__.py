"""`dsmr app`, the web page: `page` (the Gradio Blocks and the server), `models` (the models it plays),
`continuation` (continuing a piece), `play` (the live duet's view and websocket), `assets` (its script and
styles, shipped with the package). `from dsmr.app import serve, build_app` loads them on first use."""

from __future__ import annotations

import importlib

_API = {
    "serve": "dsmr.app.page", "build_app": "dsmr.app.page", "ModelStore": "dsmr.app.models",
    "default_model": "dsmr.app.models", "generate_variations": "dsmr.app.continuation",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dsmr.app' has no attribute {name!r}")
