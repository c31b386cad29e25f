"""Deepening programs (`export/pc.py`): the default schedule's updates are the NLL gradient
restricted to one layer's experts with the routers fixed, in torch and on both engines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_moe
from moegrow.export import lower, pc, programs
from moegrow.export.models import mixtral

ARGS = mixtral.ModelArgs(vocab_size=97, hidden_size=48, intermediate_size=40,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32)
W = 24  # window of the programs under test


@pytest.fixture(scope="module")
def model():
    return random_moe(ARGS)


def _tokens(t: int = W, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (1, t), generator=torch.Generator().manual_seed(seed))


def _autograd(model, layer: int, tokens, valid):
    """Autograd through the eager program with fixed routers: d nll / d (gate, up, down) of
    `layer`'s experts as [E, F, C], [E, F, C], [E, C, F], and eps at the layer's output."""
    loss = pc.Loss(model, layer)
    mlp = loss.model.model.layers[layer].mlp
    weights = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    for w in weights:
        w.requires_grad_(True)
    probe = torch.zeros(tokens.shape[1], ARGS.hidden_size, requires_grad=True)
    total, (_, gates, *_) = loss(tokens, valid, probe, programs.slot_state(loss.model))
    dg, du, dd, eps = torch.autograd.grad(total, [*weights, probe])
    e, f, c = ARGS.num_local_experts, ARGS.intermediate_size, ARGS.hidden_size
    return (dg.reshape(e, f, c), du.reshape(e, f, c), dd.reshape(c, e, f).permute(1, 0, 2),
            eps, gates.detach())


@pytest.mark.parametrize("layer", [0, 2])
def test_default_schedule_is_the_gradient_of_the_layers_experts(model, layer):
    tokens, valid = _tokens(), torch.ones(W)
    valid[-1] = 0  # the last position has nothing to predict
    program = pc.Deepen(model, layer, W)
    with torch.no_grad():
        dwg, dwu, dwd, count, nll, energy, *_ = program(tokens, valid)
    want = _autograd(model, layer, tokens, valid)
    for got, ref in zip((dwg, dwu, dwd), want[:3], strict=True):
        assert ref.abs().max() > 0
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    eps, gates = want[3], want[4] * valid[:, None]
    torch.testing.assert_close(energy, (gates**2).T @ (eps**2).sum(-1), rtol=1e-4, atol=1e-6)
    assert count.tolist() == (gates > 0).sum(0).float().tolist()
    assert count.sum() == ARGS.num_experts_per_tok * (W - 1)
    # experts chosen by no valid token get no update
    for e in range(ARGS.num_local_experts):
        if count[e] == 0:
            assert dwg[e].abs().max() == dwu[e].abs().max() == dwd[e].abs().max() == 0


def test_a_short_window_padded_at_the_end_gives_the_same_updates(model):
    n = 15
    short = _tokens(n, seed=4)
    tokens = torch.cat([short, torch.zeros(1, W - n, dtype=torch.long)], dim=1)
    valid = (torch.arange(W) < n - 1).float()
    program = pc.Deepen(model, 1, W)
    with torch.no_grad():
        got = program(tokens, valid)
    want = _autograd(model, 1, short, torch.ones(n).index_fill(0, torch.tensor([n - 1]), 0))
    for a, b in zip(got[:3], want[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[4][:n], _autograd_nll(model, short), rtol=1e-5, atol=1e-5)


def _autograd_nll(model, tokens):
    """The plain `score` program's NLL: the sweep's forward is the model's forward."""
    with torch.no_grad():
        return programs.Score(model)(tokens)[0]


def _cosine(a, b) -> float:
    a, b = torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b])
    return float(a @ b / (a.norm() * b.norm()))


