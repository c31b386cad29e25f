"""One copy of the weights per process (issue 12, item 2; docs/bundle.md): ONNX programs
take their weights as views of one map of the weight file, the deepening programs read its
current bytes, the serving programs' packed weights are written once and mapped by every
session, freed memory goes back to the system, and `bench memory` reports it all."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import exported
from conftest import run_cli as run
from moegrow.runtime import bundle as bundle_format

pytestmark = pytest.mark.slow  # uses the suite's exports (conftest.exports)
ENGINES = ["executorch", "onnxruntime"]
TEXT = "The parser reads the next word. Our user writes plain text. " * 12  # > one window


def test_onnx_programs_take_every_weight_from_the_shared_map(tiny_bundle, tmp_path):
    """The weight table of each ONNX program lists every external initializer of its graph
    at its bytes in the weight file (ONNX Runtime gets them as views, no copy). The serving
    programs have every weight's transpose folded at export; the deepening programs keep
    their expert weights' transposes as ops and load with constant folding off (`live`), so
    an open session reads the file's current bytes: a write into a working copy reaches its
    next run, as it would reach a freshly loaded one."""
    import onnx
    from moegrow.runtime import experts, session

    b = bundle_format.load(tiny_bundle)
    tables = b.initializers("onnxruntime")
    deepen = {"sweep", "sweep_spare"}
    assert set(tables) == {"prefill", "decode", "score", "observe", "prefill_gated",
                           "decode_gated", "score_gated", "observe_gated", "adam", *deepen}
    assert b.live("onnxruntime") == deepen and b.live("executorch") == set()
    data = np.fromfile(b.weights("onnxruntime"), np.uint8)
    for name, table in tables.items():
        graph = onnx.load(str(b.programs("onnxruntime")[name]), load_external_data=False).graph
        external = {t.name for t in graph.initializer
                    if t.data_location == onnx.TensorProto.EXTERNAL}
        assert {row[0] for row in table} == external
        transposed = any(n.op_type == "Transpose" and n.input[0] in external
                         for n in graph.node)
        assert transposed == (name in deepen), name
        for _name, dtype, shape, offset, size in table:
            assert np.dtype(dtype).itemsize * int(np.prod(shape)) == size <= data.size - offset
    assert (tiny_bundle / "programs" / "weights.onnx.data").stat().st_size == 0

    copy = tmp_path / "work.onnx.data"
    shutil.copyfile(b.weights("onnxruntime"), copy)
    rt = session.Runtime(b, "onnxruntime", weights=copy)
    ids = np.array([1] + rt.sp.encode(TEXT)[:40], np.int64)
    before = rt.deepen(0, ids)
    buf = np.memmap(copy, np.uint8, mode="r+")
    experts.write_in_place(buf, b, "onnxruntime", 0, 0, [1.5 * w for w in rt.expert(0, 0)])
    after = rt.deepen(0, ids)  # the open session, no reload
    fresh = session.Runtime(b, "onnxruntime", weights=copy).deepen(0, ids)
    assert np.abs(after["nll"] - before["nll"]).max() > 1e-3
    for key in after:
        np.testing.assert_array_equal(after[key], fresh[key], err_msg=key)


def test_bench_memory_reports_each_engine(capsys, tiny_bundle, tmp_path):
    code, out, err = run(capsys, "bench", "memory", str(tiny_bundle), "--out",
                         str(tmp_path / "m"), "--json")
    assert code == 0, err
    r = json.loads(out)
    for engine in ENGINES:
        stages = dict(r[engine]["stages"])
        assert list(stages)[:4] == ["python", "import engine", "open",
                                    "suggest (prefill, decode)"] and "sweep" in stages
        assert r[engine]["serving_mb"] == pytest.approx(stages["score"] - stages["import engine"])
        assert r[engine]["ratio"] > 0 and r[engine]["weights_mb"] > 0
    assert "| onnxruntime |" in (tmp_path / "m" / "report.md").read_text()


def test_onnx_sessions_share_their_packed_weights(exports, tmp_path, monkeypatch):
    """ONNX Runtime's packed weights are written once per weights version under the state
    folder, every distinct blob once, and mapped by every session (`runtime/prepacked.py`):
    the outputs equal those of sessions that pack their own, nothing is built twice, the
    files are the same whether ONNX Runtime read a link of the weight file or had the weights
    copied in, a pack cut short is rebuilt, a new weights version replaces the old pack, a
    program whose files cannot be made is not tried again, and a cache that cannot be written
    costs only the sharing."""
    import onnx
    from moegrow.runtime import session

    bundle = tmp_path / "b"
    shutil.copytree(exported(exports["mixtral", 4]), bundle,
                    ignore=shutil.ignore_patterns("state"))
    b = bundle_format.load(bundle)
    plain_weights = tmp_path / "copy.onnx.data"  # not the bundle's file: no cache
    shutil.copyfile(b.weights("onnxruntime"), plain_weights)

    def outputs(rt):
        ids = np.array([[1, *rt.sp.encode(TEXT)]], np.int64)
        return [rt.suggestions("The package"), "".join(rt.generate("The package", 4)),
                rt.score(TEXT), *rt.run("observe", ids)]

    plain = outputs(session.Runtime(b, "onnxruntime", weights=plain_weights))
    cache = bundle / "state" / "prepacked"
    assert not cache.exists()
    shared = outputs(session.Runtime(b, "onnxruntime"))
    for x, y in zip(plain, shared, strict=True):
        np.testing.assert_equal(x, y)
    [folder] = [p for p in cache.iterdir() if p.is_dir()]
    models = {p.name.split("-")[0]: p for p in folder.glob("*.onnx")}
    assert set(models) == {"prefill", "decode", "score", "observe"}
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in folder.iterdir())
    assert cache.stat().st_mode & 0o777 == folder.stat().st_mode & 0o777 == 0o700
    refs = {}  # program -> {initializer: its external data entries}
    for name, path in models.items():
        graph = onnx.load(str(path), load_external_data=False).graph
        refs[name] = {t.name: {e.key: e.value for e in t.external_data}
                      for t in graph.initializer if t.external_data}
        assert {r["location"] for r in refs[name].values()} == {"pack.data"}

    def packs(name: str) -> dict[str, str]:  # ORT's "kernel+hash" of each packed weight ->
        # where its buffers lie in pack.data (by content: the exporter's initializer names,
        # such as val_293, are each program's own, and the same one can be another tensor)
        return {e.split("|")[0]: e.split("|", 1)[1] for r in refs[name].values()
                for k, e in r.items() if k.startswith("prepacked_")}

    pre, dec = packs("prefill"), packs("decode")
    assert pre.keys() & dec.keys() and all(pre[k] == dec[k] for k in pre.keys() & dec.keys())

    stamps = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = outputs(session.Runtime(b, "onnxruntime"))
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    np.testing.assert_equal(again[2], plain[2])

    from moegrow.runtime import prepacked

    built = {p.name: p.read_bytes() for p in folder.iterdir()}  # ORT read a link of the weights

    def no_link(*args):
        raise OSError("Invalid cross-device link")
    shutil.rmtree(cache)
    monkeypatch.setattr(prepacked.os, "link", no_link)  # the weights copied into the session
    np.testing.assert_equal(outputs(session.Runtime(b, "onnxruntime"))[2], plain[2])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == built
    monkeypatch.undo()

    with open(folder / "pack.data", "r+b") as f:
        f.truncate(4096)
    np.testing.assert_equal(outputs(session.Runtime(b, "onnxruntime"))[2], plain[2])
    assert (folder / "pack.data").stat().st_size > 4096

    weights = b.weights("onnxruntime")
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # as a new version
    session.Runtime(b, "onnxruntime").score(TEXT)
    assert [p for p in cache.iterdir() if p.is_dir()] != [folder] and not folder.exists()

    builds = []

    def failing(*args):  # as a full disk would
        builds.append(args[-1])
        raise OSError("no space left on device")
    shutil.rmtree(cache)
    monkeypatch.setattr(prepacked, "_build", failing)
    for _ in range(2):  # marked the first time, not tried again
        np.testing.assert_equal(outputs(session.Runtime(b, "onnxruntime"))[2], plain[2])
    assert sorted(n.split("-")[0] for n in builds) == ["decode", "observe", "prefill", "score"]
    monkeypatch.undo()

    shutil.rmtree(cache)
    cache.write_text("")  # the folder cannot be made: the sessions pack their own
    np.testing.assert_equal(outputs(session.Runtime(b, "onnxruntime"))[2], plain[2])
    assert cache.read_text() == ""


GIVE_BACK = """
import ctypes
from moegrow.runtime import backends
from moegrow.tools.memory import rss_mb
libc = ctypes.CDLL(None)
# M_MMAP_THRESHOLD: 1 MB blocks come from the heap, as they do once glibc freed one that large
assert libc.mallopt(-3, 16 << 20) == 1
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = sorted(libc.malloc(1 << 20) for _ in range(129))
for b in blocks:
    ctypes.memset(b, 1, 1 << 20)
# every other block, never the highest: each freed block has one in use above it, so free
# alone can neither merge them nor shrink the heap, wherever the heap put them
for b in blocks[:-1:2]:
    libc.free(b)
freed = rss_mb()
backends.give_back()
print(freed - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_give_back_returns_the_heaps_free_pages():
    """What the runtime calls after a session's load, `score`, `observe` and a growth slice:
    64 MB freed into glibc's heap stay resident until it runs (docs/benchmarks.md)."""
    done = subprocess.run([sys.executable, "-c", GIVE_BACK], capture_output=True, text=True,
                          check=True)
    assert float(done.stdout) > 48  # MB given back of the 64 MB freed
