"""Error taps (`programs.Observe`): the error is d nll / d (last residual stream), the update
and energy follow PC.md's formulas for the chosen experts, and both engines agree with torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_moe
from moegrow.export import programs
from moegrow.export.models import mixtral

ARGS = mixtral.ModelArgs(vocab_size=97, hidden_size=48, intermediate_size=40,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def model():
    return random_moe(ARGS)


def _tokens(t: int = 19) -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (1, t), generator=torch.Generator().manual_seed(3))


def _reference(model, tokens):
    """Eager model with autograd: |d nll_t / d x_t| at the last residual stream, and every MoE
    input (to recompute the chosen experts' hidden activations)."""
    inputs = []
    hooks = [b.mlp.register_forward_hook(lambda _m, args, _o: inputs.append(args[0][0]))
             for b in model.model.layers]
    pos = torch.arange(tokens.shape[1])
    cos, sin = mixtral.layers.rope(pos, ARGS.dim_head, ARGS.rope_theta)
    x = model.model.embed_tokens(tokens)
    for block in model.model.layers:
        x, _ = block(x, cos, sin, pos, None)
    x = x.detach().requires_grad_()
    logits = model.lm_head(model.model.norm(x))[0]
    nll = F.cross_entropy(logits[:-1], tokens[0, 1:], reduction="sum")
    (grad,) = torch.autograd.grad(nll, x)
    for h in hooks:
        h.remove()
    return grad[0].norm(dim=-1), [i.detach() for i in inputs]


def test_taps_follow_the_definitions(model):
    tokens = _tokens()
    with torch.no_grad():
        nll, rank, ids, gates, update, energy = programs.Observe(model)(tokens)
        want_nll, want_rank, want_ids = programs.Score(model)(tokens)
    assert torch.allclose(nll, want_nll, atol=1e-5) and torch.equal(rank, want_rank)
    assert torch.equal(ids, want_ids)  # the guard reads the chosen experts from score
    size, moe_inputs = _reference(model, tokens)
    assert size[-1] == 0 and (size[:-1] > 0).all()
    t, k = tokens.shape[1], ARGS.num_experts_per_tok
    assert ids.shape == gates.shape == update.shape == energy.shape == (2, t, k)
    for layer, block in enumerate(model.model.layers):
        x = moe_inputs[layer]
        with torch.no_grad():
            _, w, chosen = block.mlp.route(x)
        assert torch.equal(ids[layer], chosen) and torch.allclose(gates[layer], w)
        ex = block.mlp.experts
        for i in range(t):
            for j in range(k):
                e_id = int(chosen[i, j])
                h = F.silu(x[i] @ ex.gate_proj[e_id].T) * (x[i] @ ex.up_proj[e_id].T)
                want = w[i, j] * size[i] * h.norm()
                assert torch.isclose(update[layer, i, j], want, rtol=1e-4, atol=1e-6)
                assert torch.isclose(energy[layer, i, j], (w[i, j] * size[i]) ** 2,
                                     rtol=1e-4, atol=1e-7)


def test_top_m_softmax_error_stays_within_its_bound(model):
    """Restricted to the m likeliest tokens, e misses sum_{j not in top} p_j W_j, so each
    update moves by at most g |h| |J| (1 - P_m) max_j |W_j| (J: the final norm's Jacobian,
    P_m: the top-m probability mass); with m = V it is exact."""
    tokens = _tokens()
    x = model.model.embed_tokens(tokens)
    pos = torch.arange(tokens.shape[1])
    cos, sin = mixtral.layers.rope(pos, ARGS.dim_head, ARGS.rope_theta)
    with torch.no_grad():
        for block in model.model.layers:
            x, _ = block(x, cos, sin, pos, None)
        p = model.lm_head(model.model.norm(x))[0].softmax(-1)
        exact = programs.Observe(model)(tokens)[4]
    size, _ = _reference(model, tokens)
    jac = torch.stack([torch.linalg.matrix_norm(torch.autograd.functional.jacobian(
        model.model.norm, x[0, t].detach()), ord=2) for t in range(tokens.shape[1])])
    w_max = model.lm_head.weight.norm(dim=1).max()
    errors = []
    for m in (1, 4, 16):
        with torch.no_grad():
            approx = programs.Observe(model, top=m)(tokens)[4]
        missing = 1 - p.topk(m, dim=-1).values.sum(-1)  # [T]
        h_g = exact / size.clamp_min(1e-12)[None, :, None]  # g |h| per (layer, t, k)
        bound = h_g * (jac * missing * w_max)[None, :, None]
        diff = (approx - exact).abs()
        assert (diff[:, :-1] <= bound[:, :-1] + 1e-5).all(), m
        errors.append(float((diff[:, :-1] / exact[:, :-1]).mean()))
    assert errors[0] > errors[2] > 0  # the bound is not vacuous: a real, shrinking error
    with torch.no_grad():
        full = programs.Observe(model, top=ARGS.vocab_size)(tokens)[4]
    assert torch.allclose(full, exact, rtol=1e-4, atol=1e-6)
