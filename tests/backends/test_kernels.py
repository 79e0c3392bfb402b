"""dsmr.backends.cpu.kernels: the CPU kernels of one-token decoding against PyTorch's products and attention, the
decoder with and without them, and the fallback when they cannot be built."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dsmr.backends.cpu import kernels
from dsmr.generation import (FusedStep, IncrementalDecoder, Int8WeightLinear, decoding_state_dtype,
                           half_weight_model, int8_weight_model)
from dsmr.model import DSMR, DSMRConfig
from tests.generation.test_generate import SEG, streaming_logits, tiny_model

pytestmark = pytest.mark.skipif(not kernels.supported_cpu(), reason="dsmr.backends.cpu.kernels need an x86-64 CPU with AVX2")


@pytest.fixture(scope="module")
def built(kernels_built):
    if not kernels_built:  # a machine that cannot build them (no AVX2 or no compiler): nothing to test
        pytest.skip(f"dsmr.backends.cpu.kernels cannot be built here: {kernels.load_error()}")


def test_pack_half_layout():
    w = torch.arange(10 * 16, dtype=torch.float32).view(10, 16).half()
    packed = kernels.pack_half(w)
    assert packed.shape == (2, 2, 8, 8) and packed.dtype == torch.float16 and packed.is_contiguous()
    assert torch.equal(packed[1, 1, 1], w[9, 8:16]) and torch.equal(packed[0, 1, 3], w[3, 8:16])
    assert not packed[1, :, 2:].any()  # rows 10..15 do not exist: zeros
    assert kernels.pack_half(torch.zeros(4, 12).half()) is None  # inputs not a multiple of 8: no kernel


@pytest.mark.parametrize("out,inputs,lead", [(768, 256, (1,)), (13, 16, (3,)), (9, 8, (2, 5)), (400, 256, (16,)),
                                             (256, 1024, (1, 1))])
def test_half_linear_matches_the_float32_product(built, out, inputs, lead):
    g = torch.Generator().manual_seed(out)
    w = torch.randn(out, inputs, generator=g).half()
    x = torch.randn(*lead, inputs, generator=g)
    y = kernels.half_linear(x, kernels.pack_half(w), out)
    assert y.shape == (*lead, out) and y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, w.float()), rtol=1e-5, atol=1e-4)


def test_half_linear_rejects_what_it_cannot_take(built):
    packed = kernels.pack_half(torch.randn(16, 8).half())
    with pytest.raises(RuntimeError, match="for 3 outputs expected"):
        kernels.half_linear(torch.randn(1, 8), packed, 3)  # 16 rows packed, not 3
    with pytest.raises(RuntimeError, match="float32 x"):
        kernels.half_linear(torch.randn(1, 8).double(), packed, 16)
    with pytest.raises(RuntimeError, match=r"x \[\.\.\., 8\]"):
        kernels.half_linear(torch.randn(1, 16), packed, 16)


@pytest.mark.parametrize("dtype,D,threads", [(torch.float16, 64, 1), (torch.float32, 16, 1), (torch.float16, 12, 1),
                                             (torch.float32, 32, 2), (torch.float16, 128, 2)])
def test_decode_attention_matches_sdpa(built, dtype, D, threads):
    """Every head dim with a register-resident kernel (16-128) and one without (12); 37 keys: not a multiple
    of 4; keys/values a narrowed view of a longer buffer (as `feed` passes them); two threads split the heads."""
    g = torch.Generator().manual_seed(1)
    B, H, N = 3, 4, 37
    q = torch.randn(B, 1, H, D, generator=g).transpose(1, 2)  # not contiguous, as qkv's output
    k, v = (torch.randn(B, H, N + 5, D, generator=g).to(dtype).narrow(2, 0, N) for _ in range(2))
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    filled = torch.zeros(1, 1, 1, N).masked_fill_(torch.arange(N) > 29, float("-inf"))
    gate = torch.where(torch.arange(N) < 10, torch.tensor([-0.5, -1.0, 0.0, -2.0]).view(1, H, 1, 1), 0.0)
    for mask in (filled, filled + gate, torch.zeros(B, 1, 1, N).masked_fill_(torch.rand(B, 1, 1, N, generator=g) < 0.5,
                                                                             float("-inf"))):
        mask[..., 0] = 0.0  # every row sees a key
        expected = F.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=mask, scale=0.3)
        torch.testing.assert_close(kernels.decode_attention(q, k, v, mask, 0.3), expected, rtol=1e-5, atol=1e-5)
    strided = filled.expand(B, H, 1, N).transpose(0, 1).contiguous().transpose(0, 1)  # batch stride != H * N
    torch.testing.assert_close(kernels.decode_attention(q, k, v, strided, 0.3),
                               F.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=filled, scale=0.3),
                               rtol=1e-5, atol=1e-5)
    nothing = torch.full((1, 1, 1, N), float("-inf"))  # no key to attend to: zeros, as SDPA gives
    torch.testing.assert_close(kernels.decode_attention(q, k, v, nothing, 0.3),
                               F.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=nothing, scale=0.3))
    torch.set_num_threads(saved)


def test_half_linear_on_two_threads(built):
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w = torch.randn(1000, 64, generator=torch.Generator().manual_seed(3)).half()  # 125 blocks to split
        x = torch.randn(3, 64)
        torch.testing.assert_close(kernels.half_linear(x, kernels.pack_half(w), 1000), F.linear(x, w.float()),
                                   rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(saved)


def test_half_weight_model_after_float_load_state_dict_and_other_states(built):
    """The packed copy follows the weights: loading a state dict packs again; .float() (a float32 packed
    copy) and a bfloat16 state (which the attention kernel cannot take) fall back to PyTorch."""
    model = tiny_model()
    half = half_weight_model(model)
    head = half.head
    x = torch.randn(2, model.cfg.d_model)
    with torch.inference_mode():
        zeros = {k: torch.zeros_like(t) for k, t in half.state_dict().items()}
        half.load_state_dict(zeros)
        assert head(x).abs().max() == 0  # the kernel reads the new (zero) weights
        widened = half_weight_model(model).float()
        torch.testing.assert_close(widened.head(x), model.head(x), rtol=1e-3, atol=1e-3)
    ids = torch.randint(3, 50, (1, 12), generator=torch.Generator().manual_seed(6))
    decoder = IncrementalDecoder(model, SEG, state_dtype=torch.bfloat16)
    decoder.feed(ids[:, :4])
    stepped = torch.stack([decoder.step(ids[:, i]) for i in range(4, 12)], dim=1)
    # bfloat16 keys/values: measured 1.0e-4 from the float32 forward
    torch.testing.assert_close(stepped, streaming_logits(model, ids, SEG)[:, 4:], rtol=0, atol=1e-3)


def test_decoder_with_kernels_matches_the_pytorch_path(built, monkeypatch):
    model = tiny_model(gate="soft", per_head=True)
    half = half_weight_model(model)
    ids = torch.randint(3, 50, (2, 30), generator=torch.Generator().manual_seed(4))
    calls = {"attention": 0, "linear": 0}
    real_attention, real_linear = kernels.decode_attention, kernels.half_linear

    def counted(name, fn):
        def call(*args):
            calls[name] += 1
            return fn(*args)
        return call

    monkeypatch.setattr(kernels, "decode_attention", counted("attention", real_attention))
    monkeypatch.setattr(kernels, "half_linear", counted("linear", real_linear))

    def decode(model, state_dtype=None):  # PyTorch's step with the kernels' ops (the fused step: next test)
        decoder = IncrementalDecoder(model, SEG, batch_size=2, state_dtype=state_dtype, fused=False)
        decoder.feed(ids[:, :5])
        return torch.stack([decoder.step(ids[:, i]) for i in range(5, 30)], dim=1)

    assert decoding_state_dtype(half, compile=False) == torch.float16  # the kernel widens it: eager keeps float16
    expected = streaming_logits(model, ids, SEG)[:, 5:]
    torch.testing.assert_close(decode(model), expected, rtol=0, atol=2e-5)  # float32 model, float32 state
    with_kernels = decode(half, torch.float16)
    torch.testing.assert_close(with_kernels, expected, rtol=0, atol=2e-3)
    # every step of every layer went through the attention kernel (both decoders: float32 and float16 state)
    # and every float16 product through half_linear (4 per block + the head, for the prompt and each step)
    assert calls["attention"] == 2 * 25 * len(model.blocks)
    assert calls["linear"] == (4 * len(model.blocks) + 1) * (1 + 25)
    old = kernels.set_enabled(False)
    try:
        seen = dict(calls)
        without = decode(half, torch.float16)
        assert calls == seen  # the PyTorch path
    finally:
        kernels.set_enabled(old)
    torch.testing.assert_close(with_kernels, without, rtol=0, atol=1e-3)


def test_int8_weights_round_each_row_to_its_own_scale(built):
    linear = torch.nn.Linear(32, 13, bias=False)
    with torch.no_grad():
        linear.weight[3] *= 100  # one loud row does not coarsen the others
    q = Int8WeightLinear(linear)
    w = linear.weight.detach()
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() == 127
    assert torch.all((q.dequantized() - w).abs() <= q.scale[:, None] / 2 + 1e-7)
    torch.testing.assert_close(q.scale, w.abs().amax(dim=1) / 127)
    x = torch.randn(5, 32)
    # the kernel rounds each row of x to int16: at most half a step (2^-15 of the row's largest |x|) per value
    bound = 2.0 ** -15 * x.abs().amax(dim=1, keepdim=True) * q.dequantized().abs().sum(dim=1) + 1e-6
    with torch.inference_mode():
        kernel = q(x)  # 5 rows: dsmr::int8_linear
        exact = F.linear(x.double(), q.dequantized().double()).float()
        assert torch.all((kernel - exact).abs() <= bound)
        torch.testing.assert_close(q(x.repeat(8, 1))[:5], exact, rtol=1e-5, atol=1e-5)  # 40 rows: float32 product
        old = kernels.set_enabled(False)
        try:
            torch.testing.assert_close(q(x), exact, rtol=1e-5, atol=1e-5)
        finally:
            kernels.set_enabled(old)
        q.load_state_dict({"weight": torch.ones(13, 32, dtype=torch.int8), "scale": torch.full((13,), 0.5)})
        expected = x.sum(dim=1, keepdim=True).expand(5, 13) * 0.5  # packed again
        assert torch.all((q(x) - expected).abs() <= 2.0 ** -15 * x.abs().amax(dim=1, keepdim=True) * 16 + 1e-6)


@pytest.mark.parametrize("memory", ["kv", "hidden"])
def test_an_int8_model_is_the_float_model_of_its_dequantized_weights(memory):
    """Training-time streaming (many rows: PyTorch's product) of an int8 model equals the float32 model whose
    weights are the int8 ones times their scales; hidden memory re-projects its keys/values with them too."""
    torch.manual_seed(0)
    model = DSMR(DSMRConfig(vocab_size=50, n_layers=3, d_model=32, n_heads=4, horizons=(9, 4, 0),
                            memory=memory, tie_embeddings=False, init_std=0.02)).eval()  # tied, the head would set the embedding
    int8 = int8_weight_model(model)
    for name, module in int8.named_modules():
        if isinstance(module, Int8WeightLinear):
            model.get_submodule(name).weight.data = module.dequantized()
    ids = torch.randint(3, 50, (2, 30), generator=torch.Generator().manual_seed(2))
    # (chunks of 2 x 8 tokens are below Int8WeightLinear.KERNEL_ROWS: the kernel rounds activations to int16)
    torch.testing.assert_close(streaming_logits(int8, ids, SEG), streaming_logits(model, ids, SEG),
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("out,inputs,rows", [(768, 256, 1), (13, 16, 1), (256, 1024, 1), (400, 256, 16), (9, 32, 3)])
def test_int8_linear_matches_the_float32_product(built, out, inputs, rows):
    """Each row's activations rounded to int16 (2^-14 of its largest or finer) and integer multiply-adds,
    against float64 products of the dequantized weight; a row among several gives exactly what it gives alone."""
    g = torch.Generator().manual_seed(out)
    w = torch.randint(-127, 128, (out, inputs), generator=g, dtype=torch.int8)
    scale = torch.rand(out, generator=g) / 100
    x = torch.randn(rows, inputs, generator=g)
    y = kernels.int8_linear(x, *kernels.pack_int8(w, scale), out)
    expected = F.linear(x.double(), w.double() * scale.double()[:, None]).float()
    assert y.shape == (rows, out)
    assert torch.equal(kernels.int8_linear(x[-1:], *kernels.pack_int8(w, scale), out), y[-1:])
    bound = 2.0 ** -14 * x.abs().max() * (w.double().abs().sum(dim=1) * scale.double()).max()  # the rounding of x
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=float(bound) + 1e-5)
    assert torch.equal(kernels.int8_linear(torch.zeros(1, inputs), *kernels.pack_int8(w, scale), out),
                       torch.zeros(1, out))
    for bad in (float("nan"), float("inf")):  # a non-finite input gives NaN, as a float product would
        x[0, 3] = bad
        assert kernels.int8_linear(x[:1], *kernels.pack_int8(w, scale), out).isnan().all()


def test_int8_linear_rejects_what_it_cannot_take(built):
    w = torch.arange(10 * 32).view(10, 32).remainder(127).to(torch.int8)
    packed, scale = kernels.pack_int8(w, torch.ones(10))
    assert packed.shape == (2, 2, 8, 16) and packed.dtype == torch.int8 and scale.shape == (16,)
    assert torch.equal(packed[1, 1, 1], w[9, 16:32]) and not packed[1, :, 2:].any() and not scale[10:].any()
    assert kernels.pack_int8(torch.ones(16, 8, dtype=torch.int8), torch.ones(16)) is None  # in % 16: no kernel
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):  # -128 could overflow the int32 sums
        kernels.pack_int8(torch.full((8, 16), -128, dtype=torch.int8), torch.ones(8))
    with pytest.raises(ValueError, match="int8 weights"):
        kernels.pack_int8(torch.ones(8, 16), torch.ones(8))
    with pytest.raises(RuntimeError, match="scales, one per packed row"):
        kernels.int8_linear(torch.randn(1, 32), packed, scale[:10], 10)
    with pytest.raises(RuntimeError, match="int8 weights, got Half"):
        kernels.int8_linear(torch.randn(1, 32), kernels.pack_half(torch.ones(10, 32).half()), scale, 10)


# std 0.02 weights: logits of the size the tolerances below were measured at
FUSED_CONFIGS = {
    "layernorm": dict(horizons=(0, 3, 8, 13), tie_embeddings=True),
    "rmsnorm, soft gate per head, head dim 12, partial rotary": dict(
        horizons=(5, 2), d_model=48, n_heads=4, head_dim=12, norm="rmsnorm", gate="soft", gate_per_head=True,
        rotary_fraction=0.5, tie_embeddings=True),
    "ste gate, d_ff 48, untied": dict(horizons=(9, 0, 4), d_model=32, n_heads=2, gate="ste", d_ff=48,
                                      tie_embeddings=False),
}


@pytest.mark.parametrize("name", FUSED_CONFIGS)
@pytest.mark.parametrize("state_dtype,weights", [(torch.float16, "float16"), (torch.float32, "float16"),
                                                 (torch.float16, "int8")])
@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_fused_step_matches_the_pytorch_step(built, name, state_dtype, weights, lanes):
    """dsmr::decode_step (the whole step in one call) against PyTorch's step on the same float16 or int8
    weights and against the float32 model's training-time forward, across segment boundaries; one lane (int8:
    int16 activations), two and three (register tiles of three lanes and their remainders)."""
    cfg = dict(vocab_size=50, n_layers=len(FUSED_CONFIGS[name]["horizons"]), **FUSED_CONFIGS[name])
    torch.manual_seed(0)
    model = DSMR(DSMRConfig(**cfg, init_std=0.02)).eval()
    half = (half_weight_model if weights == "float16" else int8_weight_model)(model)
    ids = torch.randint(3, 50, (lanes, 30), generator=torch.Generator().manual_seed(5))

    def decode(fused):
        decoder = IncrementalDecoder(half, SEG, batch_size=lanes, state_dtype=state_dtype, fused=fused)
        assert decoder.step_kind == ("fused" if fused else "eager")
        decoder.feed(ids[:, :4])
        return torch.stack([decoder.step(ids[:, i]) for i in range(4, 30)], dim=1)

    fused = decode(True)
    # int8: activations rounded to int16 in both steps, so float-rounding differences upstream can move a
    # value by one int16 step (2^-14 of the largest)
    torch.testing.assert_close(fused, decode(False), rtol=0, atol=5e-4 if weights == "int8" else 5e-5)
    # against float32: float16 rounding, or int8's (~1% of a weight, hence of the logits' size here)
    torch.testing.assert_close(fused, streaming_logits(model, ids, SEG)[:, 4:], rtol=0,
                               atol=3e-3 if weights == "float16" else 3e-2)


def test_which_step_a_decoder_runs(built):
    model = tiny_model()
    half = half_weight_model(model)
    assert IncrementalDecoder(half, SEG).step_kind == "fused"
    assert IncrementalDecoder(half, SEG, compile=True).step_kind == "fused"  # nothing left to compile
    assert IncrementalDecoder(half, SEG, fused=False).step_kind == "eager"
    assert IncrementalDecoder(model, SEG).step_kind == "eager"  # float32 weights: not packed
    assert IncrementalDecoder(half, SEG, state_dtype=torch.bfloat16).step_kind == "eager"
    tanh = half_weight_model(model)
    for block in tanh.blocks:
        block.mlp[1] = torch.nn.GELU(approximate="tanh")
    assert FusedStep.for_model(tanh) == (None, "the MLP is not Linear, exact GELU, Linear")  # exact GELU only
    no_norm = half_weight_model(model)
    no_norm.blocks[1].norm2 = torch.nn.Identity()
    assert FusedStep.for_model(no_norm) == (None, "the norms are not all LayerNorm or all RMSNorm")
    wide = int8_weight_model(model)
    wide.blocks.double()  # float64 norms and scales: the op takes float32 only
    assert FusedStep.for_model(wide)[0] is None
    decoder = IncrementalDecoder(model, SEG)
    assert decoder.fused_unavailable == "the projections are not all float16 or all int8 (precision float32)"
    old = kernels.set_enabled(False)
    try:
        decoder = IncrementalDecoder(half, SEG)
        assert decoder.step_kind == "eager" and decoder.fused_unavailable == "the CPU kernels are not loaded"
    finally:
        kernels.set_enabled(old)


def test_the_fused_step_takes_its_weights_by_name(built):
    """The op names its weights (kernels.step_fields); the Python side hands over each by that name."""
    layer_fields, head_fields = kernels.step_fields()
    assert layer_fields == ("norm1.weight", "norm1.bias", "qkv", "qkv.scale", "out", "out.scale", "norm2.weight",
                            "norm2.bias", "fc1", "fc1.scale", "fc2", "fc2.scale", "gate.bias")
    assert head_fields == ("norm.weight", "norm.bias", "head", "head.scale")
    int8 = int8_weight_model(tiny_model())
    step, why = FusedStep.for_model(int8)
    assert why == "" and len(step.weights) == 4 * len(layer_fields) + len(head_fields)
    block = int8.blocks[2]
    named = dict(zip(layer_fields, step.weights[2 * len(layer_fields):3 * len(layer_fields)]))
    assert named["norm2.weight"] is block.norm2.weight or torch.equal(named["norm2.weight"], block.norm2.weight)
    assert torch.equal(named["fc1"], block.mlp[0].packed) and torch.equal(named["fc1.scale"], block.mlp[0].packed_scale)
    assert torch.equal(named["out"], block.attn.out_proj.packed)
    head = dict(zip(head_fields, step.weights[-len(head_fields):]))
    assert torch.equal(head["head"], int8.head.packed) and torch.equal(head["norm.bias"], int8.norm.bias)


def test_auto_precision_is_int8_where_the_int8_kernel_can_run_the_model(built):
    from dsmr.generation import default_cpu_precision

    assert default_cpu_precision(tiny_model(d_model=32)) == "int8"
    assert default_cpu_precision(tiny_model(d_model=40)) == "float16"  # 40 inputs: no 16-wide int8 product
    old = kernels.set_enabled(False)
    try:
        assert default_cpu_precision(tiny_model(d_model=32)) == "float16"
    finally:
        kernels.set_enabled(old)


def test_fused_step_rejects_what_it_cannot_take(built):
    half = half_weight_model(tiny_model())
    decoder = IncrementalDecoder(half, SEG)
    step, _ = FusedStep.for_model(half)
    weights = step.weights
    args = dict(ids=torch.tensor([3]), embedding=half.embedding.weight, weights=weights, keys=decoder.keys,
                values=decoder.values, memory_fill=[0] * 4, t=0, cos=decoder._rope[0], sin=decoder._rope[1],
                n_heads=4, ff_dim=half.cfg.ff_dim, rmsnorm=step.rmsnorm, eps=step.eps)
    assert kernels.decode_step(**args).shape == (1, 50)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        kernels.decode_step(**{**args, "ids": torch.tensor([50])})
    with pytest.raises(RuntimeError, match="slot 11 outside layer 1's buffer of 11"):  # horizon 3 + segment 8
        kernels.decode_step(**{**args, "memory_fill": [0, 4, 0, 0], "t": SEG - 1})
    with pytest.raises(RuntimeError, match="13 per layer"):
        kernels.decode_step(**{**args, "weights": weights[:-1]})
    with pytest.raises(RuntimeError, match="scales"):  # float16 weights take none
        kernels.decode_step(**{**args, "weights": [torch.ones(8) if i == 3 else w for i, w in enumerate(weights)]})
    with pytest.raises(RuntimeError, match="qkv of layer 0: float16 or int8 weights"):  # qkv and out swapped
        kernels.decode_step(**{**args, "weights": [weights[4] if i == 2 else weights[2] if i == 4 else w
                                                   for i, w in enumerate(weights)]})
    int8 = int8_weight_model(tiny_model())
    int8_weights = FusedStep.for_model(int8)[0].weights
    with pytest.raises(RuntimeError, match="int8 weights need float32 scales"):  # a scale dropped
        kernels.decode_step(**{**args, "weights": [w.new_zeros(0) if i == 3 else w for i, w in enumerate(int8_weights)],
                               "embedding": int8.embedding.weight})
    with pytest.raises(RuntimeError, match="one rotary table"):  # no rotary dims at all: refused, no crash
        kernels.decode_step(**{**args, "cos": decoder._rope[0][..., :0], "sin": decoder._rope[1][..., :0]})
    with pytest.raises(RuntimeError, match="state"):
        kernels.decode_step(**{**args, "keys": [k.half() for k in decoder.keys]})  # values stay float32


def test_a_failed_build_warns_once_and_decoding_still_works(monkeypatch):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise OSError("g++: command not found")

    monkeypatch.setattr(kernels, "_state", {"loaded": False, "error": None, "enabled": True})
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.delenv("DSMR_KERNELS", raising=False)
    with pytest.warns(RuntimeWarning, match="could not be built.*g\\+\\+: command not found"):
        assert not kernels.load()
    assert not kernels.load() and "g++" in kernels.load_error()  # tried once: no second warning
    model = half_weight_model(tiny_model())
    assert all(getattr(m, "packed", None) is None for m in model.modules())
    ids = torch.randint(3, 50, (1, 12), generator=torch.Generator().manual_seed(5))
    decoder = IncrementalDecoder(model, SEG)
    decoder.feed(ids[:, :4])
    stepped = torch.stack([decoder.step(ids[:, i]) for i in range(4, 12)], dim=1)
    torch.testing.assert_close(stepped, streaming_logits(tiny_model(), ids, SEG)[:, 4:], rtol=0, atol=2e-3)


def test_dsmr_kernels_0_skips_them(monkeypatch, recwarn):
    monkeypatch.setattr(kernels, "_state", {"loaded": False, "error": None, "enabled": True})
    monkeypatch.setenv("DSMR_KERNELS", "0")
    assert not kernels.needs_build()  # so `dsmr generate` does not announce a build
    assert not kernels.load() and not kernels.loaded()
    assert not [w for w in recwarn if "dsmr" in str(w.message)]


def test_a_build_lock_left_by_a_killed_process_is_removed_at_once(monkeypatch, tmp_path, capsys):
    """torch waits for a build's lock without a timeout: one left by a killed process (however fresh) must not
    hang us; a build running in a live process is waited for, up to a limit."""
    import subprocess
    import sys
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = kernels.build_directory()
    assert folder.parent == tmp_path and torch.__version__.replace("+", "_") in folder.name
    folder.mkdir()
    # a builder killed with SIGKILL while holding both locks: the flock dies with it, torch's file stays
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, pathlib, time
folder = pathlib.Path({str(folder)!r})
handle = open(folder / "dsmr-build.flock", "a+")
fcntl.flock(handle, fcntl.LOCK_EX)
(folder / "lock").touch()
print("held", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(kernels.BuildLockTimeout, match="another process"):
        with kernels.build_lock(folder, wait_seconds=0.5):
            pass
    assert (folder / "lock").exists(), "a live build's lock is left alone"
    holder.kill()
    holder.wait()
    start = time.monotonic()
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one dsmr line on stderr, not a Python warning with a source line
        with kernels.build_lock(folder, wait_seconds=30):
            assert not (folder / "lock").exists()
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err
    assert err.startswith("dsmr: removing a build lock left by a killed build") and err.count("\n") == 1


def test_the_build_folder_is_keyed_on_what_the_build_is_made_from(monkeypatch, tmp_path):
    """Not on the checkout: two copies of the same source share a build; a changed source or compiler builds
    anew; torch and Python are in the name."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    here = kernels.build_directory()
    assert torch.__version__.replace("+", "_") in here.name and here.name.endswith(kernels.build_key())
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "kernels.cpp").write_bytes(kernels.SOURCE.read_bytes())
    monkeypatch.setattr(kernels, "SOURCE", tmp_path / "a" / "kernels.cpp")
    key_a = kernels.build_directory()
    monkeypatch.setattr(kernels, "SOURCE", tmp_path / "b" / "kernels.cpp")
    assert kernels.build_directory() == key_a == here
    (tmp_path / "b" / "kernels.cpp").write_bytes(kernels.SOURCE.read_bytes() + b"\n// changed\n")
    assert kernels.build_directory() != here
    monkeypatch.setattr(kernels, "SOURCE", tmp_path / "a" / "kernels.cpp")
    kernels._compiler_identity.cache_clear()
    monkeypatch.setenv("CXX", str(tmp_path / "another-compiler"))
    try:
        assert kernels.build_directory() != here
    finally:
        kernels._compiler_identity.cache_clear()


