"""Quantizers (numpy): per-channel weights at compile time, per-row activations at run time.

No retraining and no calibration data: weights use round-to-nearest with a per-output-channel
scale; activations get a dynamic per-row scale computed from the row's own max, so nothing wraps
(the paper's code used unscaled fixed point, which overflows on large activations).

The activation rounding is ``floor(x * inv_scale + 0.5)`` in float32 (``inv_scale`` =
``act_qmax / amax``) because the TE operator computes exactly that on every target; numpy's
round-half-even would differ from CUDA's ``roundf`` on ties.
"""

from __future__ import annotations

import numpy as np

from .bitplane import BitplaneFormat, bitplane_matmul, pack_activations, plane_rowsum

__all__ = [
    "quantize_weights",
    "quantize_activations",
    "pb_linear_reference",
    "pb_lstm_cell_reference",
    "pb_lstm_cell_input_reference",
]


def quantize_weights(w: np.ndarray, fmt: BitplaneFormat) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a float weight matrix per output channel.

    Parameters
    ----------
    w : np.ndarray, float, shape [N, K]
        Weight matrix (``nn.Linear.weight`` layout: out x in).
    fmt : BitplaneFormat

    Returns
    -------
    q : np.ndarray, int32, shape [N, K]
        Codes: symmetric ``-(2^(k-1)-1)..2^(k-1)-1`` for two's complement; ``+-1`` for bipolar.
    scale : np.ndarray, float32, shape [N]
        ``w ~= q * scale[:, None]``. Two's complement: ``max|w| / qmax``; bipolar: ``mean|w|``
        (the least-squares scale for sign codes). All-zero rows get scale 0.
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"weights must be 2-D [N, K], got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise TypeError(f"weights must be floating point, got {w.dtype}")
    w = w.astype(np.float32)
    if not np.all(np.isfinite(w)):
        raise ValueError("weights contain NaN or Inf")
    if fmt.codebook == "bipolar":
        scale = np.abs(w).mean(axis=1).astype(np.float32)
        q = np.where(w >= 0, 1, -1).astype(np.int32)
        return q, scale
    qmax = fmt.weight_qmax
    scale = (np.abs(w).max(axis=1) / qmax).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.round(w / safe[:, None]), -qmax, qmax).astype(np.int32)
    return q, scale


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
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"activations must be 2-D [B, K], got shape {x.shape}")
    qmax = np.float32(fmt.act_qmax)
    amax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(x.shape[0], np.float32)
    inv = np.where(amax > 0, qmax / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    scale = (amax / qmax).astype(np.float32)
    v = np.floor(x * inv[:, None] + np.float32(0.5))
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
    w_scale : np.ndarray, float32, shape [N]
    bias : np.ndarray, float32, shape [N], or None
    fmt : BitplaneFormat
    bitlayers : int, optional

    Returns
    -------
    np.ndarray, float32, shape [B, N]
        ``(acc + corr * rowsum) * s_x[b] * s_w[n] + bias[n]``.
    """
    xq, xs = quantize_activations(x, fmt)
    xp = pack_activations(xq, fmt)
    acc = bitplane_matmul(wp, xp, fmt, bitlayers, n_rows=len(w_scale))
    corr = fmt.truncation_correction(bitlayers) * plane_rowsum(xp, fmt)[:, None]
    y = (acc + corr) * xs[:, None].astype(np.float64) * np.asarray(w_scale, np.float64)[None, :]
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
