"""The ``lut16x4`` weight layout: plane pairs of 16-row tiles as 4-bit table indices, for AVX2 lookups.

See :data:`pbtvm.bitplane.LAYOUTS`. A CPU without AVX-512 multiplies k-bit planes fastest by
table lookup (:mod:`pbtvm.ops.pb_lut`): the 4 bits of one plane and row over 4 consecutive inputs
index a 16-entry table of the activation row's partial sums, one ``vpshufb`` looking up 32 such
indices at once. The 32 bytes of one shuffle must share their table, so they hold 16 output rows
(x 2 planes), not consecutive inputs of one row; this layout stores the planes in that order.

Shape ``[ceil(bits/2), ceil(N/16), 4 * ceil(K/32), 8]`` uint32 (:func:`lut_shape`): plane pair,
row tile, input octet, 32 bytes as 8 little-endian words. Byte ``2 m + q`` of octet ``o`` holds,
for row ``16 t + m`` and plane ``2 p + q``, the plane bits of inputs ``8 o .. 8 o + 3`` in its low
nibble (bit ``j``: input ``8 o + j``) and of inputs ``8 o + 4 .. 8 o + 7`` in its high nibble.
Rows, the odd plane and K (to 32, as the ``kNW`` words) are zero-padded. A plane pair's tiles are
contiguous, so ``bitlayers`` drops whole pairs from what is read.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

#: The layout's name (a value of :data:`pbtvm.bitplane.LAYOUTS`).
LUT_LAYOUT = "lut16x4"
#: Output rows per tile (16 int16 lanes of one ``vpmaddubsw``) and inputs per table index.
LUT_TILE_ROWS, LUT_GROUP = 16, 4
#: Bytes of one (pair, tile, octet) vector: 16 rows x 2 planes.
LUT_VECTOR_BYTES = 32


def lut_shape(bits: int, n: int, words: int) -> tuple[int, int, int, int]:
    """Shape of ``bits`` planes of ``n`` rows and ``words`` uint32 words each in this layout."""
    return (-(-int(bits) // 2), -(-int(n) // LUT_TILE_ROWS), 4 * int(words), LUT_VECTOR_BYTES // 4)


def to_lut_tiles(planes: np.ndarray) -> np.ndarray:
    """``[p, N, W]`` planes (uint32) -> the ``lut16x4`` layout, :func:`lut_shape` ``(p, N, W)``."""
    planes = np.ascontiguousarray(planes, np.uint32)
    p, n, w = planes.shape
    pairs, tn, octets, _ = lut_shape(p, n, w)
    bits = np.zeros((2 * pairs, tn * LUT_TILE_ROWS, 32 * w), np.uint8)
    bits[:p, :n] = np.unpackbits(planes.view(np.uint8), axis=2, bitorder="little").reshape(p, n, 32 * w)
    # plane = 2 pair + q, row = 16 t + m, input = 8 o + 4 h + j
    b = bits.reshape(pairs, 2, tn, LUT_TILE_ROWS, octets, 2, LUT_GROUP)
    nibbles = (b.astype(np.uint8) << np.arange(LUT_GROUP, dtype=np.uint8)).sum(-1, dtype=np.uint8)
    byte = nibbles[..., 0] | (nibbles[..., 1] << 4)  # [pair, q, t, m, o]
    vectors = np.ascontiguousarray(byte.transpose(0, 2, 4, 3, 1))  # [pair, t, o, m, q]
    return vectors.reshape(pairs, tn, octets, LUT_VECTOR_BYTES).view("<u4")


def from_lut_tiles(tiles: np.ndarray, bits: int, n_rows: int | None) -> np.ndarray:
    """Invert :func:`to_lut_tiles`: ``[bits, n_rows, W]`` planes (uint32)."""
    if n_rows is None:
        raise InputError(f"the {LUT_LAYOUT} layout pads rows to {LUT_TILE_ROWS}: pass n_rows (the layer's N)")
    tiles = np.ascontiguousarray(tiles, np.uint32)
    pairs, tn, octets = tiles.shape[:3]
    if tiles.shape[3:] != (LUT_VECTOR_BYTES // 4,) or octets % 4 or not 0 < n_rows <= tn * LUT_TILE_ROWS:
        raise InputError(f"{LUT_LAYOUT} weights of shape {tiles.shape} cannot hold {n_rows} rows")
    if not 2 * pairs - 1 <= bits <= 2 * pairs:
        raise InputError(f"{LUT_LAYOUT} weights of shape {tiles.shape} hold {2 * pairs} planes, not {bits}")
    byte = tiles.view(np.uint8).reshape(pairs, tn, octets, LUT_TILE_ROWS, 2).transpose(0, 4, 1, 3, 2)
    nibbles = np.stack([byte & 15, byte >> 4], axis=-1)  # [pair, q, t, m, o, h]
    b = (nibbles[..., None] >> np.arange(LUT_GROUP, dtype=np.uint8)) & 1
    bits_ = b.reshape(2 * pairs, tn * LUT_TILE_ROWS, octets * 8)[:bits, :n_rows]
    words = octets // 4
    packed = np.packbits(np.ascontiguousarray(bits_), axis=2, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4").reshape(bits, n_rows, words)


def lut_word(wp, plane, row, word):
    """Word ``word`` of ``plane`` and ``row`` (bit ``t``: input ``32 word + t``) from ``lut16x4``
    weights ``wp`` (a TE tensor or TIR buffer): byte ``e`` of the word is the layout's byte for
    octet ``4 word + e`` (its nibbles are inputs ``8 o .. 8 o + 7`` in order). TIR expressions."""
    from .._tvm import tir

    pair, q = plane // 2, plane % 2
    tile, m = row // LUT_TILE_ROWS, row % LUT_TILE_ROWS
    lane = 2 * m + q
    shift = tir.const(lane % 4 * 8, "uint32") if isinstance(lane, int) else (lane % 4 * 8).astype("uint32")
    total = None
    for e in range(4):
        byte = tir.bitwise_and(
            tir.shift_right(wp[pair, tile, 4 * word + e, lane // 4], shift), tir.const(255, "uint32")
        )
        term = tir.shift_left(byte, tir.const(8 * e, "uint32"))
        total = term if total is None else tir.bitwise_or(total, term)
    return total
