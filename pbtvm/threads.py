"""How many threads TVM's CPU kernels use by default: one per physical core pbtvm may run on.

TVM's thread pool, without ``TVM_NUM_THREADS`` (or ``OMP_NUM_THREADS``), takes half of
``std::thread::hardware_concurrency()`` on x86 on the assumption that every core has two
hyperthreads. On a VM without SMT (2 vCPUs, one thread per core) that is one thread while torch
uses both cores: the 2x650 LSTM LM decoder ran at 1 thread, its layers unable to use the second core.
pbtvm counts cores from the kernel's CPU topology (``thread_siblings_list``) within the process's
CPU affinity and sets ``TVM_NUM_THREADS`` to that unless the user set either variable. The
variable is set in ``os.environ``, so child processes (RPC servers, tuning workers) inherit it.
"""

from __future__ import annotations

import os

__all__ = ["THREAD_ENV", "default_threads", "physical_cores"]

#: Variables that, when set, decide the thread count instead of pbtvm.
THREAD_ENV = ("TVM_NUM_THREADS", "OMP_NUM_THREADS")


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (at least 1).

    CPUs that are hyperthreads of one core (the same ``thread_siblings_list``) count once; where
    the topology cannot be read every allowed CPU counts (pbtvm is Linux-only; elsewhere this
    falls back to the logical CPU count).
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def default_threads() -> int | None:
    """Set ``TVM_NUM_THREADS`` to :func:`physical_cores` unless a :data:`THREAD_ENV` variable is
    set; returns the count set (None: left to the user's setting). Takes effect if called before
    TVM's thread pool starts (its first parallel kernel)."""
    if any(os.environ.get(name) for name in THREAD_ENV):
        return None
    count = physical_cores()
    os.environ["TVM_NUM_THREADS"] = str(count)
    return count
