"""Packed weight formats: bit layout, round trips, error bounds, exact byte counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from moegrow.device_kernels.formats import (
    BITS,
    Format,
    FormatError,
    Packed,
    dequantize,
    matmul_reference,
    pack,
    quantize,
    quantize_experts,
    unpack,
)

GROUPS = (32, 64, 128)
FORMATS = [Format(b, g, s) for b in BITS for g in GROUPS for s in (True, False)]


def gaussian(out: int = 256, in_: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((out, in_)).astype(np.float32)


def elementwise_scale(p: Packed) -> np.ndarray:
    """Each weight's group scale, float32 [out, in]."""
    return np.repeat(p.scales.astype(np.float32), p.fmt.group_size, axis=1)


def normalized_error(w: np.ndarray, p: Packed) -> float:
    return float(np.linalg.norm(w - dequantize(p)) / np.linalg.norm(w))


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(BITS).flatmap(
    lambda b: st.tuples(st.just(b), st.lists(st.integers(0, (1 << b) - 1), max_size=100))))
def test_pack_unpack_round_trip(bits_codes):
    bits, codes = bits_codes
    data = pack(np.array(codes, dtype=np.uint8), bits)
    assert data.dtype == np.uint8 and data.shape == (math.ceil(len(codes) * bits / 8),)
    assert unpack(data, bits, len(codes)).tolist() == codes


def test_byte_layout_is_dense_little_endian():
    assert pack(np.array([1, 2]), 4).tolist() == [0x21]  # low nibble first
    # Codes 0..7 at 3 bits: sum(j << 3j) = 0xFAC688, stored LSB first in exactly 3 bytes.
    assert pack(np.arange(8), 3).tolist() == [0x88, 0xC6, 0xFA]
    assert pack(np.array([3, 0, 1, 2, 3]), 2).tolist() == [0b10010011, 0b11]
    assert pack(np.array([7, 255]), 8).tolist() == [7, 255]


def test_pack_rejects_codes_out_of_range_and_short_data():
    with pytest.raises(FormatError, match="codes must lie"):
        pack(np.array([8]), 3)
    with pytest.raises(FormatError, match="need uint8"):
        unpack(np.zeros(2, np.uint8), 3, 8)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_error_at_most_half_a_step_per_element(fmt):
    w = gaussian(64, 256, seed=fmt.bits)
    p = quantize(w, fmt)
    # Scales round up to float16, so nothing clips; 1e-6 covers float32 arithmetic only.
    assert np.all(np.abs(w - dequantize(p)) <= elementwise_scale(p) / 2 * (1 + 1e-6))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", GROUPS)
def test_normalized_error_falls_with_bits_and_matches_uniform_rounding(group, symmetric):
    w = gaussian()
    errors = []
    for bits in BITS:
        p = quantize(w, Format(bits, group, symmetric))
        err = normalized_error(w, p)
        # Rounding to a grid of step s leaves an error ~uniform on [-s/2, s/2]: RMS s/sqrt(12).
        rms_s = np.sqrt(np.mean(elementwise_scale(p) ** 2))
        uniform = rms_s / math.sqrt(12) / np.sqrt(np.mean(w**2))
        # Hard bound: |error| <= s/2 everywhere, i.e. at most sqrt(3) times the uniform model.
        assert err <= math.sqrt(3) * uniform
        # 65k samples pin the mean square to ~1%; 10% leaves room for the ternary 2-bit grid,
        # whose group maximum sits exactly on a level (measured 0.93-1.01x of the model).
        assert 0.85 * uniform <= err <= 1.1 * uniform
        errors.append(err)
    assert errors == sorted(errors)  # BITS is 8, 4, 3, 2


def test_asymmetric_beats_symmetric_at_two_bits():
    w = gaussian()
    sym = normalized_error(w, quantize(w, Format(2, 64, True)))
    asym = normalized_error(w, quantize(w, Format(2, 64, False)))
    assert asym < sym  # four levels instead of three


