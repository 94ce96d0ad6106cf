"""Byte lanes of the AVX-512 PB kernel: 64-bit plane words as lane masks, int8 activation codes.

:func:`act_bytes` rebuilds a row's int8 codes from its packed activation planes;
:func:`quantize_row` makes them from the float row directly (the one-kernel layer). Both give
the codes of :func:`pbtvm.ops.act_quantize_pack`, zero past K.
"""

from __future__ import annotations

from .._tvm import tir
from ..bitplane import BitplaneFormat
from .common import CPU_SCRATCH, act_code, act_inverse, act_magnitude, act_prescale, act_scale

__all__ = ["CHUNK", "act_bytes", "lane_mask", "masked_sum", "qword", "quantize_row", "row_codes", "sum_codes"]

#: Inputs per chunk: one zmm register of bytes, two packed words.
CHUNK = 64


def qword(buf: tir.Buffer, index, chunk, full: bool, flat: bool = False) -> tir.PrimExpr:
    """Words ``2 chunk, 2 chunk + 1`` of ``buf[index]`` as one uint64 (the tail has one word).

    ``flat``: ``buf`` is 1-D and ``index`` is ``(offset,)`` of the row's first word.
    """
    if flat:
        (base,) = index
        if full:
            return tir.reinterpret("uint64", buf[tir.Ramp(base + chunk * 2, 1, 2)])
        return buf[base + chunk * 2].astype("uint64")
    if full:
        return tir.reinterpret("uint64", buf[(*index, tir.Ramp(chunk * 2, 1, 2))])
    return buf[(*index, chunk * 2)].astype("uint64")


def lane_mask(word: tir.PrimExpr) -> tir.PrimExpr:
    """The 64 bits of ``word`` as a ``boolx64`` lane mask (bit ``t`` -> lane ``t``): one ``kmovq``."""
    return tir.Cast("boolx64", tir.reinterpret("uint1x64", word))


def masked_sum(terms: list[tuple[tir.PrimExpr, int, int]], dtype: str) -> tir.PrimExpr:
    """``sum_t select(mask_t, on_t, off_t)`` over 64 byte lanes (wrapping byte arithmetic)."""
    total = None
    for mask, on, off in terms:
        term = tir.Select(mask, tir.Broadcast(tir.const(on, dtype), CHUNK), tir.Broadcast(tir.const(off, dtype), CHUNK))
        total = term if total is None else total + term
    return total


def act_bytes(fmt: BitplaneFormat, xp: tir.Buffer, row, chunk, full: bool) -> tir.PrimExpr:
    """int8x64 activation codes of one row's chunk, from its ``act_bits`` planes."""
    coef = fmt.act_plane_coefficients
    return masked_sum([(lane_mask(qword(xp, (j, row), chunk, full)), coef[j], 0) for j in range(fmt.act_bits)], "int8")


def quantize_row(T, fmt: BitplaneFormat, x: tir.Buffer, r, k_dim: int, codes, x_scale, chunks: int) -> None:
    """Row ``r`` of ``x`` -> its scale and int8 codes (zero past K): :func:`act_quantize_pack`'s maths.

    The row max treats NaN as +inf and +-inf as the largest float, the scale is NaN / inf for
    such rows and the codes are the product ``x * (qmax / amax)`` rounded to nearest even, clipped
    to ``-qmax..qmax`` (:func:`.common.act_code`, as the TE pack and the numpy reference).
    """
    lanes = 16
    qmax = float(fmt.act_qmax)
    peak = T.alloc_buffer((lanes,), "float32", scope=CPU_SCRATCH)
    T.buffer_store(peak, tir.Broadcast(tir.const(0, "float32"), lanes), [tir.Ramp(0, 1, lanes)])
    if k_dim >= lanes:
        with T.serial(0, k_dim // lanes) as v:
            at = tir.Ramp(0, 1, lanes)
            T.buffer_store(peak, tir.max(peak[at], act_magnitude(x[r, tir.Ramp(v * lanes, 1, lanes)], lanes)), [at])
    for k in range(k_dim - k_dim % lanes, k_dim):
        T.buffer_store(peak, tir.max(peak[0], act_magnitude(x[r, k])), [0])
    amax = T.alloc_buffer((1,), "float32", scope=CPU_SCRATCH)
    T.buffer_store(amax, peak[0], [0])
    for lane in range(1, lanes):
        T.buffer_store(amax, tir.max(amax[0], peak[lane]), [0])
    T.buffer_store(x_scale, act_scale(amax[0], qmax), [r])
    inv = T.alloc_buffer((1,), "float32", scope=CPU_SCRATCH)
    T.buffer_store(inv, act_inverse(amax[0], qmax), [0])

    def code(v: tir.PrimExpr, n: int) -> tir.PrimExpr:
        vector = n == CHUNK
        return (
            act_code(v, act_prescale(amax[0]), inv[0], qmax, n)
            .astype("int32x64" if vector else "int32")
            .astype("int8x64" if vector else "int8")
        )

    full = k_dim // CHUNK
    if full:
        with T.serial(0, full) as c:
            T.buffer_store(codes, code(x[r, tir.Ramp(c * CHUNK, 1, CHUNK)], CHUNK), [r, tir.Ramp(c * CHUNK, 1, CHUNK)])
    for c in range(full, chunks):  # the last, partial chunk (and zero padding)
        with T.serial(0, CHUNK) as j:
            k = c * CHUNK + j
            value = tir.if_then_else(k < k_dim, code(x[r, tir.min(k, k_dim - 1)], 1), tir.const(0, "int8"))
            T.buffer_store(codes, value, [r, k])


def row_codes(T, fmt: BitplaneFormat, r, k_dim: int, codes, chunks: int, x=None, x_scale=None, xp=None) -> None:
    """Row ``r``'s int8 codes into ``codes[r]`` (``chunks`` chunks, zero past K): quantized from the
    float rows ``x`` (:func:`quantize_row`, the scale into ``x_scale``), else rebuilt from the
    packed activation planes ``xp`` (:func:`act_bytes`)."""
    if x is not None:
        quantize_row(T, fmt, x, r, k_dim, codes, x_scale, chunks)
        return
    full_chunks = fmt.words(k_dim) // 2
    for c in range(chunks):
        T.buffer_store(codes, act_bytes(fmt, xp, r, c, c < full_chunks), [r, tir.Ramp(c * CHUNK, 1, CHUNK)])


def sum_codes(T, codes, r, total, length: int) -> None:
    """``total[r] = sum(codes[r, :length])`` in int32."""
    T.buffer_store(total, tir.const(0, "int32"), [r])
    with T.serial(0, length) as kk:
        T.buffer_store(total, total[r] + codes[r, kk].astype("int32"), [r])
