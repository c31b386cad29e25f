"""`moegrow`: the desktop CLI. Each command parses options, calls one library function and
prints (plain text, `--json`, or a plot). Errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import codecs
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np
from moegrow import runtime
from moegrow.device_kernels import layout
from moegrow.export import tokenizer
from moegrow.runtime import (
    backends,
    compress,
    errormap,
    experts,
    growth,
    session,
    state,
    verdicts,
    versions,
)
from moegrow.runtime import bundle as bundle_format
from moegrow.tools import console
from moegrow.tools import corpus as corpus_lib

# The desktop side (export/, tools/llama.py) loads torch: its modules are imported by the
# commands that use them, so a device-side command (observe, idle, errormap, versions,
# rollback, forget, eval/generate on a bundle) runs and is measured without torch, as on
# the device. `errors()` adds their error types once they are loaded.
ERRORS = (tokenizer.TokenizerError, tokenizer.TextError, corpus_lib.CorpusError,
          bundle_format.BundleError, backends.BackendError, session.InputError,
          experts.ExpertError, state.StateError, growth.GrowthError, versions.VersionError,
          compress.CompressError)
DESKTOP_ERRORS = {"moegrow.export.checkpoint": "CheckpointError",
                  "moegrow.tools.demo": "DemoError",
                  "moegrow.export.pretrain": "PretrainError",
                  "moegrow.export.bundle": "BundleError", "moegrow.tools.llama": "GGUFError"}
PRESETS = ("tiny", "small")  # export/pretrain.py PRESETS (tests/test_cli.py holds them equal)


def errors() -> tuple[type[Exception], ...]:
    """The error types the CLI reports in one line (exit 2): the runtime's, and those of
    the desktop modules loaded so far."""
    return ERRORS + tuple(getattr(sys.modules[m], name) for m, name in DESKTOP_ERRORS.items()
                          if m in sys.modules)
BACKENDS = ["torch", *backends.ENGINES]
BACKEND_HELP = ("Engine: torch for checkpoint folders; executorch (default) or onnxruntime "
                "for bundles.")


def fail(message: str) -> None:
    click.echo(f"moegrow: error: {message}", err=True)
    sys.exit(2)


def emit(result: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(result) if as_json else text)


def read_text(path: Path) -> str:
    """A UTF-8 text file, strictly decoded; empty files are refused."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise tokenizer.TextError(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at "
                                  f"offset {e.start})") from None
    if not text.strip():
        raise tokenizer.TextError(f"{path}: empty text")
    return text


def text_chunks(path: Path, size: int = 1 << 20) -> Iterator[str]:
    """A UTF-8 file in pieces of about `size` bytes cut at line ends. A first pass checks that
    all of it decodes and is not blank, so bad input is refused before anything is observed;
    memory stays bounded by `size` (and the longest line)."""
    decoder, offset, blank = codecs.getincrementaldecoder("utf-8")(), 0, True
    with path.open("rb") as f:
        while block := f.read(size):
            try:
                text = decoder.decode(block)
            except UnicodeDecodeError as e:
                raise tokenizer.TextError(f"{path}: not UTF-8 text (byte {block[e.start]:#04x} "
                                          f"at offset {offset + e.start})") from None
            blank, offset = blank and not text.strip(), offset + len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise tokenizer.TextError(f"{path}: not UTF-8 text (truncated at the end)") from None
    if blank:
        raise tokenizer.TextError(f"{path}: empty text")

    def pieces() -> Iterator[str]:
        with path.open(encoding="utf-8", newline="") as f:
            lines, n = [], 0
            for line in f:
                lines.append(line)
                n += len(line)
                if n >= size:
                    yield "".join(lines)
                    lines, n = [], 0
            if lines:
                yield "".join(lines)
    return pieces()


def open_target(target: str):
    from moegrow.export import checkpoint

    model = checkpoint.load(target)
    return model, checkpoint.load_tokenizer(target, model.args.vocab_size)