def test_strict_pc_relaxes_towards_the_gradient_and_halts_when_f_rises(model):
    tokens, valid = _tokens(), torch.ones(W)
    valid[-1] = 0
    with torch.no_grad():
        exact = pc.Deepen(model, 1, W)(tokens, valid)
        small = pc.Strict(model, 1, W, steps=8, eta=0.1)(tokens, valid)
        big = pc.Strict(model, 1, W, steps=12, eta=0.3)(tokens, valid)
    for out in (small, big):
        free = out[-2]
        assert (free[1:] <= free[:-1]).all()  # F never rises over accepted steps
        assert out[3].tolist() == exact[3].tolist() and torch.equal(out[4], exact[4])
    assert small[-1].item() == 8 and _cosine(small[:3], exact[:3]) > 0.9  # PC.md: 0.90-0.99
    used = int(big[-1].item())
    assert 0 < used < 12  # eta = 0.3 overshoots on this model: F rose, the sweep halted
    with torch.no_grad():
        again = pc.Strict(model, 1, W, steps=used, eta=0.3)(tokens, valid)
    for a, b in zip(big[:3], again[:3], strict=True):  # halting kept the last good values
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["executorch", "onnxruntime"])
@pytest.mark.parametrize("strict", [False, True])
def test_deepen_runs_on_both_engines_like_torch(model, engine, strict, tmp_path):
    program = pc.Strict(model, 1, W, steps=3) if strict else pc.Deepen(model, 1, W)
    tokens, valid = _tokens(seed=7), torch.ones(W)
    valid[-1] = 0
    inputs = (tokens, valid, programs.slot_state(program.loss.model))
    with torch.no_grad():
        want = [o.numpy() for o in program(*inputs)]
    if engine == "executorch":
        from executorch.runtime import Runtime

        lower.to_pte({"deepen": (program, inputs, None)}, tmp_path / "d.pte")
        method = Runtime.get().load_program(tmp_path / "d.pte").load_method("deepen")
        got = [o.numpy() for o in method.execute(list(inputs))]
    else:
        import onnxruntime as ort

        lower.to_onnx(program, inputs, tmp_path / "d.onnx", None, program.outputs)
        session = ort.InferenceSession(str(tmp_path / "d.onnx"),
                                       providers=["CPUExecutionProvider"])
        got = session.run(None, dict(zip(("tokens", "valid", "slots"),
                                         (i.numpy() for i in inputs), strict=True)))
    scale = 1e-3 if strict else 1e-4  # three relaxation steps accumulate more rounding
    for name, a, b in zip(program.outputs, got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=scale * np.abs(b).max(), err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["executorch", "onnxruntime"])
def test_the_bundle_deepens_through_the_runtime(tiny_bundle, tiny_ckpt, backend):
    from moegrow import runtime
    from moegrow.export import checkpoint
    from moegrow.runtime import session

    rt = runtime.open(tiny_bundle, backend)
    spare = rt.bundle.config["spare_experts"]
    model = programs.with_spare(checkpoint.load(tiny_ckpt).eval(), spare)
    slots = programs.slot_state(model)
    ids = np.array([1, *rt.sp.encode("The parser reads the next word. Our user writes.")])
    got = rt.deepen(1, ids)
    n = len(ids)
    tokens = torch.from_numpy(ids)[None]
    valid = torch.ones(n).index_fill(0, torch.tensor([n - 1]), 0)
    loss = pc.Loss(model, 1)
    mlp = loss.model.model.layers[1].mlp
    weights = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    for w in weights:
        w.requires_grad_(True)
    dg, _, dd = torch.autograd.grad(
        loss(tokens, valid, torch.zeros(n, model.args.hidden_size), slots)[0], weights)
    e, f, c = mlp.experts, mlp.hidden, model.args.hidden_size
    np.testing.assert_allclose(got["dwg"], dg.reshape(e, f, c).numpy(), rtol=1e-4,
                               atol=1e-4 * float(dg.abs().max()))
    np.testing.assert_allclose(got["dwd"], dd.reshape(c, e, f).permute(1, 0, 2).numpy(),
                               rtol=1e-4, atol=1e-4 * float(dd.abs().max()))
    assert got["count"].sum() == model.args.num_experts_per_tok * (n - 1)
    with pytest.raises(session.InputError):
        rt.deepen(1, ids[:1])
    strict = rt.deepen(1, ids, strict=True)  # the fixture's bundle has 2-step strict programs
    window = rt.bundle.context
    padded = torch.zeros(1, window, dtype=torch.long)
    padded[0, :n] = tokens[0]
    with torch.no_grad():
        want = pc.Strict(model, 1, window, steps=2, eta=0.1)(
            padded, (torch.arange(window) < n - 1).float(), slots)
    for name, a, b in zip(pc.Strict.outputs, strict.values(), want, strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-3 * float(b.abs().max()),
                                   err_msg=name)
