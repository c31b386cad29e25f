"""`moegrow bench adapt` (tools/adapt.py): the harness end to end on a tiny checkpoint, the
backprop baselines' learning, and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import random_moe, synthetic_text
from conftest import run_cli as run
from moegrow.export.models import mixtral
from moegrow.tools import adapt

ARGS = mixtral.ModelArgs(vocab_size=97, hidden_size=48, intermediate_size=40,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    for name, entries, seed in (("train", 40, 3), ("old", 20, 4), ("other", 20, 5)):
        (d / f"{name}.txt").write_text(synthetic_text(entries, seed=seed))
    return d


def _ids(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, ARGS.vocab_size, n).astype(np.int64)


def test_bench_adapt_end_to_end(capsys, tiny_ckpt, texts, tmp_path):
    # held-out = the training text itself: the baselines must overfit it a little
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys, "bench", "adapt", "--base", str(tiny_ckpt), "--train", str(texts / "train.txt"),
        "--heldout", str(texts / "train.txt"), "--old", str(texts / "old.txt"),
        "--other", str(texts / "other.txt"), "--methods", "full,lora,locus-bp",
        "--tokens", "300", "--passes", "1", "--out", str(out), "--json")
    assert code == 0, err
    r = json.loads(stdout)
    assert r["tokens"] == 300 and r["passes"] == 1 and set(r["methods"]) == {
        "full", "lora", "locus-bp"}
    for name, m in r["methods"].items():
        assert "error" not in m, (name, m)
        for key in ("gain", "forget_base", "forget_other", "wall_ratio_vs_lora", "wall_s",
                    "peak_rss_mb", "accounted_bytes", "flops"):
            assert math.isfinite(m[key]) and (key in ("gain", "forget_base", "forget_other")
                                              or m[key] > 0), (name, key, m[key])
        assert all(len(m["ppl"][k]) == 2 for k in ("heldout", "old", "other"))
        assert m["curve"][0] == [0, m["ppl"]["heldout"][0]]
        assert m["curve"][-1] == [299, m["ppl"]["heldout"][1]]  # 300 ids, 299 targets
    assert r["methods"]["full"]["gain"] > 0 and r["methods"]["lora"]["gain"] > 0
    assert r["methods"]["lora"]["wall_ratio_vs_lora"] == 1.0
    assert r["methods"]["locus-bp"]["accounted_bytes"] < r["methods"]["full"]["accounted_bytes"]
    assert {p.name for p in out.iterdir()} == {"results.json", "report.md", "curve.png",
                                               "forgetting.png"}
    assert json.loads((out / "results.json").read_text()) == r
    assert "moegrow bench adapt --base=" in (out / "report.md").read_text()


def test_locus_bp_changes_only_the_named_experts():
    model = random_moe(ARGS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    locus = {0: [1], 2: [0, 3]}
    r = adapt.train(model, "locus-bp", _ids(100), passes=2, locus=locus)
    assert r["locus"] == {"0": [1], "2": [0, 3]}
    assert r["trainable_params"] == 3 * 3 * ARGS.hidden_size * ARGS.intermediate_size
    for key, value in model.state_dict().items():
        layer = int(key.split(".")[2]) if ".experts." in key else None
        for e in range(value.shape[0]) if layer is not None else [None]:
            new, old = (value, before[key]) if e is None else (value[e], before[key][e])
            if e in locus.get(layer, []):
                assert not torch.equal(new, old), (key, e)
            else:
                assert torch.equal(new, old), (key, e)
    assert "run" not in vars(model.model.layers[0].mlp.experts)  # written back, unpatched


def test_lora_leaves_the_base_weights_and_full_changes_them():
    for method in ("lora", "full"):
        model = random_moe(ARGS)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        r = adapt.train(model, method, _ids(70), passes=1)
        # PEFT wraps what it adapts: the base weight is `...base_layer.weight` now
        after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
                 if "lora_" not in k}
        assert after.keys() == before.keys()
        changed = [k for k, v in after.items() if not torch.equal(v, before[k])]
        assert (changed == []) == (method == "lora"), (method, changed)
        if method == "lora":  # factors on q/k/v/o and on the stacked experts of every layer
            lora = [k for k in model.state_dict() if "lora_A" in k]
            assert len(lora) == ARGS.num_hidden_layers * 7, lora
        # AdamW state: two fp32 tensors per trainable parameter, plus params and grads
        assert r["accounted_bytes"] >= 4 * 4 * r["trainable_params"]


def test_default_locus_is_the_most_routed_experts():
    model = random_moe(ARGS)
    ids = _ids(100)
    counts = adapt.route_counts(model, ids)
    windows = adapt.train_windows(ids, ARGS.max_position_embeddings)
    assert (counts.sum(1) == ARGS.num_experts_per_tok * sum(len(w) - 1 for w in windows)).all()
    locus = adapt.default_locus(counts)
    for layer, ids_ in locus.items():
        assert len(ids_) == 2 and min(counts[layer][ids_]) >= max(np.delete(counts[layer], ids_))


def test_flops_order_full_lora_locus():
    # analytic: full 3F, lora about 2F, locus-bp in its top layer about F plus the head's grads
    full, lora = (adapt.flops_per_token(ARGS, m) for m in ("full", "lora"))
    share = np.full((3, 4), 0.5)
    top = adapt.flops_per_token(ARGS, "locus-bp", {2: [0]}, share)
    low = adapt.flops_per_token(ARGS, "locus-bp", {0: [0]}, share)
    assert full > lora > low > top > full / 3


def test_a_failing_method_is_reported_not_raised(tmp_path):
    (tmp_path / "job.json").write_text(json.dumps(
        {"method": "lora", "base": str(tmp_path / "nowhere"), "passes": 1, "seed": 0,
         "threads": 1, "locus": None}))
    np.save(tmp_path / "train.npy", _ids(10))
    assert adapt.child(tmp_path, adapt.adapt_one) == 1
    r = json.loads((tmp_path / "result.json").read_text())
    assert "not a checkpoint folder" in r["error"] and r["peak_rss_mb"] > 0


@pytest.mark.parametrize("change,words", [
    ({"--train": "missing.txt"}, "missing.txt"),
    ({"--old": "empty.txt"}, "empty text"),
    ({"--methods": "lora,sgd"}, "unknown method 'sgd'"),
    ({"--tokens": "1"}, "--tokens"),
    ({"--tokens": "100000"}, "fewer than --tokens 100000"),
    ({"--locus": "0:9"}, "0:9 is not an expert"),
    ({"--locus": "zero"}, "expected LAYER:E,E"),
    ({"--base": "nowhere"}, "not a checkpoint folder"),
    ({"--methods": "pc,lora"}, "pc run on a bundle: give --bundle"),
])
def test_bad_input_exits_2_with_one_line(capsys, tiny_ckpt, texts, tmp_path, change, words):
    (tmp_path / "empty.txt").write_text(" \n")
    argv = {"--base": str(tiny_ckpt), "--train": str(texts / "train.txt"),
            "--heldout": str(texts / "train.txt"), "--old": str(texts / "old.txt"),
            "--methods": "lora", "--tokens": "300", "--out": str(tmp_path / "out"), **change}
    for key in ("--train", "--old", "--base"):
        if key in change and change[key] != "nowhere":
            argv[key] = str(tmp_path / change[key])
    code, out, err = run(capsys, "bench", "adapt", *[x for kv in argv.items() for x in kv])
    assert code == 2 and out == "" and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "out").exists()


def test_derive_without_other_or_lora():
    r = {"ppl": {"heldout": [10.0, 8.0], "old": [5.0, 5.5], "other": None}, "wall_s": 2.0}
    d = adapt.derive(r, None)
    assert d["gain"] == pytest.approx(0.2) and d["forget_base"] == pytest.approx(0.1)
    assert d["forget_other"] is None and d["wall_ratio_vs_lora"] is None
    assert adapt.derive(r, 4.0)["wall_ratio_vs_lora"] == 0.5


def test_bench_strict_end_to_end_and_bad_input(capsys, tiny_ckpt, texts, tmp_path):
    """`moegrow bench strict` (tools/strict.py) on the tiny checkpoint: every schedule on
    every layer, the T histogram covering every run, a short training per schedule."""
    out, t = tmp_path / "out", texts
    domain = f"d={t / 'train.txt'},{t / 'other.txt'}"
    args = ("bench", "strict", "--base", str(tiny_ckpt), "--old", str(t / "old.txt"))
    code, stdout, err = run(capsys, *args, "--domain", domain, "--out", str(out), "--windows",
                            "1", "--window", "16", "--steps", "4", "--train-steps", "1",
                            "--relax-steps", "2", "--json")
    assert code == 0, err
    r = json.loads(stdout)
    d = r["domains"]["d"]
    layers = 2  # the tiny preset's
    for name in ("strict", "curvature", "precision", "error"):
        s = d["schedules"][name]
        assert s["runs"] == layers and sum(s["T_hist"].values()) == layers
        assert s["nonfinite"] == 0 and 0 < s["eta_min_median"] <= 1
        assert set(s["cos"]) == {"1", "2", "4"}
    assert d["schedules"]["error"]["cos"]["1"] > 0.999  # its first step: the gradient
    train = d["train"]
    assert train["exact"]["domain"] != train["before"]["domain"]
    assert {p.name for p in out.iterdir()} == {"results.json", "report.md"}
    for bad in (["--window", "100000"], ["--tol", "2"], ["--domain", "nameonly"],
                ["--domain", f"d={tmp_path / 'missing.txt'},{t / 'old.txt'}"]):
        opts = {"--domain": domain, "--window": "16", "--tol": "0.01"}
        opts.update(dict(zip(bad[::2], bad[1::2], strict=True)))
        code, _, err = run(capsys, *args, "--out", str(tmp_path / "bad"),
                           *[x for kv in opts.items() for x in kv])
        assert code == 2 and len(err.strip().splitlines()) == 1, (bad, err)
        assert not (tmp_path / "bad").exists()
