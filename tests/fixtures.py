"""Fixtures shared by the trainer/evaluation tests (import the ones a module needs).

`bach_cache`: a token cache of a few dozen Bach chorales (music21's bundled corpus, performance
encoding). The chorale -> MIDI conversion is the slow part (~0.2 s a work); its output is kept in
pytest's cache folder (.pytest_cache), so only the first run on a machine pays for it.
"""

from __future__ import annotations

import pytest

N_CHORALES = 48


@pytest.fixture(scope="session")
def bach_cache(request, tmp_path_factory):
    from dsmr.cache import TokenCache, build_cache
    from dsmr.corpora import corpus_files
    from dsmr.tokenizer import make_tokenizer

    midi_dir = request.config.cache.mkdir("dsmr-bach-midi")
    files, _ = corpus_files("bach", midi_dir, limit=N_CHORALES, progress=False)
    summary = build_cache(files, tmp_path_factory.mktemp("bach-cache"), make_tokenizer("performance"),
                          workers=1, progress=False, source={"corpus": "bach"})
    return TokenCache(summary.cache)


@pytest.fixture(scope="module", autouse=False)
def single_thread():
    """Tiny models run fastest on one thread, and the test machine's cores are shared: with several
    threads, small ops wait on each other. Restores the thread count afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
