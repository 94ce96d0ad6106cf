"""Attach schedules to the PB PrimFuncs and keep them out of operator fusion."""

from __future__ import annotations

import logging
from collections.abc import Callable

from pbtvm._tvm import tir, tvm
from pbtvm.schedules import apply_default_schedule

logger = logging.getLogger(__name__)

#: ``op_pattern`` kOpaque: FuseOps never merges other ops into a PB kernel.
OPAQUE = 8


@tvm.transform.module_pass(opt_level=0, name="ApplyPBSchedules")
class ApplyPBSchedules:
    """Schedule every PrimFunc tagged ``pbtvm.kernel`` and mark it scheduled and opaque.

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

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:  # noqa: D102
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tir.PrimFunc) or "pbtvm.kernel" not in (func.attrs or {}):
                continue
            scheduled = self.lookup(func) if self.lookup is not None else None
            if scheduled is None:
                scheduled = apply_default_schedule(func, self.target)
            else:
                logger.debug("tuned schedule for %s", gvar.name_hint)
            updates[gvar] = scheduled.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", OPAQUE)
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod
