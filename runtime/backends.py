"""Engine backends: run program NAME on numpy arrays, get numpy arrays back.

`ExecuTorch` runs `.pte` methods (XNNPACK delegate) through ExecuTorch's Python runtime, whose
bindings take torch tensors as I/O (the only torch use allowed in `runtime/`);
`OnnxRuntime` runs `.onnx` files on ONNX Runtime's CPU provider (CUDA first when the installed
onnxruntime has it; not yet checked on a GPU). Programs load on first use,
with their constants from `weights`, the engine's weight file (`.ptd` / ONNX external data),
so any version can be loaded without touching the programs. ONNX Runtime gets one read-only
map of its weight file per backend. A program with a weight table in the manifest takes its
weights as views of that map (`SessionOptions.add_initializer`: the caller's buffer, not a
copy); the others (every program of a bundle exported before the tables, and deepening
programs exported before 2026-12-02, whose expert transposes ONNX Runtime would fold) copy
theirs from it under the name the graphs use. The programs in `live` load with constant
folding off: their expert weights pass through transposes that run at every call, so
they read the map's current bytes (`live`: growth writes its working copy in place and
runs them again without reloading). The other programs, given a `cache` folder (the
runtime gives one for a bundle's committed weights), load an optimized copy of their graph
whose weights, the ones ONNX Runtime packs for its kernels included, are mapped from one
file every session shares (`prepacked`). docs/bundle.md says what each session still holds.
The torch reference with the same `run` lives in `moegrow.export.reference`.

A quantized ExecuTorch program calls moegrow's own kernel for its routed experts
(`moegrow::routed_moe`): the backend registers it (`device_kernels.native.load`, built once
with the machine's C++ compiler) before it loads a `.pte` that names it.

ExecuTorch's native code logs to stderr while it starts (cpuinfo probing, thread-pool
resets) and its Python package imports torchao, which logs the optional kernels it cannot
load: `_engine_log` keeps those lines out of the user's terminal and puts the last one in
the error message when loading fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import mmap
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from moegrow.device_kernels import native
from moegrow.device_kernels.manifest import ENGINES, ONNX_DATA
from moegrow.runtime import prepacked

__all__ = ["ENGINES", "BackendError", "ExecuTorch", "Interrupt", "Interrupted", "OnnxRuntime",
           "give_back", "load"]


KERNELS = b"moegrow::"  # a `.pte` that names one of moegrow's own kernels (`native`)


class BackendError(Exception):
    """An engine that is missing, or a program file it cannot load or run."""


class Interrupted(BackendError):
    """A run refused or stopped because its engine's `Interrupt` was set."""


class Interrupt:
    """Set from another thread to stop the runs of the engines given it (a growth slice's
    working copy, when a keystroke comes): every later run raises `Interrupted`, and ONNX
    Runtime also ends a run in flight between two of its kernels (`RunOptions.terminate`);
    ExecuTorch finishes the run it is in."""

    def __init__(self) -> None:
        self.flag, self.options = False, []

    def set(self) -> None:
        self.flag = True
        for options in self.options:
            options.terminate = True

    def check(self) -> None:
        if self.flag:
            raise Interrupted("interrupted")


def give_back() -> None:
    """Hand the C heap's free pages back to the system (glibc's `malloc_trim`; nothing where
    the C library has none). The engines free a run's activations and a session's load-time
    buffers, but glibc keeps freed blocks in the heap once its mmap threshold has grown past
    them (it grows to the largest block freed, up to 32 MB): a process that scored a text
    would go on holding that memory while it only suggests (docs/benchmarks.md, "Freed
    memory given back"). Called after the calls that allocate most (a session's load,
    `score`, `observe`, a growth slice), not per keystroke; it costs 0.2-1.3 ms."""
    global _trim
    if _trim is None:
        try:
            _trim = getattr(ctypes.CDLL(None), "malloc_trim", False)
        except (OSError, TypeError):  # no C library to look in (Windows)
            _trim = False
    if _trim:
        _trim(0)


