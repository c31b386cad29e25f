"""The llama.cpp peer of `bench infer`: bundle bits <-> GGUF types, the ratios, the report, and
the path without the `bench` extra (what CI runs). The run on llama.cpp itself is `bench`."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from moegrow.export import checkpoint
from moegrow.tools import bench, llama

# decode tok/s per llama.cpp quant and per engine, made up for the arithmetic
PEER = {"F16": (1000.0, 400.0), "Q8_0": (1200.0, 500.0), "Q4_0": (1500.0, 800.0)}
OURS = {"torch": 300.0, "executorch": 600.0, "onnxruntime": 1000.0}


def result(llama_cpp: list) -> dict:
    row = {"backend": "executorch", "bits": 4, "prefill_tps": 1.0, "decode_tps": 600.0,
           "decode_vs_torch": 2.0, "gb_per_s": 1.0, "roofline_fraction": 0.1,
           "suggest_p50_ms": 1.0, "suggest_p95_ms": 2.0, "mb_per_token": 1.0,
           "typing_p50_ms": 0.5, "typing_p95_ms": 1.0, "typing_decode_steps": 7.0}
    return {"results": [row], "llama_cpp": llama_cpp, "bytes_per_token": 1e6,
            "read_bandwidth_gb_s": 10.0, "roofline_decode_tps": 1e4, "threads": 1, "rounds": 1,
            "prompt_tokens": 64, "decode_steps": 32}


@pytest.mark.parametrize("bits,quant,et,ort", [
    (32, "F16", 600 / 400, 1000 / 400),
    (8, "Q8_0", 600 / 500, 1000 / 500),
    (4, "Q4_0", 600 / 800, 1000 / 800),
])
def test_only_the_quant_of_the_bundle_bits_gets_ratios(bits, quant, et, ort):
    rows = llama.compare(PEER, OURS, bits)
    assert [r["quant"] for r in rows] == ["F16", "Q8_0", "Q4_0"]
    for r in rows:
        assert (r["prefill_tps"], r["decode_tps"]) == PEER[r["quant"]]
        if r["quant"] == quant:
            assert r["ours_over_llama"] == pytest.approx(et)
            assert r["onnxruntime_over_llama"] == pytest.approx(ort)
        else:
            assert r["ours_over_llama"] is None and r["onnxruntime_over_llama"] is None


def test_without_the_extra_there_are_no_peers_and_the_report_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` fails
    assert llama.load() is None
    assert llama.peers("default", 256, 1) == {}  # nothing converted, nothing cached
    assert llama.compare({}, OURS, 4) == []
    text = bench.report(result([]), "b")
    assert text.rstrip().endswith("llama.cpp: not installed (pip install moegrow[bench])")


def test_the_report_shows_each_quant_and_the_matching_ratio():
    text = bench.report(result(llama.compare(PEER, OURS, 4)), "b")
    assert "| F16 | 1000 | 400 | - | - |" in text
    assert "| Q4_0 | 1500 | 800 | 0.75x | 1.25x |" in text
    assert "not installed" not in text


def test_checkpoint_sha_changes_with_any_file(tiny_ckpt, tmp_path):
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(tiny_ckpt, copy)
    before = llama.checkpoint_sha(copy)
    assert llama.checkpoint_sha(tiny_ckpt) == before
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert llama.checkpoint_sha(copy) != before


@pytest.mark.bench
@torch.no_grad()
def test_llama_cpp_runs_our_checkpoint_like_torch(tiny_ckpt):
    files = llama.convert(str(tiny_ckpt))
    sizes = {q: f.stat().st_size for q, f in files.items()}
    assert sizes["F16"] > sizes["Q8_0"] > sizes["Q4_0"]
    model = checkpoint.load(tiny_ckpt)
    ids = [1] + checkpoint.load_tokenizer(tiny_ckpt).encode("The parser reads the next word.")
    n = len(ids)
    peer = llama.Peer(files["F16"], context=64, threads=1)
    logits, _, _ = peer.prefill(ids)
    for pos in range(n, n + 8):  # greedy, on llama.cpp's own KV cache
        ids.append(int(logits[0].argmax()))
        logits, _, _ = peer.decode(ids[-1], pos, None, None, None)
    full = model(torch.tensor([ids]), torch.arange(len(ids)))[0].numpy()  # T V, no cache
    assert full[n - 1:-1].argmax(-1).tolist() == ids[n:]  # torch picks the same tokens
    assert np.abs(logits[0] - full[-1]).max() < 0.02 * np.abs(full[-1]).max()
