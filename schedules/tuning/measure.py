"""How candidates are built and timed: MetaSchedule builders and runners (local or RPC).

:func:`measure` builds and runs modules through the same builder and runner as the search, for
the schedules the search does not propose itself: the default schedule of a tunable kernel
(so the log always holds it) and every knob setting of a :class:`~pbtvm.schedules.rules.KnobRule`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable, Iterator

from pbtvm._tvm import meta_schedule, tvm
from pbtvm.errors import InputError
from pbtvm.target import TargetInfo
from pbtvm.worker_env import workers_without_torch

from .. import cuda_bmma
from . import rpc_guard

logger = logging.getLogger(__name__)

#: Seconds one candidate may take to build (nvcc included; a fresh worker imports TVM first).
BUILD_TIMEOUT_S = 300.0
#: Seconds one candidate may take to run its repeats.
RUN_TIMEOUT_S = 60.0


#: Builds one builder worker process serves before it is replaced (MetaSchedule's LocalBuilder
#: restarts its workers for every batch because of a memory leak after many uses).
WORKER_USES = 64


def build_candidate(mod: tvm.IRModule, target: tvm.target.Target, _params: dict | None) -> object:
    """MetaSchedule's ``default_build`` without its ``import tvm.s_tir.tensor_intrin``.

    That import parses ~250 TVMScript tensor intrinsics, each calling ``inspect.stack()``: 30-40 s
    of CPU in every fresh worker (measured on the 2-core EPYC, 2026-11-30). PB schedules never
    tensorize, so the intrinsics are not needed to build them.
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _build_and_export(f_build: Callable, mod: tvm.IRModule, target: tvm.target.Target, root: str) -> str:
    """Runs in a builder worker: build ``mod`` and export it to a tar file in a fresh directory
    under ``root`` (as MetaSchedule's ``default_export`` does under the system's temp dir); its path.

    CUDA kernels go into the tar as nvcc-built fatbins (:func:`pbtvm.library.pack_compiled_imports_c`):
    on a host without a CUDA driver TVM keeps them as source, and the runner's host would then
    compile them with its NVRTC, without ``compile``'s nvcc options (no ``--fmad=false``, the
    ``__restrict__`` kept where a kernel waits for the one before it): another binary than the
    one ``compile`` launches.
    """
    from tvm.support.tar import tar

    from pbtvm.library import pack_compiled_imports_c

    path = os.path.join(tempfile.mkdtemp(dir=root), "tvm_tmp_mod." + tar.output_format)
    built = f_build(mod, target, None)
    if target.kind.name == "cuda":
        arch = str(target.export()["arch"])
        built.export_library(path, fcompile=tar, fpack_imports=pack_compiled_imports_c(arch))
    else:
        built.export_library(path, fcompile=tar)
    return path


@functools.cache
def _pooled_builder_class() -> type:
    from tvm.ir.utils import derived_object
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    ms = meta_schedule()

    @derived_object
    class PooledBuilder(ms.builder.PyBuilder):
        """A local MetaSchedule builder whose worker processes serve every ``build`` call.

        MetaSchedule's ``LocalBuilder`` starts fresh workers for every batch of candidates, and
        one more when it is made (to check itself); each imported TVM and torch first, ~3.5 s of
        CPU on the 2-core test machine, so a knob search measuring one setting at a time spent
        ~4 s per setting starting processes. Here the workers live until :meth:`close` (each is
        replaced after :data:`WORKER_USES` builds) and start without torch
        (:func:`pbtvm.worker_env.workers_without_torch`).

        Every build goes to a directory of its own under one root that :meth:`close` removes:
        the measuring code removes each after its run, and nothing is left behind where it does
        not (a build never run, an interrupted search).
        """

        def __init__(self, f_build: Callable, max_workers: int, timeout_sec: float) -> None:
            super().__init__()
            self.f_build, self.timeout_sec = f_build, timeout_sec
            self.root = tempfile.mkdtemp(prefix="pbtvm_build_")
            self.pool = PopenPoolExecutor(
                max_workers=max_workers, timeout=timeout_sec, maximum_process_uses=WORKER_USES
            )

        def build(self, build_inputs: list) -> list:
            jobs = [(self.f_build, b.mod, b.target, self.root) for b in build_inputs]
            results = []
            with workers_without_torch():  # workers start when a build needs them
                done = list(self.pool.map_with_error_catching(lambda job: _build_and_export(*job), jobs))
            for res in done:
                if res.status == StatusKind.COMPLETE:
                    results.append(ms.builder.BuilderResult(res.value, None))
                elif res.status == StatusKind.TIMEOUT:
                    results.append(ms.builder.BuilderResult(None, f"build timed out after {self.timeout_sec:.0f} s"))
                else:
                    results.append(ms.builder.BuilderResult(None, f"build failed:\n{res.value}"))
            return results

        def close(self, wait: bool = True) -> None:
            """End the worker processes and remove every build's files (``wait``: for builds in
            flight to end first; not after an interrupt)."""
            shutdown_pool(self.pool, wait)
            shutil.rmtree(self.root, ignore_errors=True)

    return PooledBuilder


