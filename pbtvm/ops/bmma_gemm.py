"""TE: the PB dense layer on weights in the ``mma16x256`` layout (binary tensor cores on CUDA).

The compute is the plain definition (popcount over plane pairs, read through
:meth:`BitplaneFormat.weight_index`), the same maths as :func:`pbtvm.ops.pb_dense`; it is what
MetaSchedule tunes (its ``pb_gemm`` block carries :data:`pbtvm.names.RULE_BMMA_GEMM`) and what a CPU
build runs as a reference. On CUDA the schedule rule replaces it with the hand-written tensor-core
kernel :func:`pbtvm.schedules.cuda_bmma_kernel.bmma_dense_kernel`.
"""

from __future__ import annotations

from .. import names
from .._tvm import te, tir
from ..bitplane import BitplaneFormat
from .act_pack import act_quantize_pack
from .common import plane_coefficient, weight_plane_coefficient
from .pb_gemm import dense_epilogue

__all__ = ["BMMA_LAYOUT", "pb_dense_mma", "pb_dense_act_mma"]

#: The weight layout these kernels read.
BMMA_LAYOUT = "mma16x256"


def pb_dense_mma(
    xp: te.Tensor,
    x_scale: te.Tensor,
    rowsum: te.Tensor,
    wp: te.Tensor,
    w_scale: te.Tensor,
    bias: te.Tensor | None,
    bitlayers: tir.PrimExpr,
    fmt: BitplaneFormat,
    k_dim: int,
) -> te.Tensor:
    """PB linear layer on packed activations and ``mma16x256`` weights.

    Parameters
    ----------
    xp : te.Tensor, uint32, [act_bits, B, W]
        Activation planes, ``W = ceil(K / 32)``.
    x_scale : te.Tensor, float32, [B]
    rowsum : te.Tensor, ``fmt.accumulator_dtype(K)``, [B]
    wp : te.Tensor, uint32, ``fmt.weight_shape(N, K)`` = [bits, ceil(N/16), ceil(W/8), 32, 4]
    w_scale : te.Tensor, float32, [N]
        Also fixes N (the layout pads rows to 16).
    bias : te.Tensor, float32, [N], or None
    bitlayers : PrimExpr, int64
        Top weight planes to accumulate, 1..bits.
    fmt : BitplaneFormat
        ``layout == "mma16x256"``.
    k_dim : int
        Unpadded K.

    Returns
    -------
    te.Tensor, float32, [B, N]
        Equal to :func:`pbtvm.ops.pb_dense` on the same weights in another layout.
    """
    if fmt.layout != BMMA_LAYOUT:
        raise ValueError(f"pb_dense_mma reads the {BMMA_LAYOUT} weight layout, got {fmt.name}")
    n_out = int(w_scale.shape[-1])  # [N] scales, or [2, N] scales and zero points
    want = fmt.weight_shape(n_out, k_dim)
    if tuple(int(s) for s in wp.shape) != want:
        raise ValueError(f"packed weights have shape {tuple(wp.shape)}, {fmt.name} N={n_out} K={k_dim} wants {want}")
    if int(xp.shape[0]) != fmt.act_bits or int(xp.shape[2]) != fmt.words(k_dim):
        raise ValueError(f"packed activations have shape {tuple(xp.shape)}, incompatible with {fmt.name}, K={k_dim}")
    acc_dtype = fmt.accumulator_dtype(k_dim)
    i = te.reduce_axis((0, bitlayers), "i")
    j = te.reduce_axis((0, fmt.act_bits), "j")
    w = te.reduce_axis((0, xp.shape[2]), "w")

    def body(b, n):
        pc = tir.popcount(tir.bitwise_and(wp[fmt.weight_index(i, n, w)], xp[j, b, w])).astype(acc_dtype)
        coef = weight_plane_coefficient(i, fmt, acc_dtype) * plane_coefficient(j, fmt.act_bits, True, acc_dtype)
        return te.sum(pc * coef, axis=[i, j, w])

    acc = te.compute((xp.shape[1], n_out), body, name=names.GEMM, attrs={"schedule_rule": names.RULE_BMMA_GEMM})
    return dense_epilogue(acc, x_scale, rowsum, w_scale, bias, bitlayers, fmt)


def pb_dense_act_mma(
    x: te.Tensor,
    wp: te.Tensor,
    w_scale: te.Tensor,
    bias: te.Tensor | None,
    bitlayers: tir.PrimExpr,
    fmt: BitplaneFormat,
) -> te.Tensor:
    """:func:`pb_dense_mma` on float activations ``x`` (float32 [B, K]): the pack and the product in one.

    On CUDA one kernel whose blocks pack their batch rows with ``__ballot_sync`` first.
    """
    xp, x_scale, rowsum = act_quantize_pack(x, fmt)
    return pb_dense_mma(xp, x_scale, rowsum, wp, w_scale, bias, bitlayers, fmt, int(x.shape[1]))
