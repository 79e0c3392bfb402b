"""Full-piece evaluation, memory meters, and the `dsmr train` / `dsmr eval` command lines."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsmr.cli import main
from dsmr.evaluation.perplexity import evaluate
from dsmr.core.runtime import PeakMemory
from dsmr.model import DSMR, DSMRConfig


PAD, BOS, EOS = 0, 1, 2
REQUIRED = {"ppl", "nll", "tokens", "pieces", "tokens_per_s", "peak_memory_bytes", "state_bytes"}


def random_pieces(lengths, vocab=40, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).astype(np.uint16) for n in lengths]


def full_forward_nll(model, piece) -> torch.Tensor:
    """Per-target NLL of one causal forward over the whole piece (no segmentation)."""
    seq = torch.tensor([BOS, *piece.tolist(), EOS])
    ids, targets = seq[:-1][None], seq[1:]
    logits, _ = model(ids, torch.arange(len(ids[0]))[None])
    return F.cross_entropy(logits[0], targets, reduction="none")


@torch.no_grad()
def test_streamed_evaluation_equals_one_full_forward_and_buckets_add_up():
    torch.manual_seed(0)
    pieces = random_pieces([20, 7, 45, 0, 33])
    model = DSMR(DSMRConfig(vocab_size=40, n_layers=2, d_model=32, n_heads=2, horizons=(64, 64), memory="kv", tie_embeddings=True,
                            init_std=0.02)).eval()
    result = evaluate(model, pieces, batch_size=2, segment_len=8, buckets=(0, 8, 32), pad_id=PAD, bos_id=BOS,
                      eos_id=EOS)
    per_token = torch.cat([full_forward_nll(model, p) for p in pieces])
    assert result["tokens"] == sum(len(p) + 1 for p in pieces) == len(per_token)
    assert result["pieces"] == 5
    assert result["nll"] == pytest.approx(float(per_token.double().mean()), rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(result["nll"]))
    positions = torch.cat([torch.arange(len(p) + 1) for p in pieces])
    for bucket, (lo, hi) in zip(result["nll_by_position"], [(0, 8), (8, 32), (32, None)]):
        inside = (positions >= lo) & (positions < (hi if hi is not None else 10**9))
        assert (bucket["start"], bucket["end"], bucket["tokens"]) == (lo, hi, int(inside.sum()))
        assert bucket["nll"] == pytest.approx(float(per_token[inside].double().mean()), rel=1e-5)
    assert result["state_bytes"] == 2 * 128 * 32 * 4 and result["state_bytes_batch"] == 2 * result["state_bytes"]
    assert result["tokens_per_s"] > 0 and result["peak_memory_bytes"] >= 0 and result["memory_method"]


@torch.no_grad()
def test_finite_horizon_evaluation_differs_from_full_context():
    torch.manual_seed(1)
    pieces = random_pieces([60, 50])
    cfg = dict(vocab_size=40, n_layers=2, d_model=32, n_heads=2, tie_embeddings=True, init_std=0.02)
    full = DSMR(DSMRConfig(**cfg, horizons=(64, 64))).eval()
    none = DSMR(DSMRConfig(**cfg, horizons=(0, 0))).eval()
    none.load_state_dict(full.state_dict())
    a = evaluate(full, pieces, 2, 8)
    b = evaluate(none, pieces, 2, 8)
    assert a["tokens"] == b["tokens"] and a["nll"] != pytest.approx(b["nll"], rel=1e-6)
    assert b["state_bytes"] == 0


def test_peak_memory_meters_nest():
    with PeakMemory("cpu") as outer:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        del block
        with PeakMemory("cpu") as inner:  # resets the process peak counter
            pass
    if outer.method != "cpu_rss_high_water_mark_rise":
        pytest.skip("no resettable peak-RSS counter here (not Linux): the sampled meter may miss a short spike")
    assert outer.peak_bytes >= 60 * 2**20, outer.peak_bytes
    assert inner.peak_bytes < outer.peak_bytes


def test_runtime_helpers_keep_their_old_import_path():
    import dsmr.evaluation.perplexity as ev
    import dsmr.core.runtime as rt

    assert (ev.PeakMemory, ev.resolve_device, ev.autocast, ev.state_bytes) == \
        (rt.PeakMemory, rt.resolve_device, rt.autocast, rt.state_bytes)


def test_shared_loss_helpers():
    from dsmr.model.losses import ppl_by_bucket, token_nll
    from dsmr.data.stream import IGNORE_INDEX

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 2, IGNORE_INDEX], [0, IGNORE_INDEX, 4]])
    keep = targets != IGNORE_INDEX
    expected = F.cross_entropy(logits[keep], targets[keep], reduction="sum")
    assert torch.allclose(token_nll(logits, targets), expected)
    assert token_nll(logits, targets, "none").shape == (6,)
    nll, buckets = ppl_by_bucket([3.0, 0.0, 2.0], [2.0, 0.0, 1.0], [0, 10, 20])
    assert nll == pytest.approx(5.0 / 3)
    assert [(b["start"], b["end"], b["tokens"]) for b in buckets] == [(0, 10, 2), (10, 20, 0), (20, None, 1)]
    assert buckets[0]["ppl"] == pytest.approx(math.exp(1.5)) and buckets[1]["nll"] is None


TINY = ["--layers", "2", "--d-model", "32", "--heads", "2", "--segment", "32", "--batch-size", "3",
        "--budget", "96", "--long-layers", "1", "--short", "32", "--lr", "3e-3", "--val-pieces", "2",
        "--no-progress", "--no-tensorboard"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_and_eval_commands_print_json(bach_cache, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--cache", str(bach_cache.path), "--out", str(run), "--steps", "4",
                             "--eval-every", "2", "--json", *TINY)
    assert code == 0, err
    trained = json.loads(out)
    assert REQUIRED | {"steps"} <= trained.keys() and trained["steps"] == 4
    # dsmr train's default kv memory keeps keys and values: 2 x heads x head_dim = 2 x 32 per position
    assert trained["pieces"] == 2 and trained["state_bytes"] == 96 * 2 * 32 * 4

    code, out, err = run_cli(capsys, "eval", str(run), "--cache", str(bach_cache.path), "--split", "validation",
                             "--weights", "latest", "--json", "--no-progress", "--max-pieces", "2")
    assert code == 0, err
    evaluated = json.loads(out)
    assert REQUIRED <= evaluated.keys()
    assert evaluated["tokens"] == sum(len(p) + 1 for p in bach_cache.pieces("validation")[:2])
    assert evaluated["nll"] == pytest.approx(trained["nll"], rel=1e-6)  # same weights, same streaming
    # per note: the split's total NLL over its notes (one NOTE_ON each in the performance encoding)
    tok = bach_cache.tokenizer
    notes = sum(int(((p >= tok.note_on_base) & (p < tok.note_off_base)).sum())
                for p in bach_cache.pieces("validation")[:2])
    assert evaluated["notes"] == notes > 0
    assert evaluated["nll_per_note"] == pytest.approx(evaluated["nll"] * evaluated["tokens"] / notes, rel=1e-12)

    code, out, err = run_cli(capsys, "eval", str(run / "best.safetensors"), "--cache", str(bach_cache.path),
                             "--split", "test", "--no-progress")
    assert code == 0 and "ppl" in out and "NLL by position" in out

    # the weights rounded as `dsmr generate --precision` decodes with: float16 all but exact, int8 close
    for precision, tolerance in (("float16", 1e-3), ("int8", 3e-2)):
        code, out, err = run_cli(capsys, "eval", str(run), "--cache", str(bach_cache.path), "--split", "validation",
                                 "--weights", "latest", "--json", "--no-progress", "--max-pieces", "2",
                                 "--precision", precision)
        assert code == 0, err
        rounded = json.loads(out)
        assert rounded["precision"] == precision and rounded["tokens"] == evaluated["tokens"]
        assert rounded["nll"] == pytest.approx(evaluated["nll"], rel=tolerance)
        assert rounded["nll"] != evaluated["nll"]  # the weights were rounded

    # resume with more steps continues; with another width it is refused in one line
    code, out, err = run_cli(capsys, "train", "--cache", str(bach_cache.path), "--out", str(run), "--resume",
                             "--steps", "6", "--json", "--no-progress")
    assert code == 0, err
    assert json.loads(out)["steps"] == 6
    code, out, err = run_cli(capsys, "train", "--cache", str(bach_cache.path), "--out", str(run), "--resume",
                             "--d-model", "64", "--no-progress")
    assert code == 2 and err.count("\n") == 1 and "d_model: run 32, now 64" in err


def test_eval_errors_are_one_line(bach_cache, tmp_path, capsys, request):
    from dsmr.data.cache_build import build_cache
    from dsmr.data.corpora import corpus_files
    from dsmr.data.tokenizers.performance import PerformanceTokenizer

    run = tmp_path / "run"
    assert run_cli(capsys, "train", "--cache", str(bach_cache.path), "--out", str(run), "--steps", "1", *TINY)[0] == 0

    code, _, err = run_cli(capsys, "eval", str(run), "--cache", str(tmp_path / "missing"), "--split", "test")
    assert code == 2 and err.startswith("dsmr eval: error: no token cache") and err.count("\n") == 1
    code, _, err = run_cli(capsys, "eval", str(run), "--cache", str(bach_cache.path), "--split", "dev")
    assert code == 2 and "no split 'dev'" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "eval", str(tmp_path / "nothing"), "--cache", str(bach_cache.path))
    assert code == 2 and "checkpoint not found" in err

    files, _ = corpus_files("bach", request.config.cache.mkdir("dsmr-bach-midi"), limit=6, progress=False)
    other = build_cache(files, tmp_path / "other", PerformanceTokenizer(velocity_bins=16), workers=1,
                        progress=False, source={"corpus": "bach"})
    code, _, err = run_cli(capsys, "eval", str(run), "--cache", str(other.cache), "--split", "train")
    assert code == 2 and "trained with performance (vocab 391" in err and err.count("\n") == 1

    code, _, err = run_cli(capsys, "train", "--cache", str(tmp_path / "missing"), "--out", str(tmp_path / "r2"))
    assert code == 2 and "no token cache" in err


def test_the_report_says_per_note_and_never_prints_a_peak_of_zero():
    from dsmr.evaluation.perplexity import format_report

    result = {"ppl": 10.0, "nll": math.log(10.0), "tokens": 4000, "pieces": 3, "tokens_per_s": 1000.0,
              "device": "cpu", "peak_memory_bytes": 0, "memory_method": "cpu_rss_high_water_mark_rise",
              "state_bytes": 2**20, "nll_by_position": [], "notes": 1000, "nll_per_note": 9.21}
    text = format_report(result)
    assert "per note: 9.2100 nats (1000 notes, 4.00 tokens per note)" in text
    assert "0.0 MiB" not in text and "peak memory: no more than the process already held" in text
    assert "peak memory: 3.0 MiB" in format_report({**result, "peak_memory_bytes": 3 * 2**20})
