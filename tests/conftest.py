"""Shared fixtures: seeded RNG (seed printed on failure), GPU detection, the gpu marker, and a check
that no process a test started (RPC servers, trackers, TVM popen workers) outlives the session."""

from __future__ import annotations

import os
import signal
import time
import uuid
import zlib

import numpy as np
import pytest


def _has_cuda_device() -> bool:
    try:
        from pbtvm.target import local_cuda_arch

        return local_cuda_arch() is not None
    except Exception:
        return False


HAS_GPU = _has_cuda_device()

#: Every process the tests start inherits this variable, so leftovers can be found even after
#: their parent died and they were re-parented (a killed RPC server's popen workers).
SESSION_ENV = "PBTVM_TEST_SESSION"


def _xdist_worker(session) -> bool:
    return hasattr(session.config, "workerinput")


def pytest_sessionstart(session):
    # Under pytest-xdist the workers keep the controller's token (they inherit it), so the
    # controller, which checks after its workers have stopped, sees every test's processes.
    if _xdist_worker(session):
        os.environ.setdefault(SESSION_ENV, uuid.uuid4().hex)
    else:
        os.environ[SESSION_ENV] = uuid.uuid4().hex
    # `timeout` and CI runners stop pytest with SIGTERM; as an interrupt it still runs fixture
    # teardown (RPC clusters, worker pools) instead of leaving their processes behind.
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _leftover_processes() -> list:
    import psutil

    token, me, found = os.environ.get(SESSION_ENV), os.getpid(), []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != me and proc.environ().get(SESSION_ENV) == token and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def pytest_sessionfinish(session, exitstatus):  # noqa: ARG001 - pytest hook signature
    if SESSION_ENV not in os.environ or _xdist_worker(session):  # a worker's verdict would be lost
        return
    deadline = time.time() + 15  # pools that are shutting down get a moment
    while (left := _leftover_processes()) and time.time() < deadline:
        time.sleep(0.5)
    if left:
        names = "\n".join(f"  pid {p.pid}: {' '.join(p.info['cmdline'] or [])[:160]}" for p in left)
        print(f"\nFAILED: {len(left)} process(es) started by the tests are still running:\n{names}")
        for proc in left:  # do not leave them behind for the next run either
            proc.kill()
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(config, items):  # noqa: ARG001 - pytest hook signature
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test id (override with PBTVM_SEED)."""
    seed = int(os.environ.get("PBTVM_SEED", zlib.crc32(request.node.nodeid.encode())))
    request.node.user_properties.append(("seed", seed))
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # noqa: ARG001 - pytest hook signature
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(("seed", f"rerun with PBTVM_SEED={seeds[0]}"))
