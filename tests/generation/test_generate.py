"""Bounded-memory generation: decoder equivalence with streaming training, bounded state, sampling,
prompts and the `dsmr generate` command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from dsmr.training.resume import save_checkpoint
from dsmr.cli import main
from dsmr.errors import DsmrError
from dsmr.generation import (
    HalfWeightLinear,
    IncrementalDecoder,
    Int8WeightLinear,
    MusicClock,
    SamplingConfig,
    banned_mask,
    crop_seconds,
    generate,
    half_weight_model,
    load_prompt,
    pitch_range_bans,
    sample_next,
    with_precision,
)
from dsmr.model import DSMR, DSMRConfig
from dsmr.data.tokenizers.registry import make_tokenizer
from tests.midi_factory import make_score, score_notes, write_midi_file

SEG = 8


@pytest.fixture(autouse=True)
def one_thread():
    """One-token steps are far too small to share between threads; on a busy 2-core machine a second
    thread makes every step wait for the other core."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
PROMPT_NOTES = [(0.0, 0.5, 60, 80), (0.5, 1.0, 64, 90), (1.0, 2.0, 67, 70), (1.5, 3.0, 72, 100), (3.2, 3.6, 55, 60)]


def tiny_model(vocab=50, horizons=(0, 3, 8, 13), gate="none", per_head=False, d_model=32, seed=0):
    torch.manual_seed(seed)
    # a tied head and small initial weights: logits of the size the tolerances below were measured at
    cfg = DSMRConfig(vocab_size=vocab, n_layers=len(horizons), d_model=d_model, n_heads=4, horizons=horizons,
                     gate=gate, gate_per_head=per_head, tie_embeddings=True, init_std=0.02)
    return DSMR(cfg).eval()


def streaming_logits(model, ids: torch.Tensor, seg: int) -> torch.Tensor:
    """The training-time forward: segment after segment from position 0, state carried."""
    B, N = ids.shape
    state, out = None, []
    with torch.no_grad():
        for start in range(0, N, seg):
            chunk = ids[:, start:start + seg]
            positions = torch.arange(start, start + chunk.shape[1]).expand(B, -1)
            logits, state = model(chunk, positions, state=state)
            out.append(logits)
    return torch.cat(out, dim=1)


