"""The MoE blocks and norms every program swaps into its copy of the model (`programs.
with_moe`): `DenseMoE` (all experts, constant-weight GEMMs), `GatherMoE` (the chosen
experts' weights gathered), what both share (`Slots`: the router over the open slots, the
spare slots), and `MeanNorm`.

MoE formulation, measured on the small shapes (C 192, F 384, 4 layers, E 8, K 2, V 4096,
S 256): tokens/s at 1 thread, medians of 15 interleaved rounds (CPU time; runs on the loaded
machine gave the same order). Eager torch: decode 332, 32-token prefill 2854.

    program        MoE      XNNPACK .pte   ONNX Runtime
    decode         gather        300            533
    decode         dense         314            423
    prefill T=32   dense        2306           3315
    prefill T=32   gather        385            718

- `prefill`, `score`: `DenseMoE`. Two constant-weight GEMMs over all experts beat gathering
  K weight copies per token by 6x (XNNPACK) and 4.6x (ORT) at T=32.
- `decode`: `GatherMoE`. It ties with dense on XNNPACK (the gather copy and the bmm's weight
  packing cost what dense wastes) and wins 1.26x on ORT; it reads K/E of the expert weights,
  so it gains as experts grow (C 512, F 1024: XNNPACK 108 vs 99, ORT 179 vs 115).
- `torch.cond` per expert (constant-weight linears, only the chosen run) is fastest on ORT
  (655 vs 576 for gather in one run) but does not lower to XNNPACK in ExecuTorch 1.5: linears
  inside cond branches are neither delegated nor decomposed.

XNNPACK partitions. Every op XNNPACK does not take splits the graph: the op runs as a
portable kernel and the delegate is re-entered after it. Three formulations keep the default
model's decode at 17 delegate calls (was 37; prefill 39, was 55): the cached attention in
`layers.attend` folds the query heads that share a kv head into the time axis and uses 3-D
bmm (SDPA's GQA expands the whole cache per layer, outside XNNPACK); `MeanNorm` computes the
norm's mean of squares as a linear; `GatherMoE` sums its K outputs with a bmm. What is left
outside: the cache `index_copy`, top-k, the expert-weight gather and the mask. Fp32 decode on
ExecuTorch went from 0.90x to 1.26x torch eager (docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from moegrow.device_kernels import layout
from torch import nn

from .codes import dequant, routed_codes, routed_weights, swiglu  # also registers the ops
from .models import layers

MASKED = 1e4  # subtracted from the router logit of a slot that is closed at a position


def route(moe: nn.Module, x: torch.Tensor):
    """`layers.MoE.route` over the slots open at each position (`set_gates`) and never over
    the spare slots of a one-pass program (`closed`); softmax in fp32."""
    logits = moe.gate(x)
    if hasattr(moe, "slot_open"):  # set_gates was called (every program does)
        logits = logits + moe.slot_bias + (moe.slot_open - 1.0) * MASKED
    if getattr(moe, "closed", None) is not None:
        logits = logits + moe.closed
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, moe.top_k, dim=-1)
    moe.chosen = ids  # `Score`'s ids output
    if moe.norm_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, weights.to(x.dtype), ids


def weight(linear: nn.Linear) -> torch.Tensor:
    """A linear's weight as fp32 for code that reads it directly (the taps read the head;
    `quantize.dequantized` reads every quantized linear back for the torch reference):
    dequantized where a quantizer has replaced it with a quantized tensor (torchao's,
    `quantize.quantize_for_pte`), so every program works on quantized modules."""
    w = linear.weight
    if not hasattr(w, "qdata"):
        return w.float()
    # torchao's IntxUnpackedToInt8Tensor: int8 codes, scale and zero point per block of
    # `block_size`; dequantized in plain ops (its `dequantize` is a custom op ExecuTorch lacks)
    q, (rows, cols) = w.qdata.float(), w.qdata.shape
    blocks = cols // w.block_size[1]
    scale = w.scale.float().reshape(rows, blocks, 1)
    zero = w.zero_point.float().reshape(rows, blocks, 1)
    return ((q.reshape(rows, blocks, -1) - zero) * scale).reshape(rows, cols)


def _linear(w: torch.Tensor) -> nn.Linear:
    """A bias-free linear holding `w` [out, in] as a constant of the program."""
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight = nn.Parameter(w.contiguous().clone(), requires_grad=False)
    return linear


class Pooled(nn.Module):
    """A linear of the pool's slots (`programs.with_spare`), held as the codes and scales
    that `runtime.compress` writes (`layout.packed`), dequantized at every run."""

    def __init__(self, w: torch.Tensor, bits: int):
        super().__init__()
        self.bits, (self.out_features, self.in_features) = bits, w.shape
        codes, scales = layout.packed(w.detach().float().numpy(), bits, POOL_GROUP)
        self.register_buffer("codes", torch.from_numpy(codes))
        self.register_buffer("scales", torch.from_numpy(scales))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():  # ONNX Runtime's kernel on the same bytes
            return torch.onnx.ops.symbolic(
                "com.microsoft::MatMulNBits", (x, self.codes, self.scales),
                {"K": self.in_features, "N": self.out_features, "bits": self.bits,
                 "block_size": POOL_GROUP, "accuracy_level": POOL_ACCURACY[self.bits]},
                dtype=x.dtype, shape=(*x.shape[:-1], self.out_features), version=1)
        return F.linear(x, dequant(self.codes, self.scales, self.bits, self.out_features,
                                   self.in_features))


POOL_GROUP = 32  # the pool's quantization group along each linear's input
# ONNX Runtime's `MatMulNBits` accuracy level per pool width: at 8 and 2 bits its CPU
# kernel has no fp32-activation fast path (level 0 dequantizes the weight at every run:
# 100-145 us against 8-11 us at level 4, activations in int8 per block, for a [384, 192]
# linear on one token; docs/compress.md); at 4 bits level 0 is as fast and exact
POOL_ACCURACY = {8: 4, 4: 0, 2: 4}


def runs(bits: list[int]) -> list[tuple[int, int]]:
    """A pool's slot bit widths in order -> [(bits, slots)] of consecutive equal ones: each
    run is one set of linears (`Slots`), one layout entry per projection."""
    out: list[tuple[int, int]] = []
    for b in bits:
        if out and out[-1][0] == b:
            out[-1] = (b, out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


class Slots(nn.Module):
    """What both MoE formulations share: the router, the split of the slots into E base
    experts and S spare ones (`with_spare`), and with `gated` off (the one-pass programs) a
    constant `closed` that keeps the spare slots out of routing, so they are never
    computed. The spare slots' weights are linears of their own, `spare_gate`, `spare_up`
    ([S*F, C]) and `spare_down` ([C, S*F]), left in fp32 by the quantizers (which take
    `gate_proj`, `up_proj`, `down_proj`): a program without them reads no byte of them.
    The P pool slots after them (a bundle exported with a pool) are, per run of slots of
    equal bits, `pool{i}_gate`, `pool{i}_up` ([n*F, C]) and `pool{i}_down` ([C, n*F]) at
    those bits (`Pooled`), kept out of routing like the spare ones in a one-pass
    program."""

    taps = False  # the program reads every slot's hidden activation (`Observe`, `pc`)
    rows = False  # computed on the rows of the tokens that chose a slot, taps or not (`pc`)

    def __init__(self, moe: layers.MoE, gated: bool = True):
        super().__init__()
        self.gate, self.top_k, self.norm_topk = moe.gate, moe.top_k, moe.norm_topk
        self.source = (moe,)  # for `quantize.dense`/`routed`; not a submodule: not its weights
        slots, f, c = moe.experts.gate_proj.shape
        spare, pool = getattr(moe, "spare", 0), getattr(moe, "pool", 0)
        self.live, self.hidden, self.gated = slots - spare - pool, f, gated
        self.spare = spare if gated else 0  # the spare slots this program computes
        self.pool = pool if gated else 0  # and the pool's
        if (spare or pool) and not gated:
            self.register_buffer("closed", torch.cat([torch.zeros(self.live),
                                                      torch.full((spare + pool,), -MASKED)]))
        else:
            self.closed = None
        ex = moe.experts
        if self.spare:
            part = slice(self.live, self.live + spare)
            self.spare_gate = _linear(ex.gate_proj.detach()[part].reshape(-1, c))
            self.spare_up = _linear(ex.up_proj.detach()[part].reshape(-1, c))
            self.spare_down = _linear(ex.down_proj.detach()[part].permute(1, 0, 2)
                                      .reshape(c, -1))
        self.groups = [(self.spare, "spare")] * bool(self.spare)  # (slots, prefix) in order
        first = self.live + spare
        for i, (bits, n) in enumerate(runs(moe.pool_bits) if self.pool else []):
            part = slice(first, first + n)
            setattr(self, f"pool{i}_gate", Pooled(ex.gate_proj.detach()[part].reshape(-1, c),
                                                  bits))
            setattr(self, f"pool{i}_up", Pooled(ex.up_proj.detach()[part].reshape(-1, c), bits))
            setattr(self, f"pool{i}_down", Pooled(ex.down_proj.detach()[part].permute(1, 0, 2)
                                                  .reshape(c, -1), bits))
            self.groups.append((n, f"pool{i}"))
            first += n

    def route(self, x: torch.Tensor):
        return route(self, x)

    def spare_out(self, x: torch.Tensor, gates: torch.Tensor):
        """The spare and pool slots on x [N, C] with gates [N, E + S + P] -> (output
        [N, C], hidden [N, S + P, F], or None where the pool is routed). With
        `routed_pool` (ExecuTorch's serving programs, `quantize.route_pool`) each run of
        pool slots is `moegrow::pooled_moe`, a kernel that reads only the slots its tokens
        chose (the dense form dequantizes every slot at every run in portable kernels).
        On ONNX Runtime each run of slots (the fp32 spare ones, and the pool's through
        `MatMulNBits` on the same bytes) takes only the rows of the tokens that chose one of
        its slots (NonZero, Gather, ScatterND), so a decode step whose token chose none reads
        no byte of them, unless the program's taps need every slot's activation (`taps`:
        `Observe`, the deepening programs). ExecuTorch keeps the spare slots dense (a kernel
        for them was slower than XNNPACK's GEMMs even in decode: docs/growth.md)."""
        out, hs, first = 0, [], self.live
        onnx = torch.onnx.is_in_onnx_export()
        pool = getattr(self, "routed_pool", False) and not onnx
        rows = self.rows or (onnx and not self.taps)
        for n, name in self.groups:
            g, u, d = (getattr(self, f"{name}_{p}") for p in ("gate", "up", "down"))
            mine = gates[:, first:first + n]
            if pool and name != "spare":
                out = out + torch.ops.moegrow.pooled_moe(
                    x, mine.contiguous(), g.codes, g.scales, u.codes, u.scales, d.codes,
                    d.scales, g.bits)
            elif rows:  # only the tokens that chose one of these slots (none: no byte read)
                at = torch.nonzero((mine != 0).any(1)).squeeze(1)
                xs = x.index_select(0, at)
                h = (F.silu(g(xs)) * u(xs)).reshape(-1, n, self.hidden)
                y = d((h * mine.index_select(0, at)[:, :, None]).reshape(-1, n * self.hidden))
                out = out + torch.zeros_like(x).index_add(0, at, y)
            else:
                h = (F.silu(g(x)) * u(x)).reshape(-1, n, self.hidden)
                out = out + d((h * mine[:, :, None]).reshape(-1, n * self.hidden))
                hs.append(h)
            first += n
        return out, (None if pool or rows else torch.cat(hs, 1))


class DenseMoE(Slots):
    """All experts on every token, weighted by a [N, E + S] gate matrix that is zero off the
    top-k.

    The E base experts are three `nn.Linear`s ([E*F, C], [E*F, C], [C, E*F]) whose weights
    are constants of the program: XNNPACK runs each as one GEMM, and quantizers that swap
    linears (export/quantize.py) see them; the spare slots, when the program computes them,
    three more (`Slots`).
    """

    def __init__(self, moe: layers.MoE, gated: bool = True):
        super().__init__(moe, gated)
        ex, live = moe.experts, self.live
        c = ex.gate_proj.shape[2]
        self.gate_proj = _linear(ex.gate_proj.detach()[:live].reshape(-1, c))
        self.up_proj = _linear(ex.up_proj.detach()[:live].reshape(-1, c))
        self.down_proj = _linear(ex.down_proj.detach()[:live].permute(1, 0, 2).reshape(c, -1))

    def combine(self, x: torch.Tensor, gates: torch.Tensor):
        """x [N, C] and gates [N, E + S] -> (the experts' weighted sum [N, C], every
        computed expert's hidden activation [N, E (+ S), F])."""
        h = (F.silu(self.gate_proj(x)) * self.up_proj(x)).reshape(-1, self.live, self.hidden)
        out = self.down_proj((h * gates[:, :self.live, None]).reshape(-1, self.live *
                                                                       self.hidden))
        if self.spare or self.pool:
            more, hs = self.spare_out(x, gates)
            out, h = out + more, None if hs is None else torch.cat([h, hs], 1)
        return out, h

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, ids = self.route(x)
        gates = torch.zeros_like(logits).scatter(1, ids, weights)  # [N, E + S]
        out, h = self.combine(x, gates)
        self.last = (ids, weights, h)  # for `Observe`'s error taps; dead code elsewhere
        return out.reshape(shape), logits


class FixedRouteMoE(DenseMoE):
    """`DenseMoE` whose gates are constants for the gradient (the router is held fixed): the
    deepening programs' (`pc`)."""

    taps = True  # the sweeps differentiate every slot

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, ids = self.route(x)
        gates = torch.zeros_like(logits).scatter(1, ids, weights).detach()  # [N, E + S]
        self.last, self.input = gates, x
        return self.combine(x, gates)[0].reshape(shape), logits

    def combine(self, x: torch.Tensor, gates: torch.Tensor):
        """With `rows` (ONNX Runtime's sweeps): each base expert on the rows of the tokens
        that chose it (NonZero, Gather, ScatterND: top-k of E is k/E of the dense
        products), the spare slots likewise (`Slots.spare_out`); the same sums."""
        if not self.rows:
            return super().combine(x, gates)
        f = self.hidden
        wg, wu, wd = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
        out = torch.zeros_like(x)
        for e in range(self.live):
            at = torch.nonzero(gates[:, e] != 0).squeeze(1)
            xs = x.index_select(0, at)
            h = F.silu(xs @ wg[e * f:(e + 1) * f].T) * (xs @ wu[e * f:(e + 1) * f].T)
            y = (h * gates.index_select(0, at)[:, e:e + 1]) @ wd[:, e * f:(e + 1) * f].T
            out = out.index_add(0, at, y)
        if self.spare or self.pool:
            out = out + self.spare_out(x, gates)[0]
        return out, None


class GatherMoE(Slots):
    """Only the K chosen experts per token: their stacked weights are gathered, then bmm.
    Gathers read the base experts only; the spare slots, when the program computes them
    (`gated`), run densely beside (`Slots.spare_out`)."""

    def __init__(self, moe: layers.MoE, gated: bool = True):
        super().__init__(moe, gated)
        ex = moe.experts
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, name, nn.Parameter(getattr(ex, name).detach()[:self.live].clone(),
                                             requires_grad=False))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, ids = route(self, x)
        flat = ids.reshape(-1)  # [N*K]
        if self.spare or self.pool:  # a chosen spare (pool) slot gathers expert 0 with
            # weight 0, and runs densely
            gates = torch.zeros_like(logits).scatter(1, ids, weights)
            more, _ = self.spare_out(x, gates)
            weights = weights * (ids < self.live).to(weights.dtype)
            flat = torch.where(flat < self.live, flat, 0)
        xs = x.repeat_interleave(self.top_k, dim=0)[:, :, None]  # [N*K, C, 1]
        h = F.silu(torch.bmm(self.gate_proj[flat], xs)) * torch.bmm(self.up_proj[flat], xs)
        y = torch.bmm(self.down_proj[flat], h).reshape(-1, self.top_k, shape[-1])  # [N, K, C]
        out = torch.bmm(weights[:, None, :].to(y.dtype), y)[:, 0]  # gate-weighted sum over K
        if self.spare or self.pool:
            out = out + more
        return out.reshape(shape), logits


class RoutedMoE(Slots):
    """A quantized ONNX Runtime program's MoE (`quantize.routed`): only the K chosen base
    experts are read, through ONNX Runtime's `QMoE` contrib op, the quantized
    gather-then-matmul neither engine has as plain ops (docs/benchmarks.md), over the base
    experts in the routed layout (`routed_codes`). Routing stays the programs' own (`route`,
    over every open slot): the op picks the top K of the base logits and weighs them by
    `router_weights`, the joint gates, so a base expert that lost its place to a spare or
    pool slot weighs 0 (computed, not counted). With `hidden` (the observe programs, whose
    error taps need every expert's activation, `self.last`), every base expert's gate and up
    also run densely, as one `MatMulNBits` over the same `fc1` bytes. Eager (the torch side
    of the parity tests): the same sums over dequantized weights."""

    def __init__(self, moe: layers.MoE, gated: bool, bits: int, pack, accuracy_level: int,
                 hidden: bool = False):
        super().__init__(moe, gated)
        self.bits, self.accuracy_level, self.dense_hidden = bits, accuracy_level, hidden
        fc = routed_codes(moe.experts, self.live, bits, pack)
        self.group = fc.pop("group")
        for name, t in fc.items():
            self.register_buffer(name, t)
        if hidden:  # fc1's bytes in MatMulNBits' shapes (a copy here: the weight file holds
            # equal tensors once, and each program reads them in place)
            e2f, c = 2 * self.live * self.hidden, moe.experts.gate_proj.shape[2]
            self.register_buffer("fc1_rows", self.fc1.reshape(e2f, c // self.group, -1).clone())
            self.register_buffer("fc1_flat", self.fc1_scales.reshape(-1).clone())

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Every base expert's activation silu(x Wg) * (x Wu) [N, E, F], as the lowered
        program computes it (one `MatMulNBits` over fc1; eager has it from `forward`)."""
        e, f, c = self.live, self.hidden, x.shape[-1]
        z = torch.onnx.ops.symbolic(
            "com.microsoft::MatMulNBits", (x, self.fc1_rows, self.fc1_flat),
            {"K": c, "N": 2 * e * f, "bits": self.bits, "block_size": self.group,
             "accuracy_level": self.accuracy_level},
            dtype=x.dtype, shape=(x.shape[0], 2 * e * f), version=1)
        return swiglu(z.reshape(-1, e, f, 2))

    def _codes(self) -> dict:
        return {"fc1": self.fc1, "fc1_scales": self.fc1_scales, "fc2": self.fc2,
                "fc2_scales": self.fc2_scales, "group": self.group}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, ids = route(self, x)
        gates = torch.zeros_like(logits).scatter(1, ids, weights)
        base = gates[:, :self.live]
        if torch.onnx.is_in_onnx_export():
            out = torch.onnx.ops.symbolic(
                "com.microsoft::QMoE",
                (x, logits[:, :self.live], self.fc1, self.fc1_scales, None, self.fc2,
                 self.fc2_scales, None, None, None, None, None, None, None, base),
                {"k": self.top_k, "activation_type": "swiglu", "swiglu_fusion": 1,
                 "activation_alpha": 1.0, "activation_beta": 0.0,
                 "normalize_routing_weights": 0, "expert_weight_bits": self.bits,
                 "block_size": self.group, "accuracy_level": self.accuracy_level},
                dtype=x.dtype, shape=x.shape, version=1)
            h = self._hidden(x) if self.dense_hidden else None
        elif not self.dense_hidden:  # ExecuTorch's kernel (`moegrow::routed_moe`)
            out, h = torch.ops.moegrow.routed_moe(x, base, self.fc1, self.fc1_scales,
                                                  self.fc2, self.fc2_scales, self.bits), None
        else:  # every expert computed: the taps' activations are these
            w1, w2 = routed_weights(self._codes(), self.bits)
            h = swiglu(torch.einsum("nc,egc->neg", x, w1).reshape(-1, self.live, self.hidden, 2))
            out = torch.einsum("nef,ecf->nc", h * base[..., None], w2)
        if self.spare or self.pool:
            more, hs = self.spare_out(x, gates)
            out = out + more
            h = None if h is None or hs is None else torch.cat([h, hs], 1)
        if h is not None:
            self.last = (ids, weights, h)  # `Observe`'s error taps
        return out.reshape(shape), logits


class MeanNorm(nn.Module):
    """`layers.RMSNorm` whose mean of squares is a matmul with a constant [1/C]*C row: XNNPACK
    delegates linears but not a mean over the last axis, so the eager norm splits every layer
    into several delegate partitions with portable kernels between them. In an ONNX export
    the norm is written as x / sqrt(mean(x^2) + eps), the pattern ONNX Runtime fuses into one
    `SimplifiedLayerNormalization` node (the matmul form stays five; rsqrt exports as Sqrt
    and Reciprocal, which it does not fuse: docs/benchmarks.md)."""

    def __init__(self, norm: layers.RMSNorm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps
        self.register_buffer("average", torch.full((1, norm.weight.shape[0]),
                                                   1.0 / norm.weight.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if torch.onnx.is_in_onnx_export():
            return self.weight * (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
                                  ).to(x.dtype)
        return self.weight * (xf * torch.rsqrt(F.linear(xf * xf, self.average) + self.eps)
                              ).to(x.dtype)

    def vjp(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """The error `e` at the norm's output brought back to its input x (J^T e):
        r w e - r^3 x mean(w e x), with r = rsqrt(mean(x^2) + eps)."""
        r = torch.rsqrt(F.linear(x * x, self.average) + self.eps)
        we = self.weight * e
        return r * we - r * r * r * x * F.linear(we * x, self.average)
