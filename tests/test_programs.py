"""The programs' math: prefill / decode / score (as the torch reference runs them) against the
eager model (max abs <= 1e-4, DESIGN.md rule 2), greedy generation included. The engines'
parity with the same reference, for every architecture, program and bit width, is the
backend-ops matrix (test_backend_ops.py)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from moegrow.export import moe as moes
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


def _written(cache: torch.Tensor, rows: torch.Tensor, start: int) -> torch.Tensor:
    """The cache with a run's keys or values [L, 1, Hkv, T, D] written from `start`."""
    cache[:, :, :, start:start + rows.shape[3]] = rows
    return cache


def _eager(model: layers.CausalLM, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)[0]  # [T, V]


def test_moe_formulations_match_eager(model):
    moe = model.model.layers[0].mlp
    x = torch.randn(2, 9, ARGS.hidden_size)
    with torch.no_grad():
        want, want_logits = moe(x)
        assert (moe.reference(x) - want).abs().max() < 1e-5  # the eager path itself
        for cls in (moes.DenseMoE, moes.GatherMoE):
            got, logits = cls(moe)(x)
            assert (got - want).abs().max() < 1e-5, cls.__name__
            assert torch.equal(logits, want_logits)


def test_moe_formulations_split_base_experts_and_spare_slots(model):
    """With spare slots the programs hold them in linears of their own (`moes.Slots`):
    every slot open, the same math as the eager MoE over all E + S; a one-pass program's
    MoE never routes to a spare slot (the eager MoE without them)."""
    spare = programs.with_spare(model, 2)
    moe = spare.model.layers[0].mlp
    with torch.no_grad():  # spare slots with weights and router rows of their own
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(moe.experts, name)[-2:].normal_(0, 0.2)
        moe.gate.weight[-2:].normal_()
        x = torch.randn(9, ARGS.hidden_size)
        assert (moe.route(x)[2] >= ARGS.num_local_experts).any()
        want, base = moe(x)[0], model.model.layers[0].mlp(x)[0]
        for cls in (moes.DenseMoE, moes.GatherMoE):
            assert (cls(moe)(x)[0] - want).abs().max() < 1e-5, cls.__name__
            assert (cls(moe, gated=False)(x)[0] - base).abs().max() < 1e-5, cls.__name__


@pytest.mark.parametrize("engine", ENGINES)
def test_prefill_logits_match_eager_for_several_lengths(model, engines, engine):
    run = engines[engine]["prefill"]
    for t in (1, 5, 23):  # one export, any T up to the cache length
        tokens = _tokens(t, seed=t)
        k, v = programs.empty_cache(model, LENGTH)
        k[:, :, :, :] = 5.0  # what the cache holds from the run's first position on is masked
        logits, k_out, v_out, _ = run(tokens, torch.arange(t), k, v, programs.slot_state(model))
        assert logits.shape == (1, ARGS.vocab_size)
        assert (logits[0] - _eager(model, tokens)[-1]).abs().max() <= TOL
        assert k_out.shape == v_out.shape == (*k.shape[:3], t, k.shape[4])  # the run's rows


@pytest.mark.parametrize("engine", ENGINES)
def test_prefill_then_decode_equals_full_forward(model, engines, engine):
    tokens, t0 = _tokens(20), 8
    want = _eager(model, tokens)
    k, v = programs.empty_cache(model, LENGTH)
    slots = programs.slot_state(model)
    logits, kr, vr, nov = engines[engine]["prefill"](tokens[:, :t0], torch.arange(t0), k, v,
                                                     slots)
    k, v = _written(k, kr, 0), _written(v, vr, 0)
    worst = (logits[0] - want[t0 - 1]).abs().max()
    for i in range(t0, tokens.shape[1]):
        logits, kr, vr = engines[engine]["decode"](tokens[:, i:i + 1], torch.tensor([i]), k, v,
                                                   slots, nov)
        k, v = _written(k, kr, i), _written(v, vr, i)
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
    logits, kr, vr, nov = run["prefill"](prompt, torch.arange(t), k, v, slots)
    k, v = _written(k, kr, 0), _written(v, vr, 0)
    out: list[int] = []
    for i in range(n):
        out.append(int(logits[0].argmax()))
        logits, kr, vr = run["decode"](torch.tensor([[out[-1]]]), torch.tensor([t + i]), k, v,
                                       slots, nov)
        k, v = _written(k, kr, t + i), _written(v, vr, t + i)
    return out


