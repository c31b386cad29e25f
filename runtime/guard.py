"""A growth slice's guard (`growth.py`, step 5): the domain's replay split into training
windows and held-out ones, and the NLL of held-out domain text and of base text measured
before and after the slice; the slice is kept only where the domain's NLL fell and the base
perplexity rose by at most `GUARD_BASE`."""

from __future__ import annotations

import itertools

import numpy as np

from . import experts, gate, state

HOLDOUT = 5  # every HOLDOUT-th replay window of the domain is held out for the guard
GUARD_BASE = 0.005  # largest relative perplexity rise on the base guard text

Window = tuple[np.ndarray, slice]  # a window and the positions of it that are counted


def windows(seqs: list[np.ndarray], context: int) -> list[np.ndarray]:
    """The sequences packed into one stream (each observed text starts with BOS, which
    separates them) and cut into windows of `context` tokens, each starting on the last
    token of the one before: every token after the first is a target once. Cut one by one,
    an observed text of 258 tokens left a window of 2 (a step of its own, a guard window of
    one target: on GPL-3, 6 of 30 training windows; docs/growth.md, near registers)."""
    stream = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
    step = max(context - 1, 1)
    return [stream[i:i + context] for i in range(0, max(len(stream) - 1, 0), step)]


def split(replay: list[np.ndarray], context: int) -> tuple[list[np.ndarray], list[Window]]:
    """(training windows, held-out windows with every target counted) of a domain's replay:
    every `HOLDOUT`-th window is held out, never trained on."""
    cut = windows(replay, context)
    held = [(w, slice(0, len(w) - 1)) for w in cut[HOLDOUT - 1::HOLDOUT]]
    return [w for i, w in enumerate(cut) if i % HOLDOUT != HOLDOUT - 1], held


