"""TIR mirrors of the format's plane arithmetic (tested against ``BitplaneFormat``)."""

from __future__ import annotations

from .._tvm import tir


def plane_bit(plane: tir.PrimExpr, nbits: int) -> tir.PrimExpr:
    """Bit position (int32) stored in MSB-first plane ``plane``: ``nbits - 1 - plane``."""
    return tir.const(nbits - 1, "int32") - plane.astype("int32")


def plane_coefficient(plane: tir.PrimExpr, nbits: int, signed: bool, dtype: str) -> tir.PrimExpr:
    """``c_p`` of ``BitplaneFormat`` in ``dtype``: ``+-2^(nbits-1-p)``, negative for the sign plane.

    ``signed=False`` with ``nbits == 1`` is the bipolar weight plane, coefficient 2.
    """
    if not signed and nbits == 1:
        return tir.const(2, dtype)
    mag = tir.shift_left(tir.const(1, dtype), plane_bit(plane, nbits).astype(dtype))
    if not signed:
        return mag
    return tir.if_then_else(plane.astype("int32") == tir.const(0, "int32"), tir.const(0, dtype) - mag, mag)
