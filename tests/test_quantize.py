"""Quantized programs: int8 / int4 weights on ExecuTorch (XNNPACK) and ONNX Runtime.

The tiny pretrained model's quantized bundles (conftest.exports) and `score` programs: their
perplexity on held-out text against the fp32 torch program, int8 within 2%, int4 within 6%
(issue 3); the ONNX quantizer on its own, both of its int8 forms; the routed MoE of ONNX
Runtime's quantized serving programs (`QMoE`, only the chosen experts read) against the
torch reference, with a spare slot taking a base expert's place.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import exported
from moegrow.export import checkpoint, lower, moe, programs, quantize
from moegrow.export.tokenizer import BOS

pytestmark = pytest.mark.slow  # waits for the exports; one ONNX export

LENGTH = 64  # tokens per scored window
LIMITS = {8: 0.02, 4: 0.06}  # relative perplexity increase allowed over fp32
NMSE = {8: 1e-2, 4: 3e-2}  # test_backend_ops.py's bounds against the torch reference


@pytest.fixture(scope="module")
def setup(tiny_ckpt, corpus_dir):
    model = checkpoint.load(tiny_ckpt)
    tok = checkpoint.load_tokenizer(tiny_ckpt, model.args.vocab_size)
    ids = [BOS] + tok.encode((corpus_dir / "heldout.txt").read_text()[:3000])
    windows = [torch.tensor(ids[i:i + LENGTH])[None] for i in range(0, len(ids) - 1, LENGTH - 1)]
    windows = [w for w in windows if w.shape[1] >= 2]
    return programs.Score(model), windows, model


def _ppl(run, windows) -> float:
    nll = [np.asarray(run(w), dtype=np.float64)[:w.shape[1] - 1] for w in windows]
    return math.exp(np.concatenate(nll).mean())


@pytest.fixture(scope="module")
def fp32_ppl(setup) -> float:
    program, windows, _ = setup
    with torch.no_grad():
        return _ppl(lambda w: program(w)[0].numpy(), windows)


def test_bad_bits(setup, tmp_path):
    program, _, _ = setup
    for bits in (32, 16, 2, True, "4"):
        with pytest.raises(ValueError, match="bits"):
            quantize.quantize_for_pte(program, bits)
        with pytest.raises(ValueError, match="bits"):
            quantize.quantize_onnx(tmp_path / "a.onnx", tmp_path / "b.onnx", bits)


def test_dense_matches_program(setup):
    """The quantizers' dense form (decode's GatherMoE too) is the same math as the program."""
    program, windows, model = setup
    with torch.no_grad():
        assert torch.allclose(quantize.dense(program)(windows[0])[0], program(windows[0])[0],
                              atol=1e-4)
        decode = programs.Decode(model)
        inputs, _ = decode.example(LENGTH)
        for a, b in zip(quantize.dense(decode)(*inputs), decode(*inputs), strict=True):
            assert torch.allclose(a, b, atol=1e-4)


def test_router_stays_fp32_and_the_head_is_int8(setup):
    from torchao.utils import TorchAOBaseTensor

    program, _, _ = setup
    q = quantize.quantize_for_pte(program, 4)
    linears = {n: m for n, m in q.named_modules() if isinstance(m, torch.nn.Linear)}
    assert any(n.endswith("mlp.gate") for n in linears) and "model.lm_head" in linears
    for name, m in linears.items():
        quantized = isinstance(m.weight, TorchAOBaseTensor)
        assert quantized == (name.split(".")[-1] in (*quantize.QUANTIZED, "lm_head")), name
    for name, p in program.named_parameters():  # the source program is untouched
        assert not isinstance(p, TorchAOBaseTensor), name


def _left_outside_xnnpack(pte, method: str) -> list[str]:
    """The operators `method` of the program file `pte` runs outside XNNPACK."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte.read_bytes())
    program = getattr(program, "program", program)
    plan = next(p for p in program.execution_plan if p.name == method)
    return [op.name for op in plan.operators]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("engine", ["executorch", "onnxruntime"])
