"""CPU rule: on AVX-512 BW + VNNI CPUs (and AVX2 ones), the PB GEMM becomes :func:`pbtvm.ops.pb_vnni.pb_vnni_func`.

The rule matches a ``pb_gemm`` PrimFunc (the TE kernel from :func:`pbtvm.ops.pb_dense` or
:func:`pbtvm.ops.pb_int_product`) when the target's ``mcpu``/``mattr`` has the instructions and the
format fits int8 dot products (:func:`pbtvm.ops.pb_vnni.unsupported_reason`), and replaces it by
the byte-code kernel with the same parameters: ``vpdpbusd`` on AVX-512 VNNI CPUs, else
``vpmaddubsw`` + ``vpmaddwd`` on AVX2 ones (:func:`pbtvm.ops.pb_vnni.cpu_isa`; 8-bit
weights split their codes there), so the Relax graph, export and the ``bitlayers``
argument are untouched; likewise the LSTM step (``pb_lstm_cell``) becomes
:func:`pbtvm.ops.pb_vnni_lstm.pb_vnni_lstm_func`. Weights in the ``lut16x4`` layout get the AVX2
table-lookup kernel instead (:mod:`pbtvm.ops.pb_lut`, GEMMs and the LSTM step; no knobs).
Everything else falls through to the portable popcount kernels of :mod:`.cpu`. ``PBTVM_CPU_KERNEL=popcount`` in the environment forces the portable
kernel (for comparisons).

The kernel's knobs (output rows decoded side by side, activation rows per decoded chunk) are
chosen per batch from measurements (``benchmarks/bench_cpu.py``); the kernel is built with its
loops already scheduled, so MetaSchedule does not search it: the rule is a
:class:`~.rules.KnobRule`, and ``pbtvm tune`` measures its :data:`KNOBS` settings directly.
"""

from __future__ import annotations

from typing_extensions import override

from pbtvm import names
from pbtvm._tvm import s_tir, tir, tvm
from pbtvm.bitplane import LUT_LAYOUT, BitplaneFormat
from pbtvm.ops import amx_gemm, gfni_decode, pb_lut
from pbtvm.ops.pb_vnni import (
    CPU_KERNELS,
    MAX_BLOCK_BATCH_TILE,
    cpu_isa,
    pb_vnni_func,
    target_supports,
    tile_problem,
    unsupported_reason,
)
from pbtvm.ops.pb_vnni_lstm import pb_vnni_lstm_func
from pbtvm.target import popcount_forced, resolve_target

from .rules import KnobRule, ScheduleRule, format_of, lstm_cell_operands

#: (row_tile, batch_tile) of the kernel: 2 output rows side by side hide the dot-product latency
#: at batch 1; activation rows share each decoded chunk in tiles of 4.
ROW_TILE = 2
BATCH_TILE = 4
#: Below one 512-input block, batch 1 has its own loop nest with this many output rows decoded
#: side by side (more rows hide more latency: 512x784 was 21 µs at 16 rows vs 37 µs at 2,
#: single-thread CPU time); with whole blocks rows run one after another at every batch.
SINGLE_ROWS_SIDE_BY_SIDE = 16
#: The same defaults per instruction set: AVX2 has 16 ymm registers, an accumulator takes two.
DEFAULT_TILES = {
    "avx512": (ROW_TILE, BATCH_TILE, SINGLE_ROWS_SIDE_BY_SIDE),
    "avxvnni": (1, 4, 4),
    "avx2": (1, 4, 4),
}


def one_kernel_layer(fmt: BitplaneFormat, k_dim: int, target: tvm.target.Target | None = None) -> bool:
    """Whether a dense layer becomes one kernel (quantize + GEMM) instead of a pack and a GEMM.

    On CPUs with the AVX-512 GEMM (:mod:`pbtvm.schedules.cpu_vnni`) the one-kernel layer
    quantizes the rows straight into the int8 codes its dot products read: no planes, one launch
    (MNIST 512x784 W4 batch 1: 21 µs vs 8.5 + 21 µs; batch 8: 68 vs 49 + 70 µs, BENCHMARKS.md).
    Elsewhere the separate pack is shared by every layer reading the same input, and wins.
    ``target`` defaults to the current target (``with target:``).
    """
    target = target or tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm" or popcount_forced():
        return False
    isa = cpu_isa(target)
    if fmt.layout == LUT_LAYOUT:
        return isa is not None and pb_lut.unsupported_reason(fmt, k_dim) is None
    return isa is not None and unsupported_reason(fmt, k_dim, isa) is None


