"""A default CPU schedule for the ops PB layers leave in full precision.

TVM 0.27's CPU pipeline lowers Relax operators without scheduling them: every loop serial and
scalar. Around PB layers that is attention's products, softmax, LayerNorm, GELU, residual adds,
which the scale run measured 4-20x slower than torch's (about 52 of the 63 ms of a GPT-2-sized
W4 call). :func:`cpu_default_schedule` applies TVM dlight's CPU ``Reduction`` rule (softmax /
norms, :class:`RowReduction`) and, for what it leaves, :class:`ParallelVectorized`: spatial loops
fused and run in parallel when the op is large enough to pay for a parallel region, the innermost
spatial loop vectorized (not around libm calls), and products whose output's last axis is also
an operand's (``A @ B``) with that axis inside the reduction, so it vectorizes. PB kernels are
scheduled already (``tirx.is_scheduled``) and are left alone.
"""

from __future__ import annotations

from pbtvm._tvm import dlight, s_tir, tir, tvm

#: below this many loop iterations (the static extents' product) an op stays serial: a parallel
#: region costs a few microseconds, more than a small op (an LSTM step's gates at batch 1)
PARALLEL_MIN_WORK = 16384

#: float32 lanes when LLVM reports no vector width for the target
FALLBACK_LANES = 8


class ParallelVectorized(dlight.ScheduleRule):
    """Every block as it is (nothing inlined): spatial loops fused and parallel above
    :data:`PARALLEL_MIN_WORK`, the innermost spatial loop vectorized where its extent is static and
    the block holds plain dtypes and no libm call; reductions only in the ``A @ B`` form."""

    def apply(self, func: tir.PrimFunc, target: tvm.target.Target, _: bool) -> s_tir.Schedule | None:
        """The schedule of ``func`` on an ``llvm`` target, None where no block has a spatial loop."""
        if not isinstance(func, tir.PrimFunc) or target.kind.name != "llvm":
            return None
        from tvm.s_tir.dlight.analysis import normalize_prim_func

        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        # no inlining: a padding inlined into a convolution costs a bounds test per multiply-add
        scheduled = False
        for info in infos:
            scheduled |= self._schedule_block(sch, info, target)
        return sch if scheduled else None

    def _schedule_block(self, sch: s_tir.Schedule, info, target) -> bool:
        block = info.block_rv
        loops = sch.get_loops(block)
        kinds = info.dom_kind()
        if not loops or len(loops) != len(kinds) or "O" in kinds:
            return False
        spatial = [loop for loop, kind in zip(loops, kinds, strict=True) if kind == "S"]
        reduction = [loop for loop, kind in zip(loops, kinds, strict=True) if kind == "R"]
        if not spatial:
            return False
        work = _static_work(_static_extent(sch, loop) for loop in loops)
        lanes = _lanes(target, sch.get(block))
        inner = spatial[-1]
        inner_extent = _static_extent(sch, inner)
        vectorizable = inner_extent is not None and _plain_dtypes(sch.get(block)) and not _calls_math(sch.get(block))
        width = _vector_width(inner_extent, lanes) if vectorizable else 1
        vector_inner = width >= 2
        if reduction and not (vector_inner and _inner_axis_streams(sch.get(block), info)):
            return False  # a dot product or a convolution: as TVM lowers it (a review measured convs slower)
        outer = spatial[:-1] if vector_inner else spatial
        if reduction:
            sch.reorder(*outer, *reduction, *([inner] if vector_inner else []))
        if vector_inner:
            if width < inner_extent:
                _, inner = sch.split(inner, factors=[None, width])
            sch.vectorize(inner)
        if outer and work >= PARALLEL_MIN_WORK:
            fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
            sch.parallel(fused)
        if reduction:
            sch.decompose_reduction(block, reduction[0])
        return True


def _static_work(extents) -> int:
    """The product of the static loop extents (a run-time one, None, counts as 1)."""
    work = 1
    for extent in extents:
        work *= extent or 1
    return work


def _static_extent(sch: s_tir.Schedule, loop) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tir.IntImm) else None


#: math functions LLVM's vectorizer calls once per lane (libm): a vector loop of them is slower
#: than the scalar one (exp 1.4x, tanh 1.5x on [8, 64, 256], a review)
_SCALAR_MATH = frozenset(
    f"tirx.{name}"
    for name in (
        "exp", "exp2", "exp10", "expm1", "log", "log2", "log10", "log1p", "tanh", "sigmoid", "erf", "pow",
        "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh", "asinh", "acosh", "atanh", "fmod",
    )
)  # fmt: skip


def _calls_math(block) -> bool:
    """Whether the block's body calls a function of :data:`_SCALAR_MATH`."""
    import tvm_ffi

    found = False

    def visit(call) -> None:
        nonlocal found
        found = found or getattr(call.op, "name", None) in _SCALAR_MATH

    tvm_ffi.structural_walk(block.body, [(tvm.ir.Call, visit)], order="post")
    return found


def _plain_dtypes(block) -> bool:
    """Whether every buffer the block reads or writes has a dtype LLVM vectors hold directly:
    TVM 0.27 lowers bfloat16 (and float8 / float4) through integer storage, and its legalization
    fails on vectors of them ("dtype mismatch on BufferStore ... bfloat16x8"); vectors of bool
    compute wrong values (``~mask`` of a causal mask: attention came out 6.7 off)."""
    return all(
        str(region.source.dtype).startswith(("float16", "float32", "float64", "int", "uint"))
        for region in (*block.reads, *block.writes)
    )


