"""`moegrow bench quant`: what compressing a grown domain's clones costs, per strategy.

On a bundle with a pool (`moegrow export --pool N --pool-bits 8,4`) whose fp32 spare slots
hold one domain's clones (grown here from `--train` if asked):

  1. per clone, measured on the domain's held-out replay (the guard's windows, never the
     evaluation text): its routing mass, its relative gradient norm |dNLL/dW| / |W| (how
     far from converged: the `sweep` program), and the NLL rise when it alone is served
     at 8 and 4 bits and any other width of the pool (2) (its weights quantized and
     dequantized as the pool holds them);
  2. plans {clone: 32 | 8 | 4 | 2}: uniform int8, int4 (and int2 where the pool has it);
     the allocator (the least summed measured rise, exhaustive over the widths within the
     pool's slots) within the bytes of uniform int8, and at the bytes of half the clones at
     int8 and half at int4 ("_mid"), where it meets importance only (MC-MoE style: the most
     routed half keeps int8), converged only (the half farthest from converged keeps int8)
     and random (seeded); and the operating point: what `compress` itself chooses on the
     device (`compress.allocate`: greedy, the most bytes reclaimed with a summed predicted
     domain rise within `compress.DOMAIN_RISE`);
  3. each plan is carried out by `compress.compress` (the real pooled programs, unguarded)
     on a copy of the bundle, and the domain's held-out text and the base guard text are
     scored there against the grown bundle.

Results: report.md, results.json, quant.png in `--out`.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
from pathlib import Path

import numpy as np
from moegrow import runtime
from moegrow.device_kernels import layout
from moegrow.runtime import compress, errormap, guard


def _nll(rt, ids: np.ndarray) -> float:
    """Mean NLL of `ids` as `eval` scores it (half-overlapping windows)."""
    total, n = 0.0, 0
    for chunk, new in rt.windows(ids):
        losses = rt.run("score", chunk[None])[0][new]
        total, n = total + float(losses.astype(np.float64).sum()), n + len(losses)
    return total / max(n, 1)


def measure(rt, clones: list[tuple[int, int]], held: list, say) -> dict:
    """Per clone {"mass", "grad", "rise": {bits: NLL rise}} on the held-out replay windows
    (the rises at each of `widths`: `compress.rises`)."""
    out = {c: {"mass": 0.0, "grad": 0.0, "rise": {}} for c in clones}
    sums = {c: None for c in clones}
    tokens = 0
    for w, _ in held:
        d = rt.sweep(w)
        tokens += len(w) - 1
        for layer, slot in clones:
            out[layer, slot]["mass"] += float(d["count"][layer][slot])
            g = [d[k][layer][slot - d["first"]].astype(np.float64) for k in ("dwg", "dwu", "dwd")]
            sums[layer, slot] = g if sums[layer, slot] is None else \
                [a + b for a, b in zip(sums[layer, slot], g, strict=True)]
    for c in clones:
        w = rt.expert(*c)
        norm = np.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in w))
        out[c]["mass"] /= max(tokens, 1)
        out[c]["grad"] = float(np.sqrt(sum(float((g ** 2).sum()) for g in sums[c]))
                               / max(tokens, 1) / norm)
        say(f"L{c[0]} e{c[1]}: mass {out[c]['mass']:.3f}, grad {out[c]['grad']:.3g}")
    for c, r in compress.rises(rt, clones, held, say, widths(rt.bundle)).items():
        out[c]["rise"] = r
    return out


def widths(bundle) -> tuple[int, ...]:
    """The widths measured and planned, widest first: int8 and int4 (the strategies' own
    two) and any other width of the bundle's pool (int2)."""
    return tuple(sorted({8, 4, *bundle.config.get("pool_bits", [])}, reverse=True))


