"""Start-up of the processes a tuning run starts, with and without torch (:mod:`pbtvm.worker_env`).

Side by side in one run, the order alternating every round: a TVM popen worker (what MetaSchedule's
builder and runner start) until it has run one job, and :func:`pbtvm.rpc_cluster.local_cluster`
until its servers have registered; each once with ``PBTVM_WORKER_TORCH=1`` (torch imported, as
before) and once without torch. Prints per round and the medians with their ratio.

Run: ``python benchmarks/bench_worker_start.py [--rounds 3] [--no-cluster]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from pbtvm.names import ENV_WORKER_TORCH
from pbtvm.rpc_cluster import local_cluster


def _job() -> int:
    return 1


def popen_worker_seconds() -> float:
    """Seconds from starting a TVM popen worker to its first job's result."""
    from tvm.support.popen_pool import PopenPoolExecutor

    from pbtvm.worker_env import workers_without_torch

    t0 = time.perf_counter()
    pool = PopenPoolExecutor(max_workers=1)
    try:
        with workers_without_torch():
            pool.submit(_job).result()
        return time.perf_counter() - t0
    finally:
        pool.shutdown()


def cluster_seconds() -> float:
    """Seconds until a local tracker and 2 servers have registered."""
    t0 = time.perf_counter()
    with local_cluster("bench", servers=2):
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-cluster", action="store_true", help="time the popen worker only")
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}")
    cases = [("popen worker", popen_worker_seconds)]
    if not args.no_cluster:
        cases.append(("local_cluster (tracker + 2 servers)", cluster_seconds))
    times = {(name, torch): [] for name, _ in cases for torch in (True, False)}
    for r in range(args.rounds):
        for name, measure in cases:
            for torch in (True, False) if r % 2 == 0 else (False, True):
                if torch:
                    os.environ[ENV_WORKER_TORCH] = "1"
                else:
                    os.environ.pop(ENV_WORKER_TORCH, None)
                times[name, torch].append(measure())
                print(
                    f"round {r + 1}: {name:<38} {'with' if torch else 'without':<7} torch {times[name, torch][-1]:6.2f} s"
                )
    os.environ.pop(ENV_WORKER_TORCH, None)
    print(f"\n{'':<38}{'with torch':>12}{'without':>10}{'ratio':>8}")
    for name, _ in cases:
        with_t, without = (statistics.median(times[name, t]) for t in (True, False))
        print(f"{name:<38}{with_t:>10.2f} s{without:>8.2f} s{with_t / without:>7.2f}x")


if __name__ == "__main__":
    main()
