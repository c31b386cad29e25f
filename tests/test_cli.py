"""The CLI contract: --json outputs, and one clear line with exit code 2 for bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import BITS, snapshot
from conftest import run_cli as run


def test_eval_json(capsys, tiny_ckpt, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The parser reads the next word. Our user writes plain text.")
    code, out, err = run(capsys, "eval", str(tiny_ckpt), "--text", str(text), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == {"ppl", "nll", "tokens", "top1", "top3"}
    assert result["ppl"] > 1 and 0 <= result["top1"] <= result["top3"] <= 1


def test_eval_long_text_uses_windows_and_counts_every_token(capsys, tiny_ckpt, tmp_path):
    from moegrow.export import checkpoint

    tok = checkpoint.load_tokenizer(tiny_ckpt)
    text = "The router stores every file. " * 60
    (tmp_path / "long.txt").write_text(text)
    code, out, _ = run(capsys, "eval", str(tiny_ckpt), "--text", str(tmp_path / "long.txt"),
                       "--json")
    assert code == 0
    assert json.loads(out)["tokens"] == len(tok.encode(text)) > 128  # the tiny context


def test_generate_prints_the_prompt_and_a_continuation(capsys, tiny_ckpt):
    code, out, err = run(capsys, "generate", str(tiny_ckpt), "--prompt", "The parser",
                         "--max-new", "8")
    assert code == 0, err
    assert out.startswith("The parser") and len(out.strip()) > len("The parser")


def test_generate_keeps_the_space_before_the_continuation(tiny_ckpt):
    """The continuation reads as the prompt and the greedy tokens decoded together (a
    SentencePiece word piece decoded alone loses its leading space)."""
    import torch
    from moegrow.export import checkpoint
    from moegrow.export import generate as generate_lib

    model = checkpoint.load(tiny_ckpt).eval()
    tok = checkpoint.load_tokenizer(tiny_ckpt, model.args.vocab_size)
    text = "".join(generate_lib.generate(model, tok, "The parser", max_new=8))
    ids = [1, *tok.encode("The parser")]
    with torch.no_grad():
        for _ in range(8):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            if token == 2:
                break
            ids.append(token)
    assert "The parser" + text == tok.decode(ids[1:]) and len(ids) > 3


def bad(tmp_path, tiny_ckpt):
    """Named bad inputs -> the words their error line must contain."""
    folders = {}
    for name in ("corrupt", "foreign", "mismatch", "notok"):
        folders[name] = tmp_path / name
        shutil.copytree(tiny_ckpt, folders[name])
    (folders["corrupt"] / "model.safetensors").write_bytes(b"\x00" * 100)
    cfg = json.loads((folders["foreign"] / "config.json").read_text())
    (folders["foreign"] / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    cfg = json.loads((folders["mismatch"] / "config.json").read_text())
    (folders["mismatch"] / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64}))
    (folders["notok"] / "tokenizer.model").unlink()
    return folders


@pytest.mark.parametrize("case,words", [
    ("missing", "not a checkpoint folder"),
    ("corrupt", "corrupt weights"),
    ("foreign", "unsupported model_type 'gpt2'"),
    ("mismatch", "shape"),
    ("notok", "tokenizer.model: missing"),
])
def test_bad_checkpoints(capsys, tmp_path, tiny_ckpt, case, words):
    folders = bad(tmp_path, tiny_ckpt)
    target = folders.get(case, tmp_path / "nowhere")
    text = tmp_path / "t.txt"
    text.write_text("hello")
    before = snapshot(tmp_path)
    code, out, err = run(capsys, "eval", str(target), "--text", str(text))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and words in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("content,words", [
    (b"", "empty text"),
    (b" \n\n ", "empty text"),
    (b"caf\xe9", "not UTF-8 text (byte 0xe9 at offset 3)"),
])
def test_bad_text(capsys, tmp_path, tiny_ckpt, content, words):
    text = tmp_path / "t.txt"
    text.write_bytes(content)
    code, _, err = run(capsys, "eval", str(tiny_ckpt), "--text", str(text))
    assert code == 2 and words in err and err.count("\n") == 1


def test_unreadable_and_missing_paths(capsys, tmp_path, tiny_ckpt):
    code, _, err = run(capsys, "eval", str(tiny_ckpt), "--text", str(tmp_path / "none.txt"))
    assert code == 2 and "none.txt" in err and err.count("\n") == 1
    code, _, err = run(capsys, "eval", str(tiny_ckpt), "--text", str(tmp_path))
    assert code == 2 and err.count("\n") == 1


def test_prompt_longer_than_the_context(capsys, tiny_ckpt):
    code, _, err = run(capsys, "generate", str(tiny_ckpt), "--prompt", "word " * 300)
    assert code == 2 and "exceeds the model's context of 128" in err


def test_usage_errors_exit_2(capsys):
    code, _, err = run(capsys, "eval")
    assert code == 2 and "Missing argument" in err
    code, _, err = run(capsys, "pretrain", "--corpus", "x", "--out", "y", "--preset", "huge")
    assert code == 2 and err.count("\n") == 1
    code, _, err = run(capsys, "corpus", "fetch", "klingon", "--out", "z")
    assert code == 2 and "klingon" in err


def test_the_device_side_of_the_cli_loads_no_torch(tmp_path):
    """The CLI and the device runtime import no torch until a desktop command needs it (a
    device-side command's memory is the device's), and the pretrain presets it offers are
    pretrain's."""
    import subprocess
    import sys

    from moegrow.export import pretrain
    from moegrow.tools import cli

    code = ("import sys; import moegrow.tools.cli, moegrow.tools.adapt_pc, moegrow.runtime; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    assert set(cli.PRESETS) == set(pretrain.PRESETS)


def _commands(group, path=()):
    import click

    for name, command in group.commands.items():
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


def test_help_explains_every_command(capsys):
    """Every command and subcommand the CLI registers (walked from the click group, so a
    new one is checked too): `--help` works, says what it does, and explains every option."""
    import click
    from moegrow.tools import cli

    run(capsys, "--help")  # registers the late commands (bench, idle, ...)
    seen = list(_commands(cli.cli))
    names = [path for path, _ in seen]
    assert {p[0] for p in names} >= {"export", "observe", "idle", "rollback", "forget", "demo",
                                     "bench"}
    assert {p[1] for p in names if len(p) > 1} >= {"adapt", "crash", "soak", "strict"}
    for path, command in seen:
        code, out, _ = run(capsys, *path, "--help")
        assert code == 0 and f"Usage: moegrow {' '.join(path)}" in out, path
        assert len((command.help or "").split()) >= 5, path  # says what it does
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help and len(param.help.split()) >= 2 or param.is_flag, \
                    (path, param.name)


@pytest.mark.slow
@pytest.mark.parametrize("bits", BITS)
def test_export_then_eval_generate_observe_through_each_engine(capsys, exports, bits, tmp_path):
    """`moegrow export` at every bit width with both engines (conftest.exports: a fresh
    process each, no traceback on stderr), then `eval`, `generate` and `observe` through
    each engine: the same tokens and perplexity as the torch reference of the bundle
    (within 2% at 8 and 4 bits, whose engines quantize activations too), the same greedy
    text at fp32, and the observed tokens counted in the error map."""
    from moegrow.export import reference
    from moegrow.runtime import session

    out, ckpt, code, err = exports["mixtral", bits].result()
    assert code == 0 and "Traceback" not in err, err
    bundle = tmp_path / "b"
    shutil.copytree(out, bundle)
    text = tmp_path / "t.txt"
    text.write_text("The parser reads the next word. Our user writes plain text.\n\n"
                    "Every expert routes the error map. The cache stores a short answer.")
    rt = session.open(bundle, "onnxruntime")
    ref = session.Runtime(rt.bundle, "torch", engine=reference.load(ckpt, rt.bundle.manifest))
    want = ref.score(text.read_text())
    greedy = "".join(ref.generate("The router", max_new=12))
    for engine in ("executorch", "onnxruntime"):
        code, got, err = run(capsys, "eval", str(bundle), "--text", str(text), "--backend",
                             engine, "--json")
        assert code == 0, err
        got = json.loads(got)
        assert got["tokens"] == want["tokens"]
        assert abs(got["ppl"] / want["ppl"] - 1) <= (1e-4 if bits == 32 else 0.02), engine
        code, got, err = run(capsys, "generate", str(bundle), "--prompt", "The router",
                             "--max-new", "12", "--backend", engine)
        assert code == 0 and got.startswith("The router"), err
        if bits == 32:
            assert got.strip() == f"The router{greedy}".strip(), engine
        code, got, err = run(capsys, "observe", str(bundle), "--text", str(text), "--domain",
                             engine, "--backend", engine, "--json")
        assert code == 0, err
        assert json.loads(got)["tokens"] == want["tokens"]
    if bits == 8:  # as exported by default: no deepening programs, no spare slots
        code, _, err = run(capsys, "idle", str(bundle), "--seconds", "5")
        assert code == 2 and "cannot grow" in err and err.count("\n") == 1, err
    code, got, err = run(capsys, "errormap", str(bundle), "--json")
    assert code == 0, err
    domains = json.loads(got)["domains"]
    assert {d: domains[d]["tokens"] for d in ("executorch", "onnxruntime")} == {
        "executorch": want["tokens"], "onnxruntime": want["tokens"]}
