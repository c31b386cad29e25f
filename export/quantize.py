"""Quantized weights for the device programs: int8 and int4 (group-wise) on both engines.

What is quantized: every linear of the experts and the attention projections (q, k, v, o).
What stays fp32: the router `gate` (rounding must not flip expert choices), the embedding,
the norms and `lm_head`.

Both engines quantize plain constant-weight linears only, so a quantized program runs every
MoE block as `DenseMoE` (decode included: `GatherMoE`'s bmm over gathered stacked weights has
no quantized kernel on either engine). `dense(program)` does that swap; `quantize_for_pte`
calls it, and the ONNX file given to `quantize_onnx` must come from a dense program.

ExecuTorch / XNNPACK (`quantize_for_pte`, then `lower.to_pte` unchanged): torchao source
transforms, as ExecuTorch's own LLM export does (`executorch.extension.llm.export.quantize`):

    bits 8: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8,
                                                  weight_granularity=PerAxis(0))   # "8da8w"
    bits 4: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                  weight_granularity=PerGroup(32)) # "8da4w"

Weights symmetric int8 per output channel / int4 per group of 32, activations int8 per token
(dynamic). XNNPACK's quantized GEMMs are the dynamic-activation ones (qd8-f32-qc8w, -qb4w).

ONNX Runtime (`quantize_onnx`, post-processing an fp32 `.onnx`):

    bits 8: onnxruntime.quantization.quantize_dynamic(..., weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"], per_channel=True, nodes_to_exclude=router)
    bits 4: MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True,
            nodes_to_exclude=router).process()    # MatMulNBits contrib op, weight-only int4
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import programs

BITS = (8, 4)
GROUP_SIZE = 32
# Linear layers (last name of their module path) that get quantized.
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"quantized bits must be one of {BITS} (32 is unquantized), got {bits!r}")


class LinearDenseMoE(nn.Module):
    """`DenseMoE` with its three expert GEMMs as `nn.Linear` modules, so quantizers see them."""

    def __init__(self, dense: programs.DenseMoE):
        super().__init__()
        self.gate, self.top_k, self.norm_topk = dense.gate, dense.top_k, dense.norm_topk
        self.experts, self.hidden = dense.experts, dense.hidden
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(dense, name)
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
            setattr(self, name, lin)

    route = programs.DenseMoE.route

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, ids = self.route(x)
        gates = torch.zeros_like(logits).scatter(1, ids, weights)  # [N, E]
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # [N, E*F]
        h = h.reshape(-1, self.experts, self.hidden) * gates[:, :, None]
        out = self.down_proj(h.reshape(-1, self.experts * self.hidden))
        return out.reshape(shape), logits


def dense(program: nn.Module) -> nn.Module:
    """A copy of `program` whose MoE blocks are `LinearDenseMoE` (GatherMoE replaced too).

    Same math as the program's fp32 form up to float rounding; use it as the source of the
    fp32 ONNX that `quantize_onnx` post-processes.
    """
    out = copy.deepcopy(program)
    for block in out.model.model.layers:
        mlp = block.mlp
        if isinstance(mlp, programs.GatherMoE):
            mlp = programs.DenseMoE(mlp.moe)
        if isinstance(mlp, programs.DenseMoE):
            block.mlp = LinearDenseMoE(mlp)
    return out.eval()


def _quantized(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn.split(".")[-1] in QUANTIZED


def torchao_config(bits: int):
    """The torchao config ExecuTorch's XNNPACK delegate lowers for `bits` (8da8w / 8da4w)."""
    _check_bits(bits)
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig

    if bits == 8:
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8,
                                                     weight_granularity=PerAxis(0))
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                 weight_granularity=PerGroup(GROUP_SIZE))


def quantize_for_pte(program: nn.Module, bits: int) -> nn.Module:
    """A dense copy of `program` with int`bits` expert and attention linears, for `to_pte`.

    Int4 groups run along each linear's input dimension, which must be a multiple of 32.
    """
    _check_bits(bits)
    from torchao.quantization import quantize_

    out = dense(program)
    if bits == 4:
        bad = [f"{n} (in {m.in_features})" for n, m in out.named_modules()
               if _quantized(m, n) and m.in_features % GROUP_SIZE]
        if bad:
            raise ValueError(f"int4 needs in_features divisible by {GROUP_SIZE}: {', '.join(bad)}")
    with torch.no_grad():
        quantize_(out, torchao_config(bits), filter_fn=_quantized)
    return out


KEEP_FP32 = ("mlp.gate.weight", "lm_head.weight")  # ONNX initializer name endings


def _gemm_to_matmul(model) -> None:
    """Rewrite `Gemm(x, W, transB=1)` with a constant W (what the exporter emits for a 2-D
    `F.linear`) as `MatMul(x, W.T)`, the form both ORT weight quantizers handle. The new
    initializer keeps W's name (plus `.T`) so the router and `lm_head` stay recognisable."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (attrs.get("transA", 0) or not attrs.get("transB", 0)
                or attrs.get("alpha", 1.0) != 1.0):
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        name = node.input[1] + ".T"
        if name not in inits:
            inits[name] = numpy_helper.from_array(w.T.copy(), name)
            model.graph.initializer.append(inits[name])
        node.op_type = "MatMul"
        node.input[1] = name
        del node.attribute[:]
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _weight_matmuls(model) -> tuple[list[str], list[str]]:
    """MatMul nodes with a constant weight: (to quantize, to keep fp32: router, lm_head)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}

    def source(name: str, depth: int = 3) -> str | None:
        if name in inits:
            return name
        node = producers.get(name)
        if node is None or depth == 0 or node.op_type not in ("Transpose", "Identity", "Cast"):
            return None
        return source(node.input[0], depth - 1)

    quant, keep = [], []
    for node in model.graph.node:
        if node.op_type == "MatMul" and (src := source(node.input[1])):
            fp32 = any(src.removesuffix(".T").endswith(k) for k in KEEP_FP32)
            (keep if fp32 else quant).append(node.name)
    return quant, keep


def quantize_onnx(src: Path | str, dst: Path | str, bits: int) -> Path:
    """Quantize the fp32 `.onnx` at `src` (exported from a `dense` program) into `dst`."""
    _check_bits(bits)
    import onnx

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    _gemm_to_matmul(model)
    quant, keep = _weight_matmuls(model)
    if not quant:
        raise ValueError(f"{src}: no constant-weight MatMul to quantize")
    if bits == 8:
        import tempfile

        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory() as tmp:
            pre = Path(tmp) / "pre.onnx"
            onnx.save(model, str(pre))
            quantize_dynamic(pre, dst, weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul"], nodes_to_quantize=quant,
                             nodes_to_exclude=keep)
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(model, bits=4, block_size=GROUP_SIZE, is_symmetric=True,
                                 nodes_to_include=quant, nodes_to_exclude=keep)
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=False)
    return dst
