"""TE operators compiled for the CPU equal the numpy reference exactly (integers) or closely.

The popcount kernels are forced (``PBTVM_CPU_KERNEL=popcount``): on AVX2 and AVX-512 CPUs the
rules would replace the TE GEMM by the byte-code kernels, which ``test_cpu_avx2.py`` and
``test_cpu_vnni.py`` check against the same reference.
"""

from __future__ import annotations

import numpy as np
import pytest

from pbtvm import bitplane as bp
from pbtvm import kernels
from pbtvm import quantize as qz
from pbtvm._tvm import tvm
from pbtvm.target import resolve_target

from .activations import extreme_rows, near_tie_rows

CPU = resolve_target("llvm")


@pytest.fixture(autouse=True)
def _popcount_kernels(monkeypatch):
    monkeypatch.setenv("PBTVM_CPU_KERNEL", "popcount")


BITS = [*range(1, 9), 16]
ACT_BITS = [2, 4, 8, 16]


def _t(a: np.ndarray):
    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())


def _problem(rng, fmt):
    n = int(rng.integers(1, 48)) | 1  # odd N
    k = int(rng.integers(1, 200))
    if k % 32 == 0:
        k += int(rng.integers(1, 31))  # K not a multiple of 32
    b = int(rng.integers(1, 6))
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = (rng.standard_normal((b, k)) * rng.uniform(0.1, 10)).astype(np.float32)
    q, ws = qz.quantize_weights(w, fmt)
    xq, xs = qz.quantize_activations(x, fmt)
    return n, k, b, w, x, q, ws, xq, xs


@pytest.mark.parametrize("codebook", [None, "offset_binary"])
@pytest.mark.parametrize("act_bits", ACT_BITS)
@pytest.mark.parametrize("bits", BITS)
def test_int_product_exact(bits, act_bits, codebook, rng):
    fmt = bp.BitplaneFormat(bits, act_bits, codebook)
    n, k, b, _, _, q, _, xq, _ = _problem(rng, fmt)
    wp, xp = bp.pack_weights(q, fmt), bp.pack_activations(xq, fmt)
    rowsum = xq.sum(1).astype(fmt.accumulator_dtype(k))
    kern = kernels.build(kernels.int_product_func(fmt, n, k), CPU)
    out = _t(np.full((b, n), -7, fmt.accumulator_dtype(k)))
    kern(_t(xp), _t(rowsum), _t(wp), bits, out)
    np.testing.assert_array_equal(out.numpy(), xq.astype(np.int64) @ q.T.astype(np.int64))
    for layers in range(1, bits + 1):  # one kernel serves every precision
        kern(_t(xp), _t(rowsum), _t(wp), layers, out)
        np.testing.assert_array_equal(
            out.numpy(), bp.bitplane_matmul(wp, xp, fmt, layers), err_msg=f"bitlayers={layers}"
        )


@pytest.mark.parametrize("layers", [0, 4])
def test_a_kernel_refuses_bitlayers_beyond_its_planes(layers):
    """The product reads plane min(i, bits - 1): bitlayers > bits would add the last plane again,
    so every PB kernel checks 1 <= bitlayers <= bits on entry (compiled models and kernels.build)."""
    fmt = bp.BitplaneFormat(3, 8)
    kern = kernels.build(kernels.int_product_func(fmt, 5, 40), CPU)
    args = [
        np.zeros((8, 2, fmt.words(40)), np.uint32),
        np.zeros(2, np.int32),
        np.zeros(fmt.weight_shape(5, 40), np.uint32),
    ]
    with pytest.raises(ValueError, match=r"bitlayers must be in 1\.\.3"):
        kern(*(_t(a) for a in args), layers, _t(np.zeros((2, 5), np.int32)))


