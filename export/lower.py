"""Lowering: device programs (torch modules from `programs.py`) to `.pte` and `.onnx` files.

Both start from the same `torch.export` graph of the same module, so the engines run the same
math. `to_pte` delegates what XNNPACK supports (linears, matmuls, elementwise) and leaves the
rest (top-k, scatter, gather, index_copy) to ExecuTorch's portable kernels; `to_onnx` uses the
dynamo exporter (`torch.onnx.export(..., dynamo=True)`), whose graph ONNX Runtime's CPU EP runs.
Dynamic sizes are `torch.export.Dim`s given by each program's `example()`: both engines take
any T in the declared range, so nothing is padded.

Weights as data: `to_pte(..., data=PATH)` writes every constant of every method into one
ExecuTorch data file (`.ptd`, the XNNPACK delegate's named data); `share_weights` moves the
initializers of several `.onnx` files into one ONNX external-data file. Both engines store a
tensor as its plain bytes (fp32 row-major), identical tensors once, so a new version of a
weight is a new data file with those bytes replaced; the programs are never traced again.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

Method = tuple[nn.Module, tuple[torch.Tensor, ...], "dict[str, Any] | None"]
DATA_TAG = "weights"  # ExecuTorch's name for the external data file (DATA_TAG.ptd)
ALIGN = 64  # byte alignment of each tensor in the ONNX data file
SMALL = 64  # the most elements `fold_shapes` folds into one constant: under `share_weights`'
# 1,024 bytes, so they stay in the graph (ONNX Runtime's optimizers read a moved
# initializer from the file the graph names, not from the runtime's buffers)


def export(program: nn.Module, example_inputs: tuple[torch.Tensor, ...],
           dynamic_shapes: dict[str, Any] | None = None) -> torch.export.ExportedProgram:
    """The `torch.export` graph both lowerings start from (eval mode, no autograd)."""
    with torch.no_grad(), warnings.catch_warnings():
        # the MoE blocks keep per-call tensors (the gates, the taps) as attributes on purpose
        warnings.filterwarnings("ignore", message="The tensor attributes")
        return torch.export.export(program.eval(), example_inputs, dynamic_shapes=dynamic_shapes)


def to_pte(methods: dict[str, Method], path: Path | str, data: Path | str | None = None,
           progress: Callable[[str], None] | None = None) -> Path:
    """Lower each (program, example inputs, dynamic shapes) as a method of one `.pte` at `path`
    (XNNPACK delegate). With `data`, every constant goes to that `.ptd` file instead of the
    `.pte`, shared by all methods. `progress` gets each method's name as it is exported,
    then "XNNPACK" (the delegate lowering of them all) and "serialize"."""
    say = progress or (lambda _: None)
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    def tag(_node) -> str:
        return DATA_TAG

    programs = {}
    for name, (program, inputs, shapes) in methods.items():
        say(name)
        ep = export(program, inputs, shapes)
        if data is not None:  # tag the delegate's constants (the XNNPACK serializer reads
            # this tag; ExecuTorch's LLM export sets it on an unlifted copy and exports again)
            sig = ep.graph_signature
            consts = {*sig.inputs_to_parameters, *sig.inputs_to_buffers,
                      *sig.inputs_to_lifted_tensor_constants}
            for node in ep.graph.nodes:
                if node.op == "placeholder" and node.name in consts:
                    node.meta.setdefault("custom", {})["delegate_constant_tag"] = DATA_TAG
        programs[name] = ep
    say("XNNPACK")
    edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()])
    say("serialize")
    # inputs not memory-planned: the runtime's arrays are read where they lie (the KV cache
    # is not copied in at every run); outputs are planned (the pybindings copy them out)
    et = edge.to_executorch(ExecutorchBackendConfig(
        external_constants=tag if data else False,
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False)))
    path = Path(path)
    path.write_bytes(et.buffer)
    if data is not None:
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            et.write_tensor_data_to_file(tmp)
            shutil.move(Path(tmp) / f"{DATA_TAG}.ptd", data)
    return path


def to_onnx(program: nn.Module, example_inputs: tuple[torch.Tensor, ...], path: Path | str,
            dynamic_shapes: dict[str, Any] | None = None,
            output_names: Sequence[str] | None = None) -> Path:
    """Export `program` with the dynamo ONNX exporter and write `path` (weights inline).

    Input names are the forward's argument names.
    """
    path, fold = Path(path), getattr(program, "fold_weights", True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree deprecations inside the exporter
        warnings.filterwarnings("ignore", message="The tensor attributes")  # as in `export`
        onnx_program = torch.onnx.export(
            program.eval(), example_inputs, dynamo=True, dynamic_shapes=dynamic_shapes,
            output_names=list(output_names) if output_names else None, verbose=False,
            # a program that transposes its weights (the deepening sweeps) must keep the
            # transposes as ops: folded, they become copies a weights commit would not update
            optimize=fold)
        if not fold:
            fold_shapes(onnx_program.model)
    onnx_program.save(path)
    return path


def fold_shapes(model) -> None:
    """Fold what does not read a weight (the scalars and shape arithmetic of a program
    exported unoptimized, `fold_weights = False`), then drop dead and repeated nodes, in
    place on an onnx_ir model: onnxscript's constant folder, told to leave every node that
    reads an initializer alone, so the weights' transposes and dequantizations stay ops.
    The default int4 rows sweep: 12,397 -> 5,796 nodes (docs/benchmarks.md)."""
    from onnx_ir.passes.common import CommonSubexpressionEliminationPass
    from onnxscript import optimizer

    weights = set(model.graph.initializers)

    def may_fold(node) -> bool | None:  # None: the folder's own rules
        return False if any(v is not None and v.name in weights for v in node.inputs) else None
    for _ in range(3):  # a fold opens the next (~1 s on the tiny model's sweep)
        n = len(model.graph)
        optimizer.fold_constants(model, input_size_limit=8192, output_size_limit=SMALL,
                                 should_fold=may_fold)
        optimizer.remove_unused_nodes(model)
        CommonSubexpressionEliminationPass()(model)
        if len(model.graph) == n:
            break


def fold_transposes(model, mutable: Callable[[str], bool]) -> None:
    """Replace each Transpose of an initializer that never changes after export (not
    `mutable(name)`) by the transposed initializer, as ONNX Runtime would when it loads the
    graph; initializers nothing reads any more are dropped. (Growth rewrites the mutable
    ones in the weight file, so their transposes stay in the graph.)"""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    keep = []
    for n in graph.node:
        if n.op_type == "Transpose" and n.input[0] in inits and not mutable(n.input[0]):
            arr = numpy_helper.to_array(inits[n.input[0]])
            perm = next((list(a.ints) for a in n.attribute if a.name == "perm"),
                        list(range(arr.ndim))[::-1])
            graph.initializer.append(numpy_helper.from_array(
                np.ascontiguousarray(arr.transpose(perm)), n.output[0]))
        else:
            keep.append(n)
    del graph.node[:]
    graph.node.extend(keep)

    def reads(g) -> set[str]:  # inputs of every node, subgraphs (If, Loop) included
        return {i for n in g.node for i in n.input} | {
            i for n in g.node for a in n.attribute for sub in [a.g, *a.graphs] for i in reads(sub)}

    used = reads(graph) | {o.name for o in graph.output}
    alive = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(alive)


def strip_notes(graph) -> None:
    """Drop, in place, what the exporter writes for people and not for engines: each node's
    metadata (its torch source: namespace, class hierarchy, FX node, stack trace) and doc
    string, and the graph's value_info (intermediate shapes, which ONNX Runtime infers
    again), subgraphs included. ONNX Runtime holds them for a session's life: the default
    int4 sweep's session 34 -> 20 MB of heap, its file 5.6 -> 0.9 MB (docs/benchmarks.md)."""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for a in node.attribute:
            for sub in [a.g] * a.HasField("g") + list(a.graphs):
                strip_notes(sub)
    del graph.value_info[:]


