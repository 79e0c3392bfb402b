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
from typing import Optional

import torch
from torch import Tensor, nn

from dsmr.errors import DsmrError
from dsmr.model.config import DSMRConfig
from dsmr.model.attention import MemoryAttention, RotaryEmbedding
from dsmr.model.memory import BlockMemory, LayerMemory, SegmentMemory, State, _Segment


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
        # what a model from dsmr.load_model comes with; None for a model built here
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

    def num_parameters(self) -> int:
        """Trainable parameters, a tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())
