"""Small-base pretraining: SentencePiece + a Mixtral-layout MoE, into an HF-format folder.

The loop is visible: AdamW, linear warmup then cosine decay, the Switch-style router
load-balancing loss, gradient clipping. Tokens are grouped by expert inside the MoE (one
matmul per expert). Every `save_every` steps the folder is rewritten atomically together
with `train_state.pt`, and a later call with the same folder resumes from it; a run is
deterministic for its seed.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, tokenizer
from .models import mixtral

PRESETS = {
    # ~1.4M parameters: tests and CI.
    "tiny": dict(vocab=2048, model=dict(hidden_size=128, intermediate_size=256,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128),
                 batch=16, lr=3e-3, steps=300),
    # ~9M parameters, 8 experts top-2: the default model and benchmarks.
    "small": dict(vocab=4096, model=dict(hidden_size=192, intermediate_size=384,
                  num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                  num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256),
                  batch=32, lr=2e-3, steps=2500),
}
STATE = "train_state.pt"


class PretrainError(Exception):
    """Bad corpus or output folder for pretraining."""


@dataclass
class Progress:
    step: int
    steps: int
    loss: float
    lr: float
    tokens_per_s: float


def read_corpus(corpus: Path) -> tuple[list[str], list[str]]:
    """Entries of `train.txt` (and `heldout.txt` when present); entries end with a blank line."""
    def entries(path: Path) -> list[str]:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise PretrainError(f"{path}: not UTF-8 text") from None
        return [e for e in text.split("\n\n") if e.strip()]

    train = corpus / "train.txt"
    if not train.is_file():
        raise PretrainError(f"{corpus}: no train.txt (make one with `moegrow corpus fetch`)")
    heldout = corpus / "heldout.txt"
    out = entries(train), entries(heldout) if heldout.is_file() else []
    if not out[0]:
        raise PretrainError(f"{train}: empty")
    return out


def tokenize(tok: tokenizer.Tokenizer, entries: list[str]) -> np.ndarray:
    """One stream: each entry is BOS + its tokens (+ the blank line that ended it)."""
    ids = tok.encode_batch([e + "\n\n" for e in entries])
    return np.concatenate([np.array([tokenizer.BOS] + x, dtype=np.uint16) for x in ids])


def init_weights(model: torch.nn.Module, std: float = 0.02) -> None:
    layers_n = model.args.num_hidden_layers
    for name, p in model.named_parameters():
        if "norm" in name:
            torch.nn.init.ones_(p)
        elif name.endswith(("o_proj.weight", "down_proj")):  # residual writers, GPT-2 style
            torch.nn.init.normal_(p, std=std / math.sqrt(2 * layers_n))
        else:
            torch.nn.init.normal_(p, std=std)


def balance_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch/Mixtral load balancing: E * sum_e (token share of e) * (mean prob of e)."""
    logits = torch.cat(router_logits)  # [L*N, E]
    probs = torch.softmax(logits.float(), dim=-1)
    chosen = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, logits.shape[-1]).float()
    return logits.shape[-1] * (chosen.mean(0) * probs.mean(0)).sum()


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def batch(stream: np.ndarray, rng: np.random.Generator, b: int, t: int):
    starts = rng.integers(0, len(stream) - t - 1, size=b)
    x = np.stack([stream[s:s + t + 1] for s in starts]).astype(np.int64)
    x = torch.from_numpy(x)
    return x[:, :-1], x[:, 1:]


@torch.no_grad()
def heldout_loss(model, stream: np.ndarray, t: int, windows: int = 32) -> float:
    n = min(windows, (len(stream) - 1) // t)
    if n <= 0:
        return float("nan")
    x = torch.from_numpy(stream[: n * t + 1].astype(np.int64))
    inputs, targets = x[:-1].view(n, t), x[1:].view(n, t)
    return F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).item()


