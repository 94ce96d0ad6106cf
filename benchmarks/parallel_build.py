"""Build in worker processes: compile a benchmark's kernels or decoders at once on a many-core host.

A GPU sitting is short, and compiling one kernel after another (TVM lowering, then nvcc: ~2 s a
kernel on the 2-core CI machine, ~100 kernels for ``bench_bmma.py --fused``) took most of a step.
:func:`build_all` runs a build function over the jobs in spawned processes (a fresh interpreter
each: no CUDA context or thread pool inherited); each writes its result as a .so in a directory
the caller owns, and the caller loads them (``tvm.runtime.load_module``, :func:`pbtvm.load`).

The build function must be defined at the top level of a module or script: a spawned worker
imports the calling script again, so the script must keep its work under
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

#: Most workers :func:`default_workers` suggests.
MAX_WORKERS = 16


def default_workers() -> int:
    """Worker processes for this host: its cores less one (at least 1, at most :data:`MAX_WORKERS`)."""
    return max(1, min(MAX_WORKERS, (os.cpu_count() or 2) - 1))


def build_all(
    build: Callable[[Any, str], None],
    jobs: Sequence[Any],
    out_dir: str,
    workers: int,
    label: Callable[[Any], str] = str,
) -> list[str]:
    """Run ``build(job, path)`` for every job, ``workers`` at a time; the paths, in job order.

    Parameters
    ----------
    build : callable
        ``build(job, path)`` writes the job's result (a library) to ``path``; a top-level function.
    jobs : sequence
        Picklable job descriptions.
    out_dir : str
        Existing directory for the libraries (``job-<index>.so``).
    workers : int
        Processes; 1 builds in this process.
    label : callable
        A job's name in the progress lines.

    Raises
    ------
    RuntimeError
        A job failed: its label and the worker's error.
    """
    paths = [os.path.join(out_dir, f"job-{i}.so") for i in range(len(jobs))]
    t0 = time.time()

    def done(i: int, count: int) -> None:
        print(f"  built {count}/{len(jobs)}: {label(jobs[i])}  [{time.time() - t0:.0f}s]", flush=True)

    def failed(i: int, err: Exception) -> RuntimeError:
        return RuntimeError(f"building {label(jobs[i])} failed: {err}")

    if workers <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            try:
                build(job, paths[i])
            except Exception as err:
                raise failed(i, err) from err
            done(i, i + 1)
        return paths
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
        futures = {pool.submit(build, job, path): i for i, (job, path) in enumerate(zip(jobs, paths, strict=True))}
        for count, fut in enumerate(as_completed(futures), 1):
            i = futures[fut]
            try:
                fut.result()
            except Exception as err:
                pool.shutdown(cancel_futures=True)  # queued builds are dropped, running ones finish
                raise failed(i, err) from err
            done(i, count)
    return paths
