"""Where growth puts a domain's update (`growth.placement`, `gate.reach`): clones behind the
domain's gate where that gate would open on the domain's next text, the named experts
themselves (in place, fp32 bundles) where it would not: text in the base's own register,
which a unigram class tells from the base by its topics alone; int4 clones open for all
text through compression and retirement."""

from __future__ import annotations

import shutil

import numpy as np
from conftest import exported, german, run_cli, synthetic_text
from moegrow import runtime
from moegrow.runtime import bundle as bundle_format
from moegrow.runtime import compress, errormap, gate, growth, guard


def _windows(rng, tokens, n=12, length=64):
    return [np.concatenate([[1], rng.choice(tokens, length - 1)]) for _ in range(n)]


def test_reach_is_what_a_class_of_the_older_replay_opens_on_the_newest():
    """A domain that keeps its words: the class of its older two thirds opens on its newest
    third; one whose topics move on (the base's own register, word by word the base's):
    it does not. The table is left as it was, and a class is taken beside the used ones."""
    rng = np.random.default_rng(0)
    vocab = 40
    table = np.zeros((vocab, 3), np.float32)
    table[:, 2] = np.log(1 / vocab)  # a grown class, used
    base = _windows(rng, np.arange(2, vocab), 40)
    kept = _windows(rng, np.arange(2, 8))
    moving = _windows(rng, np.arange(2, 8), 8) + _windows(rng, np.arange(20, 26), 4)
    before = table.copy()
    share, n = gate.reach(table, "base-and-argmax", {2}, kept, base)
    assert share > 0.95 and n == 4 * (64 - gate.GATE_MIN)
    share, n = gate.reach(table, "base-and-argmax", {2}, moving, base)
    assert share < 0.05 and n == 4 * (64 - gate.GATE_MIN)
    assert np.array_equal(table, before)
    assert gate.reach(table, "base-and-argmax", {1, 2}, kept, base) == (1.0, 0)  # no class free
    near = np.full_like(table, np.log(1e-6))  # another domain's class of the same words,
    near[2:8, 2] = np.log(1 / 6)  # likelier than the new one everywhere: judged against
    share, _ = gate.reach(near, "base-and-argmax", {2}, kept, base)  # the base alone
    assert share > 0.95


def test_other_domains_replay_is_rehearsed_evenly_among_the_domains_own():
    own, extra = [np.full(4, i) for i in range(20)], [np.full(4, 100 + i) for i in range(7)]
    assert [w[0] for w in guard.rehearsed(own, [extra], 0.1)] == [*range(10), 100,
                                                                    *range(10, 20), 103]
    more = [np.full(4, 200 + i) for i in range(40)]  # each domain its share, in turn
    assert [w[0] for w in guard.rehearsed(own, [extra, more], 0.1)] == [
        *range(5), 100, *range(5, 10), 200, *range(10, 15), 103, *range(15, 20), 220]
    assert [w[0] for w in guard.rehearsed(own, [extra], 1.0)][:4] == [0, 1, 100, 2]
    out = [w[0] for w in guard.rehearsed(own, [extra, more], 0.5)]  # one has fewer: all
    assert len(out) == 20 + 7 + 10 and set(out) >= {*range(100, 107), 200, 236}
    assert guard.rehearsed(own, [], 0.1) == own and guard.rehearsed(own, [extra], 0) == own


