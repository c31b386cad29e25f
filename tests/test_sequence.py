"""`moegrow bench sequence` (tools/sequence.py): several domains learned one after another
by every method on the tiny model and bundle; the forgetting matrix and its summary; bad
input."""

from __future__ import annotations

import json
import random

import pytest
from conftest import german, snapshot, synthetic_text
from conftest import run_cli as run
from moegrow.tools import sequence

ES = ["el teclado", "un modelo pequeño", "cada archivo", "nuestro lector", "la última línea"]
ES_VERBS = ["lee", "escribe", "aprende", "guarda"]


def spanish(entries: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n\n".join(" ".join(f"{rng.choice(ES).capitalize()} {rng.choice(ES_VERBS)} "
                                f"{rng.choice(ES)}." for _ in range(3)) for _ in range(entries))


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("seq")
    for name, text in {"de-train": german(300, 1), "de-held": german(40, 2),
                       "es-train": spanish(300, 3), "es-held": spanish(40, 4),
                       "old": synthetic_text(40, seed=5)}.items():
        (d / f"{name}.txt").write_text(text)
    return d


def argv(texts, out, **change) -> list[str]:
    args = {"--domain": [f"de={texts / 'de-train.txt'},{texts / 'de-held.txt'}",
                         f"es={texts / 'es-train.txt'},{texts / 'es-held.txt'}"],
            "--old": str(texts / "old.txt"), "--tokens": "1500", "--passes": "2",
            "--out": str(out), **change}
    flat = []
    for key, values in args.items():
        for v in values if isinstance(values, list) else [values]:
            flat += [key, v]
    return flat


def test_bench_sequence_end_to_end(capsys, tiny_ckpt, tiny_bundle, texts, tmp_path):
    before = snapshot(tiny_bundle)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "bench", "sequence", "--base", str(tiny_ckpt),
                            "--bundle", str(tiny_bundle), "--json", *argv(texts, out))
    assert code == 0, err
    r = json.loads(stdout)
    assert r["domains"] == ["de", "es"] and set(r["methods"]) == {"pc", "lora", "lora-tag",
                                                                  "full"}
    for name, m in r["methods"].items():
        assert "error" not in m, (name, m)
        st = m["stages"]
        assert [s["after"] for s in st] == [None, "de", "es"]
        assert set(st[0]["ppl"]) == {"de", "es"} and set(st[1]["ppl"]) == {"de"}
        assert set(st[2]["ppl"]) == {"de", "es"}
        forget = st[2]["ppl"]["de"] / st[1]["ppl"]["de"] - 1
        assert m["max_forget_earlier"] == pytest.approx(forget)
        assert m["max_forget_base"] == pytest.approx(max(s["base"] / st[0]["base"] - 1
                                                         for s in st[1:]))
        assert m["gain"]["es"] == pytest.approx(1 - st[2]["ppl"]["es"] / st[0]["ppl"]["es"])
        assert m["wall_s"] > 0 and m["peak_rss_mb"] > 0
        assert m["torch_loaded"] == (name != "pc")  # pc: the device runtime alone
    lora, tag, pc = (r["methods"][m] for m in ("lora", "lora-tag", "pc"))
    assert lora["gain"]["de"] > 0 and lora["gain"]["es"] > 0
    assert lora["min_gain_vs_lora"] == pytest.approx(1.0)
    # one adapter per domain, switched by its tag: nothing else changes
    assert tag["max_forget_earlier"] == 0 and tag["max_forget_base"] == 0
    assert tag["min_gain_vs_lora"] == pytest.approx(min(
        tag["gain"][n] / lora["gain"][n] for n in ("de", "es")))
    # growth: each new language spawns its own gated clones, the guard holds the base
    assert [s["committed"] for s in pc["stages"][1:]] == [True, True], pc["stages"]
    assert [s["version"] for s in pc["stages"][1:]] == [2, 3]
    assert all(p.startswith("spawn") for s in pc["stages"][1:] for p in s["plan"])
    assert all(max(s["reach"]["domain"]) > 0.05 for s in pc["stages"][1:])
    assert pc["gain"]["de"] > 0.02 and pc["gain"]["es"] > 0.02
    assert pc["max_forget_base"] < 0.05
    assert snapshot(tiny_bundle) == before  # pc grew a copy
    assert {p.name for p in out.iterdir()} == {"results.json", "report.md", "matrix.png"}
    assert json.loads((out / "results.json").read_text()) == r
    assert "max forget earlier" in (out / "report.md").read_text()


@pytest.mark.parametrize("change,words", [
    ({"--domain": ["de"]}, "expected NAME=TRAIN_FILE,HELDOUT_FILE"),
    ({"--domain": ["de=a.txt"]}, "expected NAME=TRAIN_FILE,HELDOUT_FILE"),
    ({"--methods": "lora,sgd"}, "unknown method 'sgd'"),
    ({"--methods": "pc"}, "pc runs on a bundle: give --bundle"),
    ({"--tokens": "100000"}, "fewer than --tokens 100000"),
    ({"--old": "missing.txt"}, "missing.txt"),
])
def test_bad_input_exits_2_with_one_line(capsys, tiny_ckpt, texts, tmp_path, change, words):
    if change.get("--old"):
        change["--old"] = str(tmp_path / change["--old"])
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "bench", "sequence", "--base", str(tiny_ckpt),
                            "--methods", "lora", *argv(texts, out, **change))
    assert code == 2 and stdout == "" and err.count("\n") == 1 and words in err, err
    assert not out.exists()


def test_same_domain_twice_is_refused(tmp_path):
    spec = ("a", tmp_path / "t.txt", tmp_path / "h.txt")
    with pytest.raises(sequence.AdaptError, match="must differ"):
        sequence.bench_sequence("default", [spec, spec], tmp_path / "o.txt", tmp_path / "out",
                                ["lora"], 10)
