"""The fused one-token step: dsmr.backends.cpu.kernels' C++ op that runs a whole decoding step of a model with packed
float16 or int8 projections (dsmr.generation.precision) in one call. It is the CPU backend of the model's
block (`dsmr.model.network.Block`), tested against it; its weights are handed over by name.

`FusedStep.for_model(model)` packs what the op needs once, or says why it cannot run the model (the decoder
then runs the PyTorch step and reports the reason)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from dsmr.backends.cpu import kernels
from dsmr.backends.cpu.quantized import HalfWeightLinear, Int8WeightLinear


class FusedStep:
    """The packed weights of one model, by the op's names, and the call of `kernels.decode_step`."""

    def __init__(self, model, weights: list[Tensor], rmsnorm: bool, eps: float):
        self.model, self.weights, self.rmsnorm, self.eps = model, weights, rmsnorm, eps

    @classmethod
    def for_model(cls, model) -> tuple[Optional["FusedStep"], str]:
        """(the step, "") where the op can run `model`, else (None, why not)."""
        why = _why_not(model)
        if why:
            return None, why
        rmsnorm = isinstance(model.norm, nn.RMSNorm)
        layer_fields, head_fields = kernels.step_fields()
        empty = model.embedding.weight.new_zeros(0)
        weights = []
        for block in model.blocks:
            gate = block.attn.memory_bias()  # a constant at inference: taken now
            named = {"norm1": block.norm1, "norm2": block.norm2, "qkv": block.attn.qkv_proj,
                     "out": block.attn.out_proj, "fc1": block.mlp[0], "fc2": block.mlp[2]}
            weights += [_field(named, name, empty, gate) for name in layer_fields]
        named = {"norm": model.norm, "head": model.head}
        weights += [_field(named, name, empty, None) for name in head_fields]
        eps = model.norm.eps if model.norm.eps is not None else torch.finfo(torch.float32).eps
        return cls(model, [w.detach().contiguous() for w in weights], rmsnorm, float(eps)), ""

    def __call__(self, ids: Tensor, keys: list, values: list, memory_fill: list, t: int, cos: Tensor,
                 sin: Tensor) -> Tensor:
        cfg = self.model.cfg
        return kernels.decode_step(ids, self.model.embedding.weight, self.weights, keys, values, memory_fill, t, cos,
                                   sin, cfg.n_heads, cfg.ff_dim, self.rmsnorm, self.eps)


def _field(modules: dict, name: str, empty: Tensor, gate: Optional[Tensor]) -> Tensor:
    """The tensor the op names `name` ("norm1.weight", "qkv", "qkv.scale", "gate.bias", ...)."""
    if name == "gate.bias":
        return empty if gate is None else gate.float()
    module, _, part = name.partition(".")
    module = modules[module]
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        tensor = getattr(module, part, None)
        return empty if tensor is None else tensor
    if part == "scale":  # int8 row scales; float16 weights have none
        return module.packed_scale if isinstance(module, Int8WeightLinear) else empty
    return module.packed


def _why_not(model) -> str:
    """Why the op cannot run `model` ("" where it can). It runs a CPU model from `half_weight_model` or
    `int8_weight_model` (every projection packed, float32 embedding and norms) with exact GELU and one kind
    of norm of one eps, with the kernels loaded."""
    table = model.embedding.weight
    if not kernels.loaded():
        return "the CPU kernels are not loaded"
    if table.device.type != "cpu" or table.dtype != torch.float32:
        return "the model is not a float32 model on the CPU"
    if table.shape[1] % 8:
        return "d_model is not a multiple of 8"
    norms = [n for block in model.blocks for n in (block.norm1, block.norm2)] + [model.norm]
    if any(type(n) is not type(norms[0]) or not isinstance(n, (nn.LayerNorm, nn.RMSNorm)) for n in norms):
        return "the norms are not all LayerNorm or all RMSNorm"
    eps = {n.eps if n.eps is not None else torch.finfo(torch.float32).eps for n in norms}
    if len(eps) != 1:
        return "the norms have different eps"
    if any(n.weight is None or n.weight.dtype != torch.float32 for n in norms):
        return "a norm without a float32 weight"
    if isinstance(norms[0], nn.LayerNorm) and any(n.bias is None for n in norms):
        return "a LayerNorm without a bias"
    linears = [m for block in model.blocks
               for m in (block.attn.qkv_proj, block.attn.out_proj, block.mlp[0], block.mlp[2])] + [model.head]
    kind = type(linears[0])
    if kind not in (HalfWeightLinear, Int8WeightLinear) or any(type(m) is not kind for m in linears):
        return "the projections are not all float16 or all int8 (precision float32)"
    if any(m.packed is None or m.packed.dtype != m.PACKED_DTYPE for m in linears):
        return "a projection is not packed for the kernels"
    if kind is Int8WeightLinear and any(m.packed_scale.dtype != torch.float32 for m in linears):
        return "int8 scales are not float32"
    if any(len(block.mlp) != 3 or not isinstance(block.mlp[1], nn.GELU) or block.mlp[1].approximate != "none"
           for block in model.blocks):
        return "the MLP is not Linear, exact GELU, Linear"
    if any(block.attn.memory_bias() is not None and block.attn.memory_bias().dtype != torch.float32
           for block in model.blocks):
        return "a gate is not float32"
    return ""
