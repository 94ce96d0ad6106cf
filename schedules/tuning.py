"""MetaSchedule search over the tunable PB templates, and the tuning log it writes.

* :func:`register_custom_rules` registers each target's PB rule as a MetaSchedule custom rule
  (``s_tir.meta_schedule.<target key>.pbtvm_bitplane_gemm``), the name TVM's ``ApplyCustomRule``
  looks up for blocks tagged ``schedule_rule=pbtvm_bitplane_gemm``. Every structural variant of
  the template is one design space; its sampled knobs are explored by the evolutionary search
  with the XGBoost cost model.
* Kernels have a symbolic batch and a symbolic ``bitlayers``; MetaSchedule measures concrete
  workloads, so a kernel is tuned as :func:`workload` (batch and bitlayers fixed) and the winning
  trace is replayed onto the symbolic kernel at compile time (:func:`tuned_lookup`).
* The tuning log is a MetaSchedule JSON database in ``work_dir/<target key>/`` next to a small
  ``pbtvm_log.json`` stating the TVM version, bitplane-format version and target it was made
  for; :class:`TuningLog` ignores a log made for anything else with a warning and raises
  :class:`TuningLogError` on a corrupt one. Tuning holds an exclusive file lock on the log, so
  two runs into one ``work_dir`` take turns instead of interleaving records.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import time
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tvm_ffi
from tvm.ir.utils import derived_object

from pbtvm import names
from pbtvm._tvm import TVM_VERSION, meta_schedule, s_tir, tir, tvm
from pbtvm.bitplane import FORMAT_VERSION
from pbtvm.target import TargetInfo

from . import cuda_bmma
from .cpu_vnni import KNOB_LOG, is_fixed_kernel, knob_key, measure_knobs, vnni_kernel_for
from .rules import ScheduleRule, rule_for, rules_for
from .verify import agrees_with_default

logger = logging.getLogger(__name__)

#: Version of the ``pbtvm_log.json`` layout.
LOG_SCHEMA = 1
LOG_META = "pbtvm_log.json"
WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
#: MetaSchedule target keys -> the target kind whose rules serve them.
_RULE_KEYS = {"cpu": "llvm", "cuda": "cuda"}


class TuningLogError(ValueError):
    """A tuning log that cannot be read (corrupt JSON, truncated, wrong layout)."""


# --------------------------------------------------------------------------- custom rules
def _custom_rule(kind: str) -> Callable:
    def apply(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> list[s_tir.Schedule]:
        func = sch.mod["main"]
        rule = next(r for r in rules_for(kind) if r.kernel == names.KernelKind.GEMM and not getattr(r, "fixed", False))
        spaces = []
        for variant in rule.variants(func, None):
            space = sch.copy()
            rule.schedule(space, func, None, True, variant)
            spaces.append(space)
        return spaces

    return apply


def register_custom_rules() -> None:
    """Register the PB templates under the names MetaSchedule's ``ApplyCustomRule`` looks up."""
    for key, kind in _RULE_KEYS.items():
        name = f"s_tir.meta_schedule.{key}.{names.RULE_BITPLANE_GEMM}"
        tvm.register_global_func(name, _custom_rule(kind), override=True)
    cuda_bmma.register()  # the binary-tensor-core template (mma16x256 weights)


# --------------------------------------------------------------------------- workloads
def workload(func: tir.PrimFunc, batch: int = 1) -> tir.PrimFunc:
    """``func`` with its symbolic dimensions set to ``batch`` and ``bitlayers`` to all planes.

    Parameters
    ----------
    func : tir.PrimFunc
        A PB kernel (``pbtvm.kernel`` attribute) with symbolic batch and a ``bitlayers`` scalar.
    batch : int
        The batch size to tune for.

    Returns
    -------
    tir.PrimFunc
        Static-shape copy with ``global_symbol`` "main", the unit MetaSchedule measures.
    """
    bits = int(func.attrs[names.ATTR_BITS])
    binds: dict = {}
    for param in func.params:
        if tir.is_buffer_var(param):
            if any(not isinstance(d, tir.IntImm) for d in param.shape):
                shape = [d if isinstance(d, tir.IntImm) else tir.const(batch, str(d.ty)) for d in param.shape]
                binds[param] = tir.decl_buffer(
                    shape, param.dtype, param.name, elem_offset=param.elem_offset, offset_factor=param.offset_factor
                )
        else:
            binds[param] = tir.const(bits, str(param.ty))
    return func.specialize(binds).with_attr("global_symbol", "main")


