"""Memory representations and what memory is for.

* `memory="hidden"` (layer inputs, projected again each segment) computes exactly what `memory="kv"`
  (cached keys/values) computes from the same weights: in evaluation and in the incremental decoder.
* Memory can be learned and used: pieces repeat a random phrase further back than one segment; a tiny
  model with memory reaching back that far predicts the repeat far better than the first occurrence, and
  far better than the same model without memory or with horizons shorter than the distance.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsmr.generation import IncrementalDecoder
from dsmr.model import DSMR, DSMRConfig
from dsmr.training.optimization import horizons_at

VOCAB = 37


def _pair(horizons, seed=0, **kw):
    """A hidden-memory model and a kv-memory model with the same weights."""
    torch.manual_seed(seed)
    hidden = DSMR(DSMRConfig(vocab_size=VOCAB, n_layers=len(horizons), d_model=32, n_heads=2, head_dim=24,
                             horizons=tuple(horizons), memory="hidden", **kw)).eval()
    with torch.no_grad():  # sharper attention than the init, so that what a token sees shows in its logits
        for block in hidden.blocks:
            block.attn.qkv_proj.weight.normal_(std=0.3)
    kv = DSMR(DSMRConfig(**{**hidden.cfg.to_dict(), "memory": "kv"})).eval()
    kv.load_state_dict(hidden.state_dict())
    return hidden, kv


def _stream(model, ids, seg_len, resets=None, token_mask=None):
    B, N = ids.shape
    positions = torch.arange(N).expand(B, N)
    state, outs = None, []
    for s, start in enumerate(range(0, N, seg_len)):
        sl = slice(start, start + seg_len)
        mask = None if token_mask is None else token_mask[:, sl]
        logits, state = model(ids[:, sl], positions[:, sl], reset=None if resets is None else resets[s],
                              state=state, token_mask=mask)
        outs.append(logits)
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("gate", ["none", "soft"])
def test_hidden_memory_computes_what_kv_memory_computes(gate):
    hidden, kv = _pair((12, 5, 0), gate=gate, rotary_fraction=0.5)
    ids = torch.randint(3, VOCAB, (3, 40))
    a, state_h = _stream(hidden, ids, seg_len=8)
    b, state_kv = _stream(kv, ids, seg_len=8)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the hidden state holds the layer input: d_model values per position instead of 2 x heads x head_dim
    assert [m.size for m in state_h] == [m.size for m in state_kv] == [12, 5, 0]
    assert state_h[0].v is None and state_h[0].k.shape == (3, 1, 12, 32)
    assert hidden.cfg.state_bytes() == sum((12, 5, 0)) * 32 * 4
    assert kv.cfg.state_bytes() == sum((12, 5, 0)) * 2 * 48 * 4


def test_hidden_memory_with_resets_and_padding_matches_kv():
    """Lanes that start a new piece mid-stream (reset, positions from 0) and a padded last segment."""
    hidden, kv = _pair((10, 10))
    B, T = 2, 6
    ids = torch.randint(3, VOCAB, (B, 4 * T))
    positions = torch.cat([torch.arange(2 * T), torch.arange(2 * T)]).expand(B, -1).clone()
    positions[1] = torch.arange(4 * T)
    token_mask = torch.ones(B, 4 * T, dtype=torch.bool)
    token_mask[0, 2 * T - 2: 2 * T] = False  # lane 0's first piece ends 2 tokens early
    resets = [None, None, torch.tensor([True, False]), torch.tensor([False, False])]
    outs = {}
    for name, model in (("hidden", hidden), ("kv", kv)):
        state, logits = None, []
        for s in range(4):
            sl = slice(s * T, (s + 1) * T)
            out, state = model(ids[:, sl], positions[:, sl], reset=resets[s], state=state, token_mask=token_mask[:, sl])
            logits.append(out)
        outs[name] = torch.cat(logits, dim=1)
    real = token_mask[..., None].expand_as(outs["kv"])
    torch.testing.assert_close(outs["hidden"][real], outs["kv"][real], atol=1e-5, rtol=1e-5)


def test_incremental_decoder_of_a_hidden_memory_model_matches_its_forward():
    hidden, _ = _pair((9, 4))
    ids = torch.randint(3, VOCAB, (2, 30))
    expected, _ = _stream(hidden, ids, seg_len=7)
    decoder = IncrementalDecoder(hidden, segment_len=7, batch_size=2)
    got = torch.stack([decoder.step(ids[:, i]) for i in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_hidden_memory_gives_the_projections_gradient_from_memory_positions():
    """kv memory is detached keys/values: the key/value projection learns only from the segment. Hidden
    memory is projected again, so the loss of a segment that attends to memory reaches it through memory:
    with equal weights and equal forward values, the gradients differ by that memory path."""
    grads = {}
    for memory in ("kv", "hidden"):
        torch.manual_seed(0)
        model = DSMR(DSMRConfig(vocab_size=VOCAB, n_layers=1, d_model=16, n_heads=2, horizons=(8,), memory=memory))
        ids = torch.randint(3, VOCAB, (1, 16))
        pos = torch.arange(16)[None]
        _, state = model(ids[:, :8], pos[:, :8])
        model.zero_grad()
        logits, _ = model(ids[:, 8:], pos[:, 8:], state=[m.detached() for m in state])
        logits.sum().backward()
        grads[memory] = model.blocks[0].attn.qkv_proj.weight.grad[16:].clone()  # the k and v rows
    through_memory = (grads["hidden"] - grads["kv"]).abs().sum()
    assert through_memory > 0.05 * grads["kv"].abs().sum()


def test_horizon_curriculum_grows_linearly_to_the_schedule():
    assert horizons_at(0, (512, 64, 0), 100) == (0, 0, 0)
    assert horizons_at(50, (512, 64, 0), 100) == (256, 32, 0)
    assert horizons_at(100, (512, 64, 0), 100) == (512, 64, 0)
    assert horizons_at(7, (512, 64), 0) == (512, 64)


# ---- memory can be learned and used
#
# Pieces of 3 segments of 16: a cue token repeated at positions 1-8, filler, then at 40-47 "Q cue Q cue ...".
# The cue after the first Q (target 41) can only come from memory 32+ positions back; the later ones are
# also in the segment, which teaches the model the lookup that it must then do over memory.

SEG = 16
PIECE = 48
RECALL = 40  # the first Q; its target (position 41) is the recall
CUE_VOCAB = 40
FILLER = 8  # ids 0-7 filler, 8 is Q, 9-39 cues
Q = 8


def _cue_pieces(n: int, generator: torch.Generator) -> torch.Tensor:
    ids = torch.randint(0, FILLER, (n, PIECE), generator=generator)
    cue = torch.randint(Q + 1, CUE_VOCAB, (n, 1), generator=generator)
    ids[:, 1:9] = cue
    ids[:, RECALL: RECALL + 8: 2] = Q
    ids[:, RECALL + 1: RECALL + 8: 2] = cue
    return ids


def _target_losses(model: DSMR, ids: torch.Tensor) -> torch.Tensor:
    """NLL of every target [n, PIECE - 1] (target i is token i + 1), streaming segment by segment."""
    n = ids.shape[0]
    positions = torch.arange(PIECE).expand(n, PIECE)
    state, logits = None, []
    for start in range(0, PIECE, SEG):
        out, state = model(ids[:, start: start + SEG], positions[:, start: start + SEG], state=state)
        logits.append(out)
        state = [m.detached() for m in state]
    return F.cross_entropy(torch.cat(logits, dim=1)[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")


@pytest.mark.parametrize("memory", ["kv", "hidden"])
def test_memory_is_learned_and_used_across_segments(memory):
    torch.manual_seed(0)
    model = DSMR(DSMRConfig(vocab_size=CUE_VOCAB, n_layers=1, d_model=32, n_heads=2, horizons=(32,), memory=memory))
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    for _ in range(250):
        loss = _target_losses(model, _cue_pieces(32, generator)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    held_out = _cue_pieces(256, torch.Generator().manual_seed(2))
    chance = math.log(CUE_VOCAB - Q - 1)
    with torch.no_grad():
        losses = _target_losses(model, held_out).mean(0)
        first, recall = losses[0].item(), losses[RECALL].item()  # targets 1 (the cue, first seen) and 41
        # the same weights without memory, and with a horizon shorter than the distance to the cue
        model.set_horizons((0,))
        recall_without = _target_losses(model, held_out).mean(0)[RECALL].item()
        model.set_horizons((8,))
        recall_short = _target_losses(model, held_out).mean(0)[RECALL].item()
    assert first > 0.8 * chance, first  # the cue is random: its first occurrence cannot be predicted
    assert recall < 0.1 * first, (first, recall)
    assert recall_without > 0.8 * chance and recall_short > 0.8 * chance, (recall_without, recall_short)
