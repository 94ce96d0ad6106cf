"""CUDA activation quantize + pack in one launch with ``__ballot_sync`` (one instruction per plane per word).

Used with the binary-tensor-core layout (``mma16x256``) in place of the three-launch pack of
:mod:`.cuda` (~10 us on an H100 at batch 1, BENCHMARKS.md). A block per batch row: the threads
reduce max |x| (warp shuffles, then the warps' results through shared memory), then each warp
takes 32 consecutive activations at a time, quantizes one per lane exactly as
:func:`pbtvm.ops.act_quantize_pack` (so as :func:`pbtvm.quantize.quantize_activations`), and
builds the word of every plane with one ``__ballot_sync``; lane ``p`` stores plane ``p``'s word.
The code sum is a second block reduction, the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.script import tirx as T

from pbtvm import names
from pbtvm._tvm import s_tir, tir
from pbtvm.bitplane import MMA_LAYOUT, MMA_TILE_WORDS, WORD_BITS, BitplaneFormat, act_column_stride
from pbtvm.ops.common import act_code, act_inverse, act_magnitude, act_prescale, act_scale, shfl_xor

from .cuda_pdl import declare_early_reads, let_next_start, wait_for_previous
from .rules import ScheduleRule, format_of

#: Most warps a pack block uses (512 threads).
MAX_WARPS = 16
#: Lanes of a warp: one per bit of a packed word (``__ballot_sync`` gathers one bit per lane into
#: a word). :class:`CUDABallotPack` checks that the target's warp size is this.
LANES = WORD_BITS


def pack_warps(k_dim: int) -> int:
    """Warps per block: a power of two (tree reductions), about 16 words per warp, 2..:data:`MAX_WARPS`."""
    want = -(-BitplaneFormat.words(k_dim) // 16)
    warps = 2
    while warps < min(want, MAX_WARPS):
        warps *= 2
    return warps


#: Most activations a thread of the one-launch pack holds in registers (:func:`row_pack`'s
#: ``prefetch_max``): all its loads are issued at once. Loaded one chunk at a time, between the
#: ballots, a batch-1 row took 5 us at K = 4096 and 19 us at K = 11008 on an H200.
PREFETCH_MAX = 32
#: The same for kernels that pack in the block before their BMMA products (one-launch dense
#: layers, the LSTM step): fewer, since their register budget is tight (the registers are free
#: again before the products). The W4 2x650 LSTM step took 10.7 us on an H200 with its two
#: 650-wide rows read a chunk at a time, 24 dependent L2 reads.
FUSED_PREFETCH_MAX = 8


def _add(a, b):
    return a + b


@T.macro
def warp_reduce(v, op, dtype):
    """``v[0] = op`` over the warp's lanes (a butterfly of shuffles: every lane gets the result);
    ``v`` a one-element local of ``dtype``."""
    for lvl in T.unroll(LANES.bit_length() - 1):
        v[0] = op(v[0], shfl_xor(dtype, v[0], LANES >> (lvl + 1)))


@dataclass(frozen=True)
class RowPackPhases:
    """The phases of :func:`row_pack` as TVMScript macros, for a caller that packs several rows
    with one barrier chain (the LSTM step packs its ``h`` and ``x`` rows together: both rows'
    loads in flight at once, and one barrier a phase for both).

    For one row, with the buffers of :func:`row_pack` and one-element locals ``amax`` (float32),
    ``xv`` (float32, :attr:`held` elements) per row, every thread of the block:
    ``load(x, b, warp, tx, xv)`` (nothing unless ``held``); ``warp_max(x, b, warp, tx, xv, red,
    best)``; barrier; ``codes(x, b, dest, row, warp, tx, xv, red, sums, amax, best, total, code,
    vote)``; barrier; ``finish(row, scale_out, sum_out, warp, tx, red, sums, amax, total)``;
    barrier (before ``dest`` is read or ``red`` and ``sums`` are reused). ``total`` and ``amax``
    must stay the row's own from ``codes`` to ``finish``.
    """

    load: object
    warp_max: object
    codes: object
    finish: object
    held: int  # activations a thread holds in registers (1, unused, when it reads them twice)


def row_pack_phases(
    fmt: BitplaneFormat,
    k_dim: int,
    warps: int,
    prefetch_max: int = 0,
    one_store: bool = False,
    act_order: bool = False,
) -> RowPackPhases:
    """The phases of :func:`row_pack` (same arguments), for callers that interleave rows."""
    n_act, words = fmt.act_bits, fmt.words(k_dim)
    if act_order and not one_store:
        raise ValueError("act_order stores with one_store (a lane a plane, the padding planes' lanes zeros)")
    # lanes that store a word: one a plane, and in the packed activations' order (act_order) the
    # zero padding planes of the mma16x256 layout too
    storing = act_column_stride(n_act) if act_order and fmt.layout == MMA_LAYOUT else n_act

    def dest_index(plane, row, word):
        return fmt.act_index(plane, row, word) if act_order else (plane, row, word)

    qmax = float(fmt.act_qmax)
    acc_t = fmt.accumulator_dtype(k_dim)
    threads = LANES * warps
    rounds = -(-k_dim // threads)
    chunks = -(-words // warps)

    held = rounds <= prefetch_max  # rounds == chunks: round r is chunk r's element

    @T.macro
    def word(value, c, dest, row, warp, tx, amax, best, total, code, vote):
        """Quantize ``value`` (the lane's activation of chunk ``c``) and store the chunk's words."""
        if c * warps + warp < words:  # warp-uniform: every lane reaches the ballots
            kk = T.meta_var((c * warps + warp) * WORD_BITS + tx)
            clamped = T.meta_var(act_code(value, act_prescale(amax[0]), best[0], qmax))
            code[0] = T.if_then_else(kk < k_dim, T.Cast("int32", clamped), 0)
            total[0] = total[0] + T.Cast(acc_t, code[0])
            # Every lane votes for every plane (the word goes to a register first, so that the
            # ballot is not sunk into a one-lane branch). With ``one_store`` each lane keeps
            # plane tx's word (a select) and lanes below act_bits store theirs, one store a
            # lane: a global store per plane, each in a one-lane branch with its own address,
            # made the standalone pack instruction-bound (~19 instructions a plane; a batch-1
            # row of 11008 took 15 us on one SM of an H200). Otherwise lane p stores plane p's
            # word (to shared memory, in the kernels that pack in the block, where the select
            # cost a W8 kernel 2 bytes of spills under its declared register budget).
            for p in T.unroll(n_act):
                vote[0] = T.call_extern(
                    "uint32",
                    "__ballot_sync",
                    T.uint32(0xFFFFFFFF),
                    T.bitwise_and(T.shift_right(code[0], n_act - 1 - p), 1) != 0,
                )
                if one_store and p == 0:
                    vote[1] = vote[0]
                elif one_store:
                    vote[1] = T.Select(tx == p, vote[0], vote[1])
                elif tx == p:
                    dest[p, row, c * warps + warp] = vote[0]
            if one_store and storing > n_act:
                if tx < storing:
                    dest[dest_index(tx, row, c * warps + warp)] = T.if_then_else(tx < n_act, vote[1], T.uint32(0))
            elif one_store and tx < n_act:
                dest[dest_index(tx, row, c * warps + warp)] = vote[1]

    @T.macro
    def block_max(red, amax):
        amax[0] = red[0]
        for w in T.unroll(1, warps):
            amax[0] = T.max(amax[0], red[w])

    @T.macro
    def load(x, b, warp, tx, xv):
        if held:
            for r in T.unroll(rounds):
                xv[r] = x[b, T.min(r * threads + warp * LANES + tx, k_dim - 1)]

    @T.macro
    def warp_max(x, b, warp, tx, xv, red, best):
        best[0] = T.float32(0)
        if held:
            for r in T.unroll(rounds):
                if r * threads + warp * LANES + tx < k_dim:
                    best[0] = T.max(best[0], act_magnitude(xv[r]))
        else:
            for r in range(rounds):
                if r * threads + warp * LANES + tx < k_dim:
                    best[0] = T.max(best[0], act_magnitude(x[b, r * threads + warp * LANES + tx]))
        # max |x| of the block: a warp reduces with shuffles, then (after the caller's barrier)
        # every thread takes the max of the warps' results from shared memory: one barrier (a
        # tree through shared memory took one per level, 7 at 128 threads). Exact in any order.
        warp_reduce(best, T.max, "float32")
        if tx == 0:
            red[warp] = best[0]

    @T.macro
    def codes(x, b, dest, row, warp, tx, xv, red, sums, amax, best, total, code, vote):
        block_max(red, amax)
        total[0] = T.Cast(acc_t, 0)
        # the row's inverse scale once, in a register (recomputed from shared memory in every
        # chunk, with the prescale, the fused BMMA kernel spilled)
        best[0] = act_inverse(amax[0], qmax)
        if held:
            for c in T.unroll(chunks):
                word(xv[c], c, dest, row, warp, tx, amax, best, total, code, vote)
        else:
            for c in range(chunks):
                kk = T.meta_var((c * warps + warp) * WORD_BITS + tx)
                word(x[b, T.min(kk, k_dim - 1)], c, dest, row, warp, tx, amax, best, total, code, vote)
        # the code sum likewise (integers: exact in any order); only thread 0 needs it
        warp_reduce(total, _add, acc_t)
        if tx == 0:
            sums[warp] = total[0]

    @T.macro
    def finish(row, scale_out, sum_out, warp, tx, red, sums, amax, total):
        if warp * LANES + tx == 0:
            for w in T.unroll(1, warps):
                total[0] = total[0] + sums[w]
            sum_out[row] = total[0]
            # the max read again from red (the same value as amax): red stays live, so TVM does
            # not give sums red's memory, which cost a barrier before the sums were stored
            block_max(red, amax)
            scale_out[row] = act_scale(amax[0], qmax)

    return RowPackPhases(load, warp_max, codes, finish, rounds if held else 1)


def row_pack(
    fmt: BitplaneFormat, k_dim: int, warps: int, prefetch_max: int = 0, one_store: bool = False, act_order: bool = False
):
    """A TVMScript macro: the block (``warps`` warps) quantizes and packs one activation row.

    ``pack(x, b, dest, row, scale_out, sum_out, warp, tx, red, sums, best, total, code, vote)``
    reads ``x[b, :]`` and writes ``dest[plane, row, word]``, ``scale_out[row]`` and
    ``sum_out[row]`` exactly as :func:`pbtvm.ops.act_quantize_pack`. ``warp`` is the warp's index in
    the block, ``tx`` the lane; ``red`` (float32) and ``sums`` (accumulator dtype) are shared
    buffers of at least one element per warp (the warps' max and code sum), ``best``, ``total``,
    ``code`` one-element locals, ``vote`` a two-element local (uint32).
    Every thread of the block must call it (it synchronizes the block). Where a thread has at most
    ``prefetch_max`` activations of the row, it loads them into registers first, all loads in
    flight together, and the max and the codes read them there; otherwise they are read from
    ``x`` twice, a chunk at a time (fewer registers). ``one_store``: a lane stores one word a
    chunk (its plane's, kept with a select) instead of a store per plane from lane ``p``.
    ``act_order`` (with ``one_store``): ``dest`` is the packed activations of ``fmt``
    (:meth:`~pbtvm.bitplane.BitplaneFormat.act_index`; in the ``mma16x256`` layout the lanes of
    its padding planes store zeros). The phases one after the other (:func:`row_pack_phases`).
    """
    ph = row_pack_phases(fmt, k_dim, warps, prefetch_max, one_store, act_order)

    @T.macro
    def pack(x, b, dest, row, scale_out, sum_out, warp, tx, red, sums, best, total, code, vote):
        xv = T.alloc_local((ph.held,), "float32")
        amax = T.alloc_local((1,), "float32")
        ph.load(x, b, warp, tx, xv)
        ph.warp_max(x, b, warp, tx, xv, red, best)
        T.tvm_storage_sync("shared")
        ph.codes(x, b, dest, row, warp, tx, xv, red, sums, amax, best, total, code, vote)
        T.tvm_storage_sync("shared")
        ph.finish(row, scale_out, sum_out, warp, tx, red, sums, amax, total)
        T.tvm_storage_sync("shared")  # dest is read, and red and sums are reused by the next row

    return pack


def ballot_pack_launch(fmt: BitplaneFormat, k_dim: int, programmatic: bool = False):
    """A TVMScript macro launching the one-launch ballot pack (a block per row, :func:`row_pack`):
    ``launch(x, xp, x_scale, rowsum, batch)`` with ``x`` float32 ``[batch, K]``, ``xp`` uint32
    ``fmt.act_shape(batch, K)``, ``x_scale`` float32 ``[batch]``, ``rowsum`` ``[batch]`` in
    ``fmt.accumulator_dtype(K)``. Every word of ``xp`` is written (the padding planes and words of
    the ``mma16x256`` order with zeros). ``programmatic``: the kernel waits for the one before it
    before it reads or writes anything, then lets the next one launch (:mod:`.cuda_pdl`)."""
    words = fmt.words(k_dim)
    acc_t = fmt.accumulator_dtype(k_dim)
    warps = pack_warps(k_dim)
    pack = row_pack(fmt, k_dim, warps, PREFETCH_MAX, one_store=True, act_order=True)
    # the words of the last K tile past W (mma16x256: K tiles of 8 words), zero in every stored plane
    mma = fmt.layout == MMA_LAYOUT
    pad_words = fmt.act_shape(1, k_dim)[1] * MMA_TILE_WORDS - words if mma else 0
    pad_lanes = act_column_stride(fmt.act_bits) if mma else 0
    start, wait = let_next_start(programmatic), wait_for_previous(programmatic)

    @T.macro
    def launch(x, xp, x_scale, rowsum, batch):
        for b in T.thread_binding(batch, thread="blockIdx.x"):
            for ty in T.thread_binding(warps, thread="threadIdx.y"):
                for tx in T.thread_binding(LANES, thread="threadIdx.x"):
                    red = T.alloc_shared((LANES * warps,), "float32")
                    sums = T.alloc_shared((LANES * warps,), acc_t)
                    best = T.alloc_local((1,), "float32")  # the max, then the inverse scale
                    total = T.alloc_local((1,), acc_t)
                    code = T.alloc_local((1,), "int32")
                    vote = T.alloc_local((2,), "uint32")
                    start()
                    wait()
                    if pad_words > 0 and ty == 0 and tx < pad_lanes:
                        for pw in T.unroll(pad_words):
                            xp[fmt.act_index(tx, b, words + pw)] = T.uint32(0)
                    pack(x, b, xp, b, x_scale, rowsum, ty, tx, red, sums, best, total, code, vote)

    return launch


def ballot_pack_kernel(fmt: BitplaneFormat, k_dim: int, programmatic: bool = False) -> tir.PrimFunc:
    """The one-launch ballot pack for rows of ``k_dim`` activations (:func:`ballot_pack_launch`;
    ``programmatic``: written for programmatic dependent launch, reading nothing before it waits).

    Returns
    -------
    tir.PrimFunc
        ``(x f32 [B, K], xp u32 fmt.act_shape(B, K), x_scale f32 [B], rowsum acc [B])``, symbolic
        B: the signature of :func:`pbtvm.kernels.act_pack_func`. Already scheduled. Every word of
        ``xp`` is written (the padding planes and words of the ``mma16x256`` order with zeros).
    """
    acc_t = fmt.accumulator_dtype(k_dim)
    launch = ballot_pack_launch(fmt, k_dim, programmatic)

    @T.prim_func(private=True, s_tir=True)
    def kernel(x_h: T.handle, xp_h: T.handle, xs_h: T.handle, rs_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        batch = T.int64()
        x = T.match_buffer(x_h, (batch, k_dim), "float32")
        xp = T.match_buffer(xp_h, fmt.act_shape(batch, k_dim), "uint32")
        x_scale = T.match_buffer(xs_h, (batch,), "float32")
        rowsum = T.match_buffer(rs_h, (batch,), acc_t)
        with T.sblock("root"):  # Relax expects a root block (RewriteDataflowReshape)
            launch(x, xp, x_scale, rowsum, batch)

    return declare_early_reads(kernel, [], programmatic)


class CUDABallotPack(ScheduleRule):
    """``act_pack`` for the ``mma16x256`` layout: :func:`ballot_pack_kernel` (one launch)."""

    kernel = names.KernelKind.ACT_PACK
    target_kind = "cuda"

    def matches(self, func: tir.PrimFunc) -> bool:
        """See :meth:`ScheduleRule.matches`; only packs for the ``mma16x256`` layout."""
        return super().matches(func) and str((func.attrs or {}).get(names.ATTR_LAYOUT)) == MMA_LAYOUT

    def apply(self, func: tir.PrimFunc) -> s_tir.Schedule:
        """The ballot kernel for ``func``'s format and K (see :meth:`ScheduleRule.apply`).

        Raises
        ------
        ValueError
            If the target's warp size is not :data:`LANES` (the ballot needs a lane per bit).
        """
        if self.limits.warp_size != LANES:
            raise ValueError(f"the ballot pack needs {LANES}-lane warps; the target has {self.limits.warp_size}")
        kernel = ballot_pack_kernel(format_of(func), int(func.attrs[names.ATTR_K]), self.limits.programmatic_launch)
        kernel = kernel.with_attrs(dict(func.attrs))
        return s_tir.Schedule(kernel, debug_mask=0)
