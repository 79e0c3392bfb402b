"""Continuing a piece on the page: the prompt (an upload or a piece of the cache), the request's checks, the
variations generated as `dsmr generate` would, and what the page says about them."""


from __future__ import annotations

from pathlib import Path

from dsmr.generation import defaults
from dsmr.errors import DsmrError
from dsmr.app.models import Loaded


MAX_SECONDS = 300.0          # longest piece the page will write


MAX_PROMPT_SECONDS = 120.0


MAX_VARIATIONS = 4


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
    if not (temperature is not None and 0 <= temperature <= defaults.MAX_TEMPERATURE):
        raise DsmrError(f"temperature must be between 0 and {defaults.MAX_TEMPERATURE:g}, got {temperature}")
    if not (top_p is not None and 0 < top_p <= 1):
        raise DsmrError(f"top-p must be in (0, 1], got {top_p}")
    if variations not in range(1, MAX_VARIATIONS + 1):
        raise DsmrError(f"variations must be 1 to {MAX_VARIATIONS}, got {variations}")
    if not (0 <= min_pitch <= max_pitch <= 127):
        raise DsmrError(f"pitch range must satisfy 0 <= lowest <= highest <= 127, got {min_pitch}..{max_pitch}")


def generate_variations(loaded: Loaded, prompt_path, out_dir, *, prompt_seconds: float | None = 10.0,
                        seconds: float = 30.0, temperature: float | None = None,
                        top_p: float | None = None, seed: int | None = None, variations: int = 1,
                        min_pitch: int = defaults.MIN_PITCH, max_pitch: int = defaults.MAX_PITCH,
                        max_note_seconds: float | None = None, max_polyphony: int | None = None,
                        render_audio: bool = True, progress=None) -> list[dict]:
    """Continue `prompt_path` (None: start from nothing) `variations` times (seeds seed, seed + 1, ...).

    `temperature`, `top_p`: None takes the model's own (dsmr.generation.defaults.sampling_defaults).
    `max_note_seconds`, `max_polyphony`: the note guard (None: dsmr.generation.defaults's defaults; 0: no limit).
    Each result: {"midi", "pianoroll", "wav" (None without FluidSynth), "audio_note", and the generation
    summary}. DsmrError for bad input (non-MIDI prompt, no notes, settings out of range)."""
    import random

    from dsmr.generation import generate, load_prompt, playing_sampling
    from dsmr.generation.render import plot_pianoroll, render_wav

    variations = int(variations)
    min_pitch, max_pitch = int(min_pitch), int(max_pitch)
    if prompt_path is None:
        prompt_seconds = None
    chosen = defaults.sampling_defaults(loaded.config, temperature, top_p)
    temperature, top_p = chosen["temperature"], chosen["top_p"]
    check_request(prompt_seconds, seconds, temperature, top_p, variations, min_pitch, max_pitch)
    tokenizer = loaded.tokenizer
    prompt = None
    if prompt_path is not None:
        prompt = load_prompt(prompt_path, tokenizer, prompt_seconds)
    audio_note = why_no_audio(render_audio)
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
        result = generate(loaded.model, prompt, sampling, progress=False)
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


def why_no_audio(render_audio: bool) -> str | None:
    """None where the page can render WAV (FluidSynth and a soundfont found), else the reason it cannot."""
    if not render_audio:
        return "audio rendering is off"
    from dsmr.generation.render import find_fluidsynth, find_soundfont

    try:
        find_fluidsynth()
        find_soundfont()
    except DsmrError as err:
        return str(err)
    return None


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


def user_words(err: Exception, upload) -> str:
    """The error with the upload's temporary path replaced by the name the user gave the file."""
    text = str(err)
    path = upload if isinstance(upload, str) else getattr(upload, "name", None)
    if path:
        text = text.replace(str(path), Path(path).name)
    return text


def as_number(value):
    return None if value is None else float(value)
