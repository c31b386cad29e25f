"""Mixtral (`model_type: mixtral`): GQA attention without biases, renormalized top-k router.

HF layout: `model.layers.N.block_sparse_moe.{gate, experts.J.w1|w2|w3}`; we keep the MoE
under `mlp` with experts stacked (w1 = gate_proj, w3 = up_proj, w2 = down_proj).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from . import layers

EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    router_aux_loss_coef: float = 0.02
    model_type: str = "mixtral"

    def __post_init__(self):
        if self.sliding_window is not None and self.sliding_window < self.max_position_embeddings:
            raise layers.ConfigError("sliding-window attention is not supported")

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def experts(self) -> int:
        return self.num_local_experts

    @property
    def expert_size(self) -> int:
        return self.intermediate_size

    norm_topk = True

    def to_hf(self) -> dict:
        return {"architectures": ["MixtralForCausalLM"], "hidden_act": "silu", **asdict(self)}


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        c, d = args.hidden_size, args.dim_head
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, args.num_attention_heads, \
            args.num_key_value_heads, d
        self.q_proj = nn.Linear(c, self.heads * d, bias=False)
        self.k_proj = nn.Linear(c, self.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(c, self.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.heads * d, c, bias=False)

    def forward(self, x, cos, sin, input_pos, cache):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
        return self.o_proj(layers.attend(q, k, v, self.layer, input_pos, cache))


def build(args: ModelArgs) -> layers.CausalLM:
    return layers.CausalLM(args, Attention)


def sanitize(weights: dict, args: ModelArgs) -> dict:
    """HF state dict -> ours: stack the experts, move `block_sparse_moe` to `mlp`."""
    weights = {k.replace(".block_sparse_moe.", ".mlp."): v for k, v in weights.items()}
    return layers.stack_all(weights, args, EXPERT_NAMES)


def to_hf(weights: dict, args: ModelArgs) -> dict:
    weights = layers.unstack_experts(weights, EXPERT_NAMES)
    return {k.replace(".mlp.", ".block_sparse_moe."): v for k, v in weights.items()}


def from_config(config: dict) -> ModelArgs:
    return layers.read_config(ModelArgs, config)


