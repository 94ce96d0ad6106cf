"""ptxas keeps every global load of the PB kernels (no GPU needed: nvcc for sm_90).

A sampled CUDA-core candidate computed ``-rowsum`` on an H100 although its CUDA code and PTX were
right: ptxas had dropped a weight load (BENCHMARKS.md, eleventh session; 5 ``ld.global`` in the
PTX, 4 ``LDG`` in the SASS). :func:`pbtvm.sass.dropped_global_loads` compares the two counts per
kernel; here it runs on the default kernels of every PB kernel kind, both product paths (binary
tensor cores and CUDA-core popcount), and on that candidate's design space.
"""

from __future__ import annotations

import pytest

from pbtvm import bitplane as bp
from pbtvm import kernels
from pbtvm.cuda import find_nvcc
from pbtvm.sass import dropped_global_loads, ptx_global_loads, sass_global_loads
from pbtvm.target import resolve_target

from .cuda_sources import candidate_source, default_source, h100_candidates

SM90 = resolve_target({"kind": "cuda", "arch": "sm_90"})
MMA = "mma16x256"

try:
    find_nvcc()
except RuntimeError as err:
    pytest.skip(str(err), allow_module_level=True)


def test_load_counts_read_ptx_and_sass():
    ptx = """
.visible .entry first(
    .param .u64 a
)
{
    ld.param.u64 %rd1, [a];
    ld.global.nc.v2.u32 {%r1, %r2}, [%rd1];
    @%p1 ld.global.u32 %r3, [%rd1+8];
    @!%p2 ld.global.nc.u32 %r4, [%rd1+16];
    ld.shared.u32 %r5, [%r6];
}
.visible .entry second(
)
{
    ld.global.v4.u32 {%r1, %r2, %r3, %r4}, [%rd2];
}
"""
    assert ptx_global_loads(ptx) == {"first": 3, "second": 1}
    sass = "@!P0 LDG.E.64.CONSTANT R22, desc[UR6][R20.64] ;\nLDGSTS.E [R1], desc[UR4][R2.64] ;\nLDGDEPBAR ;\nLDS R4, [R2] ;"
    assert sass_global_loads(sass) == 1  # cp.async's LDGSTS / LDGDEPBAR are not loads into registers


KERNELS = {
    "BMMA dense W4": lambda: kernels.dense_func(bp.BitplaneFormat(4, 8, layout=MMA), 512, 1000),
    "BMMA dense W1 bipolar": lambda: kernels.dense_func(bp.BitplaneFormat(1, 8, layout=MMA), 96, 2048),
    "one-launch BMMA dense W2": lambda: kernels.dense_act_func(bp.BitplaneFormat(2, 8, layout=MMA), 300, 650),
    "BMMA LSTM step W4": lambda: kernels.lstm_cell_func(bp.BitplaneFormat(4, 8, layout=MMA), 200),
    "BMMA LSTM step with input W2": lambda: kernels.lstm_cell_input_func(bp.BitplaneFormat(2, 8, layout=MMA), 200, 100),
    "activation pack": lambda: kernels.act_pack_func(bp.BitplaneFormat(4, 8, layout=MMA), 1000),
    "CUDA-core dense W4": lambda: kernels.dense_func(bp.BitplaneFormat(4, 8), 256, 4096),
    "CUDA-core dense W3 NkW": lambda: kernels.dense_func(bp.BitplaneFormat(3, 8, layout="NkW"), 64, 1000),
    "CUDA-core LSTM step W2": lambda: kernels.lstm_cell_func(bp.BitplaneFormat(2, 8), 64),
}


@pytest.mark.parametrize("name", list(KERNELS))
def test_ptxas_keeps_every_global_load_of_the_default_kernels(name):
    assert dropped_global_loads(default_source(KERNELS[name](), SM90), "sm_90") == {}


def test_ptxas_keeps_every_global_load_of_the_h100_candidates_design_space():
    """The candidate an H100 got wrong is the first of these (tests/test_gpu.py's draws), with a
    sample of each other design space of the CUDA-core template."""
    func, candidates = h100_candidates(SM90)
    assert len(candidates[::3]) >= 4
    for sch in candidates[::3]:
        assert dropped_global_loads(candidate_source(func, sch, SM90), "sm_90") == {}, sch.trace
