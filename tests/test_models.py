"""Parity with `transformers` for every architecture, HF round trip, cache parity, routing."""

from __future__ import annotations

import json

import pytest
import torch
import transformers  # the dev extra: a missing one must fail, not skip
from moegrow.export import checkpoint
from moegrow.export.models import layers

COMMON = dict(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64)
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(
        intermediate_size=40, num_local_experts=4, **COMMON),
    "olmoe": lambda: transformers.OlmoeConfig(
        intermediate_size=40, num_experts=4, clip_qkv=3.0, **COMMON),
    "olmoe-norm": lambda: transformers.OlmoeConfig(
        intermediate_size=40, num_experts=4, norm_topk_prob=True, **COMMON),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        moe_intermediate_size=40, num_experts=4, head_dim=16, intermediate_size=64, **COMMON),
}


def hf_model(name: str, path):
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    with torch.no_grad():  # random norms, so that a missed norm weight shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name, tmp_path):
    hf = hf_model(name, tmp_path)
    ours = checkpoint.load(tmp_path)
    tokens = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        want = hf(tokens).logits
        got = ours(tokens)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_save_round_trips_through_transformers(name, tmp_path):
    hf_model(name, tmp_path / "hf")
    ours = checkpoint.load(tmp_path / "hf")
    checkpoint.save(ours, tmp_path / "ours")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    tokens = torch.randint(0, 97, (1, 17))
    with torch.no_grad():
        assert (again(tokens).logits - ours(tokens)).abs().max().item() <= 1e-4
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == ours.args.model_type


@pytest.mark.parametrize("name", ["mixtral", "olmoe", "qwen3_moe"])
def test_prefill_then_decode_equals_full_forward(name, tmp_path):
    hf_model(name, tmp_path)
    model = checkpoint.load(tmp_path)
    tokens = torch.randint(0, 97, (1, 20))
    cache = model.make_cache(1, 32)
    with torch.no_grad():
        full = model(tokens)
        steps = [model(tokens[:, :12], torch.arange(12), cache)]
        for t in range(12, 20):
            steps.append(model(tokens[:, t:t + 1], torch.tensor([t]), cache))
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_grouped_moe_equals_reference_loop():
    moe = layers.MoE(dim=16, hidden=24, num_experts=5, top_k=2, norm_topk=True)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        assert (moe(x)[0] - moe.reference(x)).abs().max().item() <= 1e-5


def test_rigged_router_with_identity_experts_has_closed_form():
    # Experts that compute silu(x_0) * x_1 on coordinate 0 only; the router always picks
    # experts 1 and 3 with logits 2 and 1, so the output is sum of softmax weights times that.
    moe = layers.MoE(dim=4, hidden=1, num_experts=4, top_k=2, norm_topk=False)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[:, 3] = torch.tensor([-5.0, 2.0, -5.0, 1.0])
        moe.experts.gate_proj.zero_()
        moe.experts.up_proj.zero_()
        moe.experts.down_proj.zero_()
        for e in range(4):
            moe.experts.gate_proj[e, 0, 0] = 1.0
            moe.experts.up_proj[e, 0, 1] = 1.0
            moe.experts.down_proj[e, 0, 0] = float(e)
        x = torch.tensor([[0.5, 2.0, 0.0, 1.0]])
        out, _ = moe(x)
    p = torch.softmax(torch.tensor([-5.0, 2.0, -5.0, 1.0]), 0)
    value = torch.nn.functional.silu(torch.tensor(0.5)) * 2.0
    assert torch.allclose(out[0, 0], (p[1] * 1 + p[3] * 3) * value, atol=1e-6)
    assert torch.all(out[0, 1:] == 0)
