"""`moegrow bench ...`: the benchmark commands (each writes a Markdown report and
results.json into --out); registered on the CLI by `tools/cli.py`."""

from __future__ import annotations

from pathlib import Path

import click

from .cli import emit, fail, read_text


@click.group()
def bench() -> None:
    """Benchmarks: each writes a Markdown report and results.json into --out."""


BACKEND = click.option("--backend", type=click.Choice(["onnxruntime", "executorch"]),
                       default="onnxruntime", show_default=True,
                       help="The engine that runs the bundle.")


def _say(message: str) -> None:
    click.echo(message, err=True)


@bench.command("infer")
@click.argument("bundle_dir", metavar="BUNDLE")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for report.md and results.json.")
@click.option("--ckpt", default="default", show_default=True,
              help="The checkpoint the bundle was exported from (the torch eager baseline).")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Interleaved rounds; the report takes medians.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU threads of each engine and of torch.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_infer(bundle_dir: str, out: Path, ckpt: str, rounds: int, threads: int,
                as_json: bool) -> None:
    """Prefill/decode tokens/s of torch, ExecuTorch and ONNX Runtime (the engines BUNDLE has
    programs for) on BUNDLE, interleaved in one run, with the decode roofline and `suggest`
    latency. With the `bench` extra,
    llama.cpp runs the checkpoint as GGUF F16, Q8_0 and Q4_0 in the same rounds."""
    from moegrow.tools import bench as bench_lib

    result = bench_lib.bench_infer(bundle_dir, out, ckpt=ckpt, rounds=rounds, threads=threads,
                                   progress=_say)
    emit(result, as_json, (out / "report.md").read_text())


@bench.command("overhead")
@click.argument("bundle_dir", metavar="BUNDLE")
@click.option("--gate", is_flag=True,
              help="Measure spare slots and the domain gate instead: `score` of BUNDLE (its "
                   "spare slots empty, then with a clone per layer) against the same model "
                   "exported without spare slots.")
@click.option("--text", "text_file", type=click.Path(path_type=Path),
              help="UTF-8 text to score (default: the bundle's calibration text).")
@click.option("--out", type=click.Path(path_type=Path),
              help="Folder for report.md and results.json (and --gate's bundle without slots, "
                   "kept for the next run); default: write nothing.")
@click.option("--ckpt", default="default", show_default=True,
              help="--gate: the checkpoint BUNDLE was exported from (exported again without "
                   "spare slots).")
@click.option("--against", type=click.Path(path_type=Path),
              help="--gate: a bundle of the same checkpoint exported with --spare 0 (instead "
                   "of exporting --ckpt).")
@click.option("--rounds", type=click.IntRange(min=1), default=7, show_default=True,
              help="Interleaved rounds; the report takes medians.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU threads of each engine and of torch.")
@click.option("--json", "as_json", is_flag=True, help="Print {engine: ratio, ...} as JSON.")
def bench_overhead(bundle_dir: str, gate: bool, text_file: Path | None, out: Path | None,
                   ckpt: str, against: Path | None, rounds: int, threads: int,
                   as_json: bool) -> None:
    """Cost of the error taps: `observe` against `score` on the same text, both engines,
    interleaved in one run. With --gate, the cost of spare slots and the domain gate:
    {"executorch": r, "onnxruntime": r} with empty slots (goal 1.00x), "with_clone" (its
    gate shut, goal <= 1.2x) and "with_open_clone" (its gate open everywhere)."""
    from moegrow.tools import bench as bench_lib
    from moegrow.tools import gate as gate_lib

    text = read_text(text_file) if text_file is not None else None
    if gate:
        try:
            result, report = gate_lib.bench_gate(bundle_dir, out, text, ckpt, against,
                                                 rounds=rounds, threads=threads, progress=_say)
        except gate_lib.GateError as e:
            fail(str(e))
    else:
        result, report = bench_lib.bench_overhead(bundle_dir, out, text, rounds=rounds,
                                                  threads=threads, progress=_say)
    emit(result, as_json, report)


