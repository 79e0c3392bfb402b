"""The DSMR network: a pre-norm decoder-only Transformer that reads a piece segment by segment and keeps,
per layer `l`, a detached window of at most `h_l` past positions: keys/values, or layer inputs (docs/design.md).

For segment `s` in layer `l`:  K = concat(mem_K[l], k_s), V likewise; token i attends to every valid
memory entry of its lane and to segment tokens j <= i; the new memory is the last h_l positions of
concat(mem, kv_s), detached. Keys are cached after the rotary embedding, so they keep absolute positions.

The block's math is written once, in `Block.forward`; what differs between training and decoding is only
where keys and values are kept, a `BlockMemory`: `SegmentMemory` here (a detached state per segment), the
incremental decoder's fixed buffers in dsmr.generation. `DSMR.embed` / `DSMR.output` are the ends of the
stack, `RotaryEmbedding` gives cos/sin for any absolute positions (docs/architecture.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsmr import kernels
from dsmr.errors import DsmrError
from dsmr.model_config import DSMRConfig  # noqa: F401  (re-exported: `from dsmr.model import DSMRConfig`)

# Bias of a hard-closed STE gate: exp(-1000) underflows to exactly 0, so the memory is dropped, yet the
# value stays finite (an -inf key component would give 0 * inf = NaN in the attention backward).
CLOSED_GATE_BIAS = -1000.0


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


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) for arbitrary absolute positions, one per token and lane.

    `rotary_dims` < head_dim rotates only the first rotary_dims dims of each head (partial rotary); the
    others carry content without position."""

    def __init__(self, head_dim: int, base: float = 10000.0, rotary_dims: Optional[int] = None):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dims = head_dim if rotary_dims is None else rotary_dims
        dims = self.rotary_dims
        # float64 so that angles stay exact at the positions of long pieces (~1e5); not in checkpoints
        inv_freq = 1.0 / (base ** (torch.arange(0, dims, 2, dtype=torch.float64) / dims))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [B, T] long -> (cos, sin), each [B, 1, T, rotary_dims] float32 (broadcast over heads)."""
        wide = torch.float32 if positions.device.type == "mps" else torch.float64
        angles = positions.to(wide)[..., None] * self.inv_freq.to(wide)  # [B, T, rotary_dims / 2]
        angles = torch.cat([angles, angles], dim=-1)[:, None]
        return angles.cos().float(), angles.sin().float()

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Apply the rotation to x [..., D] (rotate-half convention) on its first cos.shape[-1] dims."""
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        r = cos.shape[-1]
        if r < x.shape[-1]:
            return torch.cat([RotaryEmbedding.rotate(x[..., :r], cos, sin), x[..., r:]], dim=-1)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attention_mask(memory_valid: Tensor, token_mask: Optional[Tensor], seg_len: int, dtype: torch.dtype) -> Tensor:
    """Additive mask [B, 1, T, M + T]: 0 where allowed, -inf elsewhere.

    Query i sees every valid memory slot and segment keys j <= i that are real tokens; it always sees
    itself, so no row is fully masked (padding queries get finite, meaningless outputs).
    """
    B, M = memory_valid.shape
    device = memory_valid.device
    causal = torch.ones(seg_len, seg_len, dtype=torch.bool, device=device).tril()
    if token_mask is None:
        seg = causal.expand(B, seg_len, seg_len)
    else:
        eye = torch.eye(seg_len, dtype=torch.bool, device=device)
        seg = causal & (token_mask[:, None, :] | eye)
    allowed = torch.cat([memory_valid[:, None, :].expand(B, seg_len, M), seg], dim=-1)
    mask = torch.zeros(B, 1, seg_len, M + seg_len, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed[:, None], float("-inf"))


