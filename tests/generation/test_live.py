"""The live engine on a simulated clock: a MAESTRO-like phrase as the player, the answer after the wait and
never during the player's turn, takeover at once, every note ended, the same seed the same answers, and a
bounded state over a simulated hour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsmr.data.tokenizers.duration import DurationTokenizer
from dsmr.errors import DsmrError
from dsmr.generation import playing_sampling
from dsmr.generation.live.engine import LiveEngine
from dsmr.generation.live.events import LiveSettings
from dsmr.model import DSMR, DSMRConfig
from dsmr.data.tokenizers.performance import PerformanceTokenizer

TICK = 0.002  # the simulated caller polls every 2 ms


def tiny(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    model = DSMR(DSMRConfig(vocab_size=tokenizer.vocab_size, n_layers=2, d_model=32, n_heads=2,
                            horizons=(64, 16))).eval()
    model.tokenizer, model.run_config, model.segment_len = tokenizer, {}, 32
    return model


ENCODINGS = {"performance": PerformanceTokenizer(), "duration": DurationTokenizer()}


@pytest.fixture(params=sorted(ENCODINGS))
def model(request):
    return tiny(ENCODINGS[request.param])


def engine(model, seed=1, **settings):
    sampling = playing_sampling(model, seed=seed, max_tokens=None, max_seconds=1e9)
    return LiveEngine(model, sampling, LiveSettings(**settings))


def phrase(start: float, n: int = 8, pitch: int = 60):
    """(time, kind, pitch) of a phrase: n notes 0.25 s apart, each held 0.2 s."""
    events = []
    for i in range(n):
        events += [(start + 0.25 * i, "on", pitch + (i * 4) % 12), (start + 0.25 * i + 0.2, "off", pitch + (i * 4) % 12)]
    return sorted(events)


def run(e, until: float, player=(), t: float = 0.0):
    """Poll from `t` to `until`, playing `player`'s events at their times; returns what the engine sent."""
    player, sent = list(player), []
    while t < until:
        while player and player[0][0] <= t:
            when, kind, pitch = player.pop(0)
            (e.note_on(when, pitch, 80) if kind == "on" else e.note_off(when, pitch))
        sent += [(t, ev) for ev in e.poll(t)]
        t = round(t + TICK, 6)
    return sent


def test_the_answer_comes_after_the_wait_and_never_during_the_players_turn(model):
    e = engine(model, wait=0.6, answer_seconds=3.0)
    played = phrase(0.0)
    last = max(t for t, _, _ in played)
    sent = run(e, 8.0, played)
    ons = [ev for _, ev in sent if ev.kind == "on"]
    assert ons, "the model answered"
    assert min(ev.time for ev in ons) >= last + 0.6 - 1e-9  # not before the turn ended
    assert all(abs(t - ev.time) <= 1e-9 + TICK for t, ev in sent)  # each sent when due, never late
    assert max(ev.time for ev in ons) < last + 0.6 + 3.0 + 0.011  # within the answer's length
    assert e.stats["late_dropped"] == 0 and e.stats["answers"] == 1 and not e.answering
    _all_notes_end(sent)


def _all_notes_end(sent):
    sounding = set()
    for _, ev in sent:
        if ev.kind == "on":
            assert ev.pitch not in sounding  # a re-strike ends the old note first
            sounding.add(ev.pitch)
        else:
            sounding.discard(ev.pitch)
    assert not sounding, f"notes left sounding: {sorted(sounding)}"


def test_the_player_takes_over_at_once(model):
    e = engine(model, wait=0.5, answer_seconds=20.0)
    sent = run(e, 4.0, phrase(0.0))
    assert e.answering
    back = 4.0
    e.note_on(back, 62, 90)
    after = run(e, 6.0, [(4.5, "off", 62)], t=back)
    model_ons_after = [ev for _, ev in after if ev.kind == "on"]
    assert not model_ons_after or min(ev.time for ev in model_ons_after) >= 4.5 + 0.5, "no answer note once the player is back"
    assert e.stats["takeovers"] == 1
    # what sounded when the player came in ended right then; the answer that follows ends with stop()
    _all_notes_end(sent + after + [(6.0, ev) for ev in e.stop(6.0)])
    offs_at_takeover = [ev for _, ev in after if ev.kind == "off" and ev.time == back]
    sounding_before = set()
    for _, ev in sent:
        (sounding_before.add if ev.kind == "on" else sounding_before.discard)(ev.pitch)
    assert {ev.pitch for ev in offs_at_takeover} >= sounding_before
    # the state went back to the answer's start and took in only what was heard
    rec = e.recording()
    assert [t.name for t in rec.tracks] == ["player", "model"] and rec.tracks[0].note_num() == 9


