"""Compression into the quantized pool (runtime/compress.py): a clone moved on both
engines, the budget's exact bytes, reclaim before a spawn (the most converged domain
first), retiring, bad input (the formats themselves: test_ladder.py)."""

import json
import random
import shutil

import numpy as np
import pytest
from conftest import exported, german, run_cli, snapshot
from moegrow import runtime
from moegrow.device_kernels import layout
from moegrow.runtime import bundle as bundle_format
from moegrow.runtime import compress, errormap, experts, growth, verdicts, versions

ENGINES = ("executorch", "onnxruntime")


@pytest.fixture(scope="module")
def grown(exports, tmp_path_factory):
    """The pool bundle after a German slice spawned clones into its one spare slot per
    layer: (bundle path, the slice's report)."""
    path = tmp_path_factory.mktemp("pool") / "b"
    shutil.copytree(exported(exports["mixtral", "pool"]), path)
    rt = runtime.open(path, "onnxruntime")
    rt.observe(german(400), "de")
    # the clones these tests were written on: 8 steps of 4 windows at lr 1e-3 (the clones'
    # schedule before session 43); with today's (a window a step at 5e-4) the pool's int8
    # activations read 0.025 nats from the fp32 slot at one token, over the 0.02 below
    r = rt.idle(600, tokens=4096, steps=8, batch=4, lr=1e-3)
    assert r["committed"] and all(s["how"] == "spawn" for s in r["plan"]), r["reason"]
    return path, r


