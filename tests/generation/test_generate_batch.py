"""Batched sampling (lanes of one decoder), the static-shape / compiled decoding step, and
`dsmr generate --num-samples`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from dsmr.training.resume import save_checkpoint
from dsmr.cli import main
from dsmr.errors import DsmrError
from dsmr.generation import (IncrementalDecoder, SamplingConfig, batch_summary, decoding_state_dtype, generate,
                           generate_batch, half_weight_model)
from dsmr.model import DSMR, DSMRConfig
from dsmr.data.tokenizers.performance import PerformanceTokenizer
from tests.generation.test_generate import SEG, perf_model, perf_tok, streaming_logits, tiny_model  # noqa: F401 (fixtures)


@pytest.fixture(autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_lanes_are_independent_samples_of_one_prompt(perf_model, perf_tok):
    prompt = np.arange(3, 40)
    sampling = SamplingConfig(seed=11, max_tokens=None, max_seconds=6.0, stop_at_eos=False, top_p=0.95)
    batch = generate_batch(perf_model, perf_tok, SEG, prompt, sampling, num_samples=3, progress=False)
    assert [r.seed for r in batch] == [11, 12, 13] and [r.sample_index for r in batch] == [0, 1, 2]
    assert all(r.stop_reason == "max_seconds" and r.music_seconds >= 6.0 for r in batch)
    assert len({r.new_tokens for r in batch}) > 1  # each lane stops at its own end
    for r in batch:
        assert np.array_equal(r.ids[:len(prompt)], prompt)
        assert r.music_seconds == pytest.approx(perf_tok.seconds(r.ids))
        assert perf_tok.seconds(r.ids[:-1]) < 6.0  # nothing after its own limit
    # lane i is the piece that seed 11 + i writes alone (float32 weights)
    for r in batch:
        alone = generate(perf_model, perf_tok, SEG, prompt, SamplingConfig(**{**sampling.__dict__, "seed": r.seed}),
                         progress=False)
        assert np.array_equal(alone.ids, r.ids)
    again = generate_batch(perf_model, perf_tok, SEG, prompt, sampling, num_samples=3, progress=False)
    assert all(np.array_equal(a.ids, b.ids) for a, b in zip(batch, again))
    summary = batch_summary(batch)
    assert summary["tokens"] == sum(r.new_tokens for r in batch) and summary["seeds"] == [11, 12, 13]
    assert summary["state_bytes"] == batch[0].state_bytes == 3 * 2 * (16 + SEG + 4 + SEG) * 32 * 4
    with pytest.raises(DsmrError, match="num_samples"):
        generate_batch(perf_model, perf_tok, SEG, prompt, sampling, num_samples=0, progress=False)


def test_load_lane_copies_one_lane_into_all():
    model = tiny_model(gate="soft", per_head=True)
    ids = torch.randint(3, 50, (1, 27), generator=torch.Generator().manual_seed(4))
    one = IncrementalDecoder(model, SEG)
    one.feed(ids[:, :20])
    lanes = IncrementalDecoder(model, SEG, batch_size=3)
    lanes.load_lane(one)
    assert lanes.position == 20 and lanes.filled() == one.filled()
    expected = streaming_logits(model, ids, SEG)
    for i in range(20, 27):
        out = lanes.step(ids[:, i].expand(3))
        torch.testing.assert_close(out, expected[:, i].expand(3, -1), rtol=0, atol=2e-5)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="no C++ compiler")
def test_compiled_step_gives_the_same_logits():
    """One graph for every step (fill counts are tensors), across segment boundaries and a gate."""
    model = tiny_model(gate="soft", per_head=True)
    for block in model.blocks:
        block.attn.gate_logit.data.uniform_(-2.0, 2.0)
    ids = torch.randint(3, 50, (2, 30), generator=torch.Generator().manual_seed(1))
    expected = streaming_logits(model, ids, SEG)
    decoder = IncrementalDecoder(model, SEG, batch_size=2, compile=True)
    assert decoder.warm_up() > 0 and decoder.position == 0
    decoder.feed(ids[:, :5])
    stepped = torch.stack([decoder.step(ids[:, i]) for i in range(5, 30)], dim=1)
    torch.testing.assert_close(stepped, expected[:, 5:], rtol=0, atol=2e-5)
    # the float16 state of a compiled float16-weight model: widened inside the kernels, same logits to fp16
    half = IncrementalDecoder(model, SEG, batch_size=2, compile=True, state_dtype=torch.float16)
    half.feed(ids[:, :5])
    stepped = torch.stack([half.step(ids[:, i]) for i in range(5, 30)], dim=1)
    torch.testing.assert_close(stepped, expected[:, 5:], rtol=0, atol=2e-3)


def test_float16_state_halves_the_bytes_and_keeps_the_logits():
    model = tiny_model(gate="soft", per_head=True)
    ids = torch.randint(3, 50, (2, 30), generator=torch.Generator().manual_seed(2))
    expected = streaming_logits(model, ids, SEG)
    full = IncrementalDecoder(model, SEG, batch_size=2)
    half = IncrementalDecoder(model, SEG, batch_size=2, state_dtype=torch.float16)
    assert half.keys[0].dtype == half.values[-1].dtype == torch.float16
    assert 2 * half.state_bytes() == full.state_bytes()
    prompt = half.feed(ids[:, :5])
    stepped = torch.stack([half.step(ids[:, i]) for i in range(5, 30)], dim=1)
    torch.testing.assert_close(prompt, expected[:, :5], rtol=0, atol=2e-3)
    torch.testing.assert_close(stepped, expected[:, 5:], rtol=0, atol=2e-3)
    assert (stepped - expected[:, 5:]).abs().max() > 0  # it did round: the state is float16
    # generate_batch's choice: float16 for float16 weights where a kernel widens the state (compiled, or
    # dsmr.backends.cpu.kernels' attention); an eager PyTorch step would widen all of it every step
    half_model = half_weight_model(model)
    assert decoding_state_dtype(half_model, compile=True) == torch.float16
    assert decoding_state_dtype(model, compile=True) is None
    from dsmr.backends.cpu import kernels
    old = kernels.set_enabled(False)
    try:
        assert decoding_state_dtype(half_model, compile=False) is None
    finally:
        kernels.set_enabled(old)


def test_float16_state_saturates_instead_of_overflowing():
    """Keys/values beyond float16's range are clamped into it when stored: logits stay finite (stored as inf,
    a value would turn its attention row into NaN)."""
    model = tiny_model()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv_proj.weight[2 * model.cfg.attn_dim:] *= 1e6  # the value rows: values ~1e5
    ids = torch.randint(3, 50, (1, 20), generator=torch.Generator().manual_seed(3))
    decoder = IncrementalDecoder(model, SEG, state_dtype=torch.float16)
    prompt = decoder.feed(ids[:, :6])
    stepped = torch.stack([decoder.step(ids[:, i]) for i in range(6, 20)], dim=1)
    assert decoder.values[0].abs().max() == 65504  # saturated, not inf
    assert torch.isfinite(prompt).all() and torch.isfinite(stepped).all()


def test_generate_batch_uses_the_float16_state_when_compiled(perf_model, perf_tok, monkeypatch, kernels_off):
    """compile=True with float16 weights: lanes get a float16 state, the prompt fed once in the same dtype
    (the step itself runs eager here: compiling is tested above; without dsmr.backends.cpu.kernels, so that the eager
    run keeps a float32 state to compare with)."""
    import dsmr.generation.decoder as decoder

    monkeypatch.setattr(decoder, "_compiled_step", lambda: decoder._decode_step)
    half = half_weight_model(perf_model)
    sampling = SamplingConfig(seed=3, max_tokens=20, stop_at_eos=False)
    prompt = np.arange(3, 300)  # past the first segment
    batch = generate_batch(half, perf_tok, SEG, prompt, sampling, num_samples=2, progress=False, compile=True)
    eager = generate_batch(half, perf_tok, SEG, prompt, sampling, num_samples=2, progress=False, compile=False)
    assert 2 * batch[0].state_bytes == eager[0].state_bytes
    assert all(r.new_tokens == 20 for r in batch)
    alone = generate_batch(half, perf_tok, SEG, prompt, sampling, num_samples=1, progress=False, compile=True)
    assert np.array_equal(alone[0].ids, batch[0].ids)  # lane 0 = the same seed fed alone, same state rounding


def test_cli_num_samples(perf_model, perf_tok, tmp_path, capsys):
    run = tmp_path / "run"
    save_checkpoint(run, perf_model, {"model": perf_model.cfg.to_dict(), "tokenizer": perf_tok.config(),
                                      "tokenizer_hash": perf_tok.config_hash(), "segment_len": SEG})
    out = tmp_path / "piece.mid"
    assert main(["generate", str(run), "--out", str(out), "--num-samples", "2", "--max-tokens", "40",
                 "--seed", "5", "--ignore-eos", "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_samples"] == 2 and report["seeds"] == [5, 6] and report["tokens"] == 80
    assert [s["out"] for s in report["samples"]] == [str(tmp_path / "piece-1.mid"), str(tmp_path / "piece-2.mid")]
    assert all((tmp_path / f"piece-{i}.mid").stat().st_size > 0 for i in (1, 2)) and not out.exists()
    assert main(["generate", str(run), "--out", str(out), "--num-samples", "0"]) == 2


def test_ctrl_c_while_sampling_keeps_what_was_generated(monkeypatch):
    """A KeyboardInterrupt during sampling ends every lane as "interrupted" with its events so far."""
    import dsmr.generation as gen
    import dsmr.generation.loop as loop

    torch.manual_seed(0)
    model = DSMR(DSMRConfig(vocab_size=PerformanceTokenizer().vocab_size, n_layers=1, d_model=16, n_heads=2,
                            horizons=(8,))).eval()
    real, calls = gen.sample_next, {"n": 0}

    def sample_then_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "sample_next", sample_then_interrupt)
    results = gen.generate_batch(model, PerformanceTokenizer(), 4, [60, 100], gen.SamplingConfig(seed=0, max_tokens=50,
                                 stop_at_eos=False), num_samples=2, progress=False)
    assert [r.stop_reason for r in results] == ["interrupted", "interrupted"]
    assert [r.new_tokens for r in results] == [5, 5] and all(len(r.ids) == 7 for r in results)


def test_the_model_brings_its_tokenizer_and_the_older_signature_still_works(perf_model, perf_tok):
    """generate_batch(model, prompt, sampling): the tokenizer and segment length are the model's own (as
    dsmr.load_model gives them); the older (model, tokenizer, segment_len, ...) gives the same pieces, with a
    DeprecationWarning; a model without them is refused with a message that says what to give."""
    import copy

    sampling = SamplingConfig(seed=3, max_tokens=40, stop_at_eos=False)
    with pytest.raises(DsmrError, match="give tokenizer= and segment_len="):
        generate_batch(perf_model, [60], sampling, progress=False)
    owned = copy.deepcopy(perf_model)
    owned.tokenizer, owned.segment_len = perf_tok, SEG
    new = generate_batch(owned, [perf_tok.note_on_id(60)], sampling, num_samples=2, progress=False)
    with pytest.warns(DeprecationWarning, match="the model brings both"):
        old = generate_batch(perf_model, perf_tok, SEG, [perf_tok.note_on_id(60)], sampling, num_samples=2,
                             progress=False)
    given = generate_batch(perf_model, [perf_tok.note_on_id(60)], sampling, num_samples=2, progress=False,
                           tokenizer=perf_tok, segment_len=SEG)
    assert [r.ids.tolist() for r in new] == [r.ids.tolist() for r in old] == [r.ids.tolist() for r in given]
    with pytest.raises(TypeError, match="multiple values for argument 'sampling'"):
        generate_batch(owned, [60], sampling, sampling=sampling)
