"""OLMoE (`model_type: olmoe`): full-width RMSNorm on q and k, optional qkv clipping,
top-k router without renormalization unless `norm_topk_prob`.

HF layout: `model.layers.N.mlp.{gate, experts.J.gate_proj|up_proj|down_proj}`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from . import layers

EXPERT_NAMES = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool = False
    clip_qkv: float | None = None
    attention_bias: bool = False
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    router_aux_loss_coef: float = 0.01
    model_type: str = "olmoe"

    @property
    def dim_head(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def experts(self) -> int:
        return self.num_experts

    @property
    def expert_size(self) -> int:
        return self.intermediate_size

    @property
    def norm_topk(self) -> bool:
        return self.norm_topk_prob

    def to_hf(self) -> dict:
        return {"architectures": ["OlmoeForCausalLM"], "hidden_act": "silu", **asdict(self)}


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        c, d, bias = args.hidden_size, args.dim_head, args.attention_bias
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, args.num_attention_heads, \
            args.num_key_value_heads, d
        self.clip = args.clip_qkv
        self.q_proj = nn.Linear(c, self.heads * d, bias=bias)
        self.k_proj = nn.Linear(c, self.kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(c, self.kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.heads * d, c, bias=bias)
        self.q_norm = layers.RMSNorm(self.heads * d, args.rms_norm_eps)
        self.k_norm = layers.RMSNorm(self.kv_heads * d, args.rms_norm_eps)

    def forward(self, x, cos, sin, input_pos, cache):
        b, t, _ = x.shape
        q, k, v = self.q_norm(self.q_proj(x)), self.k_norm(self.k_proj(x)), self.v_proj(x)
        if self.clip is not None:
            q, k, v = (z.clamp(-self.clip, self.clip) for z in (q, k, v))
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
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