def open_bundle(target: str, backend: str | None) -> runtime.Runtime | None:
    """A `Runtime` when TARGET is a bundle, None for a checkpoint folder."""
    if not (Path(target) / bundle_format.MANIFEST).is_file():
        if backend not in (None, "torch"):
            raise bundle_format.BundleError(f"{target}: not a bundle; backend {backend} runs "
                                            "bundles (make one with `moegrow export`)")
        return None
    if backend == "torch":
        raise backends.BackendError(f"{target}: a bundle runs on executorch or onnxruntime; "
                                    "torch runs checkpoint folders")
    return runtime.open(target, backend or "executorch")


def progressbar(length: int, label: str):
    return click.progressbar(length=length, label=label, file=sys.stderr)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", is_flag=True, envvar="MOEGROW_VERBOSE",
              help="Show the engines' own output (torch, torchao, ExecuTorch and ONNX "
                   "Runtime warnings and logs); by default it goes to a log file in the "
                   "cache folder, named when a command fails and removed when it succeeds.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """moegrow: grow small Mixture-of-Experts language models on the device."""
    ctx.with_resource(console.quiet(verbose))


@cli.group()
def corpus() -> None:
    """Benchmark corpora from Debian packages."""


@corpus.command("fetch")
@click.argument("names", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder that receives one DOMAIN/{train,heldout}.txt pair per domain.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def corpus_fetch(names: tuple[str, ...], out: Path, as_json: bool) -> None:
    """Download and extract corpora NAMES: base, fortunes, fortunes-de, fortunes-es.

    Uses `apt-get download` and `dpkg -x` (no root needed once package lists exist) and
    splits every domain 80/20 into train and held-out by a hash of each entry.
    """
    result = corpus_lib.fetch(list(names), out, progress=lambda m: click.echo(m, err=True))
    lines = [f"{d}: {r['train_entries']} train / {r['heldout_entries']} held-out entries"
             for d, r in result.items()]
    emit(result, as_json, "\n".join(lines))


@cli.command()
@click.option("--corpus", "corpus_dir", required=True, type=click.Path(path_type=Path),
              help="Folder holding train.txt (and heldout.txt), e.g. data/corpus/base.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Checkpoint folder to write; an unfinished run there is resumed.")
@click.option("--preset", type=click.Choice(PRESETS), default="tiny",
              show_default=True, help="tiny: ~1.4M params, minutes; small: ~9M, the default.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Optimizer steps (default: the preset's).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of every random choice (runs with one seed repeat).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def pretrain(corpus_dir: Path, out: Path, preset: str, steps: int | None, seed: int,
             as_json: bool) -> None:
    """Train a SentencePiece tokenizer and an MoE from scratch into an HF-format folder."""
    from moegrow.export import pretrain as pretrain_lib

    total = steps or pretrain_lib.PRESETS[preset]["steps"]
    with click.progressbar(length=total, label="pretraining", file=sys.stderr,
                           item_show_func=lambda p: p and f"loss {p.loss:.3f} "
                           f"{p.tokens_per_s:,.0f} tok/s") as bar:
        def progress(p: pretrain_lib.Progress) -> None:
            bar.update(p.step - bar.pos, p)
        result = pretrain_lib.pretrain(corpus_dir, out, preset=preset, steps=steps, seed=seed,
                                       progress=progress)
    emit(result, as_json, "\n".join(f"{k}: {v}" for k, v in result.items()))


@cli.command("eval")
@click.argument("target")
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path),
              help="UTF-8 text file to score.")
@click.option("--backend", type=click.Choice(BACKENDS), default=None, help=BACKEND_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_(target: str, text_file: Path, backend: str | None, as_json: bool) -> None:
    """Perplexity and top-1/top-3 next-token accuracy of TARGET on a text.

    TARGET is a checkpoint folder, `default`, or a bundle. Tokens are [BOS] + encode(text);
    every token after BOS is predicted once.
    """
    text = read_text(text_file)
    rt = open_bundle(target, backend)
    if rt is not None:
        result = rt.score(text)
    else:
        result = _eval_torch(target, text)
    emit(result, as_json, f"ppl {result['ppl']:.3f}  nll {result['nll']:.4f}  "
         f"tokens {result['tokens']}  top1 {result['top1']:.3f}  top3 {result['top3']:.3f}")


def _eval_torch(target: str, text: str) -> dict:
    from moegrow.export import evaluate

    model, tok = open_target(target)
    with progressbar(1, "scoring") as bar:
        def progress(done: int, total: int) -> None:
            bar.length = total
            bar.update(done - bar.pos)
        return evaluate.evaluate(model, tok, text, progress=progress)


@cli.command()
@click.argument("target")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new", type=click.IntRange(min=1), default=32, show_default=True,
              help="Most new tokens to generate.")
@click.option("--backend", type=click.Choice(BACKENDS), default=None, help=BACKEND_HELP)
def generate(target: str, prompt: str, max_new: int, backend: str | None) -> None:
    """Continue PROMPT greedily with TARGET (a checkpoint folder, `default`, or a bundle)."""
    rt = open_bundle(target, backend)
    if rt is not None:
        pieces = rt.generate(prompt, max_new=max_new)
    else:
        from moegrow.export import generate as generate_lib

        model, tok = open_target(target)
        pieces = generate_lib.generate(model, tok, prompt, max_new=max_new)
    first = next(pieces, "")  # errors (prompt too long) surface before anything is printed
    click.echo(prompt + first, nl=False)
    for piece in pieces:
        click.echo(piece, nl=False)
    click.echo()


@cli.command("export")
@click.argument("target")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="The bundle folder to create (must not exist).")
@click.option("--bits", type=click.Choice(["32", "8", "4"]), default="32", show_default=True,
              help="Weight bits: 32 (fp32), 8 or 4 (attention and experts; head int8; router "
                   "fp32).")
@click.option("--engines", default="executorch,onnxruntime", show_default=True,
              help="Comma-separated engines to lower the programs to.")
@click.option("--budget-mb", type=click.FloatRange(min=0, min_open=True),
              help="Bytes (in MB, 10^6) allowed on the device for expert weights (every "
                   "slot, fixed at export) plus a growth slice's learning state (what is "
                   "left: each changed expert's fp32 weights, gradient and two Adam "
                   "moments); default: what the experts take plus, with deepening, a "
                   "default slice's learning state (top-k experts per layer).")
@click.option("--calibration", "calibration_file", type=click.Path(path_type=Path),
              help="Held-out base text (UTF-8, >= 2,048 tokens) to measure the error map's "
                   "baseline on; default: the checkpoint's calibration.txt (the default "
                   "model has one). Without any, `errormap` gives no verdicts.")
@click.option("--deepen/--no-deepen", default=None,
              help="Lower the predictive-coding deepening programs (default: at 32 bits only; "
                   "a quantized bundle's run through its frozen quantized weights and train "
                   "its spare slots: it grows clones of its quantized experts there).")
@click.option("--strict-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also lower strict predictive-coding deepening programs with this many "
                   "relaxation steps (needs the deepening programs; export time grows with "
                   "the steps).")
@click.option("--spare", type=click.IntRange(min=0),
              help="Empty fp32 expert slots per layer that growth can spawn into (counted in "
                   "the budget; read only once something is spawned); default 2 with the "
                   "deepening programs, else 0.")
@click.option("--pool", type=click.IntRange(min=0), default=0, show_default=True,
              help="Quantized expert slots per layer and pool width after the spare ones, "
                   "where `compress` moves converged clones (freeing their fp32 spare slots "
                   "for the next spawn); needs spare slots.")
@click.option("--pool-bits", default="4", show_default=True,
              help="The pool's widths, comma-separated, of 8, 4 and 2 (e.g. 8,4 or 8,4,2; "
                   "--pool slots each). int2 slots: four levels per group of 32 (ONNX "
                   "Runtime's 2-bit MatMulNBits; ExecuTorch dequantizes them in the graph).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export_(target: str, out: Path, bits: str, engines: str, budget_mb: float | None,
            calibration_file: Path | None, deepen: bool | None, strict_steps: int,
            spare: int | None, pool: int, pool_bits: str, as_json: bool) -> None:
    """Lower TARGET (a checkpoint folder or `default`) into a bundle for the device: the
    programs prefill, decode, score, observe (and the deepening sweeps) for each engine, the
    weight files they load, and the error map's baseline."""
    from moegrow.export import bundle as bundle_lib

    names = tuple(e.strip() for e in engines.split(",") if e.strip())
    budget = None if budget_mb is None else int(budget_mb * 1e6)
    calibration = None if calibration_file is None else read_text(calibration_file)
    with console.Bars() as bars:
        manifest = bundle_lib.export(target, out, names, progress=bars, bits=int(bits),
                                     budget=budget, calibration=calibration,
                                     strict_steps=strict_steps, spare=spare, deepen=deepen,
                                     pool=pool, pool_bits=_bits(pool_bits))
    files = {e["file"]: e["bytes"] for p in manifest["programs"].values() for e in p.values()}
    weights = sum(e["bytes"] for e in manifest["weights"]["files"].values())
    emit(manifest, as_json, f"{out}: {len(files)} program files "
         f"{sum(files.values()) / 1e6:.1f} MB, weight files {weights / 1e6:.1f} MB; experts "
         f"{manifest['budget']['experts'] / 1e6:.1f} MB and a slice's learning state "
         f"{manifest['budget'].get('learning', 0) / 1e6:.1f} MB of the "
         f"{manifest['budget']['bytes'] / 1e6:.1f} MB budget")


