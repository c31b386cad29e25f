"""The domain gate's arithmetic in numpy: a grown domain's class and its clones' threshold.

Every program computes the gate itself (`export/programs.py` `scores`, `gate`): the table
`domains` [V, D] in the weight file holds a unigram log-probability per token for the base
(class 0) and each grown domain (whose column models case-folded groups of pieces,
`new_class`), and a clone of class c opens where the context's summed
log-likelihood under c, minus the base's, reaches its threshold while c is the likeliest
grown class. Growth fills a new class's column (`new_class`) and calibrates the threshold
on base replay (`threshold`) here, without running a program: `scores` mirrors the
programs' score (tests/test_programs.py holds the two equal).
"""

from __future__ import annotations

import numpy as np
from moegrow.device_kernels import layout

SMOOTH = 1000.0  # a domain's unigram model: pseudo-tokens of the base's (a Dirichlet prior)
GATE_LLR = float(np.log(100))  # a clone opens where its domain is >= 100x likelier
GATE_MIN = 8  # tokens a context needs before it can open a clone (export/programs.py)
BASE_OPEN = 0.01  # at most this share of base replay positions may open a clone's gate
CLOSED = -1e4  # the score where a class cannot open (export/programs.py MASKED)
# a class whose threshold the base text pushes this far above GATE_LLR explains base text
# as well as the base column does: its gate cannot tell the domain from the base
# (docs/reliability.md: shuffled base text 27.2 nats; 40 of 45 fortunes categories 4.61)
SEPARABLE = 4 * GATE_LLR
# nats: a float32 class score this close to its threshold, or a class's sum this close to
# the best other grown class's, may fall either way in a program (`opened`); float32 sums
# of 256 log-probabilities differ from these float64 ones by at most ~0.06
TOL = 0.25
OPEN = 2 * CLOSED  # a threshold every score reaches, `CLOSED` too: a clone open everywhere
# (an int4 bundle's "in place": its base experts are frozen, `plan`)
REACH = 2 / 3  # a domain's gate that opens on less of its newest replay than this serves
# too little of its text through clones: growth deepens in place instead (`reach`)
REACH_MIN = 512  # tokens of newest replay `reach` needs to judge (fewer: no judgement)


def unigram(seqs: list[np.ndarray], vocab: int, prior: np.ndarray | None = None) -> np.ndarray:
    """Log-probabilities [V] of a unigram model of `seqs`: add-1/2 smoothed, or smoothed
    toward `prior` (probabilities) with `SMOOTH` pseudo-tokens."""
    counts = np.bincount(np.concatenate(seqs), minlength=vocab).astype(np.float64)
    if prior is None:
        return np.log((counts + 0.5) / (counts.sum() + 0.5 * vocab))
    return np.log((counts + SMOOTH * prior) / (counts.sum() + SMOOTH))


def case_groups(pieces: list[str]) -> np.ndarray:
    """The tokenizer's pieces [V] -> a group id per piece: pieces equal once lowercased
    ("▁The", "▁the", "▁THE") share one. A domain's class scores a group, not a piece
    (`new_class`), so text in capitals or at the start of a sentence reads as the same
    domain: GPL-3's warranty text in capitals, never in the training replay, shut its
    clones' gate on 21% of its held-out positions (docs/growth.md, near registers)."""
    key: dict[str, int] = {}
    return np.array([key.setdefault(p.lower(), len(key)) for p in pieces], np.int64)


def new_class(table: np.ndarray, used: set[int], train: list[np.ndarray],
              base: list[np.ndarray], groups: np.ndarray | None = None) -> int | None:
    """A free class (a column of `table` that no class in `used` holds) for a domain with
    training replay `train`, written into `table` in place with the base's column (a
    unigram model of `base`); None when every class is used. With `groups` (`case_groups`,
    one id per token) the domain's model is of groups, smoothed toward the base's group
    probabilities, and splits a group's probability among its pieces as the base does: a
    token's log-likelihood ratio against the base is its group's, and a group of one piece
    keeps the plain unigram's."""
    free = [c for c in range(1, table.shape[1]) if c not in used]
    if not free:
        return None
    vocab = table.shape[0]
    table[:, 0] = base_col = unigram(base, vocab)
    if groups is None:
        table[:, free[0]] = unigram(train, vocab, np.exp(base_col))
        return free[0]
    prior = np.bincount(groups, np.exp(base_col))  # the base's group probabilities
    counts = np.bincount(groups, np.bincount(np.concatenate(train), minlength=vocab),
                         len(prior))
    mine = (counts + SMOOTH * prior) / (counts.sum() + SMOOTH)
    table[:, free[0]] = base_col + np.log(mine / prior)[groups]
    return free[0]


