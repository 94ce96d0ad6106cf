"""Run a test's worker from several threads at once."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_threads(worker: Callable[[int], None], count: int = 4) -> None:
    """Start ``worker(t)`` for ``t`` in ``range(count)``, each in its own thread, and wait for all."""
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(count)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
