"""Verdicts on the error map: for each observed domain, `nothing`, `deepen` or `spawn`.

Whether to grow is decided by what growth can win; how to grow, by how far the domain is
from the base.

What can be won: the learnability probe (`learnable.py`) records, at every observed token,
the NLL that a cache of the domain's own earlier text saves when mixed with the model. Its
best mixture's relative perplexity drop, `learnable`, is what the domain's text itself says
the model misses (on the real corpora it tracks LoRA's gain on the same text: docs).
  nothing  learnable below MIN_GAIN at the low end of its interval: too little to win for
           the memory a clone costs and the slice's time (or too little text to tell).

How far: the yardstick is the bundle's own baseline (`manifest["calibration"]`, computed at
export from held-out base text, `export/calibrate.py`), two anchors for every statistic:
  base      the model's errors on its own domain;
  shuffled  the same tokens shuffled: its errors where the context carries nothing usable
            (same vocabulary, no structure).
A domain's novelty is where its mean NLL lies between them: 0 at the base level, 1 at the
no-usable-context level. Per layer likewise, from the mean PC update size per token.
  spawn    novelty >= 0.5: closer to the no-usable-context level than to the base. Names the
           layers whose update novelty is >= 0.5 too (else the highest one);
  deepen   in between. Names, in each layer whose update novelty is beyond the base spread
           (3 chunk standard deviations), the experts that carry at least half of the
           layer's excess update mass (the sum of their updates on the domain minus what
           their own base mean would give; the update mass itself where no expert exceeds
           its base), at most k of them (the router's top-k); where no layer is beyond its
           spread, the layer with the highest update novelty.
Placed in place (`growth.placement`: no gate, so no clone's memory or isolation to spend),
a slice deepens `experts_in_place` instead: in every layer, the k experts with the most
excess update mass (docs/growth.md: base-0 +0.35% -> +14.3% against LoRA's +15.2%).
Every decision is taken on the low end of a two-standard-error interval, so that a little
text cannot trigger growth. MIN_GAIN is a product choice, not fitted to a corpus: between the
2% under which no adaptation is worth its cost and the 10% a user notices (issue 12's lines);
0.5 is the midpoint of the anchors, 3 and 2 the usual widths for "beyond noise" and for an
interval.
"""

from __future__ import annotations

import numpy as np

from . import learnable

MIN_GAIN = 0.05  # learnable perplexity drop below which growth is not worth it
SPAWN = 0.5  # novelty: the midpoint between the base and no-usable-context anchors
NOISE_SD = 3.0  # the base's own spread: this many chunk standard deviations (per layer)
INTERVAL = 2.0  # decisions use novelty - INTERVAL x its standard error


def judge(state: dict, calibration: dict, k: int) -> dict:
    """{domain: {"verdict", "learnable", "learnable_low", "novelty", "novelty_se", "noise",
    "layers": {l: {"novelty", "se", "named"}}, "experts": [[layer, expert], ...],
    "experts_in_place": [[layer, expert], ...]}} for every
    domain in `state` (`errormap.Store.read`), against the bundle's `calibration`."""
    base = calibration["layers"]
    layers, experts = len(base), len(base[0]["experts"])
    span = calibration["nll_shuffled"] - calibration["nll"]
    if span <= 0:  # a model that makes no use of context: nothing to measure novelty by
        return {}
    base_mean = np.array([[e["mean"] for e in layer["experts"]] for layer in base])
    stats = {}
    for layer, expert, domain, count, total, squares, *_ in state["stats"]:
        stats.setdefault(domain, np.zeros((layers, experts, 3)))[layer, expert] = (
            count, total, squares)
    out = {}
    for domain, d in state["domains"].items():
        n = max(d["tokens"], 1)
        s = stats.get(domain, np.zeros((layers, experts, 3)))
        nu = (d["nll"] - calibration["nll"]) / span
        se = d["nll_sd"] / np.sqrt(n) / span
        noise = NOISE_SD * calibration["nll_chunk_sd"] / span
        per_layer = {}
        for layer, b in enumerate(base):
            lspan = max(b["update_shuffled"] - b["update"], 1e-12)
            count, total, squares = s[layer].T
            var = np.where(count > 0, squares - total**2 / np.maximum(count, 1), 0.0).sum()
            per_layer[layer] = {"novelty": float((total.sum() / n - b["update"]) / lspan),
                                "se": float(np.sqrt(max(var, 0.0)) / n / lspan),
                                "noise": NOISE_SD * b["update_chunk_sd"] / lspan,
                                "named": False}
        low = {layer: v["novelty"] - INTERVAL * v["se"] for layer, v in per_layer.items()}
        named: list[int] = []
        chosen: list[list[int]] = []
        probe = d.get("probe", {})
        won = learnable.gain(probe.get("tokens", 0), probe.get("saved", []),
                             probe.get("saved_sq", []), INTERVAL)
        if won["low"] < MIN_GAIN:
            verdict = "nothing"
        elif nu - INTERVAL * se >= SPAWN:
            verdict = "spawn"
            named = [layer for layer in low if low[layer] >= SPAWN] or [max(low, key=low.get)]
        else:
            verdict = "deepen"
            named = ([layer for layer in low if low[layer] > per_layer[layer]["noise"]]
                     or [max(low, key=low.get)])
            for layer in named:
                mass = _mass(s[layer], base_mean[layer])
                order = np.argsort(-mass, kind="stable")
                share = np.cumsum(mass[order]) / max(mass.sum(), 1e-12)
                take = min(int(np.searchsorted(share, 0.5)) + 1, k)
                chosen += [[layer, int(e)] for e in order[:take] if mass[e] > 0]
        wide = []  # in place: every layer's top-k by excess update mass
        for layer in range(layers) if verdict != "nothing" else []:
            mass = _mass(s[layer], base_mean[layer])
            wide += [[layer, int(e)] for e in np.argsort(-mass, kind="stable")[:k] if mass[e] > 0]
        for layer in named:
            per_layer[layer]["named"] = True
        out[domain] = {"verdict": verdict, "learnable": won["gain"], "learnable_low": won["low"],
                       "novelty": float(nu), "novelty_se": float(se),
                       "noise": float(noise), "tokens": d["tokens"],
                       "layers": {str(layer): {key: v[key] for key in ("novelty", "se", "named")}
                                  for layer, v in per_layer.items()},
                       "experts": chosen, "experts_in_place": wide}
    return out


def _mass(stats: np.ndarray, base_mean: np.ndarray) -> np.ndarray:
    """A layer's excess update mass per expert from its [E, 3] (count, total, squares) on
    the domain: the updates minus what each expert's base mean would give, or the updates
    themselves where no expert works harder than on base (the busiest ones)."""
    count, total, _ = stats.T
    mass = np.maximum(total - count * base_mean, 0.0)
    return mass if mass.sum() > 0 else total


def most_wanted(judged: dict) -> str | None:
    """The domain with the most to win among those `judge` did not call `nothing`: the
    largest NLL the probe saves over all its observed tokens (at its interval's low end),
    so that much text with a little to learn and little text with much both count."""
    return next(iter(ranked(judged)), None)


def ranked(judged: dict) -> list[str]:
    """The domains `judge` did not call `nothing`, the most wanted first (`most_wanted`)."""
    growing = {d: v for d, v in judged.items() if v["verdict"] != "nothing"}
    return sorted(growing, key=lambda d: (np.log1p(-growing[d]["learnable_low"])
                                          * growing[d]["tokens"], d))
