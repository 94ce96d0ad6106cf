"""The ``mma16x256`` weight layout: planes cut into the A-fragment tiles of ``mma.m16n8k256.b1``.

See :data:`pbtvm.bitplane.LAYOUTS`. Index maths (works on ints and TIR expressions) and the numpy
tiling used by :func:`pbtvm.bitplane.pack_weights` / :func:`pbtvm.bitplane.unpack_weights`.
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