def _space_generator(target: tvm.target.Target) -> object:
    ms = meta_schedule()
    post = ms.postproc
    postprocs = [post.VerifyGPUCode()] if target.kind.name == "cuda" else []
    return ms.space_generator.PostOrderApply(
        sch_rules=[ms.schedule_rule.ApplyCustomRule()],
        postprocs=postprocs,
        mutator_probs={ms.mutator.MutateTileSize(): 0.6, ms.mutator.MutateUnroll(): 0.4},
    )


def tune_context(func: tir.PrimFunc, target: tvm.target.Target, batch: int = 1, seed: int = -1) -> object:
    """A MetaSchedule ``TuneContext`` for one PB kernel with the pbtvm design spaces."""
    register_custom_rules()
    ms = meta_schedule()
    mod = tvm.IRModule({"main": workload(func, batch)})
    with _without_tensor_intrinsics():
        return ms.TuneContext(
            mod,
            target=target,
            space_generator=_space_generator(target),
            # The PB design spaces are small (a few hundred points), so a smaller population than
            # MetaSchedule's default 512 explores them fully at a fraction of the cost.
            search_strategy=ms.search_strategy.EvolutionarySearch(
                population_size=128, init_min_unmeasured=32, genetic_num_iters=3
            ),
            task_name=kernel_name(func),
            rand_state=seed,
            num_threads=max(1, os.cpu_count() or 1),
        )


@contextlib.contextmanager
def _without_tensor_intrinsics() -> Iterator[None]:
    """Let ``TuneContext`` skip its ``import tvm.s_tir.tensor_intrin`` (see :func:`build_candidate`).

    While a placeholder module stands in for it, the import is a no-op; the placeholder is removed
    afterwards, so a later real import (someone tensorizing) still registers the intrinsics.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    placeholder = types.ModuleType(name)
    sys.modules[name] = placeholder
    try:
        yield
    finally:
        if sys.modules.get(name) is placeholder:
            del sys.modules[name]


def sample_candidates(func: tir.PrimFunc, target: tvm.target.Target, count: int, seed: int = 0, batch: int = 1):  # noqa: ANN201
    """``count`` random schedules from every design space, postprocessed as the search would.

    Returns
    -------
    list of s_tir.Schedule
        Candidates whose postprocessors all passed (a candidate the GPU verifier rejects is
        dropped, as in the search).
    """
    out = []
    for i in range(count):
        ctx = tune_context(func, target, batch, seed=seed + i)
        for space in ctx.generate_design_space():
            sch = space.copy()
            if all(p.apply(sch) for p in ctx.space_generator.postprocs):
                out.append(sch)
    return out


def kernel_name(func: tir.PrimFunc) -> str:
    """A readable task name: kernel kind, format and shape, e.g. ``pb_gemm_w4a8_kNW_4096x4096``."""
    a = func.attrs
    n_rows = _out_rows(func)
    zp = "o" if str(a.get(names.ATTR_CODEBOOK, "")) == "offset_binary" else ""  # zero-point epilogue
    return f"{a['pbtvm.kernel']}_w{a['pbtvm.bits']}a{a['pbtvm.act_bits']}{zp}_{a['pbtvm.layout']}_{n_rows}x{a['pbtvm.k']}"


def _out_rows(func: tir.PrimFunc) -> int:
    return int(func.params[-1].shape[-1])


# --------------------------------------------------------------------------- the log
def target_key(target: tvm.target.Target) -> str:
    """Directory name of a target's log: :attr:`pbtvm.target.TargetInfo.log_key`."""
    return TargetInfo.of(target).log_key


def _workload_row_problem(row: object) -> str:
    if not (isinstance(row, list) and len(row) == 2 and all(isinstance(v, str) for v in row)):
        return "expected [hash, module] strings"
    return ""


