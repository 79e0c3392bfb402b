"""Playing live: `engine.LiveEngine` (a duet with a model, no I/O inside; `events` and `feeding` are its
parts) and `ports` (the engine on MIDI ports, mido + python-rtmidi, for `dsmr live`).

    from dsmr.generation.live import LiveEngine, LiveSettings
"""

from dsmr.generation.live.engine import LiveEngine
from dsmr.generation.live.events import LiveSettings, NoteEvent

__all__ = ["LiveEngine", "LiveSettings", "NoteEvent"]