@bench.command("memory")
@click.argument("bundle_dir", metavar="BUNDLE")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for report.md and results.json.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_memory(bundle_dir: str, out: Path, as_json: bool) -> None:
    """Resident memory of a serving runtime on BUNDLE, each engine in a fresh process: after
    importing the engine, opening the bundle, and each program's first run; the serving
    cost (RSS after `suggest` and `score` minus after the import) against the weight file's
    bytes."""
    from moegrow.tools import memory

    result = memory.bench_memory(bundle_dir, out, progress=_say)
    emit(result, as_json, (out / "report.md").read_text())


@bench.command("model")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Checkpoint folder to write (must not exist).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of every random choice (runs with one seed repeat).")
def bench_model(out: Path, seed: int) -> None:
    """Write a ~110M-parameter random-weight checkpoint of the default model's family (8
    layers, width 512, 8 experts of 1024, top-2, default tokenizer) for speed benchmarks."""
    from moegrow.tools import bench as bench_lib

    if out.exists():
        fail(f"{out}: already exists (choose a new folder)")
    params = bench_lib.random_model(out, seed)
    click.echo(f"{out}: {params / 1e6:.1f}M parameters, random weights")


@bench.command("adapt")
@click.option("--base", required=True, help="Checkpoint folder to adapt, or `default`.")
@click.option("--train", "train_file", required=True, type=click.Path(path_type=Path),
              help="UTF-8 text of the user's domain to adapt on (its first --tokens tokens).")
@click.option("--heldout", required=True, type=click.Path(path_type=Path),
              help="Held-out text of the same domain (the gain).")
@click.option("--old", required=True, type=click.Path(path_type=Path),
              help="Held-out text of the base corpus (forgetting).")
@click.option("--other", type=click.Path(path_type=Path),
              help="Held-out text of another domain (forgetting there too).")
@click.option("--methods", default="pc,pc-strict,pc-inplace,locus-bp,lora,full",
              show_default=True, help="Comma-separated methods to compare.")
@click.option("--tokens", type=click.IntRange(min=2), required=True,
              help="Training tokens: the first N of [BOS] + the training text.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for report.md, results.json and the plots.")
@click.option("--passes", type=click.IntRange(min=1), default=2, show_default=True,
              help="Passes over the training tokens, for every method (pc: one slice).")
@click.option("--locus", help="locus-bp's experts as LAYER:E,E;LAYER:E (default: the parents "
              "pc chose when pc ran first, else per layer the 2 experts the router picks most "
              "on the training tokens).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of every random choice (runs with one seed repeat).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU threads of each engine and of torch.")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path),
              help="The pc methods' bundle: BASE exported at 32 bits (with --strict-steps "
                   "for pc-strict); each method grows its own copy.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_adapt(base: str, train_file: Path, heldout: Path, old: Path, other: Path | None,
                methods: str, tokens: int, out: Path, passes: int, locus: str | None,
                seed: int, threads: int, bundle_dir: Path | None, as_json: bool) -> None:
    """Adapt BASE to a domain with each method (predictive coding, backprop on the PC locus,
    LoRA, full fine-tuning) on the same tokens, each in its own process: held-out gain,
    forgetting on base and another domain, wall time vs LoRA, peak RSS, learning bytes,
    FLOPs."""
    from moegrow.tools import adapt as adapt_lib

    try:
        result = adapt_lib.bench_adapt(
            base, train_file, heldout, old, out, methods.split(","), tokens, other=other,
            passes=passes, locus=locus, seed=seed, threads=threads, bundle=bundle_dir,
            progress=_say)
    except adapt_lib.AdaptError as e:
        fail(str(e))
    emit(result, as_json, (out / "report.md").read_text())


@bench.command("sequence")
@click.option("--base", required=True, help="Checkpoint folder to adapt, or `default`.")
@click.option("--domain", "domains", multiple=True, required=True,
              metavar="NAME=TRAIN_FILE,HELDOUT_FILE",
              help="A domain to learn, in order (repeat): its name, its training text (the "
                   "first --tokens tokens) and its held-out text.")
