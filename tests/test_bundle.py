"""Bundles: export, verification on load, and the same answers from torch, ExecuTorch and
ONNX Runtime through the runtime's embedding API and the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import exported, snapshot
from conftest import run_cli as run
from moegrow import runtime
from moegrow.export import checkpoint, evaluate, generate, programs
from moegrow.runtime import bundle as bundle_format

pytestmark = pytest.mark.slow  # uses the suite's exports (conftest.exports)
ENGINES = ["executorch", "onnxruntime"]
TEXT = "The parser reads the next word. Our user writes plain text. " * 12  # > one window


def test_manifest_names_every_file_with_its_checksum(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["config"]["model_type"] == "mixtral"
    assert set(manifest["programs"]) == {"prefill", "decode", "score", "observe",
                                         "prefill_gated", "decode_gated", "score_gated",
                                         "observe_gated",
                                         "sweep", "sweep_spare", "adam"}
    assert manifest["deepening"] == {"strict_steps": 0, "strict_eta": 0.1}
    weights = manifest["weights"]["files"]
    assert manifest["weights"]["version"] == 1 and set(weights) == set(ENGINES)
    entries = [manifest["tokenizer"], *weights.values()]
    entries += [e for p in manifest["programs"].values() for e in p.values()]
    for entry in entries:
        path = tiny_bundle / entry["file"]
        assert path.stat().st_size == entry["bytes"]
        assert bundle_format.sha256(path) == entry["sha256"]
    # the weights live in the weight files, not in the programs: no initializer of 1 kB or
    # more inside an .onnx graph, and the .pte much smaller than its weight file
    import onnx

    for name, entry in manifest["programs"].items():
        if "onnxruntime" in entry:
            graph = onnx.load(str(tiny_bundle / entry["onnxruntime"]["file"]),
                              load_external_data=False).graph
            inline = [t.name for t in graph.initializer
                      if t.data_location != onnx.TensorProto.EXTERNAL and t.ByteSize() >= 1100]
            assert not inline, (name, inline)
    pte = manifest["programs"]["score"]["executorch"]["bytes"]
    assert pte < 0.5 * weights["executorch"]["bytes"]


@pytest.mark.parametrize("engine", ENGINES)
def test_programs_read_the_cache_and_return_only_their_rows(tiny_bundle, engine):
    """prefill and decode return the keys and values of their positions, which the runtime
    writes into its cache in place; what the cache holds past them does not matter; the
    ExecuTorch programs take the cache where it lies (not memory-planned: no copy in)."""
    rt = runtime.open(tiny_bundle, engine)
    assert rt.bundle.manifest["cache"] == "rows"
    ids = [1, *rt.sp.encode("The parser reads the next word")]
    logits, k, v, novelty = rt.prefill(ids)
    assert k.shape == rt.cache_shape and np.abs(k[:, :, :, :len(ids)]).max() > 0
    assert not k[:, :, :, len(ids):].any() and not v[:, :, :, len(ids):].any()
    fresh = rt.prefill(ids + [int(logits[0].argmax())])
    k[:, :, :, len(ids):], v[:, :, :, len(ids):] = 9.0, -9.0  # past the context: masked
    step, k2, v2 = rt.decode(int(logits[0].argmax()), len(ids), k, v, novelty)
    assert k2 is k and v2 is v  # written in place
    assert np.abs(step - fresh[0]).max() < 1e-3
    n = len(ids) + 1
    assert np.abs(k[:, :, :, :n] - fresh[1][:, :, :, :n]).max() < 1e-4
    assert (k[:, :, :, n:] == 9.0).all()  # nothing past the step written
    if engine == "executorch":
        for name in ("prefill", "decode"):
            meta = rt.engine._method(name).metadata
            assert not any(meta.input_tensor_meta(i).is_memory_planned() for i in (2, 3))
        assert list(meta.output_tensor_meta(1).sizes()) == [*k.shape[:3], 1, k.shape[4]]


@pytest.mark.parametrize("engine", ENGINES)
def test_score_matches_torch(tiny_bundle, tiny_ckpt, engine):
    model = checkpoint.load(tiny_ckpt)
    want = evaluate.evaluate(model, checkpoint.load_tokenizer(tiny_ckpt), TEXT)
    got = runtime.open(tiny_bundle, engine).score(TEXT)
    assert got["tokens"] == want["tokens"] > 128  # scored in windows
    assert abs(got["nll"] - want["nll"]) <= 1e-4
    assert abs(got["top1"] - want["top1"]) <= 2 / want["tokens"]  # a near-tie may flip
    assert abs(got["top3"] - want["top3"]) <= 2 / want["tokens"]


@pytest.mark.parametrize("engine", ENGINES)
def test_observe_taps_match_torch(tiny_bundle, tiny_ckpt, engine):
    rt = runtime.open(tiny_bundle, engine)
    tokens = np.array([[1, *rt.sp.encode(TEXT)][:100]])
    with torch.no_grad():
        want = programs.Observe(checkpoint.load(tiny_ckpt))(torch.from_numpy(tokens))
    got = rt.run("observe", tokens)
    for name, a, b in zip(programs.Observe.outputs, got, want, strict=True):
        if name in ("rank", "ids"):  # a near-tie may flip one
            assert (a != b.numpy()).mean() <= 0.01, name
        else:
            np.testing.assert_allclose(a, b.numpy(), atol=2e-4, rtol=1e-3, err_msg=name)


def test_generation_and_suggestions_agree_across_backends(tiny_bundle, tiny_ckpt):
    model = checkpoint.load(tiny_ckpt)
    tok = checkpoint.load_tokenizer(tiny_ckpt)
    want = "".join(generate.generate(model, tok, "The router", max_new=16))
    words = [w for w, _ in generate.suggest(model, tok, "Our user writes", k=3)]
    for engine in ENGINES:
        rt = runtime.open(tiny_bundle, engine)
        assert "".join(rt.generate("The router", max_new=16)) == want, engine
        assert [w for w, _ in rt.suggest("Our user writes", k=3)] == words, engine



@pytest.mark.parametrize("engine", ENGINES)
def test_typing_reuses_the_context_and_suggests_the_same(tiny_bundle, engine):
    """`suggestions` a character at a time (a keyboard; with a deletion and a new text)
    equals a fresh runtime's for the same text, while only the context's pieces from the
    first that changed run (`Runtime.extend`: a prefill, or one decode step)."""
    rt = runtime.open(tiny_bundle, engine)
    ran, run, length = [], rt.engine.run, [0]

    def counting(name, arrays):  # the context's pieces run: prefills, and a decode step
        # at the context's last position (one new piece); the words' steps come after it
        if name == "prefill" or (name == "decode" and arrays[1][0] == length[0] - 1):
            ran.append(arrays[0].shape[1])
        return run(name, arrays)
    rt.engine.run = counting
    text = "The router sends each token to its experts"
    typed = [text[:n] for n in range(12, len(text) + 1)] + [text[:-4], "A new note"]
    for prefix in typed:
        length[0] = len(rt._ids(prefix, 6))
        fresh = runtime.open(tiny_bundle, engine).suggestions(prefix, k=3)
        got = rt.suggestions(prefix, k=3)
        assert [w["word"] for w in got] == [w["word"] for w in fresh], prefix
        np.testing.assert_allclose([w["p"] for w in got], [w["p"] for w in fresh], rtol=1e-4,
                                   atol=1e-6)
    full = [len(rt._ids(p, 6)) for p in typed]
    assert ran[0] == full[0] and ran[-1] == full[-1] - 1  # the first and a new text: all
    # but the BOS they share
    assert sum(ran) < sum(full) / 3, (ran, full)


def test_cli_eval_and_generate_on_a_bundle(capsys, tiny_bundle, tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    results = []
    for engine in ENGINES:
        code, out, err = run(capsys, "eval", str(tiny_bundle), "--text", str(tmp_path / "t.txt"),
                             "--backend", engine, "--json")
        assert code == 0, err
        results.append(json.loads(out))
    assert results[0]["tokens"] == results[1]["tokens"]
    assert abs(results[0]["nll"] - results[1]["nll"]) <= 1e-4
    code, out, err = run(capsys, "generate", str(tiny_bundle), "--prompt", "x " * 200)
    assert code == 2 and "exceeds the context of 128" in err and out == ""
    code, _, err = run(capsys, "eval", str(tiny_bundle), "--text", str(tmp_path / "t.txt"),
                       "--backend", "torch")
    assert code == 2 and "torch runs checkpoint folders" in err


def test_engines_load_quietly(tiny_bundle, tmp_path):
    """A fresh process: ExecuTorch's native start-up lines and torchao's import warnings stay
    off the terminal; stdout is the JSON alone."""
    (tmp_path / "t.txt").write_text(TEXT)
    for engine in ENGINES:
        done = subprocess.run([sys.executable, "-m", "moegrow.tools.cli", "eval",
                               str(tiny_bundle), "--text", str(tmp_path / "t.txt"), "--backend",
                               engine, "--json"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and done.stderr == "", (engine, done.stderr)
        assert json.loads(done.stdout)["tokens"] > 128


def corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:100])


def version_3(path):
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "format_version": 3}))


@pytest.mark.parametrize("file,damage,words", [
    ("programs/model.pte", corrupt, "model.pte: checksum mismatch"),
    ("programs/score.onnx", truncate, "score.onnx: 100 bytes, the manifest says"),
    ("programs/prefill.onnx", lambda p: p.unlink(), "prefill.onnx: missing from the bundle"),
    ("weights/v1.ptd", corrupt, "v1.ptd: checksum mismatch"),
    ("weights/v1.onnx.data", truncate, "v1.onnx.data: 100 bytes, the manifest says"),
    ("manifest.json", version_3, "unknown format version 3"),
    ("manifest.json", lambda p: p.write_text("{"), "manifest.json: unreadable"),
    ("tokenizer.model", corrupt, "tokenizer.model: checksum mismatch"),
])
def test_damaged_bundles_fail_on_load_and_stay_as_they_are(capsys, tiny_bundle, tmp_path, file,
                                                           damage, words):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    damage(copy / file)
    before = snapshot(copy)
    with pytest.raises(bundle_format.BundleError, match=words.split(":")[0]):
        runtime.open(copy, "onnxruntime")
    (tmp_path / "t.txt").write_text("hello")
    code, out, err = run(capsys, "eval", str(copy), "--text", str(tmp_path / "t.txt"))
    assert code == 2 and out == "" and words in err and err.count("\n") == 1
    assert snapshot(copy) == before


def test_export_refuses_bad_requests_and_writes_nothing(capsys, tiny_ckpt, tiny_bundle, tmp_path):
    before = snapshot(tiny_bundle)
    code, _, err = run(capsys, "export", str(tiny_ckpt), "--out", str(tiny_bundle))
    assert code == 2 and "already exists" in err and snapshot(tiny_bundle) == before
    code, _, err = run(capsys, "export", str(tiny_ckpt), "--out", str(tmp_path / "n"),
                       "--engines", "tflite")
    assert code == 2 and "unknown engine(s) tflite" in err
    code, _, err = run(capsys, "export", str(tiny_ckpt), "--out", str(tmp_path / "n"),
                       "--no-deepen", "--strict-steps", "2")
    assert code == 2 and "need the deepening programs" in err
    code, _, err = run(capsys, "export", str(tiny_ckpt), "--out", str(tmp_path / "n"),
                       "--bits", "4", "--deepen", "--spare", "0")
    assert code == 2 and "give --spare > 0 with --deepen" in err
    assert list(tmp_path.iterdir()) == []


def test_a_bundle_without_an_engine_says_so(exports):
    # a quantized bundle carries no deepening programs nor spare slots unless asked (--deepen)
    manifest = json.loads((exported(exports["mixtral", 8]) / "manifest.json").read_text())
    assert sorted(manifest["programs"]) == ["decode", "observe", "prefill", "score"]
    assert manifest["config"]["spare_experts"] == 0
    with pytest.raises(runtime.backends.BackendError, match="no programs for backend"):
        runtime.open(exported(exports["mixtral", "strict"]), "executorch")  # ONNX only


def test_bench_infer_reports_every_backend(capsys, exports, tiny_bundle, tiny_ckpt, tmp_path):
    code, out, err = run(capsys, "bench", "infer", str(tiny_bundle), "--ckpt", str(tiny_ckpt),
                         "--out", str(tmp_path / "r"), "--rounds", "1", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert [r["backend"] for r in result["results"]] == ["torch", "executorch", "onnxruntime"]
    assert result["results"][0]["decode_vs_torch"] == 1.0
    assert all(r["decode_tps"] > 0 and r["suggest_p95_ms"] > 0 and r["typing_p95_ms"] > 0
               for r in result["results"])
    # three words of 1 to 5 decode steps each, and at most one step for the context
    assert all(3 <= r["typing_decode_steps"] <= 16 for r in result["results"])
    assert [r["mb_per_token"] for r in result["results"]][1:] == [result["bytes_per_token"] / 1e6
                                                                  ] * 2  # fp32: both gather
    assert (tmp_path / "r" / "report.md").read_text().startswith("# moegrow bench infer")
    assert (tmp_path / "r" / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = run(capsys, "bench", "infer", str(tiny_bundle), "--out", str(tmp_path / "x"))
    assert code == 2 and "not the checkpoint the bundle was made from" in err
    # a bundle with one engine's programs: that engine beside torch
    code, out, err = run(capsys, "bench", "infer", str(exported(exports["mixtral", "strict"])),
                         "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "o"), "--rounds",
                         "1", "--json")
    assert code == 0, err
    assert [r["backend"] for r in json.loads(out)["results"]] == ["torch", "onnxruntime"]


def test_bench_overhead_gate_against_the_model_without_slots(capsys, tiny_bundle, exports,
                                                             tmp_path):
    """`bench overhead --gate`: `score` with the spare slots empty runs the one-pass
    program, and with a clone whose gate stays shut too (`Runtime.form`), the gated one
    where it opens; the first three score alike. Bad peers exit 2."""
    peer = tmp_path / "no-slots"  # the same checkpoint, ONNX Runtime only, --spare 0
    shutil.copytree(exported(exports["mixtral", "strict"]), peer)
    before = snapshot(tmp_path)
    code, out, err = run(capsys, "bench", "overhead", str(tiny_bundle), "--gate", "--against",
                         str(peer), "--rounds", "1", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert set(r) >= {"onnxruntime", "with_clone"} and "executorch" not in r  # peer: ORT only
    assert r["onnxruntime"] > 0 and r["with_clone"]["onnxruntime"] > 0
    assert r["programs"] == {"onnxruntime/none": "score", "onnxruntime/empty": "score",
                             "onnxruntime/clone": "score", "onnxruntime/open": "score_gated"}
    assert set(r["suggest"]["onnxruntime"]) == {"empty", "clone", "open"}
    assert r["with_open_clone"]["onnxruntime"] > 0
    assert r["max_nll_difference"] < 1e-4
    assert snapshot(tmp_path) == before  # no --out: nothing written
    for argv, says in (([str(peer)], "no spare slots"),
                       ([str(tiny_bundle), "--against", str(tiny_bundle)], "without spare")):
        code, _, err = run(capsys, "bench", "overhead", *argv, "--gate")
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_int4_bundle_stays_within_6_percent_of_fp32(tiny_bundle, exports):
    q4 = exported(exports["mixtral", 4])
    manifest = json.loads((q4 / "manifest.json").read_text())
    assert manifest["bits"] == 4 and manifest["decode_moe"] == "dense"
    for engine in ENGINES:
        fp32, rt = runtime.open(tiny_bundle, engine), runtime.open(q4, engine)
        assert rt.score(TEXT)["ppl"] <= 1.06 * fp32.score(TEXT)["ppl"], engine
        assert "".join(rt.generate("The router", max_new=8))  # generates through the cache


def test_an_exporter_failure_is_one_line_and_leaves_nothing(capsys, tiny_ckpt, tmp_path,
                                                            monkeypatch):
    """An engine's exporter raising deep inside (as ExecuTorch's did on quantized observe)
    reaches the user as one line and exit code 2; the bundle folder is not created."""
    from moegrow.export import quantize

    def broken(*_args, **_kwargs):
        raise RuntimeError("Unable to cast NotImplemented to Tensor\n(and 60 more lines)")

    monkeypatch.setattr(quantize, "to_pte", broken)
    code, out, err = run(capsys, "export", str(tiny_ckpt), "--out", str(tmp_path / "b"),
                         "--bits", "8", "--engines", "executorch")
    errors = [line for line in err.splitlines() if line.startswith("moegrow: error")]
    assert code == 2 and out == "" and len(errors) == 1 and "Traceback" not in err, err
    assert "lowering to executorch at 8 bits failed (RuntimeError: Unable to cast" in errors[0]
    assert err.splitlines()[-1] == errors[0]  # the progress lines before it, nothing after
    assert list(tmp_path.iterdir()) == []
