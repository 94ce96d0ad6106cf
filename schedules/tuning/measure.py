"""How candidates are built and timed: MetaSchedule builders and runners (local or RPC).

:func:`measure` builds and runs one module through the same builder and runner as the search,
for the schedules the search does not propose itself: the default schedule of a tunable kernel
(so the log always holds it) and every knob setting of a :class:`~pbtvm.schedules.rules.KnobRule`.
"""

from __future__ import annotations

import logging
import os

from pbtvm._tvm import meta_schedule, tvm
from pbtvm.target import TargetInfo

from .. import cuda_bmma

logger = logging.getLogger(__name__)

#: Seconds one candidate may take to build (nvcc included; a fresh worker imports TVM first).
BUILD_TIMEOUT_S = 300.0
#: Seconds one candidate may take to run its repeats.
RUN_TIMEOUT_S = 60.0


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
    workers = max(1, os.cpu_count() or 1)
    if target.kind.name != "cuda":
        return ms.builder.LocalBuilder(max_workers=workers, timeout_sec=BUILD_TIMEOUT_S, f_build=build_candidate)
    # CUDA: BMMA candidates are materialized into their kernel and every candidate is built with
    # nvcc, as pbtvm.compile builds it (the workers register the build function first).
    return ms.builder.LocalBuilder(
        max_workers=workers,
        timeout_sec=BUILD_TIMEOUT_S,
        f_build=cuda_bmma.BUILD_FUNC,
        initializer=cuda_bmma.worker_initializer,
    )


def _evaluator_config() -> object:
    """How every runner times a candidate: 3 repeats of at least 20 calls and 20 ms."""
    return meta_schedule().runner.EvaluatorConfig(number=20, repeat=3, min_repeat_ms=20, enable_cpu_cache_flush=False)


def default_runner(target: tvm.target.Target) -> object:  # noqa: ARG001 - same signature as default_builder
    """LocalRunner timing each candidate as a median-friendly repeat of short loops."""
    return meta_schedule().runner.LocalRunner(evaluator_config=_evaluator_config(), timeout_sec=RUN_TIMEOUT_S)


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
    except Exception as err:
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


def measure(
    mod: tvm.IRModule, target: tvm.target.Target, builder: object, runner: object
) -> tuple[list[float] | None, str, str]:
    """Build and run ``mod`` (a scheduled workload) once through ``builder`` and ``runner``.

    Returns
    -------
    run_secs : list of float or None
        The runner's repeat times in seconds; None when building or running failed.
    stage : str
        ``"build"`` or ``"run"``: where it failed (``""`` when it did not).
    error : str
        The builder's or runner's error message (``""`` when none).
    """
    ms = meta_schedule()
    (res,) = builder.build([ms.builder.BuilderInput(mod, target)])
    if res.error_msg:
        return None, "build", str(res.error_msg)
    args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    (fut,) = runner.run([ms.runner.RunnerInput(res.artifact_path, TargetInfo.of(target).device, args)])
    out = fut.result()
    if out.error_msg:
        return None, "run", str(out.error_msg)
    return [float(s) for s in out.run_secs], "", ""


__all__ = ["build_candidate", "default_builder", "default_runner", "measure", "rpc_runner"]
