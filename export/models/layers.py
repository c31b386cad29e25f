"""Leaf layers shared by every MoE architecture in `export/models/`.

RMSNorm, rotary embeddings, the static KV cache, the stacked-expert MoE block and the
decoder stack. Architecture files add only what differs (attention details, config
keys, `sanitize`). Parameter names follow Hugging Face so that a checkpoint's
state dict loads with one `sanitize()` and no other conversion.

Shapes: B batch, T tokens, S cache length, H heads, D head dim, E experts, K top-k,
F expert hidden size, C model width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope(input_pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, D] for the positions, computed exactly as transformers does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = input_pos.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    if torch.onnx.is_in_onnx_export():  # ONNX Runtime's fused kernel on x [B, H, T, D], the
        # same sums: row t of the run's cos/sin halves is position t (one node for the six
        # below; with the fused norm 0.90-0.95x a decode step: docs/benchmarks.md)
        t = x.shape[-2]
        return torch.onnx.ops.symbolic(
            "com.microsoft::RotaryEmbedding",
            (x, torch.arange(t)[None].expand(x.shape[0], t), cos[:, :half].contiguous(),
             sin[:, :half].contiguous()),
            {"interleaved": 0}, dtype=x.dtype, shape=x.shape, version=1)
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache(nn.Module):
    """Static cache for every layer: k, v [L, B, Hkv, S, D], written at `input_pos`."""

    def __init__(self, layers: int, batch: int, kv_heads: int, length: int, head_dim: int,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        shape = (layers, batch, kv_heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    @property
    def length(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k[layer].index_copy_(2, input_pos, k)
        self.v[layer].index_copy_(2, input_pos, v)
        return self.k[layer], self.v[layer]


def attend(q, k, v, layer: int, input_pos: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, T, D] -> [B, T, H*D]; causal, grouped-query."""
    if cache is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        b, h, t, d = out.shape
        return out.transpose(1, 2).reshape(b, t, h * d)
    # With a cache: the exported path. The query heads sharing a kv head are folded into the
    # time axis ([B, Hkv, G*T, D]), so k and v are never expanded to H heads (SDPA's GQA
    # expands the whole cache, copying it per layer outside XNNPACK), and the masks are
    # additive; matmul, softmax and add all run in XNNPACK. The run's own keys and values
    # (causal among themselves) and the cache's past (the positions before this run's first;
    # what the cache holds from it on is masked) are scored apart and softmaxed together,
    # so the cache is only read: a program never copies it to write this run's rows.
    past_k, past_v = cache.update(layer, input_pos, k, v)
    b, h, t, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    q = q.transpose(1, 2).reshape(b, t, hkv, g * d).transpose(1, 2).reshape(b * hkv, t * g, d)
    q = q * d ** -0.5
    causal = torch.where(input_pos[None, :] <= input_pos[:, None], 0.0, float("-inf"))
    own = torch.bmm(q, k.reshape(b * hkv, t, d).transpose(1, 2)) \
        + causal.repeat_interleave(g, dim=0)  # [B*Hkv, T*G, T]
    v = v.reshape(b * hkv, t, d)
    if past_k is None:
        out = torch.bmm(own.softmax(-1), v)
    else:
        s = past_k.shape[2]
        before = torch.where(torch.arange(s) < input_pos[:1], 0.0, float("-inf"))
        # K q^T, then the small result transposed: the cache itself is never transposed
        past = torch.bmm(past_k.reshape(b * hkv, s, d), q.transpose(1, 2)).transpose(1, 2)
        p = torch.cat((past + before, own), -1).softmax(-1)  # [B*Hkv, T*G, S + T]
        out = torch.bmm(p[..., :s], past_v.reshape(b * hkv, s, d)) + torch.bmm(p[..., s:], v)
    return out.reshape(b, hkv, t, g * d).transpose(1, 2).reshape(b, t, h * d)


