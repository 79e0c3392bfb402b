"""`dsmr app`: generate and listen in the browser (Gradio).

The page's work is done by plain functions (`load`, `generate_variations`, `cache_prompt`) that the tests
call directly; `build_app` wires them to Gradio components and `serve` runs the server (localhost unless
told otherwise). Gradio is an optional extra: `pip install "dsmr[app]"`.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from dsmr import playing
from dsmr.errors import DsmrError

INSTALL_HINT = 'the web app needs Gradio: pip install "dsmr[app]" (or: pip install gradio)'
MAX_SECONDS = 300.0          # longest piece the page will write
MAX_PROMPT_SECONDS = 120.0
MAX_VARIATIONS = 4
# the models the project ships, first the one a musician meets by default
DEFAULT_MODEL_DIRS = ("models/maestro-duration-small", "models/maestro-small")
NO_MODEL_HELP = ("No model loaded. Give one: `dsmr app RUN_OR_MODEL_FOLDER` (a run folder from `dsmr train`, "
                 "a folder from `dsmr export`, or a Hub repo id), or type its path in the Model box. To train "
                 "a small one in a few minutes: `bash scripts/demo.sh` (see README).")


def default_model() -> Path | None:
    """The shipped model: the first of DEFAULT_MODEL_DIRS under the current folder, else in the repository
    (dsmr.hub.shipped_model)."""
    from dsmr.hub import shipped_model

    for rel in DEFAULT_MODEL_DIRS:
        if (Path.cwd() / rel / "config.json").is_file():
            return Path.cwd() / rel
    return next((shipped_model(rel) for rel in DEFAULT_MODEL_DIRS if shipped_model(rel) is not None), None)


@dataclass
class Loaded:
    ref: str
    model: object
    tokenizer: object
    config: dict
    segment_len: int

    @property
    def limits_note_length(self) -> bool:
        """The page's longest-note limit applies: notes end with NOTE_OFFs or carry their length."""
        from dsmr.note_guard import has_note_lengths, has_note_offs

        return has_note_offs(self.tokenizer) or has_note_lengths(self.tokenizer)

    @property
    def limits_polyphony(self) -> bool:
        """The page's most-notes-at-once limit applies: notes end with NOTE_OFFs."""
        from dsmr.note_guard import has_note_offs

        return has_note_offs(self.tokenizer)


class ModelStore:
    """Loads each model once; one generation at a time (CPU-bound: parallel requests only slow each other)."""

    def __init__(self, device: str = "cpu", precision: str = playing.PRECISION, weights: str = "best"):
        self.device, self.precision, self.weights = device, precision, weights
        self._models: dict[str, Loaded] = {}
        self.lock = threading.Lock()

    def load(self, ref) -> Loaded:
        ref = str(ref or "").strip()
        if not ref:
            raise DsmrError(NO_MODEL_HELP)
        if ref not in self._models:
            from dsmr.model import load_model
            from dsmr.generation import with_precision

            model = load_model(ref, device=self.device, which=self.weights)
            tokenizer, config, segment_len = model.tokenizer, model.run_config, model.segment_len
            model = with_precision(model, self.precision)  # as `dsmr generate --precision`
            self._models[ref] = Loaded(ref, model, tokenizer, config, segment_len)
        return self._models[ref]


def cache_pieces(cache, split: str = "validation", limit: int = 200) -> list[str]:
    """Names of the first `limit` pieces of a cache split (the page's prompt list)."""
    if cache is None or split not in cache.splits:
        return []
    return [cache.piece_name(split, i) for i in range(min(cache.num_pieces(split), limit))]


def cache_prompt(cache, name: str, out_dir, split: str = "validation") -> Path:
    """Write the cache piece `name` as a MIDI file (to use it as a prompt)."""
    names = cache_pieces(cache, split, limit=10**9)
    if name not in names:
        raise DsmrError(f"no piece {name!r} in the {split} split")
    out = Path(out_dir) / "prompt.mid"
    cache.tokenizer.decode_to_file(cache.piece(split, names.index(name)), out)
    return out


