"""Quantized weights for the device programs: int8 and int4 (group-wise) on both engines.

What is quantized: every linear of the experts and the attention projections (q, k, v, o) to
int`bits`, and `lm_head` to int8 (in the default model the fp32 head was 3.15 of the 6.91 MB
an int4 decode step reads; llama.cpp's Q4_0 recipe keeps its head at 8 bits too). What stays
fp32: the router `gate` (rounding must not flip expert choices), the embedding (a row
lookup, not a matmul) and the norms.

The quantizers take plain constant-weight linears only; XNNPACK has no quantized gather,
so a dense MoE block (`dense(program)`, which `quantize_for_pte` calls) runs every expert.
Serving programs read only the chosen experts' codes instead, in `codes.routed_codes`' layout
(`routed(program, bits)`: `moe.RoutedMoE`): ONNX Runtime through its `QMoE` contrib op
(`ROUTED`; `observe`, whose error taps need every expert's activation, also runs gate and
up densely over the same bytes), ExecuTorch through moegrow's own kernel
`moegrow::routed_moe` (`device_kernels/routed_moe.cpp`; `PTE_ROUTED`). Speed:
docs/benchmarks.md, "Routed quantized experts". `quantize_onnx` takes the fp32 ONNX of a
dense or routed program.
`to_pte` / `to_onnx` here are `lower.to_pte` / `lower.to_onnx` with a `bits` argument.

ExecuTorch / XNNPACK (`quantize_for_pte`, then `lower.to_pte` unchanged): torchao source
transforms, as ExecuTorch's own LLM export does (`executorch.extension.llm.export.quantize`):

    bits 8: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8,
                                                  weight_granularity=PerAxis(0))   # "8da8w"
    bits 4: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                  weight_granularity=PerGroup(32)) # "8da4w"

Weights symmetric int8 per output channel / int4 per group of 32, activations int8 per token
(dynamic). XNNPACK's quantized GEMMs are the dynamic-activation ones (qd8-f32-qc8w, -qb4w).

ONNX Runtime (`quantize_onnx`, post-processing an fp32 `.onnx`): every constant-weight
linear becomes `MatMulNBits` (contrib op) holding torchao's own codes and scales (`codes`),
so both engines serve the same weight values: int4 codes in blocks of 32 along the input
dimension with one fp32 scale per block, int8 codes with the row's scale repeated over its
blocks of 32 (ONNX Runtime's `MatMulNBitsQuantizer` rounds differently: an int4 logits NMSE
of 0.14 against ExecuTorch's on a tiny model). `accuracy_level=4` lets the CPU EP quantize
activations to int8 per block at run time (its fast path; the CUDA EP ignores it). The
exporter writes 2-D linears (the MoE ones) as `Gemm(x, W, transB=1)`; they are first
rewritten as `MatMul(x, W.T)`. `dynamic_int8=True` selects `quantize_dynamic` for int8.

Programs that read a weight directly, not through a linear, get its dequantized values on
both engines: `moe.weight` (ExecuTorch: plain ops over the torchao tensor's codes) and
the head's initializer rewritten here (ONNX). `dequantized(model, bits)` is the model with
those values everywhere: the torch reference of a quantized bundle. Its deepening programs
(`pc`, `quantizable` False) hold the linears as `frozen.Frozen`: the ONNX programs' own
codes (`packed`), dequantized in the graph; the base experts' in the routed layout
(`frozen.FrozenExperts`), so the weight file holds one copy of them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import moe, programs

BITS = (8, 4)
GROUP_SIZE = 32
# MatMulNBits compute type on CPU: 4 = int8 activations (quantized per block at run time), the
# fast kernels. Default model, decode at 1 thread: int8 weights 1.11 ms/token at level 4 vs
# 10.6 ms at level 0 (fp32, dequantizing every call); int4 0.97 vs 1.52; fp32 program 1.82.
ACCURACY_LEVEL = 4
# Linear layers (last name of their module path) that get quantized.
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"quantized bits must be one of {BITS} (32 is unquantized), got {bits!r}")


def dense(program: nn.Module) -> nn.Module:
    """A copy of `program` whose MoE blocks are all `DenseMoE` (GatherMoE replaced).

    Same math as the program's fp32 form up to float rounding; use it as the source of the
    fp32 ONNX that `quantize_onnx` post-processes.
    """
    out = copy.deepcopy(program)
    for block in out.model.model.layers:
        if isinstance(block.mlp, moe.GatherMoE):
            block.mlp = moe.DenseMoE(block.mlp.source[0], block.mlp.gated)
    return out.eval()


def routed(program: nn.Module, bits: int) -> nn.Module:
    """A copy of `program` whose MoE blocks are `RoutedMoE`: ONNX Runtime's `QMoE` over the
    base experts' int`bits` codes, reading only the chosen experts (the serving programs of
    a quantized ONNX Runtime bundle; an `Observe`'s also give every expert's activation)."""
    out = copy.deepcopy(program)
    hidden = isinstance(program, programs.Observe)
    for block in out.model.model.layers:
        block.mlp = moe.RoutedMoE(block.mlp.source[0], block.mlp.gated, bits, packed,
                                  ACCURACY_LEVEL, hidden)
    return out.eval()


ROUTED = (programs.Prefill, programs.Decode, programs.Score, programs.Observe)  # these types


def quantizable(program: nn.Module) -> bool:
    """Whether `program` gets its linears quantized when lowered: the serving programs do; a
    deepening program (`pc.Deepen`, its quantized linears `Frozen`) is lowered as it is
    (its gradient needs the weights as values, not as quantized kernels)."""
    return getattr(program, "quantize", True)


def _quantized(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn.split(".")[-1] in QUANTIZED


def _head(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn.split(".")[-1] == "lm_head"


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
        quantize_(out, torchao_config(8), filter_fn=_head)
    return out


def dequantized(model: nn.Module, bits: int) -> nn.Module:
    """A copy of `model` (a `CausalLM`) whose quantized linears hold the values ExecuTorch's
    int`bits` programs serve: torchao's quantization (`quantize_for_pte`) and back, the
    experts quantized as the programs stack them (`DenseMoE`: int8 scales per row of the
    stacked [C, E*F] down projection span all experts). The torch reference of a quantized
    bundle (`reference.py`) runs on it; ONNX Runtime serves the same values (`codes`), and
    the deepening programs' `Frozen` linears hold them."""
    _check_bits(bits)
    from torchao.quantization import quantize_

    stacked = programs.with_moe(model, moe.DenseMoE)
    with torch.no_grad():
        quantize_(stacked, torchao_config(bits), filter_fn=_quantized)
        quantize_(stacked, torchao_config(8), filter_fn=_head)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in stacked.named_modules():
            if not (_quantized(module, name) or _head(module, name)):
                continue
            w = moe.weight(module)
            if ".mlp." not in name:
                out.get_submodule(name).weight = nn.Parameter(w, requires_grad=False)
                continue
            layer, proj = int(name.split(".")[2]), name.split(".")[-1]
            experts = out.model.layers[layer].mlp.experts
            live = stacked.model.layers[layer].mlp.live  # the spare slots stay fp32
            _, f, c = experts.gate_proj.shape
            w = (w.reshape(c, live, f).permute(1, 0, 2) if proj == "down_proj"
                 else w.reshape(live, f, c))
            w = torch.cat([w, getattr(experts, proj).detach()[live:]])
            setattr(experts, proj, nn.Parameter(w.contiguous(), requires_grad=False))
    return out.eval()