def _vector_width(extent: int, lanes: int) -> int:
    """The vector width for an inner loop of ``extent``: the largest power of two up to ``lanes``
    that divides it (no tail loop), 1 where that is under 4. (TVM 0.27's LLVM codegen fails
    verification on some vectors of other widths: a 12-lane add of int64-indexed buffers.)"""
    width = 1
    while width * 2 <= lanes and extent % (width * 2) == 0:
        width *= 2
    return width if width >= 4 else 1


def _lanes(target: tvm.target.Target, block) -> int:
    """Vector lanes of the block's output dtype on ``target``."""
    from tvm.target.codegen import llvm_get_vector_width

    bits = llvm_get_vector_width(target)
    dtype_bits = block.writes[0].source.dtype.bits if block.writes else 32
    return max(bits // dtype_bits, 2) if bits > 0 else FALLBACK_LANES


def _inner_axis_streams(block, info) -> bool:
    """Whether the block's innermost spatial iterator is the last index of its output and of
    every read that uses it (``C[i, j] += A[i, k] * B[k, j]``): with the reduction outside it,
    the inner loop reads and writes contiguous memory."""
    var = [it.var for it in info.iters if it.kind == "S"][-1]
    if not block.writes:
        return False

    def last_is(region) -> bool:
        index = region.region[-1].min if region.region else None
        return isinstance(index, tir.Var) and index.same_as(var)

    if not last_is(block.writes[0]):
        return False
    used = [read for read in block.reads if any(_uses(r.min, var) for r in read.region)]
    return bool(used) and all(last_is(read) for read in used)


def _uses(expr, var) -> bool:
    from tvm.s_tir.dlight.analysis import collect_vars_used_in_prim_expr

    return any(used.same_as(var) for used in collect_vars_used_in_prim_expr(expr))


class RowReduction(dlight.ScheduleRule):
    """dlight's CPU ``Reduction`` rule (softmax, norms: rows reduced, then normalised) where it
    fits: enough work for a parallel region (it parallelizes every op it takes), and every block
    over the same rows (it computes each block at the row loop: a convolution's padding, wider
    than its output, would be recomputed per output element)."""

    def __init__(self) -> None:
        from tvm.s_tir.dlight import cpu

        self.rule = cpu.Reduction()

    def apply(self, func: tir.PrimFunc, target: tvm.target.Target, tunable: bool) -> s_tir.Schedule | None:
        """dlight's ``Reduction`` schedule of ``func``, None where it does not fit (above)."""
        from tvm.s_tir.dlight.analysis import normalize_prim_func

        if not isinstance(func, tir.PrimFunc) or target.kind.name != "llvm":
            return None
        infos = normalize_prim_func(s_tir.Schedule(func))
        if not infos or len(infos) < 2:
            return None
        rows = [str(it.dom) for it in infos[-1].iters if it.kind == "S"]
        for info in infos:
            kinds = info.dom_kind()
            leading = len(kinds) - len(kinds.lstrip("S"))
            if leading == 0 or [str(it.dom) for it in info.iters[:leading]] != rows[:leading]:
                return None
        work = _static_work(it.dom if isinstance(it.dom, int) else None for it in infos[-1].iters)
        return self.rule.apply(func, target, tunable) if work >= PARALLEL_MIN_WORK else None


def cpu_default_schedule() -> tvm.transform.Pass:
    """:class:`RowReduction`, then :class:`ParallelVectorized`, on every unscheduled PrimFunc."""
    return dlight.ApplyDefaultSchedule(RowReduction(), ParallelVectorized())


def serial_indirect_accumulation() -> tvm.transform.Pass:
    """Parallel loops that add into elements chosen by data (``out[idx[k]] += v[k]``) made serial.

    TOPI's ``index_put(accumulate=True)`` (torch's ``index_put_`` / ``index_add`` with repeated
    indices) runs its accumulation in a ``T.parallel`` loop: two threads adding into one element
    lose one of the additions (a review: sums 25-37 % low with 2 threads, different on every run).
    A loop whose body stores to a buffer at an index read from memory, a value that reads the same
    buffer, runs serially here; other parallel loops are unchanged.
    """
    import tvm_ffi

    def racy(loop) -> bool:
        found = False

        def store(node) -> None:
            nonlocal found
            indirect = any(_loads(index) for index in node.indices)
            found = found or (indirect and any(load.source.same_as(node.buffer) for load in _loads(node.value)))

        tvm_ffi.structural_walk(loop.body, [(tir.BufferStore, store)], order="post")
        return found

    def serial(loop, mutator):
        body = mutator.mutate(loop.body)
        made_serial = loop.kind == tir.ForKind.PARALLEL and racy(loop)
        if not made_serial and body.same_as(loop.body):
            return loop
        kind, binding = (tir.ForKind.SERIAL, None) if made_serial else (loop.kind, loop.thread_binding)
        return tir.For(loop.loop_var, loop.min, loop.extent, kind, body, binding, loop.annotations, step=loop.step)

    @tvm.transform.module_pass(opt_level=0, name="pbtvm.SerialIndirectAccumulation")
    def apply(mod, _ctx):
        updates = {}
        for gvar, func in mod.functions_items():
            if isinstance(func, tir.PrimFunc):
                body = tvm_ffi.structural_mutate(func.body, [(tir.For, serial)])
                if not body.same_as(func.body):
                    updates[gvar] = func.with_body(body)
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return apply


def _loads(expr) -> list:
    """The buffer loads in ``expr``."""
    import tvm_ffi

    found = []
    tvm_ffi.structural_walk(expr, [(tvm.ir.TensorLoad, found.append)], order="post")  # tir.BufferLoad's class
    return found


__all__ = [
    "PARALLEL_MIN_WORK",
    "ParallelVectorized",
    "RowReduction",
    "cpu_default_schedule",
    "serial_indirect_accumulation",
]
