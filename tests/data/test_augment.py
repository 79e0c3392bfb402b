"""Training-data augmentation: transposed / stretched / louder pieces decode to the expected notes in every
encoding, never leave the pitch range, keep the epoch's hand-out, and an augmented run resumes exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dsmr.data.augment import Augmentation, PieceAugmenter, changed_score, draw_transposition, piece_rng
from dsmr.data.tokenizers.duration import DurationTokenizer
from dsmr.data.tokenizers.registry import make_tokenizer
from dsmr.errors import DsmrError
from dsmr.data.stream import PieceStream
from dsmr.data.tokenizers.performance import PerformanceTokenizer
from dsmr.training.trainer import train
from tests.midi_factory import make_score
from tests.training.test_train import RESUME_CFG, assert_same_run, interrupt_at, tiny

NOTES = [(0.0, 0.5, 60, 80), (0.5, 1.0, 64, 64), (0.5, 2.0, 67, 100), (2.0, 2.25, 72, 40)]


def notes_of(tokenizer, ids):
    n = tokenizer.decode(ids).tracks[0].notes.numpy()
    return sorted(zip(np.round(n["time"].astype(float), 3).tolist(), np.round(n["duration"].astype(float), 3).tolist(),
                      n["pitch"].tolist(), n["velocity"].tolist()))


@pytest.mark.parametrize("tokenizer", [PerformanceTokenizer(), DurationTokenizer()], ids=["performance", "duration"])
def test_changed_piece_decodes_to_the_expected_notes(tokenizer):
    ids = tokenizer.encode(make_score(NOTES))
    before = notes_of(tokenizer, ids)
    after = notes_of(tokenizer, tokenizer.encode(changed_score(tokenizer.decode(ids), 3, 1.2, 4)))
    # onsets and lengths x1.2 on the 10 ms grid, 3 semitones up, one velocity bin (4 MIDI steps) louder
    expected = [(round(t * 1.2, 2), round(d * 1.2, 2), p + 3, v + 4) for t, d, p, v in before]
    assert after == expected


def test_miditok_encoding_takes_the_same_changes():
    tokenizer = make_tokenizer("remi")
    ids = tokenizer.encode(make_score(NOTES))
    changed = tokenizer.encode(changed_score(tokenizer.decode(ids), -2, 1.0, 0))
    before, after = tokenizer.decode(ids), tokenizer.decode(changed)
    assert (after.tracks[0].notes.numpy()["pitch"] == before.tracks[0].notes.numpy()["pitch"] - 2).all()
    out = Augmentation(5, 0.1, 4).apply(tokenizer, ids, piece_rng(0, 0, 0))
    assert out.size and out.min() >= 0 and out.max() < tokenizer.vocab_size


def test_transposition_stays_in_the_encodings_and_the_pianos_range():
    rng = np.random.default_rng(0)
    # a piece that reaches the top of the piano can only go down; one at the encoding's top edge likewise
    assert all(-5 <= draw_transposition(60, 108, 5, (0, 127), rng) <= 0 for _ in range(200))
    assert all(-5 <= draw_transposition(30, 127, 5, (0, 127), rng) <= 0 for _ in range(200))
    assert all(0 <= draw_transposition(21, 70, 5, (21, 108), rng) <= 5 for _ in range(200))
    # a piece wider than the piano keeps what it has, inside the encoding's range
    assert all(draw_transposition(0, 127, 5, (0, 127), rng) == 0 for _ in range(20))
    shifts = {draw_transposition(50, 70, 3, (0, 127), rng) for _ in range(300)}
    assert shifts == set(range(-3, 4))


def test_augmentation_never_leaves_the_range_of_a_narrow_encoding():
    tokenizer = PerformanceTokenizer(min_pitch=55, max_pitch=75)
    ids = tokenizer.encode(make_score(NOTES))  # 60..72
    for piece in range(50):
        out = Augmentation(transpose=6).apply(tokenizer, ids, piece_rng(1, 0, piece))
        pitches = [p for _, _, p, _ in notes_of(tokenizer, out)]
        assert len(pitches) == len(NOTES) and 55 <= min(pitches) and max(pitches) <= 75


def test_same_seed_epoch_and_piece_give_the_same_piece():
    tokenizer = PerformanceTokenizer()
    ids = tokenizer.encode(make_score(NOTES))
    aug = Augmentation(5, 0.2, 4)
    a, b = aug.apply(tokenizer, ids, piece_rng(3, 1, 7)), aug.apply(tokenizer, ids, piece_rng(3, 1, 7))
    assert np.array_equal(a, b)
    others = {tuple(aug.apply(tokenizer, ids, piece_rng(3, e, 7)).tolist()) for e in range(8)}
    assert len(others) > 4  # other epochs draw other changes
    assert Augmentation().apply(tokenizer, ids, piece_rng(0, 0, 0)) is ids  # off: the cached ids


def test_an_augmented_stream_hands_out_every_piece_once_per_epoch_in_the_same_order(bach_cache):
    pieces = bach_cache.pieces("train")
    tok = bach_cache.tokenizer
    augment = PieceAugmenter(Augmentation(5, 0.1, 4), tok)
    plain = PieceStream(pieces, 4, 64, tok.bos_id, tok.eos_id, tok.pad_id, seed=2, refill=True)
    augmented = PieceStream(pieces, 4, 64, tok.bos_id, tok.eos_id, tok.pad_id, seed=2, refill=True, augment=augment)
    order = list(plain._order(0))
    seen = []
    while augmented.epoch == 0:
        before = augmented._next
        augmented._next_batch()
        seen += order[before:augmented._next] if augmented.epoch == 0 else order[before:]
    assert sorted(seen) == list(range(len(pieces)))  # every piece once, in the epoch's order
    assert seen == order
    # what the lanes read is the augmented piece (its length differs from the cached one's for some)
    reading = [(ids, p, e) for ids, p, e in zip(augmented._lane_ids, augmented._lane_piece, augmented._lane_epoch)
               if p >= 0]
    assert all(np.array_equal(ids, augment(pieces[p], 2, int(e), int(p))) for ids, p, e in reading)
    assert any(not np.array_equal(ids, pieces[p]) for ids, p, _ in reading)


def test_a_resumed_stream_rebuilds_what_its_lanes_were_reading(bach_cache):
    pieces = bach_cache.pieces("train")
    tok = bach_cache.tokenizer
    make = lambda: PieceStream(pieces, 3, 32, tok.bos_id, tok.eos_id, tok.pad_id, seed=1, refill=True,
                               augment=PieceAugmenter(Augmentation(4, 0.05, 4), tok))
    a = make()
    for _ in range(57):
        a._next_batch()
    b = make()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(40):
        x, y = a._next_batch(), b._next_batch()
        assert torch.equal(x.ids, y.ids) and torch.equal(x.targets, y.targets) and torch.equal(x.reset, y.reset)
    plain = PieceStream(pieces, 3, 32, tok.bos_id, tok.eos_id, tok.pad_id, seed=1, refill=True)
    with pytest.raises(DsmrError, match="augment"):
        plain.load_state_dict(a.state_dict())


AUGMENTED = dict(RESUME_CFG, transpose=5, stretch=0.1, velocity_shift=4)


def test_an_augmented_run_resumes_exactly_and_differs_from_a_plain_one(bach_cache, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    train(tiny(**AUGMENTED), bach_cache, whole, progress=False)

    def ctrl_c():
        raise KeyboardInterrupt

    run = tmp_path / "run"
    interrupt_at(monkeypatch, 6, ctrl_c)
    assert train(tiny(**AUGMENTED), bach_cache, run, progress=False)["steps"] == 5
    monkeypatch.undo()
    train(tiny(**AUGMENTED), bach_cache, run, progress=False, resume=True)
    assert_same_run(whole, run)
    train(tiny(**RESUME_CFG), bach_cache, tmp_path / "plain", progress=False)
    plain = [json.loads(line)["loss"] for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()
             if "loss" in line]
    augmented = [json.loads(line)["loss"] for line in (whole / "metrics.jsonl").read_text().splitlines()
                 if "loss" in line]
    assert plain != augmented  # the pieces did change
    with pytest.raises(DsmrError, match="transpose"):  # another augmentation is another run
        train(tiny(**dict(AUGMENTED, transpose=2)), bach_cache, run, progress=False, resume=True)


def test_the_excerpt_baseline_refuses_augmentation(bach_cache, tmp_path):
    with pytest.raises(DsmrError, match="augmentation"):
        train(tiny(baseline="excerpt", context=32, transpose=3), bach_cache, tmp_path / "r", progress=False)
