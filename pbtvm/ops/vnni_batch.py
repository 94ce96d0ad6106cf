"""Batches of 2 or more: each weight row decoded once, then multiplied by every activation row.

:func:`pbtvm.ops.vnni_rows.block_rows` decodes a row's chunks into registers and multiplies them by
one batch tile (at most :data:`pbtvm.ops.pb_vnni.MAX_BLOCK_BATCH_TILE` activation rows), so a
batch of ``B`` rows decodes every weight ``ceil(B / tile)`` times. Where the masked-add decode is
most of the work (AVX2, and AVX-512 CPUs without GFNI: ~40 of ~50 vector instructions per 64 W4
weights on AVX2) :func:`rows_decoded_once` decodes the row once into ``K`` bytes of codes (``2K``
with split codes; in L1) and runs the batch tiles' dot products over them. Rows of whole
512-input blocks (K >= 512) of 3 bits or more take it (:func:`decodes_once`), from a batch the
caller picks: the GEMM (:mod:`pbtvm.ops.pb_vnni`) from batch 2 (batches 2-4 measured as fast as
the codes in registers, and one loop nest less to build), the LSTM step
(:mod:`pbtvm.ops.pb_vnni_lstm`) past one batch tile (5-13 % slower than the tile at batches 2-4
there). Batch 1 and shorter rows keep the batch tiles.

The GFNI decode of AVX-VNNI CPUs (ymm halves, ~6 instructions per 64 W4 weights) decodes rows
once too, past one batch tile, its blocks straight into the row's codes: W4 1.0-1.3x, W8
1.1-1.5x at batches 5-16 (Alder Lake build, BENCHMARKS.md, nineteenth session). With the zmm
GFNI decode of AVX-512 only rows with chunks after their blocks do (K = 650, 768, 1300: W8
1.3-1.4x, W3/W4 1.06-1.16x at batch 16); rows of whole blocks only keep the tiles, where the dot
products bound the time (0.95-1.03x).
"""

from __future__ import annotations

import dataclasses

from .._tvm import tir
from .gfni_decode import BLOCK, BLOCK_WORDS
from .vnni_bytes import CHUNK
from .vnni_rows import (
    ACC_CHAINS,
    Kernel,
    accumulators,
    batch_tiles,
    chunk_groups,
    decode_chunk,
    decoded_at,
    dot,
    gfni_block,
    prefetch_ahead,
    store,
)

__all__ = [
    "DECODE_ONCE_MIN_BITS",
    "codes_kernel",
    "decode_once_past",
    "decodes_once",
    "dot_rows",
    "keep_chunk",
    "row_code_bytes",
    "rows_decoded_once",
]

#: Fewest weight bits whose rows of whole blocks are decoded once for batches of several rows
#: (measured without GFNI, kept for the GFNI decodes, whose W1/W2 decode is cheaper still; the
#: GEMM at batches 2-4 as fast as a decode per tile within +-5 %, and the kernel builds 1.6-1.8x
#: faster than with both nests): where the decode is cheap, storing and
#: reloading the codes costs more than decoding again. AVX2, 2 threads, interleaved, us at batch 8 / 16 (tiles ->
#: once): 4096x4096 W1 987 -> 1,159 / 1,929 -> 2,355; W2 1,313 -> 1,305 / 2,556 -> 2,455; W3
#: 1,910 -> 1,491 / 3,577 -> 2,775; W4 2,179 -> 1,745 / 4,450 -> 3,022; W8 4,989 -> 3,407 / 9,652
#: -> 5,131.
DECODE_ONCE_MIN_BITS = 3