def plans(stats: dict, config: dict, capacity: dict, seed: int = 0) -> dict[str, dict]:
    """{strategy: {clone: bits}} (see the module docstring), and "operating": the
    allocator's most reclaiming plan within the domain bound."""
    pool = tuple(sorted({8, 4, *(b for _, b in capacity)}, reverse=True))
    size = {b: layout.expert_bytes(config, b) for b in (32, *pool)}
    clones = sorted(stats)
    target = len(clones) * size[8]

    def fits(plan: dict) -> bool:
        for layer, width in {(c[0], b) for c, b in plan.items() if b != 32}:
            used = sum(1 for c, b in plan.items() if c[0] == layer and b == width)
            if used > capacity.get((layer, width), 0):
                return False
        return True

    def nbytes(plan: dict) -> int:
        return sum(size[b] for b in plan.values())

    def rise(plan: dict) -> float:
        return sum(stats[c]["rise"][b] for c, b in plan.items() if b != 32)

    every = [dict(zip(clones, p, strict=True)) for p in itertools.product((32, *pool),
                                                                         repeat=len(clones))]
    every = [p for p in every if fits(p)]

    def best(limit: float) -> dict:
        return min((p for p in every if nbytes(p) <= limit), key=lambda p: (rise(p), nbytes(p)))

    def half(order: list) -> dict:  # the first half of `order` at int8, the rest at int4
        return {c: 8 if i < len(clones) // 2 else 4 for i, c in enumerate(order)}
    mid = nbytes(half(clones))
    rng = random.Random(seed)
    out = {f"uniform{b}": dict.fromkeys(clones, b) for b in pool}
    out |= {"allocator": best(target), "allocator_mid": best(mid),
           "importance_mid": half(sorted(clones, key=lambda c: -stats[c]["mass"])),
           "converged_mid": half(sorted(clones, key=lambda c: -stats[c]["grad"])),
           "random_mid": half(rng.sample(clones, len(clones)))}
    chosen = compress.allocate({c: stats[c]["rise"] for c in clones}, config, capacity,
                               float(np.log1p(compress.DOMAIN_RISE)))
    out["operating"] = {c: chosen.get(c, 32) for c in clones}  # what `compress` chooses
    return out


def bench_quant(bundle_dir: str, out: Path, text: Path | None, train: Path | None = None,
                domain: str | None = None, tokens: int = 20000, backend: str = "onnxruntime",
                seed: int = 0, progress=None) -> dict:
    say = progress or (lambda _m: None)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(bundle_dir)
    if train is not None:  # grow the domain here first, on a copy
        grown = out / "grown"
        shutil.rmtree(grown, ignore_errors=True)
        shutil.copytree(src, grown)
        rt = runtime.open(grown, backend)
        rt.observe(train.read_text(encoding="utf-8"), domain or "domain")
        r = rt.idle(600, domain or "domain", progress=say)
        if not r["committed"]:
            raise compress.CompressError(f"the growth slice committed nothing: {r['reason']}")
        src = grown
    rt = runtime.open(src, backend)
    b = rt.bundle
    rows = [r for r in b.manifest["experts"]["table"] if r.get("kind") == "spawned"
            and r.get("bits", 32) == 32 and domain in (None, r.get("domain"))]
    if not rows or not b.config.get("pool_experts"):
        raise compress.CompressError(f"{src}: no fp32 clones to compress, or no pool (export "
                                     "with --pool N --pool-bits 8,4 and grow a domain first)")
    pool = widths(b)
    domain = rows[0]["domain"]
    clones = [(r["layer"], r["slot"]) for r in rows if r["domain"] == domain]
    capacity = compress.capacity(b)
    _, held = guard.split(errormap.Store(b.path).replay(domain), b.context)
    if text is not None:
        ids = np.array([1] + rt.sp.encode(text.read_text(encoding="utf-8"))[:tokens], np.int64)
    else:  # the held-out replay (the allocator's own data: an independent text is better)
        ids = np.concatenate([held[0][0]] + [w[1:] for w, _ in held[1:]])[:tokens + 1]
    guard_ids = np.fromfile(b.path / b.manifest["calibration"]["guard"]["file"], np.int32)
    base_ids = guard_ids[len(guard_ids) // 2:].astype(np.int64)
    say(f"{domain}: {len(clones)} clones; measuring each on {len(held)} held-out replay windows")
    stats = measure(rt, clones, held, say)
    chosen = plans(stats, b.config, capacity, seed)
    grown_nll = {"domain": _nll(rt, ids), "base": _nll(rt, base_ids)}
    added = len(clones) * layout.expert_bytes(b.config, 32)
    results, violations = {}, 0
    for name, plan in chosen.items():
        copy = out / f"work-{name}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(src, copy)
        try:
            work = runtime.open(copy, backend)
            moved = {c: w for c, w in plan.items() if w != 32}
            c = compress.compress(work, domain, bits=moved, guarded=False) if moved else \
                {"reclaimed_bytes": 0}
            used = compress.budget(work.bundle)
            violations += used["used_bytes"] > used["budget_bytes"] - (
                used["learning_bytes"] or 0)  # the expert slots' part of the budget
            nll = {"domain": _nll(work, ids), "base": _nll(work, base_ids)}
        finally:
            shutil.rmtree(copy, ignore_errors=True)
        results[name] = {
            "plan": {f"{k[0]}/{k[1]}": w for k, w in plan.items()},
            "reclaimed_fraction": c["reclaimed_bytes"] / added,
            "domain_ppl_rise": float(np.expm1(nll["domain"] - grown_nll["domain"])),
            "base_ppl_rise": float(np.expm1(nll["base"] - grown_nll["base"])),
            "predicted_domain_rise": float(np.expm1(sum(
                stats[k]["rise"][w] for k, w in plan.items() if w != 32)))}
        say(f"{name}: reclaimed {results[name]['reclaimed_fraction']:.1%}, domain ppl "
            f"{results[name]['domain_ppl_rise']:+.3%}, base {results[name]['base_ppl_rise']:+.3%}")
    op = results["operating"]
    summary = {"reclaimed_fraction": op["reclaimed_fraction"],
               "domain_ppl_rise": op["domain_ppl_rise"], "base_ppl_rise": op["base_ppl_rise"],
               "allocator_vs_uniform": float(np.exp(
                   np.log1p(results["allocator"]["domain_ppl_rise"])
                   - np.log1p(results["uniform8"]["domain_ppl_rise"]))),
               "allocator_mid_vs": {k: float(np.exp(
                   np.log1p(results["allocator_mid"]["domain_ppl_rise"])
                   - np.log1p(results[k]["domain_ppl_rise"])))
                   for k in ("importance_mid", "converged_mid", "random_mid")},
               "budget_violations": int(violations), "domain": domain, "widths": pool,
               "clones": {f"{k[0]}/{k[1]}": v for k, v in stats.items()},
               "strategies": results, "bytes_added": added, "tokens": len(ids) - 1,
               "text": str(text) if text is not None else "held-out replay"}
    grads = [stats[k]["grad"] for k in clones]
    rises = [stats[k]["rise"][4] / max(stats[k]["mass"], 1e-9) for k in clones]
    summary["converged_rank_correlation"] = _spearman(grads, rises)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    _report(out, summary)
    return summary


def _spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    ra, rb = (np.argsort(np.argsort(x)).astype(float) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _report(out: Path, s: dict) -> None:
    lines = [f"# bench quant: {s['domain']}", "",
             f"{len(s['clones'])} clones, {s['bytes_added'] / 1e6:.3f} MB added by growth; "
             f"domain text scored: {s['text']}, {s['tokens']} tokens.", "",
             "| strategy | plan | reclaimed | domain ppl | base ppl | predicted |",
             "|---|---|---|---|---|---|"]
    for name, r in s["strategies"].items():
        plan = " ".join(f"{k}:{v}" for k, v in r["plan"].items())
        lines.append(f"| {name} | {plan} | {r['reclaimed_fraction']:.1%} | "
                     f"{r['domain_ppl_rise']:+.3%} | {r['base_ppl_rise']:+.3%} | "
                     f"{r['predicted_domain_rise']:+.3%} |")
    lines += ["", "| clone | routing mass | rel. gradient | " + " | ".join(
        f"NLL rise int{b}" for b in s["widths"]) + " |", "|---|---|---" + "|---" * len(
        s["widths"]) + "|"]
    for k, v in s["clones"].items():
        lines.append(f"| {k} | {v['mass']:.3f} | {v['grad']:.3g} | " + " | ".join(
            f"{v['rise'][b]:+.5f}" for b in s["widths"]) + " |")
    lines += ["", f"Spearman(relative gradient, int4 rise per routing mass): "
              f"{s['converged_rank_correlation']}"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in s["strategies"].items():
        a.scatter(r["reclaimed_fraction"], r["domain_ppl_rise"] * 100, label=name)
    a.set_xlabel("share of growth's bytes reclaimed")
    a.set_ylabel("domain perplexity rise (%)")
    a.legend()
    v = list(s["clones"].values())
    for width in s["widths"]:
        b.scatter([x["grad"] for x in v], [x["rise"][width] for x in v], label=f"int{width}")
    b.set_xlabel("relative gradient norm (far from converged ->)")
    b.set_ylabel("held-out replay NLL rise")
    b.legend()
    fig.tight_layout()
    fig.savefig(out / "quant.png", dpi=100)
