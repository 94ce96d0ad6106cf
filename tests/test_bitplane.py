"""The format dataclass and the numpy reference (pack, unpack, exact integer product)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from pbtvm import bitplane as bp
from pbtvm import quantize as qz
from pbtvm._tvm import tir
from pbtvm.ops.common import plane_coefficient, weight_plane_coefficient

from .activations import near_tie_rows

ALL_BITS = [*range(1, 9), 16]


@pytest.mark.parametrize("name", sorted(bp.PRESETS))
def test_pack_unpack_roundtrip_and_exact_product(name, rng):
    fmt = bp.PRESETS[name]
    n, k, b = int(rng.integers(1, 40)), int(rng.integers(1, 130)), int(rng.integers(1, 5))
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((b, k)).astype(np.float32) * 3
    q, _ = qz.quantize_weights(w, fmt)
    wp = bp.pack_weights(q, fmt)
    assert wp.shape == fmt.weight_shape(n, k) and wp.dtype == np.uint32
    np.testing.assert_array_equal(bp.unpack_weights(wp, k, fmt), q)
    xq, _ = qz.quantize_activations(x, fmt)
    xp = bp.pack_activations(xq, fmt)
    np.testing.assert_array_equal(bp.unpack_planes(xp, k, signed=True), xq)
    np.testing.assert_array_equal(bp.bitplane_matmul(wp, xp, fmt), xq.astype(np.int64) @ q.T.astype(np.int64))
    np.testing.assert_array_equal(bp.plane_rowsum(xp, fmt), xq.sum(1))


@pytest.mark.parametrize("chunk", [1, 100, 1 << 17])
def test_pack_planes_in_row_chunks_follows_the_bit_order(monkeypatch, rng, chunk):
    """pack_planes packs in row chunks (one row, 3 rows of K = 33, all at once): bit ``t`` of word
    ``w`` of plane ``p`` is bit ``nbits - 1 - p`` of ``codes[r, 32 w + t]``, written out here bit
    by bit; negative codes give their two's complement bits."""
    monkeypatch.setattr(bp.reference, "_PACK_CHUNK_ELEMS", chunk)
    for nbits, k in [(4, 33), (16, 64), (1, 5)]:
        codes = rng.integers(-(2 ** (nbits - 1)), 2 ** (nbits - 1), size=(10, k))
        planes = bp.pack_planes(codes, nbits)
        words = -(-k // 32)
        bits = np.zeros((10, words * 32), np.uint64)
        for p in range(nbits):
            bits[:, :k] = (codes >> (nbits - 1 - p)) & 1
            want = (bits.reshape(10, words, 32) << np.arange(32, dtype=np.uint64)).sum(axis=2)
            np.testing.assert_array_equal(planes[p], want.astype(np.uint32))


@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_bitlayers_truncates_low_planes(bits, offset, rng):
    fmt = bp.BitplaneFormat(bits, 8, "offset_binary" if offset else None)
    q, _ = qz.quantize_weights(rng.standard_normal((9, 70)).astype(np.float32), fmt)
    xq, _ = qz.quantize_activations(rng.standard_normal((3, 70)).astype(np.float32), fmt)
    wp, xp = bp.pack_weights(q, fmt), bp.pack_activations(xq, fmt)
    for layers in range(1, bits + 1):
        drop = bits - layers
        q_trunc = q if fmt.codebook == "bipolar" else (q.astype(np.int64) >> drop) << drop
        got = bp.bitplane_matmul(wp, xp, fmt, layers)
        np.testing.assert_array_equal(got, xq.astype(np.int64) @ q_trunc.T)


def test_offset_binary_full_range_codes(rng):
    for bits in ALL_BITS:
        fmt = bp.BitplaneFormat(bits, 16, "offset_binary")
        assert fmt.weight_code_range == (0, 2**bits - 1) and not fmt.weight_signed and fmt.has_zero_point
        q = rng.integers(0, 2**bits, size=(5, 33))
        q[0, 0], q[0, 1] = 0, 2**bits - 1
        xq = rng.integers(-(2**15), 2**15, size=(2, 33))
        wp = bp.pack_weights(q, fmt)
        np.testing.assert_array_equal(bp.unpack_weights(wp, 33, fmt), q)
        np.testing.assert_array_equal(bp.bitplane_matmul(wp, bp.pack_activations(xq, fmt), fmt), xq @ q.T)
        assert abs(int((xq @ q.T).max())) <= fmt.max_abs_accumulator(33)
        with pytest.raises(ValueError, match="out of range"):
            bp.pack_weights(np.full((1, 3), -1), fmt)


@pytest.mark.parametrize("codebook", ["twos_complement", "offset_binary"])
@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_truncation_correction_is_mean_of_dropped_bits(bits, codebook):
    """Derivation check: over all 2^k codes, dropping the low k-L bits removes (2^(k-L)-1)/2 on average."""
    fmt = bp.BitplaneFormat(bits, 8, codebook)
    lo, hi = fmt.weight_code_range
    q = np.arange(lo, hi + 1, dtype=np.int64)
    if codebook == "twos_complement":
        q = np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1))  # every bit pattern, as the derivation assumes
    for layers in range(1, bits + 1):
        drop = bits - layers
        dropped = q - ((q >> drop) << drop)
        assert dropped.min() >= 0
        assert dropped.mean() == fmt.truncation_correction(layers)