# ------------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("gate,per_head", [("none", False), ("soft", True), ("ste", False)])
def test_decoder_logits_equal_streaming_forward(gate, per_head):
    # horizons 0, < T, = T and > T; 45 tokens cross five segment boundaries
    model = tiny_model(gate=gate, per_head=per_head)
    if gate == "soft":
        for block in model.blocks:  # gates well away from 1, so a gate that were ignored would show
            block.attn.gate_logit.data.uniform_(-2.0, 2.0)
    if gate == "ste":
        model.blocks[2].attn.gate_logit.data.fill_(-1.0)  # a closed gate: that layer's memory is dropped
    ids = torch.randint(3, 50, (2, 45), generator=torch.Generator().manual_seed(1))
    expected = streaming_logits(model, ids, SEG)

    decoder = IncrementalDecoder(model, SEG, batch_size=2)
    stepped = torch.stack([decoder.step(ids[:, i]) for i in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(stepped, expected, rtol=0, atol=2e-5)

    decoder.reset()  # prompt-style chunks of any size, crossing boundaries
    chunks = [decoder.feed(ids[:, a:b]) for a, b in [(0, 11), (11, 12), (12, 40), (40, 45)]]
    torch.testing.assert_close(torch.cat(chunks, dim=1), expected, rtol=0, atol=2e-5)

    decoder.reset()  # a prompt fed whole, only its last logits kept; then steps continue the piece
    torch.testing.assert_close(decoder.feed(ids[:, :30], last_only=True), expected[:, 29], rtol=0, atol=2e-5)
    tail = torch.stack([decoder.step(ids[:, i]) for i in range(30, 45)], dim=1)
    torch.testing.assert_close(tail, expected[:, 30:], rtol=0, atol=2e-5)


def test_decoder_state_is_only_its_horizon_plus_the_segment():
    model = tiny_model(horizons=(0, 3, 8, 13))
    decoder = IncrementalDecoder(model, SEG)
    for i in range(SEG * 3):
        decoder.step(torch.tensor([5 + i % 7]))
    assert decoder.filled() == [8, 11, 16, 21]  # a full segment plus min(h, 16 earlier positions)
    decoder.step(torch.tensor([5]))  # the next segment starts: memory cut back to h
    assert decoder.filled() == [1, 4, 9, 14]
    assert [k.shape[2] for k in decoder.keys] == [h + SEG for h in (0, 3, 8, 13)]


def test_closed_ste_gate_matters():
    """The equivalence test would pass for a decoder that ignored gates only if gates did nothing."""
    open_model = tiny_model(gate="ste")
    closed = tiny_model(gate="ste")
    for block in closed.blocks:
        block.attn.gate_logit.data.fill_(-1.0)
    ids = torch.randint(3, 50, (1, 30), generator=torch.Generator().manual_seed(2))
    a = torch.stack([d.step(ids[:, i]) for d in [IncrementalDecoder(open_model, SEG)] for i in range(30)], 1)
    b = torch.stack([d.step(ids[:, i]) for d in [IncrementalDecoder(closed, SEG)] for i in range(30)], 1)
    assert torch.allclose(a[:, :SEG], b[:, :SEG], atol=1e-6)  # first segment: no memory yet
    assert not torch.allclose(a[:, SEG:], b[:, SEG:], atol=1e-3)


def test_with_precision_names_the_weight_copies():
    model = tiny_model()
    assert with_precision(model, "float32") is model
    assert isinstance(with_precision(model, "float16").head, HalfWeightLinear)
    assert isinstance(with_precision(model, "int8").head, Int8WeightLinear)
    from dsmr.generation import default_cpu_precision, resolve_precision

    assert resolve_precision(model, "auto") == default_cpu_precision(model)  # on a CPU
    assert resolve_precision(model.to("meta"), "auto") == "float32"  # elsewhere
    with pytest.raises(DsmrError, match="precision must be auto or one of float32, float16, int8, got 'bf16'"):
        with_precision(model, "bf16")


def test_half_weight_model_is_close_to_float32():
    model = tiny_model(vocab=391, horizons=(16, 4), d_model=64)
    half = half_weight_model(model)
    assert model.blocks[0].attn.qkv_proj.weight.dtype == torch.float32  # the original is untouched
    ids = torch.randint(3, 391, (1, 40), generator=torch.Generator().manual_seed(3))
    a = IncrementalDecoder(model, SEG).feed(ids)
    chunked = IncrementalDecoder(half, SEG).feed(ids)  # chunks of 8 rows: float32 products of fp16 weights
    decoder = IncrementalDecoder(half, SEG)
    stepped = torch.stack([decoder.step(ids[:, i]) for i in range(ids.shape[1])], dim=1)  # float16 GEMV
    for b in (chunked, stepped):
        assert b.dtype == torch.float32
        assert (a - b).abs().max() < 1.5e-3 * a.abs().max()  # measured 1.6e-4 of the largest logit
        assert not torch.equal(a, b)  # the weights really are float16


# ----------------------------------------------------------------------------------------- bounded state


def test_state_bytes_identical_after_5k_and_50k_steps():
    model = tiny_model(vocab=20, horizons=(6, 0), d_model=8, seed=4)
    decoder = IncrementalDecoder(model, 4)
    initial = decoder.state_bytes()
    pointers = [t.data_ptr() for t in (*decoder.keys, *decoder.values)]
    tokens = torch.randint(3, 20, (50_000,), generator=torch.Generator().manual_seed(5))
    seen = {}
    with torch.inference_mode():
        for i in range(50_000):
            logits = decoder.step(tokens[i:i + 1])
            if i + 1 in (5_000, 50_000):
                seen[i + 1] = (decoder.state_bytes(), decoder.filled(), [tuple(t.shape) for t in decoder.keys])
    assert decoder.position == 50_000
    assert torch.isfinite(logits).all()
    assert seen[5_000] == seen[50_000]
    assert seen[50_000][0] == initial == 2 * (6 + 4 + 0 + 4) * 8 * 4  # K and V, (h + T) positions, fp32
    assert all(f <= h + 4 for f, h in zip(decoder.filled(), (6, 0)))
    assert [t.data_ptr() for t in (*decoder.keys, *decoder.values)] == pointers  # never reallocated


# -------------------------------------------------------------------------------------------- sampling


def test_sampling_controls():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0, -1.0]])
    assert int(sample_next(logits, SamplingConfig(temperature=0), gen)) == 2
    assert all(int(sample_next(logits, SamplingConfig(top_k=1), gen)) == 2 for _ in range(20))
    assert all(int(sample_next(logits, SamplingConfig(top_p=0.3), gen)) == 2 for _ in range(20))
    two = {int(sample_next(logits, SamplingConfig(top_k=2), gen)) for _ in range(200)}
    assert two == {2, 3}
    nucleus = {int(sample_next(logits, SamplingConfig(top_p=0.9), gen)) for _ in range(300)}
    assert nucleus == {1, 2, 3}  # softmax mass of 2, 3 is ~0.87 < 0.9, so the third-best joins
    banned = torch.tensor([False, False, True, False, False])
    assert int(sample_next(logits, SamplingConfig(temperature=0), gen, banned)) == 3
    cold = [int(sample_next(logits, SamplingConfig(temperature=0.05), gen)) for _ in range(50)]
    assert set(cold) == {2}


