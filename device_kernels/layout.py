"""Where an expert's weights live inside an engine's weight file, shared by export and runtime.

A layer's experts are stacked tensors `gate_proj`, `up_proj` [E, F, C] and `down_proj`
[E, C, F] (Hugging Face layout, `y = (silu(x Wg^T) * (x Wu^T)) Wd^T`). The programs hold each
of them in one or two *forms* (fp32, row-major, as both engines store constants):

    stacked   the tensor itself: expert e is the contiguous block [e]. The gather decode
              reads it; for gate/up it is also the dense form ([E*F, C] has the same bytes).
    dense     down_proj as one linear over all experts, [C, E*F]: expert e is the column
              block [:, e*F:(e+1)*F].

A bundle's manifest lists, per engine, `{"layer", "proj", "form", "offset", "first",
"count"}` for every copy that the export located in the engine's data file: the tensor holds
slots first .. first + count - 1 (a bundle with spare slots keeps its E base experts and its
S spare slots in tensors of their own, so a program can read the one without the other;
entries without the two keys hold every slot). `view` turns one into a writable numpy view
of one expert, so reading or replacing an expert is plain array indexing on the file's
bytes.

A quantized bundle's base experts are frozen and have no fp32 form: their entries (form
`q4` or `q8`, with `scales` and `group`) locate the codes of the linear its programs hold
([E*F, C] for gate and up, [C, E*F] for down, quantized along its input dimension in groups
of `group`: ONNX Runtime's `MatMulNBits` layout, uint8 codes with an implicit zero point of
2^(bits-1), 4-bit ones two to a byte, low nibble first; fp32 scales, one per group).
`dequantized` reads one expert back as fp32 (a clone's starting weights).

A quantized bundle's base experts are held in the *routed* layout instead (entries with
`"order": "routed"`; ONNX Runtime's `QMoE` reads it, and every deepening program): gate
and up share one tensor of [E*2F, C] rows, expert e's gate row f at row 2(eF + f) and its up
row at the next one; down is [E*C, F], expert e's [C, F] the block of rows e*C .. e*C + C.
Codes and scales as above, per row.

A bundle exported with a *pool* (`--pool N`) has N more slots per layer after the spare
ones, held in that same layout at the pool's bits in every gated program (entries with
`first` = E + S): growth moves a converged clone there (`runtime.compress`), and
`quantize_into` writes one expert's codes and scales (`packed`, the numpy reference of the
format) in place, so a bit width changes on the device without an export.
"""

from __future__ import annotations

import hashlib

import numpy as np

PROJS = ("gate_proj", "up_proj", "down_proj")
POOL_BITS = (8, 4, 2)  # the widths a pool's slots can have (`packed`)
TWO_BIT_GRID = tuple(np.linspace(0.3, 1.0, 15))  # 2-bit scales tried, x a group's max |w|
LEARNING_COPIES = 4  # a changed expert's fp32 weights, gradient, and Adam's two moments


def dims(config: dict) -> tuple[int, int, int]:
    """(expert slots, expert hidden F, model width C) of a Hugging Face MoE config; the slots
    are its E experts plus the `spare_experts` a bundle's config adds (spawn headroom) and
    its `pool_experts` (quantized slots for converged clones)."""
    experts = (config.get("num_local_experts") or config["num_experts"]) + \
        config.get("spare_experts", 0) + config.get("pool_experts", 0)
    hidden = config.get("moe_intermediate_size") or config["intermediate_size"]
    return experts, hidden, config["hidden_size"]


def expert_bytes(config: dict, bits: int, group: int = 32) -> int:
    """Bytes one expert takes at `bits` in the weight files: fp32, or (8, 4) the `q8`/`q4`
    codes plus an fp32 scale per `group` (what the budget counts; `runtime.compress`)."""
    _, hidden, width = dims(config)
    n = 3 * hidden * width
    return n * 4 if bits == 32 else n * bits // 8 + n // group * 4


def learning_bytes(config: dict, experts: int) -> int:
    """Bytes of the learning state of a growth slice that changes `experts` experts: each
    one's fp32 weights, gradient and Adam's two moments (`runtime.growth`); what the
    budget's "learning" part bounds."""
    return LEARNING_COPIES * experts * expert_bytes(config, 32)


def shape(proj: str, hidden: int, width: int) -> tuple[int, int]:
    """One expert's [out, in] for `proj`."""
    return (width, hidden) if proj == "down_proj" else (hidden, width)


def forms(proj: str, stacked: np.ndarray) -> dict[str, np.ndarray]:
    """The contiguous arrays whose bytes an engine may hold for a stacked [E, out, in] weight
    (one expert's down_proj has one: its dense form is the same bytes, stored once)."""
    out = {"stacked": np.ascontiguousarray(stacked, np.float32)}
    if proj == "down_proj" and len(stacked) > 1:
        e, c, f = stacked.shape
        out["dense"] = np.ascontiguousarray(stacked.transpose(1, 0, 2).reshape(c, e * f),
                                            np.float32)
    return out