def test_full_range_codes_including_most_negative(rng):
    for bits in ALL_BITS[1:]:
        fmt = bp.BitplaneFormat(bits, 16)
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        q = rng.integers(lo, hi + 1, size=(5, 33))
        q[0, 0], q[0, 1] = lo, hi
        xq = rng.integers(-(2**15), 2**15, size=(2, 33))
        got = bp.bitplane_matmul(bp.pack_weights(q, fmt), bp.pack_activations(xq, fmt), fmt)
        np.testing.assert_array_equal(got, xq @ q.T)


@pytest.mark.parametrize("name", sorted(bp.PRESETS))
def test_tir_weight_coefficients_ask_the_format(name):
    fmt = bp.PRESETS[name]
    for p, c in enumerate(fmt.plane_coefficients()):
        assert _eval_int(weight_plane_coefficient(tir.const(p, "int32"), fmt, "int64")) == c, (name, p)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_tir_coefficients_mirror_format(bits):
    fmt = bp.BitplaneFormat(bits, 8)
    signed = fmt.codebook == "twos_complement"
    for p, c in enumerate(fmt.plane_coefficients()):
        value = _eval_int(plane_coefficient(tir.const(p, "int32"), bits, signed, "int64"))
        assert value == c, (p, value, c)
    for p, d in enumerate(fmt.act_plane_coefficients):
        assert _eval_int(plane_coefficient(tir.const(p, "int32"), 8, True, "int64")) == d


def _eval_int(expr) -> int:
    from tvm.sym.analyzer import Analyzer

    return int(Analyzer().simplify(expr))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"bits": 0}, ValueError, r"bits must be in 1\.\.16, got 0"),
        ({"bits": 17}, ValueError, r"bits must be in 1\.\.16, got 17"),
        ({"bits": 4.0}, TypeError, r"bits must be an int in 1\.\.16, got float 4\.0"),
        ({"bits": 4, "act_bits": 1}, ValueError, r"act_bits must be in 2\.\.16, got 1"),
        ({"bits": 4, "act_bits": 17}, ValueError, r"act_bits must be in 2\.\.16, got 17"),
        ({"bits": 1, "codebook": "twos_complement"}, ValueError, r"bits=1 needs the bipolar codebook"),
        ({"bits": 3, "codebook": "bipolar"}, ValueError, r"bipolar codebook is for bits=1, got bits=3"),
        ({"bits": 3, "codebook": "ternary"}, ValueError, r"codebook must be one of .*, got 'ternary'"),
        ({"bits": 4, "layout": "NWk"}, ValueError, r"layout must be one of .*, got 'NWk'"),
        ({"bits": 4, "word_dtype": "uint64"}, ValueError, r"word_dtype must be 'uint32', got 'uint64'"),
        ({"bits": 4, "version": 99}, ValueError, r"version 99 is not supported .* recompile the model"),
    ],
)
def test_format_validation(kwargs, error, message):
    """Each bad argument gets its own message, naming the argument and the value given."""
    with pytest.raises(error, match=message):
        bp.BitplaneFormat(**kwargs)


def test_format_is_frozen_hashable_and_roundtrips():
    fmt = bp.BitplaneFormat(4, 8)
    assert (fmt.name, fmt.label) == ("w4a8", "W4A8 twos_complement kNW")  # the label is for people (reprs)
    assert hash(fmt) == hash(bp.BitplaneFormat(4, 8))
    assert bp.BitplaneFormat.from_dict(fmt.to_dict()) == fmt
    with pytest.raises(AttributeError):
        fmt.bits = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="unknown"):
        bp.BitplaneFormat.from_dict({**fmt.to_dict(), "bogus": 1})


