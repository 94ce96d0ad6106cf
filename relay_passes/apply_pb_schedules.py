"""Attach schedules to the PB PrimFuncs and keep them out of operator fusion."""

from __future__ import annotations

import logging
from collections.abc import Callable

from pbtvm import names
from pbtvm._tvm import tir, tvm
from pbtvm.schedules import apply_default_schedule
from pbtvm.schedules.cuda_pdl import programmatic_callees, with_programmatic_launch
from pbtvm.schedules.rules import check_activation

logger = logging.getLogger(__name__)

#: ``op_pattern`` kOpaque: FuseOps never merges other ops into a PB kernel.
OPAQUE = 8


def check_bitlayers(func: tir.PrimFunc) -> tir.PrimFunc:
    """``func`` with an entry check ``1 <= bitlayers <= bits`` if it has a ``bitlayers`` parameter.

    The kernel reads ``bitlayers`` weight planes; a deployment that calls the library through the
    TVM runtime alone (no pbtvm checks in Python) must get an error for 0, -1 or bits+1, not an
    out-of-bounds read. The check is one scalar comparison per kernel launch.
    """
    var = next((p for p in func.params if p.name == "bitlayers" and isinstance(p.ty, tvm.ir.PrimType)), None)
    if var is None:
        return func
    bits, dtype = int(func.attrs[names.ATTR_BITS]), str(var.ty.dtype)
    cond = tir.And(var >= tir.const(1, dtype), var <= tir.const(bits, dtype))
    message = f"pbtvm: bitlayers must be in 1..{bits} (the model's weight bits)"
    # TVM 0.27's Python AssertStmt documents (kind, condition, ...) but its constructor takes
    # (condition, kind, ...): pass the constructor's order.
    check = tir.AssertStmt(cond, tvm.ir.StringImm("ValueError"), [tvm.ir.StringImm(message)])
    return func.with_body(tir.SeqStmt([check, func.body]))


@tvm.transform.module_pass(opt_level=0, name="ApplyPBSchedules")
class ApplyPBSchedules:
    """Schedule every PrimFunc tagged ``pbtvm.kernel`` and mark it scheduled and opaque.

    Kernels written for programmatic dependent launch (CUDA sm_90+,
    :mod:`pbtvm.schedules.cuda_pdl`) that ``main`` and friends call with constant weights are
    launched with it: they start while the kernel before them still runs and stream their
    weights meanwhile.

    Parameters
    ----------
    target : tvm.target.Target
    lookup : callable, optional
        ``lookup(func) -> PrimFunc | None``: a tuned schedule (e.g. from a MetaSchedule
        database); falls back to the default rule when it returns None.
    """

    def __init__(
        self, target: tvm.target.Target, lookup: Callable[[tir.PrimFunc], tir.PrimFunc | None] | None = None
    ) -> None:
        self.target = target
        self.lookup = lookup

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        """Schedule the PB kernels of ``mod`` (``ctx``: TVM's pass context, part of the pass protocol)."""
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tir.PrimFunc) or names.kernel_kind(func) is None:
                continue
            check_activation(func, gvar.name_hint)  # a tuned schedule skips rule_for's check
            scheduled = self.lookup(func) if self.lookup is not None else None
            if scheduled is None:
                scheduled = apply_default_schedule(func, self.target)
            else:
                logger.debug("tuned schedule for %s", gvar.name_hint)
            scheduled = check_bitlayers(scheduled)
            updates[gvar] = scheduled.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", OPAQUE)
        for gvar, func in updates.items():
            mod[gvar] = func
        early = programmatic_callees(mod)
        for gvar in [gv for gv in mod.get_global_vars() if gv.name_hint in early]:
            mod[gvar] = with_programmatic_launch(mod[gvar])
        return mod
