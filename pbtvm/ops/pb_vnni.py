"""AVX-512 PB GEMM: weight planes expanded to bytes in registers, then VNNI int8 dot products.

The same exact integer product as :func:`pbtvm.ops.pb_int_product` on the same ``kNW`` planes,
computed another way. For a chunk of 64 inputs (two packed words) of one weight row:

* each kept plane ``i < bitlayers`` is loaded as a 64-bit lane mask (``kmovq``) that adds its coefficient into 64 byte lanes: the *unsigned* weight code
  ``u = 2^(k-1) (1 - b_0) + sum_{0<i<L} 2^(k-1-i) b_i`` (two's complement; the sign plane
  inverted, so ``u = q + 2^(k-1)`` in ``0 .. 2^k - 1``), or ``u = 2 b`` (bipolar);
* one ``vpdpbusd`` per activation row multiplies ``u`` (uint8) by the activation codes (int8,
  rebuilt once per call from the packed activation planes) into 16 int32 lanes, exactly;
* at the end ``acc = sum(lanes) - 2^(k-1) sum_k x[k]`` (two's complement), which is
  ``sum_{i<L} c_i sum_k b_i[k] x[k]``, the PB product.

Work per 64 weights is ``2 L`` decode instructions (``kmovq`` + masked ``vpaddb``) shared by a
tile of activation rows plus one dot product per row, instead of ``L * act_bits`` AND+POPCNT
words. A task works on ``row_tile`` output rows at once (independent accumulator chains); it
first copies their row-planes into a stack buffer with 64-byte loads and prefetches the next
tile's, which streams weights from DRAM ~1.6x faster than decoding straight from them. It needs ``bits <= 8``,
``act_bits <= 8``, an int32 accumulator and a CPU with AVX-512 BW and VNNI
(:func:`unsupported_reason`); the popcount kernel serves everything else.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from .._tvm import tir
from ..bitplane import BitplaneFormat
from ..names import ATTR_CPU_KERNEL, KernelKind
from .epilogue import dense_value
from .vnni_bytes import CHUNK, act_bytes, lane_mask, quantize_row, qword

__all__ = ["CPU_FEATURES", "CHUNK", "pb_vnni_func", "unsupported_reason", "target_supports"]

#: LLVM CPU features the kernel's instructions need.
CPU_FEATURES = ("avx512bw", "avx512vnni")
#: Value of the ``pbtvm.cpu_kernel`` attribute on a PrimFunc replaced by this kernel.
CPU_KERNEL = "avx512_vnni"
#: Prefetch the row tile this many tiles ahead (software prefetch: +25% at 4096x4096 W4 batch 1).
PREFETCH_TILES = 1
#: zmm accumulators a tile may hold (32 registers, some needed for decoding).
MAX_ACCUMULATORS = 24
#: Layers with fewer weight bits (N * K * bits, 1 MiB of planes) run their row tiles serially:
#: waking TVM's thread pool cost more than it gave below this on the 2-vCPU EPYC (MNIST MLP W4
#: batch 1: 55 µs serial vs 77 µs; 1024² W4 69 vs 84 µs; 2048² W4 297 vs 267 µs, BENCHMARKS.md,
#: issue 19). Machine-dependent: more real cores would move it down.
SERIAL_WEIGHT_BITS = 1 << 23


def unsupported_reason(fmt: BitplaneFormat, k_dim: int) -> str | None:
    """Why this kernel cannot compute ``fmt`` at this K (None when it can)."""
    if fmt.bits > 8 or fmt.act_bits > 8:
        return f"{fmt.name}: weights and activations must be <= 8 bits for int8 dot products"
    # |sum_k x u| <= K * (2^k - 1) * act_qmax must fit the int32 lanes.
    if int(k_dim) * (2**fmt.bits - 1) * fmt.act_qmax >= 2**31 or fmt.accumulator_dtype(k_dim) != "int32":
        return f"K={k_dim} is too large for int32 accumulation at {fmt.name}"
    return None


def target_supports(target) -> bool:
    """Whether an LLVM target's CPU (its ``mtriple``, ``mcpu`` and ``mattr``) has :data:`CPU_FEATURES`."""
    from tvm.target import codegen

    if target.kind.name != "llvm":
        return False
    try:
        have = codegen.llvm_get_cpu_features(target)
    except Exception:
        return False
    return all(f in have for f in CPU_FEATURES)