def _record_row_problem(row: object, n_workloads: int) -> str:
    if not (isinstance(row, list) and len(row) == 2 and type(row[0]) is int):
        return "expected [workload index, record]"
    if not 0 <= row[0] < n_workloads:
        return f"workload index {row[0]} but the log has {n_workloads} workload(s)"
    rec = row[1]
    if not (isinstance(rec, list) and len(rec) == 4):
        return "expected a record [trace, run_secs, target, arg_info]"
    trace, secs, target, args = rec
    if not isinstance(trace, list) or not isinstance(args, list) or not isinstance(target, dict):
        return "trace, target or arg_info has the wrong type"
    if secs is not None and not (isinstance(secs, list) and all(isinstance(t, int | float) for t in secs)):
        return "run_secs is not a list of numbers"
    return ""


def check_rows(log_dir: Path) -> None:
    """Raise :class:`TuningLogError` (file and line) unless every row of the log in ``log_dir`` is a MetaSchedule row.

    A workload row is ``[structural hash, module]`` (two strings); a record row is
    ``[workload index, [trace, run_secs, target, arg_info]]`` with the index naming a workload
    row. MetaSchedule itself would crash (or segfault) on anything else.
    """
    n_workloads = 0
    for name in (WORKLOADS, RECORDS):
        path = Path(log_dir) / name
        if not path.exists():
            continue
        for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
            if not raw.strip():
                continue
            where = f"tuning log {path} is corrupt at line {lineno}"
            try:
                row = json.loads(raw.decode())
            except UnicodeDecodeError:
                raise TuningLogError(f"{where}: not text (binary data)") from None
            except json.JSONDecodeError as err:
                raise TuningLogError(f"{where}: {err}") from None
            why = _workload_row_problem(row) if name == WORKLOADS else _record_row_problem(row, n_workloads)
            if why:
                raise TuningLogError(f"{where}: not a MetaSchedule {name.split('_')[-1][:-5]} row ({why})")
            n_workloads += name == WORKLOADS