# ONNX initializer name endings: the router and the spare slots (`moe.Slots`), which
# growth rewrites in the weight file as they are stored
KEEP_FP32 = ("mlp.gate.weight", "mlp.spare_gate.weight", "mlp.spare_up.weight",
             "mlp.spare_down.weight")
HEAD = "lm_head.weight"  # quantized to int8 whatever the bits


def _gemm_to_matmul(model) -> None:
    """Rewrite `Gemm(x, W, transB=1)` with a constant W (what the exporter emits for a 2-D
    `F.linear`) as `MatMul(x, W.T)`, the form both ORT weight quantizers handle. The new
    initializer keeps W's name (plus `.T`) so the router and `lm_head` stay recognisable."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) != 2 or node.input[1] not in inits \
                or node.input[1].endswith(KEEP_FP32):  # stays fp32, and stored as it is
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
    _drop_unused(model)


def _fold_weight_transposes(model) -> None:
    """Rewrite `MatMul(x, Transpose(W))` with a constant 2-D W as `MatMul(x, W.T)`, W.T an
    initializer named like `_gemm_to_matmul`'s: the exporter emits a linear whose weight is
    used twice (the two passes of a gated program) that way instead of as a Gemm, and
    unfolded it would stay fp32. The router and the spare slots keep their transposes
    (`KEEP_FP32`: growth rewrites them as stored)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    renamed, keep = {}, []
    for node in model.graph.node:
        src = node.input[0] if node.op_type == "Transpose" else None
        if src in inits and len(inits[src].dims) == 2 and not src.endswith(KEEP_FP32):
            name = src + ".T"
            if name not in inits:
                w = numpy_helper.to_array(inits[src])
                inits[name] = numpy_helper.from_array(np.ascontiguousarray(w.T), name)
                model.graph.initializer.append(inits[name])
            renamed[node.output[0]] = name
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    for node in model.graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
    _drop_unused(model)


