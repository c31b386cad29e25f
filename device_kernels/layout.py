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
"""

from __future__ import annotations

import hashlib

import numpy as np

PROJS = ("gate_proj", "up_proj", "down_proj")


def dims(config: dict) -> tuple[int, int, int]:
    """(expert slots, expert hidden F, model width C) of a Hugging Face MoE config; the slots
    are its E experts plus the `spare_experts` a bundle's config adds (spawn headroom)."""
    experts = (config.get("num_local_experts") or config["num_experts"]) + \
        config.get("spare_experts", 0)
    hidden = config.get("moe_intermediate_size") or config["intermediate_size"]
    return experts, hidden, config["hidden_size"]


def shape(proj: str, hidden: int, width: int) -> tuple[int, int]:
    """One expert's [out, in] for `proj`."""
    return (width, hidden) if proj == "down_proj" else (hidden, width)


def forms(proj: str, stacked: np.ndarray) -> dict[str, np.ndarray]:
    """The contiguous arrays whose bytes an engine may hold for a stacked [E, out, in] weight."""
    out = {"stacked": np.ascontiguousarray(stacked, np.float32)}
    if proj == "down_proj":
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


def dequantized(buf: np.ndarray, entry: dict, slot: int,
                dims_: tuple[int, int, int]) -> np.ndarray:
    """Expert `slot`'s fp32 [out, in] weight from a quantized entry (form `q4` / `q8`) that
    holds it: a new array."""
    slots, hidden, width = dims_
    experts, bits, group = entry.get("count", slots), int(entry["form"][1:]), entry["group"]
    slot -= entry.get("first", 0)
    out, in_ = shape(entry["proj"], hidden, width)
    down = entry["proj"] == "down_proj"
    rows, cols = (out, experts * in_) if down else (experts * out, in_)
    blocks = rows * cols // group
    codes = buf[entry["offset"]:entry["offset"] + blocks * group * bits // 8]
    codes = codes.reshape(rows, cols // group, group * bits // 8)
    if bits == 4:
        codes = np.stack([codes & 15, codes >> 4], -1).reshape(rows, cols // group, group)
    scales = buf[entry["scales"]:entry["scales"] + blocks * 4].view(np.float32)
    w = ((codes.astype(np.float32) - (1 << (bits - 1))) * scales.reshape(rows, -1, 1))
    w = w.reshape(rows, cols)
    return (w[:, slot * in_:(slot + 1) * in_] if down else w[slot * out:(slot + 1) * out]).copy()


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
