"""Measuring on RPC devices that can go away: a tuning run that loses them stops with an error.

MetaSchedule's ``RPCRunner`` waits forever when the devices go away mid-run. Its worker asks the
tracker for a server of the key and waits in the tracker's queue while none is free; nothing
times the wait out (``session_timeout_sec`` reaches the server only, and its pool has no
timeout). Measured with ``pbtvm tune --rpc`` on a loopback cluster (2026-12-03): the only server
killed mid-run left the run waiting until ``timeout`` ended it; a frozen server (SIGSTOP) the
same; a tracker killed mid-run cost every remaining candidate ~60 s of TVM's connection retries,
after which the run ended "successfully" with every default kept.

:func:`guarded` wraps the runner so that:

* before every batch of candidates, and every :data:`CHECK_EVERY_S` seconds while one is waited
  for, the tracker is asked (with a timeout) whether it lists a server with the key; when it does
  not answer, or lists none, it is asked again every :data:`CHECK_EVERY_S` seconds, and after
  :data:`LOST_AFTER_S` seconds of that (a tracker restarting, servers reconnecting, lost packets
  pass) the run stops with :class:`RPCDeviceError` naming which;
* a candidate not measured within the session timeout is ended (its worker process killed) and
  counted as a failed run, as a slow candidate should be. After :data:`TIMEOUTS_IN_A_ROW` of them,
  none measured in between, a device of the key must answer again within another session
  timeout (another measurement ends, or a server is listed free: a server ends a session at the
  timeout and comes back; a frozen one, or one a kernel hung, does not); if none does, the run
  stops.

The error reaches the caller of ``pbtvm.tune`` from inside MetaSchedule's search loop too (it is
registered with TVM's FFI). What was measured before stays in the tuning log; the next run goes
on from there.
"""

from __future__ import annotations

import concurrent.futures
import functools
import time

import tvm_ffi

from pbtvm._tvm import meta_schedule

#: Seconds between checks of the tracker while a measurement is waited for.
CHECK_EVERY_S = 5.0
#: Seconds the tracker may fail to answer, or list no server of the key, before the run stops.
LOST_AFTER_S = 30.0
#: Timed-out measurements in a row, none measured in between, after which a device must answer.
TIMEOUTS_IN_A_ROW = 2


class RPCDeviceError(ConnectionError):
    """The RPC tracker or the devices of a tuning run went away, or stopped answering, mid-run."""


tvm_ffi.register_error(RPCDeviceError)  # raised in Python that MetaSchedule's C++ loop calls


def guarded(runner: object, host: str, port: int, key: str, session_timeout: float) -> object:
    """``runner`` (a MetaSchedule ``RPCRunner`` for ``key`` at the tracker ``host:port``), watched.

    Parameters
    ----------
    runner : tvm.s_tir.meta_schedule.runner.RPCRunner
    host, port : str, int
        The tracker's address.
    key : str
        Device key the runner measures on.
    session_timeout : float
        Seconds one candidate may take, the wait for a free device included.

    Returns
    -------
    MetaSchedule ``PyRunner``
        Runs what ``runner`` runs. Once it raised :class:`RPCDeviceError` it raises that error
        again at every use, and ``runner``'s worker processes are ended.
    """
    runner.pool._timeout = session_timeout  # the pool ends (kills) a worker taking longer
    return _guarded_runner_class()(runner, host, port, key, session_timeout)