@dataclass
class TuningLog:
    """The MetaSchedule database of one target inside a ``work_dir``.

    Parameters
    ----------
    work_dir : path
        Holds one sub-directory per target key.
    target : tvm.target.Target
    """

    work_dir: Path
    target: tvm.target.Target

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir)

    @property
    def path(self) -> Path:
        """``work_dir/<target key>``."""
        return self.work_dir / target_key(self.target)

    def expected_meta(self) -> dict:
        """What ``pbtvm_log.json`` must say for this log to be used."""
        return {
            "schema": LOG_SCHEMA,
            "tvm_version": TVM_VERSION,
            "format_version": FORMAT_VERSION,
            "target_key": target_key(self.target),
            "target": str(self.target),
        }

    def _mismatch(self) -> str | None:
        meta_path = self.path / LOG_META
        try:
            meta = json.loads(meta_path.read_bytes().decode())
        except UnicodeDecodeError:
            raise TuningLogError(f"tuning log {meta_path} is corrupt: not text (binary data)") from None
        except json.JSONDecodeError as err:
            raise TuningLogError(f"tuning log {meta_path} is corrupt: {err}") from None
        if not isinstance(meta, dict):
            raise TuningLogError(f"tuning log {meta_path} is corrupt: expected a JSON object")
        want = self.expected_meta()
        for key in ("schema", "tvm_version", "format_version", "target_key"):
            if meta.get(key) != want[key]:
                return f"{key} is {meta.get(key)!r}, this build needs {want[key]!r}"
        return None

    def _check_records(self) -> None:
        check_rows(self.path)

    def check(self) -> None:
        """Raise :class:`TuningLogError` if the log's metadata or rows are corrupt (what compile checks)."""
        self._mismatch()
        self._check_records()

    def usable(self) -> bool:
        """Whether a log for this target exists and was made by this TVM and format version.

        Warns (and returns False) when ``work_dir`` only holds logs for other targets or the
        log is from another version; raises :class:`TuningLogError` when it is corrupt.
        """
        if not (self.path / LOG_META).exists():
            others = [Path(p).parent.name for p in sorted(str(q) for q in self.work_dir.glob(f"*/{LOG_META}"))]
            if others:
                warnings.warn(
                    f"pbtvm: {self.work_dir} has tuning logs for {', '.join(others)} but none for "
                    f"{target_key(self.target)}; logs from another target are ignored (default schedules used)",
                    stacklevel=3,
                )
            return False
        why = self._mismatch()
        if why is not None:
            warnings.warn(f"pbtvm: ignoring tuning log {self.path}: {why}", stacklevel=3)
            return False
        self._check_records()
        return True

    @contextlib.contextmanager
    def locked(self, exclusive: bool) -> Iterator[None]:
        """Hold the log's file lock (exclusive while tuning, shared while reading)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "a+") as fh:
            if exclusive:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    logger.warning("another tuning run holds %s; waiting for it", self.path)
                    fcntl.flock(fh, fcntl.LOCK_EX)
            else:
                fcntl.flock(fh, fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def database(self, create: bool = False) -> object | None:
        """The MetaSchedule ``JSONDatabase``, or None if there is no usable log.

        ``create=True`` (tuning) starts a fresh log when there is none, and moves a log made
        for another version aside to ``<key>.stale-<time>`` with a warning.
        """
        ms = meta_schedule()
        if not self.work_dir.exists() and not create:
            warnings.warn(
                f"pbtvm: tuning work_dir {self.work_dir} does not exist; default schedules used", stacklevel=3
            )
            return None
        if self.usable():
            return ms.database.JSONDatabase(str(self.path / WORKLOADS), str(self.path / RECORDS), allow_missing=True)
        if not create:
            return None
        if (self.path / LOG_META).exists():
            stale = self.path.with_name(f"{self.path.name}.stale-{int(time.time())}")
            self.path.rename(stale)
            warnings.warn(f"pbtvm: moved the old tuning log aside to {stale}", stacklevel=3)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / LOG_META).write_text(json.dumps(self.expected_meta(), indent=1) + "\n")
        return ms.database.JSONDatabase(str(self.path / WORKLOADS), str(self.path / RECORDS), allow_missing=True)


# --------------------------------------------------------------------------- search
@dataclass
class KernelReport:
    """What tuning did for one kernel; times in microseconds."""

    name: str
    trials: int = 0
    built: int = 0
    build_failed: int = 0
    run_failed: int = 0
    default_us: float | None = None
    best_us: float | None = None
    first_error: str | None = None

    @property
    def speedup(self) -> float | None:
        """Default-template time over the best time in the log (>= 1 by construction)."""
        if self.default_us is None or self.best_us is None:
            return None
        return self.default_us / self.best_us


@dataclass
class TuneReport:
    """Outcome of :func:`tune_kernels`."""

    log: str
    target: str
    seconds: float = 0.0
    kernels: list[KernelReport] = field(default_factory=list)

    def table(self) -> str:
        """A plain-text table, one row per kernel."""
        rows = [
            f"{'kernel':<40} {'trials':>6} {'built':>6} {'failed':>6} {'default us':>11} {'best us':>9} {'gain':>6}"
        ]
        for k in self.kernels:
            gain = f"{k.speedup:.2f}x" if k.speedup else "-"
            d = f"{k.default_us:.2f}" if k.default_us else "-"
            b = f"{k.best_us:.2f}" if k.best_us else "-"
            rows.append(
                f"{k.name:<40} {k.trials:>6} {k.built:>6} {k.build_failed + k.run_failed:>6} {d:>11} {b:>9} {gain:>6}"
            )
        rows.append(f"tuning time {self.seconds:.1f}s, log {self.log}")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        """JSON-friendly form."""
        return {
            "log": self.log,
            "target": self.target,
            "seconds": self.seconds,
            "kernels": [asdict(k) for k in self.kernels],
        }


def _note_failure(rep: KernelReport, stage: str, message: str) -> None:
    rep.first_error = rep.first_error or message[:2000]
    logger.warning("candidate %s failed: %s", stage, message.strip().splitlines()[-1][:300])


def _callback(reports: list[KernelReport], progress: Callable[[str], None] | None, bar: Any = None):  # noqa: ANN202
    ms = meta_schedule()

    @derived_object
    class _Count(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):  # noqa: ANN001, ANN202
            rep = reports[task_id]
            for b, r in zip(builder_results, runner_results, strict=False):
                rep.trials += 1
                if b.error_msg:
                    rep.build_failed += 1
                    _note_failure(rep, "build", b.error_msg)
                    continue
                rep.built += 1
                if r.error_msg:
                    rep.run_failed += 1
                    _note_failure(rep, "run", r.error_msg)
                    continue
                us = 1e6 * sum(float(s) for s in r.run_secs) / len(r.run_secs)
                rep.best_us = us if rep.best_us is None else min(rep.best_us, us)
            best = f"{rep.best_us:.2f} us" if rep.best_us else "-"
            if bar is not None:
                bar.update(len(builder_results))
                bar.set_postfix_str(f"{rep.name} best {best}", refresh=False)
            elif progress is not None:
                progress(
                    f"[pbtvm tune] {rep.name}: {rep.trials} trials ({rep.build_failed} build / "
                    f"{rep.run_failed} run failures), best {best}"
                )

    return _Count()


def _measure_default(func: tir.PrimFunc, target: tvm.target.Target, batch: int, builder, runner) -> tuple:  # noqa: ANN001
    """Build and run the default schedule through the same builder/runner as the search."""
    ms = meta_schedule()
    mod = tvm.IRModule({"main": workload(func, batch)})
    sch = rule_for(func, target).apply(mod["main"], target)
    (res,) = builder.build([ms.builder.BuilderInput(sch.mod, target)])
    if res.error_msg:
        return sch, None
    args = ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"])
    device = TargetInfo.of(target).device
    (fut,) = runner.run([ms.runner.RunnerInput(res.artifact_path, device, args)])
    out = fut.result()
    if out.error_msg:
        return sch, None
    return sch, [float(s) for s in out.run_secs]


def build_candidate(mod: tvm.IRModule, target: tvm.target.Target, _params: dict | None) -> object:
    """MetaSchedule's ``default_build`` without its ``import tvm.s_tir.tensor_intrin``.

    That import parses ~250 TVMScript tensor intrinsics, each calling ``inspect.stack()``: 40 s
    of CPU in every fresh worker (measured on the 2-core EPYC, 2026-11-30), and MetaSchedule's
    LocalBuilder starts fresh workers for every batch of candidates. PB schedules never tensorize,
    so the intrinsics are not needed to build them.
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def default_builder(target: tvm.target.Target) -> object:
    """LocalBuilder with one worker per core, a generous timeout and :func:`build_candidate`.

    MetaSchedule's default 30 s killed nvcc builds; a fresh worker also spends seconds importing
    TVM before its first build, more on a loaded machine.
    """
    ms = meta_schedule()
    timeout = 300.0
    workers = max(1, os.cpu_count() or 1)
    if target.kind.name != "cuda":
        return ms.builder.LocalBuilder(max_workers=workers, timeout_sec=timeout, f_build=build_candidate)
    # CUDA: BMMA candidates are materialized into their kernel and every candidate is built with
    # nvcc, as pbtvm.compile builds it (the workers register the build function first).
    return ms.builder.LocalBuilder(
        max_workers=workers,
        timeout_sec=timeout,
        f_build=cuda_bmma.BUILD_FUNC,
        initializer=cuda_bmma.worker_initializer,
    )


