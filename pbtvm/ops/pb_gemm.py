"""TE: the PrecisionBatching product over bitplanes and its float epilogue.

``acc[b, n] = sum_{i < bitlayers} sum_j sum_w c_i d_j popcount(W[i, n, w] & X[j, b, w])``

``bitlayers`` is a symbolic TIR variable, so one compiled kernel serves every precision 1..k
and reads only the planes it accumulates. Weights may be in any layout of
:data:`pbtvm.bitplane.LAYOUTS` (read through :meth:`BitplaneFormat.weight_word`). In the
``mma16x256`` layout the ``pb_gemm`` block names the binary-tensor-core rule
(:data:`pbtvm.names.RULE_BMMA_GEMM`): on CUDA :class:`pbtvm.schedules.cuda_bmma.CUDABmmaGemm`
replaces it with the tensor-core kernel, and MetaSchedule tunes that kernel's configuration; a
CPU build of the same compute is its reference.
"""

from __future__ import annotations

from .. import names
from .._tvm import te, tir
from ..bitplane import LUT_LAYOUT, MMA_LAYOUT, BitplaneFormat
from .act_pack import act_quantize_pack
from .common import plane_coefficient, weight_plane_coefficient
from .epilogue import activated, dense_value

__all__ = ["pb_int_product", "pb_dense", "pb_dense_act", "dense_epilogue"]


def _rows(wp: te.Tensor, fmt: BitplaneFormat, n_rows: int | None) -> tir.PrimExpr:
    """N: given, or read off ``wp`` (the ``mma16x256`` and ``lut16x4`` layouts pad rows to 16, so
    there it must be given)."""
    if n_rows is not None:
        return n_rows
    if fmt.layout in (MMA_LAYOUT, LUT_LAYOUT):
        raise ValueError(f"{fmt.name}: the {fmt.layout} layout pads rows to 16, so the PB product needs N")
    return wp.shape[1] if fmt.layout == "kNW" else wp.shape[0]


def _check(xp: te.Tensor, wp: te.Tensor, fmt: BitplaneFormat, k_dim: int, n_rows: tir.PrimExpr) -> None:
    want = fmt.weight_shape(int(n_rows), k_dim)
    if tuple(int(s) for s in wp.shape) != want:
        raise ValueError(f"packed weights have shape {tuple(wp.shape)}, {fmt.name} wants {want}")
    axis = fmt.act_batch_axis
    got_x = [int(s) for k, s in enumerate(xp.shape) if k != axis]
    if got_x != [s for k, s in enumerate(fmt.act_shape(1, k_dim)) if k != axis]:
        raise ValueError(f"packed activations have shape {tuple(xp.shape)}, incompatible with {fmt.name}, K={k_dim}")


def _plane_sum(
    xp: te.Tensor,
    wp: te.Tensor,
    bitlayers: tir.PrimExpr,
    fmt: BitplaneFormat,
    k_dim: int,
    tag: str = "",
    n_rows: int | None = None,
) -> te.Tensor:
    n_rows = _rows(wp, fmt, n_rows)
    _check(xp, wp, fmt, k_dim, n_rows)
    acc_dtype = fmt.accumulator_dtype(k_dim)
    batch = xp.shape[fmt.act_batch_axis]
    i = te.reduce_axis((0, bitlayers), "i")
    j = te.reduce_axis((0, fmt.act_bits), "j")
    w = te.reduce_axis((0, fmt.words(k_dim)), "w")

    def body(b, n):
        # Plane i itself (i < bitlayers <= bits), written so that TVM can see it is within the buffer:
        # reading plane i put a schedule's register copy of the weights under ``if (i < bits)``, and
        # ptxas dropped such a load (tests/test_cuda_template_emulated.py).
        plane = tir.min(i, fmt.bits - 1)
        pc = tir.popcount(tir.bitwise_and(fmt.weight_word(wp, plane, n, w), xp[fmt.act_index(j, b, w)])).astype(
            acc_dtype
        )
        coef = weight_plane_coefficient(i, fmt, acc_dtype) * plane_coefficient(j, fmt.act_bits, True, acc_dtype)
        return te.sum(pc * coef, axis=[i, j, w])

    # The rule MetaSchedule applies: the popcount GEMM, or in the mma16x256 layout the binary-tensor-core
    # kernel (on CUDA; a CPU build of this compute is the reference)
    rule = names.RULE_BMMA_GEMM if fmt.layout == MMA_LAYOUT else names.RULE_BITPLANE_GEMM
    return te.compute((batch, n_rows), body, name=names.GEMM + tag, attrs={"schedule_rule": rule})


