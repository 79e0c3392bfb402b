"""`dsmr data`: build a token cache from a corpus, describe a cache, decode a cached piece to MIDI."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from dsmr.cli.common import add_json, add_no_progress
from dsmr.data.corpora import CORPORA


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data", help="build and inspect token caches",
        description="Tokenize a corpus once into a cache folder, describe a cache, or decode a cached piece.")
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    build = actions.add_parser(
        "build", help="tokenize a corpus into a cache (incremental, parallel)",
        description="Tokenize a corpus into CACHE/{corpus}-{tokenizer}-{hash}. A rebuild re-tokenizes only "
                    "files whose content changed; corrupt or non-MIDI files are skipped and reported.")
    build.add_argument("--corpus", choices=CORPORA, default="bach",
                       help="maestro (official splits), folder (any MIDI folder), bach (music21 chorales; default)")
    build.add_argument("--root", type=Path,
                       help="maestro: the folder with maestro-v3.0.0.csv/json; folder: the MIDI folder; "
                            "bach: where converted chorales are kept (default CACHE/sources/bach-chorales)")
    build.add_argument("--cache", type=Path, default=None,
                       help="cache root (default $DSMR_CACHE or ~/.cache/dsmr)")
    build.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPU cores, max 8)")
    build.add_argument("--limit", type=int, default=None, help="use at most N files, every split represented")
    build.add_argument("--tokenizer", default="performance",
                       help="performance (default), duration (each note with its length at its onset: no note can "
                            "hang in generation) or a miditok encoding: remi, tsd, midilike, ...")
    build.add_argument("--fractions", default="0.9,0.05,0.05",
                       help="train,validation,test fractions for folder and bach (default 0.9,0.05,0.05)")
    build.add_argument("--max-seconds", type=_positive_float, default=None, metavar="S",
                       help="skip pieces longer than S seconds (default 21600 = 6 hours): a few bytes of "
                            "MIDI can describe thousands of hours")
    build.add_argument("--max-file-mb", type=_positive_float, default=None, metavar="MB",
                       help="skip files larger than MB megabytes (default 64)")
    add_json(build)
    add_no_progress(build)
    build.set_defaults(func=_build)

    info = actions.add_parser("info", help="summary of a built cache",
                              description="Pieces and tokens per split and skipped files of a cache.")
    info.add_argument("cache", type=Path, help="a cache folder, or a cache root holding exactly one cache")
    info.add_argument("--verify", action="store_true",
                      help="also check every cache file against the checksum recorded when it was built "
                           "(exit 2 naming the damaged files)")
    add_json(info)
    info.set_defaults(func=_info)

    decode = actions.add_parser("decode", help="write one cached piece back to MIDI",
                                description="Decode one cached piece to a MIDI file (to hear the encoding).")
    decode.add_argument("cache", type=Path, help="a cache folder, or a cache root holding exactly one cache")
    decode.add_argument("--split", required=True, help="train, validation or test")
    decode.add_argument("--index", type=int, required=True, help="piece index within the split")
    decode.add_argument("--out", type=Path, required=True, help="MIDI file to write")
    decode.set_defaults(func=_decode)

    download = actions.add_parser(
        "download", help="download MAESTRO v3.0.0 (MIDI) with its checksum checked",
        description="Download maestro-v3.0.0-midi.zip, check its size and SHA-256, extract it safely.")
    download.add_argument("--dest", type=Path, default=None, help="folder to extract into (default CACHE/sources)")
    download.add_argument("--cache", type=Path, default=None, help="cache root (default $DSMR_CACHE or ~/.cache/dsmr)")
    download.add_argument("--url", default=None, help="a mirror of the archive (needs --sha256 and --size)")
    download.add_argument("--sha256", default=None, help="expected SHA-256 of the archive at --url")
    download.add_argument("--size", type=int, default=None, help="expected size in bytes of the archive at --url")
    add_no_progress(download)
    download.set_defaults(func=_download)


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool):
    """Send anything written to stdout (by us, a library or a worker process) to stderr, so that
    `--json` output is exactly one JSON object."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _positive_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number above 0, got {text!r}")
    return value


def _parse_fractions(text: str) -> tuple[float, ...]:
    from dsmr.errors import DsmrError

    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise DsmrError(f"--fractions must be three comma-separated numbers like 0.9,0.05,0.05, got {text!r}")


