"""How much of a domain's error its own text says can be learned: the error map's probe.

A text can be far from the base and still offer little to learn (noise, a bag of unrelated
names), or close to it and offer much (a register that keeps its own words and phrases: a
user's notes). What adaptation can win on a domain shows in how much the domain's earlier
text predicts its later text beyond what the model already predicts. So at every observed
token the probe mixes the model's probability of it with a cache model of the domain's
earlier text (Kuhn & De Mori's cache language model: the domain's bigram counts, smoothed
toward its unigram counts) and records the NLL the mixture saves, for a few mixture weights:

    saved(lambda) = nll - -log((1 - lambda) p_model + lambda p_cache)

The probe is prequential: a token is predicted from the domain's text observed before it
(its replay sequences, then the earlier tokens of the same call), never from itself. A model
that has nothing left to learn from a text loses a little with every weight (at most
-log(1 - lambda) per token); a text with structure the model misses gains. On the real
corpora (docs/errormap.md) the best weight's share 1 - exp(-mean saved) ranks 63 texts as
LoRA's gain on them does (Spearman 0.83), but it is no forecast of that gain (it promises
too much on text that repeats identifiers) nor of what growth will reach.
"""

from __future__ import annotations

import numpy as np

LAMBDAS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)  # mixture weights of the cache
SMOOTH = 1.0  # pseudo-count pulling a context's bigram estimate toward the unigram cache


def saved(history: list[np.ndarray], ids: np.ndarray, nll: np.ndarray) -> np.ndarray:
    """NLL saved by the cache mixture [len(ids) - 1, len(LAMBDAS)] for every predicted token
    ids[1:] (model NLL `nll`), the cache holding `history` (the domain's earlier sequences)
    and then the tokens of `ids` before the one predicted."""
    unigram: dict[int, int] = {}
    bigram: dict[tuple[int, int], int] = {}
    context: dict[int, int] = {}
    seen = 0
    for seq in history:
        seq = seq.tolist()
        for x, y in zip(seq[:-1], seq[1:], strict=False):
            bigram[x, y] = bigram.get((x, y), 0) + 1
            context[x] = context.get(x, 0) + 1
        for y in seq[1:]:
            unigram[y] = unigram.get(y, 0) + 1
        seen += len(seq) - 1
    seq = ids.tolist()
    cache = np.empty(len(seq) - 1)
    for i, (x, y) in enumerate(zip(seq[:-1], seq[1:], strict=False)):
        uni = unigram.get(y, 0) / seen if seen else 0.0
        c = context.get(x, 0)
        cache[i] = (bigram.get((x, y), 0) + SMOOTH * uni) / (c + SMOOTH)
        unigram[y] = unigram.get(y, 0) + 1
        bigram[x, y] = bigram.get((x, y), 0) + 1
        context[x] = c + 1
        seen += 1
    lam, nll = np.asarray(LAMBDAS), np.asarray(nll, np.float64)[:, None]
    return nll + np.log((1 - lam) * np.exp(-nll) + lam * cache[:, None])


def gain(tokens: int, sums: list[float], squares: list[float], interval: float) -> dict:
    """{"gain", "low", "lambda"}: the best weight's relative perplexity drop 1 - exp(-mean
    saved) and its value at the low end of `interval` standard errors of the mean, from the
    per-weight sums and sums of squares of `saved` over `tokens` tokens."""
    if tokens <= 1 or len(sums) == 0:
        return {"gain": 0.0, "low": 0.0, "lambda": None}
    s, q = np.asarray(sums), np.asarray(squares)
    mean = s / tokens
    best = int(np.argmax(mean))
    se = np.sqrt(max(q[best] / tokens - mean[best] ** 2, 0.0) / tokens)
    return {"gain": float(1 - np.exp(-mean[best])),
            "low": float(1 - np.exp(-(mean[best] - interval * se))),
            "lambda": LAMBDAS[best]}