def _prepare(corpus: Path, out: Path, preset: dict, seed: int):
    """Tokenizer and token streams, cached in `out` so that a resumed run skips them.

    Built in a temporary folder first: a corpus that fails any check leaves `out` untouched.
    """
    tok_path, cache = out / checkpoint.TOKENIZER, out / "tokens.npz"
    if not (tok_path.exists() and cache.exists()):
        train, heldout = read_corpus(corpus)
        lines = [line for e in train for line in e.split("\n")]
        with tempfile.TemporaryDirectory() as tmp:
            tok = tokenizer.train(lines, Path(tmp) / checkpoint.TOKENIZER, preset["vocab"], seed)
            stream = tokenize(tok, train)
            need = preset["model"]["max_position_embeddings"] + 2
            if len(stream) < need:
                raise PretrainError(f"{corpus}: too little text ({len(stream)} tokens, "
                                    f"need {need})")
            held = tokenize(tok, heldout) if heldout else np.zeros(0, np.uint16)
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tok.path, tok_path)
            np.savez(cache, train=stream, heldout=held)
    data = np.load(cache)
    return tokenizer.Tokenizer(tok_path), data["train"], data["heldout"]


def pretrain(corpus: str | Path, out: str | Path, preset: str = "tiny", steps: int | None = None,
             seed: int = 0, save_every: int = 250,
             progress: Callable[[Progress], None] | None = None) -> dict:
    """Train (or resume) and save; returns the run's summary."""
    if preset not in PRESETS:
        raise PretrainError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    p = PRESETS[preset]
    steps = steps or p["steps"]
    corpus, out = Path(corpus), Path(out)
    torch.manual_seed(seed)
    tok, train, heldout = _prepare(corpus, out, p, seed)
    seq = p["model"]["max_position_embeddings"]
    args = mixtral.ModelArgs(vocab_size=tok.vocab_size, **p["model"])
    model = mixtral.build(args)
    init_weights(model)
    decay = [q for n, q in model.named_parameters() if "norm" not in n]
    rest = [q for n, q in model.named_parameters() if "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=p["lr"], betas=(0.9, 0.95), fused=True)
    rng, start, elapsed = np.random.default_rng(seed), 0, 0.0
    if (out / STATE).exists() and (out / "model.safetensors").exists():
        state = torch.load(out / STATE, weights_only=False)
        model.load_state_dict(checkpoint.load(out).state_dict())
        opt.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        start, elapsed = state["step"], state["elapsed"]

    def save(step: int) -> None:
        checkpoint.save(model, out / ".ckpt", tok.path)  # the tokenizer is already in `out`
        for f in ("model.safetensors", "config.json"):
            (out / ".ckpt" / f).replace(out / f)
        shutil.rmtree(out / ".ckpt")
        torch.save({"optimizer": opt.state_dict(), "rng": rng.bit_generator.state, "step": step,
                    "torch_rng": torch.get_rng_state(), "elapsed": elapsed}, out / STATE)

    warmup = max(1, min(200, steps // 10))
    model.train()
    first_loss = loss_value = float("nan")
    for step in range(start, steps):
        t0 = time.perf_counter()
        lr = lr_at(step, steps, p["lr"], warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batch(train, rng, p["batch"], seq)
        h, router_logits = model.hidden(x)
        loss = F.cross_entropy(model.lm_head(h).flatten(0, 1), y.flatten())
        aux = balance_loss(router_logits, args.num_experts_per_tok)
        (loss + args.router_aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        elapsed += dt
        loss_value = loss.item()
        first_loss = loss_value if step == start else first_loss
        if progress:
            progress(Progress(step + 1, steps, loss_value, lr, x.numel() / dt))
        if (step + 1) % save_every == 0 or step + 1 == steps:
            save(step + 1)
    model.eval()
    return {"out": str(out), "preset": preset, "steps": steps, "parameters":
            sum(q.numel() for q in model.parameters()), "first_loss": first_loss,
            "last_loss": loss_value, "heldout_loss": heldout_loss(model, heldout, seq),
            "train_tokens": int(len(train)), "train_seconds": round(elapsed, 1),
            "tokens_per_s": round((steps - start) * p["batch"] * seq / max(elapsed, 1e-9))}


__all__ = ["PRESETS", "PretrainError", "Progress", "pretrain"]