def nbytes(experts: int, hidden: int, width: int) -> int:
    """Bytes of one form of one layer's stacked `proj` (every form has the same size)."""
    return experts * hidden * width * 4


def holds(entry: dict, slot: int, slots: int) -> bool:
    """Whether a layout entry's tensor holds `slot` (of `slots` in the layer)."""
    first = entry.get("first", 0)
    return first <= slot < first + entry.get("count", slots)


def view(buf: np.ndarray, entry: dict, slot: int, dims_: tuple[int, int, int]) -> np.ndarray:
    """Expert `slot`'s fp32 [out, in] weight in `buf` (the data file as uint8) for one
    layout entry that holds it; a view, so assigning to it writes the file's bytes."""
    slots, hidden, width = dims_
    experts, start = entry.get("count", slots), entry["offset"]
    slot -= entry.get("first", 0)
    block = buf[start:start + nbytes(experts, hidden, width)].view(np.float32)
    out, in_ = shape(entry["proj"], hidden, width)
    if entry["form"] == "stacked":
        return block.reshape(experts, out, in_)[slot]
    if entry["form"] == "dense":
        return block.reshape(out, experts * in_)[:, slot * in_:(slot + 1) * in_]
    raise ValueError(f"unknown weight form {entry['form']!r}")


def views(buf: np.ndarray, entries: list[dict], layer: int, slot: int,
          dims_: tuple[int, int, int]) -> dict[str, list[np.ndarray]]:
    """Every copy of expert (layer, slot) in `buf`: {proj: [view per form]}."""
    out: dict[str, list[np.ndarray]] = {p: [] for p in PROJS}
    for entry in entries:
        if (entry["layer"] == layer and entry["form"] in ("stacked", "dense")
                and holds(entry, slot, dims_[0])):
            out[entry["proj"]].append(view(buf, entry, slot, dims_))
    return out


