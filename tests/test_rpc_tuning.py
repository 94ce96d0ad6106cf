"""Distributed tuning over TVM RPC on loopback: a tracker and two servers, both measure."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

import pbtvm
from pbtvm.cli import main
from pbtvm.errors import InputError
from pbtvm.rpc_cluster import check_tracker, local_cluster
from pbtvm.schedules import tuning
from pbtvm.worker_env import env_without_torch

from .models import MLP

KEY = "pbtvm-loopback"
#: Environment of the child processes: they use the cluster only, not torch.
NO_TORCH = env_without_torch()


@pytest.fixture(scope="module")
def rpc_cluster(tmp_path_factory):
    """A tracker and two servers on 127.0.0.1 (~10 s to start, so shared), stopped after the module."""
    with local_cluster(KEY, servers=2, log_dir=tmp_path_factory.mktemp("rpc")) as cluster:
        yield cluster


def test_rpc_tuning_uses_every_server_and_the_log_is_reused(rpc_cluster, tmp_path):
    address, logs = rpc_cluster
    torch.manual_seed(0)
    model, example = MLP((64, 48, 10)).eval(), (torch.randn(2, 64),)
    runner = tuning.rpc_runner(address, KEY)
    work = tmp_path / "logs"
    # kNW: the kernels with knobs (on AVX2-only CPUs auto gives this MLP the table lookup, which has none)
    options = {"bits": 4, "layout": "kNW", "work_dir": work}
    report = pbtvm.tune(model, example, "llvm", trials=4, runner=runner, progress=print, **options)
    # a search measures its default and 4 trials, a knob kernel (AVX-512 / AVX2) its settings that fit, up to 4
    assert report.kernels and all(
        k.built >= min(4, k.trials) >= 3 and k.run_failed == 0 and k.best_us for k in report.kernels
    ), report.kernels
    loads = [Path(log).read_text().count("load_module") for log in logs]
    assert all(n > 0 for n in loads), f"a server measured nothing (module loads per server: {loads})"
    compiled = pbtvm.compile(model, example, "llvm", **options)
    assert len(compiled.manifest["tuning"]["tuned_kernels"]) == len(report.kernels)


@pytest.mark.parametrize(
    ("address", "match"),
    [("nohost", "host:port"), ("127.0.0.1:1", "cannot reach the RPC tracker")],
)
def test_rpc_runner_bad_address(address, match):
    with pytest.raises(InputError, match=match):
        tuning.rpc_runner(address, KEY)


@pytest.mark.parametrize(
    ("reply", "match"),
    [(None, r"accepts connections but gave no TVM RPC tracker handshake in 0\.5 s"), (b"HTTP/1.0 400", "is not a TVM")],
)
def test_a_port_that_is_not_a_tracker_is_an_error_not_a_hang(reply, match):
    """Something else listening there (an HTTP server): TVM's connect would wait forever."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4)
                if reply is not None:
                    conn.sendall(reply)
                time.sleep(2)

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        t0 = time.time()
        with pytest.raises(OSError, match=match):
            check_tracker("127.0.0.1", port, timeout=0.5)
        assert time.time() - t0 < 5
        thread.join()


def test_cli_reports_a_bad_tracker_address_as_a_user_error(capsys, tmp_path):
    assert (
        main(["tune", "mnist-mlp", "--bits", "4", "--work-dir", str(tmp_path), "--rpc", "127.0.0.1", "--key", KEY]) == 2
    )
    err = capsys.readouterr().err
    assert "pbtvm: error: RPC tracker address must be host:port, got '127.0.0.1'" in err and "bug" not in err


