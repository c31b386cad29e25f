"""SentencePiece training, byte fallback and the round trip on arbitrary UTF-8."""

from __future__ import annotations

import pytest
from conftest import synthetic_text
from hypothesis import given, settings
from hypothesis import strategies as st
from moegrow.export import tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    lines = synthetic_text(400).split("\n")
    return tokenizer.train(lines, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=600)


# U+2581 is SentencePiece's space marker and decodes as a space (documented limitation).
texts = st.text(st.characters(blacklist_characters="\u2581", blacklist_categories=("Cs",)))


@settings(max_examples=300, deadline=None)
@given(texts)
def test_any_utf8_text_round_trips(tok, s):
    ids = tok.encode(s)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == s


def test_unseen_characters_use_byte_pieces_not_unk(tok):
    ids = tok.encode("ꙮ𝔘")
    assert tokenizer.UNK not in ids
    assert tok.decode(ids) == "ꙮ𝔘"


def test_training_is_deterministic(tmp_path):
    lines = synthetic_text(300).split("\n")
    a = tokenizer.train(lines, tmp_path / "a.model", vocab_size=500, seed=3)
    b = tokenizer.train(lines, tmp_path / "b.model", vocab_size=500, seed=3)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a.encode("The router reads plain text.") == b.encode("The router reads plain text.")


def test_not_a_model_is_a_typed_error(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00not a sentencepiece model")
    with pytest.raises(tokenizer.TokenizerError, match="bad.model"):
        tokenizer.Tokenizer(bad)