def _coded(buf: np.ndarray, entry: dict, dims_: tuple[int, int, int]):
    """A quantized entry's codes [rows, cols / group, group * bits / 8] and scales [rows,
    cols / group] as views of `buf` (the linear the programs hold: [n*F, C] for gate and
    up, [C, n*F] for down), with (bits, out, in) of one expert."""
    slots, hidden, width = dims_
    experts, bits, group = entry.get("count", slots), int(entry["form"][1:]), entry["group"]
    out, in_ = shape(entry["proj"], hidden, width)
    if entry.get("order") == "routed":  # gate and up rows interleaved; down per expert
        rows, cols = experts * out * (1 + (entry["proj"] != "down_proj")), in_
    else:
        rows, cols = ((out, experts * in_) if entry["proj"] == "down_proj"
                      else (experts * out, in_))
    blocks = rows * cols // group
    codes = buf[entry["offset"]:entry["offset"] + blocks * group * bits // 8]
    scales = buf[entry["scales"]:entry["scales"] + blocks * 4].view(np.float32)
    return (codes.reshape(rows, cols // group, -1), scales.reshape(rows, cols // group),
            bits, out, in_)


def unpack(codes: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """Codes [N, G, group * bits / 8] and scales [N, G] (the `q8` / `q4` / `q2` layout) ->
    fp32 [N, G * group]."""
    if bits < 8:  # 8 / bits codes to a byte, the first in the lowest bits
        mask = (1 << bits) - 1
        codes = np.stack([(codes >> (bits * i)) & mask for i in range(8 // bits)], -1)
        codes = codes.reshape(*codes.shape[:2], -1)
    w = (codes.astype(np.float32) - (1 << (bits - 1))) * scales.reshape(*codes.shape[:2], 1)
    return w.reshape(len(w), -1)


def _cut(entry: dict, slot: int, out: int, in_: int, group: int = 1) -> tuple[slice, slice]:
    """Expert `slot`'s (rows, columns) of the linear of `entry`, columns in units of
    `group`: gate and up its rows, down its columns."""
    local = slot - entry.get("first", 0)
    if entry.get("order") == "routed":
        if entry["proj"] == "down_proj":
            return slice(local * out, (local + 1) * out), slice(None)
        row = local * 2 * out + (entry["proj"] == "up_proj")
        return slice(row, row + 2 * out, 2), slice(None)
    if entry["proj"] == "down_proj":
        return slice(None), slice(local * in_ // group, (local + 1) * in_ // group)
    return slice(local * out, (local + 1) * out), slice(None)


def dequantized(buf: np.ndarray, entry: dict, slot: int,
                dims_: tuple[int, int, int]) -> np.ndarray:
    """Expert `slot`'s fp32 [out, in] weight from a quantized entry (form `q4` / `q8`) that
    holds it: a new array."""
    codes, scales, bits, out, in_ = _coded(buf, entry, dims_)
    return unpack(codes, scales, bits)[_cut(entry, slot, out, in_)].copy()


def packed(w: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """A weight [N, K] in the `q8` / `q4` / `q2` layout: codes per group of `group` along K,
    code = round(w / scale) + 2^(bits-1) (ONNX Runtime's `MatMulNBits` with its default
    zero point), 8 / bits codes to a byte, the first in the lowest bits -> (uint8 [N,
    K / group, group * bits / 8], fp32 scales [N * K / group]). At 8 and 4 bits symmetric,
    scale = max |w| / (2^(bits-1) - 1): every value within scale / 2 of `w`. At 2 bits
    (levels -2, -1, 0, 1 x scale) the scale of each group is the one of `TWO_BIT_GRID` x
    max |w| with the least squared error (values past the levels are clipped)."""
    w = np.asarray(w, np.float32)
    n, k = w.shape
    if bits not in POOL_BITS or k % group:
        raise ValueError(f"a q{bits} weight needs bits 8, 4 or 2 and K divisible by {group}")
    g = w.reshape(n, k // group, group)
    zero, qmax = 1 << (bits - 1), (1 << (bits - 1)) - 1
    peak = np.abs(g).max(-1)  # [N, K / group]
    if bits == 2:
        best, err = None, None
        for f in TWO_BIT_GRID:
            scale = (peak * np.float32(f)).astype(np.float32)
            safe = np.where(scale > 0, scale, 1.0)[..., None]
            e = ((np.clip(np.rint(g / safe), -zero, qmax) * safe - g) ** 2).sum(-1)
            if best is None:
                best, err = scale, e
            else:
                best, err = np.where(e < err, scale, best), np.minimum(e, err)
        scale = best
    else:
        scale = (peak / qmax).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    q = (np.clip(np.rint(g / safe), -zero, qmax) + zero).astype(np.uint8)
    if bits < 8:
        per = 8 // bits
        q = np.bitwise_or.reduce([q[..., i::per] << (bits * i) for i in range(per)]).astype(
            np.uint8)
    return np.ascontiguousarray(q), np.ascontiguousarray(scale.reshape(-1))


def served(w: np.ndarray, bits: int, group: int = 32) -> np.ndarray:
    """`w` [out, in] as a pool slot of `bits` serves it: `packed`, then `unpack`."""
    return unpack(*packed(w, bits, group), bits)


def quantize_into(buf: np.ndarray, entry: dict, slot: int, dims_: tuple[int, int, int],
                  w: np.ndarray) -> np.ndarray:
    """Expert `slot`'s fp32 [out, in] weight `w` quantized (`packed`) into a quantized
    entry (form `q4` / `q8`) that holds it, in place in `buf`; returns the values it now
    serves (`dequantized`). Each expert's groups are its own (gate and up: its rows of
    [P*F, C]; down: its F columns of [C, P*F], F a multiple of the group), so the other
    experts' bytes are untouched."""
    codes, scales, bits, out, in_ = _coded(buf, entry, dims_)
    if entry["proj"] == "down_proj" and in_ % entry["group"]:
        raise ValueError(f"an expert of hidden size {in_} does not fill whole groups of "
                         f"{entry['group']}")
    q, s = packed(w, bits, entry["group"])
    cut = _cut(entry, slot, out, in_, entry["group"])
    codes[cut], scales[cut] = q, s.reshape(len(q), -1)
    return dequantized(buf, entry, slot, dims_)


def values(buf: np.ndarray, entries: list[dict], layer: int, slot: int,
           dims_: tuple[int, int, int]) -> list[np.ndarray] | None:
    """Expert (layer, slot)'s fp32 [gate, up, down] from its fp32 copies (the first form
    of each), else from its quantized entries (`dequantized`); None where `entries` do not
    locate all three."""
    copies = views(buf, entries, layer, slot, dims_)
    if all(copies.values()):
        return [np.array(copies[p][0]) for p in PROJS]
    frozen = {e["proj"]: e for e in entries if e["layer"] == layer and e["form"][0] == "q"
              and holds(e, slot, dims_[0])}
    if len(frozen) != len(PROJS):
        return None
    return [dequantized(buf, frozen[p], slot, dims_) for p in PROJS]


def router(buf: np.ndarray, entry: dict, dims_: tuple[int, int, int]) -> np.ndarray:
    """A layer's router weight [slots, C] in `buf` for one `{"layer", "offset"}` entry (one
    row per slot); a view, so assigning to a row writes the file's bytes."""
    experts, _, width = dims_
    start = entry["offset"]
    return buf[start:start + experts * width * 4].view(np.float32).reshape(experts, width)


def sha256(weights: list[np.ndarray]) -> str:
    """An expert's checksum: its fp32 gate, up, down [out, in] bytes in that order."""
    h = hashlib.sha256()
    for w in weights:
        h.update(np.ascontiguousarray(w, np.float32).tobytes())
    return h.hexdigest()
