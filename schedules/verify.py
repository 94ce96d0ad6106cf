"""Check a tuned PB kernel against the default schedule before it is used.

MetaSchedule measures speed, not results: a sampled schedule that computes a wrong product is
as welcome to it as a right one (one candidate of the CUDA template did so on an H100,
BENCHMARKS.md 2026-11-23: ptxas had dropped one of its loads). So before :func:`pbtvm.schedules.tuning.tuned_lookup` hands a tuned
kernel to the compiler, both the tuned and the default schedule of that kernel run on the same
random inputs on a local device, and the tuned one is used only if every output agrees (a kernel
may write several: the pack writes planes, scales and code sums; an LSTM step h and c). The
integer PB product is exact and the float epilogue is the same expression per element in both,
so they must agree to rounding (``rtol=1e-5``).
"""

from __future__ import annotations

import numpy as np

from pbtvm import names
from pbtvm._tvm import s_tir, tir, tvm

from .rules import apply_default_schedule

#: Batch rows of the random inputs (a symbolic batch dimension takes this value).
CHECK_BATCH = 3


def local_device(target: tvm.target.Target) -> object | None:
    """The local device that runs code built for ``target``, or None (e.g. no GPU of its arch, or a
    CPU without the instructions of the target's CPU)."""
    from pbtvm.target import TargetInfo, features_this_cpu_lacks

    if features_this_cpu_lacks(target):
        return None
    return TargetInfo.of(target).local_device()


def output_params(func: tir.PrimFunc) -> list[int]:
    """Indices of the parameters ``func`` writes (the write regions of its blocks).

    Raises
    ------
    ValueError
        If ``func`` writes none of its parameters.
    """
    sch = s_tir.Schedule(func, debug_mask=0)
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    written: set = set()
    while blocks:  # every block of the function, nested ones included
        block = blocks.pop()
        written.update(region.source for region in sch.get(block).writes)
        blocks.extend(sch.get_child_blocks(block))
    out = [i for i, p in enumerate(func.params) if any(p.same_as(w) for w in written)]
    if not out:
        raise ValueError("the kernel writes none of its parameters")
    return out


def random_args(func: tir.PrimFunc, dev: object, seed: int = 0) -> list:
    """Random arguments for ``func``: every buffer (inputs and outputs alike), every scalar.

    Packed words (uint32) take any bit pattern, integer sums small values, floats a normal
    draw; a symbolic dimension takes :data:`CHECK_BATCH`; a scalar (``bitlayers``) takes
    ``pbtvm.bits`` from the kernel's attributes.
    """
    rng = np.random.default_rng(seed)
    bits = int(func.attrs[names.ATTR_BITS])
    args = []
    for param in func.params:
        if not isinstance(param.ty, tir.BufferType):  # a scalar parameter: bitlayers
            args.append(bits)
            continue
        shape = [int(s) if isinstance(s, tir.IntImm | int) else CHECK_BATCH for s in param.shape]
        dtype = str(param.dtype)
        if dtype == "uint32":
            value = rng.integers(0, 1 << 32, size=shape, dtype=np.uint64).astype(np.uint32)
        elif dtype.startswith("int"):
            value = rng.integers(-1000, 1000, size=shape).astype(dtype)
        else:
            value = rng.standard_normal(shape).astype(dtype)
        args.append(tvm.runtime.tensor(value, dev))
    return args


def agrees_with_default(func: tir.PrimFunc, scheduled: tir.PrimFunc, target: tvm.target.Target) -> bool | None:
    """Whether ``scheduled`` (a tuned schedule of ``func``) computes what the default schedule does.

    Returns None when no local device can run ``target`` code (nothing was checked).
    """
    from pbtvm.kernels import build

    dev = local_device(target)
    if dev is None:
        return None
    written = output_params(func)
    outs = []
    for candidate in (apply_default_schedule(func, target), scheduled.with_attr("tirx.is_scheduled", True)):
        # A kernel taken from a Relax module has no global symbol; a standalone build needs one.
        kernel = build(candidate.with_attr("global_symbol", "main"), target, schedule=False)
        args = random_args(func, dev)
        kernel(*args)
        outs.append([args[i].numpy() for i in written])
    return all(
        np.allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max(initial=0.0) or 1.0))
        for got, want in zip(outs[1], outs[0], strict=True)
    )


__all__ = ["CHECK_BATCH", "agrees_with_default", "local_device", "output_params", "random_args"]