def test_bundle_ppl(setup, fp32_ppl, exports, engine, bits):
    """The quantized bundles of `moegrow export` (conftest.exports) through the runtime."""
    from moegrow.runtime import session

    _, windows, _ = setup
    rt = session.open(exported(exports["mixtral", bits]), engine)
    if engine == "executorch":  # every linear and (de)quantize op went to XNNPACK
        left = _left_outside_xnnpack(rt.bundle.programs(engine)["score"], "score")
        assert left and not [t for t in left if any(k in t for k in ("linear", "mm", "quant",
                                                                      "qparams"))], left
        # decode's routed experts: moegrow's kernel (`quantize.PTE_ROUTED`); score dense
        decode = _left_outside_xnnpack(rt.bundle.programs(engine)["decode"], "decode")
        assert "moegrow::routed_moe" in decode and "moegrow::routed_moe" not in left
        assert rt.bundle.manifest["routed"] == ["executorch", "onnxruntime"]
    else:  # the serving programs read only the chosen experts (QMoE), observe too (beside
        import onnx  # its dense activations); not the deepening ones

        for name, path in rt.bundle.programs(engine).items():
            ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
            routed = name.removesuffix("_gated") in ("prefill", "decode", "score", "observe")
            assert ops.count("QMoE") == (rt.bundle.config["num_hidden_layers"] if routed
                                         else 0), name
    ppl = _ppl(lambda w: rt.run("score", w.numpy())[0], windows)
    print(f"{engine} int{bits}: ppl {ppl:.4f} vs fp32 {fp32_ppl:.4f} ({ppl / fp32_ppl - 1:+.2%})")
    assert ppl <= fp32_ppl * (1 + LIMITS[bits])


@pytest.fixture(scope="module")
def fp32_onnx(setup, tmp_path_factory):
    program, _, _ = setup
    inputs, shapes = program.example(LENGTH)
    path = tmp_path_factory.mktemp("onnx") / "score.onnx"
    return lower.to_onnx(quantize.dense(program), inputs, path, shapes, program.outputs)


@pytest.mark.parametrize("bits,dynamic", [(8, False), (4, False), (8, True)])
def test_onnxruntime_ppl(setup, fp32_ppl, fp32_onnx, bits, dynamic, tmp_path):
    import onnx
    import onnxruntime as ort

    _, windows, _ = setup
    path = quantize.quantize_onnx(fp32_onnx, tmp_path / "score.onnx", bits, dynamic_int8=dynamic)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    layers = setup[2].args.num_hidden_layers
    quant_op = "MatMulInteger" if dynamic else "MatMulNBits"
    assert ops.count(quant_op) == layers * 7 + 1  # q k v o, the experts' gate up down, head
    assert path.stat().st_size < fp32_onnx.stat().st_size
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    slots = programs.slot_state(setup[2]).numpy()
    ppl = _ppl(lambda w: session.run(None, {"tokens": w.numpy(), "slots": slots})[0], windows)
    kind = f"int{bits}" + (" dynamic" if dynamic else "")
    print(f"onnxruntime {kind}: ppl {ppl:.4f} vs fp32 {fp32_ppl:.4f} ({ppl / fp32_ppl - 1:+.2%})")
    assert ppl <= fp32_ppl * (1 + LIMITS[bits])


