"""The search: measure every tunable kernel of a model and record the results in the log.

A kernel is tuned by the rule that schedules it (:func:`.space.tunable_rule`): a
:class:`~pbtvm.schedules.rules.TunableRule` through MetaSchedule's evolutionary search (its default
schedule is measured first and recorded, so the log's best is never worse than the default), a
:class:`~pbtvm.schedules.rules.KnobRule` by timing its knob settings one after another.

A search's best is one measurement among many; on a loaded machine it can be luck (a tutorial
reported a 2.43x gain at load average 21 that was 1.00x on a quiet machine). So where the best
is not the default, both are built once more and timed side by side (:data:`CONFIRM_ROUNDS`
rounds, the order alternating): the best is kept only if it is faster by
:data:`MIN_CONFIRMED_GAIN`, else the log says to use the default (a knob kernel logs its default
knobs, a MetaSchedule kernel gets a :func:`.space.default_pin_key` entry in the knob log). The
report's times are those of this re-measure.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable

import tvm_ffi
from tvm.ir.utils import derived_object

from pbtvm._tvm import meta_schedule, s_tir, tir, tvm
from pbtvm.errors import InputError
from pbtvm.target import features_this_cpu_lacks

from ..rules import KnobRule
from .log import TuningLog
from .measure import close_runner, default_builder, default_runner, measure, measure_side_by_side
from .report import MIN_GAIN_PERCENT, KernelReport, Progress, TuneReport
from .space import default_pin_key, kernel_name, knob_key, tunable_rule, tune_context, workload

#: Rounds of the side-by-side re-measure of a kernel's default and the search's best (:func:`_confirm`).
CONFIRM_ROUNDS = 3
#: Least gain over the default, in that re-measure, for which the best is kept (else the default is).
MIN_CONFIRMED_GAIN = MIN_GAIN_PERCENT / 100


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def tune_kernels(
    funcs: list[tir.PrimFunc],
    target: tvm.target.Target,
    work_dir: str | os.PathLike,
    *,
    trials_per_kernel: int = 64,
    batch: int = 1,
    trials_per_iter: int = 16,
    builder: object | None = None,
    runner: object | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> TuneReport:
    """Search schedules for the tunable kernels among ``funcs`` and record them in ``work_dir``'s log.

    Parameters
    ----------
    funcs : list of tir.PrimFunc
        PB kernels; those whose rule on ``target`` is not tunable are passed over, duplicates (same
        workload) are tuned once, kernels already in the log are skipped.
    target : tvm.target.Target
    work_dir : path
    trials_per_kernel : int
        Search trials per kernel (a :class:`KnobRule` kernel measures at most this many settings).
    batch : int
        Batch size the kernels are tuned for.
    trials_per_iter : int
        Candidates MetaSchedule measures per search round.
    builder, runner : MetaSchedule Builder / Runner, optional
        Default: :func:`.measure.default_builder` / :func:`.measure.default_runner` (local). Pass an
        ``RPCRunner`` to measure on remote devices.
    seed : int
        Random seed of the first search task (the next ones count up from it).
    progress : callable, optional
        Receives plain-text lines: what is tuned, then one line per kernel after each round of
        measurements with candidates measured / total, best time so far and the estimated time
        left (:class:`.report.Progress`). Default: print them to stderr.

    Returns
    -------
    TuneReport
        Per kernel: candidates measured (default included), built / failed, default and best time.
    """
    prog = Progress(progress or _stderr_line)
    log = TuningLog(work_dir, target)  # it refuses an empty work_dir
    if isinstance(trials_per_iter, bool) or not isinstance(trials_per_iter, int) or trials_per_iter < 1:
        raise ValueError(f"trials_per_iter must be an int >= 1, got {trials_per_iter!r}")
    own_builder, own_runner = builder is None, runner is None
    lacking = features_this_cpu_lacks(target) if own_runner else []  # measured here, candidates would die
    builder = builder or default_builder(target)
    finished = False
    try:
        runner = runner or default_runner(target)
        report = _tune(
            funcs, target, log, prog, trials_per_kernel, batch, trials_per_iter, builder, runner, seed, lacking
        )
        finished = True
        return report
    finally:  # after an error or Ctrl-C, builds in flight are not waited for
        if own_builder:
            builder.close(wait=finished)
        if own_runner and runner is not None:
            close_runner(runner, wait=finished)


def _tune(
    funcs: list[tir.PrimFunc],
    target: tvm.target.Target,
    log: TuningLog,
    prog: Progress,
    trials_per_kernel: int,
    batch: int,
    trials_per_iter: int,
    builder: object,
    runner: object,
    seed: int,
    lacking: list[str] = (),
) -> TuneReport:
    ms = meta_schedule()
    with log.locked(exclusive=True):
        database = log.database(create=True)
        knobs = log.read_knobs()
        knob_jobs, searches, seen = [], [], set()
        for func in funcs:
            rule = tunable_rule(func, target)
            if rule is None:
                continue
            key = knob_key(func, batch, rule.knob_variant()) if isinstance(rule, KnobRule) else None
            mod = tvm.IRModule({"main": workload(func, batch)})
            ident = key or tvm_ffi.structural_hash(mod)
            if ident in seen:
                continue
            seen.add(ident)
            name = kernel_name(func)
            held = knobs.get(default_pin_key(func, batch), {})
            known = (
                key in knobs
                if key
                else database.has_workload(mod)
                and database.get_top_k(database.commit_workload(mod), 1)
                and not held.get("pending")  # a run stopped before it re-timed the best: search again
            )
            if known:
                note = ", held at its default schedule" if held else ""
                prog.message(f"{name}: already in the log{note}, skipped")
                continue
            if isinstance(rule, KnobRule):
                settings = rule.knob_settings(func)[: max(1, trials_per_kernel)]
                rep = KernelReport(f"{name} ({rule.label})")
                knob_jobs.append((rule, func, key, settings, rep))
                prog.add(rep, len(settings))
            else:
                rep = KernelReport(name)
                searches.append((rule, func, mod, rep))
                prog.add(rep, 1 + trials_per_kernel)
        if (knob_jobs or searches) and lacking:  # each run would die of an illegal instruction
            raise InputError(
                f"tuning measures the candidates on this machine, and its CPU lacks {', '.join(lacking)}, which "
                f"code for {target.attrs.get('mcpu', target.kind.name)} needs: tune on such a CPU "
                "(runner=rpc_runner(...), pbtvm tune --rpc), or for this CPU (target='llvm'); if this CPU does "
                "have them (neither Linux nor LLVM lists them), PBTVM_SKIP_CPU_CHECK=1 skips this check"
            )
        if prog.kernels:
            total = sum(n for _, n in prog.kernels)
            prog.message(
                f"{len(prog.kernels)} kernel(s), {total} candidates to measure (per kernel its default and up to "
                f"{trials_per_kernel} trials; a byte-code CPU kernel at most its tile settings), log {log.path}"
            )
        for rule, func, key, settings, rep in knob_jobs:
            best = _measure_knobs(rule, func, settings, batch, trials_per_iter, target, builder, runner, rep, prog)
            if best is not None:
                if best is not settings[0]:
                    mods = [
                        tvm.IRModule({"main": workload(rule.kernel_with(func, k), batch)}) for k in (settings[0], best)
                    ]
                    best = best if _confirm(rep, mods, target, builder, runner, prog) else settings[0]
                knobs[key] = {**best, **_logged_times(rep)}
                log.write_knobs(knobs)
        # Until its best was re-timed beside the default, a searched kernel is held at its default:
        # a run stopped in between leaves no unchecked best for compile to use.
        for _, func, _, _ in searches:
            knobs[default_pin_key(func, batch)] = {"schedule": "default", "pending": True}
        if searches:
            log.write_knobs(knobs)
        tasks = []
        defaults = [rule.traced_default(mod["main"]) for rule, _, mod, _ in searches]  # measured as candidates are
        measured = measure([sch.mod for sch in defaults], target, builder, runner)
        for (_, func, mod, rep), sch, (secs, stage, err) in zip(searches, defaults, measured, strict=True):
            rep.default_us = rep.record(secs, stage, err)
            prog.update(rep)
            if secs:
                record = ms.database.TuningRecord(
                    sch.trace,
                    database.commit_workload(mod),
                    secs,
                    target,
                    ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"]),
                )
                database.commit_tuning_record(record)
            tasks.append(tune_context(func, target, batch, seed=seed + len(tasks)))
        if tasks:
            ms.tune.tune_tasks(
                tasks=tasks,
                task_weights=[1.0] * len(tasks),
                work_dir=str(log.path),
                max_trials_global=trials_per_kernel * len(tasks),
                max_trials_per_task=trials_per_kernel,
                num_trials_per_iter=trials_per_iter,
                builder=builder,
                runner=runner,
                database=database,
                cost_model="xgb",
                measure_callbacks=[
                    *ms.measure_callback.MeasureCallback.create("default"),
                    _counter([rep for *_, rep in searches], prog),
                ],
                task_scheduler="gradient" if len(tasks) > 1 else "round-robin",
            )
        for (_, func, mod, rep), task, default in zip(searches, tasks, defaults, strict=True):
            pin = default_pin_key(func, batch)
            top = database.get_top_k(database.commit_workload(task.mod), 1)
            if not top:  # nothing built and ran: no best to hold back (lookup finds no record)
                knobs.pop(pin, None)
                log.write_knobs(knobs)
                continue
            secs = [float(s) for s in top[0].run_secs]
            rep.best_us = 1e6 * sum(secs) / len(secs)
            sch = s_tir.Schedule(mod["main"])
            top[0].trace.apply_to_schedule(sch, remove_postproc=False)
            if _is_default(sch.mod, default.mod):  # the default, or a trial that drew it again: no gain
                rep.search_us, rep.best_us, kept = rep.best_us, rep.default_us or rep.best_us, True
            else:
                kept = _confirm(rep, [default.mod, sch.mod], target, builder, runner, prog)
            if kept:
                knobs.pop(pin, None)
            else:
                knobs[pin] = {"schedule": "default", **_logged_times(rep)}
            log.write_knobs(knobs)
    reports = [job[-1] for job in knob_jobs] + [s[-1] for s in searches]
    return TuneReport(str(log.path), str(target), time.perf_counter() - prog.start, reports)


def _logged_times(rep: KernelReport) -> dict:
    """A knob-log entry's times: the kept setting's, the default's, the search's own best."""
    return {"us": rep.best_us, "default_us": rep.default_us, "search_us": rep.search_us}


def _is_default(best: tvm.IRModule, default: tvm.IRModule) -> bool:
    """Whether the search's best schedule is the default one."""
    return tvm_ffi.structural_equal(best, default)


