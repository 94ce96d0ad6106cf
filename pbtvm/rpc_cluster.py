"""A TVM RPC tracker plus servers on this machine: try distributed tuning without a farm.

On real hardware the tracker runs somewhere reachable and every GPU machine runs
``python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY``; ``pbtvm tune --rpc HOST:PORT
--key KEY`` then measures candidates on all of them. :func:`local_cluster` starts the same
processes on 127.0.0.1 (for tests and tutorial 04) and always stops them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .worker_env import env_without_torch


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_tracker(host: str, port: int, timeout: float = 5.0) -> None:
    """Raise ``OSError`` unless a TVM RPC tracker answers at ``host:port`` within ``timeout`` s.

    TVM's own ``connect_tracker`` retries a refused connection for 60 s, and waits forever for the
    handshake of something that listens but is not a tracker (an HTTP server, say). Here the
    tracker's handshake (its magic number, echoed) is checked on a socket with a timeout.

    Parameters
    ----------
    host : str
    port : int
    timeout : float
        Seconds for the connection and for the reply.

    Raises
    ------
    OSError
        Nothing listens there (``ConnectionRefusedError``), no reply in time, or a reply that is
        not the tracker's.
    """
    with _tracker_socket(host, port, timeout):
        pass


@contextlib.contextmanager
def _tracker_socket(host: str, port: int, timeout: float) -> Iterator[socket.socket]:
    """A connection to the tracker at ``host:port`` after its handshake; every wait on it times out."""
    from tvm.rpc.base import RPC_TRACKER_MAGIC

    magic = struct.pack("<i", RPC_TRACKER_MAGIC)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(magic)
        reply = b""
        try:
            while len(reply) < len(magic) and (chunk := sock.recv(len(magic) - len(reply))):
                reply += chunk
        except TimeoutError:
            raise OSError(
                f"{address(host, port)} accepts connections but gave no TVM RPC tracker handshake in {timeout:g} s"
            ) from None
        if not reply:
            raise OSError(f"{address(host, port)} closed the connection during the TVM RPC tracker handshake")
        if reply != magic:
            raise OSError(
                f"{address(host, port)} is not a TVM RPC tracker (its reply to the tracker handshake: {reply!r})"
            )
        yield sock


def tracker_summary(host: str, port: int, timeout: float = 5.0) -> dict:
    """The tracker's summary: ``{"queue_info": {key: {"free": n, "pending": m}}, "server_info": [...]}``.

    Asked on a socket with a timeout (TVM's ``TrackerSession.summary`` waits forever for a tracker
    that stops answering).

    Raises
    ------
    OSError
        The tracker cannot be reached, is no tracker (:func:`check_tracker`), or gave no summary in
        ``timeout`` s.
    """
    from tvm.rpc import base

    with _tracker_socket(host, port, timeout) as sock:
        try:
            base.sendjson(sock, [base.TrackerCode.SUMMARY])
            value = base.recvjson(sock)
        except TimeoutError:
            raise OSError(f"the RPC tracker at {address(host, port)} gave no summary in {timeout:g} s") from None
        except ValueError as err:  # not JSON, not UTF-8
            raise OSError(f"the RPC tracker at {address(host, port)} gave an unreadable summary ({err})") from None
    if not isinstance(value, list) or len(value) != 2 or value[0] != base.TrackerCode.SUCCESS:
        raise OSError(f"the RPC tracker at {address(host, port)} answered its summary request with {value!r}")
    return value[1]


def server_keys(host: str, port: int, timeout: float = 5.0) -> list[str]:
    """The device key of every server registered at the tracker ``host:port``, one per server.

    Raises
    ------
    OSError
        The tracker cannot be reached, or what listens there is no tracker (:func:`tracker_summary`).
    """
    return registered_keys(tracker_summary(host, port, timeout))


def registered_keys(summary: dict) -> list[str]:
    """The device key of every server a tracker's :func:`tracker_summary` lists, one per server."""
    # a server registers as "server:<key>"; the key may hold colons itself ("gpu:h100")
    return [str(s.get("key", "")).removeprefix("server:") for s in summary.get("server_info", [])]


def address(host: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets (``[::1]:9190``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def registered_servers(address: str, key: str) -> int:
    """How many servers with ``key`` the tracker at ``host:port`` lists (0 if unreachable)."""
    host, port = address.rsplit(":", 1)
    try:
        return server_keys(host, int(port), timeout=2).count(key)
    except Exception:
        return 0


# ``python -m tvm.exec.rpc_server`` that connects once the tracker at argv[1]:argv[2] listens. Each
# process spends ~3 s importing tvm; a server that finds no tracker retries only after
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

    Parameters
    ----------
    key : str
        Device key the servers register with.
    servers : int
    log_dir : path, optional
        Where the tracker and server logs go; default a temporary directory, removed afterwards.
    timeout : float
        Seconds the servers may take to register.

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

    Notes
    -----
    The processes are stopped however the block ends: an exception, Ctrl-C, or SIGTERM (what
    ``timeout``, ``kill`` and CI cancellation send), which, in the main thread and while no other
    handler is set, raises ``SystemExit(143)`` inside the block instead of ending the process at once.
    """
    own_dir = log_dir is None
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="pbtvm-rpc-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    # the tracker, the servers and their popen workers run TVM modules only: no torch import (:mod:`.worker_env`)
    env = {**env_without_torch(), "PYTHONUNBUFFERED": "1"}
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(_sigterm_raises())
        if own_dir:
            cleanup.callback(shutil.rmtree, log_dir, ignore_errors=True)

        def start(cmd: list[str], log: Path) -> None:
            """Start one process (logging to ``log``); the block's end stops it (each on its own)."""
            with open(log, "w") as fh:
                procs.append(
                    subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                )
            cleanup.callback(_stop_group, procs[-1])  # before the log directory goes

        cmd = [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1"]
        start([*cmd, "--port", str(port), "--port-end", str(port + 1)], log_dir / "tracker.log")
        for i in range(servers):
            logs.append(log_dir / f"server{i}.log")
            sport = free_port()
            cmd = [sys.executable, "-c", _SERVER_AFTER_TRACKER, "127.0.0.1", str(port), "--host", "127.0.0.1"]
            cmd += ["--port", str(sport), "--port-end", str(sport + 1), "--tracker", address, "--key", key]
            start(cmd, logs[-1])
        deadline = time.time() + timeout
        while registered_servers(address, key) < servers:
            if procs[0].poll() is not None:
                raise RuntimeError(f"the RPC tracker exited: {(log_dir / 'tracker.log').read_text()[-2000:]}")
            for i, (proc, log) in enumerate(zip(procs[1:], logs, strict=True)):
                said = log.read_text(errors="replace") if log.exists() else ""
                if proc.poll() is not None or "cannot bind" in said:  # its port taken since free_port, ...
                    raise RuntimeError(f"RPC server {i} did not start: {said[-2000:]}")
            if time.time() > deadline:
                raise RuntimeError(f"{servers} RPC servers did not register at {address} within {timeout:.0f}s")
            time.sleep(0.1)
        yield address, logs


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises ``SystemExit(143)`` (so ``finally`` blocks run).

    Only in the main thread (where Python runs signal handlers) and only if SIGTERM still has its
    default action: a handler the program set (pytest's conftest here, which turns SIGTERM into
    KeyboardInterrupt) stays as it is. After the first SIGTERM further ones are ignored until the
    block has cleaned up (SIGKILL still works); the default action comes back afterwards, unless
    the block set a handler of its own.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) in (handler, signal.SIG_IGN):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
