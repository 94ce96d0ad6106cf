"""Start the Python processes that only build or run TVM modules without importing torch.

MetaSchedule's builder and runner workers (TVM's ``PopenWorker``: ``python -m
tvm.exec.popen_worker``) and the tracker and servers of :func:`pbtvm.rpc_cluster.local_cluster`
(and their own popen workers) each import TVM first, and ``tvm_ffi`` imports torch whenever it is
installed. None of them uses torch, yet it was 2.4 of the 6.7 s each took to start on the 2-core
test machine (``python -X importtime -c "import tvm"``, 2026-12-02); a tuning run starts several,
the RPC cluster six. Here those processes find a ``torch`` on ``PYTHONPATH`` that raises
``ModuleNotFoundError``, which ``tvm_ffi`` takes as "torch not installed".

TVM's ``PopenWorker`` passes no environment of its own to the process it starts, so
:func:`workers_without_torch` puts the stand-in first on ``os.environ["PYTHONPATH"]`` for the
duration of a block (where pbtvm's builder starts its workers, where a runner is made) and takes
it off afterwards: a Python process that another thread starts meanwhile does not find torch
either. :func:`env_without_torch` builds such an environment for processes pbtvm starts itself.
``PBTVM_WORKER_TORCH=1`` leaves torch importable everywhere. A builder or runner passed to
:func:`pbtvm.tune` is used as it is.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from .names import ENV_WORKER_TORCH

_STUB = f'''"""Stands in for torch in processes pbtvm starts to build or run TVM modules only."""

raise ModuleNotFoundError(
    "pbtvm started this process without torch: it builds or runs TVM modules only "
    "(set {ENV_WORKER_TORCH}=1 to keep torch importable in pbtvm's worker processes)",
    name="torch",
)
'''

_stub_lock = threading.Lock()
_stub_root: str | None = None
_env_lock = threading.Lock()
_depth = 0


def _remove_own(root: str, pid: int) -> None:
    """Remove ``root`` at exit, in the process that made it (a forked child inherits the handler)."""
    if os.getpid() == pid:
        shutil.rmtree(root, ignore_errors=True)


def remove_stub_dir() -> None:
    """Remove this process's stand-in directory now (what its exit handler does), for a process
    that ends without running exit handlers (``pbtvm.cli.run`` after Ctrl-C)."""
    if _stub_root is not None:
        _remove_own(_stub_root, os.getpid())


def stub_dir() -> str:
    """A directory holding the stand-in ``torch`` package: made once per process (made again if
    something removed it), removed when the process exits."""
    global _stub_root
    with _stub_lock:
        if _stub_root is None:
            _stub_root = tempfile.mkdtemp(prefix="pbtvm-no-torch-")
            atexit.register(_remove_own, _stub_root, os.getpid())
        init = Path(_stub_root, "torch", "__init__.py")
        if not init.exists():
            init.parent.mkdir(parents=True, exist_ok=True)
            init.write_text(_STUB)
        return _stub_root


def _with_stub(pythonpath: str | None) -> str:
    return os.pathsep.join(p for p in (stub_dir(), pythonpath) if p)


def _without_stub(pythonpath: str) -> str | None:
    """``pythonpath`` without the stand-in's entry (None: nothing left)."""
    parts = pythonpath.split(os.pathsep)
    if _stub_root in parts:
        parts.remove(_stub_root)
    return os.pathsep.join(parts) or None


def env_without_torch(env: Mapping[str, str] | None = None, force: bool = False) -> dict[str, str]:
    """``env`` (default ``os.environ``) with the stand-in torch first on ``PYTHONPATH``.

    Unchanged (a copy) when ``PBTVM_WORKER_TORCH=1`` is set in it, unless ``force`` (for tests that
    check a process runs without torch).
    """
    env = dict(os.environ if env is None else env)
    if force or env.get(ENV_WORKER_TORCH) != "1":
        env["PYTHONPATH"] = _with_stub(env.get("PYTHONPATH"))
    return env


@contextlib.contextmanager
def workers_without_torch() -> Iterator[None]:
    """Python processes started while the block runs (from any thread) do not import torch.

    Re-entrant and thread-safe: the first block to enter puts the stand-in first on
    ``os.environ["PYTHONPATH"]``, the last to leave takes it off again (what else changed the
    variable meanwhile stays). Nothing changes when ``PBTVM_WORKER_TORCH=1`` is set.
    """
    global _depth
    if os.environ.get(ENV_WORKER_TORCH) == "1":
        yield
        return
    entered = False
    try:
        with _env_lock:
            if _depth == 0:
                os.environ["PYTHONPATH"] = _with_stub(os.environ.get("PYTHONPATH"))
            _depth, entered = _depth + 1, True
        yield
    finally:
        if entered:
            with _env_lock:
                _depth -= 1
                if _depth == 0:
                    rest = _without_stub(os.environ.get("PYTHONPATH", ""))
                    if rest is None:
                        os.environ.pop("PYTHONPATH", None)
                    else:
                        os.environ["PYTHONPATH"] = rest
