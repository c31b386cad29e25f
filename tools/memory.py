"""`moegrow bench memory`: the resident memory of a serving runtime, stage by stage.

Each engine runs in a fresh child process (`python -m moegrow.tools.memory BUNDLE ENGINE`)
so its RSS is its own: after Python and numpy, after importing the engine, after opening
the bundle, then after each program's first run (`suggest` loads prefill and decode;
`score`; `observe`'s program; the first deepening program when the bundle has one). The
goal (issue 12): RSS after `suggest` and `score` minus RSS after importing the engine, at
most 1.5x the bytes of the bundle's weight file for that engine. PSS is reported beside RSS:
ONNX Runtime's sessions map one shared file of packed weights (`runtime/prepacked.py`), whose
pages RSS counts once per session and PSS once in all. ONNX Runtime runs twice, the first
process writing that file (its serving RSS is reported as `first_open_serving_mb`).
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


def pss_mb() -> float:
    """Proportional set size: pages shared with other mappings count once in all (RSS counts
    a file page once per mapping of it, e.g. once per session that maps a shared pack)."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    raise OSError("no Pss in /proc/self/smaps_rollup")


def child(bundle_dir: str, engine: str) -> dict:
    import numpy as np

    stages, pss = [], []

    def stage(name: str) -> None:
        stages.append((name, rss_mb()))
        pss.append((name, pss_mb()))

    stage("python")
    if engine == "executorch":
        import torch  # noqa: F401
        from executorch.runtime import Runtime  # noqa: F401
    else:
        import onnxruntime  # noqa: F401
    stage("import engine")
    from moegrow import runtime

    rt = runtime.open(bundle_dir, engine, threads=1)
    stage("open")
    rt.suggest("The configuration")
    stage("suggest (prefill, decode)")
    rt.score(TEXT)
    stage("score")
    ids = np.array([[1, *rt.sp.encode(TEXT)]], np.int64)
    rt.run("observe", ids)
    stage("observe")
    if "sweep" in rt.bundle.programs(engine):
        rt.sweep(ids[0])
        stage("sweep")
    weights = rt.bundle.weights(engine).stat().st_size
    over = stages[4][1] - stages[1][1]
    over_pss = pss[4][1] - pss[1][1]
    return {"stages": stages, "pss_stages": pss, "weights_mb": weights / 2**20,
            "serving_mb": over, "ratio": over * 2**20 / weights, "serving_pss_mb": over_pss,
            "pss_ratio": over_pss * 2**20 / weights}


def bench_memory(bundle: str | Path, out: str | Path, progress=None) -> dict:
    """{engine: {"stages": [[stage, rss MB]], "pss_stages", "weights_mb", "serving_mb",
    "ratio", "serving_pss_mb", "pss_ratio"[, "first_open_serving_mb"]}} plus "goal", and
    report.md / results.json in `out`."""
    from moegrow.runtime import backends
    from moegrow.runtime import bundle as bundle_format

    b = bundle_format.load(bundle)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"bundle": str(bundle), "bits": b.manifest["bits"], "goal": GOAL}
    for engine in b.engines():
        if progress:
            progress(f"{engine}: a fresh process opens and serves the bundle")
        runs = []
        for _ in range(2 if engine == "onnxruntime" else 1):  # ORT's first writes the pack
            done = subprocess.run([sys.executable, "-m", "moegrow.tools.memory", str(bundle),
                                   engine], capture_output=True, text=True, check=False)
            if done.returncode:
                raise backends.BackendError(f"{engine}: the measuring process failed: "
                                   f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        result[engine] = runs[-1]
        result[engine]["first_open_serving_mb"] = runs[0]["serving_mb"]
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(report(result))
    return result


def report(r: dict) -> str:
    engines = [e for e in ("executorch", "onnxruntime") if e in r]
    lines = [f"# Serving memory: {r['bundle']} ({r['bits']}-bit)", "",
             "RSS / PSS in MB of a fresh process per engine, 1 thread, after each stage "
             "(ONNX Runtime: the second process; the first writes the shared pack of packed "
             "weights, `runtime/prepacked.py`).", "",
             "| stage | " + " | ".join(engines) + " |", "|---|" + "---|" * len(engines)]
    for i, (stage, _) in enumerate(r[engines[0]]["stages"]):
        row = [f"{r[e]['stages'][i][1]:.1f} / {r[e]['pss_stages'][i][1]:.1f}"
               if i < len(r[e]["stages"]) else "" for e in engines]
        lines.append(f"| {stage} | " + " | ".join(row) + " |")
    lines += ["", "| engine | weight file MB | serving MB (score - import), RSS / PSS | "
              "ratio RSS / PSS | goal | first process, RSS |", "|---|---|---|---|---|---|"]
    for e in engines:
        x = r[e]
        met = "met" if x["ratio"] <= r["goal"] else "missed"
        met_pss = "met" if x["pss_ratio"] <= r["goal"] else "missed"
        lines.append(f"| {e} | {x['weights_mb']:.1f} | {x['serving_mb']:.1f} / "
                     f"{x['serving_pss_mb']:.1f} | {x['ratio']:.2f}x / {x['pss_ratio']:.2f}x | "
                     f"<= {r['goal']}x: {met} / {met_pss} | {x['first_open_serving_mb']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], sys.argv[2])))
