"""The benchmarks' child processes: one method per fresh interpreter.

`spawn(workdir, progress, module)` runs `python -m module WORKDIR`; that module's
`child(workdir, work)` reads WORKDIR/job.json, calls `work(job, workdir, say)` (its stderr
lines reach the parent's `progress`) and writes result.json: what `work` returned plus
"peak_rss_mb" (the process's own peak, `backends.peak_rss_mb`: not `ru_maxrss`, which
carries the parent's memory across exec) and "torch_loaded" (whether torch was imported),
or {"error": message} when it raised. Each method's peak RSS is its own, and a method
that runs on the device runtime alone (`tools/adapt_pc.py`: pc) never loads torch, so its
memory is the device's, not a desktop's. This module imports no torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from moegrow.runtime import backends

Progress = Callable[[str], None]


def eval_ids(workdir: Path) -> dict[str, np.ndarray | None]:
    """The eval ids a `bench adapt` child scores: heldout, old, other (None without
    --other)."""
    return {k: np.load(workdir / f"{k}.npy") if (workdir / f"{k}.npy").exists() else None
            for k in ("heldout", "old", "other")}


def child(workdir: Path, work: Callable[[dict, Path, Progress], dict]) -> int:
    """One method in this process (see the module docstring); exit status 1 on an error."""
    job = json.loads((workdir / "job.json").read_text())
    method = job["method"]

    def say(message: str) -> None:
        print(f"{method}: {message}", file=sys.stderr, flush=True)

    try:
        result = work(job, workdir, say)
    except Exception as e:  # reported in the results; the other methods still run
        result = {"error": f"{type(e).__name__}: {e}"}
        say(result["error"])
    result["peak_rss_mb"] = backends.peak_rss_mb()
    result["torch_loaded"] = "torch" in sys.modules
    (workdir / "result.json").write_text(json.dumps(result))
    return 1 if "error" in result else 0


def spawn(workdir: Path, progress: Progress, module: str) -> dict:
    """Run `module`'s child on `workdir` in a fresh interpreter (`python -m module WORKDIR`,
    result.json out), passing its output lines to `progress`."""
    cmd = [sys.executable, "-m", module, str(workdir)]
    last = ""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        for line in filter(str.strip, p.stdout):
            last = line.rstrip()
            progress(last)
    file = workdir / "result.json"
    if file.exists():
        return json.loads(file.read_text())
    return {"error": f"child exited with {p.returncode}: {last}"}
