"""`dsmr live`: play a duet with a model on MIDI ports (a keyboard in, a synth or the keyboard out)."""

from __future__ import annotations

import argparse
import json
import sys

from dsmr.generation import defaults
from dsmr.cli.common import add_device, add_precision, add_threads, add_weights, set_threads
from dsmr.core.options import bounded


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "live", help="play a duet with a model on MIDI ports, in real time",
        description="Play: the model listens to your MIDI keyboard and, when you pause, answers through a MIDI "
                    "output, continuing everything played so far by both of you; play again to take over. "
                    "Ctrl-C ends the session (all notes off; the recording written with --record).")
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="run or model folder, or Hub repo id (default: the model the repository ships)")
    p.add_argument("--list-ports", action="store_true", help="print the MIDI inputs and outputs and exit")
    p.add_argument("--in", dest="inport", metavar="PORT", help="MIDI input to listen to (a name, or part of one)")
    p.add_argument("--out", dest="outport", metavar="PORT", help="MIDI output to play on (a name, or part of one)")
    p.add_argument("--virtual", action="store_true",
                   help="open virtual ports 'dsmr in' / 'dsmr out' (for whichever of --in/--out is not given) "
                        "for a DAW, a software synth or a keyboard to connect to")
    p.add_argument("--api", default="auto", choices=("auto", "alsa", "jack", "coremidi", "windows"),
                   help="MIDI system (default auto: the platform's own, else JACK)")
    turn = p.add_argument_group("turns")
    turn.add_argument("--wait", type=bounded(float, 0.05, 60.0), default=0.8, metavar="S",
                      help="seconds of silence that end your turn (default 0.8)")
    turn.add_argument("--turn-cc", type=bounded(int, 0, 127), metavar="CC",
                      help="a controller that ends your turn at once when pressed (e.g. 67, the soft pedal)")
    turn.add_argument("--answer-seconds", type=bounded(float, 0.5, 600.0), metavar="S",
                      help="length of each answer (default: as long as your last phrase, 2-30 s)")
    turn.add_argument("--latency-ms", type=bounded(float, 0.0, 2000.0), default=0.0, metavar="MS",
                      help="the output device's latency: events are sent this much early (default 0)")
    s = p.add_argument_group("sampling (default: the model's own settings, as dsmr generate plays it)")
    s.add_argument("--temperature", type=bounded(float, 0.0, defaults.MAX_TEMPERATURE), metavar="T")
    s.add_argument("--top-p", type=bounded(float, 1e-6, 1.0), metavar="P")
    s.add_argument("--max-note-seconds", type=bounded(float, 0.0, 3600.0), metavar="S",
                   help="no answer note longer than S seconds (default: the encoding's; 0: no limit)")
    s.add_argument("--max-polyphony", type=bounded(int, 0, 128), metavar="N",
                   help="at most N answer notes at once (NOTE_OFF encodings; 0: no limit)")
    s.add_argument("--seed", type=bounded(int, 0, 2**63 - 1), default=None, help="the same seed: the same answers")
    p.add_argument("--record", metavar="FILE.mid", help="write the session (you and the model, two tracks) here "
                                                       "when it ends")
    add_weights(p)
    add_precision(p)
    add_device(p)
    add_threads(p, default=1, help=": one-token steps are too small to share")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dsmr.generation.live import ports
    from dsmr.errors import DsmrError

    midi = ports.backend(args.api)
    if args.list_ports:
        names = ports.list_ports(midi)
        for kind in ("inputs", "outputs"):
            print(f"{kind}: " + (", ".join(names[kind]) or "none"))
        return 0
    if args.record:
        from dsmr.core.files import check_output_file

        check_output_file(args.record, "--record")
    import time

    from dsmr.app.models import default_model
    from dsmr.generation import playing_sampling, with_precision
    from dsmr.generation.live.engine import LiveEngine
    from dsmr.generation.live.events import LiveSettings
    from dsmr.sharing.loader import load_model
    from dsmr.core.runtime import resolve_device

    ref = args.model or default_model()
    if ref is None:
        raise DsmrError("give a MODEL (a run or model folder, or a Hub repo id)")
    set_threads(args.threads)
    model = load_model(ref, device=resolve_device(args.device), which=args.weights)
    model = with_precision(model, args.precision)
    sampling = playing_sampling(model, temperature=args.temperature, top_p=args.top_p,
                                max_note_seconds=args.max_note_seconds, max_polyphony=args.max_polyphony,
                                seed=args.seed, max_tokens=None, max_seconds=1e9, stop_at_eos=False)
    settings = LiveSettings(wait=args.wait, answer_seconds=args.answer_seconds, turn_cc=args.turn_cc)
    inport, outport = ports.open_ports(midi, args.inport, args.outport, args.virtual)
    engine = LiveEngine(model, sampling, settings, start=time.monotonic())
    print(f"dsmr live: {ref} listening on {inport.name}, answering on {outport.name} (your turn ends after "
          f"{args.wait:g} s of silence; Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        ports.run_duet(engine, inport, outport, latency=args.latency_ms / 1000)
    finally:
        inport.close()
        outport.close()
        if args.record:
            from dsmr.data.midi import write_midi

            write_midi(engine.recording(), args.record)
        stats = dict(engine.stats, record=args.record)
        print(f"dsmr live: {json.dumps(stats)}", file=sys.stderr)
    return 0
