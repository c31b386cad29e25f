"""Compression into the quantized pool (runtime/compress.py): the pool's format against its
numpy reference, a clone moved on both engines, the budget's exact bytes, reclaim before a
spawn, bad input."""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from conftest import exported, german, run_cli, snapshot
from moegrow import runtime
from moegrow.device_kernels import layout
from moegrow.export import moe
from moegrow.runtime import bundle as bundle_format
from moegrow.runtime import compress, errormap, experts, versions

ENGINES = ("executorch", "onnxruntime")


@pytest.mark.parametrize("bits", [4, 8])
def test_the_pool_format_round_trips_and_writes_one_expert_only(bits):
    """`layout.packed` is within scale/2 of the weight; `quantize_into` writes one expert's
    groups of a [C, P*F] down projection (and [P*F, C] gate) and no other byte; the
    programs' torch dequantization (`moe.dequant`) equals the numpy one exactly."""
    rng = np.random.default_rng(0)
    slots, hidden, width = 3, 64, 32
    dims = (5, hidden, width)  # two base slots, then the pool's three
    for proj in layout.PROJS:
        out, in_ = layout.shape(proj, hidden, width)
        stacked = rng.normal(size=(slots, out, in_)).astype(np.float32)
        w = stacked.transpose(1, 0, 2).reshape(out, -1) if proj == "down_proj" else \
            stacked.reshape(-1, in_)
        codes, scales = layout.packed(w, bits, 32)
        buf = np.concatenate([codes.reshape(-1), scales.view(np.uint8)])
        entry = {"layer": 0, "proj": proj, "form": f"q{bits}", "offset": 0,
                 "scales": codes.size, "group": 32, "first": 2, "count": slots}
        back = layout.dequantized(buf, entry, 3, dims)
        step = np.abs(stacked[1]).max() / ((1 << (bits - 1)) - 1)
        assert np.abs(back - stacked[1]).max() <= step / 2 * 1.0001
        torch_w = moe.dequant(torch.from_numpy(codes), torch.from_numpy(scales), bits, *w.shape)
        want = np.stack([layout.dequantized(buf, entry, s, dims) for s in (2, 3, 4)])
        got = torch_w.numpy()
        got = got.reshape(out, slots, in_).transpose(1, 0, 2) if proj == "down_proj" else \
            got.reshape(slots, out, in_)
        np.testing.assert_array_equal(got, want)
        new = rng.normal(size=(out, in_)).astype(np.float32) * 3
        before = buf.copy()
        served = layout.quantize_into(buf, entry, 3, dims, new)
        np.testing.assert_array_equal(served, layout.dequantized(buf, entry, 3, dims))
        assert np.abs(served - new).max() <= np.abs(new).max() / ((1 << (bits - 1)) - 1)
        for s in (2, 4):
            np.testing.assert_array_equal(layout.dequantized(buf, entry, s, dims),
                                          layout.dequantized(before, entry, s, dims))
        assert (buf != before).sum() <= layout.expert_bytes(
            {"num_experts": 1, "intermediate_size": hidden, "hidden_size": width}, bits) / 3 + 1


@pytest.fixture(scope="module")
def grown(exports, tmp_path_factory):
    """The pool bundle after a German slice spawned clones into its one spare slot per
    layer: (bundle path, the slice's report)."""
    path = tmp_path_factory.mktemp("pool") / "b"
    shutil.copytree(exported(exports["mixtral", "pool"]), path)
    rt = runtime.open(path, "onnxruntime")
    rt.observe(german(400), "de")
    r = rt.idle(600, tokens=4096, steps=8)
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
    assert compress.compress(rt)["reason"].startswith("nothing to compress")
    versions.rollback(bundle_format.load(path), 2)
    for engine in ENGINES:
        np.testing.assert_array_equal(runtime.open(path, engine).run("observe", text[None])[0],
                                      before[engine][0])


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
