"""TIR of the pick kernel (:func:`pbtvm.sampling.pick_func`): a CPU and a CUDA schedule.

Both follow the definition in :mod:`pbtvm.sampling` step by step; the shared pieces are a
TVMScript macro (the Philox draw) and Python helpers building expressions (the NaN-aware order,
the non-finite test, the ``done`` flags).
"""

from __future__ import annotations

from tvm.script import tirx as T

from ._tvm import tir
from .errors import InputError
from .names import ATTR_LAUNCH_MIN_BLOCKS
from .ops.common import CPU_SCRATCH, shfl_up, shfl_xor
from .ops.vector_math import exp_f64
from .sampling import _M0, _M1, _W0, _W1, DONE_FINISHED, DONE_NONFINITE
from .schedules.cuda_pdl import declare_early_reads, let_next_start, wait_for_previous


@T.macro(hygienic=False)
def _philox_uniform(ph, ctrl, step, r, out, at):
    """``out[at] = philox_uniform(ctrl[0], ctrl[1] + step, r)`` using the uint32 scratch ``ph [6]``."""
    ph[0] = T.Cast("uint32", r)
    ph[1] = T.Cast("uint32", (ctrl[1] + step) & T.int64(0xFFFFFFFF))
    ph[2] = T.Cast("uint32", T.shift_right(ctrl[1] + step, T.int64(32)) & T.int64(0xFFFFFFFF))
    ph[3] = T.uint32(0)
    ph[4] = T.Cast("uint32", ctrl[0] & T.int64(0xFFFFFFFF))
    ph[5] = T.Cast("uint32", T.shift_right(ctrl[0], T.int64(32)) & T.int64(0xFFFFFFFF))
    for _rnd in T.unroll(10):  # T.Bind: immutable values (``x = e`` would be a scratch buffer)
        p0 = T.Bind(T.Cast("uint64", ph[0]) * T.uint64(_M0))
        p1 = T.Bind(T.Cast("uint64", ph[2]) * T.uint64(_M1))
        x1 = T.Bind(ph[1])
        x3 = T.Bind(ph[3])
        ph[0] = T.Cast("uint32", T.shift_right(p1, T.uint64(32))) ^ x1 ^ ph[4]
        ph[1] = T.Cast("uint32", p1 & T.uint64(0xFFFFFFFF))
        ph[2] = T.Cast("uint32", T.shift_right(p0, T.uint64(32))) ^ x3 ^ ph[5]
        ph[3] = T.Cast("uint32", p0 & T.uint64(0xFFFFFFFF))
        ph[4] = ph[4] + T.uint32(_W0)
        ph[5] = ph[5] + T.uint32(_W1)
    out[at] = (
        T.Cast("float64", T.shift_right(ph[0], T.uint32(5))) * T.float64(67108864.0)
        + T.Cast("float64", T.shift_right(ph[1], T.uint32(6)))
    ) / T.float64(9007199254740992.0)  # 2**53; TVM's CUDA codegen prints 2**-53 as 0.000


def _comes_first(value, best):
    """Whether ``value`` replaces ``best`` in an index-order scan for the first NaN, else the
    first largest value (``torch.argmax``): a NaN is never replaced and replaces any number."""
    return tir.And(tir.Not(tir.isnan(best)), tir.Or(value > best, tir.isnan(value)))


def _same_rank(a, b):
    """Equal in that order: equal numbers, or both NaN (the lower index comes first)."""
    return tir.Or(tir.EQ(a, b), tir.And(tir.isnan(a), tir.isnan(b)))


def _nonfinite(best, temp):
    """A row whose best logit is NaN, or ±inf when sampling: its token is the best index."""
    return tir.Or(tir.isnan(best), tir.And(temp[0] > T.float64(0), tir.isinf(best)))


def _new_flags(tok, best, ctrl, temp):
    """The ``done`` flags a pick adds: finished on ``eos``, non-finite (:data:`DONE_NONFINITE`)."""
    finished = tir.And(ctrl[2] >= T.int64(0), tir.EQ(tok, ctrl[2]))
    return tir.Select(finished, T.int64(DONE_FINISHED), T.int64(0)) | tir.Select(
        _nonfinite(best, temp), T.int64(DONE_NONFINITE), T.int64(0)
    )


def _with_embedding(pick: tir.PrimFunc, embedding: tuple[int, int] | None) -> tir.PrimFunc:
    """``pick`` named ``pick``; without ``embedding``, without its ``table`` and ``x_next``
    parameters (the body reads neither then)."""
    if not embedding:
        params = [p for p in pick.params if p.name not in ("table", "x_next")]
        pick = tir.PrimFunc(params, pick.body, pick.ret_type, pick.attrs)
    return pick.with_attr("global_symbol", "pick")


def _picks(forced, done_in, step, r):
    """Whether row ``r`` picks its token at ``step``: not forced, not finished."""
    return tir.And(forced[step, r] < tir.const(0, "int64"), done_in[r] & tir.const(DONE_FINISHED, "int64") == 0)


@T.macro(hygienic=False)
def _forced_or_finished(forced, done_in, ctrl, step, r, token, done_out):
    """A forced row's token is ``forced[step, r]``, a finished row's ``eos`` (``ctrl[2]``); both
    keep their ``done`` flags. Rows that pick (:func:`_picks`) are left to the caller."""
    if forced[step, r] >= T.int64(0):
        token[r] = forced[step, r]
        done_out[r] = done_in[r]
    elif done_in[r] & T.int64(DONE_FINISHED) != T.int64(0):
        token[r] = ctrl[2]
        done_out[r] = done_in[r]


#: Logits per vector in the CPU pick's scans (two ymm registers of float32).
PICK_LANES = 16


def _lanes():
    return tir.Ramp(tir.const(0, "int32"), tir.const(1, "int32"), PICK_LANES)


