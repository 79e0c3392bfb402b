"""What every encoding shares: the special ids, the 10-ms step, the `Tokenizer` protocol and the base class
the encodings build on (file reading, hashing, note counts)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import symusic

from dsmr.errors import DsmrError
from dsmr.core.files import MAX_FILE_BYTES
from dsmr.data.midi import load_midi, check_piece_bounds, write_midi, DEFAULT_MAX_SECONDS


PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_NAMES = ("PAD", "BOS", "EOS")
STEPS_PER_SECOND = 100  # one TIME_SHIFT step is 10 ms
DEFAULT_VELOCITY = 64  # for NOTE_ONs sampled before any VELOCITY event


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, score: symusic.Score) -> np.ndarray: ...
    def decode(self, ids: Sequence[int]) -> symusic.Score: ...
    def encode_file(self, path: str | os.PathLike, *, max_seconds: float | None = ...,
                    max_bytes: int | None = ...) -> np.ndarray: ...
    def decode_to_file(self, ids: Sequence[int], path: str | os.PathLike) -> None: ...
    def config(self) -> dict: ...
    def config_hash(self) -> str: ...
    def event_name(self, i: int) -> str: ...
    def vocabulary(self) -> list[str]: ...
    def seconds(self, ids: Sequence[int]) -> float: ...
    def note_pitch(self, i: int) -> int | None: ...
    def note_off_pitch(self, i: int) -> int | None: ...
    def pitch_range(self) -> tuple[int, int]: ...
    def count_notes(self, pieces: Iterable[Sequence[int] | np.ndarray]) -> int: ...
    def event_seconds(self, i: int) -> float | None: ...


def canonical_hash(cfg: dict) -> str:
    """sha256 hex of a config's canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(cfg, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _as_id_array(ids: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    """ids as int64; DsmrError naming the first id outside [0, vocab_size)."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise DsmrError(f"token ids must be a flat sequence, got an array of shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DsmrError(f"token ids must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        raise DsmrError(f"token id {int(arr[bad[0]])} at position {int(bad[0])} is out of range [0, {vocab_size})")
    return arr


class _TokenizerBase:
    """What every dsmr tokenizer shares: config hashing and equality, name lookup, file output."""

    vocab_size: int
    eos_id: int

    def config(self) -> dict:
        raise NotImplementedError

    def vocabulary(self) -> list[str]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> symusic.Score:
        raise NotImplementedError

    def config_hash(self) -> str:
        return canonical_hash(self.config())

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.config() == other.config()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self.config_hash())

    def event_id(self, name: str) -> int:
        """The id of an event name (the inverse of `event_name`)."""
        if getattr(self, "_ids_by_name", None) is None:
            self._ids_by_name = {event: i for i, event in enumerate(self.vocabulary())}
        if name not in self._ids_by_name:
            raise DsmrError(f"unknown event name {name!r} for {self!r}")
        return self._ids_by_name[name]

    def encode_file(self, path: str | os.PathLike, *, max_seconds: float | None = DEFAULT_MAX_SECONDS,
                    max_bytes: int | None = MAX_FILE_BYTES) -> np.ndarray:
        """Event ids of a MIDI file. Every failure is a DsmrError that names the path and says what is
        wrong: not a regular file, larger than `max_bytes`, not MIDI, a piece longer than `max_seconds`
        (None: no limit), or no notes to encode."""
        score = load_midi(path, max_bytes)
        check_piece_bounds(score, path, max_seconds)
        try:
            ids = self.encode(score)
        except DsmrError:
            raise
        except MemoryError:
            raise DsmrError(f"{path}: out of memory while encoding the piece") from None
        except Exception as err:  # a parser or tokenizer bug on a strange file: still the user's file
            raise DsmrError(f"{path}: cannot encode the piece ({type(err).__name__}: {err})") from err
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise DsmrError(f"{path}: the tokenizer returned an array of shape {ids.shape} and dtype {ids.dtype}")
        if ids.size == 0:
            raise DsmrError(self._no_notes_message(path))
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise DsmrError(f"{path}: the tokenizer returned ids outside 0..{self.vocab_size - 1}")
        return ids.astype(np.int64, copy=False)

    def _no_notes_message(self, path) -> str:
        return f"no notes to encode: {path}"

    def note_pitch(self, i: int) -> int | None:
        """The MIDI pitch of event `i` when it starts a note, else None."""
        return None

    def note_off_pitch(self, i: int) -> int | None:
        """The MIDI pitch of event `i` when it ends a note, else None (also for encodings whose notes carry
        their duration, which cannot leave a note hanging)."""
        return None

    def pitch_range(self) -> tuple[int, int]:
        """The lowest and highest MIDI pitch the encoding can hold."""
        return 0, 127

    def note_start_mask(self) -> np.ndarray:
        """Per id, whether the event starts a note (`note_pitch` is not None): what `count_notes` counts."""
        if getattr(self, "_note_start_mask", None) is None:
            self._note_start_mask = np.array([self.note_pitch(i) is not None for i in range(self.vocab_size)])
        return self._note_start_mask

    def count_notes(self, pieces: Iterable[Sequence[int] | np.ndarray]) -> int:
        """Notes the pieces hold: one per note-starting event, whatever the encoding (so a model's loss can be
        put per note, the one scale on which encodings with different tokens per note compare)."""
        mask = self.note_start_mask()
        return sum(int(mask[np.asarray(ids, dtype=np.int64)].sum()) for ids in pieces)

    def event_seconds(self, i: int) -> float | None:
        """Seconds that event `i` adds to the music wherever it occurs, so that a piece lasts the sum over its
        events (a time shift's length; 0 for events that take no time); None when the id alone does not
        fix it (time that depends on the events around it, or on a tempo)."""
        return None

    def decode_to_file(self, ids: Sequence[int], path: str | os.PathLike) -> None:
        """Decode ids and write them as a standard MIDI file, atomically."""
        write_midi(self.decode(ids), path)

    def _ids_before_eos(self, ids: Sequence[int]) -> np.ndarray:
        """ids as int64, checked against the vocabulary, cut at the first EOS."""
        ids = _as_id_array(ids, self.vocab_size)
        eos = np.flatnonzero(ids == self.eos_id)
        return ids[: eos[0]] if eos.size else ids