@pytest.mark.parametrize("name", ["w4a8", "w4a8-NkW", "w1a8", "w16a16", "w1a8o", "w4a8o-NkW", "w16a16o"])
def test_int_product_layouts_and_codebooks(name, rng):
    fmt = bp.PRESETS[name]
    n, k, b, _, _, q, _, xq, _ = _problem(rng, fmt)
    wp, xp = bp.pack_weights(q, fmt), bp.pack_activations(xq, fmt)
    kern = kernels.build(kernels.int_product_func(fmt, n, k), CPU)
    out = _t(np.zeros((b, n), fmt.accumulator_dtype(k)))
    kern(_t(xp), _t(xq.sum(1).astype(fmt.accumulator_dtype(k))), _t(wp), fmt.bits, out)
    np.testing.assert_array_equal(out.numpy(), xq.astype(np.int64) @ q.T.astype(np.int64))


@pytest.mark.parametrize("act_bits", ACT_BITS)
def test_act_pack_bit_exact(act_bits, rng):
    fmt = bp.BitplaneFormat(4, act_bits)
    _, k, b, _, x, _, _, _, _ = _problem(rng, fmt)
    x[0, : min(3, k)] = 0.0
    if b > 1:
        x[1] = 0.0  # an all-zero row: scale 0, codes 0
    xq, xs = qz.quantize_activations(x, fmt)
    kern = kernels.build(kernels.act_pack_func(fmt, k), CPU)
    xp = _t(np.full((act_bits, b, fmt.words(k)), 0xDEADBEEF, np.uint32))
    scale = _t(np.full(b, -1, np.float32))
    rowsum = _t(np.full(b, -1, fmt.accumulator_dtype(k)))
    kern(_t(x), xp, scale, rowsum)
    np.testing.assert_array_equal(xp.numpy(), bp.pack_activations(xq, fmt))
    np.testing.assert_array_equal(scale.numpy(), xs)
    np.testing.assert_array_equal(rowsum.numpy(), xq.sum(1))


@pytest.mark.parametrize("act_bits", ACT_BITS)
def test_act_pack_rounds_as_the_reference_near_halves(act_bits, rng):
    """Products a few ulps from ``m + 0.5``: the codes were ``floor(x * inv + 0.5)``, which LLVM
    fused into one multiply-add (one rounding, the reference two), so such values got other codes."""
    fmt = bp.BitplaneFormat(4, act_bits)
    k = 1000
    x = np.concatenate([near_tie_rows(rng, 4, k, fmt), extreme_rows(rng, k)])  # and extreme ranges
    b = x.shape[0]
    xq, xs = qz.quantize_activations(x, fmt)
    kern = kernels.build(kernels.act_pack_func(fmt, k), CPU)
    xp = _t(np.zeros((act_bits, b, fmt.words(k)), np.uint32))
    scale, rowsum = _t(np.zeros(b, np.float32)), _t(np.zeros(b, fmt.accumulator_dtype(k)))
    kern(_t(x), xp, scale, rowsum)
    np.testing.assert_array_equal(rowsum.numpy(), xq.sum(1))
    np.testing.assert_array_equal(xp.numpy(), bp.pack_activations(xq, fmt))
    np.testing.assert_array_equal(scale.numpy(), xs)