@functools.cache
def _guarded_runner_class() -> type:
    from tvm.ir.utils import derived_object

    from .measure import shutdown_pool

    ms = meta_schedule()

    @derived_object
    class GuardedRPCRunner(ms.runner.PyRunner):
        """An ``RPCRunner`` whose runs check that the tracker and the key's devices are still there."""

        def __init__(self, inner: object, host: str, port: int, key: str, session_timeout: float) -> None:
            super().__init__()
            self.inner, self.host, self.port, self.key = inner, host, port, key
            self.session_timeout = session_timeout
            self.timeouts = 0
            self.last_measured = 0.0  # time.monotonic() when a measurement last ended without error
            self.lost: RPCDeviceError | None = None

        @property
        def pool(self) -> object:
            """The inner runner's worker pool (``measure.close_runner`` ends it)."""
            return self.inner.pool

        def run(self, runner_inputs: list) -> list:
            self.check()
            # through the Python object: the FFI method hands back plain ``RunnerFuture``s, without
            # the concurrent future that tells a timeout from a failure and can be waited on
            futures = self.inner._inst.run(runner_inputs)
            for future in futures:
                future.future.add_done_callback(self._note_measured)
            return [_Future(future, self) for future in futures]

        def _note_measured(self, future: concurrent.futures.Future) -> None:
            if not future.cancelled() and future.exception() is None:
                self.last_measured = time.monotonic()

        def check(self) -> int:
            """How many servers of the key the tracker lists as free. While it does not answer, or
            lists no server of the key, ask again every :data:`CHECK_EVERY_S` s; after
            :data:`LOST_AFTER_S` s of that, raise :class:`RPCDeviceError`."""
            first_failure = None
            while True:
                free, problem = self._ask()
                if problem is None:
                    return free
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                if now - first_failure >= LOST_AFTER_S:
                    self.lose(f"tuning stopped: for {now - first_failure:.0f} s {problem}")
                time.sleep(CHECK_EVERY_S)

        def _ask(self) -> tuple[int, str | None]:
            """The tracker's count of free servers of the key, or what is wrong."""
            from pbtvm.rpc_cluster import address, registered_keys, tracker_summary

            if self.lost is not None:
                raise self.lost
            where = address(self.host, self.port)
            try:
                summary = tracker_summary(self.host, self.port)
            except Exception as err:
                return 0, f"the RPC tracker at {where} has not answered ({err})"
            if self.key not in registered_keys(summary):
                return 0, (
                    f"no RPC server with key {self.key!r} has been registered at {where} (the devices stopped, "
                    "or lost their connection to the tracker)"
                )
            # servers put themselves in the queue under the plain key
            return int(summary.get("queue_info", {}).get(self.key, {}).get("free", 0)), None

        def lose(self, message: str) -> None:
            """Stop: end the workers (some wait for a device that is gone), keep and raise the error."""
            self.lost = RPCDeviceError(
                message + " (the tuning log keeps what was measured; tune again to go on from there)"
            )
            shutdown_pool(self.inner.pool, wait=False)
            raise self.lost

        def timed_out(self, timed_out: bool) -> None:
            """Count a measurement that timed out, or reset the count. After too many in a row, wait
            for a device of the key to answer again: a measurement of another candidate ending, or a
            server listed free (a free one is handed at once to a request waiting for it, ours
            included, so both are watched); stop if neither happens within a session timeout."""
            self.timeouts = self.timeouts + 1 if timed_out else 0
            if self.timeouts < TIMEOUTS_IN_A_ROW:
                return
            start = time.monotonic()
            while self.check() == 0 and self.last_measured < start:
                if time.monotonic() - start > self.session_timeout:
                    self.lose(
                        f"tuning stopped: {self.timeouts} measurements in a row on the RPC devices with key "
                        f"{self.key!r} took over {self.session_timeout:g} s (the session timeout) and no device "
                        f"answered in the {self.session_timeout:g} s after: they stopped answering (frozen, "
                        "hung by a kernel), or are busy with other work for that long"
                    )
                time.sleep(min(0.2, CHECK_EVERY_S))
            self.timeouts = 0  # a device is back: the slow candidates were slow, not the devices gone

    @derived_object
    class _Future(ms.runner.PyRunnerFuture):
        """One candidate's measurement; waiting for it checks the tracker now and then."""

        def __init__(self, inner: object, owner: GuardedRPCRunner) -> None:
            super().__init__()
            self.inner, self.owner = inner, owner

        def done(self) -> bool:
            return self.inner.done()

        def result(self) -> object:
            if self.owner.lost is not None:
                raise self.owner.lost
            future = self.inner.future  # the pool's concurrent future
            while not concurrent.futures.wait([future], timeout=CHECK_EVERY_S).done:
                self.owner.check()
            res = self.inner.result()
            self.owner.timed_out(not future.cancelled() and isinstance(future.exception(), TimeoutError))
            if res.error_msg:
                self.owner.check()  # a device gone mid-measurement: say so, not "run failed"
            return res

    return GuardedRPCRunner


__all__ = ["CHECK_EVERY_S", "LOST_AFTER_S", "TIMEOUTS_IN_A_ROW", "RPCDeviceError", "guarded"]
