"""`dsmr generate`: continue a MIDI prompt (or start from nothing) with a trained model; MIDI, WAV, PNG out."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dsmr.cli.common import add_device, add_json, add_no_progress, add_precision, add_threads, add_weights, set_threads
from dsmr.errors import DsmrError  # standard library only: keeps `dsmr --help` fast
from dsmr.generation import defaults
from dsmr.core.options import bounded


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate a piece (optionally continuing a MIDI prompt)",
        description="Sample a piece from a trained DSMR model with bounded memory: the state per layer never "
                    "exceeds its horizon plus one segment, however long the piece. Writes MIDI, and "
                    "optionally a WAV (FluidSynth) and a piano-roll PNG.")
    parser.add_argument("checkpoint", type=Path, metavar="RUN_OR_CHECKPOINT",
                        help="a run folder (uses best.safetensors, else model.safetensors), an exported "
                        "model folder (dsmr export), a Hub repo id (owner/name) or a .safetensors file")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE.mid", help="MIDI file to write")
    _add_prompt_and_length(parser)
    _add_sampling(parser)
    _add_outputs_and_runtime(parser)
    parser.set_defaults(func=run)


def _add_prompt_and_length(parser) -> None:
    prompt = parser.add_argument_group("prompt")
    prompt.add_argument("--prompt", type=Path, metavar="FILE.mid", help="MIDI file to continue (default: start from nothing)")
    prompt.add_argument("--prompt-seconds", type=bounded(float, 0.01, 21600.0), metavar="S", help="use only the first S seconds of the prompt")
    length = parser.add_argument_group("length (generation stops at whichever limit comes first, or at the "
                                       "end-of-piece event)")
    length.add_argument("--max-tokens", type=bounded(int, 1, 10**8), metavar="N",
                        help="new events to generate (default 2048 unless --max-seconds is given)")
    length.add_argument("--max-seconds", type=bounded(float, 0.01, 21600.0), metavar="S",
                        help="stop when the piece (prompt included) lasts S seconds")
    length.add_argument("--stop-at-eos", action="store_true",
                        help="end the piece where the model ends it (its end-of-piece event), which may be before "
                             "the length asked; by default the end-of-piece event is never sampled, so you get "
                             "the length you asked for (as in `dsmr app`)")
    # the default now; still accepted so that older command lines run
    length.add_argument("--ignore-eos", action="store_true", help=argparse.SUPPRESS)


def _add_sampling(parser) -> None:
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=bounded(float, 0.0, defaults.MAX_TEMPERATURE), metavar="T",
                          help="higher: more adventurous, lower: safer; 0 picks the most likely event "
                               f"(default: the model's own, from its config.json, else {defaults.TEMPERATURE:g})")
    sampling.add_argument("--top-k", type=bounded(int, 0, 10**6), default=0, metavar="K", help="sample among the K most likely events (0: all)")
    sampling.add_argument("--top-p", type=bounded(float, 1e-6, 1.0), metavar="P",
                          help="sample among the most likely events that make up probability P (default: the "
                               f"model's own, else {defaults.TOP_P:g}; 1: all)")
    sampling.add_argument("--seed", type=bounded(int, 0, 2**63 - 1), metavar="N", help="random seed: the same seed gives the same piece")
    sampling.add_argument("--min-pitch", type=bounded(int, 0, 127), default=defaults.MIN_PITCH, metavar="PITCH",
                          help=f"never start a note below this MIDI pitch (default {defaults.MIN_PITCH}: the piano's "
                               "lowest key)")
    sampling.add_argument("--max-pitch", type=bounded(int, 0, 127), default=defaults.MAX_PITCH, metavar="PITCH",
                          help=f"never start a note above this MIDI pitch (default {defaults.MAX_PITCH}: the piano's "
                               "highest)")
    guard = parser.add_argument_group("note guard (no note can hang: in encodings whose notes end with a "
                                      "NOTE_OFF, such as the performance encoding, both limits; in encodings that "
                                      "give each note its length, the longest note)")
    guard.add_argument("--max-note-seconds", type=bounded(float, 0.0, 3600.0), metavar="S",
                       help=f"no note longer than S seconds (default {defaults.MAX_NOTE_SECONDS:g} with NOTE_OFFs, "
                            f"{defaults.MAX_NOTE_SECONDS_LENGTHS_AT_ONSET:g} with lengths at the onset; 0: no limit)")
    guard.add_argument("--max-polyphony", type=bounded(int, 0, 128), metavar="N",
                       help=f"start no note while N notes sound (NOTE_OFF encodings; default {defaults.MAX_POLYPHONY}; "
                            "0: no limit)")


def _add_outputs_and_runtime(parser) -> None:
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--wav", type=Path, metavar="FILE.wav", help="also render a WAV with FluidSynth")
    outputs.add_argument("--soundfont", type=Path, metavar="FILE.sf2",
                         help="General MIDI .sf2 for --wav (default $DSMR_SOUNDFONT or a system soundfont)")
    outputs.add_argument("--pianoroll", type=Path, metavar="FILE.png", help="also draw a piano-roll PNG (prompt boundary marked)")
    outputs.add_argument("--num-samples", type=bounded(int, 1, 256), default=1, metavar="N",
                         help="write N variations of the piece at once (FILE-1.mid ... FILE-N.mid; seeds SEED, "
                              "SEED+1, ...): one prompt, N lanes of one decoder, each stopping at its own end")
    add_json(outputs, help="print one JSON object with the figures on stdout")
    add_no_progress(outputs)
    runtime = parser.add_argument_group("runtime")
    add_device(runtime)
    add_precision(runtime)
    add_threads(runtime, default=1, help=": one-token steps are too small to share")
    runtime.add_argument("--compile", action="store_true",
                         help="torch.compile the one-event decoding step (a one-off warm-up of about a minute, "
                              "reported separately). On a CPU with float16/int8 weights, where dsmr's fused "
                              "kernel runs the step (faster, nothing to compile), this has no effect")
    add_weights(runtime)


def run(args: argparse.Namespace) -> int:
    _check_args(args)

    import torch

    from dsmr.backends.cpu import kernels
    from dsmr.sharing.loader import load_model
    from dsmr.core.runtime import resolve_device
    from dsmr.generation import (SamplingConfig, batch_summary, generate_batch, load_prompt, playing_sampling,
                                 resolve_precision, with_precision)
    from dsmr.generation.render import find_fluidsynth, find_soundfont

    max_tokens = args.max_tokens if args.max_tokens is not None else (None if args.max_seconds else 2048)
    # temperature and top-p are settled once the model (and its own defaults) is loaded
    sampling = SamplingConfig(top_k=args.top_k, seed=args.seed, max_tokens=max_tokens, max_seconds=args.max_seconds,
                              stop_at_eos=args.stop_at_eos)
    sampling.validate()
    if args.wav is not None:  # fail before a long generation, not after it
        find_fluidsynth()
        find_soundfont(args.soundfont)
    device = resolve_device(args.device)
    set_threads(args.threads)

    model = load_model(args.checkpoint, device=device, which=args.weights)
    tokenizer = model.tokenizer
    # the prompt before the kernels: a bad prompt is refused at once, not after a build of the kernels
    prompt_ids = None if args.prompt is None else load_prompt(args.prompt, tokenizer, args.prompt_seconds)
    if prompt_ids is not None and args.max_seconds is not None:
        kept = tokenizer.seconds(prompt_ids)
        if kept >= args.max_seconds:  # as the app: the piece must be longer than the prompt it continues
            raise DsmrError(f"--max-seconds {args.max_seconds:g} is not longer than the prompt kept ({kept:.1f} s "
                            f"of {args.prompt}): ask for a longer piece or keep less (--prompt-seconds)")
    precision = resolve_precision(model, args.precision)
    model = with_precision(model, precision)

    sampling = playing_sampling(model, temperature=args.temperature, top_p=args.top_p,
                                max_note_seconds=args.max_note_seconds, max_polyphony=args.max_polyphony,
                                min_pitch=args.min_pitch, max_pitch=args.max_pitch, top_k=sampling.top_k,
                                seed=sampling.seed, max_tokens=sampling.max_tokens, max_seconds=sampling.max_seconds,
                                stop_at_eos=sampling.stop_at_eos)

    results = generate_batch(model, prompt_ids, sampling, num_samples=args.num_samples,
                             progress=args.progress, compile=args.compile)
    runtime = {"temperature": sampling.temperature, "top_p": sampling.top_p,
               "max_note_seconds": sampling.max_note_seconds, "max_polyphony": sampling.max_polyphony,
               "precision": precision, "device": str(device), "threads": torch.get_num_threads(),
               "kernels": kernels.loaded(),
               "segment_len": model.segment_len, "horizons": list(model.cfg.horizons)}
    samples = [_write_sample(result, args, tokenizer, prompt_ids is not None, len(results)) for result in results]
    if len(results) == 1:
        report = {**samples[0], **runtime}
    else:
        report = {**batch_summary(results), **runtime, "samples": samples}
    _say(report, samples, args.json)
    if any(r.stop_reason == "interrupted" for r in results):
        print("dsmr generate: interrupted; what was generated so far is written", file=sys.stderr)
        return 130
    return 0


def _say(report: dict, samples: list[dict], as_json: bool) -> None:
    """Print the warnings, then the report (JSON, or a summary of one sample or of the batch)."""
    for sample in samples:
        if sample["warning"]:
            print(f"dsmr generate: warning: {sample['out']}: {sample['warning']}", file=sys.stderr)
    if as_json:
        print(json.dumps(report))
    elif len(samples) == 1:
        _print_summary(report)
    else:
        _print_batch_summary(report)


def _write_sample(result, args: argparse.Namespace, tokenizer, prompted: bool, count: int) -> dict:
    """Write one sample's MIDI (and its WAV and piano roll where asked); its report."""
    from dsmr.generation.render import plot_pianoroll, render_wav

    paths = {key: _numbered(path, result.sample_index, count)
             for key, path in (("out", args.out), ("wav", args.wav), ("pianoroll", args.pianoroll))
             if path is not None}
    tokenizer.decode_to_file(result.ids, paths["out"])
    report = {**result.summary(), "out": str(paths["out"])}
    if "wav" in paths:
        report["wav"] = str(render_wav(paths["out"], paths["wav"], args.soundfont))
    if "pianoroll" in paths:
        boundary = result.prompt_seconds if prompted else None
        report["pianoroll"] = str(plot_pianoroll(paths["out"], paths["pianoroll"], boundary_seconds=boundary,
                                                 title=paths["out"].name))
    return report


