"""TIR mirrors of the format's plane arithmetic (tested against ``BitplaneFormat``)."""

from __future__ import annotations

from .._tvm import tir


def plane_bit(plane: tir.PrimExpr, nbits: int) -> tir.PrimExpr:
    """Bit position (int32) stored in MSB-first plane ``plane``: ``nbits - 1 - plane``."""
    return tir.const(nbits - 1, "int32") - plane.astype("int32")


def weight_plane_coefficient(plane: tir.PrimExpr, fmt, dtype: str) -> tir.PrimExpr:
    """Weight plane coefficient ``fmt.plane_coefficients()[plane]`` as a TIR expression.

    Asks the format only: bipolar planes weigh 2, offset-binary planes ``2^(k-1-p)`` (unsigned),
    two's complement planes ``+-2^(k-1-p)`` (plane 0 negative).
    """
    if fmt.codebook == "bipolar":
        return tir.const(2, dtype)
    return plane_coefficient(plane, fmt.bits, fmt.weight_signed, dtype, bipolar_single=False)


def plane_coefficient(
    plane: tir.PrimExpr, nbits: int, signed: bool, dtype: str, bipolar_single: bool = True
) -> tir.PrimExpr:
    """``c_p`` of ``BitplaneFormat`` in ``dtype``: ``+-2^(nbits-1-p)``, negative for the sign plane.

    ``signed=False`` with ``nbits == 1`` is the bipolar weight plane, coefficient 2, unless
    ``bipolar_single`` is False (a 1-bit offset-binary plane, coefficient 1). Weight kernels
    should call :func:`weight_plane_coefficient`, which reads the codebook from the format.
    """
    if not signed and nbits == 1 and bipolar_single:
        return tir.const(2, dtype)
    mag = tir.shift_left(tir.const(1, dtype), plane_bit(plane, nbits).astype(dtype))
    if not signed:
        return mag
    return tir.if_then_else(plane.astype("int32") == tir.const(0, "int32"), tir.const(0, dtype) - mag, mag)