def test_budget_counts_the_bytes_the_weight_files_hold(exports):
    """Every slot's bytes in the table are the bytes its located tensors take (fp32: one
    form; int4: codes and fp32 scales), and `stored_bytes` sums every located form."""
    b = bundle_format.load(exported(exports["mixtral", "pool"]))
    r = compress.budget(b)
    slots, hidden, width = layout.dims(b.config)
    for engine in ENGINES:
        where = b.manifest["experts"]["layout"][engine]
        per_slot = {}
        for e in where:
            n = e.get("count", slots) * hidden * width
            size = n * 4 if e["form"] in ("stacked", "dense") else \
                n * int(e["form"][1:]) // 8 + n // e["group"] * 4
            if e["form"] != "dense":  # one form per expert: down's dense copy is extra
                for s in range(e.get("first", 0), e.get("first", 0) + e.get("count", slots)):
                    per_slot[e["layer"], s] = per_slot.get((e["layer"], s), 0) + \
                        size // e.get("count", slots)
        assert {(x["layer"], x["slot"]): x["bytes"] for x in r["experts"]} == per_slot
        assert r["stored_bytes"][engine] == sum(
            (e.get("count", slots) * hidden * width * 4 if e["form"] in ("stacked", "dense")
             else e.get("count", slots) * hidden * width * int(e["form"][1:]) // 8
             + e.get("count", slots) * hidden * width // e["group"] * 4) for e in where)
    assert r["pools"]["pool4"] == {"bits": 4, "slots": 2 * b.config["num_hidden_layers"],
                                  "used": 0, "bytes": r["pools"]["pool4"]["bytes"],
                                  "used_bytes": 0}
    assert r["used_bytes"] + r["free_bytes"] == sum(x["bytes"] for x in r["experts"])
    assert r["used_bytes"] == b.manifest["budget"]["experts"] - r["free_bytes"]
    # the rest of the budget is the learning state of a default slice (top-k per layer)
    k, n = b.config["num_experts_per_tok"], b.config["num_hidden_layers"]
    assert r["learning_bytes"] == b.manifest["budget"]["bytes"] - b.manifest["budget"][
        "experts"] == 4 * k * n * layout.expert_bytes(b.config, 32)
    assert r["learning_experts"] == k * n


def test_a_clone_moves_into_the_pool_on_both_engines(grown, tmp_path):
    """compress quantizes the clones into pool slots, moves their router rows and gates,
    frees their spare slots, commits one version; both engines serve exactly the fp32
    path's output on the dequantized weights; every other expert is bit-identical; the
    guard's figures are the runtime's; rollback brings the fp32 clones back."""
    src, r = grown
    path = tmp_path / "b"
    shutil.copytree(src, path)
    rt = runtime.open(path, "onnxruntime")
    old = rt.bundle
    text = np.array([1] + rt.sp.encode(german(40, seed=9))[:old.context - 1])
    before = {e: runtime.open(path, e).run("observe", text[None]) for e in ENGINES}
    free = compress.budget(old)["reclaimable_bytes"]
    rt.observe(german(40, seed=11), "de")  # the clones now have error statistics
    c = compress.compress(rt)
    assert c["committed"] and c["version"] == 3 and c["domain"] == "de", c["reason"]
    clones = {(s["layer"], s["slot"]) for s in r["plan"]}
    # the allocator's plan (each clone measured alone) was the one carried out
    assert c["allocated"]["plan"] == {f"{m['layer']}/{m['from']}": 4 for m in c["moves"]}
    assert c["refused"] == []
    assert {(m["layer"], m["from"]) for m in c["moves"]} == clones
    config = old.config
    per = layout.expert_bytes(config, 32) - layout.expert_bytes(config, 4)
    assert c["reclaimed_bytes"] == len(clones) * per == free
    assert c["guard"]["domain_rise"] <= compress.DOMAIN_RISE
    new = rt.bundle
    rows = {(x["layer"], x["slot"]): x for x in new.manifest["experts"]["table"]}
    stats = {(layer, e) for layer, e, d, *_ in errormap.Store(path).read()["stats"] if d == "de"}
    for m in c["moves"]:  # the error map's statistics followed the clones
        assert (m["layer"], m["to"]) in stats and (m["layer"], m["from"]) not in stats
    moved = {(m["layer"], m["to"]) for m in c["moves"]}
    for m in c["moves"]:
        was = {(x["layer"], x["slot"]): x for x in old.manifest["experts"]["table"]}[
            m["layer"], m["from"]]
        row = rows[m["layer"], m["to"]]
        assert row["kind"] == "spawned" and row["bits"] == 4 and row["domain"] == "de"
        assert all(row[f] == was[f] for f in ("parent", "threshold", "class", "replaces"))
        assert rows[m["layer"], m["from"]]["kind"] == "spare"
        assert "domain" not in rows[m["layer"], m["from"]]
        np.testing.assert_array_equal(experts.router(new, m["layer"])[m["from"]], 0)
        np.testing.assert_array_equal(experts.router(new, m["layer"])[m["to"]],
                                      experts.router(old, m["layer"])[m["from"]])
    for engine in ENGINES:  # isolation: every other expert's served values are unchanged
        for key in rows:
            if key not in moved:
                for a, b in zip(experts.read(old, *key, engine), experts.read(new, *key, engine),
                                strict=True):
                    np.testing.assert_array_equal(a, b)
    # parity: the pool serves what the fp32 spare slot serves with the dequantized weights
    ref = tmp_path / "ref"
    shutil.copytree(src, ref)
    changes = {(m["layer"], m["from"]): experts.read(new, m["layer"], m["to"])
               for m in c["moves"]}
    versions.commit(bundle_format.load(ref), changes, report={"what": "reference"})
    for engine in ENGINES:
        got = runtime.open(path, engine).run("observe", text[None])
        want = runtime.open(ref, engine).run("observe", text[None])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
        remap = {(m["layer"], m["from"]): m["to"] for m in c["moves"]}
        ids = want[2].copy()
        for (layer, frm), to in remap.items():
            ids[layer][ids[layer] == frm] = to
        np.testing.assert_array_equal(got[2], ids)
        assert abs(float(got[0].mean()) / float(before[engine][0].mean()) - 1) < 0.05
        # the serving programs (on ExecuTorch the pool routed: `moegrow::pooled_moe`, which
        # reads only the chosen slots, activations in int8 per group) give observe's NLL
        served = runtime.open(path, engine).run("score", text[None])
        np.testing.assert_array_equal(served[2], got[2])  # the same experts chosen
        assert np.abs(served[0] - got[0]).max() < 0.02, np.abs(served[0] - got[0]).max()
    assert compress.compress(rt)["reason"].startswith("nothing to compress")
    versions.rollback(bundle_format.load(path), 2)
    for engine in ENGINES:
        np.testing.assert_array_equal(runtime.open(path, engine).run("observe", text[None])[0],
                                      before[engine][0])
    # the error map's statistics follow the clones back to their spare slots, and forward
    back = {(layer, e) for layer, e, d, *_ in errormap.Store(path).read()["stats"] if d == "de"}
    for m in c["moves"]:
        assert (m["layer"], m["from"]) in back and (m["layer"], m["to"]) not in back
    versions.rollback(bundle_format.load(path), 3)
    assert {(layer, e) for layer, e, d, *_ in errormap.Store(path).read()["stats"]
            if d == "de"} == stats


def test_a_spawn_with_no_free_slot_reclaims_first(grown, tmp_path):
    """With every spare slot taken (German's clones, and a never-open placeholder where
    German left one free), a new domain's slice compresses German's clones into the pool
    first, then spawns into the slots that freed."""
    src, r = grown
    path = tmp_path / "b"
    shutil.copytree(src, path)
    b = bundle_format.load(path)
    rows = {(x["layer"], x["slot"]): {"kind": "spawned", "domain": "placeholder",
                                      "parent": 0, "bias": 0.0, "threshold": 1e6, "class": 0}
            for x in b.manifest["experts"]["table"] if x["kind"] == "spare"}
    versions.commit(b, {}, {}, rows, {"what": "placeholder"})
    rt = runtime.open(path, "onnxruntime")
    rng = random.Random(3)
    words = ["kirjoitan", "näppäimistö", "oppii", "kasvaa", "nopeasti", "hiljaa", "huomenna",
             "kirjasto", "ikkuna", "sateenvarjo"]
    rt.observe("\n\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)),
               "fi")
    out = rt.idle(600, "fi", tokens=4096, steps=8)
    assert [x["domain"] for x in out["reclaimed"] if x["committed"]] == ["de"]
    freed = {(m["layer"], m["from"]) for m in out["reclaimed"][0]["moves"]}
    assert freed == {(s["layer"], s["slot"]) for s in r["plan"]}
    assert out["plan"] and {(s["layer"], s["slot"]) for s in out["plan"]} <= freed
    assert out["committed"], out["reason"]


def test_bad_input(exports, grown, capsys, tmp_path):
    """No pool, a pool without spare slots, unknown pool widths: one line, exit 2, nothing
    changed."""
    plain = exported(exports["mixtral", 32])
    code, _, err = run_cli(capsys, "compress", str(plain))
    assert code == 2 and err.count("\n") == 1 and "no pool" in err
    code, _, err = run_cli(capsys, "export", "default", "--out", str(tmp_path / "x"),
                           "--pool", "2", "--spare", "0")
    assert code == 2 and err.count("\n") == 1 and "pool needs spare" in err
    for bits in ("3", "8,x", "4,4"):
        code, _, err = run_cli(capsys, "export", "default", "--out", str(tmp_path / "x"),
                               "--pool", "2", "--pool-bits", bits)
        assert code == 2 and err.count("\n") == 1 and "--pool" in err, err
    assert not (tmp_path / "x").exists()
    code, out, _ = run_cli(capsys, "budget", str(grown[0]), "--json")
    assert code == 0 and json.loads(out)["pools"]["spare"]["used"] >= 1


def test_bench_quant_reports_each_strategy(grown, capsys, tmp_path):
    """`moegrow bench quant` on the grown pool bundle: the issue's JSON keys, every plan
    within the bytes of uniform int8 except the operating point, whose measured domain rise
    stays near its prediction; the grown bundle itself is never changed."""
    src, _ = grown
    before = bundle_format.load(src).manifest["weights"]["version"]
    held = tmp_path / "held.txt"
    held.write_text(german(60, seed=7))
    code, out, err = run_cli(capsys, "bench", "quant", str(src), "--text", str(held),
                             "--out", str(tmp_path / "q"), "--json")
    assert code == 0, err
    r = json.loads(out)
    assert {"reclaimed_fraction", "domain_ppl_rise", "base_ppl_rise", "allocator_vs_uniform",
            "budget_violations"} <= set(r)
    assert r["budget_violations"] == 0 and r["reclaimed_fraction"] > 0.7
    s = r["strategies"]
    assert set(s) == {"uniform8", "uniform4", "allocator", "allocator_mid", "importance_mid",
                      "converged_mid", "random_mid", "operating"}
    assert s["allocator"]["reclaimed_fraction"] >= s["uniform8"]["reclaimed_fraction"] - 1e-9
    for name in ("importance_mid", "converged_mid", "random_mid"):
        assert s["allocator_mid"]["reclaimed_fraction"] >= s[name]["reclaimed_fraction"] - 1e-9
        assert s[name]["reclaimed_fraction"] > s["uniform8"]["reclaimed_fraction"] or \
            len(r["clones"]) == 1
    assert s["operating"]["domain_ppl_rise"] <= 3 * compress.DOMAIN_RISE
    assert (tmp_path / "q" / "report.md").is_file() and (tmp_path / "q" / "quant.png").is_file()
    assert bundle_format.load(src).manifest["weights"]["version"] == before


def test_a_refused_compression_changes_nothing(grown, tmp_path, monkeypatch):
    """Where the guard refuses the narrowest width and no wider one is free, nothing on disk
    changes (the bundle, its versions and its error map)."""
    src, _ = grown
    path = tmp_path / "b"
    shutil.copytree(src, path)
    before = snapshot(path)
    monkeypatch.setattr(compress, "DOMAIN_RISE", -1.0)  # no rise is small enough
    c = compress.compress(runtime.open(path, "onnxruntime"))
    assert not c["committed"] and c["refused"] == [4] and c["reason"].startswith("guard")
    assert snapshot(path) == before


def _fill(path, domain: str) -> None:
    """Every free spare and pool slot of the bundle at `path` taken by a clone of `domain`
    that never opens (threshold 1e6): a full budget whose placeholders earn nothing."""
    b = bundle_format.load(path)
    rows = {(x["layer"], x["slot"]): {"kind": "spawned", "domain": domain, "parent": 0,
                                      "bias": 0.0, "threshold": 1e6, "class": 0}
            for x in b.manifest["experts"]["table"] if x["kind"] in ("spare", "pool")}
    versions.commit(b, {}, {}, rows, {"what": "placeholder"})


def test_a_full_budget_retires_what_stopped_earning_or_says_it_is_full(grown, tmp_path,
                                                                       monkeypatch):
    """Every slot taken (German's clones, placeholders that never open): a new domain's
    slice first measures what retiring each costs; where nothing may go (a guard no rise
    passes) the answer is "the budget is full", nothing on disk changes but the error map,
    and the domain waits for new text; then, guarded as shipped, a placeholder in the pool
    is retired, German's fp32 clone moves into its slot, and the new domain spawns into the
    freed spare slot, each a version of its own; the budget holds throughout."""
    src, r = grown
    path = tmp_path / "b"
    shutil.copytree(src, path)
    rt = runtime.open(path, "onnxruntime")
    rt.observe(german(80, seed=21), "old")  # the placeholders' domain: replay to measure on
    _fill(path, "old")
    rt = runtime.open(path, "onnxruntime")
    rng = random.Random(3)
    words = ["kirjoitan", "näppäimistö", "oppii", "kasvaa", "nopeasti", "hiljaa", "huomenna",
             "kirjasto", "ikkuna", "sateenvarjo"]
    fi = ["\n\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(300))
          for _ in range(2)]
    rt.observe(fi[0], "fi")
    weights = {p: p.read_bytes() for p in [path / "manifest.json",
                                           *(path / "weights").iterdir()]}
    monkeypatch.setattr(compress, "DOMAIN_RISE", -1.0)  # nothing may be retired
    out = rt.idle(600, "fi", tokens=4096, steps=8)
    assert not out["committed"] and "budget is full" in out["reason"], out["reason"]
    tried = [x for x in out["reclaimed"] if x.get("what") == "retire"]
    assert tried and not any(x["committed"] for x in out["reclaimed"])
    assert {p: p.read_bytes() for p in weights} == weights
    assert sorted((path / "weights").iterdir()) == sorted(p for p in weights if
                                                        p.parent.name == "weights")
    seen = errormap.Store(path).read()
    assert seen["domains"]["fi"]["refused_at"] == seen["domains"]["fi"]["tokens"]
    judged = verdicts.judge(seen, rt.bundle.manifest["calibration"], 2)
    growing = {d: v for d, v in judged.items() if v["verdict"] != "nothing"}
    assert "fi" in growing  # unasked, it waits for new text
    assert growth.choose(rt, growing, ["fi"], seen, growth.Limits(tokens=4096)) is None
    monkeypatch.undo()
    rt.observe(fi[1], "fi")
    out = rt.idle(600, "fi", tokens=4096, steps=8)
    assert out["committed"], out["reason"]
    done = [x for x in out["reclaimed"] if x["committed"]]
    retired = [x for x in done if x.get("what") == "retire"]
    assert retired and all(x["domain"] == "old" and x["guard"]["domain_rise"] <= 1e-6
                           for x in retired)
    assert any(x.get("what") != "retire" and x["domain"] == "de" for x in done)
    rows = {(x["layer"], x["slot"]): x for x in rt.bundle.manifest["experts"]["table"]}
    for s in out["plan"]:
        assert rows[s["layer"], s["slot"]]["domain"] == "fi"
    for x in retired:
        assert rows[x["layer"], x["slot"]].get("domain") != "old" or \
            (x["layer"], x["slot"]) in {(s["layer"], s["slot"]) for s in out["plan"]}
    whats = [v["report"].get("what") for v in versions.log(rt.bundle)]
    assert "retire" in whats and "compress" in whats
    b = compress.budget(rt.bundle)
    assert b["used_bytes"] + b["learning_bytes"] <= b["budget_bytes"]
    assert out["bytes"] <= b["learning_bytes"]
    seen = errormap.Store(path).read()
    assert seen["domains"]["fi"]["refused_at"] is None


def test_reclaim_compresses_the_most_converged_domain_first(grown, monkeypatch):
    """`compress.ripe` orders the domains whose clones a reclaim may compress: a domain whose
    verdict is `nothing` (growth has little left to win) first, then the one whose clones'
    recent update size (the error map's EMA) fell furthest below their long-run mean;
    only domains with a clone in the layers that need a slot, never the growing one."""
    src, _ = grown
    b = bundle_format.load(src)
    table = b.manifest["experts"]["table"]
    clones = [r for r in table if r.get("kind") == "spawned"]
    if len(clones) == 1:  # a second domain's clone in a spare slot of another layer
        spare = next(r for r in table if r.get("kind") == "spare"
                     and r["layer"] != clones[0]["layer"])
        spare.update(kind="spawned", parent=0, domain="es")
        clones.append(spare)
    for r in clones[1:]:
        r["domain"] = "es"
    first = clones[0]["layer"]

    def stats(domain: str, ratio: float) -> list:
        return [(r["layer"], r["slot"], domain, 10, 10.0, 20.0, ratio, 0.0) for r in clones
                if r["domain"] == domain]
    seen = {"domains": {}, "stats": stats("de", 2.0) + stats("es", 0.5)}
    order = compress.ripe(b, seen)
    assert [x["domain"] for x in order] == ["es", "de"]
    assert [x["drift"] for x in order] == [0.5, 2.0] and not any(x["converged"] for x in order)
    assert [x["domain"] for x in compress.ripe(b, seen, keep="es")] == ["de"]
    others = sorted({r["layer"] for r in clones[1:]} - {first})
    if others:
        assert [x["domain"] for x in compress.ripe(b, seen, others)] == ["es"]
    monkeypatch.setattr(verdicts, "judge", lambda *_: {"de": {"verdict": "nothing"},
                                                       "es": {"verdict": "deepen"}})
    assert [x["domain"] for x in compress.ripe(b, seen)] == ["de", "es"]


def test_a_bundle_without_a_pool_retires_too(tiny_bundle, capsys, tmp_path):
    """No pool to compress into: a full spare layer still frees a slot by retiring another
    domain's expert that stopped earning (a placeholder that never opens), guarded and
    versioned, and the new domain spawns there; `moegrow idle` says what it retired."""
    path = tmp_path / "b"
    shutil.copytree(tiny_bundle, path)
    rt = runtime.open(path, "onnxruntime")
    rt.observe(german(80, seed=21), "old")
    _fill(path, "old")
    rt = runtime.open(path, "onnxruntime")
    rt.observe(german(400), "de")
    code, text, err = run_cli(capsys, "idle", str(path), "--domain", "de", "--tokens", "4096",
                              "--steps", "8")
    assert code == 0 and "old: retired L" in text and "committed version" in text, err + text
    rt = runtime.open(path, "onnxruntime")
    out = [v["report"] for v in versions.log(rt.bundle)][-1]  # the slice's own version
    assert out.get("what") != "retire" and out.get("domain") == "de", out
    retired = [v["report"] for v in versions.log(rt.bundle) if v["report"].get("what") ==
               "retire"]
    assert retired and all(x["domain"] == "old" for x in retired)
    assert text.count("old: retired L") == len(retired)
    assert run_cli(capsys, "versions", str(path))[1].count("old: retire L") == len(retired)
    rows = {(x["layer"], x["slot"]): x for x in rt.bundle.manifest["experts"]["table"]}
    assert {(x["layer"], x["slot"]) for x in retired} <= {
        key for key, x in rows.items() if x.get("domain") in ("de", None)}
    assert any(x.get("domain") == "de" and (x["layer"], x["slot"]) in {
        (r["layer"], r["slot"]) for r in retired} for x in rows.values())


def test_old_versions_files_are_pruned_and_the_export_stays(grown, capsys, tmp_path):
    """After more than `versions.KEEP` commits only version 1's, the current one's and the
    newest KEEP versions' weight files are on disk; the log keeps every version and says
    which have files; rollback to a pruned one is one clear line, to the export works."""
    src, _ = grown
    path = tmp_path / "b"
    shutil.copytree(src, path)
    b = bundle_format.load(path)
    for i in range(versions.KEEP + 2):
        b = versions.commit(b, {}, {}, {}, {"what": f"nothing {i}"})
    top = b.manifest["weights"]["version"]
    kept = {1, *range(top - versions.KEEP + 1, top + 1)}
    engines = b.engines()
    assert {p.name for p in (path / "weights").iterdir()} == {
        bundle_format.load(path).weights(e).name.replace(str(top), str(v), 1)
        for v in kept for e in engines}
    log = versions.log(b)
    assert [v["version"] for v in log] == list(range(1, top + 1))
    assert {v["version"] for v in log if v["files_present"]} == kept
    pruned = min(set(range(1, top + 1)) - kept)
    code, _, err = run_cli(capsys, "rollback", str(path), "--to", str(pruned))
    assert code == 2 and err.count("\n") == 1 and "cannot roll back" in err
    assert run_cli(capsys, "rollback", str(path), "--to", "1")[0] == 0
    assert bundle_format.load(path).manifest["weights"]["version"] == 1


def test_bench_soak_holds_the_budget(exports, capsys, tmp_path):
    """`moegrow bench soak` on the pool bundle with two domains taking turns: the issue's
    JSON keys, no budget violation, no leaked file descriptor, the bundle given is never
    changed; bad options are one line and exit 2."""
    src = exported(exports["mixtral", "pool"])
    before = snapshot(src)
    files = {}
    for tag, text in (("de", german(300, seed=31)), ("fi", german(300, seed=32).upper())):
        files[tag] = tmp_path / f"{tag}.txt"
        files[tag].write_text(text)
    code, out, err = run_cli(capsys, "bench", "soak", str(src), "--cycles", "6", "--switch",
                             "2", "--domain", f"de={files['de']}", "--domain",
                             f"fi={files['fi']}", "--out", str(tmp_path / "s"), "--json")
    assert code == 0, err
    r = json.loads(out)
    assert {"cycles", "rss_slope_kb_per_cycle", "budget_violations", "state_bytes_max"} <= set(r)
    assert r["cycles"] == 6 and r["budget_violations"] == 0 and r["commits"] >= 1
    assert r["fds"]["end"] <= r["fds"]["start"] and 0 < r["state_bytes_max"] < r["disk_bytes_max"]
    assert r["versions_kept"] <= 2 * (versions.KEEP + 2)
    saved = json.loads((tmp_path / "s" / "results.json").read_text())
    assert len(saved["series"]) == 6 and (tmp_path / "s" / "report.md").is_file()
    assert snapshot(src) == before
    for bad in (["--domain", "nofile"], []):
        code, _, err = run_cli(capsys, "bench", "soak", str(src), "--cycles", "1", *bad)
        assert code == 2 and err.count("\n") == 1, err


def test_the_allocator_reclaims_the_most_bytes_within_the_bound():
    """`compress.allocate` on the single-clone rises measured for German's clones of the
    default model (docs/compress.md): the two clones int4 hurts go to int8 as long as the
    bound allows, the cheap ones to int4; no plan takes more slots than a layer has free,
    and a bound no rise fits moves nothing."""
    config = {"hidden_size": 256, "intermediate_size": 512, "num_local_experts": 8}
    rises = {(0, 8): {8: -0.00003, 4: -0.00126}, (1, 8): {8: -0.00033, 4: -0.00033},
             (2, 8): {8: -0.00040, 4: +0.00524}, (3, 8): {8: +0.00004, 4: +0.00881}}
    free = {(layer, b): 1 for layer in range(4) for b in (8, 4)}
    bound = float(np.log1p(compress.DOMAIN_RISE))
    assert compress.allocate(rises, config, free, bound) == {(0, 8): 4, (1, 8): 4, (2, 8): 4,
                                                             (3, 8): 8}
    assert compress.allocate(rises, config, free, 0.003) == {(0, 8): 4, (1, 8): 4, (2, 8): 8,
                                                             (3, 8): 8}
    assert compress.allocate(rises, config, free, 1.0) == dict.fromkeys(rises, 4)
    assert compress.allocate(rises, config, {(0, 4): 1}, 1.0) == {(0, 8): 4}
    assert compress.allocate(rises, config, free, float("-inf")) == {}
