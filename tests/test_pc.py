"""Deepening programs (`export/pc.py`): the default schedule's updates are the NLL gradient
restricted to one layer's experts with the routers fixed, in torch and, through a bundle, on
both engines (every architecture and bit width: test_backend_ops.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import deepen_autograd, exported, random_moe
from moegrow.export import checkpoint, pc, programs, relax
from moegrow.export.codes import routed_codes
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


@pytest.mark.parametrize("layer", [0, 2])
def test_default_schedule_is_the_gradient_of_the_layers_experts(model, layer):
    tokens, valid = _tokens(), torch.ones(W)
    valid[-1] = 0  # the last position has nothing to predict
    program = pc.Deepen(model, layer, W)
    with torch.no_grad():
        dwg, dwu, dwd, count, nll, energy, *_ = program(tokens, valid)
    want = deepen_autograd(model, layer, tokens, valid)
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


@pytest.mark.parametrize("lean, rows", [(False, False), (True, False), (False, True)])
def test_one_sweep_gives_every_layers_updates(model, lean, rows, monkeypatch):
    """`Sweep`: one forward pass and one backward give what `deepen{l}` gives for each
    layer l (the NLL's gradient is the same whichever layers it is taken for), the top
    layer run again for its backward (`lean`) or not, the loss head over chunks of tokens
    (`lean`, or `chunked` with `rows`: ONNX Runtime's forms) or not, each expert on all
    tokens or on the rows of those that chose it (`rows`)."""
    monkeypatch.setattr(pc.Layered, "chunk", 10)  # chunks of 10, 10 and 4 of the 24
    tokens, valid = _tokens(seed=3), torch.ones(W)
    valid[-1] = 0
    with torch.no_grad():
        every = pc.Sweep(model, W, lean=lean, rows=rows, chunked=rows)(tokens, valid)
        for layer in range(ARGS.num_hidden_layers):
            one = pc.Deepen(model, layer, W)(tokens, valid)
            for name, a, b in zip(pc.OUTPUTS, every, one, strict=True):
                b_ = b if name in ("nll", "novelty") else b[None]
                a_ = a if name in ("nll", "novelty") else a[layer:layer + 1]
                torch.testing.assert_close(a_, b_, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("bits, lean", [(8, False), (4, False), (4, True), (8, True)])
def test_a_quantized_sweep_trains_the_spare_slots_through_the_served_codes(bits, lean,
                                                                          monkeypatch):
    """A quantized bundle's sweep holds its frozen linears as the serving programs' codes
    (`frozen.Frozen`; the base experts' in the routed layout, `FrozenExperts`: no fp32
    copy of them) and gives the spare slots' updates that autograd gives on the
    dequantized model, the rest of its outputs as well (its backward's second run of a
    layer on the first run's dequantized weights, or ONNX Runtime's form: `lean`,
    dequantizing them again, the loss head over chunks of tokens, and `rows`, each expert on
    the tokens that chose it)."""
    from moegrow.export import quantize

    monkeypatch.setattr(pc.Layered, "chunk", 10)
    args = mixtral.ModelArgs(vocab_size=97, hidden_size=64, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, num_local_experts=4,
                             num_experts_per_tok=2, max_position_embeddings=32)
    model = programs.with_spare(random_moe(args), 2)
    with torch.no_grad():  # spare slots with router rows, open everywhere: the domain's
        for block in model.model.layers:
            block.mlp.gate.weight[4:] = torch.randn(2, 64, generator=torch.Generator()
                                                    .manual_seed(5))
            block.mlp.experts.gate_proj[4:] = block.mlp.experts.gate_proj[:2] * 1.1
    slots = programs.slot_state(model)
    slots[:, 2] = 0.0
    tokens, valid = _tokens(seed=4), torch.ones(W)
    valid[-1] = 0
    frozen = pc.Sweep(model, W, bits, lean=lean, rows=lean)  # ONNX Runtime's form
    names = [n for n, _ in frozen.loss.named_parameters()]
    assert not any(n.endswith(("mlp.gate_proj.weight", "q_proj.weight", "lm_head.weight"))
                   for n in names)  # nothing quantized is held in fp32
    codes = {t.numpy().tobytes() for t in frozen.loss.buffers() if t.dtype == torch.uint8}
    fc = routed_codes(model.model.layers[1].mlp.experts, 4, bits, quantize.packed)
    assert {fc["fc1"].numpy().tobytes(), fc["fc2"].numpy().tobytes()} <= codes
    w = model.model.layers[1].mlp.experts.down_proj.detach()[:4]  # not the dense layout's
    assert quantize.packed(w.permute(1, 0, 2).reshape(64, -1), bits)[0].tobytes() not in codes
    with torch.no_grad():
        got = frozen(tokens, valid, slots)
        want = pc.Sweep(quantize.dequantized(model, bits), W)(tokens, valid, slots)
    assert got[0].shape[1] == 2 and want[0].shape[1] == 6  # the spare slots only
    assert got[3][:, 4:].sum() > 0  # tokens reached them
    for name, a, b in zip(pc.OUTPUTS, got, want, strict=True):
        b = b[:, 4:] if name in ("dwg", "dwu", "dwd") else b
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_a_sweep_on_rows_skips_an_expert_no_token_chose(model):
    """`rows`: on a window where no token chose one expert of a layer, that expert is
    computed on no row, and the sweep still equals the dense one; then another window (other
    row counts) through the same program (traced with the row counts symbolic, not the
    example's)."""
    dense, rows = pc.Sweep(model, W), pc.Sweep(model, W, rows=True)
    valid = torch.ones(W)
    with torch.no_grad():
        for seed in (1, 3):
            tokens = _tokens(seed=seed)
            want, got = dense(tokens, valid), rows(tokens, valid)
            assert (want[3] == 0).any() == (seed == 1)  # count: layer 2's expert 2 on seed 1
            for name, a, b in zip(pc.OUTPUTS, got, want, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [32, 4])
def test_the_onnx_sweep_folds_its_shape_arithmetic_not_its_weights(exports, bits):
    """ONNX Runtime's sweeps are exported unoptimized (`fold_weights = False`: a folded
    transpose or dequantization of a weight would be a copy a commit never updates), then
    their scalars and shape arithmetic are folded (`lower.fold_shapes`): folding the
    bundle's program again finds nothing, and every weight is still read by an op. (Their
    outputs against torch: the engines' parity tests on the same bundles,
    test_backend_ops.py.)"""
    import onnx
    import onnx_ir as ir
    from moegrow.export import lower

    path = exported(exports["mixtral", bits]) / "programs" / "sweep.onnx"
    proto = onnx.load(str(path), load_external_data=False)
    model = ir.from_proto(proto)
    lower.fold_shapes(model)
    assert len(model.graph) == len(proto.graph.node) > 0
    weights = {t.name for t in proto.graph.initializer if np.prod(t.dims) > 64}
    assert weights and weights <= {i for n in proto.graph.node for i in n.input}


def test_a_quantized_sweep_dequantizes_each_weight_once_or_per_run():
    """The sweep runs every layer but the top one twice (`pc.Layered`: its activations are
    not held until the backward); both runs read one dequantization of each frozen weight
    (one Floor per int4 weight after `pc._cse`, not one per run: ExecuTorch's), or, `lean`
    (ONNX Runtime's), every layer runs twice and the second run dequantizes again."""
    from moegrow.export import frozen

    args = mixtral.ModelArgs(vocab_size=97, hidden_size=64, intermediate_size=64,
                             num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, num_local_experts=4,
                             num_experts_per_tok=2, max_position_embeddings=32)
    model = programs.with_spare(random_moe(args), 2)
    for lean in (False, True):
        sweep = pc.Sweep(model, W, 4, lean=lean)
        modules = list(sweep.loss.modules())
        weights = (sum(isinstance(m, frozen.Frozen) and m.bits == 4 for m in modules)
                   + 3 * sum(isinstance(m, frozen.FrozenExperts) for m in modules))
        floors = sum(n.target == torch.ops.aten.floor.default
                     for n in sweep.sweep.graph.nodes)
        assert weights == 7 * args.num_hidden_layers
        assert floors == weights * (1 + lean)


def test_the_adam_program_steps_as_torch_adam(model):
    """`pc.Adam` (growth's optimizer, a program): three steps equal torch.optim.Adam's on
    the summed gradients over the step's tokens."""
    program = pc.Adam(model)
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in program.shapes]
    params = [torch.nn.Parameter(w.clone()) for w in start]
    opt = torch.optim.Adam(params, lr=1e-3)
    w, m, v = start, [torch.zeros(s) for s in program.shapes], [torch.zeros(s)
                                                                 for s in program.shapes]
    for t in range(1, 4):
        summed = [torch.randn(s, generator=gen) * 7 for s in program.shapes]  # 7 tokens
        for p, g in zip(params, summed, strict=True):
            p.grad = g / 7
        opt.step()
        b1, b2 = program.betas
        with torch.no_grad():
            out = program(*w, *summed, *m, *v,
                          torch.tensor([1e-3, 1 / (1 - b1**t), 1 / (1 - b2**t), 1 / 7, 1e-8]))
        w, m, v = list(out[:3]), list(out[3:6]), list(out[6:])
    for got, want in zip(w, params, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-6)


def test_a_short_window_padded_at_the_end_gives_the_same_updates(model):
    n = 15
    short = _tokens(n, seed=4)
    tokens = torch.cat([short, torch.zeros(1, W - n, dtype=torch.long)], dim=1)
    valid = (torch.arange(W) < n - 1).float()
    program = pc.Deepen(model, 1, W)
    with torch.no_grad():
        got = program(tokens, valid)
    want = deepen_autograd(model, 1, short, torch.ones(n).index_fill(0, torch.tensor([n - 1]), 0))
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
        small = relax.Strict(model, 1, W, steps=8, eta=0.1)(tokens, valid)
        big = relax.Strict(model, 1, W, steps=12, eta=0.3)(tokens, valid)
    for out in (small, big):
        free = out[-2]
        assert (free[1:] <= free[:-1]).all()  # F never rises over accepted steps
        assert out[3].tolist() == exact[3].tolist() and torch.equal(out[4], exact[4])
    assert small[-1].item() == 8 and _cosine(small[:3], exact[:3]) > 0.9  # PC.md: 0.90-0.99
    used = int(big[-1].item())
    assert 0 < used < 12  # eta = 0.3 overshoots on this model: F rose, the sweep halted
    with torch.no_grad():
        again = relax.Strict(model, 1, W, steps=used, eta=0.3)(tokens, valid)
    for a, b in zip(big[:3], again[:3], strict=True):  # halting kept the last good values
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


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
    every = rt.sweep(ids)  # all layers from one program
    n = len(ids)
    tokens = torch.from_numpy(ids)[None]
    valid = torch.ones(n).index_fill(0, torch.tensor([n - 1]), 0)
    for layer in range(model.args.num_hidden_layers):
        got = rt.deepen(layer, ids)  # the sweep's part for one layer
        assert all(np.array_equal(got[k], every[k][layer]) for k in ("dwg", "dwu", "dwd"))
        dg, _, dd, _, _ = deepen_autograd(model, layer, tokens, valid, slots)
        np.testing.assert_allclose(got["dwg"], dg.numpy(), rtol=1e-4,
                                   atol=1e-4 * float(dg.abs().max()))
        np.testing.assert_allclose(got["dwd"], dd.numpy(), rtol=1e-4,
                                   atol=1e-4 * float(dd.abs().max()))
        assert got["count"].sum() == model.args.num_experts_per_tok * (n - 1)
    with pytest.raises(session.InputError):
        rt.deepen(1, ids[:1])
    with pytest.raises(session.InputError):
        rt.sweep(ids[:1])
    with pytest.raises(session.InputError):
        rt.deepen(model.args.num_hidden_layers, ids)


@pytest.mark.slow
def test_strict_programs_through_the_runtime(exports, tiny_ckpt):
    """`--strict-steps 2`: the strict sweep (ONNX Runtime; conftest.exports) against
    `relax.Strict` in torch."""
    from moegrow import runtime

    rt = runtime.open(exported(exports["mixtral", "strict"]), "onnxruntime")
    assert rt.bundle.manifest["deepening"] == {"strict_steps": 2, "strict_eta": 0.1}
    layers = rt.bundle.config["num_hidden_layers"]
    assert {f"strict{i}" for i in range(layers)} <= set(rt.bundle.manifest["programs"])
    model = programs.with_spare(checkpoint.load(tiny_ckpt).eval(),
                                rt.bundle.config["spare_experts"])
    ids = np.array([1, *rt.sp.encode("The parser reads the next word. Our user writes.")])
    n = len(ids)
    strict = rt.deepen(1, ids, strict=True)
    window = rt.bundle.context
    padded = torch.zeros(1, window, dtype=torch.long)
    padded[0, :n] = torch.from_numpy(ids)
    with torch.no_grad():
        want = relax.Strict(model, 1, window, steps=2, eta=0.1)(
            padded, (torch.arange(window) < n - 1).float(), programs.slot_state(model))
    assert strict.pop("first") == 0  # an fp32 bundle's gradients cover every slot
    for name, a, b in zip(relax.Strict.outputs, strict.values(), want, strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-3 * float(b.abs().max()),
                                   err_msg=name)


def test_error_space_nodes_compose_from_their_errors(model):
    """`Energy.compose` inverts `Energy.errors`: the nodes error-space PC builds from the
    errors are the nodes that have them; at zero errors, the feed-forward values."""
    tokens, valid = _tokens(seed=5), torch.ones(W)
    energy = relax.Energy(model, 0)
    slots = programs.slot_state(energy.model)
    with torch.no_grad():
        nodes, gates, base, nll, *_ = energy(tokens, valid, slots)
        moved = [n + 0.1 * torch.randn(n.shape, generator=torch.Generator().manual_seed(i))
                 for i, n in enumerate(nodes)]
        eps, top_nll = energy.errors(tokens, moved, gates, base)
        for a, b in zip(energy.compose(tokens, eps, gates, base), moved, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        zero = energy.compose(tokens, [torch.zeros_like(n) for n in nodes], gates, base)
        for a, b in zip(zero, nodes, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(energy.errors(tokens, nodes, gates, base)[1] * valid, nll)


def test_the_schedules_study_measures_how_the_error_travels(model):
    """`tools/strict.py` on the random model's layer 0 (five nodes above it): state-based
    relaxation moves the error one node per step, so the layer's update is zero until the
    fifth step; error-space PC's first step is the gradient itself (the default schedule),
    scaled by its step."""
    from moegrow.tools import strict

    study = strict.Study(model, W)
    tokens, valid = _tokens(seed=6), torch.ones(W)
    valid[-1] = 0
    exact = study.exact(tokens, valid, 0)
    with torch.no_grad():
        want = pc.Deepen(model, 0, W)(tokens, valid)
    for got, ref in zip(pc.stack(ARGS.intermediate_size, exact), want[:3], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)  # the sweep's gradient
    for schedule in ("strict", "curvature"):
        r = study.relax(tokens, valid, 0, schedule, 8, 0.01, exact)
        assert r["ratio"][4] == 0 and r["ratio"][8] > 0, r["ratio"]
        assert r["nonfinite"] is False
    r = study.relax(tokens, valid, 0, "error", 2, 0.01, exact)
    assert r["cos"][1] > 0.999
    assert r["ratio"][1] == pytest.approx(r["eta"][0], rel=1e-3)
    assert all(b <= a for a, b in zip(r["free_energy"], r["free_energy"][1:],
                                          strict=False))