def _numbered(path: Path, index: int, count: int) -> Path:
    """FILE.mid for one sample; FILE-1.mid ... FILE-N.mid (zero-padded) for N."""
    if count == 1:
        return path
    return path.with_name(f"{path.stem}-{index + 1:0{len(str(count))}d}{path.suffix}")


def _check_args(args) -> None:
    """What the options' ranges (options.bounded: finite numbers, seeds, counts) cannot say alone."""
    from dsmr.core.files import check_output_file

    for option, path in (("--out", args.out), ("--wav", args.wav), ("--pianoroll", args.pianoroll)):
        if path is not None:
            check_output_file(path, option)
    if args.prompt_seconds is not None and args.prompt is None:
        raise DsmrError("--prompt-seconds needs --prompt (a MIDI file to take the first seconds of)")
    if args.max_note_seconds is not None and 0 < args.max_note_seconds < 0.01:  # 0 is "no limit"
        raise DsmrError(f"--max-note-seconds must be 0 (no limit) or in [0.01, 3600], got {args.max_note_seconds}")
    if args.soundfont is not None and args.wav is None:
        raise DsmrError("--soundfont is only used with --wav OUT.wav")
    outputs = [_numbered(p, i, args.num_samples).resolve() for p in (args.out, args.wav, args.pianoroll)
               if p is not None for i in range(args.num_samples)]
    if len(set(outputs)) != len(outputs):
        raise DsmrError("--out, --wav and --pianoroll must be different files")
    if args.prompt is not None and args.prompt.resolve() in outputs:
        raise DsmrError(f"--prompt {args.prompt} is also an output file: it would be overwritten")


