"""Verdicts on the error map (nothing / deepen / spawn) against the bundle's own baseline,
and the baseline itself, measured at export on held-out base text."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli as run
from conftest import snapshot, synthetic_text
from moegrow import runtime
from moegrow.export import checkpoint
from moegrow.runtime import learnable, session, verdicts

GERMAN = "Der Parser liest das nächste Wort. Unser Nutzer schreibt einfachen Text."


def _calibration(experts: int = 4) -> dict:
    """Two layers: base NLL 2, shuffled 10 (novelty = (nll - 2) / 8), chunk sd 0.2 (noise
    0.075); per layer update 1.0 per token at base, 3.0 shuffled; each expert's mean 0.5."""
    layer = {"update": 1.0, "update_shuffled": 3.0, "update_chunk_sd": 0.05,
             "experts": [{"count": 100, "mean": 0.5}] * experts}
    return {"tokens": 2048, "nll": 2.0, "nll_shuffled": 10.0, "nll_chunk_sd": 0.2,
            "layers": [layer, dict(layer)]}


def _state(domains: dict[str, tuple]) -> dict:
    """{domain: (tokens, mean nll, nll sd, per-(layer, expert) mean update [2, 4], NLL per
    token the probe saved at its best cache weight)}, every token choosing 2 experts, spread
    evenly; the probe's per-token savings have sd 1, the other weights save less."""
    stats, out = [], {}
    for name, (tokens, nll, sd, means, saved) in domains.items():
        sums = [tokens * (saved - 0.01 * i) for i in range(len(learnable.LAMBDAS))][::-1]
        out[name] = {"tokens": tokens, "nll": nll, "nll_sd": sd, "probe": {
            "tokens": tokens, "saved": sums, "saved_sq": [x * x / tokens + tokens for x in sums]}}
        count = tokens * 2 // means.shape[1]
        for (layer, expert), m in np.ndenumerate(means):
            stats.append((layer, expert, name, count, count * m, count * m * m, m, 0.0))
    return {"domains": out, "stats": stats, "replay_tokens": 0}


def test_judge_decides_from_what_can_be_won_and_the_anchors_and_names_what_to_grow():
    base = np.full((2, 4), 0.5)
    hot = base.copy()
    hot[0, 2] = 2.0  # layer 0: expert 2 carries most of the excess (mean 0.5 -> 2.0)
    hot[0, 1] = 0.8
    got = verdicts.judge(_state({
        "known": (4000, 5.0, 1.5, hot, 0.02),  # far from base, but 2% to win: nothing
        "near": (4000, 2.1, 1.5, base, 0.3),  # novelty 0.0125, 26% to win: deepen
        "register": (4000, 5.0, 1.5, hot, 0.3),  # novelty 0.375
        "language": (4000, 8.0, 1.5, np.full((2, 4), 1.5), 1.0),  # 0.75, updates at shuffled
        "little": (3, 8.0, 6.0, base, 0.5),  # +- 0.58 nats saved on 3 tokens: not evidence
    }), _calibration(), k=2)
    assert got["known"]["verdict"] == "nothing" and got["known"]["experts"] == []
    assert got["known"]["learnable"] == pytest.approx(1 - np.exp(-0.02))
    assert got["known"]["learnable_low"] == pytest.approx(1 - np.exp(-0.02 + 2 / np.sqrt(4000)))
    assert got["little"]["verdict"] == "nothing"
    assert got["register"]["verdict"] == "deepen"
    assert got["register"]["novelty"] == pytest.approx(0.375)
    assert got["register"]["novelty_se"] == pytest.approx(1.5 / np.sqrt(4000) / 8)
    # excess in layer 0: expert 2 has 1.5 of the 1.8 per choice: it alone covers half
    assert got["register"]["experts"] == [[0, 2]]
    # in place: every layer's k busiest by excess (layer 1 has none: by update mass)
    assert got["register"]["experts_in_place"] == [[0, 2], [0, 1], [1, 0], [1, 1]]
    assert got["known"]["experts_in_place"] == []
    assert got["register"]["layers"]["0"]["named"] and not got["register"]["layers"]["1"]["named"]
    # no layer beyond its spread and no expert above its base mean: the busiest experts of
    # the layer with the highest update novelty (all even here: 2 of 4 carry half)
    assert got["near"]["verdict"] == "deepen" and len(got["near"]["experts"]) == 2
    assert got["language"]["verdict"] == "spawn" and got["language"]["experts"] == []
    assert [x["named"] for x in got["language"]["layers"].values()] == [True, True]
    # layer novelty: (summed update per token - base) / (shuffled - base); 2 choices x 1.5
    assert got["language"]["layers"]["0"]["novelty"] == pytest.approx(1.0)
    # idle's default: the most NLL to win over the observed tokens, not the most tokens
    assert verdicts.most_wanted(got) == "language"  # 4000 x ~1 nat saved
    assert verdicts.most_wanted({d: got[d] for d in ("known", "little")}) is None
    two = {"near": (40000, 2.1, 1.5, base, 0.08), "register": (4000, 5.0, 1.5, hot, 0.3)}
    got = verdicts.judge(_state(two), _calibration(), 2)  # to win (low end, nats in all):
    assert verdicts.most_wanted(got) == "near"  # 40000 x 0.07 = 2,800 against 4000 x 0.27
    got = verdicts.judge(_state(two | {"near": (10000, 2.1, 1.5, base, 0.08)}), _calibration(), 2)
    assert verdicts.most_wanted(got) == "register"  # 10000 x 0.06 = 600 against 1,070


