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

from pbtvm.target import cuda_device_problem

NO_GPU_REASON = cuda_device_problem() or ""  # why the ``gpu`` tests cannot run
HAS_GPU = not NO_GPU_REASON

#: Set to 1 where a GPU must be used (benchmarks/gpu_session.sh): then a machine whose GPU TVM
#: or torch cannot reach stops the run with the reason, instead of skipping every ``gpu`` test
#: and looking green.
REQUIRE_GPU = "PBTVM_REQUIRE_GPU"

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


def pytest_configure(config):  # noqa: ARG001 - pytest hook signature
    # Before any collection (and before pytest-xdist starts its workers): a clean usage error.
    if os.environ.get(REQUIRE_GPU) == "1":
        import torch

        if not HAS_GPU:
            raise pytest.UsageError(f"{REQUIRE_GPU}=1 but the gpu tests cannot run: {NO_GPU_REASON}")
        if not torch.cuda.is_available():  # the gpu tests compare with torch on the GPU
            raise pytest.UsageError(f"{REQUIRE_GPU}=1 but torch {torch.__version__} sees no CUDA device")


#: The test files that take longest (per-file sums of ``--durations`` on 2 cores, 2026-12-01), run
#: first: pytest-xdist's ``loadfile`` hands out whole files in collection order, and the tutorials
#: (alphabetically late, ~260 s) kept one worker busy ~150 s after the other had finished.
LONGEST_FIRST = ("test_tutorials.py", "test_fuzz_graphs.py", "test_tuning.py", "test_bmma_lstm.py")


def pytest_collection_modifyitems(config, items):  # noqa: ARG001 - pytest hook signature
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: other orders kept
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA device: {NO_GPU_REASON}")
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
