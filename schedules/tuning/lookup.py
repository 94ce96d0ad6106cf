"""From the log to the compiler: replay the best record onto the symbolic kernel, verified first.

:func:`tuned_lookup` gives :class:`pbtvm.relay_passes.ApplyPBSchedules` a ``lookup(func)``: for a
kernel whose rule is tunable it finds the best record measured on this target's kind and arch /
mcpu, replays its trace onto the kernel (symbolic batch and ``bitlayers`` kept) and, where a local
device can run it, checks the result against the default schedule (:mod:`pbtvm.schedules.verify`)
before handing it over. A :class:`~pbtvm.schedules.rules.KnobRule` kernel gets its logged knobs.
A kernel whose best the search could not confirm against its default (a
:func:`.space.default_pin_key` entry in the knob log) keeps the default schedule: ``lookup``
returns None for it, as for a kernel the log does not hold, and :attr:`TunedLookup.kept_default`
tells the two apart. A log that
decides none of a model's kernels says so, and why where its entries tell
(:meth:`TunedLookup.warn_if_unmatched`, :func:`unmatched_reason`).
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path

import tvm_ffi

from pbtvm._tvm import s_tir, tir, tvm
from pbtvm.target import TargetInfo, TargetLimits

from .. import cuda_bmma
from ..cuda_bmma_kernel import DEFAULT_LIMITS
from ..rules import KnobRule
from ..verify import agrees_with_default
from .log import TuningLog, target_key
from .space import DEFAULT_PIN, default_pin_key, kernel_name, knob_key, tunable_rule, workload


def _offered(rule: KnobRule, func: tir.PrimFunc, chosen: dict) -> bool:
    """Whether a logged setting (which also carries its timings) is one ``rule`` offers for ``func``.

    The tuner logs only offered settings, and the tests run every setting offered at their shapes
    against the reference (test_cpu_vnni, test_bmma_lstm); a log edited by hand, or written by a
    version with other settings, gets the default.
    """
    offered = rule.knob_settings(func)
    try:
        setting = {name: chosen[name] for name in offered[0]} if offered else None
    except (KeyError, TypeError):
        return False
    whole = setting is not None and all(isinstance(v, int) and not isinstance(v, bool) for v in setting.values())
    return whole and setting in offered  # 4.0 or "4" is not a setting the tuner writes


def replay(func: tir.PrimFunc, trace: object, limits: TargetLimits = DEFAULT_LIMITS) -> tir.PrimFunc:
    """Apply a trace found on :func:`.space.workload` to the symbolic kernel ``func``.

    The templates' instructions do not depend on the batch or ``bitlayers`` extents, so the
    trace (with its sampled decisions) replays on the kernel that keeps both symbolic. ``limits``:
    the target's (:attr:`pbtvm.target.TargetInfo.limits`), which a BMMA kernel is written for (its
    programmatic dependent launch on sm_90+, as the default schedule's).
    """
    sch = s_tir.Schedule(func)
    trace.apply_to_schedule(sch, remove_postproc=False)
    return cuda_bmma.materialize(sch.mod["main"], limits)  # a BMMA config becomes its kernel


def _record_for(
    database: object, mod: tvm.IRModule, target: tvm.target.Target, where: Path, name: str
) -> tuple[object | None, bool]:
    """The best record of ``mod`` measured on ``target``'s kind and arch / mcpu, or None; and
    whether records of other targets were ignored.

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
    return next((r for r in records if target_key(r.target) == want), None), bool(foreign)


def tuned_lookup(
    work_dir: str | os.PathLike, target: tvm.target.Target, batch: int = 1
) -> tuple[TunedLookup | None, list[str]]:
    """A ``lookup(func)`` for :class:`pbtvm.relay_passes.ApplyPBSchedules` backed by the log.

    Returns
    -------
    lookup : TunedLookup or None
        None when ``work_dir`` holds no usable log for ``target`` (a warning says why). After
        the lookups, :meth:`TunedLookup.warn_if_unmatched` says why a log decided none of them.
    used : list of str
        Filled with the names of the kernels whose schedule the log decided (a tuned one, or the
        default where the log holds a kernel there, also in :attr:`TunedLookup.kept_default`), as
        lookups happen.
    """
    log = TuningLog(work_dir, target)  # it refuses an empty work_dir
    with log.locked(exclusive=False) if log.work_dir.is_dir() else contextlib.nullcontext():
        database = log.database(create=False)
    if database is None:
        return None, []
    lookup = TunedLookup(log, database, target, batch)
    return lookup, lookup.used


