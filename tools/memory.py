"""`moegrow bench memory`: the resident memory of a serving runtime, stage by stage.

Each engine runs in a fresh child process (`python -m moegrow.tools.memory BUNDLE ENGINE`)
so its RSS is its own: after Python and numpy, after importing the engine, after opening
the bundle, then after each program's first run (`suggest` loads prefill and decode;
`score`; `observe`'s program; the first deepening program when the bundle has one). The
goal (issue 12): RSS after `suggest` and `score` minus RSS after importing the engine, at
most 1.5x the bytes of the bundle's weight file for that engine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TEXT = ("The package provides a small library and a command line tool. It reads the "
        "configuration file, checks every entry and writes a report to standard output. ")
GOAL = 1.5


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise OSError("no VmRSS in /proc/self/status")


def child(bundle_dir: str, engine: str) -> dict:
    import numpy as np

    stages = [("python", rss_mb())]
    if engine == "executorch":
        import torch  # noqa: F401
        from executorch.runtime import Runtime  # noqa: F401
    else:
        import onnxruntime  # noqa: F401
    stages.append(("import engine", rss_mb()))
    from moegrow import runtime

    rt = runtime.open(bundle_dir, engine, threads=1)
    stages.append(("open", rss_mb()))
    rt.suggest("The configuration")
    stages.append(("suggest (prefill, decode)", rss_mb()))
    rt.score(TEXT)
    stages.append(("score", rss_mb()))
    served = stages[-1][1]
    ids = np.array([[1, *rt.sp.encode(TEXT)]], np.int64)
    rt.run("observe", ids)
    stages.append(("observe", rss_mb()))
    if "sweep" in rt.bundle.programs(engine):
        rt.sweep(ids[0])
        stages.append(("sweep", rss_mb()))
    weights = rt.bundle.weights(engine).stat().st_size
    over = served - stages[1][1]
    return {"stages": stages, "weights_mb": weights / 2**20, "serving_mb": over,
            "ratio": over * 2**20 / weights}


def bench_memory(bundle: str | Path, out: str | Path, progress=None) -> dict:
    """{engine: {"stages": [[stage, rss MB]], "weights_mb", "serving_mb", "ratio"}} plus
    "goal", and report.md / results.json in `out`."""
    from moegrow.runtime import backends
    from moegrow.runtime import bundle as bundle_format

    b = bundle_format.load(bundle)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"bundle": str(bundle), "bits": b.manifest["bits"], "goal": GOAL}
    for engine in b.engines():
        if progress:
            progress(f"{engine}: a fresh process opens and serves the bundle")
        done = subprocess.run([sys.executable, "-m", "moegrow.tools.memory", str(bundle),
                               engine], capture_output=True, text=True, check=False)
        if done.returncode:
            raise backends.BackendError(f"{engine}: the measuring process failed: "
                               f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
        result[engine] = json.loads(done.stdout.strip().splitlines()[-1])
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(report(result))
    return result


def report(r: dict) -> str:
    engines = [e for e in ("executorch", "onnxruntime") if e in r]
    lines = [f"# Serving memory: {r['bundle']} ({r['bits']}-bit)", "",
             "RSS in MB of a fresh process per engine, 1 thread, after each stage.", "",
             "| stage | " + " | ".join(engines) + " |", "|---|" + "---|" * len(engines)]
    for i, (stage, _) in enumerate(r[engines[0]]["stages"]):
        row = [f"{r[e]['stages'][i][1]:.1f}" if i < len(r[e]["stages"]) else "" for e in engines]
        lines.append(f"| {stage} | " + " | ".join(row) + " |")
    lines += ["", "| engine | weight file MB | serving MB (score - import) | ratio | goal |",
              "|---|---|---|---|---|"]
    for e in engines:
        x = r[e]
        met = "met" if x["ratio"] <= r["goal"] else "missed"
        lines.append(f"| {e} | {x['weights_mb']:.1f} | {x['serving_mb']:.1f} | "
                     f"{x['ratio']:.2f}x | <= {r['goal']}x: {met} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], sys.argv[2])))
