"""Shared fixtures: tiny models and text built offline, never downloaded."""

from __future__ import annotations

import random

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


def random_moe(args):
    """A Mixtral-layout model of `args` with seeded random weights (std 0.2), in eval mode."""
    from moegrow.export import pretrain
    from moegrow.export.models import mixtral

    torch.manual_seed(0)
    m = mixtral.build(args)
    pretrain.init_weights(m, std=0.2)
    return m.eval()


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


@pytest.fixture(scope="session")
def tiny_bundle(tiny_ckpt, corpus_dir, tmp_path_factory):
    """The tiny checkpoint exported for both engines, fp32, with the error map's baseline
    measured on the held-out synthetic text and 2-step strict PC programs (tests that
    change it copy it)."""
    from moegrow.export import bundle

    out = tmp_path_factory.mktemp("bundle") / "b"
    bundle.export(tiny_ckpt, out, calibration=(corpus_dir / "heldout.txt").read_text(),
                  strict_steps=2)
    return out


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
    """Every file below `path` with its bytes: equal snapshots mean nothing changed."""
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