def scores(table: np.ndarray, ids: np.ndarray, cls: int, gate: str | None = "base-and-argmax"
           ) -> np.ndarray:
    """Class `cls`'s gate score at every position of one window `ids` (the programs'
    `export/programs.py` `scores`): the summed log-probability of the tokens so far under
    the class minus the base's where the class is the likeliest grown one (`CLOSED`
    elsewhere); `CLOSED` before GATE_MIN tokens. `gate`: the bundle's
    `manifest["experts"]["gate"]`; None (bundles exported before 2026-12-02 evening): minus
    the best other class's, wherever."""
    summed = np.cumsum(table[ids].astype(np.float64), 0)  # [T, D]
    others = np.delete(summed, cls, 1)
    if gate is None:
        out = summed[:, cls] - others.max(1)
    else:
        grown = others[:, 1:] if cls else others  # the grown classes but cls
        best = grown.max(1) if grown.shape[1] else np.full(len(ids), -np.inf)
        out = np.where(summed[:, cls] >= best, summed[:, cls] - summed[:, 0], CLOSED)
    out[:GATE_MIN - 1] = CLOSED
    return out


def threshold(table: np.ndarray, gate: str | None, base: list[np.ndarray], cls: int) -> float:
    """A clone's threshold on its class's score: `GATE_LLR`, and at least the base
    replay's 99th percentile of that score (so at most ~1% of base positions open it)."""
    score = np.concatenate([scores(table, w, cls, gate)[:len(w) - 1] for w in base])
    return float(max(GATE_LLR, np.quantile(score, 1 - BASE_OPEN)))


