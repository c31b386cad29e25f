"""Engine backends: run program NAME on numpy arrays, get numpy arrays back.

`ExecuTorch` runs `.pte` methods (XNNPACK delegate) through ExecuTorch's Python runtime, whose
bindings take torch tensors as I/O (the only torch use allowed in `runtime/`);
`OnnxRuntime` runs `.onnx` files on ONNX Runtime's CPU provider. Programs load on first use,
with their constants from `weights`, the engine's weight file (`.ptd` / ONNX external data,
handed to ONNX Runtime from memory under the name the graphs use, so any version can be
loaded without touching the graphs).
The torch reference with the same `run` lives in `moegrow.export.reference`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from moegrow.device_kernels.manifest import ENGINES, ONNX_DATA

__all__ = ["ENGINES", "BackendError", "ExecuTorch", "OnnxRuntime", "load"]


class BackendError(Exception):
    """An engine that is missing, or a program file it cannot load or run."""


class ExecuTorch:
    def __init__(self, files: dict[str, Path], weights: Path, threads: int | None = None):
        try:
            import torch
            from executorch.runtime import Runtime
        except ImportError as e:
            raise BackendError(f"engine executorch is not installed ({e})") from None
        self.torch, self.runtime, self.files, self.weights = torch, Runtime.get(), files, weights
        self.methods, self.loaded = {}, {}  # name -> method, .pte -> program
        if threads:  # XNNPACK's pool for delegated ops, torch's for portable kernels
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

            _unsafe_reset_threadpool(threads)
            torch.set_num_threads(threads)

    def _method(self, name: str):
        if name not in self.methods:
            path = self.files.get(name)
            if path is None:
                raise BackendError(f"the bundle has no executorch program {name!r}")
            try:
                if path not in self.loaded:
                    self.loaded[path] = self.runtime.load_program(path, data_path=self.weights)
                self.methods[name] = self.loaded[path].load_method(name)
            except (RuntimeError, ValueError) as e:
                raise BackendError(f"{path}: executorch cannot load it with {self.weights.name} "
                                   f"({e})") from None
        return self.methods[name]

    def run(self, name: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        method = self._method(name)
        outs = method.execute([self.torch.from_numpy(np.ascontiguousarray(a)) for a in arrays])
        return [o.numpy() for o in outs]


class OnnxRuntime:
    def __init__(self, files: dict[str, Path], weights: Path, threads: int | None = None):
        try:
            import onnxruntime
        except ImportError as e:
            raise BackendError(f"engine onnxruntime is not installed ({e})") from None
        self.ort, self.files, self.weights, self.sessions = onnxruntime, files, weights, {}
        self.threads = threads

    def _session(self, name: str):
        if name not in self.sessions:
            path = self.files.get(name)
            if path is None:
                raise BackendError(f"the bundle has no onnxruntime program {name!r}")
            try:
                options = self.ort.SessionOptions()
                options.log_severity_level = 3
                if self.threads:
                    options.intra_op_num_threads = self.threads
                # ORT copies what it needs from the mapped file while it builds the session
                data = np.memmap(self.weights, np.uint8, mode="r")
                options.add_external_initializers_from_files_in_memory([ONNX_DATA], [data],
                                                                       [data.size])
                session = self.ort.InferenceSession(str(path), options,
                                                    providers=["CPUExecutionProvider"])
                del data
            except Exception as e:  # ORT raises its own exception types, all unrelated
                raise BackendError(f"{path}: onnxruntime cannot load it ({e})") from None
            self.sessions[name] = (session, [i.name for i in session.get_inputs()])
        return self.sessions[name]

    def run(self, name: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        session, names = self._session(name)
        return list(session.run(None, dict(zip(names, arrays, strict=True))))


def load(engine: str, files: dict[str, Path], weights: Path, threads: int | None = None):
    if engine == "executorch":
        return ExecuTorch(files, weights, threads)
    if engine == "onnxruntime":
        return OnnxRuntime(files, weights, threads)
    raise BackendError(f"unknown backend {engine!r} (choose from {', '.join(ENGINES)}, torch)")