class MemoryAttention(nn.Module):
    """Causal self-attention over [memory; segment], with an optional learned gate on the memory.

    `qkv` projects a chunk, `attend` attends over keys/values the caller's memory provides (`Block`)."""

    def __init__(self, cfg: DSMRConfig, layer: int):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.horizon = cfg.horizons[layer]
        self.dropout = cfg.dropout
        self.gate_kind = cfg.gate
        self.hidden_memory = cfg.memory == "hidden"
        self.qkv_proj = nn.Linear(cfg.d_model, 3 * cfg.attn_dim, bias=False)
        self.out_proj = nn.Linear(cfg.attn_dim, cfg.d_model, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_base, cfg.rotary_dims)
        if cfg.gate != "none":
            n_gates = cfg.n_heads if cfg.gate_per_head else 1
            self.gate_logit = nn.Parameter(torch.full((n_gates,), float(cfg.gate_init)))
        else:
            self.gate_logit = None

    def qkv(self, x: Tensor, positions: Optional[Tensor] = None, *, rope: Optional[tuple[Tensor, Tensor]] = None):
        """Queries, keys, values [B, H, T, D] of a chunk x [B, T, d_model] (already normalised); q and k
        rotated to their absolute positions (pass `positions` [B, T], or `rope` = RotaryEmbedding(positions)
        to share it)."""
        if rope is None:
            if positions is None:
                raise ValueError("qkv needs positions or rope")
            rope = self.rotary(positions)
        B, T, _ = x.shape
        qkv = self.qkv_proj(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        qk = RotaryEmbedding.rotate(qkv[:2], *rope)  # q and k in one call: fewer ops when decoding
        return qk[0], qk[1], qkv[2]

    def kv(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Keys (rotated) and values [B, H, M, D] of normalised layer inputs x [B, M, d_model]: what hidden
        memory recomputes with the current weights each segment."""
        B, M, _ = x.shape
        d = self.n_heads * self.head_dim
        proj = self.qkv_proj
        if isinstance(proj, nn.Linear):  # only the key and value rows of the projection
            kv = F.linear(x, proj.weight[d:])
        else:  # a projection replaced for decoding (dsmr.generation.precision): through its own forward
            kv = proj(x)[..., d:]
        kv = kv.view(B, M, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return RotaryEmbedding.rotate(kv[0], *rope), kv[1]

    def gate(self) -> Optional[Tensor]:
        """sigmoid(theta): [1] per layer or [n_heads] per head; None without gates."""
        return None if self.gate_logit is None else torch.sigmoid(self.gate_logit)

    def memory_bias(self) -> Optional[Tensor]:
        """The additive logit of memory positions, [1] or [n_heads]: log g (soft), or the hard gate with
        the soft gate's gradient (STE: 0 when g > 0.5, else CLOSED_GATE_BIAS); None without gates.

        With STE a closed gate's memory gets zero attention weight, so it receives no task gradient
        (only the budget penalty's): a closed STE gate stays closed."""
        if self.gate_logit is None:
            return None
        soft = F.logsigmoid(self.gate_logit)
        if self.gate_kind == "soft":
            return soft
        hard = torch.where(self.gate_logit > 0, 0.0, CLOSED_GATE_BIAS).to(soft.dtype)
        return soft + (hard - soft).detach()

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], n_memory=0) -> Tensor:
        """Attention of q [B, H, T, D] over k, v [B, H, N, D] whose first `n_memory` positions are memory
        (they get the gate bias); mask [B|1, 1|H, T, N] additive, or None for plain causal attention (N == T)
        or for one query that sees every key. Returns the projected output [B, T, d_model].

        `n_memory` is an int, or (inference only) a 0-d long tensor: the compiled decoding step passes its
        fill counts as tensors so that one graph serves every step."""
        B, H, T, D = q.shape
        if mask is None and k.shape[2] != T and T != 1:
            raise ValueError(f"attend: without a mask keys must match the queries ({k.shape[2]} != {T})")
        bias = self.memory_bias() if isinstance(n_memory, Tensor) or n_memory else None
        if bias is not None and bias.requires_grad:
            q, k, v = _with_gate_column(q, k, v, int(n_memory), bias)
        elif bias is not None:  # inference: the gate is a constant, an additive mask is cheaper
            memory_slot = torch.arange(k.shape[2], device=q.device) < n_memory
            gate = torch.where(memory_slot, bias.to(q.dtype).view(1, -1, 1, 1), 0.0)  # [1, 1|H, 1, N]
            mask = gate if mask is None else mask + gate
        if T == 1 and k.dtype == v.dtype and kernels.usable_for(q, k, v):
            # one query per lane when decoding on a CPU: one pass over a float16 or float32 buffer
            if mask is None:
                mask = q.new_zeros(1, 1, 1, k.shape[2])
            out = kernels.decode_attention(q, k, v, mask.to(q.dtype), 1.0 / math.sqrt(D))
        elif T == 1 and not torch.is_grad_enabled() and torch.compiler.is_compiling():
            # one query per lane in a compiled decoding step: plain products and a softmax that inductor
            # fuses with the mask (the CPU SDPA kernel's per-call cost is far above a single query's work)
            scores = (q @ k.to(q.dtype).transpose(-1, -2)) * (1.0 / math.sqrt(D))
            out = (scores if mask is None else scores + mask).softmax(dim=-1) @ v.to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(
                q, k.to(q.dtype), v.to(q.dtype),
                attn_mask=mask,
                is_causal=mask is None and T > 1,
                dropout_p=self.dropout if self.training else 0.0,
                scale=1.0 / math.sqrt(D),
            )
        if out.shape[-1] != D:
            out = out[..., :D]
        return self.out_proj(out.transpose(1, 2).reshape(B, T, H * D))


def _last(x: Tensor, h: int) -> Tensor:
    """The last h positions of x [B, H, N, D], detached, in storage of their own: the next memory.
    Fresh (empty) storage for h == 0: an empty slice would keep the whole segment's storage alive, and
    .contiguous() copies only when it trims, so a state holds <= h positions."""
    if h == 0:
        return x.new_zeros(x.shape[0], x.shape[1], 0, x.shape[3])
    return x[:, :, max(x.shape[2] - h, 0):].detach().contiguous()


def _with_gate_column(q: Tensor, k: Tensor, v: Tensor, n_memory: int, bias: Tensor):
    """Fold the memory bias into the scores through an extra head dimension: q gets a 1, memory keys get
    bias * sqrt(D), segment keys 0 (padded to a multiple of 8 for the fused kernels; v gets zeros).

    Passing the bias through a float attn_mask that requires grad would force PyTorch's slow math
    backend; through the keys, the fused SDPA kernels compute the gate's gradient."""
    B, H, T, D = q.shape
    N = k.shape[2]
    extra = 8 - D % 8
    column = (bias.to(k.dtype) * math.sqrt(D)).view(1, -1, 1, 1).expand(B, H, n_memory, 1)
    k_gate = torch.cat([column, k.new_zeros(B, H, N - n_memory, 1)], dim=2)
    q = torch.cat([q, q.new_ones(B, H, T, 1), q.new_zeros(B, H, T, extra - 1)], dim=-1)
    k = torch.cat([k, k_gate, k.new_zeros(B, H, N, extra - 1)], dim=-1)
    v = F.pad(v, (0, extra))
    return q, k, v


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: DSMRConfig, layer: int):
        super().__init__()
        Norm = nn.LayerNorm if cfg.norm == "layernorm" else nn.RMSNorm
        self.norm1 = Norm(cfg.d_model)
        self.attn = MemoryAttention(cfg, layer)
        self.norm2 = Norm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.ff_dim, bias=False),
            nn.GELU(),
            nn.Linear(cfg.ff_dim, cfg.d_model, bias=False),
        )
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def feed_forward(self, x: Tensor) -> Tensor:
        """The second half of the block: x + mlp(norm2(x))."""
        return x + self.resid_dropout(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], memory: "BlockMemory") -> Tensor:
        """The block over a chunk x [B, T, d_model] whose rotary table is `rope`. The one place of the block's
        math: training, evaluation, prompt chunks and the one-token step all run it; only where keys and
        values are kept differs (`memory`: a `SegmentMemory`, or a decoder's buffers in dsmr.generation)."""
        q, k, v = self.attn.qkv(self.norm1(x), rope=rope)
        keys, values, mask, n_memory = memory.attach(self, k, v, x)
        x = x + self.resid_dropout(self.attn.attend(q, keys, values, mask, n_memory=n_memory))
        return self.feed_forward(x)


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


