"""Lowering: one device program (a torch module from `programs.py`) to a `.pte` or an `.onnx`.

Both start from the same `torch.export` graph of the same module, so the engines run the same
math. `to_pte` delegates what XNNPACK supports (linears, matmuls, elementwise) and leaves the
rest (top-k, scatter, gather, index_copy) to ExecuTorch's portable kernels; `to_onnx` uses the
dynamo exporter (`torch.onnx.export(..., dynamo=True)`), whose graph ONNX Runtime's CPU EP runs.
Dynamic sizes are `torch.export.Dim`s given by each program's `example()`: both engines take
any T in the declared range, so nothing is padded.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


def export(program: nn.Module, example_inputs: tuple[torch.Tensor, ...],
           dynamic_shapes: dict[str, Any] | None = None) -> torch.export.ExportedProgram:
    """The `torch.export` graph both lowerings start from (eval mode, no autograd)."""
    with torch.no_grad():
        return torch.export.export(program.eval(), example_inputs, dynamic_shapes=dynamic_shapes)


def to_pte(program: nn.Module, example_inputs: tuple[torch.Tensor, ...], path: Path | str,
           dynamic_shapes: dict[str, Any] | None = None) -> Path:
    """Export `program`, lower it to ExecuTorch with the XNNPACK delegate, write `path`."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    ep = export(program, example_inputs, dynamic_shapes)
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    path = Path(path)
    path.write_bytes(edge.to_executorch().buffer)
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
        onnx_program = torch.onnx.export(
            program.eval(), example_inputs, dynamo=True, dynamic_shapes=dynamic_shapes,
            output_names=list(output_names) if output_names else None, verbose=False)
    onnx_program.save(path)
    return path
