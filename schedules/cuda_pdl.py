"""Programmatic dependent launch (CUDA sm_90+) for the PB kernels.

A kernel launched with CUDA's programmatic stream serialization (:data:`pbtvm.names.LAUNCH_PROGRAMMATIC`)
may start while the kernel before it in the stream still runs, once every block of that kernel
has run ``griddepcontrol.launch_dependents`` (or ended); ``griddepcontrol.wait`` then waits until
that kernel has ended and its writes are visible. Without the flag both instructions are no-ops.

At batch 1 a PB layer reads a few MB of weights in a few microseconds, and the gap between two
kernels (launch, the first loads' DRAM latency, the last blocks' tail) was about as long (H200:
4096x4096 W4 kernel 5.3 us for 8.4 MB, of which ~3 us did not grow with the weights; ncu: the
SMs active 63 % of the kernel's time, thirty-seventh session). So every PB kernel written here
prefetches into the L2 what nothing on the stream writes (its block's weight rows,
``cp.async.bulk.prefetch``: they stream from DRAM during the wait), waits, lets the next kernel
launch (``launch_dependents``; at the start instead with ``PBTVM_CUDA_PDL=start``,
:func:`next_launches_at_start`), and only then loads anything or writes anything. The next
kernel thus launches while this one computes, and one kernel at most runs ahead.

Nothing but that prefetch comes before the wait, in the SASS too
(:func:`pbtvm.sass.loads_before_wait`): register loads of the weights before the wait were kept
there by ptxas in some kernels and moved past it in others (an asm prefetch stays in place); and
with TVM's ``__restrict__`` parameters nvcc read the activations with ``ld.global.nc``, which
ptxas moved above the wait and which is not coherent with the kernel before it anyway, so
:func:`pbtvm.cuda.without_restrict_where_waiting` compiles the kernels that wait without
``__restrict__`` (no ``LDG.E.CONSTANT`` in them).

The kernels say which buffers they read before the wait (:data:`pbtvm.names.ATTR_EARLY_READS`);
:func:`programmatic_callees` launches a kernel early only where those are constants at every call.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tvm.script import tirx as T

from pbtvm import names
from pbtvm._tvm import relax, tir, tvm


def next_launches_at_start() -> bool:
    """Whether kernels let the next kernel launch as they start (``PBTVM_CUDA_PDL=start``), rather
    than right after their wait (the default), read when a kernel is built.

    After the wait, at most one kernel runs ahead of the one computing: it launches once the
    kernel before it has ended, and prefetches its weights while the one in between runs. At the
    start, every kernel whose blocks find room launches at once, however far down the stream: a
    chain of PB layers could have several prefetching up to :data:`.cuda_bmma_kernel.PREFETCH_MAX_BYTES`
    each, more than the L2 holds, evicting each other's weights before they are read (a review's
    concern, not measured: ``bench_bmma.py`` / ``bench_models_gpu.py`` compare both on a GPU).
    """
    return os.environ.get(names.ENV_CUDA_PDL, "").strip().lower() == names.PDL_AT_START


def let_next_start(enabled: bool):
    """A TVMScript macro for the start of a kernel: with ``enabled`` and :func:`next_launches_at_start`,
    let the next kernel in the stream launch now (``griddepcontrol.launch_dependents``; its
    blocks wait before they read what this one writes); else nothing (:func:`wait_for_previous`
    lets it launch)."""
    emit = enabled and next_launches_at_start()

    @T.macro
    def start():
        if emit:
            T.ptx.griddepcontrol.launch_dependents()

    return start


def wait_for_previous(enabled: bool):
    """A TVMScript macro: with ``enabled``, wait until the kernel before this one in the stream has
    ended and its writes are visible (``griddepcontrol.wait``), then (unless
    :func:`next_launches_at_start`) let the next kernel launch; before it a kernel only prefetches
    the buffers it declares (:func:`declare_early_reads`) into the L2: it loads and writes nothing."""
    then_next = enabled and not next_launches_at_start()

    @T.macro
    def wait():
        if enabled:
            T.ptx.griddepcontrol.wait()
        if then_next:
            T.ptx.griddepcontrol.launch_dependents()

    return wait


def declare_early_reads(func: tir.PrimFunc, params: Iterable[str], enabled: bool) -> tir.PrimFunc:
    """``func`` marked as written for programmatic dependent launch (with ``enabled``), reading the
    buffer parameters named ``params`` (e.g. ``"wp"``) before it waits; unchanged
    otherwise.

    Raises
    ------
    ValueError
        If a name is not one of ``func``'s buffer parameters.
    """
    if not enabled:
        return func
    params = list(params)
    have = {p.name for p in func.params if tir.is_buffer_var(p)}
    missing = [p for p in params if p not in have]
    if missing:
        raise ValueError(f"early reads {missing} are not buffer parameters of the kernel ({sorted(have)})")
    return func.with_attr(names.ATTR_EARLY_READS, params)


def early_read_indices(func: tir.PrimFunc) -> list[int] | None:
    """Positions of the parameters ``func`` reads before it waits, or None if it was not written for
    programmatic dependent launch (no :data:`pbtvm.names.ATTR_EARLY_READS`)."""
    early = (func.attrs or {}).get(names.ATTR_EARLY_READS)
    if early is None:
        return None
    wanted = {str(n) for n in early}
    return [i for i, p in enumerate(func.params) if p.name in wanted]


def with_programmatic_launch(func: tir.PrimFunc) -> tir.PrimFunc:
    """``func`` whose kernels are launched with :data:`pbtvm.names.LAUNCH_PROGRAMMATIC`.

    The caller promises that nothing on the stream writes the buffers ``func`` reads before it
    waits (:data:`pbtvm.names.ATTR_EARLY_READS`; ``compile`` checks they are constants).

    Raises
    ------
    ValueError
        If ``func`` was not written for programmatic dependent launch: a kernel that does not wait
        could read its input before the kernel writing it has ended.
    """
    if early_read_indices(func) is None:
        raise ValueError(
            f"the kernel was not written for programmatic dependent launch (no {names.ATTR_EARLY_READS}): "
            "launched early it could read its inputs before they are written"
        )
    flags = [str(f) for f in (func.attrs or {}).get(names.ATTR_KERNEL_LAUNCH_PARAMS, [])]
    if names.LAUNCH_PROGRAMMATIC in flags:
        return func
    return func.with_attr(names.ATTR_KERNEL_LAUNCH_PARAMS, [*flags, names.LAUNCH_PROGRAMMATIC])


def programmatic_callees(mod: tvm.IRModule) -> set[str]:
    """Names of the PrimFuncs of ``mod`` to launch with programmatic dependent launch: those
    written for it (:func:`early_read_indices`) that Relax functions call (``call_tir``) only with
    constants for the buffers they read before they wait."""
    candidates = {
        gv.name_hint: early
        for gv, f in mod.functions_items()
        if isinstance(f, tir.PrimFunc) and (early := early_read_indices(f)) is not None
    }
    if not candidates:
        return set()
    constant: dict[str, bool] = {}  # every call_tir so far passed constants
    callee_uses: dict[str, int] = {}  # references as call_tir's callee
    uses: dict[str, int] = {}  # all references
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(node) -> None:
        if isinstance(node, relax.GlobalVar) and node.name_hint in candidates:
            uses[node.name_hint] = uses.get(node.name_hint, 0) + 1
        if isinstance(node, relax.Call) and node.op.same_as(call_tir) and node.args[0].name_hint in candidates:
            name = node.args[0].name_hint
            args = node.args[1].fields if isinstance(node.args[1], relax.Tuple) else [node.args[1]]
            ok = all(i < len(args) and isinstance(args[i], tvm.ir.Constant) for i in candidates[name])
            constant[name] = constant.get(name, True) and ok
            callee_uses[name] = callee_uses.get(name, 0) + 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    # a PrimFunc referenced other than as a call_tir callee has callers this cannot see
    return {name for name, ok in constant.items() if ok and uses.get(name, 0) == callee_uses[name]}


# ---------------------------------------------------------------- every other kernel: wait first
#: TVM's launch flag for dynamic shared memory: its runtime requires it last among the flags.
DYN_SHARED_MEMORY = "tirx.use_dyn_shared_memory"
#: Name of the TIR pipeline :func:`pbtvm.cuda.build` compiles with where the target launches
#: programmatically: TVM's own (``s_tir``), then :func:`wait_first_kernels` on the device kernels.
WAIT_FIRST_PIPELINE = "pbtvm_wait_first"
_GRID_CONTROL = "tirx.ptx.griddepcontrol"
_CALLING_CONV_KERNEL = 2  # tvm::CallingConv::kDeviceKernelLaunch: a kernel SplitHostDevice made


def _grid_control(action: str) -> tir.Stmt:
    return tir.Evaluate(getattr(T.ptx.griddepcontrol, action)())


def uses_grid_control(func: tir.PrimFunc) -> bool:
    """Whether ``func``'s body calls ``griddepcontrol`` (a kernel written for programmatic
    dependent launch: whether it is launched so is decided where it is called)."""
    import tvm_ffi

    found = False

    def visit(call) -> None:
        nonlocal found
        found = found or getattr(call.op, "name", None) == _GRID_CONTROL

    tvm_ffi.structural_walk(func.body, [(tvm.ir.Call, visit)], order="post")
    return found


def wait_first(kernel: tir.PrimFunc) -> tir.PrimFunc:
    """A device kernel (a PrimFunc of SplitHostDevice) that waits for the kernel before it in the
    stream before anything else, then lets the next one launch (both first where
    :func:`next_launches_at_start`), and is launched with :data:`pbtvm.names.LAUNCH_PROGRAMMATIC`;
    unchanged if it already uses ``griddepcontrol``.

    Safe for any kernel: it reads and writes nothing before the wait, so launched early it only
    waits (it launches once every block of the kernel before it has started, so it takes no
    room those blocks need). What it gains: its own launch overlaps the kernel before it, and the
    PB kernel after it launches while it runs and prefetches its weights meanwhile, so the add or
    norm kernels between PB layers no longer break the chain.
    """
    if uses_grid_control(kernel):
        return kernel
    flags = [str(f) for f in (kernel.attrs or {}).get(names.ATTR_KERNEL_LAUNCH_PARAMS, [])]
    last = [f for f in flags if f == DYN_SHARED_MEMORY]
    flags = [f for f in flags if f != DYN_SHARED_MEMORY and f != names.LAUNCH_PROGRAMMATIC]
    order = ("launch_dependents", "wait") if next_launches_at_start() else ("wait", "launch_dependents")
    body = tir.SeqStmt([*(_grid_control(action) for action in order), kernel.body])
    return kernel.with_body(body).with_attr(names.ATTR_KERNEL_LAUNCH_PARAMS, [*flags, names.LAUNCH_PROGRAMMATIC, *last])


@tvm.transform.module_pass(opt_level=0, name="pbtvm.WaitFirstKernels")
def wait_first_kernels(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Device-module pass: :func:`wait_first` on every kernel (PrimFuncs with TVM's kernel-launch
    calling convention); other functions unchanged."""
    out = mod.clone()
    for gv, func in mod.functions_items():
        conv = (func.attrs or {}).get("calling_conv") if isinstance(func, tir.PrimFunc) else None
        if conv is not None and int(conv) == _CALLING_CONV_KERNEL:
            out.update_func(gv, wait_first(func))
    return out


def _wait_first_pipeline():
    pipeline, host_passes, device_passes = tvm.tirx.get_tir_pipeline("s_tir")

    def device_then_wait_first() -> tvm.transform.Pass:
        return tvm.transform.Sequential([wait_first_kernels, device_passes()], name="pbtvm.wait_first_device")

    return pipeline, host_passes, device_then_wait_first


tvm.tirx.compilation_pipeline.register_tir_pipeline(WAIT_FIRST_PIPELINE, _wait_first_pipeline)