def check_request(prompt_seconds, seconds, temperature, top_p, variations, min_pitch, max_pitch) -> None:
    """DsmrError with a readable message for a setting out of range."""
    if not (seconds is not None and 0 < seconds <= MAX_SECONDS):
        raise DsmrError(f"length must be between 0 and {MAX_SECONDS:g} seconds, got {seconds}")
    if prompt_seconds is not None and not 0 < prompt_seconds <= MAX_PROMPT_SECONDS:
        raise DsmrError(f"prompt seconds must be between 0 and {MAX_PROMPT_SECONDS:g}, got {prompt_seconds}")
    if prompt_seconds is not None and prompt_seconds >= seconds:
        raise DsmrError(f"the length ({seconds:g} s) must be longer than the prompt kept ({prompt_seconds:g} s)")
    if not (temperature is not None and 0 <= temperature <= playing.MAX_TEMPERATURE):
        raise DsmrError(f"temperature must be between 0 and {playing.MAX_TEMPERATURE:g}, got {temperature}")
    if not (top_p is not None and 0 < top_p <= 1):
        raise DsmrError(f"top-p must be in (0, 1], got {top_p}")
    if variations not in range(1, MAX_VARIATIONS + 1):
        raise DsmrError(f"variations must be 1 to {MAX_VARIATIONS}, got {variations}")
    if not (0 <= min_pitch <= max_pitch <= 127):
        raise DsmrError(f"pitch range must satisfy 0 <= lowest <= highest <= 127, got {min_pitch}..{max_pitch}")


def local_playing_settings(ref) -> dict:
    """What the page's sliders start at for the model at `ref`, as `dsmr generate` would play it: its
    temperature and top-p (dsmr.playing.sampling_defaults) and its encoding's note-guard defaults (dsmr.note_guard
    .guard_for; 0 = no limit), with which of the two limits apply. Read from a local folder's config.json without
    loading the model; for anything else (a Hub id, a typo) dsmr.playing's values and both limits shown."""
    path = Path(str(ref or "").strip() or ".") / "config.json"
    settings = {**playing.sampling_defaults(None), "max_note_seconds": playing.MAX_NOTE_SECONDS,
                "max_polyphony": playing.MAX_POLYPHONY, "limits_note_length": True, "limits_polyphony": True}
    try:
        if not path.is_file():
            return settings
        config = json.loads(path.read_text())
        settings.update(playing.sampling_defaults(config))
        from dsmr.encodings import tokenizer_from_config
        from dsmr.note_guard import guard_for, has_note_lengths, has_note_offs

        tokenizer = tokenizer_from_config(config["tokenizer"])
        guard = guard_for(tokenizer)
        settings.update(max_note_seconds=guard["max_note_seconds"] or 0.0, max_polyphony=guard["max_polyphony"] or 0,
                        limits_polyphony=has_note_offs(tokenizer),
                        limits_note_length=has_note_offs(tokenizer) or has_note_lengths(tokenizer))
    except (OSError, ValueError, KeyError, TypeError, DsmrError):
        pass  # the load itself says what is wrong with the folder
    return settings