def _evaluator_config() -> object:
    """How every runner times a candidate: 3 repeats of at least 20 calls and 20 ms."""
    return meta_schedule().runner.EvaluatorConfig(number=20, repeat=3, min_repeat_ms=20, enable_cpu_cache_flush=False)


def default_runner(target: tvm.target.Target) -> object:
    """LocalRunner timing each candidate as a median-friendly repeat of short loops."""
    return meta_schedule().runner.LocalRunner(evaluator_config=_evaluator_config(), timeout_sec=60.0)


def rpc_runner(tracker: str, key: str, session_timeout: float = 120.0) -> object:
    """A MetaSchedule ``RPCRunner`` measuring on every free device registered as ``key``.

    Parameters
    ----------
    tracker : str
        ``host:port`` of a TVM RPC tracker (``python -m tvm.exec.rpc_tracker``).
    key : str
        Device key the servers registered with (``python -m tvm.exec.rpc_server --key``).
    session_timeout : float
        Seconds one measurement session may take.

    Raises
    ------
    ValueError
        Malformed address, tracker unreachable, or no server with ``key`` registered.
    """
    from pbtvm.rpc_cluster import server_keys

    ms = meta_schedule()
    host, sep, port = tracker.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"RPC tracker address must be host:port, got {tracker!r}")
    try:
        keys = server_keys(host, int(port))
    except Exception as err:  # noqa: BLE001 - socket errors of every kind
        raise ValueError(f"cannot reach the RPC tracker at {tracker}: {err}") from None
    servers = keys.count(key)
    if servers == 0:
        known = sorted(set(keys))
        raise ValueError(f"no RPC server registered with key {key!r} at {tracker} (keys there: {known or 'none'})")
    rpc_cfg = ms.runner.RPCConfig(
        tracker_host=host, tracker_port=int(port), tracker_key=key, session_timeout_sec=session_timeout
    )
    logger.info("measuring on %d RPC server(s) with key %s", servers, key)
    return ms.runner.RPCRunner(rpc_cfg, _evaluator_config(), max_workers=servers)


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
    """Search schedules for PB GEMM kernels and record them in ``work_dir``'s log.

    Parameters
    ----------
    funcs : list of tir.PrimFunc
        PB kernels (``pbtvm.kernel == "pb_gemm"``); duplicates (same workload) are tuned once,
        kernels already in the log are skipped.
    target : tvm.target.Target
    work_dir : path
    trials_per_kernel : int
        Measured candidates per kernel.
    batch : int
        Batch size the kernels are tuned for.
    builder, runner : MetaSchedule Builder / Runner, optional
        Default: :func:`default_builder` / :func:`default_runner` (local). Pass an ``RPCRunner``
        to measure on remote devices.
    progress : callable, optional
        Receives one line per search round (default: print to stderr).

    Returns
    -------
    TuneReport
        Per kernel: trials, candidates built / failed, default and best time.
    """
    ms = meta_schedule()
    bar = None
    if progress is None:  # a progress bar on stderr, messages above it
        from tqdm import tqdm

        bar = tqdm(total=0, desc="pbtvm tune", unit="trial", file=sys.stderr, disable=None)
        progress = bar.write

    log = TuningLog(Path(work_dir), target)
    builder = builder or default_builder(target)
    runner = runner or default_runner(target)
    t0 = time.perf_counter()
    with log.locked(exclusive=True):
        database = log.database(create=True)
        tasks, reports, seen, knob_reports = [], [], set(), []
        for func in funcs:
            if names.kernel_kind(func) != names.KernelKind.GEMM:
                continue
            if is_fixed_kernel(func, target):
                knob_reports.append(_tune_knobs(func, target, batch, trials_per_kernel, builder, runner, log, progress))
                continue
            mod = tvm.IRModule({"main": workload(func, batch)})
            key = tvm_ffi.structural_hash(mod)
            if key in seen:
                continue
            seen.add(key)
            name = kernel_name(func)
            if database.has_workload(mod) and database.get_top_k(database.commit_workload(mod), 1):
                progress(f"[pbtvm tune] {name}: already in the log, skipped")
                continue
            rep = KernelReport(name)
            sch, secs = _measure_default(func, target, batch, builder, runner)
            if secs:
                rep.default_us = rep.best_us = 1e6 * sum(secs) / len(secs)
                database.commit_tuning_record(
                    ms.database.TuningRecord(
                        sch.trace,
                        database.commit_workload(mod),
                        secs,
                        target,
                        ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"]),
                    )
                )
            tasks.append(tune_context(func, target, batch, seed=seed + len(tasks)))
            reports.append(rep)
        if tasks:
            progress(f"[pbtvm tune] {len(tasks)} kernel(s), {trials_per_kernel} trials each, log {log.path}")
            if bar is not None:
                bar.total = trials_per_kernel * len(tasks)
                bar.refresh()
            callbacks = [*ms.measure_callback.MeasureCallback.create("default"), _callback(reports, progress, bar)]
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
                measure_callbacks=callbacks,
                task_scheduler="gradient" if len(tasks) > 1 else "round-robin",
            )
        for rep, task in zip(reports, tasks, strict=True):
            top = database.get_top_k(database.commit_workload(task.mod), 1)
            if top:
                secs = [float(s) for s in top[0].run_secs]
                rep.best_us = 1e6 * sum(secs) / len(secs)
    if bar is not None:
        bar.close()
    reports = [r for r in knob_reports if r is not None] + reports
    return TuneReport(str(log.path), str(target), time.perf_counter() - t0, reports)


