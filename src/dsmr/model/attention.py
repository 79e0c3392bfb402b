"""Attention with a memory window: rotary embeddings for absolute positions, the additive mask of memory and
causal segment, and `MemoryAttention` (projections, optional gates, the backend that runs it)."""


from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsmr.backends.cpu import kernels
from dsmr.model.config import DSMRConfig


# Bias of a hard-closed STE gate: exp(-1000) underflows to exactly 0, so the memory is dropped, yet the
# value stays finite (an -inf key component would give 0 * inf = NaN in the attention backward).
CLOSED_GATE_BIAS = -1000.0


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
