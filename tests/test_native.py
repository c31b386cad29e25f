"""The C++ hosts (`apps/native`): built with CMake against the executorch wheel, they run a
bundle's `score`, `prefill` and `decode` programs through the ExecuTorch C++ runtime, with
the tokenizer in C++, and give the Python runtime's token ids, outputs, suggestions and
greedy text, on the exported weights, a new weights version and a grown bundle."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import exported, german
from moegrow import runtime
from moegrow.runtime import bundle as bundle_format

NATIVE = Path(__file__).resolve().parent.parent / "apps" / "native"


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Path:
    """The build folder with `moegrow_score` and `moegrow_generate` (the tests are skipped
    only where no compiler or CMake is)."""
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
    return build


def _native(host: Path, rt, tokens: np.ndarray, tmp: Path) -> tuple[list[np.ndarray], str]:
    tmp.mkdir()
    tokens.astype(np.int64).tofile(tmp / "tokens.bin")
    rt.slots.astype(np.float32).tofile(tmp / "slots.bin")
    b = rt.bundle
    layers, _, width = rt.slots.shape
    done = subprocess.run(
        [str(host / "moegrow_score"),
         str(b.path / b.manifest["programs"]["score"]["executorch"]["file"]),
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


def _generate(host: Path, rt, prompt: str, tmp: Path) -> dict:
    """`moegrow_generate` on `rt`'s bundle folder (the host reads its manifest)."""
    tmp.mkdir()
    done = subprocess.run([str(host / "moegrow_generate"), str(rt.bundle.path), prompt, "16",
                           str(tmp)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    said = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    return {"ids": np.fromfile(tmp / "ids.bin", np.int64).tolist(),
            "logits": np.fromfile(tmp / "logits.bin", np.float32),
            "text": (tmp / "text.txt").read_text(encoding="utf-8"),
            "suggestions": [x.rsplit(" ", 1)[0].strip() for x in said["suggestions"].split(" |")],
            "said": said}


def _same(host: Path, rt, prompt: str, tmp: Path) -> dict:
    got = _generate(host, rt, prompt, tmp)
    version = rt.bundle.manifest["weights"]["version"]
    assert got["said"]["bundle"] == f"v{version} {rt.program('prefill')},{rt.program('decode')}"
    ids = [1] + rt.sp.encode(prompt)
    assert got["ids"] == ids  # the C++ tokenizer, byte fallback included
    np.testing.assert_allclose(got["logits"], rt.prefill(ids)[0][0], rtol=1e-4, atol=1e-4)
    assert got["suggestions"] == [w for w, _ in rt.suggest(prompt)]
    assert got["text"] == "".join(rt.generate(prompt, 16))
    return got


def test_the_cpp_host_tokenizes_suggests_and_generates_as_the_python_runtime(exports, host,
                                                                            tmp_path):
    path = tmp_path / "b"
    shutil.copytree(exported(exports["mixtral", 32]), path)
    rt = runtime.open(path, "executorch")
    for i, prompt in enumerate(["The parser reads the next", "Grüße aus München! ¿Qué tal? "
                                "東京 emoji 🙂 x = 42\n\tindented", "a  b   c"]):
        got = _same(host, rt, prompt, tmp_path / f"p{i}")
        assert {"load", "prefill", "decode", "VmHWM"} <= set(got["said"])
        assert got["said"]["xnnpack"] == "weight cache on"  # one packed copy for both methods
    # a grown version (spawned clones behind the domain gate: the gated programs)
    onnx = runtime.open(path, "onnxruntime")
    onnx.observe(german(400), "de")
    assert onnx.idle(600, tokens=4096, steps=8)["committed"]
    rt.reload(bundle_format.load(path))
    assert rt.program("prefill") == "prefill_gated"  # the host derives the same slot state
    grown = _same(host, rt, "Der parser liest die", tmp_path / "grown")
    assert grown["text"]
    bad = subprocess.run([str(host / "moegrow_generate"), str(tmp_path), "x", "4"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not a bundle" in bad.stderr


def test_the_cpp_host_serves_a_quantized_bundle(exports, host, tmp_path):
    """An int4 bundle: its score, prefill and decode programs call moegrow's own kernel for
    the routed experts (`moegrow::routed_moe`), compiled into the host."""
    path = tmp_path / "b"
    shutil.copytree(exported(exports["mixtral", 4]), path)
    rt = runtime.open(path, "executorch")
    assert "executorch" in rt.bundle.manifest["routed"]
    tokens = np.array([1] + rt.sp.encode(german(30, seed=5))[:rt.bundle.context - 1])
    got, _ = _native(host, rt, tokens, tmp_path / "score")
    want = rt.run("score", tokens[None])
    np.testing.assert_allclose(got[0], want[0].ravel(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got[1], want[1].ravel())
    _same(host, rt, "The parser reads the next", tmp_path / "p")
