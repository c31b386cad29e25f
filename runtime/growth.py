"""Growth: one bounded idle slice that deepens or spawns experts for an observed domain.

`idle(rt, seconds)` (also `Runtime.idle`):
  1. domain and plan, from the error map's verdicts (`verdicts.judge`): `deepen` names experts,
     `spawn` names layers (the parent there is the expert the domain's tokens pick most);
     with a domain's first clones (its class), other domains' clones that its tokens reach
     now are cloned for it too (`TAKEOVER`). Under `Limits.place` "auto" a domain whose gate
     would open on too little of its newest replay is placed in place (`placement`): an
     fp32 bundle deepens the named experts themselves and every layer's busiest (other
     domains' clones aside), an int4 bundle clones them open for all text
     (one per layer). A named expert is cloned into a free spare
     slot of its layer (its parent is never changed; a quantized parent's clone starts from
     its dequantized weights, the fp32 copy the deepening programs hold); one that the base
     calibration never chose (idle) deepens in place when its layer has no free slot left
     (fp32 bundles only: quantized experts are frozen); one with no free slot otherwise is
     skipped.
  2. a working copy (`Runtime.working_copy`: a runtime on a copy of the engine's weight
     file in `state/`, sized once); clones get their parent's weights and router row there,
     a router bias `BIAS` (the clone wins the tie with its parent, so the domain reaches it
     wherever it reached the parent; the parent, unless an earlier clone closed it already,
     closes where the clone opens: `gate.parent_row`), the domain's class in the gate's
     table (a unigram model of its training replay, smoothed toward the base's,
     `gate.SMOOTH`; the base's from the first half of the calibration text) and a
     threshold: at least `gate.GATE_LLR`, and at least the base replay's 99th percentile of
     its class's score (`gate.threshold`); a threshold over `gate.SEPARABLE` means the
     class explains base text as well as the base's does (shuffled base text: its clones
     opened on base text the guard never saw, docs/reliability.md), and nothing is
     spawned. The clone is reachable only where the context is that much likelier under
     its domain's class than under the base's and every other grown domain's
     (`export/programs.py`, inside every program).
  3. optionally (`Limits.router_steps`, off by default: it forgot more, docs/growth.md) hinge
     updates of the new router rows that push them below the k-th logit on replayed base
     positions that open the gate (`routers.py`);
  4. PC deepening: the bundle's `sweep` program (every layer's updates from one forward
     and one backward; `sweep_spare` for clones alone where the bundle has it, `_sweep`;
     `strict{l}` per layer for strict PC) on batches of domain replay
     windows; Adam on the changed experts only (the bundle's `adam` program), written
     into the working copy in place. Programs that read their expert weights at every
     run (`Bundle.live`: ONNX Runtime) see them at once; ExecuTorch's are reloaded after
     each step. A non-finite update, or an energy per token reaching the changed experts
     beyond `EXPLODE` x the first step's, is discarded and ends the slice.
  5. guard (`guard.py`): on held-out domain replay (the replay packed into windows; every
     `guard.HOLDOUT`-th window, never trained on) the NLL must fall, and on the base guard
     text (the second half of the bundle's calibration tokens, in `Runtime.windows` as
     `eval` scores it) the perplexity must not rise by more than `guard.GUARD_BASE`, nor,
     where an expert changed in place (it serves every domain), on any other grown
     domain's held-out replay (trained beside the domain's: `REHEARSE`); else nothing is
     kept.
  6. commit: a new weights version with the changed experts, router rows and expert-table
     rows (`versions.commit`, which logs it), and the runtime reloads it.
Reclaim: with a `reclaim(domain, layers)` callback (`Runtime.idle` passes one), a plan
that finds no free slot for an expert it names first has the other domains' clones
compressed into the pool (bundles with one) and, in layers still full, spawned experts
that stopped earning their bytes retired (`compress.py`), then is made again.
Bounded: at most `Limits.experts` experts per layer, `tokens` x `passes` training tokens,
`steps` steps and `seconds`; memory: the working copy (the changed experts are read and
written in place there) plus their learning state (gradients, Adam moments), allocated
once per slice and never more than the budget's "learning" bytes (`plan.learning`:
experts past it wait for a later slice).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from . import backends, errormap, experts, gate, guard, routers, verdicts, versions
from .plan import (
    TAKEOVER,
    GrowthError,
    Limits,
    NoSlotError,
    base_replay,
    choose,
    compressed,
    groups,
    learning,
    placement,
    plan,
    schedule,
)
from .work import Work

# the programs a keystroke runs stay loaded through a slice: a keystroke that interrupts it
# would otherwise load them again (+35-40 ms on the default model; docs/benchmarks.md)
KEYBOARD = {"prefill", "decode", "prefill_gated", "decode_gated"}

__all__ = ["TAKEOVER", "GrowthError", "Limits", "NoSlotError", "choose", "compressed", "idle",
           "learning", "placement", "plan", "schedule"]

BIAS = 0.01  # a clone's router bias over its parent's row at spawn
EXPLODE = 100.0  # energy per routed token above this many times the first step's: the
# update is discarded (a window's energy is heavy-tailed: on the tiny model one batch of
# 4 windows read 30x the one before it without any update going wrong; the strict schedule's
# divergence reached 2,400x)
REHEARSE = 0.1  # where experts change in place (they serve every domain), each other grown
# domain's training replay, this share of the domain's windows, is trained beside it: their
# text reaches those experts wherever their gates are shut (without it, base-2 in place on
# a bundle grown on science raised science 0.74% and was refused; docs/growth.md)
BETAS, EPS = (0.9, 0.999), 1e-8  # Adam's (the betas as the `adam` program has them)


def _domain_class(work: Work, domain: str, train: list[np.ndarray],
                  base: list[np.ndarray]) -> int:
    """The gate's class of `domain`: its clones' class if it has some, else a free column
    of the table, written now (with the base's column) in the working copy."""
    table = experts.domains(work.rt.bundle, work.rt.backend, work.buf)
    used = {row["class"]: row["domain"] for row in work.rt.bundle.manifest["experts"]["table"]
            if row.get("kind") == "spawned" and "class" in row}
    mine = [c for c, d in used.items() if d == domain]
    if mine:
        return mine[0]
    cls = gate.new_class(table, set(used), train, base, groups(work.rt, table.shape[0]))
    if cls is None:
        raise GrowthError(f"the domain gate has no free class for {domain!r} (it holds "
                          f"{table.shape[1] - 1}); nothing was changed")
    return cls


def _threshold(work: Work, base: list[np.ndarray], cls: int) -> float:
    """`gate.threshold` on the working copy's table."""
    return gate.threshold(experts.domains(work.rt.bundle, work.rt.backend, work.buf),
                          work.rt.bundle.manifest["experts"].get("gate"), base, cls)


def idle(rt, seconds: float, domain: str | None = None, limits: Limits | None = None,
         progress=None, reclaim=None, interrupt=None, policy=None) -> dict[str, Any]:
    """One growth slice of at most `seconds` (see the module docstring); returns what it
    did: {"domain", "verdict", "plan", "skipped" (named experts with no free slot left),
    "deferred" (named experts past the budget's learning bytes: a later slice's),
    "tokens", "steps", "energy" and "update_norm" (per step and token: the changed experts'
    energy, the norm of their update), "router",
    "guard" (before/after NLL and reach on held-out domain and base text), "committed",
    "version", "reason" (why nothing was committed), "bytes" (learning state: the changed
    experts' gradients and Adam moments, and copies of those the file holds quantized),
    "work_file_bytes" (the working copy), "seconds",
    "peak_rss_mb" (the process's peak resident memory so far), "accounted_bytes" (what the
    runtime accounts for: the served weight file, the working copy and the learning
    state)}. `interrupt` (`backends.Interrupt`), set from another thread, stops the slice's
    working copy: `backends.Interrupted` is raised, nothing committed or recorded.
    `policy`, the driver's rule for when growth may run (charging, screen off: the app's
    to know), is a callable -> None (go on) or why not (a short text); it is asked before
    the slice plans and before every PC step: a "why not" ends the slice with "policy:
    <why>" as its reason and <why> as "policy", nothing committed or recorded (the next
    slice may try again)."""
    report = _slice(rt, seconds, domain, limits or Limits(), progress, reclaim, interrupt,
                    policy or (lambda: None))
    tried = (report["committed"] or report["guard"] or report["steps"] or report.get("full")
             or report.get("inseparable"))
    if tried and not report.get("policy"):  # a policy stop is not the domain's doing
        errormap.Store(rt.bundle.path).outcome(report["domain"], report["committed"])
    report["peak_rss_mb"] = backends.peak_rss_mb()
    report["accounted_bytes"] = (rt.weights.stat().st_size + report.get("work_file_bytes", 0)
                                 + report.get("bytes", 0))
    return report


def _slice(rt, seconds: float, domain: str | None, limits: Limits, progress,
           reclaim, interrupt, policy) -> dict[str, Any]:
    start = time.monotonic()
    deadline = start + min(seconds, limits.seconds)
    say = progress or (lambda _m: None)
    b = rt.bundle
    programs = set(b.programs(rt.backend))
    if not programs & {"sweep", "deepen0"} or not b.manifest["experts"]["layout"]:
        raise GrowthError(f"{b.path}: this {b.manifest['bits']}-bit bundle cannot grow: it has "
                          "no deepening programs or no spare slots; export it with --deepen "
                          "(the default at 32 bits)")
    if not b.manifest.get("calibration") or "guard" not in b.manifest["calibration"]:
        raise GrowthError(f"{b.path}: no calibration baseline (export with --calibration) "
                          "and so no verdicts and no guard text")
    if "domains" not in b.manifest["experts"]:
        raise GrowthError(f"{b.path}: exported before the domain gate (no class table): "
                          "export it again to grow")
    if not b.manifest["experts"]["domains"]:
        raise GrowthError(f"{b.path}: no spare expert slots (exported with --spare 0): "
                          "nothing to grow into")
    if not {"sweep", "adam"} <= programs:
        raise GrowthError(f"{b.path}: exported before the one-sweep deepening and the Adam "
                          "program (2026-12-02): export it again to grow")
    if limits.strict and "strict0" not in programs:
        raise GrowthError(f"{b.path}: no strict PC programs (export with --strict-steps N)")
    report: dict[str, Any] = {"domain": domain, "verdict": None, "plan": [], "skipped": [],
                              "tokens": 0, "steps": 0, "energy": [], "update_norm": [],
                              "guard": None, "committed": False,
                              "version": b.manifest["weights"]["version"], "reason": None}
    if why := policy():
        report["policy"], report["reason"] = why, f"policy: {why}"
        return report
    store = errormap.Store(b.path)
    seen = store.read()
    k = b.config["num_experts_per_tok"]
    judged = verdicts.judge(seen, b.manifest["calibration"], limits.experts or k)
    growing = {d: v for d, v in judged.items() if v["verdict"] != "nothing"}
    placed: dict[str, tuple] = {}  # per domain, judged once (`choose` asks for several)

    def place(d: str) -> tuple[Limits, dict | None]:
        if d not in placed:
            placed[d] = placement(rt, d, limits, store)
        return placed[d]
    if domain is None:
        domain = choose(rt, growing, verdicts.ranked(judged), seen, limits,
                        lambda d: place(d)[0])
    report["domain"] = domain
    if domain is None or domain not in growing:
        report["reason"] = ("nothing to grow: no observed domain needs it, or those that do "
                            "are compressed (converged) or wait for new text after a refused "
                            "slice" if domain is None
                            else f"domain {domain!r}: verdict "
                                 f"{judged.get(domain, {}).get('verdict', 'not observed')}")
        return report
    report["verdict"] = growing[domain]["verdict"]
    limits, report["placement"] = place(domain)
    limits = schedule(limits, b.manifest["bits"] != 32)  # its step size, windows a step
    report["schedule"] = {"lr": limits.lr, "batch": limits.batch}
    try:
        steps, report["skipped"] = plan(rt, growing[domain], domain, seen, limits)
        done = compressed(b, domain)  # skipped, but wanting no slot
        short = sorted({lay for lay, e in report["skipped"] if (lay, e) not in done})
    except NoSlotError as e:
        if reclaim is None:
            raise
        steps, short = [], e.layers
    if short and reclaim is not None:
        # named experts found no free slot: other domains' clones leave theirs first
        report["reclaimed"] = reclaim(domain, short)
        b, seen = rt.bundle, store.read()  # new versions; statistics moved with the clones
        try:
            steps, report["skipped"] = plan(rt, growing[domain], domain, seen, limits)
        except NoSlotError as e:  # full after compressing and retiring what the guard let go
            report["reason"] = (f"{e}; the budget is full: compressing and retiring freed "
                                "no slot there (\"reclaimed\" says what each tried)")
            report["full"] = True  # the domain waits for new text, as after a refusal
            return report
    steps, deferred = learning(b, steps)
    if deferred:  # the budget's learning bytes hold fewer experts than the plan named
        report["deferred"] = [[s["layer"], s["parent"]] for s in deferred]
    report["plan"] = steps
    train, held = guard.split(store.replay(domain), b.context)
    if not steps or not held or not train:
        report["reason"] = "not enough replay text of the domain (observe more of it)"
        return report
    cut = np.cumsum([len(w) - 1 for w in train])
    train = train[:max(1, int(np.searchsorted(cut, limits.tokens)) + 1)]
    base_router = base_replay(b)
    base_guard = guard.base_windows(rt)
    changed = {(s["layer"], s["slot"]) for s in steps}
    say(f"{domain}: {report['verdict']}; " + ", ".join(
        f"{s['how']} L{s['layer']} e{s['parent']}" for s in steps) + "".join(
        f"; no free slot for L{layer} e{parent}" for layer, parent in report["skipped"]))
    # the serving programs' sessions go for the slice, their memory with them (the working
    # copy has its own), but the keyboard's; they load again after it (`Runtime.idle`)
    release = getattr(rt.engine, "release", None)  # the torch reference has none
    report["released"] = release(KEYBOARD) if release else []
    # an expert changed in place serves every domain: the other grown domains' held-out
    # replay (their clones', and what they deepened in place) is guarded too (clones sit
    # behind their own domain's gate)
    others = {}
    if limits.place == "inplace" or any(s["how"] == "inplace" for s in steps):
        grown = {d for r in b.manifest["experts"]["table"] for d in r.get("deepened", [])
                 + ([r["domain"]] if r.get("kind") == "spawned" else [])} - {domain}
        split = {d: guard.split(store.replay(d), b.context) for d in sorted(grown)}
        others = {d: held for d, (_, held) in split.items()}
        mine = len(train)
        train = guard.rehearsed(train, [split[d][0] for d in split], REHEARSE)
        report["rehearsed"] = len(train) - mine  # windows of the others' replay
    work = Work(rt, interrupt)  # the interrupt stops its runs: nothing gets committed

    def measure_others() -> dict:
        return {d: guard.measure(work.rt, w, changed) for d, w in others.items()}
    try:
        before = {"domain": guard.measure(work.rt, held, changed),
                  "base": guard.base(rt, work.rt, base_guard, changed),
                  "others": measure_others()}
        report["reason"] = _grow(work, steps, train, base_router, limits, k, deadline,
                                 report, say, domain, policy)
        if report["reason"] is None:
            after = {"domain": guard.measure(work.rt, held, changed),
                     "base": guard.after(rt, work, base_guard, changed, before["base"]),
                     "others": measure_others()}
            report["guard"] = g = guard.verdict(before, after)
            if not g["passed"]:
                worst = max(g["others_rise"].items(), key=lambda x: x[1], default=None)
                report["reason"] = (f"guard: domain perplexity gain {g['domain_gain']:.2%}, "
                                    f"base rise {g['base_rise']:.2%}"
                                    + (f", {worst[0]} rise {worst[1]:.2%}" if worst else "")
                                    + f" (bound {g['bound']:.1%}); nothing committed")
            else:
                _commit(rt, work, steps, domain, report)
                guard.remember(rt, after["base"])  # the new version's, for the next slice
    finally:
        work.close()
    report["seconds"] = time.monotonic() - start
    return report


def _grow(work: Work, steps: list[dict], train: list[np.ndarray], base: list[np.ndarray],
          limits: Limits, k: int, deadline: float, report: dict, say,
          domain: str, policy) -> str | None:
    """Spawn, train the router rows, then PC steps; returns why it stopped early, or None."""
    if any(s["how"] == "spawn" for s in steps):
        if any(s.get("open") for s in steps):  # in place on a frozen bundle: no gate
            cls, threshold = 0, gate.OPEN
        else:
            cls = _domain_class(work, domain, train, base)
            threshold = _threshold(work, base, cls)
        report["class"], report["threshold"] = cls, threshold
        if threshold > gate.SEPARABLE:
            report["inseparable"] = True  # recorded as refused: wait for new text
            return (f"the domain gate cannot tell {domain!r} from base text (its threshold "
                    f"on the base text: {threshold:.1f} nats, over {gate.SEPARABLE:.1f}): "
                    "nothing spawned, nothing committed")
        for s in steps:
            if s["how"] == "spawn":
                work.set_expert(s["layer"], s["slot"], work.rt.expert(s["layer"], s["parent"]))
                work.router(s["layer"])[s["slot"]] = work.router(s["layer"])[s["parent"]]
                work.rt.slots[s["layer"], :, s["slot"]] = (BIAS, 1.0, threshold, cls)
                parent = work.rt.slots[s["layer"], :, s["parent"]]
                if not parent.any() or parent[2] <= gate.OPEN:  # the first clone of that
                    # expert (or of a clone open everywhere) replaces it where its gate
                    # opens (`gate.parent_row`)
                    work.rt.slots[s["layer"], :, s["parent"]] = gate.parent_row(threshold, cls)
                    s["replaces"] = True
    work.reload()
    if any(s["how"] == "spawn" for s in steps) and limits.router_steps:
        say("training the new router rows")
        report["router"] = routers.train(work, steps, base[:8], limits, k)
    # the changed experts: views of the working copy (counted in its bytes, not copied),
    # copies where it holds them quantized
    params = {(s["layer"], s["slot"]): work.views(s["layer"], s["slot"]) for s in steps}
    copied = {key for key, ws in params.items() if ws is None}
    params |= {key: work.rt.expert(*key) for key in copied}
    moments = {key: ([np.zeros(w.shape, np.float32) for w in ws],
                     [np.zeros(w.shape, np.float32) for w in ws]) for key, ws in params.items()}
    # learning state: the gradients and Adam's two moments (and the copied experts), within
    # the budget's four copies of every changed expert (`layout.learning_bytes`)
    report["bytes"] = sum((3 + (key in copied)) * w.nbytes for key, ws in params.items()
                          for w in ws)
    report["work_file_bytes"] = work.rt.weights.stat().st_size
    layers = sorted({s["layer"] for s in steps})
    # every layer's updates from one sweep (one forward, one backward); strict PC: one
    # program per planned layer
    report["programs"] = [f"strict{lay}" for lay in layers] if limits.strict else [_sweep(
        work.rt.bundle, steps)]
    live = work.live(set(report["programs"]))
    grads = {key: [np.zeros(w.shape, np.float32) for w in ws]  # per step
             for key, ws in params.items()}
    order = [w for _ in range(limits.passes) for w in train]
    total = min(limits.steps, -(-len(order) // limits.batch))
    first, used = None, []
    for step in range(total):
        if why := policy():
            report["policy"] = why
            return f"policy: {why} (before step {step + 1}); nothing committed"
        if time.monotonic() > deadline:
            if not step:
                return "the time limit ended the slice before a step"
            break
        batch = order[step * limits.batch:(step + 1) * limits.batch]
        for g in (g for gs in grads.values() for g in gs):
            g.fill(0)
        energy, routed = 0.0, 0.0
        for w in batch:
            for layer, d in _updates(work.rt, w, layers, report["programs"]):
                for (lay, slot), g in grads.items():
                    if lay == layer and slot < d["first"]:  # never planned (`plan`)
                        raise GrowthError(f"expert ({lay}, {slot}) is frozen (quantized)")
                    if lay == layer:
                        for acc, name in zip(g, ("dwg", "dwu", "dwd"), strict=True):
                            acc += d[name][slot - d["first"]]
                energy += float(sum(d["energy"][s] for lay, s in params if lay == layer))
                routed += float(sum(d["count"][s] for lay, s in params if lay == layer))
                if limits.strict:
                    used.append(int(d["steps_used"][0]))
        tokens = sum(len(w) - 1 for w in batch)
        report["tokens"] += tokens
        if not (np.isfinite(energy) and all(np.isfinite(g).all() for gs in grads.values()
                                            for g in gs)):
            return f"step {step + 1}: NaN or inf in the update; discarded, nothing committed"
        # per token that reached a changed expert: batches differ in how many do (the gate
        # opens past GATE_MIN tokens of context; a short last window)
        mean = energy / max(routed, 1.0)
        first = mean if first is None else first
        if mean > EXPLODE * max(first, 1e-12):
            return (f"step {step + 1}: energy per routed token {mean:.3g} exploded (first "
                    f"step {first:.3g}); discarded, nothing committed")
        report["energy"].append(energy / max(tokens, 1))
        report["update_norm"].append(float(np.sqrt(sum(
            float((g * g).sum()) for gs in grads.values() for g in gs))) / max(tokens, 1))
        t = step + 1
        hyper = np.array([limits.lr, 1 / (1 - BETAS[0] ** t), 1 / (1 - BETAS[1] ** t),
                          1 / max(tokens, 1), EPS], np.float32)
        for key, ws in params.items():
            out = work.rt.adam(ws, grads[key], *moments[key], hyper)
            moments[key] = out[3:6], out[6:]
            if not all(np.isfinite(w).all() for w in out[:3]):
                return f"step {t}: NaN or inf in the new weights; discarded, nothing committed"
            work.set_expert(*key, out[:3])
            if key in copied:
                params[key] = out[:3]
        if not live:
            work.reload()
        report["steps"] = t
        say(f"PC steps: energy/token {report['energy'][-1]:.4g} ({t}/{total})")
    if used:
        report["strict_steps_used"] = np.bincount(used).tolist()
    if live:  # the serving programs the guard runs hold prepacked copies: load them again
        work.reload()
    return None


def _sweep(b, steps: list[dict]) -> str:
    """The sweep a plan needs: `sweep_spare` (the spare slots' gradients alone; fp32
    bundles exported since 2026-12-05) when it trains clones only, else `sweep`."""
    live = b.config.get("num_local_experts") or b.config["num_experts"]  # the base experts
    spare = "sweep_spare" in b.manifest["programs"] and all(s["slot"] >= live for s in steps)
    return "sweep_spare" if spare else "sweep"


def _updates(rt, window: np.ndarray, layers: list[int], programs: list[str]):
    """(layer, that layer's deepening outputs) for each of `layers` on one window: from one
    sweep of every layer (`programs`: [`_sweep`'s]), or (strict PC) from each layer's own
    program."""
    if programs[0].startswith("strict"):
        for layer in layers:
            yield layer, rt.deepen(layer, window, True)
    else:
        d = rt.sweep(window, programs[0])
        for layer in layers:
            yield layer, {k: d[k][layer] for k in ("dwg", "dwu", "dwd", "count", "energy")
                          } | {"first": d["first"]}


def _commit(rt, work: Work, steps: list[dict], domain: str, report: dict) -> None:
    b = rt.bundle
    changes = {(s["layer"], s["slot"]): work.rt.expert(s["layer"], s["slot"]) for s in steps}
    router_rows, rows = {}, {}
    table_rows = {(r["layer"], r["slot"]): r for r in b.manifest["experts"]["table"]}
    for s in steps:
        if s["how"] == "inplace":  # who changed a base expert: guarded as a grown domain
            key = (s["layer"], s["slot"])
            rows[key] = {"deepened": sorted(set(table_rows[key].get("deepened", []))
                                            | {domain})}
        if s["how"] == "spawn":
            key = (s["layer"], s["slot"])
            router_rows[key] = np.array(work.router(s["layer"])[s["slot"]])
            bias, _, threshold, cls = work.rt.slots[s["layer"], :, s["slot"]]
            rows[key] = {"kind": "spawned", "parent": s["parent"], "domain": domain,
                         "bias": float(bias), "threshold": float(threshold),
                         "class": int(cls), "replaces": bool(s.get("replaces"))}
    summary = {k: v for k, v in report.items() if k not in ("guard", "energy", "update_norm")}
    summary |= {"committed": True, "energy": report["energy"][-1:],
                "guard": {k: report["guard"][k] for k in ("domain_gain", "base_rise")}}
    table = (experts.domains(b, work.rt.backend, work.buf)
             if any(s["how"] == "spawn" for s in steps) else None)
    new = versions.commit(b, changes, router_rows, rows, summary, table)
    rt.reload(new)
    report["committed"], report["version"] = True, new.manifest["weights"]["version"]
