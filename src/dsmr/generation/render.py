"""Listening to and looking at generated music: WAV through FluidSynth, piano-roll PNG through matplotlib.

FluidSynth is an optional system program (not a Python dependency): `render_wav` runs the `fluidsynth`
binary with a General MIDI soundfont and says how to install both when they are missing.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

from dsmr.core.atomic import atomic_path, save_figure
from dsmr.errors import DsmrError

INSTALL_HINT = (
    "install FluidSynth and a General MIDI soundfont: `sudo apt-get install fluidsynth fluid-soundfont-gm` "
    "(Debian/Ubuntu) or `brew install fluid-synth` plus a .sf2 file (macOS)"
)
# Where distributions put a General MIDI soundfont; the first that exists is used.
COMMON_SOUNDFONTS = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/usr/share/soundfonts/FluidR3_GM.sf2",
    "/usr/share/soundfonts/default.sf2",
    "/usr/share/sounds/sf2/TimGM6mb.sf2",
    "/usr/local/share/soundfonts/default.sf2",
    "/opt/homebrew/share/soundfonts/default.sf2",
    "/opt/homebrew/share/fluid-synth/sf2/VintageDreamsWaves-v2.sf2",
    "/usr/local/share/fluid-synth/sf2/VintageDreamsWaves-v2.sf2",
)


def find_fluidsynth() -> str:
    """Path of the `fluidsynth` program, or DsmrError saying how to install it."""
    exe = shutil.which("fluidsynth")
    if exe is None:
        raise DsmrError(f"cannot render WAV: the `fluidsynth` program is not on PATH; {INSTALL_HINT}")
    return exe


def find_soundfont(soundfont: str | os.PathLike | None = None) -> Path:
    """The soundfont to use: `soundfont` if given, else $DSMR_SOUNDFONT, else the first common path found."""
    if soundfont is not None:
        return _check_soundfont(Path(soundfont).expanduser(), "give a .sf2 file with --soundfont")
    env = os.environ.get("DSMR_SOUNDFONT")
    if env:
        return _check_soundfont(Path(env).expanduser(), "from $DSMR_SOUNDFONT")
    for candidate in COMMON_SOUNDFONTS:
        if Path(candidate).is_file():
            return Path(candidate)
    raise DsmrError(
        "cannot render WAV: no General MIDI soundfont found (give one with --soundfont or $DSMR_SOUNDFONT, "
        f"or {INSTALL_HINT})"
    )


def _check_soundfont(path: Path, hint: str) -> Path:
    if not path.is_file():
        raise DsmrError(f"soundfont not found: {path} ({hint})")
    # FluidSynth renders silence (and exits 0) with a file that is not a SoundFont: check the RIFF header.
    with open(path, "rb") as f:
        header = f.read(12)
    if header[:4] != b"RIFF" or header[8:12] != b"sfbk":
        raise DsmrError(f"not a SoundFont (.sf2/.sf3) file: {path} ({hint})")
    return path


def render_wav(
    midi_path: str | os.PathLike,
    wav_path: str | os.PathLike,
    soundfont: str | os.PathLike | None = None,
    sample_rate: int = 44100,
    gain: float = 0.6,
) -> Path:
    """Render a MIDI file to a 16-bit stereo WAV with FluidSynth (atomic). Returns the WAV path."""
    midi_path, wav_path = Path(midi_path), Path(wav_path)
    exe = find_fluidsynth()
    _load_score(midi_path)  # FluidSynth's own message for a non-MIDI file is unhelpful
    sf2 = find_soundfont(soundfont)
    with atomic_path(wav_path) as tmp:
        # -ni: no shell, no MIDI input; -F: render as fast as possible to a file. The file type is given
        # explicitly because the temporary name does not end in .wav.
        cmd = [exe, "-ni", "-q", "-g", str(gain), "-r", str(sample_rate), "-T", "wav", "-F", str(tmp),
               str(sf2), str(midi_path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        except subprocess.TimeoutExpired as err:
            raise DsmrError(f"FluidSynth took more than an hour rendering {midi_path}") from err
        if proc.returncode != 0 or tmp.stat().st_size <= 44:  # 44 bytes: a WAV header with no audio
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            reason = detail[-1] if detail else f"exit status {proc.returncode}"
            raise DsmrError(f"FluidSynth could not render {midi_path} with {sf2}: {reason}")
    return wav_path


ROW_SECONDS = 60.0  # seconds of music per row of a piano roll
MAX_ROWS = 8


def plot_pianoroll(
    score_or_path,
    png_path: str | os.PathLike,
    boundary_seconds: float | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Draw a piano roll (time in seconds vs MIDI pitch, colour by velocity) and save it as PNG (atomic).

    `score_or_path` is a symusic Score or a MIDI path. `boundary_seconds` draws a vertical line where the
    prompt ends and the model's continuation begins.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    import numpy as np

    score = _load_score(score_or_path).to("second")
    notes = [n for track in score.tracks for n in track.notes]
    starts = np.array([n.time for n in notes], dtype=np.float64)
    ends = starts + np.array([max(n.duration, 0.01) for n in notes], dtype=np.float64)
    pitches = np.array([n.pitch for n in notes], dtype=np.float64)
    velocities = np.array([n.velocity for n in notes], dtype=np.float64)
    duration = float(ends.max()) if len(notes) else 1.0
    if boundary_seconds is not None:
        duration = max(duration, boundary_seconds)

    # One row up to ROW_SECONDS; a longer piece is split into rows of equal length (at most MAX_ROWS), so a
    # 5-minute piece is five readable rows rather than one strip 40 inches wide.
    rows = min(MAX_ROWS, max(1, math.ceil(duration / ROW_SECONDS - 0.25)))
    span = duration * 1.01 / rows
    width = float(np.clip(4.0 + span / 10.0, 8.0, 14.0))
    fig, axes = plt.subplots(rows, 1, figsize=(width, 5.0 if rows == 1 else 1.2 + 2.4 * rows), dpi=dpi,
                             squeeze=False, layout="constrained")
    axes = axes[:, 0]
    try:
        if len(notes):
            _draw_notes(fig, axes, starts, ends, pitches, velocities)
            low, high = pitches.min() - 2, pitches.max() + 2
        else:
            low, high = 21, 108  # the piano's range, so an empty roll still has sensible axes
        for r, ax in enumerate(axes):
            if boundary_seconds is not None:
                ax.axvline(boundary_seconds, color="crimson", linewidth=1.5, linestyle="--",
                           label="prompt | continuation")
            ax.set_xlim(r * span, (r + 1) * span)
            ax.set_ylim(low, high)
            ax.set_ylabel("MIDI pitch")
        if boundary_seconds is not None:
            axes[0].legend(loc="upper right", fontsize=8)
        axes[-1].set_xlabel("time (s)")
        if title:
            axes[0].set_title(title)
        return save_figure(fig, png_path)
    finally:
        plt.close(fig)


def _draw_notes(fig, axes, starts, ends, pitches, velocities) -> None:
    """Every note as a box on every row (each row shows its own time span), coloured by velocity."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.collections import PolyCollection

    boxes = np.stack([np.stack([starts, pitches - 0.4], 1), np.stack([ends, pitches - 0.4], 1),
                      np.stack([ends, pitches + 0.4], 1), np.stack([starts, pitches + 0.4], 1)], 1)
    cmap = plt.get_cmap("viridis")
    colours = cmap(velocities / 127.0)
    colours[:, 3] = 0.35 + 0.65 * velocities / 127.0  # loud notes also more opaque
    for ax in axes:
        ax.add_collection(PolyCollection(boxes, facecolors=colours, edgecolors="none"))
    mappable = plt.cm.ScalarMappable(norm=plt.Normalize(0, 127), cmap=cmap)
    fig.colorbar(mappable, ax=list(axes), label="velocity", pad=0.01, fraction=0.02)


def _load_score(score_or_path):
    from dsmr.data.midi import load_midi

    if isinstance(score_or_path, (str, os.PathLike)):
        return load_midi(score_or_path)  # DsmrError for a missing, empty or non-MIDI file
    return score_or_path
