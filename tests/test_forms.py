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


@pytest.mark.parametrize("engine", ["executorch", "onnxruntime"])
def test_typing_beside_a_clone_reuses_the_context(grown, engine, tmp_path):
    """A keyboard typing beside a clone extends its cached context (`Runtime.extend`) and
    suggests what a fresh context gives: on base text over the one-pass prefill (ONNX
    Runtime) or the gated one, and on the clone's own domain too, whose new pieces run as
    gated decode steps on the class scores the runtime mirrors for their positions (the
    gate's scores sum over the whole context, which a prefill from the middle cannot see);
    only the first keystroke (and any where the mirror is unsure) prefills it all."""
    after = shutil.copytree(grown[1], tmp_path / "b")  # loading writes packed weights there
    rt, fresh = runtime.open(after, engine), runtime.open(after, engine)
    ran, run = [], rt.engine.run

    def counting(name, arrays):
        opened = name.startswith("decode") and rt.opens(arrays[5])
        ran.append((name, arrays[0].shape[1], opened))
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
        prefilled = [n for name, n, _ in ran if name.startswith("prefill")]
        assert prefilled[0] == full[0] and sum(prefilled) < sum(full) / 3, (ran, full)
        names, gated = {name for name, *_ in ran}, {"prefill_gated", "decode_gated"}
        if engine == "executorch":
            assert names == gated
        elif opens:  # one-pass steps only where every clone's gate is shut
            assert gated <= names <= gated | {"decode"}
        else:
            assert names == {"prefill", "decode"}
        assert any(o for *_, o in ran) == opens  # the domain's steps open its clones
