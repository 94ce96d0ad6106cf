"""Row loops of the byte-code PB kernels (AVX-512, AVX-VNNI, AVX2): codes, decode, dot products, store.

The pieces :func:`pbtvm.ops.pb_vnni.pb_vnni_func` (the GEMM) and
:func:`pbtvm.ops.pb_vnni_lstm.pb_vnni_lstm_func` (the LSTM step) are built from:

* :func:`prepare_kernel` -- the activation rows as int8 codes once per call (quantized from
  floats exactly as :func:`pbtvm.ops.act_quantize_pack`, or unpacked from planes), in the GFNI
  decode's order for whole 512-input blocks; returns the :class:`Kernel` the loops read;
* :func:`block_rows` -- output rows in order, each plane streamed front to back (prefetched
  ahead in large layers, :func:`prefetch_ahead`): whole blocks with
  the GFNI decode (:mod:`pbtvm.ops.gfni_decode`), the chunks after them with the masked-add
  decode (:func:`decode_chunk`), ``vpdpbusd`` dot products (:func:`dot`), the reduction and
  the float epilogue (:func:`store`); at one activation row, rows of one block run four at a time;
* :func:`decode_chunk`, :func:`dot`, :func:`store` -- also the GEMM's chunk path below one block.

Each weight of a row becomes one byte, ``2^(8-k) u / |c|`` (:func:`scaled_codes`; ``u`` the
unsigned code of the kept planes; plain ``u`` on AVX2, whose int16 pair sums would saturate),
multiplied by the activation codes in int32 lanes, exactly. The ymm kernels (:data:`YMM_ISAS`)
decode chunks from dword broadcasts, and with GFNI (AVX-VNNI CPUs) whole blocks in two ymm halves.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

from .._tvm import tir
from ..bitplane import BitplaneFormat
from .common import CPU_SCRATCH
from .epilogue import output_value
from .gfni_decode import BLOCK, BLOCK_WORDS, block_permutation, byte_coefficients, code_scale, decode_block
from .vnni_bytes import CHUNK, lane_mask, qword, row_codes, sum_codes

__all__ = [
    "ACC_CHAINS",
    "YMM_ISAS",
    "Kernel",
    "accumulators",
    "batch_tiles",
    "block_codes",
    "chunk_groups",
    "decoded_at",
    "block_rows",
    "block_slots",
    "decode_chunk",
    "dot",
    "gfni_block",
    "lane_bound",
    "madd_exact",
    "pair_bound",
    "decode_scratch",
    "plane_offset",
    "prefetch_ahead",
    "prefetch_into_l2",
    "prepare_kernel",
    "scaled_codes",
    "split_codes",
    "side_by_side",
    "store",
    "store_total",
]

#: Accumulators per activation row at small batches (``ACC_CHAINS // rows`` of them), so the
#: dot products of one output row are not one long dependency chain.
ACC_CHAINS = 4
#: Chunks one iteration of the masked-add decode's chunk loop decodes per output row, then
#: multiplies (a multiple of every accumulator count ``ACC_CHAINS // rows``). Whole 512-input
#: blocks (8 chunks) and the chunks after them as straight-line code took 2-3x the compile
#: time (AVX2, one kernel: 512x784 W8 3.3-3.9 -> 1.2-1.5 s, 4096x4096 W4 2.7 -> 1.4 s) for the
#: same speed within the noise of this shared 2-core host (+-20 %).
CHUNK_GROUP = 4
#: Output rows side by side when a row is one 512-input block of up to SIDE_BY_SIDE_BITS planes
#: and one activation row is left (batch 1, or the last row of a batch tile): one accumulator
#: each, their lane sums reduced together (:func:`_lane_sums`; the per-row horizontal sum was
#: about a quarter of such a row's vector instructions). Measured at batch 1. Single thread,
#: K=650: W4 2600 rows 43 -> 38 us, 10000 rows 153 -> 136 us, W1 23 -> 21 us; W8 62 -> 67 us
#: and two blocks or more (4096x4096 W4 208 -> 224 us) lose, so they keep rows one by one.
ROWS_SIDE_BY_SIDE = 4
SIDE_BY_SIDE_BITS = 4
#: Software prefetch distance: before a row's 512-input block is decoded, each kept plane's line
#: this many bytes further on is asked into L2 (:func:`prefetch_ahead`). Each plane is one stream
#: front to back, so this is 16 rows ahead at K = 4096 (4096 and 16384 measured alike).
PREFETCH_AHEAD = 8192
#: Layers whose weight planes take at least this many bytes prefetch (:attr:`Kernel.streams`);
#: smaller ones are more likely in the caches, where the prefetches only cost instructions (layers
#: of 6-8 MB read from L3: 0.84-1.07x, within this host's noise).
PREFETCH_AHEAD_MIN_BYTES = 4 << 20


def lane_bound(fmt: BitplaneFormat, k_dim: int, scaled: bool) -> int:
    """Largest ``|sum_k x byte|`` of the int32 lanes: bytes up to 255 when scaled by
    ``2^(8-k)`` (:func:`pbtvm.ops.gfni_decode.code_scale`), else up to ``2^k - 1``."""
    padded = -(-int(k_dim) // CHUNK) * CHUNK
    return padded * (255 if scaled else 2**fmt.bits - 1) * 2 ** (fmt.act_bits - 1)


#: Instruction sets of the ymm kernels (16 registers, dword-broadcast masked-add decode): AVX2
#: (:func:`dot` by ``vpmaddubsw`` + ``vpmaddwd``, plain codes) and AVX-VNNI (``vpdpbusd`` on ymm,
#: scaled codes, the GFNI block decode in ymm halves where the CPU has GFNI).
YMM_ISAS = ("avx2", "avxvnni")
#: Largest int16: AVX2's ``vpmaddubsw`` saturates its pair sums there.
INT16_MAX = 2**15 - 1


def pair_bound(fmt: BitplaneFormat) -> int:
    """Largest ``|u x + u' x'|`` of a ``vpmaddubsw`` pair sum: plain codes ``u`` up to
    ``sum |c_i|``, activation codes up to ``act_qmax``."""
    return 2 * sum(abs(c) for c in fmt.plane_coefficients()) * fmt.act_qmax


def madd_exact(fmt: BitplaneFormat) -> bool:
    """Whether AVX2's int16 pair sums (:func:`dot`) hold every product of ``fmt`` exactly
    (weights up to 7 bits at 8-bit activations)."""
    return pair_bound(fmt) <= INT16_MAX


#: With split codes the last planes make the low code ``u_lo`` (up to 15), the others ``u_hi``.
SPLIT_LOW_PLANES = 4


def split_codes(fmt: BitplaneFormat, isa: str) -> bool:
    """Whether the kernel decodes ``u = 16 u_hi + u_lo`` as two byte codes (:func:`dot` multiplies
    each, then adds ``16 x`` the high one's sums in int32): on AVX2 where ``u`` itself could
    saturate the pair sums (8-bit weights)."""
    return isa == "avx2" and not madd_exact(fmt)


def decode_scratch(T, kerns: list, slots: int, codes: int) -> None:
    """Give ``kerns`` (legs taking turns in one parallel task) one accumulator buffer of ``slots``
    int32x16 slots and one decode buffer of ``codes`` bytes (twice that with split codes, the
    high codes after the low ones)."""
    parts = 2 if any(kern.hi for kern in kerns) else 1
    acc = T.alloc_buffer((slots * CHUNK // 4,), "int32", scope=CPU_SCRATCH)
    decoded = T.alloc_buffer((codes * parts,), "uint8", scope=CPU_SCRATCH)
    for kern in kerns:
        kern.acc, kern.decoded = acc, decoded
        kern.hi = codes if kern.hi else 0


def _half_slot(slot: tir.Ramp) -> tir.Ramp:
    """The first eight int32 lanes of an accumulator slot (AVX2 sums both halves there)."""
    return tir.Ramp(slot.base, 1, CHUNK // 8)


def scaled_codes(fmt: BitplaneFormat, k_dim: int) -> bool:
    """Whether the kernel decodes to bytes scaled by ``2^(8-k)`` (what the GFNI decode yields):
    only where such sums fit int32 (K up to ~66k at 8-bit activations); longer rows keep the
    plain codes and the masked-add decode."""
    return lane_bound(fmt, k_dim, scaled=True) < 2**31


def _code_bytes(fmt: BitplaneFormat, scaled: bool) -> tuple[list[int], int, int]:
    """``(per-plane byte coefficients, shift, factor)`` of the decoded bytes: with ``scaled``
    those of :mod:`pbtvm.ops.gfni_decode` (``sum u x = factor * (sum byte x >> shift)``), else
    the plain ``|c_i|`` (shift 0, factor 1)."""
    if scaled:
        return byte_coefficients(fmt), *code_scale(fmt)
    return [abs(c) for c in fmt.plane_coefficients()], 0, 1


def dword_lane_weights() -> list[int]:
    """Weight (input) index of each of the 64 lanes of a chunk decoded from dword broadcasts (AVX2).

    Lane ``t`` of a 32-weight half holds byte ``t % 4`` of the plane word (``vpbroadcastd``) and
    tests bit ``t // 4`` of it: weight ``8 (t % 4) + t // 4``. The activation codes are stored in
    this order once per call (:func:`prepare_kernel`), so the decode needs no byte shuffle: 4
    instructions per plane and 32 weights instead of LLVM's 5.5 for a 64-bit lane mask
    (4096x4096 W4, one thread: 1,366 -> 1,032 µs at batch 1, 4,486 -> 3,967 µs at batch 8).
    """
    half = [8 * (t % 4) + t // 4 for t in range(32)]
    return half + [32 + w for w in half]


def _dword_mask(word: tuple) -> tir.PrimExpr:
    """``boolx64`` of a chunk's two plane words (``(low, high)`` uint32 loads) in the
    dword-broadcast lane order: each word broadcast to 8 dwords, lane ``t`` tests bit
    ``t // 4 % 8`` of its byte ``t % 4`` (``vpbroadcastd`` from memory, ``vpand``, ``vpcmpeqb``)."""
    low, high = word
    spread = tir.Shuffle([tir.Broadcast(low, 8), tir.Broadcast(high, 8)], [tir.IntImm("int32", i) for i in range(16)])
    lane_bit = (tir.Ramp(tir.const(0, "int32"), 1, CHUNK) // 4 % 8).astype(f"uint8x{CHUNK}")
    select = tir.Broadcast(tir.const(1, "uint8"), CHUNK) << lane_bit
    byte = tir.reinterpret("uint8x64", spread)
    return (byte & select) == select


def masked_add_decode(T, kern: Kernel, at, word) -> None:
    """Store the uint8x64 codes of one row's chunk at ``at``: the masked-add decode.

    ``word(i)`` is the chunk's 64 bits of plane ``i`` (uint64; with ``kern.dword`` its two uint32
    words, the lanes in :func:`dword_lane_weights` order). Each plane adds its byte
    coefficient ``2^(7-i)`` (:func:`pbtvm.ops.gfni_decode.byte_coefficients`) into the lanes its
    bits select: the same bytes as :func:`pbtvm.ops.gfni_decode.decode_block` gives, in input
    order. It serves the chunks after the last whole 512-input block and CPUs without GFNI.

    The coefficients come from a small buffer filled at run time: with literal constants LLVM
    proves the terms' bits disjoint, turns the adds into ORs, and AVX-512 has no byte-masked OR
    (it then spends a blend per plane). With split codes (``kern.hi``, 8-bit weights on AVX2) the
    first planes make the high codes at ``at + kern.hi`` and the last :data:`SPLIT_LOW_PLANES`
    the low codes at ``at`` (:func:`split_codes`). Every plane is read and decoded, those past
    ``bitlayers`` adding their zeroed coefficient: a branch per plane and chunk skipping them
    measured 2x faster at one plane of four but 19 % slower at all four (4096x4096 W4, one
    thread) and 7x slower with split codes (W8); straight-line code per ``bitlayers`` value below
    one block compiled 2-4x slower for at most 1.5x at fewer planes (512x256 W8, batch 4, 4 planes).
    """
    fmt, dec = kern.fmt, kern.decoded

    def mask(i: int) -> tir.PrimExpr:
        return _dword_mask(word(i)) if kern.dword else lane_mask(word(i))

    def coef(i: int) -> tir.PrimExpr:
        return tir.Broadcast(kern.coef[i], CHUNK)

    zero = tir.Broadcast(tir.const(0, "uint8"), CHUNK)
    first_low = fmt.bits - SPLIT_LOW_PLANES if kern.hi else 0  # planes before it make the high codes

    def into(i: int) -> tir.Ramp:
        return tir.Ramp(at.base + kern.hi, 1, CHUNK) if i < first_low else at

    if not fmt.weight_signed:  # bipolar and offset binary: planes as they are
        T.buffer_store(dec, tir.Select(mask(0), coef(0), zero), [into(0)])
    else:
        T.buffer_store(dec, tir.Select(mask(0), zero, coef(0)), [into(0)])  # sign plane inverted

    if kern.hi:  # the low codes start at their first plane
        T.buffer_store(dec, tir.Select(mask(first_low), coef(first_low), zero), [at])
    for i in range(1, fmt.bits):
        if kern.hi and i == first_low:
            continue
        T.buffer_store(dec, dec[into(i)] + tir.Select(mask(i), coef(i), zero), [into(i)])


def _unsigned_shift(fmt: BitplaneFormat) -> int:
    """``sum_k x u - acc``: ``2^(k-1) rowsum`` for two's complement, 0 for bipolar and offset binary."""
    return 2 ** (fmt.bits - 1) if fmt.weight_signed else 0


@dataclass
class Kernel:
    """The buffers and sizes the row loops read: made by :func:`prepare_kernel`, with ``acc`` and
    ``decoded`` (registers of one parallel task) set by the caller."""

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
    code_sum: tir.Buffer | None = None
    #: Whole 512-input blocks (0: K < 512, the tile's rows go side by side chunk by chunk).
    blocks: int = 0
    #: Blocks take the GFNI decode (else the masked-add decode, chunk by chunk).
    gfni: bool = False
    #: The ``bitlayers`` argument (read at run time: the planes past it get coefficient 0).
    layers: tir.PrimExpr | None = None
    #: Decoded bytes are ``2^(8-k) u / |c|`` (:func:`scaled_codes`), else ``u``.
    scaled: bool = True
    #: Instruction set of the dot products: ``"avx512"`` (``vpdpbusd`` on zmm), ``"avxvnni"``
    #: (on ymm) or ``"avx2"`` (:func:`dot`).
    isa: str = "avx512"
    #: Split codes (:func:`split_codes`): nonzero, and after :func:`decode_scratch` the offset of
    #: the high codes in ``decoded``; 0: one code per weight.
    hi: int = 0

    @property
    def chunks(self) -> int:
        """64-input chunks of a row, the partial last one included."""
        return self.full_chunks + self.tail

    @property
    def words(self) -> int:
        """32-bit words of a row's plane."""
        return self.full_chunks * 2 + self.tail

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weight planes."""
        return self.n_out * self.words * 4 * self.fmt.bits

    @property
    def streams(self) -> bool:
        """Whether the GFNI block loops prefetch the planes ahead (:func:`prefetch_ahead`): on
        AVX-512, for layers of at least :data:`PREFETCH_AHEAD_MIN_BYTES`. The AVX2 masked-add
        decode is bound by its instructions, not by memory (AVX2 build, 4096x4096 W4: 0.93-0.99x
        with it); the ymm GFNI decode (AVX-VNNI) is left without, not measured."""
        return self.gfni and self.isa == "avx512" and self.weight_bytes >= PREFETCH_AHEAD_MIN_BYTES

    @property
    def gfni_width(self) -> int:
        """Bytes per vector of the GFNI block decode: zmm on AVX-512, else ymm (two halves a block)."""
        return 64 if self.isa == "avx512" else 32

    @property
    def dword(self) -> bool:
        """The ymm kernels (:data:`YMM_ISAS`): chunks decoded from dword broadcasts
        (:func:`dword_lane_weights`), the activation codes in that order."""
        return self.isa in YMM_ISAS


def prepare_kernel(
    T,
    fmt: BitplaneFormat,
    n_out: int,
    k_dim: int,
    batch,
    wp: tir.Buffer,
    out: tir.Buffer,
    w_scale: tir.Buffer | None,
    bias: tir.Buffer | None,
    layers: tir.Var,
    gfni: bool,
    x: tir.Buffer | None = None,
    packed: tuple | None = None,
    isa: str = "avx512",
) -> Kernel:
    """Step 1 of a kernel body: the activation rows as int8 codes, once per call.

    The code sum undoes the unsigned weight shift; for packed rows it is summed here, not taken
    from ``rowsum``, so the result depends on ``rowsum`` exactly as the TE kernel's does (only
    through the offset/epilogue). With whole blocks and ``gfni`` the dot products read the codes
    in the GFNI decode's order (:func:`_block_order`).

    Parameters
    ----------
    T : the TVMScript IR builder (``tvm.script.ir_builder.tirx``), inside a ``prim_func``
    fmt : BitplaneFormat
        Must pass :func:`pbtvm.ops.pb_vnni.unsupported_reason` at ``k_dim``.
    n_out, k_dim : int
        N and unpadded K.
    batch : PrimExpr
        Activation rows.
    wp : tir.Buffer, uint32, ``fmt.weight_shape(N, K)``
    out : tir.Buffer, [B, N]
        Receives the results: float32 (the epilogue of :func:`pbtvm.ops.pb_dense`) where
        ``w_scale`` is given, else the int32 integer product.
    w_scale : tir.Buffer or None, float32, ``fmt.scale_shape(N)``
    bias : tir.Buffer or None, float32, [N]
    layers : tir.Var, int64
        ``bitlayers``.
    gfni : bool
        Whether the CPU has GFNI (the block decode).
    x : tir.Buffer, float32, [B, K], optional
        Float rows, quantized here exactly as :func:`pbtvm.ops.act_quantize_pack` does (row
        scales and code sums made here too).
    packed : tuple, optional
        Else ``(xp, x_scale, rowsum)``: the rows as activation planes.
    isa : str
        ``"avx512"``, ``"avxvnni"`` or ``"avx2"`` (:func:`dot`; AVX2 decodes plain codes ``u``
        and has no GFNI decode).

    Returns
    -------
    Kernel
        What the row loops read; its ``acc`` and ``decoded`` are still to be allocated (per
        parallel task, by the caller).
    """
    words = fmt.words(k_dim)
    scaled = scaled_codes(fmt, k_dim) and isa != "avx2"  # AVX2's int16 pair sums need plain codes
    full_chunks, tail = divmod(words, 2)
    chunks = full_chunks + tail
    blocks = words // BLOCK_WORDS
    gfni = gfni and scaled and blocks > 0  # the GFNI decode yields scaled bytes
    codes = T.alloc_buffer((batch, chunks * CHUNK), "int8")
    natural = (
        T.alloc_buffer((batch, chunks * CHUNK), "int8") if gfni or isa in YMM_ISAS else codes
    )  # reordered (Kernel.dword)
    if x is not None:
        x_scale, rowsum = T.alloc_buffer((batch,), "float32"), T.alloc_buffer((batch,), "int32")
        xp = None
    else:
        xp, x_scale, rowsum = packed
    kern = Kernel(fmt, n_out, full_chunks, tail, wp, codes, rowsum, out, x_scale, w_scale, bias)
    kern.blocks, kern.gfni, kern.layers, kern.scaled, kern.isa = blocks, gfni, layers, scaled, isa
    kern.hi = int(split_codes(fmt, isa))
    kern.coef = T.alloc_buffer((fmt.bits,), "uint8")
    for i, value in enumerate(_code_bytes(fmt, scaled)[0]):  # planes past bitlayers add 0
        if kern.hi and i < fmt.bits - SPLIT_LOW_PLANES:
            value >>= SPLIT_LOW_PLANES  # a high code's plane: 16 times its coefficient in u
        T.buffer_store(kern.coef, tir.Select(layers > i, tir.const(value, "uint8"), tir.const(0, "uint8")), [i])
    kern.code_sum = rowsum if x is not None else T.alloc_buffer((batch,), "int32")
    with T.serial(0, batch) if x is not None else T.parallel(0, batch) as r:
        row_codes(T, fmt, r, k_dim, natural, chunks, x=x, x_scale=x_scale, xp=xp)
        sum_codes(T, natural, r, kern.code_sum, chunks * CHUNK)
        if gfni:
            _block_order(T, kern, natural, codes, r, chunks)
        elif kern.dword:
            _chunk_order(T, natural, codes, r, range(chunks))
    return kern


def _chunk_order(T, natural, codes, r, chunks) -> None:
    """Row ``r``'s codes of ``chunks`` (a range, or a loop's extent) in the dword-broadcast
    decode's lane order (:func:`dword_lane_weights`)."""
    order = [tir.IntImm("int32", w) for w in dword_lane_weights()]
    with T.serial(chunks.start, chunks.stop) as c:
        at = tir.Ramp(c * CHUNK, 1, CHUNK)
        T.buffer_store(codes, tir.Shuffle([natural[r, at]], order), [r, at])


