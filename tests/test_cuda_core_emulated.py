"""The default CUDA-core kernels (``kNW`` / ``NkW`` layouts: ``__popc`` products), run by the CPU
emulator, equal the numpy reference: integer products exactly, float layers and LSTM steps within
``rtol = atol / max|ref| = 1e-5`` (float32 epilogues summed in another order than numpy's).

Without a GPU this is what checks their results; the BMMA kernels have test_bmma_emulated.py. The
activation pack on its own (``act_pack_func``: several kernels with TVM's workspace between them)
is not emulated; the one-kernel layer (``dense_act``) packs inside and is.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pbtvm import bitplane as bp
from pbtvm import kernels
from pbtvm import quantize as qz
from pbtvm.cuda import build, cuda_source
from pbtvm.schedules import apply_default_schedule
from pbtvm.target import resolve_target

from .cuda_emulator import EmulatedKernel, launch_dims
from .test_cpu_vnni_lstm import _state, _weights  # the LSTM tests' weights and states

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20) to emulate the kernel")
SM90 = resolve_target({"kind": "cuda", "arch": "sm_90"})
#: Float kernels against the reference: |got - ref| <= RTOL * max|ref| (+ RTOL * |ref|).
RTOL = 1e-5


def _emulated(func, batch: int) -> tuple[EmulatedKernel, tuple, tuple]:
    """The default sm_90 schedule of ``func`` as an emulated kernel, with its launch at ``batch``."""
    sched = apply_default_schedule(func, SM90).with_attr("global_symbol", "pb")
    grid, block = launch_dims(sched, batch)
    return EmulatedKernel(cuda_source(build(sched, SM90))), grid, block


def _close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * float(np.abs(want).max()), err_msg=what)


@pytest.mark.parametrize(
    ("bits", "codebook", "layout"),
    [(4, "twos_complement", "kNW"), (1, "bipolar", "kNW"), (3, "twos_complement", "NkW"), (2, "offset_binary", "kNW")],
)
def test_int_product_exact(bits, codebook, layout, rng):
    """Odd N, K not a multiple of 32, batch 3, every ``bitlayers``."""
    fmt, n, k, b = bp.BitplaneFormat(bits, 8, codebook, layout=layout), 37, 700, 3
    kern, grid, block = _emulated(kernels.int_product_func(fmt, n, k), b)
    wp, _ = _weights(rng, n, k, fmt)
    xq, _ = qz.quantize_activations(rng.standard_normal((b, k)).astype(np.float32), fmt)
    xp, rowsum = bp.pack_activations(xq, fmt), xq.sum(1).astype(fmt.accumulator_dtype(k))
    for layers in range(1, bits + 1):
        out = np.full((b, n), -7, np.int32)
        kern(grid, block, pb_acc_ptr=out, rowsum_ptr=rowsum, wp_ptr=wp, xp_ptr=xp, batch=b, bitlayers=layers)
        np.testing.assert_array_equal(out, bp.bitplane_matmul(wp, xp, fmt, layers), err_msg=f"bitlayers={layers}")


@pytest.mark.parametrize(("bits", "codebook", "bias"), [(4, "twos_complement", True), (2, "offset_binary", False)])
def test_dense_matches_reference(bits, codebook, bias, rng):
    """The GEMM after a separate pack: scales, offset correction and bias."""
    fmt, n, k, b = bp.BitplaneFormat(bits, 8, codebook), 37, 300, 3
    kern, grid, block = _emulated(kernels.dense_func(fmt, n, k, bias), b)
    wp, scale = _weights(rng, n, k, fmt)
    x = rng.standard_normal((b, k)).astype(np.float32)
    xq, xs = qz.quantize_activations(x, fmt)
    xp, rowsum = bp.pack_activations(xq, fmt), xq.sum(1).astype(fmt.accumulator_dtype(k))
    bias_v = rng.standard_normal(n).astype(np.float32) if bias else None
    extra = {"bias_ptr": bias_v} if bias else {}
    for layers in (1, bits):
        out = np.full((b, n), np.nan, np.float32)
        kern(grid, block, pb_out_ptr=out, rowsum_ptr=rowsum, w_scale_ptr=scale, wp_ptr=wp, x_scale_ptr=xs, xp_ptr=xp,
             batch=b, bitlayers=layers, **extra)  # fmt: skip
        _close(out, qz.pb_linear_reference(x, wp, scale, bias_v, fmt, layers), f"bitlayers={layers}")


@pytest.mark.parametrize(
    ("bits", "codebook", "n", "k", "b", "bias"),
    [
        (4, "twos_complement", 100, 650, 3, True),
        (1, "bipolar", 33, 20, 1, False),
        (3, "offset_binary", 40, 300, 2, True),
    ],
)
def test_dense_act_matches_reference(bits, codebook, n, k, b, bias, rng):
    """The one-kernel layer: quantize and pack (ballot) inside, then the products; the offset-binary
    zero point in its epilogue."""
    fmt = bp.BitplaneFormat(bits, 8, codebook)
    kern, grid, block = _emulated(kernels.dense_act_func(fmt, n, k, bias), b)
    wp, scale = _weights(rng, n, k, fmt)
    x = rng.standard_normal((b, k)).astype(np.float32)
    bias_v = rng.standard_normal(n).astype(np.float32) if bias else None
    extra = {"bias_ptr": bias_v} if bias else {}
    for layers in sorted({1, bits}):
        out = np.full((b, n), np.nan, np.float32)
        kern(grid, block, x_ptr=x, wp_ptr=wp, w_scale_ptr=scale, pb_out_ptr=out, batch=b, bitlayers=layers, **extra)
        _close(out, qz.pb_linear_reference(x, wp, scale, bias_v, fmt, layers), f"bitlayers={layers}")


def test_lstm_cell_matches_reference(rng):
    """The fused step: W_hh products, gates and the state update in one kernel (hidden 50, W3)."""
    fmt, hidden, b = bp.BitplaneFormat(3, 8), 50, 3
    kern, grid, block = _emulated(kernels.lstm_cell_func(fmt, hidden), b)
    wp, scale = _weights(rng, 4 * hidden, hidden, fmt)  # random rows serve as unit-major ones
    gx = rng.standard_normal((b, 4 * hidden)).astype(np.float32)
    h, c = _state(rng, b, hidden)
    for layers in (1, 3):
        h1, c1 = np.full((b, hidden), np.nan, np.float32), np.full((b, hidden), np.nan, np.float32)
        kern(grid, block, gx_ptr=gx, h_ptr=h, c_ptr=c, wp_ptr=wp, w_scale_ptr=scale, pb_lstm_cell_v0_ptr=h1,
             pb_lstm_cell_v1_ptr=c1, batch=b, bitlayers=layers)  # fmt: skip
        want_h, want_c = qz.pb_lstm_cell_reference(gx, h, c, wp, scale, fmt, layers)
        _close(h1, want_h, f"h, bitlayers={layers}")
        _close(c1, want_c, f"c, bitlayers={layers}")


def test_lstm_cell_with_input_projection_matches_reference(rng):
    """The decoding step: the input projection W_ih x + b inside the same kernel (input 30, W4)."""
    fmt, n_in, hidden, b = bp.BitplaneFormat(4, 8), 30, 50, 2
    kern, grid, block = _emulated(kernels.lstm_cell_input_func(fmt, n_in, hidden, True), b)
    wp_ih, ws_ih = _weights(rng, 4 * hidden, n_in, fmt)
    wp_hh, ws_hh = _weights(rng, 4 * hidden, hidden, fmt)
    bias = rng.standard_normal(4 * hidden).astype(np.float32)
    x = rng.standard_normal((b, n_in)).astype(np.float32)
    h, c = _state(rng, b, hidden)
    for layers in (1, 4):
        h1, c1 = np.full((b, hidden), np.nan, np.float32), np.full((b, hidden), np.nan, np.float32)
        kern(grid, block, x_ptr=x, wp_ih_ptr=wp_ih, ws_ih_ptr=ws_ih, bias_ptr=bias, h_ptr=h, c_ptr=c,
             wp_hh_ptr=wp_hh, ws_hh_ptr=ws_hh, pb_lstm_cell_v0_ptr=h1, pb_lstm_cell_v1_ptr=c1, batch=b,
             bitlayers=layers)  # fmt: skip
        want_h, want_c = qz.pb_lstm_cell_input_reference(x, wp_ih, ws_ih, bias, h, c, wp_hh, ws_hh, fmt, layers)
        _close(h1, want_h, f"h, bitlayers={layers}")
        _close(c1, want_c, f"c, bitlayers={layers}")


def test_a_kernel_that_never_finishes_fails_instead_of_hanging(monkeypatch):
    """A shuffle that only lane 0 reaches waits forever (on a GPU too): the emulator sees that no
    thread can go on and says where."""
    from . import cuda_emulator

    source = """
