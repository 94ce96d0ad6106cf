"""TIR mirrors of the format's plane arithmetic (tested against ``BitplaneFormat``), and the
storage scope of CPU kernels' scratch buffers."""

from __future__ import annotations

from .._tvm import tir
from ..quantize import FINITE_TOP, TINY_ROW, TINY_ROW_SCALE

#: Storage scope of the small fixed-size scratch buffers of CPU kernels (accumulators, decoded
#: weight bytes, per-row scalars). TVM's ``LowerTVMBuiltin`` keeps a ``"global"`` allocation of
#: constant size under 1 KiB on the stack, where LLVM can keep it in registers; every other scope,
#: ``"local"`` included, becomes a ``TVMBackendAllocWorkspace``/``FreeWorkspace`` pair, once per
#: task inside a parallel loop: at batch 1 the 2x650 decoder's LSTM step took ~8 %, its head ~13 %
#: and its token pick ~2x longer that way (BENCHMARKS.md, sixth session). A "global" buffer may
#: share a stack slot with another of disjoint lifetime (``StorageRewrite``); pb_vnni keeps one
#: accumulator and one decode buffer per task for that reason. CUDA kernels keep ``"local"``.
CPU_SCRATCH = "global"


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


# Activation quantization, one definition for the TE pack and the AVX-512 kernel (``lanes`` > 1:
# the same expressions on vectors). Non-finite rows follow torch: see act_quantize_pack.
def _lanes(c: tir.PrimExpr, lanes: int) -> tir.PrimExpr:
    return c if lanes == 1 else tir.Broadcast(c, lanes)


def act_magnitude(v: tir.PrimExpr, lanes: int = 1) -> tir.PrimExpr:
    """``|v|`` for the row max: NaN counts as +inf, +-inf as the largest float32, and a finite
    value as at most the float32 below it (so a finite row holding +-FLT_MAX is not taken for an
    infinite one)."""
    inf, big = tir.const(float("inf"), "float32"), tir.max_value("float32")
    finite_top = tir.const(float(FINITE_TOP), "float32")
    size = tir.abs(v)
    return tir.Select(
        tir.isnan(v),
        _lanes(inf, lanes),
        tir.Select(size == _lanes(inf, lanes), _lanes(big, lanes), tir.min(size, _lanes(finite_top, lanes))),
    )


def act_scale(amax: tir.PrimExpr, qmax: float) -> tir.PrimExpr:
    """Row scale from the row max: NaN for a NaN row, inf for an infinite one, else ``amax / qmax``."""
    inf, big = tir.const(float("inf"), "float32"), tir.max_value("float32")
    nan = tir.const(float("nan"), "float32")
    return tir.Select(amax == inf, nan, tir.Select(amax == big, inf, amax / tir.const(qmax, "float32")))


def act_prescale(amax: tir.PrimExpr) -> tir.PrimExpr:
    """What a row is multiplied by before its codes: :data:`TINY_ROW_SCALE` below :data:`TINY_ROW`, else 1."""
    return tir.Select(
        amax < tir.const(TINY_ROW, "float32"), tir.const(TINY_ROW_SCALE, "float32"), tir.const(1.0, "float32")
    )


def act_inverse(amax: tir.PrimExpr, qmax: float) -> tir.PrimExpr:
    """``qmax / (amax * act_prescale(amax))`` (0 for an all-zero row): what the prescaled values are
    multiplied by."""
    zero = tir.const(0, "float32")
    return tir.if_then_else(amax > zero, tir.const(qmax, "float32") / (amax * act_prescale(amax)), zero)


def act_code(v: tir.PrimExpr, up: tir.PrimExpr, inv: tir.PrimExpr, qmax: float, lanes: int = 1) -> tir.PrimExpr:
    """The float code of ``v``: the float32 product ``(v * up) * inv`` (``up`` the row's
    :func:`act_prescale`, ``inv`` its :func:`act_inverse`) rounded to the nearest integer, ties
    to even, clipped to ``-qmax..qmax`` (integral; cast by the caller), as
    :func:`pbtvm.quantize.quantize_activations`.

    No add follows the product: ``floor(v * inv + 0.5)`` (the rounding before) became one fused
    multiply-add wherever the code generator contracts (TVM's LLVM backend always does), which
    rounds once where the reference rounds twice, so a product a few ulps from ``m + 0.5`` got
    another code than the reference's. ``nearbyint`` is one instruction (``vrndscaleps``,
    ``cvt.rni``) and rounds the product exactly, in the floating-point rounding mode of the
    calling thread on CPUs: to nearest unless the program changed it (``fesetround``), as numpy's
    ``rint`` assumes; TVM's worker threads keep the default. ``up`` is a power of two, so for rows
    above :data:`TINY_ROW` the product is ``v * (qmax / amax)`` rounded once, as before.
    """
    q = tir.nearbyint((v * _lanes(up, lanes)) * _lanes(inv, lanes))
    return tir.max(tir.min(q, _lanes(tir.const(qmax, "float32"), lanes)), _lanes(tir.const(-qmax, "float32"), lanes))


#: The lanes of a CUDA warp, and the member mask naming all of them in the ``__*_sync`` intrinsics.
WARP_LANES = 32
FULL_WARP_MASK = 0xFFFFFFFF


def shfl_xor(dtype: str, value, lane_mask):
    """``value`` of lane ``lane ^ lane_mask`` (CUDA ``__shfl_xor_sync`` over the whole warp)."""
    return tir.call_extern(dtype, "__shfl_xor_sync", tir.const(FULL_WARP_MASK, "uint32"), value, lane_mask, WARP_LANES)


def shfl_up(dtype: str, value, delta):
    """``value`` of lane ``lane - delta`` (its own below ``delta``; CUDA ``__shfl_up_sync``)."""
    return tir.call_extern(dtype, "__shfl_up_sync", tir.const(FULL_WARP_MASK, "uint32"), value, delta, WARP_LANES)
