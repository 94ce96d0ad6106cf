"""TE: one fused PrecisionBatching LSTM step (activation pack of ``h``, PB GEMV on ``W_hh``, cell).

Two forms: :func:`pb_lstm_cell` takes the input projection ``gx`` computed beforehand (one PB
GEMM over all time steps of a sequence); :func:`pb_lstm_cell_input` computes it too, from the
step's input ``x`` and a packed ``W_ih`` (decoding one token: one kernel per layer).

``(gx, h, c) -> (h', c')`` with PyTorch's gate order (i, f, g, o)::

    gates = gx + pb_dense(pack(h), W_hh)        # W_hh rows stored unit-major, see below
    c'    = sigmoid(f) * c + sigmoid(i) * tanh(g)
    h'    = sigmoid(o) * tanh(c')

The packed recurrent weight holds ``W_hh`` with its rows permuted *unit-major*: row ``4u + g``
is PyTorch's row ``g * H + u`` (:func:`unit_major_rows`). The four gate rows of a hidden unit are
then adjacent, so a schedule can give a thread block whole hidden units and finish the cell
update in the same kernel. Quantization is per row, so the permutation changes no value.
The activation pack is :func:`act_quantize_pack` unchanged (dynamic per-row scale), so the
fused step equals the unfused kernels bit for bit.
"""

from __future__ import annotations

import numpy as np

from .. import names
from .._tvm import te, tir
from ..bitplane import BitplaneFormat
from .act_pack import act_quantize_pack
from .pb_gemm import pb_dense

__all__ = ["pb_lstm_cell", "pb_lstm_cell_at", "pb_lstm_cell_input", "unit_major_rows"]


def unit_major_rows(hidden: int) -> np.ndarray:
    """Row order that makes ``W_hh[order]`` unit-major: ``order[4u + g] = g * hidden + u``.

    Returns
    -------
    np.ndarray, int64, [4 * hidden]
    """
    return (np.arange(4)[None, :] * hidden + np.arange(hidden)[:, None]).reshape(-1)


def pb_lstm_cell(
    gx: te.Tensor,
    h: te.Tensor,
    c: te.Tensor,
    wp: te.Tensor,
    w_scale: te.Tensor,
    bitlayers: tir.PrimExpr,
    fmt: BitplaneFormat,
) -> list[te.Tensor]:
    """One LSTM step with the recurrent product in PrecisionBatching.

    Parameters
    ----------
    gx : te.Tensor, float32, [B, 4H]
        Input projection of this step plus both biases, PyTorch gate order (rows ``g * H + u``).
    h, c : te.Tensor, float32, [B, H]
        Previous hidden and cell state.
    wp : te.Tensor, uint32, ``fmt.weight_shape(4H, H)``
        Packed ``W_hh[unit_major_rows(H)]``.
    w_scale : te.Tensor, float32, [4H]
        Per-row weight scales, unit-major like ``wp``.
    bitlayers : PrimExpr, int64
        Run-time precision knob, 1..bits.
    fmt : BitplaneFormat

    Returns
    -------
    list of te.Tensor
        ``h'`` and ``c'``, float32 [B, H].
    """
    hidden = int(h.shape[1])
    if tuple(int(d) for d in gx.shape[1:]) != (4 * hidden,):
        raise ValueError(f"LSTM cell wants gx [B, {4 * hidden}], got {gx.shape}")
    return _cell(lambda b, u, g: gx[b, g * hidden + u], h, c, wp, w_scale, bitlayers, fmt)


