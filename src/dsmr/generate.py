"""Bounded-memory generation of whole pieces (docs/design.md, Generation).

`IncrementalDecoder` decodes with exactly the semantics of training-time streaming: the sequence is cut
into segments of `segment_len` tokens at absolute positions 0, T, 2T, ...; in layer `l` a token attends
to the last `h_l` positions before its segment plus the tokens of its segment up to itself. Each layer
owns one preallocated key/value buffer of `h_l + T` positions: memory at the front, the current segment
after it. When a segment is complete the last `h_l` positions move to the front, so the state never
grows, however long the piece.

`generate` samples a piece from BOS (and an optional prompt) with temperature / top-k / top-p, a seed,
token and duration limits, EOS handling and banned events.
"""

from __future__ import annotations

import copy
import math
import os
import time
from array import array
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsmr import kernels
from dsmr.errors import DsmrError
from dsmr.note_guard import NoteGuard, check_guard_options
from dsmr.model import attention_mask

class IncrementalDecoder:
    """Feeds tokens one at a time (or in chunks) through a DSMR model with fixed-size per-layer buffers.

    All `batch_size` lanes advance together (same positions). Logits equal those of `DSMR.forward`
    streamed segment by segment from position 0 with a fresh state.

    A one-token `step` has static shapes: it attends over each layer's whole buffer with the unfilled
    slots masked, and reads its fill counts from a tensor, so one graph serves every step. With
    `compile=True` that step (the model's own `MemoryAttention.qkv` / `attend`, see `_decode_step`) is
    compiled with torch.compile once per process and shape: `warm_up()` pays for it up front.

    `state_dtype`: the keys' and values' dtype (default the model's); attention runs in the model's dtype.

    `fused`: where dsmr.kernels can run the model (a CPU model made by `half_weight_model` or
    `int8_weight_model`, see `fused_step_params`), a step is one call of its whole-step op, which needs no
    compiling and is faster than the compiled step; `compile` then has no effect. The op reads the
    weights and gates as they are when the decoder is made. `step_kind` says which step runs.
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
            kernels.load()  # the one-token attention (and half_linear) of dsmr.kernels; built once per machine
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
        self._fused = fused_step_params(model) if fused and self.state_dtype in (torch.float16, torch.float32) else None
        self.compiled = bool(compile) and self._fused is None
        self._step_fn = _compiled_step() if self.compiled else _decode_step
        self.reset()

    @property
    def step_kind(self) -> str:
        """The one-token step in use: "fused" (dsmr.kernels' whole-step op), "compiled" or "eager"."""
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
        params, scales, rmsnorm, eps = self._fused
        cfg = self.model.cfg
        return kernels.decode_step(ids, self.model.embedding.weight, params, scales, keys, values, self.memory_fill,
                                   self.seg_fill, *self._rope, cfg.n_heads, cfg.ff_dim, rmsnorm, eps)

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
        B, n = ids.shape
        t = self.seg_fill
        cos, sin = self._rope
        cos, sin = cos.narrow(2, t, n), sin.narrow(2, t, n)
        x = self.model.embed(ids)
        for layer, block in enumerate(self.model.blocks):
            # the model's own attention (MemoryAttention.qkv / attend) over this layer's buffers
            q, k, v = block.attn.qkv(block.norm1(x), rope=(cos, sin))
            memory = self.memory_fill[layer]
            start = memory + t
            end = start + n
            self.keys[layer].narrow(2, start, n).copy_(_storable(k, self.state_dtype))
            self.values[layer].narrow(2, start, n).copy_(_storable(v, self.state_dtype))
            mask = None if n == 1 else self._mask(memory, t, n)
            keys, values = (buf.narrow(2, 0, end).to(q.dtype) for buf in (self.keys[layer], self.values[layer]))
            x = x + block.attn.attend(q, keys, values, mask, n_memory=memory)
            x = block.feed_forward(x)
        self.seg_fill += n
        self.position += n
        return x

    def _mask(self, memory: int, t: int, n: int) -> Tensor:
        """Additive mask [1, 1, n, memory + t + n] for n queries at segment offsets t..t+n-1: the rows t..
        of a full segment's mask (one query alone sees every filled slot and needs none)."""
        valid = torch.ones(1, memory, dtype=torch.bool, device=self.device)
        return attention_mask(valid, None, t + n, self.dtype)[:, :, t:]


def _decode_step(model, ids: Tensor, fill: Tensor, rope: tuple[Tensor, Tensor], keys: list, values: list) -> Tensor:
    """One token per lane (ids [B, 1]) through the blocks, with static shapes: the same code for every
    step, eager or compiled. `fill` = [segment offset t, memory fill of each layer] (advanced here by one);
    each layer writes its key/value at slot memory + t of its buffer and attends over the whole buffer,
    slots after the new one masked. Returns the next-token logits [B, vocab]."""
    t = fill[0]
    cos, sin = (table.index_select(2, t.view(1)) for table in rope)
    x = model.embed(ids)
    for layer, block in enumerate(model.blocks):
        # the model's own attention (MemoryAttention.qkv / attend), as in IncrementalDecoder.feed
        q, k, v = block.attn.qkv(block.norm1(x), rope=(cos, sin))
        memory = fill[1 + layer]
        slot = (memory + t).view(1)
        keys[layer].index_copy_(2, slot, _storable(k, keys[layer].dtype))
        values[layer].index_copy_(2, slot, _storable(v, values[layer].dtype))
        filled = torch.arange(keys[layer].shape[2], device=ids.device) <= slot
        mask = torch.where(filled, 0.0, float("-inf")).to(q.dtype).view(1, 1, 1, -1)
        # a float16 state is widened inside the attention kernels (dsmr.kernels or inductor's), never stored
        x = x + block.attn.attend(q, keys[layer], values[layer], mask, n_memory=memory)
        x = block.feed_forward(x)
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


class HalfWeightLinear(nn.Module):
    """A bias-free Linear whose weight is kept in float16; activations stay float32 around it.

    One-token decoding on a CPU is bound by reading the weights from memory for every token: half the
    bytes, about twice the speed (fp16 GEMV is also well supported by the CPU BLAS, unlike bf16).
    Chunks of many tokens (a prompt) are compute-bound instead, and CPUs multiply float32 faster: there
    the weight is widened to float32 once per call, which is exact.
    """

    MATRIX_ROWS = 8  # from this many tokens per call on, multiply in float32
    PACKED_DTYPE = torch.float16

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise DsmrError("HalfWeightLinear: linear layers with a bias are not supported")
        self.register_buffer("weight", linear.weight.detach().to(torch.float16))
        # dsmr.kernels' layout of the same weight, for few rows on a CPU (not saved; None without the kernels).
        # Loading a state dict packs again; an in-place edit of `weight` must call repack().
        self.register_buffer("packed", None, persistent=False)
        self.repack()
        self.register_load_state_dict_post_hook(lambda module, keys: module.repack())

    KERNEL_ROWS = 32  # below this many rows, dsmr.kernels' half_linear where it is loaded

    def repack(self) -> None:
        usable = kernels.loaded() and self.weight.device.type == "cpu" and self.weight.dtype == torch.float16
        self.packed = kernels.pack_half(self.weight) if usable else None

    def forward(self, x: Tensor) -> Tensor:
        if (self.packed is not None and self.packed.dtype == torch.float16  # not after .float() / .double()
                and x.numel() < self.KERNEL_ROWS * x.shape[-1] and kernels.usable_for(x, self.packed)):
            return kernels.half_linear(x, self.packed, self.weight.shape[0])
        if x.device.type == "cpu" and x.numel() >= self.MATRIX_ROWS * x.shape[-1]:
            return F.linear(x, self.weight.to(x.dtype))
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)  # float16 unless .float() widened it