@click.option("--old", required=True, type=click.Path(path_type=Path),
              help="Held-out text of the base corpus (forgetting on the base).")
@click.option("--tokens", type=click.IntRange(min=2), required=True,
              help="Training tokens per domain: the first N of [BOS] + its training text.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for report.md, results.json and matrix.png.")
@click.option("--methods", default="pc,lora,lora-tag,full", show_default=True,
              help="Comma-separated: pc (growth on one bundle), lora (one adapter trained "
                   "on each domain in turn), lora-tag (one adapter per domain, switched by "
                   "the domain tag), full (full fine-tuning in turn).")
@click.option("--passes", type=click.IntRange(min=1), default=2, show_default=True,
              help="Passes over each domain's tokens, for every method (pc: one slice).")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path),
              help="pc's bundle: BASE exported at 32 bits; pc grows a copy of it.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of every random choice (runs with one seed repeat).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU threads of each engine and of torch.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_sequence(base: str, domains: tuple[str, ...], old: Path, tokens: int, out: Path,
                   methods: str, passes: int, bundle_dir: Path | None, seed: int,
                   threads: int, as_json: bool) -> None:
    """Learn several domains one after another with each method (each in its own process)
    and, after each stage, score every domain seen so far and the base: the forgetting
    matrix, each domain's gain, the largest forgetting of an earlier domain and of the base,
    and the smallest gain against LoRA's."""
    from moegrow.tools import adapt as adapt_lib
    from moegrow.tools import sequence

    try:
        result = sequence.bench_sequence(
            base, [sequence.parse_domain(d) for d in domains], old, out, methods.split(","),
            tokens, passes=passes, seed=seed, threads=threads, bundle=bundle_dir,
            progress=_say)
    except adapt_lib.AdaptError as e:
        fail(str(e))
    emit(result, as_json, (out / "report.md").read_text())


@bench.command("strict")
@click.option("--base", required=True, help="Checkpoint folder, or `default`.")
@click.option("--domain", "domains", multiple=True, required=True,
              metavar="NAME=TRAIN_FILE,HELDOUT_FILE",
              help="A domain (repeat): its name, its training text (the windows relaxed on) "
                   "and its held-out text (scored after --train-steps).")
@click.option("--old", required=True, type=click.Path(path_type=Path),
              help="Held-out text of the base corpus (forgetting after --train-steps).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for report.md and results.json.")
@click.option("--windows", "windows_n", type=click.IntRange(min=1), default=4,
              show_default=True, help="Windows of each domain's training text.")
@click.option("--window", type=click.IntRange(min=8), default=128, show_default=True,
              help="Tokens per window.")
@click.option("--steps", type=click.IntRange(min=1), default=64, show_default=True,
              help="Relaxation steps at most.")
@click.option("--tol", type=float, default=0.01, show_default=True,
              help="Settled when |dF/dv| falls below this fraction of its start.")
@click.option("--train-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Then train every layer's experts in place with each schedule for this "
                   "many Adam steps (0: no training).")
@click.option("--relax-steps", type=click.IntRange(min=1), default=8, show_default=True,
              help="Relaxation steps per update while training.")
@click.option("--lr", type=float, default=3e-4, show_default=True,
              help="Adam's learning rate while training.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU threads of each engine and of torch.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_strict(base: str, domains: tuple[str, ...], old: Path, out: Path, windows_n: int,
                 window: int, steps: int, tol: float, train_steps: int, relax_steps: int,
                 lr: float, threads: int, as_json: bool) -> None:
    """Does strict PC settle, in how many steps, and does its update follow the gradient?
    Relaxes the value nodes above every layer on windows of each domain with four schedules
    (strict: eta 0.1 as exported; curvature: per-node steps from the Hessian; precision:
    errors weighted by the nodes' scale; error: error-space PC), in torch on this machine:
    the T histogram, halts, and each update's cosine with the exact gradient."""
    from moegrow.tools import sequence, strict

    try:
        result = strict.bench_strict(
            base, [sequence.parse_domain(d) for d in domains], old, out,
            windows_n=windows_n, window=window, steps=steps, tol=tol,
            train_steps=train_steps, relax_steps=relax_steps, lr=lr, threads=threads)
    except (strict.StrictError, sequence.AdaptError) as e:
        fail(str(e))
    emit({k: v for k, v in result.items() if k != "domains"} | {"domains": {
        n: {k: v for k, v in d.items() if k != "runs"} for n, d in result["domains"].items()}},
        as_json, (out / "report.md").read_text())