class CPUVnniGemm(KnobRule):
    """``pb_gemm`` on AVX-512 BW + VNNI (or AVX2): the TE kernel replaced by the byte-code kernel."""

    kernel = names.KernelKind.GEMM
    target_kind = "llvm"

    @property
    def label(self) -> str:
        """How reports name the kernel: its instruction set (``avx512``, ``avxvnni`` or ``avx2``)."""
        return _isa_of(self.target)

    def matches(self, func: tir.PrimFunc) -> bool:
        """See :meth:`ScheduleRule.matches`; also needs the CPU features and a fitting format."""
        return super().matches(func) and _replaceable(func, _operands, self.target)

    @override
    def knob_variant(self) -> str:
        """The instruction sets the kernel is built with: ``avx512``, ``avxvnni`` or ``avx2``, plus
        ``+gfni`` and ``+amx`` where the target has them (an mcpu's tuning log holds all its builds)."""
        target = _target_or_host(self.target)
        extra = [
            name for name, has in (("gfni", _has_gfni(target)), ("amx", amx_gemm.target_runs_tiles(target))) if has
        ]
        return "+".join([_isa_of(target), *extra])

    def apply(self, func: tir.PrimFunc) -> s_tir.Schedule:
        """The AVX-512 kernel for ``func`` (already scheduled) with the default knobs."""
        return s_tir.Schedule(vnni_kernel_for(func, target=self.target), debug_mask=0)

    @override
    def knob_settings(self, func: tir.PrimFunc) -> list[dict]:
        """See :meth:`KnobRule.knob_settings`: the :data:`KNOBS` that fit the layer
        (:func:`pbtvm.ops.pb_vnni.tile_problem`), the default first.

        With whole 512-input blocks only the batch tile changes the kernel (rows run one by one,
        :data:`pbtvm.ops.pb_vnni.BLOCK_TASK_ROWS` per task), so only distinct batch tiles are offered.
        """
        fmt, k_dim = format_of(func), int((func.attrs or {}).get(names.ATTR_K, 0))
        if fmt is not None and fmt.layout == LUT_LAYOUT:  # the table-lookup kernel has no knobs
            return [{}]
        isa = _isa_of(self.target)
        row_tile, batch_tile, _ = DEFAULT_TILES[isa]
        knobs = [(row_tile, batch_tile), *(k for k in KNOBS if k != (row_tile, batch_tile))]
        if fmt is not None and fmt.words(k_dim) >= gfni_decode.BLOCK_WORDS:
            tiles = dict.fromkeys(min(bt, MAX_BLOCK_BATCH_TILE) for _, bt in knobs)
            return [{"row_tile": row_tile, "batch_tile": bt} for bt in tiles]
        fits = [k for k in knobs if fmt is None or tile_problem(fmt, k_dim, *k, isa) is None]
        return [{"row_tile": row_tile, "batch_tile": batch_tile} for row_tile, batch_tile in fits]

    def kernel_with(self, func: tir.PrimFunc, knobs: dict) -> tir.PrimFunc:
        """See :meth:`KnobRule.kernel_with`."""
        return vnni_kernel_for(
            func, row_tile=knobs.get("row_tile"), batch_tile=knobs.get("batch_tile"), target=self.target
        )


class CPUVnniDenseAct(CPUVnniGemm):
    """``pb_dense_act`` on AVX-512 BW + VNNI: one kernel that quantizes the rows and multiplies.

    The float rows go straight to the int8 codes the dot products read (no activation planes):
    one kernel per layer instead of the pack and the GEMM.
    """

    kernel = names.KernelKind.DENSE_ACT


class CPUVnniLstmCell(ScheduleRule):
    """``pb_lstm_cell`` on AVX-512 BW + VNNI (or AVX2): the popcount step replaced by
    :func:`pbtvm.ops.pb_vnni_lstm.pb_vnni_lstm_func` (its products the AVX-512 GEMM's, the cell
    update in the same parallel tasks). Every form: ``gx`` given for one step or read at step
    ``t`` of a sequence, or the input projection inside (decoding)."""

    kernel = names.KernelKind.LSTM_CELL
    target_kind = "llvm"

    def matches(self, func: tir.PrimFunc) -> bool:
        """See :meth:`ScheduleRule.matches`; also needs the CPU features and a fitting format."""
        return super().matches(func) and _replaceable(func, lstm_cell_operands, self.target)

    def apply(self, func: tir.PrimFunc) -> s_tir.Schedule:
        """The AVX-512 step for ``func`` (already scheduled)."""
        return s_tir.Schedule(vnni_lstm_kernel_for(func, target=self.target), debug_mask=0)


