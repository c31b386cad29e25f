"""Compression: converged clones move down the ladder into the pool, freeing their slots.

A bundle exported with a pool (`moegrow export --pool N --pool-bits 8,4`) has, per layer
after its fp32 spare slots, N slots per width that every gated program holds at that width
(`export/moe.py` `Pooled`: codes and fp32 scales per group of 32 in the weight file,
dequantized in the graph on both engines). `compress(rt)` (also `moegrow compress`) moves
one domain's clones there:

  1. candidates: the domain's spawned experts still in fp32 spare slots (a clone in the
     pool is converged: growth no longer deepens it, `growth.plan`), each with a free pool
     slot in its layer;
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

from . import errormap, guard, versions
from .work import Work

DOMAIN_RISE = 0.01  # largest relative perplexity rise on the domain's held-out replay
FIELDS = ("parent", "domain", "bias", "threshold", "class", "replaces")  # a clone's own


class CompressError(ValueError):
    """A bundle without a pool, or a request it cannot carry out."""


def budget(bundle) -> dict[str, Any]:
    """Bytes of the bundle's expert slots: {"budget_bytes", "pools": {name: {"bits",
    "slots", "used", "bytes", "used_bytes"}}, "experts": [{"layer", "slot", "kind",
    "bits", "bytes", "domain"}], "used_bytes" (base experts and spawned ones), "free_bytes"
    (free spare and pool slots), "reclaimable_bytes" (what compressing every fp32 clone
    into the narrowest free pool slot would give back), "stored_bytes" ({engine: bytes of
    every located expert tensor, extra forms included})}. Pools: "base", "spare" (fp32, for
    growth), "pool8" / "pool4" (the compressed ones)."""
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
    return {"budget_bytes": bundle.manifest["budget"]["bytes"], "pools": pools,
            "experts": experts, "used_bytes": used,
            "free_bytes": sum(p["bytes"] for p in pools.values()) - used,
            "reclaimable_bytes": reclaim, "stored_bytes": stored}


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


def compress(rt, domain: str | None = None, progress=None,
             bits: dict | int | None = None, guarded: bool = True) -> dict[str, Any]:
    """Move one domain's fp32 clones into the pool (the module docstring; `bits` as in
    `candidates`: by default the narrowest free width, and where the guard refuses it the
    next wider one: "refused" lists the widths refused; `guarded` off commits whatever the
    guard measures: `moegrow bench quant` only); returns
    {"domain", "moves" [{"layer", "from", "to", "bits"}], "guard" {"domain_rise",
    "base_rise", "domain_bound", "base_bound", "before", "after"}, "reclaimed_bytes",
    "committed", "version", "reason", "seconds", "refused"}."""
    report = _compress(rt, domain, progress, bits, guarded)
    report["refused"] = []
    widths = sorted({r.get("bits") for r in rt.bundle.manifest["experts"]["table"]
                     if r.get("kind") == "pool"})
    while bits is None and report["guard"] and not report["committed"]:
        report["refused"].append(max(m["bits"] for m in report["moves"]))
        wider = [w for w in widths if w > report["refused"][-1]]
        if not wider:
            break
        refused = report["refused"]
        report = _compress(rt, report["domain"], progress, wider[0], guarded) | {
            "refused": refused}
    return report


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
    ids = np.fromfile(b.path / b.manifest["calibration"]["guard"]["file"], np.int32)
    base = list(rt.windows(ids[len(ids) // 2:].astype(np.int64)))
    if not held:
        report["reason"] = f"no held-out replay of {domain!r} to guard the move (observe more)"
        report["seconds"] = time.monotonic() - start
        return report
    say(f"{domain}: " + ", ".join(f"L{m['layer']} e{m['from']} -> e{m['to']} "
                                  f"(int{m['bits']})" for m in report["moves"]))
    changed = {(r["layer"], to) for r, to, _ in moves} | {(r["layer"], r["slot"])
                                                          for r, _, _ in moves}
    work = Work(rt)
    try:
        before = {"domain": guard.measure(work.rt, held, changed),
                  "base": guard.measure(work.rt, base, changed)}
        weights = {}
        for row, to, _ in moves:
            layer, old = row["layer"], row["slot"]
            weights[layer, to] = work.rt.expert(layer, old)
            work.set_expert(layer, to, weights[layer, to])
            router = work.router(layer)
            router[to], router[old] = router[old], 0.0
            work.rt.slots[layer, :, to] = work.rt.slots[layer, :, old]
            work.rt.slots[layer, :, old] = (0.0, 0.0, 1.0, 0.0)[:work.rt.slots.shape[1]]
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
            routers, rows = {}, {}
            for row, to, width in moves:
                layer, old = row["layer"], row["slot"]
                routers[layer, to] = np.array(work.router(layer)[to])
                routers[layer, old] = np.zeros_like(routers[layer, to])
                rows[layer, to] = {f: row[f] for f in FIELDS if f in row} | {
                    "kind": "spawned", "bits": width,
                    "bytes": layout.expert_bytes(b.config, width), "from_slot": old}
                rows[layer, old] = dict.fromkeys(FIELDS) | {"kind": "spare"}
            report["reclaimed_bytes"] = sum(layout.expert_bytes(b.config, 32)
                                            - layout.expert_bytes(b.config, width)
                                            for _, _, width in moves)
            summary = {"what": "compress", "domain": domain, "moves": report["moves"],
                       "reclaimed_bytes": report["reclaimed_bytes"],
                       "guard": {k: g[k] for k in ("domain_rise", "base_rise")}}
            new = versions.commit(b, weights, routers, rows, summary)
            # the error map's statistics follow the experts (a plan names experts by slot;
            # a crash before this leaves them on freed slots, which `growth.plan` skips)
            errormap.Store(b.path).move([(r["layer"], r["slot"], to) for r, to, _ in moves])
            rt.reload(new)
            report["committed"], report["version"] = True, new.manifest["weights"]["version"]
    finally:
        work.close()
    report["seconds"] = time.monotonic() - start
    return report
