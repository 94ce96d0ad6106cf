"""CUDA default schedules for the PB kernels (no tuning needed, never DLight's Fallback).

``pb_gemm``: a warp per output row ``n``; its 32 lanes split the K words, reading 4 consecutive
words (16 bytes) per lane per weight plane when K allows, so every plane row is one coalesced
512-byte sweep. Each lane loops over weight planes, its words and, unrolled, the activation
planes; a warp-shuffle reduction combines the lanes and the epilogue runs in the same kernel.
Batch rows are a serial loop inside the warp, so a weight row is fetched from DRAM once per call
whatever the batch (later rows hit L1).

``act_pack``: one thread block per activation row does everything in one launch: the row's
max-abs (cross-thread), its scale, quantize+pack (a thread per packed word) and the code sum.
"""

from __future__ import annotations

from pbtvm._tvm import s_tir, tir, tvm
from pbtvm.ops.pb_gemm import GEMM_BLOCK

from .rules import ScheduleRule

#: Warps (output rows) per thread block in the default GEMM schedule.
WARPS_PER_BLOCK = 4
#: Words per lane per vector load (4 x uint32 = 16 bytes).
VECTOR_WORDS = 4
#: Experimental: unroll the plane loop to its static maximum and prefetch every plane (faster
#: issue, but reads all planes even when bitlayers < bits). Off by default; the benchmark's
#: ``--variant prefetch`` measures it.
PREFETCH_ALL_PLANES = False
#: Threads per block of the activation pack.
PACK_THREADS = 128


class CUDABitplaneGemm(ScheduleRule):
    """Warp-per-row reduction schedule for ``pb_gemm`` + epilogue."""

    kernel = "pb_gemm"
    target_kinds = ("cuda",)

    def schedule(self, sch: s_tir.Schedule, func: tir.PrimFunc, target: tvm.target.Target, tunable: bool) -> None:
        """See :meth:`ScheduleRule.schedule`."""
        gemm = sch.get_sblock(GEMM_BLOCK)
        (epilogue,) = sch.get_consumers(gemm)
        b, n, i, j, w = sch.get_loops(gemm)
        words = int(sch.get(w).extent)
        warps = sch.sample_categorical([1, 2, 4, 8], [0.25] * 4) if tunable else WARPS_PER_BLOCK
        no, ni = sch.split(n, [None, warps])
        vec = VECTOR_WORDS if words % (32 * VECTOR_WORDS) == 0 else 1
        wo, wi, v = sch.split(w, [None, 32, vec])
        # bitlayers is symbolic: split it by the static plane count so the plane loop unrolls and
        # all planes' loads are issued together (predicated by i < bitlayers).
        if PREFETCH_ALL_PLANES:
            # Loads of every plane issued together; reads all planes whatever bitlayers is.
            io, ii = sch.split(i, [None, int(func.attrs["pbtvm.bits"])])
            sch.reorder(no, ni, b, wi, io, wo, ii, v, j)
            anchor = wo
        else:
            # Only the top bitlayers planes are read: the run-time knob saves DRAM traffic.
            sch.reorder(no, ni, b, wi, i, wo, v, j)
            anchor = wo
        sch.bind(no, "blockIdx.x")
        sch.bind(ni, "threadIdx.y")
        sch.bind(wi, "threadIdx.x")
        if vec > 1:
            weights = sch.cache_read(gemm, 0, "local")  # reads are (weights, activations)
            sch.compute_at(weights, anchor)
            sch.vectorize(sch.get_loops(weights)[-1])
        if PREFETCH_ALL_PLANES:
            sch.unroll(ii)
        sch.unroll(v)
        sch.unroll(j)
        sch.reverse_compute_at(epilogue, b)
        sch.set_scope(gemm, 0, "local")


class CUDAActPack(ScheduleRule):
    """One block per activation row for the whole quantize+pack."""

    kernel = "act_pack"
    target_kinds = ("cuda",)

    def schedule(self, sch: s_tir.Schedule, func: tir.PrimFunc, target: tvm.target.Target, tunable: bool) -> None:
        """See :meth:`ScheduleRule.schedule`."""
        sch.compute_inline(sch.get_sblock("pb_xinv"))
        sch.compute_inline(sch.get_sblock("pb_xq"))
        # Anchor on the row's max-abs (the one non-output block), then pull every output stage
        # of that row into the same thread block.
        amax = sch.get_sblock("pb_amax")
        b, r = sch.get_loops(amax)
        sch.bind(b, "blockIdx.x")
        sch.set_scope(amax, 0, "shared")
        ro, ri = sch.split(r, [None, PACK_THREADS])
        sch.reorder(ri, ro)
        sch.bind(ri, "threadIdx.x")
        sch.unroll(ro)  # independent loads in flight instead of a load-use chain
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
            # Build each thread's words in registers: read 32 activations once, OR bits into all planes.
            words = sch.cache_write(pack, 0, "local")
            sch.reverse_compute_at(words, wi)
            p, t = sch.get_loops(pack)[-2:]
            sch.decompose_reduction(pack, p)
            sch.reorder(t, p)
            sch.unroll(t)
            sch.unroll(p)
        r2 = sch.get_loops(sch.get_sblock("pb_rowsum"))[-1]
        ro2, ri2 = sch.split(r2, [None, PACK_THREADS])
        sch.reorder(ri2, ro2)
        sch.bind(ri2, "threadIdx.x")
        sch.unroll(ro2)