def fused_step_params(model) -> Optional[tuple[list[Tensor], list[Tensor], bool, float]]:
    """What dsmr.kernels' whole-step op (`kernels.decode_step`) needs of `model`: its tensors in the op's
    order, the int8 weights' scales (empty for float16), whether the norms are RMSNorm, and their eps; None
    where the op cannot run the model. It runs a CPU model from `half_weight_model` or `int8_weight_model`
    (every projection packed, float32 embedding and norms) with exact GELU and one kind of norm of one eps,
    with the kernels loaded. The gates' memory bias is taken now: it is a constant at inference."""
    table = model.embedding.weight
    if not kernels.loaded() or table.device.type != "cpu" or table.dtype != torch.float32 or table.shape[1] % 8:
        return None
    norms = [n for block in model.blocks for n in (block.norm1, block.norm2)] + [model.norm]
    if any(not isinstance(n, (nn.LayerNorm, nn.RMSNorm)) for n in norms):
        return None
    rmsnorm = isinstance(norms[0], nn.RMSNorm)
    eps = {n.eps if n.eps is not None else torch.finfo(torch.float32).eps for n in norms}
    if len(eps) != 1 or any(type(n) is not type(norms[0]) or n.weight is None or n.weight.dtype != torch.float32
                            for n in norms):
        return None
    if not rmsnorm and any(n.bias is None for n in norms):  # all LayerNorm here (one type, checked above)
        return None
    linears = [m for block in model.blocks
               for m in (block.attn.qkv_proj, block.attn.out_proj, block.mlp[0], block.mlp[2])] + [model.head]
    kind = type(linears[0])
    if kind not in (HalfWeightLinear, Int8WeightLinear) or any(
            type(m) is not kind or m.packed is None or m.packed.dtype != m.PACKED_DTYPE for m in linears):
        return None
    if any(len(block.mlp) != 3 or not isinstance(block.mlp[1], nn.GELU) or block.mlp[1].approximate != "none"
           for block in model.blocks):
        return None
    if kind is Int8WeightLinear and any(m.packed_scale.dtype != torch.float32 for m in linears):
        return None
    empty = table.new_zeros(0)
    params = []
    for block in model.blocks:
        gate = block.attn.memory_bias()
        if gate is not None and gate.dtype != torch.float32:
            return None
        params += [block.norm1.weight, empty if rmsnorm else block.norm1.bias, block.attn.qkv_proj.packed,
                   block.attn.out_proj.packed, block.norm2.weight, empty if rmsnorm else block.norm2.bias,
                   block.mlp[0].packed, block.mlp[2].packed, empty if gate is None else gate.float()]
    params += [model.norm.weight, empty if rmsnorm else model.norm.bias, model.head.packed]
    scales = [m.packed_scale for m in linears] if kind is Int8WeightLinear else []
    return [p.detach().contiguous() for p in params], scales, rmsnorm, float(eps.pop())


