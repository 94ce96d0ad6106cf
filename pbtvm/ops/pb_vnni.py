"""AVX-512 PB GEMM: weight planes decoded to byte codes in registers, then VNNI int8 dot products.

The same exact integer product as :func:`pbtvm.ops.pb_int_product` on the same ``kNW`` planes,
computed another way. Each weight of a row becomes one byte per input, ``2^(8-k) u / |c|`` with
``u`` the *unsigned* code of the kept planes ``i < bitlayers`` (two's complement: sign plane
inverted, ``u = q + 2^(k-1)``; bipolar: ``u = 2 b``); then

* one ``vpdpbusd`` per 64 inputs and activation row multiplies those bytes (uint8) by the
  activation codes (int8, made once per call from the float rows or the packed planes) into 16
  int32 lanes, exactly;
* at the end ``acc = (sum(lanes) >> (8-k)) |c| - 2^(k-1) sum_k x[k]`` (two's complement), which is
  ``sum_{i<L} c_i sum_k b_i[k] x[k]``, the PB product.

Whole blocks of 512 inputs are decoded with GFNI bit transposes (:mod:`pbtvm.ops.gfni_decode`:
one 64-byte load per kept plane, ~3 instructions per 64 W4 weights); the chunks after the last
block, and every chunk on CPUs without GFNI, with one ``kmovq`` lane mask and one masked byte add
per plane. With whole blocks the output rows are streamed in order
(:func:`pbtvm.ops.vnni_rows.block_rows`: one after another, or four at a time for one activation row when a row is a
single block), so every plane is read front to back; below one block a tile's rows are decoded
side by side chunk by chunk (independent accumulator chains). Rows of whole blocks of 3 bits or
more are decoded once for all activation rows (:func:`pbtvm.ops.vnni_batch.rows_decoded_once`):
without GFNI from batch 2, with GFNI past one batch tile (on AVX-512 only rows with chunks after
their blocks, :func:`pbtvm.ops.vnni_batch.decodes_once`). On CPUs with AMX-INT8 (Sapphire Rapids
and newer Xeons) batches from :func:`pbtvm.ops.amx_gemm.amx_min_batch` rows multiply 16 x 16 x 64
per ``tdpbusd`` instead (:mod:`pbtvm.ops.amx_gemm`). It needs ``bits <= 8``, ``act_bits <= 8``, an int32
accumulator and a CPU with AVX-512 BW and VNNI, AVX-VNNI or AVX2 (:func:`unsupported_reason`,
:data:`ISA_FEATURES`); the popcount kernel
serves everything else.
"""

from __future__ import annotations

from .._tvm import tir
from ..bitplane import BitplaneFormat
from ..names import ATTR_AMX_MIN_BATCH, ATTR_CPU_FEATURES, ATTR_CPU_KERNEL, KernelKind
from .amx_gemm import AMX_FEATURES, amx_gemm, amx_problem, tiles_or_vectors
from .gfni_decode import BLOCK_WORDS
from .gfni_decode import CPU_FEATURES as GFNI
from .vnni_batch import decode_once_past, decodes_once, row_code_bytes, rows_decoded_once
from .vnni_bytes import CHUNK
from .vnni_rows import (
    Kernel,
    batch_tiles,
    block_codes,
    block_rows,
    block_slots,
    decode_chunk,
    decode_scratch,
    dot,
    lane_bound,
    prepare_kernel,
    store,
)

__all__ = [
    "CPU_FEATURES",
    "CHUNK",
    "ISA_FEATURES",
    "cpu_isa",
    "kernel_features",
    "missing_features",
    "pb_vnni_func",
    "unsupported_reason",
    "target_supports",
]

