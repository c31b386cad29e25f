"""`moegrow bench soak`: many observe/idle cycles on a copy of a bundle in its fixed budget.

Each cycle observes the next chunk of one domain's text (the domains take turns, `switch`
cycles each) and runs one growth slice with small limits (`Runtime.idle`: deepen, spawn,
and in a bundle with a pool the reclaim that compresses other domains' clones and retires
what stopped earning its bytes). After every cycle it records the process's resident memory
(VmRSS), the bundle's bytes on disk (all of it, and its `state/` folder), open file
descriptors and threads, and checks the budget: the experts' bytes (`compress.budget`)
within its expert part, the slice's learning state (the changed experts' weights,
gradients and Adam moments, the report's "bytes") within its "learning" part and both
within `--budget-mb`, and every engine's weight file the size it had at the start (the
pools are fixed at export: a file that grew would be growth past the budget).

The RSS slope (kB per cycle) is a least-squares fit over the cycles after the first tenth
(the warm-up: engine sessions, SQLite's cache, the allocator's arenas).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from moegrow import runtime
from moegrow.runtime import bundle as bundle_format
from moegrow.runtime import compress
from moegrow.tools.console import work_copy


class SoakError(ValueError):
    """Bad options or texts for the soak."""


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_soak(bundle_dir: str | Path, cycles: int, texts: dict[str, str],
               out: Path | None = None, backend: str = "onnxruntime", chunk: int = 2000,
               switch: int = 5, seconds: float = 60.0, tokens: int = 4096, steps: int = 8,
               progress=None) -> dict[str, Any]:
    """Run `cycles` cycles on a copy of the bundle (in `out`/bundle, kept; else a temporary
    folder, removed) and return {"cycles", "rss_slope_kb_per_cycle", "budget_violations",
    "state_bytes_max", "disk_bytes_max", "rss_mb" {first, max, last}, "fds" {start, end},
    "threads" {start, end}, "commits", "refused", "compressions", "retirements", "full"
    (slices that found the budget full), "versions_kept", "seconds", "series" (per cycle: rss_kb,
    disk_bytes, state_bytes, fds, threads, used_bytes, what)}; with `out`, results.json and
    report.md there too."""
    if cycles < 1 or switch < 1 or chunk < 100:
        raise SoakError("cycles and switch must be at least 1, chunk at least 100 characters")
    if not texts:
        raise SoakError("no domain text to observe (give --domain TAG=FILE)")
    src = bundle_format.load(bundle_dir)  # a clear error for a bad bundle before copying
    if not src.config.get("spare_experts"):
        raise SoakError(f"{src.path}: no spare slots: nothing to grow in a soak")
    say = progress or (lambda _m: None)
    with work_copy(src.path, out, "moegrow-soak-") as root:
        result = _run(root / "bundle", cycles, texts, backend, chunk, switch, seconds, tokens,
                      steps, say)
    if out is not None:
        (root / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (root / "report.md").write_text(report(result))
    return result


def _run(path: Path, cycles: int, texts: dict[str, str], backend: str, chunk: int,
         switch: int, seconds: float, tokens: int, steps: int, say) -> dict[str, Any]:
    from tqdm import tqdm

    rt = runtime.open(path, backend)
    sizes = {e: rt.bundle.weights(e).stat().st_size for e in rt.bundle.engines()}
    budget = rt.bundle.manifest["budget"]["bytes"]
    learning = rt.bundle.manifest["budget"].get("learning", budget)
    experts = budget - rt.bundle.manifest["budget"].get("learning", 0)
    where = dict.fromkeys(texts, 0)
    series: list[dict] = []
    counts = {"commits": 0, "refused": 0, "compressions": 0, "retirements": 0, "full": 0}
    violations = 0
    start = time.monotonic()
    fds0, threads0 = len(os.listdir("/proc/self/fd")), _native_threads()
    for cycle in tqdm(range(cycles), desc="soak", unit="cycle", leave=False):
        domain = list(texts)[(cycle // switch) % len(texts)]
        text = texts[domain]
        at = where[domain]
        piece = text[at:at + chunk] or text[:chunk]
        where[domain] = (at + chunk) % max(len(text) - chunk, 1)
        what = []
        if piece.strip():
            rt.observe(piece, domain)
        r = rt.idle(seconds, tokens=tokens, steps=steps)
        for c in r.get("reclaimed", []):
            kind = "retirements" if c.get("what") == "retire" else "compressions"
            counts[kind] += bool(c["committed"])
            what += [f"{c.get('what', 'compress')} {c['domain']}"] if c["committed"] else []
        counts["commits"] += bool(r["committed"])
        counts["full"] += "budget is full" in (r["reason"] or "")
        counts["refused"] += bool(r["guard"]) and not r["committed"]
        what += [f"grow {r['domain']}"] if r["committed"] else []
        b = rt.bundle
        used = compress.budget(b)["used_bytes"]
        grew = any(b.weights(e).stat().st_size != n for e, n in sizes.items())
        learned = r.get("bytes", 0)  # the slice's learning state, within the budget's part
        violations += (used > experts or grew or learned > learning
                       or used + learned > budget)
        series.append({"rss_kb": _rss_kb(), "disk_bytes": _bytes(path),
                       "state_bytes": _bytes(path / "state"),
                       "fds": len(os.listdir("/proc/self/fd")), "threads": _native_threads(),
                       "py_threads": threading.active_count(), "used_bytes": used,
                       "learning_bytes": learned,
                       "version": b.manifest["weights"]["version"], "what": what})
        if cycle % max(cycles // 20, 1) == 0:
            s = series[-1]
            say(f"cycle {cycle + 1}/{cycles}: observed {domain}; "
                f"{', '.join(what) or r['reason']}; RSS {s['rss_kb'] / 1024:.1f} MB, "
                f"disk {s['disk_bytes'] / 1e6:.1f} MB")
    rss = np.array([s["rss_kb"] for s in series], np.float64)
    tail = np.arange(len(rss))[len(rss) // 10:]
    slope = float(np.polyfit(tail, rss[tail], 1)[0]) if len(tail) > 1 else 0.0
    return {"cycles": cycles, "rss_slope_kb_per_cycle": slope, "budget_violations": violations,
            "state_bytes_max": max(s["state_bytes"] for s in series),
            "disk_bytes_max": max(s["disk_bytes"] for s in series),
            "learning_bytes_max": max(s["learning_bytes"] for s in series),
            "rss_mb": {"first": rss[0] / 1024, "max": rss.max() / 1024, "last": rss[-1] / 1024},
            "fds": {"start": fds0, "end": series[-1]["fds"]},
            "threads": {"start": threads0, "end": series[-1]["threads"]},
            **counts, "versions_kept": len(list((path / "weights").iterdir())),
            "budget_bytes": budget, "learning_budget_bytes": learning,
            "domains": list(texts),
            "seconds": time.monotonic() - start, "series": series}


def report(r: dict) -> str:
    return "\n".join([
        "# Soak: observe/idle cycles in a fixed budget", "",
        f"{r['cycles']} cycles over {', '.join(r['domains'])} in {r['seconds']:.0f} s.", "",
        "| figure | value |", "|---|---|",
        f"| budget violations | {r['budget_violations']} |",
        f"| RSS slope (after the first tenth) | {r['rss_slope_kb_per_cycle']:+.2f} kB/cycle |",
        f"| RSS first / max / last | {r['rss_mb']['first']:.1f} / {r['rss_mb']['max']:.1f} / "
        f"{r['rss_mb']['last']:.1f} MB |",
        f"| bundle on disk, max | {r['disk_bytes_max'] / 1e6:.1f} MB |",
        f"| state/ folder, max | {r['state_bytes_max'] / 1e6:.2f} MB |",
        f"| learning state of a slice, max | {r['learning_bytes_max'] / 1e6:.2f} MB (budget "
        f"keeps {r['learning_budget_bytes'] / 1e6:.2f} MB) |",
        f"| open fds start / end | {r['fds']['start']} / {r['fds']['end']} |",
        f"| threads start / end | {r['threads']['start']} / {r['threads']['end']} |",
        f"| slices committed / refused by the guard | {r['commits']} / {r['refused']} |",
        f"| compressions / retirements | {r['compressions']} / {r['retirements']} |",
        f"| slices that found the budget full | {r['full']} |", ""])
