"""Training-data augmentation: each piece transposed, time-stretched and shifted in loudness as a lane takes it.

The peers' standard set (Music Transformer: +-3 semitones, time x0.95-1.05; Aria: +-5 semitones, tempo +-20%,
velocity +-1 step). A piece's ids are decoded to notes by its own tokenizer, the notes are changed, and the
tokenizer encodes them again, so an augmented piece is a valid piece of the encoding, re-quantized from note
times, whatever the encoding (performance, duration, or a miditok one).

* Transposition by k semitones, k drawn uniformly from the shifts within +-`transpose` that keep every note
  inside the encoding's pitch range and inside the piano's (21-108) when the piece lies there: no note is
  ever dropped or folded, a piece near the edge is transposed only the way it has room.
* Time stretch by a factor drawn uniformly from [1 - stretch, 1 + stretch]: onsets and lengths scale
  together (the tempo changes, the rhythm stays).
* Velocity: every note's MIDI velocity moves by d, drawn from -`velocity_shift`..`velocity_shift`, clipped
  to 1..127 (4 MIDI steps are one velocity bin of the 32-bin encodings).

What a piece becomes is a function of (seed, epoch, piece) alone (`piece_rng`), so an exact resume
rebuilds the pieces its lanes were reading, and every rank of a data-parallel run sees the same lanes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PIANO_RANGE = (21, 108)


@dataclass(frozen=True)
class Augmentation:
    transpose: int = 0         # semitones each way
    stretch: float = 0.0       # fraction each way
    velocity_shift: int = 0    # MIDI velocity steps each way

    @property
    def active(self) -> bool:
        return bool(self.transpose or self.stretch or self.velocity_shift)

    def describe(self) -> dict | None:
        """What a resumed stream checks (None when off, as streams saved before augmentation existed)."""
        if not self.active:
            return None
        return {"transpose": self.transpose, "stretch": self.stretch, "velocity_shift": self.velocity_shift}

    def apply(self, tokenizer, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """`ids` (event ids without BOS/EOS) with changes drawn from `rng`; the ids themselves when nothing
        changes (or the piece has no notes)."""
        score = tokenizer.decode(ids)
        pitches = [t.notes.numpy()["pitch"] for t in score.tracks if t.note_num()]
        if not pitches:
            return ids
        pitches = np.concatenate(pitches).astype(np.int64)
        k = draw_transposition(int(pitches.min()), int(pitches.max()), self.transpose,
                               tokenizer.pitch_range(), rng)
        factor = float(rng.uniform(1 - self.stretch, 1 + self.stretch)) if self.stretch else 1.0
        d = int(rng.integers(-self.velocity_shift, self.velocity_shift + 1)) if self.velocity_shift else 0
        if k == 0 and factor == 1.0 and d == 0:
            return ids
        out = np.asarray(tokenizer.encode(changed_score(score, k, factor, d)), dtype=np.int64)
        return out if out.size else ids


def changed_score(score, semitones: int = 0, factor: float = 1.0, velocity: int = 0):
    """`score` (changed in place and returned) with every note `semitones` higher, its onset and length
    times `factor`, and its velocity `velocity` steps louder (within 1..127)."""
    from symusic import Note, TimeUnit

    for track in score.tracks:
        if not track.note_num():
            continue
        n = track.notes.numpy()
        time, duration = n["time"] * factor, n["duration"] * factor
        if score.ttype != TimeUnit.second:  # tick times are integers
            time, duration = np.round(time), np.maximum(np.round(duration), 1)
        pitch = n["pitch"].astype(np.int64) + semitones
        loudness = np.clip(n["velocity"].astype(np.int64) + velocity, 1, 127)
        track.notes = Note.from_numpy(time.astype(n["time"].dtype), duration.astype(n["duration"].dtype),
                                      pitch.astype(n["pitch"].dtype), loudness.astype(n["velocity"].dtype),
                                      ttype=score.ttype)
    return score


def draw_transposition(lowest: int, highest: int, most: int, pitch_range: tuple[int, int],
                       rng: np.random.Generator) -> int:
    """A shift in -most..most that keeps [lowest, highest] inside the encoding's range, and inside the
    piano's where the piece already is; 0 when `most` is 0 (drawing nothing from rng)."""
    if not most:
        return 0
    lo = max(pitch_range[0], min(PIANO_RANGE[0], lowest))
    hi = min(pitch_range[1], max(PIANO_RANGE[1], highest))
    down, up = max(-most, lo - lowest), min(most, hi - highest)
    return int(rng.integers(down, up + 1)) if down <= up else 0


def piece_rng(seed: int, epoch: int, piece: int) -> np.random.Generator:
    """The generator of one piece's changes in one epoch (a stream of its own, apart from the shuffle's)."""
    return np.random.default_rng([seed, epoch, piece, 0xA06])


class PieceAugmenter:
    """An Augmentation bound to the tokenizer of the pieces: what a training stream calls per piece taken."""

    def __init__(self, augmentation: Augmentation, tokenizer):
        self.augmentation, self.tokenizer = augmentation, tokenizer

    def __call__(self, ids: np.ndarray, seed: int, epoch: int, piece: int) -> np.ndarray:
        return self.augmentation.apply(self.tokenizer, ids, piece_rng(seed, epoch, piece))

    def describe(self) -> dict | None:
        return self.augmentation.describe()
