"""Decoding precision on a CPU: projections with float16 or int8 weights (`with_precision`), what `auto`
means on this machine, and the state's dtype that goes with them. The fused one-token step that runs such a
model is dsmr.backends.cpu.fused."""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from dsmr.backends.cpu import kernels
from dsmr.backends.cpu.quantized import HalfWeightLinear, Int8WeightLinear
from dsmr.generation import defaults
from dsmr.errors import DsmrError


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
    """What `--precision auto` means on a CPU: "int8" where dsmr.backends.cpu.kernels load and can run the model's int8
    products (every Linear's inputs a multiple of 16): on the shipped model about twice float16's sampling
    speed for +0.02% validation perplexity (docs/generation.md). Else "float16": without the int8 kernel a
    product dequantizes its whole weight every call."""
    kernels.load()
    int8_ready = all(m.in_features % 16 == 0 for m in model.modules() if isinstance(m, nn.Linear))
    return "int8" if kernels.loaded() and int8_ready else "float16"


def resolve_precision(model, precision: str = defaults.PRECISION) -> str:
    """`precision` as decoding keeps the weights of `model`: "auto" is `default_cpu_precision` on a CPU and
    "float32" elsewhere; the others as they are (checked)."""
    if precision == "auto":
        return default_cpu_precision(model) if model.embedding.weight.device.type == "cpu" else "float32"
    if precision not in defaults.PRECISIONS:
        raise DsmrError(f"precision must be auto or one of {', '.join(defaults.PRECISIONS)}, got {precision!r}")
    return precision


def with_precision(model, precision: str = defaults.PRECISION):
    """`model` with its projection weights as `precision` keeps them for decoding: "float32" (the model
    itself), "float16" (`half_weight_model`), "int8" (`int8_weight_model`) or "auto" (`resolve_precision`)."""
    converters = {"float32": lambda m: m, "float16": half_weight_model, "int8": int8_weight_model}
    return converters[resolve_precision(model, precision)](model)


def _with_linears(model, linear_class):
    model = copy.deepcopy(model).eval()
    if model.embedding.weight.device.type == "cpu":
        kernels.load()  # built once per machine; the PyTorch path where it cannot be
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, linear_class(child))
    return model


def decoding_state_dtype(model, compile: bool) -> Optional[torch.dtype]:
    """float16 keys/values for a float16- or int8-weight model on a CPU (`half_weight_model`,
    `int8_weight_model`) where its steps widen them inside a kernel (dsmr.backends.cpu.kernels' attention, or the compiled
    step's), else the model's dtype (None).
    Every step reads the whole state: half the bytes, x1.4 for 16 lanes on 2 threads (docs/generation.md).
    An eager step without dsmr.backends.cpu.kernels would widen the whole state into a copy every step (x0.5 there), and
    a float32 model keeps a float32 state."""
    on_cpu = model.embedding.weight.device.type == "cpu"
    half = any(isinstance(m, (HalfWeightLinear, Int8WeightLinear)) for m in model.modules())
    return torch.float16 if (compile or kernels.loaded()) and on_cpu and half else None
