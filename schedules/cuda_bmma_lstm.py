"""The LSTM step on binary tensor cores: one kernel per layer and step, weights in ``mma16x256``.

The same step as :func:`pbtvm.ops.pb_lstm_cell` (input projection ``gx`` given, for one time step
or read at step ``t`` of a sequence) or :func:`pbtvm.ops.pb_lstm_cell_input` (the input
projection from ``x`` and a packed ``W_ih`` too, for decoding one token), computed the way the
BMMA dense kernel (:mod:`.cuda_bmma_kernel`) computes a layer:

1. every block quantizes and packs its batch rows of ``h`` (and ``x``, each row of ``h``
   together with ``x``'s: one barrier chain for both) into shared memory with ``__ballot_sync``
   (:func:`.cuda_ballot_pack.row_pack`; the rows are read from L2);
2. its warps run the plane products of the block's gate rows of ``W_hh`` (and then ``W_ih``) on
   the tensor cores (:class:`.cuda_bmma_kernel.BMMALeg`, one leg per weight matrix), and each
   output's dense epilogue (:func:`pbtvm.ops.epilogue.dense_value`) leaves the gate
   pre-activations in shared memory, ``W_hh``'s plus ``W_ih``'s (with the bias);
3. the rows are unit-major (row ``4u + g``, :func:`pbtvm.ops.unit_major_rows`), so a block of
   ``16 * warps_m * tiles_m`` rows owns whole hidden units: a thread per (unit, batch row) adds
   ``gx`` (the forms that take it) and updates ``c`` and ``h``.

One launch per layer and step; the integer products equal the reference exactly and the gate
pre-activations are made by the same epilogue as the TE step's, in the same order.
"""

from __future__ import annotations

import dataclasses
import functools
import random

from tvm.script import tirx as T
from typing_extensions import override

from pbtvm import names
from pbtvm._tvm import s_tir, tir
from pbtvm.bitplane import MMA_LAYOUT, MMA_TILE_ROWS, BitplaneFormat, act_column_stride
from pbtvm.ops.epilogue import dense_value
from pbtvm.target import TargetLimits

from .cuda_bmma import REGISTER_BUDGET, default_config, knob_grid, shrink_until_fit
from .cuda_bmma_kernel import (
    DEFAULT_LIMITS,
    EARLY_LEG_REGISTERS,
    LAUNCH_MIN_BLOCKS,
    MMA_LANES,
    PREFETCH_MAX_BYTES,
    BMMAConfig,
    BMMALeg,
    config_problem,
    registers,
    row_column_tiles,
    shared_bytes,
    without_params,
)
from .cuda_pdl import declare_early_reads, let_next_start, wait_for_previous
from .rules import KnobRule, format_of, lstm_cell_operands

#: Gates per hidden unit (i, f, g, o): a unit's rows ``4u .. 4u + 3`` are adjacent (unit-major).
GATES = 4


def lstm_config_problem(
    fmt: BitplaneFormat, hidden: int, input_size: int | None, cfg: BMMAConfig, limits: TargetLimits = DEFAULT_LIMITS
) -> str | None:
    """Why ``cfg`` cannot serve this LSTM step (None if it can): each leg as a one-launch dense
    kernel (:func:`.cuda_bmma_kernel.config_problem`), then both legs' shared memory together."""
    legs = [hidden] if input_size is None else [hidden, input_size]
    for k_dim in legs:
        problem = config_problem(fmt, k_dim, cfg, True, limits)
        if problem:
            return problem
    block_batch = cfg.tiles_n * 8 // act_column_stride(fmt.act_bits)
    gates = 4 * block_batch * cfg.warps_m * cfg.tiles_m * MMA_TILE_ROWS  # the gate pre-activations
    shared = sum(shared_bytes(fmt, k_dim, cfg, True) for k_dim in legs) + gates
    if shared > limits.max_shared_memory_per_block:
        return f"the step needs {shared} bytes of shared memory (> {limits.max_shared_memory_per_block})"
    return None


def default_lstm_config(
    fmt: BitplaneFormat, hidden: int, input_size: int | None, batch: int = 1, limits: TargetLimits = DEFAULT_LIMITS
) -> BMMAConfig:
    """The config used without tuning: :func:`.cuda_bmma.default_config` of the recurrent leg as
    a one-launch layer (4H rows, K = H), with the K split and column tiles halved until both legs fit."""
    cfg = default_config(fmt, GATES * hidden, hidden, batch, fused_pack=True, limits=limits)
    problem = functools.partial(lstm_config_problem, fmt, hidden, input_size, limits=limits)
    return shrink_until_fit(cfg, problem, row_column_tiles(fmt.act_bits))


