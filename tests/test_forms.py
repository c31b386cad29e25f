"""The one-pass serving programs beside spawned clones (`Runtime.form`, `Runtime.opens`):
where no clone opens they serve with the gated programs' outputs, the keyboard's context
is reused there, and ExecuTorch keeps the gated programs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import german
from moegrow import runtime


@pytest.mark.parametrize("engine", ["executorch", "onnxruntime"])
def test_one_pass_programs_serve_where_no_clone_opens(grown, engine, tmp_path):
    """On base text no clone opens: on ONNX Runtime `score`, `observe`, `prefill` and
    `decode` run the one-pass programs (no spare slot computed) with the gated ones'
    outputs; on the grown domain's text a clone opens and the gated programs run.
    ExecuTorch keeps the gated ones (another program there would pack another copy of the
    weights)."""
    after = shutil.copytree(grown[1], tmp_path / "b")  # loading writes packed weights there
    rt = runtime.open(after, engine)
    cal = np.fromfile(rt.bundle.path / rt.bundle.manifest["calibration"]["guard"]["file"],
                      np.int32).astype(np.int64)
    base = [1, *cal[len(cal) // 2:][:40]]
    text = [1, *rt.sp.encode(german(20, seed=9))[:40]]
    for ids, opens in ((base, False), (text, True)):
        one_pass = engine == "onnxruntime" and not opens
        assert rt.form("score", ids) == ("score" if one_pass else "score_gated")
        assert rt.form("prefill", ids) == ("prefill" if one_pass else "prefill_gated")
        assert rt.form("observe", ids) == ("observe" if one_pass else "observe_gated")
        tokens = np.array([ids])
        for name in ("score", "observe"):  # every output: NLL, ranks, the error map's taps
            for got, want in zip(rt.run(name, tokens),
                                 rt.engine.run(f"{name}_gated", [tokens, rt.slots]), strict=True):
                np.testing.assert_array_equal(got, want)
        zero = np.zeros(rt.cache_shape, np.float32)
        gated = rt.engine.run("prefill_gated", [tokens, np.arange(len(ids)), zero, zero,
                                                rt.slots])
        logits, k, v, novelty = rt.prefill(ids)
        np.testing.assert_array_equal(logits, gated[0])
        assert rt.opens(gated[3]) == opens  # the context's own class scores
        token = int(logits[0].argmax())
        inputs = [np.array([[token]]), np.array([len(ids)]), k, v, rt.slots, gated[3]]
        want = rt.engine.run("decode_gated", inputs)[0]
        got = rt.decode(token, len(ids), k.copy(), v.copy(), novelty)[0]
        np.testing.assert_allclose(got, want, atol=1e-5)
        if opens:  # the clones change what the one-pass program would say
            assert np.abs(rt.engine.run("decode", inputs)[0] - want).max() > 1e-3


def test_typing_beside_a_clone_reuses_the_context_where_no_clone_opens(grown, tmp_path):
    """On ONNX Runtime a keyboard typing base text beside a clone extends its cached context
    (`Runtime.extend` over the one-pass prefill) and suggests what a fresh context gives;
    typing the clone's domain prefills the whole context at each keystroke (the gate's
    class scores sum over all of it)."""
    after = shutil.copytree(grown[1], tmp_path / "b")  # loading writes packed weights there
    rt, fresh = runtime.open(after, "onnxruntime"), runtime.open(after, "onnxruntime")
    ran, run = [], rt.engine.run

    def counting(name, arrays):
        if name.startswith("prefill"):
            ran.append((name, arrays[0].shape[1]))
        return run(name, arrays)
    rt.engine.run = counting
    cal = np.fromfile(rt.bundle.path / rt.bundle.manifest["calibration"]["guard"]["file"],
                      np.int32)
    base = rt.sp.decode([int(i) for i in cal[len(cal) // 2:][:30]])
    domain = rt.sp.decode(rt.sp.encode(german(20, seed=4))[:40])
    for text, opens in ((base, False), (domain, True)):
        ran.clear()
        typed = [text[:n] for n in range(len(text) // 2, len(text) + 1, 3)]
        for prefix in typed:
            fresh.typed = None
            want, got = fresh.suggestions(prefix, k=3), rt.suggestions(prefix, k=3)
            assert [w["word"] for w in got] == [w["word"] for w in want], prefix
            np.testing.assert_allclose([w["p"] for w in got], [w["p"] for w in want],
                                       rtol=1e-4, atol=1e-6)
        full = [len(rt._ids(p, 6)) for p in typed]
        if opens:  # every keystroke: the whole context, gated
            assert ran == [("prefill_gated", n) for n in full]
        else:
            assert {name for name, _ in ran} == {"prefill"} and ran[0][1] == full[0]
            assert sum(n for _, n in ran) < sum(full) / 3, (ran, full)