def default_builder(target: tvm.target.Target) -> object:
    """A builder with one worker per core, a generous timeout, kept workers (``close()`` ends them).

    Candidates build as :func:`pbtvm.cuda.build` builds them: CUDA with nvcc (BMMA candidates
    materialized into their kernel), other targets with :func:`build_candidate`. MetaSchedule's
    default 30 s timeout killed nvcc builds.
    """
    f_build = cuda_bmma.build_candidate if target.kind.name == "cuda" else build_candidate
    return _pooled_builder_class()(f_build, max(1, os.cpu_count() or 1), BUILD_TIMEOUT_S)


def _evaluator_config() -> object:
    """How every runner times a candidate: 3 repeats of at least 20 calls and 20 ms."""
    return meta_schedule().runner.EvaluatorConfig(number=20, repeat=3, min_repeat_ms=20, enable_cpu_cache_flush=False)


def default_runner(target: tvm.target.Target) -> object:  # noqa: ARG001 - same signature as default_builder
    """LocalRunner timing each candidate as a median-friendly repeat of short loops.

    Its worker process starts here, without torch (:func:`pbtvm.worker_env.workers_without_torch`;
    one started again after a timeout imports it).
    """
    with workers_without_torch():
        return meta_schedule().runner.LocalRunner(evaluator_config=_evaluator_config(), timeout_sec=RUN_TIMEOUT_S)


def close_runner(runner: object, wait: bool = True) -> None:
    """End a local runner's worker process now (MetaSchedule leaves it to garbage collection,
    which an exception's traceback can put off past the end of the run)."""
    pool = getattr(runner, "pool", None)
    if pool is not None:
        shutdown_pool(pool, wait)


def shutdown_pool(pool: object, wait: bool = True) -> None:
    """``pool.shutdown(wait)`` for a TVM ``PopenPoolExecutor``, and a pool left unusable but
    harmless where that fails. Interrupted (Ctrl-C reaches the workers too), a worker's process
    can vanish while shutdown kills it: TVM's ``kill`` then raises (``'NoneType' object has no
    attribute 'pid'``) with the pool's lock held, and the pool's ``__del__`` waited on that lock
    forever at interpreter exit (``pbtvm tune`` hung after Ctrl-C).

    Not waiting, calls still queued are cancelled (each would start a new worker after the
    shutdown) and the workers' processes (and theirs) are killed first: TVM's ``kill`` closes a
    worker's pipe before it kills the process, and that close waits for a thread still reading
    the pipe, i.e. for the worker's call to end (20 s for one waiting on an RPC device gone).
    """
    if not wait:
        with contextlib.suppress(Exception):  # queued calls would start new workers after shutdown
            pool._threadpool.shutdown(wait=False, cancel_futures=True)
        _kill_worker_processes(pool)
    try:
        pool.shutdown(wait=wait)
    except Exception:
        with contextlib.suppress(RuntimeError):  # not held: shutdown failed before taking it
            pool._lock.release()
        for worker in list(getattr(pool, "_worker_map", {}).values()):
            with contextlib.suppress(Exception):
                worker.kill()
        with contextlib.suppress(Exception):
            pool._threadpool.shutdown(wait=False)
        pool._shutdown = True  # its __del__ does not shut down again


def _kill_worker_processes(pool: object) -> None:
    """SIGKILL every worker process of a TVM ``PopenPoolExecutor`` and their children."""
    import psutil

    for worker in list(getattr(pool, "_worker_map", {}).values()):
        proc = getattr(worker, "_proc", None)
        with contextlib.suppress(Exception):  # gone already, or being replaced
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            proc.kill()


