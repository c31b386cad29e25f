"""The torch reference of a bundle's programs, with the engine backends' interface.

`Reference(model, bits).run(name, arrays)` runs program `name` (prefill, decode, score,
observe, sweep, adam, deepen{l}, strict{l}) in eager torch on numpy arrays and returns numpy
arrays, as `runtime.backends.ExecuTorch` / `OnnxRuntime` run the lowered ones: the same
modules (`bundle.PROGRAMS`, `pc.Sweep`, `pc.Adam`, `pc.Deepen`, `relax.Strict`) before
lowering. At 8 or 4 bits the model is `quantize.dequantized(model, bits)`: the weight
values the quantized programs serve, with fp32 activations (the engines also quantize
activations to int8, the rest of their error); the deepening programs are built as the
bundle's are, on its frozen quantized linears (`pc`), which hold the same values.

The runtime never imports this module (DESIGN.md: no torch on the device); tools and tests
hand it to `runtime.Runtime(..., engine=...)` or call `run` directly. `load` builds the
reference of a bundle from the checkpoint it was exported from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import bundle, checkpoint, pc, programs, quantize, relax
from .models import layers


class Reference:
    """Eager torch programs over `model` (with its spare slots, `programs.with_spare`)."""

    def __init__(self, model: layers.CausalLM, bits: int = 32, strict_steps: int = 0,
                 eta: float = bundle.STRICT_ETA):
        self.model = model.eval() if bits == 32 else quantize.dequantized(model, bits)
        self.source = model.eval()  # the deepening programs' (`pc`: frozen at `bits`)
        self.bits, self.strict_steps, self.eta = bits, strict_steps, eta
        self.context = model.args.max_position_embeddings
        self.programs: dict[str, nn.Module] = {}

    def program(self, name: str) -> nn.Module:
        """The module behind program `name` (built on first use: a sweep is traced)."""
        if name not in self.programs:
            bits = self.bits
            layer = name.removeprefix("deepen").removeprefix("strict")
            if name in bundle.PROGRAMS:
                self.programs[name] = bundle.PROGRAMS[name](self.model)
            elif name in ("sweep", "sweep_spare"):
                self.programs[name] = pc.Sweep(self.source, self.context, bits,
                                               spare=name == "sweep_spare")
            elif name == "adam":
                self.programs[name] = pc.Adam(self.model)
            elif layer.isdigit() and int(layer) < self.model.args.num_hidden_layers:
                if name.startswith("deepen"):
                    self.programs[name] = pc.Deepen(self.source, int(layer), self.context,
                                                    bits)
                elif self.strict_steps:
                    self.programs[name] = relax.Strict(self.source, int(layer), self.context,
                                                    self.strict_steps, self.eta, bits)
            if name not in self.programs:
                raise KeyError(f"the reference has no program {name!r}")
        return self.programs[name]

    def run(self, name: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        program = self.program(name)
        with torch.no_grad():
            out = program(*[torch.from_numpy(np.ascontiguousarray(a)) for a in arrays])
        return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def load(target: str | Path, manifest: dict) -> Reference:
    """The reference of the bundle whose `manifest` was exported from checkpoint `target`:
    its spare slots, bits and strict steps."""
    model = checkpoint.load(target)
    model = programs.with_spare(model, manifest["config"].get("spare_experts", 0))
    deepening = manifest.get("deepening", {})
    return Reference(model, manifest["bits"], deepening.get("strict_steps", 0),
                     deepening.get("strict_eta", bundle.STRICT_ETA))
