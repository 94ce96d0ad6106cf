"""pbtvm's default TVM thread count: one per physical core, unless the user chose."""

from __future__ import annotations

import builtins
import io
import os

from pbtvm import threads


def test_user_setting_wins(monkeypatch):
    monkeypatch.setenv("TVM_NUM_THREADS", "3")
    assert threads.default_threads() is None
    assert os.environ["TVM_NUM_THREADS"] == "3"
    monkeypatch.delenv("TVM_NUM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.default_threads() is None
    assert "TVM_NUM_THREADS" not in os.environ


def test_default_is_the_physical_core_count(monkeypatch):
    for name in threads.THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    count = threads.default_threads()
    assert count == threads.physical_cores() == int(os.environ["TVM_NUM_THREADS"])
    assert 1 <= count <= (os.cpu_count() or 1)


def test_hyperthreads_of_one_core_count_once(monkeypatch):
    siblings = {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"}  # two cores, two threads each
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if str(path).startswith("/sys/devices/system/cpu/cpu"):
            return io.StringIO(siblings[int(str(path).split("/cpu")[2].split("/")[0])])
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    monkeypatch.setattr(builtins, "open", fake_open)
    assert threads.physical_cores() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {1})
    assert threads.physical_cores() == 1
