"""The error map: taps folded into SQLite per (layer, expert, domain), the CLI around it, and
its faults (corrupt or locked database, two processes at once, bad text)."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import sqlite3
import stat
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from conftest import run_cli as run
from conftest import snapshot
from moegrow import runtime
from moegrow.runtime import errormap, state

pytestmark = pytest.mark.slow  # uses the exported tiny bundle
TEXT = "The parser reads the next word. Our user writes plain text. " * 8


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    """A copy of the tiny bundle as exported: without the state/ its in-place serving in
    other tests writes (ONNX Runtime's packed-weight cache, runtime/prepacked.py)."""
    shutil.copytree(tiny_bundle, tmp_path / "b", ignore=shutil.ignore_patterns("state"))
    return tmp_path / "b"


def _observe(path, text, domain):  # in a worker process
    return runtime.open(path, "onnxruntime").observe(text, domain)


def test_observe_folds_the_taps_into_the_map(bundle_copy):
    rt = runtime.open(bundle_copy, "onnxruntime")
    ids = np.array([[1, *rt.sp.encode(TEXT)]])
    assert ids.shape[1] <= rt.bundle.context  # one window: the taps below are all of them
    out = dict(zip(runtime.session.OBSERVE, rt.run("observe", ids), strict=True))
    r = rt.observe(TEXT, "docs")
    assert r["tokens"] == ids.shape[1] - 1 and abs(r["nll"] - out["nll"].mean() *
                                                      ids.shape[1] / (ids.shape[1] - 1)) < 1e-4
    rt.observe(TEXT, "docs")
    rt.observe(TEXT[:100], "chat")
    seen = errormap.Store(bundle_copy).read("docs")
    c = rt.bundle.config
    m = errormap.summary(seen, c["num_hidden_layers"], c["num_local_experts"])
    k = c["num_experts_per_tok"]
    for layer in m["layers"]:
        counts = np.array([e["count"] for e in layer["experts"]])
        assert counts.sum() == 2 * k * r["tokens"]  # K chosen experts per predicted token
        i = layer["layer"]
        chosen, update = out["ids"][i, :-1].ravel(), out["update"][i, :-1].ravel()
        for e in layer["experts"]:
            mine = update[chosen == e["id"]].astype(np.float64)
            assert e["count"] == 2 * mine.size
            if mine.size:
                assert e["mean"] == pytest.approx(mine.mean(), rel=1e-5)
                assert e["std"] == pytest.approx(mine.std(), rel=1e-3, abs=1e-6)
                assert e["ema"] == pytest.approx(mine.mean(), rel=1e-5)  # same text twice
    assert set(errormap.Store(bundle_copy).read()["domains"]) == {"docs", "chat"}
    st = bundle_copy / "state"
    assert stat.S_IMODE(st.stat().st_mode) == 0o700
    assert stat.S_IMODE((st / state.DB).stat().st_mode) == 0o600


def test_bench_overhead_reports_both_engines(capsys, tiny_bundle, tmp_path):
    (tmp_path / "t.txt").write_text(TEXT * 4)
    code, out, err = run(capsys, "bench", "overhead", str(tiny_bundle), "--text",
                         str(tmp_path / "t.txt"), "--out", str(tmp_path / "r"), "--rounds", "1",
                         "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == {"executorch", "onnxruntime"} and all(r > 0 for r in result.values())
    assert "observe / score" in (tmp_path / "r" / "report.md").read_text()


def test_replay_buffer_is_bounded(tmp_path):
    store = errormap.Store(tmp_path)
    folded = np.zeros((2, 4, 3))
    for i in range(20):
        seqs = [np.arange(i, i + 100)] * 3
        store.add("d", folded, 300, 1.0, 4.0, seqs, capacity=1000, reserve=200)
        assert store.read()["replay_tokens"] <= 1000
    assert store.read()["replay_tokens"] == 1000  # the newest 10 sequences of 100
    assert store.read()["domains"]["d"]["tokens"] == 6000
    # a domain seen long ago keeps its newest `reserve` tokens past the capacity
    store.add("old", folded, 300, 1.0, 4.0, [np.arange(100) + 7] * 3, capacity=1000,
              reserve=200)
    for i in range(12):
        store.add("d", folded, 300, 1.0, 4.0, [np.arange(i, i + 100)] * 3, capacity=1000,
                  reserve=200)
    assert [len(s) for s in store.replay("old")] == [100, 100]
    assert store.read()["replay_tokens"] == 1200


def test_two_processes_observing_at_once_lose_no_counts(bundle_copy):
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        results = list(pool.map(_observe, [bundle_copy] * 4, [TEXT] * 4, ["docs"] * 4))
    seen = errormap.Store(bundle_copy).read()
    assert seen["domains"]["docs"]["tokens"] == sum(r["tokens"] for r in results)
    per_layer = {}
    for layer, _e, _d, count, *_ in seen["stats"]:
        per_layer[layer] = per_layer.get(layer, 0) + count
    assert set(per_layer.values()) == {2 * sum(r["tokens"] for r in results)}


def test_cli_observe_errormap_plot_and_forget(capsys, bundle_copy, tmp_path):
    (tmp_path / "t.txt").write_text(TEXT * 3)
    code, out, err = run(capsys, "observe", str(bundle_copy), "--text", str(tmp_path / "t.txt"),
                         "--domain", "notes", "--json")
    assert code == 0, err
    assert json.loads(out)["domain"] == "notes" and json.loads(out)["tokens"] > 100
    code, out, err = run(capsys, "errormap", str(bundle_copy), "--json", "--plot",
                         str(tmp_path / "map.png"))
    assert code == 0, err
    m = json.loads(out)
    assert m["domains"]["notes"]["tokens"] > 100 and m["replay_tokens"] > 100
    assert sum(e["count"] for e in m["layers"][0]["experts"]) > 0
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"
    code, out, err = run(capsys, "forget", str(bundle_copy))
    assert code == 0 and "cleared" in out
    code, out, _ = run(capsys, "errormap", str(bundle_copy), "--json")
    m = json.loads(out)
    assert m["domains"] == {} and m["replay_tokens"] == 0
    code, _, err = run(capsys, "errormap", str(bundle_copy), "--plot", str(tmp_path / "x.png"))
    assert code == 2 and "nothing observed yet" in err


@pytest.mark.parametrize("data,words", [
    (b"fine text\n" * 200_000 + b"\xff\xfe bad", "not UTF-8 text"),  # past the first MB
    (b"  \n\n", "empty text")])
def test_bad_text_is_refused_before_anything_is_written(capsys, bundle_copy, tmp_path, data,
                                                        words):
    (tmp_path / "t.txt").write_bytes(data)
    before = snapshot(bundle_copy)
    code, out, err = run(capsys, "observe", str(bundle_copy), "--text", str(tmp_path / "t.txt"))
    assert code == 2 and words in err and out == "" and err.count("\n") == 1
    assert snapshot(bundle_copy) == before and not (bundle_copy / "state").exists()


def test_a_map_from_before_nll_spreads_were_kept_is_upgraded(tmp_path):
    (tmp_path / "state").mkdir()
    db = sqlite3.connect(tmp_path / "state" / state.DB)
    db.executescript("CREATE TABLE domains (domain TEXT PRIMARY KEY, tokens INTEGER, "
                     "nll_sum REAL, last_seen REAL); INSERT INTO domains VALUES ('a', 10, 20, 0);")
    db.commit()
    db.close()
    store = errormap.Store(tmp_path)
    store.add("b", np.zeros((2, 4, 3)), 5, 10.0, 25.0, [], saved=np.full((5, 6), 0.5))
    none = {"tokens": 0, "saved": [], "saved_sq": []}  # observed before the probe existed
    assert store.read()["domains"] == {
        "a": {"tokens": 10, "nll": 2.0, "nll_sd": 0.0, "probe": none, "refused_at": None},
        "b": {"tokens": 5, "nll": 2.0, "nll_sd": 1.0, "refused_at": None,
              "probe": {"tokens": 5, "saved": [2.5] * 6, "saved_sq": [1.25] * 6}}}


def test_the_state_database_is_versioned_and_a_newer_one_is_refused(tmp_path):
    store = errormap.Store(tmp_path)
    store.add("a", np.zeros((2, 4, 3)), 5, 10.0, 25.0, [])
    db = sqlite3.connect(tmp_path / "state" / state.DB)
    assert db.execute("PRAGMA user_version").fetchone()[0] == state.VERSION
    db.execute(f"PRAGMA user_version = {state.VERSION + 1}")
    db.close()
    before = snapshot(tmp_path)
    with pytest.raises(state.StateError, match="made by a newer moegrow"):
        store.read()
    assert snapshot(tmp_path) == before


def test_a_huge_file_is_streamed_in_bounded_pieces(tmp_path):
    """A 24 MB file goes to `observe` in pieces of ~2^20 characters cut at line ends, all
    of it, in order, while the reader holds little more than one piece at a time."""
    import hashlib
    import tracemalloc

    from moegrow.tools.cli import text_chunks

    line = "Grüße: the parser reads the next word, and our user writes plain text.\n"
    path = tmp_path / "huge.txt"
    with path.open("w", encoding="utf-8") as f:
        for _ in range(24 * 2**20 // len(line.encode())):
            f.write(line)
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    got, sizes = hashlib.sha256(), []
    tracemalloc.start()
    for piece in text_chunks(path):
        got.update(piece.encode())
        sizes.append(len(piece))
        assert piece.endswith("\n")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got.hexdigest() == want and len(sizes) >= 23
    assert max(sizes) <= 2**20 + len(line)  # characters: a piece is cut after ~2^20 of them
    assert peak < 8 * 2**20  # a few pieces' worth, not the 24 MB file


def test_a_corrupt_database_is_kept_aside_with_a_clear_error(capsys, bundle_copy, tmp_path):
    (bundle_copy / "state").mkdir(mode=0o700)
    (bundle_copy / "state" / state.DB).write_bytes(b"this is not sqlite" * 100)
    (tmp_path / "t.txt").write_text(TEXT)
    code, _, err = run(capsys, "observe", str(bundle_copy), "--text", str(tmp_path / "t.txt"))
    assert code == 2 and "not a usable database" in err and "kept aside as" in err
    aside = list((bundle_copy / "state").glob(f"{state.DB}.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == b"this is not sqlite" * 100
    code, _, err = run(capsys, "observe", str(bundle_copy), "--text", str(tmp_path / "t.txt"))
    assert code == 0, err  # a new map next time; the old file is still there
    assert aside[0].exists()


def test_a_locked_database_gives_a_clear_error(bundle_copy, monkeypatch):
    rt = runtime.open(bundle_copy, "onnxruntime")
    rt.observe(TEXT, "docs")
    monkeypatch.setattr(state, "BUSY_MS", 200)
    holder = sqlite3.connect(bundle_copy / "state" / state.DB, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(state.StateError, match="locked by another process"):
            rt.observe(TEXT, "docs")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    tokens = rt.observe(TEXT, "docs")["tokens"]  # works again once the lock is gone
    assert errormap.Store(bundle_copy).read()["domains"]["docs"]["tokens"] == 2 * tokens
