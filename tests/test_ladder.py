"""The compression ladder's formats (`device_kernels/layout.py` `q8`/`q4`/`q2`, the pool
linears of `export/moe.py`): the numpy reference against the programs' torch
dequantization, both engines serving a pool linear as the reference says, and the int2
rung end to end on an ONNX Runtime bundle."""

import shutil

import numpy as np
import pytest
import torch
from conftest import exported, german
from moegrow import runtime
from moegrow.device_kernels import layout
from moegrow.export import moe
from moegrow.export.codes import dequant
from moegrow.runtime import bundle as bundle_format
from moegrow.runtime import compress, errormap, experts, guard, versions


@pytest.mark.parametrize("bits", [4, 8, 2])
def test_the_pool_format_round_trips_and_writes_one_expert_only(bits):
    """`layout.packed` is within scale/2 of the weight (int2: on its four levels, and no
    worse than the max |w| scale); `quantize_into` writes one expert's groups of a [C, P*F]
    down projection (and [P*F, C] gate) and no other byte; the programs' torch
    dequantization (`codes.dequant`) equals the numpy one exactly."""
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
        if bits == 2:  # four levels per group, the least-squares scale of the grid
            g = stacked[1].reshape(-1, 32)
            scale = np.abs(layout.unpack(*layout.packed(g, 2, 32), 2)).max(-1)
            steps = back.reshape(-1, 32) / np.where(scale > 0, scale / 2, 1)[:, None]
            assert np.allclose(steps, np.rint(steps), atol=1e-4)  # on -2, -1, 0, 1 x scale
            naive = np.clip(np.rint(g / np.abs(g).max(-1, keepdims=True)), -2, 1) * \
                np.abs(g).max(-1, keepdims=True)
            assert ((back.reshape(-1, 32) - g) ** 2).sum() < ((naive - g) ** 2).sum()
        else:
            step = np.abs(stacked[1]).max() / ((1 << (bits - 1)) - 1)
            assert np.abs(back - stacked[1]).max() <= step / 2 * 1.0001
        torch_w = dequant(torch.from_numpy(codes), torch.from_numpy(scales), bits, *w.shape)
        want = np.stack([layout.dequantized(buf, entry, s, dims) for s in (2, 3, 4)])
        got = torch_w.numpy()
        got = got.reshape(out, slots, in_).transpose(1, 0, 2) if proj == "down_proj" else \
            got.reshape(slots, out, in_)
        np.testing.assert_array_equal(got, want)
        new = rng.normal(size=(out, in_)).astype(np.float32) * 3
        before = buf.copy()
        served = layout.quantize_into(buf, entry, 3, dims, new)
        np.testing.assert_array_equal(served, layout.dequantized(buf, entry, 3, dims))
        assert np.abs(served - new).max() <= np.abs(new).max() / ((1 << (bits - 1)) - 1) \
            or bits == 2 and np.abs(served - new).max() <= np.abs(new).max()
        for s in (2, 4):
            np.testing.assert_array_equal(layout.dequantized(buf, entry, s, dims),
                                          layout.dequantized(before, entry, s, dims))
        assert (buf != before).sum() <= layout.expert_bytes(
            {"num_experts": 1, "intermediate_size": hidden, "hidden_size": width}, bits) / 3 + 1


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_both_engines_serve_a_pool_linear_as_its_reference(bits, tmp_path):
    """A pool linear (`moe.Pooled`) lowered alone: ONNX Runtime's `MatMulNBits` and
    ExecuTorch's in-graph dequantization on XNNPACK serve x @ W^T with W the numpy
    reference's values (`layout.unpack`) at each width of the ladder (ONNX Runtime at int8
    and int2 with its activations in int8 per block, `moe.POOL_ACCURACY`)."""
    import onnxruntime as ort
    from executorch.runtime import Runtime
    from moegrow.export import lower

    rng = np.random.default_rng(bits)
    w = torch.from_numpy(rng.normal(size=(48, 64)).astype(np.float32))
    linear = moe.Pooled(w, bits)
    x = torch.from_numpy(rng.normal(size=(5, 64)).astype(np.float32))
    want = x.numpy() @ layout.unpack(linear.codes.numpy(), linear.scales.numpy().reshape(
        48, -1), bits).T
    lower.to_onnx(linear, (x,), tmp_path / "p.onnx")
    got = ort.InferenceSession(str(tmp_path / "p.onnx")).run(None, {"x": x.numpy()})[0]
    if moe.POOL_ACCURACY[bits]:  # int8 activations per block (its fast path): nearly
        assert 1e-9 < ((got - want) ** 2).sum() / (want ** 2).sum() < 1e-4
    else:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    lower.to_pte({"forward": (linear, (x,), None)}, tmp_path / "p.pte")
    method = Runtime.get().load_program(tmp_path / "p.pte").load_method("forward")
    np.testing.assert_allclose(method.execute([x])[0].numpy(), want, rtol=1e-4, atol=1e-4)


def test_the_int2_rung_serves_what_its_reference_says(exports, tmp_path):
    """A pool of int4 and int2 slots (`--pool-bits 4,2`): the budget counts int2 slots at 2
    bits plus a scale per 32; the allocator measures each clone at both widths; a clone
    compressed to int2 is served (ONNX Runtime's 2-bit `MatMulNBits`) as the fp32 spare
    slot serves its dequantized weights, and the bundle's checksums hold."""
    path = tmp_path / "b"
    shutil.copytree(exported(exports["mixtral", "pool2"]), path)
    rt = runtime.open(path, "onnxruntime")
    r = compress.budget(rt.bundle)
    layers = rt.bundle.config["num_hidden_layers"]
    assert r["pools"]["pool2"]["slots"] == r["pools"]["pool4"]["slots"] == layers
    assert r["pools"]["pool2"]["bytes"] == layers * layout.expert_bytes(rt.bundle.config, 2)
    rt.observe(german(400), "de")
    g = rt.idle(600, tokens=4096, steps=8, batch=4, lr=1e-3)  # as test_compress's `grown`
    assert g["committed"], g["reason"]
    clones = [(s["layer"], s["slot"]) for s in g["plan"]]
    held = guard.split(errormap.Store(path).replay("de"), rt.bundle.context)[1]
    rises = compress.rises(rt, clones, held)
    assert all(set(x) == {4, 2} for x in rises.values())
    grown = tmp_path / "grown"
    shutil.copytree(path, grown)
    c = compress.compress(rt, "de", bits=2, guarded=False)
    assert c["committed"] and {m["bits"] for m in c["moves"]} == {2}, c["reason"]
    new = bundle_format.load(path)  # the checksums of the int2 slots' served values hold
    changes = {(m["layer"], m["from"]): experts.read(new, m["layer"], m["to"])
               for m in c["moves"]}
    for m in c["moves"]:
        was = experts.read(bundle_format.load(grown), m["layer"], m["from"])
        for a, b in zip(changes[m["layer"], m["from"]], was, strict=True):
            assert not np.array_equal(a, b) and np.abs(a - b).max() <= np.abs(b).max()
    versions.commit(bundle_format.load(grown), changes, report={"what": "reference"})
    text = np.array([1] + rt.sp.encode(german(40, seed=9))[:new.context - 1])
    got = runtime.open(path, "onnxruntime").run("observe", text[None])
    want = runtime.open(grown, "onnxruntime").run("observe", text[None])
    # int2 slots run with int8 activations (`moe.POOL_ACCURACY`), the fp32 slot without
    assert np.abs(got[0] - want[0]).max() < 0.02, np.abs(got[0] - want[0]).max()
