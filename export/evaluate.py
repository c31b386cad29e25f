"""Perplexity and next-token accuracy of a torch model on a text (the `eval` command).

The text is scored as `[BOS] + encode(text)`; every token after BOS is predicted once.
Text longer than the context is scored in windows of W tokens that advance by W/2, each
new token predicted with at least W/2 tokens of context (the usual strided evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .models import layers
from .tokenizer import BOS, TextError, Tokenizer

MAX_WINDOW = 512


@torch.no_grad()
def evaluate(model: layers.CausalLM, tok: Tokenizer, text: str,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """-> {"ppl", "nll", "tokens", "top1", "top3"}; nll in nats per predicted token."""
    if not text.strip():
        raise TextError("the text is empty")
    ids = torch.tensor([BOS] + tok.encode(text))
    window = min(model.args.max_position_embeddings, MAX_WINDOW)
    stride = max(1, window // 2)
    nll, top1, top3, done, start = 0.0, 0, 0, 1, 0  # done: first position not yet predicted
    while done < len(ids):
        chunk = ids[start:start + window]
        logits = model(chunk[None])[0, :-1]
        first = done - start - 1
        logits, targets = logits[first:], chunk[1:][first:]
        nll += F.cross_entropy(logits, targets, reduction="sum").item()
        best = logits.topk(3, dim=-1).indices
        top1 += (best[:, 0] == targets).sum().item()
        top3 += (best == targets[:, None]).any(-1).sum().item()
        done = start + len(chunk)
        start += stride
        if progress:
            progress(min(done, len(ids)) - 1, len(ids) - 1)
    n = len(ids) - 1
    mean = nll / n
    return {"ppl": math.exp(mean), "nll": mean, "tokens": n,
            "top1": top1 / n, "top3": top3 / n}
