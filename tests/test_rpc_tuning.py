"""Distributed tuning over TVM RPC on loopback: a tracker and two servers, both measure."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pbtvm.schedules import tuning

import pbtvm

from .models import MLP

KEY = "pbtvm-loopback"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_servers(tracker: str, count: int, timeout: float = 60.0) -> None:
    from tvm import rpc

    host, port = tracker.split(":")
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            info = rpc.connect_tracker(host, int(port)).summary().get("server_info", [])
            if sum(str(s.get("key", "")).endswith(KEY) for s in info) >= count:
                return
        except Exception:  # noqa: BLE001, S110 - tracker still starting
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{count} RPC servers did not register at {tracker} within {timeout}s")


@pytest.fixture
def rpc_cluster(tmp_path):  # noqa: ANN201
    """A tracker and two servers on 127.0.0.1, killed afterwards; yields (address, server logs)."""
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs, logs = [], []
    with open(tmp_path / "tracker.log", "w") as fh:
        tracker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tvm.exec.rpc_tracker",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--port-end",
                str(port + 1),
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
    procs.append(tracker)
    try:
        for i in range(2):
            log = tmp_path / f"server{i}.log"
            logs.append(log)
            sport = _free_port()
            cmd = [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(sport)]
            cmd += ["--port-end", str(sport + 1)]
            cmd += ["--tracker", f"127.0.0.1:{port}", "--key", KEY]
            with open(log, "w") as fh:
                procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env))
        for _ in range(60):  # the tracker listens once TVM is imported
            if tracker.poll() is not None:
                raise RuntimeError(f"the RPC tracker exited: {(tmp_path / 'tracker.log').read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        _wait_for_servers(f"127.0.0.1:{port}", 2)
        yield f"127.0.0.1:{port}", logs
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)


def test_rpc_tuning_uses_every_server_and_the_log_is_reused(rpc_cluster, tmp_path):
    address, logs = rpc_cluster
    torch.manual_seed(0)
    model, example = MLP((64, 48, 10)).eval(), (torch.randn(2, 64),)
    runner = tuning.rpc_runner(address, KEY)
    work = tmp_path / "logs"
    report = pbtvm.tune(model, example, "llvm", bits=4, work_dir=work, trials=4, runner=runner, progress=print)
    assert report.kernels and all(k.built >= 4 and k.run_failed == 0 and k.best_us for k in report.kernels)
    loads = [Path(log).read_text().count("load_module") for log in logs]
    assert all(n > 0 for n in loads), f"a server measured nothing (module loads per server: {loads})"
    compiled = pbtvm.compile(model, example, "llvm", bits=4, work_dir=work)
    assert len(compiled.manifest["tuning"]["tuned_kernels"]) == len(report.kernels)


@pytest.mark.parametrize(
    ("address", "match"),
    [("nohost", "host:port"), ("127.0.0.1:1", "cannot reach the RPC tracker")],
)
def test_rpc_runner_bad_address(address, match):
    with pytest.raises(ValueError, match=match):
        tuning.rpc_runner(address, KEY)


def test_rpc_runner_unknown_key(rpc_cluster):
    address, _ = rpc_cluster
    with pytest.raises(ValueError, match="no RPC server registered with key 'gpu-farm'"):
        tuning.rpc_runner(address, "gpu-farm")
