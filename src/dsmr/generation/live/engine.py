"""The live engine: a duet with a model, no I/O inside (the caller brings the clock and the MIDI ports).

The player's notes go into the decoder's bounded state as they are settled -- in the performance encoding
each note-on and note-off as it arrives, in the duration encoding each note once its length is known (in
onset order) -- so the model is always up to date and the past is never encoded again. When the player's
turn ends (`wait` seconds with no key down and nothing played, or a chosen controller), the model answers
from everything played so far by both parts: it samples ahead of the clock, at most `lookahead` seconds,
into a queue of timestamped notes that `poll` hands out when they are due. The answer is begun
`prepare_ahead` seconds before the silence would end the turn, so its first notes are already queued when
it does; a note played meanwhile undoes it (state, sampler and all). A note-on that would go out more
than `late_tolerance` late is dropped and counted (never sent late in a burst), and its note-off with it;
every note the engine started is ended. The player can take over at any moment: the answer stops at once
(its sounding notes end), the state returns to the answer's start and takes in the answer as it was
heard (notes cut where the player came in: note-offs in the performance encoding, shorter lengths in the
duration encoding), then the player's notes.

Times are seconds on the caller's clock (say `time.monotonic()`); the encoding's own clock steps 10 ms.
"""

from __future__ import annotations

import copy
import dataclasses
import heapq
from array import array
from typing import Optional

import torch

from dsmr.errors import DsmrError
from dsmr.generation.decoder import IncrementalDecoder
from dsmr.generation.precision import decoding_state_dtype
from dsmr.generation.sampling import SamplingConfig, banned_mask, sample_next
from dsmr.generation.note_guard import has_note_lengths, has_note_offs, make_guard
from dsmr.data.tokenizers.base import STEPS_PER_SECOND
from dsmr.generation.live.events import LiveSettings, Note, NoteEvent, Answer, session_score
from dsmr.generation.live.feeding import StateFeeding

SUSTAIN = 64  # the sustain pedal's controller


