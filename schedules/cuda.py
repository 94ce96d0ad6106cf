"""CUDA default schedules for the PB kernels (no tuning needed, never DLight's Fallback).

``pb_gemm``: a warp per output row ``n``; its lanes (32 on NVIDIA GPUs) split the K words,
reading 4 consecutive words (16 bytes) per lane per weight plane when K allows, so every plane row
is one coalesced 512-byte sweep. Each lane loops over weight planes, its words and, unrolled, the activation
planes; a warp-shuffle reduction combines the lanes and the epilogue runs in the same kernel.
Batch rows go to ``blockIdx.y``; blocks of other rows re-read the weights, mostly from L2.

``act_pack``: three launches: a block per row for the max-abs and the code sum (cross-thread
reductions), a thread per scale, and a thread per packed (plane, row, word). (A row in one block
and one launch measured slower on an H100, BENCHMARKS.md, and was removed.)

``pb_lstm_cell`` and ``pb_dense_act``: one launch; every thread block packs the activation row
itself into shared memory (codes quantized once per element, then a thread per (word, plane)),
then a warp per output (gate) row as above with the plane loop unrolled to ``bits`` so the
weight loads of all planes are in flight together (:func:`_packed_gemv`). Measured on an H100
(BENCHMARKS.md, 2026-11-23): 84 -> 9.4 us for a 2x650 LSTM step.

The warp size and the block limits come from the Target (:attr:`ScheduleRule.limits`).
"""

from __future__ import annotations

from typing import Any

from pbtvm import names
from pbtvm._tvm import s_tir, tir
from pbtvm.target import TargetLimits

from .rules import ScheduleRule, TunableRule, inline_act_quantization, lstm_cell_legs, sample_unroll

#: Warps (output rows) per thread block in the default GEMM schedule.
WARPS_PER_BLOCK = 4
#: Words per lane per vector load (4 x uint32 = 16 bytes).
VECTOR_WORDS = 4
#: Threads per block of the activation pack.
PACK_THREADS = 128
#: The pack's thread layout: one dimension of PACK_THREADS.
PACK_LANES = [("threadIdx.x", PACK_THREADS)]
#: Hidden units per thread block in the fused LSTM cell (a warp per gate row: 4x as many warps).
CELL_UNITS = 4
#: Output rows (warps) per thread block of ``pb_dense_act`` (each block packs the row itself).
DENSE_ACT_ROWS = 16


