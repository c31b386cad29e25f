"""The C++ host (`apps/native`): built with CMake against the executorch wheel, it runs a
bundle's `score` program through the ExecuTorch C++ runtime and gives the Python runtime's
outputs, on the exported weights and on a new weights version."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import exported, german
from moegrow import runtime

NATIVE = Path(__file__).resolve().parent.parent / "apps" / "native"


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Path:
    """The built `moegrow_score` (the test is skipped only where no compiler or CMake is)."""
    missing = [t for t in ("cmake", "c++") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"no {' and no '.join(missing)} on this machine: the C++ host cannot be built")
    import executorch

    build = tmp_path_factory.mktemp("native")
    root = list(executorch.__path__)[0]  # a namespace package: no __file__
    for cmd in (["cmake", "-S", str(NATIVE), "-B", str(build), f"-DEXECUTORCH_ROOT={root}"],
                ["cmake", "--build", str(build), "-j2"]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return build / "moegrow_score"


def _native(host: Path, rt, tokens: np.ndarray, tmp: Path) -> tuple[list[np.ndarray], str]:
    tmp.mkdir()
    tokens.astype(np.int64).tofile(tmp / "tokens.bin")
    rt.slots.astype(np.float32).tofile(tmp / "slots.bin")
    b = rt.bundle
    layers, _, width = rt.slots.shape
    done = subprocess.run(
        [str(host), str(b.path / b.manifest["programs"]["score"]["executorch"]["file"]),
         str(b.weights("executorch")), str(tmp / "tokens.bin"), str(tmp / "slots.bin"),
         str(layers), str(width), str(tmp)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [np.fromfile(tmp / "out0.bin", np.float32), np.fromfile(tmp / "out1.bin", np.int64)], \
        done.stdout


def test_the_cpp_host_scores_as_the_python_runtime(exports, host, tmp_path):
    path = tmp_path / "b"
    shutil.copytree(exported(exports["mixtral", 32]), path)
    rt = runtime.open(path, "executorch")
    tokens = np.array([1] + rt.sp.encode(german(30, seed=4))[:rt.bundle.context - 1])
    got, stdout = _native(host, rt, tokens, tmp_path / "v1")
    want = rt.run("score", tokens[None])
    np.testing.assert_allclose(got[0], want[0].ravel(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got[1], want[1].ravel())
    assert "VmHWM" in stdout and "score" in stdout
    # a new weights version (as growth commits one): the host reads it from the new file
    w = rt.expert(0, 1)
    rt.set_experts({(0, 1): [x * 0.5 for x in w]})
    assert rt.bundle.manifest["weights"]["version"] == 2
    again, _ = _native(host, rt, tokens, tmp_path / "v2")
    want2 = rt.run("score", tokens[None])
    np.testing.assert_allclose(again[0], want2[0].ravel(), rtol=1e-4, atol=1e-4)
    assert not np.allclose(again[0], got[0])