#: LLVM CPU features the kernel's instructions need.
CPU_FEATURES = ("avx512bw", "avx512vnni")
#: Instruction sets the kernel is built for, best first, and the LLVM CPU features each needs:
#: ``vpdpbusd`` on zmm registers; AVX-VNNI's ``vpdpbusd`` on ymm registers (Intel client cores
#: from Alder Lake on: no AVX-512, but the dot product in one instruction, exact in int32); or
#: AVX2's ``vpmaddubsw`` + ``vpmaddwd`` on ymm registers (about five times the instructions per
#: 64 weights; AMD Zen 2/3, older Intel). The ymm ones share the dword-broadcast decode and 16
#: registers (:data:`~pbtvm.ops.vnni_rows.YMM_ISAS`); AVX-VNNI CPUs also have GFNI, whose block
#: decode then runs on ymm (two halves per block).
ISA_FEATURES = {"avx512": CPU_FEATURES, "avxvnni": ("avx2", "avxvnni"), "avx2": ("avx2",)}
#: Value of the ``pbtvm.cpu_kernel`` attribute on a PrimFunc replaced by this kernel, per ISA.
CPU_KERNELS = {"avx512": "avx512_vnni", "avxvnni": "avx2_vnni", "avx2": "avx2_madd"}
#: Activation rows per pass over a row's blocks: 8 measured no faster than 4 (4096x4096 W4
#: batch 8) and made TVM's CompactBufferAllocation pass take minutes (batch tile 6: 27 s, 8:
#: 194 s, against 1 s at 4).
MAX_BLOCK_BATCH_TILE = 4
#: Output rows per parallel task when K has whole blocks (rows are then streamed by
#: :func:`~.vnni_rows.block_rows`, so ``row_tile`` does not apply): 4096x4096 W1 batch 1 on 2 threads 177 µs at 2 rows per task,
#: 89-94 µs at 32-128; W4 batch 8 736 vs 568-629 µs.
BLOCK_TASK_ROWS = 64
#: int32x16 accumulators a tile may hold: 24 of the 32 zmm registers (the rest decode); on AVX2
#: each takes two of the 16 ymm registers.
MAX_ACCUMULATORS = 24
MAX_ACCUMULATORS_PER_ISA = {"avx512": MAX_ACCUMULATORS, "avxvnni": 5, "avx2": 5}
#: Layers with fewer weight bits (N * K * bits, 1 MiB of planes) run their row tiles serially:
#: waking TVM's thread pool cost more than it gave below this on the 2-vCPU EPYC (MNIST MLP W4
#: batch 1: 55 µs serial vs 77 µs; 1024² W4 69 vs 84 µs; 2048² W4 297 vs 267 µs, BENCHMARKS.md,
#: issue 19). Machine-dependent: more real cores would move it down.
SERIAL_WEIGHT_BITS = 1 << 23


def unsupported_reason(fmt: BitplaneFormat, k_dim: int, isa: str = "avx512") -> str | None:
    """Why this kernel cannot compute ``fmt`` at this K on ``isa`` (None when it can)."""
    if isa not in ISA_FEATURES:
        raise ValueError(f"unknown instruction set {isa!r}: one of {', '.join(ISA_FEATURES)}")
    if fmt.bits > 8 or fmt.act_bits > 8:
        return f"{fmt.name}: weights and activations must be <= 8 bits for int8 dot products"
    if fmt.layout not in ("kNW", "NkW"):
        return f"the {fmt.layout} weight layout is read by other kernels; the byte-code kernel reads kNW or NkW"
    # |sum_k x u| <= K (padded to 64) * (2^k - 1) * |most negative code| must fit the int32 lanes.
    if lane_bound(fmt, k_dim, scaled=False) >= 2**31 or fmt.accumulator_dtype(k_dim) != "int32":
        return f"K={k_dim} is too large for int32 accumulation at {fmt.name}"
    return None


