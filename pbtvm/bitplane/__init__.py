"""The PrecisionBatching bitplane format: one frozen dataclass and its numpy reference.

:mod:`~pbtvm.bitplane.format` holds :class:`BitplaneFormat`, :mod:`~pbtvm.bitplane.reference` the
numpy pack/unpack and exact product, :mod:`~pbtvm.bitplane.mma_layout` the tensor-core tile layout, :mod:`~pbtvm.bitplane.lut_layout`
the AVX2 table-lookup layout;
everything is importable from ``pbtvm.bitplane``.

This package is the single source of truth for how quantized integers become binary planes and
back. Every other file (TE operators, schedules, the Relax pass, the runtime) reads plane
counts, plane coefficients, word sizes and layouts from :class:`BitplaneFormat`.

Maths
-----
A k-bit weight code ``q`` is stored as k binary planes ``b_0 .. b_{k-1}`` (plane 0 is the most
significant, "MSB first") so that ``q = sum_i c_i * b_i + offset`` where

* ``twos_complement`` (k >= 2): ``c = (-2^(k-1), 2^(k-2), ..., 2, 1)``, ``offset = 0``;
* ``bipolar`` (k == 1): ``q = 2*b - 1``, i.e. ``c = (2,)``, ``offset = -1``;
* ``offset_binary`` (any k): unsigned ``q in 0..2^k-1``, ``c = (2^(k-1), ..., 2, 1)``,
  ``offset = 0``, and the weight is ``w ~= s[n] * (q - z[n])`` with a per-row float zero point
  ``z`` (:attr:`BitplaneFormat.has_zero_point`). All ``2^k`` levels are used (two's complement
  uses ``2^k - 1``, the symmetric ones), and the grid may sit off-centre.

Activations use two's complement with ``act_bits`` planes and coefficients ``d_j``. The exact
integer product of one weight row ``n`` and one activation row ``b`` is then::

    acc[b, n] = sum_i sum_j c_i d_j popcount(W_i[n, :] & X_j[b, :]) + offset * rowsum[b]
    rowsum[b] = sum_j d_j popcount(X_j[b, :]) = sum_k xq[b, k]

The zero point costs one float term in the epilogue, ``-z[n] * rowsum[b]``, so every kernel stays
a plane product: ``sum_k s (q - z) x = s (acc - z rowsum)``.

Keeping only the top ``bitlayers`` weight planes (the run-time precision knob) zeroes the low
``k - bitlayers`` bits of every weight; their expected value, ``(2^(k-L) - 1) / 2`` per weight
(the dropped bits are ``sum_{p<k-L} 2^p b_p`` with non-negative coefficients in both two's
complement and offset binary; each bit 0 or 1 with mean 1/2) is added back as
``correction * rowsum`` in the float epilogue. Bipolar has no lower planes to drop.

Planes are packed along K into little-endian uint32 words: bit ``t`` of word ``w`` holds element
``32*w + t``. K is zero-padded to a multiple of 32; padded bits are 0 in both operands.
Packed activations are ``[act_bits, B, W]``, except in the ``mma16x256`` layout, where they are
in the tensor core's B-fragment order (:meth:`BitplaneFormat.act_shape`).
"""

from .format import (
    CODEBOOKS,
    DEFAULT_ACT_BITS,
    FORMAT_VERSION,
    LAYOUTS,
    PRESETS,
    WORD_BITS,
    BitplaneFormat,
)
from .lut_layout import LUT_LAYOUT, LUT_TILE_ROWS
from .mma_layout import MMA_LAYOUT, MMA_TILE_ROWS, MMA_TILE_WORDS, act_column_stride, mma_act_index, mma_tile_index
from .reference import (
    act_planes,
    bitplane_matmul,
    pack_activations,
    pack_planes,
    pack_weights,
    plane_rowsum,
    unpack_planes,
    unpack_weights,
)

__all__ = [
    "CODEBOOKS",
    "DEFAULT_ACT_BITS",
    "LUT_LAYOUT",
    "LUT_TILE_ROWS",
    "MMA_LAYOUT",
    "MMA_TILE_ROWS",
    "MMA_TILE_WORDS",
    "WORD_BITS",
    "FORMAT_VERSION",
    "LAYOUTS",
    "PRESETS",
    "BitplaneFormat",
    "pack_planes",
    "unpack_planes",
    "pack_weights",
    "unpack_weights",
    "pack_activations",
    "act_planes",
    "bitplane_matmul",
    "plane_rowsum",
    "mma_tile_index",
    "mma_act_index",
    "act_column_stride",
]