def test_the_answer_is_ready_when_the_turn_ends_and_undone_if_the_player_plays_on(model):
    """The answer is sampled in the last `prepare_ahead` seconds of the wait, so its first events are queued
    when the turn ends; a note played in that time undoes it completely: the duet goes on exactly as with an
    engine that never prepared."""
    played = phrase(0.0)
    last = max(t for t, _, _ in played)
    e = engine(model, wait=0.6, answer_seconds=3.0)
    run(e, last + 0.55, played)  # 0.05 s before the turn ends
    assert not e.answering and e.answer.sampled > 0  # begun, not yet the model's turn
    assert e.next_due() is None or e.next_due() >= last + 0.6  # nothing due before the turn ends
    assert e.stop(last + 0.55) == [] and e.stats["answers"] == 0  # stopped then: no answer was given
    again = [(last + 0.56, "on", 70), (last + 0.8, "off", 70)]  # the player plays on after all

    def duet(prepare_ahead):
        e = engine(model, wait=0.6, answer_seconds=6.0, prepare_ahead=prepare_ahead)
        sent = run(e, 12.0, played + again)
        return e, [(round(t, 3), ev.kind, ev.pitch, ev.velocity) for t, ev in sent]

    (prepared, sent), (plain, sent_plain) = duet(0.1), duet(0.0)
    assert sent == sent_plain and len(sent) >= 2
    assert prepared.stats == plain.stats and prepared.stats["answers"] == 1 and prepared.stats["takeovers"] == 0
    assert min(t for t, kind, _, _ in sent if kind == "on") >= last + 0.8 + 0.6 - 1e-9  # after the new turn's end


def test_the_same_seed_gives_the_same_answers_and_another_seed_others(model):
    def answers(seed):
        return [(round(ev.time, 3), ev.kind, ev.pitch) for _, ev in run(engine(model, seed=seed, wait=0.5,
                                                                              answer_seconds=3.0), 6.0, phrase(0.0))]

    a = answers(5)
    assert a == answers(5) and len(a) > 4
    assert a != answers(6)


def test_the_sustain_pedal_holds_the_players_notes():
    e = engine(tiny(ENCODINGS["duration"]), wait=0.5)
    e.control(0.0, 64, 127)
    e.note_on(0.1, 60, 80)
    e.note_off(0.3, 60)
    assert not e.poll(2.0) and not e.answering  # the pedal is down: the note still sounds, no turn end
    e.control(2.0, 64, 0)
    run(e, 3.0, t=2.0)
    onset, end = (np.frombuffer(c, dtype=np.float64) for c in e.record["player"][:2])
    assert (onset[0], end[0]) == (10, 200)  # steps of 10 ms: held until the pedal lifted
    assert e.stats["answers"] == 1


def test_a_turn_controller_ends_the_turn_at_once():
    e = engine(tiny(ENCODINGS["performance"]), wait=5.0, turn_cc=67)
    e.note_on(0.0, 60, 80)
    e.note_off(0.2, 60)
    e.control(0.3, 67, 127)
    assert e.answering
    assert run(e, 1.5, t=0.3)


def test_the_state_stays_bounded_over_a_simulated_hour():
    """An hour of call and response (the player 2 s, the model 2 s): the decoder's state never grows, every
    note ends, nothing is dropped."""
    model = tiny(ENCODINGS["performance"])
    e = engine(model, wait=0.3, answer_seconds=2.0)
    start_bytes = e.state_bytes()
    horizons = np.array(model.cfg.horizons) + model.segment_len
    t, sent, turns = 0.0, [], 0
    while t < 3600:
        for when, kind, pitch in phrase(t, n=8):
            (e.note_on(when, pitch, 70) if kind == "on" else e.note_off(when, pitch))
        t0 = t + 2.0
        # poll coarsely while nothing is due, finely around events (what a real loop does with next_due)
        now = t0
        while now < t0 + 2.8:
            sent += e.poll(now)
            due = e.next_due()
            now = round(now + (0.001 if due is not None and due - now < 0.02 else 0.02), 6)
        assert (np.array(e.decoder.filled()) <= horizons).all()
        t, turns = now + 0.2, turns + 1
    sent += e.stop(t)
    assert e.state_bytes() == start_bytes and e.stats["answers"] == turns > 600
    assert e.stats["late_dropped"] == 0
    _all_notes_end([(None, ev) for ev in sent])
    assert e.decoder.position > 25_000  # an hour of both parts went through the bounded state


def test_bad_settings_and_encodings_are_refused():
    with pytest.raises(DsmrError, match="wait must be > 0"):
        LiveSettings(wait=0).validate()
    from dsmr.data.tokenizers.registry import make_tokenizer

    remi = tiny(make_tokenizer("remi"))
    with pytest.raises(DsmrError, match="performance or the duration encoding"):
        LiveEngine(remi, playing_sampling(remi, max_tokens=10))


