"""DSMR model: streaming semantics (equivalence, finite horizons, isolation, detachment), gates, config."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dsmr.errors import DsmrError
from dsmr.model import DSMR, DSMRConfig
from dsmr.model.memory import LayerMemory, state_nbytes
from dsmr.model.attention import RotaryEmbedding
from dsmr.model.schedule import make_schedule

VOCAB = 37
ATOL = 1e-5


def make_model(horizons, seed=0, **kw) -> DSMR:
    """A small model with key/value memory (what the state checks below inspect), a tied head and std 0.02
    weights unless told otherwise."""
    torch.manual_seed(seed)
    kw = {"memory": "kv", "tie_embeddings": True, "init_std": 0.02, **kw}
    cfg = DSMRConfig(vocab_size=VOCAB, n_layers=len(horizons), d_model=32, n_heads=4, horizons=tuple(horizons), **kw)
    model = DSMR(cfg).eval()
    with torch.no_grad():  # sharper attention than the 0.02 init, so that what a token sees shows in its logits
        for block in model.blocks:
            block.attn.qkv_proj.weight.normal_(std=0.3)
    return model


def same_weights(model: DSMR, horizons, **kw) -> DSMR:
    """A model with `model`'s weights and other horizons/gates (gate parameters are left at init)."""
    other = make_model(horizons, **kw)
    other.load_state_dict(model.state_dict(), strict=False)
    return other


def stream(model, ids, seg_len, positions=None, token_mask=None, resets=None):
    """Run [B, N] through the model segment by segment; returns logits [B, N, V] and the final state."""
    B, N = ids.shape
    if positions is None:
        positions = torch.arange(N).expand(B, N)
    state, outs = None, []
    for s, start in enumerate(range(0, N, seg_len)):
        sl = slice(start, start + seg_len)
        reset = None if resets is None else resets[s]
        mask = None if token_mask is None else token_mask[:, sl]
        logits, state = model(ids[:, sl], positions[:, sl], reset=reset, state=state, token_mask=mask)
        outs.append(logits)
    return torch.cat(outs, dim=1), state


