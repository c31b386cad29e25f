"""The CLI contract: --json outputs, and one clear line with exit code 2 for bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_cli as run
from conftest import snapshot


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


def test_help_explains_every_command(capsys):
    for cmd in ("corpus", "pretrain", "eval", "generate", "demo"):
        code, out, _ = run(capsys, cmd, "--help")
        assert code == 0 and "Usage: moegrow" in out
