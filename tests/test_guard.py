"""Growth's guard (`runtime/guard.py`): the NLL and reach it reads from `score`, the base
text's NLL remembered per version, only the base windows a slice can change scored again,
and the replay packed into windows."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import german
from moegrow import runtime
from moegrow.runtime import guard, state


def test_the_guard_reads_the_chosen_experts_from_score_as_from_observe(grown, tmp_path):
    """`score` returns each layer's chosen experts (bundles since 2026-12-05), so the guard
    runs it instead of `observe` (at int4 half the time): the same NLL and reach."""
    _, after, r = grown
    shutil.copytree(after, tmp_path / "b")  # its programs' packed weights land in its state
    rt = runtime.open(tmp_path / "b", "onnxruntime")
    assert rt.bundle.manifest["outputs"]["score"] == ["nll", "rank", "ids"]
    ids = np.array([1] + rt.sp.encode(german(60, seed=9)), np.int64)
    windows = [(w, slice(0, len(w) - 1)) for w in guard.windows([ids], rt.bundle.context)]
    changed = {(s["layer"], s["slot"]) for s in r["plan"]}
    fast = guard.measure(rt, windows, changed)
    del rt.bundle.manifest["outputs"]  # a bundle from before: the guard runs `observe`
    slow = guard.measure(rt, windows, changed)
    assert fast["tokens"] == slow["tokens"] == len(ids) - 1
    assert fast["nll"] == pytest.approx(slow["nll"], abs=1e-5)
    assert fast["reach"] == slow["reach"] and max(fast["reach"]) > 0.05


def test_the_guard_remembers_the_base_text_of_each_version(grown, tmp_path):
    """The base guard text's NLL is a constant of a weights version: a committed slice
    remembers the new version's (`guard.base`); the next slice or compression reads it
    instead of scoring the text."""
    _, after, r = grown
    shutil.copytree(after, tmp_path / "b")
    rt = runtime.open(tmp_path / "b", "onnxruntime")
    windows = guard.base_windows(rt)
    got = guard.base(rt, rt, windows, set())
    assert got["remembered"] and got["nll"] == r["guard"]["after"]["base"]["nll"]
    fresh = guard.measure(rt, windows, set())  # what the served version 2 gives
    assert fresh["tokens"] == got["tokens"] and fresh["nll"] == pytest.approx(got["nll"],
                                                                             abs=1e-5)
    with state.connection(tmp_path / "b") as db:
        kept = dict(db.execute("SELECT version, nll FROM guard_base WHERE engine = ?",
                               ("onnxruntime",)).fetchall())
    assert kept == {2: got["nll"]}


def test_the_guard_scores_only_the_base_windows_a_clone_can_change(grown, tmp_path):
    """`guard.touched`: a window where every slot opens as before and no changed slot opens
    scores exactly as before, so the guard's after-measure skips it (`guard.after`); the
    slice's own guard scored fewer windows than the text has and still read the NLL that
    scoring all of them gives."""
    before, after, r = grown
    old, new = (runtime.open(shutil.copytree(p, tmp_path / n), "onnxruntime")  # copies:
                for n, p in (("b0", before), ("b1", after)))  # scoring writes their state
    windows = guard.base_windows(old)
    changed = {(s["layer"], s["slot"]) for s in r["plan"]}
    hit = guard.touched(guard._gates(old), guard._gates(new), windows, changed)
    assert not all(hit)
    for (w, count), h in zip(windows, hit, strict=True):
        if not h:
            a, b = old.run("score", w[None]), new.run("score", w[None])
            np.testing.assert_array_equal(a[0][count], b[0][count])
            assert not np.isin(b[2][:, count], [s for _, s in changed]).any()
    g = r["guard"]["after"]["base"]
    assert g["scored"] == sum(hit) < g["of"] == len(windows)
    full = guard.measure(new, windows, changed)
    assert g["nll"] == pytest.approx(full["nll"], abs=1e-6) and g["tokens"] == full["tokens"]
    np.testing.assert_allclose(g["reach"], full["reach"], atol=1e-9)
    every = guard.touched(guard._gates(old), guard._gates(new), windows,
                          changed | {(0, 0)})  # a base expert changed in place: all of them
    assert all(every)


def test_replay_packs_into_windows_that_predict_every_token_once():
    rng = np.random.default_rng(0)
    seqs = [np.concatenate([[1], rng.integers(2, 99, n)]) for n in (257, 1, 40, 300, 12)]
    stream = np.concatenate(seqs)
    windows = guard.windows(seqs, 64)
    assert all(2 <= len(w) <= 64 for w in windows)
    assert sum(len(w) < 64 for w in windows) == 1  # only the last is short
    targets = np.concatenate([w[1:] for w in windows])  # each window's predicted tokens
    assert np.array_equal(targets, stream[1:])
    assert guard.windows([], 64) == [] and guard.windows([np.array([1])], 64) == []
