"""The data-free weight quantizers: clip search, offset-binary codes, codebook choice, reference epilogue."""

from __future__ import annotations

import dataclasses
import itertools
import warnings

import numpy as np
import pytest

from pbtvm import bitplane as bp
from pbtvm import quantize as qz
from pbtvm import weight_fit


def _weights(rng, n=24, k=96):
    w = rng.standard_normal((n, k)) * np.exp(rng.standard_normal((n, 1)) * 0.5)
    w[0] = 0.0  # all-zero row
    w[1] = 0.25  # constant row
    w[2] = np.abs(w[2]) + 1.0  # one-signed row far from 0
    w[3, :5] *= 20  # outliers
    return w.astype(np.float32)


def _sse(w, q, s, fmt):
    return ((w.astype(np.float64) - qz.dequantize_weights(q, s, fmt)) ** 2).sum(axis=1)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_mse_search_never_worse_than_max_scaling(bits, rng):
    w = _weights(rng)
    for codebook in qz._candidates(bits):
        fmt = bp.BitplaneFormat(bits, 8, codebook)
        q, s = qz.quantize_weights(w, fmt)
        lo, hi = fmt.weight_code_range
        assert q.dtype == np.int32 and q.min() >= lo and q.max() <= hi
        assert s.shape == fmt.scale_shape(w.shape[0]) and s.dtype == np.float32
        np.testing.assert_array_equal(bp.unpack_weights(bp.pack_weights(q, fmt), w.shape[1], fmt), q)
        q0, s0 = qz.quantize_weights(w, fmt, method="max")
        # offset binary may keep the centred zero point at up to CENTER_MARGIN more error than the
        # free fit, which itself starts from the max-range candidate
        slack = 1 / (1 - weight_fit.CENTER_MARGIN) if codebook == "offset_binary" and bits > 1 else 1.0
        assert np.all(_sse(w, q, s, fmt) <= _sse(w, q0, s0, fmt) * slack * (1 + 1e-6) + 1e-12), codebook


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_offset_binary_is_at_least_as_good_as_the_symmetric_code(bits, rng):
    w = _weights(rng)
    sym = bp.BitplaneFormat(bits, 8)
    off = dataclasses.replace(sym, codebook="offset_binary")
    e_sym = _sse(w, *qz.quantize_weights(w, sym), sym).sum()
    e_off = _sse(w, *qz.quantize_weights(w, off), off).sum()
    assert e_off <= e_sym * 1.0001
    if bits == 2:  # four levels instead of three: clearly better on Gaussian rows
        assert e_off < 0.8 * e_sym


def test_centred_zero_point_unless_a_free_one_is_clearly_better(rng):
    """Symmetric rows keep z = (2^k - 1) / 2 (signs kept); a clearly one-sided row gets its own z."""
    fmt = bp.BitplaneFormat(2, 8, "offset_binary")
    w = rng.standard_normal((4, 400)).astype(np.float32)
    w[3] = np.abs(w[3]) + 0.5  # one-sided: a centred grid wastes half its levels
    q, params = qz.quantize_weights(w, fmt)
    np.testing.assert_allclose(params[1, :3], 1.5)
    assert abs(params[1, 3] - 1.5) > 0.5
    signs = np.sign(qz.dequantize_weights(q, params, fmt)[:3])
    assert np.all(signs == np.where(w[:3] >= 0, 1, -1))


def test_bipolar_scale_of_huge_finite_weights_is_finite():
    """mean|w| summed in float32 overflowed to inf for a finite row of +-3e37 (W1)."""
    w = np.full((1, 64), 3e37, np.float32) * np.where(np.arange(64) % 2, 1, -1).astype(np.float32)
    _, scale = qz.quantize_weights(w, bp.BitplaneFormat(1, 8))
    np.testing.assert_allclose(scale, [3e37], rtol=1e-6)


