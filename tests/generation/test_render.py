"""WAV rendering (FluidSynth) and piano-roll PNGs."""

from __future__ import annotations

import shutil
import wave
from pathlib import Path

import numpy as np
import pytest

from dsmr.errors import DsmrError
from dsmr.generation.render import find_fluidsynth, find_soundfont, plot_pianoroll, render_wav
from conftest import have_audio
from tests.midi_factory import make_score, write_midi_file

NOTES = [(0.0, 1.0, 60, 100), (0.5, 1.5, 64, 40), (1.0, 3.0, 67, 127), (2.5, 3.5, 48, 10)]
CRIMSON = np.array([220, 20, 60]) / 255  # the boundary line's colour


def _crimson_columns(png: Path) -> np.ndarray:
    import matplotlib.image

    image = matplotlib.image.imread(png)[..., :3]
    close = np.abs(image - CRIMSON).max(axis=-1) < 0.08
    return np.flatnonzero(close.sum(axis=0) > image.shape[0] // 3)  # columns that are mostly the line


needs_fluidsynth = pytest.mark.skipif(
    not have_audio(),
    reason="FluidSynth or a GM soundfont is not installed (apt-get install fluidsynth fluid-soundfont-gm)")


def test_pianoroll_marks_the_prompt_boundary(tmp_path):
    import matplotlib.image

    with_line = plot_pianoroll(make_score(NOTES), tmp_path / "roll.png", boundary_seconds=1.75, title="t")
    without = plot_pianoroll(make_score(NOTES), tmp_path / "plain.png")
    image = matplotlib.image.imread(with_line)
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 100
    columns = _crimson_columns(with_line)
    assert columns.size >= 1 and columns.max() - columns.min() < 6  # one thin vertical line
    # the line sits near 1.75 / 3.5 of the way along the time axis (the plot area, not the figure)
    assert 0.25 < columns.mean() / image.shape[1] < 0.6
    assert _crimson_columns(without).size == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.png", "roll.png"]  # no temporary files


def test_pianoroll_colour_follows_velocity(tmp_path):
    import matplotlib.image

    quiet = plot_pianoroll(make_score([(0.0, 4.0, 60, 5)]), tmp_path / "quiet.png")
    loud = plot_pianoroll(make_score([(0.0, 4.0, 60, 127)]), tmp_path / "loud.png")
    a, b = matplotlib.image.imread(quiet)[..., :3], matplotlib.image.imread(loud)[..., :3]
    assert not np.allclose(a, b)


def test_pianoroll_from_a_midi_file_and_an_empty_score(tmp_path):
    midi = write_midi_file(tmp_path / "in.mid", NOTES)
    assert plot_pianoroll(midi, tmp_path / "a.png").stat().st_size > 1000
    assert plot_pianoroll(make_score([]), tmp_path / "empty.png", boundary_seconds=2.0).stat().st_size > 1000


def test_pianoroll_bad_input(tmp_path):
    with pytest.raises(DsmrError, match="not found"):
        plot_pianoroll(tmp_path / "missing.mid", tmp_path / "a.png")
    (tmp_path / "text.mid").write_text("not midi")
    with pytest.raises(DsmrError, match="not a readable MIDI"):
        plot_pianoroll(tmp_path / "text.mid", tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


def test_missing_fluidsynth_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    with pytest.raises(DsmrError, match="apt-get install fluidsynth fluid-soundfont-gm") as err:
        find_fluidsynth()
    assert "\n" not in str(err.value)
    midi = write_midi_file(tmp_path / "in.mid", NOTES)
    with pytest.raises(DsmrError, match="fluidsynth"):
        render_wav(midi, tmp_path / "out.wav")
    assert not (tmp_path / "out.wav").exists()


def test_soundfont_resolution(tmp_path, monkeypatch):
    sf2 = tmp_path / "piano.sf2"
    sf2.write_bytes(b"RIFF\x00\x00\x00\x00sfbk" + bytes(20))
    assert find_soundfont(sf2) == sf2
    monkeypatch.setenv("DSMR_SOUNDFONT", str(sf2))
    assert find_soundfont() == sf2
    with pytest.raises(DsmrError, match="soundfont not found.*--soundfont"):
        find_soundfont(tmp_path / "missing.sf2")
    monkeypatch.setenv("DSMR_SOUNDFONT", str(tmp_path / "gone.sf2"))
    with pytest.raises(DsmrError, match=r"DSMR_SOUNDFONT"):
        find_soundfont()
    junk = tmp_path / "junk.sf2"
    junk.write_text("junk")
    with pytest.raises(DsmrError, match="not a SoundFont"):
        find_soundfont(junk)


def test_no_soundfont_anywhere(monkeypatch):
    import dsmr.generation.render as render

    monkeypatch.delenv("DSMR_SOUNDFONT", raising=False)
    monkeypatch.setattr(render, "COMMON_SOUNDFONTS", ("/nonexistent/a.sf2",))
    with pytest.raises(DsmrError, match="no General MIDI soundfont found.*apt-get install"):
        find_soundfont()


@needs_fluidsynth
def test_render_wav(tmp_path):
    midi = write_midi_file(tmp_path / "in.mid", NOTES)
    wav = render_wav(midi, tmp_path / "out.wav", sample_rate=22050)
    with wave.open(str(wav)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (2, 2, 22050)
        seconds = w.getnframes() / w.getframerate()
        audio = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    assert 3.5 <= seconds < 8.0  # the notes last 3.5 s, plus the release tail
    assert np.abs(audio).max() > 1000  # not silence
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mid", "out.wav"]


@needs_fluidsynth
def test_render_wav_refuses_non_midi_and_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.mid"
    bad.write_text("hello")
    with pytest.raises(DsmrError, match="not a readable MIDI"):
        render_wav(bad, tmp_path / "out.wav")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.mid"]


@pytest.mark.skipif(shutil.which("fluidsynth") is None, reason="fluidsynth is not installed")
def test_render_wav_refuses_a_file_that_is_not_a_soundfont(tmp_path):
    midi = write_midi_file(tmp_path / "in.mid", NOTES)
    junk = tmp_path / "junk.sf2"
    junk.write_text("junk")
    with pytest.raises(DsmrError, match="not a SoundFont"):
        render_wav(midi, tmp_path / "out.wav", soundfont=junk)


def test_a_long_piece_is_drawn_in_rows_of_readable_width(tmp_path):
    import symusic
    from PIL import Image

    from dsmr.generation.render import plot_pianoroll

    score = symusic.Score(1000)  # 120 qpm: 1000 ticks = 0.5 s
    track = symusic.Track()
    for i in range(600):  # 300 s
        track.notes.append(symusic.Note(i * 1000, 500, 40 + i % 40, 80))
    score.tracks.append(track)
    width, height = Image.open(plot_pianoroll(score, tmp_path / "long.png", boundary_seconds=10)).size
    assert width <= 1400 and height > 1000, "five rows of a minute, not one strip"
    width, height = Image.open(plot_pianoroll(score.clip(0, 40 * 1000), tmp_path / "short.png")).size
    assert height == 500
