"""The plan of a growth slice: which experts it changes and how (`growth.py` runs it).

`plan` turns a domain's verdict into steps: a named expert is cloned into a free spare slot
of its layer ("spawn"), its clone deepened further ("clone"), or, with no slot left, an idle
expert of an fp32 bundle deepened in place; placed in place (`Limits.place`), an fp32
bundle's named experts are deepened themselves, an int4 bundle's cloned open everywhere.
`placement` decides, under `Limits.place` "auto", whether a domain goes in place (its gate
would serve too little of its next text); `choose` picks the domain when none is asked
for. `NoSlotError` names the layers without a free slot, for the reclaim (`compress.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from moegrow.device_kernels import layout

from . import errormap, experts, gate, guard

TAKEOVER = 0.1  # another domain's clone that this share of a new domain's tokens reach is
# cloned for it too (see `plan`)


class GrowthError(ValueError):
    """A bundle that cannot grow (no deepening programs or spare slots, no calibration), or
    a plan it cannot carry out."""


class NoSlotError(GrowthError):
    """Every expert a plan for `domain` named needs a free spare slot and its layer has
    none left."""

    def __init__(self, message: str, domain: str, layers: list[int] | None = None):
        super().__init__(message)
        self.domain, self.layers = domain, layers or []  # the layers without a free slot


@dataclass(frozen=True)
class Limits:
    experts: int | None = None  # per layer; default the router's top-k
    tokens: int = 16384  # training tokens of domain replay per slice
    passes: int = 1
    steps: int = 256  # PC steps (a window each: 16,384 tokens 4 times over at the defaults)
    seconds: float = 600.0
    batch: int | None = None  # windows per step; None: the placement's (`SCHEDULE`)
    lr: float | None = None  # Adam's step size; None: the placement's (`SCHEDULE`)
    router_steps: int = 0  # hinge steps on the clones' router rows (off: it forgot more)
    router_lr: float = 0.1
    strict: bool = False  # the strict PC schedule (bundles exported with --strict-steps)
    place: str = "auto"  # "clones": cloned (idle experts in place when no slot is free);
    # "inplace": all in place; "auto": in place where the domain's gate would serve too
    # little of its text (`growth.placement`), else as "clones"


SCHEDULE = {"clones": (5e-4, 1), "inplace": (3e-4, 1)}  # (lr, windows a step): a window
# a step, as backprop's smaller steps for full weights; a base expert deepened in place
# serves all text and starts where the base left it (3e-4 gained 1.0-4.8 points on nine
# held-out texts in 2 passes), a clone is a fresh copy that a far domain moves a long way
# (5e-4 against 4 windows at 1e-3: +1.5 to +3.7 points on six texts near and far in 2
# passes, Python source 0.59x -> 0.99x LoRA's; docs/growth.md, "In place, smaller steps"
# and "Clones, a window a step")


def schedule(limits: Limits, frozen: bool) -> Limits:
    """`limits` with the learning rate and windows a step of its placement where left None
    (`frozen`: the base experts are quantized, in place takes open clones)."""
    key = "inplace" if limits.place == "inplace" and not frozen else "clones"
    lr, batch = SCHEDULE[key]
    return replace(limits, lr=lr if limits.lr is None else limits.lr,
                   batch=batch if limits.batch is None else limits.batch)


def compressed(bundle, domain: str) -> set[tuple[int, int]]:
    """(layer, parent) of the domain's clones compressed into the pool (`compress.py`):
    converged and frozen, growth no longer deepens them."""
    return {(r["layer"], r["parent"]) for r in bundle.manifest["experts"]["table"]
            if r.get("kind") == "spawned" and r.get("domain") == domain
            and r.get("bits", 32) != 32}


def _placed(rt, limits: Limits) -> bool:
    """Whether the bundle's base experts are frozen (quantized: clones only, "inplace" as
    clones open everywhere); GrowthError for a `limits.place` that is none of the three."""
    if limits.place not in ("auto", "clones", "inplace"):
        raise GrowthError(f"place must be 'auto', 'clones' or 'inplace', got {limits.place!r}")
    return rt.bundle.manifest["bits"] != 32


def plan(rt, verdict: dict, domain: str, seen: dict,
         limits: Limits) -> tuple[list[dict], list[list[int]]]:
    """([{"layer", "parent", "slot", "how": "inplace" | "spawn" | "clone"}], skipped) for one
    domain's verdict ("clone": the domain's existing clone of that parent, deepened
    further): the experts it names, placed in place then its `experts_in_place` (every
    layer's busiest: `verdicts.judge`) other than other domains' clones.
    A named expert whose clone finds no free slot in its layer (other domains took them) is
    skipped, [layer, parent]; GrowthError when that leaves nothing to do."""
    cal = rt.bundle.manifest["calibration"]["layers"]
    k = limits.experts or rt.bundle.config["num_experts_per_tok"]
    wide = limits.place == "inplace" and "experts_in_place" in verdict
    named = [tuple(p) for p in verdict["experts"]]
    if verdict["verdict"] == "spawn" and not wide:  # per named layer the expert the domain
        # routes to most: its clone takes that expert's share of the domain's tokens (issue
        # 13: the experts with the lowest mean update were ones German rarely picks, 0.02-27%
        # reach)
        counts: dict[tuple[int, int], float] = {}
        for layer, expert, d, count, *_ in seen["stats"]:
            if d == domain and count:
                counts[layer, expert] = count
        for layer, x in verdict["layers"].items():
            if x["named"]:
                mine = {e: c for (lay, e), c in counts.items() if lay == int(layer)}
                if mine:
                    named.append((int(layer), max(mine, key=mine.get)))
    frozen = _placed(rt, limits)
    free, clones, others, under, shared = {}, {}, set(), {}, set()
    done = compressed(rt.bundle, domain)
    for row in rt.bundle.manifest["experts"]["table"]:
        if row.get("kind") == "spare":
            free.setdefault(row["layer"], []).append(row["slot"])
        elif row.get("kind") == "spawned" and row.get("domain") == domain:
            clones[row["layer"], row["parent"]] = row["slot"]
        elif row.get("kind") == "spawned":
            others.add((row["layer"], row["slot"]))
            if "parent" in row:  # (a placeholder row may have none)
                under[row["layer"], row["slot"]] = row["parent"]
            if row.get("threshold", 0) <= gate.OPEN and row.get("bits", 32) == 32:
                shared.add((row["layer"], row["slot"]))  # open for all text, fp32
    if not clones and limits.place != "inplace":  # the domain's first clones bring its class:
        # where it wins, other domains' gates close, so the domain's tokens leave the other
        # clones they reach now; those are cloned too (after the named ones), so it keeps
        # what they gave it (a work slice that cloned layer 0 only lost science's clones in
        # layers 1-3 and made work 40% worse: docs/benchmarks.md)
        tokens = max(seen.get("domains", {}).get(domain, {}).get("tokens", 0), 1)
        reached = sorted((-count, layer, expert) for layer, expert, d, count, *_ in seen["stats"]
                         if d == domain and (layer, expert) in others
                         and count >= TAKEOVER * tokens)
        named += [(layer, expert) for _, layer, expert in reached]
    vacant = {(r["layer"], r["slot"]) for r in rt.bundle.manifest["experts"]["table"]
              if r.get("kind") in ("spare", "pool")}  # stale statistics (`compress`)
    cloned = {(layer, parent) for (layer, _), parent in under.items()}  # others' parents
    if wide:  # in place, after the verdict's: every layer's busiest, but no other domain's
        # clone; the parent of one is taken too: that domain's text reaches it where its gate
        # is shut, and is rehearsed beside the domain's (`growth.REHEARSE`; left out, a
        # German-grown bundle's base-1 gained 0.53x LoRA's, not 0.92x: docs/growth.md)
        named += [x for p in verdict["experts_in_place"] if (x := tuple(p)) not in others - shared]
    named = [x for x in dict.fromkeys(named) if x not in vacant]
    own = {(layer, slot): parent for (layer, parent), slot in clones.items()}
    out, per_layer, skipped, taken = [], {}, [], set()
    opened = {layer for layer, _ in [*clones, *shared]}  # layers with an open clone of
    # the domain's, or another in-place domain's (int4 in place: deepened, no slot taken)
    for layer, parent in named:
        parent = own.get((layer, parent), parent)  # a clone of its own, named: its parent
        while limits.place == "inplace" and not frozen and (layer, parent) in under:
            parent = under[layer, parent]  # another domain's clone: the base expert under
            # it, which the domain's text reaches wherever that clone's gate is shut
        if per_layer.get(layer, 0) >= k or (layer, parent) in taken:
            continue
        if (layer, parent) in done:
            skipped.append([layer, parent])
            continue
        taken.add((layer, parent))
        # an expert base text never reaches; never another domain's clone (their gates
        # keep other text from them: only their own domain may change them)
        idle = (layer, parent) not in others and cal[layer]["experts"][parent]["count"] == 0
        if (layer, parent) in clones:  # a later slice deepens the domain's clone further
            out.append({"layer": layer, "parent": parent, "slot": clones[layer, parent],
                        "how": "clone"})
        elif limits.place == "inplace" and not frozen and (layer, parent) not in others:
            out.append({"layer": layer, "parent": parent, "slot": parent, "how": "inplace"})
        elif limits.place == "inplace" and frozen and (layer, parent) in shared:  # another
            # in-place domain's open clone serves all text, as a base expert of an fp32
            # bundle does: deepened in place (its row records who did), guarded on its domain
            out.append({"layer": layer, "parent": parent, "slot": parent, "how": "inplace"})
        elif limits.place == "inplace" and frozen:  # a clone open everywhere takes the
            # parent's place for all text (`gate.OPEN`); not beside another domain's clone
            # of it (both would open, and tie for a token's first two experts); one per
            # layer and domain (not wanted, not skipped: no reclaim frees a slot for it), so
            # a domain its gate isolates finds a spare slot left
            if layer in opened:
                continue
            if (layer, parent) in others | cloned or not free.get(layer):
                skipped.append([layer, parent])
                continue
            opened.add(layer)
            out.append({"layer": layer, "parent": parent, "slot": free[layer].pop(0),
                        "how": "spawn", "open": True})
        elif free.get(layer):  # behind the domain's gate: no other text reaches it
            out.append({"layer": layer, "parent": parent, "slot": free[layer].pop(0),
                        "how": "spawn"})
        elif idle and not frozen:  # no slot left: base text never reaches it, others may
            out.append({"layer": layer, "parent": parent, "slot": parent, "how": "inplace"})
        else:
            skipped.append([layer, parent])
            continue
        per_layer[layer] = per_layer.get(layer, 0) + 1
    if skipped and not out and all(tuple(x) in done for x in skipped):
        raise GrowthError(f"{domain!r}: its clones are compressed into the pool (converged): "
                          "nothing left to grow; nothing was changed")
    if skipped and not out:
        layer, parent = skipped[0]
        spare = rt.bundle.config.get("spare_experts", 0)
        raise NoSlotError(f"no free expert slot in layer {layer} to clone expert {parent} "
                          f"into (the bundle has {spare} spare slots per layer, none left); "
                          "nothing was changed", domain,
                          sorted({x[0] for x in skipped if tuple(x) not in done}))
    return out, skipped


def learning(bundle, steps: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the first steps whose learning state fits the budget's "learning" bytes, the rest:
    deferred to a later slice); GrowthError when not even one expert's fits. A bundle
    exported before the budget counted learning state (no "learning" key) is not bounded."""
    allowed = bundle.manifest["budget"].get("learning")
    if allowed is None:
        return steps, []
    each = layout.learning_bytes(bundle.config, 1)
    n = allowed // each
    if steps and not n:
        raise GrowthError(f"{bundle.path}: the budget leaves {allowed} bytes for learning "
                          f"state; one expert's takes {each} (export with a larger "
                          "--budget-mb); nothing was changed")
    return steps[:n], steps[n:]


def choose(rt, growing: dict, ranked: list[str], seen: dict, limits: Limits,
           placed=None) -> str | None:
    """The domain to grow when none is asked for: the most wanted one with a plan that
    needs no other domain's slot, else the most wanted one that has no free slot (reclaim
    may free one), else None (the rest have nothing left: compressed). A domain whose last
    slice was refused waits until a slice's worth of new tokens (`limits.tokens`) was
    observed: the same replay would be refused again. `placed(domain)`: the limits a
    domain's plan is made under (`growth.placement`), default `limits`."""
    _placed(rt, limits)  # not the domain's fault: said, not passed over
    blocked = None
    for d in ranked:
        at = seen["domains"].get(d, {}).get("refused_at")
        if at is not None and seen["domains"][d]["tokens"] - at < limits.tokens:
            continue
        try:
            plan(rt, growing[d], d, seen, placed(d) if placed else limits)
            return d
        except NoSlotError:
            blocked = blocked or d
        except GrowthError:
            continue
    return blocked


def groups(rt, vocab: int) -> np.ndarray:
    """`gate.case_groups` of the runtime's tokenizer, padded to the table's `vocab` rows."""
    pieces = [rt.sp.id_to_piece(i) for i in range(rt.sp.get_piece_size())]
    return gate.case_groups(pieces + [f"<unnamed {i}>" for i in range(len(pieces), vocab)])


def base_replay(b) -> list[np.ndarray]:
    """The base text a new class and its threshold are calibrated on: the first half of
    the bundle's calibration tokens in windows (the second half is the guard's)."""
    ids = np.fromfile(b.path / b.manifest["calibration"]["guard"]["file"], np.int32)
    return guard.windows([ids[:len(ids) // 2].astype(np.int64)], b.context)


def placement(rt, domain: str, limits: Limits, store=None) -> tuple[Limits, dict | None]:
    """The limits a slice of `domain` runs under, and why: under `place="auto"` a domain
    without clones yet whose gate would open on less than `gate.REACH` of the newest
    third of its replay (`gate.reach`, from a class of the older two thirds, on at least
    `gate.REACH_MIN` positions) is placed in place: its clones would serve too little of
    its next text (text in the base's own register). In place, an fp32 bundle deepens the
    named experts and every layer's busiest themselves, an int4 bundle (frozen experts)
    clones them open everywhere, one per layer (`plan`), and a domain with such clones
    stays in place; else the limits as given. The second value: {"place", "reach",
    "positions"} when judged."""
    b = rt.bundle
    rows = b.manifest["experts"]["table"]
    if limits.place != "auto" or "domains" not in b.manifest["experts"]:
        return limits, None
    mine = [r for r in rows if r.get("kind") == "spawned" and r.get("domain") == domain]
    if mine:  # placed once: clones open everywhere (int4 in place) stay so
        wide = all(r.get("threshold", 0) <= gate.OPEN for r in mine)
        return (replace(limits, place="inplace") if wide else limits), None
    windows = guard.split((store or errormap.Store(b.path)).replay(domain), b.context)[0]
    if len(windows) < 3:  # no newest third to judge on
        return limits, None
    table = experts.domains(b, rt.backend, path=rt.weights)
    used = {r["class"] for r in rows if r.get("kind") == "spawned" and "class" in r}
    share, n = gate.reach(table, b.manifest["experts"].get("gate"), used, windows,
                          base_replay(b), groups(rt, table.shape[0]))
    if n < gate.REACH_MIN:
        return limits, None
    place = "inplace" if share < gate.REACH else "clones"
    return replace(limits, place=place), {"place": place, "reach": share, "positions": n}