def test_sampling_draws_each_event_with_its_probability():
    """Inverse-CDF sampling: frequencies match the softmax (chi-square, 5 events, 20,000 draws), events of
    probability 0 (banned, or below top-k) never come, and a seed repeats its draws, per lane too."""
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0, -1.0]])
    gen = torch.Generator().manual_seed(1)
    draws = sample_next(logits.expand(20_000, -1), SamplingConfig(), gen)
    counts = torch.bincount(draws, minlength=5).double()
    expected = logits.softmax(dim=-1)[0].double() * 20_000
    assert ((counts - expected) ** 2 / expected).sum() < 18.5  # chi-square, 4 dof: p = 0.001
    banned = torch.tensor([False, False, True, True, False])
    kept = sample_next(logits.expand(5_000, -1), SamplingConfig(top_k=2), gen, banned)
    assert set(kept.tolist()) == {0, 1}  # the top 2 of what is left after the ban
    tiny = sample_next(logits, SamplingConfig(temperature=1e-39), gen)  # logits / T would overflow to inf
    assert tiny.tolist() == [2]
    with pytest.raises(DsmrError, match="non-finite logits"):
        sample_next(torch.tensor([[0.0, float("nan"), 1.0]]), SamplingConfig(), gen)
    def lanes():
        return [torch.Generator().manual_seed(seed) for seed in (5, 6)]

    once = [sample_next(logits.expand(2, -1), SamplingConfig(), lanes()).tolist() for _ in range(3)]
    assert once[0] == once[1] == once[2]
    # lane 1 draws from its own seed only
    assert sample_next(logits, SamplingConfig(), torch.Generator().manual_seed(6)).tolist() == [once[0][1]]


def test_sampling_config_validation():
    with pytest.raises(DsmrError, match="temperature"):
        SamplingConfig(temperature=-1).validate()
    with pytest.raises(DsmrError, match="top_p"):
        SamplingConfig(top_p=0).validate()
    with pytest.raises(DsmrError, match="a piece needs a limit"):
        SamplingConfig(max_tokens=None).validate()
    with pytest.raises(DsmrError, match="outside the vocabulary"):
        SamplingConfig(banned_ids=(400,)).validate(391)


