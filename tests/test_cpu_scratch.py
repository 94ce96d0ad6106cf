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
from pbtvm._tvm import tvm
from pbtvm.bitplane import BitplaneFormat
from pbtvm.ops.pb_vnni import cpu_isa, target_supports
from pbtvm.sampling import pick_func
from pbtvm.schedules import rule_for
from pbtvm.schedules.cpu_vnni import CPUVnniGemm, CPUVnniLstmCell
from pbtvm.target import resolve_target

CPU = resolve_target("llvm")
AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
ADL = tvm.target.Target({"kind": "llvm", "mcpu": "alderlake"})
#: The host's CPU without the AMX tile instructions.
ZMM_ONLY = tvm.target.Target({"kind": "llvm", "mcpu": str(CPU.attrs["mcpu"]), "mattr": ["-amx-tile", "-amx-int8"]})
needs_vnni = pytest.mark.skipif(not target_supports(CPU), reason="host CPU lacks AVX-512 BW/VNNI")


def _workspace_allocations(func, schedule: bool = True, target=CPU) -> dict[str, int]:
    """``TVMBackendAllocWorkspace`` calls in each LLVM function of the built ``func`` (every
    function defined is a key)."""
    lib = kernels.build(func, target, schedule=schedule)
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


@pytest.mark.parametrize(
    ("isa", "bits"),
    [
        pytest.param("avx512", 4, marks=needs_vnni),
        ("avx2", 4),  # built for Haswell: no host requirement
        ("avx2", 8),  # split codes: two decode buffers' worth
        ("avxvnni", 4),  # built for Alder Lake: the ymm GFNI decode, rows decoded once
    ],
)
@pytest.mark.parametrize("kind", ["lstm_step", "dense_act"])
def test_byte_code_kernels_allocate_nothing_per_parallel_task(kind, isa, bits):
    """Also the rows decoded once for a batch of several tiles (AVX2): their buffer is one per call.
    (The AMX loops of AVX-512 CPUs with AMX, from 6 activation rows, do allocate their 13 KiB per
    task, from the thread's pool: hot in L1, measured faster than a part per task made once per
    call, :mod:`pbtvm.ops.amx_gemm`; the AVX-512 build here leaves AMX out.)"""
    fmt = BitplaneFormat(bits)
    target = {"avx512": ZMM_ONLY, "avx2": AVX2, "avxvnni": ADL}[isa]
    if kind == "lstm_step":
        func = kernels.lstm_cell_input_func(fmt, 512, 512, True)  # parallel: >= SERIAL_WEIGHT_BITS
    else:
        func = kernels.dense_act_func(fmt, 2048, 1024, True)
    rule = rule_for(func, target)
    assert isinstance(rule, CPUVnniGemm | CPUVnniLstmCell) and cpu_isa(target) == isa, "not the byte-code kernel"
    counts = _workspace_allocations(func, target=target)
    per_task = {name: n for name, n in counts.items() if "parallel_lambda" in name}
    assert per_task, "the kernel has no parallel loop: nothing checked"
    assert sum(per_task.values()) == 0, f"workspace allocations inside parallel tasks: {per_task}"


def test_cpu_pick_kernel_allocates_no_workspace():
    counts = _workspace_allocations(pick_func(3, 100, 4, "llvm"), schedule=False)
    assert counts and sum(counts.values()) == 0, counts
