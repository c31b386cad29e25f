"""What the top-m softmax error would save: `observe` exact and restricted to the m likeliest
tokens, against `score`, on both engines (docs/errormap.md, "Overhead of the taps").

    python -m moegrow.tools.topm TARGET --text FILE --out DIR [--top 16,32,64]
        [--windows 24] [--rounds 5]

Lowers `score`, the exact `observe` and one `observe` per m from the checkpoint TARGET into
DIR (once; reused), times them on the same windows, interleaved, 1 thread, and prints each
program's time over `score`'s per engine, then the top-m update sizes' relative error
against the exact ones (median, 95th percentile, max). A one-off measurement, not a CLI
command: bundles always carry the exact taps.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
from moegrow.device_kernels.manifest import ONNX_DATA
from moegrow.export import checkpoint, lower, programs
from moegrow.runtime import backends
from moegrow.runtime.session import BOS, windows
from moegrow.tools import bench


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target")
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--top", default="16,32,64")
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    model = checkpoint.load(args.target).eval()
    tok = checkpoint.load_tokenizer(args.target)
    length = model.args.max_position_embeddings
    progs = {"score": programs.Score(model), "exact": programs.Observe(model)}
    progs |= {f"top{m}": programs.Observe(model, top=int(m)) for m in args.top.split(",")}
    methods = {n: (p, *p.example(length)) for n, p in progs.items()}
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "m.pte").exists():
        lower.to_pte(methods, out / "m.pte", out / "m.ptd")
        onnx = [lower.to_onnx(p, inputs, out / f"{n}.onnx", shapes, p.outputs)
                for n, (p, inputs, shapes) in methods.items()]
        lower.share_weights(onnx, out / ONNX_DATA)
    engines = {"executorch": backends.ExecuTorch({n: out / "m.pte" for n in progs},
                                                 out / "m.ptd", 1),
               "onnxruntime": backends.OnnxRuntime({n: out / f"{n}.onnx" for n in progs},
                                                   out / ONNX_DATA, 1)}
    slots = programs.slot_state(model).numpy()
    ids = np.array([BOS] + tok.encode(args.text.read_text(encoding="utf-8")), np.int64)
    ws = [c[None] for c, _ in windows(ids, length)][:args.windows]
    runs = {(e, n): (lambda e=e, n=n: [engines[e].run(n, [w, slots]) for w in ws])
            for e in engines for n in progs}
    times: dict = {k: [] for k in runs}
    for r in range(args.rounds + 1):  # round 0 warms up
        for k, f in runs.items():
            t = bench._time(f)
            if r:
                times[k].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for engine in ("executorch", "onnxruntime"):
        print(engine, " ".join(f"{n}={med[engine, n] / med[engine, 'score']:.3f}x"
                               for n in progs if n != "score"))
    for n in progs:
        if n.startswith("top"):
            rel = []
            for w in ws[:8]:
                a = engines["onnxruntime"].run("exact", [w, slots])[4]
                b = engines["onnxruntime"].run(n, [w, slots])[4]
                rel.append(np.abs(b - a)[a > 1e-6] / a[a > 1e-6])
            rel = np.concatenate(rel)
            print(f"{n}: update relative error median {np.median(rel):.4f}, "
                  f"p95 {np.quantile(rel, 0.95):.4f}, max {rel.max():.4f}")


if __name__ == "__main__":
    main()
