"""Linear layers with float16 or int8 weights for CPU decoding: dsmr.backends.cpu.kernels' GEMV where it is
loaded, PyTorch's otherwise (dsmr.generation.precision decides which a model gets)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsmr.backends.cpu import kernels
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
        # dsmr.backends.cpu.kernels' layout of the same weight, for few rows on a CPU (not saved; None without the kernels).
        # Loading a state dict packs again; an in-place edit of `weight` must call repack().
        self.register_buffer("packed", None, persistent=False)
        self.repack()
        self.register_load_state_dict_post_hook(lambda module, keys: module.repack())

    KERNEL_ROWS = 32  # below this many rows, dsmr.backends.cpu.kernels' half_linear where it is loaded

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
    Few rows go through dsmr.backends.cpu.kernels' int8_linear (each row's activations rounded to int16, exact int32
    sums); many rows (a prompt), or any row without the kernels, through a float32 product with the
    dequantized weight.
    """

    KERNEL_ROWS = 32  # below this many rows, dsmr.backends.cpu.kernels' int8_linear where it is loaded
    PACKED_DTYPE = torch.int8

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise DsmrError("Int8WeightLinear: linear layers with a bias are not supported")
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("packed", None, persistent=False)  # dsmr.backends.cpu.kernels' layouts (None without them)
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
