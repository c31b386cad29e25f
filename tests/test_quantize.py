"""Quantized programs: int8 / int4 weights on ExecuTorch (XNNPACK) and ONNX Runtime.

The tiny pretrained model's quantized bundles (conftest.exports) and `score` programs: their
perplexity on held-out text against the fp32 torch program, int8 within 2%, int4 within 6%
(issue 3); the ONNX quantizer on its own, both of its int8 forms.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import exported
from moegrow.export import checkpoint, lower, programs, quantize
from moegrow.export.tokenizer import BOS

pytestmark = pytest.mark.slow  # waits for the exports; one ONNX export

LENGTH = 64  # tokens per scored window
LIMITS = {8: 0.02, 4: 0.06}  # relative perplexity increase allowed over fp32


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
