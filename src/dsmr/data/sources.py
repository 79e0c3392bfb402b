"""A piece collection's files: each with its split and a stable name."""


from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path



SPLITS = ("train", "validation", "test")


MIDI_SUFFIXES = (".mid", ".midi")


@dataclass(frozen=True)
class SourceFile:
    path: Path  # absolute path of the MIDI file
    split: str  # "train" | "validation" | "test"
    name: str  # stable id, relative to the corpus root (used in manifests and logs)
