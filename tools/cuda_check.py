"""An ONNX bundle on ONNX Runtime's CUDA execution provider against its CPU provider.

    python -m moegrow.tools.cuda_check BUNDLE --text FILE [--tol 1e-4]

Needs only what the runtime needs (numpy, sentencepiece and an onnxruntime build with the
CUDA EP, e.g. `onnxruntime-gpu`), so it runs on a GPU machine without torch or ExecuTorch.
Every program of the bundle runs on the same inputs under both providers (CUDA as the
backend opens it, with `use_tf32=0`, and with ORT's default TF32 for comparison); greedy
generations are compared, and decode and score speeds timed. Prints one JSON object; exits 1
when the CUDA EP is missing or not used, or when an fp32 output (TF32 off) differs from the
CPU provider's by more than `--tol`, or a greedy generation differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from moegrow.runtime import session

CPU = ["CPUExecutionProvider"]
# "fp32": the providers as the backend sets them (TF32 off); "tf32": ORT's default
CUDA = {"tf32": ["CUDAExecutionProvider", "CPUExecutionProvider"], "fp32": None}
PROMPTS = ["The quick brown fox", "def main(", "You will be"]


def _open(bundle: Path, providers: list | None) -> session.Runtime:
    rt = session.open(bundle, "onnxruntime")
    rt.engine.providers = providers or rt.engine.providers
    return rt


def _inputs(rt: session.Runtime, text: str) -> dict[str, list[np.ndarray]]:
    ids = np.array([session.BOS] + rt.sp.encode(text), np.int64)[:rt.bundle.context]
    half = len(ids) // 2
    k = np.zeros(rt.cache_shape, np.float32)
    _, kc, vc, nov = rt.prefill(list(ids[:half]))  # a filled cache for decode (CPU run)
    return {"prefill": [ids[None, :half], np.arange(half), k, k.copy(), rt.slots],
            "decode": [ids[None, half:half + 1], np.array([half]), kc, vc, rt.slots, nov],
            "score": [ids[None], rt.slots], "observe": [ids[None], rt.slots]}


def _compare(ref: list[np.ndarray], out: list[np.ndarray]) -> dict:
    floats, ints = [], []
    for a, b in zip(ref, out, strict=True):
        if np.issubdtype(a.dtype, np.floating):
            floats.append(float(np.abs(a.astype(np.float64) - b).max()))
        else:
            ints.append(float((a != b).mean()))
    return {"max_abs": max(floats, default=0.0), "int_mismatch": max(ints, default=0.0)}


def _speed(rt: session.Runtime, inputs: dict, steps: int = 64) -> dict:
    rt.engine.run("score", inputs["score"])
    t = time.perf_counter()
    for _ in range(5):
        rt.engine.run("score", inputs["score"])
    score_tps = 5 * inputs["score"][0].shape[1] / (time.perf_counter() - t)
    logits, k, v, nov = rt.engine.run("prefill", inputs["prefill"])
    pos = inputs["prefill"][0].shape[1]
    t = time.perf_counter()
    for i in range(steps):
        token = int(logits[0].argmax())
        logits, k, v = rt.decode(token, pos + i, k, v, nov)
    return {"decode_tps": steps / (time.perf_counter() - t), "score_tps": score_tps}


def check(bundle: Path, text: str, tol: float) -> dict:
    import onnxruntime

    report = {"bundle": str(bundle), "bits": None, "onnxruntime": onnxruntime.__version__,
              "available": onnxruntime.get_available_providers(), "programs": {}}
    cpu = _open(bundle, CPU)
    report["bits"] = cpu.bundle.manifest["bits"]
    inputs = _inputs(cpu, text)
    ref = {name: cpu.engine.run(name, arrays) for name, arrays in inputs.items()
           if name in cpu.bundle.programs("onnxruntime")}
    gens = {"cpu": ["".join(cpu.generate(p, 32)) for p in PROMPTS]}
    speed = {"cpu": _speed(cpu, inputs)}
    ok = "CUDAExecutionProvider" in report["available"]
    for mode, providers in CUDA.items():
        if not ok:
            break
        gpu = _open(bundle, providers)
        for name, want in ref.items():
            got = gpu.engine.run(name, inputs[name])
            used = gpu.engine.sessions[name][0].get_providers()
            row = report["programs"].setdefault(name, {"providers": used})
            row[mode] = _compare(want, got)
            ok &= used[0] == "CUDAExecutionProvider"
            if mode == "fp32" and report["bits"] == 32:
                ok &= row[mode]["max_abs"] <= tol
        gens[mode] = ["".join(gpu.generate(p, 32)) for p in PROMPTS]
        report.setdefault("greedy_equal", {})[mode] = gens[mode] == gens["cpu"]
        ok &= gens[mode] == gens["cpu"] or report["bits"] != 32
        speed[mode] = _speed(gpu, inputs)
    report.update(speed=speed, generations=gens, tol=tol, ok=bool(ok))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--text", type=Path, required=True, help="UTF-8 text for the inputs")
    parser.add_argument("--tol", type=float, default=1e-4, help="max abs difference, fp32")
    args = parser.parse_args(argv)
    report = check(args.bundle, args.text.read_text(encoding="utf-8"), args.tol)
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