def _print_summary(report: dict) -> None:
    lines = [
        f"wrote {report['out']}: {report['tokens']} new events, {report['music_seconds']:.1f} s of music"
        + (f" (prompt {report['prompt_seconds']:.1f} s)" if report["prompt_tokens"] else "")
        + f", stopped at {report['stop_reason'].replace('_', ' ')}, seed {report['seed']}",
        f"  {report['wall_seconds']:.1f} s wall, {report['tokens_per_s']:.0f} events/s, "
        f"{report['realtime_factor']:.1f}x real time, state {report['state_bytes'] / 2**20:.2f} MiB",
    ]
    for key, what in (("wav", "audio"), ("pianoroll", "piano roll")):
        if key in report:
            lines.append(f"  {what}: {report[key]}")
    if report.get("compiled"):
        lines.append(f"  compiled decoding step: {report['warmup_seconds']:.1f} s warm-up (not in the wall time)")
    print("\n".join(lines))
    sys.stdout.flush()


def _print_batch_summary(report: dict) -> None:
    lines = [f"wrote {report['num_samples']} samples, {report['tokens']} new events in all: "
             f"{report['wall_seconds']:.1f} s wall, {report['tokens_per_s']:.0f} events/s in total, "
             f"{report['tokens_per_s_per_sample']:.0f} per sample, state {report['state_bytes'] / 2**20:.2f} MiB"]
    if report.get("compiled"):
        lines.append(f"  compiled decoding step: {report['warmup_seconds']:.1f} s warm-up (not in the wall time)")
    for sample in report["samples"]:
        lines.append(f"  {sample['out']}: {sample['tokens']} events, {sample['music_seconds']:.1f} s of music, "
                     f"stopped at {sample['stop_reason'].replace('_', ' ')}, seed {sample['seed']}"
                     + "".join(f", {sample[k]}" for k in ("wav", "pianoroll") if k in sample))
    print("\n".join(lines))
    sys.stdout.flush()
