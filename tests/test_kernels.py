"""moegrow's own ExecuTorch kernels `moegrow::routed_moe` and `moegrow::pooled_moe`
(`device_kernels/routed_moe.cpp`, built with the machine's compiler against the executorch
wheel): lowered into a `.pte` as the bundles hold them and run by ExecuTorch's runtime,
against their numpy references (`native.reference`, `native.pooled_reference`: the same
int8 activations, float64 sums) and the torch ops the programs are exported from (fp32
activations: the quantization of the activations apart). The whole bundles' routed programs
are in the backend-ops matrix (test_backend_ops.py), the routed pool in test_compress.py."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from moegrow.device_kernels import native
from moegrow.export import lower, moe  # noqa: F401  (through `codes`: torch.ops.moegrow)

E, F, C = 4, 64, 96  # experts, hidden, model width: multiples of the group of 32


def _nmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


class _Layer(torch.nn.Module):
    def __init__(self, codes: dict, bits: int):
        super().__init__()
        self.bits = bits
        for name, value in codes.items():
            self.register_buffer(name, torch.from_numpy(value))

    def forward(self, x, gates):
        return torch.ops.moegrow.routed_moe(x, gates, self.fc1, self.fc1_scales, self.fc2,
                                            self.fc2_scales, self.bits)


def _codes(bits: int, rng) -> dict:
    per = 8 // bits
    return {"fc1": rng.integers(0, 256, (E, 2 * F, C // per), dtype=np.uint8),
            "fc1_scales": rng.uniform(0.001, 0.03, (E, 2 * F, C // 32)).astype(np.float32),
            "fc2": rng.integers(0, 256, (E, C, F // per), dtype=np.uint8),
            "fc2_scales": rng.uniform(0.001, 0.03, (E, C, F // 32)).astype(np.float32)}


def _gates(n: int, rng) -> np.ndarray:
    """Top-2 gates; token 0 on experts 0 and 1, token 1 on none (a spare slot took both)."""
    g = np.zeros((n, E), np.float32)
    for t in range(n):
        g[t, rng.choice(E, 2, replace=False)] = rng.uniform(0.1, 1.0, 2)
    g[0] = 0
    g[0, :2] = 0.5
    if n > 1:
        g[1] = 0
    return g


@pytest.fixture(scope="module", params=[4, 8])
def lowered(request, tmp_path_factory):
    bits, rng = request.param, np.random.default_rng(request.param)
    codes = _codes(bits, rng)
    path = tmp_path_factory.mktemp("kernel") / f"routed{bits}.pte"
    n = torch.export.Dim("n", min=1, max=64)
    x = torch.randn(8, C)
    lower.to_pte({"forward": (_Layer(codes, bits), (x, torch.from_numpy(_gates(8, rng))),
                              {"x": {0: n}, "gates": {0: n}})}, path)
    return bits, codes, path


def _run(path, x: np.ndarray, gates: np.ndarray) -> np.ndarray:
    from executorch.runtime import Runtime

    native.load()
    method = Runtime.get().load_program(path).load_method("forward")
    return method.execute([torch.from_numpy(x), torch.from_numpy(gates)])[0].numpy()


@pytest.mark.parametrize("n", [1, 3, 40])
def test_routed_moe_kernel_equals_its_references(lowered, n):
    bits, codes, path = lowered
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, C)).astype(np.float32)
    gates = _gates(n, rng)
    got = _run(path, x, gates)
    want = native.reference(x, gates, *codes.values(), bits)
    assert got.shape == (n, C)
    assert _nmse(got, want) < 1e-10  # the same sums in another order
    if n > 1:
        assert not got[1].any()  # no expert chosen: nothing added
    # the torch op (fp32 activations): the activations' int8 rounding apart
    torch_out = torch.ops.moegrow.routed_moe(torch.from_numpy(x), torch.from_numpy(gates),
                                             *map(torch.from_numpy, codes.values()),
                                             bits).numpy()
    assert 1e-7 < _nmse(got, torch_out) < 1e-3
    # only the chosen experts count: an unchosen expert's codes changed changes nothing
    other = {**codes, "fc1": codes["fc1"].copy()}
    unused = [e for e in range(E) if not gates[:, e].any()]
    if unused:
        other["fc1"][unused[0]] ^= 0xFF
        np.testing.assert_array_equal(native.reference(x, gates, *other.values(), bits), want)


def test_threads_split_rows_not_sums(lowered):
    """On two threads of ExecuTorch's pool each output is still one thread's sum: the same
    bits as on one."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    bits, codes, path = lowered
    rng = np.random.default_rng(11)
    x, gates = rng.standard_normal((40, C)).astype(np.float32), _gates(40, rng)
    try:
        _unsafe_reset_threadpool(2)
        two = _run(path, x, gates)
    finally:
        _unsafe_reset_threadpool(1)
    np.testing.assert_array_equal(two, _run(path, x, gates))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="the vector path is x86-64's (AVX2): elsewhere the kernel is the "
                           "portable one the other tests run")
