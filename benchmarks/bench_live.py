"""Benchmark: the live duet in real time, as `dsmr live` runs it, with a MAESTRO performance as the player.

The player plays consecutive phrases of a test-split piece (`--phrase` seconds each) on the real clock; after
each phrase the model answers for as long (`dsmr live`'s default), then the player plays the next one. The
loop is `dsmr.generation.live.ports.run_duet`'s, with the player's events injected at their times instead of read from a
port, and every answer event "sent" (its send time recorded) instead of written to one. Reported:

* from the end of the player's turn (last key up + --wait) to the engine's answer begun with its first event
  sampled and queued (a note, or the pause the model chose before one; the engine samples them in the
  wait's last `prepare_ahead` seconds, so this is the loop's reaction): p50, p99 -- what the computer adds;
  and, apart, the model's own pause before its first note (music time);
* each sent event's time against its scheduled time: p50, p99 (absolute);
* note-ons dropped as late;
* the process's RSS before and after, and over an hour of duet on a fast simulated clock (`--hour`: the same
  engine, no sleeping), to show that nothing grows with the session.

`--jack TURNS` measures instead the whole round trip through real MIDI ports: a JACK server of its own on the
dummy backend, `dsmr live --api jack --virtual --record` in its own process, and a player client that plays
TURNS phrases into dsmr's input and listens on its output. Reported per turn: from the end of the turn (the last
key up sent + the wait) to the answer's first note-on received, minus the model's own pause before that note
(read from the session's recording, 10-ms steps); and for every later note of an answer, the gap to the
answer's first note as received against the same gap in the recording (jitter of sending and transport).

`--busy` keeps the other core busy (a CPU-bound process) during the run. One torch thread, the model's own
sampling, int8 weights where dsmr's kernels load (as `dsmr live`).

    .venv/bin/python benchmarks/bench_live.py [MODEL] --cache CACHE [--minutes 10] [--busy] [--hour] [--json OUT]
    .venv/bin/python benchmarks/bench_live.py [MODEL] --cache CACHE --jack 20 [--busy] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _burn(stop):  # the competing process: one core of pure Python arithmetic
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x = (x * 1103515245 + 12345) % 2**31


def player_phrases(cache, seconds: float, minutes: float, seed: int):
    """Phrases of `seconds` from test pieces, in order, until `minutes` of the player's music: lists of
    (onset, end, pitch, velocity) starting at 0."""
    from dsmr.evaluation.music_stats import note_arrays

    rng = np.random.default_rng(seed)
    tok = cache.tokenizer
    order = rng.permutation(cache.num_pieces("test"))
    phrases, total = [], 0.0
    for i in order:
        notes = note_arrays(tok.decode(cache.piece("test", int(i))))
        t = 0.0
        while t + seconds < notes["end"].max() and total < minutes * 60:
            keep = (notes["start"] >= t) & (notes["start"] < t + seconds)
            if keep.sum() >= 4:
                phrases.append([(s - t, min(e - t, seconds + 1.0), int(p), int(v)) for s, e, p, v in
                                zip(notes["start"][keep], notes["end"][keep], notes["pitch"][keep],
                                    notes["velocity"][keep])])
                total += seconds
            t += seconds * 3  # phrases far apart: each is new to the model
        if total >= minutes * 60:
            break
    return phrases


def real_time_duet(engine, phrases, wait: float, clock=time.monotonic) -> dict:
    """Play `phrases` against `engine` on the real clock; returns the latencies and send errors."""
    latencies, errors, pauses = [], [], []
    for phrase in phrases:
        start = clock() + 0.05
        events = sorted([(start + s, 1, p, v) for s, e, p, v in phrase] + [(start + e, 0, p, 0) for s, e, p, v in phrase])
        last_event = max(t for t, *_ in events)
        turn_end = last_event + wait
        answer_seen = False
        while events or engine.answering or clock() < turn_end + 0.5:
            now = clock()
            while events and events[0][0] <= now:
                t, on, p, v = events.pop(0)
                engine.note_on(t, p, v) if on else engine.note_off(t, p)
            for event in engine.poll(clock()):
                errors.append(clock() - event.time)
            # the answer to the whole phrase (a pause inside a phrase longer than the wait ends the turn there
            # too; the player's next note takes over that answer, counted in the engine's takeovers)
            if not answer_seen and not events and engine.answer_begun and engine.answer_started >= last_event:
                latencies.append(clock() - turn_end)
                answer_seen = True
            if answer_seen and len(pauses) < len(latencies) and engine.first_note_delay() is not None:
                pauses.append(engine.first_note_delay())
            nxt = [events[0][0]] if events else []
            due = engine.next_due()
            if due is not None:
                nxt.append(due)
            sleep = min([0.001] + [max(0.0, x - clock()) for x in nxt])
            if sleep > 0:
                time.sleep(sleep)
            if not events and not engine.answering and answer_seen:
                break
    return {"latencies": latencies, "errors": errors, "pauses": pauses}


def simulated_hour(engine, phrases) -> dict:
    """An hour of duet on a fast virtual clock (no sleeping): RSS before and after, turns and events."""
    before = rss_bytes()
    t, turns, k = 0.0, 0, 0
    while t < 3600:
        phrase = phrases[k % len(phrases)]
        k += 1
        events = sorted([(t + s, 1, p, v) for s, e, p, v in phrase] + [(t + e, 0, p, 0) for s, e, p, v in phrase])
        for when, on, p, v in events:
            engine.poll(when)
            engine.note_on(when, p, v) if on else engine.note_off(when, p)
        now = events[-1][0]
        while not engine.answering:
            now += 0.01
            engine.poll(now)
        while engine.answering:
            now += 0.005
            engine.poll(now)
        t, turns = now + 0.2, turns + 1
    engine.stop(t)
    return {"rss_before": before, "rss_after": rss_bytes(), "turns": turns, "positions": engine.decoder.position}


def jack_round_trip(model: str, phrases, wait: float, seed: int, workdir: Path) -> dict:
    """Play `phrases` into `dsmr live` through JACK dummy ports; latencies and jitter as received."""
    import shutil
    import signal
    import subprocess

    import mido
    import symusic

    if shutil.which("jackd") is None:
        sys.exit("--jack needs jackd (apt-get install jackd2)")
    name = f"dsmrbench{os.getpid()}"
    env = dict(os.environ, JACK_DEFAULT_SERVER=name)
    os.environ["JACK_DEFAULT_SERVER"] = name
    server = subprocess.Popen(["jackd", "-n", name, "--no-realtime", "-d", "dummy", "-r", "48000", "-p", "128"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = workdir / "jack-session.mid"
    live = None
    try:
        midi = mido.Backend("mido.backends.rtmidi/UNIX_JACK", load=True)
        deadline = time.monotonic() + 20
        while True:
            try:
                midi.get_input_names()
                break
            except Exception:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the JACK dummy server did not start")
                time.sleep(0.2)
        log = workdir / "live.stderr"  # a file, not a pipe: a pipe nobody reads fills up and blocks dsmr live
        with open(log, "w") as err:
            live = subprocess.Popen([sys.executable, "-m", "dsmr", "live", model, "--api", "jack", "--virtual",
                                     "--wait", str(wait), "--seed", str(seed), "--threads", "1",
                                     "--record", str(record)], stderr=err, text=True, env=env)
        deadline = time.monotonic() + 120
        while "listening on" not in log.read_text():
            if live.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"dsmr live did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        sink = next(n for n in midi.get_output_names() if "dsmr in" in n)
        source = next(n for n in midi.get_input_names() if "dsmr out" in n)
        turns = []
        with midi.open_output(sink) as keys, midi.open_input(source) as ear:
            for phrase in phrases:
                start = time.monotonic() + 0.05
                events = sorted([(start + s, 1, p, v) for s, e, p, v in phrase]
                                + [(start + e, 0, p, 0) for s, e, p, v in phrase])
                first_sent = None
                for when, on, p, v in events:
                    time.sleep(max(0.0, when - time.monotonic()))
                    keys.send(mido.Message("note_on", note=p, velocity=v) if on else mido.Message("note_off", note=p))
                    first_sent = first_sent or time.monotonic()
                turn_end = time.monotonic() + wait
                heard, last = [], time.monotonic()
                while time.monotonic() < turn_end + 1.0 or time.monotonic() - last < 1.0:
                    for m in ear.iter_pending():
                        last = time.monotonic()
                        if m.type == "note_on" and m.velocity > 0:
                            heard.append(last)
                    if time.monotonic() > turn_end + 60:
                        break
                    time.sleep(0.0005)
                turns.append({"turn_end": turn_end, "heard": heard, "first_sent": first_sent})
        live.send_signal(signal.SIGINT)
        live.wait(timeout=60)
    finally:
        if live is not None and live.poll() is None:
            live.kill()
        server.terminate()
        server.wait(timeout=10)
    score = symusic.Score(str(record), ttype="second")
    tracks = {t.name: t for t in score.tracks}
    model_onsets = sorted(n.start for n in tracks["model"].notes)
    # the recording's clock starts with the session: align it on the player's first note as sent
    offset = turns[0]["first_sent"] - min(n.start for n in tracks["player"].notes)
    latencies, jitter = [], []
    for turn in turns:
        rec_end = turn["turn_end"] - offset  # the turn's end on the recording's clock
        onsets = [t for t in model_onsets if rec_end - 0.02 <= t < rec_end + 60]
        heard = turn["heard"]
        if not onsets or not heard:
            continue
        latencies.append(heard[0] - turn["turn_end"] - max(0.0, onsets[0] - rec_end))
        n = min(len(onsets), len(heard))
        jitter += [(heard[j] - heard[0]) - (onsets[j] - onsets[0]) for j in range(1, n)]
    return {"turns": len(turns), "turns_answered": len(latencies),
            "round_trip_first_note_ms": {"p50": 1000 * pct(latencies, 50), "p99": 1000 * pct(latencies, 99),
                                         "max": 1000 * pct(latencies, 100)},
            "note_jitter_ms": {"p50": 1000 * pct(jitter, 50), "p99": 1000 * pct(jitter, 99),
                               "max": 1000 * pct(jitter, 100), "notes": len(jitter)},
            "resolution_ms": 10}


def pct(values, q):
    return float(np.percentile(np.abs(values), q)) if len(values) else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=str(REPO / "models" / "maestro-duration-small"))
    p.add_argument("--cache", required=True, help="a token cache in the model's encoding (the player's phrases)")
    p.add_argument("--minutes", type=float, default=10.0, help="minutes of the player's music (the duet lasts twice)")
    p.add_argument("--phrase", type=float, default=8.0, help="seconds per phrase (and per answer)")
    p.add_argument("--wait", type=float, default=0.8)
    p.add_argument("--busy", action="store_true", help="keep the other core busy meanwhile")
    p.add_argument("--hour", action="store_true", help="also an hour on a fast simulated clock (RSS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jack", type=int, metavar="TURNS", help="the round trip through JACK dummy ports instead")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()

    import torch

    from dsmr.data.cache import TokenCache
    from dsmr.generation import playing_sampling, with_precision
    from dsmr.generation.live.engine import LiveEngine
    from dsmr.generation.live.events import LiveSettings
    from dsmr.sharing.loader import load_model

    torch.set_num_threads(1)
    model = with_precision(load_model(args.model))
    cache = TokenCache(args.cache)
    if cache.tokenizer.config_hash() != model.tokenizer.config_hash():
        sys.exit(f"{args.cache} is not in {args.model}'s encoding")
    phrases = player_phrases(cache, args.phrase, args.minutes, args.seed)
    if args.jack:
        import tempfile

        stop = multiprocessing.Event()
        burner = multiprocessing.Process(target=_burn, args=(stop,), daemon=True) if args.busy else None
        if burner is not None:
            burner.start()
        with tempfile.TemporaryDirectory() as tmp:
            report = jack_round_trip(args.model, phrases[:args.jack], args.wait, args.seed, Path(tmp))
        stop.set()
        report |= {"model": args.model, "busy_other_core": args.busy, "command": "python " + " ".join(sys.argv),
                   "machine": platform.platform(), "cpus": os.cpu_count()}
        print(json.dumps(report, indent=1))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1))
        return 0
    sampling = playing_sampling(model, seed=args.seed, max_tokens=None, max_seconds=1e9, stop_at_eos=False)

    def make(start=0.0):
        return LiveEngine(model, sampling, LiveSettings(wait=args.wait), start=start)

    stop = multiprocessing.Event()
    burner = None
    if args.busy:
        burner = multiprocessing.Process(target=_burn, args=(stop,), daemon=True)
        burner.start()
    rss0 = rss_bytes()
    engine = make(time.monotonic())
    engine.poll(time.monotonic())  # warm the decoder
    wall = time.monotonic()
    timing = real_time_duet(engine, phrases, args.wait)
    wall = time.monotonic() - wall
    rss1 = rss_bytes()
    stop.set()
    if burner is not None:
        burner.join(timeout=5)
    report = {
        "model": args.model, "minutes_played": len(phrases) * args.phrase / 60, "duet_seconds": wall,
        "turns": len(phrases), "answers": engine.stats["answers"], "takeovers": engine.stats["takeovers"],
        "late_dropped": engine.stats["late_dropped"],
        "sent": engine.stats["sent"], "busy_other_core": args.busy,
        "first_answer_latency_ms": {"p50": 1000 * pct(timing["latencies"], 50), "p99": 1000 * pct(timing["latencies"], 99),
                                    "max": 1000 * pct(timing["latencies"], 100),
                                    "each": [round(1000 * x, 2) for x in timing["latencies"]]},
        "model_pause_before_first_note_s": {"p50": pct(timing["pauses"], 50), "p90": pct(timing["pauses"], 90)},
        "send_error_ms": {"p50": 1000 * pct(timing["errors"], 50), "p99": 1000 * pct(timing["errors"], 99),
                          "max": 1000 * pct(timing["errors"], 100)},
        "rss_mb": {"start": rss0 / 2**20, "after_duet": rss1 / 2**20},
        "command": "python " + " ".join(sys.argv), "machine": platform.platform(), "cpus": os.cpu_count(),
    }
    if args.hour:
        hour = simulated_hour(make(), phrases)
        report["simulated_hour"] = {"turns": hour["turns"], "positions": hour["positions"],
                                    "rss_growth_mb": (hour["rss_after"] - hour["rss_before"]) / 2**20}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