def tile_problem(fmt: BitplaneFormat, k_dim: int, row_tile: int, batch_tile: int, isa: str = "avx512") -> str | None:
    """Why ``(row_tile, batch_tile)`` does not fit the kernel at this K (None when it does).

    The accumulators the inner loop holds, ``batch_tile`` times the output rows side by side (the
    whole ``row_tile`` below one 512-input block, one row with whole blocks), must fit the
    registers (:data:`MAX_ACCUMULATORS_PER_ISA`).
    """
    most = MAX_ACCUMULATORS_PER_ISA[isa]
    if isinstance(row_tile, bool) or isinstance(batch_tile, bool) or row_tile < 1 or batch_tile < 1:
        return f"row_tile and batch_tile must be >= 1, got {row_tile} and {batch_tile}"
    held_rows = 1 if fmt.words(k_dim) >= BLOCK_WORDS else row_tile
    if batch_tile * held_rows > most:
        return (
            f"batch_tile {batch_tile} x {held_rows} row(s) side by side need {batch_tile * held_rows} "
            f"accumulators at K={k_dim}, more than {most} ({isa})"
        )
    return None


def target_supports(target, features: tuple[str, ...] = CPU_FEATURES) -> bool:
    """Whether an LLVM target's CPU (its ``mtriple``, ``mcpu`` and ``mattr``) has ``features``
    (default :data:`CPU_FEATURES`, what the kernel needs; the GFNI block decode also needs
    :data:`pbtvm.ops.gfni_decode.CPU_FEATURES`)."""
    from tvm.target import codegen

    if target is None or target.kind.name != "llvm":
        return False
    try:
        have = codegen.llvm_get_cpu_features(target)
    except Exception:
        return False
    return all(f in have for f in features)


def kernel_features(isa: str, kerns: list, amx: bool) -> list[str]:
    """LLVM CPU features a byte-code kernel on ``isa`` needs: its instruction set's, GFNI where
    one of ``kerns`` (:class:`~pbtvm.ops.vnni_rows.Kernel`) decodes blocks with it, AMX with the
    tile loops. Kernels carry them as ``pbtvm.cpu_features`` (:func:`missing_features`)."""
    gfni = GFNI if any(kern.gfni for kern in kerns) else ()
    return [*ISA_FEATURES[isa], *gfni, *(AMX_FEATURES if amx else ())]


def missing_features(func: tir.PrimFunc, target) -> list[str]:
    """LLVM CPU features a byte-code kernel ``func`` uses (its ``pbtvm.cpu_features``, else those
    of its ``pbtvm.cpu_kernel``) that ``target``'s CPU, or its host's, lacks: LLVM would abort the
    process on such instructions (none for other PrimFuncs)."""
    from . import pb_lut

    attrs = func.attrs or {}
    if ATTR_CPU_FEATURES in attrs:
        need = [str(f) for f in attrs[ATTR_CPU_FEATURES]]
    else:
        kernels = {kernel: ISA_FEATURES[isa] for isa, kernel in CPU_KERNELS.items()}
        kernels[pb_lut.CPU_KERNEL] = pb_lut.CPU_FEATURES
        need = list(kernels.get(str(attrs.get(ATTR_CPU_KERNEL, "")), ()))
    builders = [target] + ([target.host] if getattr(target, "host", None) is not None else [])
    return [f for f in need if not all(target_supports(t, (f,)) for t in builders if t.kind.name == "llvm")]


def cpu_isa(target) -> str | None:
    """The best instruction set of :data:`ISA_FEATURES` an LLVM target's CPU has (None: neither)."""
    return next((isa for isa, features in ISA_FEATURES.items() if target_supports(target, features)), None)