def generate_variations(loaded: Loaded, prompt_path, out_dir, *, prompt_seconds: float | None = 10.0,
                        seconds: float = 30.0, temperature: float | None = None,
                        top_p: float | None = None, seed: int | None = None, variations: int = 1,
                        min_pitch: int = playing.MIN_PITCH, max_pitch: int = playing.MAX_PITCH,
                        max_note_seconds: float | None = None, max_polyphony: int | None = None,
                        render_audio: bool = True, progress=None) -> list[dict]:
    """Continue `prompt_path` (None: start from nothing) `variations` times (seeds seed, seed + 1, ...).

    `temperature`, `top_p`: None takes the model's own (dsmr.playing.sampling_defaults).
    `max_note_seconds`, `max_polyphony`: the note guard (None: dsmr.playing's defaults; 0: no limit).
    Each result: {"midi", "pianoroll", "wav" (None without FluidSynth), "audio_note", and the generation
    summary}. DsmrError for bad input (non-MIDI prompt, no notes, settings out of range)."""
    import random

    from dsmr.generation import generate, load_prompt, playing_sampling
    from dsmr.render import find_fluidsynth, find_soundfont, plot_pianoroll, render_wav

    variations = int(variations)
    min_pitch, max_pitch = int(min_pitch), int(max_pitch)
    if prompt_path is None:
        prompt_seconds = None
    chosen = playing.sampling_defaults(loaded.config, temperature, top_p)
    temperature, top_p = chosen["temperature"], chosen["top_p"]
    check_request(prompt_seconds, seconds, temperature, top_p, variations, min_pitch, max_pitch)
    tokenizer = loaded.tokenizer
    prompt = None
    if prompt_path is not None:
        prompt = load_prompt(prompt_path, tokenizer, prompt_seconds)
    audio_note = None
    if render_audio:
        try:
            find_fluidsynth()
            find_soundfont()
        except DsmrError as err:
            audio_note = str(err)
    else:
        audio_note = "audio rendering is off"
    seed = random.randrange(2**31) if seed is None else int(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for k in range(variations):
        sampling = playing_sampling(loaded.model, temperature=float(temperature), top_p=float(top_p),
                                    max_note_seconds=max_note_seconds, max_polyphony=max_polyphony,
                                    min_pitch=min_pitch, max_pitch=max_pitch, seed=seed + k,
                                    max_seconds=float(seconds), max_tokens=None, stop_at_eos=False)
        if progress is not None:
            progress(k / variations, f"variation {k + 1} of {variations}: generating")
        result = generate(loaded.model, tokenizer, loaded.segment_len, prompt, sampling, progress=False)
        midi = out_dir / f"variation-{k + 1}-seed{seed + k}.mid"
        tokenizer.decode_to_file(result.ids, midi)
        boundary = result.prompt_seconds if prompt is not None else None
        if progress is not None:
            progress((k + 0.8) / variations, f"variation {k + 1} of {variations}: drawing and rendering")
        png = plot_pianoroll(midi, midi.with_suffix(".png"), boundary_seconds=boundary,
                             title=f"variation {k + 1} (seed {seed + k})")
        wav = None
        if audio_note is None:
            wav = render_wav(midi, midi.with_suffix(".wav"))
        results.append({**result.summary(), "midi": str(midi), "pianoroll": str(png),
                        "wav": None if wav is None else str(wav), "audio_note": audio_note})
    return results


def summary_text(results: list[dict], loaded: Loaded) -> str:
    lines = [f"**Done**: {len(results)} variation(s) with `{loaded.ref}`."]
    for i, r in enumerate(results):
        lines.append(f"- variation {i + 1}: seed {r['seed']}, {r['music_seconds']:.1f} s of music "
                     f"({r['prompt_seconds']:.1f} s prompt), {r['tokens']} new events, "
                     f"{r['tokens_per_s']:.0f} events/s"
                     + (f" — **{r['warning']}**" if r.get("warning") else ""))
    if results and results[0]["audio_note"]:
        lines.append(f"\n**No audio**: {results[0]['audio_note']}")
    return "\n".join(lines)


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
    pieces = cache_pieces(cache)

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
                    loaded, prompt, out_dir, prompt_seconds=_num(prompt_seconds), seconds=_num(seconds),
                    temperature=_num(temperature), top_p=_num(top_p),
                    seed=None if seed in (None, "") else int(seed), variations=int(variations or 1),
                    min_pitch=int(min_pitch), max_pitch=int(max_pitch),
                    max_note_seconds=_num(max_note_seconds) if loaded.limits_note_length else 0,
                    max_polyphony=int(max_polyphony or 0) if loaded.limits_polyphony else 0,
                    render_audio=render_audio, progress=progress)
        except DsmrError as err:
            return [f"**Error**: {_user_words(err, upload)}"] + hidden + empty
        except Exception as err:  # the server keeps serving; say what happened
            return [f"**Error**: {type(err).__name__}: {err}"] + hidden + empty
        groups = [gr.update(visible=i < len(results)) for i in range(MAX_VARIATIONS)]
        pad = [None] * (MAX_VARIATIONS - len(results))
        audio = [r["wav"] for r in results] + pad
        rolls = [r["pianoroll"] for r in results] + pad
        midis = [r["midi"] for r in results] + pad
        return [summary_text(results, loaded)] + groups + audio + rolls + midis

    # Gradio keeps every upload and output in its cache: delete what is over an hour old, every 10 minutes
    with gr.Blocks(title="dsmr: continue a piece, or play with it", delete_cache=(600, 3600)) as demo:
        gr.Markdown("# dsmr: continue a piece of music, or play with it\n**Continue a piece**: upload a MIDI "
                    "file (or pick a piece), choose how much of it to keep and how long the result should be, and "
                    "press **Generate**. **Play**: a duet in real time on the on-screen piano, the computer "
                    "keyboard or a MIDI keyboard.")
        with gr.Tab("Continue a piece", id="continue"):
            with gr.Row():
                with gr.Column(scale=1):
                    model_box = gr.Textbox(label="Model (run folder, exported folder or Hub repo id)",
                                           value=str(model) if model else "", placeholder=NO_MODEL_HELP)
                    upload = gr.File(label="Prompt: a MIDI file (optional)", file_types=[".mid", ".midi"],
                                     type="filepath", elem_id="prompt-upload")
                    piece = gr.Dropdown(choices=pieces, value=None, label="...or a piece of the validation split",
                                        visible=bool(pieces), allow_custom_value=False)
                    prompt_seconds = gr.Slider(1, MAX_PROMPT_SECONDS, value=10, step=1,
                                               label="Seconds of the prompt to keep")
                    seconds = gr.Slider(2, MAX_SECONDS, value=30, step=1, label="Length of the piece (seconds)")
                    own = local_playing_settings(model)  # the model's own; again whenever the model changes
                    with gr.Row():
                        temperature = gr.Slider(0, playing.MAX_TEMPERATURE, value=own["temperature"], step=0.05,
                                                label="Temperature")
                        top_p = gr.Slider(0.05, 1, value=own["top_p"], step=0.01, label="Top-p")
                    with gr.Row():
                        seed = gr.Number(value=None, precision=0, elem_id="seed",
                                         label="Seed (empty: a new one each time, shown below; same seed: same piece)")
                        variations = gr.Slider(1, MAX_VARIATIONS, value=1, step=1, label="Variations")
                    with gr.Row():
                        min_pitch = gr.Slider(0, 127, value=playing.MIN_PITCH, step=1, label="Lowest pitch")
                        max_pitch = gr.Slider(0, 127, value=playing.MAX_PITCH, step=1, label="Highest pitch")
                    with gr.Row():
                        max_note_seconds = gr.Slider(0, 30, value=own["max_note_seconds"], step=0.5,
                                                     visible=own["limits_note_length"], elem_id="max-note-seconds",
                                                     label="Longest note (seconds; 0: no limit)")
                        max_polyphony = gr.Slider(0, 32, value=own["max_polyphony"], step=1,
                                                  visible=own["limits_polyphony"], elem_id="max-polyphony",
                                                  label="Most notes at once (0: no limit)")
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=2):
                    status, groups, audios, rolls, files = _result_column(gr, ready=bool(model))
        with gr.Tab("Play", id="play"):
            from dsmr.app_play import play_view

            play_view(gr)
        model_box.blur(_slider_updates, inputs=model_box, outputs=[temperature, top_p, max_note_seconds, max_polyphony])
        button.click(run, inputs=[model_box, upload, piece, prompt_seconds, seconds, temperature, top_p, seed,
                                  variations, min_pitch, max_pitch, max_note_seconds, max_polyphony],
                     outputs=[status] + groups + audios + rolls + files, api_name="generate",
                     concurrency_limit=1)
    demo.dsmr_out_root = out_root
    return demo


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


def _user_words(err: Exception, upload) -> str:
    """The error with the upload's temporary path replaced by the name the user gave the file."""
    text = str(err)
    path = upload if isinstance(upload, str) else getattr(upload, "name", None)
    if path:
        text = text.replace(str(path), Path(path).name)
    return text


def _num(value):
    return None if value is None else float(value)


def serve(model=None, host: str = "127.0.0.1", port: int = 7860, cache=None, device: str = "cpu",
          block: bool = True, render_audio: bool = True, store: ModelStore | None = None):
    """Build the page and launch it; returns the Blocks (with `block=False` the server runs in a thread).
    Blocking, it stops on Ctrl-C or SIGTERM, and every file the page made goes with it (`session_root`)."""
    import shutil
    import signal

    from dsmr.app_play import add_play_route, page_head

    store = store if store is not None else ModelStore(device)
    demo = build_app(model, cache=cache, device=device, render_audio=render_audio, store=store)
    demo.queue(default_concurrency_limit=1)
    previous = None
    if block and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)  # `kill` stops it like Ctrl-C
    try:
        # quiet: dsmr prints the address itself, and no hint about public share links for a local tool
        demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, inbrowser=False,
                    share=False, show_error=True, allowed_paths=[str(demo.dsmr_out_root)], quiet=True,
                    head=page_head())
        add_play_route(demo.app, store, model if model is not None else default_model())
        if block:
            try:
                demo.block_thread()  # Ctrl-C or SIGTERM: it closes the server
            except KeyboardInterrupt:  # one that arrived while it was closing
                pass
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