def test_judge_names_at_most_k_experts_per_layer_and_needs_a_usable_baseline():
    spread = np.array([[1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]])  # even excess, layer 0
    got = verdicts.judge(_state({"d": (4000, 5.0, 1.5, spread, 0.3)}), _calibration(), k=2)
    assert got["d"]["verdict"] == "deepen"
    assert got["d"]["experts"] == [[0, 0], [0, 1]]  # half of an even excess: 2 of 4
    flat = _calibration() | {"nll_shuffled": 2.0}  # a model that does not use its context
    assert verdicts.judge(_state({"d": (4000, 5.0, 1.5, spread, 0.3)}), flat, k=2) == {}


@pytest.mark.slow
def test_the_baseline_is_the_base_text_scored_by_the_engines(tiny_bundle, corpus_dir):
    cal = json.loads((tiny_bundle / "manifest.json").read_text())["calibration"]
    text = (corpus_dir / "heldout.txt").read_text()
    k = 2
    for backend in ("executorch", "onnxruntime"):
        got = runtime.open(tiny_bundle, backend).score(text)
        assert got["tokens"] == cal["tokens"]
        assert got["nll"] == pytest.approx(cal["nll"], abs=1e-4)
    assert cal["nll_shuffled"] > cal["nll"] + 1  # the trained tiny model uses its context
    for layer in cal["layers"]:
        assert sum(e["count"] for e in layer["experts"]) == k * cal["tokens"]
        assert layer["update_shuffled"] > layer["update"] > 0
        assert layer["update_chunk_sd"] > 0


@pytest.mark.slow
def test_verdicts_on_observed_text(capsys, tiny_bundle, tmp_path):
    path = tmp_path / "b"
    shutil.copytree(tiny_bundle, path)
    entries = synthetic_text(80, seed=7).split("\n\n")
    rnd = random.Random(0)
    mixed = "\n\n".join(e if rnd.random() > 0.2 else GERMAN for e in entries)
    texts = {"same": "\n\n".join(entries), "mixed": mixed, "german": (GERMAN + " ") * 30}
    for name, text in texts.items():
        (tmp_path / f"{name}.txt").write_text(text)
        assert run(capsys, "observe", str(path), "--text", str(tmp_path / f"{name}.txt"),
                   "--domain", name)[0] == 0
    code, out, _ = run(capsys, "errormap", str(path), "--json")
    assert code == 0
    got = json.loads(out)["verdicts"]
    # the 40-step model has much left to learn of its own grammar (the probe test below
    # has the text that offers nothing: the model's own samples)
    assert {d: v["verdict"] for d, v in got.items()} == {
        "same": "deepen", "mixed": "deepen", "german": "spawn"}
    assert got["german"]["learnable_low"] > got["mixed"]["learnable_low"] > verdicts.MIN_GAIN
    named = got["mixed"]["experts"]
    assert named and all(sum(1 for x in named if x[0] == layer) <= 2 for layer, _ in named)
    assert any(v["named"] for v in got["german"]["layers"].values())
    code, out, _ = run(capsys, "errormap", str(path))
    assert "german: spawn" in out and "mixed: deepen" in out