def share_weights(models: Sequence[Path | str], data: Path | str, min_bytes: int = 1024,
                  mutable: Callable[[str], bool] | None = None
                  ) -> tuple[Path, dict[str, list], set[str]]:
    """Move every initializer of at least `min_bytes` of the `.onnx` files `models` into the
    external-data file `data` (same folder), each distinct tensor once, `ALIGN`-aligned; the
    models are rewritten in place to point at it by its file name. With `mutable`, the
    transposes of the other initializers are folded first (`fold_transposes`). Returns
    `data`, per model its moved initializers as [name, numpy dtype, shape, offset, bytes]
    (the runtime hands them over as views of the weight file: one copy for every session),
    and the models where a node with only constant inputs reads one (e.g. a mutable expert
    weight's transpose in a deepening program): ONNX Runtime would fold such nodes when it
    loads the graph, reading their inputs from the file the graph names, not from the
    caller's buffers, so their sessions must load with constant folding off (and then they
    read those weights from the caller's buffers at every run: growth writes them in place)."""
    import onnx
    from onnx import external_data_helper, helper, numpy_helper

    data = Path(data)
    offsets: dict[bytes, int] = {}
    tables: dict[str, list] = {}
    folds: set[str] = set()
    with open(data, "wb") as f:
        for path in models:
            model = onnx.load(str(path))
            strip_notes(model.graph)
            if mutable is not None:
                fold_transposes(model, mutable)
            table = []
            consts = ({t.name for t in model.graph.initializer}
                      | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output})
            ort_folds = {i for n in model.graph.node
                         if n.input and all(i in consts for i in n.input if i) for i in n.input}
            for t in model.graph.initializer:
                raw = numpy_helper.to_array(t).tobytes()
                if len(raw) < min_bytes:
                    continue
                key = hashlib.sha256(raw).digest()
                if key not in offsets:
                    f.write(b"\0" * (-f.tell() % ALIGN))
                    offsets[key] = f.tell()
                    f.write(raw)
                for field in ("float_data", "int32_data", "int64_data", "double_data"):
                    t.ClearField(field)
                t.raw_data = raw  # set_external_data wants it present
                external_data_helper.set_external_data(t, data.name, offsets[key], len(raw))
                t.data_location = onnx.TensorProto.EXTERNAL
                t.ClearField("raw_data")
                dtype = helper.tensor_dtype_to_np_dtype(t.data_type).name
                table.append([t.name, dtype, list(t.dims), offsets[key], len(raw)])
            tables[str(path)] = table
            if ort_folds & {row[0] for row in table}:
                folds.add(str(path))
            onnx.save(model, str(path))
    return data, tables, folds