@bench.command("quant")
@click.argument("bundle_dir", metavar="BUNDLE")
@click.option("--text", "text_file", type=click.Path(path_type=Path),
              help="Held-out text of the grown domain (the first --tokens tokens are scored); "
                   "default: the domain's held-out replay, which the allocator also measures "
                   "on (an independent text is the fairer judge).")
@click.option("--train", "train_file", type=click.Path(path_type=Path),
              help="Grow the domain from this text first (observe it, one idle slice with "
                   "the default limits) on a copy of BUNDLE; without it BUNDLE must hold the "
                   "domain's fp32 clones.")
@click.option("--domain", default=None, help="The domain's tag (default: the grown one).")
@click.option("--tokens", type=click.IntRange(min=2), default=20000, show_default=True,
              help="Held-out tokens scored per measurement.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for report.md, results.json and quant.png.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of every random choice (runs with one seed repeat).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_quant(bundle_dir: str, text_file: Path | None, train_file: Path | None,
                domain: str | None, tokens: int, out: Path, seed: int, as_json: bool) -> None:
    """Compress a grown domain's clones into BUNDLE's quantized pool (export with --pool N
    --pool-bits 8,4) with each strategy (uniform int8 and int4; the allocator within
    uniform int8's bytes; at half int8 / half int4 bytes the allocator, importance only,
    converged only and random) and at the allocator's operating point, through the engine;
    the domain's held-out perplexity and the base text's against the grown bundle, and each
    clone's routing mass, distance from converged and quantization cost."""
    from moegrow.tools import quant

    for path in (text_file, train_file):  # one clear line for a missing, empty or bad file
        if path is not None:
            read_text(path)
    result = quant.bench_quant(bundle_dir, out, text_file, train_file, domain, tokens,
                               seed=seed, progress=_say)
    emit(result, as_json, (out / "report.md").read_text())


@bench.command("soak")
@click.argument("bundle_dir", metavar="BUNDLE")
@click.option("--cycles", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Observe/idle cycles.")
@click.option("--domain", "domains", multiple=True, metavar="TAG=FILE",
              help="A domain's text, observed a chunk per cycle (repeat; the domains take "
                   "turns, --switch cycles each).")
@click.option("--out", type=click.Path(path_type=Path),
              help="Keep the grown copy, report.md and results.json (with every cycle's "
                   "figures) here; default: a temporary copy, removed.")
@BACKEND
@click.option("--chunk", type=click.IntRange(min=100), default=2000, show_default=True,
              help="Characters observed per cycle.")
@click.option("--switch", type=click.IntRange(min=1), default=5, show_default=True,
              help="Cycles per domain before the next one's turn.")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=60,
              show_default=True, help="Time limit of each slice.")