def test_bitlayers_validation():
    fmt = bp.BitplaneFormat(4, 8)
    assert fmt.check_bitlayers(None) == 4
    for bad in (0, 5, -1):
        with pytest.raises(ValueError, match="bitlayers"):
            fmt.check_bitlayers(bad)
    assert fmt.truncation_correction(4) == 0.0
    assert fmt.truncation_correction(2) == 1.5


def test_accumulator_dtype_switches_to_int64_when_needed():
    assert bp.BitplaneFormat(4, 8).accumulator_dtype(4096) == "int32"
    assert bp.BitplaneFormat(16, 16).accumulator_dtype(4096) == "int64"


def test_quantizer_errors():
    fmt = bp.BitplaneFormat(4, 8)
    with pytest.raises(TypeError, match="floating"):
        qz.quantize_weights(np.ones((2, 3), np.int32), fmt)
    with pytest.raises(ValueError, match="2-D"):
        qz.quantize_weights(np.ones(3, np.float32), fmt)
    with pytest.raises(ValueError, match="NaN"):
        qz.quantize_weights(np.full((2, 2), np.nan, np.float32), fmt)
    with pytest.raises(ValueError, match="out of range"):
        bp.pack_weights(np.full((1, 4), 9), fmt)


@pytest.mark.parametrize("act_bits", [2, 8, 16])
def test_activation_code_is_the_float32_product_rounded_to_nearest_even(act_bits, rng):
    """The reference's code is the float32 product ``x * inv`` rounded in exact arithmetic, ties to
    even, near halves too (where ``floor(p + 0.5)`` in float32 rounds twice: 0.49999997 to 1)."""
    fmt = bp.BitplaneFormat(4, act_bits)
    x = near_tie_rows(rng, 3, 300, fmt)
    xq, _ = qz.quantize_activations(x, fmt)
    qmax = np.float32(fmt.act_qmax)
    for row in range(3):
        inv = qmax / np.float32(np.abs(x[row]).max())
        products = x[row] * inv  # float32, as the kernels compute it
        want = [min(max(round(Fraction(float(p))), -int(qmax)), int(qmax)) for p in products]  # ties to even
        np.testing.assert_array_equal(xq[row], want, err_msg=f"row {row}")
    if fmt.act_qmax >= 3:
        assert list(xq[0, 1:6]) == [0, 0, 0, -2, 2]


def test_activation_codes_of_extreme_rows():
    """A finite row holding FLT_MAX keeps a finite scale; rows below qmax / FLT_MAX get their codes
    (their inverse scale overflowed: every code +-qmax, zeros NaN); an infinite entry gets +-qmax."""
    fmt, big = bp.BitplaneFormat(4, 8), np.finfo(np.float32).max
    x = np.array(
        [[big, 1e37, 0, -1], [1e-38, 5e-39, 0, -2e-39], [np.inf, 1, -np.inf, 0], [1e-45, 0, -1e-45, 0]], np.float32
    )
    xq, scale = qz.quantize_activations(x, fmt)
    np.testing.assert_array_equal(xq, [[127, 4, 0, 0], [127, 64, 0, -25], [127, 0, -127, 0], [127, 0, -127, 0]])
    assert np.isfinite(scale[0]) and scale[0] == np.float32(np.nextafter(big, np.float32(0)) / np.float32(127))
    assert scale[1] == np.float32(np.float32(1e-38) / np.float32(127)) and scale[2] == np.inf


def test_activation_quantizer_is_dynamic_and_does_not_wrap(rng):
    fmt = bp.BitplaneFormat(4, 8)
    x = rng.standard_normal((3, 50)).astype(np.float32) * np.array([[1e-3], [1.0], [1e4]], np.float32)
    xq, scale = qz.quantize_activations(x, fmt)
    # one scale per row, each row's max|x| on the top code: a scale for the whole batch fails both
    np.testing.assert_array_equal(np.abs(xq).max(axis=1), fmt.act_qmax)
    assert np.all(np.abs(xq * scale[:, None] - x) <= 0.5 * scale[:, None] * (1 + 1e-6))
    xq0, s0 = qz.quantize_activations(np.zeros((1, 5), np.float32), fmt)
    assert not xq0.any() and s0[0] == 0