def test_sigterm_stops_the_cluster():
    """``timeout`` / ``kill`` send SIGTERM: the tracker and servers go with the program, and the
    temporary log directory too."""
    script = textwrap.dedent(
        """
        import os, signal, sys, time
        from pbtvm.rpc_cluster import local_cluster
        with local_cluster("sigterm-test", servers=1) as (address, logs):
            print(address, logs[0].parent, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=NO_TORCH)
    assert proc.returncode == 143, proc.stderr[-2000:]
    address, log_dir = proc.stdout.split()
    port = address.split(":")[1]
    left = [p for p in psutil.process_iter(["cmdline"]) if port in " ".join(p.info["cmdline"] or [])]
    assert not left, [p.info["cmdline"] for p in left]
    assert not Path(log_dir).exists()


def test_rpc_runner_unknown_key(rpc_cluster):
    address, _ = rpc_cluster
    with pytest.raises(InputError, match="no RPC server registered with key 'gpu-farm'"):
        tuning.rpc_runner(address, "gpu-farm")


def test_sigterm_handling_leaves_other_handlers_alone():
    """A handler the program sets (before or inside the block) is kept: only the default action is
    replaced while the cluster runs, and put back."""
    script = textwrap.dedent(
        """
        import signal
        from pbtvm.rpc_cluster import _sigterm_raises
        def mine(*_):
            pass
        with _sigterm_raises():
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, mine)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        with _sigterm_raises():
            signal.signal(signal.SIGTERM, mine)
        assert signal.getsignal(signal.SIGTERM) is mine
        with _sigterm_raises():
            assert signal.getsignal(signal.SIGTERM) is mine
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=NO_TORCH)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_server_keys_may_hold_colons(monkeypatch):
    """A server registers as "server:<key>"; the key was cut at its last colon ("gpu:h100" listed as
    "h100": local_cluster("gpu:h100") waited its whole timeout)."""
    from pbtvm import rpc_cluster

    summary = {"server_info": [{"key": "server:gpu:h100"}, {"key": "server:cpu"}]}
    monkeypatch.setattr(rpc_cluster, "tracker_summary", lambda *_args: summary)
    assert rpc_cluster.server_keys("127.0.0.1", 1) == ["gpu:h100", "cpu"]


def test_a_server_that_cannot_start_is_named_at_once(monkeypatch, tmp_path):
    """A server whose port was taken since free_port exits with "cannot bind": local_cluster waited
    its whole timeout and said only "did not register"."""
    from pbtvm import rpc_cluster

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    real, calls = rpc_cluster.free_port, []

    def second_is_taken():
        calls.append(1)
        return held.getsockname()[1] if len(calls) == 2 else real()

    monkeypatch.setattr(rpc_cluster, "free_port", second_is_taken)
    t0 = time.time()
    try:
        with pytest.raises(RuntimeError, match=r"(?s)RPC server 0 did not start: .*cannot bind"):
            with local_cluster("clash", servers=1, timeout=60, log_dir=tmp_path):
                pass
    finally:
        held.close()
    assert time.time() - t0 < 45


# --- devices that go away mid-run (rpc_guard) ---------------------------------------------------


def _summary(keys, free=1):
    """A tracker's summary listing one server per entry of ``keys``, ``free`` of KEY's free."""
    return {"server_info": [{"key": f"server:{k}"} for k in keys], "queue_info": {KEY: {"free": free, "pending": 0}}}


def _guarded(monkeypatch, summary, futures, session_timeout=7.0):
    """A guarded runner over a stand-in ``RPCRunner`` whose ``run`` hands out ``futures`` (concurrent
    futures) in order; the tracker's summary is ``summary()`` at each check (it may raise)."""
    from tvm.s_tir.meta_schedule.runner.rpc_runner import RPCRunnerFuture
    from tvm.support.popen_pool import PopenPoolExecutor

    from pbtvm import rpc_cluster
    from pbtvm.schedules.tuning import rpc_guard

    class Inner:  # the derived RPCRunner: guarded() reaches its Python object as ``_inst``
        def __init__(self):
            self._inst, self.pool, self.futures = self, PopenPoolExecutor(max_workers=1), iter(futures)

        def run(self, inputs):
            return [RPCRunnerFuture(next(self.futures), session_timeout) for _ in inputs]

    monkeypatch.setattr(rpc_cluster, "tracker_summary", lambda *_a, **_k: summary())
    inner = Inner()
    return rpc_guard.guarded(inner, "127.0.0.1", 9190, KEY, session_timeout), inner


def _inputs(n):
    """``n`` runner inputs (the stand-in runner does not read them)."""
    return [tuning.meta_schedule().runner.RunnerInput("unused.tar", "cpu", []) for _ in range(n)]


def _done(result=None, error=None):
    from concurrent.futures import Future

    fut = Future()
    fut.set_result(result) if error is None else fut.set_exception(error)
    return fut


