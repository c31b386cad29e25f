"""Compression: converged clones move down the ladder into the pool, freeing their slots.

A bundle exported with a pool (`moegrow export --pool N --pool-bits 8,4`) has, per layer
after its fp32 spare slots, N slots per width that every gated program holds at that width
(`export/moe.py` `Pooled`: codes and fp32 scales per group of 32 in the weight file,
dequantized in the graph on both engines). `compress(rt)` (also `moegrow compress`) moves
one domain's clones there:

  1. candidates: the domain's spawned experts still in fp32 spare slots (a clone in the
     pool is converged: growth no longer deepens it, `growth.plan`), each with a free pool
     slot in its layer, at the widths the allocator chooses (`rises`: each clone measured
     alone at each free width on the domain's held-out replay; `allocate`: the most bytes
     within `DOMAIN_RISE` of summed rise);
  2. a working copy (`work.Work`): each clone's weights are quantized into its pool slot
     (`device_kernels.layout.quantize_into`, the numpy reference of the pool's format,
     which the programs dequantize), its router row and gate state (bias, threshold,
     class) move there, and its spare slot is closed and freed for the next spawn;
  3. guard: on the domain's held-out replay the perplexity may rise by at most
     `DOMAIN_RISE`, on the base guard text by at most `guard.GUARD_BASE` (measured as a
     growth slice measures them); else nothing is kept;
  4. commit: one new weights version (`versions.commit`: atomic, logged, rolled back like
     any other); experts outside the move are bit-identical. The error map's statistics of
     the moved experts follow them to their new slots.

What it reclaims: each moved clone's fp32 bytes less its pool bytes (`budget`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from moegrow.device_kernels import layout

from . import errormap, gate, guard, verdicts, versions
from .work import Work

DOMAIN_RISE = 0.01  # largest relative perplexity rise on the domain's held-out replay
FIELDS = ("parent", "domain", "bias", "threshold", "class", "replaces")  # a clone's own
CLOSED = (0.0, 0.0, 1.0, 0.0)  # a free slot's gate state (`gate.slot_state`)
RETIRE_TRIES = 3  # experts measured per layer before a full layer is the answer


class CompressError(ValueError):
    """A bundle without a pool, or a request it cannot carry out."""


def budget(bundle) -> dict[str, Any]:
    """Bytes of the bundle's expert slots: {"budget_bytes", "pools": {name: {"bits",
    "slots", "used", "bytes", "used_bytes"}}, "experts": [{"layer", "slot", "kind",
    "bits", "bytes", "domain"}], "used_bytes" (base experts and spawned ones), "free_bytes"
    (free spare and pool slots), "reclaimable_bytes" (what compressing every fp32 clone
    into the narrowest free pool slot would give back), "stored_bytes" ({engine: bytes of
    every located expert tensor, extra forms included}), "learning_bytes" (what the budget
    keeps for a growth slice's learning state; None for a bundle exported before it did),
    "learning_experts" (how many experts' learning state that holds)}. Pools: "base",
    "spare" (fp32, for growth), "pool8" / "pool4" (the compressed ones)."""
    config, table = bundle.config, bundle.manifest["experts"]["table"]
    slots = (config.get("num_local_experts") or config["num_experts"])
    spare = config.get("spare_experts", 0)
    pools: dict[str, dict] = {}
    experts = []
    for row in table:
        slot = row["slot"]
        pool = "base" if slot < slots else "spare" if slot < slots + spare else \
            f"pool{row.get('bits')}"
        size = layout.expert_bytes(config, row.get("bits", 32))
        used = row.get("kind", "base") not in ("spare", "pool")
        p = pools.setdefault(pool, {"bits": row.get("bits", 32), "slots": 0, "used": 0,
                                    "bytes": 0, "used_bytes": 0})
        p["slots"] += 1
        p["bytes"] += size
        p["used"] += used
        p["used_bytes"] += size * used
        experts.append({"layer": row["layer"], "slot": slot, "kind": row.get("kind", "base"),
                        "bits": row.get("bits", 32), "bytes": size,
                        "domain": row.get("domain")})
    reclaim = sum(layout.expert_bytes(config, 32) - layout.expert_bytes(config, row["bits"])
                  for rows in candidates(bundle).values() for _, row in rows)
    used = sum(p["used_bytes"] for p in pools.values())
    total, hidden, width = layout.dims(config)
    stored = {}  # every located copy: fp32 bundles hold down_proj twice (stacked and dense)
    for engine, where in bundle.manifest["experts"]["layout"].items():
        stored[engine] = 0
        for e in where:
            n = e.get("count", total) * hidden * width
            stored[engine] += n * 4 if e["form"] in ("stacked", "dense") else \
                n * int(e["form"][1:]) // 8 + n // e["group"] * 4
    learning = bundle.manifest["budget"].get("learning")
    return {"budget_bytes": bundle.manifest["budget"]["bytes"], "pools": pools,
            "experts": experts, "used_bytes": used,
            "free_bytes": sum(p["bytes"] for p in pools.values()) - used,
            "reclaimable_bytes": reclaim, "stored_bytes": stored,
            "learning_bytes": learning,
            "learning_experts": None if learning is None
            else learning // layout.learning_bytes(config, 1)}


def candidates(bundle, domain: str | None = None, bits: dict | int | None = None
               ) -> dict[str, list[tuple[dict, dict]]]:
    """{domain: [(a clone's table row, the row of the free pool slot of its layer it goes
    to)]} for the domain's fp32 clones (every domain's without `domain`) while pool slots
    last: of width `bits` (an int for all, or {(layer, slot): bits} per clone; a clone
    missing from it stays), else the narrowest free one."""
    table = bundle.manifest["experts"]["table"]
    free: dict[int, list[dict]] = {}
    for row in sorted(table, key=lambda r: r.get("bits", 32)):
        if row.get("kind") == "pool":
            free.setdefault(row["layer"], []).append(row)
    out: dict[str, list[tuple[dict, dict]]] = {}
    for row in table:
        if not (row.get("kind") == "spawned" and row.get("bits", 32) == 32
                and domain in (None, row.get("domain"))):
            continue
        want = bits.get((row["layer"], row["slot"]), 0) if isinstance(bits, dict) else bits
        slots = [r for r in free.get(row["layer"], []) if want in (None, r["bits"])]
        if slots and want != 0:
            free[row["layer"]].remove(slots[0])
            out.setdefault(row["domain"], []).append((row, slots[0]))
    return out


def ripe(bundle, seen: dict, layers: list[int] | None = None,
         keep: str | None = None) -> list[dict]:
    """The domains whose fp32 clones `reclaim` may compress (other than `keep`; with
    `layers`, those with a candidate in one of them), the most converged first: [{"domain",
    "converged" (its verdict is `nothing`: growth has little left to win on it,
    `verdicts.judge`), "drift" (its clones' recent update size over their long-run mean:
    the error map's EMA over sum / count, averaged; below 1 the error is falling or
    settled, None without statistics)}], converged before not, then the least drift."""
    found = candidates(bundle)
    judged = verdicts.judge(seen, bundle.manifest["calibration"],
                            bundle.config["num_experts_per_tok"]) \
        if bundle.manifest.get("calibration") else {}
    stats = {(lay, e, d): (count, total, ema) for lay, e, d, count, total, _, ema, *_
             in seen["stats"]}
    out = []
    for d, moves in found.items():
        if d == keep or (layers is not None and not {r["layer"] for r, _ in moves} & set(
                layers)):
            continue
        ratios = [x[2] / (x[1] / x[0]) for r, _ in moves
                  if (x := stats.get((r["layer"], r["slot"], d))) and x[0] and x[1] > 0]
        out.append({"domain": d, "converged": judged.get(d, {}).get("verdict") == "nothing",
                    "drift": float(np.mean(ratios)) if ratios else None})
    return sorted(out, key=lambda x: (not x["converged"], x["drift"] is None,
                                      x["drift"] or 0.0, x["domain"]))


def capacity(bundle) -> dict[tuple[int, int], int]:
    """{(layer, bits): free pool slots of that width in that layer}."""
    out: dict[tuple[int, int], int] = {}
    for r in bundle.manifest["experts"]["table"]:
        if r.get("kind") == "pool":
            out[r["layer"], r["bits"]] = out.get((r["layer"], r["bits"]), 0) + 1
    return out


def rises(rt, clones: list[tuple[int, int]], held: list, progress=None,
          widths: tuple[int, ...] | None = None) -> dict:
    """{clone (layer, slot): {bits: NLL rise in nats}}: on a working copy, each fp32 clone
    alone served as the pool would serve it (`layout.served`) at each of `widths` (default:
    every width with a free slot in its layer), scored on the held-out replay windows
    `held` against the clones as they are (what quantizing that clone alone costs its
    domain)."""
    say = progress or (lambda _m: None)
    free = capacity(rt.bundle)
    out: dict = {}
    work = Work(rt)
    try:
        before = guard.measure(work.rt, held, set())["nll"]
        for c in clones:
            w, out[c] = work.rt.expert(*c), {}
            for bits in widths or sorted(b for (layer, b) in free if layer == c[0]):
                work.set_expert(*c, [layout.served(x, bits) for x in w])
                work.reload()
                out[c][bits] = guard.measure(work.rt, held, set())["nll"] - before
            work.set_expert(*c, w)
            say(f"L{c[0]} e{c[1]}: NLL rise " + ", ".join(
                f"int{b} {r:+.5f}" for b, r in sorted(out[c].items())))
    finally:
        work.close()
    return out


def allocate(rises_: dict, config: dict, free: dict, bound: float) -> dict:
    """{clone: bits}: the clones to move and their widths, reclaiming the most bytes whose
    summed predicted NLL rise (`rises`) stays within `bound` nats. Greedy from fp32: each
    step narrows one clone (to a width with a free slot left in its layer) at the least
    rise per byte freed (gains first), while the sum stays within the bound; clones it
    never narrows stay fp32 (absent)."""
    size = {b: layout.expert_bytes(config, b) for b in {32} | {b for r in rises_.values()
                                                              for b in r}}
    plan, left, total = dict.fromkeys(rises_, 32), dict(free), 0.0
    while True:
        steps = [((r - rises_[c].get(cur, 0.0)) / (size[cur] - size[b]),
                  r - rises_[c].get(cur, 0.0), c, b)
                 for c, cur in plan.items() for b, r in rises_[c].items()
                 if b < cur and left.get((c[0], b), 0) > 0]
        steps = [s for s in steps if total + s[1] <= bound]
        if not steps:
            return {c: b for c, b in plan.items() if b != 32}
        _, cost, c, b = min(steps)
        if plan[c] != 32:
            left[c[0], plan[c]] += 1
        left[c[0], b] -= 1
        plan[c], total = b, total + cost


def compress(rt, domain: str | None = None, progress=None,
             bits: dict | int | None = None, guarded: bool = True) -> dict[str, Any]:
    """Move one domain's fp32 clones into the pool (the module docstring; `bits` as in
    `candidates`: by default the narrowest free width, and where the guard refuses it the
    next wider one: "refused" lists the widths refused; `guarded` off commits whatever the
    guard measures: `moegrow bench quant` only); returns
    {"domain", "moves" [{"layer", "from", "to", "bits"}], "guard" {"domain_rise",
    "base_rise", "domain_bound", "base_bound", "before", "after"}, "reclaimed_bytes",
    "committed", "version", "reason", "seconds", "refused", "allocated"}.

    With the default widths the allocator's plan is tried first: each clone's rise measured
    alone at every free width (`rises`), and the widths that reclaim the most bytes within
    `DOMAIN_RISE` by the sum of those rises (`allocate`; "allocated": {"plan" {"L/slot":
    bits}, "predicted_rise"}); where it moves nothing or the guard refuses it ("refused"
    starts with "plan"), one width for all, narrowest first."""
    refused, allocated = [], None
    if bits is None and guarded:
        plan, allocated = _allocated(rt, domain, progress)
        if plan:
            report = _compress(rt, domain, progress, plan, guarded)
            if report["committed"] or not report["guard"]:
                return report | {"refused": [], "allocated": allocated}
            refused = ["plan"]
    report = _compress(rt, domain, progress, bits, guarded) | {"allocated": allocated}
    report["refused"] = refused
    widths = sorted({r.get("bits") for r in rt.bundle.manifest["experts"]["table"]
                     if r.get("kind") == "pool"})
    while bits is None and report["guard"] and not report["committed"]:
        report["refused"].append(max(m["bits"] for m in report["moves"]))
        wider = [w for w in widths if w > report["refused"][-1]]
        if not wider:
            break
        refused = report["refused"]
        report = _compress(rt, report["domain"], progress, wider[0], guarded) | {
            "refused": refused, "allocated": allocated}
    return report


def _allocated(rt, domain: str | None, progress) -> tuple[dict, dict | None]:
    """The allocator's plan for `domain` (else the first with candidates) and what it
    predicted; ({}, None) where there is nothing to move or no held-out replay."""
    b = rt.bundle
    found = candidates(b, domain)
    if not found:
        return {}, None
    domain = domain or sorted(found)[0]
    _, held = guard.split(errormap.Store(b.path).replay(domain), b.context)
    if not held:
        return {}, None
    clones = [(r["layer"], r["slot"]) for r in b.manifest["experts"]["table"]
              if r.get("kind") == "spawned" and r.get("bits", 32) == 32
              and r.get("domain") == domain]
    (progress or (lambda _m: None))(f"{domain}: measuring {len(clones)} clones at each "
                                    "free width on its held-out replay")
    measured = rises(rt, clones, held, progress)
    bound = float(np.log1p(DOMAIN_RISE)) if DOMAIN_RISE > -1 else -np.inf  # in nats
    plan = allocate(measured, b.config, capacity(b), bound)
    return plan, {"plan": {f"{c[0]}/{c[1]}": w for c, w in sorted(plan.items())},
                  "predicted_rise": float(np.expm1(sum(measured[c][w]
                                                       for c, w in plan.items())))}


def _compress(rt, domain: str | None, progress, bits: dict | int | None,
              guarded: bool) -> dict[str, Any]:
    start = time.monotonic()
    b = rt.bundle
    say = progress or (lambda _m: None)
    if not b.config.get("pool_experts"):
        raise CompressError(f"{b.path}: no pool to compress into (export with --pool N)")
    found = candidates(b, domain, bits)
    report: dict[str, Any] = {"domain": domain, "moves": [], "guard": None,
                              "reclaimed_bytes": 0, "committed": False,
                              "version": b.manifest["weights"]["version"], "reason": None}
    if not found:
        report["reason"] = ("nothing to compress: no fp32 clone" + (f" of {domain!r}"
                            if domain else "") + " with a free pool slot in its layer")
        report["seconds"] = time.monotonic() - start
        return report
    domain = report["domain"] = domain or sorted(found)[0]
    moves = [(r, to["slot"], to["bits"]) for r, to in found[domain]]
    report["moves"] = [{"layer": r["layer"], "from": r["slot"], "to": to, "bits": width}
                       for r, to, width in moves]
    _, held = guard.split(errormap.Store(b.path).replay(domain), b.context)
    if not held:
        report["reason"] = f"no held-out replay of {domain!r} to guard the move (observe more)"
        report["seconds"] = time.monotonic() - start
        return report
    say(f"{domain}: " + ", ".join(f"L{m['layer']} e{m['from']} -> e{m['to']} "
                                  f"(int{m['bits']})" for m in report["moves"]))
    changed = {(r["layer"], to) for r, to, _ in moves} | {(r["layer"], r["slot"])
                                                          for r, _, _ in moves}

    def edit(work: Work) -> None:
        for row, to, _ in moves:
            layer, old = row["layer"], row["slot"]
            work.set_expert(layer, to, work.rt.expert(layer, old))
            router = work.router(layer)
            router[to], router[old] = router[old], 0.0
            work.rt.slots[layer, :, to] = work.rt.slots[layer, :, old]
            work.rt.slots[layer, :, old] = CLOSED[:work.rt.slots.shape[1]]

    def commit(work: Work):
        weights, routers, rows = {}, {}, {}
        for row, to, width in moves:
            layer, old = row["layer"], row["slot"]
            weights[layer, to] = work.rt.expert(layer, old)  # its fp32 weights: quantized
            routers[layer, to] = np.array(work.router(layer)[to])  # by `experts.write`
            routers[layer, old] = np.zeros_like(routers[layer, to])
            rows[layer, to] = {f: row[f] for f in FIELDS if f in row} | {
                "kind": "spawned", "bits": width,
                "bytes": layout.expert_bytes(b.config, width), "from_slot": old}
            rows[layer, old] = dict.fromkeys(FIELDS) | {"kind": "spare"}
            for kid in children(b, layer, old):  # another domain's clone of it: its slot
                # row (`gate.parent_row` where the kid replaces it) moved with it (`edit`)
                rows[layer, kid["slot"]] = {"parent": to}
        report["reclaimed_bytes"] = sum(layout.expert_bytes(b.config, 32)
                                        - layout.expert_bytes(b.config, width)
                                        for _, _, width in moves)
        summary = {"what": "compress", "domain": domain, "moves": report["moves"],
                   "reclaimed_bytes": report["reclaimed_bytes"],
                   "guard": {k: report["guard"][k] for k in ("domain_rise", "base_rise")}}
        new = versions.commit(b, weights, routers, rows, summary)
        # the error map's statistics follow the experts (a plan names experts by slot; a
        # crash before this leaves them on freed slots, which `growth.plan` skips)
        errormap.Store(b.path).move([(r["layer"], r["slot"], to) for r, to, _ in moves])
        return new

    _guarded(rt, domain, held, changed, edit, commit, report, say, guarded)
    report["seconds"] = time.monotonic() - start
    return report


def earning(bundle, seen: dict) -> list[dict]:
    """Every spawned expert with what it earns for its bytes: {"layer", "slot", "domain",
    "bits", "bytes", "share" (of its domain's observed tokens that it routed, from the
    error map), "per_mb" (share per MB)}, the least earning first (`retire`'s order)."""
    tokens = {d: max(x["tokens"], 1) for d, x in seen["domains"].items()}
    counts = {(layer, e, d): c for layer, e, d, c, *_ in seen["stats"]}
    out = []
    for row in bundle.manifest["experts"]["table"]:
        if row.get("kind") == "spawned":
            d, size = row.get("domain"), layout.expert_bytes(bundle.config, row.get("bits", 32))
            share = counts.get((row["layer"], row["slot"], d), 0) / tokens.get(d, 1)
            out.append({"layer": row["layer"], "slot": row["slot"], "domain": d,
                        "bits": row.get("bits", 32), "bytes": size, "share": share,
                        "per_mb": share / (size / 1e6)})
    return sorted(out, key=lambda x: (x["per_mb"], x["layer"], x["slot"]))


def retire(rt, layers: list[int], keep: str | None = None, progress=None) -> list[dict]:
    """Free a spare slot in each of `layers` that has none by retiring spawned experts of
    domains other than `keep` that stopped earning their bytes: the least earning first
    (`earning`), each guarded like a compression (its domain's held-out replay may rise by
    at most `DOMAIN_RISE` without it, the base text by `guard.GUARD_BASE`) and committed as
    its own version; a retired pool clone's slot takes another domain's fp32 clone of that
    layer (`compress`, the most converged domain's: `ripe`), which frees the spare slot.
    At most `RETIRE_TRIES` experts measured per layer. Returns the reports (`_retire`'s and
    `compress`'s)."""
    say = progress or (lambda _m: None)
    out: list[dict] = []
    for layer in layers:
        tried: set[int] = set()
        while len(tried) < RETIRE_TRIES and not has_free(rt.bundle, layer):
            seen = errormap.Store(rt.bundle.path).read()
            left = [x for x in earning(rt.bundle, seen) if x["layer"] == layer
                    and x["domain"] != keep and x["slot"] not in tried]
            if not left:
                break
            tried.add(left[0]["slot"])
            r = _retire(rt, left[0], say)
            out.append(r)
            if r["committed"] and left[0]["bits"] != 32:  # a pool slot: an fp32 clone moves
                # in, the most converged domain's first (`ripe`)
                for x in ripe(rt.bundle, errormap.Store(rt.bundle.path).read(), [layer], keep):
                    if has_free(rt.bundle, layer):
                        break
                    out.append(compress(rt, x["domain"], progress))
    return out


def children(bundle, layer: int, parent: int | None, but: dict | None = None) -> list[dict]:
    """The table rows of `layer`'s clones of slot `parent` (other than `but`)."""
    return [r for r in bundle.manifest["experts"]["table"] if r.get("kind") == "spawned"
            and r["layer"] == layer and r.get("parent") == parent and r is not but]


def has_free(bundle, layer: int, kind: str = "spare") -> bool:
    """Whether `layer` has a free slot of `kind` ("spare" or "pool")."""
    return any(r["layer"] == layer and r.get("kind") == kind
               for r in bundle.manifest["experts"]["table"])


def _retire(rt, expert: dict, say) -> dict[str, Any]:
    """Retire one spawned expert (an `earning` row): its router row zeroed, its gate closed,
    its slot free again; the parent it replaced serves where it served (or is replaced by
    another domain's clone of it). {"what": "retire", "domain", "layer", "slot", "bits",
    "share", "guard", "reclaimed_bytes", "committed", "version", "reason", "seconds"}."""
    start = time.monotonic()
    b = rt.bundle
    layer, slot, domain = expert["layer"], expert["slot"], expert["domain"]
    rows = {(r["layer"], r["slot"]): r for r in b.manifest["experts"]["table"]}
    row = rows[layer, slot]
    report: dict[str, Any] = {"what": "retire", "domain": domain, "layer": layer, "slot": slot,
                              "bits": expert["bits"], "share": expert["share"], "guard": None,
                              "reclaimed_bytes": 0, "committed": False,
                              "version": b.manifest["weights"]["version"], "reason": None}
    _, held = guard.split(errormap.Store(b.path).replay(domain), b.context)
    if not held:
        report["reason"] = (f"no held-out replay of {domain!r} left to measure what retiring "
                            f"L{layer} e{slot} costs it; kept")
        report["seconds"] = time.monotonic() - start
        return report
    # other domains' clones of it take its parent as theirs; one that replaced it (or else
    # another clone of the parent) replaces the parent in its place
    kids = sorted(children(b, layer, slot), key=lambda r: not r.get("replaces"))
    heir = kids + children(b, layer, row.get("parent"), but=row)
    heir = heir[0] if row.get("replaces") and heir else None
    say(f"retire {domain}'s L{layer} e{slot} (routes {expert['share']:.1%} of its tokens)")

    def edit(work: Work) -> None:
        work.router(layer)[slot] = 0.0
        work.rt.slots[layer, :, slot] = CLOSED[:work.rt.slots.shape[1]]
        if row.get("replaces"):  # the parent opens again (a base expert everywhere, a clone
            # open everywhere as its own row says), or closes for its other clone
            up = rows[layer, row["parent"]]
            work.rt.slots[layer, :, row["parent"]] = (
                gate.parent_row(heir["threshold"], heir["class"]) if heir else
                (up["bias"], 1.0, up["threshold"], up.get("class", 0))
                if up.get("kind") == "spawned" else 0.0)

    def commit(work: Work):
        routers = {(layer, slot): np.zeros_like(work.router(layer)[slot])}
        change = {(layer, slot): dict.fromkeys((*FIELDS, "from_slot")) | {
            "kind": "spare" if expert["bits"] == 32 else "pool"}}
        for kid in kids:
            change[layer, kid["slot"]] = {"parent": row.get("parent"), "replaces": False}
        if heir:
            change[layer, heir["slot"]] = change.get((layer, heir["slot"]), {}) | {
                "replaces": True}
        report["reclaimed_bytes"] = expert["bytes"]
        new = versions.commit(b, {}, routers, change, {
            "what": "retire", "domain": domain, "layer": layer, "slot": slot,
            "reclaimed_bytes": expert["bytes"],
            "guard": {k: report["guard"][k] for k in ("domain_rise", "base_rise")}})
        errormap.Store(b.path).drop([(layer, slot)])
        return new

    _guarded(rt, domain, held, {(layer, slot), (layer, row["parent"])}, edit, commit, report,
             say)
    report["seconds"] = time.monotonic() - start
    return report


def _guarded(rt, domain: str, held: list, changed: set, edit, commit, report: dict, say,
             guarded: bool = True) -> None:
    """On a working copy: measure the domain's held-out replay `held` and the base guard
    text, `edit(work)`, measure again; within `DOMAIN_RISE` and `guard.GUARD_BASE` (or not
    `guarded`) `commit(work)` makes the new version and the runtime serves it. Fills
    `report`'s "guard", "committed", "version" and "reason"."""
    base = guard.base_windows(rt)
    work = Work(rt)
    try:
        before = {"domain": guard.measure(work.rt, held, changed),
                  "base": guard.base(rt, work.rt, base, changed)}
        edit(work)
        work.reload()
        say("guard: held-out domain replay and base text")
        after = {"domain": guard.measure(work.rt, held, changed),
                 "base": guard.measure(work.rt, base, changed)}
        g = {"domain_rise": float(np.exp(after["domain"]["nll"] - before["domain"]["nll"]) - 1),
             "base_rise": float(np.exp(after["base"]["nll"] - before["base"]["nll"]) - 1),
             "domain_bound": DOMAIN_RISE, "base_bound": guard.GUARD_BASE,
             "before": before, "after": after}
        report["guard"] = g
        say(f"guard: domain perplexity {g['domain_rise']:+.2%}, base {g['base_rise']:+.2%}")
        if guarded and (g["domain_rise"] > DOMAIN_RISE or g["base_rise"] > guard.GUARD_BASE):
            report["reason"] = (f"guard: domain perplexity rise {g['domain_rise']:.2%} (bound "
                                f"{DOMAIN_RISE:.1%}), base rise {g['base_rise']:.2%} (bound "
                                f"{guard.GUARD_BASE:.1%}); nothing committed")
        else:
            new = commit(work)
            rt.reload(new)
            guard.remember(rt, after["base"])  # the new version's, for the next guard
            report["committed"], report["version"] = True, new.manifest["weights"]["version"]
    finally:
        work.close()
