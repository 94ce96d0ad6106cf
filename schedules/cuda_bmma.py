"""CUDA rule for the PB dense layer on binary tensor cores (weights in the ``mma16x256`` layout).

The kernel is written directly in TIR by :func:`.cuda_bmma_kernel.bmma_dense_kernel` for one
:class:`~.cuda_bmma_kernel.BMMAConfig`. The MetaSchedule template is the set of configurations
valid for the layer: the design space samples one (``sample_categorical`` over the configs, each
encoded as an integer) and records it as the block annotation :data:`CONFIG_ANNOTATION` on the
reference compute (:func:`pbtvm.ops.pb_dense` in that layout). :func:`materialize` turns an
annotated function into the kernel; it runs wherever a schedule becomes code: the default
schedule, :func:`pbtvm.schedules.tuning.replay` of a tuned trace, and the tuning builder
(:func:`build_candidate`). Limitation: MetaSchedule's cost model sees the annotated reference, so its
features do not tell configs apart; the search is effectively random sampling plus measurement.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import astuple

from pbtvm import names
from pbtvm._tvm import s_tir, tir, tvm
from pbtvm.bitplane import MMA_LAYOUT, BitplaneFormat, act_column_stride
from pbtvm.target import TargetInfo, TargetLimits

from .cuda_bmma_kernel import (
    DEFAULT_LIMITS,
    MMA_LANES,
    BMMAConfig,
    bmma_dense_kernel,
    config_problem,
    registers,
    row_column_tiles,
)
from .rules import TunableRule, format_of

#: Most weights (``N * K``) of a dense layer that ``compile`` builds as one launch (the in-block
#: pack, :func:`.cuda_bmma_kernel.bmma_dense_kernel` with ``fused_pack``) at batch 1. Measured on an
#: H200 (BENCHMARKS.md, thirty-seventh session), one launch vs ballot pack + kernel at batch 1: W4
#: 4096x4096 7.0 vs 9.6 µs, 8192x2048 6.1 vs 9.0, 6000x1500 5.5 vs 8.1, 2600x650 3.8 vs 7.3 (W1-W8
#: alike); larger layers lose at some widths (11008x4096 W1 10.5 vs 8.8, 4096x11008 W4 22.2 vs
#: 17.9: each block packs the whole row).
ONE_LAUNCH_MAX_WEIGHTS = 4096 * 4096
#: Largest batch such a layer runs in one launch, above :data:`ONE_LAUNCH_SMALL_K`. Above batch 1
#: the one-launch kernel was 2-4x slower than pack + kernel at K >= 1500 (H200, thirty-seventh
#: session, every W: 6000x1500 W4 batch 8 16.4 vs 10.9 µs, batch 16 28.4 vs 14.5), so a layer with
#: a symbolic batch dispatches: one launch up to here, the ballot pack and the two-launch kernel
#: above (:data:`pbtvm.names.ATTR_IN_BLOCK_MAX_BATCH`, :func:`dispatch_configs`).
ONE_LAUNCH_MAX_BATCH = 1
#: Largest K at which one launch won above batch 1 too: at 2600x650 it won at batches 8 and 16,
#: W1-W8 (same sitting; W4 7.2 vs 9.7 µs at batch 8, 8.0 vs 12.9 at 16: a block packs a short row
#: quickly, and the layer's second launch costs more than that).
ONE_LAUNCH_SMALL_K = 650
#: Largest batch one launch serves at K up to :data:`ONE_LAUNCH_SMALL_K`: the largest timed there
#: (``bench_bmma.py --fused-max-batch``).
ONE_LAUNCH_SMALL_K_MAX_BATCH = 16


def one_launch_max_batch(k_dim: int) -> int:
    """Largest batch at which a dense layer of ``k_dim`` inputs runs as the one-launch kernel:
    :data:`ONE_LAUNCH_SMALL_K_MAX_BATCH` up to :data:`ONE_LAUNCH_SMALL_K`, else
    :data:`ONE_LAUNCH_MAX_BATCH`."""
    return ONE_LAUNCH_SMALL_K_MAX_BATCH if k_dim <= ONE_LAUNCH_SMALL_K else ONE_LAUNCH_MAX_BATCH


def one_launch_layer(
    fmt: BitplaneFormat, n_out: int, k_dim: int, rows: int | None, target=None, tune_batch: int = 1
) -> bool:
    """Whether ``compile`` builds a CUDA dense layer as ``pb_dense_act`` (one function that packs
    its input) instead of a ballot pack and a BMMA kernel: the ``mma16x256`` layout, at most
    :data:`ONE_LAUNCH_MAX_WEIGHTS` weights, and a static batch of ``rows`` up to
    :func:`one_launch_max_batch` (one launch) or a symbolic batch (``rows`` None: one launch up to
    that batch, a dispatch to pack + kernel above) whose tuning batch ``tune_batch`` is in the
    one-launch range (the function tuned is the one that runs at that batch). ``compile`` also
    needs a symbolic batch's input read by no other layer (``relay_passes.pb_linear_rewrite``: else
    the layers share one pack). ``target`` defaults to the current target (``with target:``)."""
    target = target or tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != "cuda" or fmt.layout != MMA_LAYOUT:
        return False
    if n_out * k_dim > ONE_LAUNCH_MAX_WEIGHTS:
        return False
    return (rows if rows is not None else tune_batch) <= one_launch_max_batch(k_dim)


#: Block annotation holding the sampled config (see :func:`encode`).
CONFIG_ANNOTATION = "pbtvm.bmma_config"
#: Block annotation holding the static batch a config was chosen (or tuned) at: replayed on the
#: layer with a symbolic batch, the config serves that batch's range of the dispatch
#: (:func:`dispatch_configs`), the other ranges keep their defaults.
BATCH_ANNOTATION = "pbtvm.bmma_batch"
#: Knob values the design space draws from (filtered per layer by :func:`config_space`).
TILES_M, WARPS_M, K_SPLIT, LOADS, TILES_N = (1, 2, 4), (1, 2, 4), (1, 2, 4, 8), (1, 2, 4), (1, 2, 4, 8)
#: Rough per-lane register budget for accumulators and fragments (:func:`.cuda_bmma_kernel.registers`)
#: of the design space (beyond it ptxas may spill).
REGISTER_BUDGET = 128
#: The budget of the two-launch kernel's default past one column tile (:data:`BATCH_KNOBS`): 200
#: admits 4 x 4 register tiles, the fastest at batch 16-64 in the H200 sweep (2026-12-04), which
#: build without spills at W1-W4 (checked); the design space keeps :data:`REGISTER_BUDGET` (random
#: points of a 200 space spilled a little, e.g. W4A8 100x700 at batch 8: 4 bytes), so tuning
#: measures these defaults as "the default" beside its search.
DENSE_REGISTER_BUDGET = 200
#: Warps a layer should keep busy at batch 1 (132 SMs x ~16 warps: enough loads in flight).
TARGET_WARPS = 2048
_BASE = 100  # encode(): two decimal digits per knob


def encode(cfg: BMMAConfig) -> int:
    """A config as one int (two decimal digits per knob, ``tiles_m`` first)."""
    code = 0
    for v in astuple(cfg):
        code = code * _BASE + v
    return code


def decode(code: int) -> BMMAConfig:
    """Invert :func:`encode`."""
    values = []
    for _ in range(5):
        code, v = divmod(int(code), _BASE)
        values.append(v)
    return BMMAConfig(*reversed(values))


def knob_grid(fmt: BitplaneFormat, row_tiles: int, k_tiles: int, batch: int | None) -> Iterator[BMMAConfig]:
    """The knob values' combinations (:data:`TILES_M` ...) a layer of ``row_tiles`` x ``k_tiles``
    MMA tiles can use: no more row tiles a warp than it has, K split x loads within its K tiles,
    column tiles whole batch rows and, for a static ``batch``, no more than it needs. Whether a
    config fits the block (shared memory, threads, registers) is the caller's check."""
    unit = row_column_tiles(fmt.act_bits)
    max_cols = max(unit, -(-batch * act_column_stride(fmt.act_bits) // 8)) if batch else max(TILES_N) * unit
    for mt, wm, ks, ld, nt in itertools.product(TILES_M, WARPS_M, K_SPLIT, LOADS, TILES_N):
        cfg = BMMAConfig(mt, wm, ks, ld, nt * unit)
        if mt <= row_tiles and ks * ld <= k_tiles and cfg.tiles_n <= max_cols:
            yield cfg


def config_space(
    fmt: BitplaneFormat,
    n_out: int,
    k_dim: int,
    batch: int | None = None,
    fused_pack: bool = False,
    limits: TargetLimits = DEFAULT_LIMITS,
) -> list[BMMAConfig]:
    """Every config the design space holds for a layer (valid, within the register budget).

    ``batch`` (static, when known) caps ``tiles_n`` at the column tiles the batch needs;
    ``fused_pack``: for the kernel that packs its activations itself (``pb_dense_act``);
    ``limits``: the target's block limits.
    """
    _, row_tiles, k_tiles, *_ = fmt.weight_shape(n_out, k_dim)
    out = [
        cfg
        for cfg in knob_grid(fmt, row_tiles, k_tiles, batch)
        if not config_problem(fmt, k_dim, cfg, fused_pack, limits) and registers(fmt, k_dim, cfg) <= REGISTER_BUDGET
    ]
    return out or [default_config(fmt, n_out, k_dim, fused_pack=fused_pack, limits=limits)]


#: Knobs of the default config at larger batches (:func:`default_config`), from the first sweep on
#: an H200 (``benchmarks/sweep_bmma.py``, 4096x4096 and 11008x4096 W4A8, 2026-12-04): per batch the
#: config with the best geometric mean over the two shapes. ``(largest batch rows, tiles_m,
#: warps_m, k_split, tiles_n at 8 activation planes a row)``; past the last, the last. Batch 1 keeps
#: the latency rule (its best was within 10 % of it on both shapes).
BATCH_KNOBS = ((8, 2, 4, 4, 2), (32, 4, 2, 2, 4), (None, 4, 4, 1, 4))
#: Most weight bits :data:`BATCH_KNOBS` serve (the sweep was W4; at W8 its batch-8 config spilled,
#: 6000x1500: all planes' fragments of a K step in flight under ptxas's 64-register choice).
BATCH_KNOBS_MAX_BITS = 4


def default_config(
    fmt: BitplaneFormat,
    n_out: int,
    k_dim: int,
    batch: int = 1,
    fused_pack: bool = False,
    limits: TargetLimits = DEFAULT_LIMITS,
) -> BMMAConfig:
    """The config used without tuning.

    At one column tile (batch 1 at 8 activation planes): enough warps for the DRAM, the K split
    to get there. Above it, :data:`BATCH_KNOBS` (larger register tiles: at batch 64 the 4096x4096
    W4 kernel took 75 us with the batch-1 shape and 4 column tiles, 27 us with 4 x 4 tiles),
    clamped to the layer's tiles and halved to :data:`DENSE_REGISTER_BUDGET`, up to
    :data:`BATCH_KNOBS_MAX_BITS`; wider weights keep the batch-1 shape with up to 4 column tiles.
    The one-launch kernel (``fused_pack``) keeps the batch-1 shape with at most 2 column tiles
    (with 4 ptxas spilled, W8 8192x2048; not swept), fewer past :data:`FUSED_REGISTER_BUDGET`.
    Then the K split and column tiles are halved until the config fits the block.
    """
    _, row_tiles, k_tiles, *_ = fmt.weight_shape(n_out, k_dim)
    unit = row_column_tiles(fmt.act_bits)
    cols = -(-max(1, batch) * act_column_stride(fmt.act_bits) // 8)
    fits = functools.partial(config_problem, fmt, k_dim, fused_pack=fused_pack, limits=limits)
    if cols > unit and not fused_pack and fmt.bits <= BATCH_KNOBS_MAX_BITS:
        _, tiles_m, warps_m, k_split, tiles_n = next(
            knobs for knobs in BATCH_KNOBS if knobs[0] is None or batch <= knobs[0]
        )
        tiles_n = min(tiles_n * unit, -(-cols // unit) * unit)
        while tiles_m > row_tiles:
            tiles_m //= 2
        loads = 2 if k_tiles >= 2 else 1
        while k_split > 1 and k_split * loads > k_tiles:
            k_split //= 2
        cfg = BMMAConfig(tiles_m=tiles_m, warps_m=warps_m, k_split=k_split, loads=loads, tiles_n=tiles_n)
        # 16 activation bits double the column tiles, int64 accumulators the registers: the swept
        # (W4A8) tiles spilled there (W4A16 4096x4096 batch 9: 372 LDL/STL); halve them to the budget.
        while registers(fmt, k_dim, cfg) > DENSE_REGISTER_BUDGET and (cfg.tiles_n > unit or cfg.tiles_m > 1):
            if cfg.tiles_n > unit:
                cfg = dataclasses.replace(cfg, tiles_n=cfg.tiles_n // 2)
            else:
                cfg = dataclasses.replace(cfg, tiles_m=cfg.tiles_m // 2)
        return shrink_until_fit(cfg, fits, unit)
    tiles_n = unit
    # The one-launch kernel (fused_pack) stops at 2 tiles: with 4, ptxas spilled (W8, 8192x2048).
    while tiles_n * 2 <= min(cols, (2 if fused_pack else 4) * unit):
        tiles_n *= 2
    k_split = 1
    while k_split < 8 and row_tiles * k_split < TARGET_WARPS and k_split * 2 <= k_tiles:
        k_split *= 2
    loads = 2 if k_tiles >= 2 * k_split else 1
    cfg = BMMAConfig(tiles_m=1, warps_m=2, k_split=k_split, loads=loads, tiles_n=tiles_n)
    while fused_pack and cfg.tiles_n > unit and registers(fmt, k_dim, cfg) > FUSED_REGISTER_BUDGET:
        cfg = dataclasses.replace(cfg, tiles_n=cfg.tiles_n // 2)
    return shrink_until_fit(cfg, fits, unit)


#: Most :func:`.cuda_bmma_kernel.registers` of the one-launch kernel's default past one batch row:
#: W8A16 at 2600x650 with two batch rows a warp (4 column tiles, int64 accumulators: 60) spilled
#: 2 LDL/STL (sm_90, nvcc 13.0); the defaults checked at K 130 to 650 (W2-W16, A4-A16, batch
#: 2-16) are 44 or less and build without spills. Only A16 defaults change with it (A4 and A8 stay
#: within it); at K >= 2048 they take one batch row a warp (56 -> 32), where ``compile`` runs the
#: one-launch kernel at batch 1 only (:func:`one_launch_max_batch`).
FUSED_REGISTER_BUDGET = 48


#: :data:`CONFIG_ANNOTATION` of a layer with a symbolic batch built without tuning: a kernel per
#: batch range, chosen at run time (:func:`dispatch_configs`). 0 is no config's code (knobs >= 1).
DISPATCH_CODE = 0
#: Batch sizes whose :func:`default_config` the dispatch of a symbolic batch serves: up to 1, up to
#: each :data:`BATCH_KNOBS` bound, then any larger (the last bound's, at twice it: 64).
DISPATCH_BATCHES = (1, *(knobs[0] for knobs in BATCH_KNOBS[:-1]))


def dispatch_configs(
    fmt: BitplaneFormat,
    n_out: int,
    k_dim: int,
    limits: TargetLimits = DEFAULT_LIMITS,
    tuned: tuple[int, BMMAConfig] | None = None,
    in_block_max: int | None = None,
) -> list[tuple[int | None, BMMAConfig, bool]]:
    """The configs by batch for a symbolic batch: ``(largest batch or None, config, in_block)``
    entries, the two-launch kernel's :func:`default_config` at each :data:`DISPATCH_BATCHES` bound
    (adjacent equal entries merged; ``in_block`` False). At batch 64 the 4096x4096 W4 kernel took
    75 us with the batch-1 config and 27 us with its own (H200, BENCHMARKS.md): a model compiled
    for any batch had only the first. (A range's config is its upper bound's: at act_bits <= 4
    batch 2 runs the batch-8 config, one column tile a warp more than a static batch of 2 gets.)

    ``in_block_max`` (a ``pb_dense_act`` layer, :data:`pbtvm.names.ATTR_IN_BLOCK_MAX_BATCH`): up to
    that batch the one-launch kernel's defaults (``in_block`` True; at the bounds up to it and at
    it), the two-launch ranges above it.
    ``tuned`` = (batch, config) takes the range of that batch, in the block where that range is
    (a ``pb_dense_act`` layer's tuning measured the one-launch kernel), else two-launch (``compile``
    tunes no ``pb_dense_act`` past ``in_block_max``: the function tuned is the one that runs).
    """
    fused = in_block_max is not None
    in_block = sorted({b for b in DISPATCH_BATCHES if b <= in_block_max} | {in_block_max}) if fused else []
    bounds = [*in_block, *(b for b in DISPATCH_BATCHES if not fused or b > in_block_max), None]
    entries = [
        (most, default_config(fmt, n_out, k_dim, most, fused_pack=True, limits=limits), True)
        if most in in_block
        else (most, default_config(fmt, n_out, k_dim, most or 2 * DISPATCH_BATCHES[-1], limits=limits), False)
        for most in bounds
    ]
    if tuned is not None:
        at = next(i for i, most in enumerate(bounds) if most is None or tuned[0] <= most)
        entries[at] = (bounds[at], tuned[1], bounds[at] in in_block)
    out: list[tuple[int | None, BMMAConfig, bool]] = []
    for most, cfg, in_block in entries:
        if out and out[-1][1:] == (cfg, in_block):
            out[-1] = (most, cfg, in_block)
        else:
            out.append((most, cfg, in_block))
    return out


def shrink_until_fit(cfg: BMMAConfig, problem: Callable[[BMMAConfig], str | None], unit: int) -> BMMAConfig:
    """``cfg`` with its K split halved, then its column tiles (down to ``unit``, one batch row's),
    until ``problem(cfg)`` is None; the smallest when nothing fits (the kernel builder then says why)."""
    while problem(cfg) and cfg.k_split > 1:
        cfg = dataclasses.replace(cfg, k_split=cfg.k_split // 2)
    while problem(cfg) and cfg.tiles_n > unit:
        cfg = dataclasses.replace(cfg, tiles_n=cfg.tiles_n // 2)
    return cfg


def _layer(func: tir.PrimFunc) -> tuple[BitplaneFormat, int, int, bool, int | None]:
    """(format, N, K, has bias, static batch or None) of a PB dense PrimFunc in the mma layout.

    ``pb_gemm``: (xp, x_scale, rowsum, wp, w_scale, [bias], y); ``pb_dense_act``: (x, wp, w_scale, [bias], y).
    """
    fmt = format_of(func)  # with the codebook: offset binary has a zero-point epilogue
    if fmt is None:
        raise ValueError("the BMMA rule needs a PB dense PrimFunc with its format attributes")
    buffers = [p for p in func.params if tir.is_buffer_var(p)]
    # w_scale is [N], or [2, N] (scales and zero points) for offset binary: N is its last dimension
    if _fused(func):
        n_out, has_bias, batch = int(buffers[2].shape[-1]), len(buffers) == 5, buffers[0].shape[0]
    else:
        n_out, has_bias, batch = int(buffers[4].shape[-1]), len(buffers) == 7, buffers[1].shape[0]  # x_scale [B]
    k_dim = int(func.attrs[names.ATTR_K])
    return fmt, n_out, k_dim, has_bias, int(batch) if isinstance(batch, tir.IntImm) else None


def _in_block_max(func: tir.PrimFunc) -> int | None:
    """:data:`pbtvm.names.ATTR_IN_BLOCK_MAX_BATCH` of a ``pb_dense_act`` PrimFunc (None if absent)."""
    value = (func.attrs or {}).get(names.ATTR_IN_BLOCK_MAX_BATCH) if _fused(func) else None
    return None if value is None else int(value)


def _fused(func: tir.PrimFunc) -> bool:
    """Whether ``func`` packs its activations itself (``pb_dense_act``)."""
    return names.kernel_kind(func) == names.KernelKind.DENSE_ACT


def materialize(func: tir.PrimFunc, limits: TargetLimits = DEFAULT_LIMITS) -> tir.PrimFunc:
    """The BMMA kernel for a reference PrimFunc annotated with a config; other functions unchanged.

    The kernel keeps ``func``'s attributes; a ``func`` whose ``bitlayers`` was specialized away
    (a tuning workload) gets a kernel specialized to all planes.
    """
    code, at_batch = _annotated_config(func)
    if code is None:
        return func
    fmt, n_out, k_dim, _, batch = _layer(func)
    in_block_max = _in_block_max(func)
    symbolic = batch is None and (not _fused(func) or in_block_max is not None)
    if code == DISPATCH_CODE:
        if not symbolic:
            raise ValueError(
                f"{DISPATCH_CODE} (a dispatch by batch) is for a layer with a symbolic batch: two-launch, or "
                f"pb_dense_act with {names.ATTR_IN_BLOCK_MAX_BATCH}"
            )
        return kernel_for(func, dispatch_configs(fmt, n_out, k_dim, limits, in_block_max=in_block_max), limits)
    if symbolic and at_batch is not None:  # a config found at one batch (tuning), replayed for any
        tuned = (at_batch, decode(code))
        return kernel_for(func, dispatch_configs(fmt, n_out, k_dim, limits, tuned, in_block_max), limits)
    return kernel_for(func, decode(code), limits)


def kernel_for(
    func: tir.PrimFunc,
    cfg: BMMAConfig | list[tuple[int | None, BMMAConfig, bool]],
    limits: TargetLimits = DEFAULT_LIMITS,
) -> tir.PrimFunc:
    """The BMMA kernel with config ``cfg`` (or a dispatch by batch, :func:`dispatch_configs`) for a
    PB dense PrimFunc in the mma layout (see :func:`materialize`)."""
    fmt, n_out, k_dim, has_bias, _ = _layer(func)
    activation = (func.attrs or {}).get(names.ATTR_ACTIVATION)
    kernel = bmma_dense_kernel(
        fmt, n_out, k_dim, has_bias, cfg, fused_pack=_fused(func), limits=limits,
        activation=None if activation is None else str(activation),
    )  # fmt: skip
    if all(tir.is_buffer_var(p) for p in func.params):  # bitlayers fixed by specialize
        layers = next(p for p in kernel.params if not tir.is_buffer_var(p))
        kernel = kernel.specialize({layers: tir.const(fmt.bits, "int64")})
    return kernel.with_attrs(dict(func.attrs))


def _annotated_config(func: tir.PrimFunc) -> tuple[int | None, int | None]:
    """The config code and batch annotated on ``func``'s ``pb_gemm`` block (None where missing)."""
    if names.kernel_kind(func) not in (names.KernelKind.GEMM, names.KernelKind.DENSE_ACT):
        return None, None
    sch = s_tir.Schedule(func, debug_mask=0)
    try:
        block = sch.get(sch.get_sblock(names.GEMM))
    except Exception:
        return None, None
    code, batch = (block.annotations.get(key) for key in (CONFIG_ANNOTATION, BATCH_ANNOTATION))
    return (None if code is None else int(code)), (None if batch is None else int(batch))


def materialize_module(mod: tvm.IRModule, limits: TargetLimits = DEFAULT_LIMITS) -> tvm.IRModule:
    """:func:`materialize` every PrimFunc of ``mod``."""
    return tvm.IRModule(
        {gv: materialize(f, limits) if isinstance(f, tir.PrimFunc) else f for gv, f in mod.functions_items()}
    )


class CUDABmmaGemm(TunableRule):
    """PB dense on binary tensor cores: ``pb_gemm`` PrimFuncs whose weights are ``mma16x256``.

    Default: :func:`default_config`. Tunable template: one sampled config per candidate out of
    :func:`config_space` (tile rows per warp, warps per block, K split, loads in flight, column
    tiles per warp); one design space (no structural variants).
    """

    kernel = names.KernelKind.GEMM
    target_kind = "cuda"
    custom_rule = names.RULE_BMMA_GEMM

    def matches(self, func: tir.PrimFunc) -> bool:
        """See :meth:`ScheduleRule.matches`; only the ``mma16x256`` layout."""
        return super().matches(func) and str((func.attrs or {}).get(names.ATTR_LAYOUT)) == MMA_LAYOUT

    def apply(self, func: tir.PrimFunc) -> s_tir.Schedule:
        """The kernel with :func:`default_config`, as a schedule (see :meth:`ScheduleRule.apply`)."""
        sch = s_tir.Schedule(func, debug_mask=0)
        self.schedule(sch)
        return s_tir.Schedule(materialize(sch.mod["main"], self.limits), debug_mask=0)

    def schedule(self, sch: s_tir.Schedule) -> None:
        """Annotate the ``pb_gemm`` block with :func:`default_config` (:func:`materialize` builds
        it); with a symbolic batch, the two-launch kernel, and ``pb_dense_act`` with
        :data:`pbtvm.names.ATTR_IN_BLOCK_MAX_BATCH`, with :data:`DISPATCH_CODE` (a config per batch
        range, :func:`dispatch_configs`)."""
        func = sch.mod["main"]
        fmt, n_out, k_dim, _, batch = self._layer(func)
        if batch is None and (not _fused(func) or _in_block_max(func) is not None):
            code = DISPATCH_CODE
        else:
            code = encode(default_config(fmt, n_out, k_dim, batch or 1, _fused(func), self.limits))
        sch.annotate(sch.get_sblock(names.GEMM), CONFIG_ANNOTATION, code)
        _annotate_batch(sch, batch)

    def variants(self, func: tir.PrimFunc) -> list[dict]:
        """One design space: ``{"configs": [encoded config, ...]}``, every config of :func:`config_space`."""
        fmt, n_out, k_dim, _, batch = self._layer(func)
        return [{"configs": [encode(c) for c in config_space(fmt, n_out, k_dim, batch, _fused(func), self.limits)]}]

    def template(self, sch: s_tir.Schedule, variant: dict) -> None:
        """Annotate the ``pb_gemm`` block with a config sampled from ``variant["configs"]``."""
        block = sch.get_sblock(names.GEMM)
        codes = variant["configs"]
        code = sch.sample_categorical(codes, [1.0 / len(codes)] * len(codes))
        sch.annotate(block, CONFIG_ANNOTATION, code)
        _annotate_batch(sch, self._layer(sch.mod["main"])[4])

    def _layer(self, func: tir.PrimFunc) -> tuple[BitplaneFormat, int, int, bool, int | None]:
        """:func:`_layer`, after checking the target's warp size (the MMA fragments need 32 lanes).

        Raises
        ------
        ValueError
            If the target's warp size is not :data:`.cuda_bmma_kernel.MMA_LANES`.
        """
        if self.limits.warp_size != MMA_LANES:
            raise ValueError(f"mma.sync needs {MMA_LANES}-lane warps; the target has {self.limits.warp_size}")
        return _layer(func)


def _annotate_batch(sch: s_tir.Schedule, batch: int | None) -> None:
    """Record the static batch a config was chosen at (:data:`BATCH_ANNOTATION`); none if symbolic."""
    if batch is not None:
        sch.annotate(sch.get_sblock(names.GEMM), BATCH_ANNOTATION, batch)


class CUDABmmaDenseAct(CUDABmmaGemm):
    """``pb_dense_act`` in the ``mma16x256`` layout: one kernel, each block packs its batch rows
    first (a decoder's head, a layer of a static small batch); with a symbolic batch and
    :data:`pbtvm.names.ATTR_IN_BLOCK_MAX_BATCH` (``compile``'s dense layer) a dispatch: that kernel
    up to that batch, the ballot pack and the two-launch kernel above (:func:`dispatch_configs`;
    the crossover measured on an H200, :func:`one_launch_max_batch`).
    """

    kernel = names.KernelKind.DENSE_ACT


def build_candidate(mod: tvm.IRModule, target: tvm.target.Target, params: object) -> object:
    """MetaSchedule build function: materialize BMMA configs, then build (nvcc for CUDA).

    The build is :func:`pbtvm.schedules.tuning.measure.build_candidate` (MetaSchedule's
    ``default_build`` without its tensor-intrinsics import, which costs 30-40 s in every fresh
    builder worker).
    """
    from pbtvm.cuda import nvcc_compile_hook

    from .tuning.measure import build_candidate as plain_build

    mod = materialize_module(mod, TargetInfo.of(target).limits)
    if target.kind.name != "cuda":
        return plain_build(mod, target, params)
    with nvcc_compile_hook(str(target.export()["arch"])):
        return plain_build(mod, target, params)