class Int8WeightLinear(nn.Module):
    """A bias-free Linear whose weight is kept in int8 with one float32 scale per output row (symmetric: the
    row's largest |w| maps to 127). A quarter of float32's bytes, half of float16's: a one-token step reads
    every weight, and on a CPU with a small cache the default model's 9.6 MB of float16 weights plus a lane's
    state spill to main memory where its 4.8 MB of int8 weights do not (docs/generation.md, "int8 weights").
    Few rows go through dsmr.kernels' int8_linear (each row's activations rounded to int16, exact int32
    sums); many rows (a prompt), or any row without the kernels, through a float32 product with the
    dequantized weight.
    """

    KERNEL_ROWS = 32  # below this many rows, dsmr.kernels' int8_linear where it is loaded
    PACKED_DTYPE = torch.int8

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise DsmrError("Int8WeightLinear: linear layers with a bias are not supported")
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("packed", None, persistent=False)  # dsmr.kernels' layouts (None without them)
        self.register_buffer("packed_scale", None, persistent=False)
        self.repack()
        self.register_load_state_dict_post_hook(lambda module, keys: module.repack())

    def repack(self) -> None:
        usable = kernels.loaded() and self.weight.device.type == "cpu" and self.weight.dtype == torch.int8
        packed = kernels.pack_int8(self.weight, self.scale) if usable else None
        self.packed, self.packed_scale = packed if packed is not None else (None, None)

    def dequantized(self) -> Tensor:
        """The float32 weight the int8 one stands for."""
        return self.weight.float() * self.scale[:, None].float()

    def forward(self, x: Tensor) -> Tensor:
        if (self.packed is not None and self.packed_scale.dtype == torch.float32
                and x.numel() < self.KERNEL_ROWS * x.shape[-1] and kernels.usable_for(x, self.packed_scale)):
            return kernels.int8_linear(x, self.packed, self.packed_scale, self.weight.shape[0])
        return F.linear(x, self.dequantized().to(x.dtype))


def half_weight_model(model):
    """A copy of `model` for fast CPU decoding: every Linear (projections, MLP, output head) keeps float16
    weights; embeddings, norms, attention and the key/value memory stay float32. Logits differ from the
    float32 model by float16 rounding (~1e-3 relative), which does not matter for sampling."""
    return _with_linears(model, HalfWeightLinear)


def int8_weight_model(model):
    """A copy of `model` whose Linears keep int8 weights with per-row scales (`Int8WeightLinear`); the rest
    as in `half_weight_model`. Faster than float16 on a CPU whose cache cannot hold the float16 weights
    and a lane's state; the rounding costs a little likelihood (docs/generation.md, "int8 weights")."""
    return _with_linears(model, Int8WeightLinear)


def default_cpu_precision(model) -> str:
    """What `--precision auto` means on a CPU: "int8" where dsmr.kernels load and can run the model's int8
    products (every Linear's inputs a multiple of 16): on the shipped model about twice float16's sampling
    speed for +0.02% validation perplexity (docs/generation.md). Else "float16": without the int8 kernel a
    product dequantizes its whole weight every call."""
    kernels.load()
    int8_ready = all(m.in_features % 16 == 0 for m in model.modules() if isinstance(m, nn.Linear))
    return "int8" if kernels.loaded() and int8_ready else "float16"


def with_precision(model, precision: str):
    """`model` with its projection weights as `precision` keeps them for decoding: "float32" (the model
    itself), "float16" (`half_weight_model`) or "int8" (`int8_weight_model`)."""
    converters = {"float32": lambda m: m, "float16": half_weight_model, "int8": int8_weight_model}
    if precision not in converters:
        raise DsmrError(f"precision must be one of {', '.join(converters)}, got {precision!r}")
    return converters[precision](model)


