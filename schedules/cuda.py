"""CUDA default schedules for the PB kernels (no tuning needed, never DLight's Fallback).

``pb_gemm``: one warp per output element ``(b, n)``; the 32 lanes split the K words (coalesced
128-byte reads of each weight plane), each lane loops over weight planes and, unrolled, over
activation planes, and a warp shuffle reduction combines the lanes. The epilogue runs right after
the reduction in the same kernel.

``act_pack``: one block per row for the max and row-sum reductions (cross-thread), one thread
per packed word for quantize+pack.
"""

from __future__ import annotations

from pbtvm._tvm import s_tir, tir, tvm
from pbtvm.ops.pb_gemm import GEMM_BLOCK

from .rules import ScheduleRule

#: Warps (output rows) per thread block in the default GEMM schedule.
WARPS_PER_BLOCK = 4
#: Threads per block for elementwise and reduction parts of the activation pack.
PACK_THREADS = 128


class CUDABitplaneGemm(ScheduleRule):
    """Warp-per-output reduction schedule for ``pb_gemm`` + epilogue."""

    kernel = "pb_gemm"
    target_kinds = ("cuda",)

    def schedule(self, sch: s_tir.Schedule, func: tir.PrimFunc, target: tvm.target.Target, tunable: bool) -> None:
        """See :meth:`ScheduleRule.schedule`."""
        gemm = sch.get_sblock(GEMM_BLOCK)
        (epilogue,) = sch.get_consumers(gemm)
        b, n, i, j, w = sch.get_loops(gemm)
        warps = sch.sample_categorical([1, 2, 4, 8], [0.25] * 4) if tunable else WARPS_PER_BLOCK
        no, ni = sch.split(n, [None, warps])
        wo, wi = sch.split(w, [None, 32])
        sch.reorder(b, no, ni, wi, i, wo, j)
        # Fusing b into blockIdx.x would defeat LowerCrossThreadReduction (TVM 0.27): keep b on y.
        sch.bind(b, "blockIdx.y")
        sch.bind(no, "blockIdx.x")
        sch.bind(ni, "threadIdx.y")
        sch.bind(wi, "threadIdx.x")
        sch.unroll(j)
        sch.reverse_compute_at(epilogue, ni)
        sch.set_scope(gemm, 0, "local")


class CUDAActPack(ScheduleRule):
    """Block-per-row reductions and thread-per-word packing for ``act_pack``."""

    kernel = "act_pack"
    target_kinds = ("cuda",)

    def schedule(self, sch: s_tir.Schedule, func: tir.PrimFunc, target: tvm.target.Target, tunable: bool) -> None:
        """See :meth:`ScheduleRule.schedule`."""
        sch.compute_inline(sch.get_sblock("pb_xinv"))
        sch.compute_inline(sch.get_sblock("pb_xq"))
        for name in ("pb_amax", "pb_rowsum"):
            blk = sch.get_sblock(name)
            b, r = sch.get_loops(blk)
            ro, ri = sch.split(r, [None, PACK_THREADS])
            sch.reorder(b, ri, ro)
            sch.bind(b, "blockIdx.x")
            sch.bind(ri, "threadIdx.x")
        for name in ("pb_xscale",):
            (b,) = sch.get_loops(sch.get_sblock(name))
            bo, bi = sch.split(b, [None, 32])
            sch.bind(bo, "blockIdx.x")
            sch.bind(bi, "threadIdx.x")
        p, b, w, t = sch.get_loops(sch.get_sblock("pb_xpack"))
        fo, fi = sch.split(sch.fuse(p, b, w), [None, PACK_THREADS])
        sch.bind(fo, "blockIdx.x")
        sch.bind(fi, "threadIdx.x")
        sch.unroll(t)