class TunedLookup:
    """The schedule the log holds for a PB kernel (see :func:`tuned_lookup`), and what was asked.

    Attributes
    ----------
    used : list of str
        Names of the kernels whose schedule the log decided.
    kept_default : list of str
        Those of ``used`` the log holds at their default schedule (the search's best was not
        confirmed faster side by side): the lookup returns None for them, as for a kernel the log
        does not decide, yet the log did decide them.
    unfinished : list of str
        Names of the kernels a tuning run left unfinished (stopped before it re-timed the best):
        default schedules, not counted as decided by the log.
    asked : set of str
        Names of the tunable kernels looked up.
    """

    def __init__(self, log: TuningLog, database: object, target: tvm.target.Target, batch: int) -> None:
        self.log, self.database, self.target, self.batch = log, database, target, batch
        self.knobs = log.read_knobs()
        self.used: list[str] = []
        self.kept_default: list[str] = []  # in used: the log chose the default schedule
        self.unfinished: list[str] = []  # kernels an interrupted tuning run left unfinished
        self.asked: set[str] = set()
        self._checked: dict[int, bool | None] = {}  # kernel hash -> agrees with the default schedule
        self._refused = False  # a logged schedule was found and refused (with a warning saying why)

    def __call__(self, func: tir.PrimFunc) -> tir.PrimFunc | None:
        """The tuned kernel for ``func``, or None for its default schedule (chosen by the log where
        :attr:`kept_default` names ``func``'s kernel afterwards)."""
        rule = tunable_rule(func, self.target)
        if rule is None:
            return None
        self.asked.add(kernel_name(func))
        return self._knob_kernel(rule, func) if isinstance(rule, KnobRule) else self._searched_kernel(func)

    def _knob_kernel(self, rule: KnobRule, func: tir.PrimFunc) -> tir.PrimFunc | None:
        """The kernel with the logged knobs of ``func`` (offered and buildable), else None."""
        chosen = self.knobs.get(knob_key(func, self.batch, rule.knob_variant()))
        if chosen is None:  # a log written before the key named the instruction sets
            chosen = self.knobs.get(knob_key(func, self.batch))
        if chosen is None:
            return None
        if not _offered(rule, func, chosen):  # only settings the tests check run
            warnings.warn(
                f"pbtvm: logged knobs {chosen} for {kernel_name(func)} are not among the settings this "
                "kernel offers on this target (tuned for other instruction sets, or by another pbtvm version); "
                "default used",
                stacklevel=3,
            )
            self._refused = True
            return None
        try:
            kernel = rule.kernel_with(func, chosen)
        except (ValueError, KeyError, TypeError) as err:  # a setting this version cannot build
            warnings.warn(
                f"pbtvm: logged knobs {chosen} for {kernel_name(func)} do not apply ({err}); default used",
                stacklevel=3,
            )
            self._refused = True
            return None
        self.used.append(kernel_name(func))
        return kernel

    def _searched_kernel(self, func: tir.PrimFunc) -> tir.PrimFunc | None:
        """The best searched record of ``func`` on this target replayed (and checked), else None."""
        target, database = self.target, self.database
        pin = self.knobs.get(default_pin_key(func, self.batch))
        if pin is not None and pin.get("pending"):  # a tuning run stopped before it re-timed the best
            if kernel_name(func) not in self.unfinished:
                self.unfinished.append(kernel_name(func))
            return None
        if pin is not None:  # best not confirmed faster side by side: the log chose the default schedule
            self.used.append(kernel_name(func))
            self.kept_default.append(kernel_name(func))
            return None
        mod = tvm.IRModule({"main": workload(func, self.batch)})
        if not database.has_workload(mod):
            return None
        record, foreign = _record_for(database, mod, target, self.log.path, kernel_name(func))
        if record is None:  # none (every candidate failed), or of other targets only (a warning named them)
            self._refused = self._refused or foreign
            return None
        try:
            scheduled = replay(func, record.trace, TargetInfo.of(target).limits)
        except Exception as err:
            warnings.warn(
                f"pbtvm: tuned schedule for {kernel_name(func)} does not apply ({err}); default used", stacklevel=3
            )
            self._refused = True
            return None
        key = tvm_ffi.structural_hash(func)
        if key not in self._checked:
            self._checked[key] = agrees_with_default(func, scheduled, target)
            if self._checked[key] is False:
                warnings.warn(
                    f"pbtvm: the tuned schedule for {kernel_name(func)} in {self.log.path} computes a different "
                    "result than the default schedule; default used",
                    stacklevel=3,
                )
            elif self._checked[key] is None and len(self._checked) == 1:
                warnings.warn(
                    f"pbtvm: no local {target.kind.name} device of this arch: tuned schedules are used without "
                    "checking them against the default schedule",
                    stacklevel=3,
                )
        if self._checked[key] is False:
            self._refused = True
            return None
        self.used.append(kernel_name(func))
        return scheduled

    def warn_if_unmatched(self) -> None:
        """Warn when the log decided none of the kernels looked up, saying why where the log tells.

        A log that holds other kernels than the model's (tuned at another batch, for another
        weight layout, another model, or kernels changed since) otherwise just leaves every
        kernel at its default schedule, silently.
        """
        if self.unfinished:
            warnings.warn(
                f"pbtvm: a tuning run into {self.log.path} stopped before it finished {', '.join(self.unfinished)} "
                "(default schedules used for them): tune again to finish",
                stacklevel=3,
            )
        if not self.asked or self.used or self._refused or self.unfinished:
            return
        records = self.database.get_all_tuning_records()
        held = [k.removeprefix(DEFAULT_PIN) for k in self.knobs]
        if not held and not len(records):
            why = "the log holds no kernel (tune first: pbtvm.tune or compile(tune=True))"
        else:
            why = unmatched_reason(self.asked, held, self.batch, _searched_names(records)) or (
                f"it holds {len(records)} searched record(s) for other kernels (another model or format)"
            )
        warnings.warn(
            f"pbtvm: the tuning log {self.log.path} decided none of this model's {len(self.asked)} tunable PB "
            f"kernel(s): {why}; default schedules used",
            stacklevel=3,
        )


