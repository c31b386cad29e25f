"""`moegrow export`: lower a checkpoint's device programs into a bundle folder.

Layout (format version 2):

    manifest.json            format, config, tokenizer, programs, weights, experts, budget,
                             calibration (the error map's baseline, `calibrate.py`)
    tokenizer.model
    programs/model.pte       ExecuTorch: methods prefill, decode, score, observe (and with
                             spare slots their `_gated` forms: `PROGRAMS`),
                             in fp32 bundles sweep (every layer's local updates), with
                             spare slots sweep_spare (the spare slots' alone), and
                             adam (growth's optimizer step; strict0.. with
                             --strict-steps: `relax.py`); no weights
    programs/NAME.onnx       ONNX Runtime: one graph per program (no weights inside)
    weights/v1.ptd           ExecuTorch's weight file (every constant of every method)
    weights/v1.onnx.data     ONNX Runtime's weight file (external data of every graph)

Bundles with deepening programs (fp32 by default, quantized with --deepen) have `spare`
empty fp32 expert slots per layer (default 2; the manifest's config says `spare_experts`,
the expert table marks them `"kind": "spare"`), counted in the budget, and every bundle
with a calibration text has `calibration.ids`, its tokens (growth's guard text).

Weights are data: the programs name their constants, the weight files hold the bytes, and
`manifest["experts"]["layout"]` says where each layer's expert tensors lie in each weight file
(`device_kernels.layout`). A new expert version is a new `weights/vN.*` file with that expert's
bytes replaced (`runtime.experts`), loaded by the same programs: nothing is traced again.

The bundle is built in a temporary sibling folder and renamed into place, so an export that
fails leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from moegrow.device_kernels import layout, manifest
from moegrow.device_kernels.manifest import ENGINES, ONNX_DATA
from moegrow.runtime.session import BOS

from . import calibrate, checkpoint, lower, moe, pc, programs, quantize, relax
from .codes import routed_codes
from .models import layers


class BundleError(Exception):
    """An export request that cannot be carried out (unknown engine, existing folder)."""


# the serving programs in one pass, never reading a spare slot; a bundle with spare slots
# also has `NAME_gated`, which compute the slots behind the novelty gate (prefill, score and
# observe after its base pass), served once a clone exists (docs/growth.md)
PROGRAMS = {"prefill": partial(programs.Prefill, gated=False),
            "decode": partial(programs.Decode, gated=False),
            "score": partial(programs.Score, gated=False),
            "observe": partial(programs.Observe, gated=False),
            "prefill_gated": programs.Prefill, "decode_gated": programs.Decode,
            "score_gated": programs.Score, "observe_gated": programs.Observe}


def serving(spare: int) -> list[str]:
    """The serving programs of a bundle with `spare` slots per layer."""
    return [name for name in PROGRAMS if spare or not name.endswith("_gated")]


STRICT_ETA = 0.1  # strict PC's relaxation rate (PC.md: eta <= 0.3; 0.3 overshoots here)
CALIBRATION = "calibration.txt"  # a checkpoint's own held-out base text, if it has one
GUARD = "calibration.ids"  # the calibration text's token ids (int32), growth's guard text
SPARE = 2  # spare expert slots per layer of an fp32 bundle: room for one domain's top-2


def expert_bytes(config: dict, bits: int) -> int:
    """Bytes one expert takes at `bits` in the weight files (`layout.expert_bytes`: int8 and
    int4 codes plus an fp32 scale per group of 32; before 2026-12-03 this counted float16
    scales, which no engine stores)."""
    return layout.expert_bytes(config, bits, quantize.GROUP_SIZE)


def locate(model: layers.CausalLM, data: Path,
           bits: int = 32) -> tuple[list[dict], list[dict], dict | None]:
    """Find every form of every layer's expert tensors (the base experts', and the spare
    slots' apart: `moe.Slots`), every layer's router weight and the gate's class table
    (`programs.with_spare`) in the weight file `data` -> (expert entries, router entries,
    {"offset", "shape"} of the table or None without spare slots). `bits` < 32: the base
    experts are quantized, found as the codes and scales the serving and deepening programs
    hold (`_routed`), where the file has them."""
    base = bits == 32
    raw = data.read_bytes()
    found, routers = [], []
    spare, pool = getattr(model, "spare", 0), getattr(model, "pool", 0)
    for i, block in enumerate(model.model.layers):
        slots = block.mlp.experts.gate_proj.shape[0]
        live = slots - spare - pool
        parts = [(0, live)] + [(live, spare)] * bool(spare)
        for proj, (first, count) in ((p, part) for p in layout.PROJS for part in parts):
            stacked = getattr(block.mlp.experts, proj).detach().float().numpy()
            hits = []
            for form, arr in layout.forms(proj, stacked[first:first + count]).items():
                at = raw.find(arr.tobytes())
                if at >= 0:
                    if raw.find(arr.tobytes(), at + 1) >= 0:
                        raise BundleError(f"{data.name}: layer {i} {proj} is stored twice")
                    hits.append({"layer": i, "proj": proj, "form": form, "offset": at,
                                 "first": first, "count": count})
            if not hits and (base or first):
                raise BundleError(f"{data.name}: layer {i} {proj} (slots {first} to "
                                  f"{first + count - 1}) not found in the weight file (the "
                                  "engine changed how it stores weights)")
            found += hits
        if not base:
            found += _routed(raw, block.mlp.experts, i, live, bits)
        first = live + spare
        for pool_bits, n in moe.runs(block.mlp.pool_bits) if pool else []:  # the pool's
            # codes and scales (`moe.Pooled`): every gated program has them
            pooled = _frozen(raw, block.mlp.experts, i, (first, n), pool_bits,
                             lambda w, b: layout.packed(w.numpy(), b, moe.POOL_GROUP))
            if len(pooled) != len(layout.PROJS):
                raise BundleError(f"{data.name}: layer {i}'s int{pool_bits} pool slots not "
                                  "found in the weight file")
            found += pooled
            first += n
        router = block.mlp.gate.weight.detach().float().numpy().tobytes()
        at = raw.find(router)
        if at < 0 or raw.find(router, at + 1) >= 0:
            raise BundleError(f"{data.name}: layer {i}'s router weight is "
                              f"{'missing from' if at < 0 else 'stored twice in'} the weight file")
        routers.append({"layer": i, "offset": at})
    offsets = [h["offset"] for h in found + routers  # gate and up share fc1 (`_routed`)
               if not (h.get("order") == "routed" and h["proj"] == "up_proj")]
    if len(set(offsets)) != len(offsets):  # identical tensors are stored once by the engines
        raise BundleError(f"{data.name}: two expert tensors share storage (identical weights)")
    domains = None
    if spare:
        table = model.domains.detach().float().numpy()
        at = raw.find(table.tobytes())
        if at < 0:
            raise BundleError(f"{data.name}: the gate's class table is missing from the "
                              "weight file")
        domains = {"offset": at, "shape": list(table.shape)}
    return found, routers, domains


def _frozen(raw: bytes, experts: layers.Experts, layer: int, part: tuple[int, int],
            bits: int, pack: Callable) -> list[dict]:
    """Layout entries of quantized slots `part` (first, count) of a layer (a pool's,
    `layout.packed`): per projection
    the codes and scales `pack` makes of the linear the programs hold ([n*F, C] for gate
    and up, [C, n*F] for down), where `raw` has both (form "q4" / "q8"; none where it does
    not)."""
    found, (first, count) = [], part
    for proj in layout.PROJS:
        stacked = getattr(experts, proj).detach().float()[first:first + count]
        w = (stacked.permute(1, 0, 2).reshape(stacked.shape[1], -1) if proj == "down_proj"
             else stacked.reshape(-1, stacked.shape[2]))
        codes, scales = pack(w, bits)
        at, where = raw.find(codes.tobytes()), raw.find(scales.tobytes())
        if at >= 0 and where >= 0:
            found.append({"layer": layer, "proj": proj, "form": f"q{bits}", "offset": at,
                          "scales": where, "group": quantize.GROUP_SIZE, "first": first,
                          "count": count})
    return found


def _routed(raw: bytes, experts: layers.Experts, layer: int, live: int,
            bits: int) -> list[dict]:
    """Layout entries of a quantized bundle's base experts (slots 0 .. `live` - 1) in the
    routed layout (`codes.routed_codes`, order "routed": gate and up in fc1's alternate rows,
    down per expert in fc2), where `raw` has it (every program that reads them holds it:
    ONNX Runtime's serving ones, both engines' deepening ones); none where it does not."""
    fc = routed_codes(experts, live, bits, quantize.packed)
    at = {k: raw.find(fc[k].numpy().tobytes()) for k in ("fc1", "fc1_scales", "fc2",
                                                          "fc2_scales")}
    if min(at.values()) < 0:
        return []
    return [{"layer": layer, "proj": proj, "form": f"q{bits}", "order": "routed",
             "offset": at[key], "scales": at[f"{key}_scales"], "group": quantize.GROUP_SIZE,
             "first": 0, "count": live}
            for proj, key in (("gate_proj", "fc1"), ("up_proj", "fc1"), ("down_proj", "fc2"))]


def _lower(engine: str, model: layers.CausalLM, tmp: Path, bits: int, deepen: bool,
           strict_steps: int = 0, progress: Callable[[str], None] | None = None
           ) -> tuple[dict, Path]:
    """Lower every program for `engine` -> ({program: file entry}, weight file); the
    deepening programs of a quantized bundle on its frozen quantized linears (`pc`).
    `progress` gets a line per step, "ENGINE: WHAT (i/n)"."""
    methods = {}
    for name in serving(model.spare):
        program = PROGRAMS[name](model)
        methods[name] = (program, *program.example(model.args.max_position_embeddings))
    if deepen:  # every layer's updates from one forward and one backward; growth's Adam
        # ONNX Runtime's sweeps compute each expert on the rows of the tokens that chose it
        # (`rows`: ~0.45x the time); its quantized ones run every layer again for its VJP,
        # dequantizing again (`lean`: int4 slice peak 300 -> 248 MB; fp32 gains nothing).
        # ExecuTorch's stay dense: XNNPACK takes no linear on a data-dependent row count
        # Their loss head runs over chunks of tokens (`chunked`: the window's [W, vocab]
        # tensors never live at once; int4 slice peak 254 -> 239 MB)
        rows = engine == "onnxruntime"
        lean = rows and bits < 32
        program = pc.Sweep(model, model.args.max_position_embeddings, bits, lean=lean,
                           rows=rows, chunked=rows)
        methods["sweep"] = (program, *program.example())
        if bits == 32 and model.spare:  # a slice that trains clones alone (the base
            # experts' weight gradients left out, as a quantized bundle's sweep always does)
            program = pc.Sweep(model, model.args.max_position_embeddings, bits, spare=True,
                               rows=rows, chunked=rows)
            methods["sweep_spare"] = (program, *program.example())
        program = pc.Adam(model)
        methods["adam"] = (program, *program.example())
    for layer in range(model.args.num_hidden_layers if strict_steps else 0):
        program = relax.Strict(model, layer, model.args.max_position_embeddings, strict_steps,
                            STRICT_ETA, bits)
        methods[f"strict{layer}"] = (program, *program.example())
    steps = len(methods) + 2 * (engine == "executorch")  # + the delegate and serializing
    done = iter(range(1, steps + 1))

    def step(what: str) -> None:
        if progress:
            progress(f"{engine}: {what} ({next(done)}/{steps})")
    if engine == "executorch":
        pte, data = tmp / "programs" / "model.pte", tmp / "weights" / "v1.ptd"
        quantize.to_pte(methods, pte, data, bits=bits, progress=step)
        return {name: manifest.file_entry(tmp, pte) for name in methods}, data
    paths = {}
    for name, (program, inputs, shapes) in methods.items():
        step(name)
        paths[name] = quantize.to_onnx(program, inputs, tmp / "programs" / f"{name}.onnx",
                                       shapes, program.outputs, bits=bits)
    # growth rewrites the MoE weights (experts, routers) in the weight file: their
    # transposes stay in the graphs, every other weight's is folded here
    data, tables, folds = lower.share_weights(list(paths.values()),
                                              tmp / "programs" / ONNX_DATA,
                                              mutable=lambda name: ".mlp." in name)
    data = data.rename(tmp / "weights" / "v1.onnx.data")
    # ONNX Runtime checks that the file the graphs name exists even when the caller gives it
    # every weight (runtime/backends.py): an empty file stands in for it
    (tmp / "programs" / ONNX_DATA).touch()
    # "fold": false: the session loads with constant folding off (the deepening programs,
    # whose expert transposes stay ops: they read the weights in place at every run)
    return {name: manifest.file_entry(tmp, p) | {"initializers": tables[str(p)]}
            | ({"fold": False} if str(p) in folds else {})
            for name, p in paths.items()}, data


def export(target: str | os.PathLike, out: str | os.PathLike,
           engines: tuple[str, ...] = ("executorch", "onnxruntime"),
           progress: Callable[[str], None] | None = None, bits: int = 32,
           budget: int | None = None, calibration: str | None = None,
           strict_steps: int = 0, spare: int | None = None,
           deepen: bool | None = None, pool: int = 0,
           pool_bits: tuple[int, ...] = (4,)) -> dict:
    """Write the bundle; returns its manifest. `bits` 8 or 4 quantizes the attention and
    expert weights, and the head to int8 (router, norms and embedding stay fp32). `budget`:
    bytes allowed for expert weights (default: exactly what the experts take now).
    `calibration`: held-out base text for the error map's baseline (default: the
    checkpoint's own `calibration.txt` if it has one; without any, no verdicts).
    `deepen`: lower the growth programs `sweep` and `adam` (default: at 32 bits only). A
    quantized bundle's sweep runs on its frozen quantized weights as the serving programs
    hold them (`frozen.Frozen`) and trains its spare slots, which it needs.
    `strict_steps` > 0 adds strict-PC ones `strict{l}` with that many relaxation steps
    (their size and export time grow with the steps). `spare`: empty expert slots per
    layer for spawning (default SPARE where the bundle has deepening programs, else 0),
    fp32 whatever the bits (a quantized bundle grows clones of its frozen quantized experts
    there); counted in the budget. `pool`: slots per layer and bit width of `pool_bits`
    (8, 4 and/or 2) after the spare ones, which every gated program holds at that width:
    where `runtime.compress` moves converged clones, freeing their spare slots; counted in
    the budget."""
    deepen = bits == 32 if deepen is None else deepen
    spare = (SPARE if deepen else 0) if spare is None else spare
    if spare < 0:
        raise BundleError(f"spare expert slots must be >= 0 (got {spare})")
    if deepen and bits != 32 and not spare:
        raise BundleError("a quantized bundle's deepening programs train its spare slots "
                          "only (its experts are frozen): give --spare > 0 with --deepen")
    if strict_steps < 0 or (strict_steps and not deepen):
        raise BundleError(f"strict PC steps must be >= 0, and need the deepening programs "
                          f"(got {strict_steps} steps, deepening {'on' if deepen else 'off'})")
    pool_bits = tuple(pool_bits)
    if pool < 0 or (pool and not spare) or not pool_bits or \
            not set(pool_bits) <= set(layout.POOL_BITS) or len(set(pool_bits)) < len(pool_bits):
        raise BundleError(f"a pool needs spare slots (its clones come from them) and distinct "
                          f"bits of 8, 4 and 2 (got --pool {pool} at bits {pool_bits}, --spare "
                          f"{spare})")
    slot_bits = [b for b in sorted(pool_bits, reverse=True) for _ in range(pool)]
    if bits not in (32, *quantize.BITS):
        raise BundleError(f"bits must be 32, 8 or 4, got {bits}")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise BundleError(f"unknown engine(s) {', '.join(unknown) or '(none)'} "
                          f"(choose from {', '.join(ENGINES)})")
    out = Path(out)
    if out.exists():
        raise BundleError(f"{out}: already exists (choose a new folder)")
    model = checkpoint.load(target)
    config = model.args.to_hf() | {"spare_experts": spare} | (
        {"pool_experts": len(slot_bits), "pool_bits": slot_bits} if pool else {})
    experts, _, _ = layout.dims(config)
    used = model.args.num_hidden_layers * (
        (experts - spare - len(slot_bits)) * expert_bytes(config, bits)
        + spare * expert_bytes(config, 32) + sum(expert_bytes(config, b) for b in slot_bits))
    least = layout.learning_bytes(config, 1) if deepen else 0
    if budget is not None and budget < used + least:
        raise BundleError(f"budget of {budget} bytes is too small: the experts take {used}"
                          + (f" and a growth slice's learning state at least {least} (one "
                             "expert's weights, gradient and Adam moments)" if least else ""))
    learning = (budget - used if budget is not None else layout.learning_bytes(
        config, config["num_experts_per_tok"] * config["num_hidden_layers"])) if deepen else 0
    tok = checkpoint.load_tokenizer(target, model.args.vocab_size)
    own = checkpoint.resolve(target) / CALIBRATION
    if calibration is None and own.is_file():
        calibration = own.read_text(encoding="utf-8")
    baseline = None
    if calibration is not None:
        try:
            baseline = calibrate.baseline(model, [BOS] + tok.encode(calibration), calibration,
                                          progress)
        except calibrate.CalibrationError as e:
            raise BundleError(str(e)) from None
        for layer in baseline["layers"]:  # spare slots: never chosen by the base
            layer["experts"] += [{"count": 0, "mean": 0.0}] * (spare + len(slot_bits))
    live = experts - spare - len(slot_bits)
    model = programs.with_spare(model, spare, tuple(slot_bits))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "programs").mkdir()
        (tmp / "weights").mkdir()
        shutil.copyfile(tok.path, tmp / checkpoint.TOKENIZER)
        if baseline is not None:  # growth's guard scores the base on these tokens
            guard = tmp / GUARD
            np.array([BOS] + tok.encode(calibration), np.int32).tofile(guard)
            baseline["guard"] = manifest.file_entry(tmp, guard)
        table: dict[str, dict] = {}
        weights, where, routers, domains = {}, {}, {}, {}
        for engine in engines:
            try:
                entries, data = _lower(engine, model, tmp, bits, deepen, strict_steps,
                                       progress)
            except ValueError as e:  # a shape the quantized format cannot take
                raise BundleError(f"{target}: {e}") from None
            except Exception as e:  # an engine's exporter failing: one line, not its traceback
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise BundleError(f"{target}: lowering to {engine} at {bits} bits failed "
                                  f"({type(e).__name__}: {first})") from e
            for name, entry in entries.items():
                table.setdefault(name, {})[engine] = entry
            weights[engine] = manifest.file_entry(tmp, data)
            if bits == 32 or spare:  # quantized experts only where the sweeps hold them
                where[engine], routers[engine], found = locate(model, data, bits)
                if found:
                    domains[engine] = found
        written = {
            "format": manifest.FORMAT, "format_version": manifest.FORMAT_VERSION,
            "config": config, "context": model.args.max_position_embeddings, "bits": bits,
            # "dense": a quantized program that is not routed runs every expert (XNNPACK has
            # no quantized gather); "routed": the engines whose quantized serving programs
            # read only the chosen experts (`quantize.routed`: ONNX Runtime's QMoE,
            # ExecuTorch's `moegrow::routed_moe` kernel)
            "decode_moe": "gather" if bits == 32 else "dense",
            "routed": [] if bits == 32 else list(engines),
            # "rows": prefill and decode return the keys and values of their run only, which
            # the runtime writes into its cache (bundles without the key: the whole cache)
            "cache": "rows",
            # what each serving program returns (bundles without the key: `score` only
            # "nll" and "rank", and growth's guard reads the chosen experts from `observe`)
            "outputs": {name: list(getattr(make, "func", make).outputs)
                        for name, make in PROGRAMS.items()},
            "tokenizer": manifest.file_entry(tmp, tmp / checkpoint.TOKENIZER),
            "programs": table,
            "weights": {"version": 1, "files": weights},
            # "gate": how the programs score a class (`programs.scores`; bundles without
            # the key score it against the best other class of all)
            "experts": {"layout": where, "routers": routers, "domains": domains,
                        "gate": "base-and-argmax",
                        "table": _table(model, config, bits, live, live + spare, slot_bits)},
            "budget": {"bytes": used + learning if budget is None else budget,
                       "experts": used, "learning": learning},
            "calibration": baseline,
            "deepening": {"strict_steps": strict_steps, "strict_eta": STRICT_ETA}}
        (tmp / manifest.MANIFEST).write_text(json.dumps(written, indent=2) + "\n")
        tmp.chmod(0o755)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def _table(model: layers.CausalLM, config: dict, bits: int, live: int, pooled: int,
           pool_bits: list[int]) -> list[dict]:
    """The expert table: one row per (layer, slot), all at version 1: the base experts at
    `bits`, the slots from `live` on spare and fp32 (`runtime.growth` spawns into them),
    from `pooled` on the pool's, at `pool_bits` (one per pool slot: `runtime.compress`
    moves clones there);
    `sha256` of the fp32 weights (None for quantized experts)."""
    rows = []
    for i, block in enumerate(model.model.layers):
        ex = block.mlp.experts
        for slot in range(ex.gate_proj.shape[0]):
            weights = [getattr(ex, p)[slot].detach().float().numpy() for p in layout.PROJS]
            b = bits if slot < live else 32 if slot < pooled else pool_bits[slot - pooled]
            kind = "base" if slot < live else "spare" if slot < pooled else "pool"
            rows.append({"layer": i, "slot": slot, "version": 1, "bits": b,
                         "bytes": expert_bytes(config, b),
                         "sha256": layout.sha256(weights) if b == 32 else None,
                         "kind": kind})
    return rows
