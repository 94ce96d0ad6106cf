"""From the log to the compiler: replay the best record onto the symbolic kernel, verified first.

:func:`tuned_lookup` gives :class:`pbtvm.relay_passes.ApplyPBSchedules` a ``lookup(func)``: for a
kernel whose rule is tunable it finds the best record measured on this target's kind and arch /
mcpu, replays its trace onto the kernel (symbolic batch and ``bitlayers`` kept) and, where a local
device can run it, checks the result against the default schedule (:mod:`pbtvm.schedules.verify`)
before handing it over. A :class:`~pbtvm.schedules.rules.KnobRule` kernel gets its logged knobs.
A kernel whose best the search could not confirm against its default (a
:func:`.space.default_pin_key` entry in the knob log) keeps the default schedule.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import tvm_ffi

from pbtvm._tvm import s_tir, tir, tvm

from .. import cuda_bmma
from ..rules import KnobRule
from ..verify import agrees_with_default
from .log import TuningLog, target_key
from .space import default_pin_key, kernel_name, knob_key, tunable_rule, workload


def _offered(rule: KnobRule, func: tir.PrimFunc, chosen: dict) -> bool:
    """Whether a logged setting (which also carries its timings) is one ``rule`` offers for ``func``.

    The tuner logs only offered settings, and the tests run every setting offered at their shapes
    against the reference (test_cpu_vnni, test_bmma_lstm); a log edited by hand, or written by a
    version with other settings, gets the default.
    """
    offered = rule.knob_settings(func)
    try:
        setting = {name: int(chosen[name]) for name in offered[0]} if offered else None
    except (KeyError, TypeError, ValueError):
        return False
    return setting in offered


def replay(func: tir.PrimFunc, trace: object) -> tir.PrimFunc:
    """Apply a trace found on :func:`.space.workload` to the symbolic kernel ``func``.

    The templates' instructions do not depend on the batch or ``bitlayers`` extents, so the
    trace (with its sampled decisions) replays on the kernel that keeps both symbolic.
    """
    sch = s_tir.Schedule(func)
    trace.apply_to_schedule(sch, remove_postproc=False)
    return cuda_bmma.materialize(sch.mod["main"])  # a BMMA config becomes its kernel


def _record_for(database: object, mod: tvm.IRModule, target: tvm.target.Target, where: Path, name: str) -> object:
    """The best record of ``mod`` measured on ``target``'s kind and arch / mcpu, or None.

    A record made for another CPU or GPU (e.g. a log copied between directories) is ignored with
    a warning: its timings say nothing about this target, and its schedule may not even build.
    """
    want = target_key(target)
    records = database.get_top_k(database.commit_workload(mod), 1 << 20)
    foreign = [r for r in records if target_key(r.target) != want]
    if foreign:
        warnings.warn(
            f"pbtvm: tuning log {where} holds {len(foreign)} record(s) for {target_key(foreign[0].target)} "
            f"for {name}; this is {want}: those records are ignored",
            stacklevel=3,
        )
    return next((r for r in records if target_key(r.target) == want), None)


def tuned_lookup(
    work_dir: str | os.PathLike, target: tvm.target.Target, batch: int = 1
) -> tuple[Callable[[tir.PrimFunc], tir.PrimFunc | None] | None, list[str]]:
    """A ``lookup(func)`` for :class:`pbtvm.relay_passes.ApplyPBSchedules` backed by the log.

    Returns
    -------
    lookup : callable or None
        None when ``work_dir`` holds no usable log for ``target`` (a warning says why).
    used : list of str
        Filled with the names of the kernels whose schedule the log decided (a tuned one, or the
        default where the log holds a kernel there), as lookups happen.
    """
    log = TuningLog(Path(work_dir), target)
    with log.locked(exclusive=False) if log.path.exists() else contextlib.nullcontext():
        database = log.database(create=False)
    used: list[str] = []
    if database is None:
        return None, used
    checked: dict[int, bool | None] = {}  # kernel hash -> agrees with the default schedule
    knobs = log.read_knobs()

    def lookup(func: tir.PrimFunc) -> tir.PrimFunc | None:
        rule = tunable_rule(func, target)
        if rule is None:
            return None
        if isinstance(rule, KnobRule):
            chosen = knobs.get(knob_key(func, batch))
            if chosen is None:
                return None
            if not _offered(rule, func, chosen):  # only settings the tests check run
                warnings.warn(
                    f"pbtvm: logged knobs {chosen} for {kernel_name(func)} are not among the settings this "
                    "version offers; default used",
                    stacklevel=2,
                )
                return None
            try:
                kernel = rule.kernel_with(func, chosen)
            except (ValueError, KeyError, TypeError) as err:  # a setting this version cannot build
                warnings.warn(
                    f"pbtvm: logged knobs {chosen} for {kernel_name(func)} do not apply ({err}); default used",
                    stacklevel=2,
                )
                return None
            used.append(kernel_name(func))
            return kernel
        if default_pin_key(func, batch) in knobs:  # best not confirmed side by side, or not re-timed yet
            used.append(kernel_name(func))  # the log chose the default schedule
            return None
        mod = tvm.IRModule({"main": workload(func, batch)})
        if not database.has_workload(mod):
            return None
        record = _record_for(database, mod, target, log.path, kernel_name(func))
        if record is None:
            return None
        try:
            scheduled = replay(func, record.trace)
        except Exception as err:
            warnings.warn(
                f"pbtvm: tuned schedule for {kernel_name(func)} does not apply ({err}); default used", stacklevel=2
            )
            return None
        key = tvm_ffi.structural_hash(func)
        if key not in checked:
            checked[key] = agrees_with_default(func, scheduled, target)
            if checked[key] is False:
                warnings.warn(
                    f"pbtvm: the tuned schedule for {kernel_name(func)} in {log.path} computes a different result "
                    "than the default schedule; default used",
                    stacklevel=2,
                )
            elif checked[key] is None and len(checked) == 1:
                warnings.warn(
                    f"pbtvm: no local {target.kind.name} device of this arch: tuned schedules are used without "
                    "checking them against the default schedule",
                    stacklevel=2,
                )
        if checked[key] is False:
            return None
        used.append(kernel_name(func))
        return scheduled

    return lookup, used


__all__ = ["replay", "tuned_lookup"]