class LiveEngine(StateFeeding):
    """A duet between a player and `model` (from `dsmr.load_model`, so it carries its tokenizer and
    segment length; `with_precision` for speed), sampling with `sampling` (`playing_sampling(model)`: the
    model's own settings; its length limits are ignored, the engine stops each answer itself)."""

    def __init__(self, model, sampling: SamplingConfig, settings: LiveSettings = LiveSettings(), start: float = 0.0,
                 seed: Optional[int] = None):
        settings.validate()
        self.model, self.tokenizer, self.settings = model, model.tokenizer, settings
        tok = self.tokenizer
        self.kind = "offs" if has_note_offs(tok) else "lengths" if has_note_lengths(tok) else None
        if self.kind is None:
            raise DsmrError(f"live play needs the performance or the duration encoding; {tok!r} writes neither")
        self.sampling = sampling
        device = model.embedding.weight.device
        self.decoder = IncrementalDecoder(model, model.segment_len, 1, device=device,
                                          state_dtype=decoding_state_dtype(model, False))
        seed = sampling.seed if seed is None else seed
        self.generator = torch.Generator(device=device).manual_seed(seed if seed is not None else 0)
        self.banned = banned_mask(tok, dataclasses.replace(sampling, stop_at_eos=False), device=device)  # EOS banned: a duet never ends by itself[None]
        self.guard = make_guard(tok, 1, sampling.max_note_seconds, sampling.max_polyphony, device=device)
        self.start = start
        self.logits = self.decoder.feed(torch.tensor([[tok.bos_id]], device=device), last_only=True)
        self.fed_step = 0                 # the clock of the token stream, in steps
        self.bin = None                   # the VELOCITY id in force in the stream
        self.held: dict[int, Note] = {}  # the player's keys down (and notes the pedal holds)
        self.pending: list[Note] = []    # duration encoding: the player's notes not yet fed, by onset
        self.pedal = False
        self.last_activity: Optional[float] = None
        self.phrase_start: Optional[float] = None
        self.answer: Optional[Answer] = None
        self.queue: list[NoteEvent] = []
        self.sounding: dict[int, Note] = {}  # the model's notes whose note-on went out and whose note-off did not
        self._order = 0
        self.stats = {"answers": 0, "takeovers": 0, "late_dropped": 0, "sent": 0}
        self.record = {"player": [array("d") for _ in range(4)], "model": [array("d") for _ in range(4)]}
        self._warm_up()

    # ------------------------------------------------------------------------------------------- player

    def note_on(self, t: float, pitch: int, velocity: int) -> None:
        if velocity <= 0:
            return self.note_off(t, pitch)
        if self.answer is not None:
            self._take_over(t)
        self.last_activity = t
        if self.phrase_start is None:
            self.phrase_start = t
        step = self._step(t)
        if pitch in self.held:
            self._end_player_note(self.held.pop(pitch), step)
        note = Note(step, int(pitch), int(velocity))
        self.held[pitch] = note
        if self.kind == "offs":
            self._feed_event(step, "on", note.pitch, note.velocity)
        else:
            self.pending.append(note)

    def note_off(self, t: float, pitch: int) -> None:
        if self.answer is not None and self.answer.provisional:
            self._take_over(t)  # the silence was not over: the answer begun for it is undone
        self.last_activity = t
        note = self.held.get(pitch)
        if note is None:
            return
        note.released = True
        if self.pedal:  # held by the pedal until it lifts
            return
        del self.held[pitch]
        self._end_player_note(note, self._step(t))

    def control(self, t: float, number: int, value: int) -> None:
        if number in (SUSTAIN, self.settings.turn_cc) and self.answer is not None and self.answer.provisional:
            self._take_over(t)  # the pedal holds the turn open, or the controller ends it now
        if number == SUSTAIN:
            down = value >= 64
            if self.pedal and not down:  # the pedal lifts: the notes it held end now
                self.pedal = False
                step = self._step(t)
                for pitch, note in list(self.held.items()):
                    if note.released:
                        del self.held[pitch]
                        self._end_player_note(note, step)
            self.pedal = down
        elif number == self.settings.turn_cc and value >= 64 and self.answer is None:
            self._begin_answer(t)

    def _end_player_note(self, note: Note, step: int) -> None:
        note.end = max(step, note.onset + 1)
        self._record("player", note)
        if self.kind == "offs":
            self._feed_event(note.end, "off", note.pitch)
        else:
            self._flush_pending()

    # ---------------------------------------------------------------------------------------- the clock

    def poll(self, now: float) -> list[NoteEvent]:
        """Advance to `now`: end the player's turn when it is over, sample the answer ahead of the clock, and
        return the events due to be sent now (late note-ons dropped)."""
        if self.answer is None and self._turn_over(now, ahead=self.settings.prepare_ahead):
            turn_end = self.last_activity + self.settings.wait
            self._begin_answer(max(now, turn_end), provisional=now < turn_end)
        a = self.answer
        if a is not None:
            a.provisional = a.provisional and now < a.start
            self._sample_ahead(max(now, a.start))
        due = []
        while self.queue and self.queue[0].time <= now:
            event = heapq.heappop(self.queue)
            note = event.note
            if event.kind == "on":
                if now - event.time > self.settings.late_tolerance:  # late: dropped with its note-off
                    self.stats["late_dropped"] += 1
                    note.dropped = True
                    continue
                if event.pitch in self.sounding:  # the same key again: end the old note first
                    old = self.sounding.pop(event.pitch)
                    due.append(self._off_at(event.time, old))
                    self._record("model", old)
                note.sent = True
                self.sounding[event.pitch] = note
            elif note.dropped or self.sounding.get(event.pitch) is not note:
                continue  # its note-on never went out, or a re-strike ended it already
            else:
                del self.sounding[event.pitch]
                self._record("model", note)
            self.stats["sent"] += 1
            due.append(event)
        if self.answer is not None and self.answer.done and not self.queue and not self.answer.provisional:
            self.answer = None
        return due

    def next_due(self) -> Optional[float]:
        """When the next queued event is due (None: nothing queued)."""
        return self.queue[0].time if self.queue else None

    def stop(self, now: float) -> list[NoteEvent]:
        """End everything: the model's sounding notes (note-offs now) and the answer; the player's held notes
        are recorded as ending now."""
        offs = self._silence_model(now)
        for event in offs:
            self._record("model", self.sounding.pop(event.pitch))
        if self.answer is not None and self.answer.provisional:
            self._take_over(now)  # begun ahead of a turn's end that never came: undone, not counted
        self.queue.clear()
        self.answer = None
        step = self._step(now)
        for note in list(self.held.values()):
            note.end = max(step, note.onset + 1)
            self._record("player", note)
        self.held.clear()
        return offs

    @property
    def answering(self) -> bool:
        """Whether the model has the turn (an answer begun ahead of the turn's end does not count yet)."""
        return self.answer is not None and not self.answer.provisional

    @property
    def answer_started(self) -> Optional[float]:
        """When the current answer's turn began (None: listening)."""
        return self.answer.start if self.answering else None

    @property
    def answer_queued(self) -> bool:
        """Whether the current answer has queued a note yet."""
        return self.answering and bool(self.answer.notes)

    @property
    def answer_begun(self) -> bool:
        """Whether the current answer has sampled its first event (a note, or the pause before one)."""
        return self.answering and self.answer.sampled > 0

    def first_note_delay(self) -> Optional[float]:
        """Seconds of music from the end of the turn to the current answer's first note (the model's own
        pause; None before it has one)."""
        a = self.answer
        return None if not self.answering or not a.notes else (a.notes[0].onset - a.start_step) / STEPS_PER_SECOND

    def state_bytes(self) -> int:
        return self.decoder.state_bytes()

    def recording(self):
        """The session so far as a symusic Score (seconds): the player's notes and the model's, two tracks."""
        return session_score(self.record)

    # ------------------------------------------------------------------------------------ turn taking

    def _turn_over(self, now: float, ahead: float = 0.0) -> bool:
        """Whether the player's silence has lasted the wait (`ahead`: or will, that many seconds from now)."""
        return (self.phrase_start is not None and not self.held and not self.pedal
                and now - self.last_activity >= self.settings.wait - ahead)

    def _answer_length(self, now: float) -> float:
        s = self.settings
        if s.answer_seconds is not None:
            return s.answer_seconds
        phrase = (self.last_activity or now) - (self.phrase_start or now)
        return min(max(phrase, s.min_answer_seconds), s.max_answer_seconds)

    def _begin_answer(self, now: float, provisional: bool = False) -> None:
        """The model's turn from `now` (`provisional`: the turn ends at `now`, still to come, unless the player
        plays first; its first events are sampled meanwhile, so the turn's end costs no computing)."""
        step = self._step(now + self.settings.answer_lead)
        for note in self.held.values():  # the pedal or a key still down (a controller ended the turn)
            if self.kind == "lengths":
                note.end = note.end or max(step, note.onset + 1)  # its length so far, the best estimate now
        self._flush_pending(force=True)
        before = dict(decoder=self.decoder.snapshot(), guard=copy.deepcopy(self.guard), logits=self.logits.clone(),
                      bin=self.bin, fed_step=self.fed_step, phrase_start=self.phrase_start,
                      generator=self.generator.get_state())
        self._feed(self.tokenizer.shift_ids(step - self.fed_step))
        self.fed_step = step
        self.answer = Answer(start=now, start_step=step, end_step=step + round(self._answer_length(now) * 100),
                             before=before, provisional=provisional,
                             velocity=self.tokenizer.velocity_of(self.bin) if self.bin is not None else 64)
        self.phrase_start = None
        self.stats["answers"] += 1

    def _sample_ahead(self, now: float) -> None:
        a = self.answer
        horizon = self._step(now + self.settings.lookahead)
        for _ in range(self.settings.steps_per_poll if a.sampled else self.settings.first_poll_steps):
            if a.done or a.clock >= horizon:
                return
            ban = self.banned
            if self.guard is not None:
                guard_ban = ban | self.guard.banned()
                ban = torch.where(guard_ban.all(dim=-1, keepdim=True), ban, guard_ban)
            token = sample_next(self.logits, self.sampling, self.generator, ban)
            if self.guard is not None:
                self.guard.update(token)
            self.logits = self.decoder.step(token)
            a.sampled += 1
            self._hear_model(int(token[0]), now)

    def _hear_model(self, token: int, now: float) -> None:
        """Turn one sampled event into queued notes on the answer's clock."""
        a, tok = self.answer, self.tokenizer
        if a.note is not None and tok.length_seconds(token) is None:
            self._end_pending_note(now, complete=False)  # as the tokenizer reads a NOTE whose length never came
        seconds = tok.event_seconds(token) or 0.0
        if seconds:
            a.clock += round(seconds * STEPS_PER_SECOND)
            self.fed_step = a.clock
            if a.clock >= a.end_step:
                a.done = True
                self._finish_model_notes(a.end_step)
            return
        velocity = tok.velocity_of(token)
        if velocity is not None:
            a.velocity = velocity
            self.bin = token
            return
        pitch = tok.note_pitch(token)
        if self.kind == "offs":
            off = tok.note_off_pitch(token)
            if pitch is not None:
                if pitch in a.sounding:
                    self._model_off(pitch, a.clock)
                self._model_on(pitch, a.clock, a.velocity, now)
            elif off is not None and off in a.sounding:
                self._model_off(off, a.clock)
            return
        length = tok.length_seconds(token)
        if pitch is not None:
            a.note = [pitch, a.clock, 0.0]
        elif length is not None and a.note is not None:
            a.note[2] += length[0]
            if length[1]:  # the length is complete: the note is known whole
                self._end_pending_note(now, complete=True)

    def _end_pending_note(self, now: float, complete: bool) -> None:
        """Duration encoding: queue the note being written with its length (cut short by another event: its
        whole seconds so far and one step, as `DurationTokenizer.decode` reads it)."""
        (p, onset, secs), self.answer.note = self.answer.note, None
        self._model_on(p, onset, self.answer.velocity, now)
        self._model_off(p, onset + max(1, round(secs * STEPS_PER_SECOND) + (0 if complete else 1)))

    def _model_on(self, pitch: int, step: int, velocity: int, now: float) -> None:
        a = self.answer
        note = Note(step, pitch, velocity)
        a.sounding[pitch] = note
        a.notes.append(note)
        self._queue(self._time(step), "on", note)

    def _model_off(self, pitch: int, step: int) -> None:
        note = self.answer.sounding.pop(pitch, None)
        if note is None:
            return
        note.end = max(step, note.onset + 1)
        self._queue(self._time(note.end), "off", note)

    def _finish_model_notes(self, step: int) -> None:
        """The answer's time is up: its notes still sounding end there (their note-offs go into the state too,
        so that the model knows they ended)."""
        a = self.answer
        if self.kind == "offs":
            ids = [tok_id for p in list(a.sounding) for tok_id in [self.tokenizer.note_off_id(p)] if tok_id is not None]
            for pitch in list(a.sounding):
                self._model_off(pitch, step)
            self._feed(ids)
        else:  # a length still being written: the note is cut where the answer ends
            a.note = None

    def _take_over(self, t: float) -> None:
        """The player comes in at `t`: the answer stops, what was not played is taken back from the state, and
        the answer as heard goes in again (its notes cut at `t`)."""
        a = self.answer
        step = self._step(t)
        heard = [n for n in a.notes if n.sent]
        for note in heard:
            note.end = min(note.end if note.end is not None else step, step)
        self.queue = self._silence_model(t)  # nothing of the answer after t: only the note-offs of what sounds
        heapq.heapify(self.queue)
        b = a.before
        self.decoder.restore(b["decoder"])
        self.guard, self.logits, self.bin, self.fed_step = b["guard"], b["logits"], b["bin"], b["fed_step"]
        self._replay(heard)
        self.answer = None
        if a.provisional:  # begun ahead of a turn's end that did not come: as if it never was
            self.generator.set_state(b["generator"])
            self.phrase_start = b["phrase_start"]
            self.stats["answers"] -= 1
        else:
            self.stats["takeovers"] += 1

    def _silence_model(self, t: float) -> list[NoteEvent]:
        """Note-offs at `t` for every model note that went out and has not ended (each cut there)."""
        return [self._off_at(t, note) for note in self.sounding.values()]

    def _off_at(self, t: float, note: Note) -> NoteEvent:
        step = self._step(t)
        note.end = max(min(note.end if note.end is not None else step, step), note.onset + 1)
        return NoteEvent(t, -self._next_order(), "off", note.pitch, 0, note)

    # ----------------------------------------------------------------------------------------- queueing

    def _queue(self, t: float, kind: str, note: Note) -> None:
        order = self._next_order()
        heapq.heappush(self.queue, NoteEvent(t, order if kind == "on" else -order, kind, note.pitch,
                                             note.velocity if kind == "on" else 0, note))

    def _next_order(self) -> int:
        self._order += 1
        return self._order

    def _record(self, part: str, note: Note) -> None:
        for column, value in zip(self.record[part], (note.onset, note.end, note.pitch, note.velocity)):
            column.append(float(value))

    def _step(self, t: float) -> int:
        return max(0, round((t - self.start) * STEPS_PER_SECOND))

    def _time(self, step: int) -> float:
        return self.start + step / STEPS_PER_SECOND