def test_banned_events_and_pitch_range():
    tok = make_tokenizer("performance")
    mask = banned_mask(tok, SamplingConfig(stop_at_eos=False))
    assert mask[[tok.pad_id, tok.bos_id, tok.eos_id]].all() and mask.sum() == 3
    bans = pitch_range_bans(tok, 60, 72)
    names = [tok.event_name(i) for i in bans]
    assert len(bans) == 128 - 13 and all(n.startswith("NOTE_ON_") for n in names)
    assert "NOTE_ON_59" in names and "NOTE_ON_73" in names and "NOTE_ON_60" not in names
    with pytest.raises(DsmrError, match="every event is banned"):
        banned_mask(tok, SamplingConfig(banned_ids=tuple(range(tok.vocab_size))))
    with pytest.raises(DsmrError, match="pitch range"):
        pitch_range_bans(tok, 80, 60)


def test_music_clock_matches_tokenizer_seconds():
    tok = make_tokenizer("performance")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, tok.vocab_size, 500).tolist()
    clock = MusicClock(tok, ids[:100])
    grown = list(ids[:100])
    for token in ids[100:]:
        grown.append(token)
        clock.add(token, grown)
    assert clock.seconds == pytest.approx(tok.seconds(ids))


def test_pitch_bans_and_clock_ask_the_tokenizer_miditok():
    tok = make_tokenizer("remi")
    bans = pitch_range_bans(tok, 60, 72)
    assert bans and all(tok.event_name(i).startswith("Pitch_") for i in bans)
    assert tok.event_id("Pitch_59") in bans and tok.event_id("Pitch_60") not in bans
    assert MusicClock(tok)._table is None  # miditok ids have no fixed length: re-measured


# ------------------------------------------------------------------------------------------ generation


@pytest.fixture(scope="module")
def perf_tok():
    return make_tokenizer("performance")


@pytest.fixture(scope="module")
def perf_model(perf_tok):
    return tiny_model(vocab=perf_tok.vocab_size, horizons=(16, 4), d_model=32, seed=7)


def test_same_seed_same_piece(perf_model, perf_tok):
    sampling = SamplingConfig(seed=123, max_tokens=300, top_p=0.95, stop_at_eos=False)
    a = generate(perf_model, perf_tok, SEG, sampling=sampling, progress=False)
    b = generate(perf_model, perf_tok, SEG, sampling=sampling, progress=False)
    c = generate(perf_model, perf_tok, SEG, sampling=SamplingConfig(seed=124, max_tokens=300, stop_at_eos=False),
                 progress=False)
    assert a.new_tokens == 300 and a.stop_reason == "max_tokens" and a.seed == 123
    assert np.array_equal(a.ids, b.ids)
    assert not np.array_equal(a.ids, c.ids)
    assert not np.isin(a.ids, [perf_tok.pad_id, perf_tok.bos_id, perf_tok.eos_id]).any()
    assert a.state_bytes == 2 * (16 + SEG + 4 + SEG) * 32 * 4
    assert a.music_seconds == pytest.approx(perf_tok.seconds(a.ids))


def test_prompt_is_kept_and_continued(perf_model, perf_tok, tmp_path):
    midi = write_midi_file(tmp_path / "prompt.mid", PROMPT_NOTES)
    prompt = load_prompt(midi, perf_tok)
    result = generate(perf_model, perf_tok, SEG, prompt, SamplingConfig(seed=1, max_tokens=200, stop_at_eos=False),
                      progress=False)
    assert result.prompt_tokens == len(prompt) and result.new_tokens == 200
    assert np.array_equal(result.ids[:len(prompt)], prompt)
    assert result.prompt_seconds == pytest.approx(3.6)
    out = tmp_path / "out.mid"
    perf_tok.decode_to_file(result.ids, out)
    from dsmr.data.midi import load_midi

    notes = score_notes(load_midi(out))
    for start, end, pitch, _ in PROMPT_NOTES:  # every prompt note is in the output, same time and pitch
        assert any(abs(s - start) < 0.011 and abs(e - end) < 0.011 and p == pitch for s, e, p, _ in notes)