class DSMR(nn.Module):
    """Depth-Structured Music Recurrence: the decoder stack with a per-layer budgeted KV memory."""

    def __init__(self, cfg: DSMRConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_base, cfg.rotary_dims)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model) if cfg.norm == "layernorm" else nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # what a model loaded from a folder comes with (`from_pretrained`); None for a model built here
        self.tokenizer = None
        self.run_config: Optional[dict] = None
        self.segment_len: Optional[int] = None
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.head.weight = self.embedding.weight
        # GPT-2: scale the residual projections so the residual stream's variance does not grow with depth
        for block in self.blocks:
            for proj in (block.attn.out_proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)

    def active_horizons(self) -> tuple[int, ...]:
        """The horizons in use (cfg.horizons unless a training curriculum set others)."""
        return tuple(block.attn.horizon for block in self.blocks)

    def set_horizons(self, horizons) -> None:
        """Use other horizons (a curriculum during training); a memory longer than its new horizon is cut
        to it at the next segment."""
        if len(horizons) != len(self.blocks):
            raise DsmrError(f"set_horizons: {len(horizons)} horizons for {len(self.blocks)} layers")
        for block, h in zip(self.blocks, horizons):
            block.attn.horizon = int(h)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        """Empty memory (M = 0) for every layer."""
        param = self.embedding.weight
        device = param.device if device is None else device
        dtype = param.dtype if dtype is None else dtype
        valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        if self.cfg.memory == "hidden":
            empty = torch.zeros(batch_size, 1, 0, self.cfg.d_model, device=device, dtype=dtype)
            return [LayerMemory(empty, None, valid) for _ in self.blocks]
        empty = torch.zeros(batch_size, self.cfg.n_heads, 0, self.cfg.head_dim, device=device, dtype=dtype)
        return [LayerMemory(empty, empty, valid) for _ in self.blocks]

    def embed(self, ids: Tensor) -> Tensor:
        """Token embeddings [B, T, d_model] (the residual stream entering block 0)."""
        return self.dropout(self.embedding(ids))

    def output(self, x: Tensor) -> Tensor:
        """Final norm and head: residual stream [B, T, d_model] -> logits [B, T, vocab]."""
        return self.head(self.norm(x))

    def forward(
        self,
        ids: Tensor,
        positions: Tensor,
        reset: Optional[Tensor] = None,
        state: Optional[State] = None,
        token_mask: Optional[Tensor] = None,
    ) -> tuple[Tensor, State]:
        """One segment: ids/positions [B, T] long, reset [B] bool, token_mask [B, T] bool (False: padding).
        Returns logits [B, T, vocab] and the next detached state (<= h_l positions per layer)."""
        self._check_inputs(ids, positions, reset, state, token_mask)
        B, T = ids.shape
        if state is None:
            state = self.init_state(B, device=ids.device)
        seg = _Segment(reset, token_mask, positions)
        rope = self.rotary(positions)
        x = self.embed(ids)
        new_state: State = []
        for block, memory in zip(self.blocks, state):
            memory = SegmentMemory(memory, seg)
            x = block(x, rope, memory)
            new_state.append(memory.next)
        return self.output(x), new_state

    def _check_inputs(self, ids, positions, reset, state, token_mask) -> None:
        if ids.dim() != 2:
            raise DsmrError(f"DSMR.forward: ids must be [batch, time], got shape {tuple(ids.shape)}")
        B, T = ids.shape
        if T == 0:
            raise DsmrError("DSMR.forward: empty segment (time dimension 0)")
        if positions.shape != ids.shape:
            raise DsmrError(f"DSMR.forward: positions shape {tuple(positions.shape)} != ids shape {tuple(ids.shape)}")
        if reset is not None and (reset.shape != (B,) or reset.dtype != torch.bool):
            raise DsmrError(f"DSMR.forward: reset must be a bool tensor of shape ({B},), got {reset.dtype} {tuple(reset.shape)}")
        if token_mask is not None and (token_mask.shape != ids.shape or token_mask.dtype != torch.bool):
            raise DsmrError(f"DSMR.forward: token_mask must be a bool tensor of shape {tuple(ids.shape)}, "
                            f"got {token_mask.dtype} {tuple(token_mask.shape)}")
        if state is not None:
            if len(state) != self.cfg.n_layers:
                raise DsmrError(f"DSMR.forward: state has {len(state)} layers, the model {self.cfg.n_layers}")
            for layer, m in enumerate(state):
                if m.k.shape[0] != B or m.valid.shape != (B, m.k.shape[2]):
                    raise DsmrError(f"DSMR.forward: state of layer {layer} is for batch {m.k.shape[0]} "
                                    f"(valid {tuple(m.valid.shape)}), the segment has batch {B}")

    def gate_values(self) -> Optional[Tensor]:
        """sigmoid(theta) per layer [n_layers], or per head [n_layers, n_heads]; None without gates."""
        if self.cfg.gate == "none":
            return None
        g = torch.stack([block.attn.gate() for block in self.blocks]).detach()
        return g if self.cfg.gate_per_head else g[:, 0]

    def gate_penalty(self) -> Tensor:
        """sum_l g_l * h_l / B (g_l averaged over heads): the budget the gates keep, as a fraction of B.
        0 without gates or with an empty budget. Multiply by lambda in the loss."""
        budget = sum(self.cfg.horizons)
        device = self.embedding.weight.device
        if self.cfg.gate == "none" or budget == 0:
            return torch.zeros((), device=device)
        total = sum(block.attn.gate().mean() * block.attn.horizon for block in self.blocks)
        return total / budget

    @classmethod
    def from_pretrained(cls, ref, device="cpu", *, which: str = "best", revision: Optional[str] = None,
                        cache_dir=None, local_files_only: Optional[bool] = None) -> "DSMR":
        """The model (eval mode, on `device`) of a run folder, an exported folder, a .safetensors file with
        config.json beside it, or a Hugging Face Hub repo id (owner/name, through huggingface_hub's cache;
        `revision`, `cache_dir`, `local_files_only` as there). It comes with `tokenizer` (the encoding it
        was trained on), `run_config` (config.json) and `segment_len`. `which="best"` takes best.safetensors
        where the run has one, else the latest weights. The one loader: every command, the app and export
        use it (`dsmr.load_model` is the same function)."""
        from dsmr import checkpoint
        from dsmr.encodings import tokenizer_from_config
        from dsmr.hub import resolve_model_ref

        path = resolve_model_ref(ref, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        weights, run_dir = checkpoint.resolve_weights(path, which)
        config = checkpoint.read_config(run_dir)
        where = run_dir / checkpoint.CONFIG_FILE
        try:
            model_cfg = checkpoint.model_config_from(config)
        except DsmrError as err:
            raise DsmrError(f"{where}: {err}") from err
        with torch.device("meta"):  # the shapes the config gives, before allocating what it asks for
            shapes = {k: tuple(v.shape) for k, v in cls(model_cfg).state_dict().items()}
        checkpoint.check_weights_fit(weights, shapes)
        model = cls(model_cfg)
        checkpoint.load_weights(model, weights)
        tokenizer = tokenizer_from_config(config["tokenizer"])
        if tokenizer.vocab_size != model.cfg.vocab_size:
            raise DsmrError(f"{where}: tokenizer vocabulary {tokenizer.vocab_size} != model vocab_size "
                            f"{model.cfg.vocab_size}")
        model.tokenizer, model.run_config = tokenizer, config
        segment_len = config.get("segment_len") or (config.get("train") or {}).get("segment")
        if isinstance(segment_len, bool) or not isinstance(segment_len, int) or segment_len < 1:
            raise DsmrError(f"{where}: no segment_len (a positive integer): not a dsmr run or model folder")
        model.segment_len = segment_len
        return model.to(device).eval()

    def num_parameters(self) -> int:
        """Trainable parameters, a tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())


def load_model(ref, device="cpu", **kwargs) -> DSMR:
    """`DSMR.from_pretrained`: the model of a run or exported folder, a weights file or a Hub repo id, with
    its `tokenizer`, `run_config` and `segment_len`."""
    return DSMR.from_pretrained(ref, device, **kwargs)