def vnni_lstm_kernel_for(func: tir.PrimFunc, target: tvm.target.Target | None = None) -> tir.PrimFunc:
    """The AVX-512 LSTM step with ``func``'s parameters (same order, shapes and batch variable).

    ``target`` as in :func:`vnni_kernel_for` (its instruction set, GFNI where it has ``gfni``).

    Raises
    ------
    ValueError
        If ``func`` is not a ``pb_lstm_cell`` PrimFunc the kernel can compute.
    """
    if _is_replaced(func):
        return func
    fmt, operands = format_of(func), lstm_cell_operands(func)
    if fmt is None or operands is None:
        raise ValueError("vnni_lstm_kernel_for needs a pb_lstm_cell PrimFunc from pbtvm.kernels")
    batch, input_size, bias, steps = operands
    isa = _isa_of(target)
    k_dim = int(func.attrs[names.ATTR_K])
    amx = _amx_min_batch(fmt, target)
    new = pb_vnni_lstm_func(fmt, k_dim, batch, input_size, bias, steps, _has_gfni(target), isa, amx)
    return _replacing(func, new, pb_lut.CPU_KERNEL if fmt.layout == LUT_LAYOUT else CPU_KERNELS[isa])


def _replaceable(func: tir.PrimFunc, operands, target: tvm.target.Target) -> bool:
    """Whether a byte-code rule replaces ``func`` (of its kernel kind): not forced to the popcount
    kernel, and already the byte-code kernel or one it can compute (``operands(func)`` recognises
    the parameters) on a CPU with the features (:func:`pbtvm.ops.pb_vnni.cpu_isa`)."""
    if popcount_forced():
        return False
    if _is_replaced(func):
        return True
    isa = cpu_isa(target)
    return isa is not None and fits_vnni(func, isa) and operands(func) is not None


def fits_vnni(func: tir.PrimFunc, isa: str = "avx512") -> bool:
    """Whether the byte-code kernels on ``isa`` compute ``func``'s format at its K (and input
    size, for an LSTM step with its input projection), CPU features aside; in the ``lut16x4``
    layout, whether the table-lookup kernel does."""
    fmt, attrs = format_of(func), func.attrs or {}
    sizes = [attrs[key] for key in (names.ATTR_K, names.ATTR_INPUT_SIZE) if key in attrs]
    if fmt is not None and fmt.layout == LUT_LAYOUT:
        return all(pb_lut.unsupported_reason(fmt, int(k)) is None for k in sizes)
    return fmt is not None and all(unsupported_reason(fmt, int(k), isa) is None for k in sizes)


def _operands(func: tir.PrimFunc) -> tuple | None:
    """``(activation buffer, weight buffer, dense, bias, float_input)`` of a PB GEMM or
    ``pb_dense_act`` PrimFunc from :mod:`pbtvm.ops`, None if its parameters are not one's."""
    buffers = [p for p in func.params if tir.is_buffer_var(p)]
    if names.kernel_kind(func) == names.KernelKind.DENSE_ACT:  # x, wp, w_scale[, bias], y
        return (buffers[0], buffers[1], True, len(buffers) == 5, True) if len(buffers) in (4, 5) else None
    out = buffers[-1] if buffers else None
    if out is None or len(out.shape) != 2:
        return None
    dense = str(out.dtype) == "float32"  # xp, x_scale, rowsum, wp, w_scale[, bias], y  /  xp, rowsum, wp, acc
    if len(buffers) not in ((6, 7) if dense else (4,)):
        return None
    return buffers[0], buffers[3 if dense else 2], dense, len(buffers) == 7, False


def single_row_tile_for(
    fmt: BitplaneFormat, n_out: int, k_dim: int, rows: int = SINGLE_ROWS_SIDE_BY_SIDE
) -> int | None:
    """Output rows per tile of the batch-1 loop nest, ``rows`` (None: no such nest, K has whole blocks)."""
    del n_out  # the same for every N
    return None if fmt.words(k_dim) >= gfni_decode.BLOCK_WORDS else rows