extern "C" __global__ void __launch_bounds__(32) stuck_kernel(int* __restrict__ out);
extern "C" __global__ void __launch_bounds__(32) stuck_kernel(int* __restrict__ out) {
  if (threadIdx.x == 0) { out[0] = __shfl_sync(0xFFFFFFFFu, 1, 1, 32); }
}
"""
    kern = EmulatedKernel(source)
    monkeypatch.setattr(cuda_emulator, "TIMEOUT_S", 30.0)
    with pytest.raises(RuntimeError, match=r"stuck_kernel \(2, 1, 1\) x \(32, 1, 1\) deadlocked in block \(0, 0, 0\)"):
        kern((2, 1, 1), (32, 1, 1), out=np.zeros(1, np.int32))


def test_a_kernel_that_runs_past_the_time_limit_fails(monkeypatch):
    """A loop that never reaches a barrier cannot be told from a long kernel: the limit ends it."""
    from . import cuda_emulator

    source = """
extern "C" __global__ void __launch_bounds__(32) spinning_kernel(int* __restrict__ out);
extern "C" __global__ void __launch_bounds__(32) spinning_kernel(int* __restrict__ out) {
  if (threadIdx.x == 0) { while (((volatile int*)out)[0] == 0) {} }
  out[1] = __ballot_sync(0xFFFFFFFFu, 1);
}
"""
    kern, out = EmulatedKernel(source), np.zeros(2, np.int32)
    monkeypatch.setattr(cuda_emulator, "TIMEOUT_S", 1.0)
    with pytest.raises(TimeoutError, match=r"spinning_kernel \(1, 1, 1\) x \(32, 1, 1\) did not finish in 1\.0 s"):
        kern((1, 1, 1), (32, 1, 1), out=out)
    out[0] = 1  # the abandoned launch ends instead of spinning on a core for the rest of the run


@pytest.mark.parametrize("synced", [False, True])
def test_code_that_assumes_a_warp_runs_in_lock_step_goes_wrong(synced):
    """A shared-memory tree reduction without barriers between its steps (correct only if the
    32 lanes ran in lock step, which CUDA does not promise since Volta) comes out wrong; with a
    barrier after each step it is exact in both scheduling orders."""
    sync = "__syncthreads();" if synced else ""
    source = f"""
