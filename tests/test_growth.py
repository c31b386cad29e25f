"""Growth (`runtime/growth.py`): an idle slice spawns a clone for a new domain behind the
domain gate, trains it with the bundle's PC programs, passes the guard and commits a new
version; everything outside the changed expert is untouched; versions roll back; a
non-finite update is discarded (a killed commit and an interrupted slice:
test_reliability.py)."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
from conftest import exported, german, run_cli, snapshot
from moegrow import runtime
from moegrow.device_kernels import layout
from moegrow.runtime import bundle as bundle_format
from moegrow.runtime import experts, gate, growth, guard, versions
from moegrow.runtime.session import OBSERVE


def test_a_slice_of_clones_alone_sweeps_without_the_base_experts_gradients(tiny_bundle,
                                                                          exports):
    """`sweep_spare` (fp32 bundles) for a plan whose every slot is a spare one; `sweep`
    where a base expert deepens in place, and in a bundle without it (int4: its `sweep`
    covers the spare slots alone already)."""
    b = bundle_format.load(tiny_bundle)
    live = b.config["num_local_experts"]
    assert growth._sweep(b, [{"slot": live}, {"slot": live + 1}]) == "sweep_spare"
    assert growth._sweep(b, [{"slot": live}, {"slot": 0}]) == "sweep"
    q4 = bundle_format.load(exported(exports["mixtral", 4]))  # no sweep_spare
    assert growth._sweep(q4, [{"slot": live}]) == "sweep"


def test_a_new_domain_spawns_a_gated_clone_that_passes_the_guard(grown):
    before, after, r = grown
    assert r["verdict"] == "spawn" and r["committed"] and r["version"] == 2, r["reason"]
    assert all(s["how"] == "spawn" for s in r["plan"])
    assert r["steps"] == 8 and r["tokens"] > 0 and np.isfinite(r["energy"]).all()
    g = r["guard"]
    assert g["domain_gain"] > 0.02 and g["base_rise"] <= guard.GUARD_BASE
    assert g["after"]["domain"]["nll"] < g["before"]["domain"]["nll"]
    assert max(g["after"]["domain"]["reach"]) > 0.05  # domain tokens reach the clone
    assert max(g["after"]["base"]["reach"]) < 0.01  # base tokens (almost) never do
    old = runtime.open(before, "onnxruntime")  # the base guard text scored as `eval` does
    cal = np.fromfile(old.bundle.path / old.bundle.manifest["calibration"]["guard"]["file"],
                      np.int32).astype(np.int64)
    ids = cal[len(cal) // 2:]
    nll = sum(float(old.run("score", w[None])[0][new].astype(np.float64).sum())
              for w, new in old.windows(ids))
    assert g["before"]["base"]["tokens"] == len(ids) - 1
    assert g["before"]["base"]["nll"] == pytest.approx(nll / (len(ids) - 1), abs=1e-5)
    assert r["threshold"] >= gate.GATE_LLR and r["class"] == 1  # the first domain's class
    weights = bundle_format.load(before).weights("onnxruntime").stat().st_size
    assert r["accounted_bytes"] == weights + r["work_file_bytes"] + r["bytes"]
    assert r["work_file_bytes"] == weights and r["peak_rss_mb"] > 0
    # the new version's serving programs loaded after the commit: their shared packed
    # weights are written (runtime/prepacked.py), the old version's removed
    [pack] = [p for p in (after / "state" / "prepacked").iterdir() if p.is_dir()]
    assert {p.name.split("-")[0] for p in pack.glob("*.onnx")} == {
        "prefill_gated", "decode_gated", "score_gated", "prefill", "decode", "score"} \
        and r["prepare_seconds"] > 0  # the one-pass forms too (`Runtime.form`)
    assert r["loaded"] == []  # a process that had loaded none keeps none loaded
    table = {(x["layer"], x["slot"]): x for x in bundle_format.load(after).manifest["experts"]
             ["table"]}
    for s in r["plan"]:
        row = table[s["layer"], s["slot"]]
        assert row["kind"] == "spawned" and row["parent"] == s["parent"] and row["domain"] == "de"
        assert row["threshold"] == pytest.approx(r["threshold"]) and row["class"] == 1
        assert row["version"] == 2


def test_the_same_slice_runs_on_executorch(grown, tmp_path):
    """ExecuTorch runs a slice too (its sessions are reloaded after each step, the XNNPACK
    delegate packs weights when a method loads): the same plan and class as on ONNX
    Runtime, one sweep a window and the `adam` program, and the slice commits."""
    before, _, r = grown
    path = tmp_path / "et"
    shutil.copytree(before, path)
    rt = runtime.open(path, "executorch")
    rt.score("the keyboard serves while it waits")
    et = rt.idle(600, tokens=4096, steps=8)
    assert et["released"] == ["score"]  # the serving method, dropped for the slice
    assert r["programs"] == et["programs"] == ["sweep_spare"]  # clones alone: `_sweep`
    assert et["plan"] == r["plan"] and et["class"] == r["class"], et["reason"]
    assert et["committed"] and et["steps"] == 8 and et["guard"]["domain_gain"] > 0.02
    assert et["loaded"] == ["score_gated"]  # the new version's form of what was loaded
    assert et["threshold"] == pytest.approx(r["threshold"])
    np.testing.assert_allclose(et["energy"][0], r["energy"][0], rtol=1e-3)


FRENCH = ["le clavier", "un petit modèle", "chaque fichier", "notre lecteur"]


def test_the_domain_gate_holds_the_domains_class_and_opens_for_it_alone(grown, tmp_path):
    """The committed class table: the base's column and the domain's (its unigram model,
    where German words are likelier than under the base); the gate opens on German text,
    never on the base's; another new language (French, as foreign to this base as German)
    opens it too until French is a class of its own, then no more."""
    before, after, r = grown
    old, new = bundle_format.load(before), bundle_format.load(after)
    for engine in ("executorch", "onnxruntime"):
        a, b = experts.domains(old, engine), experts.domains(new, engine)
        assert np.array_equal(a[:, 2:], b[:, 2:])  # the unused classes stay as exported
        assert np.isfinite(b).all() and not np.array_equal(a[:, :2], b[:, :2])
    rt = runtime.open(after, "onnxruntime")
    table = experts.domains(new)
    word = rt.sp.encode(" tastatur")[0]
    assert table[word, 1] > table[word, 0] + 2  # >7x likelier under the domain's class
    rng = random.Random(5)
    french = " ".join(f"{rng.choice(FRENCH).capitalize()} lit la ligne." for _ in range(40))
    guard = np.fromfile(new.path / new.manifest["calibration"]["guard"]["file"], np.int32)
    base = rt.sp.decode(guard[len(guard) // 2:][:300].tolist())

    def opens(work, text: str) -> float:  # share of positions where class 1's gate is open
        ids = np.array([1] + work.sp.encode(text)[:work.bundle.context - 1])
        score = work.deepen(0, ids, False)["novelty"][:len(ids) - 1, 1]
        # growth's numpy mirror of the programs' scores (its threshold's calibration)
        mirror = gate.scores(experts.domains(work.bundle, "onnxruntime", np.memmap(
            work.weights, np.uint8, mode="r")), ids, 1)[:len(ids) - 1]
        np.testing.assert_allclose(score, mirror, rtol=1e-4, atol=1e-3)
        return float((score >= r["threshold"]).mean())

    assert opens(rt, german(40, seed=9)) > 0.8 and opens(rt, base) == 0
    assert opens(rt, french) > 0.5  # closer to German than to this base
    work = rt.working_copy(tmp_path / "work")  # French grown too: a class of its own
    buf = np.memmap(work.weights, np.uint8, mode="r+")
    cols = experts.domains(new, "onnxruntime", buf)
    ids = [np.array(work.sp.encode(french), np.int64)]
    cols[:, 2] = gate.unigram(ids, len(cols), np.exp(cols[:, 0].astype(np.float64)))
    buf.flush()
    work.reload()
    assert opens(work, french) < 0.05 and opens(work, german(40, seed=9)) > 0.8


def test_the_domains_class_reads_a_word_in_capitals_as_the_word(grown):
    """The committed class scores case-folded groups of pieces (`gate.case_groups`): every
    piece whose lowercase form is a piece too ("▁The", "▁the") has its group's
    log-likelihood ratio against the base, so a domain's text in capitals or starting a
    sentence reads as the domain's; the class is still a distribution."""
    _, after, _ = grown
    rt = runtime.open(after, "onnxruntime")
    table = experts.domains(rt.bundle).astype(np.float64)
    llr = table[:, 1] - table[:, 0]
    pieces = [rt.sp.id_to_piece(i) for i in range(rt.sp.get_piece_size())]
    index = {p: i for i, p in enumerate(pieces)}
    pairs = [(i, index[p.lower()]) for i, p in enumerate(pieces)
             if p.lower() != p and p.lower() in index]
    assert len(pairs) > 10  # the test tokenizer's 17
    np.testing.assert_allclose(llr[[a for a, _ in pairs]], llr[[b for _, b in pairs]],
                               atol=1e-5)
    assert np.ptp(llr) > 2  # the domain's groups differ from the base's
    assert np.exp(table[:, 1]).sum() == pytest.approx(1, abs=1e-4)


