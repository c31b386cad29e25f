"""Routed against dense quantized experts: the serving programs of a quantized bundle in
both forms (`quantize.routed`: only the chosen experts read, ONNX Runtime's `QMoE` or, with
`--engine executorch`, moegrow's `routed_moe` kernel; `quantize.dense`: every expert,
`MatMulNBits` / XNNPACK), timed interleaved on one thread (docs/benchmarks.md, "Routed
quantized experts").

    python -m moegrow.tools.routed TARGET --out DIR [--bits 4] [--rounds 5] [--threads 1]
        [--profile] [--engine onnxruntime|executorch]

Lowers `decode`, `prefill`, `score` and `observe` of the checkpoint TARGET in both forms into
DIR (once; reused), then times a decode step at position 40 over a random cache, a 32-token
prefill, a 128-token score and observe, `--rounds` interleaved rounds, and prints
milliseconds per call (medians) and dense / routed. `--profile`: ONNX Runtime's own
per-operator time of the routed decode (100 runs; the profiler's overhead inflates the
total). A one-off measurement, not a CLI command.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from pathlib import Path

import numpy as np

CALLS = {"decode": 50, "prefill": 5, "score": 3, "observe": 3}  # timed calls per round


class _Method:
    """An ExecuTorch method with an ONNX Runtime session's `run(None, feed)`."""

    def __init__(self, path: Path, threads: int):
        import torch
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime
        from moegrow.device_kernels import native

        native.load()
        _unsafe_reset_threadpool(threads)
        torch.set_num_threads(threads)
        self.torch = torch
        self.method = Runtime.get().load_program(path).load_method("forward")

    def run(self, _, feed: dict) -> list:
        return self.method.execute([self.torch.from_numpy(np.ascontiguousarray(a))
                                    for a in feed.values()])


def sessions(target: str, out: Path, bits: int, threads: int,
             engine: str = "onnxruntime") -> tuple[dict, dict]:
    """{(program, form): session}, {program: inputs}."""
    import onnxruntime as ort
    from moegrow.export import checkpoint, lower, programs, quantize

    model = checkpoint.load(target)
    out.mkdir(parents=True, exist_ok=True)  # once the target is known to be a checkpoint
    length = model.args.max_position_embeddings
    rng = np.random.default_rng(0)
    made, feeds = {}, {}
    for name, kind in (("decode", programs.Decode), ("prefill", programs.Prefill),
                       ("score", programs.Score), ("observe", programs.Observe)):
        if engine == "executorch" and kind is programs.Observe:
            continue  # dense in a bundle: its taps need every expert
        program = kind(model)
        example, shapes = program.example(length)
        for form in ("routed", "dense"):
            if engine == "executorch":
                path = out / f"{name}-{form}{bits}.pte"
                if not path.exists():
                    lowered = quantize.for_pte(program, bits, form == "routed")
                    lower.to_pte({"forward": (lowered, example, shapes)}, path)
                made[name, form] = _Method(path, threads)
                continue
            path = out / f"{name}-{form}{bits}.onnx"
            if not path.exists():
                swapped = (quantize.routed(program, bits) if form == "routed"
                           else quantize.dense(program))
                fp32 = lower.to_onnx(swapped, example, out / f"{name}-{form}.onnx", shapes,
                                     program.outputs)
                quantize.quantize_onnx(fp32, path, bits)
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            made[name, form] = ort.InferenceSession(str(path), options,
                                                    providers=["CPUExecutionProvider"])
        rest = [t.numpy() for t in example]
        if name == "decode":
            cache = rng.standard_normal(rest[2].shape).astype(np.float32) * 0.3
            arrays = [np.array([[17]]), np.array([40]), cache, cache.copy(), *rest[4:]]
        elif name == "prefill":
            arrays = [rng.integers(3, 4000, (1, 32)), np.arange(32), *rest[2:]]
        else:  # score, observe
            arrays = [rng.integers(3, 4000, (1, 128)), *rest[1:]]
        names = (range(len(arrays)) if engine == "executorch"
                 else [i.name for i in made[name, "routed"].get_inputs()])
        feeds[name] = dict(zip(names, arrays, strict=True))
    return made, feeds


def profile(session_path: str, feed: dict, threads: int) -> list[tuple[str, float, int]]:
    """[(operator, ms per run, nodes)] of 100 runs, most time first."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.enable_profiling = threads, True
    session = ort.InferenceSession(session_path, options, providers=["CPUExecutionProvider"])
    for _ in range(100):
        session.run(None, feed)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    spent, nodes = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            spent[e["args"]["op_name"]] += e["dur"]
            nodes[e["args"]["op_name"]] += 1
    return [(op, us / 100 / 1e3, nodes[op] // 100) for op, us in spent.most_common()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bits", type=int, default=4, choices=(8, 4))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--engine", default="onnxruntime", choices=("onnxruntime", "executorch"))
    args = parser.parse_args()
    from moegrow.export.checkpoint import CheckpointError

    try:
        made, feeds = sessions(args.target, args.out, args.bits, args.threads, args.engine)
    except (CheckpointError, OSError, ValueError) as e:
        parser.error(str(e))  # one line, exit 2
    times: dict[tuple, list[float]] = {key: [] for key in made}
    for _ in range(args.rounds):
        for (name, form), session in made.items():
            session.run(None, feeds[name])
            start = time.perf_counter()
            for _ in range(CALLS[name]):
                session.run(None, feeds[name])
            times[name, form].append((time.perf_counter() - start) / CALLS[name] * 1e3)
    ms = {key: statistics.median(t) for key, t in times.items()}
    for name in feeds:
        print(f"{name}: routed {ms[name, 'routed']:.3f} ms, dense {ms[name, 'dense']:.3f} ms, "
              f"dense / routed {ms[name, 'dense'] / ms[name, 'routed']:.2f}x")
    if args.profile and args.engine == "onnxruntime":
        path = str(args.out / f"decode-routed{args.bits}.onnx")
        for op, spent, nodes in profile(path, feeds["decode"], args.threads)[:12]:
            print(f"  {op:20s} {spent:.3f} ms/run  {nodes} nodes")


if __name__ == "__main__":
    main()
