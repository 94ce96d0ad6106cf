"""CUDA default schedules for the PB kernels (no tuning needed, never DLight's Fallback).

``pb_gemm``: a warp per output row ``n``; its 32 lanes split the K words, reading 4 consecutive
words (16 bytes) per lane per weight plane when K allows, so every plane row is one coalesced
512-byte sweep. Each lane loops over weight planes, its words and, unrolled, the activation
planes; a warp-shuffle reduction combines the lanes and the epilogue runs in the same kernel.
Batch rows go to ``blockIdx.y``; blocks of other rows re-read the weights, mostly from L2.

``act_pack``: by default ("split") three launches: a block per row for the max-abs and the code
sum (cross-thread reductions), a thread per scale, and a thread per packed (plane, row, word).
The "fused" variant does a row in one block and one launch; it measured slower.
"""

from __future__ import annotations

from pbtvm._tvm import s_tir, tir, tvm
from pbtvm.ops.pb_gemm import GEMM_BLOCK

from .rules import ScheduleRule, sample_unroll

#: Warps (output rows) per thread block in the default GEMM schedule.
WARPS_PER_BLOCK = 4
#: Words per lane per vector load (4 x uint32 = 16 bytes).
VECTOR_WORDS = 4
#: Activation pack layout: "split" (3 launches, parallel over words) or "fused" (1 launch, a
#: block per row). Measured on an H100 (BENCHMARKS.md); the faster one is the default.
PACK_VARIANT = "split"
#: Threads per block of the activation pack.
PACK_THREADS = 128


class CUDABitplaneGemm(ScheduleRule):
    """Warp-per-row reduction schedule for ``pb_gemm`` + epilogue.

    Tunable template. Sampled knobs: rows per block (``sample_perfect_tile``, up to 8 warps),
    warps that split K per row (``threadIdx.z``, cross-warp reduction through shared memory),
    explicit unroll depth. Structural variants: words per 128-bit vector load (1, 2 or 4
    consecutive uint32 per lane, where K allows) and whether the block stages the activation
    planes in shared memory (cooperative fetch) or reads them through L1.
    """

    kernel = "pb_gemm"
    target_kinds = ("cuda",)

    def variants(self, func: tir.PrimFunc, target: tvm.target.Target) -> list[dict]:
        """See :meth:`ScheduleRule.variants`."""
        words = _words(func)
        vecs = [v for v in (1, 2, VECTOR_WORDS) if words % (32 * v) == 0] or [1]
        return [{"vec": v, "x_shared": xs} for v in vecs for xs in (False, True)]

    def schedule(
        self, sch: s_tir.Schedule, func: tir.PrimFunc, target: tvm.target.Target, tunable: bool, variant: dict
    ) -> None:
        """See :meth:`ScheduleRule.schedule`."""
        gemm = sch.get_sblock(GEMM_BLOCK)
        (epilogue,) = sch.get_consumers(gemm)
        b, n, i, j, w = sch.get_loops(gemm)
        words = int(sch.get(w).extent)
        if tunable:
            vec = variant.get("vec", 1)
            rows = sch.sample_perfect_tile(n, n=2, max_innermost_factor=8)
            splits = [k for k in (1, 2, 4) if vec == 1 or words % (32 * vec * k) == 0]
            kw = sch.sample_categorical(splits, [1.0 / len(splits)] * len(splits))
            no, ni = sch.split(n, rows)
            wo, wz, wi, v = sch.split(w, [None, kw, 32, vec])
            x_shared = variant.get("x_shared", False)
        else:
            vec = VECTOR_WORDS if words % (32 * VECTOR_WORDS) == 0 else 1
            no, ni = sch.split(n, [None, WARPS_PER_BLOCK])
            wo, wz, wi, v = sch.split(w, [None, 1, 32, vec])
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
        sch.bind(wz, "threadIdx.z")
        sch.bind(wi, "threadIdx.x")
        if tunable:
            sample_unroll(sch, i)
        if x_shared:
            acts = sch.cache_read(gemm, 1, "shared")  # reads are (weights, activations)
            sch.compute_at(acts, no)
            fused = sch.fuse(*sch.get_loops(acts)[2:])
            _, ty, tz, tx = sch.split(fused, [None, rows[1], kw, 32])  # x_shared is tunable-only
            sch.bind(ty, "threadIdx.y")
            sch.bind(tz, "threadIdx.z")
            sch.bind(tx, "threadIdx.x")
        if vec > 1:
            weights = sch.cache_read(gemm, 0, "local")
            sch.compute_at(weights, wo)
            sch.vectorize(sch.get_loops(weights)[-1])
        sch.unroll(v)
        sch.unroll(j)
        sch.reverse_compute_at(epilogue, ni)
        sch.set_scope(gemm, 0, "local")