def pb_lstm_cell_at(
    gx_seq: te.Tensor,
    step: tir.PrimExpr,
    h: te.Tensor,
    c: te.Tensor,
    wp: te.Tensor,
    w_scale: te.Tensor,
    bitlayers: tir.PrimExpr,
    fmt: BitplaneFormat,
) -> list[te.Tensor]:
    """:func:`pb_lstm_cell` reading its input projection at time ``step`` of the whole sequence's.

    For the time loop of :class:`relay_passes.pb_lstm_lowering.PBLSTMLowering`: ``gx_seq`` is the
    output of the one projection GEMM over all steps, float32 [T, B, 4H] (PyTorch gate order);
    ``step`` an int64 scalar in ``[0, T)``. Everything else as in :func:`pb_lstm_cell`.
    """
    hidden = int(h.shape[1])
    if len(gx_seq.shape) != 3 or int(gx_seq.shape[2]) != 4 * hidden:
        raise ValueError(f"LSTM cell wants gx [T, B, {4 * hidden}], got {gx_seq.shape}")
    return _cell(lambda b, u, g: gx_seq[step, b, g * hidden + u], h, c, wp, w_scale, bitlayers, fmt)


def pb_lstm_cell_input(
    x: te.Tensor,
    wp_ih: te.Tensor,
    ws_ih: te.Tensor,
    bias: te.Tensor | None,
    h: te.Tensor,
    c: te.Tensor,
    wp_hh: te.Tensor,
    ws_hh: te.Tensor,
    bitlayers: tir.PrimExpr,
    fmt: BitplaneFormat,
) -> list[te.Tensor]:
    """One LSTM step with the input projection inside too: both products in PrecisionBatching.

    For decoding one token: ``gates = pb_dense(pack(x), W_ih) + bias + pb_dense(pack(h), W_hh)``,
    each input quantized with its own per-row scale exactly as the separate input-projection GEMM
    does, so the result equals :func:`pb_lstm_cell` fed with that GEMM's output. Block names of
    the input leg carry the suffix :data:`pbtvm.names.INPUT_TAG`.

    Parameters
    ----------
    x : te.Tensor, float32, [B, I]
        This step's layer input.
    wp_ih : te.Tensor, uint32, ``fmt.weight_shape(4H, I)``
        Packed ``W_ih[unit_major_rows(H)]``.
    ws_ih : te.Tensor, float32, [4H]
        Its per-row scales (unit-major).
    bias : te.Tensor, float32, [4H], or None
        ``(b_ih + b_hh)[unit_major_rows(H)]``.
    h, c, wp_hh, ws_hh, bitlayers, fmt
        As ``h, c, wp, w_scale, bitlayers, fmt`` of :func:`pb_lstm_cell`.

    Returns
    -------
    list of te.Tensor
        ``h'`` and ``c'``, float32 [B, H].
    """
    n_in = int(x.shape[1])
    xp, x_scale, rowsum = act_quantize_pack(x, fmt, names.INPUT_TAG)
    gx = pb_dense(xp, x_scale, rowsum, wp_ih, ws_ih, bias, bitlayers, fmt, n_in, names.INPUT_TAG)
    return _cell(lambda b, u, g: gx[b, u * 4 + g], h, c, wp_hh, ws_hh, bitlayers, fmt)


def _cell(gx_at, h, c, wp, w_scale, bitlayers, fmt):
    batch, hidden = h.shape
    n_hidden = int(hidden)
    if tuple(int(d) for d in c.shape[1:]) != (n_hidden,):
        raise ValueError(f"LSTM cell wants c [B, {n_hidden}] like h, got {c.shape}")
    xp, x_scale, rowsum = act_quantize_pack(h, fmt)
    gates = pb_dense(xp, x_scale, rowsum, wp, w_scale, None, bitlayers, fmt, n_hidden)

    def pre(b, u, g):
        return gates[b, u * 4 + g] + gx_at(b, u, g)

    c_next = te.compute(
        (batch, hidden),
        lambda b, u: tir.sigmoid(pre(b, u, 1)) * c[b, u] + tir.sigmoid(pre(b, u, 0)) * tir.tanh(pre(b, u, 2)),
        name=names.CELL_C,
    )
    # h' and c' leave from one block pair (one loop nest) that schedules split and attach to;
    # c' is computed once, in the block above.
    h_new, c_new = te.compute(
        (batch, hidden),
        lambda b, u: [tir.sigmoid(pre(b, u, 3)) * tir.tanh(c_next[b, u]), c_next[b, u]],
        name=names.CELL,
    )
    return [h_new, c_new]
