"""`dsmr app`: a local web page to generate, listen to and download music (Gradio, optional extra)."""

from __future__ import annotations

import argparse
import sys

from dsmr.cli.common import add_device, add_precision, add_threads, add_token_cache, add_weights, set_threads
from dsmr.errors import DsmrError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "app", help="web page to continue MIDI prompts, listen and download (needs dsmr[app])",
        description="Open a local web page (Gradio) where you upload a MIDI prompt, set the length, "
                    "temperature, top-p, seed and pitch range, generate several variations, listen to "
                    "them, see their piano rolls and download the MIDI. Listens on 127.0.0.1 unless "
                    "--host says otherwise. Needs `pip install \"dsmr[app]\"`.")
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="run folder, exported model folder or Hub repo id (default: models/maestro-duration-small "
                        "when the project ships it)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the "
                        "page to the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    add_token_cache(p, help="token cache whose validation pieces the page offers as prompts")
    add_device(p)
    add_precision(p)
    add_threads(p, default=1, help=": one-token steps are too small to share")
    add_weights(p)
    p.add_argument("--no-audio", dest="audio", action="store_false", help="do not render WAV (FluidSynth)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise DsmrError(f"--port must be 1..65535, got {args.port}")
    print("dsmr app: loading Gradio...", file=sys.stderr, flush=True)
    from dsmr.app.page import _gradio, serve
    from dsmr.app.models import default_model

    _gradio()  # says how to install Gradio before anything else
    from dsmr.core.runtime import resolve_device

    device = str(resolve_device(args.device))  # auto -> cuda if available, else cpu
    set_threads(args.threads)
    cache = None
    if args.cache:
        from dsmr.data.cache import TokenCache

        cache = TokenCache(args.cache)
    model = args.model or default_model()
    from dsmr.app.models import ModelStore

    store = ModelStore(device, precision=args.precision, weights=args.weights)
    if model is not None:
        print(f"dsmr app: loading the model {model}...", file=sys.stderr, flush=True)
        store.load(model)  # a wrong model path fails here, not in the page
    if args.host not in LOOPBACK:
        print(f"dsmr app: listening on {args.host}: anyone who can reach this machine can use the page",
              file=sys.stderr)
    print("dsmr app: generated files go to a temporary folder, deleted an hour after they are made and when "
          "the app stops", file=sys.stderr)
    print(f"dsmr app: http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}/ "
          f"(Ctrl-C stops)", file=sys.stderr)
    serve(model, host=args.host, port=args.port, cache=cache, device=device, render_audio=args.audio, store=store)
    return 0
