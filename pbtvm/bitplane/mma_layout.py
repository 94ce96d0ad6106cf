"""The ``mma16x256`` layout: weight planes in the A-fragment tiles of ``mma.m16n8k256.b1``, and
activation planes in its B-fragment order.

See :data:`pbtvm.bitplane.LAYOUTS`. Index maths (works on ints and TIR expressions) and the numpy
tiling used by :func:`pbtvm.bitplane.pack_weights` / :func:`pbtvm.bitplane.unpack_weights` and
:func:`pbtvm.bitplane.pack_activations`.

Activations: the MMA's B operand is K x 8 bits, column ``c`` of the product being activation
plane ``c % stride`` of batch row ``c // stride`` (``stride`` = :func:`act_column_stride`: act_bits
rounded up to 2, 4, 8 or 16, so a row never straddles two 8-column tiles unless it fills them).
Lane ``l`` of a warp holds in register ``r`` the word ``l % 4 + 4 r`` of the 256-bit K tile of
column ``l // 4``. The activations are stored ``[B, k_tiles, stride, 8]``: element ``[b, kt, j,
2 (w % 4) + w // 4]`` is word ``8 kt + w`` of plane ``j`` of row ``b``, so a lane's two words are
adjacent (one 8-byte load) and an 8-column tile of one K tile is 256 contiguous bytes when
``stride >= 8`` (``8 / stride`` pieces of ``32 stride`` bytes otherwise). Planes ``act_bits ..
stride - 1`` and words past ``ceil(K / 32)`` are zero.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError

#: The layout's name (a value of :data:`pbtvm.bitplane.LAYOUTS`).
MMA_LAYOUT = "mma16x256"
#: Rows x words of one ``mma16x256`` tile (16 rows x 256 bits).
MMA_TILE_ROWS, MMA_TILE_WORDS = 16, 8


def mma_tile_index(row: Any, word: Any) -> tuple[Any, Any, Any, Any]:
    """Where (row, word) of a plane lives in the ``mma16x256`` layout: (tile_m, tile_k, lane, reg).

    The A fragment of ``mma.sync.m16n8k256.row.col.b1``: lane ``l`` holds in register ``r`` the
    word ``4 * (r // 2) + l % 4`` of tile row ``l // 4 + 8 * (r % 2)``. Works for ints and TIR.
    """
    r16, w8 = row % MMA_TILE_ROWS, word % MMA_TILE_WORDS
    return (row // MMA_TILE_ROWS, word // MMA_TILE_WORDS, 4 * (r16 % 8) + w8 % 4, r16 // 8 + 2 * (w8 // 4))


def act_column_stride(act_bits: int) -> int:
    """MMA columns per batch row: ``act_bits`` rounded up to 2, 4, 8 or 16."""
    return next(s for s in (2, 4, 8, 16) if s >= act_bits)


def mma_act_shape(act_bits: int, batch: Any, words: int) -> tuple[Any, int, int, int]:
    """Shape of ``batch`` rows of ``words`` packed words a plane in the B-fragment order."""
    return (batch, -(-int(words) // MMA_TILE_WORDS), act_column_stride(act_bits), MMA_TILE_WORDS)


def mma_act_index(plane: Any, row: Any, word: Any) -> tuple[Any, Any, Any, Any]:
    """Where (plane, row, word) of the activation planes lives in the B-fragment order."""
    w8 = word % MMA_TILE_WORDS
    return (row, word // MMA_TILE_WORDS, plane, 2 * (w8 % 4) + w8 // 4)


def mma_act_word(k_tile: Any, element: Any) -> Any:
    """The word (``8 k_tile + w``) held by ``element`` (0..7) of a K tile in the B-fragment order:
    the inverse of :func:`mma_act_index`'s last index. Works for ints and TIR."""
    return k_tile * MMA_TILE_WORDS + element // 2 + 4 * (element % 2)


def to_mma_act(planes: np.ndarray) -> np.ndarray:
    """``[act_bits, B, W]`` activation planes -> ``[B, ceil(W/8), stride, 8]`` (zero-padded)."""
    a, b, w = planes.shape
    _, tk, stride, _ = mma_act_shape(a, b, w)
    padded = np.zeros((stride, b, tk * MMA_TILE_WORDS), np.uint32)
    padded[:a, :, :w] = planes
    # word = 8 tk + 4 wh + wl -> [b, tk, plane, 2 wl + wh]
    t = padded.reshape(stride, b, tk, 2, 4).transpose(1, 2, 0, 4, 3)
    return np.ascontiguousarray(t.reshape(b, tk, stride, MMA_TILE_WORDS))


def from_mma_act(xp: np.ndarray, act_bits: int) -> np.ndarray:
    """Invert :func:`to_mma_act`: ``[act_bits, B, W_padded]`` planes (words padded to 8)."""
    xp = np.asarray(xp, np.uint32)
    stride = act_column_stride(act_bits)
    if xp.ndim != 4 or xp.shape[2:] != (stride, MMA_TILE_WORDS):
        raise InputError(
            f"mma16x256 activations with act_bits={act_bits} are [B, k_tiles, {stride}, {MMA_TILE_WORDS}], "
            f"got shape {xp.shape}"
        )
    b, tk = xp.shape[:2]
    t = xp.reshape(b, tk, stride, 4, 2).transpose(2, 0, 1, 4, 3)
    return t.reshape(stride, b, tk * MMA_TILE_WORDS)[:act_bits]


def to_mma_tiles(planes: np.ndarray) -> np.ndarray:
    """``[p, N, W]`` planes -> ``[p, ceil(N/16), ceil(W/8), 32, 4]`` (zero-padded tiles)."""
    p, n, w = planes.shape
    tn, tk = -(-n // MMA_TILE_ROWS), -(-w // MMA_TILE_WORDS)
    padded = np.zeros((p, tn * MMA_TILE_ROWS, tk * MMA_TILE_WORDS), np.uint32)
    padded[:, :n, :w] = planes
    # row = 16 tm + 8 rh + rl, word = 8 tk + 4 wh + wl  ->  [p, tm, tk, lane = 4 rl + wl, reg = rh + 2 wh]
    t = padded.reshape(p, tn, 2, 8, tk, 2, 4).transpose(0, 1, 4, 3, 6, 5, 2)
    return np.ascontiguousarray(t.reshape(p, tn, tk, 32, 4))


def from_mma_tiles(tiles: np.ndarray, n_rows: int | None) -> np.ndarray:
    """Invert :func:`to_mma_tiles`: ``[p, N, W_padded]`` planes (rows cut to ``n_rows``)."""
    if n_rows is None:
        raise InputError("the mma16x256 layout pads rows to 16: pass n_rows (the layer's N)")
    tiles = np.asarray(tiles, np.uint32)
    p, tn, tk = tiles.shape[:3]
    if tiles.shape[3:] != (32, 4) or not 0 < n_rows <= tn * MMA_TILE_ROWS:
        raise InputError(f"mma16x256 weights of shape {tiles.shape} cannot hold {n_rows} rows")
    t = tiles.reshape(p, tn, tk, 8, 4, 2, 2).transpose(0, 1, 6, 3, 2, 5, 4)
    return t.reshape(p, tn * MMA_TILE_ROWS, tk * MMA_TILE_WORDS)[:, :n_rows]