class CUDABitplaneGemm(TunableRule):
    """Warp-per-row reduction schedule for ``pb_gemm`` + epilogue.

    Tunable template. Sampled knobs: rows per block (``sample_perfect_tile``, up to 8 warps),
    warps that split K per row (with the lanes on ``threadIdx.x``: warp shuffles, then one
    exchange between the warps through shared memory), explicit unroll depth. Structural
    variants: words per 128-bit vector load (1, 2 or 4 consecutive uint32 per lane, where K
    allows) and whether the block stages the activation planes in shared memory (cooperative
    fetch) or reads them through L1.
    """

    kernel = names.KernelKind.GEMM
    target_kind = "cuda"
    custom_rule = names.RULE_BITPLANE_GEMM

    def variants(self, func: tir.PrimFunc) -> list[dict]:
        """See :meth:`TunableRule.variants`."""
        words, warp = _words(func), self.limits.warp_size
        vecs = [v for v in (1, 2, VECTOR_WORDS) if words % (warp * v) == 0] or [1]
        return [{"vec": v, "x_shared": xs} for v in vecs for xs in (False, True)]

    def schedule(self, sch: s_tir.Schedule) -> None:
        """See :meth:`ScheduleRule.schedule`: :data:`WARPS_PER_BLOCK` rows, 16-byte loads where K allows."""
        self._schedule(sch, None)

    def template(self, sch: s_tir.Schedule, variant: dict) -> None:
        """See :meth:`TunableRule.template`."""
        self._schedule(sch, variant)

    def _schedule(self, sch: s_tir.Schedule, variant: dict | None) -> None:
        """The default schedule (``variant`` None) or the template's design space ``variant``.

        One body for both: the default is the template's instruction sequence with fixed values.
        """
        warp = self.limits.warp_size
        gemm = sch.get_sblock(names.GEMM)
        (epilogue,) = sch.get_consumers(gemm)
        b, n, i, j, w = sch.get_loops(gemm)
        words = int(sch.get(w).extent)
        tunable = variant is not None
        if tunable:
            vec = variant["vec"]
            rows = sch.sample_perfect_tile(n, n=2, max_innermost_factor=8)
            splits = [k for k in (1, 2, 4) if vec == 1 or words % (warp * vec * k) == 0]
            kw = sch.sample_categorical(splits, [1.0 / len(splits)] * len(splits))
            no, ni = sch.split(n, rows)
            wo, wz, wi, v = sch.split(w, [None, kw, warp, vec])
            x_shared = variant["x_shared"]
        else:
            vec = _vector_words(words, warp)
            no, ni = sch.split(n, [None, WARPS_PER_BLOCK])
            wo, wz, wi, v = sch.split(w, [None, 1, warp, vec])
            x_shared = False
        # The plane loop keeps its symbolic bitlayers extent: only the top bitlayers planes are
        # read, so the run-time knob saves DRAM traffic. (Unrolling the plane loop to its static
        # maximum and prefetching all planes measured slower.)
        sch.reorder(b, no, ni, wz, wi, i, wo, v, j)
        # Batch rows on blockIdx.y measured faster than a serial batch loop inside the warp
        # (BENCHMARKS.md). Fusing b into blockIdx.x would defeat LowerCrossThreadReduction.
        sch.bind(b, "blockIdx.y")
        sch.bind(no, "blockIdx.x")
        sch.bind(ni, "threadIdx.y")
        # The K-split warps and their lanes are one threadIdx.x (kw * warp threads): a row's
        # reduction then spans consecutive threads, which TVM lowers to warp shuffles plus one
        # exchange between warps. Bound to threadIdx.z (with the rows' threadIdx.y between them)
        # it became a shared-memory tree whose last steps assume the warp runs in lock step (no
        # __syncwarp): not guaranteed since Volta, and wrong in the CUDA emulation of the tests.
        sch.bind(sch.fuse(wz, wi), "threadIdx.x")
        if tunable:
            sample_unroll(sch, i)
        if x_shared:
            acts = sch.cache_read(gemm, 1, "shared")  # reads are (weights, activations)
            sch.compute_at(acts, no)
            fused = sch.fuse(*sch.get_loops(acts)[2:])
            # x_shared is tunable-only, so rows[1] and kw are sampled. The K-split and lane parts are
            # split apart and fused (not one kw * warp factor: a trace holding that product cannot
            # be written to the tuning log).
            _, by_row, by_split, by_lane = sch.split(fused, [None, rows[1], kw, warp])
            sch.bind(by_row, "threadIdx.y")
            sch.bind(sch.fuse(by_split, by_lane), "threadIdx.x")
        _vector_weight_loads(sch, gemm, wo, v, vec)
        sch.unroll(j)
        sch.reverse_compute_at(epilogue, ni)
        sch.set_scope(gemm, 0, "local")


def _vector_words(words: int, warp: int) -> int:
    """Default words per lane per load: 16 bytes when every lane of a ``warp``-lane warp gets full vectors."""
    return VECTOR_WORDS if words % (warp * VECTOR_WORDS) == 0 else 1


def _vector_weight_loads(
    sch: s_tir.Schedule, gemm: s_tir.SBlockRV, wo: s_tir.LoopRV, v: s_tir.LoopRV, vec: int
) -> None:
    """Load each lane's ``vec`` consecutive weight words at once (a local copy under ``wo``)."""
    if vec > 1:
        weights = sch.cache_read(gemm, 0, "local")  # reads are (weights, activations)
        sch.compute_at(weights, wo)
        sch.vectorize(sch.get_loops(weights)[-1])
    sch.unroll(v)


def _spread(sch: s_tir.Schedule, loop: s_tir.LoopRV, threads: list[tuple[str, Any]]) -> list[s_tir.LoopRV]:
    """Split ``loop`` into [serial, *thread extents] and bind each inner part to its thread tag.

    ``threads`` lists ``(tag, extent)`` outermost first; returns every part, serial first.
    """
    parts = sch.split(loop, [None, *(extent for _, extent in threads)])
    for part, (tag, _) in zip(parts[1:], threads, strict=True):
        sch.bind(part, tag)
    return parts


def _thread_reduction(sch: s_tir.Schedule, r: s_tir.LoopRV, threads: list[tuple[str, int]]) -> None:
    """Spread a reduction loop over ``threads`` (a cross-thread reduction), the serial rest inside.

    Unrolling the serial part measured slower on an H100 (BENCHMARKS.md), so it stays a loop.
    """
    serial, *bound = _spread(sch, r, threads)
    sch.reorder(*bound, serial)


def _words(func: tir.PrimFunc) -> int:
    """Packed words per row (the last dimension of the activation planes ``xp``)."""
    return int(func.params[0].shape[-1])