def pb_vnni_func(
    fmt: BitplaneFormat,
    n_out: int,
    k_dim: int,
    batch: tir.Var,
    dense: bool,
    bias: bool = False,
    batch_tile: int = 4,
    row_tile: int = 4,
    float_input: bool = False,
    single_row_tile: int | None = None,
    gfni: bool = True,
    isa: str = "avx512",
    amx_min_batch: int | None = None,
) -> tir.PrimFunc:
    """The AVX-512 (or AVX2) PB kernel with the same parameters as the TE kernel it replaces.

    Parameters
    ----------
    fmt : BitplaneFormat
        Must pass :func:`unsupported_reason`.
    n_out, k_dim : int
        N and unpadded K.
    batch : tir.Var
        The symbolic batch dimension (reused so the signature matches the TE kernel's).
    dense : bool
        True: ``(xp, x_scale, rowsum, wp, w_scale[, bias], bitlayers) -> y`` float32 [B, N],
        the float arithmetic of :func:`pbtvm.ops.pb_dense`. False:
        ``(xp, rowsum, wp, bitlayers) -> acc`` int32 [B, N], :func:`pbtvm.ops.pb_int_product`.
    bias : bool
        Whether the dense form has a bias parameter.
    batch_tile : int
        Activation rows that share one decoded weight chunk (with whole blocks at most
        :data:`MAX_BLOCK_BATCH_TILE` per pass; without GFNI, with whole blocks and 3 bits or more,
        the rows' decoded codes are kept for every pass).
    row_tile : int
        Below one 512-input block: output rows decoded side by side (independent accumulator
        chains), one parallel task. With whole blocks a task is :data:`BLOCK_TASK_ROWS` rows.
        ``batch_tile * row_tile`` int32x16 accumulators live in zmm registers.
    float_input : bool
        The one-kernel layer of :func:`pbtvm.ops.pb_dense_act`: ``(x f32 [B, K], wp, w_scale[,
        bias], bitlayers) -> y``. The kernel quantizes each row of ``x`` itself, exactly as
        :func:`pbtvm.ops.act_quantize_pack` does, straight into the int8 codes its dot products
        read (no planes packed and unpacked again); needs ``dense``.
    single_row_tile : int, optional
        Output rows per tile when the batch is 1 and K is under one block
        (a second loop nest; None: none).
        At batch 1 a decoded chunk feeds one dot product, so more rows side by side hide more
        latency (512x784 W4: 16 rows 21 µs, 2 rows 37 µs, single-thread CPU time).
    gfni : bool
        Decode whole 512-input blocks with GFNI bit transposes
        (:mod:`pbtvm.ops.gfni_decode`, on zmm or two ymm halves; the CPU needs the ``gfni``
        feature; not with plain AVX2, whose int16 pair sums need plain codes); False: every chunk
        takes the masked-add decode.
    isa : str
        A key of :data:`ISA_FEATURES` (the ymm ones hold fewer accumulators; plain AVX2 splits
        8-bit weights' codes in two).
    amx_min_batch : int, optional
        From this many activation rows on, multiply with the AMX tile instructions
        (:mod:`pbtvm.ops.amx_gemm`; the rule's default :func:`~pbtvm.ops.amx_gemm.amx_min_batch`; the CPU
        needs :data:`~pbtvm.ops.amx_gemm.AMX_FEATURES`; AVX-512 only, ignored where
        :func:`~pbtvm.ops.amx_gemm.amx_problem` says so). The PrimFunc then carries it as
        ``pbtvm.amx_min_batch``. None: no AMX loops.

    Returns
    -------
    tir.PrimFunc
        Straight-line inner loops specialised per activation rows left in the tile.
    """
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    why = unsupported_reason(fmt, k_dim, isa)
    if why is not None:
        raise ValueError(f"pb_vnni_func cannot compute this layer: {why}")
    if float_input and not dense:
        raise ValueError("pb_vnni_func: float_input computes the dense layer (dense=True)")
    most = MAX_ACCUMULATORS_PER_ISA[isa]
    if single_row_tile is not None and not 1 <= single_row_tile <= most:
        raise ValueError(f"single_row_tile must be 1..{most} on {isa}, got {single_row_tile}")
    problem = tile_problem(fmt, k_dim, row_tile, batch_tile, isa)
    if problem:
        raise ValueError(f"pb_vnni_func: {problem}")
    words = fmt.words(k_dim)
    with IRBuilder() as ib:
        with T.prim_func():
            x, packed, wp, w_scale, bias_buf, layers, out = gemm_params(
                T, fmt, n_out, k_dim, batch, dense, bias, float_input, CPU_KERNELS[isa]
            )
            if words >= BLOCK_WORDS:
                batch_tile = min(batch_tile, MAX_BLOCK_BATCH_TILE)
            kern = prepare_kernel(
                T,
                fmt,
                n_out,
                k_dim,
                batch,
                wp,
                out,
                w_scale,
                bias_buf,
                layers,
                gfni,
                x=x,
                packed=packed,
                isa=isa,
            )
            # 2. tiles of output rows x activation rows; straight-line code per activation rows
            # left in the tile, so the chunk loop has no branch. bitlayers is read at run time
            # (zeroed coefficients; with the GFNI decode the dropped planes are not loaded).
            serial = n_out * k_dim * fmt.bits < SERIAL_WEIGHT_BITS

            def vector_tiles() -> None:
                if kern.blocks:  # rows streamed in order at any batch; the tile is the unit of parallel work
                    _row_tiles(T, kern, batch, BLOCK_TASK_ROWS, batch_tile, serial)
                elif single_row_tile is None:
                    _row_tiles(T, kern, batch, row_tile, batch_tile, serial)
                else:  # below one block, batch 1 gets its own loop nest: more rows side by side
                    with T.If(batch == 1):
                        with T.Then():
                            _row_tiles(T, kern, batch, single_row_tile, 1, serial)
                        with T.Else():
                            _row_tiles(T, kern, batch, row_tile, batch_tile, serial)

            # many activation rows: the tile instructions (:mod:`.amx_gemm`)
            amx = amx_min_batch is not None and amx_problem(kern) is None
            tiles_or_vectors(
                T, batch, amx_min_batch if amx else None, lambda: amx_gemm(T, kern, batch, serial), vector_tiles
            )
    func = ib.get().with_attr(ATTR_CPU_FEATURES, kernel_features(isa, [kern], amx))
    return func.with_attr(ATTR_AMX_MIN_BATCH, amx_min_batch) if amx else func