def _with_linears(model, linear_class):
    model = copy.deepcopy(model).eval()
    if model.embedding.weight.device.type == "cpu":
        kernels.load()  # built once per machine; the PyTorch path where it cannot be
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, linear_class(child))
    return model


# ------------------------------------------------------------------------------------------------ sampling


@dataclass
class SamplingConfig:
    temperature: float = 1.0       # 0: greedy (always the most likely event)
    top_k: int = 0                 # keep the k most likely events (0: all)
    top_p: float = 1.0             # keep the smallest set of events whose probability reaches p
    seed: Optional[int] = None     # None: a fresh random seed (reported in the result)
    max_tokens: Optional[int] = 2048   # new events after the prompt (None: no limit)
    max_seconds: Optional[float] = None  # stop once the piece (prompt included) is this long
    stop_at_eos: bool = True       # False: EOS is banned and the piece goes on until a limit
    banned_ids: Sequence[int] = ()  # events never sampled (BOS and PAD never are)
    # the note guard (dsmr.note_guard; encodings with NOTE_OFF events): no note longer than this, no more
    # notes sounding at once than that; either one turns the guard on
    max_note_seconds: Optional[float] = None
    max_polyphony: Optional[int] = None

    @property
    def guards_notes(self) -> bool:
        return self.max_note_seconds is not None or self.max_polyphony is not None

    def validate(self, vocab_size: Optional[int] = None) -> None:
        problems = []
        if not self.temperature >= 0 or not math.isfinite(self.temperature):
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            problems.append(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            problems.append(f"max_seconds must be > 0, got {self.max_seconds}")
        if self.max_tokens is None and self.max_seconds is None:
            problems.append("give max_tokens or max_seconds (or both): a piece needs a limit")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            problems.append(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        problems += check_guard_options(self.max_note_seconds, self.max_polyphony)
        if vocab_size is not None:
            bad = [i for i in self.banned_ids if not 0 <= int(i) < vocab_size]
            if bad:
                problems.append(f"banned ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
        if problems:
            raise DsmrError("sampling: " + "; ".join(problems))


def banned_mask(tokenizer, sampling: SamplingConfig, device=None) -> Tensor:
    """Bool [vocab] of events that are never sampled: PAD, BOS, the banned ids, EOS when ignored."""
    mask = torch.zeros(tokenizer.vocab_size, dtype=torch.bool, device=device)
    banned = [tokenizer.pad_id, tokenizer.bos_id, *map(int, sampling.banned_ids)]
    if not sampling.stop_at_eos:
        banned.append(tokenizer.eos_id)
    mask[banned] = True
    if bool(mask.all()):
        raise DsmrError("sampling: every event is banned, nothing can be generated")
    return mask


def pitch_range_bans(tokenizer, min_pitch: int = 0, max_pitch: int = 127) -> list[int]:
    """Ids of the note-starting events whose pitch lies outside [min_pitch, max_pitch]."""
    if not 0 <= min_pitch <= max_pitch <= 127:
        raise DsmrError(f"pitch range: need 0 <= min pitch <= max pitch <= 127, got {min_pitch}..{max_pitch}")
    banned, seen = [], 0
    for i in range(tokenizer.vocab_size):
        pitch = tokenizer.note_pitch(i)
        if pitch is not None:
            seen += 1
            if not min_pitch <= pitch <= max_pitch:
                banned.append(i)
    if not seen:
        raise DsmrError(f"pitch range: {tokenizer!r} has no NOTE_ON/Pitch events to restrict")
    if len(banned) == seen:
        raise DsmrError(f"pitch range {min_pitch}..{max_pitch} excludes every pitch the tokenizer can play")
    return banned


def pitch_bans(tokenizer, min_pitch: int, max_pitch: int) -> tuple[int, ...]:
    """The ids a pitch range bans, as `dsmr generate` and the app apply it: none for the whole range, or for an
    encoding whose ids name no pitch (nothing to restrict); otherwise pitch_range_bans'."""
    pitchless = all(tokenizer.note_pitch(i) is None for i in range(tokenizer.vocab_size))
    if (min_pitch, max_pitch) == (0, 127) or pitchless:
        return ()
    return tuple(pitch_range_bans(tokenizer, min_pitch, max_pitch))


def sample_next(logits: Tensor, sampling: SamplingConfig, generator, banned: Optional[Tensor] = None) -> Tensor:
    """One event per lane from next-token logits [B, vocab]: ban, temperature, top-k, top-p, sample.
    `generator`: one torch.Generator for all lanes, or a list of one per lane (each lane then draws
    from its own seed only)."""
    logits = logits.float()
    if banned is not None:
        logits = logits.masked_fill(banned, float("-inf"))
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    if sampling.temperature != 1.0:  # the largest logit at 0 first: a tiny temperature cannot overflow
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop an event when the more likely ones already reach top_p (the most likely always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= sampling.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    # One uniform draw per lane through the cumulative distribution: torch.multinomial costs ~50 us per call
    # on a CPU (an exponential draw per event of the vocabulary), as much as a whole decoding step
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    if not bool(torch.isfinite(cdf[:, -1]).all()):
        raise DsmrError("sampling: the model gave non-finite logits (NaN or inf); its weights are damaged or "
                        "diverged")
    cdf = cdf / cdf[:, -1:]  # ends at exactly 1 > u: the event found has a probability > 0
    if isinstance(generator, (list, tuple)):
        if len(generator) != cdf.shape[0]:
            raise DsmrError(f"sample_next: {len(generator)} generators for {cdf.shape[0]} lanes")
        u = torch.cat([torch.rand(1, 1, generator=g, device=cdf.device) for g in generator])
    else:
        u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device)
    return torch.searchsorted(cdf, u, right=True)[:, 0]


# ------------------------------------------------------------------------------------------------ prompts


def crop_seconds(score, seconds: float):
    """The first `seconds` of a Score (in seconds): notes starting later are dropped, notes sounding at
    the cut end there, and controls (the sustain pedal) after the cut are dropped."""
    import symusic

    if not seconds > 0:
        raise DsmrError(f"prompt seconds must be > 0, got {seconds}")
    cropped = score.to("second").clip(0.0, float(seconds), clip_end=False)
    for track in cropped.tracks:
        if len(track.notes):
            notes = track.notes.numpy()
            duration = np.minimum(notes["duration"], np.float32(seconds) - notes["time"])
            track.notes = symusic.Note.from_numpy(notes["time"], duration.astype(np.float32), notes["pitch"],
                                                  notes["velocity"], ttype="second")
    return cropped


def load_prompt(path, tokenizer, seconds: Optional[float] = None) -> np.ndarray:
    """Event ids of a MIDI prompt (optionally only its first `seconds`); DsmrError when it is missing,
    not MIDI, or has nothing the tokenizer can encode."""
    from dsmr.tokenizer import load_midi

    score = load_midi(path)
    where = f"prompt {path}"
    if seconds is not None:
        score = crop_seconds(score, seconds)
        where += f" (first {seconds:g} s)"
    ids = tokenizer.encode(score)
    if len(ids) == 0:
        raise DsmrError(f"{where} has no notes the tokenizer can encode: give a MIDI file with notes"
                        + (" or a longer --prompt-seconds" if seconds is not None else ""))
    return np.asarray(ids, dtype=np.int64)


class MusicClock:
    """Seconds of music of a growing id sequence, cheaply. Where the tokenizer gives every id a fixed length
    (`event_seconds`, e.g. the performance encoding's time shifts) a per-id table suffices; other tokenizers
    re-measure every `every` events."""

    def __init__(self, tokenizer, ids: Sequence[int] = (), every: int = 64):
        self.tokenizer = tokenizer
        self.every = every
        table = [tokenizer.event_seconds(i) for i in range(tokenizer.vocab_size)]
        self._table = None if any(t is None for t in table) else table
        self.seconds = float(tokenizer.seconds(list(ids))) if len(ids) else 0.0
        self._since = 0

    def add(self, token: int, ids: Sequence[int]) -> float:
        """Account for `token`, just appended to `ids` (the whole sequence so far); returns the seconds."""
        if self._table is not None:
            self.seconds += self._table[token]
        else:
            self._since += 1
            if self._since >= self.every:
                self.seconds = float(self.tokenizer.seconds(ids))
                self._since = 0
        return self.seconds


# ---------------------------------------------------------------------------------------------- generation


@dataclass
class GenerationResult:
    ids: np.ndarray              # events of the piece: prompt then continuation (no BOS/EOS)
    prompt_tokens: int
    new_tokens: int
    prompt_seconds: float
    music_seconds: float         # whole piece, prompt included
    stop_reason: str             # "eos" | "max_tokens" | "max_seconds" | "interrupted" (Ctrl-C)
    wall_seconds: float          # prompt + sampling (of the whole batch: lanes run together)
    prefill_seconds: float       # the prompt alone
    sampling_cpu_seconds: float  # CPU time of this process while sampling (prompt excluded)
    state_bytes: int             # the decoder's key/value buffers (constant; all lanes)
    peak_memory_bytes: int
    memory_method: str
    seed: int
    warmup_seconds: float = 0.0  # compiling / first run of the decoding step, before the clock starts
    num_samples: int = 1         # lanes sampled together (this result is one of them)
    sample_index: int = 0
    compiled: bool = False       # the decoding step ran compiled (torch.compile)
    decoding_step: str = "eager"  # IncrementalDecoder.step_kind: "fused", "compiled" or "eager"
    new_notes: int = 0           # notes started after the prompt (0: nothing new to hear)
    guard_forced: int = 0        # draws where the note guard allowed only note-offs (all lanes of the batch)

    @property
    def warning(self) -> Optional[str]:
        """What a user should be told about this sample: nothing new to hear."""
        if self.new_notes == 0:
            how = "the model ended the piece at once" if self.stop_reason == "eos" else "no note was started"
            return (f"no new notes after the prompt ({how}; {self.new_tokens} new events, stopped at "
                    f"{self.stop_reason.replace('_', ' ')}): try another seed"
                    + (", or generate to the length asked without stopping at the end-of-piece event"
                       if self.stop_reason == "eos" else ""))
        return None

    @property
    def tokens_per_s(self) -> float:
        """New events of this sample per second of sampling (prompt excluded)."""
        return self.new_tokens / max(self.wall_seconds - self.prefill_seconds, 1e-9)

    @property
    def realtime_factor(self) -> float:
        """Seconds of new music per second of sampling."""
        return (self.music_seconds - self.prompt_seconds) / max(self.wall_seconds - self.prefill_seconds, 1e-9)

    def summary(self) -> dict:
        return {
            "tokens": self.new_tokens, "prompt_tokens": self.prompt_tokens,
            "music_seconds": round(self.music_seconds, 3), "prompt_seconds": round(self.prompt_seconds, 3),
            "wall_seconds": round(self.wall_seconds, 3), "tokens_per_s": round(self.tokens_per_s, 1),
            "realtime_factor": round(self.realtime_factor, 2), "state_bytes": self.state_bytes,
            "peak_memory_bytes": self.peak_memory_bytes, "memory_method": self.memory_method,
            "stop_reason": self.stop_reason, "seed": self.seed,
            "prefill_seconds": round(self.prefill_seconds, 3), "warmup_seconds": round(self.warmup_seconds, 3),
            "compiled": self.compiled, "decoding_step": self.decoding_step, "new_notes": self.new_notes,
            "guard_forced": self.guard_forced, "warning": self.warning,
        }


def batch_summary(results: Sequence[GenerationResult]) -> dict:
    """Figures of samples generated together: total new events per second of sampling (all lanes) and
    the per-sample mean."""
    first = results[0]
    sampling_s = max(first.wall_seconds - first.prefill_seconds, 1e-9)
    total = sum(r.new_tokens for r in results)
    return {"num_samples": len(results), "tokens": total, "tokens_per_s": round(total / sampling_s, 1),
            "tokens_per_s_per_sample": round(total / sampling_s / len(results), 1),
            "wall_seconds": round(first.wall_seconds, 3), "prefill_seconds": round(first.prefill_seconds, 3),
            "warmup_seconds": round(first.warmup_seconds, 3), "state_bytes": first.state_bytes,
            "peak_memory_bytes": first.peak_memory_bytes, "compiled": first.compiled,
            "decoding_step": first.decoding_step,
            "seeds": [r.seed for r in results]}


def decoding_state_dtype(model, compile: bool) -> Optional[torch.dtype]:
    """float16 keys/values for a float16- or int8-weight model on a CPU (`half_weight_model`,
    `int8_weight_model`) where its steps widen them inside a kernel (dsmr.kernels' attention, or the compiled
    step's), else the model's dtype (None).
    Every step reads the whole state: half the bytes, x1.4 for 16 lanes on 2 threads (docs/generation.md).
    An eager step without dsmr.kernels would widen the whole state into a copy every step (x0.5 there), and
    a float32 model keeps a float32 state."""
    on_cpu = model.embedding.weight.device.type == "cpu"
    half = any(isinstance(m, (HalfWeightLinear, Int8WeightLinear)) for m in model.modules())
    return torch.float16 if (compile or kernels.loaded()) and on_cpu and half else None


def compile_available(device) -> bool:
    """Whether `compile="auto"` compiles the decoding step here: on a CPU with a C++ compiler (inductor's
    CPU backend). On CUDA the compiled step (and CUDA graphs) is not measured yet: ask for it explicitly."""
    import shutil

    return torch.device(device).type == "cpu" and any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def generate(model, tokenizer, segment_len: int, prompt_ids: Optional[Sequence[int]] = None,
             sampling: SamplingConfig = SamplingConfig(), progress: bool = True, compile=False,
             fused: bool = True) -> GenerationResult:
    """Sample one piece: BOS, the prompt's events, then new events until EOS or a limit.

    Runs where the model is; the model is put in eval mode. The same seed on the same device gives the
    same piece. `compile`: True compiles the decoding step (paid once per process, `warmup_seconds`),
    "auto" where `compile_available`. `fused`: dsmr.kernels' whole-step op where it can run the model
    (`IncrementalDecoder`); it then replaces the compiled step.
    """
    return generate_batch(model, tokenizer, segment_len, prompt_ids, sampling, 1, progress, compile, fused)[0]


def generate_batch(model, tokenizer, segment_len: int, prompt_ids: Optional[Sequence[int]] = None,
                   sampling: SamplingConfig = SamplingConfig(), num_samples: int = 1, progress: bool = True,
                   compile=False, fused: bool = True) -> list[GenerationResult]:
    """Sample `num_samples` continuations of one prompt together, as lanes of one decoder: the prompt is
    fed once, each lane draws from its own seed (`sampling.seed + i`, recorded in its result) and stops at
    its own EOS or limit; the batch ends when every lane has stopped. Lanes that stopped keep running
    (their events are discarded) until the last one ends.

    The same seed and `num_samples` on the same device give the same pieces.
    """
    from dsmr.runtime import PeakMemory

    prompt = _checked_prompt(model, tokenizer, prompt_ids, sampling, num_samples)
    device = model.embedding.weight.device
    if compile == "auto":
        compile = compile_available(device)
    model.eval()
    B = num_samples
    base = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(7), "little")
    seeds = [(base + i) % 2**63 for i in range(B)]
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    banned = banned_mask(tokenizer, sampling, device=device)[None]
    lanes = _Lanes(tokenizer, sampling, prompt, B, progress)
    guard = None
    if sampling.guards_notes:
        guard = NoteGuard(tokenizer, B, sampling.max_note_seconds, sampling.max_polyphony, device=device)
        guard.feed(prompt.tolist())
    with PeakMemory(device) as meter, torch.inference_mode():
        decoder = IncrementalDecoder(model, segment_len, batch_size=B, device=device, compile=bool(compile),
                                     state_dtype=decoding_state_dtype(model, bool(compile)), fused=fused)
        warmup = decoder.warm_up()  # compiles the step once; not part of the timed generation
        start = time.perf_counter()
        logits = _prefill(decoder, tokenizer, prompt)
        prefill = time.perf_counter() - start
        cpu_start = time.process_time()
        _sample_lanes(decoder, logits, lanes, sampling, generators[0] if B == 1 else generators, banned, guard)
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
    lanes.close_bar()
    timing = dict(wall_seconds=wall, prefill_seconds=prefill, sampling_cpu_seconds=cpu, warmup_seconds=warmup,
                  state_bytes=decoder.state_bytes(), peak_memory_bytes=meter.peak_bytes,
                  memory_method=meter.method, compiled=decoder.compiled, decoding_step=decoder.step_kind,
                  guard_forced=guard.forced_events if guard is not None else 0)
    return [lanes.result(i, seeds[i], timing) for i in range(B)]


def _checked_prompt(model, tokenizer, prompt_ids, sampling: SamplingConfig, num_samples) -> np.ndarray:
    """The prompt as an int64 array, after checking the model, tokenizer, sampling and batch size agree."""
    if model.cfg.vocab_size != tokenizer.vocab_size:
        raise DsmrError(f"model vocabulary {model.cfg.vocab_size} != tokenizer vocabulary {tokenizer.vocab_size}: "
                        f"use the tokenizer the model was trained with")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise DsmrError(f"num_samples must be a positive integer, got {num_samples!r}")
    sampling.validate(tokenizer.vocab_size)
    prompt = np.asarray([] if prompt_ids is None else prompt_ids, dtype=np.int64)
    if prompt.ndim != 1 or (prompt.size and (prompt.min() < 0 or prompt.max() >= tokenizer.vocab_size)):
        raise DsmrError(f"prompt ids must be a flat sequence of ids in [0, {tokenizer.vocab_size})")
    return prompt


def _prefill(decoder: "IncrementalDecoder", tokenizer, prompt: np.ndarray) -> Tensor:
    """Feed BOS and the prompt into every lane of `decoder`; returns the next-event logits [B, vocab]. With
    several lanes the prompt runs once through a one-lane decoder, then is copied into every lane."""
    first = torch.tensor([[tokenizer.bos_id, *prompt.tolist()]], dtype=torch.long, device=decoder.device)
    if decoder.batch_size == 1:
        return decoder.feed(first, last_only=True)
    one = IncrementalDecoder(decoder.model, decoder.segment_len, batch_size=1, device=decoder.device,
                             state_dtype=decoder.state_dtype)  # the same rounding as one lane fed alone
    logits = one.feed(first, last_only=True).expand(decoder.batch_size, -1)
    decoder.load_lane(one)
    return logits


def _sample_lanes(decoder: "IncrementalDecoder", logits: Tensor, lanes: "_Lanes", sampling: SamplingConfig,
                  generator, banned: Tensor, guard: Optional[NoteGuard] = None) -> None:
    """Sample, record and step until every lane has stopped (or Ctrl-C: the live lanes stop 'interrupted')."""
    step_input = torch.zeros(decoder.batch_size, dtype=torch.long, device=decoder.device)
    try:
        while True:
            ban = banned
            if guard is not None:
                ban = banned | guard.banned()
                stuck = ban.all(dim=-1, keepdim=True)  # the user's bans and the guard's leave nothing
                ban = torch.where(stuck, banned, ban)
            tokens = sample_next(logits, sampling, generator, ban)
            if guard is not None:
                guard.update(tokens)
            if lanes.record(tokens.tolist()) == 0:
                return
            step_input.copy_(tokens)
            logits = decoder.step(step_input)
    except KeyboardInterrupt:  # keep what was generated so far; the caller writes it
        lanes.interrupt()


class _Lanes:
    """What each lane of a batch has written: its events (8 bytes each: all that grows), its music clock,
    its count of new events and why it stopped; and the progress bar of the batch."""

    def __init__(self, tokenizer, sampling: SamplingConfig, prompt: np.ndarray, num_samples: int, progress: bool):
        self.tokenizer, self.sampling, self.prompt = tokenizer, sampling, prompt
        self.pieces = [array("q", prompt.tolist()) for _ in range(num_samples)]
        clock = MusicClock(tokenizer, self.pieces[0])
        self.clocks = [clock] + [copy.copy(clock) for _ in range(num_samples - 1)]
        self.prompt_seconds = clock.seconds
        self.stop: list[Optional[str]] = [None] * num_samples
        self.new = [0] * num_samples
        self.live = num_samples
        self.bar = _progress_bar(progress, sampling, self.prompt_seconds, num_samples)
        self.starts_note = np.array([tokenizer.note_pitch(i) is not None for i in range(tokenizer.vocab_size)])

    def record(self, tokens: list[int]) -> int:
        """Append each live lane's sampled event, stop the lanes that reach EOS or a limit; returns how
        many lanes are still live."""
        limit_tokens, max_seconds = self.sampling.max_tokens, self.sampling.max_seconds
        for i, token in enumerate(tokens):
            if self.stop[i] is not None:
                continue
            if token == self.tokenizer.eos_id:  # only reachable with stop_at_eos (else EOS is banned)
                self.stop[i], self.live = "eos", self.live - 1
                continue
            self.pieces[i].append(token)
            self.new[i] += 1
            before = self.clocks[i].seconds
            seconds = self.clocks[i].add(token, self.pieces[i])
            if self.bar is not None:
                self._advance_bar(i, before, seconds)
            if limit_tokens is not None and self.new[i] >= limit_tokens:
                self.stop[i], self.live = "max_tokens", self.live - 1
            elif max_seconds is not None and seconds >= max_seconds:
                self.stop[i], self.live = "max_seconds", self.live - 1
        return self.live

    def _advance_bar(self, lane: int, before: float, seconds: float) -> None:
        bar, limit_tokens = self.bar, self.sampling.max_tokens
        if limit_tokens is not None or len(self.pieces) > 1:
            bar.update(1)
        else:  # the bar counts seconds of music; never past its total
            bar.update(min(seconds, bar.total) - min(before, bar.total))
        if lane == 0 and self.new[0] % 64 == 0:
            bar.set_postfix_str(_postfix(self.new[0], seconds, limit_tokens), refresh=False)

    def interrupt(self) -> None:
        self.stop = [s if s is not None else "interrupted" for s in self.stop]

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(_postfix(self.new[0], self.clocks[0].seconds, self.sampling.max_tokens))
            self.bar.close()

    def result(self, i: int, seed: int, timing: dict) -> GenerationResult:
        out = np.frombuffer(self.pieces[i], dtype=np.int64).copy()
        timing = dict(timing, new_notes=int(self.starts_note[out[self.prompt.size:]].sum()))
        return GenerationResult(
            ids=out, prompt_tokens=int(self.prompt.size), new_tokens=self.new[i],
            prompt_seconds=self.prompt_seconds, music_seconds=float(self.tokenizer.seconds(out)) if out.size else 0.0,
            stop_reason=self.stop[i], seed=seed, num_samples=len(self.pieces), sample_index=i, **timing)


def _progress_bar(progress: bool, sampling: SamplingConfig, prompt_seconds: float, num_samples: int = 1):
    if not progress:
        return None
    from tqdm import tqdm

    if num_samples > 1:  # events of all lanes
        total = sampling.max_tokens * num_samples if sampling.max_tokens is not None else None
        return tqdm(total=total, unit="tok", desc=f"generating {num_samples}", dynamic_ncols=True)
    if sampling.max_tokens is not None:
        return tqdm(total=sampling.max_tokens, unit="tok", desc="generating", dynamic_ncols=True)
    # Only a duration limit: the bar counts seconds of music.
    return tqdm(total=round(sampling.max_seconds, 2), initial=round(min(prompt_seconds, sampling.max_seconds), 2),
                unit="s", desc="generating", dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s of music [{elapsed}{postfix}]")


def _postfix(tokens: int, seconds: float, limit_tokens: Optional[int]) -> str:
    return f"{seconds:.1f} s of music" if limit_tokens is not None else f"{tokens} tokens"
