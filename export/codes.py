"""The quantized expert layouts in torch, shared by the programs (`moe`) and the deepening
programs (`frozen`): `dequant` of the `q8` / `q4` / `q2` codes, the routed layout
(`routed_codes`, the bytes ONNX Runtime's `QMoE` and moegrow's ExecuTorch kernel read) and
moegrow's custom ops `moegrow::routed_moe` and `moegrow::pooled_moe`, registered with their
torch references."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .models import layers


def dequant(codes: torch.Tensor, scales: torch.Tensor, bits: int, out: int,
            in_: int) -> torch.Tensor:
    """A [out, in] weight from its `q8` / `q4` / `q2` codes [out, in / 32, 32 * bits / 8]
    (uint8) and fp32 scales (`device_kernels.layout`), in plain ops (Cast, Div, Floor, Sub,
    Mul) that both engines run."""
    q = codes.float()
    if bits < 8:  # 8 / bits codes to a byte, the first in the lowest bits
        parts, levels = [], float(1 << bits)
        for _ in range(8 // bits - 1):
            high = torch.floor(q / levels)
            parts.append(q - levels * high)
            q = high
        q = torch.stack([*parts, q], -1).reshape(*codes.shape[:2], -1)
    w = (q - (1 << (bits - 1))) * scales.reshape(*q.shape[:2], 1)
    return w.reshape(out, in_)


def routed_codes(experts: layers.Experts, live: int, bits: int, pack) -> dict:
    """The base experts' (the first `live` slots') codes in the routed layout: `fc1` [E, 2F,
    C*bits/8] (gate and up rows interleaved, `swiglu_fusion=1`, the only SwiGLU form ONNX
    Runtime's `QMoE` CPU kernel takes), `fc2` [E, C, F*bits/8], uint8 codes in blocks along
    the input with fp32 scales `fc1_scales` [E, 2F, C/block], `fc2_scales` [E, C, F/block],
    made from `pack(w, bits)` (`quantize.packed`) of the dense programs' linears ([E*F, C],
    [C, E*F]), so every form serves the same values (int8's down scales span all experts'
    row, as there). `RoutedMoE` serves them; a quantized bundle's deepening programs read
    them (`frozen.FrozenExperts`): one copy of the base experts in a weight file."""
    e, f, c = live, experts.gate_proj.shape[1], experts.gate_proj.shape[2]

    def codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, s = pack(w.detach().float().contiguous(), bits)
        return torch.from_numpy(u), torch.from_numpy(s).reshape(u.shape[:2])

    def interleaved(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:  # [E*F, n] x 2
        return torch.stack([g.reshape(e, f, -1), u.reshape(e, f, -1)], 2).reshape(e, 2 * f, -1)

    def per_expert(d: torch.Tensor) -> torch.Tensor:  # [C, E*n] -> [E, C, n]
        return d.reshape(c, e, -1).permute(1, 0, 2).contiguous()

    (ug, sg), (uu, su) = (codes(p[:e].reshape(-1, c)) for p in (experts.gate_proj,
                                                                 experts.up_proj))
    ud, sd = codes(experts.down_proj[:e].permute(1, 0, 2).reshape(c, -1))
    return {"fc1": interleaved(ug, uu), "fc1_scales": interleaved(sg, su),
            "fc2": per_expert(ud), "fc2_scales": per_expert(sd), "group": c // sg.shape[1]}


def routed_weights(fc: dict, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`routed_codes`' values in plain ops: (gate and up interleaved [E, 2F, C], down
    [E, C, F])."""
    (e, f2, _), (_, c, _) = fc["fc1_scales"].shape, fc["fc2_scales"].shape
    f, group = f2 // 2, fc["group"]
    w1 = dequant(fc["fc1"].reshape(e * f2, c // group, -1), fc["fc1_scales"].reshape(-1), bits,
                 e * f2, c)
    w2 = dequant(fc["fc2"].reshape(e * c, f // group, -1), fc["fc2_scales"].reshape(-1), bits,
                 e * c, f)
    return w1.reshape(e, f2, c), w2.reshape(e, c, f)


def _routed_moe(x: torch.Tensor, gates: torch.Tensor, fc1: torch.Tensor,
                fc1_scales: torch.Tensor, fc2: torch.Tensor, fc2_scales: torch.Tensor,
                bits: int) -> torch.Tensor:
    """`moegrow::routed_moe` in torch (every expert computed, weighted by `gates`, 0 off the
    chosen): the reference of `device_kernels/routed_moe.cpp`, which reads only the chosen
    experts' rows."""
    fc = {"fc1": fc1, "fc1_scales": fc1_scales, "fc2": fc2, "fc2_scales": fc2_scales,
          "group": x.shape[-1] // fc1_scales.shape[-1]}
    w1, w2 = routed_weights(fc, bits)
    h = swiglu(torch.einsum("nc,egc->neg", x, w1).reshape(*gates.shape, -1, 2))
    return torch.einsum("nef,ecf->nc", h * gates[..., None], w2)


def _pooled_moe(x: torch.Tensor, gates: torch.Tensor, gate_codes: torch.Tensor,
                gate_scales: torch.Tensor, up_codes: torch.Tensor, up_scales: torch.Tensor,
                down_codes: torch.Tensor, down_scales: torch.Tensor, bits: int) -> torch.Tensor:
    """`moegrow::pooled_moe` in torch: a run of n pool slots (`Pooled` codes and scales) on
    x [N, C], weighted by gates [N, n], every slot computed (fp32 activations): what
    `Slots.spare_out` computes densely, and the reference of `routed_moe.cpp`'s
    `pooled_moe`, which reads only the chosen slots' rows."""
    n, c = gates.shape[1], x.shape[1]
    f = gate_codes.shape[0] // n
    wg, wu = (dequant(q, s, bits, n * f, c) for q, s in ((gate_codes, gate_scales),
                                                          (up_codes, up_scales)))
    h = (F.silu(F.linear(x, wg)) * F.linear(x, wu)).reshape(-1, n, f)
    return F.linear((h * gates[..., None]).reshape(-1, n * f),
                    dequant(down_codes, down_scales, bits, c, n * f))


# moegrow's ExecuTorch kernels (`device_kernels/routed_moe.cpp`, `device_kernels.native`): the
# routed quantized MoE (`RoutedMoE` in a `.pte`) and the pool slots read only where chosen
# (`Slots.spare_out`). torch.export keeps each as one node
# (CompositeExplicitAutograd: the torch functions above are their references), ExecuTorch's
# memory planning runs its out variant.
_LIB = torch.library.Library("moegrow", "DEF")


def _op(name: str, schema: str, impl) -> None:
    _LIB.define(f"{name}({schema}) -> Tensor")
    _LIB.define(f"{name}.out({schema}, *, Tensor(a!) out) -> Tensor(a!)")
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    _LIB.impl(name, lambda x, *_: torch.empty_like(x), "Meta")
    _LIB.impl(f"{name}.out", lambda *a, out: out.copy_(impl(*a)), "CompositeExplicitAutograd")
    _LIB.impl(f"{name}.out", lambda *a, out: out, "Meta")


_op("routed_moe", "Tensor x, Tensor gates, Tensor fc1, Tensor fc1_scales, Tensor fc2, "
    "Tensor fc2_scales, int bits", _routed_moe)
_op("pooled_moe", "Tensor x, Tensor gates, Tensor gate_codes, Tensor gate_scales, "
    "Tensor up_codes, Tensor up_scales, Tensor down_codes, Tensor down_scales, int bits",
    _pooled_moe)


def swiglu(z: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of interleaved pre-activations [..., 2] (`routed_codes`' fc1 rows)."""
    return F.silu(z[..., 0]) * z[..., 1]