def test_the_build_uses_this_pythons_ninja_whatever_the_path(monkeypatch):
    ninja = pytest.importorskip("ninja")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with kernels._one_ninja():
        assert os.environ["PATH"].split(os.pathsep)[0] == str(Path(ninja.BIN_DIR))
    assert os.environ["PATH"] == "/usr/bin:/bin"


def test_needs_build_until_a_build_is_in_the_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_state", {"loaded": False, "error": None, "enabled": True})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("DSMR_KERNELS", raising=False)
    assert kernels.needs_build()
    kernels.build_directory().mkdir()
    (kernels.build_directory() / f"{kernels.NAME}.so").touch()
    assert not kernels.needs_build()


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("gate", ["soft", "ste"])
def test_fused_step_applies_trained_gates_to_exactly_the_memory_slots(built, head_dim, gate):
    """Gates away from their initial value (soft: a bias log g between -3 and -0.3 per head; STE: some heads
    closed) at every head dim with a register kernel: a gate bias added one slot off, or to a segment slot,
    moves the logits far beyond the tolerance."""
    torch.manual_seed(head_dim)
    model = DSMR(DSMRConfig(vocab_size=50, n_layers=2, d_model=2 * head_dim, n_heads=2, head_dim=head_dim,
                            horizons=(9, 4), gate=gate, gate_per_head=True, tie_embeddings=True,
                            init_std=0.02)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv_proj.weight.normal_(std=0.3)  # sharp attention: each slot's weight shows
            block.attn.gate_logit.copy_(torch.tensor([-3.0, 1.0]) if gate == "soft" else torch.tensor([-2.0, 2.0]))
    half = half_weight_model(model)
    ids = torch.randint(3, 50, (1, 30), generator=torch.Generator().manual_seed(5))

    def decode(fused):
        decoder = IncrementalDecoder(half, SEG, state_dtype=torch.float32, fused=fused)
        assert decoder.step_kind == ("fused" if fused else "eager")
        decoder.feed(ids[:, :4])
        return torch.stack([decoder.step(ids[:, i]) for i in range(4, 30)], dim=1)

    eager = decode(False)
    torch.testing.assert_close(decode(True), eager, rtol=0, atol=5e-5)
    # the gates matter here: the same weights with every gate open give other logits
    with torch.no_grad():
        for block in half.blocks:
            block.attn.gate_logit.fill_(5.0)
    assert (decode(False) - eager).abs().max() > 1e-2