@pytest.mark.parametrize("method", ["mse", "max"])
def test_one_bit_offset_binary_step_past_float32_is_refused(method):
    """At one offset-binary bit the step is the row's span: a finite row of +-3e38 got an infinite
    scale (numpy's overflow warning only), every output of that row inf or NaN."""
    w = np.ones((3, 64), np.float32)
    w[1] = 3e38 * np.where(np.arange(64) % 2, 1, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the error, not numpy's RuntimeWarning
        with pytest.raises(ValueError, match=r"weight row 1 spans -3e\+38\.\.3e\+38 .*1-bit offset-binary step"):
            qz.quantize_weights(w, bp.BitplaneFormat(1, 8, "offset_binary"), method)
        for fmt in (bp.BitplaneFormat(1, 8), bp.BitplaneFormat(2, 8, "offset_binary")):  # finite steps
            _, scale = qz.quantize_weights(w, fmt, method)
            assert np.isfinite(scale).all()


def test_constant_and_zero_rows_are_exact(rng):
    w = _weights(rng)
    for bits in (1, 2, 4):
        fmt = bp.BitplaneFormat(bits, 8, "offset_binary")
        q, s = qz.quantize_weights(w, fmt)
        np.testing.assert_allclose(qz.dequantize_weights(q, s, fmt)[:2], w[:2], atol=1e-7)


@pytest.mark.parametrize("method", ["mse", "max"])
def test_a_row_of_denormals_quantizes_without_a_warning(method, rng):
    """A row whose scale falls below float32's smallest denormal (1e-41 at 16 bits) divided by a
    zero scale: numpy warned "divide by zero" from inside the fit. Its codes are 0 now."""
    w = rng.standard_normal((3, 16)).astype(np.float32)
    w[1] = 1e-41
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for qmax in (1, 127, 32767):
            q, s = weight_fit.fit_symmetric(w, qmax, method)
            assert np.isfinite(s).all() and (s[1] > 0 or not q[1].any())


def test_two_level_fit_is_the_exact_optimum(rng):
    """Brute force over every threshold split of small rows (sorted: every 2-level optimum is a split)."""
    w = rng.standard_normal((6, 9)).astype(np.float32)
    q, s, z = weight_fit.fit_two_level(w)
    approx = s[:, None] * (q - z[:, None])
    for row in range(w.shape[0]):
        best = np.inf
        for mask in itertools.product([0, 1], repeat=w.shape[1]):
            m = np.array(mask, bool)
            if m.all() or not m.any():
                continue
            lvl = np.where(m, w[row][m].mean(), w[row][~m].mean())
            best = min(best, float(((w[row] - lvl) ** 2).sum()))
        got = float(((w[row].astype(np.float64) - approx[row]) ** 2).sum())
        assert got <= best * (1 + 1e-5) + 1e-9


def test_choose_codebook_rule(rng):
    w = _weights(rng)
    fmt = bp.BitplaneFormat(2, 8)
    name, quantized = qz.choose_codebook([w], fmt)
    errors = {c: _sse(w, *quantized[c][0], dataclasses.replace(fmt, codebook=c)).sum() for c in quantized}
    assert name == min(errors, key=errors.get) == "offset_binary"
    # a ternary matrix is coded exactly by both: the tie goes to the code without a zero point
    tern = rng.integers(-1, 2, size=(8, 40)).astype(np.float32) * 0.5
    tern[:, 0], tern[:, 1] = 0.5, -0.5
    assert qz.choose_codebook([tern], fmt)[0] == "twos_complement"
    assert qz.choose_codebook([w], bp.BitplaneFormat(1, 8))[0] == "bipolar"  # k = 1: the sign code, always
    f, [(q, s)] = qz.layer_format([w], fmt, "twos_complement")
    assert f.codebook == "twos_complement" and s.shape == (w.shape[0],)
    assert qz.layer_format([w], fmt, None)[0] == fmt
    with pytest.raises(ValueError, match="codebook"):
        qz.check_codebook("ternary", 2)
    with pytest.raises(ValueError, match="bipolar"):
        qz.check_codebook("bipolar", 3)
    with pytest.raises(ValueError, match="quantizer"):
        qz.check_codebook("auto", 3, "minmax")


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_reference_epilogue_with_zero_point(bits, rng):
    """pb_linear_reference = dequantized weights times dequantized activations (all planes), and the
    truncated product plus the midpoint correction, for offset-binary codes."""
    fmt = bp.BitplaneFormat(bits, 8, "offset_binary")
    w = _weights(rng, 11, 70)
    x = rng.standard_normal((3, 70)).astype(np.float32)
    bias = rng.standard_normal(11).astype(np.float32)
    q, params = qz.quantize_weights(w, fmt)
    wp = bp.pack_weights(q, fmt)
    xq, xs = qz.quantize_activations(x, fmt)
    want = (xq * xs[:, None].astype(np.float64)) @ qz.dequantize_weights(q, params, fmt).astype(np.float64).T + bias
    got = qz.pb_linear_reference(x, wp, params, bias, fmt)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    for layers in range(1, bits):
        drop = bits - layers
        q_mid = ((q.astype(np.float64) // 2**drop) * 2**drop) + fmt.truncation_correction(layers)
        want = (xq * xs[:, None]) @ (params[0][:, None] * (q_mid - params[1][:, None])).T + bias
        got = qz.pb_linear_reference(x, wp, params, bias, fmt, layers)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    with pytest.raises(ValueError, match="w_scale"):
        qz.pb_linear_reference(x, wp, params[0], bias, fmt)


@pytest.mark.parametrize("codebook", ["twos_complement", "offset_binary", "bipolar"])
def test_importance_weights_ignore_inactive_inputs(codebook, rng):
    """With calibration statistics, inputs that are never active stop pulling the fit: the result
    on the active columns equals fitting those columns alone (up to the 1e-3 floor)."""
    bits = 1 if codebook == "bipolar" else 2
    fmt = bp.BitplaneFormat(bits, 8, codebook)
    alive = rng.standard_normal((16, 48)).astype(np.float32)
    w = np.concatenate([alive, 5 + 3 * rng.standard_normal((16, 16)).astype(np.float32)], axis=1)
    importance = np.concatenate([np.ones(48), np.zeros(16)])
    q_w, s_w = qz.quantize_weights(w, fmt, importance=importance)
    q_a, s_a = qz.quantize_weights(alive, fmt)
    err_w = ((alive - qz.dequantize_weights(q_w, s_w, fmt)[:, :48]) ** 2).sum()
    err_a = ((alive - qz.dequantize_weights(q_a, s_a, fmt)) ** 2).sum()
    err_plain = ((alive - qz.dequantize_weights(*qz.quantize_weights(w, fmt), fmt)[:, :48]) ** 2).sum()
    assert err_w <= err_a * 1.05 and err_w < 0.8 * err_plain
    with pytest.raises(ValueError, match="importance"):
        qz.quantize_weights(w, fmt, importance=np.ones(3))


@pytest.mark.parametrize("codebook", ["twos_complement", "offset_binary"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("power", [30.0, 1e4, 1e7])
def test_importance_never_worse_than_data_free(codebook, bits, power, rng):
    """The calibrated fit minimizes the weighted error: row by row it is no worse there than the
    data-free fit, also when one input dominates the statistics (its mean square ``power`` times
    the others', a small weight on it: the columns over 1 % of the mean were that input alone,
    whose range clipped every other weight: W8 error 2.5 -> 306)."""
    fmt = bp.BitplaneFormat(bits, 8, codebook)
    w = (0.5 * rng.standard_normal((32, 64))).astype(np.float32)
    w[:, 0] = 0.01 * rng.standard_normal(32)
    importance = np.ones(64)
    importance[0] = power

    weights = weight_fit.column_weights(importance, 64)  # what the fit minimizes (normalized, floored)

    def row_errors(imp):
        q, s = qz.quantize_weights(w, fmt, importance=imp)
        return ((qz.dequantize_weights(q, s, fmt).astype(np.float64) - w) ** 2) @ weights

    calibrated, data_free = row_errors(importance), row_errors(None)
    assert np.all(calibrated <= data_free * (1 + 1e-6) + 1e-12)


@pytest.mark.parametrize("codebook", ["twos_complement", "offset_binary", "bipolar"])
def test_max_quantizer_ignores_importance(codebook, rng):
    """``method="max"`` takes each row's full range, with or without calibration statistics."""
    fmt = bp.BitplaneFormat(1 if codebook == "bipolar" else 4, 8, codebook)
    w = rng.standard_normal((8, 32)).astype(np.float32)
    importance = np.concatenate([np.ones(16), np.zeros(16)])
    for got, want in zip(
        qz.quantize_weights(w, fmt, "max", importance), qz.quantize_weights(w, fmt, "max"), strict=True
    ):
        np.testing.assert_array_equal(got, want)


def test_compile_with_calibration_uses_input_statistics():
    import torch

    import pbtvm
    from pbtvm.calibration import input_importance
    from pbtvm.lowering import weight_key

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5)).eval()
    batches = [torch.randn(8, 24) * torch.linspace(0, 2, 24) for _ in range(3)]  # input 0 never active
    m = pbtvm.compile(model, (batches[0],), "llvm", bits=2, calibration=batches)
    assert m.manifest["quantizer"]["calibrated"]
    imp = input_importance(model, batches)
    x = batches[0].numpy()
    h = x
    for i, layer in enumerate([model[0], model[2]]):
        w = layer.weight.detach().numpy()
        assert imp[weight_key(w)].shape == (w.shape[1],)
        fmt, [(q, s)] = qz.layer_format([w], bp.BitplaneFormat(2, 8), "auto", "mse", [imp[weight_key(w)]])
        h = qz.pb_linear_reference(h, bp.pack_weights(q, fmt), s, layer.bias.detach().numpy(), fmt)
        h = np.maximum(h, 0) if i == 0 else h
    np.testing.assert_allclose(m(x), h, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no batch"):
        input_importance(model, [])
    # Linears with equal weights share one quantization: their inputs are pooled (the last one won)
    twin = torch.nn.Linear(24, 16)
    twin.load_state_dict(model[0].state_dict())
    pair = torch.nn.Sequential(model[0], torch.nn.Linear(16, 24), twin).eval()
    x = torch.randn(8, 24)
    with torch.no_grad():
        between = pair[1](pair[0](x)).numpy().astype(np.float64)
    pooled = input_importance(pair, [x])[weight_key(model[0].weight.detach().numpy())]
    want = ((x.numpy().astype(np.float64) ** 2).sum(0) + (between**2).sum(0)) / 16
    np.testing.assert_allclose(pooled, want, rtol=1e-5)


def test_weights_past_float32_range_are_named_as_such():
    """A finite float64 weight of 1e300 was reported as 'NaN or Inf' (its float32 cast is inf)."""
    big = np.ones((2, 3))
    big[1, 2] = 1e300
    with pytest.raises(ValueError, match=r"weights exceed float32's range \(largest \|w\| 1e\+300\)"):
        qz.checked_weights(big)
    big[1, 2] = np.nan
    with pytest.raises(ValueError, match="weights contain NaN or Inf"):
        qz.checked_weights(big)
    assert qz.checked_weights(np.ones((2, 3))).dtype == np.float32


@pytest.mark.parametrize("bits", [1, 3])
def test_fits_in_row_chunks_on_threads_equal_the_fit_in_one(monkeypatch, rng, bits):
    """Large matrices are fitted in row chunks on several threads (the fit is most of a large
    model's compile time); the chosen codebook and every code and scale are those of one chunk on
    one thread, for every codebook, with and without column weights."""
    weights = [rng.standard_normal((96, 80)).astype(np.float32), rng.standard_normal((97, 40)).astype(np.float32)]
    weights[0][5] = 0.0  # an all-zero row
    importances = [rng.random(80), None]
    fmt = bp.BitplaneFormat(bits, 8)
    monkeypatch.setenv("TVM_NUM_THREADS", "3")
    monkeypatch.setattr(weight_fit, "FIT_PARALLEL_MIN", 1 << 30)
    assert weight_fit.fit_threads(96 * 80) == 1
    alone = qz.choose_codebook(weights, fmt, "mse", importances)
    offset = [weight_fit.fit_offset_binary(w, bits, "mse", imp) for w, imp in zip(weights, importances, strict=True)]
    monkeypatch.setattr(weight_fit, "FIT_PARALLEL_MIN", 0)
    monkeypatch.setattr(weight_fit, "_CHUNK_ELEMS", 640)  # chunks of 8 rows (K = 80), 16 rows (K = 40)
    assert weight_fit.fit_threads(96 * 80) == 3 and len(weight_fit._chunks(96, 80, 3)) == 12
    threaded = qz.choose_codebook(weights, fmt, "mse", importances)
    assert threaded[0] == alone[0]
    for name, fits in alone[1].items():
        for (q, s), (tq, ts) in zip(fits, threaded[1][name], strict=True):
            np.testing.assert_array_equal(tq, q)
            np.testing.assert_array_equal(ts, s)
    for (q, p), w, imp in zip(offset, weights, importances, strict=True):  # k = 1: the two-level fit
        tq, tp = weight_fit.fit_offset_binary(w, bits, "mse", imp)
        np.testing.assert_array_equal(tq, q)
        np.testing.assert_array_equal(tp, p)
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    assert weight_fit.fit_threads(96 * 80) == 1


def test_row_squared_errors_in_chunks_on_threads(monkeypatch, rng):
    """choose_codebook's error: per row, in row chunks on several threads (weighted and not), equal
    to the whole-matrix float64 formula to rounding."""
    w = rng.standard_normal((50, 70)).astype(np.float32)
    approx = np.round(w * 2) / 2
    c = weight_fit.column_weights(rng.random(70), 70)
    monkeypatch.setenv("TVM_NUM_THREADS", "3")
    monkeypatch.setattr(weight_fit, "FIT_PARALLEL_MIN", 0)
    monkeypatch.setattr(weight_fit, "_CHUNK_ELEMS", 700)  # 10 rows a chunk: 5 chunks
    for cols in (None, c):
        got = weight_fit.row_squared_errors(w, lambda rows: approx[rows], cols)
        d = (w.astype(np.float64) - approx) ** 2
        np.testing.assert_allclose(got, d.sum(1) if cols is None else d @ cols, rtol=1e-12)