def _block_order(T, kern: Kernel, natural, codes, r, chunks: int) -> None:
    """Row ``r``'s codes in the GFNI decode's order (:func:`block_permutation` at the kernel's
    vector width) for whole blocks, after them in the order of the masked-add decode of the
    kernel's instruction set: 8-byte moves and shuffles, once per row and call."""
    perm = block_permutation(kern.fmt.bits, kern.gfni_width)
    with T.serial(0, kern.blocks) as blk:
        base = blk * BLOCK
        for q in range(64):
            T.buffer_store(
                codes, natural[r, tir.Ramp(base + 8 * int(perm[q]), 1, 8)], [r, tir.Ramp(base + 8 * q, 1, 8)]
            )
    tail = range(kern.blocks * BLOCK // CHUNK, chunks)
    if kern.dword and len(tail):
        _chunk_order(T, natural, codes, r, tail)
        return
    for c in tail:
        at = tir.Ramp(c * CHUNK, 1, CHUNK)
        T.buffer_store(codes, natural[r, at], [r, at])


def side_by_side(kern: Kernel, b_rows: int) -> int:
    """Output rows :func:`block_rows` runs side by side: :data:`ROWS_SIDE_BY_SIDE` for one
    activation row, one block and up to :data:`SIDE_BY_SIDE_BITS` weight bits (AVX-512 only),
    else 1."""
    one_block = kern.blocks == 1 and kern.fmt.bits <= SIDE_BY_SIDE_BITS
    if kern.isa in YMM_ISAS:  # no gain there (one thread, batch 1: 512x784 W4 49 vs 39 µs, 2600x650
        return 1  # 132 vs 134, 512x512 W2 16.1 vs 15.5) for about 1 s more LLVM time per kernel
    return ROWS_SIDE_BY_SIDE if b_rows == 1 and one_block else 1


def block_slots(batch_tile: int) -> int:
    """int32x16 accumulators :func:`block_rows` needs at up to ``batch_tile`` activation rows."""
    return max(ROWS_SIDE_BY_SIDE, *(b * max(1, ACC_CHAINS // b) for b in range(1, batch_tile + 1)))


def block_codes(kerns: list) -> int:
    """Bytes of decode buffer :func:`block_rows` needs for ``kerns`` (legs sharing it): one
    512-input block with GFNI, else one chunk group (:data:`CHUNK_GROUP`; rows side by side take
    turns). Under TVM's 1 KiB stack limit with split codes too (:data:`~.common.CPU_SCRATCH`)."""
    return max(BLOCK if kern.gfni else CHUNK_GROUP * CHUNK for kern in kerns)


def block_rows(T, kern: Kernel, n0, count, b0, b_rows: int) -> None:
    """Output rows ``n0 .. n0 + count`` x activation rows ``b0 ..`` (``b_rows``), in order: one
    after another, or :func:`side_by_side` at a time (:func:`_row_by_blocks`).

    Parameters
    ----------
    T : the TVMScript IR builder (``tvm.script.ir_builder.tirx``)
    kern : Kernel
        From :func:`prepare_kernel`, with ``acc`` (:func:`block_slots` int32x16 slots) and
        ``decoded`` (:func:`block_codes` bytes) allocated by the caller (:func:`decode_scratch`).
    n0, count : PrimExpr or int
        First output row and how many (``n0 + count <= N``).
    b0 : PrimExpr
        First activation row.
    b_rows : int
        Activation rows (1..:data:`pbtvm.ops.pb_vnni.MAX_BLOCK_BATCH_TILE`).

    Any K works: whole blocks first, then the 64-input chunks after them (below one block, only
    chunks).
    """
    side = side_by_side(kern, b_rows)
    if side > 1:
        with T.serial(0, count // side) as p:
            _row_by_blocks(T, kern, [n0 + p * side + r for r in range(side)], b0, b_rows)
    if side == 1 or not isinstance(count, int) or count % side:
        with T.serial(count // side * side if side > 1 else 0, count) as r:
            _row_by_blocks(T, kern, [n0 + r], b0, b_rows)


def _row_by_blocks(T, kern: Kernel, rows: list, b0, b_rows: int) -> None:
    """Output rows ``rows`` x activation rows ``b0 ..`` (``b_rows``): whole blocks, then the last chunks.

    Each plane is read front to back (in large layers prefetched ahead, :func:`prefetch_ahead`;
    the ymm masked-add decode relies on the hardware prefetchers). With GFNI, per block and output row one 64-byte load per kept plane and
    :func:`decode_block`, then ``8 b_rows`` dot products; the chunks after the last block (every
    chunk without GFNI) go in groups of :data:`CHUNK_GROUP` (:func:`_chunk_group`), the last
    ones and the partial chunk straight-line. One output row keeps ``split`` accumulators per
    activation row (short dependency chains at small batches); several rows (batch 1) one each, the rows' chains side by side,
    and their sums are reduced together (:func:`_lane_sums`): the per-row horizontal sum was a
    quarter of a short row's vector instructions.
    """
    n_rows = len(rows)
    if n_rows > 1 and b_rows != 1:
        raise ValueError("output rows side by side are for one activation row")
    split = max(1, ACC_CHAINS // b_rows) if n_rows == 1 else 1
    slot = accumulators(T, kern, n_rows, b_rows, split)
    start = 0  # first chunk the masked-add decode takes
    if kern.gfni:
        per_block = BLOCK // CHUNK
        with T.serial(0, kern.blocks) as blk:
            for r, row in enumerate(rows):
                prefetch_ahead(T, kern, row, blk * BLOCK_WORDS)
                gfni_block(T, kern, row, blk, kern.decoded, 0)
                for c in range(per_block):  # consecutive dot products update different accumulators
                    for b in range(b_rows):
                        dot(T, kern, slot[r][b][c % split], decoded_at(c), b0 + b, blk * BLOCK + c * CHUNK)
        start = kern.blocks * per_block
    chunk_groups(T, kern, start, lambda group, full: _chunk_group(T, kern, rows, slot, b0, group, full))
    if n_rows == 1:
        store(T, kern, [slot[0][b] for b in range(b_rows)], split, rows[0], b0, False)
        return
    # the rows are consecutive: one vector epilogue for all four
    sums = _lane_sums([kern.acc[slot[r][0][0]] for r in range(n_rows)])
    store_total(T, kern, sums, tir.Ramp(rows[0], 1, n_rows), b0)


def accumulators(T, kern: Kernel, n_rows: int, b_rows: int, split: int) -> list:
    """Zeroed int32x16 slots of ``kern.acc``: ``[r][b][s]``, ``split`` for output row ``r`` x
    activation row ``b``."""
    lanes = CHUNK // 4
    slot = [
        [[tir.Ramp(((r * b_rows + b) * split + s) * lanes, 1, lanes) for s in range(split)] for b in range(b_rows)]
        for r in range(n_rows)
    ]
    for ramp in (s for row in slot for group in row for s in group):
        T.buffer_store(kern.acc, tir.Broadcast(tir.const(0, "int32"), lanes), [ramp])
    return slot


def batch_tiles(T, batch, tile: int, body) -> None:
    """``body(b0, rows)`` for every tile of up to ``tile`` activation rows: straight-line code per
    rows left (``rows`` an int), so the loops inside have no branch."""
    with T.serial(0, (batch + (tile - 1)) // tile) as bt:
        left = batch - bt * tile
        for rows in range(tile, 0, -1):
            with T.If(left >= rows if rows == tile else left == rows):
                with T.Then():
                    body(bt * tile, rows)


def decoded_at(j: int) -> tir.Ramp:
    """Where chunk ``j`` of a block or chunk group is decoded in ``kern.decoded``."""
    return tir.Ramp(j * CHUNK, 1, CHUNK)


def chunk_groups(T, kern: Kernel, start: int, body, size: int = CHUNK_GROUP) -> None:
    """Chunks ``start ..`` of a row in groups: ``body(chunks, full)`` (chunk indices and whether each
    is whole) inside a loop over groups of ``size`` whole chunks (default :data:`CHUNK_GROUP`),
    then once for the whole chunks left and the partial one (straight-line code)."""
    groups = (kern.full_chunks - start) // size
    if groups:
        with T.serial(0, groups) as g:
            body([start + g * size + j for j in range(size)], [True] * size)
    last = range(start + groups * size, kern.chunks)
    if last:
        body(list(last), [c < kern.full_chunks for c in last])


def _chunk_group(T, kern: Kernel, rows: list, slot: list, b0, chunks: list, full: list[bool]) -> None:
    """Masked-add decode of ``chunks`` (indices, :data:`CHUNK_GROUP` at most) of each row in
    ``rows``, then their dot products with the activation rows (``slot[r][b]``: row ``r``'s
    accumulators for activation row ``b0 + b``, used in turn). The rows reuse the decode slots
    (straight-line code: LLVM keeps the codes in registers, no false dependency)."""
    for r, row in enumerate(rows):
        for j, c in enumerate(chunks):
            decode_chunk(T, kern, row, c, full[j], decoded_at(j))
        for j, c in enumerate(chunks):  # consecutive dot products update different accumulators
            for b, accumulators in enumerate(slot[r]):
                dot(T, kern, accumulators[j % len(accumulators)], decoded_at(j), b0 + b, c * CHUNK)


def _lane_sums(vectors: list) -> tir.PrimExpr:
    """The lane sums of four int32x16 vectors as one int32x4: 13 shuffles and adds instead of 4 x 9.

    Interleave a, b (and c, d) within each 128-bit lane and add: pairs of partial sums; interleave
    those by 64 bits and add: each 128-bit lane holds ``[a, b, c, d]`` of that lane; then add the
    four 128-bit lanes.
    """
    if len(vectors) != 4:
        raise ValueError("_lane_sums reduces four vectors")

    def shuffle(vectors: list, pick) -> tir.PrimExpr:
        return tir.Shuffle(vectors, [tir.IntImm("int32", i) for i in pick])

    def lanes(pattern: list[int]) -> list[int]:  # one 128-bit lane's picks, for all four lanes
        return [4 * lane + p for lane in range(4) for p in pattern]

    lo32, hi32 = lanes([0, 16, 1, 17]), lanes([2, 18, 3, 19])
    lo64, hi64 = lanes([0, 1, 16, 17]), lanes([2, 3, 18, 19])
    a, b, c, d = vectors
    ab = shuffle([a, b], lo32) + shuffle([a, b], hi32)
    cd = shuffle([c, d], lo32) + shuffle([c, d], hi32)
    per_lane = shuffle([ab, cd], lo64) + shuffle([ab, cd], hi64)
    halves = shuffle([per_lane], range(8)) + shuffle([per_lane], range(8, 16))
    return shuffle([halves], range(4)) + shuffle([halves], range(4, 8))


def gfni_block(T, kern: Kernel, row, blk, into: tir.Buffer, at) -> None:
    """GFNI decode of block ``blk`` of ``row`` (:func:`~pbtvm.ops.gfni_decode.decode_block`, on
    ymm two 256-input halves one after the other) into ``into[at : at + 512]``, in the order of
    :func:`~pbtvm.ops.gfni_decode.block_permutation` at the kernel's width."""
    width = kern.gfni_width
    for h in range(BLOCK // 8 // width):  # a plane's block is BLOCK / 8 bytes: one zmm, two ymm
        planes = [_block_plane(kern, i, row, blk, h) for i in range(kern.fmt.bits)]
        # each part's 8 code vectors hold its 8 * width inputs, the parts one after the other
        for v, code in enumerate(decode_block(kern.fmt, planes, bind=T.Bind, width=width)):
            T.buffer_store(into, code, [tir.Ramp(at + (8 * h + v) * width, 1, width)])


def prefetch_ahead(T, kern: Kernel, row, word) -> None:
    """Where ``kern`` streams its weights (:attr:`Kernel.streams`): prefetch into L2 each kept
    plane's line :data:`PREFETCH_AHEAD` bytes past word ``word`` of ``row`` (a later row's, since
    a plane's rows follow each other; clamped to the planes' last word).

    In the ``kNW`` layout each plane is a stream of its own (``NkW`` interleaves a row's planes;
    the same addresses, not measured). One prefetch per block: in rows with chunks after their
    last block, those chunks' lines are left to the hardware. Measured on a 2-core Zen 4 guest
    with weights from memory (BENCHMARKS.md, twenty-second session): W4 1.2-1.6x at batch 1-16
    on 4096x4096 and 11008x4096 while the neighbours loaded the memory, level with them quiet.
    """
    if not kern.streams:
        return
    last = math.prod(int(d) for d in kern.wp.shape) - 1
    for i in range(kern.fmt.bits):
        at = tir.min(plane_offset(kern, i, row, word) + PREFETCH_AHEAD // 4, last)
        if i == 0:
            prefetch_into_l2(T, kern.wp, at)
            continue
        with T.If(kern.layers > i):
            with T.Then():
                prefetch_into_l2(T, kern.wp, at)


def plane_offset(kern: Kernel, i: int, row, word) -> tir.PrimExpr:
    """Element offset of word ``word`` of ``row`` in plane ``i`` from the start of ``kern.wp``."""
    return kern.wp.offset_of((*kern.fmt.weight_index(i, row, 0)[:2], word))[0] - kern.wp.elem_offset


def prefetch_into_l2(T, buf: tir.Buffer, offset) -> None:
    """Prefetch the line of ``buf``'s element ``offset`` (from its start) into L2 (``prefetcht1``)."""
    l2 = (tir.const(0, "int32"), tir.const(2, "int32"), tir.const(1, "int32"))  # read, L2, data
    T.evaluate(tir.call_llvm_intrin("void", "llvm.prefetch.p0", buf.access_ptr("r", offset=offset), *l2))


def _block_plane(kern: Kernel, i: int, row, blk, half: int = 0) -> tir.PrimExpr:
    """Plane ``i`` of ``row`` in block ``blk`` as :attr:`Kernel.gfni_width` bytes (on ymm its
    ``half``); zero past ``bitlayers`` (read at run time: the dropped planes are not loaded).
    Plane 0 is always kept."""
    width = kern.gfni_width
    words = width // 4
    first = blk * BLOCK_WORDS + half * words
    load = tir.reinterpret(
        f"uint8x{width}", kern.wp[(*kern.fmt.weight_index(i, row, 0)[:2], tir.Ramp(first, 1, words))]
    )
    if i == 0:
        return load
    return tir.if_then_else(kern.layers > i, load, tir.Broadcast(tir.const(0, "uint8"), width))


def decode_chunk(T, kern: Kernel, row, c, full: bool, at) -> None:
    """Masked-add decode of chunk ``c`` of ``row`` into ``kern.decoded[at]`` (every plane, those
    past ``bitlayers`` adding their zeroed coefficient)."""
    fmt = kern.fmt

    def word(i: int) -> tir.PrimExpr:
        if kern.dword:  # the two plane words, each broadcast from memory
            index = fmt.weight_index(i, row, 0)[:2]
            low = kern.wp[(*index, c * 2)]
            high = kern.wp[(*index, c * 2 + 1)] if full else tir.const(0, "uint32")
            return low, high
        return qword(kern.wp, fmt.weight_index(i, row, 0)[:2], c, full)

    masked_add_decode(T, kern, at, word)


def dot(T, kern: Kernel, slot, code_at: tir.Ramp, b, at) -> None:
    """``acc[slot] += dot(decoded[code_at] bytes, activation row b's codes at ``at``)``: one
    ``vpdpbusd`` (AVX-512), two on ymm (AVX-VNNI, each half into 8 of the slot's lanes), or on
    AVX2 per 32 bytes a ``vpmaddubsw`` (int16 pair sums, exact for codes up to
    :func:`madd_exact`) and a ``vpmaddwd`` (int32); where two halves' pair sums fit
    int16 together they are added first, one ``vpmaddwd`` for both. Split codes (8-bit weights on
    AVX2) multiply the low and the high codes alike, the high ones' ``vpmaddwd`` by 16."""
    if kern.isa == "avx512":
        u = tir.reinterpret("int8x64", kern.decoded[code_at])
        x = kern.codes[b, tir.Ramp(at, 1, CHUNK)]
        total = tir.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", kern.acc[slot], u, x)
        T.buffer_store(kern.acc, total, [slot])
        return
    half = CHUNK // 2
    if kern.isa == "avxvnni":  # each 32-byte half into its own 8 lanes (two dependency chains)
        for h in range(2):
            lanes = tir.Ramp(slot.base + h * (half // 4), 1, half // 4)
            u = tir.reinterpret("int8x32", kern.decoded[tir.Ramp(code_at.base + h * half, 1, half)])
            x = kern.codes[b, tir.Ramp(at + h * half, 1, half)]
            total = tir.call_llvm_pure_intrin("int32x8", "llvm.x86.avx512.vpdpbusd.256", kern.acc[lanes], u, x)
            T.buffer_store(kern.acc, total, [lanes])
        return

    def pair_sums(base) -> list:
        return [
            tir.call_llvm_pure_intrin(
                "int16x16",
                "llvm.x86.avx2.pmadd.ub.sw",
                tir.reinterpret("int8x32", kern.decoded[tir.Ramp(base + h * half, 1, half)]),
                kern.codes[b, tir.Ramp(at + h * half, 1, half)],
            )
            for h in range(2)
        ]

    def widened(pairs: list, factor: int) -> tir.PrimExpr:
        return tir.call_llvm_pure_intrin(
            "int32x8", "llvm.x86.avx2.pmadd.wd", pairs, tir.Broadcast(tir.const(factor, "int16"), half // 2)
        )

    if kern.hi:  # u = 16 u_hi + u_lo: pair sums up to 2 * 15 * 127 each, both halves added in int16
        low, high = pair_sums(code_at.base), pair_sums(code_at.base + kern.hi)
        words = widened(low[0] + low[1], 1) + widened(high[0] + high[1], 2**SPLIT_LOW_PLANES)
    elif 2 * pair_bound(kern.fmt) <= INT16_MAX:
        pairs = pair_sums(code_at.base)
        words = widened(pairs[0] + pairs[1], 1)
    else:
        pairs = [widened(p, 1) for p in pair_sums(code_at.base)]
        T.buffer_store(
            kern.acc, kern.acc[slot] + tir.Shuffle(pairs, [tir.IntImm("int32", i) for i in range(16)]), [slot]
        )
        return
    T.buffer_store(kern.acc, kern.acc[_half_slot(slot)] + words, [_half_slot(slot)])


def store(T, kern: Kernel, slots: list, split: int, n, b0, guard: bool) -> None:
    """Reduce the accumulators of output row ``n`` (``slots[b]``: ``split`` of them, or one) and
    store them (only where ``n < N`` with ``guard``: the last tile's rows past N)."""
    with T.If(n < kern.n_out) if guard else contextlib.nullcontext():
        with T.Then() if guard else contextlib.nullcontext():
            for b, group in enumerate(slots):
                parts = group if split > 1 else [group]
                vec = kern.acc[parts[0]]
                for part in parts[1:]:
                    vec = vec + kern.acc[part]
                total = tir.call_llvm_pure_intrin("int32", "llvm.vector.reduce.add.v16i32", vec)
                store_total(T, kern, total, n, b0 + b)


def store_total(T, kern: Kernel, total: tir.PrimExpr, n, row) -> None:
    """Store output ``[row, n]`` from its decoded-byte dot product ``total`` (int32; with ``n`` a
    ``Ramp`` of consecutive output rows, ``total`` an int32 vector of as many lanes).

    The bytes are ``2^(8-k) u / |c|`` (:func:`code_scale`, exactly divisible): back to ``sum u x``,
    then undo the unsigned shift of two's complement codes and apply the epilogue.
    """
    fmt = kern.fmt
    _, scale_shift, factor = _code_bytes(fmt, kern.scaled)
    rs = kern.rowsum[row]
    product = tir.shift_right(total, tir.const(scale_shift, "int32")) * tir.const(factor, "int32")
    exact = product - tir.const(_unsigned_shift(fmt), "int32") * kern.code_sum[row]
    x_scale = None if kern.x_scale is None else kern.x_scale[row]
    T.buffer_store(kern.out, output_value(fmt, exact, rs, x_scale, kern.w_scale, n, kern.bias, kern.layers), [row, n])