def test_text_in_the_base_register_deepens_in_place_and_is_guarded_after(tiny_bundle,
                                                                         tmp_path):
    """Under `auto` on the tiny fp32 bundle: notes in its own register (its pretraining
    text's kind) deepen the named experts in place, the rows record who did; German, which
    its gate tells apart, spawns clones; a second in-place domain trains beside some of
    both's replay and its guard scores their held-out replay (others_rise). `--place
    clones` keeps the old rule."""
    path = tmp_path / "b"
    shutil.copytree(tiny_bundle, path)
    rt = runtime.open(path, "onnxruntime")
    rt.observe(synthetic_text(300, seed=11), "notes")
    r = rt.idle(600, "notes", tokens=2048, steps=3)
    p = r["placement"]
    assert p["place"] == "inplace" and p["reach"] < gate.REACH <= 1
    assert p["positions"] >= gate.REACH_MIN
    assert r["plan"] and all(s["how"] == "inplace" and s["slot"] == s["parent"]
                             for s in r["plan"])
    # in place, no clone's memory to spend: every layer's busiest experts, not only the
    # layers the verdict names for clones
    layers, k = (rt.bundle.config[x] for x in ("num_hidden_layers", "num_experts_per_tok"))
    per = [sum(s["layer"] == layer for s in r["plan"]) for layer in range(layers)]
    assert 1 <= min(per) and max(per) <= k, per
    assert r["committed"], r["reason"]
    assert r["guard"]["base_rise"] <= r["guard"]["bound"] and r["guard"]["others_rise"] == {}
    assert r["schedule"] == {"lr": 3e-4, "batch": 1}  # in place: smaller steps, a window each
    table = {(x["layer"], x["slot"]): x for x in rt.bundle.manifest["experts"]["table"]}
    assert all(table[s["layer"], s["slot"]]["deepened"] == ["notes"] for s in r["plan"])
    assert sum("deepened" in x for x in table.values()) == len(r["plan"])

    rt.observe(german(300), "de")
    r = rt.idle(600, "de", tokens=2048, steps=3)
    assert r["placement"]["place"] == "clones" and r["placement"]["reach"] >= gate.REACH
    assert r["committed"] and all(s["how"] == "spawn" for s in r["plan"]), r["reason"]
    assert r["schedule"] == {"lr": 5e-4, "batch": 1}  # clones: a window a step, larger

    rt.observe(synthetic_text(300, seed=12), "mail")
    r = rt.idle(600, "mail", tokens=2048, steps=3)
    assert r["placement"]["place"] == "inplace" and r["guard"], r["reason"]
    assert set(r["guard"]["others_rise"]) == {"notes", "de"}

    assert r["rehearsed"] > 0  # their training replay, trained beside mail's

    # in place, beyond the verdict's own: no other domain's clone, but the parent of one
    rows = [x for x in rt.bundle.manifest["experts"]["table"] if x.get("domain") == "de"]
    verdict = {"verdict": "deepen", "experts": [], "experts_in_place": [
        [x["layer"], x[k]] for k in ("slot", "parent") for x in rows]}
    steps, _ = growth.plan(rt, verdict, "mail", errormap.Store(path).read(),
                           growth.Limits(place="inplace", experts=4))
    assert rows and {(s["layer"], s["parent"]) for s in steps} == {
        (x["layer"], x["parent"]) for x in rows}
    assert all(s["how"] == "inplace" and s["slot"] == s["parent"] for s in steps)

    rt.observe(synthetic_text(300, seed=13), "todo")  # judged only under auto
    clones = growth.Limits(place="clones")
    assert growth.placement(rt, "todo", clones) == (clones, None)
    assert growth.placement(rt, "todo", growth.Limits())[1]["place"] == "inplace"
    mine = growth.Limits(place="inplace", lr=0.01, batch=2)  # the caller's own are kept
    assert growth.schedule(mine, False) == mine
    assert growth.schedule(growth.Limits(place="inplace"), True).lr == 5e-4  # int4: clones


def test_idle_says_where_it_placed_and_refuses_a_bad_place(capsys, tiny_bundle, tmp_path):
    path = tmp_path / "b"
    shutil.copytree(tiny_bundle, path)
    runtime.open(path, "onnxruntime").observe(synthetic_text(300, seed=11), "notes")
    before = bundle_format.load(path).manifest
    code, _, err = run_cli(capsys, "idle", str(path), "--place", "sideways")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert bundle_format.load(path).manifest == before
    code, out, err = run_cli(capsys, "idle", str(path), "--tokens", "2048", "--steps", "2")
    assert code == 0, err
    assert "inplace L" in out and "of its newest replay" in out


