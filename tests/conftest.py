"""Shared fixtures: tiny models and text built offline, never downloaded."""

from __future__ import annotations

import random
import time

import pytest
import torch

SUBJECTS = ["the parser", "a small model", "the keyboard", "this module", "every expert",
            "the router", "our user", "the function", "a new domain", "the cache"]
VERBS = ["reads", "predicts", "returns", "learns", "routes", "stores", "writes", "checks"]
OBJECTS = ["the next word", "a list of tokens", "the error map", "plain text", "its own notes",
           "a short answer", "the last line", "every file"]
EXTRAS = ["Grüße aus München!", "¿Qué tal?", "東京", "emoji 🙂", "x = 42", "a\ttab"]


def synthetic_text(entries: int, seed: int = 0) -> str:
    """Entries of grammatical nonsense with some non-ASCII, separated by blank lines."""
    rng = random.Random(seed)
    out = []
    for _ in range(entries):
        sentences = [f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} "
                     f"{rng.choice(OBJECTS)}." for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.2:
            sentences.append(rng.choice(EXTRAS))
        out.append(" ".join(sentences))
    return "\n\n".join(out) + "\n\n"


DE_SUBJECTS = ["der parser", "ein kleines modell", "die tastatur", "jedes modul", "unser nutzer"]
DE_VERBS = ["liest", "schreibt", "lernt", "prüft", "speichert"]
DE_OBJECTS = ["das nächste wort", "eine liste", "die fehlerkarte", "den text", "die letzte zeile"]


def german(entries: int, seed: int = 0) -> str:
    """A new domain for the tiny model: German-like sentences it never saw."""
    rng = random.Random(seed)
    return "\n\n".join(" ".join(f"{rng.choice(DE_SUBJECTS).capitalize()} {rng.choice(DE_VERBS)} "
                                f"{rng.choice(DE_OBJECTS)}." for _ in range(3))
                       for _ in range(entries))


def random_moe(args):
    """A Mixtral-layout model of `args` with seeded random weights (std 0.2), in eval mode."""
    from moegrow.export import pretrain
    from moegrow.export.models import mixtral

    torch.manual_seed(0)
    m = mixtral.build(args)
    pretrain.init_weights(m, std=0.2)
    return m.eval()


def deepen_autograd(model, layer: int, tokens, valid, slots=None):
    """Autograd through the eager deepening loss (`pc.Loss`: routers fixed) -> d nll /
    d (gate, up, down) of `layer`'s experts as [E, F, C], [E, F, C], [E, C, F], the error
    eps at the layer's output [W, C] and the gates [W, E]: what `deepen{layer}` computes."""
    from moegrow.export import pc, programs

    loss = pc.Loss(model, [layer])
    mlp = loss.model.model.layers[layer].mlp
    weights = [mlp.get_parameter(n) for n in pc.expert_weights(mlp)]
    for w in weights:
        w.requires_grad_(True)
    c = model.args.hidden_size
    probe = torch.zeros(1, tokens.shape[1], c, requires_grad=True)
    slots = programs.slot_state(loss.model) if slots is None else slots
    total, (_, gates, *_) = loss(tokens, valid, probe, slots)
    *grads, eps = torch.autograd.grad(total, [*weights, probe])
    return (*pc.stack(mlp.hidden, grads), eps[0], gates[0].detach())


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "train.txt").write_text(synthetic_text(1500, seed=1))
    (d / "heldout.txt").write_text(synthetic_text(200, seed=2))
    return d


@pytest.fixture(scope="session")
def tiny_ckpt(corpus_dir, tmp_path_factory):
    """A tiny model pretrained for a few steps on the synthetic corpus."""
    from moegrow.export import pretrain

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    pretrain.pretrain(corpus_dir, out, preset="tiny", steps=40, seed=0)
    return out


