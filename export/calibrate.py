"""The base model's own baseline for the error map's verdicts, computed at export.

How large a domain's errors are means little without a yardstick from the same model, so the
bundle carries two anchors measured on held-out base text (the calibration text) with the
`observe` program's taps (`runtime/verdicts.py` uses them):
  base      the text as it is: the errors the model makes on its own domain;
  shuffled  the same tokens in a random order: its errors where the context carries nothing
            usable (same vocabulary and token frequencies, no structure).
For each, the mean NLL per token and, per layer, the mean PC update size per token (summed
over the k chosen experts); for base also their standard deviation over 1,024-token chunks
(how much base text varies by itself) and each expert's count and mean update (its base
usage: experts the base text never chooses are idle, free to deepen in place).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch
from moegrow.runtime import errormap, session

from . import programs
from .models import layers

CHUNK = 1024  # tokens per chunk for the base text's own spread
MIN_TOKENS = 2 * CHUNK


class CalibrationError(ValueError):
    """Calibration text too short (or empty) to measure a baseline on."""


def _taps(observe: programs.Observe, ids: np.ndarray, window: int, experts: int):
    """Observe `ids` in the runtime's windows -> nll [N], per-token update per layer [L, N],
    folded [L, E, 3] (count, sum, sum of squares per expert)."""
    nll, upd, folded = [], [], 0
    with torch.no_grad():
        for chunk, new in session.windows(ids, window):
            out = dict(zip(programs.Observe.outputs, observe(torch.from_numpy(chunk)[None]),
                           strict=True))
            nll.append(out["nll"][new].double().numpy())
            upd.append(out["update"][:, new].double().sum(-1).numpy())
            folded = folded + errormap.fold(out["ids"][:, new].numpy(),
                                            out["update"][:, new].numpy(), experts)
    return np.concatenate(nll), np.concatenate(upd, axis=1), folded


def _chunk_sd(values: np.ndarray) -> float:
    """Standard deviation of the means of consecutive CHUNK-token chunks of `values`."""
    n = len(values) // CHUNK * CHUNK
    return float(values[:n].reshape(-1, CHUNK).mean(1).std(ddof=1))


def baseline(model: layers.CausalLM, ids: list[int], text: str,
             progress: Callable[[str], None] | None = None) -> dict:
    """The calibration entry of the manifest for `ids` ([BOS] + tokens of `text`)."""
    if len(ids) - 1 < MIN_TOKENS:
        raise CalibrationError(f"calibration text is {len(ids) - 1} tokens; at least "
                               f"{MIN_TOKENS} are needed")
    if progress:
        progress(f"measuring the error map's baseline on {len(ids) - 1} calibration tokens")
    model = model.float().eval()
    observe = programs.Observe(model)
    window = model.args.max_position_embeddings
    experts = model.model.layers[0].mlp.experts.gate_proj.shape[0]
    ids_ = np.array(ids, np.int64)
    nll, upd, folded = _taps(observe, ids_, window, experts)
    shuffled = ids_.copy()
    shuffled[1:] = np.random.default_rng(0).permutation(shuffled[1:])
    nll_s, upd_s, _ = _taps(observe, shuffled, window, experts)
    rows = []
    for layer in range(upd.shape[0]):
        count, total = folded[layer, :, 0], folded[layer, :, 1]
        rows.append({"update": float(upd[layer].mean()),
                     "update_shuffled": float(upd_s[layer].mean()),
                     "update_chunk_sd": _chunk_sd(upd[layer]),
                     "experts": [{"count": int(c), "mean": float(t / c) if c else 0.0}
                                 for c, t in zip(count, total, strict=True)]})
    return {"tokens": len(nll), "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "nll": float(nll.mean()), "nll_shuffled": float(nll_s.mean()),
            "nll_chunk_sd": _chunk_sd(nll), "layers": rows}