def reference_logits(model: DSMR, ids, seg_len, head_bias=None):
    """Whole-sequence forward with an explicit per-layer mask: layer l at position p of a segment starting
    at S sees [S - h_l, p]. `head_bias(layer) -> [H] or None` is added to the logits of memory positions
    (j < S). Plain softmax attention written here, independent of the model's SDPA and state code."""
    B, N = ids.shape
    positions = torch.arange(N).expand(B, N)
    rope = model.rotary(positions)
    x = model.embed(ids)
    p = torch.arange(N)
    start = (p // seg_len) * seg_len  # segment start of each query
    for layer, block in enumerate(model.blocks):
        h = block.attn.horizon
        allowed = (p[None, :] <= p[:, None]) & (p[None, :] >= start[:, None] - h)
        q, k, v = block.attn.qkv(block.norm1(x), rope=rope)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        bias = head_bias(layer) if head_bias else None
        if bias is not None:
            memory = p[None, :] < start[:, None]  # [N, N]
            scores = scores + torch.where(memory, bias.view(1, -1, 1, 1), 0.0)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = scores.softmax(-1) @ v
        out = block.attn.out_proj(out.transpose(1, 2).reshape(B, N, -1))
        x = block.feed_forward(x + out)
    return model.output(x)


def piece(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g)


# ---------------------------------------------------------------- equivalence and finite horizons


@pytest.mark.parametrize("seg_len", [1, 8, 13, 50])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_streaming_with_full_horizons_equals_one_forward(seg_len, norm):
    model = make_model([64, 50, 128], norm=norm)
    ids = torch.stack([piece(50, 1), piece(50, 2)])
    whole, _ = model(ids, torch.arange(50).expand(2, 50))
    streamed, state = stream(model, ids, seg_len)
    torch.testing.assert_close(streamed, whole, atol=ATOL, rtol=0)
    assert [m.size for m in state] == [50, 50, 50]


@pytest.mark.parametrize("seg_len", [8, 3])
def test_finite_horizons_match_explicit_mask_reference(seg_len):
    # horizons below, equal to and above T (for T = 8), a segment-local layer, several segments
    horizons = [0, 5, 8, 20]
    model = make_model(horizons, seed=1)
    ids = torch.stack([piece(45, 3), piece(45, 4)])
    streamed, state = stream(model, ids, seg_len)
    reference = reference_logits(model, ids, seg_len)
    torch.testing.assert_close(streamed, reference, atol=ATOL, rtol=0)
    assert [m.size for m in state] == horizons
    # the horizons matter: a segment-local model gives different logits
    local, _ = stream(same_weights(model, [0, 0, 0, 0]), ids, seg_len)
    assert (local - streamed).abs().max() > 1e-3


def test_memory_grows_to_the_horizon_and_stays_bounded():
    model = make_model([0, 3, 8, 20])
    ids = piece(40, 5)[None]
    state, sizes = None, []
    for start in range(0, 40, 8):
        _, state = model(ids[:, start:start + 8], torch.arange(start, start + 8)[None], state=state)
        sizes.append([m.size for m in state])
        assert all(not m.k.requires_grad and not m.v.requires_grad for m in state)
    assert sizes == [[0, 3, 8, 8], [0, 3, 8, 16], [0, 3, 8, 20], [0, 3, 8, 20], [0, 3, 8, 20]]
    # the state holds exactly what the schedule budgets once full (storage trimmed, not a view of more)
    assert state_nbytes(state) == make_schedule("explicit", 4, horizons=[0, 3, 8, 20]).state_bytes(32, 4, 1)
    assert all(m.k.untyped_storage().nbytes() == m.k.nbytes for m in state)


def test_rope_depends_on_relative_positions_only():
    model = make_model([0, 0])
    ids = piece(20, 6)[None]
    base, _ = model(ids, torch.arange(20)[None])
    shifted, _ = model(ids, torch.arange(1000, 1020)[None])
    torch.testing.assert_close(shifted, base, atol=1e-4, rtol=0)
    scrambled, _ = model(ids, torch.randperm(20)[None])
    assert (scrambled - base).abs().max() > 1e-3
    x = torch.randn(2, 5, 32)
    pos = torch.randint(0, 10_000, (2, 5))
    attn = model.blocks[0].attn
    for a, b in zip(attn.qkv(x, pos), attn.qkv(x, rope=model.rotary(pos))):
        torch.testing.assert_close(a, b)


def test_rotary_rotation_preserves_norm_and_is_identity_at_zero():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 4, 8)
    cos, sin = rope(torch.randint(0, 100_000, (2, 4)))
    torch.testing.assert_close(RotaryEmbedding.rotate(x, cos, sin).norm(dim=-1), x.norm(dim=-1))
    cos0, sin0 = rope(torch.zeros(2, 4, dtype=torch.long))
    torch.testing.assert_close(RotaryEmbedding.rotate(x, cos0, sin0), x)


# ---------------------------------------------------------------- isolation


def test_two_pieces_in_one_lane_equal_each_piece_alone():
    model = make_model([6, 16, 40], seed=2)
    a, b = piece(20, 7), piece(13, 8)
    T = 8
    # lane: a in 3 segments (last padded by 4), then b from a segment boundary with reset (padded by 3)
    ids = torch.cat([a, torch.full((4,), 0), b, torch.full((3,), 0)])[None]
    positions = torch.cat([torch.arange(20), torch.arange(4), torch.arange(13), torch.arange(3)])[None]
    mask = torch.cat([torch.ones(20), torch.zeros(4), torch.ones(13), torch.zeros(3)]).bool()[None]
    resets = [torch.tensor([s == 3]) for s in range(5)]
    both, _ = stream(model, ids, T, positions, mask, resets)
    alone_a, _ = stream(model, a[None], T)
    alone_b, _ = stream(model, b[None], T)
    torch.testing.assert_close(both[:, :20], alone_a, atol=ATOL, rtol=0)
    torch.testing.assert_close(both[:, 24:37], alone_b, atol=ATOL, rtol=0)