# Tiny checkpoints of the other architectures for the backend-ops matrix (random weights,
# the tiny checkpoint's tokenizer); Mixtral's is `tiny_ckpt`.
ARCHS = {"olmoe": ("olmoe", dict(intermediate_size=64, num_experts=4, clip_qkv=3.0)),
         "qwen3_moe": ("qwen3_moe", dict(moe_intermediate_size=64, num_experts=4,
                                         head_dim=16))}
BITS = (32, 8, 4)
DEEPENING = {(arch, 32) for arch in ("mixtral", *ARCHS)} | {("mixtral", 4)}  # exports with
# the deepening programs (the rest of the matrix: serving programs only)


def export_cli(*argv: str) -> tuple[int, str]:
    """`moegrow export ARGV` in a fresh process (the real command line) -> (exit code,
    stderr)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "moegrow.tools.cli", "export", *argv],
                          capture_output=True, text=True)
    return done.returncode, done.stderr


@pytest.fixture(scope="session")
def exports(tiny_ckpt, corpus_dir, tmp_path_factory):
    """Every bundle the suite lowers, exported once through `moegrow export`, two at a time
    in the background: {(architecture, bits): future of (bundle, checkpoint, exit code,
    stderr)}. The fp32 Mixtral one is `tiny_bundle`; together they are the backend-ops
    matrix (test_backend_ops.py) and the CLI's end-to-end test (test_cli.py)."""
    from concurrent.futures import ThreadPoolExecutor

    from moegrow.export import checkpoint, pretrain
    from moegrow.export.models import olmoe, qwen3_moe

    root = tmp_path_factory.mktemp("exports")
    ckpts = {"mixtral": tiny_ckpt}
    for arch, (name, extra) in ARCHS.items():
        module = {"olmoe": olmoe, "qwen3_moe": qwen3_moe}[name]
        for layers, key in ((2, arch), (1, f"{arch}-1")):
            torch.manual_seed(0)
            model = module.build(module.ModelArgs(
                vocab_size=2048, hidden_size=64, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
                max_position_embeddings=64, **extra))
            pretrain.init_weights(model, std=0.1)
            ckpts[key] = checkpoint.save(model, root / f"{key}-ckpt",
                                         tokenizer=tiny_ckpt / checkpoint.TOKENIZER)
    jobs = {("mixtral", 32): ["--calibration", str(corpus_dir / "heldout.txt")],
            ("mixtral", 4): ["--calibration", str(corpus_dir / "heldout.txt"), "--deepen"],
            # strict PC programs: ONNX Runtime only (ExecuTorch takes ~3 min per strict
            # program, the longest lowering of all; the strict sweeps are torch math both
            # engines lower alike, as the deepen ones, which the matrix runs on both); no
            # spare slots: also the gate benchmark's peer of `tiny_bundle`
            ("mixtral", "strict"): ["--engines", "onnxruntime", "--strict-steps", "2",
                                    "--spare", "0"],
            # one spare slot and an int4 pool of two per layer: compression (test_compress)
            ("mixtral", "pool"): ["--calibration", str(corpus_dir / "heldout.txt"),
                                  "--spare", "1", "--pool", "2"],
            # the ladder's int2 rung: ONNX Runtime only (ExecuTorch serves the same pool
            # linears, `moe.Pooled`, at every width: test_compress.py lowers one alone)
            ("mixtral", "pool2"): ["--calibration", str(corpus_dir / "heldout.txt"),
                                   "--engines", "onnxruntime", "--spare", "1", "--pool", "1",
                                   "--pool-bits", "4,2"],
            # int4 with two spare slots and an int4 pool of one: open clones (int4 in
            # place) compressed and retired under another domain's clone (test_placement)
            ("mixtral", "pool4"): ["--calibration", str(corpus_dir / "heldout.txt"),
                                   "--engines", "onnxruntime", "--deepen", "--spare", "2",
                                   "--pool", "1"]}
    # the others without spare slots, and the quantized ones as `moegrow export --bits N`
    # makes them by default, without the deepening programs (`DEEPENING`): the gate and the
    # quantized sweeps are the same code for every architecture and bit width, and their
    # programs add most of the lowering time (the fp32 and int4 Mixtral ones, which grow in
    # test_growth.py, first: the tests before the matrix need only those)
    jobs |= {(arch, bits): ["--deepen", "--spare", "0"] if bits == 32 else []
             for arch in ("mixtral", *ARCHS) for bits in BITS if (arch, bits) not in jobs}

    def run(key, more):
        out = root / f"{key[0]}-{key[1]}"
        bits = key[1] if isinstance(key[1], int) else 4 if key[1] == "pool4" else 32
        # the quantized OLMoE and Qwen3-MoE bundles from one-layer checkpoints: ExecuTorch's
        # lowering time grows with the layers (each adds ~12 XNNPACK partitions), and
        # Mixtral's cover several layers at every width
        ckpt = ckpts[key[0] if key[0] == "mixtral" or bits == 32 else f"{key[0]}-1"]
        start = time.monotonic()
        code, err = export_cli(str(ckpt), "--out", str(out), "--bits", str(bits), *more)
        EXPORT_SECONDS[f"{key[0]}-{key[1]}"] = time.monotonic() - start
        return out, ckpt, code, err

    pool = ThreadPoolExecutor(2)  # exporting is single-threaded Python: two at a time
    futures = {key: pool.submit(run, key, more) for key, more in jobs.items()}
    yield futures
    pool.shutdown(cancel_futures=True)


