"""The programs' math: prefill / decode / score (as the torch reference runs them) against the
eager model (max abs <= 1e-4, DESIGN.md rule 2), greedy generation included. The engines'
parity with the same reference, for every architecture, program and bit width, is the
backend-ops matrix (test_backend_ops.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from moegrow.export import pretrain, programs, reference
from moegrow.export.models import layers, mixtral

ARGS = mixtral.ModelArgs(vocab_size=97, hidden_size=48, intermediate_size=40,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
LENGTH = 64  # cache positions
TOL = 1e-4
ENGINES = ["torch"]
Run = Callable[..., list[torch.Tensor]]


@pytest.fixture(scope="module")
def model() -> layers.CausalLM:
    torch.manual_seed(0)
    m = mixtral.build(ARGS)
    pretrain.init_weights(m, std=0.2)
    return m.eval()


@pytest.fixture(scope="module")
def engines(model) -> dict[str, dict[str, Run]]:
    """{"torch": {program: run(*tensors) -> [tensors]}}: the reference (`export/reference.py`);
    the engines run the same programs in the backend-ops matrix (test_backend_ops.py)."""
    ref = reference.Reference(programs.with_spare(model, 0))

    def runner(name: str) -> Run:
        return lambda *inputs: [torch.from_numpy(o) for o in
                                ref.run(name, [i.numpy() for i in inputs])]
    return {"torch": {name: runner(name) for name in ("prefill", "decode", "score")}}


def _tokens(t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (1, t), generator=torch.Generator().manual_seed(seed))


def _eager(model: layers.CausalLM, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)[0]  # [T, V]


def test_moe_formulations_match_eager(model):
    moe = model.model.layers[0].mlp
    x = torch.randn(2, 9, ARGS.hidden_size)
    with torch.no_grad():
        want, want_logits = moe(x)
        assert (moe.reference(x) - want).abs().max() < 1e-5  # the eager path itself
        for cls in (programs.DenseMoE, programs.GatherMoE):
            got, logits = cls(moe)(x)
            assert (got - want).abs().max() < 1e-5, cls.__name__
            assert torch.equal(logits, want_logits)


@pytest.mark.parametrize("engine", ENGINES)
def test_prefill_logits_match_eager_for_several_lengths(model, engines, engine):
    run = engines[engine]["prefill"]
    for t in (1, 5, 23):  # one export, any T up to the cache length
        tokens = _tokens(t, seed=t)
        k, v = programs.empty_cache(model, LENGTH)
        logits, k_out, v_out, _ = run(tokens, torch.arange(t), k, v, programs.slot_state(model))
        assert logits.shape == (1, ARGS.vocab_size)
        assert (logits[0] - _eager(model, tokens)[-1]).abs().max() <= TOL
        assert k_out.shape == k.shape and v_out.shape == v.shape
        assert k_out[:, :, :, t:].abs().max() == 0  # positions past the prompt stay empty


@pytest.mark.parametrize("engine", ENGINES)
def test_prefill_then_decode_equals_full_forward(model, engines, engine):
    tokens, t0 = _tokens(20), 8
    want = _eager(model, tokens)
    k, v = programs.empty_cache(model, LENGTH)
    slots = programs.slot_state(model)
    logits, k, v, nov = engines[engine]["prefill"](tokens[:, :t0], torch.arange(t0), k, v, slots)
    worst = (logits[0] - want[t0 - 1]).abs().max()
    for i in range(t0, tokens.shape[1]):
        logits, k, v = engines[engine]["decode"](tokens[:, i:i + 1], torch.tensor([i]), k, v,
                                                 slots, nov)
        worst = max(worst, (logits[0] - want[i]).abs().max())
    assert worst <= TOL


@pytest.mark.parametrize("engine", ENGINES)
def test_score_is_next_token_nll(model, engines, engine):
    for t in (1, 2, 30):
        tokens = _tokens(t, seed=t)
        nll = engines[engine]["score"](tokens, programs.slot_state(model))[0]
        assert nll.shape == (t,)
        assert nll[-1] == 0  # nothing left to predict
        if t > 1:
            want = F.cross_entropy(_eager(model, tokens)[:-1], tokens[0, 1:], reduction="none")
            assert (nll[:-1] - want).abs().max() <= TOL


def _greedy_eager(model: layers.CausalLM, prompt: torch.Tensor, n: int) -> list[int]:
    cache, t = model.make_cache(1, LENGTH), prompt.shape[1]
    out: list[int] = []
    with torch.no_grad():
        logits = model(prompt, torch.arange(t), cache)[0, -1]
        for i in range(n):
            out.append(int(logits.argmax()))
            logits = model(torch.tensor([[out[-1]]]), torch.tensor([t + i]), cache)[0, -1]
    return out


def _greedy(model: layers.CausalLM, run: dict[str, Run], prompt: torch.Tensor,
            n: int) -> list[int]:
    k, v = programs.empty_cache(model, LENGTH)
    t = prompt.shape[1]
    slots = programs.slot_state(model)
    logits, k, v, nov = run["prefill"](prompt, torch.arange(t), k, v, slots)
    out: list[int] = []
    for i in range(n):
        out.append(int(logits[0].argmax()))
        logits, k, v = run["decode"](torch.tensor([[out[-1]]]), torch.tensor([t + i]), k, v,
                                     slots, nov)
    return out


def test_greedy_generation_identical_across_engines(model, engines):
    prompt = _tokens(6, seed=7)
    want = _greedy_eager(model, prompt, 10)
    assert len(set(want)) > 1  # a degenerate model would make this test vacuous
    for engine in ENGINES:
        assert _greedy(model, engines[engine], prompt, 10) == want, engine