def gemm_params(
    T, fmt: BitplaneFormat, n_out: int, k_dim: int, batch, dense: bool, bias: bool, float_input: bool, kernel: str
):
    """Declare the parameters of the TE GEMM a CPU kernel replaces (see :func:`pb_vnni_func`'s
    ``dense`` and ``float_input``) and its attributes (``pbtvm.cpu_kernel = kernel``).

    Returns ``(x, (xp, x_scale, rowsum), wp, w_scale, bias, bitlayers, out)``, None where the form
    has no such parameter.
    """
    from . import kernel_attrs

    T.func_name("main")
    x = xp = x_scale = rowsum = None
    if float_input:
        x = T.arg("x", T.buffer((batch, k_dim), "float32"))
    else:
        xp = T.arg("xp", T.buffer((fmt.act_bits, batch, fmt.words(k_dim)), "uint32"))
        x_scale = T.arg("x_scale", T.buffer((batch,), "float32")) if dense else None
        rowsum = T.arg("rowsum", T.buffer((batch,), "int32"))
    wp = T.arg("wp", T.buffer(fmt.weight_shape(n_out, k_dim), "uint32"))
    w_scale = T.arg("w_scale", T.buffer(fmt.scale_shape(n_out), "float32")) if dense else None
    bias_buf = T.arg("bias", T.buffer((n_out,), "float32")) if dense and bias else None
    layers = T.arg("bitlayers", tir.Var("bitlayers", "int64"))
    out = T.arg("out", T.buffer((batch, n_out), "float32" if dense else "int32"))
    T.func_attr({**kernel_attrs(KernelKind.GEMM, fmt, k_dim), "tirx.noalias": True, ATTR_CPU_KERNEL: kernel})
    return x, (xp, x_scale, rowsum), wp, w_scale, bias_buf, layers, out