# ------------------------------------------------------------------------------- real ports (JACK dummy)

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def jack_server():
    """A JACK server of this test's own on the dummy backend (no sound card needed). Where JACK is installed
    (CI installs it) a server that does not start fails the test; elsewhere the test skips, saying why."""
    import os
    import shutil
    import subprocess
    import time

    pytest.importorskip("mido", reason='live MIDI needs mido and python-rtmidi (pip install "dsmr[live]")')
    pytest.importorskip("rtmidi", reason='live MIDI needs python-rtmidi (pip install "dsmr[live]")')
    if shutil.which("jackd") is None:
        if os.environ.get("CI"):
            pytest.fail("jackd is not installed (.ci/run installs Debian's jackd2)")
        pytest.skip("jackd is not installed (apt-get install jackd2)")
    name = f"dsmrtest{os.getpid()}"
    server = subprocess.Popen(["jackd", "-n", name, "--no-realtime", "-d", "dummy", "-r", "48000", "-p", "128"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    old = os.environ.get("JACK_DEFAULT_SERVER")
    os.environ["JACK_DEFAULT_SERVER"] = name
    try:
        import mido

        deadline = time.monotonic() + 20
        while True:
            try:
                mido.Backend("mido.backends.rtmidi/UNIX_JACK", load=True).get_input_names()
                break
            except Exception:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the JACK dummy server did not start: {server.stderr.read()[-500:]}")
                time.sleep(0.2)
        yield name
    finally:
        server.terminate()
        server.wait(timeout=10)
        if old is None:
            os.environ.pop("JACK_DEFAULT_SERVER", None)
        else:
            os.environ["JACK_DEFAULT_SERVER"] = old


def test_dsmr_live_answers_a_phrase_through_jack_ports(jack_server, tmp_path):
    """A phrase played into `dsmr live`'s virtual input comes back as an answer on its output after the
    wait; Ctrl-C ends the session with every note ended and the recording written."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import mido

    record = tmp_path / "session.mid"
    proc = subprocess.Popen([sys.executable, "-m", "dsmr", "live", str(REPO / "models" / "maestro-duration-small"),
                             "--api", "jack", "--virtual", "--wait", "0.4", "--answer-seconds", "2", "--seed", "1",
                             "--record", str(record)], stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        said = []  # what dsmr live prints before it listens (a first build of the kernels says so)
        while not said or "listening on" not in said[-1]:
            said.append(proc.stderr.readline())
            assert said[-1] or proc.poll() is None, "".join(said) + proc.stderr.read()
        import threading

        threading.Thread(target=lambda: said.extend(proc.stderr), daemon=True).start()  # a full pipe would block it
        midi = mido.Backend("mido.backends.rtmidi/UNIX_JACK", load=True)
        sink = next(n for n in midi.get_output_names() if "dsmr in" in n)
        source = next(n for n in midi.get_input_names() if "dsmr out" in n)
        with midi.open_output(sink) as keys, midi.open_input(source) as ear:  # connected to dsmr's ports
            start = time.monotonic()
            for i, pitch in enumerate([60, 64, 67, 72, 67, 64]):
                keys.send(mido.Message("note_on", note=pitch, velocity=80))
                time.sleep(0.15)
                keys.send(mido.Message("note_off", note=pitch, velocity=0))
                phrase_end = time.monotonic()  # the last key up: the turn ends 0.4 s after it
                time.sleep(0.1)
            heard = []
            while time.monotonic() < phrase_end + 3.5:
                heard += [(time.monotonic(), m) for m in ear.iter_pending()]
                time.sleep(0.002)
            proc.send_signal(signal.SIGINT)
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pytest.fail("dsmr live did not end within 30 s of Ctrl-C; it said: " + "".join(said)[-2000:])
            assert code == 0, "".join(said)
            time.sleep(0.2)
            heard += [(time.monotonic(), m) for m in ear.iter_pending()]
        ons = [(t, m) for t, m in heard if m.type == "note_on" and m.velocity > 0]
        assert ons, "no answer came back"
        assert ons[0][0] >= phrase_end + 0.4 - 0.05, "the answer began before the player's turn was over"
        sounding = set()
        for _, m in heard:
            if m.type == "note_on" and m.velocity > 0:
                sounding.add(m.note)
            elif m.type in ("note_off", "note_on"):
                sounding.discard(m.note)
        assert not sounding, f"notes left sounding after Ctrl-C: {sorted(sounding)}"
        import symusic

        tracks = {t.name: t.note_num() for t in symusic.Score(str(record)).tracks}
        assert tracks["player"] == 6 and tracks["model"] >= 1
        assert start < phrase_end
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_duration_answer_plays_the_notes_its_events_decode_to(seed):
    """An untrained model writes events out of grammar (a time shift between a NOTE and its length): the engine
    reads them as the tokenizer does, so each note is queued at its onset, never late, with the length decode
    gives it."""
    m = tiny(ENCODINGS["duration"], seed=seed)
    e = engine(m, seed=seed, wait=0.6, answer_seconds=10.0)
    heard, hear = [], e._hear_model
    e._hear_model = lambda token, now: (heard.append(token), hear(token, now))[1]
    run(e, 40.0, phrase(0.0))
    assert e.stats["answers"] == 1 and e.stats["late_dropped"] == 0 and not e.answering
    decoded = m.tokenizer.decode(heard).tracks[0].notes
    want = sorted((round(n.start * 100), round(n.duration * 100), n.pitch) for n in decoded)
    played = e.recording().tracks[1].notes
    first = min(round(n.start * 100) for n in played)  # the answer's clock against the session's
    got = sorted((round(n.start * 100) - first + want[0][0], round(n.duration * 100), n.pitch) for n in played)
    assert len(want) > 3 and got == want