def test_prompt_first_seconds(perf_tok, tmp_path):
    midi = write_midi_file(tmp_path / "prompt.mid", PROMPT_NOTES)
    cropped = crop_seconds(make_score(PROMPT_NOTES), 1.75)
    notes = score_notes(cropped)
    assert [(round(s, 3), round(e, 3), p) for s, e, p, _ in notes] == [
        (0.0, 0.5, 60), (0.5, 1.0, 64), (1.0, 1.75, 67), (1.5, 1.75, 72)]  # sounding notes end at the cut
    ids = load_prompt(midi, perf_tok, seconds=1.75)
    assert perf_tok.seconds(ids) == pytest.approx(1.75)
    with pytest.raises(DsmrError, match="no notes"):
        load_prompt(write_midi_file(tmp_path / "late.mid", [(5.0, 6.0, 60, 80)]), perf_tok, seconds=2.0)


def test_stops_at_eos_and_at_max_seconds(perf_model, perf_tok):
    only_eos = tuple(i for i in range(perf_tok.vocab_size) if i != perf_tok.eos_id)
    result = generate(perf_model, perf_tok, SEG, sampling=SamplingConfig(seed=0, banned_ids=only_eos),
                      progress=False)
    assert result.stop_reason == "eos" and result.new_tokens == 0 and result.ids.size == 0
    result = generate(perf_model, perf_tok, SEG, progress=False,
                      sampling=SamplingConfig(seed=0, max_tokens=None, max_seconds=4.0, stop_at_eos=False))
    assert result.stop_reason == "max_seconds"
    assert result.music_seconds >= 4.0 > perf_tok.seconds(result.ids[:-1])


def test_vocabulary_mismatch_is_refused(perf_tok):
    with pytest.raises(DsmrError, match="vocabulary"):
        generate(tiny_model(vocab=50), perf_tok, SEG, sampling=SamplingConfig(max_tokens=5), progress=False)


# ------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, perf_model, perf_tok):
    path = tmp_path_factory.mktemp("run")
    config = {"model": perf_model.cfg.to_dict(), "tokenizer": perf_tok.config(),
              "tokenizer_hash": perf_tok.config_hash(), "segment_len": SEG}
    save_checkpoint(path, perf_model, config)
    return path


