"""The frozen quantized weights of a quantized bundle's deepening programs (`pc`).

A sweep must differentiate the values the bundle serves, without an fp32 copy of them:
`Frozen` holds a linear as the ONNX serving programs' own codes and scales
(`quantize.packed`), `FrozenExperts` a MoE block's base experts in the routed layout
(`codes.routed_codes`), both dequantized in plain ops at every run; `freeze` puts them into
a program's model in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import quantize
from .codes import dequant, routed_codes


class Frozen(nn.Module):
    """A frozen int`bits` linear of a quantized bundle's deepening programs: it holds the
    serving programs' bytes (`packed`) and dequantizes them in plain ops (Cast, Div, Floor,
    Sub, Mul) at every run, so a sweep differentiates the values the bundle serves without
    an fp32 copy of them: ONNX Runtime's weight file stores equal tensors once, and these
    are equal to `MatMulNBits`' own."""

    def __init__(self, linear: nn.Linear, bits: int):
        super().__init__()
        self.bits, (self.out_features, self.in_features) = bits, linear.weight.shape
        self.bias = linear.bias  # fp32, as the serving programs add it
        u, scales = quantize.packed(linear.weight.detach().float(), bits)
        self.register_buffer("codes", torch.from_numpy(u))
        self.register_buffer("scales", torch.from_numpy(scales))

    @property
    def weight(self) -> torch.Tensor:
        return dequant(self.codes, self.scales, self.bits, self.out_features,
                           self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


class FrozenExperts(nn.Module):
    """A MoE block's frozen int`bits` base experts in a quantized bundle's deepening programs:
    the routed layout's codes and scales (`codes.routed_codes`, the bytes ONNX Runtime's
    serving programs hold), dequantized in plain ops at every run; `weight(proj)` is the
    linear the block's `DenseMoE.combine` calls ([E*F, C] gate and up, [C, E*F] down). The
    buffers are shaped so that no op views one of them (ExecuTorch cannot emit a view of a
    constant that lives in the `.ptd`): fc1 [E, F, 2, C/32, n] (gate, up), fc2 [E*C, F/32,
    n], the scales alike."""

    def __init__(self, mlp: nn.Module, bits: int):
        super().__init__()
        self.bits = bits
        fc = routed_codes(mlp.source[0].experts, mlp.live, bits,
                              quantize.packed)
        e, f2, c = fc["fc1_scales"].shape[0], fc["fc1_scales"].shape[1], fc["fc2"].shape[1]
        self.shape, self.group = (e, f2 // 2, c), fc["group"]
        self.register_buffer("fc1", fc["fc1"].reshape(e, f2 // 2, 2, c // self.group, -1))
        self.register_buffer("fc1_scales", fc["fc1_scales"].reshape(e, f2 // 2, 2, -1))
        self.register_buffer("fc2", fc["fc2"].reshape(e * c, f2 // 2 // self.group, -1))
        self.register_buffer("fc2_scales", fc["fc2_scales"].reshape(-1))

    def weight(self, proj: str) -> torch.Tensor:
        e, f, c = self.shape
        if proj == "down_proj":  # [E, C, F] -> [C, E*F]
            w = dequant(self.fc2, self.fc2_scales, self.bits, e * c, f)
            return w.reshape(e, c, f).permute(1, 0, 2).reshape(c, e * f)
        row = int(proj == "up_proj")  # gate and up rows alternate in fc1
        codes = self.fc1[:, :, row].reshape(e * f, c // self.group, -1)
        return dequant(codes, self.fc1_scales[:, :, row].reshape(-1), self.bits, e * f, c)


class _Part(nn.Module):
    """One of `FrozenExperts`' three linears (it holds them, not a copy)."""

    def __init__(self, experts: FrozenExperts, proj: str):
        super().__init__()
        self.experts, self.proj = [experts], proj  # a list: not a submodule of each part

    @property
    def weight(self) -> torch.Tensor:
        return self.experts[0].weight(self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def freeze(model: nn.Module, bits: int) -> nn.Module:
    """`model` (a `programs.with_moe` copy) with every linear a quantized bundle serves at
    `bits` (attention; the head at 8) made `Frozen` and every MoE block's base experts
    `FrozenExperts` (`mlp.frozen`), in place: the spare slots, the router, the norms and
    the embedding stay as they are."""
    quantize._check_bits(bits)
    for block in model.model.layers:
        block.mlp.frozen = FrozenExperts(block.mlp, bits)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            setattr(block.mlp, proj, _Part(block.mlp.frozen, proj))
    for name, module in list(model.named_modules()):
        if quantize._quantized(module, name) or quantize._head(module, name):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf,
                    Frozen(module, 8 if quantize._head(module, name) else bits))
    return model
