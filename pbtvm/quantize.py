"""Quantizers (numpy): per-channel weights at compile time, per-row activations at run time.

No retraining, and calibration data only if given: weights get a per-output-channel scale (and,
for the offset-binary codebook, a zero point) found by a clipping search minimizing the weight MSE
(:mod:`pbtvm.weight_fit`), or the MSE weighted by each input's mean square over calibration batches
(:mod:`pbtvm.calibration`); ``method="max"`` keeps the original max-scaled round-to-nearest;
:func:`choose_codebook` picks the codebook of a layer. Activations get a dynamic per-row scale
computed from the row's own max, so nothing wraps (the paper's code used unscaled fixed point,
which overflows on large activations).

The activation code is the float32 product ``x * inv_scale`` (``inv_scale`` = ``act_qmax / amax``,
float32) rounded to the nearest integer, ties to even (``np.rint``; the kernels' ``nearbyint``,
:func:`pbtvm.ops.common.act_code`): one exact rounding of the product that no code generator can
fuse with another operation, so every target computes the same codes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import weight_fit
from .bitplane import BitplaneFormat, bitplane_matmul, pack_activations, plane_rowsum
from .errors import InputError, InputTypeError

#: Weight quantization methods: clip search minimizing the weight MSE, or the original max scaling.
METHODS = ("mse", "max")
#: Activation rows (:func:`quantize_activations`; the kernels' :mod:`pbtvm.ops.common` reads these):
#: a row whose max |x| is below ``TINY_ROW`` is multiplied by ``TINY_ROW_SCALE`` (a power of two:
#: exact) before its codes, so that ``qmax / max|x|`` stays finite (it overflowed to inf for rows
#: below ``qmax / FLT_MAX``, ~4e-37 at 8 bits); a finite value counts as at most ``FINITE_TOP``,
#: the float32 below FLT_MAX, which is left to mean +-inf.
TINY_ROW = 2.0**-64
TINY_ROW_SCALE = 2.0**64
FINITE_TOP = np.nextafter(np.finfo(np.float32).max, np.float32(0))
#: ``codebook`` values the compile functions take: a codebook name, or "auto" (see :func:`choose_codebook`).
AUTO = "auto"
#: Relative MSE margin within which :func:`choose_codebook` prefers the codebook without zero point.
TIE_MARGIN = 1e-3

__all__ = [
    "AUTO",
    "METHODS",
    "check_codebook",
    "checked_weights",
    "choose_codebook",
    "dequantize_weights",
    "layer_format",
    "quantize_weights",
    "quantize_activations",
    "pb_linear_reference",
    "pb_lstm_cell_reference",
    "pb_lstm_cell_input_reference",
]


def checked_weights(w: np.ndarray) -> np.ndarray:
    """``w`` as float32 [N, K], or an :class:`InputError` saying what is wrong with it.

    Raises
    ------
    InputError
        ``w`` is not 2-D, holds NaN or Inf, or values past float32's range; :class:`InputTypeError`
        if it is not floating point.
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise InputError(f"weights must be 2-D [N, K], got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise InputTypeError(f"weights must be floating point, got {w.dtype}")
    if not np.all(np.isfinite(w)):
        raise InputError("weights contain NaN or Inf")
    with np.errstate(over="ignore"):  # named below
        w32 = w.astype(np.float32)
    if w.dtype != np.float32 and not np.all(np.isfinite(w32)):  # a float64 weight past float32's range
        raise InputError(
            f"weights exceed float32's range (largest |w| {np.abs(w).max():.3g}); PB layers quantize in float32"
        )
    return w32


def quantize_weights(
    w: np.ndarray, fmt: BitplaneFormat, method: str = "mse", importance: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a float weight matrix per output channel in ``fmt.codebook``.

    Parameters
    ----------
    w : np.ndarray, float, shape [N, K]
        Weight matrix (``nn.Linear.weight`` layout: out x in).
    fmt : BitplaneFormat
    method : str
        ``"mse"`` (default): per-row clip / scale search minimizing the weight MSE, see
        :mod:`pbtvm.weight_fit`. ``"max"``: the original quantizer (two's complement
        ``s = max|w| / qmax``; offset binary the full ``[min, max]`` range), round to nearest.
    importance : np.ndarray, float, [K], optional
        Per-input weights of the squared error, e.g. the mean square of each input over
        calibration data (:func:`pbtvm.weight_fit.column_weights`); None: plain weight MSE. Rows
        keep the unweighted fit where it has the lower weighted error. ``"max"`` ignores it
        (bipolar takes the weighted mean of ``|w|``).

    Returns
    -------
    q : np.ndarray, int32, shape [N, K]
        Codes in ``fmt.weight_code_range``: symmetric ``-(2^(k-1)-1)..2^(k-1)-1`` for two's
        complement; ``+-1`` for bipolar; ``0..2^k-1`` for offset binary.
    scale : np.ndarray, float32, shape ``fmt.scale_shape(N)``
        ``[N]``: ``w ~= q * scale[:, None]`` (bipolar ``s = mean|w|``, the least-squares scale for
        sign codes). ``[2, N]`` for offset binary: ``w ~= scale[0, :, None] * (q - scale[1, :, None])``.
        All-zero rows get scale 0.
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    w = checked_weights(w)
    if fmt.codebook == "bipolar":
        return weight_fit.fit_bipolar(w, importance if method == "mse" else None)
    if fmt.codebook == "offset_binary":
        with np.errstate(over="ignore"):  # named below
            q, params = weight_fit.fit_offset_binary(w, fmt.bits, method, importance)
        _check_steps(w, params[0], fmt)
        return q, params
    if method == "mse":
        return weight_fit.fit_symmetric(w, fmt.weight_qmax, importance=importance)
    qmax = fmt.weight_qmax
    scale = (np.abs(w).max(axis=1) / qmax).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.round(w / safe[:, None]), -qmax, qmax).astype(np.int32)
    return q, scale


def _check_steps(w: np.ndarray, steps: np.ndarray, fmt: BitplaneFormat) -> None:
    """Raise InputError where a row's code step overflowed float32: at one offset-binary bit the step
    is the row's whole span, past ``FLT_MAX`` for rows holding both ~+-2e38 (inf: every output of
    that row inf or NaN)."""
    bad = np.flatnonzero(~np.isfinite(steps))
    if bad.size:
        row = w[bad[0]]
        raise InputError(
            f"weight row {bad[0]} spans {row.min():.3g}..{row.max():.3g} ({bad.size} such row(s)): its "
            f"{fmt.bits}-bit offset-binary step exceeds float32's range; use the bipolar codebook at 1 bit, "
            "more bits, or smaller weights"
        )


def dequantize_weights(q: np.ndarray, scale: np.ndarray, fmt: BitplaneFormat) -> np.ndarray:
    """The float weights the codes stand for, float32 [N, K] (inverse of :func:`quantize_weights`)."""
    q = np.asarray(q, np.float64)
    scale = np.asarray(scale, np.float64)
    if scale.shape != fmt.scale_shape(q.shape[0]):
        raise InputError(f"scale has shape {scale.shape}, {fmt.codebook} wants {fmt.scale_shape(q.shape[0])}")
    if fmt.has_zero_point:
        return (scale[0][:, None] * (q - scale[1][:, None])).astype(np.float32)
    return (q * scale[:, None]).astype(np.float32)


def check_codebook(codebook: str | None, bits: int, method: str = "mse") -> None:
    """Raise a clear error for a ``codebook`` / ``method`` the compile functions cannot use at ``bits``."""
    from .bitplane import CODEBOOKS

    if method not in METHODS:
        raise InputError(f"quantizer must be one of {METHODS}, got {method!r}")
    if codebook is None or codebook == AUTO:
        return
    if codebook not in CODEBOOKS:
        raise InputError(f"codebook must be 'auto', None or one of {CODEBOOKS}, got {codebook!r}")
    BitplaneFormat(bits, codebook=codebook)  # bits / codebook compatibility, with its message


def _candidates(bits: int) -> tuple[str, ...]:
    return ("bipolar", "offset_binary") if bits == 1 else ("twos_complement", "offset_binary")


def choose_codebook(
    weights: list[np.ndarray], fmt: BitplaneFormat, method: str = "mse", importances: list | None = None
) -> tuple[str, dict]:
    """Pick the codebook for a layer: the lowest total weight squared error over ``weights``.

    Rule: k >= 2: quantize every matrix with two's complement and with offset binary, sum the
    squared errors (weighted by ``importances`` when given), take the smallest; within
    :data:`TIE_MARGIN` (relative) the codebook without a zero point wins (one epilogue term
    fewer). k = 1: bipolar, always. The fitted-offset two-level code (offset binary at k = 1) has
    the lower weight error but measured worse end to end: MNIST MLP 79.4 % vs 92.1 % (fp32
    93.4 %), PTB LM equal (BENCHMARKS.md, issue 17), so it is only used when forced. The rule
    looks at all ``bits`` planes only: offset binary's top plane is not the sign plane, so a
    model run at ``bitlayers=1`` does far better with two's complement (MNIST W8 91.4 % vs 70.3 %;
    BENCHMARKS.md, thirtieth session).

    Parameters
    ----------
    weights : list of np.ndarray, float, [N_i, K_i]
        The matrices that share one format (e.g. an LSTM layer's ``W_ih`` and ``W_hh``).
    fmt : BitplaneFormat
        Bits, act_bits and layout; its codebook is ignored.
    method : str
        As in :func:`quantize_weights`.
    importances : list of (np.ndarray [K_i] or None), optional
        Per-input error weights of each matrix (calibration); the errors are then weighted too.

    Returns
    -------
    codebook : str
    quantized : dict
        ``{codebook: [(q, scale), ...]}`` for every candidate, so callers need not quantize again.
    """
    errors = {}
    imps = importances if importances and method == "mse" else [None] * len(weights)  # "max" takes none
    if fmt.bits == 1:
        f = dataclasses.replace(fmt, codebook="bipolar")
        return "bipolar", {
            "bipolar": [quantize_weights(w, f, method, imp) for w, imp in zip(weights, imps, strict=True)]
        }

    def fit(name: str) -> list:
        f = dataclasses.replace(fmt, codebook=name)
        return [quantize_weights(w, f, method, imp) for w, imp in zip(weights, imps, strict=True)]

    candidates = _candidates(fmt.bits)
    quantized = {name: fit(name) for name in candidates}  # each on every thread (weight_fit.each_chunk)
    for name in candidates:
        f = dataclasses.replace(fmt, codebook=name)
        errors[name] = 0.0
        for w, imp, (q, s) in zip(weights, imps, quantized[name], strict=True):
            errors[name] += _squared_error(w, q, s, f, weight_fit.column_weights(imp, w.shape[1]))
    plain, offset = _candidates(fmt.bits)
    best = offset if errors[offset] < errors[plain] * (1 - TIE_MARGIN) else plain
    return best, quantized


def _squared_error(w: np.ndarray, q: np.ndarray, scale: np.ndarray, fmt: BitplaneFormat, c: np.ndarray | None) -> float:
    """Total (column-weighted) squared error of ``w`` [N, K] against its dequantized codes ``q`` /
    ``scale`` (``[N]`` or ``[2, N]``), in row chunks on every thread (the whole-matrix float64
    difference went to DRAM)."""
    errors = weight_fit.row_squared_errors(w, lambda rows: dequantize_weights(q[rows], scale[..., rows], fmt), c)
    return float(errors.sum())


def layer_format(
    weights: list[np.ndarray],
    fmt: BitplaneFormat,
    codebook: str | None = AUTO,
    method: str = "mse",
    importances: list | None = None,
) -> tuple[BitplaneFormat, list[tuple[np.ndarray, np.ndarray]]]:
    """Format and quantized ``(q, scale)`` per matrix for one layer.

    Parameters
    ----------
    weights : list of np.ndarray, float, [N_i, K_i]
    fmt : BitplaneFormat
        Bits, act_bits, layout (and the codebook used when ``codebook`` is None).
    codebook : str or None
        ``"auto"`` (:func:`choose_codebook`), a name from :data:`pbtvm.bitplane.CODEBOOKS`, or
        None to keep ``fmt.codebook``.
    method, importances
        As in :func:`choose_codebook`.

    Returns
    -------
    (BitplaneFormat, list of (q, scale))
    """
    if codebook == AUTO:
        name, quantized = choose_codebook(weights, fmt, method, importances)
        return dataclasses.replace(fmt, codebook=name), quantized[name]
    f = fmt if codebook is None else dataclasses.replace(fmt, codebook=codebook)
    imps = importances or [None] * len(weights)
    return f, [quantize_weights(w, f, method, imp) for w, imp in zip(weights, imps, strict=True)]


def quantize_activations(x: np.ndarray, fmt: BitplaneFormat) -> tuple[np.ndarray, np.ndarray]:
    """Quantize activations per row with a dynamic symmetric scale (the run-time step).

    Parameters
    ----------
    x : np.ndarray, float32, shape [B, K]
    fmt : BitplaneFormat
        Uses ``act_bits``.

    Returns
    -------
    xq : np.ndarray, int32, shape [B, K]
        Codes in ``-act_qmax..act_qmax``.
    scale : np.ndarray, float32, shape [B]
        ``x ~= xq * scale[:, None]``; 0 for all-zero rows.

    Notes
    -----
    The steps, as every kernel takes them (:mod:`pbtvm.ops.common`): the row max of ``|x|`` with a
    finite value counted as at most the float32 below FLT_MAX, ``+-inf`` as FLT_MAX and NaN as
    ``+inf``; ``scale = amax / qmax`` (NaN for a NaN row, inf for an infinite one); a row below
    ``2^-64`` multiplied by ``2^64`` first (exact) so that ``inv = qmax / amax`` stays finite;
    codes ``rint(x * inv)`` in float32, clipped. An infinite entry gets ``+-qmax`` (its row's other
    codes round ``x * qmax / FLT_MAX``, 0 for any ordinary value); a NaN row's codes are 0 here
    (the kernels' are unspecified: its outputs are NaN either way).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise InputError(f"activations must be 2-D [B, K], got shape {x.shape}")
    qmax = np.float32(fmt.act_qmax)
    big = np.finfo(np.float32).max
    size = np.minimum(np.abs(x), FINITE_TOP)
    size = np.where(np.isinf(x), big, np.where(np.isnan(x), np.float32(np.inf), size))
    amax = size.max(axis=1) if x.shape[1] else np.zeros(x.shape[0], np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        scale = np.where(amax == np.inf, np.nan, np.where(amax == big, np.inf, amax / qmax)).astype(np.float32)
        up = np.where(amax < np.float32(TINY_ROW), np.float32(TINY_ROW_SCALE), np.float32(1)).astype(np.float32)
        inv = np.where(amax > 0, qmax / np.where(amax > 0, amax * up, 1), 0).astype(np.float32)
        v = np.rint((x * up[:, None]) * inv[:, None])  # float32 products, ties to even
    v = np.where(np.isnan(v) & (amax == np.inf)[:, None], 0, v)  # a NaN row: its outputs are NaN anyway
    xq = np.clip(v, -qmax, qmax).astype(np.int32)
    return xq, scale


def pb_linear_reference(
    x: np.ndarray,
    wp: np.ndarray,
    w_scale: np.ndarray,
    bias: np.ndarray | None,
    fmt: BitplaneFormat,
    bitlayers: int | None = None,
) -> np.ndarray:
    """Float reference of one PB linear layer, step for step as the compiled kernels do it.

    Parameters
    ----------
    x : np.ndarray, float32, shape [B, K]
    wp : np.ndarray, uint32, shape ``fmt.weight_shape(N, K)``
    w_scale : np.ndarray, float32, shape ``fmt.scale_shape(N)``
        Scales ``[N]``, or ``[2, N]`` scales and zero points for offset binary.
    bias : np.ndarray, float32, shape [N], or None
    fmt : BitplaneFormat
    bitlayers : int, optional

    Returns
    -------
    np.ndarray, float32, shape [B, N]
        ``(acc + (corr - z[n]) * rowsum) * s_x[b] * s_w[n] + bias[n]`` (``z = 0`` without zero point).
    """
    xq, xs = quantize_activations(x, fmt)
    xp = pack_activations(xq, fmt)
    params = np.asarray(w_scale, np.float64)
    n_rows = params.shape[-1]
    acc = bitplane_matmul(wp, xp, fmt, bitlayers, n_rows=n_rows)
    if params.shape != fmt.scale_shape(n_rows):
        raise InputError(f"w_scale has shape {params.shape}, {fmt.name} wants {fmt.scale_shape(n_rows)}")
    scale, zero = (params[0], params[1]) if fmt.has_zero_point else (params, np.zeros(n_rows))
    corr = (fmt.truncation_correction(bitlayers) - zero[None, :]) * plane_rowsum(xp, fmt)[:, None]
    y = (acc + corr) * xs[:, None].astype(np.float64) * scale[None, :]
    if bias is not None:
        y = y + np.asarray(bias, np.float64)[None, :]
    return y.astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def pb_lstm_cell_reference(
    gx: np.ndarray,
    h: np.ndarray,
    c: np.ndarray,
    wp: np.ndarray,
    w_scale: np.ndarray,
    fmt: BitplaneFormat,
    bitlayers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Float reference of one fused PB LSTM step (:func:`pbtvm.ops.pb_lstm_cell`).

    Parameters
    ----------
    gx : np.ndarray, float32, [B, 4H]
        Input projection plus biases, PyTorch gate order (i, f, g, o).
    h, c : np.ndarray, float32, [B, H]
    wp : np.ndarray, uint32, ``fmt.weight_shape(4H, H)``
        Packed ``W_hh`` rows in unit-major order (row ``4u + g``).
    w_scale : np.ndarray, float32, [4H], unit-major
    fmt : BitplaneFormat
    bitlayers : int, optional

    Returns
    -------
    (h', c') : np.ndarray, float32, each [B, H]
    """
    batch, hidden = h.shape
    rec = pb_linear_reference(h, wp, w_scale, None, fmt, bitlayers).reshape(batch, hidden, 4)
    pre = gx.reshape(batch, 4, hidden).transpose(0, 2, 1).astype(np.float64) + rec
    i, f, g, o = (pre[:, :, k] for k in range(4))
    c_new = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
    h_new = _sigmoid(o) * np.tanh(c_new)
    return h_new.astype(np.float32), c_new.astype(np.float32)


def pb_lstm_cell_input_reference(
    x: np.ndarray,
    wp_ih: np.ndarray,
    ws_ih: np.ndarray,
    bias: np.ndarray | None,
    h: np.ndarray,
    c: np.ndarray,
    wp_hh: np.ndarray,
    ws_hh: np.ndarray,
    fmt: BitplaneFormat,
    bitlayers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Float reference of one LSTM step with its input projection (:func:`pbtvm.ops.pb_lstm_cell_input`).

    The projection is :func:`pb_linear_reference` on ``x`` (float32, as the kernel keeps it), then
    :func:`pb_lstm_cell_reference`.

    Parameters
    ----------
    x : np.ndarray, float32, [B, I]
    wp_ih : np.ndarray, uint32, ``fmt.weight_shape(4H, I)``; ``W_ih`` rows unit-major
    ws_ih : np.ndarray, float32, [4H], unit-major
    bias : np.ndarray, float32, [4H], unit-major, or None
    h, c, wp_hh, ws_hh, fmt, bitlayers
        As ``h, c, wp, w_scale, fmt, bitlayers`` of :func:`pb_lstm_cell_reference`.

    Returns
    -------
    (h', c') : np.ndarray, float32, each [B, H]
    """
    batch, hidden = h.shape
    gx = pb_linear_reference(x, wp_ih, ws_ih, bias, fmt, bitlayers)  # unit-major columns
    gx = gx.reshape(batch, hidden, 4).transpose(0, 2, 1).reshape(batch, 4 * hidden)
    return pb_lstm_cell_reference(gx, h, c, wp_hh, ws_hh, fmt, bitlayers)
