"""Rule protocol and dispatch: which rule schedules which PB PrimFunc on which target."""

from __future__ import annotations

import logging

from pbtvm._tvm import s_tir, tir, tvm

logger = logging.getLogger(__name__)


class ScheduleRule:
    """A schedule for one PB kernel kind on one target kind.

    Subclasses set ``kernel`` (the PrimFunc's ``pbtvm.kernel`` attribute) and ``target_kinds``,
    and implement :meth:`schedule`.
    """

    kernel: str = ""
    target_kinds: tuple[str, ...] = ()

    def apply(self, func: tir.PrimFunc, target: tvm.target.Target, tunable: bool = False) -> s_tir.Schedule | None:
        """Schedule ``func`` for ``target``, or return None if this rule does not handle it."""
        attrs = func.attrs or {}
        if target.kind.name not in self.target_kinds or attrs.get("pbtvm.kernel") != self.kernel:
            return None
        sch = s_tir.Schedule(func, debug_mask="all" if tunable else 0)
        self.schedule(sch, func, target, tunable)
        return sch

    def schedule(self, sch: s_tir.Schedule, func: tir.PrimFunc, target: tvm.target.Target, tunable: bool) -> None:
        """Transform ``sch`` in place; ``tunable`` asks for sampled (``sample_*``) decisions."""
        raise NotImplementedError


def rules_for(target: tvm.target.Target) -> list[ScheduleRule]:
    """The default rules for a target kind (``llvm`` or ``cuda``)."""
    from . import cpu, cuda

    kind = target.kind.name
    if kind == "llvm":
        return [cpu.CPUActPack(), cpu.CPUBitplaneGemm()]
    if kind == "cuda":
        return [cuda.CUDAActPack(), cuda.CUDABitplaneGemm()]
    raise ValueError(f"pbtvm has no schedules for target kind {kind!r} (supported: llvm, cuda)")


def apply_default_schedule(func: tir.PrimFunc, target: tvm.target.Target) -> tir.PrimFunc:
    """Apply the first matching default rule; the result is marked scheduled for DLight.

    Raises
    ------
    ValueError
        If ``func`` is a PB kernel that no rule for ``target`` handles.
    """
    for rule in rules_for(target):
        sch = rule.apply(func, target)
        if sch is not None:
            return sch.mod["main"].with_attr("tirx.is_scheduled", True)
    raise ValueError(f"no schedule rule for PB kernel {func.attrs.get('pbtvm.kernel')!r} on {target.kind.name}")