def rehearsed(train: list[np.ndarray], others: list[list[np.ndarray]], share: float
              ) -> list[np.ndarray]:
    """`train` with `share` x its count of each of `others`' windows (taken evenly across
    each, the domains in turn) spread evenly among its own."""
    picks = [[x[j * len(x) // n] for j in range(n)] for x in others
             if (n := min(len(x), int(len(train) * share)))]
    extra = [w for row in itertools.zip_longest(*picks) for w in row if w is not None]
    out, n = list(train), len(extra)
    for j in reversed(range(n)):  # after every len(train) / n of its own
        out.insert((j + 1) * len(train) // n, extra[j])
    return out


def measure(rt, windows_: list[Window], changed: set) -> dict:
    """NLL of the windows' counted tokens under the runtime `rt`, and the share of them
    that reach a changed expert ((layer, slot) in `changed`) in each layer: from `score`,
    which returns the chosen experts (bundles exported since 2026-12-05; at int4 half the
    time of `observe`, whose error taps the guard does not need), else from `observe`."""
    outputs = rt.bundle.manifest.get("outputs", {}).get("score", ())
    program = "score" if "ids" in outputs else "observe"
    per, n, reach = [], 0, np.zeros(rt.slots.shape[0])
    for w, new in windows_:
        out = rt.run(program, w[None])
        per.append(float(out[0][new].astype(np.float64).sum()))
        n += len(out[0][new])
        ids = out[2][:, new]  # [L, T, K]
        for layer in range(ids.shape[0]):
            mine = [s for lay, s in changed if lay == layer]
            reach[layer] += np.isin(ids[layer], mine).any(-1).sum()
    return {"nll": sum(per) / max(n, 1), "tokens": n, "reach": (reach / max(n, 1)).tolist(),
            "windows": per}


def base_windows(rt) -> list[Window]:
    """The base guard text (the second half of the bundle's calibration ids) as `eval`
    scores it: no window's first tokens without context (one that began in odd pieces
    opened German's gate: docs/growth.md, "What it cost")."""
    b = rt.bundle
    ids = np.fromfile(b.path / b.manifest["calibration"]["guard"]["file"], np.int32)
    return list(rt.windows(ids[len(ids) // 2:].astype(np.int64)))


def base(rt, work, windows_: list[Window], changed: set) -> dict:
    """`measure` of the base guard text under the version `rt` serves, run on its working
    copy `work` (the same weights), or remembered from an earlier slice or compression on
    this version and engine, which `remember` keeps after a commit (its weights never
    change: the text's NLL is a constant of it; a remembered one has no "reach", which is
    only read after a change). A refused slice writes nothing."""
    key = (rt.bundle.manifest["weights"]["version"], rt.backend)
    tokens = sum(new.stop - new.start for _, new in windows_)
    with state.connection(rt.bundle.path, create=False) as db:
        row = db.execute("SELECT nll FROM guard_base WHERE version = ? AND engine = ? AND "
                         "tokens = ?", (*key, tokens)).fetchone()
    if row:
        return {"nll": row[0], "tokens": tokens, "reach": None, "remembered": True}
    return measure(work, windows_, changed)


def _gates(rt, buf=None) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """What decides where each slot is open and what an open slot adds: the class table,
    the slot rows and the routers of the weights `rt` serves (or of the map `buf`)."""
    b, engine = rt.bundle, rt.backend
    routers = [experts.router(b, layer, engine, buf) for layer in range(rt.slots.shape[0])]
    return experts.domains(b, engine, buf), rt.slots, routers


def touched(before, after, windows_: list[Window], changed: set) -> list[bool]:
    """For each window, whether a program's output on it can differ between the weights of
    `before` and those of `after` (`_gates` of each; `changed`: the (layer, slot) experts
    whose weights differ). It cannot where every slot opens at the same positions under
    both (`gate.opened`, sure of it) and no slot open there differs in its weights, router
    row or bias: every layer then routes and computes as before. A clone that opens on a
    few base windows leaves the rest of the base guard text as it was."""
    (t0, s0, r0), (t1, s1, r1) = before, after
    differs = {(lay, s) for lay in range(s0.shape[0]) for s in range(s0.shape[2])
               if (lay, s) in changed or s0[lay, 0, s] != s1[lay, 0, s]
               or not np.array_equal(r0[lay][s], r1[lay][s])}
    out = []
    for w, _ in windows_:
        (o0, u0), (o1, u1) = gate.opened(t0, s0, w), gate.opened(t1, s1, w)
        live = (o0 | o1).any(1)  # [L, slots]: open somewhere in the window
        out.append(bool(u0.any() or u1.any() or (o0 != o1).any()
                        or any(live[lay, s] for lay, s in differs)))
    return out


def after(rt, work, windows_: list[Window], changed: set, before: dict) -> dict:
    """`measure` of the base guard text on the working copy `work` after a slice, scoring
    only the windows the slice can have changed (`touched`): the others keep their NLL
    under the version `rt` serves (`before`, this text's measure there, remembered or
    not), which `rt` scores on the touched windows where `before` has no per-window NLL
    (remembered), unless they are half the text or more. "scored": how many windows ran."""
    hit = touched(_gates(rt), _gates(work.rt, work.buf), windows_, changed)
    if "windows" not in before and 2 * sum(hit) >= len(hit):  # scoring them twice costs more
        hit = [True] * len(hit)
    mine = [w for w, h in zip(windows_, hit, strict=True) if h]
    out = measure(work.rt, mine, changed)
    if "windows" in before:
        then = sum(x for x, h in zip(before["windows"], hit, strict=True) if h)
    else:
        then = measure(rt, mine, changed)["nll"] * out["tokens"]
    n = before["tokens"]
    return {"nll": before["nll"] + (out["nll"] * out["tokens"] - then) / max(n, 1),
            "tokens": n, "reach": [r * out["tokens"] / max(n, 1) for r in out["reach"]],
            "scored": len(mine), "of": len(windows_)}


def remember(rt, measured: dict) -> None:
    """Keep `measure`'s NLL of the base guard text for the version `rt` serves now (after
    a commit: the working copy's "after", measured on the new version's weights)."""
    with state.connection(rt.bundle.path, write=True) as db:
        db.execute("INSERT OR REPLACE INTO guard_base VALUES (?, ?, ?, ?)",
                   (rt.bundle.manifest["weights"]["version"], rt.backend, measured["nll"],
                    measured["tokens"]))


def _brief(measured: dict) -> dict:
    """{"domain", "base"} measures without their per-window NLL (not for reports)."""
    return {k: {x: y for x, y in v.items() if x != "windows"} for k, v in measured.items()
            if k != "others"}


def verdict(before: dict, after: dict) -> dict:
    """The guard's report from `measure`'s {"domain", "base", "others"} before and after a
    slice ("others": {domain: measure} of the other grown domains' held-out replay, which a
    slice that changes experts in place must not worsen by more than the base's bound)."""
    def rise(b: dict, a: dict) -> float:
        return float(np.exp(a["nll"] - b["nll"]) - 1)
    base = rise(before["base"], after["base"])
    gain = float(1 - np.exp(after["domain"]["nll"] - before["domain"]["nll"]))
    others = {d: rise(m, after["others"][d]) for d, m in before.get("others", {}).items()}
    return {"before": _brief(before), "after": _brief(after), "domain_gain": gain,
            "base_rise": base, "others_rise": others, "bound": GUARD_BASE,
            "passed": gain > 0 and base <= GUARD_BASE
            and all(r <= GUARD_BASE for r in others.values())}