def _chunk(logits, r, c):
    """Logits ``16 c .. 16 c + 15`` of row ``r`` (a vector load)."""
    return logits[r, tir.Ramp(c * PICK_LANES, tir.const(1, "int64"), PICK_LANES)]  # c: int64


def _ones(mask):
    """int32 lanes: 1 where ``mask``, else 0."""
    one, zero = (tir.Broadcast(tir.const(v, "int32"), PICK_LANES) for v in (1, 0))
    return tir.Select(mask, one, zero)


def _any(lanes):
    """Whether any of 16 int32 lanes is nonzero."""
    return tir.call_llvm_pure_intrin("int32", "llvm.vector.reduce.or.v16i32", lanes) != 0


def _is_best(x, has_nan, best):
    """Logit ``x`` is the pick: a NaN if the row has one, else equal to ``best``."""
    return tir.Or(tir.And(has_nan != 0, tir.isnan(x)), tir.And(has_nan == 0, x == best))


def _are_best(x, has_nan, best):
    """:func:`_is_best` for 16 logits (a lane mask)."""
    return tir.Select(has_nan != 0, tir.isnan(x), x == tir.Broadcast(best, PICK_LANES))


@T.macro(hygienic=False)
def _first_best(logits, r, fv, iv, mx, nan, vocab):
    """``iv[0]``, ``fv[0]``: the first NaN of row ``r``, else its first largest logit (``torch.argmax``).

    One vectorized pass finds the row's max and whether it holds a NaN (a NaN lane never wins a
    ``>`` and sets the flag); a second pass finds the first index equal to the max (or the first
    NaN), 16 logits at a time until a vector holds it. A scalar scan with a compare-and-branch per
    logit took 23 µs for 10,000 logits on the 2-core EPYC. ``mx``, ``nan``: [B, 16] lanes (lane 0
    of ``nan`` then says whether the row holds a NaN).
    """
    mx[r, _lanes()] = T.broadcast(logits[r, 0], PICK_LANES)
    nan[r, _lanes()] = T.broadcast(T.int32(0), PICK_LANES)
    for c in range(T.int64(vocab // PICK_LANES)):
        mx[r, _lanes()] = T.Select(_chunk(logits, r, c) > mx[r, _lanes()], _chunk(logits, r, c), mx[r, _lanes()])
        nan[r, _lanes()] = nan[r, _lanes()] | _ones(T.isnan(_chunk(logits, r, c)))
    fv[0] = mx[r, 0]
    for j in range(1, PICK_LANES):
        if mx[r, j] > fv[0]:
            fv[0] = mx[r, j]
        nan[r, 0] = nan[r, 0] | nan[r, j]
    for i in range(T.int64(vocab - vocab % PICK_LANES), T.int64(vocab)):
        if logits[r, i] > fv[0]:
            fv[0] = logits[r, i]
        if T.isnan(logits[r, i]):
            nan[r, 0] = 1
    iv[0] = T.int64(-1)
    for c in range(T.int64(vocab // PICK_LANES)):
        if iv[0] < T.int64(0):
            if _any(_ones(_are_best(_chunk(logits, r, c), nan[r, 0], fv[0]))):
                for j in range(PICK_LANES):
                    if iv[0] < T.int64(0) and _is_best(logits[r, c * PICK_LANES + j], nan[r, 0], fv[0]):
                        iv[0] = c * PICK_LANES + j
    for i in range(T.int64(vocab - vocab % PICK_LANES), T.int64(vocab)):
        if iv[0] < T.int64(0) and _is_best(logits[r, i], nan[r, 0], fv[0]):
            iv[0] = i
    fv[0] = logits[r, iv[0]]


def _order_key(x):
    """uint32 whose unsigned order is the float32 order of ``x`` (``-0.0`` as ``+0.0``, so equal
    keys are equal numbers; no NaN reaches it: a row holding one is not sampled)."""
    zero = tir.const(0, "float32")
    bits = tir.reinterpret("uint32", tir.Select(x == zero, zero, x))
    negative = tir.shift_right(bits, tir.const(31, "uint32")) != tir.const(0, "uint32")
    return bits ^ tir.Select(negative, tir.const(0xFFFFFFFF, "uint32"), tir.const(0x80000000, "uint32"))


def _reduce_add(lanes):
    """Sum of 16 int32 lanes, int64."""
    return tir.Cast("int64", tir.call_llvm_pure_intrin("int32", "llvm.vector.reduce.add.v16i32", lanes))


def _key_value(key):
    """The float32 whose order key (:func:`_order_key`) is ``key``: NaN for keys below ``-inf``'s
    or above ``+inf``'s."""
    top = tir.const(0x80000000, "uint32")
    bits = tir.Select(key >= top, key ^ top, key ^ tir.const(0xFFFFFFFF, "uint32"))
    return tir.reinterpret("float32", bits)


@T.macro(hygienic=False)
def _count_keys_at_least(logits, r, key, cnt, out, fv, vocab):
    """``out[0]``: how many logits of row ``r`` have an order key ``>= key``.

    Counted as logits ``>= fv[2]``, the float of that key (a float compare orders ``-0.0`` and
    ``+0.0`` as equal, as their keys are), 16 at a time, then the tail. A NaN bound is a key past
    the infinities: every logit (a key below ``-inf``'s) or none (no row here holds ``+inf``).
    """
    fv[2] = _key_value(key)
    if T.isnan(fv[2]):
        out[0] = T.Select(key < T.uint32(0x80000000), T.int64(vocab), T.int64(0))
    else:
        cnt[r, _lanes()] = T.broadcast(T.int32(0), PICK_LANES)
        for c in range(T.int64(vocab // PICK_LANES)):
            cnt[r, _lanes()] = cnt[r, _lanes()] + _ones(_chunk(logits, r, c) >= T.broadcast(fv[2], PICK_LANES))
        out[0] = _reduce_add(cnt[r, _lanes()])
        for i in range(T.int64(vocab - vocab % PICK_LANES), T.int64(vocab)):
            if logits[r, i] >= fv[2]:
                out[0] = out[0] + T.int64(1)


@T.macro(hygienic=False)
def _kth_by_bisection(logits, r, k, fv, iv, cnt, ku, sel, vocab):
    """``fv[1]``, ``iv[1]``: the ``k``-th element of row ``r`` in (value descending, index ascending)
    order (the top-k threshold), in 34 passes whatever ``k`` is: ~14 µs for 10,000 logits on the
    2-vCPU Xeon, where finding it with ``k - 1`` ordered passes (~15 µs each) took 745 µs at
    ``k = 50``.

    The k-th largest order key (:func:`_order_key`) is the largest ``K`` with at least ``k`` keys
    ``>= K``: 32 counting passes fix its bits from the top. Of the keys equal to it, the first
    ``k - #(keys > K)`` in index order are kept; a last pass finds the index of the last of
    them, skipping 16 logits at a time. ``ku``: uint32 [2] (key, candidate), ``sel``: int64 [2],
    ``cnt``: int32 [B, 16] lanes.
    """
    ku[0] = T.uint32(0)
    for bit in range(32):
        ku[1] = ku[0] | T.shift_left(T.uint32(1), T.Cast("uint32", 31 - bit))
        _count_keys_at_least(logits, r, ku[1], cnt, sel, fv, vocab)
        if sel[0] >= k:
            ku[0] = ku[1]
    sel[0] = k
    if ku[0] != T.uint32(0xFFFFFFFF):
        _count_keys_at_least(logits, r, ku[0] + T.uint32(1), cnt, sel, fv, vocab)
        sel[0] = k - sel[0]  # the rank sought among keys equal to ku[0]
    fv[2] = _key_value(ku[0])  # logits with that key: equal to its float, compared as the counts are
    sel[1] = T.int64(0)  # keys equal to ku[0] seen so far
    iv[1] = T.int64(-1)
    for c in range(T.int64(vocab // PICK_LANES)):
        if iv[1] < T.int64(0):
            equal = T.Bind(_reduce_add(_ones(_chunk(logits, r, c) == T.broadcast(fv[2], PICK_LANES))))
            if sel[1] + equal < sel[0]:
                sel[1] = sel[1] + equal
            else:
                for j in range(PICK_LANES):
                    if iv[1] < T.int64(0) and logits[r, c * PICK_LANES + j] == fv[2]:
                        sel[1] = sel[1] + T.int64(1)
                        if sel[1] == sel[0]:
                            iv[1] = c * PICK_LANES + j
    for i in range(T.int64(vocab - vocab % PICK_LANES), T.int64(vocab)):
        if iv[1] < T.int64(0) and logits[r, i] == fv[2]:
            sel[1] = sel[1] + T.int64(1)
            if sel[1] == sel[0]:
                iv[1] = i
    if iv[1] < T.int64(0):  # none found: only with subnormals flushed (DAZ) might the passes
        iv[1] = iv[0]  # disagree; keep the best logit rather than read logits[r, -1]
    fv[1] = logits[r, iv[1]]


def _kept(x, i, fv, iv, ctrl, vocab):
    """Whether logit ``x`` at index ``i`` is weighted: all are without a top-k (``top_k <= 0`` or
    ``>= vocab``), else those up to the threshold ``(fv[1], iv[1])`` in (value desc, index asc) order."""
    return tir.Or(
        tir.Or(ctrl[3] <= tir.const(0, "int64"), ctrl[3] >= tir.const(vocab, "int64")),
        tir.Or(x > fv[1], tir.And(x == fv[1], i <= iv[1])),
    )


#: float64 lanes of the CPU pick's weight loop (a zmm register; LLVM splits wider vectors).
EXP_LANES = 8


@T.macro(hygienic=False)
def _weight(logits, weights, r, i, fv, iv, ctrl, temp, vocab):
    """``weights[r, i]``: ``exp((l_i - max) / T)`` for a kept logit (all, or the top-k set up to the
    threshold ``(fv[1], iv[1])``), else 0; :func:`exp_f64` (vectorizable, within an ulp of libm)."""
    weights[r, i] = T.Select(
        _kept(logits[r, i], i, fv, iv, ctrl, vocab),
        exp_f64((T.Cast("float64", logits[r, i]) - T.Cast("float64", fv[0])) / temp[0]),
        T.float64(0),
    )


def cpu_pick(batch: int, vocab: int, chunk: int, embedding: tuple[int, int] | None = None) -> tir.PrimFunc:
    """Rows in a parallel loop; every pass over the vocabulary in index order. With ``embedding``,
    each row copies its token's row of the table last."""
    B, V, N = batch, vocab, chunk
    E_ROWS, E_DIM = embedding or (1, 1)
    embed = embedding is not None

    @T.prim_func
    def pick(
        logits: T.Buffer((B, V), "float32"),
        forced: T.Buffer((N, B), "int64"),
        done_in: T.Buffer((B,), "int64"),
        ctrl: T.Buffer((4,), "int64"),
        temp: T.Buffer((1,), "float64"),
        table: T.Buffer((E_ROWS, E_DIM), "float32"),
        step: T.int64,
        token: T.Buffer((B,), "int64"),
        done_out: T.Buffer((B,), "int64"),
        weights: T.Buffer((B, V), "float64"),
        x_next: T.Buffer((B, E_DIM), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        lanes_max = T.decl_buffer((B, PICK_LANES), "float32", scope=CPU_SCRATCH)  # the greedy pick's lanes
        lanes_nan = T.decl_buffer((B, PICK_LANES), "int32", scope=CPU_SCRATCH)
        lanes_count = T.decl_buffer((B, PICK_LANES), "int32", scope=CPU_SCRATCH)  # top-k by bisection
        for r in T.parallel(T.int64(B)):
            fv = T.decl_buffer((3,), "float32", scope=CPU_SCRATCH)  # max, threshold value, bisection's bound
            iv = T.decl_buffer((4,), "int64", scope=CPU_SCRATCH)  # argmax, threshold index, token, last
            dv = T.decl_buffer((3,), "float64", scope=CPU_SCRATCH)  # total, running sum, u
            ph = T.decl_buffer((6,), "uint32", scope=CPU_SCRATCH)
            ku = T.decl_buffer((2,), "uint32", scope=CPU_SCRATCH)  # top-k by bisection
            sel = T.decl_buffer((2,), "int64", scope=CPU_SCRATCH)
            _forced_or_finished(forced, done_in, ctrl, step, r, token, done_out)
            if _picks(forced, done_in, step, r):
                _first_best(logits, r, fv, iv, lanes_max, lanes_nan, V)
                iv[2] = iv[0]
                if temp[0] > T.float64(0) and not _nonfinite(fv[0], temp):
                    fv[1] = fv[0]  # top_k 1: the threshold is the best logit
                    iv[1] = iv[0]
                    if ctrl[3] > T.int64(1) and ctrl[3] < T.int64(V):
                        _kth_by_bisection(logits, r, ctrl[3], fv, iv, lanes_count, ku, sel, V)
                    elif ctrl[3] <= T.int64(0) or ctrl[3] >= T.int64(V):
                        iv[1] = T.int64(V)  # keep all: (v, i) <= (threshold) for every element
                        fv[1] = T.min_value("float32")
                    # every weight, 8 at a time (also for a top-k: a branch per logit costs more)
                    for c in range(T.int64(V // EXP_LANES)):
                        for v in T.vectorized(EXP_LANES):
                            _weight(logits, weights, r, c * EXP_LANES + v, fv, iv, ctrl, temp, V)
                    for i in range(T.int64(V - V % EXP_LANES), T.int64(V)):
                        _weight(logits, weights, r, i, fv, iv, ctrl, temp, V)
                    dv[0] = T.float64(0)
                    for i in range(T.int64(V)):  # summed in index order, as the reference
                        dv[0] = dv[0] + weights[r, i]
                    _philox_uniform(ph, ctrl, step, r, dv, 2)
                    dv[2] = dv[2] * dv[0]
                    dv[1] = T.float64(0)
                    iv[2] = T.int64(-1)
                    iv[3] = T.int64(-1)
                    for i in range(T.int64(V)):
                        if iv[2] < T.int64(0) and weights[r, i] > T.float64(0):
                            dv[1] = dv[1] + weights[r, i]
                            iv[3] = i
                            if dv[1] > dv[2]:
                                iv[2] = i
                    if iv[2] < T.int64(0):
                        iv[2] = T.Select(iv[3] >= T.int64(0), iv[3], iv[0])  # no weight > 0: the best
                token[r] = iv[2]
                done_out[r] = done_in[r] | _new_flags(iv[2], fv[0], ctrl, temp)
            if embed:
                iv[0] = T.max(T.min(token[r], T.int64(E_ROWS - 1)), T.int64(0))  # as take(mode="clip")
                for e in range(E_DIM):
                    x_next[r, e] = table[iv[0], e]

    return _with_embedding(pick, embedding)


def _beats(value, index, best, best_index, vocab):
    """Whether candidate ``(value, index)`` comes before ``(best, best_index)`` in the pick's order
    (the first NaN, else the largest value, ties to the lower index); index ``vocab`` is none."""
    return tir.And(
        index != vocab,
        tir.Or(
            best_index == vocab,
            tir.Or(_comes_first(value, best), tir.And(_same_rank(value, best), index < best_index)),
        ),
    )


@T.macro(hygienic=False)
def _warp_best(cv, ci, vocab):
    """Every lane's candidate ``(cv[0], ci[0])`` (float32, int32; index ``vocab`` = none) becomes its
    warp's best: a butterfly of five ``__shfl_xor_sync`` rounds, after which every lane holds it (the
    order is total, so both lanes of a pair keep the same one). ``cv[1]``, ``ci[1]``: scratch."""
    for o in T.unroll(5):
        cv[1] = shfl_xor("float32", cv[0], T.shift_right(16, o))
        ci[1] = shfl_xor("int32", ci[0], T.shift_right(16, o))
        take = T.Bind(_beats(cv[1], ci[1], cv[0], ci[0], T.int32(vocab)))
        cv[0] = T.Select(take, cv[1], cv[0])
        ci[0] = T.Select(take, ci[1], ci[0])


@T.macro(hygienic=False)
def _block_best(sv, si, cv, ci, t, threads, vocab):
    """Every thread's candidate ``(cv[0], ci[0])`` becomes the block's best, in every thread: the
    warps reduce theirs with shuffles (:func:`_warp_best`), each thread stores its warp's in its
    own slot of ``sv``/``si`` (shared, one a thread), and after one barrier every warp reduces
    the warps' (slot ``32 w`` in lane ``w``). The caller synchronizes before ``sv`` is written
    again. With a shared-memory tree (9 levels, 18 barriers at 512 threads) a greedy pick of
    10,000 logits took 6.4 us on an H200.
    """
    _warp_best(cv, ci, vocab)
    sv[t] = cv[0]
    si[t] = T.Cast("int64", ci[0])
    T.tvm_storage_sync("shared")
    cv[0] = sv[T.min(t % 32, threads // 32 - 1) * 32]
    ci[0] = T.Select(t % 32 < threads // 32, T.Cast("int32", si[T.min(t % 32, threads // 32 - 1) * 32]), vocab)
    _warp_best(cv, ci, vocab)


#: The CUDA pick's top-k threshold: ``top_k - 1`` ordered passes (each a strided scan and a shuffle
#: reduction with two barriers, :func:`_block_best`) up to this ``top_k``; a larger one by radix (:func:`_cuda_kth_by_radix`:
#: 8 counting passes of 4-bit digits and one scan, whatever ``top_k`` is).
CUDA_TOPK_PASSES_MAX = 8
#: Logits a thread of the CUDA pick loads before it compares any of them (the argmax / top-k
#: passes' strided scans): the loads of one group are in flight together. One at a time, a row of
#: 10,000 logits took 12 µs to argmax on an H200 (40 dependent loads a thread at 256 threads),
#: 50,257 took 46 µs.
CUDA_PICK_LOADS = 8
#: Most logits a thread of the CUDA pick holds in registers (every group of a row up to
#: ``PICK_THREADS * CUDA_PICK_HELD_MAX`` logits, 8,192 at 512 threads): loaded once at the start,
#: all in flight together and with the control values, and read there by every ordered pass. A
#: longer row loads a group at a time in each pass. At 32 (rows up to 16,384) a row of 10,000 (24
#: a thread) spilled 16-24 bytes past the 128 registers once the kernel was compiled without
#: ``__restrict__`` (sm_90 with programmatic launch: :func:`pbtvm.cuda.without_restrict_where_waiting`),
#: and 6 local-memory operations on sm_80 with the embedding lookup; at 16 no build spills
#: (ptxas: 82-89 registers at 10,000; the row is read a group a pass).
CUDA_PICK_HELD_MAX = 16
#: Most logits of a sampling thread's contiguous segment (and their float64 weights) held in
#: registers; a longer segment is read from memory. At 20 (a row of 10,000 at 512 threads) the
#: kernel passed the 128 registers its launch bounds allow and spilled 28 bytes.
CUDA_PICK_HELD_SEGMENT_MAX = 16


def _group_index(g, u, threads, t):
    """The logit (int64) a thread ``t`` of ``threads`` scans as load ``u`` of its group ``g``."""
    return tir.Cast("int64", (g * CUDA_PICK_LOADS + u) * threads) + tir.Cast("int64", t)


@T.macro(hygienic=False)
def _load_group(logits, r, t, g, lv, at, threads, vocab):
    """``lv[at + u]`` = logit :func:`_group_index` of row ``r`` (clamped to the row's last: the
    caller skips indices past ``vocab``), every load issued before any is used."""
    for u in T.unroll(CUDA_PICK_LOADS):
        lv[at + u] = logits[r, T.min(_group_index(g, u, threads, t), T.int64(vocab - 1))]


@T.macro(hygienic=False)
def _scan_first_best(lv, at, g, cv, ci, t, threads, vocab):
    """The argmax pass's candidate of the thread (``cv[0]`` float32, ``ci[0]`` int32, ``vocab`` =
    none yet) over the group ``g`` held in ``lv[at:]``: its first NaN, else its first largest
    logit. A few instructions a logit: one block (one SM) scans the whole row, and with the
    ordered passes' int64 compare (:func:`_scan_group`) a greedy pick of 10,000 logits took
    5.6 us on an H200 with every load in flight at once."""
    for u in T.unroll(CUDA_PICK_LOADS):
        i = T.meta_var((g * CUDA_PICK_LOADS + u) * threads + t)  # int32
        take = T.Bind(i < vocab and (ci[0] == vocab or _comes_first(lv[at + u], cv[0])))
        cv[0] = T.Select(take, lv[at + u], cv[0])
        ci[0] = T.Select(take, i, ci[0])


@T.macro(hygienic=False)
def _scan_group(lv, at, g, fv, iv, t, threads, vocab):
    """An ordered top-k pass's candidate of the thread (``fv[2]``, ``iv[2]``) over the group ``g``
    held in ``lv[at:]``: the first best after the previous pass's element (``fv[1]``, ``iv[1]``)
    in (value descending, index ascending) order (pass 0 is :func:`_scan_first_best`)."""
    for u in T.unroll(CUDA_PICK_LOADS):
        i: T.int64 = _group_index(g, u, threads, t)
        if i < T.int64(vocab):
            if (lv[at + u] < fv[1] or (lv[at + u] == fv[1] and i > iv[1])) and (
                iv[2] == T.int64(vocab) or _comes_first(lv[at + u], fv[2])
            ):
                fv[2] = lv[at + u]
                iv[2] = i


@T.macro(hygienic=False)
def _scan_row(scan, logits, r, t, lv, held, groups, best_v, best_i, threads, vocab):
    """``scan(lv, at, g, best_v, best_i, t, threads, vocab)`` (:func:`_scan_first_best` or
    :func:`_scan_group`) over every group of row ``r``: from the registers where the row is
    ``held`` (all of it in ``lv``), else each group loaded into ``lv`` in turn."""
    if held:
        for g in T.unroll(groups):
            scan(lv, g * CUDA_PICK_LOADS, g, best_v, best_i, t, threads, vocab)
    else:
        for g in range(groups):
            _load_group(logits, r, t, g, lv, 0, threads, vocab)
            scan(lv, 0, g, best_v, best_i, t, threads, vocab)


def _nibble_shift(d):
    """The shift of 4-bit digit ``d`` (0 = most significant) of a key: ``28 - 4 d`` (uint32)."""
    return tir.Cast("uint32", 28 - 4 * d)


def _nibble_prefix_mask(d):
    """The bits of a key above 4-bit digit ``d`` (none for digit 0)."""
    ones = tir.const(0xFFFFFFFF, "uint32")
    return tir.Select(d == 0, tir.const(0, "uint32"), tir.shift_left(ones, tir.Cast("uint32", 32 - 4 * tir.max(d, 1))))


@T.macro(hygienic=False)
def _count_digit(x, i, d, ku, cnt, vocab):
    """Counts ``x`` (logit ``i``) by its 4-bit digit ``d`` (``cnt[digit] += 1``) if ``i < vocab``
    and its key has the digits fixed so far (``ku[0]``)."""
    if i < T.int64(vocab):
        logit = T.Bind(x)  # loaded once (the key's select reads it twice)
        key = T.Bind(_order_key(logit))
        if key & _nibble_prefix_mask(d) == ku[0]:
            digit = T.Bind(T.Cast("int32", T.shift_right(key, _nibble_shift(d)) & T.uint32(15)))
            for b in T.unroll(16):
                cnt[b] = cnt[b] + T.Select(digit == b, 1, 0)


@T.macro(hygienic=False)
def _cuda_kth_by_radix(logits, r, t, k, fv, iv, cnt, ku, sel, hc, ss, si, threads, vocab, seg, strides, lv, held):
    """Every thread's ``fv[1]``, ``iv[1]``: the ``k``-th element of row ``r`` in (value descending,
    index ascending) order, the threshold the ordered passes find.

    Eight passes fix the k-th largest order key (:func:`_order_key`) 4 bits at a time, from the
    top: each thread counts its strided logits that share the digits fixed so far by their next
    digit (16 counters in registers), warps sum them with butterfly shuffles, lane 0's sums go
    through shared memory (``hc`` int32 [16, threads]), and every thread takes, from the top
    digit down, the one holding the rank still sought (``sel[0]``). Of the logits with that key,
    the first ``sel[0]`` in index order are kept: each thread counts them in its contiguous
    segment, a scan of the counts (``ss``) finds the segment holding the last one, whose index
    its thread writes (``si``; every thread bisects the scan for it). No shared access sits inside
    a condition. ``cnt``: int32 [16], ``ku``: uint32 [1], ``sel``: int64 [3] (local).
    """
    ku[0] = T.uint32(0)
    sel[0] = k
    for d in range(8):
        for b in T.unroll(16):
            cnt[b] = 0
        if held:  # the row's strided logits are in registers (lv[j]: logit j * threads + t)
            for j in T.unroll(strides):
                _count_digit(lv[j], T.Cast("int64", j * threads) + T.Cast("int64", t), d, ku, cnt, vocab)
        else:
            for j in range(strides):
                i: T.int64 = T.Cast("int64", j * threads) + T.Cast("int64", t)
                if i < T.int64(vocab):
                    _count_digit(logits[r, i], i, d, ku, cnt, vocab)
        for b in T.unroll(16):
            for o in T.unroll(5):
                cnt[b] = cnt[b] + shfl_xor("int32", cnt[b], T.shift_right(16, o))
            hc[b, t] = cnt[b]  # consecutive threads, consecutive words: no bank conflict
        T.tvm_storage_sync("shared")
        sel[1] = T.int64(0)  # found
        for bb in T.unroll(16):
            sel[2] = T.int64(0)
            for w in range(threads // 32):
                sel[2] = sel[2] + T.Cast("int64", hc[15 - bb, w * 32])
            if sel[1] == T.int64(0):
                if sel[2] >= sel[0]:
                    ku[0] = ku[0] | T.shift_left(T.Cast("uint32", 15 - bb), _nibble_shift(d))
                    sel[1] = T.int64(1)
                else:
                    sel[0] = sel[0] - sel[2]
        T.tvm_storage_sync("shared")
    sel[1] = T.int64(0)  # keys equal to ku[0] in this thread's segment
    for j in range(seg):
        i: T.int64 = T.Cast("int64", t * seg + j)
        if i < T.int64(vocab):  # nested: CUDA codegen loads a select's operands before the if
            logit = T.Bind(logits[r, i])
            if _order_key(logit) == ku[0]:
                sel[1] = sel[1] + T.int64(1)
    ss[t] = T.Cast("float64", sel[1])
    T.tvm_storage_sync("shared")
    for lvl in T.unroll(threads.bit_length() - 1):  # inclusive Hillis-Steele scan of the counts
        off: T.int64 = T.shift_left(T.int64(1), lvl)
        sel[2] = T.Cast("int64", ss[t]) + T.Select(
            T.Cast("int64", t) >= off, T.Cast("int64", ss[T.max(T.Cast("int64", t) - off, T.int64(0))]), T.int64(0)
        )
        T.tvm_storage_sync("shared")
        ss[t] = T.Cast("float64", sel[2])
        T.tvm_storage_sync("shared")
    # the owner: the thread whose inclusive count first reaches sel[0] finds the index in its segment
    iv[2] = T.Cast("int64", ss[t])  # (a shared load cannot sit in a condition)
    sel[2] = iv[2] - sel[1]  # keys equal before this segment
    iv[1] = T.int64(vocab)
    if sel[2] < sel[0] and sel[0] <= iv[2]:
        for j in range(seg):
            i: T.int64 = T.Cast("int64", t * seg + j)
            if i < T.int64(vocab) and iv[1] == T.int64(vocab):
                logit = T.Bind(logits[r, i])
                if _order_key(logit) == ku[0]:
                    sel[2] = sel[2] + T.int64(1)
                    if sel[2] == sel[0]:
                        iv[1] = i
    si[t] = iv[1]
    T.tvm_storage_sync("shared")
    sel[1] = T.int64(0)  # bisect for the owner: the first thread whose inclusive count reaches sel[0]
    sel[2] = T.int64(threads - 1)
    for _b in T.unroll(threads.bit_length() - 1):
        iv[2] = T.Cast("int64", ss[T.shift_right(sel[1] + sel[2], 1)])
        if iv[2] >= sel[0]:
            sel[2] = T.shift_right(sel[1] + sel[2], 1)
        else:
            sel[1] = T.shift_right(sel[1] + sel[2], 1) + T.int64(1)
    iv[1] = si[sel[1]]
    if iv[1] >= T.int64(vocab):  # no owner (keys that disagree with a flushed subnormal): the best
        iv[1] = iv[0]
    fv[1] = logits[r, iv[1]]
    T.tvm_storage_sync("shared")


def _weight_of(x, fv, temp):
    """``exp((x - max) / T)`` in float64."""
    return tir.exp((tir.Cast("float64", x) - tir.Cast("float64", fv[0])) / temp[0])


@T.macro(hygienic=False)
def _block_scan(ss, dv, sc, t, threads):
    """The block's inclusive scan of the threads' ``dv[0]`` (float64) in thread order: ``dv[1]``
    the thread's inclusive sum, ``dv[3]`` the previous thread's (0 for thread 0), ``sc[2]`` the
    last thread's (the total). Warps scan with ``__shfl_up_sync``, each thread stores its warp
    inclusive value in its slot of ``ss`` (shared), and after one barrier every thread adds the
    totals of the warps before its own (lane 31's slots), summed in warp order; the total is
    the last thread's inclusive sum, summed in the same order, so the threads' intervals
    ``[dv[3], dv[1])`` tile ``[0, total)`` exactly. (A Hillis-Steele scan through shared memory
    had 18 barriers at 512 threads.) ``sc``: float64 [3] scratch. The caller synchronizes before
    ``ss`` is written again.
    """
    dv[1] = dv[0]
    for o in T.unroll(5):
        dv[3] = shfl_up("float64", dv[1], T.shift_left(1, o))
        dv[1] = dv[1] + T.Select(t % 32 >= T.shift_left(1, o), dv[3], T.float64(0))
    ss[t] = dv[1]
    T.tvm_storage_sync("shared")
    sc[0] = T.float64(0)  # the warps before this thread's
    sc[1] = T.float64(0)  # every warp but the last
    for w in T.unroll(threads // 32 - 1):
        sc[0] = sc[0] + T.Select(w < t // 32, ss[w * 32 + 31], T.float64(0))
        sc[1] = sc[1] + ss[w * 32 + 31]
    sc[2] = sc[1] + ss[threads - 1]
    dv[3] = shfl_up("float64", dv[1], 1)  # the previous lane's warp-inclusive sum ...
    dv[1] = sc[0] + dv[1]
    dv[3] = T.Select(t % 32 == 0, sc[0], sc[0] + dv[3])  # ... made block-inclusive as its own is


def cuda_pick(
    batch: int,
    vocab: int,
    chunk: int,
    threads: int,
    embedding: tuple[int, int] | None = None,
    programmatic: bool = False,
) -> tir.PrimFunc:
    """One block per row: strided candidate scans (the row held in registers up to
    :data:`CUDA_PICK_HELD_MAX` logits a thread, else :data:`CUDA_PICK_LOADS` loads in flight a thread)
    with warp-shuffle reductions (argmax, and
    each ordered top-k pass up to :data:`CUDA_TOPK_PASSES_MAX`; a larger top-k by radix,
    :func:`_cuda_kth_by_radix`), contiguous per-thread weight segments, a scan of their sums, and
    the thread whose segment holds ``u * total`` picks the token. With ``embedding``, after a
    barrier (the token, written by one thread, is then visible to the block) the block copies the
    token's row of the table. ``programmatic`` (sm_90+): written for programmatic dependent launch
    (:mod:`pbtvm.schedules.cuda_pdl`): it waits for the one before it (the head) before it
    reads anything, then lets the next kernel launch (before the wait with ``PBTVM_CUDA_PDL=start``)."""
    if threads & (threads - 1) or threads < 32:
        raise InputError(f"threads must be a power of two of at least a warp (32), got {threads}")
    B, V, N, TPB = batch, vocab, chunk, threads
    E_ROWS, E_DIM = embedding or (1, 1)
    embed = embedding is not None
    seg = (V + TPB - 1) // TPB
    strides = (V + TPB - 1) // TPB
    groups = (strides + CUDA_PICK_LOADS - 1) // CUDA_PICK_LOADS
    held = groups * CUDA_PICK_LOADS <= CUDA_PICK_HELD_MAX  # the row in registers (else a group a pass)
    held_seg = seg <= CUDA_PICK_HELD_SEGMENT_MAX  # a sampling thread's segment in registers
    start, wait = let_next_start(programmatic), wait_for_previous(programmatic)

    @T.prim_func
    def pick(
        logits: T.Buffer((B, V), "float32"),
        forced: T.Buffer((N, B), "int64"),
        done_in: T.Buffer((B,), "int64"),
        ctrl: T.Buffer((4,), "int64"),
        temp: T.Buffer((1,), "float64"),
        table: T.Buffer((E_ROWS, E_DIM), "float32"),
        step: T.int64,
        token: T.Buffer((B,), "int64"),
        done_out: T.Buffer((B,), "int64"),
        weights: T.Buffer((B, V), "float64"),
        x_next: T.Buffer((B, E_DIM), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        r = T.launch_thread("blockIdx.x", B)
        t = T.launch_thread("threadIdx.x", TPB)
        # __launch_bounds__(TPB, 1): with the thread count alone ptxas aimed at two blocks an SM and
        # spilled (64 registers, 28 bytes at 512 threads); a row needs one block.
        with T.attr(0, ATTR_LAUNCH_MIN_BLOCKS, 1):
            sv = T.decl_buffer((TPB,), "float32", scope="shared")
            si = T.decl_buffer((TPB,), "int64", scope="shared")
            ss = T.decl_buffer((TPB,), "float64", scope="shared")
            fv = T.decl_buffer((3,), "float32", scope="local")  # max, threshold value, candidate value
            iv = T.decl_buffer((4,), "int64", scope="local")  # argmax, threshold index, candidate, token
            dv = T.decl_buffer((4,), "float64", scope="local")  # running sum, scan value, u * total, exclusive
            ph = T.decl_buffer((6,), "uint32", scope="local")
            hc = T.decl_buffer((16, TPB), "int32", scope="shared")  # top-k by radix: digit counts
            cnt = T.decl_buffer((16,), "int32", scope="local")
            ku = T.decl_buffer((1,), "uint32", scope="local")
            sel = T.decl_buffer((3,), "int64", scope="local")
            cv = T.decl_buffer((2,), "float32", scope="local")  # a candidate and a shuffled one
            ci = T.decl_buffer((2,), "int32", scope="local")
            lv = T.decl_buffer((groups * CUDA_PICK_LOADS if held else CUDA_PICK_LOADS,), "float32", scope="local")
            sl = T.decl_buffer((seg if held_seg else 1,), "float32", scope="local")  # a segment's logits
            wv = T.decl_buffer((seg if held_seg else 1,), "float64", scope="local")  # ... and weights
            sc = T.decl_buffer((3,), "float64", scope="local")  # the scan's warp prefix, all-but-last, total
            start()
            wait()
            # the row's logits first (a short row: all of them), then the control values: one wait
            if held:
                for g in T.unroll(groups):
                    _load_group(logits, r, t, g, lv, g * CUDA_PICK_LOADS, TPB, V)
            if t == 0:
                _forced_or_finished(forced, done_in, ctrl, step, r, token, done_out)
            # Loops of extent 0 or 1 instead of branches: TVM inserts no barrier inside a condition.
            for _act in range(T.Cast("int64", _picks(forced, done_in, step, r))):
                # pass 0: argmax; passes 1..top_k-1: the next element in (value desc, index asc) order
                for p in range(
                    T.if_then_else(
                        temp[0] > T.float64(0)
                        and ctrl[3] > T.int64(0)
                        and ctrl[3] <= T.int64(CUDA_TOPK_PASSES_MAX)
                        and ctrl[3] < T.int64(V),
                        T.Cast("int32", ctrl[3]),  # <= CUDA_TOPK_PASSES_MAX here
                        1,
                    )
                ):
                    ci[0] = V
                    cv[0] = T.float32(0)
                    iv[2] = T.int64(V)
                    if p == 0:  # the argmax: int32 compares (the pick is one SM's instructions)
                        _scan_row(_scan_first_best, logits, r, t, lv, held, groups, cv, ci, TPB, V)
                    else:
                        _scan_row(_scan_group, logits, r, t, lv, held, groups, fv, iv, TPB, V)
                        cv[0] = fv[2]
                        ci[0] = T.Cast("int32", iv[2])
                    _block_best(sv, si, cv, ci, t, TPB, V)
                    fv[1] = cv[0]
                    iv[1] = T.Cast("int64", ci[0])
                    if p == 0:
                        fv[0] = cv[0]
                        iv[0] = T.Cast("int64", ci[0])
                    T.tvm_storage_sync("shared")
                for _sel in range(
                    T.Cast(
                        "int64",
                        temp[0] > T.float64(0)
                        and not _nonfinite(fv[0], temp)
                        and ctrl[3] > T.int64(CUDA_TOPK_PASSES_MAX)
                        and ctrl[3] < T.int64(V),
                    )
                ):
                    _cuda_kth_by_radix(
                        logits, r, t, ctrl[3], fv, iv, cnt, ku, sel, hc, ss, si, TPB, V, seg, strides, lv, held
                    )
                if t == 0:  # greedy, non-finite, and the fallback when rounding leaves no owner: the best token
                    token[r] = iv[0]
                    done_out[r] = done_in[r] | _new_flags(iv[0], fv[0], ctrl, temp)
                T.tvm_storage_sync("shared")
                for _smp in range(T.Cast("int64", temp[0] > T.float64(0) and not _nonfinite(fv[0], temp))):
                    # the weights of the thread's segment (contiguous: the running sum is in index order)
                    dv[0] = T.float64(0)
                    if held_seg:
                        for j in T.unroll(seg):  # every load in flight before the first weight
                            sl[j] = logits[r, T.min(t * seg + j, V - 1)]
                        for j in T.unroll(seg):
                            wv[j] = T.Select(
                                t * seg + j < V and _kept(sl[j], T.Cast("int64", t * seg + j), fv, iv, ctrl, V),
                                _weight_of(sl[j], fv, temp),
                                T.float64(0),
                            )
                            dv[0] = dv[0] + wv[j]
                            if t * seg + j < V:
                                weights[r, t * seg + j] = wv[j]
                    else:
                        for j in range(seg):
                            i: T.int64 = T.Cast("int64", t * seg + j)
                            if i < T.int64(V):
                                if _kept(logits[r, i], i, fv, iv, ctrl, V):
                                    weights[r, i] = _weight_of(logits[r, i], fv, temp)
                                else:
                                    weights[r, i] = T.float64(0)
                                dv[0] = dv[0] + weights[r, i]
                    _block_scan(ss, dv, sc, t, TPB)
                    _philox_uniform(ph, ctrl, step, r, dv, 2)
                    dv[2] = dv[2] * sc[2]
                    if dv[3] <= dv[2] and dv[2] < dv[1]:  # the owner: u * total in its segment
                        iv[3] = T.int64(-1)
                        iv[2] = T.int64(-1)
                        dv[0] = dv[3]
                        if held_seg:
                            for j in T.unroll(seg):
                                if t * seg + j < V and iv[3] < T.int64(0) and wv[j] > T.float64(0):
                                    dv[0] = dv[0] + wv[j]
                                    iv[2] = T.Cast("int64", t * seg + j)
                                    if dv[0] > dv[2]:
                                        iv[3] = T.Cast("int64", t * seg + j)
                        else:
                            for j in range(seg):
                                i: T.int64 = T.Cast("int64", t * seg + j)
                                if i < T.int64(V) and iv[3] < T.int64(0) and weights[r, i] > T.float64(0):
                                    dv[0] = dv[0] + weights[r, i]
                                    iv[2] = i
                                    if dv[0] > dv[2]:
                                        iv[3] = i
                        if iv[3] < T.int64(0):
                            iv[3] = iv[2]
                        token[r] = iv[3]
                        done_out[r] = done_in[r] | _new_flags(iv[3], fv[0], ctrl, temp)
            if embed:
                T.tvm_storage_sync("shared")  # also makes the token's global write visible to the block
                iv[0] = T.max(T.min(token[r], T.int64(E_ROWS - 1)), T.int64(0))  # as take(mode="clip")
                for e in range((E_DIM + TPB - 1) // TPB):
                    if e * TPB + t < E_DIM:
                        x_next[r, e * TPB + t] = table[iv[0], e * TPB + t]

    return declare_early_reads(_with_embedding(pick, embedding), [], programmatic)
