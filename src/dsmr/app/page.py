"""`dsmr app`: generate and listen in the browser (Gradio).

The page's work is done by plain functions that the tests call directly -- the models in `models`, continuing
a piece in `continuation`, the live duet's websocket in `play` --; `build_app` wires them to Gradio components
and `serve` runs the server (localhost unless told otherwise). Gradio is an optional extra:
`pip install "dsmr[app]"`.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

from dsmr.app.continuation import (MAX_PROMPT_SECONDS, MAX_SECONDS, MAX_VARIATIONS, as_number, cache_pieces,
                                   cache_prompt, generate_variations, summary_text, user_words)
from dsmr.app.models import NO_MODEL_HELP, ModelStore, default_model, local_playing_settings
from dsmr.errors import DsmrError
from dsmr.generation import defaults

INSTALL_HINT = 'the web app needs Gradio: pip install "dsmr[app]" (or: pip install gradio)'


# -------------------------------------------------------------------------------------------------- page


_SESSION_ROOT: list[Path] = []


def session_root() -> Path:
    """This process's temporary folder for the page's files: generated pieces, and Gradio's copies of uploads
    and outputs (GRADIO_TEMP_DIR, unless set), so that `serve` deletes all of them when the app stops."""
    if not _SESSION_ROOT:
        _SESSION_ROOT.append(Path(tempfile.mkdtemp(prefix="dsmr-app-")))
    return _SESSION_ROOT[0]


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    os.environ.setdefault("GRADIO_TEMP_DIR", str(session_root() / "gradio"))  # read when gradio is imported
    try:
        import gradio as gr
    except ImportError as err:
        raise DsmrError(INSTALL_HINT) from err
    return gr


def build_app(model=None, cache=None, device: str = "cpu", out_root=None, render_audio: bool = True,
              store: ModelStore | None = None):
    """The Gradio Blocks of the page. `model`: the initial model reference; `cache`: a TokenCache whose
    validation pieces the page offers as prompts; `store`: the models (default: loaded on `device` as `dsmr
    generate` would)."""
    gr = _gradio()
    store = store if store is not None else ModelStore(device)
    out_root = Path(out_root or tempfile.mkdtemp(dir=session_root(), prefix="pieces-"))
    model = model if model is not None else default_model()
    run = _generate_handler(gr, store, cache, out_root, render_audio)
    # Gradio keeps every upload and output in its cache: delete what is over an hour old, every 10 minutes
    with gr.Blocks(title="dsmr: continue a piece, or play with it", delete_cache=(600, 3600)) as demo:
        gr.Markdown("# dsmr: continue a piece of music, or play with it\n**Continue a piece**: upload a MIDI "
                    "file (or pick a piece), choose how much of it to keep and how long the result should be, and "
                    "press **Generate**. **Play**: a duet in real time on the on-screen piano, the computer "
                    "keyboard or a MIDI keyboard.")
        with gr.Tab("Continue a piece", id="continue"):
            with gr.Row():
                with gr.Column(scale=1):
                    c = _request_controls(gr, model, cache_pieces(cache))
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=2):
                    status, groups, audios, rolls, files = _result_column(gr, ready=bool(model))
        with gr.Tab("Play", id="play"):
            from dsmr.app.play import play_view

            play_view(gr)
        c["model"].blur(_slider_updates, inputs=c["model"], outputs=[c[k] for k in SLIDERS_OF_THE_MODEL])
        button.click(run, inputs=[c[k] for k in REQUEST_FIELDS], outputs=[status] + groups + audios + rolls + files,
                     api_name="generate", concurrency_limit=1)
    demo.dsmr_out_root = out_root
    return demo


# the request's controls, in the order the handler takes them; the sliders that follow the model chosen
REQUEST_FIELDS = ("model", "upload", "piece", "prompt_seconds", "seconds", "temperature", "top_p", "seed",
                  "variations", "min_pitch", "max_pitch", "max_note_seconds", "max_polyphony")
SLIDERS_OF_THE_MODEL = ("temperature", "top_p", "max_note_seconds", "max_polyphony")


def _request_controls(gr, model, pieces: list[str]) -> dict:
    """The Continue tab's inputs, by REQUEST_FIELDS name; the sampling sliders start at the model's own
    settings (and follow the model box, `_slider_updates`)."""
    c = {"model": gr.Textbox(label="Model (run folder, exported folder or Hub repo id)",
                             value=str(model) if model else "", placeholder=NO_MODEL_HELP),
         "upload": gr.File(label="Prompt: a MIDI file (optional)", file_types=[".mid", ".midi"], type="filepath",
                           elem_id="prompt-upload"),
         "piece": gr.Dropdown(choices=pieces, value=None, label="...or a piece of the validation split",
                              visible=bool(pieces), allow_custom_value=False),
         "prompt_seconds": gr.Slider(1, MAX_PROMPT_SECONDS, value=10, step=1, label="Seconds of the prompt to keep"),
         "seconds": gr.Slider(2, MAX_SECONDS, value=30, step=1, label="Length of the piece (seconds)")}
    own = local_playing_settings(model)  # the model's own; again whenever the model changes
    with gr.Row():
        c["temperature"] = gr.Slider(0, defaults.MAX_TEMPERATURE, value=own["temperature"], step=0.05,
                                     label="Temperature")
        c["top_p"] = gr.Slider(0.05, 1, value=own["top_p"], step=0.01, label="Top-p")
    with gr.Row():
        c["seed"] = gr.Number(value=None, precision=0, elem_id="seed",
                              label="Seed (empty: a new one each time, shown below; same seed: same piece)")
        c["variations"] = gr.Slider(1, MAX_VARIATIONS, value=1, step=1, label="Variations")
    with gr.Row():
        c["min_pitch"] = gr.Slider(0, 127, value=defaults.MIN_PITCH, step=1, label="Lowest pitch")
        c["max_pitch"] = gr.Slider(0, 127, value=defaults.MAX_PITCH, step=1, label="Highest pitch")
    with gr.Row():
        c["max_note_seconds"] = gr.Slider(0, 30, value=own["max_note_seconds"], step=0.5,
                                          visible=own["limits_note_length"], elem_id="max-note-seconds",
                                          label="Longest note (seconds; 0: no limit)")
        c["max_polyphony"] = gr.Slider(0, 32, value=own["max_polyphony"], step=1, visible=own["limits_polyphony"],
                                       elem_id="max-polyphony", label="Most notes at once (0: no limit)")
    return c


def _generate_handler(gr, store: ModelStore, cache, out_root: Path, render_audio: bool):
    """The Generate button's handler: the request's fields in, the summary and up to MAX_VARIATIONS results
    out; a problem is said on the page and the server keeps serving."""

    def run(model_ref, upload, piece, prompt_seconds, seconds, temperature, top_p, seed, variations,
            min_pitch, max_pitch, max_note_seconds, max_polyphony, progress=gr.Progress()):
        hidden = [gr.update(visible=False)] * MAX_VARIATIONS
        empty = ([None] * MAX_VARIATIONS) * 3
        try:
            with store.lock:
                progress(0, "loading the model")
                loaded = store.load(model_ref)
                _remove_old_outputs(out_root)
                out_dir = Path(tempfile.mkdtemp(dir=out_root))
                prompt = None
                if upload:
                    prompt = upload if isinstance(upload, str) else getattr(upload, "name", upload)
                elif piece:
                    prompt = cache_prompt(cache, piece, out_dir)
                results = generate_variations(
                    loaded, prompt, out_dir, prompt_seconds=as_number(prompt_seconds), seconds=as_number(seconds),
                    temperature=as_number(temperature), top_p=as_number(top_p),
                    seed=None if seed in (None, "") else int(seed), variations=int(variations or 1),
                    min_pitch=int(min_pitch), max_pitch=int(max_pitch),
                    max_note_seconds=as_number(max_note_seconds) if loaded.limits_note_length else 0,
                    max_polyphony=int(max_polyphony or 0) if loaded.limits_polyphony else 0,
                    render_audio=render_audio, progress=progress)
        except DsmrError as err:
            return [f"**Error**: {user_words(err, upload)}"] + hidden + empty
        except Exception as err:  # the server keeps serving; say what happened
            return [f"**Error**: {type(err).__name__}: {err}"] + hidden + empty
        groups = [gr.update(visible=i < len(results)) for i in range(MAX_VARIATIONS)]
        pad = [None] * (MAX_VARIATIONS - len(results))
        audio = [r["wav"] for r in results] + pad
        rolls = [r["pianoroll"] for r in results] + pad
        midis = [r["midi"] for r in results] + pad
        return [summary_text(results, loaded)] + groups + audio + rolls + midis

    return run


def _slider_updates(ref) -> list:
    """The sampling sliders for the model typed in the Model box (its own settings; limits it has no use for
    hidden)."""
    gr = _gradio()
    own = local_playing_settings(ref)
    return [gr.update(value=own["temperature"]), gr.update(value=own["top_p"]),
            gr.update(value=own["max_note_seconds"], visible=own["limits_note_length"]),
            gr.update(value=own["max_polyphony"], visible=own["limits_polyphony"])]


def _result_column(gr, ready: bool):
    """The status line and, per variation, a hidden group of audio, piano roll and MIDI file."""
    status = gr.Markdown("Ready." if ready else NO_MODEL_HELP, elem_id="status")
    groups, audios, rolls, files = [], [], [], []
    for i in range(MAX_VARIATIONS):
        with gr.Group(visible=False) as group:
            audios.append(gr.Audio(label=f"Variation {i + 1}", type="filepath", elem_id=f"audio-{i + 1}"))
            rolls.append(gr.Image(label="Piano roll (dashed line: end of the prompt)", type="filepath",
                                  elem_id=f"roll-{i + 1}"))
            files.append(gr.File(label="MIDI", elem_id=f"midi-{i + 1}"))
        groups.append(group)
    return status, groups, audios, rolls, files


def _remove_old_outputs(out_root: Path, max_age: float = 3600.0) -> None:
    """Delete the generations in `out_root` older than `max_age` seconds (the page has long shown them)."""
    import shutil
    import time

    for folder in Path(out_root).iterdir():
        try:
            if folder.is_dir() and time.time() - folder.stat().st_mtime > max_age:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue


def serve(model=None, host: str = "127.0.0.1", port: int = 7860, cache=None, device: str = "cpu",
          block: bool = True, render_audio: bool = True, store: ModelStore | None = None):
    """Build the page and launch it; returns the Blocks (with `block=False` the server runs in a thread).
    Blocking, it stops on Ctrl-C or SIGTERM, and every file the page made goes with it (`session_root`)."""
    import shutil
    import signal

    from dsmr.app.play import add_play_route, page_head

    store = store if store is not None else ModelStore(device)
    demo = build_app(model, cache=cache, device=device, render_audio=render_audio, store=store)
    demo.queue(default_concurrency_limit=1)
    previous = None
    if block and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)  # `kill` stops it like Ctrl-C
    try:
        # quiet: dsmr prints the address itself, and no hint about public share links for a local tool
        try:
            demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, inbrowser=False,
                        share=False, show_error=True, allowed_paths=[str(demo.dsmr_out_root)], quiet=True,
                        head=page_head())
            add_play_route(demo.app, store, model if model is not None else default_model())
            if block:
                demo.block_thread()  # Ctrl-C or SIGTERM: it closes the server
        except KeyboardInterrupt:  # one that came while the server was starting or closing
            if not block:
                raise
            demo.close()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if block:  # the server stopped: its files go with it
            shutil.rmtree(session_root(), ignore_errors=True)
            shutil.rmtree(demo.dsmr_out_root, ignore_errors=True)
    return demo


def _stop_on_sigterm(signum, frame):
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the server is closing
    raise KeyboardInterrupt
