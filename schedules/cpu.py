"""CPU (LLVM) schedules: parallel over output rows, activation planes unrolled.

Needs a target ``mcpu`` with a popcount instruction (``pbtvm.target`` sees to that); plain
``llvm`` lowers popcount to a bit-twiddling sequence about 10x slower.
"""

from __future__ import annotations

from typing_extensions import override

from pbtvm import names
from pbtvm._tvm import s_tir, tir

from .rules import ScheduleRule, TunableRule, inline_act_quantization, lstm_cell_legs, sample_unroll

#: Output rows per parallel task.
ROW_TILE = 16


class CPUBitplaneGemm(TunableRule):
    """``pb_gemm`` + epilogue: tasks over N tiles, the epilogue computed per output row.

    Tunable template: the row tile (``sample_perfect_tile``) and the unroll depth are sampled;
    the batch loop outside or inside the row tile is a structural variant (inside re-uses each
    weight row across the batch while it is in L1).
    """

    kernel = names.KernelKind.GEMM
    target_kind = "llvm"
    custom_rule = names.RULE_BITPLANE_GEMM

    @override
    def variants(self, func: tir.PrimFunc) -> list[dict]:
        """See :meth:`TunableRule.variants`."""
        return [{"batch_inner": False}, {"batch_inner": True}]

    def schedule(self, sch: s_tir.Schedule) -> None:
        """See :meth:`ScheduleRule.schedule`: :data:`ROW_TILE` rows per task, batch outside."""
        gemm = sch.get_sblock(names.GEMM)
        ni = _row_tiles(sch, gemm)
        (epilogue,) = sch.get_consumers(gemm)
        sch.reverse_compute_at(epilogue, ni)

    def template(self, sch: s_tir.Schedule, variant: dict) -> None:
        """See :meth:`TunableRule.template`."""
        gemm = sch.get_sblock(names.GEMM)
        ni = _row_tiles(sch, gemm, True, variant["batch_inner"])
        sample_unroll(sch, ni)
        (epilogue,) = sch.get_consumers(gemm)
        sch.reverse_compute_at(epilogue, ni)


def _row_tiles(
    sch: s_tir.Schedule, gemm: s_tir.SBlockRV, tunable: bool = False, batch_inner: bool = False
) -> s_tir.LoopRV:
    """The GEMM as parallel tiles of output rows (``ROW_TILE``, or sampled when ``tunable``).

    Inside a tile: batch then rows (rows then batch with ``batch_inner``), weight planes, words,
    and the activation planes unrolled. Returns the tile's row loop.
    """
    b, n, i, j, w = sch.get_loops(gemm)
    if tunable:
        no, ni = sch.split(n, sch.sample_perfect_tile(n, n=2, max_innermost_factor=64))
    else:
        no, ni = sch.split(n, [None, ROW_TILE])
    if batch_inner:
        sch.reorder(no, ni, b, i, w, j)
    else:
        sch.reorder(no, b, ni, i, w, j)
    sch.parallel(no)
    sch.unroll(j)
    return ni


class CPUDenseAct(ScheduleRule):
    """``pb_dense_act``: the pack (parallel over words), then the GEMM as :class:`CPUBitplaneGemm`.

    The epilogue stays a separate parallel loop: it reads the pack's scale and code sum, which
    live outside the GEMM's row tiles.
    """

    kernel = names.KernelKind.DENSE_ACT
    target_kind = "llvm"

    def schedule(self, sch: s_tir.Schedule) -> None:
        """See :meth:`ScheduleRule.schedule`."""
        _schedule_pack(sch)
        gemm = sch.get_sblock(names.GEMM)
        _row_tiles(sch, gemm)
        (epilogue,) = sch.get_consumers(gemm)
        sch.parallel(sch.fuse(*sch.get_loops(epilogue)))


class CPUActPack(ScheduleRule):
    """``act_pack``: quantization inlined into packing; packing parallel over words."""

    kernel = names.KernelKind.ACT_PACK
    target_kind = "llvm"

    def schedule(self, sch: s_tir.Schedule) -> None:
        """See :meth:`ScheduleRule.schedule`."""
        _schedule_pack(sch)


def _schedule_pack(sch: s_tir.Schedule, tag: str = "") -> None:
    """Quantization inlined into packing; packing parallel over the packed words."""
    inline_act_quantization(sch, tag)
    pack = sch.get_sblock(names.XPACK + tag)
    *words, t = sch.get_loops(pack)  # (plane, row, word), or the mma16x256 order's 4 axes
    sch.parallel(sch.fuse(*words))
    sch.unroll(t)


class CPULSTMCell(ScheduleRule):
    """``pb_lstm_cell``: pack ``h`` (and ``x``, parallel), then tasks over tiles of hidden units.

    Each task runs the PB GEMV for its units' four gate rows (adjacent, the weights are
    unit-major; for a step with its input projection, the ``W_ih`` rows too) and finishes their
    cell update; one function call per step.
    """

    kernel = names.KernelKind.LSTM_CELL
    target_kind = "llvm"

    def schedule(self, sch: s_tir.Schedule) -> None:
        """See :meth:`ScheduleRule.schedule`."""
        legs = lstm_cell_legs(sch.mod["main"])
        for tag in legs:
            _schedule_pack(sch, tag)
        b, u = sch.get_loops(sch.get_sblock(f"{names.CELL}_v0"))
        uo, _ = sch.split(u, [None, ROW_TILE // 4])  # ROW_TILE gate rows = ROW_TILE / 4 hidden units
        sch.reorder(uo, b)
        sch.compute_at(sch.get_sblock(names.CELL_C), b)
        for tag in legs:
            gemm = sch.get_sblock(names.GEMM + tag)
            (gates,) = sch.get_consumers(gemm)
            sch.compute_at(gates, b)
            (row,) = sch.get_loops(gates)[2:]
            sch.compute_at(gemm, row)  # one row at a time: its accumulator stays in a register
            loops = sch.get_loops(gemm)[3:]  # (plane, act plane[, word]): K <= 32 has no word loop
            if len(loops) == 3:
                sch.reorder(loops[0], loops[2], loops[1])
            sch.unroll(loops[1])
        sch.parallel(uo)