def reach(table: np.ndarray, gate: str | None, used: set[int], windows: list[np.ndarray],
          base: list[np.ndarray], groups: np.ndarray | None = None) -> tuple[float, int]:
    """(the share of positions of the newest third of a domain's replay `windows` where a
    class built from the older two thirds opens, the positions counted): what a clone's
    gate would serve of text the domain has not shown yet. A unigram class learns a text's
    topics as well as its register; on text in the base's own register the topics are all
    it has, and they change with the next text: base-2's class opened on 99% of its
    training replay's held-out windows and on 18.5% of its held-out text (docs/growth.md,
    placement). The class takes a free column beside the grown classes in `used`, as
    growth's would (none free, or no newest third: (1.0, 0)), and is judged against the
    base alone: where another grown class is likelier, the domain's clones would take that
    class's clones along (`plan.TAKEOVER`), and its text is no less far from the base
    (fortunes-work beside science's class reached 58% with it, and in place raised the base
    1.8%: docs/growth.md, "Clones, a window a step"); `table` is not changed."""
    cut = max(1, len(windows) * 2 // 3)
    t = table.copy()
    cls = new_class(t, used, windows[:cut], base, groups)
    if cls is None:
        return 1.0, 0
    t, cls = t[:, [0, cls]], 1
    thr = threshold(t, gate, base, cls)
    newest = [scores(t, w, cls, gate)[GATE_MIN - 1:len(w) - 1] for w in windows[cut:]]
    s = np.concatenate(newest) if newest else np.zeros(0)
    return (float(np.mean(s >= thr)) if len(s) else 1.0), len(s)


def parent_row(threshold: float, cls: int) -> tuple[float, float, float, float]:
    """The slot row (bias, a, t, class) of a base expert whose clone replaces it: open where
    the clone's class scores at most the clone's threshold (a * s >= t with a = -1, t =
    -threshold), closed where the clone opens. A token that reached the parent then reaches
    the clone instead and keeps its other expert; with both open, a clone and its parent
    (equal router rows) took a token's top two wherever the parent was first and pushed its
    second expert out (near registers: docs/growth.md)."""
    return (0.0, -1.0, -threshold, float(cls))


def _sums(table: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each class's summed log-probability at each position of `ids` [T, D] (float64), the
    best other grown class's sum [T, D], and whether a position has `GATE_MIN` tokens
    [T, 1]: what the programs' `scores` decide from."""
    summed = np.cumsum(table[ids].astype(np.float64), 0)  # [T, D]
    grown = summed.copy()
    grown[:, 0] = -np.inf  # the base class is never the likeliest grown one
    ranked = np.sort(grown, 1)
    top = ranked[:, -1:]
    second = ranked[:, -2:-1] if grown.shape[1] > 1 else np.full_like(top, -np.inf)
    other = np.where(grown >= top, second, top)  # the best other grown class's sum
    return summed, other, (np.arange(len(ids)) + 1 >= GATE_MIN)[:, None]


def context_scores(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Every class's gate score at every position of `ids` [T, D], as the programs compute
    it (`export/programs.py` `scores`, float64 here): what a `decode` program takes as
    `novelty` to gate one more position of a context (`Runtime.extend`). Where `opened`
    is sure, a program given these gates its slots as its own prefill would."""
    summed, other, ready = _sums(table, ids)
    return np.where(ready & (summed >= other), summed - summed[:, :1], CLOSED)


def opened(table: np.ndarray, slots: np.ndarray, ids: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """Which slots the programs open at each position of one window `ids` under the class
    table [V, D] and the slot rows [L, 4, slots] (bias, a, t, class: open where a * score
    >= t, `export/programs.py` `set_gates`), as booleans [L, T, slots]; and where this
    float64 mirror cannot be sure of the programs' float32 answer (within `TOL`)."""
    summed, other, ready = _sums(table, ids)
    likeliest = summed >= other
    raw = np.where(ready, summed - summed[:, :1], CLOSED)  # [T, D]
    tie = ready & (np.abs(summed - other) < TOL)
    _, coef, thr, cls = slots.transpose(1, 0, 2)  # each [L, slots]
    c = cls.astype(np.int64)
    value = raw[:, c] * coef - thr  # [T, L, slots], where the class is the likeliest
    closed = CLOSED * coef - thr  # where it is not
    # unsure: near the threshold, or near a tie that decides between value and closed
    unsure = (coef != 0) & (((np.abs(value) < TOL) & likeliest[:, c])
                            | (tie[:, c] & ((value >= 0) != (closed >= 0))))
    open_ = np.where(likeliest[:, c], value, closed) >= 0
    return open_.transpose(1, 0, 2), unsure.transpose(1, 0, 2)


def slot_state(bundle) -> np.ndarray:
    """The programs' `slots` input [L, 4, slots] from the manifest's expert table
    (`export.programs.slot_state`): per slot a router bias, a gate coefficient, a threshold
    and a class of the domain gate; base experts (0, 0, 0, 0) always open, spare slots
    (0, 0, 1, 0) never, spawned ones (bias, 1, threshold, class), and the parent a clone
    `replaces` (0, -1, -threshold, class): closed where the clone opens. Bundles exported
    before the domain gate (no `experts.domains` in the manifest) take [L, 3, slots]: their
    spawned slots are (bias, 1, threshold) on the novelty of their own programs."""
    experts_, _, _ = layout.dims(bundle.config)
    rows = 4 if "domains" in bundle.manifest["experts"] else 3
    state = np.zeros((bundle.config["num_hidden_layers"], rows, experts_), np.float32)
    for row in bundle.manifest["experts"]["table"]:
        kind = row.get("kind", "base")
        if kind in ("spare", "pool"):  # free slots: closed
            state[row["layer"], 2, row["slot"]] = 1.0
        elif kind == "spawned":
            values = (row["bias"], 1.0, row["threshold"], row.get("class", 0))
            state[row["layer"], :, row["slot"]] = values[:rows]
    for row in bundle.manifest["experts"]["table"]:  # clones that replace their parent
        if row.get("replaces"):
            state[row["layer"], :, row["parent"]] = parent_row(row["threshold"], row["class"])
    return state