class Experts(nn.Module):
    """E SwiGLU experts stacked: gate_proj, up_proj [E, F, C], down_proj [E, C, F]."""

    def __init__(self, num: int, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num, hidden, dim))
        self.up_proj = nn.Parameter(torch.empty(num, hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num, dim, hidden))

    def run(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(x @ self.gate_proj[e].T) * (x @ self.up_proj[e].T)
        return h @ self.down_proj[e].T

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [N, C] grouped by expert (`counts[e]` rows for expert e, in order) -> [N, C].
        (Through `forward`, so that wrappers of the stacked parameters, e.g. PEFT's LoRA on
        them, apply.)"""
        chunks = x.split(counts)
        return torch.cat([self.run(e, xe) for e, xe in enumerate(chunks) if xe.shape[0]])


class MoE(nn.Module):
    """Top-k softmax router over stacked experts.

    `forward` groups the tokens by expert (one matmul per expert, fast on CPU);
    `reference` loops over tokens and is what tests compare against.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, norm_topk: bool):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = Experts(num_experts, dim, hidden)
        self.top_k = top_k
        self.norm_topk = norm_topk

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, C] -> router logits [N, E], weights [N, K], expert ids [N, K]."""
        logits = self.gate(x)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, ids = self.route(x)
        flat = ids.reshape(-1)  # [N*K]
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=logits.shape[-1]).tolist()
        token = order // self.top_k
        y = self.experts(x[token], counts) * weights.reshape(-1)[order, None]
        out = torch.zeros_like(x).index_add_(0, token, y)
        return out.reshape(shape), logits

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        _, weights, ids = self.route(x)
        rows = [sum(weights[n, j] * self.experts.run(int(ids[n, j]), x[n])
                    for j in range(self.top_k)) for n in range(x.shape[0])]
        return torch.stack(rows).reshape(shape)


class Block(nn.Module):
    def __init__(self, args, layer: int, attention: Callable[..., nn.Module]):
        super().__init__()
        c = args.hidden_size
        self.layer = layer
        self.input_layernorm = RMSNorm(c, args.rms_norm_eps)
        self.self_attn = attention(args, layer)
        self.post_attention_layernorm = RMSNorm(c, args.rms_norm_eps)
        self.mlp = MoE(c, args.expert_size, args.experts, args.num_experts_per_tok, args.norm_topk)

    def forward(self, x, cos, sin, input_pos, cache):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, cache)
        out, router_logits = self.mlp(self.post_attention_layernorm(h))
        return h + out, router_logits


class Decoder(nn.Module):
    def __init__(self, args, attention: Callable[..., nn.Module]):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(
            Block(args, i, attention) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class CausalLM(nn.Module):
    """The decoder plus head; `forward(tokens, input_pos, cache)` is the one contract."""

    def __init__(self, args, attention: Callable[..., nn.Module]):
        super().__init__()
        self.args = args
        self.model = Decoder(args, attention)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def hidden(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
               cache: KVCache | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """tokens [B, T] -> final-normed hidden [B, T, C] and router logits per layer."""
        if input_pos is None:
            input_pos = torch.arange(tokens.shape[1])
        cos, sin = rope(input_pos, self.args.dim_head, self.args.rope_theta)
        x = self.model.embed_tokens(tokens)
        router_logits = []
        for block in self.model.layers:
            x, logits = block(x, cos, sin, input_pos, cache)
            router_logits.append(logits)
        return self.model.norm(x), router_logits

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden(tokens, input_pos, cache)[0])

    def make_cache(self, batch: int, length: int) -> KVCache:
        a = self.args
        return KVCache(a.num_hidden_layers, batch, a.num_key_value_heads, length, a.dim_head,
                       self.lm_head.weight.dtype)


def stack_experts(weights: dict, prefix: str, num: int, names: dict[str, str]) -> dict:
    """Pop per-expert HF tensors `{prefix}.{j}.{hf}.weight` into stacked `{prefix}.{ours}`."""
    out = {}
    for ours, hf in names.items():
        keys = [f"{prefix}.{j}.{hf}.weight" for j in range(num)]
        if all(k in weights for k in keys):
            out[f"{prefix}.{ours}"] = torch.stack([weights.pop(k) for k in keys])
    return out


def stack_all(weights: dict, args, names: dict[str, str]) -> dict:
    """HF state dict -> ours for every layer (the common part of each `sanitize`)."""
    weights = dict(weights)
    for i in range(args.num_hidden_layers):
        prefix = f"model.layers.{i}.mlp.experts"
        weights.update(stack_experts(weights, prefix, args.experts, names))
    if args.tie_word_embeddings and "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return weights


def unstack_experts(weights: dict, names: dict[str, str]) -> dict:
    """The inverse of `stack_experts` over a whole state dict."""
    out = {}
    for key, value in weights.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix.endswith(".experts") and leaf in names:
            for j in range(value.shape[0]):
                out[f"{prefix}.{j}.{names[leaf]}.weight"] = value[j]
        else:
            out[key] = value
    return out


class ConfigError(ValueError):
    """A config.json this architecture cannot run (missing keys, unsupported features)."""


def read_config(cls, config: dict):
    """Build a config dataclass from `config.json` keys, ignoring keys it does not use."""
    config = dict(config)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"unsupported rope type {rope.get('rope_type', rope.get('type'))!r}")
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    names = set(cls.__dataclass_fields__)
    try:
        return cls(**{k: v for k, v in config.items() if k in names})
    except TypeError as e:
        raise ConfigError(f"config.json: {e}") from None
