"""Tiny pretraining: the loss falls, runs are deterministic and resume exactly."""

from __future__ import annotations

import pytest
import torch
from moegrow.export import checkpoint, pretrain


def test_tiny_run_lowers_the_loss_and_loads_back(tiny_ckpt):
    model = checkpoint.load(tiny_ckpt)
    assert model.args.num_local_experts == 4
    state = torch.load(tiny_ckpt / pretrain.STATE, weights_only=False)
    assert state["step"] == 40
    tok = checkpoint.load_tokenizer(tiny_ckpt, model.args.vocab_size)
    ids = torch.tensor([[1] + tok.encode("The parser reads the next word.")])
    logits = model(ids)
    assert torch.isfinite(logits).all()


def test_loss_falls(corpus_dir, tmp_path):
    result = pretrain.pretrain(corpus_dir, tmp_path / "run", preset="tiny", steps=30)
    assert result["last_loss"] < 0.6 * result["first_loss"]
    assert result["heldout_loss"] < result["first_loss"]


def test_same_seed_same_weights_and_resume_is_exact(corpus_dir, tmp_path):
    pretrain.pretrain(corpus_dir, tmp_path / "a", preset="tiny", steps=12, seed=5)

    def crash_at_8(p: pretrain.Progress) -> None:
        if p.step == 8:
            raise KeyboardInterrupt  # the last save was at step 6

    with pytest.raises(KeyboardInterrupt):
        pretrain.pretrain(corpus_dir, tmp_path / "b", preset="tiny", steps=12, seed=5,
                          save_every=3, progress=crash_at_8)
    assert torch.load(tmp_path / "b" / pretrain.STATE, weights_only=False)["step"] == 6
    pretrain.pretrain(corpus_dir, tmp_path / "b", preset="tiny", steps=12, seed=5, save_every=3)
    a, b = (checkpoint.load(tmp_path / n).state_dict() for n in "ab")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_bad_corpus_is_a_typed_error_and_writes_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(pretrain.PretrainError, match="train.txt"):
        pretrain.pretrain(tmp_path / "empty", tmp_path / "out", steps=2)
    assert not (tmp_path / "out").exists()
    (tmp_path / "latin").mkdir()
    (tmp_path / "latin" / "train.txt").write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(pretrain.PretrainError, match="not UTF-8"):
        pretrain.pretrain(tmp_path / "latin", tmp_path / "out", steps=2)
    assert not (tmp_path / "out").exists()


def test_too_little_text_writes_nothing(tmp_path):
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "train.txt").write_text("Just one short line.\n\n")
    with pytest.raises(pretrain.PretrainError, match="too little text"):
        pretrain.pretrain(tmp_path / "small", tmp_path / "out", steps=2)
    assert not (tmp_path / "out").exists()