def _nmse(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


@pytest.mark.parametrize("bits", [8, 4])
def test_routed_moe(setup, bits, tmp_path):
    """`quantize.routed` (ONNX Runtime's quantized serving form): eager, the program on the
    experts' served values (`dequantized`) up to float rounding; lowered (`QMoE`), the dense
    quantized program on ONNX Runtime up to the order of its sums, and the torch reference
    (every linear as served) within the backend-ops matrix's bound; with the first spare
    slot closed, then open and biased to win: it takes a base expert's place, which then
    weighs 0 (the joint top-k)."""
    import onnx
    import onnxruntime as ort

    _, _, model = setup
    spare = programs.with_spare(model, 1)
    experts = copy.deepcopy(spare)  # the reference: the experts as served, the rest fp32
    for block, served in zip(experts.model.layers,  # (the ONNX quantizer takes the rest)
                             quantize.dequantized(spare, bits).model.layers, strict=True):
        block.mlp.experts = served.mlp.experts
    ref = programs.Decode(experts)
    decode = programs.Decode(spare)
    example, shapes = decode.example(LENGTH)
    rng = torch.Generator().manual_seed(0)
    k, v = (torch.randn(example[2].shape, generator=rng) * 0.3 for _ in range(2))
    path = quantize.to_onnx(decode, example, tmp_path / "decode.onnx", shapes, decode.outputs,
                            bits=bits)
    assert [n.op_type for n in onnx.load(str(path)).graph.node
            ].count("QMoE") == model.args.num_hidden_layers
    fp32 = lower.to_onnx(quantize.dense(decode), example, tmp_path / "dense32.onnx", shapes,
                         decode.outputs)
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                for p in (path, quantize.quantize_onnx(fp32, tmp_path / "dense.onnx", bits))]
    names = [i.name for i in sessions[0].get_inputs()]
    served = programs.Decode(quantize.dequantized(spare, bits))  # every linear as served
    form = quantize.routed(decode, bits)
    assert all(isinstance(b.mlp, moe.RoutedMoE) for b in form.model.model.layers)
    slots = programs.slot_state(spare)
    for open_ in (False, True):
        if open_:
            slots[:, :, -1] = torch.tensor([5.0, 0.0, 0.0, 0.0])  # a * s >= t everywhere
        feed = (torch.tensor([[17]]), torch.tensor([9]), k, v, slots, example[5])
        with torch.no_grad():
            got, want = form(*feed), ref(*feed)
            x = torch.randn(4, model.args.hidden_size, generator=rng)
            chosen = form.model.model.layers[0].mlp.route(x)[2]
        assert (chosen == slots.shape[-1] - 1).any() == open_  # the spare slot competes
        for a, b in zip(got, want, strict=True):
            assert _nmse(a, b) < 1e-10, _nmse(a, b)
        routed, dense = (s.run(None, dict(zip(names, (t.numpy() for t in feed), strict=True)))
                         for s in sessions)
        with torch.no_grad():
            reference = served(*feed)
        for a, b, r in zip(routed, dense, reference, strict=True):
            assert _nmse(a, b) < 1e-6, _nmse(a, b)  # the same sums, another order
            assert _nmse(a, r) < NMSE[bits], _nmse(a, r)


@pytest.mark.parametrize("bits", [4])
def test_routed_observe(setup, bits, tmp_path):
    """A quantized ONNX Runtime `observe` is routed too (`QMoE` for its output, one
    `MatMulNBits` over the same fc1 bytes for every expert's activation, which its error
    taps need): eager, the dense program on the served experts up to float rounding; on
    ONNX Runtime, the dense quantized program up to the order of its sums, with the spare
    slot open and winning."""
    import onnx
    import onnxruntime as ort

    _, _, model = setup
    spare = programs.with_spare(model, 1)
    observe = programs.Observe(spare)
    example, shapes = observe.example(LENGTH)
    path = quantize.to_onnx(observe, example, tmp_path / "observe.onnx", shapes,
                            observe.outputs, bits=bits)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("QMoE") == model.args.num_hidden_layers
    fp32 = lower.to_onnx(quantize.dense(observe), example, tmp_path / "dense32.onnx", shapes,
                         observe.outputs)
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                for p in (path, quantize.quantize_onnx(fp32, tmp_path / "dense.onnx", bits))]
    slots = programs.slot_state(spare)
    slots[:, :, -1] = torch.tensor([5.0, 0.0, 0.0, 0.0])
    tokens = torch.randint(0, model.args.vocab_size, (1, 12),
                           generator=torch.Generator().manual_seed(3))
    experts = copy.deepcopy(spare)  # the experts as served, the rest fp32 (as eager has it)
    for block, served in zip(experts.model.layers,
                             quantize.dequantized(spare, bits).model.layers, strict=True):
        block.mlp.experts = served.mlp.experts
    with torch.no_grad():
        got = quantize.routed(observe, bits)(tokens, slots)
        want = programs.Observe(experts)(tokens, slots)
    for name, a, b in zip(observe.outputs, got, want, strict=True):
        assert _nmse(a.float(), b.float()) < 1e-10, name
    assert (got[2] == programs.slot_state(spare).shape[-1] - 1).any()  # the spare slot won
    names = [i.name for i in sessions[0].get_inputs()]
    routed, dense = (s.run(None, dict(zip(names, (tokens.numpy(), slots.numpy()), strict=True)))
                     for s in sessions)
    for name, a, b in zip(observe.outputs, routed, dense, strict=True):
        if name in ("ids", "rank"):  # discrete: equal where no two candidates tie
            assert (a == b).mean() > 0.95, name
        else:
            assert _nmse(a, b) < 1e-5, (name, _nmse(a, b))
