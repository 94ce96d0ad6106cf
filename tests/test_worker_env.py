"""TVM worker processes started by pbtvm (tuning builders and runners, the local RPC cluster) do
not import torch, and the caller's environment is restored."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

import pytest

from pbtvm import worker_env
from pbtvm.names import ENV_WORKER_TORCH
from pbtvm.worker_env import env_without_torch, workers_without_torch


def _torch_in(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True, timeout=120)


def test_a_process_started_with_the_env_finds_no_torch_and_is_told_why(monkeypatch):
    monkeypatch.delenv(ENV_WORKER_TORCH, raising=False)
    monkeypatch.setenv("PYTHONPATH", "/some/dir")
    env = env_without_torch()
    assert env["PYTHONPATH"].split(os.pathsep) == [worker_env.stub_dir(), "/some/dir"]
    out = _torch_in(env)
    assert out.returncode != 0 and "ModuleNotFoundError: pbtvm started this process without torch" in out.stderr
    assert ENV_WORKER_TORCH in out.stderr
    # opting out keeps torch (and PYTHONPATH) as they were, unless forced (tests of a process without torch)
    kept = env_without_torch({**os.environ, ENV_WORKER_TORCH: "1"})
    assert kept["PYTHONPATH"] == "/some/dir"
    forced = env_without_torch({**os.environ, ENV_WORKER_TORCH: "1"}, force=True)
    assert forced["PYTHONPATH"].split(os.pathsep)[0] == worker_env.stub_dir()


def test_the_stand_in_is_made_again_if_removed_and_only_its_process_removes_it():
    root = worker_env.stub_dir()
    shutil.rmtree(root)
    assert worker_env.stub_dir() == root and os.path.isfile(os.path.join(root, "torch", "__init__.py"))
    worker_env._remove_own(root, os.getpid() + 1)  # the exit handler, run in a forked child
    assert os.path.isdir(root)


@pytest.mark.parametrize("before", [None, "/some/dir"])
def test_the_block_restores_pythonpath_when_the_last_user_leaves(monkeypatch, before):
    monkeypatch.delenv(ENV_WORKER_TORCH, raising=False)
    if before is None:
        monkeypatch.delenv("PYTHONPATH", raising=False)
    else:
        monkeypatch.setenv("PYTHONPATH", before)
    stub = worker_env.stub_dir()
    with workers_without_torch():
        assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == stub
        with workers_without_torch():  # nested (a tune inside a tune's caller): one stub, kept
            assert os.environ["PYTHONPATH"].count(stub) == 1
        assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == stub
    assert os.environ.get("PYTHONPATH") == before
    with pytest.raises(RuntimeError), workers_without_torch():  # restored when the block raises
        raise RuntimeError
    assert os.environ.get("PYTHONPATH") == before
    with workers_without_torch():  # a change made meanwhile is kept; only the stand-in goes
        os.environ["PYTHONPATH"] = os.pathsep.join(["/other", os.environ["PYTHONPATH"]])
    assert os.environ["PYTHONPATH"] == os.pathsep.join(["/other", *([before] if before else [])])


def test_overlapping_blocks_in_threads_keep_the_stand_in_until_the_last_leaves(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/some/dir")
    monkeypatch.delenv(ENV_WORKER_TORCH, raising=False)
    entered, leave = threading.Barrier(3), [threading.Event(), threading.Event()]

    def hold(i):
        with workers_without_torch():
            entered.wait()
            leave[i].wait()

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    entered.wait()
    stub = worker_env.stub_dir()
    assert os.environ["PYTHONPATH"] == os.pathsep.join([stub, "/some/dir"])
    leave[0].set()  # the first to enter leaves first: the other still needs the stand-in
    threads[0].join()
    assert os.environ["PYTHONPATH"] == os.pathsep.join([stub, "/some/dir"])
    leave[1].set()
    threads[1].join()
    assert os.environ["PYTHONPATH"] == "/some/dir"


def test_opting_out_leaves_the_environment_alone(monkeypatch):
    monkeypatch.setenv(ENV_WORKER_TORCH, "1")
    monkeypatch.setenv("PYTHONPATH", "/some/dir")
    with workers_without_torch():
        assert os.environ["PYTHONPATH"] == "/some/dir"


def test_a_tvm_popen_worker_started_in_the_block_works_without_torch(monkeypatch):
    """The worker imports TVM (``tvm_ffi`` takes the stand-in as "no torch") and runs a job."""
    from tvm.support.popen_pool import PopenPoolExecutor

    monkeypatch.delenv(ENV_WORKER_TORCH, raising=False)

    def job():
        import sys

        import tvm

        return "torch" in sys.modules and sys.modules["torch"] is not None, tvm.runtime.tensor([1, 2]).numpy().sum()

    pool = PopenPoolExecutor(max_workers=1)
    try:
        with workers_without_torch():
            torch_loaded, total = pool.submit(job).result()
    finally:
        pool.shutdown()
    assert (torch_loaded, total) == (False, 3)


def test_the_tuning_runner_worker_has_no_torch(monkeypatch):
    """MetaSchedule's LocalRunner starts its worker when it is made (:func:`default_runner`)."""
    from pbtvm._tvm import tvm
    from pbtvm.schedules.tuning import default_runner

    monkeypatch.delenv(ENV_WORKER_TORCH, raising=False)

    def torch_loaded():
        import sys

        return "torch" in sys.modules and sys.modules["torch"] is not None

    runner = default_runner(tvm.target.Target({"kind": "llvm"}))
    try:
        assert runner.pool.submit(torch_loaded).result() is False
    finally:
        runner.pool.shutdown()
