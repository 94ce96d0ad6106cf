"""AVX-512 LSTM step: both PB products of :mod:`pbtvm.ops.pb_vnni` and the cell update, one kernel.

The same step as :func:`pbtvm.ops.pb_lstm_cell` (input projection ``gx`` given, for one time step
or read at step ``t`` of a sequence) or :func:`pbtvm.ops.pb_lstm_cell_input` (the input
projection from ``x`` and a packed ``W_ih`` too, for decoding one token), computed the AVX-512
way:

1. ``h`` (and ``x``) quantized once per call into int8 codes, exactly as
   :func:`pbtvm.ops.act_quantize_pack` does (:func:`pbtvm.ops.vnni_rows.prepare_kernel`);
2. parallel tasks of :data:`UNITS_PER_TASK` hidden units: their ``4 * units`` gate rows (adjacent,
   the weights are unit-major) of ``W_hh`` (and ``W_ih``), in order with the GFNI block decode
   and VNNI dot products (:func:`pbtvm.ops.vnni_rows.block_rows`; at batch 1 four rows at a time
   where a row is one block of up to 4 planes; past one batch tile, where
   :func:`pbtvm.ops.vnni_batch.decodes_once`, each row decoded once for all activation rows,
   :func:`pbtvm.ops.vnni_batch.rows_decoded_once`), the float
   epilogue of :func:`pbtvm.ops.pb_dense`; then the task's cell updates
   (``pre = gates_h + gx`` in the TE kernel's order), vectorized, with the polynomial ``exp`` of
   :mod:`pbtvm.ops.vector_math` (libm's ``expf``, one call per element, took 14 of the 88 µs of
   the 2x650 LM's step on one core).

In the ``lut16x4`` layout (AVX2 table lookup) a task's gate rows are its 16-row tiles, by
lookup (:func:`pbtvm.ops.pb_lut.tile_rows`) up to :func:`pbtvm.ops.lut_decoded.lookup_max_rows`
activation rows, past them decoded once each (:func:`pbtvm.ops.lut_decoded.decoded_tiles`): the
2x650 step on AVX2 at 8-32 rows 0.93-1.02x the ``kNW`` step, where the lookups ran at
0.64-0.81x (W4/W8; BENCHMARKS.md, twenty-fourth session).

On CPUs with AMX-INT8 a task's gate rows are multiplied with the tile instructions from
:func:`pbtvm.ops.amx_gemm.amx_min_batch` activation rows (:func:`pbtvm.ops.amx_gemm.amx_rows`, the
legs' activation codes copied into tile order once per call).

The integer products equal the TE kernel's exactly and the gate pre-activations are made by the
same epilogue; ``h'`` and ``c'`` differ from the TE kernel's by the ``exp`` (at most 2.4e-7 on
the 650-unit step measured; the tests allow 2e-6). Replaces the popcount step
on CPUs with AVX-512 BW + VNNI (:class:`pbtvm.schedules.cpu_vnni.CPUVnniLstmCell`); formats the
AVX-512 GEMM cannot compute keep it.
"""

from __future__ import annotations

from .._tvm import tir
from ..bitplane import LUT_LAYOUT, BitplaneFormat
from ..bitplane.lut_layout import LUT_TILE_ROWS
from ..names import ATTR_AMX_MIN_BATCH, ATTR_CPU_FEATURES, ATTR_CPU_KERNEL, ATTR_INPUT_SIZE, KernelKind
from . import lut_decoded, pb_lut, pb_vnni
from .amx_gemm import activation_tiles, amx_problem, amx_rows, pack_activations, tiles_or_vectors
from .pb_vnni import CPU_KERNELS, MAX_BLOCK_BATCH_TILE, unsupported_reason
from .vector_math import sigmoid, tanh
from .vnni_batch import decodes_once, row_code_bytes, rows_decoded_once
from .vnni_rows import batch_tiles, block_codes, block_rows, block_slots, decode_scratch, prepare_kernel

__all__ = ["UNITS_PER_TASK", "pb_vnni_lstm_func"]

#: Hidden units per parallel task (their 4 gate rows in each leg). 2x650 LM W4 decoder on 2
#: threads: see BENCHMARKS.md (issue 14, fourth session).
UNITS_PER_TASK = 16
#: In the ``lut16x4`` layout: a task's gate rows as 16-row tiles.
TASK_TILES = UNITS_PER_TASK * 4 // LUT_TILE_ROWS


