"""The benchmarks' parallel build (``benchmarks/parallel_build.py``): what a GPU sitting relies on
to compile its kernels and decoders in one process per core before timing them."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")


def _parallel_build():
    spec = importlib.util.spec_from_file_location("parallel_build", os.path.join(BENCHMARKS, "parallel_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _stop_resource_tracker():
    """A spawn pool starts multiprocessing's resource tracker, which lives as long as this process:
    stop it with the test (every process a test starts ends with it)."""
    yield
    from multiprocessing import resource_tracker

    resource_tracker._resource_tracker._stop()


def write_square(job: int, path: str) -> None:
    """A build function for the workers: writes ``job**2``; job 3 fails."""
    if job == 3:
        raise ValueError("job three is broken")
    with open(path, "w") as f:
        f.write(str(job * job))


@pytest.mark.parametrize("workers", [1, 2])
def test_build_all_returns_each_jobs_result_in_order(tmp_path, workers):
    paths = _parallel_build().build_all(write_square, [5, 1, 4], str(tmp_path), workers)
    assert [open(p).read() for p in paths] == ["25", "1", "16"]


@pytest.mark.parametrize("workers", [1, 2])
def test_build_all_names_the_job_that_failed(tmp_path, workers):
    with pytest.raises(RuntimeError, match="building job 3 failed: job three is broken"):
        _parallel_build().build_all(write_square, [2, 3], str(tmp_path), workers, label=lambda j: f"job {j}")


@pytest.mark.slow
def test_bench_bmma_dry_run_builds_in_workers_and_checks_sass():
    """The W2 one-launch kernel at its batch-8 config spilled before (``test_bmma_codegen``); the
    dry run builds the layer's pack, BMMA and one-launch kernels in two processes and checks
    each one's sm_90 SASS for BMMA and spills."""
    cmd = [sys.executable, os.path.join(BENCHMARKS, "bench_bmma.py"), "--dry-run", "--fused", "--jobs", "2"]
    cmd += ["--shapes", "6000x1500", "--bits", "2", "--batches", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dry run: 3 kernels built for sm_90 and checked with nvcc" in proc.stdout
    assert proc.stdout.count("  built ") == 3
