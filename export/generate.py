"""Greedy generation and next-word suggestions with the static KV cache (torch reference)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .models import layers
from .tokenizer import BOS, EOS, TextError, Tokenizer


def _context_check(model: layers.CausalLM, prompt_len: int, max_new: int) -> None:
    limit = model.args.max_position_embeddings
    if prompt_len + max_new > limit:
        raise TextError(f"prompt is {prompt_len} tokens; with {max_new} new tokens it exceeds "
                        f"the model's context of {limit}")


@torch.no_grad()
def generate(model: layers.CausalLM, tok: Tokenizer, prompt: str,
             max_new: int = 32) -> Iterator[str]:
    """Yield the continuation's text piece by piece (greedy; stops at EOS)."""
    ids = [BOS] + tok.encode(prompt)
    _context_check(model, len(ids), max_new)
    cache = model.make_cache(1, len(ids) + max_new)
    logits = model(torch.tensor([ids]), torch.arange(len(ids)), cache)[0, -1]
    new: list[int] = []
    text = ""
    head = tok.decode(ids[1:])  # decoded with the prompt: its space before the first word
    for pos in range(len(ids), len(ids) + max_new):
        token = int(logits.argmax())
        if token == EOS:
            return
        new.append(token)
        decoded = tok.decode(ids[1:] + new)[len(head):]
        if not decoded.endswith("\ufffd"):  # hold back half a UTF-8 character
            yield decoded[len(text):]
            text = decoded
        logits = model(torch.tensor([[token]]), torch.tensor([pos]), cache)[0, -1]


@torch.no_grad()
def suggest(model: layers.CausalLM, tok: Tokenizer, prefix: str, k: int = 3,
            max_pieces: int = 6) -> list[tuple[str, float]]:
    """Top-k completions of the word being typed (or the next word), with probabilities.

    Each candidate first token is extended greedily until the next token starts a new word.
    """
    ids = [BOS] + tok.encode(prefix)
    _context_check(model, len(ids), max_pieces)
    probs = torch.softmax(model(torch.tensor([ids]))[0, -1], dim=-1)
    probs[[BOS, EOS]] = 0
    out = []
    for p, first in zip(*probs.topk(k), strict=True):
        word = [int(first)]
        for _ in range(max_pieces - 1):
            token = int(model(torch.tensor([ids + word]))[0, -1].argmax())
            piece = tok.piece(token)
            if token in (BOS, EOS) or piece.startswith("▁") or piece == "<0x0A>":
                break
            word.append(token)
        out.append((tok.decode(word).strip(), float(p)))
    return out