def test_cli_generates_midi_pianoroll_and_json(run_dir, tmp_path, capsys):
    midi = write_midi_file(tmp_path / "prompt.mid", PROMPT_NOTES)
    out, png = tmp_path / "out.mid", tmp_path / "roll.png"
    code = main(["generate", str(run_dir), "--out", str(out), "--prompt", str(midi), "--prompt-seconds", "2",
                 "--max-tokens", "150", "--seed", "3", "--ignore-eos", "--min-pitch", "48", "--max-pitch", "84",
                 "--pianoroll", str(png), "--json", "--no-progress"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("tokens", "music_seconds", "wall_seconds", "tokens_per_s", "realtime_factor", "state_bytes",
                "peak_memory_bytes", "out", "pianoroll"):
        assert key in report
    assert report["tokens"] == 150 and report["out"] == str(out) and report["prompt_seconds"] == 2.0
    assert png.stat().st_size > 1000
    from dsmr.data.midi import load_midi

    pitches = {p for _, _, p, _ in score_notes(load_midi(out))}
    assert pitches and min(pitches) >= 48 and max(pitches) <= 84
    # the same seed from the command line gives the same file
    again = tmp_path / "again.mid"
    assert main(["generate", str(run_dir), "--out", str(again), "--prompt", str(midi), "--prompt-seconds", "2",
                 "--max-tokens", "150", "--seed", "3", "--ignore-eos", "--min-pitch", "48", "--max-pitch", "84",
                 "--no-progress"]) == 0
    assert again.read_bytes() == out.read_bytes()
    assert "wrote" in capsys.readouterr().out


def test_cli_plays_with_the_models_own_temperature_unless_told(run_dir, tmp_path, capsys):
    from dsmr.generation import defaults
    own = tmp_path / "own"
    shutil.copytree(run_dir, own)
    config = json.loads((own / "config.json").read_text())
    (own / "config.json").write_text(json.dumps(dict(config, playing={"temperature": 1.25, "top_p": 0.9})))
    base = ["--out", str(tmp_path / "x.mid"), "--max-tokens", "20", "--seed", "1", "--json", "--no-progress"]
    for folder, extra, expected in [(run_dir, [], (defaults.TEMPERATURE, defaults.TOP_P)), (own, [], (1.25, 0.9)),
                                    (own, ["--temperature", "0.7"], (0.7, 0.9))]:
        assert main(["generate", str(folder), *base, *extra]) == 0
        report = json.loads(capsys.readouterr().out)
        assert (report["temperature"], report["top_p"]) == expected, (folder, extra)


@pytest.mark.parametrize("precision", ["float16", "int8", "auto"])
def test_cli_precisions_run_the_fused_step_where_the_kernels_are(run_dir, tmp_path, capsys, precision,
                                                                 kernels_built):
    out = tmp_path / f"{precision}.mid"
    assert main(["generate", str(run_dir), "--out", str(out), "--max-tokens", "40", "--seed", "1", "--ignore-eos",
                 "--precision", precision, "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    # kernels_built: True wherever they can be built (else the fixture fails the test)
    expected = precision if precision != "auto" else "int8" if kernels_built else "float16"  # on a CPU
    assert report["precision"] == expected and report["tokens"] == 40 and out.stat().st_size > 0
    assert report["decoding_step"] == ("fused" if kernels_built else "eager")


def _one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("dsmr generate: error:")
    return err


def test_cli_bad_prompts(run_dir, tmp_path, capsys):
    out = str(tmp_path / "out.mid")
    text = tmp_path / "notes.mid"
    text.write_text("this is not MIDI")
    assert "not a readable MIDI file" in _one_line_error(capsys, ["generate", str(run_dir), "--out", out,
                                                                  "--prompt", str(text)])
    empty = tmp_path / "empty.mid"
    empty.write_bytes(b"")
    assert "empty file" in _one_line_error(capsys, ["generate", str(run_dir), "--out", out, "--prompt", str(empty)])
    silent = tmp_path / "silent.mid"
    make_score([]).dump_midi(silent)
    assert "no notes" in _one_line_error(capsys, ["generate", str(run_dir), "--out", out, "--prompt", str(silent)])
    assert "not found" in _one_line_error(capsys, ["generate", str(run_dir), "--out", out,
                                                   "--prompt", str(tmp_path / "missing.mid")])
    assert "--prompt-seconds needs --prompt" in _one_line_error(
        capsys, ["generate", str(run_dir), "--out", out, "--prompt-seconds", "3"])
    assert not (tmp_path / "out.mid").exists()


def test_cli_bad_checkpoints(run_dir, tmp_path, capsys, perf_model):
    out = str(tmp_path / "out.mid")
    assert "not found" in _one_line_error(capsys, ["generate", str(tmp_path / "nope"), "--out", out])
    # a checkpoint whose config describes another tokenizer (another vocabulary)
    other = make_tokenizer("performance", min_pitch=21, max_pitch=108)
    config = json.loads((run_dir / "config.json").read_text())
    foreign = tmp_path / "foreign"
    save_checkpoint(foreign, perf_model, {**config, "tokenizer": other.config(), "tokenizer_hash": other.config_hash()})
    assert "vocab" in _one_line_error(capsys, ["generate", str(foreign), "--out", out])
    # same vocabulary size, but not the tokenizer the model was trained with
    edited = tmp_path / "edited"
    save_checkpoint(edited, perf_model, {**config, "tokenizer": {**config["tokenizer"], "sustain": False}})
    assert "not the one the model was trained with" in _one_line_error(capsys, ["generate", str(edited), "--out", out])


def test_cli_missing_fluidsynth(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    err = _one_line_error(capsys, ["generate", str(run_dir), "--out", str(tmp_path / "o.mid"),
                                   "--wav", str(tmp_path / "o.wav")])
    assert "apt-get install fluidsynth fluid-soundfont-gm" in err
    assert not (tmp_path / "o.mid").exists()  # refused before generating


def test_cli_error_in_a_real_process(run_dir, tmp_path):
    text = tmp_path / "notes.mid"
    text.write_text("this is not MIDI")
    proc = subprocess.run([sys.executable, "-m", "dsmr", "generate", str(run_dir), "--out", str(tmp_path / "o.mid"),
                           "--prompt", str(text)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "not a readable MIDI file" in proc.stderr