def _searched_names(records: list) -> list[str]:
    """Kernel names (:func:`.space.kernel_name`) of MetaSchedule records (the workload keeps the
    kernel's attributes); records without them are left out."""
    names = []
    for record in records:
        try:
            names.append(kernel_name(record.workload.mod["main"]))
        except (KeyError, TypeError, AttributeError, IndexError):
            continue
    return names


#: A kernel name (:func:`.space.kernel_name`) in its parts: kind, format, layout, shape.
_NAME = re.compile(r"^(?P<kind>.+)_(?P<fmt>w\d+a\d+o?)_(?P<layout>[^_]+)_(?P<shape>\d+x\d+)$")


def unmatched_reason(asked: set[str], held: list[str], batch: int, searched: list[str] = ()) -> str | None:
    """Why knob-log keys ``held`` and searched records named ``searched`` match none of the
    kernels named ``asked``, or None.

    Keys are ``name:b<batch>:<hash>`` (:func:`.space.knob_key`); a kernel name says kind, format,
    layout and shape, not everything the workload holds (bias, float input, codebook, the LSTM
    step's form). The same name logged at this batch with another hash (another model's layer of
    that name, or a kernel changed since), at another batch only, searched (batch not named), or
    the same layer in another weight layout or format each get their remedy.
    """
    logged = [key.split(":") for key in held if key.count(":") == 2]
    batches = {b[1:] for name, b, _ in logged if name in asked}
    if str(batch) in batches:
        return (
            "it has kernels of these names at this batch whose workloads differ (another model's layers of the "
            "same shape and format, kernels changed since they were tuned, or builds for other instruction "
            "sets: tune this model for this target)"
        )
    other = sorted(int(b) for b in batches if b.isdigit())
    if other:
        return (
            f"it has them tuned at batch {', '.join(map(str, other))}, not {batch} "
            f"(compile(..., tune_batch={other[0]}) or pbtvm compile --tune-batch {other[0]} uses those)"
        )
    if any(name in asked for name in searched):
        return (
            f"it has searched schedules of these names for another batch than {batch}, or for another model's "
            "layers of the same shape and format (compile(..., tune_batch=...) or pbtvm compile --tune-batch as "
            "tuned uses them; else tune this model)"
        )
    parts = [m.groupdict() for m in map(_NAME.match, asked) if m]
    for name in [name for name, _, _ in logged] + list(searched):
        theirs = _NAME.match(name)
        for mine in parts if theirs else ():
            field = _one_difference(mine, theirs.groupdict())
            if field == "layout":
                return (
                    f"it has these layers in weight layout {theirs['layout']!r}, this build uses {mine['layout']!r} "
                    f"(compile(..., layout={theirs['layout']!r}) uses those)"
                )
            if field == "fmt":
                return (
                    f"it has these layers tuned as {theirs['fmt']}, this build is {mine['fmt']} "
                    "(w<bits>a<act_bits>, o: offset-binary codes; compile with those to use them)"
                )
    if logged:
        return f"it holds {len(logged)} other kernel(s), e.g. {logged[0][0]} (another model or format)"
    return None


def _one_difference(mine: dict, theirs: dict) -> str | None:
    """The one part (``layout`` or ``fmt``) in which two parsed kernel names of one layer differ."""
    differ = [k for k in ("kind", "fmt", "layout", "shape") if mine[k] != theirs[k]]
    return differ[0] if len(differ) == 1 and differ[0] in ("layout", "fmt") else None


__all__ = ["TunedLookup", "replay", "tuned_lookup", "unmatched_reason"]