def _confirm(
    rep: KernelReport,
    mods: list[tvm.IRModule],
    target: tvm.target.Target,
    builder: object,
    runner: object,
    prog: Progress,
) -> bool:
    """Time the default (``mods[0]``) and the search's best (``mods[1]``) side by side; whether the
    best is faster by :data:`MIN_CONFIRMED_GAIN`. ``rep`` gets the re-measured times (its best:
    the kept schedule's) and the search's own best as ``search_us``."""
    prog.message(f"{rep.name}: timing the default and the best side by side ({CONFIRM_ROUNDS} rounds)")
    default, best = (
        None if t is None else 1e6 * statistics.median(t)
        for t in measure_side_by_side(mods, target, builder, runner, CONFIRM_ROUNDS)
    )
    rep.search_us = rep.best_us
    rep.default_us = rep.default_us if default is None else default
    if best is None or default is None:  # one failed this time: the other is kept
        rep.confirmed = best is not None
    else:
        rep.confirmed = best <= default * (1 - MIN_CONFIRMED_GAIN)
    rep.best_us = best if rep.confirmed else rep.default_us
    prog.message(
        f"{rep.name}: side by side default {_us(default)}, best {_us(best)}: "
        + ("best kept" if rep.confirmed else "default kept")
    )
    return rep.confirmed


