"""A TVM RPC tracker plus servers on this machine: try distributed tuning without a farm.

On real hardware the tracker runs somewhere reachable and every GPU machine runs
``python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY``; ``pbtvm tune --rpc HOST:PORT
--key KEY`` then measures candidates on all of them. :func:`local_cluster` starts the same
processes on 127.0.0.1 (for tests and tutorial 04) and always stops them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_keys(host: str, port: int, timeout: float = 5.0) -> list[str]:
    """The device key of every server registered at the tracker ``host:port``, one per server.

    Raises
    ------
    OSError, RuntimeError
        The tracker cannot be reached (checked with a plain socket first: TVM's own connect
        retries for 60 s).
    """
    from tvm import rpc

    socket.create_connection((host, port), timeout=timeout).close()
    info = rpc.connect_tracker(host, port).summary().get("server_info", [])
    return [str(s.get("key", "")).split(":")[-1] for s in info]


def registered_servers(address: str, key: str) -> int:
    """How many servers with ``key`` the tracker at ``host:port`` lists (0 if unreachable)."""
    host, port = address.rsplit(":", 1)
    try:
        return server_keys(host, int(port), timeout=2).count(key)
    except Exception:
        return 0


# ``python -m tvm.exec.rpc_server`` that connects once the tracker at argv[1]:argv[2] listens. Each
# process spends ~3 s importing tvm (and torch); a server that finds no tracker retries only after
# 5 s, so the servers import while the tracker starts and connect when it is up.
_SERVER_AFTER_TRACKER = """
import runpy, socket, sys, time
import tvm.rpc
deadline = time.time() + 120  # local_cluster gives up (and stops this process) sooner
while True:
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
        break
    except OSError:
        if time.time() > deadline:
            sys.exit("no RPC tracker at %s:%s" % (sys.argv[1], sys.argv[2]))
        time.sleep(0.05)
tvm.rpc.connect_tracker(sys.argv[1], int(sys.argv[2])).summary()  # it answers: its loop runs
sys.argv = ["rpc_server", *sys.argv[3:]]
runpy.run_module("tvm.exec.rpc_server", run_name="__main__", alter_sys=True)
"""


@contextlib.contextmanager
def local_cluster(
    key: str, servers: int = 2, log_dir: str | os.PathLike | None = None, timeout: float = 90.0
) -> Iterator[tuple[str, list[Path]]]:
    """Run a tracker and ``servers`` RPC servers on 127.0.0.1 for the duration of the block.

    Yields
    ------
    address : str
        ``127.0.0.1:<port>`` of the tracker.
    logs : list of Path
        One log file per server (each measured candidate shows up as a ``load_module`` line).

    Raises
    ------
    RuntimeError
        If the tracker exits or the servers do not register within ``timeout`` seconds.
    """
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="pbtvm-rpc-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    try:
        with open(log_dir / "tracker.log", "w") as fh:
            cmd = [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1"]
            procs.append(
                subprocess.Popen(
                    [*cmd, "--port", str(port), "--port-end", str(port + 1)],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            )
        for i in range(servers):
            logs.append(log_dir / f"server{i}.log")
            sport = free_port()
            cmd = [sys.executable, "-c", _SERVER_AFTER_TRACKER, "127.0.0.1", str(port), "--host", "127.0.0.1"]
            cmd += ["--port", str(sport), "--port-end", str(sport + 1), "--tracker", address, "--key", key]
            with open(logs[-1], "w") as fh:
                procs.append(
                    subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                )
        deadline = time.time() + timeout
        while registered_servers(address, key) < servers:
            if procs[0].poll() is not None:
                raise RuntimeError(f"the RPC tracker exited: {(log_dir / 'tracker.log').read_text()[-2000:]}")
            if time.time() > deadline:
                raise RuntimeError(f"{servers} RPC servers did not register at {address} within {timeout:.0f}s")
            time.sleep(0.1)
        yield address, logs
    finally:
        for p in procs:
            _stop_group(p)


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop ``proc`` and every process it started (an RPC server forks popen workers per session).

    Each process was started in a session of its own, so its process group holds its workers too;
    killing only ``proc`` would leave them running, listening on 127.0.0.1.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # workers that outlived their parent's TERM
        os.killpg(proc.pid, signal.SIGKILL)
