"""Distributed tuning over TVM RPC on loopback: a tracker and two servers, both measure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pbtvm
from pbtvm.rpc_cluster import local_cluster
from pbtvm.schedules import tuning

from .models import MLP

KEY = "pbtvm-loopback"


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
