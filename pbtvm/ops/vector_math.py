"""exp, sigmoid and tanh as float32 TIR arithmetic that LLVM vectorizes (no libm calls).

``tir.exp`` on the llvm target becomes one ``expf`` call per element even in a vectorized loop
(the LSTM cell update of 650 units: 5 calls per unit, 14 µs on one EPYC core). Here ``exp`` is
the Cephes ``expf`` scheme: ``x = n ln2 + r`` (``ln2`` split in two for an exact ``n ln2``), a
degree-7 polynomial for ``e^r`` on ``|r| <= ln2 / 2`` and ``2^n`` built in the exponent bits.
Relative error under 2e-7 on ``[-87, 88]`` (checked against numpy in the tests); ``sigmoid``
and ``tanh`` are built from it the way TVM lowers them for llvm, ``tanh`` with Cephes' polynomial
near 0, where TVM's cancels.
"""

from __future__ import annotations

import math

from .._tvm import tir

__all__ = ["exp", "exp_f64", "sigmoid", "tanh"]

#: Cephes expf: ln 2 = LN2_HI + LN2_LO with LN2_HI exact in a few bits, and the polynomial.
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4
LOG2E = 1.44269504088896341
POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
#: exp overflows float32 above, and 2^n leaves the normal range below (results are then 0).
HIGH, LOW = 88.3762626647949, -87.3365447504019


def _f32(value: float) -> tir.PrimExpr:
    return tir.const(value, "float32")


def exp(x: tir.PrimExpr) -> tir.PrimExpr:
    """``e^x`` of a float32 expression (scalar; LLVM vectorizes the loops it sits in).

    NaN gives NaN (the clamp alone would turn it into a number: x86 ``min``/``max`` return
    their second operand for NaN); the result saturates at ``e^88.38`` and ``2^-126`` outside the range.
    """
    clamped = tir.max(tir.min(x, _f32(HIGH)), _f32(LOW))
    n = tir.floor(clamped * _f32(LOG2E) + _f32(0.5))
    r = clamped - n * _f32(LN2_HI) - n * _f32(LN2_LO)
    poly = _f32(POLY[0])
    for c in POLY[1:]:
        poly = poly * r + _f32(c)
    er = poly * r * r + r + _f32(1.0)
    two_n = tir.reinterpret("float32", tir.shift_left(n.astype("int32") + 127, 23))
    return tir.Select(tir.isnan(x), x, er * two_n)


def sigmoid(x: tir.PrimExpr) -> tir.PrimExpr:
    """``1 / (1 + e^-x)``."""
    return _f32(1.0) / (_f32(1.0) + exp(-x))


#: Cephes tanhf's odd polynomial for ``|x| < 0.625``: ``x + x^3 P(x^2)`` (relative error < 1e-7).
TANH_SMALL, TANH_POLY = (
    0.625,
    (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1, -3.33332819422e-1),
)


def tanh(x: tir.PrimExpr) -> tir.PrimExpr:
    """``sign(x) (1 - e^-2|x|) / (1 + e^-2|x|)``, no overflow for large ``|x|``; below ``|x|`` 0.625,
    where ``1 - e^-2|x|`` cancels (tanh(1e-7) 19 % off, tanh(1e-8) 0), Cephes' odd polynomial."""
    e = exp(_f32(-2.0) * tir.abs(x))
    magnitude = (_f32(1.0) - e) / (_f32(1.0) + e)
    square = x * x
    poly = _f32(TANH_POLY[0])
    for c in TANH_POLY[1:]:
        poly = poly * square + _f32(c)
    small = poly * square * x + x
    return tir.Select(tir.abs(x) < _f32(TANH_SMALL), small, tir.Select(x < _f32(0.0), -magnitude, magnitude))


#: ``ln 2 = EXP64_C1 + EXP64_C2`` (Cephes: ``n EXP64_C1`` exact for the ``n`` that occur) and the
#: Taylor coefficients ``1 / k!`` of ``e^r`` on ``|r| <= ln2 / 2`` (degree 13: truncation < 1e-17).
EXP64_C1, EXP64_C2 = 6.93145751953125e-1, 1.42860682030941723212e-6
EXP64_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(13, -1, -1))


def _f64(value: float) -> tir.PrimExpr:
    return tir.const(value, "float64")


def _pow2_f64(n: tir.PrimExpr) -> tir.PrimExpr:
    """``2^n`` (``n`` an int64 in [-1022, 1023]) built in the exponent bits."""
    return tir.reinterpret("float64", tir.shift_left(n + tir.const(1023, "int64"), tir.const(52, "int64")))


def exp_f64(x: tir.PrimExpr) -> tir.PrimExpr:
    """``e^x`` of a float64 expression ``x <= 0``, within an ulp of libm: plain arithmetic that
    vectorizes, where ``tir.exp`` is one libm call per element.

    Subnormal results as libm's: ``2^n`` applied as two normal factors, so the result rounds once;
    ``x`` is clamped to ``[-746, 0]``, so ``-inf`` gives 0 (as does anything below -745.14), and a
    positive ``x`` or NaN gives 1 (callers pass neither).
    """
    clamped = tir.max(tir.min(x, _f64(0.0)), _f64(-746.0))
    n = tir.floor(clamped * _f64(1.4426950408889634073599) + _f64(0.5))
    r = clamped - n * _f64(EXP64_C1) - n * _f64(EXP64_C2)
    er = _f64(EXP64_TAYLOR[0])
    for c in EXP64_TAYLOR[1:]:  # Horner: no division (a vector divide costs more than the rest)
        er = er * r + _f64(c)
    ni = n.astype("int64")
    half = tir.shift_right(ni, tir.const(1, "int64"))  # n = half + (n - half), both >= -538
    return er * _pow2_f64(half) * _pow2_f64(ni - half)  # below -745.14 this rounds to 0