@click.option("--tokens", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Training tokens per slice.")
@click.option("--steps", type=click.IntRange(min=1), default=8, show_default=True,
              help="PC steps per slice.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the results (without the per-cycle series) as JSON.")
def bench_soak(bundle_dir: str, cycles: int, domains: tuple[str, ...], out: Path | None,
               backend: str, chunk: int, switch: int, seconds: float, tokens: int,
               steps: int, as_json: bool) -> None:
    """Run many observe/idle cycles on a copy of BUNDLE in its fixed budget (growth,
    compression into the pool and retirement when slots run out) and report the resident
    memory's slope, the bytes on disk, file descriptors and threads, and every cycle whose
    experts or slice learning state went past the budget (`budget_violations`)."""
    from moegrow.tools import soak

    texts = {}
    for spec in domains:
        tag, _, file = spec.partition("=")
        if not tag.strip() or not file.strip():
            fail(f"--domain {spec!r}: expected TAG=FILE")
        texts[tag.strip()] = read_text(Path(file.strip()))
    try:
        result = soak.bench_soak(bundle_dir, cycles, texts, out, backend, chunk, switch,
                                 seconds, tokens, steps, progress=_say)
    except soak.SoakError as e:
        fail(str(e))
    short = {k: v for k, v in result.items() if k != "series"}
    emit(short, as_json, soak.report(result))


@bench.command("crash")
@click.argument("bundle_dir", metavar="BUNDLE")
@click.option("--trials", type=click.IntRange(min=1), default=500, show_default=True,
              help="SIGKILLs in all (children that end before their chosen phase do not "
                   "count).")
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path),
              help="Text to observe (a --chunk piece per observe) and grow on.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Keep the killed copy, report.md and results.json here; default: a "
                   "temporary copy, removed.")
@BACKEND
@click.option("--chunk", type=click.IntRange(min=100), default=1500, show_default=True,
              help="Characters per observe.")
@click.option("--tokens", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Training tokens per slice.")
@click.option("--steps", type=click.IntRange(min=1), default=4, show_default=True,
              help="PC steps per slice.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of every random choice (runs with one seed repeat).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_crash(bundle_dir: str, trials: int, text_file: Path, out: Path | None, backend: str,
                chunk: int, tokens: int, steps: int, seed: int, as_json: bool) -> None:
    """Kill a process with SIGKILL at random instants of observe, idle (plan, deepen, guard,
    commit), rollback and (with a pool) compress, on a copy of BUNDLE; after each kill the
    copy must load and verify, serve, keep every committed version and the current one
    logged, and hold a consistent error map. Prints the failures of each kind."""
    from moegrow.tools import crash

    text = read_text(text_file)
    try:
        result = crash.bench_crash(bundle_dir, trials, text, out, backend, seed, chunk,
                                   tokens, steps, progress=_say)
    except crash.CrashError as e:
        fail(str(e))
    emit(result, as_json, crash.report(result))


@bench.command("poison")
@click.argument("bundle_dir", metavar="BUNDLE")
@click.option("--old", required=True, type=click.Path(path_type=Path),
              help="Held-out text of the base corpus: the shuffled and mixed cases are made "
                   "from it, and it judges the base after each slice (never observed).")
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path),
              help="A user's text: the flood case repeats a paragraph of it.")
@click.option("--cases", default=",".join(("repeat", "bytes", "flood", "shuffled",
                                           "long-words", "mixed")), show_default=True,
              help="Comma-separated cases to run.")
@click.option("--seeds", type=click.IntRange(min=1), default=2, show_default=True,
              help="Trials per case, each with its own text and a fresh copy of BUNDLE.")
@click.option("--chars", type=click.IntRange(min=1000), default=30000, show_default=True,
              help="Characters of each case's text (80% observed, 20% held out).")
@BACKEND
@click.option("--out", type=click.Path(path_type=Path), help="Folder for report.md and "
              "results.json.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_poison(bundle_dir: str, old: Path, text_file: Path, cases: str, seeds: int,
                 chars: int, backend: str, out: Path | None, as_json: bool) -> None:
    """Observe and grow on text designed to hurt (one word repeated, random bytes, a flood
    of one paragraph, shuffled base text, very long words, base text laced with bytes), each
    on a fresh copy of BUNDLE: what the verdict, the guard and the slice did, and whether a
    committed slice made the base held-out text worse (a regression); then prompts at and
    past the context through score, suggestions and generate."""
    from moegrow.tools import poison

    texts = read_text(old), read_text(text_file)
    try:
        result = poison.bench_poison(bundle_dir, *texts, out, tuple(cases.split(",")), seeds,
                                     chars, backend)
    except poison.PoisonError as e:
        fail(str(e))
    emit(result, as_json, poison.report(result))