def test_greedy_generation_identical_across_engines(model, engines):
    prompt = _tokens(6, seed=7)
    want = _greedy_eager(model, prompt, 10)
    assert len(set(want)) > 1  # a degenerate model would make this test vacuous
    for engine in ENGINES:
        assert _greedy(model, engines[engine], prompt, 10) == want, engine


def test_one_pass_programs_equal_the_gated_ones_until_a_clone_exists(model):
    """A bundle with spare slots serves `prefill`, `decode`, `score`, `observe` in one pass
    (no domain gate, no spare slot) until growth spawns, then `NAME_gated`: both agree
    while no slot is spawned, and the one pass keeps a spawned slot shut."""
    from moegrow.export import bundle

    spare = programs.with_spare(model, 2)
    tokens = _tokens(20).numpy()
    with torch.no_grad():  # class 1: the tokens of this text are 10x likelier than the base's
        spare.domains[:, 0] = -8.0
        spare.domains[:, 1] = -8.0 - np.log(10)
        spare.domains[tokens[0], 1] = -8.0 + np.log(10)
    ref = reference.Reference(spare)
    empty = programs.slot_state(spare).numpy()
    spawned = empty.copy()
    spawned[:, :, -2] = (0.5, 1.0, 0.1, 1)  # opens past GATE_MIN tokens
    k, v = (c.numpy() for c in programs.empty_cache(spare, LENGTH))
    classes = spare.domains.shape[1]
    inputs = {"score": lambda s: [tokens, s], "observe": lambda s: [tokens, s],
              "prefill": lambda s: [tokens, np.arange(20), k, v, s],
              "decode": lambda s: [tokens[:, :1], np.array([20]), k, v, s,
                                   np.full((1, classes), 5.0, np.float32)]}
    assert bundle.serving(0) == ["prefill", "decode", "score", "observe"]
    assert bundle.serving(2) == [*bundle.serving(0), "prefill_gated", "decode_gated",
                                 "score_gated", "observe_gated"]
    for name, args in inputs.items():
        one, two = ref.run(name, args(empty)), ref.run(f"{name}_gated", args(empty))
        novelty = [n == "novelty" for n in ref.program(name).outputs]
        for a, b, nov in zip(one, two, novelty, strict=True):
            if nov:  # the one pass scores no class; the gated one sees class 1 win
                assert (a == 0).all() and b[0, 1] > 0 > b[0, 0]
            else:
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        gated = ref.run(f"{name}_gated", args(spawned))
        assert not np.allclose(gated[0], two[0], atol=1e-4)  # the clone opened there
        for a, b in zip(ref.run(name, args(spawned)), one, strict=True):  # shut here
            np.testing.assert_array_equal(a, b)


