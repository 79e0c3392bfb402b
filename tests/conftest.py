"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The MAESTRO copy lives in shared/ beside the repository (DSMR_MAESTRO overrides); a user's fresh clone
# does not have it, so tests that need it skip with this reason.
MAESTRO_ROOT = Path(os.environ.get("DSMR_MAESTRO", REPO.parent / "shared" / "data" / "maestro-v3.0.0"))
MAESTRO_SKIP_REASON = f"MAESTRO not found at {MAESTRO_ROOT} (set DSMR_MAESTRO to its folder)"


@pytest.fixture(scope="session")
def maestro_root() -> Path:
    if not (MAESTRO_ROOT / "maestro-v3.0.0.csv").exists() and not (MAESTRO_ROOT / "maestro-v3.0.0.json").exists():
        pytest.skip(MAESTRO_SKIP_REASON)
    return MAESTRO_ROOT
