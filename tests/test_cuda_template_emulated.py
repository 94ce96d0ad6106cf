"""The tunable CUDA-core GEMM template's sampled candidates, run by the CPU emulator, are exact.

A design space must not contain wrong programs. Before 2026-11-30 the template bound the warps
that split K to ``threadIdx.z`` with the rows' ``threadIdx.y`` between them and the lanes; TVM
then lowered a row's reduction to a shared-memory tree whose last steps assume the warp runs in
lock step (no ``__syncwarp``), which CUDA does not promise since Volta: in every run here some
of these twelve candidates were wrong (the lanes of a warp run as separate CPU threads). They now
share ``threadIdx.x`` with the lanes (warp shuffles).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pbtvm import bitplane as bp
from pbtvm import kernels
from pbtvm import quantize as qz
from pbtvm.cuda import build, cuda_source
from pbtvm.schedules import tuning
from pbtvm.target import resolve_target

from .cuda_emulator import EmulatedKernel, launch_dims

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20) to emulate the kernel")
SM90 = resolve_target({"kind": "cuda", "arch": "sm_90"})


def test_sampled_cuda_core_candidates_exact_in_emulation(rng):
    """W1, K = 2048 (the K of the open H100 bug, BENCHMARKS.md): 3 samples of every design space."""
    fmt, n, k, batch = bp.BitplaneFormat(1, 8), 48, 2048, 2
    func = kernels.int_product_func(fmt, n, k)
    q, _ = qz.quantize_weights(rng.standard_normal((n, k)).astype(np.float32), fmt)
    xq, _ = qz.quantize_activations(rng.standard_normal((batch, k)).astype(np.float32), fmt)
    wp, xp = bp.pack_weights(q, fmt), bp.pack_activations(xq, fmt)
    rowsum = xq.sum(1).astype(fmt.accumulator_dtype(k))
    want = bp.bitplane_matmul(wp, xp, fmt, 1)
    candidates = tuning.sample_candidates(func, SM90, 3, seed=int(rng.integers(1 << 20)))
    split_k = 0
    for i, sch in enumerate(candidates):
        cand = tuning.replay(func, sch.trace).with_attr("tirx.is_scheduled", True).with_attr("global_symbol", "cand")
        grid, block = launch_dims(cand, batch)
        split_k += block[0] > 32  # warps splitting K share threadIdx.x with the lanes
        kern = EmulatedKernel(cuda_source(build(cand, SM90)), warp_ops=False)
        out = np.full((batch, n), -7, np.int32)
        kern(grid, block, pb_acc_ptr=out, rowsum_ptr=rowsum, wp_ptr=wp, xp_ptr=xp, batch=batch, bitlayers=1)
        trace = sch.trace.as_json()  # every candidate can be written to the tuning log
        np.testing.assert_array_equal(out, want, err_msg=f"candidate {i}: {grid} x {block}\n{trace}")
    assert len(candidates) == 12 and split_k >= 2  # the K-split (cross-warp) reductions were sampled
