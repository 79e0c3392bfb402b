"""PieceStream / ExcerptStream: coverage, lane semantics, padding, rank splits, resume."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsmr.errors import DsmrError
from dsmr.data.stream import IGNORE_INDEX, ExcerptStream, PieceStream

PAD, BOS, EOS = 0, 1, 2


def unique_pieces(lengths):
    """Pieces whose event ids are unique across the corpus, so each target names its piece and place."""
    pieces, start = [], 3
    for n in lengths:
        pieces.append(np.arange(start, start + n, dtype=np.uint32))
        start += n
    return pieces


def one_epoch(stream):
    return list(stream.epoch_batches())


def lane_rows(batches):
    """Per lane, the pieces it streamed: {first position-0 row key: (inputs, targets)} rebuilt from segments."""
    out = []
    for lane in range(batches[0].batch_size):
        current = None
        for b in batches:
            ids, tg, pos = b.ids[lane], b.targets[lane], b.positions[lane]
            mask = b.token_mask[lane]
            assert mask.tolist() == (tg != IGNORE_INDEX).tolist()  # a real input <=> a counted target
            assert (ids[~mask] == PAD).all() and (pos[~mask] == 0).all()
            if b.reset[lane]:
                if current is not None:
                    out.append(current)
                current = None
                if mask.any():
                    assert ids[0] == BOS and pos[0] == 0, "a piece starts at a segment boundary with BOS"
                    current = ([], [])
            elif mask.any():
                assert current is not None, "a continued segment must follow its piece's start"
                assert pos[0] == len(current[0]), "positions continue across segments"
            else:
                assert current is None or not mask.any()
            if mask.any():
                n = int(mask.sum())
                assert mask[:n].all(), "padding only at the end of a piece's last segment"
                assert pos[:n].tolist() == list(range(len(current[0]), len(current[0]) + n))
                current[0].extend(ids[:n].tolist())
                current[1].extend(tg[:n].tolist())
        if current is not None:
            out.append(current)
    return out


def check_pieces_rebuilt(pieces, streamed):
    by_first = {}
    for inputs, targets in streamed:
        key = targets[0]  # first event id (unique), or EOS for an empty piece
        by_first.setdefault(key, []).append((inputs, targets))
    for p in pieces:
        key = int(p[0]) if len(p) else EOS
        candidates = by_first[key]
        want_in, want_tg = [BOS] + p.tolist(), p.tolist() + [EOS]
        assert (want_in, want_tg) in candidates
        candidates.remove((want_in, want_tg))


LENGTHS = [0, 1, 5, 300, 17, 1000, 2, 64, 63, 62, 129, 7]


def test_one_epoch_counts_every_target_once_and_rebuilds_every_piece():
    pieces = unique_pieces(LENGTHS)
    stream = PieceStream(pieces, batch_size=3, segment_len=64, bos_id=BOS, eos_id=EOS, pad_id=PAD, seed=5)
    expected_batches = stream.count_batches()
    batches = one_epoch(stream)
    assert len(batches) == expected_batches
    assert stream.epoch == 1 and stream.batches_in_epoch == 0
    targets = Counter(t for b in batches for t in b.targets[b.targets != IGNORE_INDEX].tolist())
    want = Counter(np.concatenate(pieces).tolist())
    want[EOS] = len(pieces)
    assert targets == want
    assert sum(b.num_targets for b in batches) == sum(len(p) + 1 for p in pieces)
    # Non-empty pieces are reconstructed exactly (empty ones only have BOS -> EOS, counted above).
    check_pieces_rebuilt([p for p in pieces if len(p)], [r for r in lane_rows(batches) if r[1] != [EOS]])


def test_lanes_stay_busy_and_idle_lanes_pad_with_reset():
    pieces = unique_pieces([500] + [10] * 7)
    stream = PieceStream(pieces, batch_size=4, segment_len=16, bos_id=BOS, eos_id=EOS, pad_id=PAD, shuffle=False)
    batches = one_epoch(stream)
    # The long piece (lane 0) needs ceil(501/16) = 32 segments; the short ones fill lanes 1-3 meanwhile.
    assert len(batches) == 32
    last = batches[-1]
    idle = ~last.token_mask.any(dim=1)
    assert idle.sum() == 3 and last.reset[idle].all()


def test_rank_split_is_disjoint_complete_and_equal_length():
    pieces = unique_pieces(LENGTHS)
    per_rank = []
    for rank in range(3):
        s = PieceStream(pieces, batch_size=2, segment_len=32, bos_id=BOS, eos_id=EOS, pad_id=PAD, seed=9,
                        rank=rank, world_size=3)
        per_rank.append(one_epoch(s))
    assert len({len(b) for b in per_rank}) == 1, "every rank sees the same number of batches"
    seen = Counter(t for batches in per_rank for b in batches for t in b.targets[b.targets != IGNORE_INDEX].tolist())
    want = Counter(np.concatenate(pieces).tolist())
    want[EOS] = len(pieces)
    assert seen == want


@pytest.mark.parametrize("refill", [False, True])
def test_resume_at_exact_segment_across_epochs(refill):
    pieces = unique_pieces(LENGTHS)
    kw = dict(batch_size=3, segment_len=50, bos_id=BOS, eos_id=EOS, pad_id=PAD, seed=3, refill=refill)
    a = PieceStream(pieces, **kw)
    it = iter(a)
    n_epoch = a.steps_for_epochs(1)
    for _ in range(n_epoch - 2):
        next(it)
    saved = json.loads(json.dumps(a.state_dict()))  # the state must survive JSON (it goes in checkpoints)
    rest_a = [next(it) for _ in range(n_epoch + 3)]
    b = PieceStream(pieces, **kw)
    b.load_state_dict(saved)
    it_b = iter(b)
    rest_b = [next(it_b) for _ in range(n_epoch + 3)]
    for x, y in zip(rest_a, rest_b):
        for f in ("ids", "targets", "positions", "reset", "token_mask"):
            assert getattr(x, f).equal(getattr(y, f))
    assert a.epoch == b.epoch >= 1 and a.state_dict() == b.state_dict()


def test_shuffle_is_seeded_and_changes_by_epoch():
    pieces = unique_pieces([40] * 20)
    kw = dict(batch_size=2, segment_len=41, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    first = lambda s: [int(b.targets[0, 0]) for b in one_epoch(s)]  # noqa: E731
    a, b, c = PieceStream(pieces, seed=4, **kw), PieceStream(pieces, seed=4, **kw), PieceStream(pieces, seed=5, **kw)
    assert first(a) == first(b) != first(c)
    ordered = PieceStream(pieces, shuffle=False, **kw)
    assert first(ordered) == [int(p[0]) for p in pieces[0::2]]
    epoch0 = first(PieceStream(pieces, seed=4, **kw))
    s = PieceStream(pieces, seed=4, **kw)
    one_epoch(s)
    assert first(s) != epoch0, "each epoch has its own order"


def test_bad_arguments_and_mismatched_resume_raise():
    pieces = unique_pieces([5, 6])
    with pytest.raises(DsmrError, match="no pieces"):
        PieceStream([], 2, 8, BOS, EOS, PAD)
    with pytest.raises(DsmrError, match="rank 2"):
        PieceStream(pieces, 2, 8, BOS, EOS, PAD, rank=2, world_size=2)
    with pytest.raises(DsmrError, match="segment length"):
        PieceStream(pieces, 2, 0, BOS, EOS, PAD)
    state = PieceStream(pieces, 2, 8, BOS, EOS, PAD).state_dict()
    with pytest.raises(DsmrError, match="segment_len: saved 8, now 4"):
        PieceStream(pieces, 2, 4, BOS, EOS, PAD).load_state_dict(state)
    with pytest.raises(DsmrError, match="n_pieces"):
        PieceStream(pieces[:1], 2, 8, BOS, EOS, PAD).load_state_dict(state)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 120), min_size=1, max_size=12), batch=st.integers(1, 4),
       segment=st.integers(1, 40), world=st.integers(1, 3), seed=st.integers(0, 3))
def test_coverage_property(lengths, batch, segment, world, seed):
    pieces = unique_pieces(lengths)
    counts, n_batches = Counter(), set()
    for rank in range(world):
        s = PieceStream(pieces, batch, segment, BOS, EOS, PAD, seed=seed, rank=rank, world_size=world)
        want_batches = s.count_batches()
        batches = one_epoch(s)
        n_batches.add(len(batches))
        assert len(batches) == want_batches
        for b in batches:
            counts.update(b.targets[b.targets != IGNORE_INDEX].tolist())
    want = Counter(np.concatenate(pieces).tolist())
    want[EOS] = len(pieces)
    assert counts == want and len(n_batches) == 1


def test_excerpts_cover_each_target_once_with_reset_every_row():
    pieces = unique_pieces(LENGTHS)
    for world in (1, 2):
        counts, lengths = Counter(), set()
        for rank in range(world):
            s = ExcerptStream(pieces, batch_size=4, context=48, bos_id=BOS, eos_id=EOS, pad_id=PAD, seed=2,
                              rank=rank, world_size=world)
            n = s.count_batches()
            batches = one_epoch(s)
            assert len(batches) == n and s.epoch == 1
            lengths.add(n)
            for b in batches:
                assert b.reset.all() and b.ids.shape == (4, 48)
                assert b.token_mask.tolist() == (b.targets != IGNORE_INDEX).tolist()
                counts.update(b.targets[b.targets != IGNORE_INDEX].tolist())
        want = Counter(np.concatenate(pieces).tolist())
        want[EOS] = len(pieces)
        assert counts == want and len(lengths) == 1


def test_excerpt_positions_are_absolute_and_phase_varies_by_epoch():
    pieces = unique_pieces([1000])
    s = ExcerptStream(pieces, batch_size=1, context=100, bos_id=BOS, eos_id=EOS, pad_id=PAD, seed=0)
    starts = []
    for _ in range(3):
        batches = one_epoch(s)
        for b in batches:
            n = int(b.token_mask.sum())
            pos = b.positions[0, :n]
            assert pos.tolist() == list(range(int(pos[0]), int(pos[0]) + n))
            first = int(pos[0])
            assert int(b.ids[0, 0]) == (BOS if first == 0 else int(pieces[0][first - 1]))
        starts.append(sorted(int(b.positions[0, 0]) for b in batches)[1])
    assert len(set(starts)) > 1
    resumed = ExcerptStream(pieces, batch_size=1, context=100, bos_id=BOS, eos_id=EOS, pad_id=PAD, seed=0)
    it = iter(s)
    next(it)
    resumed.load_state_dict(s.state_dict())
    assert next(it).ids.equal(next(iter(resumed)).ids)


def test_refilling_lanes_keep_every_batch_full_across_epochs_and_hand_out_each_piece_once_per_epoch():
    # One long piece among short ones: a draining epoch ends with lanes idle while the long piece finishes.
    lengths = [40, 900, 35, 50, 61, 20, 33, 47, 58, 29]
    pieces = unique_pieces(lengths)
    kw = dict(batch_size=3, segment_len=16, bos_id=BOS, eos_id=EOS, pad_id=PAD, seed=2)
    draining = one_epoch(PieceStream(pieces, **kw))
    assert min(int(b.token_mask[:, 0].sum()) for b in draining) == 1, "the draining epoch ends on one lane"

    stream = PieceStream(pieces, refill=True, **kw)
    steps = stream.steps_for_epochs(3)
    segments = sum(-(-(n + 1) // 16) for n in lengths)
    assert steps == -(-3 * segments // 3)
    batches = [b for b, _ in zip(iter(stream), range(steps))]
    # every lane is reading a piece in every batch but the last (where the stream may stop mid-piece)
    assert all(bool(b.token_mask[:, 0].all()) for b in batches[:-1])
    # each epoch's order hands out every piece once, and all of one epoch's pieces before the next's
    starts = [int(b.targets[row, 0]) for b in batches for row in range(3) if b.reset[row] and b.token_mask[row, 0]]
    firsts = [int(p[0]) for p in pieces]
    n = len(pieces)
    for e in range(len(starts) // n):
        assert sorted(starts[e * n:(e + 1) * n]) == sorted(firsts)
    assert len(starts) >= 2 * n and stream.epoch >= 2
    # every piece a lane finished is rebuilt exactly; the ones still being read at the end are prefixes
    by_first = {int(p[0]): [BOS] + p.tolist() for p in pieces}
    for inputs, targets in lane_rows(batches):
        want = by_first[targets[0]]
        assert inputs == want[:len(inputs)] and (targets[-1] != EOS or inputs == want)
