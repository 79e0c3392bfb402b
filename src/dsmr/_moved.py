"""The module paths of dsmr 0.1 that moved when the package was laid out by stage: importing one still works,
with a DeprecationWarning that names the new home, until dsmr 0.3.

`import dsmr.tokenizer` gives a stand-in module whose names are looked up, on first use, in the modules that
hold them now (a module that was split has several). Installed by `import dsmr`; it imports nothing itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

# old dotted name -> the modules its names live in now
MOVED = {
    "dsmr.atomic": ("dsmr.core.atomic",),
    "dsmr.files": ("dsmr.core.files",),
    "dsmr.configs": ("dsmr.core.configs",),
    "dsmr.options": ("dsmr.core.options",),
    "dsmr.runtime": ("dsmr.core.runtime",),
    "dsmr.tokenizer": ("dsmr.data.tokenizers.performance", "dsmr.data.tokenizers.base", "dsmr.data.midi"),
    "dsmr.miditok_encoding": ("dsmr.data.tokenizers.miditok_bridge",),
    "dsmr.duration_encoding": ("dsmr.data.tokenizers.duration",),
    "dsmr.encodings": ("dsmr.data.tokenizers.registry",),
    "dsmr.corpora": ("dsmr.data.corpora", "dsmr.data.maestro", "dsmr.data.sources", "dsmr.core.files"),
    "dsmr.cache": ("dsmr.data.cache",),
    "dsmr.cache_build": ("dsmr.data.cache_build",),
    "dsmr.stream": ("dsmr.data.stream",),
    "dsmr.augment": ("dsmr.data.augment",),
    "dsmr.model_config": ("dsmr.model.config",),
    "dsmr.schedule": ("dsmr.model.schedule",),
    "dsmr.losses": ("dsmr.model.losses",),
    "dsmr.kernels": ("dsmr.backends.cpu.kernels",),
    "dsmr.train_config": ("dsmr.training.config",),
    "dsmr.train": ("dsmr.training.trainer", "dsmr.training.optimization", "dsmr.training.inputs",
                   "dsmr.training.state", "dsmr.training.config"),
    "dsmr.distributed": ("dsmr.training.distributed",),
    "dsmr.run_log": ("dsmr.training.run_log",),
    "dsmr.run_lock": ("dsmr.training.run_lock",),
    "dsmr.checkpoint": ("dsmr.sharing.run_folder", "dsmr.training.resume"),
    "dsmr.evaluate": ("dsmr.evaluation.perplexity", "dsmr.core.runtime"),
    "dsmr.metrics": ("dsmr.evaluation.music_stats",),
    "dsmr.harmony": ("dsmr.evaluation.harmony",),
    "dsmr.playing": ("dsmr.generation.defaults",),
    "dsmr.note_guard": ("dsmr.generation.note_guard",),
    "dsmr.render": ("dsmr.generation.render", "dsmr.core.atomic"),
    "dsmr.live_midi": ("dsmr.generation.live.ports",),
    "dsmr.hub": ("dsmr.sharing.hub",),
    "dsmr.export": ("dsmr.sharing.export",),
    "dsmr.app_play": ("dsmr.app.play",),
    "dsmr.generation.fused": ("dsmr.backends.cpu.fused",),
}


def _stand_in(old: str, homes: tuple[str, ...]) -> types.ModuleType:
    module = types.ModuleType(old, f"moved: {', '.join(homes)}")

    def __getattr__(name: str):
        for home in homes:
            value = getattr(importlib.import_module(home), name, _MISSING)
            if value is not _MISSING:
                return value
        raise AttributeError(f"module {old!r} (now {', '.join(homes)}) has no attribute {name!r}")

    module.__getattr__ = __getattr__
    module.__path__ = []  # so that `import dsmr.old.sub` fails plainly instead of confusingly
    return module


_MISSING = object()


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return _stand_in(spec.name, MOVED[spec.name])

    def exec_module(self, module):
        warnings.warn(f"{module.__name__} moved to {' / '.join(MOVED[module.__name__])}; the old name works "
                      f"until dsmr 0.3", DeprecationWarning, stacklevel=2)


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