def rpc_runner(tracker: str, key: str, session_timeout: float = 120.0) -> object:
    """A MetaSchedule ``RPCRunner`` measuring on every free device registered as ``key``.

    Parameters
    ----------
    tracker : str
        ``host:port`` of a TVM RPC tracker (``python -m tvm.exec.rpc_tracker``); an IPv6 host in
        brackets (``[::1]:9190``).
    key : str
        Device key the servers registered with (``python -m tvm.exec.rpc_server --key``).
    session_timeout : float
        Seconds one candidate's measurement may take, the wait for a free device included.

    Returns
    -------
    MetaSchedule Runner
        The ``RPCRunner``, watched (:mod:`.rpc_guard`): a run that loses the tracker or every
        device of ``key`` for 30 s, or whose measurements time out twice in a row with no device
        answering in another session timeout, stops with :class:`~.rpc_guard.RPCDeviceError`
        instead of waiting forever.

    Raises
    ------
    pbtvm.errors.InputError
        Malformed address, no tracker there (unreachable, or something else listens on the port),
        or no server with ``key`` registered.
    """
    from pbtvm.rpc_cluster import server_keys

    ms = meta_schedule()
    host, sep, port = tracker.rpartition(":")
    if host.startswith("[") and host.endswith("]"):  # an IPv6 address, [::1]:9190
        host = host[1:-1]
    if not sep or not host or not port.isdigit():
        raise InputError(f"RPC tracker address must be host:port, got {tracker!r}")
    try:
        keys = server_keys(host, int(port))
    except Exception as err:
        raise InputError(f"cannot reach the RPC tracker at {tracker}: {err}") from None
    servers = keys.count(key)
    if servers == 0:
        known = sorted(set(keys))
        raise InputError(f"no RPC server registered with key {key!r} at {tracker} (keys there: {known or 'none'})")
    rpc_cfg = ms.runner.RPCConfig(
        tracker_host=host, tracker_port=int(port), tracker_key=key, session_timeout_sec=session_timeout
    )
    logger.info("measuring on %d RPC server(s) with key %s", servers, key)
    with workers_without_torch():  # its first local worker starts here (it checks itself)
        runner = ms.runner.RPCRunner(rpc_cfg, _evaluator_config(), max_workers=servers)
    return rpc_guard.guarded(runner, host, int(port), key, session_timeout)


@contextlib.contextmanager
def _built(mods: list[tvm.IRModule], target: tvm.target.Target, builder: object) -> Iterator[list]:
    """Build ``mods`` in one builder batch; the builder results, their files removed afterwards
    (each build exported a tar into a fresh temporary directory)."""
    ms = meta_schedule()
    built = builder.build([ms.builder.BuilderInput(mod, target) for mod in mods])
    try:
        yield built
    finally:
        for res in built:
            if not res.error_msg:
                shutil.rmtree(os.path.dirname(res.artifact_path), ignore_errors=True)


def _runner_input(res: object, mod: tvm.IRModule, target: tvm.target.Target) -> object:
    ms = meta_schedule()
    args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    return ms.runner.RunnerInput(res.artifact_path, TargetInfo.of(target).device, args)


def measure(
    mods: list[tvm.IRModule], target: tvm.target.Target, builder: object, runner: object
) -> Iterator[tuple[list[float] | None, str, str]]:
    """Build ``mods`` (scheduled workloads) in one builder batch, then run them; results in order.

    Yields
    ------
    run_secs : list of float or None
        The runner's repeat times in seconds; None when building or running failed.
    stage : str
        ``"build"`` or ``"run"``: where it failed (``""`` when it did not).
    error : str
        The builder's or runner's error message (``""`` when none).
    """
    with _built(mods, target, builder) as built:
        inputs = [_runner_input(res, mod, target) for mod, res in zip(mods, built, strict=True) if not res.error_msg]
        futures = iter(runner.run(inputs))
        for res in built:
            if res.error_msg:
                yield None, "build", str(res.error_msg)
                continue
            out = next(futures).result()
            if out.error_msg:
                yield None, "run", str(out.error_msg)
            else:
                yield [float(s) for s in out.run_secs], "", ""


def measure_side_by_side(
    mods: list[tvm.IRModule], target: tvm.target.Target, builder: object, runner: object, rounds: int
) -> list[list[float] | None]:
    """Build ``mods`` once, then time them ``rounds`` times one after another, the order reversed
    every other round, so that a load change on the machine falls on each of them alike.

    Each module goes to the runner alone and is timed before the next is sent: a runner with
    several devices (an ``RPCRunner`` with several servers) would otherwise time them at the same
    moment, and servers sharing a machine (``pbtvm.rpc_cluster.local_cluster``) would slow each
    other down.

    Returns
    -------
    list
        Per module its mean seconds in each round, or None if it failed to build or to run.
    """
    with _built(mods, target, builder) as built:
        times: list[list[float] | None] = [None if res.error_msg else [] for res in built]
        for r in range(rounds):
            order = [i for i, t in enumerate(times) if t is not None]
            order = order if r % 2 == 0 else order[::-1]
            for i in order:
                (future,) = runner.run([_runner_input(built[i], mods[i], target)])
                out = future.result()
                if out.error_msg:
                    times[i] = None
                else:
                    times[i].append(statistics.fmean(float(s) for s in out.run_secs))
    return times


__all__ = [
    "build_candidate",
    "close_runner",
    "default_builder",
    "default_runner",
    "measure",
    "measure_side_by_side",
    "rpc_runner",
]
