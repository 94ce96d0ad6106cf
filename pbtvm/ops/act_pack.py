"""TE: run-time activation quantization (dynamic per-row scale) fused with bitplane packing."""

from __future__ import annotations

from .. import names
from .._tvm import te, tir
from ..bitplane import MMA_LAYOUT, WORD_BITS, BitplaneFormat
from ..bitplane.mma_layout import mma_act_word
from .common import act_code, act_inverse, act_magnitude, act_prescale, act_scale, plane_bit

__all__ = ["act_quantize_pack"]


def act_quantize_pack(x: te.Tensor, fmt: BitplaneFormat, tag: str = "") -> list[te.Tensor]:
    """Quantize ``x`` per row to ``fmt.act_bits`` and pack it into bitplanes.

    Mirrors :func:`pbtvm.quantize.quantize_activations` + :func:`pbtvm.bitplane.pack_activations`
    bit for bit on finite rows. Non-finite rows follow torch (README, "Thread safety, NaN
    and op semantics"): a NaN makes the row's scale NaN, so all its outputs are NaN; an infinite entry makes
    the scale infinite and gets the code +-qmax, so the outputs are +-inf (NaN where a weight is 0).
    The row max carries both facts at no extra pass: NaN counts as +inf and +-inf as the largest
    float (``te.max`` drops NaN, and a custom NaN-keeping reducer cannot be a CUDA warp reduction).

    Parameters
    ----------
    x : te.Tensor, float32, shape [B, K]
        B may be symbolic.
    fmt : BitplaneFormat
    tag : str
        Suffix of every block name (``pb_amax<tag>`` ...), for a PrimFunc that packs two inputs.

    Returns
    -------
    list of te.Tensor
        ``xp`` uint32 ``fmt.act_shape(B, K)`` (``[act_bits, B, ceil(K/32)]``, or the B-fragment
        order of the ``mma16x256`` layout, zero in its padding planes and words), ``x_scale`` float32 [B] and
        ``rowsum`` [B] (``fmt.accumulator_dtype(K)``, the sum of the activation codes).
    """
    if x.dtype != "float32":
        raise TypeError(f"act_quantize_pack expects float32 activations, got {x.dtype}")
    batch, k_dim = x.shape
    k_int = int(k_dim)
    qmax = float(fmt.act_qmax)
    acc_dtype = fmt.accumulator_dtype(k_int)
    r = te.reduce_axis((0, k_dim), "r")
    amax = te.compute((batch,), lambda b: te.max(act_magnitude(x[b, r]), axis=r), name=names.AMAX + tag)
    x_scale = te.compute((batch,), lambda b: act_scale(amax[b], qmax), name=names.XSCALE + tag)
    inv = te.compute((batch,), lambda b: act_inverse(amax[b], qmax), name=names.XINV + tag)
    xq = te.compute(
        (batch, k_dim),
        lambda b, k: act_code(x[b, k], act_prescale(amax[b]), inv[b], qmax).astype("int32"),
        name=names.XQ + tag,
    )
    t = te.reduce_axis((0, WORD_BITS), "t")

    def pack(p, b, w):
        kk = w * WORD_BITS + t
        bit = tir.bitwise_and(
            tir.shift_right(xq[b, tir.min(kk, k_int - 1)], plane_bit(p, fmt.act_bits).astype("int32")), 1
        )
        bit = tir.if_then_else(kk < k_int, bit, 0).astype("uint32")
        return tir.shift_left(bit, t.astype("uint32"))

    if fmt.layout == MMA_LAYOUT:

        def fragment_word(b, kt, j, e):  # words past W pack to zero
            bit = tir.if_then_else(
                j < fmt.act_bits, pack(tir.min(j, fmt.act_bits - 1), b, mma_act_word(kt, e)), tir.const(0, "uint32")
            )
            return te.sum(bit, axis=t)

        xp = te.compute(fmt.act_shape(batch, k_int), fragment_word, name=names.XPACK + tag)
    else:
        xp = te.compute(
            fmt.act_shape(batch, k_int), lambda p, b, w: te.sum(pack(p, b, w), axis=t), name=names.XPACK + tag
        )
    r2 = te.reduce_axis((0, k_dim), "r2")
    rowsum = te.compute((batch,), lambda b: te.sum(xq[b, r2].astype(acc_dtype), axis=r2), name=names.ROWSUM + tag)
    return [xp, x_scale, rowsum]
