"""Many activation rows on ``lut16x4`` weights: tiles turned back into plane words, each row decoded once.

The table lookup (:mod:`pbtvm.ops.pb_lut`) repeats its lookups for every activation row, while the
AVX2 byte-code kernel decodes each weight row once into byte codes and multiplies them by every
row (:func:`pbtvm.ops.vnni_batch.rows_decoded_once`): from about 4 rows that wins (BENCHMARKS.md,
sixteenth and twenty-third sessions). So past :func:`lookup_max_rows` activation rows the
``lut16x4`` kernel multiplies that way too, on the same weights (no second copy in another
layout):

1. per 16-row tile, 64-input chunk and kept plane pair, each 32-bit word's 4 octet vectors
   (byte ``2 m + q``: row ``m``, plane ``2 p + q``, 8 inputs, :mod:`pbtvm.bitplane.lut_layout`)
   are transposed into the 32 plane words of those rows and planes (one byte shuffle: ``vpunpck``
   interleaves), into a small buffer in L1;
2. each row's chunk is decoded from them by the ``kNW`` kernel's masked-add decode
   (:func:`pbtvm.ops.vnni_rows.masked_add_decode`, dword broadcasts) into the tile's codes (16 x
   K bytes, in L2);
3. each row's codes are multiplied by every activation row (``vpmaddubsw`` + ``vpmaddwd``,
   batch tiles of :data:`BATCH_TILE`, :func:`pbtvm.ops.vnni_batch.dot_rows`).

At 8-32 rows this runs at 0.84-1.18x of the ``kNW`` kernel on the same layer (W3-W8; the
transposes, the codes in L2), where the lookups ran at 0.54-0.8x. A first version turned the whole tile into plane
words first and decoded row after row: each row's decode then read one word of every 128-byte
line of them (0.8-0.9x of this at batch 8). Each tile's rows are a line more than K apart: at K
4096 their stores would share one L1 set.

The GEMM (:func:`decoded_rows`) and the LSTM step's gate rows (:mod:`pbtvm.ops.pb_vnni_lstm`,
both legs taking turns in a task's tiles) share :func:`decoded_kernel`, :func:`tile_scratch` and
:func:`decoded_tiles`. The same exact integer products as the lookups (and
:func:`pbtvm.ops.pb_int_product`): both are checked against the numpy reference at every
``bitlayers``, the step's ``h'``/``c'`` bit for bit against its lookups'.
"""

from __future__ import annotations

from .._tvm import tir
from ..bitplane import BitplaneFormat
from ..bitplane.lut_layout import LUT_TILE_ROWS, LUT_VECTOR_BYTES
from . import pb_vnni
from .vnni_batch import codes_kernel, dot_rows, keep_chunk, row_code_bytes
from .vnni_bytes import CHUNK
from .vnni_rows import (
    Kernel,
    batch_tiles,
    block_slots,
    chunk_groups,
    decode_scratch,
    decoded_at,
    masked_add_decode,
    prepare_kernel,
)

__all__ = [
    "BATCH_TILE",
    "LOOKUP_MAX_ROWS",
    "decoded_kernel",
    "decoded_problem",
    "decoded_rows",
    "decoded_tiles",
    "lookup_max_rows",
    "tile_scratch",
    "tiles_of",
]

#: Most activation rows the lookups take, by weight bits (more: each row decoded once; bits not
#: listed: the lookups at every batch). Measured side by side on the same weights (AVX2 build on a
#: Zen 4 guest, 2 threads, BENCHMARKS.md, twenty-third session): W3-W8 cross over at 4-5 rows
#: (within the host's noise from 3 to 6); W2's lookups stay ahead of both decodes up to 64 rows.
LOOKUP_MAX_ROWS = dict.fromkeys(range(3, 9), 4)
#: Activation rows per pass over a decoded row (the ``kNW`` AVX2 kernel's default batch tile).
BATCH_TILE = 4
#: Plane words of one (pair, word) of a tile: 16 rows x 2 planes.
_TILE_WORDS = LUT_VECTOR_BYTES
#: Octets (8 inputs) per 32-bit word.
_OCTETS = 4