def pb_vnni_lstm_func(
    fmt: BitplaneFormat,
    hidden: int,
    batch: tir.Var,
    input_size: int | None = None,
    bias: bool = False,
    steps: tir.Var | None = None,
    gfni: bool = True,
    isa: str = "avx512",
    amx_min_batch: int | None = None,
) -> tir.PrimFunc:
    """The AVX-512 (or AVX2) LSTM step with the parameters of the TE step it replaces.

    Parameters
    ----------
    fmt : BitplaneFormat
        Must pass :func:`pbtvm.ops.pb_vnni.unsupported_reason` at K = ``hidden`` (and
        ``input_size``); in the ``lut16x4`` layout :func:`pbtvm.ops.pb_lut.unsupported_reason`
        (the gate rows by table lookup, :func:`pbtvm.ops.pb_lut.tile_rows`).
    hidden : int
        H.
    batch : tir.Var
        The symbolic batch dimension (reused so the signature matches the TE kernel's).
    input_size : int, optional
        I: the step computes its input projection, :func:`pbtvm.kernels.lstm_cell_input_func`'s
        ``(x [B, I], wp_ih, ws_ih[, bias], h, c, wp_hh, ws_hh, bitlayers) -> (h', c')``.
        None: :func:`pbtvm.kernels.lstm_cell_func`'s ``(gx [B, 4H], h, c, wp, w_scale,
        bitlayers) -> (h', c')``, ``gx`` in PyTorch gate order.
    bias : bool
        With ``input_size``: whether there is a bias parameter.
    steps : tir.Var, optional
        Without ``input_size``: ``gx`` is the whole sequence's, [T, B, 4H], read at an int64
        parameter ``t`` after ``w_scale`` (the time loop's step of
        :mod:`relay_passes.pb_lstm_lowering`).
    gfni : bool
        Decode whole 512-input blocks with GFNI (the CPU needs ``gfni``; AVX-512 and AVX-VNNI).
    isa : str
        A key of :data:`pbtvm.ops.pb_vnni.ISA_FEATURES`, as :func:`pbtvm.ops.pb_vnni.pb_vnni_func`.
    amx_min_batch : int, optional
        From this many activation rows on, the gate rows are multiplied with the AMX tile
        instructions (:func:`pbtvm.ops.amx_gemm.amx_rows`), as ``pb_vnni_func``'s; the PrimFunc
        then carries ``pbtvm.amx_min_batch``. None: no AMX loops.

    Returns
    -------
    tir.PrimFunc
        Attributes of a ``pb_lstm_cell`` kernel plus ``pbtvm.cpu_kernel``.
    """
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    from . import kernel_attrs

    lut = fmt.layout == LUT_LAYOUT  # the gate rows by table lookup (pbtvm.ops.pb_lut)
    for k_dim in (hidden,) if input_size is None else (hidden, input_size):
        why = pb_lut.unsupported_reason(fmt, k_dim) if lut else unsupported_reason(fmt, k_dim, isa)
        if why is not None:
            raise ValueError(f"pb_vnni_lstm_func cannot compute this step: {why}")
    rows = 4 * hidden
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name("main")
            if input_size is not None:
                x = T.arg("x", T.buffer((batch, input_size), "float32"))
                wp_ih = T.arg("wp_ih", T.buffer(fmt.weight_shape(rows, input_size), "uint32"))
                ws_ih = T.arg("ws_ih", T.buffer(fmt.scale_shape(rows), "float32"))
                bias_buf = T.arg("bias", T.buffer((rows,), "float32")) if bias else None
            else:
                gx_shape = (batch, rows) if steps is None else (steps, batch, rows)
                gx = T.arg("gx", T.buffer(gx_shape, "float32"))
            h = T.arg("h", T.buffer((batch, hidden), "float32"))
            c = T.arg("c", T.buffer((batch, hidden), "float32"))
            wp_hh = T.arg("wp_hh", T.buffer(fmt.weight_shape(rows, hidden), "uint32"))
            ws_hh = T.arg("ws_hh", T.buffer(fmt.scale_shape(rows), "float32"))
            step = T.arg("t", tir.Var("t", "int64")) if input_size is None and steps is not None else None
            layers = T.arg("bitlayers", tir.Var("bitlayers", "int64"))
            h_out = T.arg("h_out", T.buffer((batch, hidden), "float32"))
            c_out = T.arg("c_out", T.buffer((batch, hidden), "float32"))
            attrs = {
                **kernel_attrs(KernelKind.LSTM_CELL, fmt, hidden),
                "tirx.noalias": True,
                ATTR_CPU_KERNEL: pb_lut.CPU_KERNEL if lut else CPU_KERNELS[isa],
            }
            if input_size is not None:
                attrs[ATTR_INPUT_SIZE] = int(input_size)
            T.func_attr(attrs)

            # 1. activation codes of h (and x), once per call; each leg's gate rows go to a
            # workspace that the task's cell updates read
            def leg(k_dim, wp, out, w_scale, bias_, rows_in, decoded: bool):
                if decoded:  # many rows on lut16x4 weights: byte codes, each weight row decoded once
                    return lut_decoded.decoded_kernel(
                        T, fmt, rows, k_dim, batch, wp, out, w_scale, bias_, layers, x=rows_in
                    )
                if lut:
                    return pb_lut.prepare(T, fmt, rows, k_dim, batch, wp, out, w_scale, bias_, layers, x=rows_in)
                return prepare_kernel(
                    T, fmt, rows, k_dim, batch, wp, out, w_scale, bias_, layers, gfni, x=rows_in, isa=isa
                )

            # the lut16x4 step past its lookups' rows: the legs prepared in each branch (below)
            sizes = (hidden,) if input_size is None else (hidden, input_size)
            most = lut_decoded.lookup_max_rows(fmt, *sizes) if lut else None
            amx = False  # the AMX gate rows (set below where they apply)
            gates_h = T.alloc_buffer((batch, rows), "float32")
            legs = [] if most is not None else [leg(hidden, wp_hh, gates_h, ws_hh, None, h, False)]
            if input_size is not None:
                gates_x = T.alloc_buffer((batch, rows), "float32")
                if most is None:
                    legs.append(leg(input_size, wp_ih, gates_x, ws_ih, bias_buf, x, False))

                def gx_at(b, u, g):
                    return gates_x[b, u * 4 + g]
            elif steps is None:

                def gx_at(b, u, g):
                    return gx[b, g * hidden + u]
            else:

                def gx_at(b, u, g):
                    return gx[step, b, g * hidden + u]

            def prepared_legs(decoded: bool) -> list:
                """Both legs prepared here (inside a branch on the batch)."""
                legs = [leg(hidden, wp_hh, gates_h, ws_hh, None, h, decoded)]
                if input_size is not None:
                    legs.append(leg(input_size, wp_ih, gates_x, ws_ih, bias_buf, x, decoded))
                return legs

            # 2. tasks of hidden units: their gate rows, then their cell updates
            weight_bits = rows * (hidden + (input_size or 0)) * fmt.bits
            n_tasks = -(-hidden // UNITS_PER_TASK)
            serial = weight_bits < pb_vnni.SERIAL_WEIGHT_BITS

            def tasks(legs: list, packed: list | None, decoded: bool = False) -> None:
                """Every task; ``packed``: the legs' activation tiles (the AMX gate rows);
                ``decoded``: lut16x4 gate rows by :mod:`.lut_decoded` (legs from :func:`decoded_kernel`)."""
                # past one batch tile: a task's rows decoded once each (one part of a buffer per
                # task, made once per call: 1 KiB or more inside the parallel loop would be
                # allocated per task)
                once = packed is None and not lut
                row_bytes = max((row_code_bytes(kern) for kern in legs if once and decodes_once(kern)), default=0)
                parts = 1 if serial else n_tasks  # a part per parallel task; serial tasks take turns in one
                row_codes = T.alloc_buffer((parts * row_bytes,), "uint8") if row_bytes else None
                with T.serial(0, n_tasks) if serial else T.parallel(0, n_tasks) as task:
                    u0 = task * UNITS_PER_TASK
                    units = tir.min(UNITS_PER_TASK, hidden - u0) if hidden % UNITS_PER_TASK else UNITS_PER_TASK
                    if decoded:  # the task's rows are whole 16-row tiles (as below)
                        scratch = lut_decoded.tile_scratch(T, legs)
                        for kern in legs:
                            lut_decoded.decoded_tiles(T, kern, scratch, batch, u0 * 4 // LUT_TILE_ROWS, TASK_TILES)
                    elif lut:  # the task's rows are whole 16-row tiles (UNITS_PER_TASK * 4 is a multiple of 16)
                        regs = pb_lut.scratch(T)
                        for kern in legs:
                            pb_lut.tile_rows(T, kern, regs, u0 * 4 // LUT_TILE_ROWS, TASK_TILES, batch)
                    elif packed is not None:
                        amx_rows(T, legs, packed, u0 * 4, units * 4, batch)
                    else:
                        _gate_rows(T, legs, batch, u0 * 4, units * 4, row_codes, 0 if serial else task * row_bytes)
                    with T.serial(0, batch) as b:
                        with T.serial(0, units) as du:
                            u = u0 + du

                            def pre(g, b=b, u=u):
                                return gates_h[b, u * 4 + g] + gx_at(b, u, g)

                            c_next = sigmoid(pre(1)) * c[b, u] + sigmoid(pre(0)) * tanh(pre(2))
                            T.buffer_store(c_out, c_next, [b, u])
                            T.buffer_store(h_out, sigmoid(pre(3)) * tanh(c_out[b, u]), [b, u])

            if most is not None:  # many activation rows: each gate row decoded once (:mod:`.lut_decoded`)
                with T.If(batch > most):
                    with T.Then():
                        tasks(prepared_legs(decoded=True), None, decoded=True)
                    with T.Else():
                        tasks(prepared_legs(decoded=False), None)
            elif lut:
                tasks(legs, None)
            else:

                def amx_tasks() -> None:
                    """The legs' activation tiles once per call, then the tasks with the AMX gate rows."""
                    packed = [activation_tiles(T, kern, batch) for kern in legs]
                    for kern, buf in zip(legs, packed, strict=True):
                        pack_activations(T, kern, batch, buf, serial)
                    tasks(legs, packed)

                # many activation rows on a CPU with AMX: the tile instructions (:mod:`.amx_gemm`)
                amx = amx_min_batch is not None and all(amx_problem(kern) is None for kern in legs)
                tiles_or_vectors(T, batch, amx_min_batch if amx else None, amx_tasks, lambda: tasks(legs, None))
    func = ib.get()
    if lut:
        return func
    func = func.with_attr(ATTR_CPU_FEATURES, pb_vnni.kernel_features(isa, legs, amx))
    return func.with_attr(ATTR_AMX_MIN_BATCH, amx_min_batch) if amx else func


def _gate_rows(T, legs: list, batch, row0, n_rows, row_codes: tir.Buffer | None, at) -> None:
    """Rows ``row0 ..`` (``n_rows``) of every leg for every activation row.

    Legs run tiles of up to :data:`MAX_BLOCK_BATCH_TILE` activation rows (straight-line code per
    rows left). At batches past one tile a leg that :func:`~pbtvm.ops.vnni_batch.decodes_once`
    decodes each row once instead, into ``row_codes`` from ``at`` (this task's part), and multiplies
    it by every activation row. The 2x650 LM's step on AVX2 (``benchmarks/ab_kernels.py``,
    BENCHMARKS.md, 2026-12-02): W4 1.2x faster at batch 8 and 1.3-1.4x at 16, W8 1.2-1.4x / 1.4-1.6x,
    W3 1.0-1.2x / 1.2-1.4x; 5-13 % slower than the tile at batches 2-4, so both nests are built
    (the step's build takes 1-2 s longer: W4 about 2 -> 3.5 s).
    """
    tile = MAX_BLOCK_BATCH_TILE
    decode_scratch(T, legs, block_slots(tile), block_codes(legs))  # the legs take turns with one set of registers

    def tiles(kerns: list) -> None:
        def rows(b0, b_rows: int) -> None:
            for leg in kerns:
                block_rows(T, leg, row0, n_rows, b0, b_rows)

        batch_tiles(T, batch, tile, rows)

    once = [leg for leg in legs if decodes_once(leg)]
    if once:
        with T.If(batch > tile):
            with T.Then():
                for leg in once:
                    rows_decoded_once(T, leg, row_codes, at, row0, n_rows, batch, tile)
            with T.Else():
                tiles(once)
    tiled = [leg for leg in legs if not decodes_once(leg)]
    if tiled:
        tiles(tiled)
