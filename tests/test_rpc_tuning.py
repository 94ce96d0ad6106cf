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
    from tvm import rpc

    from pbtvm import rpc_cluster

    class Tracker:
        def summary(self):
            return {"server_info": [{"key": "server:gpu:h100"}, {"key": "server:cpu"}]}

    monkeypatch.setattr(rpc_cluster, "check_tracker", lambda *_args: None)
    monkeypatch.setattr(rpc, "connect_tracker", lambda *_args: Tracker())
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