def bmma_lstm_kernel(
    fmt: BitplaneFormat,
    hidden: int,
    cfg: BMMAConfig,
    input_size: int | None = None,
    bias: bool = False,
    sequence: bool = False,
    limits: TargetLimits = DEFAULT_LIMITS,
) -> tir.PrimFunc:
    """The BMMA LSTM step for one layer shape and configuration.

    Parameters
    ----------
    fmt : BitplaneFormat
        ``layout`` must be ``"mma16x256"``.
    hidden : int
        H; the weights have ``4H`` unit-major rows.
    cfg : BMMAConfig
        Must pass :func:`lstm_config_problem`.
    input_size : int, optional
        I: the step computes its input projection too, the signature of
        :func:`pbtvm.kernels.lstm_cell_input_func`, ``(x [B, I], wp_ih, ws_ih[, bias], h, c,
        wp_hh, ws_hh, bitlayers, h', c')``. None: that of :func:`pbtvm.kernels.lstm_cell_func`,
        ``(gx [B, 4H], h, c, wp, w_scale, bitlayers, h', c')`` (``gx`` in PyTorch gate order).
    bias : bool
        With ``input_size``: whether there is a bias parameter (``[4H]``, unit-major).
    sequence : bool
        Without ``input_size``: ``gx`` is the whole sequence's, ``[T, B, 4H]``, read at an int64
        parameter ``t`` after ``w_scale`` (the time loop of :mod:`relay_passes.pb_lstm_lowering`).
    limits : TargetLimits
        The target's block limits.

    Returns
    -------
    tir.PrimFunc
        Already scheduled (thread-bound), symbolic batch (and T).

    Raises
    ------
    ValueError
        If the format is not the ``mma16x256`` layout or ``cfg`` does not fit.
    """
    problem = lstm_config_problem(fmt, hidden, input_size, cfg, limits)
    if problem:
        raise ValueError(
            f"BMMA config {cfg} does not fit the LSTM step {fmt.name} H={hidden} I={input_size}: {problem}"
            " (for a layer this large compile with layout='kNW', the CUDA-core step)"
        )
    rows, n_in, with_x = GATES * hidden, input_size or 1, input_size is not None
    leg_h = BMMALeg(fmt, rows, hidden, cfg, True, limits)
    if with_x:
        gates_of = _gates_of_both(leg_h, BMMALeg(fmt, rows, n_in, cfg, True, limits), rows, bias)
    else:
        gates_of = _gates_of(leg_h, rows)
    block_rows, block_batch, threads = leg_h.block_rows, leg_h.block_batch, cfg.threads
    start = let_next_start(leg_h.programmatic)  # gates_of waits (after its weight prefetch)
    units = block_rows // GATES
    cell_rounds = -(-(units * block_batch) // threads)

    def pre(gates, gx, gx_seq, t, bb, du, b, u, g):
        """Gate ``g`` of unit ``u`` before its activation: the block's gate value plus, in the forms
        that take it, the input projection ``gx`` (PyTorch order, row ``g * H + u``)."""
        value = gates[bb, du * GATES + g]
        if with_x:  # the input leg is in gates already
            return value
        return value + (gx_seq[t, b, g * hidden + u] if sequence else gx[b, g * hidden + u])

    @T.prim_func(private=True)
    def kernel(
        x_h: T.handle,
        wpi_h: T.handle,
        wsi_h: T.handle,
        b_h: T.handle,
        gx_h: T.handle,
        gxs_h: T.handle,
        h_h: T.handle,
        c_h: T.handle,
        wph_h: T.handle,
        wsh_h: T.handle,
        t: T.int64,
        bitlayers: T.int64,
        ho_h: T.handle,
        co_h: T.handle,
    ):
        T.func_attr({"tirx.noalias": True})
        batch = T.int64()
        steps = T.int64()
        x = T.match_buffer(x_h, (batch, n_in), "float32")
        wp_ih = T.match_buffer(wpi_h, fmt.weight_shape(rows, n_in), "uint32")
        ws_ih = T.match_buffer(wsi_h, fmt.scale_shape(rows), "float32")
        bias_buf = T.match_buffer(b_h, (rows,), "float32")
        gx = T.match_buffer(gx_h, (batch, rows), "float32")
        gx_seq = T.match_buffer(gxs_h, (steps, batch, rows), "float32")
        h = T.match_buffer(h_h, (batch, hidden), "float32")
        c = T.match_buffer(c_h, (batch, hidden), "float32")
        wp_hh = T.match_buffer(wph_h, fmt.weight_shape(rows, hidden), "uint32")
        ws_hh = T.match_buffer(wsh_h, fmt.scale_shape(rows), "float32")
        h_out = T.match_buffer(ho_h, (batch, hidden), "float32")
        c_out = T.match_buffer(co_h, (batch, hidden), "float32")
        for bx in T.thread_binding(leg_h.grid_x, thread="blockIdx.x"):
            for by in T.thread_binding(leg_h.grid_y(batch), thread="blockIdx.y"):
                for tz in T.thread_binding(cfg.k_split, thread="threadIdx.z"):
                    for ty in T.thread_binding(cfg.warps_m, thread="threadIdx.y"):
                        for tx in T.thread_binding(MMA_LANES, thread="threadIdx.x"):
                            with T.attr(0, LAUNCH_MIN_BLOCKS, 1):  # see LAUNCH_MIN_BLOCKS
                                gates = T.alloc_shared((block_batch, block_rows), "float32")
                                gate = T.alloc_local((GATES,), "float32")
                                start()
                                if with_x:
                                    gates_of(
                                        h, x, wp_hh, ws_hh, wp_ih, ws_ih, bias_buf, batch, bitlayers,
                                        bx, by, tz, ty, tx, gates,
                                    )  # fmt: skip
                                else:
                                    gates_of(h, wp_hh, ws_hh, batch, bitlayers, bx, by, tz, ty, tx, gates)
                                T.tvm_storage_sync("shared")
                                # the cell update: a thread per (hidden unit, batch row) of the block
                                for o in range(cell_rounds):
                                    idx = T.meta_var(o * threads + (tz * cfg.warps_m + ty) * MMA_LANES + tx)
                                    du = T.meta_var(idx % units)
                                    bb = T.meta_var(idx // units)
                                    u = T.meta_var(bx * units + du)
                                    b = T.meta_var(by * block_batch + bb)
                                    if idx < units * block_batch and u < hidden and b < batch:
                                        for g in T.unroll(GATES):  # i, f, g, o
                                            gate[g] = pre(gates, gx, gx_seq, t, bb, du, b, u, g)
                                        gate[1] = T.sigmoid(gate[1]) * c[b, u] + T.sigmoid(gate[0]) * T.tanh(gate[2])
                                        c_out[b, u] = gate[1]
                                        h_out[b, u] = T.sigmoid(gate[3]) * T.tanh(gate[1])

    # Parameters: x, wp_ih, ws_ih, bias, gx, gx_seq, h, c, wp_hh, ws_hh, t, bitlayers, h', c'.
    if with_x:
        unused = (4, 5, 10) if bias else (3, 4, 5, 10)
    else:
        unused = (0, 1, 2, 3, 4) if sequence else (0, 1, 2, 3, 5, 10)
    # the weight planes are prefetched before griddepcontrol.wait (BMMALeg.prefetch)
    return declare_early_reads(without_params(kernel, unused), ["wp_ih"] * with_x + ["wp_hh"], leg_h.programmatic)


def _epilogue_of(leg: BMMALeg, rows: int, bias: bool, add: bool):
    """A TVMScript macro: the dense epilogue of one leg's products into shared ``gates``.

    ``epilogue(part, row_scale, row_code, w_scale, bias_buf, bitlayers, bx, tz, ty, tx, total,
    gates)``: after :meth:`.cuda_bmma_kernel.BMMALeg.product` into ``part`` (and a barrier), a
    thread per (row, batch row) applies the dense epilogue (``bias_buf`` when ``bias``), storing
    the value in ``gates[batch row, row]`` or, with ``add``, adding it to the value the same
    thread stored there for the other leg (``W_hh``'s product plus ``W_ih``'s, the TE step's
    order). ``total`` is a one-element local of the leg's accumulator dtype.
    """
    fmt, cfg = leg.fmt, leg.cfg
    threads, block_rows, block_batch = cfg.threads, leg.block_rows, leg.block_batch
    out_rounds = -(-(block_rows * block_batch) // threads)
    column_total = leg.column_total()

    def value(gates, bb, row, epilogue):
        return gates[bb, row] + epilogue if add else epilogue

    @T.macro
    def epilogue(part, row_scale, row_code, w_scale, bias_buf, bitlayers, bx, tz, ty, tx, total, gates):
        for o in range(out_rounds):  # a thread per (row, batch row), the same in both legs
            idx = T.meta_var(o * threads + (tz * cfg.warps_m + ty) * MMA_LANES + tx)
            n_glob = T.meta_var(bx * block_rows + idx % block_rows)
            if idx < block_rows * block_batch and n_glob < rows:
                column_total(part, total, idx)
                gates[idx // block_rows, idx % block_rows] = value(
                    gates, idx // block_rows, idx % block_rows,
                    dense_value(
                        fmt, row_scale[idx // block_rows], row_code[idx // block_rows], total[0],
                        w_scale, n_glob, bias_buf if bias else None, bitlayers,
                    ),
                )  # fmt: skip

    return epilogue


def _gates_of(leg: BMMALeg, rows: int):
    """A TVMScript macro: ``W_hh``'s gate values for the block, into shared ``gates`` (the forms
    that take ``gx``).

    ``gates_of(h, wp, w_scale, batch, bitlayers, bx, by, tz, ty, tx, gates)``: the block packs
    its batch rows of ``h`` (float32 [B, K]) with ballots, runs the plane products of its
    ``block_rows`` rows of ``wp`` on the tensor cores, and stores each output's dense epilogue in
    ``gates[batch row, row]``.
    """
    cfg, acc_t = leg.cfg, leg.acc_dtype
    # the first K steps' weights in flight during the pack (see _gates_of_both)
    packed_product, shapes = leg.packed_product(leg.early_steps(EARLY_LEG_REGISTERS)), leg.packed_shapes()
    epilogue = _epilogue_of(leg, rows, bias=False, add=False)

    @T.macro
    def gates_of(h, wp, w_scale, batch, bitlayers, bx, by, tz, ty, tx, gates):
        part = T.alloc_shared(leg.part_shape, acc_t)
        packed = T.alloc_shared(shapes["packed"], "uint32")
        row_scale = T.alloc_shared(shapes["row_scale"], "float32")
        row_code = T.alloc_shared(shapes["row_code"], acc_t)
        total = T.alloc_local((1,), acc_t)
        acc = T.alloc_local((leg.frag,), acc_t)
        dot = T.alloc_local((leg.frag,), "int32")
        af = T.alloc_local((cfg.loads * cfg.tiles_m,), "uint32x4")
        bf = T.alloc_local(*leg.b_fragments)
        packed_product(
            h, wp, bitlayers, batch, bx, by, tz, ty, tx, acc, dot, af, bf, part, packed, row_scale, row_code, total
        )
        T.tvm_storage_sync("shared")
        epilogue(part, row_scale, row_code, w_scale, None, bitlayers, bx, tz, ty, tx, total, gates)

    return gates_of


def prefetch_budgets(leg_h: BMMALeg, leg_x: BMMALeg) -> tuple[int, int]:
    """The step's :data:`.cuda_bmma_kernel.PREFETCH_MAX_BYTES` split between its two weight
    matrices by their sizes: the kernel's blocks prefetch that much in all, as a dense layer's do
    (with the whole budget each, one step kernel could prefetch 48 MB: most of an H200's 60 MB L2,
    evicting its first prefetches before they are read)."""
    total = leg_h.weight_bytes + leg_x.weight_bytes
    share_h = PREFETCH_MAX_BYTES * leg_h.weight_bytes // total
    return share_h, PREFETCH_MAX_BYTES - share_h


def _gates_of_both(leg_h: BMMALeg, leg_x: BMMALeg, rows: int, bias: bool):
    """A TVMScript macro: both weight matrices' gate values for the block, into shared ``gates``
    (the step with its input projection).

    ``gates_of(h, x, wp_hh, ws_hh, wp_ih, ws_ih, bias_buf, batch, bitlayers, bx, by, tz, ty, tx,
    gates)``: the block packs each batch row of ``h`` and of ``x`` together, one barrier chain for
    both rows (:meth:`.cuda_bmma_kernel.BMMALeg.pack_phases`: both rows' L2 loads in flight at
    once), then runs the plane products of ``W_hh`` and of ``W_ih``, then the epilogues: ``gates``
    holds ``W_hh``'s value plus ``W_ih``'s (with the bias when ``bias``), as :func:`_gates_of`
    twice. One leg after the other (pack, products, epilogue, then the next leg), the two 650-wide
    rows of the W4A8 decoder's step were read one after the other, each behind its own barriers.
    """
    cfg, acc_h, acc_x = leg_h.cfg, leg_h.acc_dtype, leg_x.acc_dtype
    warps, block_batch = cfg.threads // MMA_LANES, leg_h.block_batch
    ph, px = leg_h.pack_phases(), leg_x.pack_phases()
    early_h, early_x = leg_h.early_steps(EARLY_LEG_REGISTERS), leg_x.early_steps(EARLY_LEG_REGISTERS)
    early = early_h > 0  # the same config and format: leg_x's is > 0 too
    first_h, product_h = leg_h.product(early_h) if early else (None, leg_h.product())
    first_x, product_x = leg_x.product(early_x) if early else (None, leg_x.product())
    budget_h, budget_x = prefetch_budgets(leg_h, leg_x)
    prefetch_h, prefetch_x = leg_h.prefetch(budget_h), leg_x.prefetch(budget_x)
    wait = wait_for_previous(leg_h.programmatic)
    shapes_h, shapes_x = leg_h.packed_shapes(), leg_x.packed_shapes()
    epilogue_h = _epilogue_of(leg_h, rows, bias=False, add=False)
    epilogue_x = _epilogue_of(leg_x, rows, bias, add=True)

    @T.macro
    def pack_both(h, x, row, bb, warp, tx, packed_h, packed_x, scale_h, scale_x, code_h, code_x):
        red_h = T.alloc_shared((warps,), "float32")
        red_x = T.alloc_shared((warps,), "float32")
        sums_h = T.alloc_shared((warps,), acc_h)
        sums_x = T.alloc_shared((warps,), acc_x)
        xv_h = T.alloc_local((ph.held,), "float32")
        xv_x = T.alloc_local((px.held,), "float32")
        amax_h = T.alloc_local((1,), "float32")
        amax_x = T.alloc_local((1,), "float32")
        total_h = T.alloc_local((1,), acc_h)
        total_x = T.alloc_local((1,), acc_x)
        best = T.alloc_local((1,), "float32")
        code = T.alloc_local((1,), "int32")
        vote = T.alloc_local((2,), "uint32")
        ph.load(h, row, warp, tx, xv_h)
        px.load(x, row, warp, tx, xv_x)
        ph.warp_max(h, row, warp, tx, xv_h, red_h, best)
        px.warp_max(x, row, warp, tx, xv_x, red_x, best)
        T.tvm_storage_sync("shared")
        ph.codes(h, row, packed_h, bb, warp, tx, xv_h, red_h, sums_h, amax_h, best, total_h, code, vote)
        px.codes(x, row, packed_x, bb, warp, tx, xv_x, red_x, sums_x, amax_x, best, total_x, code, vote)
        T.tvm_storage_sync("shared")
        ph.finish(bb, scale_h, code_h, warp, tx, red_h, sums_h, amax_h, total_h)
        px.finish(bb, scale_x, code_x, warp, tx, red_x, sums_x, amax_x, total_x)
        T.tvm_storage_sync("shared")  # the packed rows are read, red and sums reused by the next row

    @T.macro
    def pack_rows(h, x, batch, by, tz, ty, tx, packed_h, packed_x, scale_h, scale_x, code_h, code_x):
        for bb in range(block_batch):
            if by * block_batch + bb < batch:  # block-uniform
                pack_both(
                    h, x, by * block_batch + bb, bb, tz * cfg.warps_m + ty, tx,
                    packed_h, packed_x, scale_h, scale_x, code_h, code_x,
                )  # fmt: skip

    @T.macro
    def gates_of(h, x, wp_hh, ws_hh, wp_ih, ws_ih, bias_buf, batch, bitlayers, bx, by, tz, ty, tx, gates):
        part_h = T.alloc_shared(leg_h.part_shape, acc_h)
        part_x = T.alloc_shared(leg_x.part_shape, acc_x)
        packed_h = T.alloc_shared(shapes_h["packed"], "uint32")
        packed_x = T.alloc_shared(shapes_x["packed"], "uint32")
        scale_h = T.alloc_shared(shapes_h["row_scale"], "float32")
        scale_x = T.alloc_shared(shapes_x["row_scale"], "float32")
        code_h = T.alloc_shared(shapes_h["row_code"], acc_h)
        code_x = T.alloc_shared(shapes_x["row_code"], acc_x)
        total_h = T.alloc_local((1,), acc_h)
        total_x = T.alloc_local((1,), acc_x)
        acc_h_f = T.alloc_local((leg_h.frag,), acc_h)
        acc_x_f = T.alloc_local((leg_x.frag,), acc_x)
        dot = T.alloc_local((leg_h.frag,), "int32")
        af = T.alloc_local((cfg.loads * cfg.tiles_m,), "uint32x4")
        bf = T.alloc_local(*leg_h.b_fragments)
        prefetch_h(wp_hh, bitlayers, bx, tz, ty, tx)
        prefetch_x(wp_ih, bitlayers, bx, tz, ty, tx)
        if early:
            # Both legs' first K steps of weights (every used plane) are loaded before the pack, so
            # that its DRAM latency overlaps the pack's (the pack's registers are free again
            # before the products): otherwise the weights were requested only after the pack.
            af0_h = T.alloc_local((early_h * leg_h.step_fragments,), "uint32x4")
            af0_x = T.alloc_local((early_x * leg_x.step_fragments,), "uint32x4")
            wait()  # before it only the prefetch (cuda_pdl)
            first_h(wp_hh, bitlayers, bx, tz, ty, tx, af0_h)
            first_x(wp_ih, bitlayers, bx, tz, ty, tx, af0_x)
            pack_rows(h, x, batch, by, tz, ty, tx, packed_h, packed_x, scale_h, scale_x, code_h, code_x)
            product_h(packed_h, wp_hh, bitlayers, batch, bx, by, tz, ty, tx, acc_h_f, dot, af, bf, part_h, af0_h)
            product_x(packed_x, wp_ih, bitlayers, batch, bx, by, tz, ty, tx, acc_x_f, dot, af, bf, part_x, af0_x)
        else:
            wait()
            pack_rows(h, x, batch, by, tz, ty, tx, packed_h, packed_x, scale_h, scale_x, code_h, code_x)
            product_h(packed_h, wp_hh, bitlayers, batch, bx, by, tz, ty, tx, acc_h_f, dot, af, bf, part_h)
            product_x(packed_x, wp_ih, bitlayers, batch, bx, by, tz, ty, tx, acc_x_f, dot, af, bf, part_x)
        T.tvm_storage_sync("shared")
        epilogue_h(part_h, scale_h, code_h, ws_hh, bias_buf, bitlayers, bx, tz, ty, tx, total_h, gates)
        # W_hh's value goes through shared memory before W_ih's is added, as with one leg after the
        # other: the float sum is rounded the same way (no multiply-add across the two values)
        T.tvm_storage_sync("shared")
        epilogue_x(part_x, scale_x, code_x, ws_ih, bias_buf, bitlayers, bx, tz, ty, tx, total_x, gates)

    return gates_of


def lstm_kernel_for(
    func: tir.PrimFunc, cfg: BMMAConfig | None = None, limits: TargetLimits = DEFAULT_LIMITS
) -> tir.PrimFunc:
    """The BMMA LSTM step with ``func``'s parameters and attributes, config ``cfg`` (default:
    :func:`default_lstm_config` at ``func``'s static batch, else batch 1).

    Raises
    ------
    ValueError
        If ``func`` is not a ``pb_lstm_cell`` PrimFunc of the ``mma16x256`` layout from
        :mod:`pbtvm.kernels` / the LSTM time loop, or ``cfg`` does not fit it.
    """
    fmt, hidden, (batch, input_size, bias, steps) = _step_of(func)
    static_batch = int(batch) if isinstance(batch, tir.IntImm) else 1
    cfg = cfg or default_lstm_config(fmt, hidden, input_size, static_batch, limits)
    kernel = bmma_lstm_kernel(fmt, hidden, cfg, input_size, bias, steps is not None, limits)
    return kernel.with_attrs(dict(func.attrs))


def lstm_config_space(
    fmt: BitplaneFormat,
    hidden: int,
    input_size: int | None,
    batch: int | None = 1,
    limits: TargetLimits = DEFAULT_LIMITS,
) -> list[BMMAConfig]:
    """The configs a tuning run measures for an LSTM step: the default first, then every valid
    config of the dense kernel's knob values (:data:`.cuda_bmma.TILES_M` ...) within the register
    budget, in a fixed pseudo-random order (a run of ``trials`` measures a spread of them).

    ``batch`` (static, when known) caps the column tiles at those the batch needs; the default is
    the one for ``batch`` (or 1).
    """
    default = default_lstm_config(fmt, hidden, input_size, batch or 1, limits)
    row_tiles = fmt.weight_shape(GATES * hidden, hidden)[1]
    k_tiles = min(fmt.weight_shape(1, k)[2] for k in ([hidden] if input_size is None else [hidden, input_size]))
    out = [
        cfg
        for cfg in knob_grid(fmt, row_tiles, k_tiles, batch)
        if cfg != default
        and not lstm_config_problem(fmt, hidden, input_size, cfg, limits)
        and registers(fmt, hidden, cfg) <= REGISTER_BUDGET
    ]
    random.Random(0).shuffle(out)
    return [default, *out]


def _step_of(func: tir.PrimFunc) -> tuple[BitplaneFormat, int, tuple]:
    """(format, H, :func:`.rules.lstm_cell_operands`) of a ``pb_lstm_cell`` PrimFunc in the mma layout."""
    fmt, operands = format_of(func), lstm_cell_operands(func)
    if fmt is None or operands is None or fmt.layout != MMA_LAYOUT:
        raise ValueError("the BMMA LSTM step needs a pb_lstm_cell PrimFunc in the mma16x256 layout")
    return fmt, int(func.attrs[names.ATTR_K]), operands


class CUDABmmaLstmCell(KnobRule):
    """``pb_lstm_cell`` in the ``mma16x256`` layout: :func:`bmma_lstm_kernel`, one launch per step.

    Replaces the CUDA-core step (:class:`.cuda.CUDALSTMCell`) for every form of the step: ``gx``
    given, ``gx`` of a sequence read at step ``t``, and the input projection inside. Its knobs
    are the five of :class:`.cuda_bmma_kernel.BMMAConfig`; ``pbtvm.tune`` measures
    :func:`lstm_config_space` and ``compile`` replays the fastest from the log.
    """

    kernel = names.KernelKind.LSTM_CELL
    target_kind = "cuda"
    label = "bmma"

    def matches(self, func: tir.PrimFunc) -> bool:
        """See :meth:`ScheduleRule.matches`; only the ``mma16x256`` layout."""
        return super().matches(func) and str((func.attrs or {}).get(names.ATTR_LAYOUT)) == MMA_LAYOUT

    def apply(self, func: tir.PrimFunc) -> s_tir.Schedule:
        """The kernel with the default config, as a schedule (see :meth:`ScheduleRule.apply`)."""
        return s_tir.Schedule(self.kernel_with(func, None), debug_mask=0)

    @override
    def knob_settings(self, func: tir.PrimFunc) -> list[dict]:
        """See :meth:`KnobRule.knob_settings`: :func:`lstm_config_space` at ``func``'s static
        batch (else 1), as dicts of the config's fields."""
        fmt, hidden, (batch, input_size, *_) = _step_of(func)
        static_batch = int(batch) if isinstance(batch, tir.IntImm) else None
        space = lstm_config_space(fmt, hidden, input_size, static_batch, self.limits)
        return [dataclasses.asdict(cfg) for cfg in space]

    def kernel_with(self, func: tir.PrimFunc, knobs: dict | None) -> tir.PrimFunc:
        """See :meth:`KnobRule.kernel_with` (``None``: the default config).

        Raises
        ------
        ValueError
            If the target's warp size is not :data:`.cuda_bmma_kernel.MMA_LANES`.
        """
        if self.limits.warp_size != MMA_LANES:
            raise ValueError(f"mma.sync needs {MMA_LANES}-lane warps; the target has {self.limits.warp_size}")
        # a logged setting also carries its timings ("us", "default_us", "search_us")
        cfg = (
            None
            if knobs is None
            else BMMAConfig(**{f.name: int(knobs[f.name]) for f in dataclasses.fields(BMMAConfig)})
        )
        return lstm_kernel_for(func, cfg, self.limits)
