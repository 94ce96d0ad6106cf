"""Small scratch buffers of CPU kernels live on the stack, not in TVM's workspace pool.

A scratch buffer in any scope but ``"global"`` (``pbtvm.ops.common.CPU_SCRATCH``) becomes a
``TVMBackendAllocWorkspace``/``FreeWorkspace`` pair, run once per task of a parallel loop (the
decoder's kernels at batch 1 were 8-13 % slower, its pick 2x, that way). Buffers whose size
depends on the batch stay in the pool (once per call, outside the parallel loop).
"""

from __future__ import annotations

import re

import pytest

from pbtvm import kernels
from pbtvm.bitplane import BitplaneFormat
from pbtvm.ops.pb_vnni import target_supports
from pbtvm.sampling import pick_func
from pbtvm.target import resolve_target

CPU = resolve_target("llvm")
needs_vnni = pytest.mark.skipif(not target_supports(CPU), reason="host CPU lacks AVX-512 BW/VNNI")


def _workspace_allocations(func, schedule: bool = True) -> dict[str, int]:
    """``TVMBackendAllocWorkspace`` calls in each LLVM function of the built ``func`` (every
    function defined is a key)."""
    lib = kernels.build(func, CPU, schedule=schedule)
    ir = (lib.mod if hasattr(lib, "mod") else lib).inspect_source("ll")
    counts: dict[str, int] = {}
    current = None
    for line in ir.splitlines():
        if m := re.match(r"define [^@]*@([\w.]+)\(", line):
            current = m.group(1)
            counts[current] = 0
        elif "ptr @__TVMBackendAllocWorkspace" in line:
            counts[current] += 1
    return counts


@needs_vnni
@pytest.mark.parametrize("kind", ["lstm_step", "dense_act"])
def test_avx512_kernels_allocate_nothing_per_parallel_task(kind):
    fmt = BitplaneFormat(4)
    if kind == "lstm_step":
        func = kernels.lstm_cell_input_func(fmt, 512, 512, True)  # parallel: >= SERIAL_WEIGHT_BITS
    else:
        func = kernels.dense_act_func(fmt, 2048, 1024, True)
    per_task = {name: n for name, n in _workspace_allocations(func).items() if "parallel_lambda" in name}
    assert per_task, "the kernel has no parallel loop: nothing checked"
    assert sum(per_task.values()) == 0, f"workspace allocations inside parallel tasks: {per_task}"


def test_cpu_pick_kernel_allocates_no_workspace():
    counts = _workspace_allocations(pick_func(3, 100, 4, "llvm"), schedule=False)
    assert counts and sum(counts.values()) == 0, counts
