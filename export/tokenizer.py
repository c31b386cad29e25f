"""SentencePiece tokenizer: training with byte fallback (any UTF-8 text encodes) and loading.

Normalization is the identity and whitespace is kept as typed, so `decode(encode(s)) == s`
for every string except those holding U+2581, SentencePiece's own space marker.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm

UNK, BOS, EOS = 0, 1, 2


class TokenizerError(Exception):
    """A tokenizer file that is missing or not a SentencePiece model."""


class Tokenizer:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    bos_id, eos_id = BOS, EOS

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def piece(self, token: int) -> str:
        return self.sp.id_to_piece(int(token))


def train(lines: list[str], out: str | os.PathLike, vocab_size: int, seed: int = 0,
          max_lines: int = 300_000) -> Tokenizer:
    """Train a BPE model on (a seeded sample of) `lines` and write it to `out`."""
    lines = [s for s in lines if s.strip()]
    if len(lines) > max_lines:
        pick = np.random.default_rng(seed).choice(len(lines), max_lines, replace=False)
        lines = [lines[i] for i in sorted(pick)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=0.9995,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, hard_vocab_limit=False,
        max_sentence_length=1 << 14,
        unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_id=-1, num_threads=os.cpu_count() or 1,
        minloglevel=2)
    Path(out).write_bytes(model.getvalue())
    return Tokenizer(out)


class TextError(ValueError):
    """Text a model cannot take: empty, or longer than its context."""