def _us(value: float | None) -> str:
    return "failed" if value is None else f"{value:.2f} us"


def _measure_knobs(
    rule: KnobRule,
    func: tir.PrimFunc,
    settings: list[dict],
    batch: int,
    per_batch: int,
    target: tvm.target.Target,
    builder: object,
    runner: object,
    rep: KernelReport,
    prog: Progress,
) -> dict | None:
    """Time ``rule``'s kernel for ``func`` with each knob setting (the default first); the fastest setting.

    Settings are built ``per_batch`` at a time (in parallel), then run one after another.
    """
    best = None
    for start in range(0, len(settings), per_batch):
        group = settings[start : start + per_batch]
        mods = [tvm.IRModule({"main": workload(rule.kernel_with(func, knobs), batch)}) for knobs in group]
        for knobs, (secs, stage, err) in zip(group, measure(mods, target, builder, runner), strict=True):
            us = rep.record(secs, stage, err)
            if knobs is settings[0]:
                rep.default_us = us
            if us is not None and (best is None or us < best[1]):
                best = (knobs, us)
            prog.update(rep)
    return None if best is None else best[0]


def _counter(reports: list[KernelReport], prog: Progress) -> object:
    """A MetaSchedule measure callback that counts each search task's results into its report."""
    ms = meta_schedule()

    @derived_object
    class _Count(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):  # noqa: ARG002 - MetaSchedule's callback
            rep = reports[task_id]
            for b, r in zip(builder_results, runner_results, strict=False):
                if b.error_msg:
                    rep.record(None, "build", str(b.error_msg))
                elif r.error_msg:
                    rep.record(None, "run", str(r.error_msg))
                else:
                    rep.record([float(s) for s in r.run_secs])
            prog.update(rep)

    return _Count()


__all__ = ["tune_kernels"]