def _knob_log(log: TuningLog) -> dict:
    path = log.path / KNOB_LOG
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TuningLogError(f"tuning log {path} is corrupt: {err}") from None
    if not isinstance(data, dict):
        raise TuningLogError(f"tuning log {path} is corrupt: expected a JSON object")
    return data


def _tune_knobs(func, target, batch, trials, builder, runner, log, progress) -> KernelReport | None:  # noqa: ANN001
    """Measure the AVX-512 kernel's knobs (:data:`.cpu_vnni.KNOBS`) and record the fastest."""
    key, name = knob_key(func, batch), kernel_name(func)
    known = _knob_log(log)
    if key in known:
        progress(f"[pbtvm tune] {name}: already in the log, skipped")
        return None
    rep = KernelReport(name + " (avx512)")
    best = None
    for knobs, secs, err in measure_knobs(func, target, batch, trials, builder, runner):
        rep.trials += 1
        if secs is None:
            rep.run_failed += 1
            _note_failure(rep, "run", err or "")
            continue
        rep.built += 1
        us = 1e6 * sum(secs) / len(secs)
        rep.default_us = rep.default_us or us  # the first candidate is the default knobs
        if best is None or us < best[1]:
            best = (knobs, us)
    if best is not None:
        rep.best_us = best[1]
        known[key] = {**best[0], "us": best[1], "default_us": rep.default_us}
        (log.path / KNOB_LOG).write_text(json.dumps(known, indent=1) + "\n")
    progress(f"[pbtvm tune] {name}: AVX-512 kernel, {rep.trials} knob settings, best {rep.best_us or 0:.2f} us")
    return rep