_trim = None  # glibc's malloc_trim, looked up at the first call


def peak_rss_mb() -> float:
    """This process's peak resident memory, MiB: the high-water mark of its own memory
    (`VmHWM` in /proc/self/status, Linux), else `ru_maxrss` (KiB on Linux). On Linux
    `ru_maxrss` is not the process's own: it carries the parent's resident memory at the
    fork across exec, so a benchmark child spawned by a 377 MB parent read at least 377 MB
    whatever it used (docs/benchmarks.md, "The children's peak")."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # not on Windows

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def _engine_log():
    """Send file descriptor 2 to a temporary file, and `sys.stderr` (ExecuTorch's bindings
    write their native log lines there) to a buffer; yields a list that gets their text."""
    sys.stderr.flush()
    saved, text, python = os.dup(2), [], io.StringIO()
    with tempfile.TemporaryFile() as tmp, contextlib.redirect_stderr(python):
        os.dup2(tmp.fileno(), 2)
        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text.append(tmp.read().decode(errors="replace") + python.getvalue())


def _last_line(log: list[str]) -> str:
    lines = [line for text in log for line in text.splitlines() if line.strip()]
    return f"; engine log: {lines[-1]}" if lines else ""


class ExecuTorch:
    # every method's XNNPACK delegate packs the weights it reads on its own: one more
    # program loaded costs a copy (the default fp32 model's `decode`: +35 MB RSS)
    shares_weights = False

    def __init__(self, files: dict[str, Path], weights: Path, threads: int | None = None,
                 interrupt: Interrupt | None = None):
        quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
        levels = [log.level for log in quiet]
        try:
            for log in quiet:
                log.setLevel(logging.ERROR)
            import torch
            from executorch.runtime import Runtime
        except ImportError as e:
            raise BackendError(f"engine executorch is not installed ({e})") from None
        finally:
            for log, level in zip(quiet, levels, strict=True):
                log.setLevel(level)
        self.torch, self.runtime, self.files, self.weights = torch, Runtime.get(), files, weights
        self.interrupt = interrupt
        self.methods, self.loaded = {}, {}  # name -> method, .pte -> program
        self.live: set[str] = set()  # the XNNPACK delegate packs weights when it loads
        if threads:  # XNNPACK's pool for delegated ops, torch's for portable kernels
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

            with _engine_log():
                _unsafe_reset_threadpool(threads)
            torch.set_num_threads(threads)

    def _method(self, name: str):
        if name not in self.methods:
            path = self.files.get(name)
            if path is None:
                raise BackendError(f"the bundle has no executorch program {name!r}")
            log: list[str] = []
            try:
                with _engine_log() as log:
                    if path not in self.loaded:
                        if KERNELS in Path(path).read_bytes():  # a quantized routed program
                            native.load()
                        self.loaded[path] = self.runtime.load_program(path,
                                                                      data_path=self.weights)
                    self.methods[name] = self.loaded[path].load_method(name)
            except native.KernelError as e:
                raise BackendError(f"{path}: {e}") from None
            except (RuntimeError, ValueError) as e:
                raise BackendError(f"{path}: executorch cannot load it with {self.weights.name} "
                                   f"({e}{_last_line(log)})") from None
            give_back()  # the delegate's load-time buffers
        return self.methods[name]

    def run(self, name: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        if self.interrupt:
            self.interrupt.check()
        method = self._method(name)
        try:
            outs = method.execute([self.torch.from_numpy(np.ascontiguousarray(a))
                                   for a in arrays])
        except RuntimeError as e:  # inputs that do not fit the program (`_run_error`)
            raise _run_error("executorch", name, e) from None
        return [o.numpy() for o in outs]

    def release(self, keep: set[str]) -> list[str]:
        """Drop the loaded methods but those named in `keep`, their packed weights with
        them (and the programs no kept method needs); returns the names dropped, which load
        again at their next run (or `prepare`)."""
        names = [n for n in self.methods if n not in keep]
        for name in names:
            del self.methods[name]
        needed = {self.files[n] for n in self.methods}
        self.loaded = {p: program for p, program in self.loaded.items() if p in needed}
        give_back()
        return names

    def held(self) -> set[str]:
        """The methods loaded now."""
        return set(self.methods)

    def prepare(self, names: list[str], keep: set[str] | None = None) -> None:
        """Load methods `names` now, those in `keep` only when given (a method loaded and
        dropped again leaves nothing behind on this engine)."""
        for name in names:
            if keep is None or name in keep:
                self._method(name)


class OnnxRuntime:
    shares_weights = True  # one copy for every session (`prepacked`): a program costs its
    # session's own buffers (the default fp32 model's `decode`: +7 MB RSS)

    def __init__(self, files: dict[str, Path], weights: Path, threads: int | None = None,
                 initializers: dict[str, list] | None = None, live: set[str] | None = None,
                 interrupt: Interrupt | None = None, cache: Path | None = None):
        try:
            import onnxruntime
        except ImportError as e:
            raise BackendError(f"engine onnxruntime is not installed ({e})") from None
        self.interrupt, self.options = interrupt, None
        if interrupt:
            self.options = onnxruntime.RunOptions()
            interrupt.options.append(self.options)
        self.ort, self.files, self.weights, self.sessions = onnxruntime, files, weights, {}
        self.threads, self.initializers, self.live = threads, initializers or {}, live or set()
        self.cache = cache  # where the programs' packed weights are shared (`prepacked`)
        with open(weights, "rb") as f:  # every session's weights
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.data = np.frombuffer(self.map, np.uint8)
        self.values: dict[tuple, object] = {}  # OrtValues over self.data, shared by sessions
        onnxruntime.set_default_logger_severity(3)  # kernels' warnings go to the default logger
        # the CUDA EP when this onnxruntime build has one (onnxruntime-gpu), else the CPU EP;
        # TF32 off: with it, fp32 outputs differ from the CPU EP's by up to 2e-2 (docs/bundle.md)
        cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        self.providers = ([("CUDAExecutionProvider", {"use_tf32": "0"})] * cuda
                          + ["CPUExecutionProvider"])

    def _options(self, name: str, path: Path, weights: str = "map"):
        """Session options for program `name`; its weights from the map: as views where the
        manifest has its weight table, else copied ("map"), always copied ("copy": what
        ONNX Runtime can save an optimized model from), or not at all ("none")."""
        options = self.ort.SessionOptions()
        options.log_severity_level = 3
        # no arena for serving: activations are freed after each run (same speed here, 7 MB
        # less RSS after `score` on the tiny model; docs/benchmarks.md)
        options.enable_cpu_mem_arena = False
        if name in self.live:
            # a deepening sweep's activations (~130 MB on the default model) came as fresh
            # pages at every run (planned as one block, freed after it): page faults took a
            # third of an int4 slice. Its own arena, unplanned, keeps and reuses them at the
            # same peak RSS, freed with the slice's working copy (docs/benchmarks.md, "The
            # sweep's pages"). Without buffer reuse: ONNX Runtime's planner would give a
            # later layer's tensors the buffers of the same shapes an earlier layer freed, so
            # one layer's buffers stay allocated through every layer's run (the int4 sweep's
            # peak in use 100 -> 59 MB without it, a little faster)
            options.enable_cpu_mem_arena, options.enable_mem_pattern = True, False
            options.enable_mem_reuse = False
        if self.threads:
            options.intra_op_num_threads = self.threads
        table = self.initializers.get(name)
        if weights == "none":  # a model that maps its own weights (`prepacked`)
            return options
        if weights == "map" and table and (path.parent / ONNX_DATA).exists():  # views, no copy
            for tensor, dtype, shape, offset, size in table:
                key = (offset, dtype, tuple(shape))
                if key not in self.values:
                    view = self.data[offset:offset + size].view(dtype).reshape(shape)
                    self.values[key] = self.ort.OrtValue.ortvalue_from_numpy(view)
                options.add_initializer(tensor, self.values[key])
        else:  # ORT copies every weight from the map into the session
            options.add_external_initializers_from_files_in_memory(
                [ONNX_DATA], [self.data], [self.data.size])
        return options

    def _session(self, name: str):
        if name not in self.sessions:
            path = self.files.get(name)
            if path is None:
                raise BackendError(f"the bundle has no onnxruntime program {name!r}")
            session = None
            if self.cache and name not in self.live and len(self.providers) == 1:
                session = prepacked.load(self.ort, path, self.weights, self.cache, name,
                                         lambda weights: self._options(name, path, weights),
                                         self.providers)
            try:
                session = session or self.ort.InferenceSession(
                    str(path), self._options(name, path), providers=self.providers,
                    disabled_optimizers=["ConstantFolding"] if name in self.live else None)
            except Exception as e:  # ORT raises its own exception types, all unrelated
                raise BackendError(f"{path}: onnxruntime cannot load it ({e})") from None
            self.sessions[name] = (session, [i.name for i in session.get_inputs()])
            give_back()  # the graph's parse and optimization buffers
            if name not in self.live and hasattr(mmap, "MADV_DONTNEED"):
                # the map's pages this load read leave the process (a serving session
                # copied or packed its weights, or reads its views again from the page
                # cache; a sweep reads its views at every run): a packed load copies every
                # weight once, which kept the whole file resident (11-18 MB of the default
                # int4 slice's peak RSS, docs/benchmarks.md)
                self.map.madvise(mmap.MADV_DONTNEED)
        return self.sessions[name]

    def held(self) -> set[str]:
        """The programs loaded now."""
        return set(self.sessions)

    def prepare(self, names: list[str], keep: set[str] | None = None) -> None:
        """Load programs `names` now, their shared packed weights written (`prepacked`);
        those not in `keep` (when given) are dropped again once loaded, one at a time: their
        pack is on disk, and their first run maps it (56-85 ms on the default int4 model)."""
        for name in names:
            self._session(name)
            if keep is not None and name not in keep:
                del self.sessions[name]
                give_back()

    def release(self, keep: set[str]) -> list[str]:
        """Drop the sessions but those named in `keep`, the memory they hold with them;
        returns the names dropped, which load again at their next run (or `prepare`)."""
        names = [n for n in self.sessions if n not in keep]
        for name in names:
            del self.sessions[name]
        give_back()
        return names

    def run(self, name: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        check = self.interrupt.check if self.interrupt else lambda: None
        check()
        session, names = self._session(name)  # creating a session is not interruptible
        check()
        try:
            return list(session.run(None, dict(zip(names, arrays, strict=True)), self.options))
        except Exception as e:  # ORT's own error types: a terminated run, or inputs that
            check()  # do not fit the program
            raise _run_error("onnxruntime", name, e) from None


def _run_error(engine: str, name: str, e: Exception) -> BackendError:
    """A program that could not run on the inputs the runtime shaped from the manifest
    (its config disagreeing with the program's shapes), as one line."""
    first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return BackendError(f"{engine} could not run program {name!r}: {first}")


def load(engine: str, files: dict[str, Path], weights: Path, threads: int | None = None,
         initializers: dict[str, list] | None = None, live: set[str] | None = None,
         interrupt: Interrupt | None = None, cache: Path | None = None):
    """The engine's backend for the programs `files` ({name: path}) on the weight file
    `weights`; `initializers`: ONNX programs' weight table (`Bundle.initializers`), `live`:
    those that load with constant folding off (`Bundle.live`); `interrupt`: stops its runs
    when set; `cache`: the folder where ONNX Runtime's programs share their packed weights
    (`prepacked`; none: each session packs its own on the heap)."""
    if engine == "executorch":
        return ExecuTorch(files, weights, threads, interrupt)
    if engine == "onnxruntime":
        return OnnxRuntime(files, weights, threads, initializers, live, interrupt, cache)
    raise BackendError(f"unknown backend {engine!r} (choose from {', '.join(ENGINES)}, torch)")