@pytest.mark.parametrize(
    ("gone", "match"),
    [
        (ConnectionRefusedError(111, "Connection refused"), r"the RPC tracker at 127\.0\.0\.1:9190 has not answered"),
        (_summary(["other"]), f"no RPC server with key '{KEY}' has been registered at 127.0.0.1:9190"),
    ],
)
def test_a_run_stops_when_the_tracker_or_the_devices_stay_gone(monkeypatch, gone, match):
    """Before: the run waited forever in the tracker's queue (device gone), or ~60 s per remaining
    candidate in TVM's connection retries and then ended as if tuned (tracker gone). A tracker or
    servers away for less than LOST_AFTER_S (restarting, reconnecting) do not stop it."""
    from pbtvm.schedules.tuning import RPCDeviceError, rpc_guard

    monkeypatch.setattr(rpc_guard, "CHECK_EVERY_S", 0.05)
    monkeypatch.setattr(rpc_guard, "LOST_AFTER_S", 0.3)
    calls, gone_for = [], {"calls": 0}

    def summary():
        calls.append(time.monotonic())
        if gone_for["calls"] == 0:
            return _summary([KEY])
        gone_for["calls"] -= 1
        if isinstance(gone, Exception):
            raise gone
        return gone

    runner, inner = _guarded(monkeypatch, summary, [_done([1e-6])] * 3)
    (first,) = runner.run(_inputs(1))
    assert first.result().run_secs and not first.result().error_msg
    gone_for["calls"] = 2  # away for two checks: asked again until back, the run goes on
    runner.run(_inputs(1))
    assert len(calls) == 4 and calls[-1] - calls[1] >= 0.09
    gone_for["calls"] = 10**6  # away for good
    t0 = time.monotonic()
    with pytest.raises(RPCDeviceError, match=r"tuning stopped: for \d+ s " + match + r".*the tuning log keeps what"):
        runner.run(_inputs(1))
    assert time.monotonic() - t0 >= 0.3
    assert inner.pool._shutdown  # its workers ended: some wait for a device that is gone
    with pytest.raises(RPCDeviceError, match=match):  # and again at every use after
        runner.run(_inputs(1))


def test_a_measurement_waited_for_checks_the_tracker(monkeypatch):
    """A candidate whose worker waits on a device that died is not waited for forever."""
    from concurrent.futures import Future

    from pbtvm.schedules.tuning import RPCDeviceError, rpc_guard

    monkeypatch.setattr(rpc_guard, "CHECK_EVERY_S", 0.05)
    monkeypatch.setattr(rpc_guard, "LOST_AFTER_S", 0.2)
    checks = []

    def summary():
        checks.append(time.monotonic())
        return _summary([KEY] if len(checks) < 4 else [])

    runner, _ = _guarded(monkeypatch, summary, [Future()])  # never done
    (fut,) = runner.run(_inputs(1))
    with pytest.raises(RPCDeviceError, match="no RPC server with key"):
        fut.result()
    assert checks[-1] - checks[3] >= 0.15 and checks[-1] - checks[0] < 5


@pytest.mark.parametrize("answer", ["none", "a server comes free", "another measurement ends"])
def test_measurements_timing_out_in_a_row(monkeypatch, answer):
    """A frozen device (or one a kernel hung) kept its session forever; now a candidate is ended after
    the session timeout. Two in a row, nothing measured in between: a device of the key must answer
    within another session timeout (slow candidates on a healthy device: it does) or the run stops."""
    from concurrent.futures import Future

    from pbtvm.schedules.tuning import RPCDeviceError, rpc_guard

    monkeypatch.setattr(rpc_guard, "CHECK_EVERY_S", 0.05)
    slow, ok = (lambda: _done(error=TimeoutError())), (lambda: _done([1e-6]))
    later, state = Future(), {"free": 0}
    futures = [slow(), ok(), slow(), ok(), slow(), slow(), later, slow()]
    runner, _ = _guarded(monkeypatch, lambda: _summary([KEY], state["free"]), futures, session_timeout=1.0)
    results = [f.result() for f in runner.run(_inputs(5))]
    assert ["Timeout" in str(r.error_msg) for r in results] == [True, False, True, False, True]
    second, _pending = runner.run(_inputs(2))
    if answer == "another measurement ends":
        threading.Timer(0.2, later.set_result, ([1e-6],)).start()
    elif answer == "a server comes free":
        threading.Timer(0.2, state.update, ({"free": 1},)).start()
    t0 = time.monotonic()
    if answer == "none":
        with pytest.raises(RPCDeviceError, match=r"2 measurements in a row .* took over 1 s .* no device answered"):
            second.result()
        assert time.monotonic() - t0 >= 1.0
        return
    assert "Timeout" in str(second.result().error_msg)  # a failed candidate, the run goes on
    assert time.monotonic() - t0 < 1.0
    state["free"] = 0
    (third,) = runner.run(_inputs(1))
    t0 = time.monotonic()
    assert "Timeout" in str(third.result().error_msg)  # counted from 0 again: no wait for a device
    assert time.monotonic() - t0 < 0.5


