"""Weights are data: an expert changed through the runtime alone gives the programs' outputs
of the changed model (its torch reference, to float rounding), on both engines, and nothing
else changes."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import exported, snapshot
from conftest import run_cli as run
from moegrow import runtime
from moegrow.device_kernels import layout
from moegrow.export import checkpoint, reference
from moegrow.runtime import bundle as bundle_format
from moegrow.runtime import experts, versions

pytestmark = pytest.mark.slow  # uses the exported tiny bundle
ENGINES = ["executorch", "onnxruntime"]
TEXT = "The parser reads the next word. Our user writes plain text."
LAYER, SLOT = 1, 2
PROJS = ("gate_proj", "up_proj", "down_proj")
ONES = np.frombuffer(b"\x01" * 4, np.float32)[0]  # a float whose 4 bytes are all non-zero


@pytest.fixture(scope="module")
def changed(tiny_bundle, tiny_ckpt, tmp_path_factory):
    """(bundle with expert (LAYER, SLOT) replaced by the runtime, the changed checkpoint, the
    new weights)."""
    d = tmp_path_factory.mktemp("changed")
    shutil.copytree(tiny_bundle, d / "b")
    rt = runtime.open(d / "b", "executorch")
    rng = np.random.default_rng(0)
    new = [w + rng.normal(0, 0.05, w.shape).astype(np.float32) for w in rt.expert(LAYER, SLOT)]
    assert rt.set_experts({(LAYER, SLOT): new}) == 2
    model = checkpoint.load(tiny_ckpt)
    with torch.no_grad():
        for proj, w in zip(PROJS, new, strict=True):
            getattr(model.model.layers[LAYER].mlp.experts, proj)[SLOT] = torch.from_numpy(w)
    checkpoint.save(model, d / "ckpt", checkpoint.load_tokenizer(tiny_ckpt).path)
    return d / "b", d / "ckpt", new


@pytest.mark.parametrize("engine", ENGINES)
def test_changed_expert_equals_the_changed_model(changed, tiny_bundle, engine):
    path, ckpt, new = changed
    rt, old = runtime.open(path, engine), runtime.open(tiny_bundle, engine)
    want = runtime.Runtime(rt.bundle, "torch", engine=reference.load(ckpt, rt.bundle.manifest))
    ids = [1, *rt.sp.encode(TEXT)]
    tokens = np.array([ids])
    pairs = [(rt.run("score", tokens), want.run("score", tokens)),
             (rt.prefill(ids), want.prefill(ids))]
    step = int(pairs[1][0][0][0].argmax())
    pairs.append((rt.decode(step, len(ids), *pairs[1][0][1:]),
                  want.decode(step, len(ids), *pairs[1][1][1:])))
    for layer in (0, LAYER):  # the sweep from layer 0 runs back through the changed expert
        pairs.append((list(rt.deepen(layer, np.array(ids)).values()),
                      list(want.deepen(layer, np.array(ids)).values())))
    for got, exp in pairs:  # the same math on the same weights: float rounding apart
        for a, b in zip(got, exp, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))
    assert not np.array_equal(rt.prefill(ids)[0], old.prefill(ids)[0])  # the change matters
    assert all(np.array_equal(a, b) for a, b in zip(rt.expert(LAYER, SLOT), new, strict=True))


def test_only_the_named_expert_changes(changed, tiny_bundle):
    path, _, _ = changed
    before, after = bundle_format.load(tiny_bundle), bundle_format.load(path)
    rows = {(r["layer"], r["slot"]): r for r in after.manifest["experts"]["table"]}
    for old in before.manifest["experts"]["table"]:
        key = (old["layer"], old["slot"])
        same = key != (LAYER, SLOT)
        assert rows[key]["version"] == (1 if same else 2)
        assert (rows[key]["sha256"] == old["sha256"]) == same
        for engine in ENGINES:
            a, b = experts.read(before, *key, engine), experts.read(after, *key, engine)
            assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)) == same
    for engine in ENGINES:  # every other byte (attention, router, head, other experts) too
        x = np.fromfile(before.weights(engine), np.uint8)
        y = np.fromfile(after.weights(engine), np.uint8)
        inside = np.zeros_like(x)
        for entry in after.manifest["experts"]["layout"][engine]:
            if entry["layer"] == LAYER:
                layout.view(inside, entry, SLOT, layout.dims(after.config))[...] = ONES
        assert (x != y).any() and not ((x != y) & (inside == 0)).any()
    assert (path / "weights" / "v1.ptd").is_file()  # the previous version is kept


def _damaged(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    return copy


@pytest.mark.parametrize("change,words", [
    (lambda w: {(0, 99): w}, "no expert (0, 99)"),
    (lambda w: {(0, 0): w[:2]}, "give gate, up and down"),
    (lambda w: {(0, 0): [w[0].T, w[1], w[2]]}, "gate_proj: shape"),
    (lambda w: {(0, 0): [w[0], w[1] * np.nan, w[2]]}, "up_proj: NaN or inf"),
])
def test_bad_expert_weights_are_refused_and_nothing_is_written(tiny_bundle, tmp_path, change,
                                                                 words):
    copy = _damaged(tiny_bundle, tmp_path)
    before = snapshot(copy)
    rt = runtime.open(copy, "onnxruntime")
    with pytest.raises(experts.ExpertError, match=re.escape(words)):
        rt.set_experts(change(rt.expert(0, 0)))
    assert snapshot(copy) == before


def test_set_experts_is_logged_and_rolls_back(tiny_bundle, tmp_path, capsys):
    """`set_experts` and growth make versions through one `versions.commit`: the log records
    this one, and `rollback` returns to the export (it once answered "no older version")."""
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    rt = runtime.open(copy, "onnxruntime")
    w = rt.expert(0, 1)
    assert rt.set_experts({(0, 1): [x * 0.5 for x in w]}) == 2
    log = versions.log(rt.bundle)
    assert [(v["version"], v["current"]) for v in log] == [(1, False), (2, True)]
    assert log[1]["report"] == {"what": "set_experts", "experts": [[0, 1]], "version": 2}
    code, _, err = run(capsys, "rollback", str(copy))
    assert code == 0, err
    assert np.array_equal(runtime.open(copy, "onnxruntime").expert(0, 1)[0], w[0])


def test_a_stale_runtime_cannot_overwrite_a_newer_version(tiny_bundle, tmp_path):
    copy = _damaged(tiny_bundle, tmp_path)
    first, second = runtime.open(copy, "executorch"), runtime.open(copy, "onnxruntime")
    w = first.expert(0, 1)
    first.set_experts({(0, 1): [x * 0.5 for x in w]})
    before = snapshot(copy)
    with pytest.raises(experts.ExpertError, match="at version 2 since this bundle was loaded"):
        second.set_experts({(0, 1): w})
    assert snapshot(copy) == before


def test_expert_table_and_budget(tiny_bundle, tiny_ckpt, tmp_path, capsys):
    manifest = bundle_format.load(tiny_bundle).manifest
    c = manifest["config"]
    per_expert = 3 * c["hidden_size"] * c["intermediate_size"] * 4
    rows = manifest["experts"]["table"]
    slots = c["num_local_experts"] + c["spare_experts"]  # spare slots for spawning
    assert c["spare_experts"] == 2 and len(rows) == c["num_hidden_layers"] * slots
    assert [r["kind"] for r in rows[:slots]] == ["base"] * c["num_local_experts"] + ["spare"] * 2
    assert {(r["version"], r["bits"], r["bytes"]) for r in rows} == {(1, 32, per_expert)}
    used = per_expert * len(rows)
    # the default budget keeps a default slice's learning state (top-k experts per layer,
    # each its fp32 weights, gradient and two Adam moments) beside the expert slots
    learning = 4 * per_expert * c["num_experts_per_tok"] * c["num_hidden_layers"]
    assert manifest["budget"] == {"bytes": used + learning, "experts": used,
                                  "learning": learning}
    # a table that disagrees with the weight file, or experts over the budget, do not load
    for edit, words in [(lambda m: m["experts"]["table"][3].update(sha256="0" * 64),
                         "expert (0, 3) does not match its checksum"),
                        (lambda m: m["budget"].update(bytes=100), "over the budget of 100")]:
        copy = tmp_path / words.split()[0]
        shutil.copytree(tiny_bundle, copy)
        m = json.loads((copy / "manifest.json").read_text())
        edit(m)
        (copy / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(bundle_format.BundleError, match=re.escape(words)):
            bundle_format.load(copy)
    code, _, err = run(capsys, "export", str(tiny_ckpt), "--out", str(tmp_path / "n"),
                       "--budget-mb", "0.01")
    assert code == 2 and "too small: the experts take" in err
    code, _, err = run(capsys, "export", str(tiny_ckpt), "--out", str(tmp_path / "n"),
                       "--budget-mb", str((used + 4 * per_expert - 1) / 1e6))
    assert code == 2 and f"learning state at least {4 * per_expert}" in err, err
    assert not (tmp_path / "n").exists()


def test_a_quantized_bundle_reads_its_frozen_experts_as_served(exports):
    """An int4 bundle with the growth programs holds no fp32 copy of its base experts and
    one quantized copy: each engine's weight file locates their codes once, in the routed
    layout (form "q4", order "routed": ONNX Runtime's serving programs and both engines'
    deepening programs read it), and `experts.read` dequantizes them to exactly the values
    the programs serve (`quantize.dequantized`)."""
    from moegrow.export import programs, quantize

    path, ckpt = exported(exports["mixtral", 4]), exports["mixtral", 4].result()[1]
    b = bundle_format.load(path)
    model = programs.with_spare(checkpoint.load(ckpt), b.config["spare_experts"])
    ex = quantize.dequantized(model, 4).model.layers
    for engine in ENGINES:
        forms = {e["form"] for e in b.manifest["experts"]["layout"][engine]}
        assert forms == {"q4", "stacked", "dense"}, forms  # q4: base; fp32: spare slots
        base = [e for e in b.manifest["experts"]["layout"][engine] if e["form"] == "q4"]
        assert len(base) == 3 * b.config["num_hidden_layers"], base  # one copy each
        assert {e.get("order") for e in base} == {"routed"}
        for layer, slot in ((0, 0), (1, 3)):
            got = experts.read(b, layer, slot, engine)
            want = [getattr(ex[layer].mlp.experts, p)[slot].detach().numpy() for p in PROJS]
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g, w)


def test_a_slice_reads_its_trained_experts_in_place(exports, tmp_path):
    """A growth slice's trained experts are views of its working copy, not copies: a spare
    slot's [gate, up, down] share the map's memory, read what `experts.read` reads, and
    follow `write_in_place`; a quantized base expert has none (the slice copies it
    dequantized)."""
    path = exported(exports["mixtral", 4])
    b = bundle_format.load(path)
    slots, _, _ = layout.dims(b.config)
    for engine in ENGINES:
        copy = tmp_path / f"work.{engine}"
        shutil.copyfile(b.weights(engine), copy)
        buf = np.memmap(copy, np.uint8, mode="r+")
        assert experts.views(buf, b, engine, 1, 0) is None  # int4, frozen
        views = experts.views(buf, b, engine, 1, slots - 1)
        for v, w in zip(views, experts.read(b, 1, slots - 1, engine, copy), strict=True):
            assert np.shares_memory(v, buf)
            np.testing.assert_array_equal(v, w)
        new = [np.full(v.shape, i + 0.5, np.float32) for i, v in enumerate(views)]
        experts.write_in_place(buf, b, engine, 1, slots - 1, new)
        for v, w in zip(views, new, strict=True):
            np.testing.assert_array_equal(v, w)
        buf.flush()
        for g, w in zip(experts.read(b, 1, slots - 1, engine, copy), new, strict=True):
            np.testing.assert_array_equal(g, w)
        del buf
