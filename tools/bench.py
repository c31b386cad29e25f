"""`moegrow bench infer`: prefill/decode speed of every backend on one bundle, in one run.

Backends are interleaved within each round (A B C A B C ...) and medians are reported, so
the ratios hold on a shared, noisy machine even when the absolute times do not. Everything
runs on `threads` threads (1 by default: a phone keyboard gets one core). The decode roofline
is active weight bytes per token divided by the measured memory read bandwidth; KV-cache
traffic is left out of the bytes (it is small next to the weights at these lengths).
When the `bench` extra is installed, llama.cpp runs the same checkpoint as GGUF F16, Q8_0 and
Q4_0 in the same rounds (`tools/llama.py`).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from moegrow import runtime
from moegrow.device_kernels import layout
from moegrow.export import checkpoint, pretrain, reference
from moegrow.export.models import mixtral
from moegrow.runtime import bundle as bundle_format
from moegrow.runtime.backends import ENGINES
from moegrow.runtime.session import InputError
from moegrow.tools import llama

# A ~110M-parameter member of the default model's family (realistic for phones): what
# `moegrow bench model` writes, with random weights and the default tokenizer.
BENCH_MODEL = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
                   num_experts_per_tok=2, max_position_embeddings=256)

TYPED = " and the typist keeps on writing a note about them"  # `typing`: one key at a time
PREFIX = ("The module provides functions for working with files and directories, and the "
          "standard library documents each of them with examples that show how")


def random_model(out: str | Path, seed: int = 0) -> int:
    """Write the `BENCH_MODEL` checkpoint with random weights to `out`; returns its size in
    parameters."""
    tok = checkpoint.load_tokenizer("default")
    torch.manual_seed(seed)
    model = mixtral.build(mixtral.ModelArgs(vocab_size=tok.vocab_size, **BENCH_MODEL))
    pretrain.init_weights(model)
    checkpoint.save(model, out, tok.path)
    return sum(p.numel() for p in model.parameters())


def read_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Bytes/s of one core summing a buffer far larger than the caches (best of `repeats`)."""
    a = np.ones(mb * (1 << 20) // 4, np.float32)
    best = min(_time(a.sum) for _ in range(repeats))
    return a.nbytes / best


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def active_bytes(config: dict, bits: int, experts_read: int | None = None) -> int:
    """Weight bytes one decode step reads: attention and `experts_read` experts per layer at
    `bits`, the head at fp32 (int8 in quantized bundles), the router at fp32 (scales are
    left out)."""
    c, layers = config["hidden_size"], config["num_hidden_layers"]
    d = config.get("head_dim") or c // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    f = config.get("moe_intermediate_size") or config["intermediate_size"]
    experts = layout.dims(config)[0]  # the router has a row per slot, spare ones too
    read = experts_read or config["num_experts_per_tok"]
    quantized = layers * (2 * c * q + 2 * c * kv + read * 3 * c * f)
    head = config["vocab_size"] * c * (4 if bits == 32 else 1)
    return quantized * bits // 8 + head + layers * experts * c * 4


def _round(rt, ids: list[int], steps: int) -> tuple[float, float]:
    """One prefill of `ids` and `steps` greedy decode steps -> (prefill s, decode s)."""
    t0 = time.perf_counter()
    logits, k, v, novelty = rt.prefill(ids)
    t1 = time.perf_counter()
    for pos in range(len(ids), len(ids) + steps):
        logits, k, v = rt.decode(int(logits[0].argmax()), pos, k, v, novelty)
    return t1 - t0, time.perf_counter() - t1


@torch.no_grad()
def bench_infer(bundle: str | Path, out: str | Path, ckpt: str = "default", rounds: int = 5,
                steps: int = 32, threads: int = 1,
                progress: Callable[[str], None] | None = None) -> dict:
    """Measure, write `report.md` and `results.json` into `out`, return the results."""
    torch.set_num_threads(threads)
    say = progress or (lambda _m: None)
    engines = {e: runtime.open(bundle, e, threads)  # the engines the bundle has programs for
               for e in ENGINES if e in bundle_format.load(bundle).engines()}
    first = next(iter(engines.values())).bundle
    lead = next(iter(engines))  # executorch where the bundle has it
    model_config = checkpoint.load(ckpt).args.to_hf()
    made = {k: v for k, v in first.config.items() if k != "spare_experts"}  # export's own
    if {k: model_config.get(k) for k in made} != made:
        raise checkpoint.CheckpointError(f"{ckpt}: not the checkpoint the bundle was made from")
    # torch: the bundle's programs in eager torch (the reference, on the weight values the
    # bundle serves), through the same runtime calls as the engines
    eager = runtime.Runtime(first, "torch", threads, reference.load(ckpt, first.manifest))
    peers = llama.peers(ckpt, first.context, threads, say)
    backends = {"torch": eager, **engines, **{f"llama.cpp {q}": p for q, p in peers.items()}}
    text = engines[lead].sp.encode(" ".join([PREFIX] * 4))
    ids = [1] + text[:63]  # a 64-token prompt
    prefix = engines[lead].sp.decode(text[:31])  # 32 tokens with BOS
    times: dict[str, list[tuple[float, float]]] = {b: [] for b in backends}
    for r in range(rounds + 1):  # round 0 warms up (program loading, allocations)
        say(f"round {r}/{rounds}")
        for name, rt in backends.items():
            t = _round(rt, ids, steps)
            if r:
                times[name].append(t)
    ours = ["torch", *engines]
    latency = {name: _suggest_ms(backends[name], prefix, rounds * 4) for name in ours}
    typing = {name: _typing_ms(backends[name], prefix, TYPED) for name in ours}
    bits = first.manifest.get("bits", 32)
    experts = layout.dims(first.config)[0]  # dense decode runs every slot, spare ones too
    read = {e: experts if first.manifest.get("decode_moe") == "dense"
            and e not in first.manifest.get("routed", []) else None for e in engines}
    per_token = active_bytes(first.config, bits, read[lead])
    bandwidth = read_bandwidth()
    roofline = bandwidth / per_token
    tps = {name: (len(ids) / statistics.median(t[0] for t in times[name]),
                  steps / statistics.median(t[1] for t in times[name])) for name in backends}
    results = []
    for name in ours:
        prefill, decode = tps[name]
        # torch eager runs fp32 weights (the dequantized values in a quantized bundle)
        b, nbytes = ((32, active_bytes(first.config, 32)) if name == "torch"
                     else (bits, active_bytes(first.config, bits, read[name])))
        results.append({"backend": name, "bits": b, "prefill_tps": prefill,
                        "decode_tps": decode, "gb_per_s": decode * nbytes / 1e9,
                        "mb_per_token": nbytes / 1e6,
                        "roofline_fraction": decode * nbytes / bandwidth,
                        "suggest_p50_ms": latency[name][0], "suggest_p95_ms": latency[name][1],
                        "typing_p50_ms": typing[name][0], "typing_p95_ms": typing[name][1],
                        "typing_decode_steps": typing[name][2]})
    torch_decode = results[0]["decode_tps"]
    for r in results:
        r["decode_vs_torch"] = r["decode_tps"] / torch_decode
    peer_rows = llama.compare({q: tps[f"llama.cpp {q}"] for q in peers},
                              {r["backend"]: r["decode_tps"] for r in results}, bits)
    result = {"results": results, "llama_cpp": peer_rows,
              "suggest_p95_ms": latency[lead][1],
              "bytes_per_token": per_token, "read_bandwidth_gb_s": bandwidth / 1e9,
              "roofline_decode_tps": roofline, "threads": threads, "rounds": rounds,
              "prompt_tokens": len(ids), "decode_steps": steps}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(report(result, str(bundle)) + "\n![speed](speed.png)\n")
    plot(result, out / "speed.png", str(bundle))
    return result


def text_ids(rt, text: str | None) -> np.ndarray:
    """[BOS] + the tokens of `text`, or without it the bundle's calibration text (held-out
    base text the export kept as growth's guard)."""
    if text is not None:
        return np.array([1, *rt.sp.encode(text)], np.int64)
    calibration = rt.bundle.manifest.get("calibration") or {}
    if "guard" not in calibration:
        raise InputError(f"{rt.bundle.path}: the bundle keeps no calibration text; give one "
                         "with --text")
    return np.fromfile(rt.bundle.path / calibration["guard"]["file"], np.int32).astype(np.int64)


def bench_overhead(bundle: str | Path, out: Path | None, text: str | None, rounds: int = 7,
                   threads: int = 1,
                   progress: Callable[[str], None] | None = None) -> tuple[dict, str]:
    """Scoring with error taps (`observe`) against without (`score`), same windows, both
    engines, interleaved; writes report.md and results.json into `out` when given; returns
    ({engine: ratio, ...}, report)."""
    say = progress or (lambda _m: None)
    engines = {e: runtime.open(bundle, e, threads) for e in ENGINES}
    rt = next(iter(engines.values()))
    ids = text_ids(rt, text)
    windows = [chunk[None] for chunk, _ in rt.windows(ids)]
    times = {(e, p): [] for e in engines for p in ("score", "observe")}
    for r in range(rounds + 1):  # round 0 warms up
        say(f"round {r}/{rounds}")
        for (e, p), ts in times.items():
            t = _time(lambda e=e, p=p: [engines[e].run(p, w) for w in windows])
            if r:
                ts.append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {e: med[e, "observe"] / med[e, "score"] for e in engines}
    detail = {"seconds": {f"{e}/{p}": t for (e, p), t in med.items()},
              "tokens": len(ids) - 1, "windows": len(windows), "rounds": rounds,
              "threads": threads}
    lines = [f"# moegrow bench overhead: {bundle}", "",
             f"{len(ids) - 1} tokens in {len(windows)} windows, {threads} thread(s), medians of "
             f"{rounds} interleaved rounds. Goal: observe / score <= 1.05.", "",
             "| engine | score s | observe s | observe / score |", "|---|---|---|---|"]
    lines += [f"| {e} | {med[e, 'score']:.3f} | {med[e, 'observe']:.3f} | {result[e]:.3f}x |"
              for e in engines]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({**result, **detail}, indent=2) + "\n")
        (out / "report.md").write_text("\n".join(lines) + "\n")
    return result, "\n".join(lines) + "\n"


