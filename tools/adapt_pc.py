"""The predictive-coding methods of `moegrow bench adapt` and bench sequence's pc, on the
device runtime alone: `python -m moegrow.tools.adapt_pc WORKDIR` (`tools/child.py`) imports
numpy and the runtime, never torch, so a method's peak RSS is what the device would hold.

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
The curve has the start and the end only (a slice commits once). The parent adds the
FLOPs (`adapt.pc_flops`) from the tokens trained, the plan and "sweeps".

`sequence` is bench sequence's pc (`tools/sequence.py`): the domains in turn.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from moegrow import runtime
from moegrow.runtime.growth import GrowthError
from moegrow.tools import child

MODES = {"pc": {}, "pc-strict": {"strict": True}, "pc-inplace": {"place": "inplace"}}


def perplexity(rt, ids: np.ndarray) -> float:
    """Per-token perplexity of ids[1:] through the bundle's score program."""
    nll, n = 0.0, 0
    for chunk, new in rt.windows(ids):
        nll += float(rt.run("score", chunk[None])[0][new].astype(np.float64).sum())
        n += new.stop - new.start
    return math.exp(nll / n)


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


def _open(job: dict, workdir: Path):
    path = workdir / "bundle"
    shutil.copytree(job["bundle"], path, ignore=shutil.ignore_patterns("state"))
    return runtime.open(path, "onnxruntime", job["threads"])


def run(job: dict, workdir: Path, progress) -> dict:
    """The child contract of `tools/adapt.py` for one PC method."""
    method, evals = job["method"], child.eval_ids(workdir)
    rt = _open(job, workdir)
    before = {k: perplexity(rt, ids) if ids is not None else None for k, ids in evals.items()}
    r, wall, observe_s = grow(rt, np.load(workdir / "train.npy"), "user", job["passes"],
                              progress, **MODES[method])
    after = {k: perplexity(rt, ids) if ids is not None else None for k, ids in evals.items()}
    return {"ppl": {k: [before[k], after[k]] if before[k] else None for k in evals},
            "curve": [[0, before["heldout"]], [r["tokens"], after["heldout"]]],
            "wall_s": wall, "observe_s": observe_s, "accounted_bytes": r.get("bytes"),
            "work_file_bytes": r.get("work_file_bytes"), "tokens": r["tokens"],
            # a strict program computes every unrolled step (halting is a mask): steps + 1
            # evaluations of F and its gradient over the span, then dF/dW
            "sweeps": rt.bundle.manifest["deepening"]["strict_steps"] + 2,
            "plan": r["plan"], "committed": r["committed"],
            "reason": r["reason"], "guard": r["guard"] and {
                k: r["guard"][k] for k in ("domain_gain", "base_rise", "passed")},
            "reach": r["guard"] and {k: r["guard"]["after"][k]["reach"]
                                     for k in ("domain", "base")},
            "steps": r["steps"], "strict_steps_used": r.get("strict_steps_used"),
            "threshold": r.get("threshold")}


def sequence(job: dict, workdir: Path, say) -> dict:
    """bench sequence's pc: a copy of the bundle grows on each domain in turn (one slice
    each); after each stage every domain seen so far and the base are scored."""
    k = range(len(job["domains"]))
    heldout = [np.load(workdir / f"heldout-{i}.npy") for i in k]
    train = [np.load(workdir / f"train-{i}.npy") for i in k]
    old = np.load(workdir / "old.npy")
    rt = _open(job, workdir)
    names = job["domains"]
    stages = [{"after": None, "ppl": {n: perplexity(rt, h)
                                      for n, h in zip(names, heldout, strict=True)},
               "base": perplexity(rt, old)}]
    for i, name in enumerate(names):
        say(f"stage {i + 1}/{len(names)}: {name}")
        try:
            r, wall, observe_s = grow(rt, train[i], name, job["passes"], say)
        except GrowthError as e:  # this domain cannot grow (e.g. no free slot): go on
            say(str(e))
            r, wall, observe_s = {"committed": False, "reason": str(e), "verdict": None,
                                  "plan": [], "skipped": []}, 0.0, None
        stages.append({
            "after": name, "wall_s": wall, "observe_s": observe_s, "committed": r["committed"],
            "reason": r["reason"], "verdict": r["verdict"],
            "version": rt.bundle.manifest["weights"]["version"],
            "plan": [f"{s['how']} L{s['layer']} e{s['parent']}" for s in r["plan"]],
            "skipped": r["skipped"], "placement": r.get("placement"),
            "reclaimed": [  # other domains compressed first
                {k: c[k] for k in ("domain", "moves", "committed", "reason",
                                   "reclaimed_bytes")} | {"guard": c["guard"] and {
                    k: c["guard"][k] for k in ("domain_rise", "base_rise")}}
                for c in r.get("reclaimed", [])],
            "reach": r.get("guard") and {
                k: r["guard"]["after"][k]["reach"] for k in ("domain", "base")},
            "ppl": {n: perplexity(rt, heldout[j]) for j, n in enumerate(names[:i + 1])},
            "base": perplexity(rt, old)})
    return {"stages": stages}


def work(job: dict, workdir: Path, say) -> dict:
    """bench sequence's job (it names "domains") or bench adapt's."""
    return sequence(job, workdir, say) if "domains" in job else run(job, workdir, say)


if __name__ == "__main__":
    sys.exit(child.child(Path(sys.argv[1]), work))
