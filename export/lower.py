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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

Method = tuple[nn.Module, tuple[torch.Tensor, ...], "dict[str, Any] | None"]
DATA_TAG = "weights"  # ExecuTorch's name for the external data file (DATA_TAG.ptd)
ALIGN = 64  # byte alignment of each tensor in the ONNX data file


def export(program: nn.Module, example_inputs: tuple[torch.Tensor, ...],
           dynamic_shapes: dict[str, Any] | None = None) -> torch.export.ExportedProgram:
    """The `torch.export` graph both lowerings start from (eval mode, no autograd)."""
    with torch.no_grad(), warnings.catch_warnings():
        # the MoE blocks keep per-call tensors (the gates, the taps) as attributes on purpose
        warnings.filterwarnings("ignore", message="The tensor attributes")
        return torch.export.export(program.eval(), example_inputs, dynamic_shapes=dynamic_shapes)


def to_pte(methods: dict[str, Method], path: Path | str, data: Path | str | None = None) -> Path:
    """Lower each (program, example inputs, dynamic shapes) as a method of one `.pte` at `path`
    (XNNPACK delegate). With `data`, every constant goes to that `.ptd` file instead of the
    `.pte`, shared by all methods."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.external_constants_pass import (
        delegate_external_constants_pass_unlifted,
    )

    def tag(_node) -> str:
        return DATA_TAG

    programs = {}
    for name, (program, inputs, shapes) in methods.items():
        ep = export(program, inputs, shapes)
        if data is not None:  # tag the delegate's constants, as ExecuTorch's LLM export does
            module = ep.module()
            delegate_external_constants_pass_unlifted(module, gen_tag_fn=tag)
            with torch.no_grad():  # an unlifted module has no .eval()
                ep = torch.export.export(module, inputs, dynamic_shapes=shapes)
        programs[name] = ep
    edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()])
    et = edge.to_executorch(ExecutorchBackendConfig(external_constants=tag if data else False))
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
    path = Path(path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree deprecations inside the exporter
        warnings.filterwarnings("ignore", message="The tensor attributes")  # as in `export`
        onnx_program = torch.onnx.export(
            program.eval(), example_inputs, dynamo=True, dynamic_shapes=dynamic_shapes,
            output_names=list(output_names) if output_names else None, verbose=False,
            # a program that transposes its weights (the deepening sweeps) must keep the
            # transposes as ops: folded, they become copies a weights commit would not update
            optimize=getattr(program, "fold_weights", True))
    onnx_program.save(path)
    return path


def share_weights(models: Sequence[Path | str], data: Path | str, min_bytes: int = 1024) -> Path:
    """Move every initializer of at least `min_bytes` of the `.onnx` files `models` into the
    external-data file `data` (same folder), each distinct tensor once, `ALIGN`-aligned; the
    models are rewritten in place to point at it by its file name."""
    import onnx
    from onnx import external_data_helper, numpy_helper

    data = Path(data)
    offsets: dict[bytes, int] = {}
    with open(data, "wb") as f:
        for path in models:
            model = onnx.load(str(path))
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
            onnx.save(model, str(path))
    return data
