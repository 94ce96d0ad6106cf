"""AVX2 PB GEMM by table lookup: 4 plane bits of a row index a table of the activations' partial sums.

The same exact integer product as :func:`pbtvm.ops.pb_int_product`, on weights in the
``lut16x4`` layout (:mod:`pbtvm.bitplane.lut_layout`). For every activation row and every group
of 4 inputs the kernel makes, once per call, the 16 sums ``T[idx] = 512 + sum_j bit_j(idx) x[4g+j]``
(``4 <= T <= 1020`` for codes of at most 8 bits), split into two byte tables ``T & 63`` and
``T >> 6``. Then per 16-row tile and plane pair, for 4 groups at a time:

* two 32-byte loads hold the 4-bit indices of 16 rows x 2 planes x 4 groups; ``vpshufb`` looks
  up 32 of them in one table (8 shuffles: 4 groups x low/high table), ``vpaddb`` sums the 4
  groups (low bytes up to 252, high bytes kept as bytes over 4 such blocks, up to 240);
* ``vpmaddubsw`` with the bytes ``(a, b)`` of the pair's plane coefficients (``c_2p = s a``,
  ``c_2p+1 = s b``, ``|a| <= 2``, ``b <= 1``) weighs and adds the two planes of a row into int16
  (a row per lane), widened to int32 every 512 inputs;
* at the end ``acc = sum_p s_p (low + 64 high) - 512 G sum_{i<L} c_i`` is the PB product of the
  kept planes (``G`` groups, the table offset 512 undone).

So 64 weights of 4 bits cost about 12 vector instructions at batch 1, where the byte-code kernel
(:mod:`pbtvm.ops.pb_vnni`) decodes them with about 40. ``bitlayers`` is read at run time: plane
pairs past it are not read, a half-kept pair gets a zero coefficient. Every activation row
repeats the lookups (the tables are per row), so the byte-code kernel, which decodes a weight
once for several rows, wins at larger batches (BENCHMARKS.md): past
:func:`~pbtvm.ops.lut_decoded.lookup_max_rows` rows (3-8-bit weights) this kernel does the same
on its own weights (:mod:`pbtvm.ops.lut_decoded`), a branch on the call's batch; so does the
LSTM step's gate rows (:mod:`pbtvm.ops.pb_vnni_lstm`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .._tvm import tir
from ..bitplane import BitplaneFormat
from ..bitplane.lut_layout import LUT_GROUP, LUT_LAYOUT, LUT_TILE_ROWS
from . import lut_decoded
from .common import CPU_SCRATCH
from .epilogue import output_value
from .pb_vnni import SERIAL_WEIGHT_BITS, gemm_params  # small layers run serially, as there
from .vnni_bytes import CHUNK, row_codes, sum_codes
from .vnni_rows import batch_tiles

__all__ = [
    "CPU_FEATURES",
    "CPU_KERNEL",
    "LutKernel",
    "pb_lut_func",
    "prepare",
    "scratch",
    "tile_rows",
    "unsupported_reason",
]

#: LLVM CPU features the kernel's instructions need (``vpshufb``, ``vpmaddubsw`` on ymm).
CPU_FEATURES = ("avx2",)
#: Value of the ``pbtvm.cpu_kernel`` attribute on a PrimFunc replaced by this kernel.
CPU_KERNEL = "avx2_lut"
#: Offset added to every table entry so that it is non-negative (``|T| <= 4 * 127``).
TABLE_OFFSET = 512
#: Low table bits: ``T = 64 high + low``, ``low < 64`` (4 of them fit a byte), ``high < 16``.
LOW_BITS = 6
#: Blocks (4 groups, 16 inputs) whose high bytes add up in one byte (4 x 4 x 15 = 240).
HIGH_BLOCKS = 4
#: Blocks whose int16 sums are kept before widening: 32 x 756 (low) < 2^15 (512 inputs).
WIDEN_BLOCKS = 32
#: Activation rows that share the weights' index extraction (their sums take 3 of the 16 ymm
#: registers each).
BATCH_TILE = 2
#: Row tiles per parallel task (64 output rows).
TASK_TILES = 4


def unsupported_reason(fmt: BitplaneFormat, k_dim: int) -> str | None:
    """Why this kernel cannot compute ``fmt`` at this K (None when it can)."""
    if fmt.layout != LUT_LAYOUT:
        return f"the table-lookup kernel reads the {LUT_LAYOUT} layout, not {fmt.layout}"
    if fmt.bits > 8 or fmt.act_bits > 8:
        return f"{fmt.name}: the table-lookup kernel needs weights and activations of at most 8 bits"
    groups = 8 * fmt.words(k_dim)
    if 2 * TABLE_OFFSET * groups * sum(abs(c) for c in fmt.plane_coefficients()) >= 2**31:
        return f"K={k_dim} is too large for int32 accumulation at {fmt.name}"
    return None


def pair_coefficients(fmt: BitplaneFormat) -> list[tuple[int, int, int]]:
    """``(s, a, b)`` per plane pair: ``c_2p = s a``, ``c_2p+1 = s b`` (``b = 0`` past the last plane)."""
    c = list(fmt.plane_coefficients())
    out = []
    for p in range(-(-fmt.bits // 2)):
        first, second = c[2 * p], c[2 * p + 1] if 2 * p + 1 < fmt.bits else 0
        s = abs(second) if second else abs(first)
        out.append((s, first // s, second // s))
    return out


def pb_lut_func(
    fmt: BitplaneFormat,
    n_out: int,
    k_dim: int,
    batch: tir.Var,
    dense: bool,
    bias: bool = False,
    float_input: bool = False,
) -> tir.PrimFunc:
    """The AVX2 table-lookup PB kernel with the parameters of the TE kernel it replaces.

    Parameters
    ----------
    fmt : BitplaneFormat
        ``lut16x4`` layout; must pass :func:`unsupported_reason`.
    n_out, k_dim : int
        N and unpadded K.
    batch : tir.Var
        The symbolic batch dimension.
    dense : bool
        True: ``(xp, x_scale, rowsum, wp, w_scale[, bias], bitlayers) -> y`` float32 [B, N], the
        float arithmetic of :func:`pbtvm.ops.pb_dense`. False: ``(xp, rowsum, wp, bitlayers) ->
        acc`` int32 [B, N], :func:`pbtvm.ops.pb_int_product`.
    bias : bool
        Whether the dense form has a bias parameter.
    float_input : bool
        The one-kernel layer of :func:`pbtvm.ops.pb_dense_act`: ``(x f32 [B, K], wp, w_scale[,
        bias], bitlayers) -> y``, the rows quantized here as :func:`pbtvm.ops.act_quantize_pack`
        does; needs ``dense``.

    Returns
    -------
    tir.PrimFunc
    """
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    why = unsupported_reason(fmt, k_dim)
    if why is not None:
        raise ValueError(f"pb_lut_func cannot compute this layer: {why}")
    if float_input and not dense:
        raise ValueError("pb_lut_func: float_input computes the dense layer (dense=True)")
    most = lut_decoded.lookup_max_rows(fmt, k_dim)
    with IRBuilder() as ib:
        with T.prim_func():
            x, packed, wp, w_scale, bias_buf, layers, out = gemm_params(
                T, fmt, n_out, k_dim, batch, dense, bias, float_input, CPU_KERNEL
            )
            serial = n_out * k_dim * fmt.bits < SERIAL_WEIGHT_BITS
            operands = (T, fmt, n_out, k_dim, batch, wp, out, w_scale, bias_buf, layers)

            def lookups() -> None:
                kern = prepare(*operands, x=x, packed=packed)
                n_tiles = -(-n_out // LUT_TILE_ROWS)
                n_tasks = -(-n_tiles // TASK_TILES)
                with T.serial(0, n_tasks) if serial else T.parallel(0, n_tasks) as task:
                    regs = scratch(T)
                    tile_rows(T, kern, regs, task * TASK_TILES, TASK_TILES, batch)

            if most is None:
                lookups()
            else:  # many rows: each weight row decoded once (:mod:`.lut_decoded`)
                with T.If(batch > most):
                    with T.Then():
                        lut_decoded.decoded_rows(*operands, x, packed, serial, TASK_TILES)
                    with T.Else():
                        lookups()
    return ib.get()


@dataclass
class LutKernel:
    """The buffers the tile loops read (:func:`prepare`)."""

    fmt: BitplaneFormat
    n_out: int
    words: int
    wp: tir.Buffer
    #: [B, groups * 32] uint8: per group of 4 inputs the low and the high 16-byte table.
    tables: tir.Buffer
    #: Per plane pair: the int16 ``a | b << 8`` of ``vpmaddubsw`` (0 for planes past ``bitlayers``),
    #: the int32 scale ``s``; and ``sum_{i<L} c_i`` (``offset[0]``).
    coef: tir.Buffer
    scale: tir.Buffer
    offset: tir.Buffer
    layers: tir.PrimExpr
    x_scale: tir.Buffer | None
    rowsum: tir.Buffer
    w_scale: tir.Buffer | None
    bias: tir.Buffer | None
    out: tir.Buffer


def prepare(
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
    x: tir.Buffer | None = None,
    packed: tuple | None = None,
) -> LutKernel:
    """Step 1 of a kernel body, once per call: each activation row's int8 codes and tables, and
    the plane pairs' coefficients for ``bitlayers``.

    Parameters as :func:`pbtvm.ops.vnni_rows.prepare_kernel` (``x``: float rows quantized here;
    else ``packed = (xp, x_scale, rowsum)``); ``wp`` in the ``lut16x4`` layout, ``out`` [B, N]
    float32 (the dense epilogue, with ``w_scale``) or int32 (the integer product).
    """
    words = fmt.words(k_dim)
    chunks = -(-words // 2)
    codes = T.alloc_buffer((batch, chunks * CHUNK), "int8")
    xp = None
    if x is not None:
        x_scale, rowsum = T.alloc_buffer((batch,), "float32"), T.alloc_buffer((batch,), "int32")
    else:
        xp, x_scale, rowsum = packed
    groups = 8 * words
    tables = T.alloc_buffer((batch, groups * 32), "uint8")
    with T.serial(0, batch) if x is not None else T.parallel(0, batch) as r:
        row_codes(T, fmt, r, k_dim, codes, chunks, x=x, x_scale=x_scale, xp=xp)
        if x is not None:  # packed rows come with their code sums
            sum_codes(T, codes, r, rowsum, chunks * CHUNK)
        with T.serial(0, groups) as g:
            _table(T, codes, tables, r, g)
    pairs = pair_coefficients(fmt)
    coef = T.alloc_buffer((len(pairs),), "int16", scope=CPU_SCRATCH)
    scale = T.alloc_buffer((len(pairs),), "int32", scope=CPU_SCRATCH)
    offset = T.alloc_buffer((1,), "int32", scope=CPU_SCRATCH)
    T.buffer_store(offset, tir.const(0, "int32"), [0])
    for p, (s, a, b) in enumerate(pairs):
        a_kept = tir.Select(layers > 2 * p, tir.const(a, "int32"), tir.const(0, "int32"))
        b_kept = tir.Select(layers > 2 * p + 1, tir.const(b, "int32"), tir.const(0, "int32"))
        T.buffer_store(coef, (tir.bitwise_and(a_kept, 255) + b_kept * 256).astype("int16"), [p])
        T.buffer_store(scale, tir.const(s, "int32"), [p])
        T.buffer_store(offset, offset[0] + tir.const(s, "int32") * (a_kept + b_kept), [0])
    return LutKernel(fmt, n_out, words, wp, tables, coef, scale, offset, layers, x_scale, rowsum, w_scale, bias, out)


def scratch(T) -> tuple:
    """The registers of one parallel task, per activation row of a tile: int32 row sums, int16
    low / high sums, high bytes."""
    rows = BATCH_TILE * LUT_TILE_ROWS
    return (
        T.alloc_buffer((rows,), "int32", scope=CPU_SCRATCH),
        T.alloc_buffer((rows,), "int16", scope=CPU_SCRATCH),
        T.alloc_buffer((rows,), "int16", scope=CPU_SCRATCH),
        T.alloc_buffer((2 * rows,), "uint8", scope=CPU_SCRATCH),
    )


def tile_rows(T, kern: LutKernel, regs: tuple, first, count: int, batch) -> None:
    """Row tiles ``first ..`` (16 rows each; ``count`` of them, fewer where the tiles end at N)
    x every activation row, into ``kern.out``; :data:`BATCH_TILE` activation rows share each
    index extraction."""
    n_tiles = -(-kern.n_out // LUT_TILE_ROWS)
    with T.serial(0, tir.min(count, n_tiles - first) if n_tiles % count else count) as t:
        batch_tiles(T, batch, BATCH_TILE, lambda b0, rows: _tile(T, kern, regs, first + t, b0, rows))


def _table(T, codes, tables, r, g) -> None:
    """Row ``r``'s two 16-byte tables of group ``g``: ``T & 63`` at ``32 g``, ``T >> 6`` at ``32 g + 16``."""
    index = tir.Ramp(tir.const(0, "int16"), tir.const(1, "int16"), 16)
    total = tir.Broadcast(tir.const(TABLE_OFFSET, "int16"), 16)
    for j in range(LUT_GROUP):
        bit = tir.bitwise_and(
            tir.shift_right(index, tir.Broadcast(tir.const(j, "int16"), 16)), tir.Broadcast(tir.const(1, "int16"), 16)
        )
        total = total + bit * tir.Broadcast(codes[r, LUT_GROUP * g + j].astype("int16"), 16)
    low = tir.bitwise_and(total, tir.Broadcast(tir.const(2**LOW_BITS - 1, "int16"), 16))
    high = tir.shift_right(total, tir.Broadcast(tir.const(LOW_BITS, "int16"), 16))
    T.buffer_store(tables, low.astype("uint8x16"), [r, tir.Ramp(g * 32, 1, 16)])
    T.buffer_store(tables, high.astype("uint8x16"), [r, tir.Ramp(g * 32 + 16, 1, 16)])


