"""Full-piece lanes -> segment batches (docs/design.md), and fixed-length excerpts for the reference model.

Each piece is read as `BOS, events..., EOS`; the model's inputs are `seq[:-1]` and its targets `seq[1:]`,
so a piece of n events gives n + 1 input/target pairs. A batch is `batch_size` lanes. A lane streams
whole pieces one after another, `segment_len` tokens at a time: a piece starts at a segment boundary
with `reset=True`, and its last segment is padded (input PAD, target -100, token_mask False).

Lanes take the next piece of a per-epoch shuffled order whenever they need one (dynamic assignment keeps
the lanes busy whatever the piece lengths). Two ways to end an epoch:

* draining (evaluation, `refill=False`): the epoch ends with the batch that holds the last segment of its
  last piece; lanes that run out of work before then emit padding rows with `reset=True`. Every target of
  every piece counts exactly once per epoch.
* refilling (training, `refill=True`): a lane that needs a piece once the epoch's order is used up takes
  the first free piece of the next epoch's order, so every batch is full; on MAESTRO a draining epoch ends
  with a few hundred steps on the last 2-5 long pieces, which pulls the model toward them. Every piece is
  still handed out once per epoch, and all of an epoch's pieces before any of the next; "N epochs" of
  training is the number of full batches that hold N epochs' segments (`steps_for_epochs`).

Augmentation (training, `augment`): a lane that takes a piece reads `augment(ids, seed, epoch, piece)`
instead (dsmr.data.augment: a function of those alone), so its length may differ from the cached piece's; a resume
rebuilds what each lane was reading from the epoch it took its piece in. Epoch counts (`steps_for_epochs`)
stay those of the cached pieces.

Distributed training: the `world_size * batch_size` lanes of all ranks share one assignment, and rank r
reads lanes `[r * batch_size, (r + 1) * batch_size)`. Ranks get disjoint pieces, their load stays
balanced, and every rank sees the same number of batches per epoch (what DDP's collective calls need).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from dsmr.errors import DsmrError

IGNORE_INDEX = -100  # target value that the loss skips (torch's cross_entropy default)


@dataclass
class SegmentBatch:
    ids: torch.Tensor         # [B, T] long
    targets: torch.Tensor     # [B, T] long, IGNORE_INDEX where no loss (padding)
    positions: torch.Tensor   # [B, T] long, absolute position in the piece (0 on padding)
    reset: torch.Tensor       # [B] bool, lane starts a new piece (or idles) at this segment
    token_mask: torch.Tensor  # [B, T] bool, real input tokens

    def to(self, device, non_blocking: bool = False) -> "SegmentBatch":
        return SegmentBatch(*(t.to(device, non_blocking=non_blocking) for t in
                              (self.ids, self.targets, self.positions, self.reset, self.token_mask)))

    def pin_memory(self) -> "SegmentBatch":
        """A copy in page-locked host memory, so that `to(cuda, non_blocking=True)` is asynchronous."""
        return SegmentBatch(*(t.pin_memory() for t in
                              (self.ids, self.targets, self.positions, self.reset, self.token_mask)))

    @property
    def num_targets(self) -> int:
        """Tokens that count in the loss."""
        return int((self.targets != IGNORE_INDEX).sum())

    @property
    def batch_size(self) -> int:
        return self.ids.shape[0]


class _RowWriter:
    """Fills the numpy arrays of one batch; rows start as padding."""

    def __init__(self, rows: int, segment_len: int, bos_id: int, eos_id: int, pad_id: int):
        self.bos_id, self.eos_id = bos_id, eos_id
        self.ids = np.full((rows, segment_len), pad_id, dtype=np.int64)
        self.targets = np.full((rows, segment_len), IGNORE_INDEX, dtype=np.int64)
        self.positions = np.zeros((rows, segment_len), dtype=np.int64)
        self.reset = np.ones(rows, dtype=bool)
        self.mask = np.zeros((rows, segment_len), dtype=bool)

    def write(self, row: int, piece: np.ndarray, start: int, count: int, reset: bool) -> None:
        """Input positions [start, start + count) of `piece` (event ids without BOS/EOS) into `row`.

        Input j is BOS for j = 0 and event j - 1 otherwise; target j is event j, or EOS for j = n.
        Slices come straight from the (possibly memory-mapped) piece: no per-segment concatenation.
        """
        n = len(piece)
        end = start + count
        if start == 0:
            self.ids[row, 0] = self.bos_id
            self.ids[row, 1:count] = piece[0:end - 1]
        else:
            self.ids[row, :count] = piece[start - 1:end - 1]
        k = min(end, n) - start
        self.targets[row, :k] = piece[start:start + k]
        if end == n + 1:
            self.targets[row, count - 1] = self.eos_id
        self.positions[row, :count] = np.arange(start, end)
        self.mask[row, :count] = True
        self.reset[row] = reset

    def batch(self) -> SegmentBatch:
        return SegmentBatch(torch.from_numpy(self.ids), torch.from_numpy(self.targets),
                            torch.from_numpy(self.positions), torch.from_numpy(self.reset),
                            torch.from_numpy(self.mask))


def _check_common(pieces: Sequence[np.ndarray], batch_size: int, segment_len: int, rank: int,
                  world_size: int, what: str) -> None:
    if len(pieces) == 0:
        raise DsmrError(f"{what}: no pieces to stream")
    if batch_size < 1:
        raise DsmrError(f"{what}: batch_size must be at least 1, got {batch_size}")
    if segment_len < 1:
        raise DsmrError(f"{what}: segment length must be at least 1, got {segment_len}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DsmrError(f"{what}: rank {rank} is not in [0, world_size={world_size})")


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


class _Stream:
    """What both streams share: settings, epoch-by-epoch iteration, and the fingerprint a resume checks."""

    def __init__(self, pieces: Sequence[np.ndarray], batch_size: int, segment_len: int, bos_id: int,
                 eos_id: int, pad_id: int, shuffle: bool, seed: int, rank: int, world_size: int):
        _check_common(pieces, batch_size, segment_len, rank, world_size, type(self).__name__)
        self.pieces = pieces
        self.batch_size, self.segment_len = batch_size, segment_len
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.inputs_per_piece = np.array([len(p) + 1 for p in pieces], dtype=np.int64)
        self.epoch = 0

    def __iter__(self) -> Iterator[SegmentBatch]:
        """Epoch after epoch, forever (`epoch` counts finished epochs as they roll over)."""
        while True:
            yield from self.epoch_batches()

    def epoch_batches(self) -> Iterator[SegmentBatch]:
        """The rest of the current epoch, from the current position."""
        epoch = self.epoch
        while self.epoch == epoch:
            yield self._next_batch()

    def _next_batch(self) -> SegmentBatch:
        raise NotImplementedError

    def count_batches(self, epoch: int | None = None) -> int:
        raise NotImplementedError

    def steps_for_epochs(self, epochs: int) -> int:
        """Batches in `epochs` whole epochs from the first."""
        return sum(self.count_batches(e) for e in range(epochs))

    def _fingerprint(self) -> dict:
        return {"n_pieces": len(self.pieces), "tokens": int(self.inputs_per_piece.sum()),
                "batch_size": self.batch_size, "segment_len": self.segment_len,
                "world_size": self.world_size, "shuffle": self.shuffle, "seed": self.seed}


class PieceStream(_Stream):
    """Full-piece lanes: deterministic for a seed, resumable at the exact next segment.

    `refill=True` (training) carries lanes over epoch boundaries instead of draining them (module docstring).
    """

    def __init__(self, pieces: Sequence[np.ndarray], batch_size: int, segment_len: int, bos_id: int,
                 eos_id: int, pad_id: int, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, refill: bool = False, augment=None):
        super().__init__(pieces, batch_size, segment_len, bos_id, eos_id, pad_id, shuffle, seed, rank, world_size)
        self.n_lanes = batch_size * world_size  # lanes of all ranks, assigned together
        self.refill = refill
        self.augment = augment if augment is not None and augment.describe() is not None else None
        self._start_epoch(0)

    def _fingerprint(self) -> dict:
        return {**super()._fingerprint(), "augment": self.augment.describe() if self.augment else None}

    # ----- epoch plan -----
    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.pieces)
        return _epoch_rng(self.seed, epoch).permutation(n) if self.shuffle else np.arange(n)

    def _start_epoch(self, epoch: int) -> None:
        self._begin_order(epoch)
        self._lane_piece = np.full(self.n_lanes, -1, dtype=np.int64)  # -1: idle
        self._lane_offset = np.zeros(self.n_lanes, dtype=np.int64)    # next input position to read
        self._lane_epoch = np.zeros(self.n_lanes, dtype=np.int64)     # the epoch the lane took its piece in
        self._lane_ids: list[np.ndarray | None] = [None] * self.n_lanes  # what the lane reads (augmented)
        self._lane_inputs = np.zeros(self.n_lanes, dtype=np.int64)    # its inputs: len(ids) + 1

    def _begin_order(self, epoch: int) -> None:
        """Hand out pieces from `epoch`'s order (lanes keep what they are reading)."""
        self.epoch = epoch
        self._order_cache = self._order(epoch)
        self._next = 0                                            # next entry of the order to hand out
        self.batches_in_epoch = 0                                # batches emitted so far this epoch

    def _lane_busy(self, lane: int) -> bool:
        return self._lane_piece[lane] >= 0 and self._lane_offset[lane] < self._lane_inputs[lane]

    def _take(self, lane: int, piece: int, epoch: int) -> None:
        """Lane `lane` reads `piece`, taken in `epoch` (augmented when the stream augments)."""
        ids = self.pieces[piece]
        if self.augment is not None:
            ids = self.augment(ids, self.seed, epoch, piece)
        self._lane_piece[lane], self._lane_epoch[lane] = piece, epoch
        self._lane_ids[lane], self._lane_inputs[lane] = ids, len(ids) + 1

    def count_batches(self, epoch: int | None = None) -> int:
        """Batches in a whole epoch (the current one by default), computed from piece lengths alone.

        Lanes freed at the same step take pieces in lane order, exactly as the stream does, so a heap of
        (free step, lane) reproduces the assignment.
        """
        order = self._order(self.epoch if epoch is None else epoch)
        segments = -(-self.inputs_per_piece // self.segment_len)
        heap = [(0, lane) for lane in range(self.n_lanes)]
        end = 0
        for p in order:
            t, lane = heapq.heappop(heap)
            heapq.heappush(heap, (t + int(segments[p]), lane))
            end = max(end, t + int(segments[p]))
        return end

    def steps_for_epochs(self, epochs: int) -> int:
        """Batches in `epochs` epochs: with refilling lanes, the full batches that hold their segments."""
        if not self.refill:
            return super().steps_for_epochs(epochs)
        segments = int((-(-self.inputs_per_piece // self.segment_len)).sum())
        return -(-epochs * segments // self.n_lanes)

    # ----- iteration -----
    def _next_batch(self) -> SegmentBatch:
        T = self.segment_len
        started = np.zeros(self.n_lanes, dtype=bool)
        for lane in range(self.n_lanes):  # free lanes take the next piece, in lane order
            if not self._lane_busy(lane):
                if self.refill and self._next >= len(self._order_cache):
                    self._begin_order(self.epoch + 1)
                order = self._order_cache
                if self._next < len(order):
                    self._take(lane, int(order[self._next]), self.epoch)
                    self._lane_offset[lane] = 0
                    self._next += 1
                    started[lane] = True
                else:
                    self._lane_piece[lane] = -1
        writer = _RowWriter(self.batch_size, T, self.bos_id, self.eos_id, self.pad_id)
        first = self.rank * self.batch_size
        for row in range(self.batch_size):
            lane = first + row
            if self._lane_piece[lane] >= 0:
                start = int(self._lane_offset[lane])
                count = min(T, int(self._lane_inputs[lane]) - start)
                writer.write(row, self._lane_ids[lane], start, count, reset=bool(started[lane]))
        self._lane_offset[self._lane_piece >= 0] += T
        self.batches_in_epoch += 1
        if (not self.refill and self._next >= len(self._order_cache)
                and not any(self._lane_busy(lane) for lane in range(self.n_lanes))):
            self._start_epoch(self.epoch + 1)  # roll over eagerly: `epoch` is exact after the last batch
        return writer.batch()

    # ----- resume -----
    def state_dict(self) -> dict:
        return {"kind": "pieces", **self._fingerprint(), "epoch": self.epoch, "next": self._next,
                "lane_piece": self._lane_piece.tolist(), "lane_offset": self._lane_offset.tolist(),
                "lane_epoch": self._lane_epoch.tolist(), "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        _check_fingerprint(state, {"kind": "pieces", **self._fingerprint()}, "PieceStream")
        self._start_epoch(int(state["epoch"]))
        self._next = int(state["next"])
        self._lane_offset = np.asarray(state["lane_offset"], dtype=np.int64)
        # streams saved before lanes recorded their epoch never augmented: their pieces are the cached ones
        epochs = state.get("lane_epoch", [state["epoch"]] * self.n_lanes)
        for lane, (piece, epoch) in enumerate(zip(state["lane_piece"], epochs)):
            if piece >= 0:
                self._take(lane, int(piece), int(epoch))
        self.batches_in_epoch = int(state["batches_in_epoch"])


def _check_fingerprint(state: dict, expected: dict, what: str) -> None:
    diffs = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in expected.items() if state.get(k) != v]
    if diffs:
        raise DsmrError(f"{what}: cannot resume a stream over different data or settings ({'; '.join(diffs)})")


class ExcerptStream(_Stream):
    """Fixed-length excerpts for the full-attention reference: every row is its own sequence (reset).

    Each epoch tiles every piece's input positions with windows of `context` tokens at a random phase
    (pieces no longer than `context` are one window), then shuffles all windows of the corpus. Every
    target counts exactly once per epoch; edge windows are shorter and padded. Rank r takes windows
    r, r + world_size, ...; all ranks get the same number of batches.
    """

    def __init__(self, pieces: Sequence[np.ndarray], batch_size: int, context: int, bos_id: int,
                 eos_id: int, pad_id: int, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        super().__init__(pieces, batch_size, context, bos_id, eos_id, pad_id, shuffle, seed, rank, world_size)
        self.batches_in_epoch = 0
        self._windows = self._plan(0)

    def _plan(self, epoch: int) -> np.ndarray:
        """This rank's windows for an epoch: rows of (piece, start, count); piece -1 pads the rank."""
        rng = _epoch_rng(self.seed, epoch)
        C = self.segment_len
        rows = []
        for p, length in enumerate(self.inputs_per_piece):
            phase = int(rng.integers(0, C)) if self.shuffle and length > C else 0
            starts = np.arange(-phase, length, C)
            lo, hi = np.maximum(starts, 0), np.minimum(starts + C, length)
            rows.append(np.stack([np.full(len(lo), p), lo, hi - lo], axis=1))
        windows = np.concatenate(rows)
        if self.shuffle:
            windows = windows[rng.permutation(len(windows))]
        mine = windows[self.rank::self.world_size]
        per_rank = -(-len(windows) // self.world_size)
        if len(mine) < per_rank:
            mine = np.concatenate([mine, np.array([[-1, 0, 0]] * (per_rank - len(mine)))])
        return mine

    def count_batches(self, epoch: int | None = None) -> int:
        windows = self._windows if epoch is None or epoch == self.epoch else self._plan(epoch)
        return -(-len(windows) // self.batch_size)

    def _next_batch(self) -> SegmentBatch:
        B = self.batch_size
        chunk = self._windows[self.batches_in_epoch * B:(self.batches_in_epoch + 1) * B]
        writer = _RowWriter(B, self.segment_len, self.bos_id, self.eos_id, self.pad_id)
        for row, (p, start, count) in enumerate(chunk):
            if p >= 0:
                writer.write(row, self.pieces[p], int(start), int(count), reset=True)
        self.batches_in_epoch += 1
        if self.batches_in_epoch * B >= len(self._windows):
            self.epoch += 1
            self.batches_in_epoch = 0
            self._windows = self._plan(self.epoch)
        return writer.batch()

    def state_dict(self) -> dict:
        return {"kind": "excerpts", **self._fingerprint(), "epoch": self.epoch,
                "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        _check_fingerprint(state, {"kind": "excerpts", **self._fingerprint()}, "ExcerptStream")
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self._windows = self._plan(self.epoch)
