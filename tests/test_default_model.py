"""The embedded default model: present, loadable by name, and the demo runs on it offline."""

from __future__ import annotations

from moegrow.export import checkpoint
from moegrow.tools.cli import main


def test_default_names_the_embedded_model():
    model = checkpoint.load("default")
    tok = checkpoint.load_tokenizer("default", model.args.vocab_size)
    params = sum(p.numel() for p in model.parameters())
    assert 5e6 <= params <= 15e6  # the `small` preset: ~9M parameters, 8 experts top-2
    assert model.args.num_local_experts == 8 and model.args.num_experts_per_tok == 2
    assert tok.decode(tok.encode("import os")) == "import os"


def test_demo_runs_offline(capsys):
    main(["demo"])
    out = capsys.readouterr().out
    assert "Keyboard suggestions" in out and "Note completion" in out