@pytest.mark.parametrize("codebook", [None, "offset_binary"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_dense_matches_float_reference(bits, codebook, rng):
    """Float epilogue: relative tolerance 1e-5 against the float64 reference of the same steps
    (with offset binary: the per-row zero point term, at every bitlayers)."""
    fmt = bp.BitplaneFormat(bits, 8, codebook)
    n, k, b, _, x, q, ws, xq, xs = _problem(rng, fmt)
    bias = rng.standard_normal(n).astype(np.float32)
    wp, xp = bp.pack_weights(q, fmt), bp.pack_activations(xq, fmt)
    kern = kernels.build(kernels.dense_func(fmt, n, k, bias=True), CPU)
    y = _t(np.full((b, n), np.nan, np.float32))
    for layers in range(1, bits + 1):
        kern(_t(xp), _t(xs), _t(xq.sum(1).astype(fmt.accumulator_dtype(k))), _t(wp), _t(ws), _t(bias), layers, y)
        ref = qz.pb_linear_reference(x, wp, ws, bias, fmt, layers)
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("codebook", [None, "offset_binary"])
@pytest.mark.parametrize("huge", ["activations", "weights"])
def test_dense_outputs_of_huge_operands_stay_finite(huge, codebook, rng, monkeypatch):
    """The epilogue's ``s_x * (acc + ...)`` is ``y / s_w``: with huge activations it overflowed
    float32 and outputs of ~1e35 (finite in torch and in the float64 reference) came out +-inf.
    Scaling by ``s_w`` first instead overflows for huge weights (W8A16, weights ~3e33). Both
    CPU kernels (quantize + GEMM in one, and the popcount GEMM) keep either finite."""
    fmt = bp.BitplaneFormat(8, 8 if huge == "activations" else 16, codebook)
    n, k = 8, 1000
    w = rng.standard_normal((n, k)).astype(np.float32) * np.float32(1.0 if huge == "activations" else 3e33)
    q, ws = qz.quantize_weights(w, fmt)
    wp, bias = bp.pack_weights(q, fmt), rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((4, k)).astype(np.float32)
    amax = [[1e34], [1e36], [3e36], [1.0]] if huge == "activations" else [[1e-3], [3e-3], [1e-2], [1e-4]]
    x = (x / np.abs(x).max(1, keepdims=True) * np.array(amax)).astype(np.float32)
    ref = qz.pb_linear_reference(x, wp, ws, bias, fmt)
    assert np.isfinite(ref).all() and np.abs(ref).max() > 1e32  # ~1e35 overflowed before
    kerns = [kernels.build(kernels.dense_act_func(fmt, n, k, True), CPU)]
    monkeypatch.setenv("PBTVM_CPU_KERNEL", "popcount")
    kerns.append(kernels.build(kernels.dense_act_func(fmt, n, k, True), CPU))
    for kern in kerns:
        y = _t(np.full((4, n), np.nan, np.float32))
        kern(_t(x), _t(wp), _t(ws), _t(bias), 8, y)
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5)


@pytest.mark.parametrize(
    ("bits", "act_bits", "layout", "bias"),
    [(1, 8, "kNW", True), (4, 8, "kNW", False), (3, 16, "NkW", True), (16, 16, "kNW", True)],
)
@pytest.mark.parametrize("codebook", [None, "offset_binary"])
def test_dense_with_pack_in_one_kernel_matches_reference(bits, act_bits, layout, bias, codebook, rng):
    """``pb_dense_act`` (pack + PB GEMM in one PrimFunc) equals the float reference like the pair."""
    fmt = bp.BitplaneFormat(bits, act_bits, codebook, layout=layout)
    n, k, b, _, x, q, ws, _, _ = _problem(rng, fmt)
    wp = bp.pack_weights(q, fmt)
    bias_v = rng.standard_normal(n).astype(np.float32) if bias else None
    kern = kernels.build(kernels.dense_act_func(fmt, n, k, bias=bias), CPU)
    y = _t(np.full((b, n), np.nan, np.float32))
    for layers in sorted({1, bits}):
        kern(_t(x), _t(wp), _t(ws), *([_t(bias_v)] if bias else []), layers, y)
        ref = qz.pb_linear_reference(x, wp, ws, bias_v, fmt, layers)
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("codebook", [None, "offset_binary"])
def test_truncation_correction_reduces_error(codebook, rng):
    """Dropping planes with the midpoint correction beats plain truncation on average."""
    fmt = bp.BitplaneFormat(8, 8, codebook)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    x = np.abs(rng.standard_normal((8, 256))).astype(np.float32)  # one-signed rows expose the bias
    q, ws = qz.quantize_weights(w, fmt)
    wp = bp.pack_weights(q, fmt)
    xq, xs = qz.quantize_activations(x, fmt)
    exact = x @ w.T
    corrected = qz.pb_linear_reference(x, wp, ws, None, fmt, 4)
    acc = bp.bitplane_matmul(wp, bp.pack_activations(xq, fmt), fmt, 4).astype(np.float64)
    if fmt.has_zero_point:  # plain truncation still subtracts the zero point: only the correction differs
        acc -= ws[1][None, :] * xq.sum(1)[:, None]
        ws = ws[0]
    plain = acc * xs[:, None] * ws[None, :]
    assert np.abs(corrected - exact).mean() < 0.5 * np.abs(plain - exact).mean()