@pytest.mark.slow
def test_no_baseline_no_verdicts_and_a_short_calibration_is_refused(capsys, tiny_bundle,
                                                                     tiny_ckpt, tmp_path):
    path = tmp_path / "b"
    shutil.copytree(tiny_bundle, path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["calibration"] = None
    (path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "t.txt").write_text(synthetic_text(20, seed=3))
    assert run(capsys, "observe", str(path), "--text", str(tmp_path / "t.txt"))[0] == 0
    code, out, _ = run(capsys, "errormap", str(path))
    assert code == 0 and "no verdicts" in out
    (tmp_path / "short.txt").write_text("The parser reads the next word.")
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "export", str(tiny_ckpt), "--out", str(tmp_path / "x"),
                       "--calibration", str(tmp_path / "short.txt"))
    assert code == 2 and "calibration text is" in err and len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


def _nll(model, ids: np.ndarray) -> np.ndarray:
    """The model's NLL of ids[1:] in the runtime's windows (eager torch)."""
    out = []
    with torch.no_grad():
        for chunk, new in session.windows(ids, model.args.max_position_embeddings):
            x = torch.from_numpy(chunk)
            out.append(F.cross_entropy(model(x[None])[0, :-1], x[1:], reduction="none")[new])
    return torch.cat(out).double().numpy()


def test_the_probe_finds_nothing_to_learn_in_the_models_own_text(tiny_ckpt):
    """Tokens the model samples itself (temperature 1) are the one text no cache predicts
    better in expectation (Gibbs' inequality): the probe must find nothing to win there,
    and much in the grammar that the 40-step model has only begun to learn."""
    model = checkpoint.load(tiny_ckpt).float().eval()
    g = torch.Generator().manual_seed(0)
    own = torch.ones(24, 1, dtype=torch.int64)  # 24 sequences of 40 sampled tokens
    with torch.no_grad():
        for _ in range(40):
            p = torch.softmax(model(own)[:, -1].double(), -1)
            own = torch.cat([own, torch.multinomial(p, 1, generator=g)], 1)
        nll = F.cross_entropy(model(own)[:, :-1].transpose(1, 2), own[:, 1:], reduction="none")
    saved = [learnable.saved(list(own[:i].numpy()), own[i].numpy(), nll[i].double().numpy())
             for i in range(len(own))]  # each sequence with the ones before it in the cache
    won = {"own": np.concatenate(saved)}
    grammar = np.array([1, *checkpoint.load_tokenizer(tiny_ckpt).encode(
        synthetic_text(40, seed=7))])
    won["grammar"] = learnable.saved([], grammar, _nll(model, grammar))
    assert won["grammar"].shape == (len(grammar) - 1, len(learnable.LAMBDAS))
    won = {k: learnable.gain(len(v), v.sum(0), (v * v).sum(0), 2.0) for k, v in won.items()}
    assert won["own"]["low"] < 0.01 < verdicts.MIN_GAIN
    assert won["grammar"]["low"] > 0.2
    # with the grammar's first half in the cache, its second half gains more still
    half = len(grammar) // 2
    later = learnable.saved([grammar[:half]], grammar[half - 1:], _nll(model, grammar[half - 1:]))
    assert later.mean(0).max() > won["grammar"]["low"]