def pb_int_product(
    xp: te.Tensor,
    rowsum: te.Tensor,
    wp: te.Tensor,
    bitlayers: tir.PrimExpr,
    fmt: BitplaneFormat,
    k_dim: int,
    n_rows: int | None = None,
) -> te.Tensor:
    """Exact integer PB product, equal to :func:`pbtvm.bitplane.bitplane_matmul`.

    Parameters
    ----------
    xp : te.Tensor, uint32, ``fmt.act_shape(B, K)``
    rowsum : te.Tensor, [B], accumulator dtype
    wp : te.Tensor, uint32, ``fmt.weight_shape(N, K)``
    bitlayers : PrimExpr, int64
        Number of top weight planes to accumulate, 1..bits.
    fmt : BitplaneFormat
    k_dim : int
        Unpadded K.
    n_rows : int, optional
        N; required in the ``mma16x256`` and ``lut16x4`` layouts (rows padded to 16), read off ``wp``
        otherwise.

    Returns
    -------
    te.Tensor, ``fmt.accumulator_dtype(K)``, [B, N]
    """
    acc = _plane_sum(xp, wp, bitlayers, fmt, k_dim, n_rows=n_rows)
    off = fmt.weight_offset
    return te.compute(acc.shape, lambda b, n: acc[b, n] + tir.const(off, acc.dtype) * rowsum[b], name=names.ACC)


def pb_dense(
    xp: te.Tensor,
    x_scale: te.Tensor,
    rowsum: te.Tensor,
    wp: te.Tensor,
    w_scale: te.Tensor,
    bias: te.Tensor | None,
    bitlayers: tir.PrimExpr,
    fmt: BitplaneFormat,
    k_dim: int,
    tag: str = "",
    activation: str | None = None,
) -> te.Tensor:
    """PB linear layer on packed activations: ``(acc + (off + corr - z) rowsum) s_x s_w + bias``,
    through ``activation`` (:func:`pbtvm.ops.epilogue.activated`) if given.

    Parameters
    ----------
    xp, rowsum, wp, bitlayers, fmt, k_dim
        As in :func:`pb_int_product`.
    x_scale : te.Tensor, float32, [B]
    w_scale : te.Tensor, float32, ``fmt.scale_shape(N)``
        ``[N]`` scales ``s_w``; with a zero point (offset binary) ``[2, N]``: scales, then the
        zero points ``z`` in code units. ``floor(z)``, clamped to the code range, is subtracted in
        the integer accumulator (exact, and ``|q - floor(z)| < 2^k`` keeps it within
        ``fmt.accumulator_dtype``); only the rest goes through float32, so large codes do not
        cancel there.
    bias : te.Tensor, float32, [N], or None
    tag : str
        Suffix of the block names (``pb_gemm<tag>``, ``pb_out<tag>``).
    activation : str, optional
        One of :data:`pbtvm.names.ACTIVATIONS`, applied to every output (the layer's next op
        folded in: :class:`pbtvm.relay_passes.FuseActivationIntoPB`).

    Returns
    -------
    te.Tensor, float32, [B, N]
        Matches :func:`pbtvm.quantize.pb_linear_reference` within float32 rounding.
    """
    acc = _plane_sum(xp, wp, bitlayers, fmt, k_dim, tag, int(w_scale.shape[-1]))
    return dense_epilogue(acc, x_scale, rowsum, w_scale, bias, bitlayers, fmt, tag, activation)


def dense_epilogue(
    acc: te.Tensor,
    x_scale: te.Tensor,
    rowsum: te.Tensor,
    w_scale: te.Tensor,
    bias: te.Tensor | None,
    bitlayers: tir.PrimExpr,
    fmt: BitplaneFormat,
    tag: str = "",
    activation: str | None = None,
) -> te.Tensor:
    """``(acc + (off + corr - z) rowsum) s_x s_w + bias`` for an integer ``acc`` [B, N] (block ``pb_out<tag>``),
    through ``activation`` if given.

    ``w_scale`` is ``fmt.scale_shape(N)``: the scales, and with a zero point also ``z`` (see
    :func:`pb_dense`).
    """
    n_rows = int(acc.shape[1])
    if tuple(int(d) for d in w_scale.shape) != fmt.scale_shape(n_rows):
        raise ValueError(f"w_scale has shape {tuple(w_scale.shape)}, {fmt.name} wants {fmt.scale_shape(n_rows)}")

    def epilogue(b, n):
        # x_scale and rowsum are read before acc so that a PrimFunc computing them too (the fused
        # LSTM cell) orders their blocks before the GEMM; the float arithmetic is unchanged.
        return activated(dense_value(fmt, x_scale[b], rowsum[b], acc[b, n], w_scale, n, bias, bitlayers), activation)

    return te.compute(acc.shape, epilogue, name=names.DENSE_OUT + tag)


def pb_dense_act(
    x: te.Tensor,
    wp: te.Tensor,
    w_scale: te.Tensor,
    bias: te.Tensor | None,
    bitlayers: tir.PrimExpr,
    fmt: BitplaneFormat,
    activation: str | None = None,
) -> te.Tensor:
    """PB linear layer on float activations: :func:`act_quantize_pack` then :func:`pb_dense`.

    One PrimFunc (on CUDA one kernel whose blocks each pack the row themselves), for small
    batches where the separate pack's launches cost more than its work; the result equals the
    two separate kernels'.

    Parameters
    ----------
    x : te.Tensor, float32, [B, K]
    wp, w_scale, bias, bitlayers, fmt, activation
        As in :func:`pb_dense`.

    Returns
    -------
    te.Tensor, float32, [B, N]
    """
    xp, x_scale, rowsum = act_quantize_pack(x, fmt)
    return pb_dense(xp, x_scale, rowsum, wp, w_scale, bias, bitlayers, fmt, int(x.shape[1]), activation=activation)
