"""Group-wise n-bit weight formats: numpy reference pack, unpack, quantize, dequantize.

A `Format` (bits 8, 4, 3 or 2; group size; symmetric or not) is data: the bundle manifest
stores it per expert tensor (`dataclasses.asdict(fmt)`, read back with `Format(**d)`), and file
names never carry bit widths. The expert weight files hold `Packed` arrays. A 2-D weight
`w [out, in]` is cut along `in` into groups of `group_size`; each group gets one float16 scale
(and, if asymmetric, one uint8 zero point) and every weight becomes an unsigned `bits`-bit code:

    w ~= (code - zero) * scale      zero = 2**(bits-1) when symmetric (implicit, not stored)

Symmetric: `scale = max|w| / qmax` with `qmax = 2**(bits-1) - 1`, so signed values lie in
[-qmax, qmax]; the code for -qmax-1 is never produced, which keeps the grid symmetric and
negation exact at the price of one level (2-bit symmetric is ternary; use asymmetric there).
Asymmetric: the range [min(w, 0), max(w, 0)] maps onto codes 0 .. 2**bits - 1; zero is
included so an exact 0 stays exact. Either way every element is within scale/2 of `w`.

Byte layout of `Packed.data`: the codes of `w` in row-major order, packed densely and
little-endian: code i occupies bits [i*bits, (i+1)*bits) of the stream, bit 0 = LSB of byte 0.
Eight codes fill exactly `bits` bytes (4-bit: byte = c0 | c1 << 4; 3-bit: 8 codes in 3 bytes).
Group sizes are multiples of 8, so every row and every group starts on a byte boundary.
Scales are float16 [out, in/group] and zeros uint8 [out, in/group] (asymmetric only).
Scales are float16 for memory: at group 32 a scale costs 0.5 bit per weight, not 1 as in
float32. They are rounded up to float16 (so codes never clip) and floored at its smallest
subnormal (so an all-zero group gets scale 2**-24 and codes 0, never 0/0).

`matmul_reference(x, p) = x @ dequantize(p).T` is the reference every fast kernel is tested
against, by normalized error. `Packed.nbytes` is what the bundle's memory budget counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BITS = (8, 4, 3, 2)
# Smallest positive float16 (subnormal): scales are floored here so they never round to 0.
_MIN_SCALE = np.float16(2.0**-24)


class FormatError(ValueError):
    """A bad format, a weight that cannot be packed, or packed arrays that do not fit."""


@dataclass(frozen=True)
class Format:
    bits: int
    group_size: int
    symmetric: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise FormatError(f"bits must be one of {BITS}, got {self.bits!r}")
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or gs < 8 or gs % 8:
            raise FormatError(f"group_size must be a positive multiple of 8, got {gs!r}")
        if not isinstance(self.symmetric, bool):
            raise FormatError(f"symmetric must be a bool, got {self.symmetric!r}")

    def nbytes(self, out: int, in_: int) -> int:
        """Exact bytes of a packed [out, in_] weight: codes + float16 scales (+ uint8 zeros)."""
        groups = out * (in_ // self.group_size)
        return math.ceil(out * in_ * self.bits / 8) + groups * (2 if self.symmetric else 3)


@dataclass(frozen=True, eq=False)  # == on numpy fields is ambiguous: compare arrays explicitly
class Packed:
    data: np.ndarray  # uint8 [ceil(out*in*bits/8)], layout in the module docstring
    scales: np.ndarray  # float16 [out, in/group]
    zeros: np.ndarray | None  # uint8 [out, in/group]; None when symmetric
    shape: tuple[int, int]  # (out, in)
    fmt: Format

    def __post_init__(self) -> None:
        # Packed arrays also arrive from weight files: check them here, not deep in a kernel.
        out, in_ = self.shape
        if in_ % self.fmt.group_size:
            raise FormatError(f"group_size {self.fmt.group_size} does not divide in dim {in_}")
        gshape = (out, in_ // self.fmt.group_size)
        n = math.ceil(out * in_ * self.fmt.bits / 8)
        if self.data.dtype != np.uint8 or self.data.shape != (n,):
            raise FormatError(f"packed data must be uint8 [{n}], got {self.data.dtype} "
                              f"{list(self.data.shape)}")
        if self.scales.dtype != np.float16 or self.scales.shape != gshape:
            raise FormatError(f"scales must be float16 {list(gshape)}, got "
                              f"{self.scales.dtype} {list(self.scales.shape)}")
        if self.fmt.symmetric != (self.zeros is None):
            raise FormatError("zeros must be None for symmetric formats and present otherwise")
        if self.zeros is not None and (self.zeros.dtype != np.uint8 or self.zeros.shape != gshape):
            raise FormatError(f"zeros must be uint8 {list(gshape)}, got "
                              f"{self.zeros.dtype} {list(self.zeros.shape)}")

    @property
    def nbytes(self) -> int:
        zeros = 0 if self.zeros is None else self.zeros.nbytes
        return self.data.nbytes + self.scales.nbytes + zeros


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes (any shape, flattened row-major) -> uint8 [ceil(n*bits/8)], dense LE."""
    if bits not in BITS:
        raise FormatError(f"bits must be one of {BITS}, got {bits!r}")
    c = np.asarray(codes).reshape(-1)
    if c.size and (c.min() < 0 or c.max() >= 1 << bits):
        raise FormatError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits} bits")
    n = c.size
    c = np.pad(c.astype(np.uint8), (0, -n % 8)).reshape(-1, 8)
    # Eight codes are one little-endian word of 8*bits <= 64 bits; keep its low `bits` bytes.
    word = np.zeros(len(c), np.uint64)
    for j in range(8):  # over the 8 code positions of a word, not over elements
        word |= c[:, j].astype(np.uint64) << np.uint64(j * bits)
    out = word.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :bits].reshape(-1)
    return np.ascontiguousarray(out[: math.ceil(n * bits / 8)])