def _words(func: tir.PrimFunc) -> int:
    """Packed words per row (the last dimension of the activation planes ``xp``)."""
    return int(func.params[0].shape[-1])


class CUDAActPack(ScheduleRule):
    """Activation quantize+pack: ``PACK_VARIANT`` picks one of two measured layouts."""

    kernel = "act_pack"
    target_kinds = ("cuda",)

    def schedule(
        self, sch: s_tir.Schedule, func: tir.PrimFunc, target: tvm.target.Target, tunable: bool, variant: dict
    ) -> None:
        """See :meth:`ScheduleRule.schedule`."""
        sch.compute_inline(sch.get_sblock("pb_xinv"))
        sch.compute_inline(sch.get_sblock("pb_xq"))
        if PACK_VARIANT == "fused":
            _pack_fused(sch)
        else:
            _pack_split(sch)


def _row_reduction(sch: s_tir.Schedule, r: s_tir.LoopRV) -> None:
    """Split a per-row reduction across PACK_THREADS lanes (cross-thread reduction).

    Unrolling the serial part measured slower on an H100 (BENCHMARKS.md), so it stays a loop.
    """
    ro, ri = sch.split(r, [None, PACK_THREADS])
    sch.reorder(ri, ro)
    sch.bind(ri, "threadIdx.x")


def _pack_split(sch: s_tir.Schedule) -> None:
    """Three launches: row max (block per row), scale, and a thread per (plane, row, word)."""
    for name in ("pb_amax", "pb_rowsum"):
        b, r = sch.get_loops(sch.get_sblock(name))
        sch.bind(b, "blockIdx.x")
        _row_reduction(sch, r)
    (b,) = sch.get_loops(sch.get_sblock("pb_xscale"))
    bo, bi = sch.split(b, [None, 32])
    sch.bind(bo, "blockIdx.x")
    sch.bind(bi, "threadIdx.x")
    pack = sch.get_sblock("pb_xpack")
    p, b, w, t = sch.get_loops(pack)
    fo, fi = sch.split(sch.fuse(p, b, w), [None, PACK_THREADS])
    sch.bind(fo, "blockIdx.x")
    sch.bind(fi, "threadIdx.x")
    sch.unroll(t)


def _pack_fused(sch: s_tir.Schedule) -> None:
    """One launch, one block per row: max, scale, pack (a thread per word) and code sum."""
    amax = sch.get_sblock("pb_amax")
    b, r = sch.get_loops(amax)
    sch.bind(b, "blockIdx.x")
    sch.set_scope(amax, 0, "shared")
    _row_reduction(sch, r)
    for name in ("pb_xscale", "pb_xpack", "pb_rowsum"):
        sch.reverse_compute_at(sch.get_sblock(name), b)
    pack = sch.get_sblock("pb_xpack")
    loops = sch.get_loops(pack)[1:]
    if len(loops) == 2:
        # One word per row (K <= 32): reverse_compute_at dropped the word loop; a thread per plane.
        p, t = loops
        sch.bind(p, "threadIdx.x")
        sch.unroll(t)
    else:
        p, w, t = loops
        sch.reorder(w, p, t)
        wo, wi = sch.split(w, [None, PACK_THREADS])
        sch.bind(wi, "threadIdx.x")
        words = sch.cache_write(pack, 0, "local")  # read 32 activations once, OR into every plane
        sch.reverse_compute_at(words, wi)
        p, t = sch.get_loops(pack)[-2:]
        sch.decompose_reduction(pack, p)
        sch.reorder(t, p)
        sch.unroll(t)
        sch.unroll(p)
    _row_reduction(sch, sch.get_loops(sch.get_sblock("pb_rowsum"))[-1])
