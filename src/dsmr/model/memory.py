"""A layer's memory: the detached state `LayerMemory` (keys/values or layer inputs, with their validity), the
memory rule as training runs it (`SegmentMemory`: attend to the state and the segment, keep the last h_l
positions), and `BlockMemory`, the interface the decoder's fixed buffers implement too."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from dsmr.model.attention import RotaryEmbedding, attention_mask

if TYPE_CHECKING:  # the block calls its memory; the memory only reads the block's parts
    from dsmr.model.network import Block


@dataclass
class LayerMemory:
    """The detached state of one layer: the last <= h_l positions before the segment, left-aligned by time.

    With `memory="kv"` it holds keys (after RoPE) and values; with `memory="hidden"` the residual stream
    entering the layer (`k` is [B, 1, M, d_model], `v` is None), projected again by each segment."""

    k: Tensor  # [B, n_heads, M, head_dim] keys after RoPE; hidden: [B, 1, M, d_model]
    v: Optional[Tensor]  # [B, n_heads, M, head_dim]; None for hidden memory
    valid: Tensor  # [B, M] bool: False for empty slots, padding, and positions of a previous piece

    @property
    def size(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + (self.v.nbytes if self.v is not None else 0)

    def detached(self) -> "LayerMemory":
        return LayerMemory(self.k.detach(), None if self.v is None else self.v.detach(), self.valid)

    def to(self, device) -> "LayerMemory":
        return LayerMemory(self.k.to(device), None if self.v is None else self.v.to(device), self.valid.to(device))


State = list[LayerMemory]


def state_nbytes(state: State) -> int:
    """Bytes held by a state (what DSMRConfig.state_bytes budgets)."""
    return sum(m.nbytes for m in state)


def state_to_cpu(state: Optional[State]) -> Optional[list[dict]]:
    """A state as plain CPU tensors (what a trainer checkpoint saves)."""
    if state is None:
        return None
    return [{"k": m.k.cpu(), "v": None if m.v is None else m.v.cpu(), "valid": m.valid.cpu()} for m in state]


def state_from_cpu(saved: Optional[list[dict]], device) -> Optional[State]:
    """The state `state_to_cpu` saved, on `device`."""
    if saved is None:
        return None
    return [LayerMemory(m["k"], m["v"], m["valid"]).to(device) for m in saved]


def _last(x: Tensor, h: int) -> Tensor:
    """The last h positions of x [B, H, N, D], detached, in storage of their own: the next memory.
    Fresh (empty) storage for h == 0: an empty slice would keep the whole segment's storage alive, and
    .contiguous() copies only when it trims, so a state holds <= h positions."""
    if h == 0:
        return x.new_zeros(x.shape[0], x.shape[1], 0, x.shape[3])
    return x[:, :, max(x.shape[2] - h, 0):].detach().contiguous()


class BlockMemory:
    """Where a block's keys and values come from and go: `attach(block, k, v, x)` takes the chunk's keys and
    values [B, H, T, D] (and its input x, which hidden memory keeps) and returns (keys, values, mask,
    n_memory): everything the chunk attends to, the first `n_memory` positions memory, and the additive mask
    (None: plain causal, or one query that sees every key)."""

    def attach(self, block: Block, k: Tensor, v: Tensor, x: Tensor):
        raise NotImplementedError


class SegmentMemory(BlockMemory):
    """Training and evaluation: a layer's detached state before a segment; after the block ran, `next`
    holds the state after it (the last h_l positions, for the next segment)."""

    def __init__(self, memory: LayerMemory, seg: "_Segment"):
        self.memory, self.seg = memory, seg
        self.next: Optional[LayerMemory] = None

    def attach(self, block: Block, k: Tensor, v: Tensor, x: Tensor):
        attn, memory = block.attn, self.memory
        view = self.seg.memory_view(memory, attn.horizon, k.dtype)
        first = view.first
        if view.size and attn.hidden_memory:  # the stored layer inputs, projected with the current weights
            stored = memory.k[:, 0, first:].to(x.dtype)
            mem_k, mem_v = attn.kv(block.norm1(stored), self.seg.memory_rope(view.size, attn.rotary))
        elif view.size:  # the state may come from an autocast run of another dtype: match the segment's
            mem_k, mem_v = memory.k[:, :, first:].to(k.dtype), memory.v[:, :, first:].to(v.dtype)
        keys, values = (torch.cat([mem_k, k], dim=2), torch.cat([mem_v, v], dim=2)) if view.size else (k, v)
        if attn.hidden_memory:
            stored = x[:, None]
            if view.size:
                stored = torch.cat([memory.k[:, :, first:].to(stored.dtype), stored], dim=2)
            self.next = LayerMemory(_last(stored, attn.horizon), None, view.next_valid)
        else:
            self.next = LayerMemory(_last(keys, attn.horizon), _last(values, attn.horizon), view.next_valid)
        return keys, values, view.mask, view.size


@dataclass
class _MemoryView:
    first: int  # leading memory slots skipped: invalid in every lane
    size: int  # memory slots attended to (M - first)
    mask: Optional[Tensor]  # additive [B, 1, T, size + T]; None: plain causal
    next_valid: Tensor  # validity of the layer's next memory


class _Segment:
    """Per-forward bookkeeping shared by the layers: masks and next-memory validity are computed once per
    (memory validity, horizon); layers of equal horizon share validity tensors, hence their masks."""

    def __init__(self, reset: Optional[Tensor], token_mask: Optional[Tensor], positions: Tensor):
        batch, seg_len = positions.shape
        self.reset, self.seg_len, self.positions = reset, seg_len, positions
        self.token_mask = token_mask
        # token_mask.all() syncs with the device; one call per segment. Under torch.compile it would break
        # the graph: there a token mask is always applied (all True gives the same mask, hence the same output)
        self.all_real = token_mask is None or (not torch.compiler.is_compiling() and bool(token_mask.all()))
        self.real = token_mask if token_mask is not None else torch.ones(batch, seg_len, dtype=torch.bool,
                                                                         device=positions.device)
        self._views: dict = {}
        self._ropes: dict = {}

    def memory_view(self, memory: LayerMemory, horizon: int, dtype: torch.dtype) -> _MemoryView:
        key = (id(memory.valid), memory.size, horizon, dtype)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self._make_view(memory.valid, horizon, dtype)
        return view

    def memory_rope(self, size: int, rotary: RotaryEmbedding) -> tuple[Tensor, Tensor]:
        """cos/sin of the `size` memory slots before the segment. Valid slots always hold the positions
        just before the segment's first (memory is reset with each piece, and padding only ends one), so
        slot j of `size` is at position start - size + j; invalid slots are masked, their angle is moot."""
        rope = self._ropes.get(size)
        if rope is None:
            offsets = torch.arange(-size, 0, device=self.positions.device)
            rope = self._ropes[size] = rotary((self.positions[:, :1] + offsets).clamp_min(0))
        return rope

    def _make_view(self, valid: Tensor, horizon: int, dtype: torch.dtype) -> _MemoryView:
        """Which memory slots to attend to, the mask, and the validity of the next memory: the last
        `horizon` of (memory slots, segment tokens) — the one home of the memory rule."""
        if self.reset is not None and valid.shape[1]:
            valid = valid & ~self.reset[:, None]
        first = valid.shape[1]
        if first and torch.compiler.is_compiling():
            # Under torch.compile no slot is skipped: finding the first slot valid in some lane is a
            # data-dependent shape (nonzero + int) that would break the graph. Leading slots invalid in
            # every lane are masked instead, which gives the same attention (their weight is exactly 0).
            first = 0
        elif first:
            seen = valid.any(dim=0).nonzero()
            first = int(seen[0]) if len(seen) else valid.shape[1]
        valid = valid[:, first:]
        size = valid.shape[1]
        if size == 0 and self.all_real:
            mask = None
        else:
            mask = attention_mask(valid, None if self.all_real else self.token_mask, self.seg_len, dtype)
        combined = torch.cat([valid, self.real], dim=1) if size else self.real
        next_valid = combined[:, max(combined.shape[1] - horizon, 0):].contiguous()
        return _MemoryView(first, size, mask, next_valid)
