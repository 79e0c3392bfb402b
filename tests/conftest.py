"""Shared test fixtures."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# The suite's models are tiny and CI has 2 shared cores: one torch thread per process is many times faster
# than two threads contending (measured 85 s vs 12 s for the trainer tests). The environment variable also
# reaches the CLI subprocesses that tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
# The MAESTRO copy lives in shared/ beside the repository (DSMR_MAESTRO overrides); a user's fresh clone
# does not have it, so tests that need it skip with this reason.
MAESTRO_ROOT = Path(os.environ.get("DSMR_MAESTRO", REPO.parent / "shared" / "data" / "maestro-v3.0.0"))
MAESTRO_SKIP_REASON = f"MAESTRO not found at {MAESTRO_ROOT} (set DSMR_MAESTRO to its folder)"


class _SessionCache:
    """Stands in for pytest's cache under `-p no:cacheprovider` (fixtures keep converted MIDI there): folders
    in a temporary directory, deleted at the end of the run."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="dsmr-tests-"))

    def mkdir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(exist_ok=True)
        return path


def pytest_configure(config):
    if not hasattr(config, "cache"):
        config.cache = _SessionCache()


def pytest_unconfigure(config):
    if isinstance(getattr(config, "cache", None), _SessionCache):
        shutil.rmtree(config.cache.root, ignore_errors=True)


def have_audio() -> bool:
    """FluidSynth and a General MIDI soundfont are installed (WAV rendering works)."""
    from dsmr.errors import DsmrError
    from dsmr.generation.render import find_fluidsynth, find_soundfont

    try:
        find_fluidsynth()
        find_soundfont()
    except DsmrError:
        return False
    return True


def kernels_must_build() -> bool:
    """Where dsmr's CPU kernels can be built (an AVX2 CPU, a C++ compiler, not switched off), a failed build
    is a failure, not a skip: CI has both, and a broken kernel must not pass as "not built here"."""
    from dsmr.backends.cpu import kernels
    return kernels.supported_cpu() and not kernels.disabled() and shutil.which("c++") is not None


@pytest.fixture(scope="session")
def kernels_built() -> bool:
    """Whether the kernels loaded; fails the test where they should have (kernels_must_build)."""
    from dsmr.backends.cpu import kernels
    if kernels.load():
        return True
    if kernels_must_build():
        pytest.fail(f"dsmr.backends.cpu.kernels failed to build on a machine that can build them: {kernels.load_error()}")
    return False


@pytest.fixture(scope="session")
def maestro_root() -> Path:
    if not (MAESTRO_ROOT / "maestro-v3.0.0.csv").exists() and not (MAESTRO_ROOT / "maestro-v3.0.0.json").exists():
        pytest.skip(MAESTRO_SKIP_REASON)
    return MAESTRO_ROOT


@pytest.fixture(scope="session")
def bach_cache(request, tmp_path_factory):
    """A token cache of a few dozen Bach chorales (music21's bundled corpus, performance encoding).

    The chorale -> MIDI conversion is the slow part (~0.2 s a work); its output is kept in pytest's cache
    folder (.pytest_cache), so only the first run on a machine pays for it."""
    from dsmr.data.cache import TokenCache
    from dsmr.data.cache_build import build_cache
    from dsmr.data.corpora import corpus_files
    from dsmr.data.tokenizers.registry import make_tokenizer

    midi_dir = request.config.cache.mkdir("dsmr-bach-midi")
    files, _ = corpus_files("bach", midi_dir, limit=48, progress=False)
    summary = build_cache(files, tmp_path_factory.mktemp("bach-cache"), make_tokenizer("performance"),
                          workers=1, progress=False, source={"corpus": "bach"})
    return TokenCache(summary.cache)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test starts and ends with one torch thread: in-process CLI calls set the process's threads
    (`--threads 0` picks one per idle core), and a module-scoped reference trained after such a test would
    otherwise sum in another order than a subprocess does."""
    import torch

    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture
def kernels_off():
    """Decoding without dsmr.backends.cpu.kernels (the PyTorch path), restored afterwards."""
    from dsmr.backends.cpu import kernels
    old = kernels.set_enabled(False)
    yield
    kernels.set_enabled(old)
