"""moegrow's own ExecuTorch kernels (`routed_moe.cpp`): built from source against the
executorch wheel (its headers and `libexecutorch.so`, where the kernel registry lives), loaded
into the process before a program that calls them, and their numpy references.

`library()` builds `libmoegrow_kernels.so` once per source, compiler flags and executorch
version into a cache folder (`$MOEGROW_CACHE`, else `$XDG_CACHE_HOME/moegrow`, else
`~/.cache/moegrow`) with the C++ compiler `$CXX` (else `c++`), `-O3 -march=native`: the
kernels are plain loops the compiler vectorizes for the machine it runs on. `load()` opens it
with `RTLD_GLOBAL` so its static registration reaches the registry the Python runtime's
bindings use (they link the same `libexecutorch.so`). A C++ host compiles the source into
its own binary instead (`apps/native/CMakeLists.txt`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("routed_moe.cpp")  # routed_moe and pooled_moe
NAME = "libmoegrow_kernels.so"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden",
         "-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_EVENT_TRACER_ENABLED",
         "-DET_USE_THREADPOOL")
GROUP = 32  # activations are quantized per group of this many inputs
_loaded: Path | None = None


class KernelError(Exception):
    """The kernel library cannot be built or loaded (no compiler, no executorch wheel)."""


def _executorch() -> Path:
    try:
        import executorch
    except ImportError as e:
        raise KernelError(f"engine executorch is not installed ({e})") from None
    return Path(list(executorch.__path__)[0])


def _cache() -> Path:
    root = os.environ.get("MOEGROW_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return (Path(root) / ("" if os.environ.get("MOEGROW_CACHE") else "moegrow") if root
            else Path.home() / ".cache" / "moegrow")


def _cpu() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def library() -> Path:
    """The built kernel library (built now if this source, compiler, CPU and executorch
    have none in the cache)."""
    et = _executorch()
    cxx = os.environ.get("CXX", "c++")
    version = (et / "version.py").read_bytes() if (et / "version.py").is_file() else b""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((cxx, *FLAGS)).encode() + version
                         + _cpu().encode()).hexdigest()[:16]
    path = _cache() / "kernels" / key / NAME
    if path.is_file():
        return path
    if shutil.which(cxx) is None:
        raise KernelError(f"building {SOURCE.name} needs a C++ compiler ({cxx!r} not found; "
                          "set CXX)")
    path.parent.mkdir(parents=True, exist_ok=True)
    include = et / "include"
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / NAME
        c10 = include / "executorch" / "runtime" / "core" / "portable_type" / "c10"
        cmd = [cxx, *FLAGS, f"-I{include}", f"-I{c10}", str(SOURCE), "-o", str(built),
               f"-L{et / 'lib'}", "-lexecutorch", "-lexecutorch_threadpool",
               f"-Wl,-rpath,{et / 'lib'}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise KernelError(f"building {SOURCE.name} failed: {last}")
        os.replace(built, path)
    return path


def load() -> Path:
    """Register the kernels with ExecuTorch's runtime in this process (once)."""
    global _loaded
    if _loaded is None:
        path = library()
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise KernelError(f"{path}: cannot load it ({e})") from None
        _loaded = path
    return _loaded


def dequant(codes: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """Rows [..., R, K*bits/8] of uint8 codes and scales [..., R, K/G] -> fp32 [..., R, K]."""
    if bits < 8:  # 8 / bits codes to a byte, the first in the lowest bits
        q = np.stack([(codes >> s) & ((1 << bits) - 1) for s in range(0, 8, bits)], -1)
        q = q.reshape(*codes.shape[:-1], -1)
    else:
        q = codes
    q = q.astype(np.float32) - (1 << (bits - 1))
    groups = scales.shape[-1]
    w = q.reshape(*q.shape[:-1], groups, -1) * scales[..., None]
    return w.reshape(q.shape)


def activations(x: np.ndarray) -> np.ndarray:
    """x [..., K] as the kernel reads it: int8 codes per group of 32 (scale max |x| / 127,
    rounded to nearest even, in fp32) and back."""
    g = np.asarray(x, np.float32).reshape(*x.shape[:-1], -1, GROUP)
    peak = np.abs(g).max(-1, keepdims=True)
    inv = np.where(peak > 0, np.float32(127) / np.where(peak > 0, peak, 1), 0).astype(np.float32)
    return (np.rint(g * inv) * (peak / np.float32(127))).reshape(x.shape)


def reference(x: np.ndarray, gates: np.ndarray, fc1: np.ndarray, fc1_scales: np.ndarray,
              fc2: np.ndarray, fc2_scales: np.ndarray, bits: int) -> np.ndarray:
    """`routed_moe.cpp` in numpy (float64 sums over the same int8 activations): x [N, C],
    gates [N, E] -> [N, C]."""
    w1 = dequant(fc1, fc1_scales, bits).astype(np.float64)  # [E, 2F, C]
    w2 = dequant(fc2, fc2_scales, bits).astype(np.float64)  # [E, C, F]
    z = np.einsum("nc,egc->neg", activations(x).astype(np.float64), w1)
    g, u = z[..., 0::2], z[..., 1::2]
    h = (g / (1.0 + np.exp(-g)) * u).astype(np.float32)  # [N, E, F]
    h = activations(h).astype(np.float64)
    return np.einsum("ne,nef,ecf->nc", gates.astype(np.float64), h, w2).astype(np.float32)


def pooled_reference(x: np.ndarray, gates: np.ndarray, gate: np.ndarray, gate_scales: np.ndarray,
                     up: np.ndarray, up_scales: np.ndarray, down: np.ndarray,
                     down_scales: np.ndarray, bits: int) -> np.ndarray:
    """`routed_moe.cpp`'s `pooled_moe` in numpy: a run of n pool slots in the pool's layout
    (`layout.packed` codes [n*F, C/32, 32*bits/8] and flat scales, down [C, n*F/32, ...])
    rearranged into the routed one, then `reference`."""
    n, c = gates.shape[1], x.shape[1]
    f = gate.shape[0] // n

    def rows(codes: np.ndarray, scales: np.ndarray, count: int) -> tuple:
        return codes.reshape(count, -1), scales.reshape(count, -1)

    (g, gs), (u, us), (d, ds) = (rows(gate, gate_scales, n * f), rows(up, up_scales, n * f),
                                 rows(down, down_scales, c))
    fc1 = np.stack([g.reshape(n, f, -1), u.reshape(n, f, -1)], 2).reshape(n, 2 * f, -1)
    fc1_scales = np.stack([gs.reshape(n, f, -1), us.reshape(n, f, -1)], 2).reshape(n, 2 * f, -1)
    fc2 = d.reshape(c, n, -1).transpose(1, 0, 2)
    fc2_scales = ds.reshape(c, n, -1).transpose(1, 0, 2)
    return reference(x, gates, fc1, fc1_scales, fc2, fc2_scales, bits)
