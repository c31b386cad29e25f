"""Qwen3-MoE (`model_type: qwen3_moe`): per-head RMSNorm on q and k, explicit head_dim,
top-k router renormalized only with `norm_topk_prob`. Every layer must be sparse.

HF layout: `model.layers.N.mlp.{gate, experts.J.gate_proj|up_proj|down_proj}`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from . import layers

EXPERT_NAMES = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts_per_tok: int
    num_experts: int | None = None
    num_local_experts: int | None = None  # transformers 5 writes this alias
    norm_topk_prob: bool = False
    attention_bias: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    use_sliding_window: bool = False
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    router_aux_loss_coef: float = 0.001
    model_type: str = "qwen3_moe"

    def __post_init__(self):
        self.num_experts = self.num_experts or self.num_local_experts
        self.num_local_experts = None
        if not self.num_experts:
            raise layers.ConfigError("config.json: missing num_experts")
        if self.decoder_sparse_step != 1 or self.mlp_only_layers or self.use_sliding_window:
            raise layers.ConfigError("dense MLP layers and sliding windows are not supported")

    @property
    def dim_head(self) -> int:
        return self.head_dim

    @property
    def experts(self) -> int:
        return self.num_experts

    @property
    def expert_size(self) -> int:
        return self.moe_intermediate_size

    @property
    def norm_topk(self) -> bool:
        return self.norm_topk_prob

    def to_hf(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "num_local_experts"}
        return {"architectures": ["Qwen3MoeForCausalLM"], "hidden_act": "silu", **d}


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        c, d, bias = args.hidden_size, args.dim_head, args.attention_bias
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, args.num_attention_heads, \
            args.num_key_value_heads, d
        self.q_proj = nn.Linear(c, self.heads * d, bias=bias)
        self.k_proj = nn.Linear(c, self.kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(c, self.kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.heads * d, c, bias=False)
        self.q_norm = layers.RMSNorm(d, args.rms_norm_eps)
        self.k_norm = layers.RMSNorm(d, args.rms_norm_eps)

    def forward(self, x, cos, sin, input_pos, cache):
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
        return self.o_proj(layers.attend(q, k, v, self.layer, input_pos, cache))


def build(args: ModelArgs) -> layers.CausalLM:
    return layers.CausalLM(args, Attention)


def sanitize(weights: dict, args: ModelArgs) -> dict:
    """HF state dict -> ours: stack the experts."""
    return layers.stack_all(weights, args, EXPERT_NAMES)


def to_hf(weights: dict, args: ModelArgs) -> dict:
    return layers.unstack_experts(weights, EXPERT_NAMES)


def from_config(config: dict) -> ModelArgs:
    return layers.read_config(ModelArgs, config)