def plane_coefficients(fmt: BitplaneFormat) -> list[int]:
    """Per weight plane, the byte it adds to the unsigned code: the format's ``|c_i|``.

    Plane 0 of two's complement (``c_0 < 0``) is added inverted instead (see :func:`_decode`).
    """
    return [abs(c) for c in fmt.plane_coefficients()]


def _decode(T, kern: _Kernel, at, word, layers: int) -> None:
    """Store the uint8x64 unsigned weight codes ``u`` of one row's chunk (top ``layers`` planes) at ``at``.

    ``word(i)`` is the chunk's 64 bits of plane ``i`` (uint64).

    One masked byte add per plane. The coefficients come from a small buffer filled at run time:
    with literal constants LLVM proves the terms' bits disjoint, turns the adds into ORs, and
    AVX-512 has no byte-masked OR (it then spends a blend per plane).
    """
    fmt, dec = kern.fmt, kern.decoded

    def mask(i: int) -> tir.PrimExpr:
        return lane_mask(word(i))

    def coef(i: int) -> tir.PrimExpr:
        return tir.Broadcast(kern.coef[i], CHUNK)

    zero = tir.Broadcast(tir.const(0, "uint8"), CHUNK)
    if not fmt.weight_signed:  # bipolar (u = 2b) and offset binary (u = q): planes as they are
        T.buffer_store(dec, tir.Select(mask(0), coef(0), zero), [at])
    else:
        T.buffer_store(dec, tir.Select(mask(0), zero, coef(0)), [at])  # sign plane inverted
    for i in range(1, layers):
        T.buffer_store(dec, dec[at] + tir.Select(mask(i), coef(i), zero), [at])


def _unsigned_shift(fmt: BitplaneFormat) -> int:
    """``sum_k x u - acc``: ``2^(k-1) rowsum`` for two's complement, 0 for bipolar and offset binary."""
    return 2 ** (fmt.bits - 1) if fmt.weight_signed else 0