extern "C" __global__ void __launch_bounds__(32) tree_kernel(int* __restrict__ out);
extern "C" __global__ void __launch_bounds__(32) tree_kernel(int* __restrict__ out) {{
  __shared__ int red[32];
  red[threadIdx.x] = (int)threadIdx.x + 1;
  {sync}
  for (int half = 16; half > 0; half /= 2) {{
    if ((int)threadIdx.x < half) {{ red[threadIdx.x] += red[threadIdx.x + half]; }}
    {sync}
  }}
  if (threadIdx.x == 0) {{ out[0] = red[0]; }}
}}
"""
    kern, sums = EmulatedKernel(source, warp_ops=False), []
    for _order in ("ascending", "descending"):  # consecutive launches alternate the order
        out = np.zeros(1, np.int32)
        kern((1, 1, 1), (32, 1, 1), out=out)
        sums.append(int(out[0]))
    # Unsynced, the ascending order reads each partial sum before its lane wrote it
    assert (sums == [528, 528]) == synced, sums


def test_threads_that_return_early_release_the_block_barrier():
    """On a GPU an exited thread no longer holds ``__syncthreads``: the others pass it."""
    source = """
extern "C" __global__ void __launch_bounds__(64) early_exit_kernel(int* __restrict__ out);
extern "C" __global__ void __launch_bounds__(64) early_exit_kernel(int* __restrict__ out) {
  __shared__ int vals[64];
  if (threadIdx.x >= 48) { return; }
  vals[threadIdx.x] = (int)threadIdx.x * 2;
  __syncthreads();
  out[threadIdx.x] = vals[47 - threadIdx.x];
}
"""
    kern = EmulatedKernel(source, warp_ops=False)
    for _order in ("ascending", "descending"):
        out = np.full(64, -1, np.int32)
        kern((1, 1, 1), (64, 1, 1), out=out)
        np.testing.assert_array_equal(out[:48], 2 * np.arange(47, -1, -1))
        assert (out[48:] == -1).all()
