"""Decoding precision on a CPU: projections with float16 or int8 weights (`with_precision`), what `auto`
means on this machine, and the state's dtype that goes with them. The fused one-token step that runs such a
model is dsmr.generation.fused."""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsmr import kernels, playing
from dsmr.errors import DsmrError


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


def resolve_precision(model, precision: str = playing.PRECISION) -> str:
    """`precision` as decoding keeps the weights of `model`: "auto" is `default_cpu_precision` on a CPU and
    "float32" elsewhere; the others as they are (checked)."""
    if precision == "auto":
        return default_cpu_precision(model) if model.embedding.weight.device.type == "cpu" else "float32"
    if precision not in playing.PRECISIONS:
        raise DsmrError(f"precision must be auto or one of {', '.join(playing.PRECISIONS)}, got {precision!r}")
    return precision


def with_precision(model, precision: str = playing.PRECISION):
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
    `int8_weight_model`) where its steps widen them inside a kernel (dsmr.kernels' attention, or the compiled
    step's), else the model's dtype (None).
    Every step reads the whole state: half the bytes, x1.4 for 16 lanes on 2 threads (docs/generation.md).
    An eager step without dsmr.kernels would widen the whole state into a copy every step (x0.5 there), and
    a float32 model keeps a float32 state."""
    on_cpu = model.embedding.weight.device.type == "cpu"
    half = any(isinstance(m, (HalfWeightLinear, Int8WeightLinear)) for m in model.modules())
    return torch.float16 if (compile or kernels.loaded()) and on_cpu and half else None
