"""The models the repository ships (models/maestro-duration-small, models/maestro-small): each loads from a
fresh clone, its card carries the data's licence and the measured figures, and it continues a prompt
through the command line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO
from dsmr.generation import SamplingConfig, generate
from dsmr.sharing.loader import load_model
from tests.midi_factory import tiny_midi

MODELS = [REPO / "models" / name for name in ("maestro-duration-small", "maestro-small")]


@pytest.fixture(params=MODELS, ids=lambda path: path.name)
def MODEL(request):
    if not (request.param / "config.json").is_file():
        pytest.skip(f"no shipped model at {request.param}")
    return request.param


def test_shipped_model_loads_and_its_card_tells_what_it_is(MODEL):
    model = load_model(MODEL)
    config = json.loads((MODEL / "config.json").read_text())
    assert model.cfg.to_dict() == config["model"] and any(config["model"]["horizons"])
    assert (MODEL / "model.safetensors").stat().st_size <= 10 * 2**20
    card = (MODEL / "README.md").read_text()
    assert "license: cc-by-nc-sa-4.0" in card and "non-commercial" in card.lower()
    for split in ("validation", "test"):
        ppl = config["figures"][f"{split}_ppl"]
        assert math.isfinite(ppl) and 1 < ppl < 100 and f"{ppl:.3f}" in card


def test_shipped_model_generates_music(MODEL):
    model = load_model(MODEL)
    result = generate(model, sampling=SamplingConfig(seed=0, max_tokens=96, stop_at_eos=False), progress=False)
    assert result.new_tokens == 96
    score = model.tokenizer.decode(result.ids)
    assert sum(len(track.notes) for track in score.tracks) > 0


def test_shipped_model_continues_a_midi_prompt_from_the_command_line(MODEL, tmp_path):
    prompt = tiny_midi(tmp_path / "prompt.mid")
    out = tmp_path / "continued.mid"
    done = subprocess.run([sys.executable, "-m", "dsmr", "generate", str(MODEL), "--prompt", str(prompt),
                           "--max-tokens", "64", "--seed", "1", "--out", str(out), "--json", "--no-progress",
                           "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert 0 < report["tokens"] <= 64 and report["prompt_tokens"] > 0 and out.stat().st_size > 0


def test_the_readme_snippet_plays_like_dsmr_generate_from_any_folder(tmp_path):
    """The README's Python snippet, run from a folder outside the repository, finds the shipped model and
    writes the notes `dsmr generate` writes for the same prompt, length, seed and samples."""
    readme = (REPO / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert "load_model(\"models/maestro-duration-small\")" in snippet and "playing_sampling" in snippet
    work = tmp_path / "elsewhere"
    work.mkdir()
    prompt = tiny_midi(work / "my-piece.mid", n=40)  # 20 s of notes: the snippet keeps 10
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", snippet], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    cli = subprocess.run([sys.executable, "-m", "dsmr", "generate", str(REPO / "models" / "maestro-duration-small"),
                          "--prompt", str(prompt), "--prompt-seconds", "10", "--max-seconds", "30", "--seed", "1",
                          "--num-samples", "2", "--out", str(tmp_path / "cli.mid"), "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr
    import symusic

    def notes(path):
        n = symusic.Score(str(path)).to("second").tracks[0].notes.numpy()
        return list(zip(n["time"].round(3).tolist(), n["pitch"].tolist(), n["duration"].round(3).tolist()))

    snippet_notes, cli_notes = notes(work / "continued.mid"), notes(tmp_path / "cli-1.mid")
    assert len(snippet_notes) > 20 and snippet_notes == cli_notes
