"""Device programs: `prefill`, `decode` and `score` as export-ready modules over a `CausalLM`.

Each program wraps a copy of the model whose MoE blocks are swapped for an export-friendly
formulation (the eager `MoE.forward` sizes its expert groups from the data), takes and returns
plain tensors, and has no data-dependent shapes. `lower.to_pte` / `lower.to_onnx` turn the same
module into both engines' programs; called directly it is the torch reference.

Expert slots: every program takes `slots` [L, 4, E + S], the state of each expert slot
(`slot_state`): spare slots (`with_spare`) stay closed until growth spawns a clone into one,
and a clone opens only where the context reads as its own domain (`gate`): the table
`domains` [V, D] holds a unigram log-probability per token for the base (class 0) and for
each grown domain, the context's score for a class is its summed log-likelihood minus the
base's where it is the likeliest grown class (a naive-Bayes sequential test against the
base, an argmax among grown domains: it falls on base text, it is closed on the other grown
domains' text, it rises on the domain's own), and a clone of class c opens where that score
reaches its threshold. The table is data in the weight file that growth writes;
computing the gate costs a gather and a cumulative sum. `prefill` returns the last
position's scores, which `decode` keeps. docs/growth.md. The spare slots cost their share of
the dense experts and are not needed before a clone exists: every program built with
`gated=False` skips them (the MoE blocks never route to a spare slot nor read its weights,
`Slots`), and a bundle serves those until growth spawns (`runtime.session.Runtime.program`).

KV cache: explicit inputs and outputs `k_cache, v_cache [L, 1, Hkv, S, D]` on both engines.
ONNX has no mutable state, one signature keeps the backends interchangeable, and the runtime
can keep, fork or drop a cache. The price is a cache copy per call (0.5 MB for the small model
at S=256, next to ~12 MB of weights read per token); ExecuTorch mutable buffers are the way
out if long contexts make it matter.

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

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from .models import layers

GATE_MIN = 8  # tokens a context needs before it can open a spawned expert
MASKED = 1e4  # subtracted from the router logit of a slot that is closed at a position
UNUSED = -100.0  # log-probability of every token under a class no clone uses


def with_spare(model: layers.CausalLM, spare: int) -> layers.CausalLM:
    """A copy of `model` with `spare` empty expert slots per layer after its E experts:
    zero router rows, closed to routing until spawned (`slot_state`), and the gate's class
    table `domains` [V, 1 + L * S] (the base's class, uniform until growth writes it, and
    one per possible clone, unused: log-probability `UNUSED` - class). Their
    weights are small seeded noise, not zeros: the programs hold the spare slots in tensors
    of their own (`DenseMoE`), and the engines store equal tensors once, so all-zero gate,
    up and down tensors would share one buffer that growth could not write one of."""
    out = copy.deepcopy(model)
    noise = torch.Generator().manual_seed(0)
    for block in out.model.layers:
        mlp, ex = block.mlp, block.mlp.experts
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(ex, name).detach()
            filler = torch.randn(spare, *w.shape[1:], generator=noise, dtype=w.dtype) * 1e-4
            setattr(ex, name, nn.Parameter(torch.cat([w, filler])))
        gate = nn.Linear(mlp.gate.in_features, mlp.gate.out_features + spare, bias=False)
        gate.weight = nn.Parameter(torch.cat([mlp.gate.weight.detach(),
                                              mlp.gate.weight.new_zeros(spare, gate.in_features)]))
        mlp.gate, mlp.spare = gate, spare
    out.spare = spare
    if spare:
        classes = 1 + model.args.num_hidden_layers * spare
        # class c unused: UNUSED - c a token (the noise keeps the columns apart as data;
        # the offsets make one of them the likeliest grown class by a clear margin: the
        # gate's argmax among grown classes must not be decided by noise, which the
        # engines' rounding can flip)
        table = (torch.randn(model.args.vocab_size, classes, generator=noise) * 1e-4 + UNUSED
                 - torch.arange(classes, dtype=torch.float32))
        table[:, 0] += -math.log(model.args.vocab_size) - UNUSED  # the base: uniform so far
        out.domains = nn.Parameter(table, requires_grad=False)
    return out.eval()


def slot_state(model: layers.CausalLM) -> torch.Tensor:
    """Every program's `slots` input [L, 4, E + S] as exported: per layer and slot a router
    bias, a coefficient a, a threshold t and a class c; a slot is open at a position whose
    context score s_c for class c (`scores`) has a * s_c >= t. Live experts (0, 0, 0, 0) are
    always open, spare slots (0, 0, 1, 0) never; a spawned expert is (bias, 1, threshold,
    its domain's class)."""
    slots = model.model.layers[0].mlp.gate.out_features
    spare = getattr(model, "spare", 0)
    state = torch.zeros(model.args.num_hidden_layers, 4, slots)
    state[:, 2, slots - spare:] = 1.0
    return state


def scores(domains: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The context score of every class at every position of tokens [1, T] -> [T, D]: the
    summed log-probability of the tokens seen so far (that one included) under the class
    minus the base's (class 0), where the class is the likeliest of the grown ones (1..D-1),
    else -MASKED; -MASKED before GATE_MIN tokens. Against the base a clone needs its
    threshold's evidence; among grown domains the likeliest wins, so two similar grown
    domains never close each other's gates on text far from the base (with the best other
    class of all as the yardstick they did: docs/growth.md)."""
    summed = torch.cumsum(F.embedding(tokens[0], domains), 0)  # [T, D]
    grown = torch.cat([torch.full_like(summed[:, :1], -1e30), summed[:, 1:]], 1)
    best, which = torch.topk(grown, 2, dim=-1)  # [T, 2]
    first = torch.arange(domains.shape[1])[None] == which[:, :1]
    other = torch.where(first, best[:, 1:], best[:, :1])  # the best other grown class
    t = torch.arange(tokens.shape[1])[:, None]
    return torch.where((t + 1 >= GATE_MIN) & (summed >= other), summed - summed[:, :1],
                       -MASKED)


def classes(model: layers.CausalLM) -> int:
    """D, the gate's classes: the columns of `domains` (1 in a model without spare slots)."""
    return model.domains.shape[1] if getattr(model, "spare", 0) else 1


def set_gates(model: layers.CausalLM, slots: torch.Tensor, scores_: torch.Tensor) -> None:
    """Open or close every slot of every layer for each position ([N, D] class scores, or
    [1, D] for all) before a forward pass (read by `route`)."""
    for i, block in enumerate(model.model.layers):
        bias, coef, threshold, cls = slots[i].unbind(0)
        mine = torch.index_select(scores_, 1, cls.long())  # [N, E + S]
        block.mlp.slot_bias = bias
        block.mlp.slot_open = (mine * coef[None] >= threshold[None]).float()


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
    if moe.norm_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, weights.to(x.dtype), ids


def gate(model: layers.CausalLM, tokens: torch.Tensor, slots: torch.Tensor,
         gated: bool = True) -> torch.Tensor:
    """Set the gates for `tokens` from their class scores (`scores`), or, in a model
    without spare slots or with `gated` off, from zeros (the base experts open, every
    spawned slot closed); returns the scores [T, D]."""
    if not (gated and getattr(model, "spare", 0)):
        out = torch.zeros(tokens.shape[1], classes(model))
    else:
        out = scores(model.domains, tokens)
    set_gates(model, slots, out)
    return out


def weight(linear: nn.Linear) -> torch.Tensor:
    """A linear's weight as fp32 for code that reads it directly (the taps read the head;
    `quantize.dequantized` reads every quantized linear back for the deepening sweeps):
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


class Slots(nn.Module):
    """What both MoE formulations share: the router, the split of the slots into E base
    experts and S spare ones (`with_spare`), and with `gated` off (the one-pass programs) a
    constant `closed` that keeps the spare slots out of routing, so they are never
    computed. The spare slots' weights are linears of their own, `spare_gate`, `spare_up`
    ([S*F, C]) and `spare_down` ([C, S*F]), left in fp32 by the quantizers (which take
    `gate_proj`, `up_proj`, `down_proj`): a program without them reads no byte of them."""

    def __init__(self, moe: layers.MoE, gated: bool = True):
        super().__init__()
        self.gate, self.top_k, self.norm_topk = moe.gate, moe.top_k, moe.norm_topk
        slots, f, c = moe.experts.gate_proj.shape
        spare = getattr(moe, "spare", 0)
        self.live, self.hidden, self.gated = slots - spare, f, gated
        self.spare = spare if gated else 0  # the spare slots this program computes
        if spare and not gated:
            self.register_buffer("closed", torch.cat([torch.zeros(self.live),
                                                      torch.full((spare,), -MASKED)]))
        else:
            self.closed = None
        if self.spare:
            ex = moe.experts
            self.spare_gate = _linear(ex.gate_proj.detach()[self.live:].reshape(-1, c))
            self.spare_up = _linear(ex.up_proj.detach()[self.live:].reshape(-1, c))
            self.spare_down = _linear(ex.down_proj.detach()[self.live:].permute(1, 0, 2)
                                      .reshape(c, -1))

    def route(self, x: torch.Tensor):
        return route(self, x)

    def spare_out(self, x: torch.Tensor, gates: torch.Tensor):
        """The spare slots on x [N, C] with gates [N, E + S] -> (output [N, C], hidden
        [N, S, F])."""
        h = (F.silu(self.spare_gate(x)) * self.spare_up(x)).reshape(-1, self.spare, self.hidden)
        out = self.spare_down((h * gates[:, self.live:, None]).reshape(-1, self.spare *
                                                                        self.hidden))
        return out, h


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
        if self.spare:
            more, hs = self.spare_out(x, gates)
            out, h = out + more, torch.cat([h, hs], 1)
        return out, h

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, ids = self.route(x)
        gates = torch.zeros_like(logits).scatter(1, ids, weights)  # [N, E + S]
        out, h = self.combine(x, gates)
        self.last = (ids, weights, h)  # for `Observe`'s error taps; dead code elsewhere
        return out.reshape(shape), logits


class GatherMoE(Slots):
    """Only the K chosen experts per token: their stacked weights are gathered, then bmm.
    Gathers read the base experts only; the spare slots, when the program computes them
    (`gated`), run densely beside (`Slots.spare_out`)."""

    def __init__(self, moe: layers.MoE, gated: bool = True):
        super().__init__(moe, gated)
        self.source = (moe,)  # for `quantize.dense`; not a submodule: not this program's weights
        ex = moe.experts
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, name, nn.Parameter(getattr(ex, name).detach()[:self.live].clone(),
                                             requires_grad=False))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, ids = route(self, x)
        flat = ids.reshape(-1)  # [N*K]
        if self.spare:  # a chosen spare slot gathers expert 0 with weight 0, and runs densely
            gates = torch.zeros_like(logits).scatter(1, ids, weights)
            more, _ = self.spare_out(x, gates)
            weights = weights * (ids < self.live).to(weights.dtype)
            flat = torch.where(flat < self.live, flat, 0)
        xs = x.repeat_interleave(self.top_k, dim=0)[:, :, None]  # [N*K, C, 1]
        h = F.silu(torch.bmm(self.gate_proj[flat], xs)) * torch.bmm(self.up_proj[flat], xs)
        y = torch.bmm(self.down_proj[flat], h).reshape(-1, self.top_k, shape[-1])  # [N, K, C]
        out = torch.bmm(weights[:, None, :].to(y.dtype), y)[:, 0]  # gate-weighted sum over K
        if self.spare:
            out = out + more
        return out.reshape(shape), logits


class MeanNorm(nn.Module):
    """`layers.RMSNorm` whose mean of squares is a matmul with a constant [1/C]*C row: XNNPACK
    delegates linears but not a mean over the last axis, so the eager norm splits every layer
    into several delegate partitions with portable kernels between them."""

    def __init__(self, norm: layers.RMSNorm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps
        self.register_buffer("average", torch.full((1, norm.weight.shape[0]),
                                                   1.0 / norm.weight.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(F.linear(xf * xf, self.average) + self.eps)
                              ).to(x.dtype)

    def vjp(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """The error `e` at the norm's output brought back to its input x (J^T e):
        r w e - r^3 x mean(w e x), with r = rsqrt(mean(x^2) + eps)."""
        r = torch.rsqrt(F.linear(x * x, self.average) + self.eps)
        we = self.weight * e
        return r * we - r * r * r * x * F.linear(we * x, self.average)


class Cache:
    """`layers.KVCache`'s interface over explicit tensors: updates return new tensors."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = list(k.unbind(0)), list(v.unbind(0))  # L x [B, Hkv, S, D]
        self.length = k.shape[3]

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k[layer] = self.k[layer].index_copy(2, input_pos, k)
        self.v[layer] = self.v[layer].index_copy(2, input_pos, v)
        return self.k[layer], self.v[layer]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack(self.k), torch.stack(self.v)


def with_moe(model: layers.CausalLM, moe: type[nn.Module],
             gated: bool = True) -> layers.CausalLM:
    """A copy of `model` whose MoE blocks are `moe(block.mlp, gated)` and norms
    `MeanNorm`s; the weights other than the experts' are shared."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    out = copy.deepcopy(model, memo=shared)
    for block in out.model.layers:
        block.mlp = moe(block.mlp, gated)
    for module in list(out.modules()):
        for name, child in module.named_children():
            if isinstance(child, layers.RMSNorm):
                setattr(module, name, MeanNorm(child))
    return out.eval()


class Prefill(nn.Module):
    """(tokens [1, T], input_pos [T], k, v [L, 1, Hkv, S, D], slots [L, 4, E + S]) -> last
    logits [1, V], k, v, and the context's class scores at the last position [1, D]
    ("novelty": what `decode` takes; the gates stay as the typed context set them while the
    model continues it)."""

    outputs = ("logits", "k_cache_out", "v_cache_out", "novelty")

    def __init__(self, model: layers.CausalLM, moe: type[nn.Module] = DenseMoE,
                 gated: bool = True):
        super().__init__()
        self.model, self.gated = with_moe(model, moe, gated), gated  # gated: `gate`

    def example(self, length: int) -> tuple[tuple[torch.Tensor, ...], dict[str, Any] | None]:
        """Example inputs for a cache of `length` positions and their dynamic shapes (T)."""
        t = Dim("T", min=1, max=length)
        pos = torch.arange(2)
        shapes = {"tokens": {1: t}, "input_pos": {0: t}, "k_cache": None, "v_cache": None,
                  "slots": None}
        return (pos[None], pos, *empty_cache(self.model, length), slot_state(self.model)), shapes

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor,
                slots: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        slots = slot_state(self.model) if slots is None else slots
        nov = gate(self.model, tokens, slots, self.gated)
        cache = Cache(k_cache, v_cache)
        h, _ = self.model.hidden(tokens, input_pos, cache)
        return self.model.lm_head(h[:, -1]), *cache.tensors(), nov[-1:]


class Decode(Prefill):
    """(token [1, 1], input_pos [1], k, v, slots, novelty [1, D]) -> logits [1, V], k, v;
    one step of generation, with the gates of the prefill's class scores."""

    outputs = ("logits", "k_cache_out", "v_cache_out")

    def __init__(self, model: layers.CausalLM, moe: type[nn.Module] = GatherMoE,
                 gated: bool = True):
        super().__init__(model, moe, gated)

    def example(self, length: int) -> tuple[tuple[torch.Tensor, ...], dict[str, Any] | None]:
        pos = torch.zeros(1, dtype=torch.long)
        return (pos[None], pos, *empty_cache(self.model, length), slot_state(self.model),
                torch.zeros(1, classes(self.model))), None

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, slots: torch.Tensor | None = None,
                novelty: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        slots = slot_state(self.model) if slots is None else slots
        set_gates(self.model, slots,
                  torch.zeros(1, classes(self.model)) if novelty is None else novelty)
        cache = Cache(k_cache, v_cache)
        h, _ = self.model.hidden(tokens, input_pos, cache)
        return self.model.lm_head(h[:, -1]), *cache.tensors()


class Score(nn.Module):
    """(tokens [1, T] ([BOS] + text), slots) -> NLL [T] and rank [T] of each next token.

    Entry t is about tokens[t+1] given tokens[:t+1]: its NLL, and its rank (how many tokens
    scored higher; 0 is a top-1 hit). The last entry (nothing left to predict) is 0. Aligned
    with the predicting position, so per-position taps (router choices, errors) line up with
    it; it also keeps every shape T, since an output of size T-1 makes torch.export demand
    T >= 3.
    """

    outputs = ("nll", "rank")

    def __init__(self, model: layers.CausalLM, moe: type[nn.Module] = DenseMoE,
                 gated: bool = True):
        super().__init__()
        self.model, self.gated = with_moe(model, moe, gated), gated  # gated: `gate`

    def example(self, length: int) -> tuple[tuple[torch.Tensor, ...], dict[str, Any] | None]:
        return ((torch.zeros(1, 2, dtype=torch.long), slot_state(self.model)),
                {"tokens": {1: Dim("T", min=1, max=length)}, "slots": None})

    def forward(self, tokens: torch.Tensor,
                slots: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        gate(self.model, tokens, slot_state(self.model) if slots is None else slots,
             gated=self.gated)
        h, _ = self.model.hidden(tokens)
        return losses(self.model.lm_head(h[0]).float(), tokens)[:2]


def losses(logits: torch.Tensor, tokens: torch.Tensor):
    """logits [T, V] of tokens [1, T] -> nll [T], rank [T] (0 past the end), valid [T]."""
    t = tokens.shape[1]
    target = logits.gather(1, tokens[0].roll(-1)[:, None])  # [T, 1]
    nll = torch.logsumexp(logits, dim=-1) - target[:, 0]
    rank = (logits > target).sum(-1)
    valid = torch.arange(t) < t - 1
    return torch.where(valid, nll, 0.0), torch.where(valid, rank, 0), valid


class Observe(Score):
    """`Score` plus the error taps of every MoE layer, in the same forward pass.

    tokens [1, T] -> nll [T], rank [T], and per layer and position the k chosen experts:
    ids, gates [L, T, K], update [L, T, K] = g_k |e| |h_k| (the size of the local update PC
    would make for that expert) and energy [L, T, K] = |g_k e|^2 (PC.md). e is the next-token
    error W_head^T (softmax(z) - onehot(y)) brought back through the final norm, i.e.
    d nll / d x at the last residual stream, taken as the error arriving at every MoE
    layer's output through the residual path; h_k is expert k's hidden activation
    silu(x Wg) * (x Wu). The softmax error is exact over the whole vocabulary. The last
    position (nothing to predict) has zero error.
    """

    outputs = ("nll", "rank", "ids", "gates", "update", "energy")

    def __init__(self, model: layers.CausalLM, moe: type[nn.Module] = DenseMoE,
                 top: int | None = None, gated: bool = True):
        super().__init__(model, moe, gated)
        self.top = top  # softmax error over the target plus the `top` likeliest tokens only

    def forward(self, tokens: torch.Tensor,
                slots: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        m = self.model
        gate(m, tokens, slot_state(m) if slots is None else slots, gated=self.gated)
        pos = torch.arange(tokens.shape[1])
        cos, sin = layers.rope(pos, m.args.dim_head, m.args.rope_theta)
        x = m.model.embed_tokens(tokens)
        for block in m.model.layers:
            x, _ = block(x, cos, sin, pos, None)
        x = x[0].float()  # [T, C], the last residual stream
        logits = m.lm_head(m.model.norm(x)).float()
        nll, rank, valid = losses(logits, tokens)
        head = weight(m.lm_head)
        # W^T (softmax - onehot): the one-hot part is the target's row (no [T, V] one-hot)
        p = logits.softmax(-1)
        if self.top:  # sum_{j in top} p_j W_j: misses (1 - their mass) x max_j |W_j| at most
            mass, idx = p.topk(self.top, dim=-1)
            e = torch.bmm(mass[:, None, :], F.embedding(idx, head))[:, 0]
        else:
            e = p @ head
        e = e - head[tokens[0].roll(-1)]  # at the norm's output
        e = m.model.norm.vjp(x, e) * valid[:, None]
        size = torch.sqrt(F.linear(e * e, m.model.norm.average) * e.shape[1])  # |e| [T, 1]
        ids, gates, update = [], [], []
        for block in m.model.layers:
            chosen, g, h = block.mlp.last
            ones = torch.ones(1, h.shape[-1])  # sum over F as a matmul (XNNPACK has no sum)
            hsize = torch.sqrt(F.linear(h * h, ones)[..., 0]).gather(1, chosen)  # |h_k| [T, K]
            ids.append(chosen)
            gates.append(g)
            update.append(g * size * hsize)
        gates_ = torch.stack(gates)
        return (nll, rank, torch.stack(ids), gates_, torch.stack(update),
                (gates_ * size[None]) ** 2)


def empty_cache(model: layers.CausalLM, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed k, v [L, 1, Hkv, S, D] for `prefill`/`decode`."""
    cache = model.make_cache(1, length)
    return cache.k.clone(), cache.v.clone()