def _row_tiles(T, kern: Kernel, batch, row_tile: int, batch_tile: int, serial: bool) -> None:
    """Step 2: all tiles of ``row_tile`` output rows x ``batch_tile`` activation rows.

    Straight-line code per activation rows left, so the chunk loop has no branch.
    """
    n_tiles = -(-kern.n_out // row_tile)
    # batch 2 and more: each row decoded once (:mod:`.vnni_batch`)
    decode_once = decodes_once(kern)
    parts = 1 if serial else n_tiles  # a part per parallel task; serial tiles take turns in one
    if decode_once:  # once per call: a buffer of 1 KiB or more in the parallel loop is allocated per task
        row_codes = T.alloc_buffer((parts * row_code_bytes(kern),), "uint8")
    with T.serial(0, n_tiles) if serial else T.parallel(0, n_tiles) as tile:
        # One accumulator and one decode buffer for every specialisation below: separate
        # per-branch buffers get merged by storage rewriting into one mixed-type stack
        # slot that LLVM no longer keeps in registers (measured 4-13x slower).
        if kern.blocks:  # the accumulators of the rows side by side, ACC_CHAINS // rows per activation row
            slots, decoded = block_slots(batch_tile), block_codes([kern])
        else:
            slots, decoded = row_tile * batch_tile, row_tile * CHUNK
        decode_scratch(T, [kern], slots, decoded)
        if decode_once:
            past = decode_once_past(kern, batch_tile)
            with T.If(batch > past):
                with T.Then():
                    n0 = tile * row_tile
                    at = 0 if serial else tile * row_code_bytes(kern)
                    rows_decoded_once(T, kern, row_codes, at, n0, _rows_in_tile(kern, n0, row_tile), batch, batch_tile)
                with T.Else():  # one batch tile: the codes stay in registers
                    _batch_tiles(T, kern, tile, batch, row_tile, past)
        else:
            _batch_tiles(T, kern, tile, batch, row_tile, batch_tile)


def _batch_tiles(T, kern: Kernel, tile, batch, row_tile: int, batch_tile: int) -> None:
    """Row tile ``tile`` x every batch tile (straight-line code per activation rows left)."""
    batch_tiles(T, batch, batch_tile, lambda b0, rows: _tile(T, kern, tile * row_tile, row_tile, b0, rows))


def _rows_in_tile(kern: Kernel, n0, n_rows: int):
    """Output rows of the tile from ``n0``: ``n_rows``, fewer in the last tile (it stops at N)."""
    return tir.min(n_rows, kern.n_out - n0) if kern.n_out % n_rows else n_rows


def _tile(T, kern: Kernel, n0, n_rows: int, b0, b_rows: int) -> None:
    """Output rows ``n0 ..`` (``n_rows``) x activation rows ``b0 ..`` (``b_rows``).

    With whole blocks the rows are streamed in order (:func:`~.vnni_rows.block_rows`), so each plane is read
    front to back; otherwise the tile's rows are decoded chunk by chunk side by side
    (independent accumulator chains); there the last tile's rows past N are computed on row N-1
    and not stored, while the row loop over blocks stops at N.
    """
    if kern.blocks:  # the last task stops at N (no rows computed for nothing)
        block_rows(T, kern, n0, _rows_in_tile(kern, n0, n_rows), b0, b_rows)
        return
    rows = [tir.min(n0 + r, kern.n_out - 1) if kern.n_out % n_rows else n0 + r for r in range(n_rows)]
    acc, lanes = kern.acc, CHUNK // 4
    slot = [[tir.Ramp((r * b_rows + b) * lanes, 1, lanes) for b in range(b_rows)] for r in range(n_rows)]
    for r in range(n_rows):
        for b in range(b_rows):
            T.buffer_store(acc, tir.Broadcast(tir.const(0, "int32"), lanes), [slot[r][b]])

    def chunk(c, full: bool) -> None:
        for r, row in enumerate(rows):  # decode each row's chunk once ...
            decode_chunk(T, kern, row, c, full, tir.Ramp(r * CHUNK, 1, CHUNK))
        for b in range(b_rows):  # ... and use it for every activation row of the tile
            for r in range(n_rows):
                dot(T, kern, slot[r][b], tir.Ramp(r * CHUNK, 1, CHUNK), b0 + b, c * CHUNK)

    if kern.full_chunks:
        with T.serial(0, kern.full_chunks) as c:
            chunk(c, True)
    if kern.tail:
        chunk(kern.full_chunks, False)
    for r in range(n_rows):
        store(T, kern, [slot[r][b] for b in range(b_rows)], 1, n0 + r, b0, kern.n_out % n_rows != 0)
