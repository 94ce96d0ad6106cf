"""The float epilogue of a PB dense layer, one output at a time: the one definition every kernel uses.

``y[b, n] = (acc + (offset + corr - z_n) rowsum_b) s_x[b] s_w[n] + bias[n]`` where ``acc`` is the exact
integer plane product, ``offset`` the codebook's constant (-1 bipolar), ``corr`` the expected value of
the weight planes that ``bitlayers`` dropped and ``z_n`` the zero point of offset-binary rows. The TE
operators (:func:`pbtvm.ops.pb_dense`), the AVX-512 kernel and the CUDA binary-tensor-core kernel all
build their outputs with :func:`dense_value`, so they agree with each other term for term.
"""

from __future__ import annotations

import math
from typing import Any

from .._tvm import tir
from ..bitplane import BitplaneFormat
from ..names import ACTIVATIONS

__all__ = ["activated", "dense_value", "output_value", "truncation_offset"]


def activated(value: tir.PrimExpr, activation: str | None) -> tir.PrimExpr:
    """``value`` (float32) through the layer's activation (:data:`pbtvm.names.ACTIVATIONS`): ``relu``
    keeps NaN as torch's does (``max`` alone would make it 0), the others are TVM's formulas for
    ``relax.nn.gelu`` / ``gelu_tanh`` / ``silu`` (so a fused layer computes what the separate
    kernel did); None: unchanged.

    Raises
    ------
    ValueError
        If ``activation`` is not one of them.
    """
    if activation is None:
        return value

    def c(v: float) -> tir.PrimExpr:
        return tir.const(v, "float32")

    if activation == "relu":
        return tir.Select(tir.isnan(value), value, tir.max(value, c(0.0)))
    if activation == "gelu":  # x (1/2 + erf(x / sqrt 2) / 2), as TVM legalizes relax.nn.gelu
        return value * (c(0.5) + tir.erf(value * c(0.5**0.5)) * c(0.5))
    if activation == "gelu_tanh":
        inner = c(math.sqrt(2.0 / math.pi)) * value * (c(1.0) + c(0.044715) * value * value)
        return c(0.5) * value * (c(1.0) + tir.tanh(inner))
    if activation == "silu":
        return value * tir.sigmoid(value)
    raise ValueError(f"unknown activation {activation!r}: the PB epilogue applies {', '.join(ACTIVATIONS)}")


def truncation_offset(fmt: BitplaneFormat, bitlayers: tir.PrimExpr) -> tir.PrimExpr:
    """``offset + (2^(k - bitlayers) - 1) / 2`` as float32 (no truncation term for bipolar weights)."""
    if fmt.codebook == "bipolar":
        corr = tir.const(0.0, "float32")
    else:
        dropped = (tir.const(fmt.bits, "int64") - bitlayers.astype("int64")).astype("int64")
        corr = (tir.shift_left(tir.const(1, "int64"), dropped) - 1).astype("float32") * tir.const(0.5, "float32")
    return tir.const(float(fmt.weight_offset), "float32") + corr


def dense_value(
    fmt: BitplaneFormat,
    x_scale: tir.PrimExpr,
    rowsum: tir.PrimExpr,
    acc: tir.PrimExpr,
    w_scale: Any,
    n: tir.PrimExpr,
    bias: Any,
    bitlayers: tir.PrimExpr,
) -> tir.PrimExpr:
    """One float32 output of the dense epilogue.

    Parameters
    ----------
    fmt : BitplaneFormat
    x_scale : PrimExpr, float32
        The activation row's scale ``s_x[b]``.
    rowsum : PrimExpr, accumulator dtype
        The activation row's code sum.
    acc : PrimExpr, accumulator dtype
        The exact integer plane product ``acc[b, n]`` (a vector of as many lanes as ``n`` has).
    w_scale : te.Tensor or tir.Buffer, float32, ``fmt.scale_shape(N)``
        ``[N]`` scales; with a zero point ``[2, N]`` (scales, then zero points in code units).
    n : PrimExpr
        Output row (or a ``Ramp`` of consecutive rows, ``acc`` then a vector of as many lanes).
    bias : te.Tensor or tir.Buffer, float32, [N], or None
    bitlayers : PrimExpr, int64

    Notes
    -----
    With a zero point, ``floor(z)`` (clamped to the code range) is subtracted in the integer
    accumulator, exactly; only ``z - floor(z)`` goes through float32, so large codes do not cancel.
    ``s_x (acc + ...)`` is ``y / s_w``, thousands of times ``y``: where it overflows (huge
    activations; outputs of ~1e35, finite in torch and in the float64 reference, came out ±inf),
    ``s_w`` multiplies first instead (``y / s_x``, at most ``qmax`` times the row's ``sum |w|``), so
    an output is ±inf only where both orders overflow. Elsewhere the result is the plain order's,
    bit for bit (bias inside the select, so a CPU build keeps its multiply-add). (``s_w`` always
    first spilled registers in the one-launch BMMA kernel, which runs at its 64-register cap, and
    overflowed for huge weights; float64 throughout measured 10 % slower on a 512x784 CPU layer
    at batch 8.)
    """
    off = truncation_offset(fmt, bitlayers)
    if not fmt.has_zero_point:
        value, scale = off * rowsum.astype("float32") + _as(acc, "float32"), w_scale[n]
    else:
        zero = w_scale[1, n]
        z_int = tir.max(tir.min(tir.floor(zero), tir.const(2**fmt.bits - 1, "float32")), tir.const(0, "float32"))
        exact = acc - z_int.astype(_dtype(acc)) * rowsum
        value, scale = (off - (zero - z_int)) * rowsum.astype("float32") + _as(exact, "float32"), w_scale[0, n]
    by_rows = x_scale * value  # y / s_w: overflows first when s_w is small and y huge
    overflowed = tir.abs(by_rows) > tir.max_value("float32")  # tir.isinf takes no vectors
    plain, by_weights = by_rows * scale, (value * scale) * x_scale
    if bias is not None:  # inside the select: the plain order's multiply-add stays one
        plain, by_weights = plain + bias[n], by_weights + bias[n]
    return tir.Select(overflowed, by_weights, plain)


def _as(expr: Any, dtype: str) -> Any:
    """``expr`` cast to ``dtype``, keeping its lanes (a vector of outputs, ``n`` a ``Ramp``)."""
    from .._tvm import tvm

    lanes = tvm.DataType(_dtype(expr)).lanes
    return expr.astype(dtype if lanes == 1 else f"{dtype}x{lanes}")


def _dtype(expr: Any) -> str:
    """dtype of a TE element (``TensorSlice``: ``.dtype``) or a TIR expression (``.ty.dtype``)."""
    return str(expr.dtype) if hasattr(expr, "dtype") else str(expr.ty.dtype)


def output_value(
    fmt: BitplaneFormat,
    acc: tir.PrimExpr,
    rowsum: tir.PrimExpr,
    x_scale: tir.PrimExpr | None,
    w_scale: Any,
    n: tir.PrimExpr,
    bias: Any,
    bitlayers: tir.PrimExpr,
) -> tir.PrimExpr:
    """One output of a CPU kernel from its exact plane product ``acc`` (int32): without
    ``x_scale`` the integer product of :func:`pbtvm.ops.pb_int_product` (``acc + offset *
    rowsum``), else :func:`dense_value`."""
    if x_scale is None:
        return acc + tir.const(fmt.weight_offset, "int32") * rowsum
    return dense_value(fmt, x_scale, rowsum, acc, w_scale, n, bias, bitlayers)