def _weight_matmuls(model) -> tuple[list, list]:
    """MatMul nodes whose weight is a constant initializer [K, N] of a linear (the exporter's
    transposed copy, or `_gemm_to_matmul`'s `.T`) -> (to quantize at the bundle's bits, the
    head's: int8). The router and the norms' mean rows stay fp32; so does a direct read of
    the head's own [V, C] weight (the taps' `p @ W`, the target row's gather)."""
    inits = {i.name: i for i in model.graph.initializer}
    quant, head = [], []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        src = node.input[1]
        if src.endswith(HEAD):  # the weight as stored, not a linear's transpose
            continue
        if src.endswith(HEAD + ".T"):
            head.append(node)
        elif not (any(src.removesuffix(".T").endswith(k) for k in KEEP_FP32)
                  or min(inits[src].dims) == 1):  # a norm's mean-of-squares row (MeanNorm)
            quant.append(node)
    return quant, head


def codes(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's symmetric codes [N, K] (int8 values) and fp32 scales [N, K / GROUP_SIZE] of a
    linear weight [N, K], as `quantize_for_pte` makes them (int8 per row: its scale repeats
    over the row's groups). Both engines serve these exact values."""
    from torchao.quantization import quantize_

    rows, cols = weight.shape
    if cols % GROUP_SIZE:
        raise ValueError(f"a quantized linear needs in_features divisible by {GROUP_SIZE}, "
                         f"got {cols}")
    linear = nn.Sequential(nn.Linear(cols, rows, bias=False))
    linear[0].weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
    with torch.no_grad():
        quantize_(linear, torchao_config(bits))
    w = linear[0].weight
    scale = w.scale.float().repeat_interleave(cols // GROUP_SIZE // w.scale.shape[1], dim=1)
    if w.zero_point.abs().max() > 0:
        raise ValueError("torchao returned an asymmetric quantization (zero point != 0)")
    return w.qdata, scale


def packed(weight: torch.Tensor, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """`MatMulNBits`' B and scales for a linear weight [N, K]: `codes` made unsigned
    (signed + 2^(bits-1), the op's implicit zero point) in blocks of GROUP_SIZE along K,
    4-bit ones two to a byte (low nibble first) -> uint8 [N, K / 32, 32 * bits / 8], fp32
    [N * K / 32]. The serving programs of ONNX Runtime and the deepening programs of every
    quantized bundle (`Frozen`) hold these bytes."""
    n, k = weight.shape
    q, scale = codes(weight, bits)
    u = (q.numpy().astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    u = u.reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    if bits == 4:
        u = u[..., 0::2] | (u[..., 1::2] << 4)
    return np.ascontiguousarray(u), np.ascontiguousarray(scale.numpy().reshape(-1))


def _matmul_nbits(model, node, bits: int) -> None:
    """Rewrite `MatMul(x, B)` (B a constant [K, N]) in place as `MatMulNBits` over `packed`
    B.T, fp32 scales."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    k, n = inits[node.input[1]].dims
    name = f"{node.input[1]}.q{bits}"
    if name not in inits:  # once per weight, however many nodes use it (the gate's two passes)
        b = torch.from_numpy(numpy_helper.to_array(inits[node.input[1]]).copy())
        u, scales = packed(b.T, bits)
        model.graph.initializer.extend([numpy_helper.from_array(u, name),
                                        numpy_helper.from_array(scales, f"{name}.scales")])
    node.op_type, node.domain = "MatMulNBits", "com.microsoft"
    node.input[:] = [node.input[0], name, f"{name}.scales"]
    node.attribute.extend([onnx.helper.make_attribute(a, v) for a, v in dict(
        K=k, N=n, bits=bits, block_size=GROUP_SIZE, accuracy_level=ACCURACY_LEVEL).items()])


def _drop_unused(model) -> None:
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def quantize_onnx(src: Path | str, dst: Path | str, bits: int, dynamic_int8: bool = False) -> Path:
    """Quantize the fp32 `.onnx` at `src` (exported from a `dense` program) into `dst`.

    Default: `MatMulNBits` with torchao's codes and scales (`codes`: the values ExecuTorch
    serves), int`bits` for attention and experts and int8 for the head; a direct read of
    the head's weight (the taps) gets its dequantized values. `dynamic_int8=True` (bits 8
    only) uses `quantize_dynamic` instead (`DynamicQuantizeLinear` + `MatMulInteger`, weights
    per channel): faster prefill on x86, but its activations are quantized per tensor, which
    costs more accuracy (default model: +1.2% perplexity against +0.1%).
    """
    _check_bits(bits)
    if dynamic_int8 and bits != 8:
        raise ValueError(f"dynamic_int8 needs bits 8, got {bits}")
    import onnx
    from onnx import numpy_helper

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    _fold_weight_transposes(model)
    _gemm_to_matmul(model)
    quant, head = _weight_matmuls(model)
    if not quant:
        raise ValueError(f"{src}: no constant-weight MatMul to quantize")
    if bits == 8 and dynamic_int8:
        import tempfile

        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory() as tmp:
            pre = Path(tmp) / "pre.onnx"
            onnx.save(model, str(pre))
            quantize_dynamic(pre, dst, weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul"],
                             nodes_to_quantize=[n.name for n in quant + head])
        return dst
    for node in quant:
        _matmul_nbits(model, node, bits)
    for node in head:
        _matmul_nbits(model, node, 8)
    for init in model.graph.initializer if head else []:  # the taps read the head as served
        if init.name.endswith(HEAD):
            w = torch.from_numpy(numpy_helper.to_array(init).copy())
            q, scale = codes(w, 8)
            dq = (q.float().reshape(*w.shape[:1], -1, GROUP_SIZE) * scale[..., None])
            init.CopyFrom(numpy_helper.from_array(dq.reshape(w.shape).numpy(), init.name))
    _drop_unused(model)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
    return dst


# the quantized ExecuTorch programs whose base experts are `moe.RoutedMoE` (the kernel
# `moegrow::routed_moe` reads only the chosen experts); the others run them densely: over 32
# tokens and more, XNNPACK's dense GEMMs beat the kernel's row-by-row dots (~110M int4:
# decode 1.5-1.7x faster routed, prefill and score 0.5x; docs/benchmarks.md)
PTE_ROUTED = (programs.Decode,)


def for_pte(program: nn.Module, bits: int, route: bool | None = None) -> nn.Module:
    """`program` as `to_pte` lowers it at int`bits`: its MoE blocks routed (`route`, by
    default for the types in `PTE_ROUTED`) or dense, the other linears quantized by torchao
    (`quantize_for_pte`); a program that is not `quantizable` as it is."""
    if not quantizable(program):
        return program
    from torchao.utils import unwrap_tensor_subclass

    if route is None:
        route = type(program) in PTE_ROUTED
    # plain int8 constants (not torchao tensor subclasses) are what `lower.to_pte` can tag
    # for the `.ptd`; with the subclasses the quantized weights stay inside the `.pte`
    return unwrap_tensor_subclass(quantize_for_pte(routed(program, bits) if route else program,
                                                   bits))


# the ExecuTorch programs whose pool slots run through `moegrow::pooled_moe` (reading only
# the slots chosen): the serving ones without error taps (`Observe` needs every slot's
# activation, a deepening program the gradient through them: both keep the dense form)
PTE_POOLED = (programs.Prefill, programs.Decode, programs.Score)


def route_pool(program: nn.Module) -> nn.Module:
    """`program`, or a copy whose pool slots are routed (`moe.Slots.spare_out`) where it is
    one of `PTE_POOLED` and has a pool."""
    if type(program) not in PTE_POOLED or not getattr(program.model, "pool", 0):
        return program
    out = copy.deepcopy(program)
    for block in out.model.model.layers:
        block.mlp.routed_pool = True
    return out


def to_pte(methods: dict, path: Path | str, data: Path | str | None = None,
           bits: int = 32, progress=None) -> Path:
    """`lower.to_pte` with int`bits` weights in every method (32: the programs as they are),
    the pool routed (`route_pool`)."""
    from . import lower

    methods = {name: (route_pool(program if bits == 32 else for_pte(program, bits)), inputs,
                      shapes) for name, (program, inputs, shapes) in methods.items()}
    return lower.to_pte(methods, path, data, progress)


def to_onnx(program: nn.Module, example_inputs: tuple[torch.Tensor, ...], path: Path | str,
            dynamic_shapes: dict | None = None, output_names=None, bits: int = 32) -> Path:
    """`lower.to_onnx` with int`bits` weights: the dense program's fp32 ONNX, quantized."""
    from . import lower

    if bits == 32 or not quantizable(program):
        return lower.to_onnx(program, example_inputs, path, dynamic_shapes, output_names)
    _check_bits(bits)
    import tempfile

    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        form = routed(program, bits) if type(program) in ROUTED else dense(program)
        fp32 = lower.to_onnx(form, example_inputs, Path(tmp) / path.name,
                             dynamic_shapes, output_names)
        return quantize_onnx(fp32, path, bits)
