"""Batches of more than one tile: each weight row decoded once, then multiplied by every activation row.

:func:`pbtvm.ops.vnni_rows.block_rows` decodes a row's chunks into registers and multiplies them by
one batch tile (at most :data:`pbtvm.ops.pb_vnni.MAX_BLOCK_BATCH_TILE` activation rows), so a
batch of ``B`` rows decodes every weight ``ceil(B / tile)`` times. Where the masked-add decode is
most of the work (AVX2, and AVX-512 CPUs without GFNI: ~40 of ~50 vector instructions per 64 W4
weights on AVX2) :func:`rows_decoded_once` decodes the row once into a buffer of ``K`` bytes (in
L1) and runs the batch tiles' dot products over it.
"""

from __future__ import annotations

import dataclasses

from .._tvm import tir
from .vnni_bytes import CHUNK
from .vnni_rows import ACC_CHAINS, Kernel, chunk_groups, decode_chunk, decoded_at, dot, store

__all__ = ["rows_decoded_once"]


def rows_decoded_once(T, kern: Kernel, n0, count, batch, batch_tile: int) -> None:
    """Output rows ``n0 .. n0 + count`` x every activation row: each row decoded once.

    Parameters
    ----------
    T : the TVMScript IR builder (``tvm.script.ir_builder.tirx``)
    kern : Kernel
        From :func:`pbtvm.ops.vnni_rows.prepare_kernel` (masked-add decode: no GFNI), with
        ``acc`` (at least ``batch_tile * max(1, ACC_CHAINS // batch_tile)`` int32x16 slots) and
        ``decoded`` (:data:`~pbtvm.ops.vnni_rows.CHUNK_GROUP` chunks, twice with split codes) allocated by the caller.
    n0, count : PrimExpr or int
        First output row and how many (``n0 + count <= N``).
    batch : PrimExpr
        Activation rows, all of them.
    batch_tile : int
        Activation rows per pass over the decoded row (straight-line code per rows left).
    """
    chunks = kern.full_chunks + kern.tail
    row_codes = T.alloc_buffer((chunks * CHUNK * (2 if kern.hi else 1),), "uint8")
    # the dot products read the row's codes: chunk c at c * CHUNK, high codes at + chunks * CHUNK
    row = dataclasses.replace(kern, decoded=row_codes, hi=chunks * CHUNK if kern.hi else 0)
    with T.serial(0, count) as r:

        def decode(group: list, full: list) -> None:  # into registers, then to the row's codes
            for j, c in enumerate(group):
                decode_chunk(T, kern, n0 + r, c, full[j], decoded_at(j))
                for part in (0, 1) if kern.hi else (0,):
                    src = tir.Ramp(j * CHUNK + part * kern.hi, 1, CHUNK)
                    dst = tir.Ramp(c * CHUNK + part * row.hi, 1, CHUNK)
                    T.buffer_store(row_codes, kern.decoded[src], [dst])

        chunk_groups(T, kern, 0, decode)
        with T.serial(0, (batch + (batch_tile - 1)) // batch_tile) as bt:
            left = batch - bt * batch_tile
            for rows in range(batch_tile, 0, -1):
                with T.If(left >= rows if rows == batch_tile else left == rows):
                    with T.Then():
                        _dot_rows(T, row, n0 + r, bt * batch_tile, rows)


def _dot_rows(T, row: Kernel, n, b0, b_rows: int) -> None:
    """Output row ``n`` x activation rows ``b0 ..`` (``b_rows``) from the decoded row ``row.decoded``."""
    lanes, split = CHUNK // 4, max(1, ACC_CHAINS // b_rows)
    slot = [[tir.Ramp((b * split + s) * lanes, 1, lanes) for s in range(split)] for b in range(b_rows)]
    for group in slot:
        for at in group:
            T.buffer_store(row.acc, tir.Broadcast(tir.const(0, "int32"), lanes), [at])

    def multiply(group: list, _full: list) -> None:  # past K both codes are zero
        for j, c in enumerate(group):
            for b in range(b_rows):
                dot(T, row, slot[b][j % split], tir.Ramp(c * CHUNK, 1, CHUNK), b0 + b, c * CHUNK)

    chunk_groups(T, row, 0, multiply)
    store(T, row, slot, split, n, b0, False)
