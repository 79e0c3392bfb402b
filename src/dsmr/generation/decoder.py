"""The incremental decoder: a model's per-layer key/value buffers of fixed size, fed a chunk (a prompt) or
one token at a time, with exactly the semantics of training-time streaming (docs/design.md, Generation).

The sequence is cut into segments of `segment_len` tokens at absolute positions 0, T, 2T, ...; in layer `l`
a token attends to the last `h_l` positions before its segment plus the tokens of its segment up to itself.
Each layer owns one preallocated key/value buffer of `h_l + T` positions: memory at the front, the current
segment after it. When a segment is complete the last `h_l` positions move to the front, so the state never
grows, however long the piece. The block's math is the model's own (`Block.forward`); this module only says
where keys and values are kept (`_ChunkMemory`, `_StepMemory`).
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from torch import Tensor

from dsmr.backends.cpu import kernels
from dsmr.errors import DsmrError
from dsmr.backends.cpu.fused import FusedStep
from dsmr.model.memory import BlockMemory
from dsmr.model.attention import attention_mask


class IncrementalDecoder:
    """Feeds tokens one at a time (or in chunks) through a DSMR model with fixed-size per-layer buffers.

    All `batch_size` lanes advance together (same positions). Logits equal those of `DSMR.forward`
    streamed segment by segment from position 0 with a fresh state.

    A one-token `step` has static shapes: it attends over each layer's whole buffer with the unfilled
    slots masked, and reads its fill counts from a tensor, so one graph serves every step. With
    `compile=True` that step (the model's own `MemoryAttention.qkv` / `attend`, see `_decode_step`) is
    compiled with torch.compile once per process and shape: `warm_up()` pays for it up front.

    `state_dtype`: the keys' and values' dtype (default the model's); attention runs in the model's dtype.

    `fused`: where dsmr.backends.cpu.kernels can run the model (a CPU model made by `half_weight_model` or
    `int8_weight_model`, see dsmr.backends.cpu.fused), a step is one call of its whole-step op, which needs no
    compiling and is faster than the compiled step; `compile` then has no effect. The op reads the
    weights and gates as they are when the decoder is made. `step_kind` says which step runs, and
    `fused_unavailable` why the fused one does not (empty when it does, or when it was not asked for).
    """

    def __init__(self, model, segment_len: int, batch_size: int = 1, device=None, compile: bool = False,
                 state_dtype: Optional[torch.dtype] = None, fused: bool = True):
        if not isinstance(segment_len, int) or segment_len < 1:
            raise DsmrError(f"segment_len must be a positive integer, got {segment_len!r}")
        if batch_size < 1:
            raise DsmrError(f"batch_size must be >= 1, got {batch_size}")
        cfg = model.cfg
        param = model.embedding.weight
        if device is not None and torch.device(device) != param.device:
            raise DsmrError(f"IncrementalDecoder: the model is on {param.device}, not {device}: move it first")
        if model.training and cfg.dropout > 0:
            raise DsmrError("IncrementalDecoder: the model is in training mode with dropout: call model.eval()")
        if param.device.type == "cpu":
            kernels.load()  # the one-token attention (and half_linear) of dsmr.backends.cpu.kernels; built once per machine
        self.model = model
        self.device = param.device
        self.dtype = param.dtype
        self.segment_len = segment_len
        self.batch_size = batch_size
        self.horizons = tuple(cfg.horizons)
        self.state_dtype = state_dtype or self.dtype
        shape = lambda h: (batch_size, cfg.n_heads, h + segment_len, cfg.head_dim)  # noqa: E731
        self.keys = [torch.zeros(shape(h), device=self.device, dtype=self.state_dtype) for h in self.horizons]
        self.values = [torch.zeros(shape(h), device=self.device, dtype=self.state_dtype) for h in self.horizons]
        # [segment offset, memory fill of each layer]: what a step reads, as a tensor (no recompiles)
        self._fill = torch.zeros(1 + len(self.horizons), dtype=torch.long, device=self.device)
        # this segment's rotary table, cos/sin [1, 1, T, rotary_dims]: static buffers, refilled per segment
        self._rope = tuple(t.clone() for t in self._segment_rope(0))
        self._fused, self.fused_unavailable = None, ""
        if fused and self.state_dtype in (torch.float16, torch.float32):
            self._fused, self.fused_unavailable = FusedStep.for_model(model)
        elif fused:
            self.fused_unavailable = f"a {self.state_dtype} state"
        self.compiled = bool(compile) and self._fused is None
        self._step_fn = _compiled_step() if self.compiled else _decode_step
        self.reset()

    @property
    def step_kind(self) -> str:
        """The one-token step in use: "fused" (dsmr.backends.cpu.kernels' whole-step op), "compiled" or "eager"."""
        return "fused" if self._fused is not None else "compiled" if self.compiled else "eager"

    # ---- state

    def reset(self) -> None:
        """Start a new piece: empty memory, position 0."""
        self.position = 0  # absolute position of the next token
        self.seg_fill = 0  # tokens of the current segment already in the buffers
        self.memory_fill = [0] * len(self.horizons)
        self._new_segment_rope()
        self._sync_fill()

    def state_bytes(self) -> int:
        """Bytes held by the key/value buffers: constant for the decoder's lifetime."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def filled(self) -> list[int]:
        """Positions in use per layer (memory + current segment); never more than h_l + T."""
        return [m + self.seg_fill for m in self.memory_fill]

    def load_lane(self, other: "IncrementalDecoder", lane: int = 0) -> None:
        """Copy lane `lane` of another decoder of the same model and segment length (state and position)
        into every lane of this one: a prompt is fed once, then many continuations are sampled from it."""
        if other.model is not self.model or other.segment_len != self.segment_len:
            raise DsmrError("IncrementalDecoder.load_lane: the other decoder has another model or segment length")
        for theirs, mine in zip((*other.keys, *other.values), (*self.keys, *self.values)):
            mine.copy_(theirs[lane:lane + 1].expand_as(mine))
        self.position, self.seg_fill, self.memory_fill = other.position, other.seg_fill, list(other.memory_fill)
        for theirs, mine in zip(other._rope, self._rope):
            mine.copy_(theirs)
        self._sync_fill()

    def snapshot(self) -> dict:
        """A copy of the state (buffers, positions): `restore` returns to it, e.g. to take back events sampled
        ahead of the clock that were never played."""
        return {"keys": [k.clone() for k in self.keys], "values": [v.clone() for v in self.values],
                "position": self.position, "seg_fill": self.seg_fill, "memory_fill": list(self.memory_fill),
                "rope": tuple(t.clone() for t in self._rope)}

    def restore(self, snapshot: dict) -> None:
        """Return to a `snapshot` of this decoder."""
        for mine, saved in zip((*self.keys, *self.values), (*snapshot["keys"], *snapshot["values"])):
            mine.copy_(saved)
        self.position, self.seg_fill = snapshot["position"], snapshot["seg_fill"]
        self.memory_fill = list(snapshot["memory_fill"])
        for mine, saved in zip(self._rope, snapshot["rope"]):
            mine.copy_(saved)
        self._sync_fill()

    def _segment_rope(self, start: int) -> tuple[Tensor, Tensor]:
        # One rotary table per segment instead of one per token: cos/sin [1, 1, T, head_dim].
        positions = torch.arange(start, start + self.segment_len, device=self.device)[None]
        return self.model.rotary(positions)

    def _new_segment_rope(self) -> None:
        for buf, table in zip(self._rope, self._segment_rope(self.position)):
            buf.copy_(table)

    def _sync_fill(self) -> None:
        self._fill.copy_(torch.tensor([self.seg_fill, *self.memory_fill], dtype=torch.long))

    def _next_segment(self) -> None:
        """Keep the last h_l positions of (memory + finished segment) at the front of each buffer."""
        for layer, h in enumerate(self.horizons):
            n = self.memory_fill[layer] + self.seg_fill
            keep = min(h, n)
            if keep and keep < n:  # clone: source and destination may overlap
                for buf in (self.keys[layer], self.values[layer]):
                    buf[:, :, :keep] = buf[:, :, n - keep : n].clone()
            self.memory_fill[layer] = keep
        self.seg_fill = 0
        self._new_segment_rope()
        self._sync_fill()

    # ---- decoding

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Run (and with `compile`, compile) the one-token step once on scratch copies of the state; the
        decoder's own state does not change. Returns the seconds it took."""
        start = time.perf_counter()
        ids = torch.zeros(self.batch_size, 1, dtype=torch.long, device=self.device)
        keys, values = [k.clone() for k in self.keys], [v.clone() for v in self.values]
        if self._fused is not None:
            self._fused_step(ids.view(-1), keys, values)
        else:
            self._step_fn(self.model, ids, self._fill.clone(), self._rope, keys, values)
        return time.perf_counter() - start

    @torch.inference_mode()
    def step(self, ids: Tensor) -> Tensor:
        """Feed one token per lane (ids [B] long); returns the next-token logits [B, vocab]."""
        if self.seg_fill == self.segment_len:
            self._next_segment()
        if self._fused is not None:
            logits = self._fused_step(ids.view(self.batch_size).to(self.device), self.keys, self.values)
        else:
            logits = self._step_fn(self.model, ids.view(self.batch_size, 1).to(self.device), self._fill, self._rope,
                                   self.keys, self.values)
        self.seg_fill += 1
        self.position += 1
        return logits

    def _fused_step(self, ids: Tensor, keys: list, values: list) -> Tensor:
        return self._fused(ids, keys, values, self.memory_fill, self.seg_fill, *self._rope)

    @torch.inference_mode()
    def feed(self, ids: Tensor, last_only: bool = False) -> Tensor:
        """Feed a chunk of tokens per lane (ids [B, n] long); returns logits [B, n, vocab] for each, or
        only the last position's [B, vocab] with `last_only` (a long prompt then costs no logits memory).

        Used for prompts: the chunk is split at segment boundaries and each piece is attended in one go.
        """
        if ids.dim() != 2 or ids.shape[0] != self.batch_size or ids.shape[1] == 0:
            raise DsmrError(f"IncrementalDecoder.feed: ids must be [{self.batch_size}, n>0], got {tuple(ids.shape)}")
        ids = ids.to(self.device)
        outputs = []
        start, total = 0, ids.shape[1]
        while start < total:
            if self.seg_fill == self.segment_len:
                self._next_segment()
            n = min(total - start, self.segment_len - self.seg_fill)
            x = self._feed_in_segment(ids[:, start : start + n])
            start += n
            if not last_only:
                outputs.append(self.model.output(x))
            elif start == total:
                self._sync_fill()
                return self.model.output(x[:, -1])
        self._sync_fill()
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def _feed_in_segment(self, ids: Tensor) -> Tensor:
        """Run a chunk within the current segment through the blocks; returns the final residual stream."""
        n, t = ids.shape[1], self.seg_fill
        cos, sin = self._rope
        rope = cos.narrow(2, t, n), sin.narrow(2, t, n)
        x = self.model.embed(ids)
        for layer, block in enumerate(self.model.blocks):
            x = block(x, rope, _ChunkMemory(self, layer))
        self.seg_fill += n
        self.position += n
        return x

    def _mask(self, memory: int, t: int, n: int) -> Tensor:
        """Additive mask [1, 1, n, memory + t + n] for n queries at segment offsets t..t+n-1: the rows t..
        of a full segment's mask (one query alone sees every filled slot and needs none)."""
        valid = torch.ones(1, memory, dtype=torch.bool, device=self.device)
        return attention_mask(valid, None, t + n, self.dtype)[:, :, t:]


class _ChunkMemory(BlockMemory):
    """A chunk of n tokens at segment offset t: its keys and values go into the layer's buffer after the
    memory and the segment's earlier tokens, and it attends over everything filled so far."""

    def __init__(self, decoder: IncrementalDecoder, layer: int):
        self.decoder, self.layer = decoder, layer

    def attach(self, block, k: Tensor, v: Tensor, x: Tensor):
        dec, n = self.decoder, k.shape[2]
        memory, t = dec.memory_fill[self.layer], dec.seg_fill
        end = memory + t + n
        keys, values = dec.keys[self.layer], dec.values[self.layer]
        keys.narrow(2, memory + t, n).copy_(_storable(k, dec.state_dtype))
        values.narrow(2, memory + t, n).copy_(_storable(v, dec.state_dtype))
        mask = None if n == 1 else dec._mask(memory, t, n)
        return keys.narrow(2, 0, end).to(k.dtype), values.narrow(2, 0, end).to(v.dtype), mask, memory


class _StepMemory(BlockMemory):
    """One token per lane with static shapes (the same graph for every step, eager or compiled): its key and
    value go to slot memory + t of the whole buffer, which is attended with the later slots masked. A float16
    state is widened inside the attention kernels (dsmr.backends.cpu.kernels' or inductor's), never stored."""

    def __init__(self, keys: Tensor, values: Tensor, t: Tensor, memory: Tensor):
        self.keys, self.values, self.t, self.memory = keys, values, t, memory

    def attach(self, block, k: Tensor, v: Tensor, x: Tensor):
        slot = (self.memory + self.t).view(1)
        self.keys.index_copy_(2, slot, _storable(k, self.keys.dtype))
        self.values.index_copy_(2, slot, _storable(v, self.values.dtype))
        filled = torch.arange(self.keys.shape[2], device=k.device) <= slot
        mask = torch.where(filled, 0.0, float("-inf")).to(k.dtype).view(1, 1, 1, -1)
        return self.keys, self.values, mask, self.memory


def _decode_step(model, ids: Tensor, fill: Tensor, rope: tuple[Tensor, Tensor], keys: list, values: list) -> Tensor:
    """One token per lane (ids [B, 1]) through the blocks. `fill` = [segment offset t, memory fill of each
    layer] (advanced here by one). Returns the next-token logits [B, vocab]."""
    t = fill[0]
    rope = tuple(table.index_select(2, t.view(1)) for table in rope)
    x = model.embed(ids)
    for layer, block in enumerate(model.blocks):
        x = block(x, rope, _StepMemory(keys[layer], values[layer], t, fill[1 + layer]))
    fill[:1].add_(1)
    return model.output(x)[:, -1]


def _storable(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x in the state's dtype; into a float16 state clamped to its finite range first: a key or value beyond
    65,504 would be stored as inf and turn its attention row into NaN, clamped it only saturates."""
    if dtype == torch.float16 and x.dtype != dtype:
        x = x.clamp(-65504.0, 65504.0)
    return x.to(dtype)


_COMPILED_STEP = None


def _compiled_step():
    """torch.compile of `_decode_step`, shared by the decoders of this process (one graph per model and
    shape; inductor's on-disk cache makes a later process compile faster)."""
    global _COMPILED_STEP
    if _COMPILED_STEP is None:
        _COMPILED_STEP = torch.compile(_decode_step, fullgraph=True, dynamic=False)
    return _COMPILED_STEP


def compile_available(device) -> bool:
    """Whether `compile="auto"` compiles the decoding step here: on a CPU with a C++ compiler (inductor's
    CPU backend). On CUDA the compiled step (and CUDA graphs) is not measured yet: ask for it explicitly."""
    import shutil

    return torch.device(device).type == "cpu" and any(shutil.which(c) for c in ("g++", "c++", "clang++"))