@dataclass
class _Kernel:
    """What one specialised inner loop needs (buffers, sizes, the tile it computes)."""

    fmt: BitplaneFormat
    n_out: int
    full_chunks: int
    tail: int
    wp: tir.Buffer
    codes: tir.Buffer
    rowsum: tir.Buffer
    out: tir.Buffer
    x_scale: tir.Buffer | None
    w_scale: tir.Buffer | None
    bias: tir.Buffer | None
    acc: tir.Buffer | None = None
    decoded: tir.Buffer | None = None
    coef: tir.Buffer | None = None
    stage: tir.Buffer | None = None
    code_sum: tir.Buffer | None = None


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
) -> tir.PrimFunc:
    """The AVX-512 PB kernel with the same parameters as the TE kernel it replaces.

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
        Activation rows that share one decoded weight chunk.
    row_tile : int
        Output rows decoded side by side (independent accumulator chains); one parallel task.
        ``batch_tile * row_tile`` int32x16 accumulators live in zmm registers.
    float_input : bool
        The one-kernel layer of :func:`pbtvm.ops.pb_dense_act`: ``(x f32 [B, K], wp, w_scale[,
        bias], bitlayers) -> y``. The kernel quantizes each row of ``x`` itself, exactly as
        :func:`pbtvm.ops.act_quantize_pack` does, straight into the int8 codes its dot products
        read (no planes packed and unpacked again); needs ``dense``.
    single_row_tile : int, optional
        Output rows per tile when the batch is 1 and ``bitlayers == bits`` (a second loop nest;
        None: none).
        At batch 1 a decoded chunk feeds one dot product, so more rows side by side hide more
        latency (512x784 W4: 16 rows 21 µs, 2 rows 37 µs, single-thread CPU time).

    Returns
    -------
    tir.PrimFunc
        Straight-line inner loops specialised per (activation rows left in the tile, bitlayers).
    """
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    from . import kernel_attrs

    why = unsupported_reason(fmt, k_dim)
    if why is not None:
        raise ValueError(f"pb_vnni_func cannot compute this layer: {why}")
    if float_input and not dense:
        raise ValueError("pb_vnni_func: float_input computes the dense layer (dense=True)")
    if single_row_tile is not None and not 1 <= single_row_tile <= MAX_ACCUMULATORS:
        raise ValueError(f"single_row_tile must be 1..{MAX_ACCUMULATORS}, got {single_row_tile}")
    if batch_tile < 1 or row_tile < 1 or batch_tile * row_tile > MAX_ACCUMULATORS:
        raise ValueError(f"batch_tile * row_tile must be 1..{MAX_ACCUMULATORS}, got {batch_tile} x {row_tile}")
    words = fmt.words(k_dim)
    full_chunks, tail = divmod(words, 2)
    chunks = full_chunks + tail
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name("main")
            if float_input:
                x = T.arg("x", T.buffer((batch, k_dim), "float32"))
            else:
                xp = T.arg("xp", T.buffer((fmt.act_bits, batch, words), "uint32"))
                x_scale = T.arg("x_scale", T.buffer((batch,), "float32")) if dense else None
                rowsum = T.arg("rowsum", T.buffer((batch,), "int32"))
            wp = T.arg("wp", T.buffer(fmt.weight_shape(n_out, k_dim), "uint32"))
            w_scale = T.arg("w_scale", T.buffer(fmt.scale_shape(n_out), "float32")) if dense else None
            bias_buf = T.arg("bias", T.buffer((n_out,), "float32")) if dense and bias else None
            layers = T.arg("bitlayers", tir.Var("bitlayers", "int64"))
            out = T.arg("out", T.buffer((batch, n_out), "float32" if dense else "int32"))
            T.func_attr(
                {**kernel_attrs(KernelKind.GEMM, fmt, k_dim), "tirx.noalias": True, ATTR_CPU_KERNEL: CPU_KERNEL}
            )
            codes = T.alloc_buffer((batch, chunks * CHUNK), "int8")
            if float_input:  # the row scales and code sums the separate pack kernel would pass in
                x_scale = T.alloc_buffer((batch,), "float32")
                rowsum = T.alloc_buffer((batch,), "int32")
            kern = _Kernel(fmt, n_out, full_chunks, tail, wp, codes, rowsum, out, x_scale, w_scale, bias_buf)
            kern.coef = T.alloc_buffer((fmt.bits,), "uint8")
            for i, value in enumerate(plane_coefficients(fmt)):
                T.buffer_store(kern.coef, tir.const(value, "uint8"), [i])
            # 1. activation codes as int8 and their sum, once per call. The sum undoes the unsigned
            # weight shift; it is computed here, not taken from ``rowsum``, so the result depends
            # on ``rowsum`` exactly as the TE kernel's does (only through the offset/epilogue).
            # With float input the code sum is the row sum (both sum the same codes).
            kern.code_sum = rowsum if float_input else T.alloc_buffer((batch,), "int32")
            with T.serial(0, batch) if float_input else T.parallel(0, batch) as r:
                if float_input:
                    quantize_row(T, fmt, x, r, k_dim, codes, x_scale, chunks)
                else:
                    for c in range(chunks):
                        T.buffer_store(
                            codes, act_bytes(fmt, xp, r, c, c < full_chunks), [r, tir.Ramp(c * CHUNK, 1, CHUNK)]
                        )
                T.buffer_store(kern.code_sum, tir.const(0, "int32"), [r])
                with T.serial(0, chunks * CHUNK) as kk:
                    T.buffer_store(kern.code_sum, kern.code_sum[r] + codes[r, kk].astype("int32"), [r])
            # 2. tiles of output rows x activation rows; straight-line code per (activation rows
            # left, bitlayers), so the chunk loop has no branch.
            serial = n_out * k_dim * fmt.bits < SERIAL_WEIGHT_BITS
            if single_row_tile is None:
                _row_tiles(T, kern, batch, layers, row_tile, batch_tile, serial)
            else:  # batch 1 at full precision gets its own loop nest: more rows side by side
                # Only for bitlayers == bits: one specialisation per bitlayers value doubled the
                # kernel's LLVM compile time (MNIST MLP W8: 23 s vs 12 s); fewer planes at batch 1
                # take the general nest.
                with T.If(tir.all(batch == 1, layers == fmt.bits)):
                    with T.Then():
                        _row_tiles(T, kern, batch, layers, single_row_tile, 1, serial, (fmt.bits,))
                    with T.Else():
                        _row_tiles(T, kern, batch, layers, row_tile, batch_tile, serial)
    return ib.get()