EXPORT_SECONDS: dict[str, float] = {}  # what each export of `exports` took (wall, beside
# the tests): the suite's time is mostly ExecuTorch lowering (docs/bundle.md)


def pytest_terminal_summary(terminalreporter):
    if EXPORT_SECONDS:
        terminalreporter.write_line("export seconds: " + ", ".join(
            f"{k} {t:.0f}" for k, t in EXPORT_SECONDS.items()))


def pytest_collection_modifyitems(session, config, items):
    """Tests that need no exported bundle first, then those that do, the backend-ops matrix
    (which needs all of them) last: the exports run in the background meanwhile."""
    def order(item) -> int:
        if "exports" not in getattr(item, "fixturenames", ()):
            return 0
        return 2 if item.path.name == "test_backend_ops.py" else 1
    items.sort(key=order)


@pytest.fixture(scope="session", autouse=True)
def _start_exports(request):
    """Start the exports with the first test when any selected test needs them (the
    session's items are the selected ones by now, after -k and -m)."""
    if any("exports" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("exports")


def exported(future):
    """The bundle of an `exports` future, failing the test if its export failed."""
    out, _, code, err = future.result()
    assert code == 0 and "Traceback" not in err, err
    return out


@pytest.fixture(scope="session")
def tiny_bundle(exports):
    """The tiny checkpoint exported for both engines, fp32, with the error map's baseline
    measured on the held-out synthetic text (tests that change it copy it)."""
    return exported(exports["mixtral", 32])


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`moegrow ARGV` in-process -> (exit code, stdout, stderr)."""
    from moegrow.tools.cli import main

    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(path) -> dict:
    """Every file below `path` with its bytes: equal snapshots mean nothing changed. ONNX
    Runtime's shared packed weights (`state/prepacked`, a cache any serving run may write
    and rebuilds at will: runtime/prepacked.py) are left out."""
    return {p: p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and "prepacked" not in p.relative_to(path).parts[:-1]}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def grown(tiny_bundle, tmp_path_factory):
    """(bundle before, bundle after one committed slice, the slice's report): growth's and
    the guard's tests read it (they copy a bundle before they change it)."""
    import shutil

    from moegrow import runtime

    before = tmp_path_factory.mktemp("grow") / "before"
    shutil.copytree(tiny_bundle, before)
    rt = runtime.open(before, "onnxruntime")
    rt.observe(german(400), "de")
    after = before.with_name("after")
    shutil.copytree(before, after)
    report = runtime.open(after, "onnxruntime").idle(600, tokens=4096, steps=8)
    return before, after, report
