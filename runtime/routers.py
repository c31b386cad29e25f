"""Router-row training of a slice's new clones (growth step 3, `Limits.router_steps`; off
by default: it forgot more, docs/growth.md)."""

from __future__ import annotations

import numpy as np

from .plan import Limits
from .work import Work

MARGIN = 1.0  # logit margin against the k-th other slot


def train(work: Work, steps: list[dict], base: list[np.ndarray], limits: Limits,
          k: int) -> dict:
    """Hinge updates of the clones' router rows and biases on replayed base text: where a
    base position opens the gate and the clone ranks within MARGIN of the k-th other slot,
    its logit is pushed down (the domain keeps reaching the clone wherever it reached the
    parent: the clone wins that tie by `growth.BIAS`)."""
    out = {}
    gated = [s for s in steps if s["how"] == "spawn" and not s.get("open")]
    for layer in sorted({s["layer"] for s in gated}):
        clones = [s["slot"] for s in gated if s["layer"] == layer]
        sets = []
        for w in base:
            d = work.rt.deepen(layer, w, False)
            sets.append((d["x"][:len(w) - 1].astype(np.float64), d["novelty"][:len(w) - 1]))
        rows = work.router(layer)
        for clone in clones:
            w_row, bias = rows[clone].astype(np.float64), float(work.rt.slots[layer, 0, clone])
            total = bad = 0
            for _ in range(limits.router_steps):
                gw, gb, total, bad = np.zeros_like(w_row), 0.0, 0, 0
                for x, nov in sets:
                    st = work.rt.slots[layer]  # bias, gated, threshold, class per slot
                    open_ = nov[:, st[3].astype(int)] * st[1] >= st[2]
                    logits = x @ rows.T.astype(np.float64) + st[0]
                    logits[:, clone] = x @ w_row + bias
                    logits = np.where(open_, logits, -np.inf)
                    kth = -np.sort(-np.delete(logits, clone, axis=1), axis=1)[:, k - 1]
                    viol = open_[:, clone] & (logits[:, clone] > kth - MARGIN)
                    gw += x[viol].sum(0)
                    gb += viol.sum()
                    total += int(open_[:, clone].sum())
                    bad += int(viol.sum())
                if not bad:
                    break
                w_row -= limits.router_lr * gw / max(total, 1)
                bias -= limits.router_lr * gb / max(total, 1)
            rows[clone] = w_row.astype(np.float32)
            work.rt.slots[layer, 0, clone] = bias
            out[f"{layer}/{clone}"] = {"base_open": total, "base_reaching": bad}
    work.reload()
    return out