def _bits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise click.BadParameter(f"--pool-bits: {text!r} is not a list of bit widths "
                                 "(of 8, 4 and 2: e.g. 8,4)") from None


@cli.command()
@click.argument("bundle_dir", metavar="BUNDLE")
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path),
              help="UTF-8 text the user wrote (read in pieces of about 1 MB).")
@click.option("--domain", default="default", show_default=True,
              help="Tag of the text's domain in the error map.")
@click.option("--backend", type=click.Choice(list(backends.ENGINES)), default="executorch",
              show_default=True, help="The engine that scores the text.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def observe(bundle_dir: str, text_file: Path, domain: str, backend: str, as_json: bool) -> None:
    """Score real text with the error taps and add them to BUNDLE's error map (state/ in the
    bundle) and its tokens to the bounded replay buffer."""
    pieces = text_chunks(text_file)
    rt = runtime.open(bundle_dir, backend)
    tokens, nll = 0, 0.0
    with progressbar(text_file.stat().st_size, "observing") as bar:
        for piece in pieces:
            if piece.strip():
                r = rt.observe(piece, domain)
                tokens, nll = tokens + r["tokens"], nll + r["nll"] * r["tokens"]
            bar.update(len(piece.encode()))
    result = {"domain": domain, "tokens": tokens, "nll": nll / tokens,
              "ppl": float(np.exp(nll / tokens))}
    emit(result, as_json, f"{domain}: observed {tokens} tokens, ppl {result['ppl']:.3f}")


@cli.command("errormap")
@click.argument("bundle_dir", metavar="BUNDLE")
@click.option("--domain", default=None, help="Only this domain (default: all, pooled).")
@click.option("--plot", "plot_file", type=click.Path(path_type=Path),
              help="Write a PNG heat map (layers x experts, one panel per domain).")
@click.option("--json", "as_json", is_flag=True, help="Print the map as JSON.")
def errormap_(bundle_dir: str, domain: str | None, plot_file: Path | None,
              as_json: bool) -> None:
    """The error map of BUNDLE: per layer and expert, how often it was chosen and the mean,
    spread and moving average of the PC update size g|e||h| on observed text; and per
    domain a verdict: nothing (too little to learn: the domain's own earlier text predicts
    its later text hardly better than the model does), else deepen (naming experts) or
    spawn (naming layers: the text is closer to meaningless to the model than to its base
    text)."""
    b = bundle_format.load(bundle_dir)
    store = errormap.Store(b.path)
    layers, experts_n = b.config["num_hidden_layers"], layout.dims(b.config)[0]
    seen = store.read(domain)
    result = errormap.summary(seen, layers, experts_n)
    calibration = b.manifest.get("calibration")
    k = b.config["num_experts_per_tok"]
    result["verdicts"] = verdicts.judge(seen, calibration, k) if calibration else {}
    if plot_file is not None:
        names = [domain] if domain is not None else sorted(result["domains"])
        if not names or not result["domains"]:
            raise state.StateError(f"{bundle_dir}: nothing observed yet; nothing to plot")
        maps = {d: errormap.summary(store.read(d), layers, experts_n) for d in names}
        errormap.plot(maps, plot_file, f"moegrow error map: {bundle_dir}", result["verdicts"])
    lines = [f"{d}: {v['tokens']} tokens, ppl {np.exp(v['nll']):.2f}"
             for d, v in result["domains"].items()] or ["nothing observed yet"]
    for d, v in result["verdicts"].items():
        named = ([f"{layer}/{e}" for layer, e in v["experts"]] if v["verdict"] == "deepen" else
                 [f"layer {x}" for x, y in v["layers"].items() if y["named"]])
        lines.append(f"{d}: {v['verdict']} (learnable {v['learnable']:.0%}, at least "
                     f"{max(v['learnable_low'], 0):.0%}; novelty {v['novelty']:.2f} +- "
                     f"{v['novelty_se']:.2f}){': ' + ', '.join(named) if named else ''}")
    if calibration is None:
        lines.append("no verdicts: the bundle has no baseline (export it with --calibration)")
    lines += [f"layer {x['layer']}: " + " ".join(f"{e['mean']:.3f}" for e in x["experts"])
              for x in result["layers"]]
    emit(result, as_json, "\n".join(lines))


@cli.command()
@click.argument("bundle_dir", metavar="BUNDLE")
def forget(bundle_dir: str) -> None:
    """Clear BUNDLE's error map and replay buffer (the observed text it keeps)."""
    b = bundle_format.load(bundle_dir)
    errormap.Store(b.path).forget()
    click.echo(f"{bundle_dir}: error map and replay buffer cleared")


@cli.command()
@click.argument("target", default="default")
@click.option("--backend", type=click.Choice(list(backends.ENGINES)), default="onnxruntime",
              show_default=True, help="The engine that serves and grows the bundle.")
@click.option("--keep", type=click.Path(path_type=Path),
              help="Leave the grown bundle in this new folder (default: a temporary one).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON (the "
              "narration goes to stderr).")
def demo(target: str, backend: str, keep: Path | None, as_json: bool) -> None:
    """Watch the model adapt to a user's text, offline: TARGET (default: the embedded
    default model) exported once to a cached int8 bundle, then on a copy: suggestions for a
    kind of text it never saw, `observe` of a shipped sample of it (The Devil's Dictionary,
    public domain), the error map's verdict, one `idle` growth slice, the suggestions and
    perplexities after, the version log and a rollback. About a minute on 2 cores once the
    bundle is cached (the first run exports it: about two minutes more)."""
    from moegrow.tools import demo as demo_lib

    result = demo_lib.run(target, backend, keep,
                          say=lambda m: click.echo(m, err=as_json))
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"\n{result['seconds']:.0f} s in all"
                   + ("" if result["exported"] else " (the bundle came from the cache)"))


def main(argv: list[str] | None = None) -> None:
    from moegrow.tools import grow_cli
    from moegrow.tools.bench_cli import bench

    cli.add_command(bench)
    for command in (grow_cli.idle, grow_cli.versions_, grow_cli.rollback, grow_cli.compress,
                    grow_cli.budget):
        cli.add_command(command)
    try:
        cli.main(argv, prog_name="moegrow", standalone_mode=False)
    except click.exceptions.Abort:
        fail("aborted" + console.done(False))
    except click.ClickException as e:
        fail(e.format_message() + console.done(False))
    except errors() as e:
        fail(str(e) + console.done(False))
    except OSError as e:
        fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": ") + console.done(False))
    except BaseException:
        console.done(False)
        raise
    console.done(True)


if __name__ == "__main__":
    main()
