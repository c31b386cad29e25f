"""The embedded default model: present, loadable by name, with what the demo needs (its
loop is tested on a tiny checkpoint: tests/test_demo.py)."""

from __future__ import annotations

from moegrow.export import checkpoint


def test_default_names_the_embedded_model():
    model = checkpoint.load("default")
    tok = checkpoint.load_tokenizer("default", model.args.vocab_size)
    params = sum(p.numel() for p in model.parameters())
    assert 5e6 <= params <= 15e6  # the `small` preset: ~9M parameters, 8 experts top-2
    assert model.args.num_local_experts == 8 and model.args.num_experts_per_tok == 2
    assert tok.decode(tok.encode("import os")) == "import os"


def test_the_demo_has_its_texts():
    from moegrow.export import bundle
    from moegrow.tools import demo

    calibration = checkpoint.resolve("default") / bundle.CALIBRATION
    assert len(calibration.read_text(encoding="utf-8")) > 20_000  # the base text measured
    seen, held = demo.sample()  # the shipped user text, its held-out part apart
    assert len(seen) > 50_000 and len(held) > 15_000
    assert not set(seen.split("\n\n")) & set(held.split("\n\n"))
    assert (demo.SAMPLE.parent / "README.md").is_file()  # its source and license