def test_a_failed_measurement_asks_whether_the_device_is_still_there(monkeypatch):
    from pbtvm.schedules.tuning import RPCDeviceError, rpc_guard

    monkeypatch.setattr(rpc_guard, "LOST_AFTER_S", 0.0)
    listed = iter([[KEY], [KEY, KEY], []])  # at run, at each failed result
    broken = lambda: _done(error=RuntimeError("connection reset by peer"))  # noqa: E731
    runner, _ = _guarded(monkeypatch, lambda: _summary(next(listed)), [broken(), broken()])
    first, second = runner.run(_inputs(2))  # one check
    assert "connection reset" in str(first.result().error_msg)  # a failed candidate: the device is listed
    with pytest.raises(RPCDeviceError, match="no RPC server"):  # not listed any more
        second.result()


def test_tuning_stops_with_an_error_when_its_only_device_dies(tmp_path, monkeypatch):
    """The loopback cluster's one server killed mid-run (before: ``pbtvm tune --rpc`` waited forever)."""
    from pbtvm.schedules.tuning import RPCDeviceError, rpc_guard

    monkeypatch.setattr(rpc_guard, "LOST_AFTER_S", 2.0)
    torch.manual_seed(0)
    model, example = MLP((64, 48, 10)).eval(), (torch.randn(2, 64),)
    with local_cluster("dies", servers=1, log_dir=tmp_path / "rpc") as (address, logs):
        server = psutil.Process(int(next(p.pid for p in psutil.Process().children() if "dies" in p.cmdline())))
        runner = tuning.rpc_runner(address, "dies", session_timeout=100)
        assert runner.pool._timeout == 100  # the pool ends a candidate after the session timeout (frozen devices)

        def kill_after_first_measurement():
            while "load_module" not in logs[0].read_text():
                time.sleep(0.05)
            for proc in [server, *server.children(recursive=True)]:
                proc.kill()

        def tune():
            try:
                pbtvm.tune(
                    model, example, "llvm", trials=4, runner=runner, bits=4, layout="kNW", work_dir=tmp_path / "w"
                )
            except Exception as err:
                raised.append(err)

        raised, t0 = [], time.time()
        killer = threading.Thread(target=kill_after_first_measurement, daemon=True)
        tuner = threading.Thread(target=tune, daemon=True)
        killer.start(), tuner.start()
        tuner.join(timeout=120)
        assert not tuner.is_alive(), "tuning went on waiting for a device that is gone"
        assert len(raised) == 1 and isinstance(raised[0], RPCDeviceError), raised
        assert "no RPC server with key 'dies' has been registered" in str(raised[0])
        assert not killer.is_alive() and time.time() - t0 < 120
        workers = runner.pool._worker_map.values()
        assert all(w._proc is None or w._proc.poll() is not None for w in workers)  # none left waiting


def test_cli_reports_devices_gone_as_an_error_not_a_bug(monkeypatch, capsys, tmp_path):
    from pbtvm.schedules.tuning import RPCDeviceError

    def gone(*_a, **_k):
        raise RPCDeviceError("no RPC server with key 'k' has been registered at h:1")

    monkeypatch.setattr(tuning, "rpc_runner", lambda *a: seen.append(a))
    monkeypatch.setattr(pbtvm, "tune", gone)
    seen = []
    argv = ["tune", "mnist-mlp", "--bits", "4", "--work-dir", str(tmp_path), "--rpc", "h:1", "--key", "k"]
    assert main([*argv, "--session-timeout", "300"]) == 2
    assert seen == [("h:1", "k", 300)]
    err = capsys.readouterr().err
    assert "pbtvm: error: no RPC server with key 'k'" in err and "bug" not in err


def test_an_ipv6_tracker_address_in_brackets(monkeypatch):
    from pbtvm import rpc_cluster

    asked = []
    monkeypatch.setattr(rpc_cluster, "server_keys", lambda host, port: asked.append((host, port)) or [])
    with pytest.raises(InputError, match=r"no RPC server registered with key 'k' at \[::1\]:9190"):
        tuning.rpc_runner("[::1]:9190", "k")
    assert asked == [("::1", 9190)]  # was "[::1]": a name that does not resolve


def test_cli_session_timeout_needs_rpc(capsys, tmp_path):
    argv = ["tune", "mnist-mlp", "--bits", "4", "--work-dir", str(tmp_path), "--session-timeout", "30"]
    assert main(argv) == 2
    assert "--session-timeout is for RPC devices" in capsys.readouterr().err
