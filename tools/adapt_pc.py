"""The predictive-coding methods of `moegrow bench adapt`, on the device runtime.

pc          one growth slice (`runtime/growth.py`): the error map's verdict picks the
            layers and parents; idle experts deepen in place, used ones are cloned into spare
            slots behind the domain gate; default PC schedule (one exact sweep); guard; commit.
pc-strict   the same with the strict PC schedule (the bundle's `strict{l}` programs).
pc-inplace  the named experts deepened in place, no clones and no gate (what routing
            locality alone gives).
The runtime first observes the training tokens (the error map and replay buffer a user's
typing would have built; not counted in wall_s, reported as observe_s), then one slice runs
over them for `passes` passes on ONNX Runtime. The slice holds every HOLDOUT-th replay
sequence out for its guard, so it learns from ~80% of the tokens the torch methods see.
The curve has the start and the end only (a slice commits once).
FLOPs per trained token: pc and pc-inplace run one `sweep` (a forward and a backward over
every layer with every layer's expert weight gradients): full fine-tuning's estimate, an
upper bound (the sweep takes no attention weight gradients). pc-strict, per layer in the
plan: one feed-forward pass, then locus-bp's forward-and-backward for that layer's experts
steps + 2 times (the unrolled program computes every step).
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
from moegrow import runtime
from moegrow.export import checkpoint
from moegrow.tools import adapt

MODES = {"pc": {}, "pc-strict": {"strict": True}, "pc-inplace": {"place": "inplace"}}


def perplexity(rt, ids: np.ndarray) -> float:
    """Per-token perplexity of ids[1:] through the bundle's score program."""
    nll, n = 0.0, 0
    for chunk, new in rt.windows(ids):
        nll += float(rt.run("score", chunk[None])[0][new].astype(np.float64).sum())
        n += new.stop - new.start
    return math.exp(nll / n)


def flops_per_token(args, layer: int, experts: list[int], sweeps: int) -> float:
    """One strict program per trained token: a feed-forward pass, then `sweeps`
    forward-and-backward passes for the layer's experts (shares: a balanced router)."""
    shares = np.full((args.num_hidden_layers, args.experts),
                     args.num_experts_per_tok / args.experts)
    return adapt.flops_per_token(args, "full", None) / 3 + sweeps * adapt.flops_per_token(
        args, "locus-bp", {layer: experts}, shares)


def grow(rt, train_ids: np.ndarray, domain: str, passes: int, progress,
         **mode) -> tuple[dict, float, float]:
    """Observe the training ids under `domain` (the error map and replay buffer a user's
    typing would have built), then one slice over them -> (its report, its wall seconds,
    the observing seconds)."""
    t = time.perf_counter()
    window = rt.bundle.context
    for i in range(0, len(train_ids) - 1, window):
        rt.observe(rt.sp.decode(train_ids[i + (i == 0):i + window].tolist()), domain)
    observe_s = time.perf_counter() - t
    progress(f"observed {len(train_ids)} tokens in {observe_s:.1f} s")
    t = time.perf_counter()
    r = rt.idle(1e9, domain, progress=progress, tokens=len(train_ids), passes=passes,
                steps=10**6, **mode)
    return r, time.perf_counter() - t, observe_s


def run(method: str, job: dict, train_ids: np.ndarray, workdir: Path, progress) -> dict:
    """The child contract of `tools/adapt.py` for one PC method."""
    bundle, passes, evals = job["bundle"], job["passes"], adapt.eval_ids(workdir)
    path = workdir / "bundle"
    shutil.copytree(bundle, path, ignore=shutil.ignore_patterns("state"))
    rt = runtime.open(path, "onnxruntime", job["threads"])
    before = {k: perplexity(rt, ids) if ids is not None else None for k, ids in evals.items()}
    r, wall, observe_s = grow(rt, train_ids, "user", passes, progress, **MODES[method])
    after = {k: perplexity(rt, ids) if ids is not None else None for k, ids in evals.items()}
    layers = {}
    for s in r["plan"]:
        layers.setdefault(s["layer"], []).append(s["parent"])
    # a strict program computes every unrolled step (halting is a mask): steps + 1
    # evaluations of F and its gradient over the span, then dF/dW
    sweeps = rt.bundle.manifest["deepening"]["strict_steps"] + 2
    args = checkpoint.load(job["base"]).args
    per_token = (sum(flops_per_token(args, layer, ids, sweeps) for layer, ids in layers.items())
                 if method == "pc-strict" else adapt.flops_per_token(args, "full"))
    return {"ppl": {k: [before[k], after[k]] if before[k] else None for k in evals},
            "curve": [[0, before["heldout"]], [r["tokens"], after["heldout"]]],
            "wall_s": wall, "observe_s": observe_s, "accounted_bytes": r.get("bytes"),
            "work_file_bytes": r.get("work_file_bytes"),
            "flops": per_token * r["tokens"], "plan": r["plan"], "committed": r["committed"],
            "reason": r["reason"], "guard": r["guard"] and {
                k: r["guard"][k] for k in ("domain_gain", "base_rise", "passed")},
            "reach": r["guard"] and {k: r["guard"]["after"][k]["reach"]
                                     for k in ("domain", "base")},
            "steps": r["steps"], "strict_steps_used": r.get("strict_steps_used"),
            "threshold": r.get("threshold")}