def test_the_gate_scores_each_class_against_the_base_where_it_is_the_likeliest_grown():
    """`programs.scores`: summed log-probability minus the base's (class 0) where the class
    is the likeliest grown one, else closed; closed before GATE_MIN tokens; a class that
    wins on one text loses on another's, and on base text neither reaches a threshold."""
    table = torch.log(torch.tensor([[0.7, 0.1, 0.2], [0.2, 0.8, 0.1], [0.1, 0.1, 0.7],
                                    [0.8, 0.1, 0.1]]))
    tokens = torch.tensor([[1] * 10 + [2] * 30])
    got = programs.scores(table, tokens)
    summed = torch.cumsum(table[tokens[0]], 0)
    for c in (1, 2):
        other = summed[:, 3 - c]  # the other grown class
        want = torch.where((torch.arange(40) + 1 >= programs.GATE_MIN)
                           & (summed[:, c] >= other), summed[:, c] - summed[:, 0],
                           -programs.MASKED)
        torch.testing.assert_close(got[:, c], want)
    assert got[9, 1] > 0 and got[9, 2] == -programs.MASKED
    assert got[39, 2] > 0 and got[39, 1] == -programs.MASKED
    base = programs.scores(table, torch.tensor([[3] * 40]))
    assert (base[:, 1:] < 0).all()  # base text: below any threshold >= 0


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_the_runtimes_numpy_gate_scores_mirror_the_programs(classes):
    """`runtime.gate.scores` (the threshold's calibration) and `gate.context_scores` (a
    typed context's gates) equal `programs.scores` for every class, the base's included."""
    from moegrow.runtime import gate

    rng = np.random.default_rng(classes)
    table = np.log(rng.dirichlet(np.full(classes, 0.5), size=50)).astype(np.float32)
    ids = rng.integers(0, 50, 60)
    got = programs.scores(torch.from_numpy(table), torch.from_numpy(ids)[None]).numpy()
    for c in range(classes):
        np.testing.assert_allclose(gate.scores(table, ids, c), got[:, c], rtol=1e-4,
                                   atol=1e-3)
    np.testing.assert_allclose(gate.context_scores(table, ids), got, rtol=1e-4, atol=1e-3)
    assert (got[:programs.GATE_MIN - 1] == -programs.MASKED).all()


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_the_runtimes_numpy_open_slots_mirror_the_programs(classes):
    """`runtime.gate.opened` (which windows a slice can change: the guard) opens the slots
    that `programs.set_gates` opens wherever it says it is sure, and so do the programs'
    gates set from `gate.context_scores` (what `Runtime.extend` gives `decode`); it is
    unsure only near a threshold or a tie: rows of base experts, clones (a = 1) and replaced
    parents (a = -1) with thresholds drawn among the scores themselves."""
    from moegrow.runtime import gate

    rng = np.random.default_rng(classes)
    table = np.log(rng.dirichlet(np.full(classes, 0.5), size=50)).astype(np.float32)
    ids = rng.integers(0, 50, 256)
    got = programs.scores(torch.from_numpy(table), torch.from_numpy(ids)[None])
    live = got[got > -programs.MASKED].numpy()
    layers_, slots = 3, 8
    rows = np.zeros((layers_, 4, slots), np.float32)  # (bias, a, t, class) per slot
    for lay in range(layers_):
        for s in range(4, slots):  # slots 0-3 stay base experts
            rows[lay, :, s] = (1.0, rng.choice([1.0, -1.0]), rng.choice(live),
                               rng.integers(1, classes))
    blocks = [SimpleNamespace(mlp=SimpleNamespace()) for _ in range(layers_)]
    model = SimpleNamespace(model=SimpleNamespace(layers=blocks))  # what set_gates reads
    programs.set_gates(model, torch.from_numpy(rows), got)
    want = np.stack([b.mlp.slot_open.numpy() > 0 for b in model.model.layers])  # [L, T, S]
    mine, unsure = gate.opened(table, rows, ids)
    assert mine.shape == want.shape == unsure.shape
    np.testing.assert_array_equal(mine[~unsure], want[~unsure])
    assert mine[:, :, :4].all() and not unsure[:, :, :4].any()  # base experts: always open
    assert 0 < unsure.mean() < 0.05  # thresholds drawn from the scores: a few are close
    for t in range(len(ids)):  # one position at a time, as a decode step takes them
        row = gate.context_scores(table, ids)[t:t + 1].astype(np.float32)
        programs.set_gates(model, torch.from_numpy(rows), torch.from_numpy(row))
        mirrored = np.stack([b.mlp.slot_open.numpy()[0] > 0 for b in model.model.layers])
        np.testing.assert_array_equal(mirrored[~unsure[:, t]], want[:, t][~unsure[:, t]])