def _build(args: argparse.Namespace) -> int:
    from dsmr.data.cache import default_cache_root, default_workers
    from dsmr.data.cache_build import build_cache, default_limits
    from dsmr.data.corpora import check_fractions, corpus_files
    from dsmr.errors import DsmrError
    from dsmr.data.tokenizers.registry import make_tokenizer

    if args.workers is not None and args.workers < 1:
        raise DsmrError(f"--workers must be at least 1, got {args.workers}")
    if args.limit is not None and args.limit < 1:
        raise DsmrError(f"--limit must be at least 1, got {args.limit}")
    cache_root = (args.cache or default_cache_root()).expanduser()
    root = args.root
    if root is None and args.corpus == "bach":
        root = cache_root / "sources" / "bach-chorales"
    if root is None:
        raise DsmrError(f"--corpus {args.corpus} needs --root (the {args.corpus} folder)")
    fractions = check_fractions(_parse_fractions(args.fractions))
    progress = args.progress

    with _stdout_to_stderr(args.json):
        tokenizer = make_tokenizer(args.tokenizer)
        workers = args.workers or default_workers()
        limits = default_limits()
        if args.max_seconds is not None:
            limits["max_seconds"] = args.max_seconds
        if args.max_file_mb is not None:
            limits["max_file_bytes"] = int(args.max_file_mb * (1 << 20))
        files, skipped = corpus_files(args.corpus, root, fractions=fractions, limit=args.limit,
                                      workers=workers, progress=progress, max_bytes=limits["max_file_bytes"])
        source = {"corpus": args.corpus, "root": str(Path(root).expanduser().resolve())}
        if args.corpus != "maestro":
            source["fractions"] = list(fractions)
        summary = build_cache(files, cache_root, tokenizer, workers=workers, limit=args.limit,
                              progress=progress, source=source, skipped=skipped,
                              max_seconds=limits["max_seconds"], max_file_bytes=limits["max_file_bytes"])
    result = {**summary.to_dict(), "corpus": args.corpus, "tokenizer": args.tokenizer}
    if args.json:
        print(json.dumps(result))
    else:
        print(format_summary(result))
        print(f"built in {summary.seconds:.1f} s: {summary.tokenized} files tokenized, {summary.reused} reused, "
              f"{summary.workers} worker(s)")
    return 0


def _info(args: argparse.Namespace) -> int:
    from dsmr.data.cache import TokenCache

    cache = TokenCache(args.cache)
    summary = cache.summary()
    if args.verify:
        summary["verified"] = cache.verify()["verified"]
    print(json.dumps(summary) if args.json else format_summary(summary))
    if args.verify and not args.json:
        print(f"verified   {len(summary['verified'])} file(s) match their checksums")
    return 0


def _decode(args: argparse.Namespace) -> int:
    import numpy as np

    from dsmr.data.cache import TokenCache

    from dsmr.core.files import check_output_file

    check_output_file(args.out, "--out")
    cache = TokenCache(args.cache)
    ids = np.asarray(cache.piece(args.split, args.index), dtype=np.int64)
    name = cache.piece_name(args.split, args.index)
    cache.tokenizer.decode_to_file(ids, args.out)
    seconds = cache.tokenizer.seconds(ids)
    print(f"wrote {args.out}: {name} ({args.split} #{args.index}), {len(ids)} tokens, {seconds:.1f} s of music")
    return 0


def _download(args: argparse.Namespace) -> int:
    from dsmr.data.cache import default_cache_root
    from dsmr.data.maestro import MAESTRO_SHA256
    from dsmr.data.maestro import MAESTRO_SIZE, MAESTRO_URL, download_maestro
    from dsmr.errors import DsmrError

    if args.url is None:
        if args.sha256 is not None or args.size is not None:
            raise DsmrError("--sha256 and --size go with --url (the official archive's are built in)")
        url, sha256, size = MAESTRO_URL, MAESTRO_SHA256, MAESTRO_SIZE
    elif args.sha256 is None or args.size is None:
        raise DsmrError("--url needs --sha256 and --size: dsmr extracts nothing it has not verified")
    else:
        url, sha256, size = args.url, args.sha256, args.size
    dest = args.dest or (args.cache or default_cache_root()).expanduser() / "sources"
    root = download_maestro(dest, url=url, sha256=sha256, size=size, progress=args.progress)
    print(root)
    return 0


def format_summary(summary: dict) -> str:
    """A readable table of pieces and tokens per split, then the skipped files (at most 20)."""
    from dsmr.core.files import printable

    lines = [printable(f"cache      {summary['cache']}")]
    if summary.get("tokenizer"):
        lines.append(f"tokenizer  {summary['tokenizer']}")
    splits = list(summary["pieces"])
    total_p, total_t = sum(summary["pieces"].values()), sum(summary["tokens"].values())
    width = max([len(s) for s in splits] + [5])
    lines.append(f"{'split':<{width}}  {'pieces':>8}  {'tokens':>14}")
    for s in splits:
        lines.append(f"{s:<{width}}  {summary['pieces'][s]:>8,}  {summary['tokens'][s]:>14,}")
    lines.append(f"{'total':<{width}}  {total_p:>8,}  {total_t:>14,}")
    skipped = summary.get("skipped", [])
    lines.append(f"skipped    {len(skipped)} file(s)")
    for s in skipped[:20]:
        lines.append(printable(f"  {s['path']}: {s['reason']}"))
    if len(skipped) > 20:
        lines.append(f"  ... and {len(skipped) - 20} more (see manifest.json)")
    return "\n".join(lines)
