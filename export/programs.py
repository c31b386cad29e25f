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

KV cache: explicit inputs `k_cache, v_cache [L, 1, Hkv, S, D]` on both engines, and outputs
of the run's own rows (`k_rows`, `v_rows`), which the runtime writes into its cache. ONNX has
no mutable state, one signature keeps the backends interchangeable, and the runtime can
keep, fork or drop a cache. ONNX Runtime still copies the cache when it reads a layer of
it (one Split of the whole cache, 2 x 262 KB a decode step on the default model; one input
per layer removed it without a measurable gain, docs/benchmarks.md "Where ONNX Runtime's
decode step goes"); ExecuTorch mutable buffers are the way out if long contexts make it
matter.

The MoE blocks and norms the programs swap in are in `moe.py`, with the measurements that
chose them.
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
from .moe import MASKED, DenseMoE, GatherMoE, MeanNorm, weight

GATE_MIN = 8  # tokens a context needs before it can open a spawned expert
UNUSED = -100.0  # log-probability of every token under a class no clone uses


def with_spare(model: layers.CausalLM, spare: int,
               pool: tuple[int, ...] = ()) -> layers.CausalLM:
    """A copy of `model` with `spare` empty expert slots per layer after its E experts, and
    one more after those per entry of `pool`, which the programs hold at that many bits
    (`moe.Pooled`: growth moves converged clones there, `runtime.compress`): zero router
    rows, closed to routing
    until spawned (`slot_state`), and the gate's class
    table `domains` [V, 1 + L * (S + P)] (the base's class, uniform until growth writes it,
    and one per slot a clone can hold, spare or pool, unused: log-probability `UNUSED` -
    class). Their
    weights are small seeded noise, not zeros: the programs hold the spare slots in tensors
    of their own (`DenseMoE`), and the engines store equal tensors once, so all-zero gate,
    up and down tensors would share one buffer that growth could not write one of."""
    out = copy.deepcopy(model)
    noise = torch.Generator().manual_seed(0)
    for block in out.model.layers:
        mlp, ex = block.mlp, block.mlp.experts
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(ex, name).detach()
            filler = torch.randn(spare + len(pool), *w.shape[1:], generator=noise,
                                 dtype=w.dtype) * 1e-4
            setattr(ex, name, nn.Parameter(torch.cat([w, filler])))
        extra = spare + len(pool)
        gate = nn.Linear(mlp.gate.in_features, mlp.gate.out_features + extra, bias=False)
        gate.weight = nn.Parameter(torch.cat([mlp.gate.weight.detach(),
                                              mlp.gate.weight.new_zeros(extra, gate.in_features)]))
        mlp.gate, mlp.spare, mlp.pool, mlp.pool_bits = gate, spare, len(pool), list(pool)
    out.spare, out.pool = spare, len(pool)
    if spare:
        classes = 1 + model.args.num_hidden_layers * extra
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
    closed = getattr(model, "spare", 0) + getattr(model, "pool", 0)  # spare and pool slots
    state = torch.zeros(model.args.num_hidden_layers, 4, slots)
    state[:, 2, slots - closed:] = 1.0
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


class Cache:
    """`layers.KVCache`'s interface over the programs' inputs: the past keys and values
    ([L, B, Hkv, S, D], or none: a sweep over a whole text), only read; `rows()` stacks the
    keys and values this run adds ([L, B, Hkv, T, D]), which the runtime writes into its
    cache at the run's positions (a program never copies the cache)."""

    def __init__(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None):
        self.k, self.v = k, v
        self.new_k: list[torch.Tensor] = []
        self.new_v: list[torch.Tensor] = []

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.new_k.append(k)
        self.new_v.append(v)
        return (None, None) if self.k is None else (self.k[layer], self.v[layer])

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack(self.new_k), torch.stack(self.new_v)


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
    logits [1, V], the run's keys and values [L, 1, Hkv, T, D] (`Cache`), and the context's
    class scores at the last position [1, D]
    ("novelty": what `decode` takes; the gates stay as the typed context set them while the
    model continues it)."""

    outputs = ("logits", "k_rows", "v_rows", "novelty")

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
        return self.model.lm_head(h[:, -1]), *cache.rows(), nov[-1:]


class Decode(Prefill):
    """(token [1, 1], input_pos [1], k, v, slots, novelty [1, D]) -> logits [1, V], the
    token's keys and values [L, 1, Hkv, 1, D];
    one step of generation, with the gates of the prefill's class scores."""

    outputs = ("logits", "k_rows", "v_rows")

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
        return self.model.lm_head(h[:, -1]), *cache.rows()


class Score(nn.Module):
    """(tokens [1, T] ([BOS] + text), slots) -> NLL [T] and rank [T] of each next token, and
    the ids [L, T, K] of the experts each layer chose at each position (what growth's guard
    needs to count the tokens that reach a changed expert, without `Observe`'s taps).

    Entry t is about tokens[t+1] given tokens[:t+1]: its NLL, and its rank (how many tokens
    scored higher; 0 is a top-1 hit). The last entry (nothing left to predict) is 0. Aligned
    with the predicting position, so per-position taps (router choices, errors) line up with
    it; it also keeps every shape T, since an output of size T-1 makes torch.export demand
    T >= 3.
    """

    outputs = ("nll", "rank", "ids")

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
        ids = torch.stack([block.mlp.chosen for block in self.model.model.layers])
        return *losses(self.model.lm_head(h[0]).float(), tokens)[:2], ids


def losses(logits: torch.Tensor, tokens: torch.Tensor):
    """logits [T, V] of tokens [1, T] -> nll [T], rank [T] (0 past the end), valid [T]."""
    t = tokens.shape[1]
    target = logits.gather(1, tokens[0].roll(-1)[:, None])  # [T, 1]
    nll = torch.logsumexp(logits, dim=-1) - target[:, 0]
    rank = (logits > target).sum(-1)
    valid = torch.arange(t) < t - 1
    return torch.where(valid, nll, 0.0), torch.where(valid, rank, 0), valid


def chunked_nll_grad(logits_of, x: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor,
                     chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """d (NLL of tokens [1, T] times valid [T], summed) / d x [1, T, C] and that NLL [T],
    taken `chunk` positions at a time (`logits_of`: x's positions -> logits [n, V]): the
    numbers of `losses` on the whole window. Each chunk's input reads the one before's error
    and NLL (times 0), so that an engine ends one chunk before it starts the next."""
    t = int(tokens.shape[1])
    nxt, keep = tokens[0].roll(-1), torch.where(torch.arange(t) < t - 1, valid, 0.0)

    def nll_of(x, nxt, keep):
        logits = logits_of(x)
        nll = (torch.logsumexp(logits, dim=-1) - logits.gather(1, nxt[:, None])[:, 0]) * keep
        return nll.sum(), nll
    errs, nlls, tie = [], [], 0.0
    for a in range(0, t, chunk):
        b = a + chunk
        err, nll = torch.func.grad(nll_of, has_aux=True)(x[:, a:b] + tie, nxt[a:b], keep[a:b])
        errs.append(err)
        nlls.append(nll)
        tie = 0 * (err[0, 0, 0] + nll[-1])
    return torch.cat(errs, 1) + tie, torch.cat(nlls)


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
            block.mlp.taps = True  # every slot's activation (`moe.Slots.spare_out`)
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