def replay(func: tir.PrimFunc, trace: object) -> tir.PrimFunc:
    """Apply a trace found on :func:`workload` to the symbolic kernel ``func``.

    The templates' instructions do not depend on the batch or ``bitlayers`` extents, so the
    trace (with its sampled decisions) replays on the kernel that keeps both symbolic.
    """
    sch = s_tir.Schedule(func)
    trace.apply_to_schedule(sch, remove_postproc=False)
    return cuda_bmma.materialize(sch.mod["main"])  # a BMMA config becomes its kernel


def _record_for(database: object, mod: tvm.IRModule, target: tvm.target.Target, where: Path, name: str):  # noqa: ANN202
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
        Filled with the names of the kernels that got a tuned schedule, as lookups happen.
    """
    log = TuningLog(Path(work_dir), target)
    with log.locked(exclusive=False) if log.path.exists() else contextlib.nullcontext():
        database = log.database(create=False)
    used: list[str] = []
    if database is None:
        return None, used
    checked: dict[int, bool | None] = {}  # workload hash -> agrees with the default schedule

    knobs = _knob_log(log) if database is not None else {}

    def lookup(func: tir.PrimFunc) -> tir.PrimFunc | None:
        if names.kernel_kind(func) != names.KernelKind.GEMM:
            return None
        if is_fixed_kernel(func, target):
            chosen = knobs.get(knob_key(func, batch))
            if chosen is None:
                return None
            used.append(kernel_name(func))
            return vnni_kernel_for(func, row_tile=int(chosen["row_tile"]), batch_tile=int(chosen["batch_tile"]))
        mod = tvm.IRModule({"main": workload(func, batch)})
        if not database.has_workload(mod):
            return None
        record = _record_for(database, mod, target, log.path, kernel_name(func))
        if record is None:
            return None
        try:
            scheduled = replay(func, record.trace)
        except Exception as err:  # noqa: BLE001 - a stale trace must not break compilation
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


__all__ = [
    "KernelReport",
    "ScheduleRule",
    "TuneReport",
    "TuningLog",
    "TuningLogError",
    "check_rows",
    "kernel_name",
    "register_custom_rules",
    "replay",
    "rpc_runner",
    "sample_candidates",
    "target_key",
    "tune_context",
    "tune_kernels",
    "tuned_lookup",
    "workload",
]