def _warp_rows(limits: TargetLimits, rows: int) -> list[tuple[str, int]]:
    """Thread layout of a block with a warp per row: ``[("threadIdx.y", rows), ("threadIdx.x", warp)]``.

    Raises
    ------
    ValueError
        If the block would exceed the target's threads per block.
    """
    threads = rows * limits.warp_size
    if threads > limits.max_threads_per_block:
        raise ValueError(
            f"{rows} warps per block are {threads} threads; the target allows {limits.max_threads_per_block}"
        )
    return [("threadIdx.y", rows), ("threadIdx.x", limits.warp_size)]


class CUDAActPack(ScheduleRule):
    """Activation quantize+pack in three launches: row max and code sum (a block per row), scale, pack."""

    kernel = names.KernelKind.ACT_PACK
    target_kind = "cuda"

    def schedule(self, sch: s_tir.Schedule) -> None:
        """See :meth:`ScheduleRule.schedule`: a thread per scale and per (plane, row, word)."""
        inline_act_quantization(sch)
        for name in (names.AMAX, names.ROWSUM):
            b, r = sch.get_loops(sch.get_sblock(name))
            sch.bind(b, "blockIdx.x")
            _thread_reduction(sch, r, PACK_LANES)
        (b,) = sch.get_loops(sch.get_sblock(names.XSCALE))
        bo, bi = sch.split(b, [None, self.limits.warp_size])
        sch.bind(bo, "blockIdx.x")
        sch.bind(bi, "threadIdx.x")
        pack = sch.get_sblock(names.XPACK)
        *words, t = sch.get_loops(pack)  # (plane, row, word) or the mma16x256 order's 4 axes
        fo, fi = sch.split(sch.fuse(*words), [None, PACK_THREADS])
        sch.bind(fo, "blockIdx.x")
        sch.bind(fi, "threadIdx.x")
        sch.unroll(t)


def _pack_thread_per_word(
    sch: s_tir.Schedule, pack: s_tir.SBlockRV, outer: s_tir.LoopRV, t: s_tir.LoopRV, threads: list[tuple[str, int]]
) -> None:
    """A thread per iteration of ``outer`` (one packed word each), its 32 bits ``t`` in a register."""
    innermost = _spread(sch, outer, threads)[-1]
    sch.reverse_compute_at(sch.cache_write(pack, 0, "local"), innermost)
    sch.unroll(t)


class CUDALSTMCell(ScheduleRule):
    """``pb_lstm_cell`` in one launch: a block per (batch row, ``CELL_UNITS`` hidden units).

    The block packs ``h`` into shared memory (every block packs the whole row: ``h`` is read
    from L2, the recurrent weights from DRAM), then a warp per gate row runs the PB GEMV as in
    :class:`CUDABitplaneGemm`'s default (with its own warp-level code sum and scale), the gate
    values meet in shared memory, and a thread per hidden unit updates ``c`` and ``h``. A step
    with its input projection does the same for ``x`` and ``W_ih`` first (a second leg).
    """

    kernel = names.KernelKind.LSTM_CELL
    target_kind = "cuda"

    def schedule(self, sch: s_tir.Schedule) -> None:
        """See :meth:`ScheduleRule.schedule`."""
        legs = lstm_cell_legs(sch.mod["main"])
        b, u = sch.get_loops(sch.get_sblock(f"{names.CELL}_v0"))
        uo, ui = sch.split(u, [None, CELL_UNITS])
        cell_c = sch.get_sblock(names.CELL_C)
        sch.compute_at(cell_c, uo)
        sch.set_scope(cell_c, 0, "local")  # each thread reads back only the units it wrote
        sch.bind(b, "blockIdx.y")
        sch.bind(uo, "blockIdx.x")
        block_threads = _warp_rows(self.limits, 4 * CELL_UNITS)
        for tag in legs:
            _cell_leg(sch, uo, tag, block_threads, int(sch.mod["main"].attrs[names.ATTR_BITS]))
        # A thread per hidden unit for the cell update (c' then h', the same thread per unit).
        for loop in (sch.get_loops(cell_c)[-1], ui):
            _spread(sch, loop, block_threads)


def _cell_leg(sch: s_tir.Schedule, uo: s_tir.LoopRV, tag: str, block_threads: list[tuple[str, int]], bits: int) -> None:
    """One PB product of the LSTM step inside the block of loop ``uo``; its gates meet in shared memory.

    ``tag`` names the leg's blocks (see :func:`pbtvm.schedules.rules.lstm_cell_legs`).
    """
    gates = sch.get_sblock(names.DENSE_OUT + tag)
    sch.compute_at(gates, uo)
    (row,) = sch.get_loops(gates)[2:]
    sch.set_scope(gates, 0, "shared")
    _packed_gemv(sch, uo, row, tag, block_threads, bits)


