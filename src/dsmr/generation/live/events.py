"""What a duet is made of: the turn settings, the notes of either part, the timestamped events the engine
hands out, and an answer in progress."""


from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from dsmr.errors import DsmrError


@dataclass(frozen=True)
class LiveSettings:
    wait: float = 0.8                    # seconds of silence that end the player's turn
    answer_seconds: Optional[float] = None  # None: as long as the player's last phrase
    min_answer_seconds: float = 2.0
    max_answer_seconds: float = 30.0
    lookahead: float = 0.5               # seconds of the answer sampled ahead of the clock
    late_tolerance: float = 0.01         # a note-on later than this is dropped
    turn_cc: Optional[int] = None        # a controller whose press (value >= 64) ends the turn at once
    steps_per_poll: int = 32             # sampling steps one `poll` may take (keeps the caller's loop responsive)
    first_poll_steps: int = 4            # ...and the first poll of an answer: its first event is queued at once
    answer_lead: float = 0.03            # the answer's clock starts this long after the turn ends, so that its
                                         # first notes are sampled before they are due (never dropped as late)
    prepare_ahead: float = 0.1           # the answer is begun (sampled ahead, nothing sent) this long before the
                                         # silence would end the turn; the player's next note undoes it

    def validate(self) -> None:
        problems = []
        for name in ("wait", "lookahead", "min_answer_seconds", "max_answer_seconds"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.answer_seconds is not None and not self.answer_seconds > 0:
            problems.append(f"answer_seconds must be > 0 (or None: as long as the player's phrase), got "
                            f"{self.answer_seconds}")
        for name in ("answer_lead", "prepare_ahead"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1] seconds, got {getattr(self, name)}")
        if not self.late_tolerance >= 0:
            problems.append(f"late_tolerance must be >= 0, got {self.late_tolerance}")
        if self.turn_cc is not None and not 0 <= self.turn_cc <= 127:
            problems.append(f"turn_cc must be a MIDI controller 0..127, got {self.turn_cc}")
        if problems:
            raise DsmrError("live settings: " + "; ".join(problems))


@dataclass
class Note:
    onset: int                           # steps since the session's start
    pitch: int
    velocity: int
    end: Optional[int] = None            # None: still held
    released: bool = False               # the player's: its key is up (the pedal may still hold it)
    sent: bool = False                   # the model's: its note-on went out
    dropped: bool = False                # the model's: its note-on was late and dropped


@dataclass(order=True)
class NoteEvent:
    time: float                          # seconds on the caller's clock
    order: int                           # ties: offs (negative) before ons, then first queued first
    kind: str = field(compare=False)     # "on" or "off"
    pitch: int = field(compare=False)
    velocity: int = field(compare=False, default=0)
    note: Optional[Note] = field(compare=False, default=None, repr=False)


@dataclass
class Answer:
    start: float                      # when the turn ended (caller's clock)
    start_step: int
    end_step: int
    before: dict                      # the stream before the answer (decoder, guard, logits, bin, fed_step,
                                      # phrase_start, generator): a takeover returns to it
    provisional: bool = False         # begun before the turn's end: nothing of it goes out until `start`
    clock: int = -1                   # the answer's clock in steps (set in __post_init__)
    velocity: int = 64
    done: bool = False
    sampled: int = 0                  # events sampled so far
    sounding: dict = field(default_factory=dict)   # pitch -> Note sampled and not yet ended (offs)
    notes: list = field(default_factory=list)      # every note the answer sampled
    note: Optional[list] = None                    # duration encoding: [pitch, onset, seconds] being written

    def __post_init__(self):
        self.clock = self.start_step


def session_score(record: dict):
    """A session's notes (`LiveEngine.record`: per part, columns onset, end, pitch, velocity in 10-ms steps)
    as a symusic Score in seconds, one track per part."""
    import numpy as np
    import symusic

    from dsmr.data.tokenizers.base import STEPS_PER_SECOND

    score = symusic.Score(480, ttype="second")
    score.tempos.append(symusic.Tempo(0.0, qpm=120.0, ttype="second"))
    for name in ("player", "model"):
        onset, end, pitch, velocity = (np.frombuffer(a, dtype=np.float64) for a in record[name])
        track = symusic.Track(name, program=0, ttype="second")
        if onset.size:
            track.notes = symusic.Note.from_numpy(
                (onset / STEPS_PER_SECOND).astype(np.float32), ((end - onset) / STEPS_PER_SECOND).astype(np.float32),
                pitch.astype(np.int8), velocity.astype(np.int8), ttype="second")
            track.notes.sort()
        score.tracks.append(track)
    return score
