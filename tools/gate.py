"""`moegrow bench overhead BUNDLE --gate`: what spare slots and the domain gate cost serving.

A bundle with spare slots serves `score` in one pass while no slot is spawned, and
`score_gated` (the domain gate, and the spare slots computed) once one is
(`runtime.Runtime.program`). Against the same checkpoint exported without spare slots
(`--against`, or exported here from `--ckpt`), on the same windows, interleaved, each engine
with its own three runtimes:

    none    the bundle without slots
    empty   the bundle as exported: every spare slot empty      -> {engine: empty / none}
    clone   one spawned slot per layer (a gate that never opens:
            the clone's cost, the base's outputs)               -> "with_clone": {engine: ...}
    open    the same slots with a gate open at every position
            (a keyboard typing the grown domain's text; not
            the base's outputs)                                 -> "with_open_clone"

Goals (issue 12): empty 1.00x, with a clone <= 1.2x. The three must score alike (the spawned
gate stays shut, spare slots are masked): "max_nll_difference" says how far apart they are.
"suggest" times a keyboard's path the same way: a 32-token prefill and 16 decode steps.
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from moegrow import runtime
from moegrow.export import bundle as exporter
from moegrow.runtime import bundle as bundle_format

from .bench import _time, text_ids

CLOSED_CLONE = (0.0, 1.0, 1e9)  # router bias, gate coefficient, threshold: never opens
OPEN_CLONE = (0.0, 1.0, -1e9)  # always open


class GateError(ValueError):
    """A bundle without spare slots, or a bundle without slots that is not its peer."""


def _peer(b: bundle_format.Bundle, against: Path | None, ckpt: str, cache: Path,
          say: Callable[[str], None]) -> bundle_format.Bundle:
    """The bundle without slots to compare with: `against`, else `ckpt` exported into
    `cache` (kept there for the next run)."""
    if against is None:
        against = cache
        if not (cache / "manifest.json").exists():
            say(f"exporting {ckpt} without spare slots into {cache}")
            exporter.export(ckpt, cache, engines=tuple(b.engines()), bits=b.manifest["bits"],
                            spare=0, deepen=False, progress=say)
    peer = bundle_format.load(against)
    mine = {k: v for k, v in b.config.items() if k != "spare_experts"}
    theirs = {k: v for k, v in peer.config.items() if k != "spare_experts"}
    if peer.config.get("spare_experts", 0) or mine != theirs or \
            peer.manifest["bits"] != b.manifest["bits"]:
        raise GateError(f"{against}: not {b.path}'s model at {b.manifest['bits']} bits without "
                        "spare slots (export it with --spare 0 from the same checkpoint)")
    if not set(b.engines()) & set(peer.engines()):
        raise GateError(f"{against}: no engine in common with {b.path}")
    return peer


def _suggest(rt, prompt: list[int], steps: int = 16) -> None:
    """A keyboard's path: prefill `prompt`, then `steps` greedy decode steps."""
    logits, k, v, novelty = rt.prefill(prompt)
    for pos in range(len(prompt), len(prompt) + steps):
        logits, k, v = rt.decode(int(logits[0].argmax()), pos, k, v, novelty)


def bench_gate(bundle: str | Path, out: Path | None = None, text: str | None = None,
               ckpt: str = "default", against: Path | None = None, rounds: int = 7,
               threads: int = 1,
               progress: Callable[[str], None] | None = None) -> tuple[dict, str]:
    """Measure; write report.md and results.json into `out` when given (and keep the
    exported peer there); returns ({engine: ratio, "with_clone": {...}, ...}, report)."""
    say = progress or (lambda _m: None)
    b = bundle_format.load(bundle)
    spare = b.config.get("spare_experts", 0)
    if not spare:
        raise GateError(f"{bundle}: the bundle has no spare slots (no gate to measure)")
    tmp = None if out is not None else Path(tempfile.mkdtemp(prefix="moegrow-gate-"))
    try:
        peer = _peer(b, against, ckpt, (out or tmp) / "no-slots", say)
        engines = [e for e in b.engines() if e in peer.engines()]
        rts = {}
        for e in engines:
            full = runtime.Runtime(b, e, threads)
            rts |= {(e, "none"): runtime.Runtime(peer, e, threads), (e, "empty"): full}
            for which, row in (("clone", CLOSED_CLONE), ("open", OPEN_CLONE)):
                clone = copy.copy(full)  # the same engine, another slot state
                clone.slots = full.slots.copy()
                clone.slots[:, :len(row), -spare] = row  # class 0: the base
                rts[e, which] = clone
        first = rts[engines[0], "empty"]
        ids = text_ids(first, text)
        windows = [chunk[None] for chunk, _ in first.windows(ids)]
        nll = {k: np.concatenate([rt.run("score", w)[0] for w in windows])
               for k, rt in rts.items()}  # also loads every program before the rounds
        diff = max(float(np.abs(nll[e, which] - nll[e, "none"]).max())
                   for e in engines for which in ("empty", "clone"))
        prompt = [int(i) for i in ids[:32]]
        for rt in rts.values():
            _suggest(rt, prompt)  # loads prefill and decode before the rounds
        times: dict[tuple[str, str], list[float]] = {k: [] for k in rts}
        typing: dict[tuple[str, str], list[float]] = {k: [] for k in rts}
        for r in range(rounds):
            say(f"round {r + 1}/{rounds}")
            for k, rt in rts.items():
                times[k].append(_time(lambda rt=rt: [rt.run("score", w) for w in windows]))
                typing[k].append(_time(lambda rt=rt: _suggest(rt, prompt)))
        med = {k: statistics.median(v) for k, v in times.items()}
        keys = {k: statistics.median(v) for k, v in typing.items()}
        result = {e: med[e, "empty"] / med[e, "none"] for e in engines}
        result |= {"with_clone": {e: med[e, "clone"] / med[e, "none"] for e in engines},
                   "with_open_clone": {e: med[e, "open"] / med[e, "none"] for e in engines},
                   "suggest": {e: {w: keys[e, w] / keys[e, "none"]
                                   for w in ("empty", "clone", "open")} for e in engines},
                   "seconds": {f"{e}/{w}": t for (e, w), t in med.items()},
                   "suggest_seconds": {f"{e}/{w}": t for (e, w), t in keys.items()},
                   "programs": {f"{e}/{w}": rt.form("score", windows[0][0])
                                for (e, w), rt in rts.items()},
                   "max_nll_difference": diff, "tokens": len(ids) - 1,
                   "windows": len(windows), "rounds": rounds, "threads": threads,
                   "spare_experts": spare}
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    lines = [f"# moegrow bench overhead --gate: {bundle}", "",
             f"`score` on {len(ids) - 1} tokens in {len(windows)} windows, {threads} thread(s), "
             f"medians of {rounds} interleaved rounds, against the same model without spare "
             f"slots. Goals: empty spare slots 1.00x, with a clone (gate shut) <= 1.2x. Empty "
             f"and shut score as the bundle without slots within {diff:.2g} nats; the open "
             "clone (every gate open) is the cost of typing the grown domain.", "",
             "| engine | program | no slots s | empty s | empty / none | clone s | "
             "clone / none | open clone s | open / none |", "|" + "---|" * 9]
    for e in engines:
        for what, t in (("score", med), ("suggest", keys)):
            lines.append(f"| {e} | {what} | {t[e, 'none']:.4f} | " + " | ".join(
                f"{t[e, w]:.4f} | {t[e, w] / t[e, 'none']:.3f}x"
                for w in ("empty", "clone", "open")) + " |")
    report = "\n".join(lines) + "\n"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "report.md").write_text(report)
    return result, report
