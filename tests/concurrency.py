"""Run a test's worker from several threads at once."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_threads(worker: Callable[[int], None], count: int = 4) -> None:
    """Start ``worker(t)`` for ``t`` in ``range(count)``, each in its own thread, and wait for all.

    An exception in any worker is raised here (the first thread's that failed, by ``t``): a thread
    that dies does not fail a test by itself, pytest would only warn.
    """
    failures: dict[int, BaseException] = {}

    def guarded(t: int) -> None:
        try:
            worker(t)
        except BaseException as err:  # re-raised in the calling thread below
            failures[t] = err

    threads = [threading.Thread(target=guarded, args=(t,)) for t in range(count)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if failures:
        t = min(failures)
        raise AssertionError(
            f"thread {t} of {count} failed: {type(failures[t]).__name__}: {failures[t]}"
        ) from failures[t]