def _lookup(table: tir.PrimExpr, idx: tir.PrimExpr) -> tir.PrimExpr:
    """``vpshufb``: the 16-byte ``table`` (in both 128-bit lanes) at 32 indices (< 16)."""
    return tir.call_llvm_pure_intrin("uint8x32", "llvm.x86.avx2.pshuf.b", table, idx)


def _madd(bytes_: tir.PrimExpr, coef: tir.PrimExpr) -> tir.PrimExpr:
    """``vpmaddubsw``: per row (int16 lane) ``a byte_2m + b byte_2m+1``."""
    return tir.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", bytes_, coef)


def _tile(T, kern: LutKernel, regs, tile, b0, b_rows: int) -> None:
    """Rows ``16 tile ..`` of activation rows ``b0 .. b0 + b_rows``: every kept plane pair (the
    weights' indices extracted once for the rows), then the epilogue."""
    acc, low, high, high_bytes = regs

    def lanes16(r: int) -> tir.Ramp:
        return tir.Ramp(r * LUT_TILE_ROWS, 1, LUT_TILE_ROWS)

    def lanes32(r: int) -> tir.Ramp:
        return tir.Ramp(r * 32, 1, 32)

    rows = range(b_rows)
    for r in rows:
        T.buffer_store(acc, tir.Broadcast(tir.const(0, "int32"), LUT_TILE_ROWS), [lanes16(r)])
    blocks = 2 * kern.words  # 16 inputs each
    with T.serial(0, ((kern.layers + 1) // 2).astype("int32")) as p:
        coef = tir.reinterpret("int8x32", tir.Broadcast(kern.coef[p], LUT_TILE_ROWS))

        def block(blk) -> None:
            idx = []
            for e in range(2):
                v = tir.reinterpret("uint8x32", kern.wp[p, tile, 2 * blk + e, tir.Ramp(0, 1, 8)])
                idx += [
                    tir.bitwise_and(v, tir.Broadcast(tir.const(15, "uint8"), 32)),
                    tir.shift_right(v, tir.Broadcast(tir.const(4, "uint8"), 32)),
                ]
            for r in rows:
                sums = [None, None]
                for j in range(LUT_GROUP):
                    at = (LUT_GROUP * blk + j) * 32
                    for h in range(2):
                        table = _both_lanes(kern.tables[b0 + r, tir.Ramp(at + h * 16, 1, 16)])
                        term = _lookup(table, idx[j])
                        sums[h] = term if sums[h] is None else sums[h] + term
                T.buffer_store(low, low[lanes16(r)] + _madd(sums[0], coef), [lanes16(r)])
                T.buffer_store(high_bytes, high_bytes[lanes32(r)] + sums[1], [lanes32(r)])

        def flush_high() -> None:
            for r in rows:
                T.buffer_store(high, high[lanes16(r)] + _madd(high_bytes[lanes32(r)], coef), [lanes16(r)])
                T.buffer_store(high_bytes, tir.Broadcast(tir.const(0, "uint8"), 32), [lanes32(r)])

        def run(start, count: int) -> None:  # ``count`` <= WIDEN_BLOCKS blocks from ``start``
            for r in rows:
                for buf in (low, high):
                    T.buffer_store(buf, tir.Broadcast(tir.const(0, "int16"), LUT_TILE_ROWS), [lanes16(r)])
                T.buffer_store(high_bytes, tir.Broadcast(tir.const(0, "uint8"), 32), [lanes32(r)])
            quads, rest = divmod(count, HIGH_BLOCKS)
            if quads:
                with T.serial(0, quads) as qd:
                    for u in range(HIGH_BLOCKS):
                        block(start + qd * HIGH_BLOCKS + u)
                    flush_high()
            for u in range(rest):
                block(start + quads * HIGH_BLOCKS + u)
            if rest:
                flush_high()
            for r in rows:
                at = lanes16(r)
                widened = low[at].astype("int32x16") + high[at].astype("int32x16") * tir.Broadcast(
                    tir.const(2**LOW_BITS, "int32"), LUT_TILE_ROWS
                )
                T.buffer_store(acc, acc[at] + widened * tir.Broadcast(kern.scale[p], LUT_TILE_ROWS), [at])

        whole, rest = divmod(blocks, WIDEN_BLOCKS)
        if whole:
            with T.serial(0, whole) as wb:
                run(wb * WIDEN_BLOCKS, WIDEN_BLOCKS)
        if rest:
            run(whole * WIDEN_BLOCKS, rest)
    removed = kern.offset[0] * tir.const(TABLE_OFFSET * 8 * kern.words, "int32")
    with T.serial(0, LUT_TILE_ROWS) as m:
        n = tile * LUT_TILE_ROWS + m
        with T.If(n < kern.n_out):
            with T.Then():
                for r in rows:
                    b = b0 + r
                    exact = acc[r * LUT_TILE_ROWS + m] - removed
                    x_scale = None if kern.x_scale is None else kern.x_scale[b]
                    value = output_value(
                        kern.fmt, exact, kern.rowsum[b], x_scale, kern.w_scale, n, kern.bias, kern.layers
                    )
                    T.buffer_store(kern.out, value, [b, n])


def _both_lanes(v16: tir.PrimExpr) -> tir.PrimExpr:
    """A 16-byte vector in both 128-bit lanes of a ymm register (``vbroadcasti128``)."""
    return tir.Shuffle([v16, v16], [tir.IntImm("int32", i) for i in range(32)])