def test_a_clone_replaces_its_parent_where_its_gate_opens(grown):
    """The parent's slot row closes where its clone's opens: no position routes to both
    (both open, with equal router rows they took a token's top two wherever the parent was
    first and pushed its second expert out); where the gate stays shut (base text) the
    parent serves as before."""
    before, after, r = grown
    rt, old = runtime.open(after, "onnxruntime"), runtime.open(before, "onnxruntime")
    clones = [row for row in rt.bundle.manifest["experts"]["table"]
              if row.get("kind") == "spawned"]
    assert clones and all(row["replaces"] for row in clones)
    for row in clones:
        assert list(rt.slots[row["layer"], :, row["parent"]]) == pytest.approx(
            gate.parent_row(row["threshold"], row["class"]))
    cal = np.fromfile(rt.bundle.path / rt.bundle.manifest["calibration"]["guard"]["file"],
                      np.int32)
    base = np.concatenate([[1], cal[len(cal) // 2:][:rt.bundle.context - 1]])
    text = np.array([1] + rt.sp.encode(german(40, seed=9))[:rt.bundle.context - 1])
    routed = {name: dict(zip(OBSERVE, rt.run("observe", ids[None]), strict=True))["ids"]
              for name, ids in (("german", text), ("base", base))}
    old_base = dict(zip(OBSERVE, old.run("observe", base[None]), strict=True))["ids"]
    for row in clones:
        layer = routed["german"][row["layer"]]  # [T, K]
        clone, parent = (layer == row["slot"]).any(-1), (layer == row["parent"]).any(-1)
        assert clone.sum() > 0 and not (clone & parent).any()
        b = routed["base"][row["layer"]]
        assert not (b == row["slot"]).any()
        assert np.array_equal((b == row["parent"]).any(-1),
                              (old_base[row["layer"]] == row["parent"]).any(-1))


@pytest.mark.parametrize("engine", ["executorch", "onnxruntime"])
def test_only_the_clone_and_its_router_row_change(grown, engine):
    before, after, r = grown
    old, new = bundle_format.load(before), bundle_format.load(after)
    changed = {(s["layer"], s["slot"]) for s in r["plan"]}
    slots = len(old.manifest["experts"]["table"]) // old.config["num_hidden_layers"]
    for layer in range(old.config["num_hidden_layers"]):
        rows_old = experts.router(old, layer, engine)
        rows_new = experts.router(new, layer, engine)
        for slot in range(slots):
            same = (layer, slot) not in changed
            a, b = experts.read(old, layer, slot, engine), experts.read(new, layer, slot, engine)
            assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)) == same
            assert np.array_equal(rows_old[slot], rows_new[slot]) == same
    # base text, where the gate keeps the clone closed: the same outputs (the one-pass
    # program before, the gated one after: up to float rounding)
    ids = np.fromfile(old.path / old.manifest["calibration"]["guard"]["file"], np.int32)
    tokens = ids[None, :old.context].astype(np.int64)
    a = runtime.open(before, engine).run("observe", tokens)
    b = runtime.open(after, engine).run("observe", tokens)
    assert not any(np.isin(b[2][layer], [s for lay, s in changed if lay == layer]).any()
                   for layer in range(b[2].shape[0]))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_an_int4_bundle_grows_clones_of_its_frozen_experts(exports, tmp_path):
    """A quantized bundle exported with --deepen has fp32 spare slots: growth clones its
    int4 experts there (from their dequantized weights) and never writes them (in place
    too: tests/test_placement.py)."""
    path = tmp_path / "q4"
    shutil.copytree(exported(exports["mixtral", 4]), path)
    rt = runtime.open(path, "onnxruntime")
    rows = rt.bundle.manifest["experts"]["table"]
    assert {(r["kind"], r["bits"]) for r in rows} == {("base", 4), ("spare", 32)}
    rt.observe(german(400), "de")
    old = bundle_format.load(path)
    ids = np.fromfile(path / old.manifest["calibration"]["guard"]["file"], np.int32)
    tokens = ids[None, :old.context].astype(np.int64)
    base_before = rt.run("observe", tokens)
    rt.run("score", tokens)
    r = rt.idle(600, tokens=4096, steps=8)
    assert r["verdict"] == "spawn" and r["committed"] and r["version"] == 2, r["reason"]
    assert r["released"] == ["observe", "score"]  # the serving sessions, dropped for it
    # the new version's form of what was loaded before stays loaded (the keyboard's were
    # not: their packs are written, their sessions dropped)
    assert r["loaded"] == ["score", "score_gated"] and rt.engine.held() == {"score", "score_gated"}
    assert all(s["how"] == "spawn" for s in r["plan"])
    assert r["guard"]["after"]["domain"]["nll"] < r["guard"]["before"]["domain"]["nll"]
    new = bundle_format.load(path)
    assert new.manifest["experts"]["table"][0]["bits"] == 4
    for s in r["plan"]:  # the clone started from its parent as served, then learned
        parent = experts.read(old, s["layer"], s["parent"], "onnxruntime")
        clone = experts.read(new, s["layer"], s["slot"], "executorch")
        assert all(p.shape == c.shape for p, c in zip(parent, clone, strict=True))
        assert not all(np.array_equal(p, c) for p, c in zip(parent, clone, strict=True))
    clones = {(s["layer"], s["slot"]) for s in r["plan"]}
    for engine in ("executorch", "onnxruntime"):  # base text (almost) never opens a clone
        got = runtime.open(path, engine).run("observe", tokens)
        want = base_before if engine == "onnxruntime" else runtime.open(
            exported(exports["mixtral", 4]), engine).run("observe", tokens)
        reach = np.mean([np.isin(got[2][layer], [s for lay, s in clones if lay == layer])
                         .any(-1).mean() for layer in range(got[2].shape[0])])
        assert reach <= gate.BASE_OPEN * 2, (engine, reach)
        assert abs(got[0].mean() / want[0].mean() - 1) <= guard.GUARD_BASE * 2, engine
    with pytest.raises(experts.ExpertError, match="frozen"):
        experts.check(new, {(0, 0): experts.read(new, 0, 0)}, {})


def test_versions_roll_back_and_forward(grown, capsys, tmp_path):
    _, after, _ = grown
    path = tmp_path / "b"
    shutil.copytree(after, path)
    text = german(20, seed=5)
    grown_nll = runtime.open(path, "onnxruntime").score(text)["nll"]
    code, out, _ = run_cli(capsys, "versions", str(path))
    assert code == 0 and "* v2" in out and "v1  export" in out
    assert run_cli(capsys, "rollback", str(path))[0] == 0
    assert bundle_format.load(path).manifest["weights"]["version"] == 1
    assert runtime.open(path, "onnxruntime").score(text)["nll"] > grown_nll
    code, _, err = run_cli(capsys, "rollback", str(path))
    assert code == 2 and "no older version" in err
    code, _, err = run_cli(capsys, "rollback", str(path), "--to", "9")
    assert code == 2 and "no version 9" in err
    assert run_cli(capsys, "rollback", str(path), "--to", "2")[0] == 0
    assert runtime.open(path, "onnxruntime").score(text)["nll"] == grown_nll
    assert versions.next_version(bundle_format.load(path)) == 3


def test_a_non_finite_update_is_discarded(grown, tmp_path):
    before, _, _ = grown
    path = tmp_path / "b"
    shutil.copytree(before, path)
    files = {p: p.read_bytes() for p in path.rglob("*") if p.is_file() and "state" not in p.parts}
    rt = runtime.open(path, "onnxruntime")
    rt.score("the keyboard serves while it waits")
    rt.suggestions("the keyboard")  # prefill and decode: a keystroke's, kept through a slice
    r = rt.idle(600, tokens=4096, steps=8, lr=float("inf"))
    assert not r["committed"] and "NaN or inf" in r["reason"], r["reason"]
    # the serving session dropped for the slice loads again after it, nothing committed
    assert r["released"] == ["score"]
    assert set(rt.engine.sessions) == {"prefill", "decode", "score"}
    assert {p: p.read_bytes() for p in files} == files
    assert not (path / "state" / "work.onnxruntime").exists()


def test_a_second_slice_deepens_the_same_clone(grown, tmp_path):
    _, after, first = grown
    path = tmp_path / "b"
    shutil.copytree(after, path)
    r = runtime.open(path, "onnxruntime").idle(600, tokens=4096, steps=4)
    assert [(s["layer"], s["slot"]) for s in r["plan"]] == [
        (s["layer"], s["slot"]) for s in first["plan"]]
    assert all(s["how"] == "clone" for s in r["plan"])
    def spare(b):
        return sum(x["kind"] == "spare" for x in bundle_format.load(b).manifest["experts"]["table"])

    assert spare(path) == spare(after)  # no new slot taken


def test_a_slice_in_place_is_guarded_on_the_other_grown_domains(grown, tmp_path,
                                                                monkeypatch):
    """An expert deepened in place serves every domain: the guard of such a slice measures
    the other grown domains' held-out replay too (German's, whose clones the bundle has)
    and refuses a rise above the base's bound; a slice of clones does not need to. (The
    new domain's plan is turned in place on base experts: on the tiny model German text
    would be placed as clones.)"""
    path = tmp_path / "b"
    shutil.copytree(grown[1], path)
    rt = runtime.open(path, "onnxruntime")
    rt.observe(german(300, seed=11), "notes")
    live = rt.bundle.config.get("num_local_experts") or rt.bundle.config["num_experts"]
    planned = growth.plan

    def in_place(*args):
        steps, skipped = planned(*args)
        return [{"layer": s["layer"], "parent": s["parent"] % live,
                 "slot": s["parent"] % live, "how": "inplace"} for s in steps[:1]], skipped
    monkeypatch.setattr(growth, "plan", in_place)
    r = rt.idle(600, "notes", tokens=2048, steps=3, place="inplace")
    g = r["guard"]
    assert r["plan"] and all(s["how"] == "inplace" for s in r["plan"]), r["reason"]
    assert set(g["others_rise"]) == {"de"} and np.isfinite(g["others_rise"]["de"])
    assert g["passed"] == (g["domain_gain"] > 0 and g["base_rise"] <= g["bound"]
                           and g["others_rise"]["de"] <= g["bound"])
    assert r["committed"] == g["passed"]
    if not g["passed"] and g["others_rise"]["de"] > g["bound"]:
        assert "de rise" in r["reason"]
    assert grown[2]["guard"]["others_rise"] == {}  # German's own slice: clones only


def test_a_slice_holds_its_learning_state_within_the_budget(grown, tmp_path):
    """The budget keeps bytes for a slice's learning state (each changed expert's fp32
    weights, gradient and two Adam moments): a slice changes no more experts than they
    hold and defers the rest; a budget that holds none is a clear error, nothing changed.
    The slice holds less than its bound: its fp32 experts are read in place in the working
    copy, so it counts their gradients and moments alone (3 of the 4 copies)."""
    before, _, first = grown
    b = bundle_format.load(before)
    each = layout.learning_bytes(b.config, 1)
    assert first["bytes"] == 3 * each // 4 * len(first["plan"])
    assert each * len(first["plan"]) <= b.manifest["budget"]["learning"]
    steps = [{"layer": layer, "parent": 0, "slot": 9, "how": "spawn"} for layer in range(3)]
    b.manifest["budget"]["learning"] = 2 * each + each // 2
    assert growth.learning(b, steps) == (steps[:2], steps[2:])

    def tight(name: str, experts_: int):
        path = tmp_path / name
        shutil.copytree(before, path)
        m = json.loads((path / "manifest.json").read_text())
        m["budget"]["bytes"] = m["budget"]["experts"] + each * experts_
        m["budget"]["learning"] = each * experts_
        (path / "manifest.json").write_text(json.dumps(m))
        return path

    r = runtime.open(tight("one", 1), "onnxruntime").idle(600, tokens=1024, steps=2)
    assert r["plan"] == first["plan"][:1] and r["bytes"] == 3 * each // 4, r["reason"]
    assert r.get("deferred", []) == [[s["layer"], s["parent"]] for s in first["plan"][1:]]
    path = tight("none", 0)
    rt = runtime.open(path, "onnxruntime")
    was = snapshot(path)
    with pytest.raises(growth.GrowthError, match=f"leaves 0 bytes for learning state; one "
                       f"expert's takes {each}"):
        rt.idle(600, tokens=1024, steps=2)
    assert snapshot(path) == was


def test_no_free_slot_is_a_clear_answer(grown):
    """A named expert is cloned while its layer has a free slot, also one the base never
    chose (idle: it deepens in place only once no slot is left); a used one with no free
    slot is skipped while others can grow, and a clear error when nothing can."""
    _, after, r = grown
    rt = runtime.open(after, "onnxruntime")
    layer, parent = r["plan"][0]["layer"], r["plan"][0]["parent"]
    verdict = {"verdict": "deepen", "experts": [[layer, parent]], "layers": {}}
    experts_ = rt.bundle.manifest["calibration"]["layers"][layer]["experts"]
    experts_[parent]["count"] = 0  # as if the base never chose it
    assert growth.plan(rt, verdict, "fr", {"stats": []}, growth.Limits())[0][0]["how"] == "spawn"
    for row in rt.bundle.manifest["experts"]["table"]:
        row["kind"] = "spawned" if row.get("kind") == "spare" else row.get("kind")
    assert growth.plan(rt, verdict, "fr", {"stats": []}, growth.Limits()) == ([
        {"layer": layer, "parent": parent, "slot": parent, "how": "inplace"}], [])
    other = next(e for e, x in enumerate(experts_) if e != parent)
    experts_[parent]["count"], experts_[other]["count"] = 1, 0  # used; idle
    verdict["experts"].append([layer, other])
    assert growth.plan(rt, verdict, "fr", {"stats": []}, growth.Limits()) == ([
        {"layer": layer, "parent": other, "slot": other, "how": "inplace"}], [[layer, parent]])
    experts_[other]["count"] = 1
    with pytest.raises(growth.GrowthError, match="no free expert slot"):
        growth.plan(rt, verdict, "fr", {"stats": []}, growth.Limits())  # no clone for fr


def test_a_new_domain_takes_along_the_other_domains_clones_its_tokens_reach(grown):
    """A domain's first clones bring its class, which closes other domains' gates where it
    wins: the other clones that at least TAKEOVER of its tokens reach now are cloned for it
    too (after the verdict's experts), never changed in place; a domain that has clones
    already deepens them (named by parent or by slot: once)."""
    _, after, r = grown
    rt = runtime.open(after, "onnxruntime")
    de = r["plan"][0]  # a German clone (one per layer: its layer has a free slot left)
    layer = de["layer"]
    verdict = {"verdict": "deepen", "experts": [], "layers": {}}
    much, little = growth.TAKEOVER * 100, growth.TAKEOVER * 100 / 2

    def seen(count: float, domain: str = "fr") -> dict:
        return {"stats": [(layer, de["slot"], domain, count, 0.0, 0.0)],
                "domains": {domain: {"tokens": 100}}}
    steps, _ = growth.plan(rt, verdict, "fr", seen(much), growth.Limits())
    assert steps == [{"layer": layer, "parent": de["slot"], "slot": steps[0]["slot"],
                      "how": "spawn"}] and steps[0]["slot"] != de["slot"]
    assert growth.plan(rt, verdict, "fr", seen(little), growth.Limits()) == ([], [])
    table = rt.bundle.manifest["experts"]["table"]
    for row in table:  # no free slot left: never deepened in place (it is German's)
        row["kind"] = "spawned" if row.get("kind") == "spare" else row.get("kind")
    with pytest.raises(growth.GrowthError, match="no free expert slot"):
        growth.plan(rt, verdict, "fr", seen(much), growth.Limits())
    verdict["experts"] = [[layer, de["parent"]], [layer, de["slot"]]]  # parent, clone
    steps, _ = growth.plan(rt, verdict, "de", seen(much, "de"), growth.Limits())
    assert steps == [{"layer": layer, "parent": de["parent"], "slot": de["slot"],
                      "how": "clone"}]  # its own clone, once


def test_idle_with_nothing_to_grow_and_bad_bundles(tiny_bundle, capsys, tmp_path):
    path = tmp_path / "b"
    shutil.copytree(tiny_bundle, path)
    code, out, _ = run_cli(capsys, "idle", str(path), "--json")
    assert code == 0 and '"committed": false' in out and "nothing to grow" in out
    code, _, err = run_cli(capsys, "idle", str(tmp_path / "missing"))
    assert code == 2 and err.count("\n") == 1
    code, _, err = run_cli(capsys, "idle", str(path), "--passes", "0")
    assert code == 2 and "--passes" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "idle", str(path), "--place", "everywhere")
    assert code == 2 and "--place" in err and err.count("\n") == 1