def test_the_portable_path_equals_the_vector_one(lowered, tmp_path):
    """The kernel built without AVX2 (its plain loops: what a compiler for another CPU
    gets) gives the vector path's numbers, in a process of its own (one registry each)."""
    bits, codes, path = lowered
    rng = np.random.default_rng(7)
    x, gates = rng.standard_normal((5, C)).astype(np.float32), _gates(5, rng)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "g.npy", gates)
    script = (
        "import sys, numpy as np, torch\n"
        "from moegrow.device_kernels import native\n"
        "native.FLAGS = tuple(f for f in native.FLAGS if f != '-march=native') + "
        "('-march=x86-64',)\n"
        "from executorch.runtime import Runtime\n"
        "native.load()\n"
        f"m = Runtime.get().load_program({str(path)!r}).load_method('forward')\n"
        f"x, g = np.load({str(tmp_path / 'x.npy')!r}), np.load({str(tmp_path / 'g.npy')!r})\n"
        "out = m.execute([torch.from_numpy(x), torch.from_numpy(g)])[0].numpy()\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, out)\n")
    env = {**os.environ, "MOEGROW_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "cache" / "kernels").is_dir()  # built there, not in the user's cache
    portable = np.load(tmp_path / "out.npy")
    assert _nmse(portable, _run(path, x, gates)) < 1e-10


def test_a_missing_compiler_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEGROW_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(native.KernelError, match="needs a C\\+\\+ compiler"):
        native.library()
    assert not any(tmp_path.iterdir())  # nothing left behind


class _Pool(torch.nn.Module):
    """A run of `moe.Pooled` slots as `moe.Slots.spare_out` routes them on ExecuTorch."""

    def __init__(self, slots: int, bits: int, rng):
        super().__init__()
        self.bits = bits
        w = lambda *shape: torch.from_numpy(rng.normal(0, 0.05, shape).astype(np.float32))  # noqa: E731
        self.gate, self.up = moe.Pooled(w(slots * F, C), bits), moe.Pooled(w(slots * F, C), bits)
        self.down = moe.Pooled(w(C, slots * F), bits)

    def codes(self) -> list[np.ndarray]:
        return [t.numpy() for p in (self.gate, self.up, self.down) for t in (p.codes, p.scales)]

    def forward(self, x, gates):
        return torch.ops.moegrow.pooled_moe(x, gates, self.gate.codes, self.gate.scales,
                                            self.up.codes, self.up.scales, self.down.codes,
                                            self.down.scales, self.bits)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pooled_moe_kernel_reads_the_pools_layout(bits, tmp_path):
    """`moegrow::pooled_moe` on a run of pool slots in the pool's own layout (what
    `runtime.compress` writes) equals its numpy reference (`native.pooled_reference`),
    the dense form the programs ran before (`Pooled` linears, fp32 activations: the
    activations' int8 rounding apart) and reads only the slots chosen."""
    rng = np.random.default_rng(bits)
    pool = _Pool(3, bits, rng)
    n = torch.export.Dim("n", min=1, max=64)
    x = rng.standard_normal((6, C)).astype(np.float32)
    gates = np.zeros((6, 3), np.float32)
    gates[0, 0], gates[2, :2], gates[3, 2], gates[5, 0] = 0.7, (0.4, 0.6), 1.0, 0.2  # 1, 4: none
    path = lower.to_pte({"forward": (pool, (torch.from_numpy(x), torch.from_numpy(gates)),
                                     {"x": {0: n}, "gates": {0: n}})}, tmp_path / "p.pte")
    got = _run(path, x, gates)
    want = native.pooled_reference(x, gates, *pool.codes(), bits)
    assert _nmse(got, want) < 1e-10
    assert not got[1].any() and not got[4].any()
    dense = torch.from_numpy(x)
    h = (torch.nn.functional.silu(pool.gate(dense)) * pool.up(dense)).reshape(-1, 3, F)
    dense = pool.down((h * torch.from_numpy(gates)[..., None]).reshape(-1, 3 * F)).detach()
    torch_out = pool(torch.from_numpy(x), torch.from_numpy(gates)).detach()
    np.testing.assert_array_equal(torch_out.numpy(), dense.numpy())  # the op is the dense form
    assert 1e-8 < _nmse(got, dense.numpy()) < 1e-3
    codes = pool.codes()  # slot 1 chosen by token 2 only: with its gate 0, its codes are not read
    gates[2, 1] = 0
    codes[2][F:2 * F] ^= 0xFF
    np.testing.assert_array_equal(native.pooled_reference(x, gates, *codes, bits),
                                  native.pooled_reference(x, gates, *pool.codes(), bits))
    one = _run(path, x, gates)
    pool.up.codes[F:2 * F] ^= 0xFF
    np.testing.assert_array_equal(_run(lower.to_pte(
        {"forward": (pool, (torch.from_numpy(x), torch.from_numpy(gates)), None)},
        tmp_path / "q.pte"), x, gates), one)