@pytest.mark.parametrize("fmt", [Format(b, 32, s) for b in BITS for s in (True, False)], ids=str)
def test_zero_tiny_and_constant_groups(fmt):
    w = np.zeros((3, 96), np.float32)
    w[1, 32:64] = 1e-30  # scale would underflow float16: floored, still no NaN
    w[2, :32] = 0.75
    w[2, 32:64] = -3.5
    w[2, 64:] = 1e4
    p = quantize(w, fmt)
    d = dequantize(p)
    assert np.all(np.isfinite(d)) and np.all(p.scales > 0)
    assert np.all(d[0] == 0) and np.all(d[1, :32] == 0)
    # A constant is its group's max|w| (or range): it lands on the top level, off only by the
    # round-up of its scale to float16's 11-bit significand, <= 2**-10 < 1e-3 relative.
    for sl, value in [(slice(0, 32), 0.75), (slice(32, 64), -3.5), (slice(64, 96), 1e4)]:
        assert np.allclose(d[2, sl], value, rtol=1e-3), (fmt, value)


def test_bad_formats_and_inputs_raise_format_error():
    for kwargs in [dict(bits=5, group_size=32), dict(bits=4, group_size=12),
                   dict(bits=4, group_size=0), dict(bits=True, group_size=32),
                   dict(bits=4, group_size=32, symmetric=1)]:
        with pytest.raises(FormatError):
            Format(**kwargs)
    with pytest.raises(FormatError, match="does not divide"):
        quantize(np.ones((4, 96), np.float32), Format(4, 64))
    with pytest.raises(FormatError, match="NaN"):
        quantize(np.full((1, 32), np.nan, np.float32), Format(4, 32))
    with pytest.raises(FormatError, match="overflows float16"):
        quantize(np.full((1, 32), 1e9, np.float32), Format(2, 32))
    with pytest.raises(FormatError, match="2-D"):
        quantize(np.ones(32, np.float32), Format(4, 32))


def test_packed_rejects_arrays_that_do_not_fit():
    p = quantize(gaussian(8, 64), Format(4, 32, symmetric=False))
    with pytest.raises(FormatError, match="packed data"):
        Packed(p.data[:-1], p.scales, p.zeros, p.shape, p.fmt)
    with pytest.raises(FormatError, match="scales"):
        Packed(p.data, p.scales.astype(np.float32), p.zeros, p.shape, p.fmt)
    with pytest.raises(FormatError, match="zeros"):
        Packed(p.data, p.scales, None, p.shape, p.fmt)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_nbytes_is_exact(fmt):
    out, in_ = 24, 384
    p = quantize(gaussian(out, in_), fmt)
    groups = out * in_ // fmt.group_size
    # Codes at `bits` each, one float16 scale per group, one uint8 zero per asymmetric group.
    expected = out * in_ * fmt.bits // 8 + 2 * groups + (0 if fmt.symmetric else groups)
    assert p.nbytes == fmt.nbytes(out, in_) == expected


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_matmul_reference_within_quantization_bound(fmt):
    w = gaussian(48, 256, seed=1)
    x = np.random.default_rng(2).standard_normal((5, 256)).astype(np.float32)
    p = quantize(w, fmt)
    y = matmul_reference(x, p)
    # |x @ (W - deq).T| <= |x| @ (s/2).T, plus float32 rounding of two 256-term dot products.
    bound = np.abs(x) @ (elementwise_scale(p) / 2).T
    slack = 1e-5 * (np.abs(x) @ np.abs(w).T)
    assert y.shape == (5, 48) and np.all(np.abs(y - x @ w.T) <= bound + slack)


def test_quantize_experts_is_quantize_per_expert():
    w = np.stack([gaussian(16, 64, seed=e) for e in range(3)])
    fmt = Format(3, 32)
    for we, pe in zip(w, quantize_experts(w, fmt), strict=True):
        q = quantize(we, fmt)
        assert np.array_equal(pe.data, q.data) and np.array_equal(pe.scales, q.scales)