def test_in_place_on_an_int4_bundle_clones_open_for_all_text(exports, tmp_path,
                                                              monkeypatch):
    """int4 base experts are frozen: placed in place, the named experts are cloned into
    fp32 spare slots open for all text (`gate.OPEN`), each closing its parent everywhere,
    so every text that reached the parent reaches the clone (on both engines); later
    slices deepen those clones, so does a second domain placed in place, and another
    domain's gated clone of one closes it where its own gate opens."""
    path = tmp_path / "q"
    shutil.copytree(exported(exports["mixtral", 4]), path)
    rt = runtime.open(path, "onnxruntime")
    rt.observe(synthetic_text(300, seed=11), "notes")
    r = rt.idle(600, "notes", tokens=2048, steps=3)
    assert r["placement"]["place"] == "inplace" and r["committed"], r["reason"]
    assert r["plan"] and all(s["how"] == "spawn" and s["open"] for s in r["plan"])
    # one open clone per layer (the busiest expert), a spare slot left for a gated domain
    assert sorted(s["layer"] for s in r["plan"]) == list(range(rt.bundle.config[
        "num_hidden_layers"]))
    assert r["threshold"] == gate.OPEN and r["class"] == 0
    g = r["guard"]
    assert min(max(g["after"][t]["reach"]) for t in ("domain", "base")) > 0.05  # all text
    table = {(x["layer"], x["slot"]): x for x in rt.bundle.manifest["experts"]["table"]}
    slots = rt.slots
    for s in r["plan"]:
        assert table[s["layer"], s["slot"]]["threshold"] == gate.OPEN
        assert table[s["layer"], s["slot"]]["bits"] == 32 and table[s["layer"], s["parent"]][
            "bits"] == 4
        ids = np.array([1] + rt.sp.encode(synthetic_text(20, seed=3)), np.int64)[:64]
        opened, unsure = gate.opened(rt._table(), slots, ids)
        assert opened[s["layer"], :, s["slot"]].all() and not unsure.any()
        assert not opened[s["layer"], :, s["parent"]].any()
    # ExecuTorch serves the same open clones: the same experts chosen, the same NLL
    ids = np.array([1] + rt.sp.encode(synthetic_text(20, seed=3)), np.int64)[None, :64]
    ort, et = (runtime.open(path, e).run("observe", ids) for e in ("onnxruntime", "executorch"))
    np.testing.assert_array_equal(et[2], ort[2])
    assert abs(float(et[0].mean()) / float(ort[0].mean()) - 1) < 0.01
    assert any((ort[2][s["layer"]] == s["slot"]).any() for s in r["plan"])
    again = rt.idle(600, "notes", tokens=2048, steps=2)
    assert [(s["layer"], s["slot"], s["how"]) for s in again["plan"]] == [
        (s["layer"], s["slot"], "clone") for s in r["plan"]]
    # a second domain in place deepens those open clones (as an fp32 bundle's base experts),
    # takes no spare slot, and is guarded on the first
    spare = [(x["layer"], x["slot"]) for x in rt.bundle.manifest["experts"]["table"]
             if x["kind"] == "spare"]
    rt.observe(synthetic_text(300, seed=12), "mail")
    mail = rt.idle(600, "mail", tokens=2048, steps=2)
    assert mail["placement"]["place"] == "inplace" and mail["plan"], mail["reason"]
    assert {(s["layer"], s["slot"], s["how"]) for s in mail["plan"]} <= {
        (s["layer"], s["slot"], "inplace") for s in r["plan"]}
    assert "notes" in mail["guard"]["others_rise"]
    rows = {(x["layer"], x["slot"]): x for x in rt.bundle.manifest["experts"]["table"]}
    assert [key for key, x in rows.items() if x["kind"] == "spare"] == spare
    assert not mail["committed"] or all(rows[s["layer"], s["slot"]]["deepened"] == ["mail"]
                                        for s in mail["plan"])
    # German's gated clone of an open clone closes it where German's gate opens
    rt.observe(german(300), "de")
    layer, slot = r["plan"][0]["layer"], r["plan"][0]["slot"]
    free = [x["slot"] for x in rt.bundle.manifest["experts"]["table"]
            if x["layer"] == layer and x["kind"] == "spare"]
    step = {"layer": layer, "parent": slot, "slot": free[0], "how": "spawn"}
    monkeypatch.setattr(growth, "plan", lambda *args: ([dict(step)], []))
    de = rt.idle(600, "de", tokens=2048, steps=2)
    assert de["plan"][0]["replaces"] and de["threshold"] >= gate.GATE_LLR
    if de["committed"]:
        np.testing.assert_allclose(rt.slots[layer, :, slot],
                                   gate.parent_row(de["threshold"], de["class"]))