def lookup_max_rows(fmt: BitplaneFormat, *k_dims: int) -> int | None:
    """Most activation rows the lookups take for ``fmt`` (None: every batch, no decoded path),
    for a kernel whose products have rows of ``k_dims`` inputs (a GEMM's K; an LSTM step's hidden
    and input sizes): None too where the decoded path cannot compute one of them
    (:func:`decoded_problem`)."""
    if any(decoded_problem(fmt, k) is not None for k in k_dims):
        return None
    return LOOKUP_MAX_ROWS.get(fmt.bits)


def decoded_problem(fmt: BitplaneFormat, k_dim: int) -> str | None:
    """Why the decoded path cannot compute ``fmt`` at this K (None when it can): the AVX2
    byte-code kernel's limits, as for ``kNW`` weights."""
    knw = BitplaneFormat(fmt.bits, fmt.act_bits, fmt.codebook)
    return pb_vnni.unsupported_reason(knw, k_dim, "avx2")


def decoded_rows(
    T,
    fmt: BitplaneFormat,
    n_out: int,
    k_dim: int,
    batch,
    wp: tir.Buffer,
    out: tir.Buffer,
    w_scale: tir.Buffer | None,
    bias: tir.Buffer | None,
    layers: tir.Var,
    x: tir.Buffer | None,
    packed: tuple | None,
    serial: bool,
    task_tiles: int,
) -> None:
    """The whole layer, every activation row, by the decoded path (see the module).

    Parameters as :func:`pbtvm.ops.pb_lut.prepare` (``wp`` in the ``lut16x4`` layout), plus
    ``serial`` (one thread: a small layer) and ``task_tiles`` (16-row tiles per parallel task).
    """
    kern = decoded_kernel(T, fmt, n_out, k_dim, batch, wp, out, w_scale, bias, layers, x=x, packed=packed)
    n_tasks = -(-tiles_of(kern) // task_tiles)
    with T.serial(0, n_tasks) if serial else T.parallel(0, n_tasks) as task:
        scratch = tile_scratch(T, [kern])
        decoded_tiles(T, kern, scratch, batch, task * task_tiles, task_tiles)


def decoded_kernel(T, fmt, n_out, k_dim, batch, wp, out, w_scale, bias, layers, x=None, packed=None):
    """The activation rows quantized into the byte codes the decoded path multiplies (once per
    call, before the parallel tasks): :func:`pbtvm.ops.vnni_rows.prepare_kernel` for AVX2 with
    the parameters of :func:`pbtvm.ops.pb_lut.prepare` (``wp`` in the ``lut16x4`` layout)."""
    return prepare_kernel(
        T, fmt, n_out, k_dim, batch, wp, out, w_scale, bias, layers, False, x=x, packed=packed, isa="avx2"
    )


def tiles_of(kern: Kernel) -> int:
    """16-row tiles of ``kern``'s output rows (the last one partial where N is not a multiple)."""
    return -(-kern.n_out // LUT_TILE_ROWS)


def tile_scratch(T, kerns: list[Kernel]) -> tuple:
    """One parallel task's buffers for ``kerns`` (legs of one kernel taking turns, same format):
    a chunk's plane words of a tile's rows (L1) and the tile's decoded rows (L2: 16 rows of the
    longest leg, a line more than K apart), plus the decode registers. Returns ``(words, codes)``."""
    pairs = -(-kerns[0].fmt.bits // 2)
    words = T.alloc_buffer((pairs * 2 * _TILE_WORDS,), "uint32")
    codes = T.alloc_buffer((LUT_TILE_ROWS * max(_row_stride(kern) for kern in kerns),), "uint8")
    decode_scratch(T, kerns, block_slots(BATCH_TILE), CHUNK)
    return words, codes


def _row_stride(kern: Kernel) -> int:
    """Bytes from one decoded row of a tile to the next: a line more than the row's codes (rows K
    = 4096 bytes apart would share one L1 set for the 16 rows' stores of a chunk)."""
    return row_code_bytes(kern) + CHUNK


def decoded_tiles(T, kern: Kernel, scratch: tuple, batch, first, count: int) -> None:
    """Tiles ``first ..`` (``count``, fewer where the layer ends) of ``kern`` by the decoded path:
    per tile every chunk turned into plane words and decoded into the tile's codes, then each row
    multiplied by every activation row.

    Parameters
    ----------
    kern : Kernel
        From :func:`decoded_kernel`, its scratch given by :func:`tile_scratch` (``scratch``).
    batch : PrimExpr
        Activation rows, all of them.
    first, count
        First tile (PrimExpr) and most tiles (int) this task multiplies.
    """
    words, codes = scratch
    pairs = -(-kern.fmt.bits // 2)
    stride = _row_stride(kern)
    n_tiles = tiles_of(kern)
    row = codes_kernel(kern, codes)  # the dot products read the codes
    left = n_tiles - first
    with T.serial(0, tir.min(count, left) if n_tiles % count else count) as t:
        tile = first + t
        n0 = tile * LUT_TILE_ROWS
        rows = tir.min(LUT_TILE_ROWS, kern.n_out - n0) if kern.n_out % LUT_TILE_ROWS else LUT_TILE_ROWS

        def chunk(c, full: bool) -> None:  # every row's chunk c, from its plane words
            # the pairs bitlayers keeps (clamped too, though the entry check refuses more than bits)
            kept = tir.min((kern.layers + 1) // 2, tir.const(pairs, "int64"))
            _chunk_words(T, kern.wp, words, tile, kept, c, full)
            with T.serial(0, rows) as r:
                masked_add_decode(T, kern, decoded_at(0), lambda i: _word_pair(words, r, i, full))
                keep_chunk(T, kern, 0, row, r * stride + c * CHUNK)

        chunk_groups(T, kern, 0, lambda group, full: chunk(group[0], full[0]), size=1)
        with T.serial(0, rows) as r:
            batch_tiles(T, batch, BATCH_TILE, lambda b0, b_rows: dot_rows(T, row, r * stride, n0 + r, b0, b_rows))


def _chunk_words(T, wp: tir.Buffer, words: tir.Buffer, tile, kept_pairs, c, full: bool) -> None:
    """Chunk ``c``'s plane words (``2 c``, and ``2 c + 1`` where ``full``) of tile ``tile``'s 16
    rows for plane pairs ``0 .. kept_pairs`` into ``words``: word ``h`` of the chunk, row ``m``,
    plane ``2 p + q`` at ``(2 p + h) 32 + 2 m + q``.

    Word ``w``'s byte ``e`` is byte ``2 m + q`` of octet ``4 w + e`` (the layout's nibbles are the
    inputs in order), so the 4 octet vectors of a word, transposed as a 4 x 32 byte matrix, are
    the 32 words of the tile's rows and the pair's planes in a row (4 loads, 12 shuffles, 4 stores).
    """
    order = [tir.IntImm("int32", e * LUT_VECTOR_BYTES + lane) for lane in range(_TILE_WORDS) for e in range(_OCTETS)]
    with T.serial(0, kept_pairs.astype("int32")) as p:
        for h in range(2 if full else 1):
            w = 2 * c + h
            octets = [
                tir.reinterpret("uint8x32", wp[p, tile, _OCTETS * w + e, tir.Ramp(0, 1, LUT_VECTOR_BYTES // 4)])
                for e in range(_OCTETS)
            ]
            turned = tir.reinterpret(f"uint32x{_TILE_WORDS}", tir.Shuffle(octets, order))
            T.buffer_store(words, turned, [tir.Ramp((2 * p + h) * _TILE_WORDS, 1, _TILE_WORDS)])


def _word_pair(words: tir.Buffer, r, i: int, full: bool) -> tuple:
    """The chunk's two words of plane ``i`` of the tile's row ``r`` (the second 0 past K), as the
    dword-broadcast decode reads them (:func:`pbtvm.ops.vnni_rows.masked_add_decode`)."""
    p, q = divmod(i, 2)
    lane = 2 * r + q
    low = words[2 * p * _TILE_WORDS + lane]
    return low, words[(2 * p + 1) * _TILE_WORDS + lane] if full else tir.const(0, "uint32")