def test_pieces_of_different_lengths_in_a_batch_equal_each_piece_alone():
    model = make_model([5, 12, 30], seed=3)
    T = 6
    p0, p1, p2 = piece(30, 9), piece(11, 10), piece(17, 11)
    # lane 0: p0 (30 tokens, 5 segments); lane 1: p1 (2 segments, padded by 1), then p2 with reset (3 segments)
    lane1 = torch.cat([p1, torch.tensor([0]), p2, torch.tensor([0])])
    ids = torch.stack([p0, lane1])
    positions = torch.stack([torch.arange(30), torch.cat([torch.arange(12), torch.arange(18)])])
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 11] = mask[1, 29] = False
    resets = [torch.tensor([s == 0, s in (0, 2)]) for s in range(5)]
    batched, _ = stream(model, ids, T, positions, mask, resets)
    torch.testing.assert_close(batched[0:1], stream(model, p0[None], T)[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(batched[1:2, :11], stream(model, p1[None], T)[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(batched[1:2, 12:29], stream(model, p2[None], T)[0], atol=ATOL, rtol=0)


def test_padding_never_changes_real_logits_or_later_memory():
    # a piece with holes of padding inside segments (not only at the end), read with horizons covering it
    model = make_model([64, 64], seed=4)
    real = piece(24, 12)
    holes = torch.tensor([2, 3, 9, 15, 16, 17, 27])  # padded slots in a 31-slot lane
    mask = torch.ones(31, dtype=torch.bool)
    mask[holes] = False
    positions = torch.zeros(31, dtype=torch.long)
    positions[mask] = torch.arange(24)  # holes consume no position
    runs = []
    for seed in (0, 1):
        ids = torch.randint(3, VOCAB, (31,), generator=torch.Generator().manual_seed(seed))
        ids[mask] = real
        pos = positions.clone()
        pos[~mask] = torch.randint(0, 500, (len(holes),), generator=torch.Generator().manual_seed(seed))
        logits, state = stream(model, ids[None], 5, pos[None], mask[None])
        runs.append((logits[0, mask], state))
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=0, rtol=0)
    alone, _ = model(real[None], torch.arange(24)[None])
    torch.testing.assert_close(runs[0][0], alone[0], atol=ATOL, rtol=0)
    for m in runs[0][1]:
        assert m.valid.sum().item() == 24


def test_reset_drops_memory_for_that_lane_only():
    model = make_model([16, 16])
    ids = torch.stack([piece(16, 13), piece(16, 14)])
    pos = torch.arange(16).expand(2, 16)
    _, state = model(ids[:, :8], pos[:, :8])
    _, state = model(ids[:, 8:], pos[:, :8], reset=torch.tensor([True, False]), state=state)
    assert state[0].valid.tolist() == [[False] * 8 + [True] * 8, [True] * 16]


# ---------------------------------------------------------------- detachment


def test_gradients_do_not_cross_segment_boundaries():
    model = make_model([8, 8]).train()
    ids = piece(16, 15)[None]
    captured = []

    def keep(module, inputs, out):  # the embedding output of each segment, with its .grad kept
        out.retain_grad()
        captured.append(out)

    handle = model.embedding.register_forward_hook(keep)
    _, state = model(ids[:, :8], torch.arange(8)[None])
    assert all(not t.requires_grad for m in state for t in (m.k, m.v))
    logits, _ = model(ids[:, 8:], torch.arange(8, 16)[None], state=state)
    handle.remove()
    F.cross_entropy(logits[0], piece(8, 16)).backward()
    first, second = captured
    assert first.grad is None
    assert second.grad is not None and second.grad.abs().sum() > 0


# ---------------------------------------------------------------- gates


def set_gates(model, values):
    with torch.no_grad():
        for block, theta in zip(model.blocks, values):
            block.attn.gate_logit.copy_(torch.as_tensor(theta, dtype=torch.float32).expand_as(block.attn.gate_logit))


def test_soft_gate_closed_equals_no_memory_and_open_equals_no_gate():
    horizons = [6, 12]
    ids = torch.stack([piece(30, 17), piece(30, 18)])
    gated = make_model(horizons, gate="soft")
    set_gates(gated, [-1e4, -1e4])
    closed, _ = stream(gated, ids, 7)
    local, _ = stream(same_weights(gated, [0, 0]), ids, 7)
    torch.testing.assert_close(closed, local, atol=ATOL, rtol=0)
    set_gates(gated, [40.0, 40.0])
    opened, _ = stream(gated, ids, 7)
    plain, _ = stream(same_weights(gated, horizons), ids, 7)
    torch.testing.assert_close(opened, plain, atol=ATOL, rtol=0)


@pytest.mark.parametrize("per_head", [False, True])
def test_soft_gate_adds_log_g_to_memory_logits(per_head):
    model = make_model([5, 0, 12], gate="soft", gate_per_head=per_head, seed=5)
    torch.manual_seed(7)
    set_gates(model, [torch.randn(4) if per_head else torch.randn(1) for _ in range(3)])
    ids = torch.stack([piece(29, 19), piece(29, 20)])
    streamed, _ = stream(model, ids, 6)
    reference = reference_logits(model, ids, 6, lambda l: F.logsigmoid(model.blocks[l].attn.gate_logit))
    torch.testing.assert_close(streamed, reference, atol=ATOL, rtol=0)


def test_ste_forward_uses_the_hard_gate():
    model = make_model([5, 12], gate="ste", gate_per_head=True, seed=6)
    set_gates(model, [torch.tensor([2.0, -0.5, 0.1, -3.0]), torch.tensor([-1.0, 0.2, 1.5, -0.1])])
    ids = torch.stack([piece(26, 21), piece(26, 22)])
    streamed, _ = stream(model, ids, 6)

    def hard(layer):  # open heads: bias 0; closed heads: memory dropped
        theta = model.blocks[layer].attn.gate_logit.detach()
        return torch.where(theta > 0, 0.0, float("-inf"))

    torch.testing.assert_close(streamed, reference_logits(model, ids, 6, hard), atol=ATOL, rtol=0)


def gate_grad(model, ids):
    """Gradient of the second segment's loss (the first one has no memory) w.r.t. the gates."""
    model.zero_grad()
    _, state = model(ids[:, :10], torch.arange(10)[None].expand(ids.shape[0], 10))
    logits, _ = model(ids[:, 10:], torch.arange(10, 20)[None].expand(ids.shape[0], 10), state=state)
    F.cross_entropy(logits.flatten(0, 1), ids[:, 10:].flatten()).backward()
    return torch.stack([b.attn.gate_logit.grad.clone() for b in model.blocks])


def test_ste_gradient_is_nonzero_and_agrees_in_sign_with_the_soft_gate():
    ids = torch.stack([piece(20, 23), piece(20, 24)])
    soft = make_model([10, 10], gate="soft", seed=8).train()
    ste = same_weights(soft, [10, 10], gate="ste").train()
    ste_grad, soft_grad = gate_grad(ste, ids), gate_grad(soft, ids)  # both at gate_init = 3 (open)
    assert (ste_grad.abs() > 1e-7).all()
    assert torch.equal(ste_grad.sign(), soft_grad.sign())
    # a closed STE gate drops its memory exactly, so the task gives it no gradient (documented)
    set_gates(ste, [-2.0, 3.0])
    closed = gate_grad(ste, ids)
    assert closed[0].abs().max() == 0 and closed[1].abs().max() > 0


def test_gate_penalty_and_values():
    model = make_model([8, 0, 4], gate="soft", gate_per_head=True)
    set_gates(model, [torch.tensor([0.0, 1.0, -1.0, 2.0]), torch.tensor([5.0] * 4), torch.tensor([-2.0] * 4)])
    g = model.gate_values()
    assert g.shape == (3, 4) and not g.requires_grad
    expected = (torch.sigmoid(torch.tensor([0.0, 1.0, -1.0, 2.0])).mean() * 8 + torch.sigmoid(torch.tensor(-2.0)) * 4) / 12
    penalty = model.gate_penalty()
    torch.testing.assert_close(penalty, expected)
    penalty.backward()
    assert model.blocks[0].attn.gate_logit.grad.gt(0).all()
    assert model.blocks[1].attn.gate_logit.grad is None or model.blocks[1].attn.gate_logit.grad.abs().max() == 0

    per_layer = make_model([8, 0, 4], gate="ste")
    assert per_layer.gate_values().shape == (3,)
    torch.testing.assert_close(per_layer.gate_values(), torch.sigmoid(torch.tensor([3.0] * 3)))
    plain = make_model([8, 0, 4])
    assert plain.gate_values() is None and plain.gate_penalty().item() == 0.0
    assert make_model([0, 0], gate="soft").gate_penalty().item() == 0.0


# ---------------------------------------------------------------- config, inputs, dtype, learning


def test_config_round_trips_through_json_and_rejects_bad_values():
    cfg = DSMRConfig(vocab_size=391, horizons=(1024, 1024, 128, 128, 128, 128), gate="ste", norm="rmsnorm")
    again = DSMRConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.horizons == cfg.horizons and again.ff_dim == 1024
    assert DSMRConfig(vocab_size=10).horizons == (0,) * 6
    for bad in [dict(d_model=250), dict(d_model=12, n_heads=4), dict(horizons=(1, 2)), dict(gate="hard"),
                dict(horizons=(-1, 0, 0, 0, 0, 0)), dict(norm="batchnorm"), dict(dropout=1.5)]:
        with pytest.raises(DsmrError):
            DSMRConfig(vocab_size=10, **bad)
    with pytest.raises(DsmrError, match="unknown keys"):
        DSMRConfig.from_dict({"vocab_size": 10, "layers": 3})


def test_bad_inputs_raise_dsmr_error():
    model = make_model([4, 4])
    ids = torch.zeros(2, 5, dtype=torch.long)
    pos = torch.arange(5).expand(2, 5)
    with pytest.raises(DsmrError, match="positions"):
        model(ids, pos[:, :4])
    with pytest.raises(DsmrError, match="reset"):
        model(ids, pos, reset=torch.tensor([1, 0]))
    with pytest.raises(DsmrError, match="token_mask"):
        model(ids, pos, token_mask=torch.ones(2, 4, dtype=torch.bool))
    _, state = model(ids, pos)
    with pytest.raises(DsmrError, match="batch"):
        model(ids[:1], pos[:1], state=state)
    with pytest.raises(DsmrError, match="layers"):
        model(ids, pos, state=state[:1])


def test_tied_embeddings_and_parameter_count():
    tied = make_model([0, 0])
    assert tied.head.weight is tied.embedding.weight
    untied = make_model([0, 0], tie_embeddings=False)
    assert untied.num_parameters() == tied.num_parameters() + VOCAB * 32


def test_bf16_autocast_carries_state():
    model = make_model([8, 16])
    ids = piece(24, 25)[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, state = stream(model, ids, 8)
    assert state[1].k.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    reference, _ = stream(model, ids, 8)
    assert (logits.float() - reference).abs().max() < 0.03  # measured 0.004


def test_layer_memory_size():
    m = LayerMemory(torch.zeros(2, 4, 7, 8), torch.zeros(2, 4, 7, 8), torch.zeros(2, 7, dtype=torch.bool))
    assert m.size == 7


def test_a_segment_with_memory_compiles_to_one_graph():
    """`--compile` training traces each segment as one graph: no data-dependent shape in the memory view."""
    model = make_model([8, 4], memory="hidden", gate="soft").train()
    ids = torch.randint(0, VOCAB, (2, 8))
    positions = torch.arange(8).expand(2, 8)
    _, state = model(ids, positions)  # a filled state, as from the previous segment
    reset = torch.tensor([True, False])
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 6:] = False
    explained = torch._dynamo.explain(model)(ids, positions + 8, reset=reset, state=state, token_mask=mask)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_training_bytes_counts_activations_and_state_by_budget():
    """The analytic GPU bytes of a training step: grow with the memory budget, not with where it sits; the
    state is part of them; twice the lanes, twice the bytes; hidden memory keeps more per position."""
    def cfg(horizons, memory="kv"):
        return DSMRConfig(vocab_size=100, n_layers=4, d_model=64, n_heads=4, horizons=horizons, memory=memory)

    none, two, uniform, full = (cfg(h).training_bytes(8, 32) for h in
                                ((0,) * 4, (256, 256, 32, 32), (144,) * 4, (256,) * 4))
    assert none < two == uniform < full
    per_position = (full - none) / (4 * 256 * 8)
    assert per_position == 2 * 64 * 2 + 2 * 64 * 2  # keys and values read by attention + the state, at bf16
    assert cfg((256,) * 4).training_bytes(16, 32) == 2 * full
    assert cfg((256,) * 4, "hidden").training_bytes(8, 32) > full
    small = cfg((256,) * 4)
    assert small.training_bytes(8, 32) - small.training_bytes(8, 32, vocab=False) == 8 * 32 * 100 * 4