def _as_guarded(rt, report: dict, domain: str) -> None:
    """The committed version serves what its guard measured on the working copy."""
    _, held = guard.split(errormap.Store(rt.bundle.path).replay(domain), rt.bundle.context)
    after = report["guard"]["after"]
    assert abs(guard.measure(rt, held, set())["nll"] - after["domain"]["nll"]) < 1e-6
    assert abs(guard.measure(rt, guard.base_windows(rt), set())["nll"]
               - after["base"]["nll"]) < 1e-6


def test_an_open_clone_under_another_domains_clone_compresses_and_retires(
        exports, tmp_path, monkeypatch):
    """An open clone (int4 in place) that German's gated clone replaces where German's gate
    opens: compressed into the pool, German's clone follows it (its parent is the pool
    slot, whose row closes there; the freed spare slot stays shut); retired, German's clone
    replaces the base expert under it. Each committed version serves exactly what its
    guard measured on the working copy."""
    path = tmp_path / "q"
    shutil.copytree(exported(exports["mixtral", "pool4"]), path)
    rt = runtime.open(path, "onnxruntime")
    rt.observe(synthetic_text(300, seed=11), "notes")
    r = rt.idle(600, "notes", tokens=2048, steps=3, place="inplace")
    assert r["committed"] and r["plan"][0]["open"], r["reason"]
    layer, slot, parent = (r["plan"][0][k] for k in ("layer", "slot", "parent"))
    rt.observe(german(300), "de")
    kid = next(x["slot"] for x in rt.bundle.manifest["experts"]["table"]
               if x["layer"] == layer and x["kind"] == "spare")
    step = {"layer": layer, "parent": slot, "slot": kid, "how": "spawn"}
    monkeypatch.setattr(growth, "plan", lambda *args: ([dict(step)], []))
    de = rt.idle(600, "de", tokens=2048, steps=2)
    assert de["committed"] and de["plan"][0]["replaces"], de["reason"]
    shut = gate.parent_row(de["threshold"], de["class"])
    c = compress.compress(rt, "notes", bits=4, guarded=False)  # (its guard: base +0.8%)
    assert c["committed"], c["reason"]
    to = next(m["to"] for m in c["moves"] if (m["layer"], m["from"]) == (layer, slot))
    rows = {(x["layer"], x["slot"]): x for x in rt.bundle.manifest["experts"]["table"]}
    assert rows[layer, kid]["parent"] == to and rows[layer, to]["threshold"] == gate.OPEN
    np.testing.assert_allclose(rt.slots[layer, :, to], shut)
    np.testing.assert_array_equal(rt.slots[layer, :, slot], compress.CLOSED)
    _as_guarded(rt, c, "notes")
    monkeypatch.setattr(compress, "DOMAIN_RISE", np.inf)
    monkeypatch.setattr(guard, "GUARD_BASE", np.inf)
    seen = errormap.Store(path).read()
    gone = compress._retire(rt, next(x for x in compress.earning(rt.bundle, seen)
                                     if (x["layer"], x["slot"]) == (layer, to)), print)
    assert gone["committed"], gone["reason"]
    rows = {(x["layer"], x["slot"]): x for x in rt.bundle.manifest["experts"]["table"]}
    assert rows[layer, kid]["parent"] == parent and rows[layer, kid]["replaces"]
    np.testing.assert_allclose(rt.slots[layer, :, parent], shut)
    np.testing.assert_array_equal(rt.slots[layer, :, to], compress.CLOSED)
    _as_guarded(rt, gone, "notes")