def _row_tiles(
    T, kern: _Kernel, batch, layers, row_tile: int, batch_tile: int, serial: bool, plane_counts: tuple = ()
) -> None:
    """Step 2: all tiles of ``row_tile`` output rows x ``batch_tile`` activation rows.

    Straight-line code per (activation rows left, bitlayers), so the chunk loop has no branch;
    ``plane_counts`` limits the bitlayers values specialised (default: all, 1..bits).
    """
    fmt = kern.fmt
    n_tiles = -(-kern.n_out // row_tile)
    b_tiles = (batch + (batch_tile - 1)) // batch_tile
    with T.serial(0, n_tiles) if serial else T.parallel(0, n_tiles) as tile:
        # One accumulator and one decode buffer for every specialisation below: separate
        # per-branch buffers get merged by storage rewriting into one mixed-type stack
        # slot that LLVM no longer keeps in registers (measured 4-13x slower).
        kern.acc = T.alloc_buffer((row_tile * batch_tile * CHUNK // 4,), "int32", scope="local")
        kern.decoded = T.alloc_buffer((row_tile * CHUNK,), "uint8", scope="local")
        kern.stage = T.alloc_buffer((fmt.bits * row_tile * (kern.full_chunks + kern.tail) * 2,), "uint32", scope="local")
        with T.serial(0, b_tiles) as bt:
            left = batch - bt * batch_tile
            for rows in range(batch_tile, 0, -1):
                with T.If(left >= rows if rows == batch_tile else left == rows):
                    with T.Then():
                        for nlayers in plane_counts or range(1, fmt.bits + 1):
                            with T.If(layers == nlayers):
                                with T.Then():
                                    _tile(T, kern, tile * row_tile, row_tile, bt * batch_tile, rows, nlayers)


def _tile(T, kern: _Kernel, n0, n_rows: int, b0, b_rows: int, nlayers: int) -> None:
    """Output rows ``n0 ..`` (``n_rows``) x activation rows ``b0 ..`` (``b_rows``), ``nlayers`` planes.

    Rows past N (the last tile) are computed on row N-1 and not stored.
    """
    fmt, lanes = kern.fmt, CHUNK // 4
    rows = [tir.min(n0 + r, kern.n_out - 1) if kern.n_out % n_rows else n0 + r for r in range(n_rows)]
    acc, decoded = kern.acc, kern.decoded
    slot = [[tir.Ramp((r * b_rows + b) * lanes, 1, lanes) for b in range(b_rows)] for r in range(n_rows)]
    for r in range(n_rows):
        for b in range(b_rows):
            T.buffer_store(acc, tir.Broadcast(tir.const(0, "int32"), lanes), [slot[r][b]])

    span = (kern.full_chunks + kern.tail) * 2  # words per staged row-plane (even)
    _stage(T, kern, rows, nlayers, span)

    def chunk(c, full: bool) -> None:
        for r in range(n_rows):  # decode each row's chunk once ...

            def word(i: int, r: int = r) -> tir.PrimExpr:
                return qword(kern.stage, ((i * n_rows + r) * span,), c, full, flat=True)

            _decode(T, kern, tir.Ramp(r * CHUNK, 1, CHUNK), word, nlayers)
        for b in range(b_rows):  # ... and use it for every activation row of the tile
            x = kern.codes[b0 + b, tir.Ramp(c * CHUNK, 1, CHUNK)]
            for r in range(n_rows):
                u = tir.reinterpret("int8x64", decoded[tir.Ramp(r * CHUNK, 1, CHUNK)])
                dot = tir.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc[slot[r][b]], u, x)
                T.buffer_store(acc, dot, [slot[r][b]])

    if kern.full_chunks % 8 == 0 and PREFETCH_TILES:
        with T.serial(0, kern.full_chunks // 8) as co:  # a cache line of every row-plane per step
            for r in range(n_rows):
                ahead = tir.min(n0 + r + PREFETCH_TILES * n_rows, kern.n_out - 1)
                for i in range(nlayers):
                    addr = tir.address_of(kern.wp[fmt.weight_index(i, ahead, co * 16)])
                    T.evaluate(tir.call_llvm_intrin("void", "llvm.prefetch.p0", addr, 0, 3, 1))
            for ci in range(8):
                chunk(co * 8 + ci, True)
    elif kern.full_chunks:
        with T.serial(0, kern.full_chunks) as c:
            chunk(c, True)
    if kern.tail:
        chunk(kern.full_chunks, False)
    shift = _unsigned_shift(fmt)
    for r in range(n_rows):
        n = n0 + r
        with T.If(n < kern.n_out) if kern.n_out % n_rows else contextlib.nullcontext():
            with T.Then() if kern.n_out % n_rows else contextlib.nullcontext():
                for b in range(b_rows):
                    row = b0 + b
                    total = tir.call_llvm_pure_intrin("int32", "llvm.vector.reduce.add.v16i32", acc[slot[r][b]])
                    rs = kern.rowsum[row]
                    exact = total - tir.const(shift, "int32") * kern.code_sum[row]
                    if kern.x_scale is None:
                        value = exact + tir.const(fmt.weight_offset, "int32") * rs
                    else:
                        value = _dense_value(kern, row, n, rs, exact, nlayers)
                    T.buffer_store(kern.out, value, [row, n])


def _stage(T, kern: _Kernel, rows: list, nlayers: int, span: int) -> None:
    """Copy the tile's row-planes into ``kern.stage`` with 64-byte loads.

    The hardware prefetchers follow a few long streams of wide loads well; the decode's 8-byte
    loads from rows x planes interleaved streams ran at ~5 GB/s from DRAM (measured).
    """
    fmt, words = kern.fmt, kern.full_chunks * 2 + kern.tail
    for i in range(nlayers):
        for r, row in enumerate(rows):
            base = (i * len(rows) + r) * span
            src = fmt.weight_index(i, row, 0)[:2]
            if words >= 16:
                with T.serial(0, words // 16) as v:
                    value = kern.wp[(*src, tir.Ramp(v * 16, 1, 16))]
                    T.buffer_store(kern.stage, value, [tir.Ramp(base + v * 16, 1, 16)])
            for w in range(words - words % 16, words):
                T.buffer_store(kern.stage, kern.wp[(*src, w)], [base + w])


def _dense_value(kern: _Kernel, row, n, rs, acc, nlayers: int) -> tir.PrimExpr:
    """The float epilogue of :func:`pbtvm.ops.pb_dense` (the shared :func:`dense_value`)."""
    layers = tir.const(nlayers, "int64")
    return dense_value(kern.fmt, kern.x_scale[row], rs, acc, kern.w_scale, n, kern.bias, layers)
