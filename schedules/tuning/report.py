"""What tuning reports: per-kernel counts and times (:class:`TuneReport`) and progress lines.

:class:`Progress` turns the search's measurements into one line per update, e.g.::

    [pbtvm tune] 2/3 pb_gemm_w4a8_kNW_48x64: 12/16 candidates measured (1 failed), best 3.21 us
    (default 4.00 us), about 35 s left

"measured" counts the default schedule and every search trial (both are in the log); "left" is
the time per candidate since the first measurement times the candidates still to measure over all
kernels (from the second update on: the time before the first result is mostly start-up, worker
processes importing TVM, and counting it overstated a short run's time left several times over).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class KernelReport:
    """What tuning did for one kernel; times in microseconds.

    ``trials`` counts every candidate measured for the kernel: its default schedule (or default
    knobs) and the search trials. Where the search's best was not the default, both were timed
    again side by side (:func:`~.search._confirm`): ``default_us`` and ``best_us`` are those times
    (``best_us`` the kept schedule's), ``search_us`` the best as the search measured it, and
    ``confirmed`` says whether the best was kept (None: not re-measured, the default was the best;
    then ``best_us`` is the default's time and ``search_us``, if set, the search's time of it).
    """

    name: str
    trials: int = 0
    built: int = 0
    build_failed: int = 0
    run_failed: int = 0
    default_us: float | None = None
    best_us: float | None = None
    first_error: str | None = None
    search_us: float | None = None
    confirmed: bool | None = None

    @property
    def speedup(self) -> float | None:
        """Default time over the kept schedule's time (the side-by-side times where the best was
        re-measured; 1 where the default was kept)."""
        if self.default_us is None or self.best_us is None:
            return None
        return self.default_us / self.best_us

    def record(self, secs: list[float] | None, stage: str = "", error: str = "") -> float | None:
        """Count one measured candidate (``secs`` None: it failed at ``stage``); returns its time in us."""
        self.trials += 1
        if secs is None:
            if stage == "build":
                self.build_failed += 1
            else:
                self.built += 1
                self.run_failed += 1
            self.first_error = self.first_error or error[:2000]
            logger.warning("candidate %s failed: %s", stage, (error.strip().splitlines() or [""])[-1][:300])
            return None
        self.built += 1
        us = 1e6 * sum(secs) / len(secs)
        self.best_us = us if self.best_us is None else min(self.best_us, us)
        return us


@dataclass
class TuneReport:
    """Outcome of :func:`~.search.tune_kernels`."""

    log: str
    target: str
    seconds: float = 0.0
    kernels: list[KernelReport] = field(default_factory=list)

    def table(self) -> str:
        """A plain-text table, one row per kernel."""
        rows = [
            f"{'kernel':<40} {'trials':>6} {'built':>6} {'failed':>6} {'default us':>11} {'kept us':>9} {'gain':>6}"
        ]
        for k in self.kernels:
            gain = f"{k.speedup:.2f}x" if k.speedup else "-"
            d = f"{k.default_us:.2f}" if k.default_us else "-"
            b = f"{k.best_us:.2f}" if k.best_us else "-"
            rows.append(
                f"{k.name:<40} {k.trials:>6} {k.built:>6} {k.build_failed + k.run_failed:>6} {d:>11} {b:>9} {gain:>6}"
            )
        for k in self.kernels:
            if k.confirmed is False:
                rows.append(
                    f"{k.name}: the search's best ({k.search_us:.2f} us) was not confirmed {MIN_GAIN_PERCENT} % "
                    "faster than the default when both were timed side by side: the default is kept"
                )
            elif k.confirmed is None and k.search_us is not None and k.search_us != k.best_us:
                rows.append(
                    f"{k.name}: the search's best is the default schedule itself (once timed at {k.search_us:.2f} us): "
                    "no gain"
                )
        rows.append(
            f"tuning time {self.seconds:.1f}s, log {self.log} (trials: the default schedule plus the search; "
            "kept: the schedule compile will use)"
        )
        return "\n".join(rows)

    def to_dict(self) -> dict:
        """JSON-friendly form."""
        return {
            "log": self.log,
            "target": self.target,
            "seconds": self.seconds,
            "kernels": [asdict(k) for k in self.kernels],
        }


#: The least gain, in percent, for which a re-timed best is kept (``search.MIN_CONFIRMED_GAIN``).
MIN_GAIN_PERCENT = 3
#: Results less than this many seconds after the first one belong to its batch (see ``seconds_left``).
BURST_S = 0.5


class Progress:
    """One progress line per update of a tuning run: per kernel, measured / total, best, time left.

    Parameters
    ----------
    emit : callable
        Receives each line.
    """

    def __init__(self, emit: Callable[[str], None]) -> None:
        self.emit = emit
        self.kernels: list[tuple[KernelReport, int]] = []  # (report, candidates to measure)
        self.start = time.perf_counter()
        self._first: tuple[float, int] | None = None  # (time, candidates done) at the first result

    def add(self, rep: KernelReport, total: int) -> None:
        """Track ``rep``, which will measure ``total`` candidates (default included)."""
        self.kernels.append((rep, total))

    def message(self, text: str) -> None:
        """Emit a line that is not a measurement update."""
        self.emit(f"[pbtvm tune] {text}")

    def seconds_left(self) -> float | None:
        """Time per candidate measured since the first result, times the candidates left over all
        kernels; None until candidates were measured after the first result's batch (results
        within :data:`BURST_S` of it)."""
        now = time.perf_counter()
        done = sum(min(rep.trials, total) for rep, total in self.kernels)
        left = sum(max(0, total - rep.trials) for rep, total in self.kernels)
        if done == 0:
            return None
        if self._first is None or now - self._first[0] < BURST_S:
            # The first result, or more of its batch: results of one measurement batch arrive
            # together, and a rate taken within a burst would say "0 s left".
            self._first = (self._first[0] if self._first else now, done)
            return None if left else 0.0
        since, done_then = self._first
        return (now - since) / (done - done_then) * left if done > done_then else None

    def update(self, rep: KernelReport) -> None:
        """Emit the line for ``rep`` after new measurements."""
        index, total = next((i, t) for i, (r, t) in enumerate(self.kernels) if r is rep)
        failed = rep.build_failed + rep.run_failed
        parts = [f"{index + 1}/{len(self.kernels)} {rep.name}: {rep.trials}/{total} candidates measured"]
        if failed:
            parts.append(f" ({failed} failed)")
        parts.append(f", best {rep.best_us:.2f} us" if rep.best_us else ", best -")
        if rep.default_us:
            parts.append(f" (default {rep.default_us:.2f} us)")
        left = self.seconds_left()
        if left is not None:
            parts.append(f", about {_duration(left)} left")
        self.message("".join(parts))


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 5 s`` or ``1 h 12 min``."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


__all__ = ["KernelReport", "Progress", "TuneReport"]
