"""The tunable CUDA-core GEMM template's sampled candidates, run by the CPU emulator, are exact.

A design space must not contain wrong programs. Before 2026-11-30 the template bound the warps
that split K to ``threadIdx.z`` with the rows' ``threadIdx.y`` between them and the lanes; TVM
then lowered a row's reduction to a shared-memory tree whose last steps assume the warp runs in
lock step (no ``__syncwarp``), which CUDA does not promise since Volta: in every run here some
of these twelve candidates were wrong (the lanes of a warp ran as separate CPU threads). They now
share ``threadIdx.x`` with the lanes (warp shuffles).

The candidate an H100 got wrong (W1, K = 2048: ``-rowsum`` for every row) was exact here: ptxas
dropped its weight load. The plane loop ran to the run-time ``bitlayers`` and read plane ``i`` of a
``bits``-plane buffer, so the weights' register copy was loaded under ``if (i < bits)``; in the
PTX the loop's last iteration (peeled by the unroll) loads it again, and ptxas, taking the copy
from the main loop for granted, dropped that load: with ``bitlayers = 1`` the main loop never
ran and the popcounts read whatever the registers held. The PB product now reads plane
``min(i, bits - 1)`` (``i < bitlayers <= bits``, so the same plane), which makes the load
unconditional; the last two tests check the source and that candidate's SASS.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pbtvm import bitplane as bp
from pbtvm import kernels
from pbtvm import quantize as qz
from pbtvm.cuda import build, cuda_source
from pbtvm.sass import source_sass
from pbtvm.schedules import tuning
from pbtvm.target import resolve_target

from .cuda_emulator import EmulatedKernel, launch_dims
from .cuda_sources import candidate_source, default_source, h100_candidates

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20) to emulate the kernel")
SM90 = resolve_target({"kind": "cuda", "arch": "sm_90"})
#: Seed of the sampled knobs: it draws K-split candidates at W1 (4 of 12) and W4 (2 of 4).
SAMPLE_SEED = 0


@pytest.mark.parametrize(("bits", "n", "per_space"), [(1, 48, 3), (4, 16, 1)])
def test_sampled_cuda_core_candidates_exact_in_emulation(bits, n, per_space, rng):
    """Samples of every design space at K = 2048 (the K of the candidate an H100 got wrong), every
    ``bitlayers``: W1, 3 a space, and W4, 1 a space (several planes: the plane each iteration reads)."""
    fmt, k, batch = bp.BitplaneFormat(bits, 8), 2048, 2
    func = kernels.int_product_func(fmt, n, k)
    q, _ = qz.quantize_weights(rng.standard_normal((n, k)).astype(np.float32), fmt)
    xq, _ = qz.quantize_activations(rng.standard_normal((batch, k)).astype(np.float32), fmt)
    wp, xp = bp.pack_weights(q, fmt), bp.pack_activations(xq, fmt)
    rowsum = xq.sum(1).astype(fmt.accumulator_dtype(k))
    # A fixed draw of knobs (the data still come from ``rng``): some seeds draw no K-split candidate
    candidates = tuning.sample_candidates(func, SM90, per_space, seed=SAMPLE_SEED)
    split_k = 0
    for i, sch in enumerate(candidates):
        cand = tuning.replay(func, sch.trace).with_attr("tirx.is_scheduled", True).with_attr("global_symbol", "cand")
        grid, block = launch_dims(cand, batch)
        split_k += block[0] > 32  # warps splitting K share threadIdx.x with the lanes
        kern = EmulatedKernel(cuda_source(build(cand, SM90)), warp_ops=False)
        trace = sch.trace.as_json()  # every candidate can be written to the tuning log
        for layers in range(1, bits + 1):
            out = np.full((batch, n), -7, np.int32)
            kern(grid, block, pb_acc_ptr=out, rowsum_ptr=rowsum, wp_ptr=wp, xp_ptr=xp, batch=batch, bitlayers=layers)
            want = bp.bitplane_matmul(wp, xp, fmt, layers)
            np.testing.assert_array_equal(
                out, want, err_msg=f"candidate {i}, {layers} planes: {grid} x {block}\n{trace}"
            )
    assert len(candidates) == 4 * per_space and split_k >= 2  # the K-split (cross-warp) reductions were sampled


def _sampled_sources(fmt: bp.BitplaneFormat, n: int, k: int, seed: int) -> list[str]:
    """One sample of each design space."""
    func = kernels.int_product_func(fmt, n, k)
    return [candidate_source(func, sch, SM90) for sch in tuning.sample_candidates(func, SM90, 1, seed=seed)]


def test_weights_are_never_loaded_under_a_plane_guard():
    """No kernel loads its weights' register copy inside an ``if``: such a load is what ptxas
    dropped (module docstring). Default schedules of the dense layer and the LSTM step, and sampled
    candidates, in ``kNW`` and ``NkW``, W1 to W4."""
    sources = []
    for fmt, n, k in ((bp.BitplaneFormat(4, 8), 256, 4096), (bp.BitplaneFormat(3, 8, layout="NkW"), 64, 1000)):
        sources.append(default_source(kernels.dense_func(fmt, n, k), SM90))
    sources.append(default_source(kernels.lstm_cell_func(bp.BitplaneFormat(2, 8), 64), SM90))
    sources += _sampled_sources(bp.BitplaneFormat(1, 8), 96, 2048, seed=7)
    sources += _sampled_sources(bp.BitplaneFormat(4, 8), 96, 4096, seed=8)
    loads = 0
    for source in sources:
        blocks = []  # the kind of each open block: "if" or "other"
        for line in (line.strip() for line in source.splitlines()):
            if line.startswith("}"):
                blocks.pop()
            if line.startswith(("wp_local", "*(uint2*)(wp_local", "*(uint4*)(wp_local")):
                loads += 1
                assert "if" not in blocks, f"a weight load inside an if block: {line}"
            if line.endswith("{"):
                blocks.append("if" if line.startswith(("if (", "} else")) else "other")
    assert loads >= 4  # the default dense kernel and the vector-load candidates keep a register copy


def test_the_h100_candidate_loads_its_weights_on_every_path():
    """The candidate an H100 got wrong (``tests/test_gpu.py``, (1, 2048)): its SASS now loads the
    weights with an unpredicated 8-byte load; before, the only such load was predicated on the
    first iteration of the unrolled main loop, which ``bitlayers = 1`` skips."""
    func, candidates = h100_candidates(SM90)
    source = candidate_source(func, candidates[0], SM90)
    assert "xp_shared" in source and "uint2" in source  # the candidate: activations in shared, 2-word loads
    (sass,) = source_sass(source, "sm_90").values()
    loads = [line.split(";")[0].split("*/")[-1].strip() for line in sass.splitlines() if "LDG.E.64" in line]
    assert loads and any(not load.startswith("@") for load in loads), loads