def plot(r: dict, path: Path, title: str) -> None:
    """Prefill and decode tokens/s per backend side by side; the decode roofline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{x['backend']}\nint{x['bits']}" if x["bits"] != 32 else x["backend"]
             for x in r["results"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in zip(axes, ("prefill_tps", "decode_tps"), ("prefill", "decode"),
                              strict=True):
        values = [x[key] for x in r["results"]]
        bars = ax.bar(names, values, color=["#999999", "#4c72b0", "#dd8452"][:len(values)])
        ax.bar_label(bars, fmt="%.0f")
        ax.set_title(f"{label} tokens/s ({r['threads']} thread)")
        ax.set_ylim(0, max(values) * 1.25)
    axes[1].axhline(r["roofline_decode_tps"], color="k", linestyle="--", linewidth=1)
    axes[1].text(0, r["roofline_decode_tps"], " roofline", va="bottom")
    axes[1].set_ylim(0, max(axes[1].get_ylim()[1], r["roofline_decode_tps"] * 1.15))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _percentiles(ms: list[float]) -> tuple[float, float]:
    ms = sorted(ms)
    return ms[len(ms) // 2], ms[min(len(ms) - 1, int(0.95 * len(ms)))]


def _suggest_ms(rt, prefix: str, n: int) -> tuple[float, float]:
    """p50, p95 of `suggest` (3 words) on the prefix as a new context (the whole prompt
    prefilled: nothing kept from the call before), in milliseconds."""
    def fresh():
        rt.typed = None
        rt.suggest(prefix)
    return _percentiles([_time(fresh) * 1e3 for _ in range(n)])


def _typing_ms(rt, prefix: str, typed: str) -> tuple[float, float, float]:
    """p50, p95 of `suggest` (3 words) per keystroke while `typed` is typed after `prefix` a
    character at a time (a keyboard: the context's cache is reused, `Runtime.extend`), in
    milliseconds, and the mean decode steps per keystroke (the three words' and the
    context's one-piece step: what the time scales with; a model that ends its words early
    takes fewer)."""
    rt.typed = None
    rt.suggest(prefix)
    steps, decode = [0], rt.decode

    def counted(*args):
        steps[0] += 1
        return decode(*args)
    rt.decode = counted  # this instance only, for the measurement
    try:
        ms = [_time(lambda n=n: rt.suggest(prefix + typed[:n])) * 1e3
              for n in range(1, len(typed) + 1)]
    finally:
        del rt.decode
    return (*_percentiles(ms), steps[0] / len(typed))


def report(r: dict, bundle: str) -> str:
    lines = [f"# moegrow bench infer: {bundle}", "",
             f"{r['threads']} thread(s), {r['rounds']} interleaved rounds (medians), prompt "
             f"{r['prompt_tokens']} tokens, {r['decode_steps']} decode steps.",
             f"Active weight bytes per token (ExecuTorch) {r['bytes_per_token'] / 1e6:.2f} MB; "
             f"read bandwidth {r['read_bandwidth_gb_s']:.1f} GB/s; its decode roofline "
             f"{r['roofline_decode_tps']:.0f} tokens/s (each row's roofline: its own MB per "
             "token). suggest: a new context (the whole prompt prefilled); typing: per "
             "keystroke, the context's cache reused (steps: decode steps per keystroke, the "
             "words' and the context's).", "",
             "| backend | bits | prefill tok/s | decode tok/s | decode vs torch | MB / token "
             "| roofline | suggest p50 / p95 ms | typing p50 / p95 ms (steps) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in r["results"]:
        lines.append(f"| {x['backend']} | {x['bits']} | {x['prefill_tps']:.0f} | "
                     f"{x['decode_tps']:.0f} | {x['decode_vs_torch']:.2f}x | "
                     f"{x['mb_per_token']:.2f} | {x['roofline_fraction']:.1%} | "
                     f"{x['suggest_p50_ms']:.1f} / {x['suggest_p95_ms']:.1f} | "
                     f"{x['typing_p50_ms']:.1f} / {x['typing_p95_ms']:.1f} "
                     f"({x['typing_decode_steps']:.1f}) |")
    lines.append("")
    if not r["llama_cpp"]:
        return "\n".join([*lines, llama.NOT_INSTALLED]) + "\n"
    lines += ["llama.cpp on the same checkpoint (GGUF), same threads and rounds; the ratios "
              "compare our decode tok/s with the quant that matches the bundle's bits.", "",
              "| llama.cpp | prefill tok/s | decode tok/s | ExecuTorch / llama.cpp "
              "| ONNX Runtime / llama.cpp |", "|---|---|---|---|---|"]
    for x in r["llama_cpp"]:
        ratios = [f"{x[k]:.2f}x" if x[k] is not None else "-"
                  for k in ("ours_over_llama", "onnxruntime_over_llama")]
        lines.append(f"| {x['quant']} | {x['prefill_tps']:.0f} | {x['decode_tps']:.0f} | "
                     f"{ratios[0]} | {ratios[1]} |")
    return "\n".join(lines) + "\n"