def vnni_kernel_for(
    func: tir.PrimFunc,
    row_tile: int | None = None,
    batch_tile: int | None = None,
    single_row_tile: int | None = None,
    target: tvm.target.Target | None = None,
) -> tir.PrimFunc:
    """The byte-code kernel with ``func``'s parameters (same order, shapes and batch variable).

    The instruction set is ``target``'s (default: the current target, else the host CPU; AVX-512
    VNNI where it has it, else AVX2, :func:`pbtvm.ops.pb_vnni.cpu_isa`); the tiles default to
    :data:`DEFAULT_TILES` for it (``single_row_tile``, output rows per tile at batch 1, only
    below one 512-input block, :func:`single_row_tile_for`). The GFNI block decode is used
    when ``target`` has ``gfni``, the AMX loops from :func:`pbtvm.ops.amx_gemm.amx_min_batch`
    activation rows when it has AMX-INT8 (:data:`pbtvm.ops.amx_gemm.AMX_FEATURES`). Weights in the ``lut16x4`` layout get the table-lookup kernel
    (:func:`pbtvm.ops.pb_lut.pb_lut_func`), which has no tiles to set (they are ignored).

    Raises
    ------
    ValueError
        If ``func`` is not a PB GEMM the kernel can compute.
    """
    if _is_replaced(func):
        return func
    fmt, operands = format_of(func), _operands(func)
    if fmt is None or operands is None:
        raise ValueError("vnni_kernel_for needs a pb_gemm / pb_dense_act PrimFunc from pbtvm.ops")
    x, wp, dense, bias, float_input = operands
    n_out, k_dim = _out_rows(func), int(func.attrs[names.ATTR_K])
    batch = x.shape[0] if float_input else x.shape[1]
    if fmt.layout == LUT_LAYOUT:  # AVX2 table lookup (no knobs)
        return _replacing(
            func, pb_lut.pb_lut_func(fmt, n_out, k_dim, batch, dense, bias, float_input), pb_lut.CPU_KERNEL
        )
    isa = _isa_of(target)
    default_rows, default_batch, default_single = DEFAULT_TILES[isa]
    row_tile, batch_tile = row_tile or default_rows, batch_tile or default_batch
    single = single_row_tile or single_row_tile_for(fmt, n_out, k_dim, default_single)
    gfni, amx = _has_gfni(target), _amx_min_batch(fmt, target)
    new = pb_vnni_func(fmt, n_out, k_dim, batch, dense, bias, batch_tile, row_tile, float_input, single, gfni, isa, amx)
    return _replacing(func, new, CPU_KERNELS[isa])


def _out_rows(func: tir.PrimFunc) -> int:
    """N: the output buffer's second dimension (the last parameter of every GEMM form)."""
    return int([p for p in func.params if tir.is_buffer_var(p)][-1].shape[1])


def _is_replaced(func: tir.PrimFunc) -> bool:
    """Whether ``func`` is already one of the byte-code kernels (the rules leave it as it is)."""
    return (func.attrs or {}).get(names.ATTR_CPU_KERNEL) in (*CPU_KERNELS.values(), pb_lut.CPU_KERNEL)


def _target_or_host(target: tvm.target.Target | None) -> tvm.target.Target:
    """``target``, else the current target, else the host CPU."""
    return target or tvm.target.Target.current(allow_none=True) or resolve_target("llvm")


def _isa_of(target: tvm.target.Target | None) -> str:
    """The instruction set of the kernel for ``target`` (default as :func:`_target_or_host`):
    AVX-512 where it has AVX-512 VNNI or none of the instruction sets (an explicit build), else
    AVX-VNNI or AVX2 (:func:`pbtvm.ops.pb_vnni.cpu_isa`)."""
    return cpu_isa(_target_or_host(target)) or "avx512"


def _has_gfni(target: tvm.target.Target | None) -> bool:
    """Whether ``target`` (default as :func:`_target_or_host`) has GFNI."""
    return target_supports(_target_or_host(target), gfni_decode.CPU_FEATURES)


def _amx_min_batch(fmt: BitplaneFormat, target: tvm.target.Target | None) -> int | None:
    """From which batch the byte-code kernels of ``fmt`` take the AMX loops on ``target`` (default
    as :func:`_target_or_host`): :func:`pbtvm.ops.amx_gemm.amx_min_batch` where it has the AMX-INT8
    tile instructions and is x86-64 Linux (:func:`pbtvm.ops.amx_gemm.target_runs_tiles`), else None."""
    return amx_gemm.amx_min_batch(fmt.bits) if amx_gemm.target_runs_tiles(_target_or_host(target)) else None


def _replacing(func: tir.PrimFunc, new: tir.PrimFunc, kernel: str) -> tir.PrimFunc:
    """``new`` with ``func``'s attributes (the tuner and the rules key on them), marked with its
    kernel (a value of :data:`pbtvm.ops.pb_vnni.CPU_KERNELS` or :data:`pbtvm.ops.pb_lut.CPU_KERNEL`)."""
    attrs = {**dict(func.attrs.items()), names.ATTR_CPU_KERNEL: kernel}
    return new.without_attr("global_symbol").with_attrs(attrs)


#: (row_tile, batch_tile) candidates, the default first; a tuning run measures the first ``trials``
#: of those that fit the layer (:func:`pbtvm.ops.pb_vnni.tile_problem`).
KNOBS = ((ROW_TILE, BATCH_TILE), (4, 4), (4, 2), (8, 1), (2, 8), (8, 2), (1, 8), (4, 1), (2, 2))