def unpack(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack`: uint8 bytes -> the first `count` codes as uint8 [count]."""
    if bits not in BITS:
        raise FormatError(f"bits must be one of {BITS}, got {bits!r}")
    need = math.ceil(count * bits / 8)
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 1 or data.size < need:
        raise FormatError(f"{count} codes of {bits} bits need uint8 [>= {need}] bytes, got "
                          f"{data.dtype} {list(data.shape)}")
    chunks = math.ceil(count / 8)
    b = np.zeros((chunks, 8), np.uint8)
    b[:, :bits] = np.pad(data[:need], (0, chunks * bits - need)).reshape(chunks, bits)
    word = b.view("<u8")  # [chunks, 1]
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    codes = (word >> shifts) & np.uint64((1 << bits) - 1)
    return codes.reshape(-1)[:count].astype(np.uint8)


def _to_f16_up(s: np.ndarray) -> np.ndarray:
    """float32 scales -> float16, rounded up so no code clips and |error| <= scale/2 holds."""
    if s.size and s.max() > np.finfo(np.float16).max:
        raise FormatError("weights too large: a group's scale overflows float16 (max 65504)")
    s16 = np.maximum(s, np.float32(_MIN_SCALE)).astype(np.float16)
    low = s16.astype(np.float32) < s
    s16[low] = np.nextafter(s16[low], np.float16(np.inf))
    return s16


def quantize(w: np.ndarray, fmt: Format) -> Packed:
    """float32 w [out, in] -> Packed, groups of `fmt.group_size` along `in`."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise FormatError(f"quantize takes a 2-D weight [out, in], got shape {list(w.shape)}")
    out, in_ = w.shape
    if in_ % fmt.group_size:
        raise FormatError(f"group_size {fmt.group_size} does not divide in dim {in_}")
    if not np.isfinite(w).all():
        raise FormatError("weights contain NaN or inf")
    g = w.reshape(out, in_ // fmt.group_size, fmt.group_size)  # [out, G, group]
    if fmt.symmetric:
        qmax = (1 << (fmt.bits - 1)) - 1
        s16 = _to_f16_up(np.abs(g).max(axis=2) / qmax)
        s = s16.astype(np.float32)[..., None]
        codes = np.clip(np.rint(g / s), -qmax, qmax) + (qmax + 1)
        zeros = None
    else:
        levels = (1 << fmt.bits) - 1
        lo, hi = np.minimum(g.min(axis=2), 0), np.maximum(g.max(axis=2), 0)
        s16 = _to_f16_up((hi - lo) / levels)
        s = s16.astype(np.float32)
        zeros = np.clip(np.rint(-lo / s), 0, levels).astype(np.uint8)
        codes = np.clip(np.rint(g / s[..., None]) + zeros[..., None], 0, levels)
    return Packed(pack(codes.astype(np.uint8), fmt.bits), s16, zeros, (out, in_), fmt)


def dequantize(p: Packed) -> np.ndarray:
    """Packed -> float32 [out, in]."""
    out, in_ = p.shape
    gs = p.fmt.group_size
    codes = unpack(p.data, p.fmt.bits, out * in_).reshape(out, in_ // gs, gs)
    zero = 1 << (p.fmt.bits - 1) if p.zeros is None else p.zeros[..., None].astype(np.float32)
    w = (codes.astype(np.float32) - zero) * p.scales.astype(np.float32)[..., None]
    return w.reshape(out, in_)


def matmul_reference(x: np.ndarray, p: Packed) -> np.ndarray:
    """x [..., in] @ W.T -> [..., out]: dequantize, then matmul in float32."""
    return np.asarray(x, dtype=np.float32) @ dequantize(p).T


def quantize_experts(w: np.ndarray, fmt: Format) -> list[Packed]:
    """Stacked expert weights [E, out, in] -> one Packed per expert (bits are per expert)."""
    return [quantize(we, fmt) for we in np.asarray(w, dtype=np.float32)]