def decodes_once(kern: Kernel) -> bool:
    """Whether batches of several rows decode ``kern``'s rows once (:func:`rows_decoded_once`):
    whole blocks, :data:`DECODE_ONCE_MIN_BITS` weight bits or more, and with the zmm GFNI decode
    (AVX-512) chunks after the blocks, which take the masked-add decode: rows of whole blocks
    only measured 0.95-1.03x there (4096x4096 W3-W8, batches 4-16: the dot products bound the
    time), rows with such chunks 1.1-1.4x (10000x650, 2600x1300 W8, batches 5-16). The caller
    picks from which batch (:func:`decode_once_past`)."""
    chunks_after_blocks = kern.chunks - kern.blocks * (BLOCK // CHUNK)
    zmm_blocks_only = kern.gfni and kern.isa == "avx512" and chunks_after_blocks == 0
    return bool(kern.blocks) and kern.fmt.bits >= DECODE_ONCE_MIN_BITS and not zmm_blocks_only


def decode_once_past(kern: Kernel, batch_tile: int) -> int:
    """The batch past which the GEMM decodes ``kern``'s rows once: 1 for the masked-add decode
    (batches 2-4 measured as fast as the codes in registers), one batch tile with GFNI (its
    decode is cheap: within a tile the codes stay in registers)."""
    return batch_tile if kern.gfni else 1


def row_code_bytes(kern: Kernel) -> int:
    """Bytes of one decoded weight row: ``K`` rounded up to whole chunks, twice with split codes."""
    return kern.chunks * CHUNK * (2 if kern.hi else 1)


def rows_decoded_once(T, kern: Kernel, row_codes: tir.Buffer, at, n0, count, batch, batch_tile: int) -> None:
    """Output rows ``n0 .. n0 + count`` x every activation row: each row decoded once.

    Parameters
    ----------
    T : the TVMScript IR builder (``tvm.script.ir_builder.tirx``)
    kern : Kernel
        From :func:`pbtvm.ops.vnni_rows.prepare_kernel` (whole blocks; the GFNI decode writes
        them straight into ``row_codes``, the masked-add decode the chunks), with ``acc``
        (:func:`~pbtvm.ops.vnni_rows.block_slots` of ``batch_tile``) and ``decoded``
        (:func:`~pbtvm.ops.vnni_rows.block_codes`) allocated by the caller.
    row_codes : tir.Buffer, uint8
        Where this parallel task's decoded row goes: :func:`row_code_bytes` from ``at``. Allocated
        once per call outside the parallel loop (a buffer of 1 KiB or more inside it would be a
        workspace allocation per task); each task writes its own part, which stays in its core's L1.
    n0, count : PrimExpr or int
        First output row and how many (``n0 + count <= N``).
    batch : PrimExpr
        Activation rows, all of them.
    batch_tile : int
        Activation rows per pass over the decoded row (straight-line code per rows left).
    """
    row = codes_kernel(kern, row_codes)
    with T.serial(0, count) as r:

        def decode(group: list, full: list) -> None:  # into registers, then to the row's codes
            for j, c in enumerate(group):
                decode_chunk(T, kern, n0 + r, c, full[j], decoded_at(j))
                keep_chunk(T, kern, j, row, at + c * CHUNK)

        start = 0
        if kern.gfni:  # whole blocks straight into the row's codes (no split codes with GFNI)
            with T.serial(0, kern.blocks) as blk:
                prefetch_ahead(T, kern, n0 + r, blk * BLOCK_WORDS)
                gfni_block(T, kern, n0 + r, blk, row_codes, at + blk * BLOCK)
            start = kern.blocks * BLOCK // CHUNK
        chunk_groups(T, kern, start, decode)
        batch_tiles(T, batch, batch_tile, lambda b0, rows: dot_rows(T, row, at, n0 + r, b0, rows))


def codes_kernel(kern: Kernel, row_codes: tir.Buffer) -> Kernel:
    """``kern`` with its dot products reading decoded rows from ``row_codes`` (:func:`dot_rows`):
    a row's chunk ``c`` at ``c * CHUNK`` from where the row starts, with split codes the high
    codes :func:`row_code_bytes` / 2 after the low ones."""
    return dataclasses.replace(kern, decoded=row_codes, hi=row_code_bytes(kern) // 2 if kern.hi else 0)


def keep_chunk(T, kern: Kernel, j: int, row: Kernel, at) -> None:
    """Store chunk ``j`` decoded in ``kern.decoded`` (both parts with split codes) into ``row``'s
    codes (:func:`codes_kernel`) at ``at``."""
    for part in (0, 1) if kern.hi else (0,):
        codes = kern.decoded[tir.Ramp(j * CHUNK + part * kern.hi, 1, CHUNK)]
        T.buffer_store(row.decoded, codes, [tir.Ramp(at + part * row.hi, 1, CHUNK)])


def dot_rows(T, row: Kernel, at, n, b0, b_rows: int) -> None:
    """Output row ``n`` x activation rows ``b0 ..`` (``b_rows``) from its codes at ``row.decoded[at:]``."""
    split = max(1, ACC_CHAINS // b_rows)
    (slot,) = accumulators(T, row, 1, b_rows, split)

    def multiply(group: list, _full: list) -> None:  # past K the activation codes are zero
        for j, c in enumerate(group):
            for b in range(b_rows):
                dot(T, row, slot[b][j % split], tir.Ramp(at + c * CHUNK, 1, CHUNK), b0 + b, c * CHUNK)

    chunk_groups(T, row, 0, multiply)
    store(T, row, slot, split, n, b0, False)