def _packed_gemv(
    sch: s_tir.Schedule,
    block: s_tir.LoopRV,
    row: s_tir.LoopRV,
    tag: str,
    block_threads: list[tuple[str, int]],
    bits: int,
) -> None:
    """A thread block packs the whole activation row into shared memory, then a warp per output row.

    ``block`` is the loop bound to the thread block, ``row`` the loop over its output rows (one
    per warp, bound here to ``threadIdx.y``); the epilogue block ``pb_out<tag>`` is already under
    ``row``; ``bits`` is the weight bitwidth. The pack: block-wide max |x|, every thread
    quantizes a share of the row once into shared int32 codes, then a thread per (word, plane)
    gathers that plane's bit of 32 codes. The row: the lanes of a warp (``block_threads[-1]``)
    split the words (16-byte weight loads when K allows), warp-shuffle reduction, the code sum per
    warp (from the shared codes).
    """
    warp = block_threads[-1][1]
    sch.compute_inline(sch.get_sblock(names.XINV + tag))
    gemm = sch.get_sblock(names.GEMM + tag)
    for name in (names.GEMM, names.ROWSUM, names.XSCALE):
        sch.compute_at(sch.get_sblock(name + tag), row)
    for name in (names.XPACK, names.XQ, names.AMAX):
        sch.compute_at(sch.get_sblock(name + tag), block)
    sch.bind(row, "threadIdx.y")
    # With a single word per row (K <= 32) compute_at drops the word loop: no lane split.
    loops = sch.get_loops(gemm)[3:]
    if len(loops) == 3:
        i, j, w = loops
        words = int(sch.get(w).extent)
        vec = _vector_words(words, warp)
        wo, wi, v = sch.split(w, [None, warp, vec])
        sch.reorder(wi, i, wo, v, j)
        sch.bind(wi, "threadIdx.x")
        _vector_weight_loads(sch, gemm, wo, v, vec)
    else:
        i, j = loops
    sch.unroll(j)
    # The plane loop runs to the run-time ``bitlayers`` (<= bits): split off a static ``bits``
    # part and unroll it, so the (predicated) weight loads of every plane are issued before the
    # first is waited on, instead of one DRAM round trip per plane.
    sch.unroll(sch.split(i, [None, bits])[1])
    sch.set_scope(gemm, 0, "local")
    # Per-warp code sum (warp reduction) and scale, in registers.
    rowsum = sch.get_sblock(names.ROWSUM + tag)
    (r,) = sch.get_loops(rowsum)[3:]
    _thread_reduction(sch, r, block_threads[1:])
    sch.set_scope(rowsum, 0, "local")
    sch.set_scope(sch.get_sblock(names.XSCALE + tag), 0, "local")
    # Block-wide max |x| and cooperative pack into shared memory.
    amax = sch.get_sblock(names.AMAX + tag)
    (r,) = sch.get_loops(amax)[2:]
    _thread_reduction(sch, r, block_threads)
    sch.set_scope(amax, 0, "shared")
    codes = sch.get_sblock(names.XQ + tag)
    sch.set_scope(codes, 0, "shared")
    _spread(sch, sch.get_loops(codes)[-1], block_threads)
    pack = sch.get_sblock(names.XPACK + tag)
    sch.set_scope(pack, 0, "shared")
    # A thread per (word, plane), planes fastest: a warp reads the codes of 4 words (4-way bank
    # conflicts at most, not one thread per word serially filling every plane).
    loops = sch.get_loops(pack)[2:]  # (plane, word, bit), or (plane, bit) for a one-word row
    if len(loops) == 3:
        p, w, t = loops
        sch.reorder(w, p, t)
        word_plane = sch.fuse(w, p)
    else:
        word_plane, t = loops
    _pack_thread_per_word(sch, pack, word_plane, t, block_threads)


class CUDADenseAct(ScheduleRule):
    """``pb_dense_act`` in one launch: a block per (batch row, ``DENSE_ACT_ROWS`` outputs).

    Every block packs the whole activation row into shared memory (the row is read from L2),
    then a warp per output row as in :class:`CUDALSTMCell`. For small batches, where the
    separate pack's three launches cost more than its work.
    """

    kernel = names.KernelKind.DENSE_ACT
    target_kind = "cuda"

    def schedule(self, sch: s_tir.Schedule) -> None:
        """See :meth:`ScheduleRule.schedule`."""
        b, n = sch.get_loops(sch.get_sblock(names.DENSE_OUT))
        no, ni = sch.split(n, [None, DENSE_ACT_ROWS])
        sch.bind(b, "blockIdx.y")
        sch.bind(no, "blockIdx.x")
        threads = _warp_rows(self.limits, DENSE_ACT_ROWS)
        _packed_gemv(sch, no, ni, "", threads, int(sch.mod["main"].attrs[names.ATTR_BITS]))
