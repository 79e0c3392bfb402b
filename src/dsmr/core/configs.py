"""Plain-dataclass configs from JSON dicts (config.json sections), with clear errors for typos."""

from __future__ import annotations

import dataclasses

from dsmr.errors import DsmrError


def dataclass_from_dict(cls, d: dict, what: str):
    """Build the dataclass `cls` from `d`; unknown or missing required keys -> DsmrError naming `what`."""
    fields = dataclasses.fields(cls)
    unknown = sorted(set(d) - {f.name for f in fields})
    if unknown:
        raise DsmrError(f"{what}: unknown keys {unknown}")
    missing = [f.name for f in fields if f.name not in d and f.init
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise DsmrError(f"{what}: missing {', '.join(missing)}")
    return cls(**d)
