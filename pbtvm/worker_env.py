"""Start the Python processes that only build or run TVM modules without importing torch.

MetaSchedule's builder and runner workers (TVM's ``PopenWorker``: ``python -m
tvm.exec.popen_worker``) and the tracker and servers of :func:`pbtvm.rpc_cluster.local_cluster`
(and their own popen workers) each import TVM first, and ``tvm_ffi`` imports torch whenever it is
installed. None of them uses torch, yet it was 2.4 of the 6.7 s each took to start on the 2-core
test machine (``python -X importtime -c "import tvm"``, 2026-12-02); a tuning run starts several,
the RPC cluster six. Here those processes find a ``torch`` on ``PYTHONPATH`` that raises
``ModuleNotFoundError``, which ``tvm_ffi`` takes as "torch not installed".

TVM's ``PopenWorker`` passes no environment of its own to the process it starts, so
:func:`workers_without_torch` sets ``os.environ["PYTHONPATH"]`` for the duration of a block (a
tuning run) and restores it afterwards; :func:`env_without_torch` builds such an environment for
processes pbtvm starts itself. ``PBTVM_WORKER_TORCH=1`` leaves torch importable in them (a
builder or runner of your own that needs it).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

#: Environment variable: ``1`` keeps torch importable in the worker processes.
ENV_WORKER_TORCH = "PBTVM_WORKER_TORCH"

_STUB = f'''"""Stands in for torch in processes pbtvm starts to build or run TVM modules only."""

raise ModuleNotFoundError(
    "pbtvm started this process without torch: it builds or runs TVM modules only "
    "(set {ENV_WORKER_TORCH}=1 to keep torch importable in pbtvm's worker processes)",
    name="torch",
)
'''

_lock = threading.Lock()
_depth = 0
_saved: str | None = None


@functools.cache
def stub_dir() -> str:
    """A directory holding the stand-in ``torch`` package (made once per process, removed at exit)."""
    root = tempfile.mkdtemp(prefix="pbtvm-no-torch-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    package = Path(root, "torch")
    package.mkdir()
    (package / "__init__.py").write_text(_STUB)
    return root


def _with_stub(pythonpath: str | None) -> str:
    return os.pathsep.join(p for p in (stub_dir(), pythonpath) if p)


def env_without_torch(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default ``os.environ``) with the stand-in torch first on ``PYTHONPATH``.

    Unchanged (a copy) when ``PBTVM_WORKER_TORCH=1`` is set in it.
    """
    env = dict(os.environ if env is None else env)
    if env.get(ENV_WORKER_TORCH) != "1":
        env["PYTHONPATH"] = _with_stub(env.get("PYTHONPATH"))
    return env


@contextlib.contextmanager
def workers_without_torch() -> Iterator[None]:
    """Python processes started while the block runs (from any thread) do not import torch.

    Re-entrant and thread-safe: the first block to enter puts the stand-in first on
    ``os.environ["PYTHONPATH"]``, the last to leave restores the previous value. Nothing changes
    when ``PBTVM_WORKER_TORCH=1`` is set.
    """
    global _depth, _saved
    if os.environ.get(ENV_WORKER_TORCH) == "1":
        yield
        return
    with _lock:
        if _depth == 0:
            _saved = os.environ.get("PYTHONPATH")
            os.environ["PYTHONPATH"] = _with_stub(_saved)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                if _saved is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = _saved
