"""The fused PB LSTM step kernel: numpy reference, CPU results, CUDA code (one kernel), GPU results."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from pbtvm import bitplane as bp
from pbtvm import kernels, library
from pbtvm import quantize as qz
from pbtvm._tvm import tvm
from pbtvm.lstm import compile_lstm
from pbtvm.ops import unit_major_rows
from pbtvm.target import resolve_target

SM90 = {"kind": "cuda", "arch": "sm_90"}
#: Float tolerance of the fused kernel vs the float64 numpy reference (float32 gate arithmetic).
ATOL = 2e-5


def _case(rng: np.random.Generator, hidden: int, batch: int, fmt: bp.BitplaneFormat) -> tuple:
    w_hh = (rng.standard_normal((4 * hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
    q, w_scale = qz.quantize_weights(w_hh[unit_major_rows(hidden)], fmt)
    gx = rng.standard_normal((batch, 4 * hidden)).astype(np.float32)
    h = np.tanh(2 * rng.standard_normal((batch, hidden))).astype(np.float32)
    c = rng.standard_normal((batch, hidden)).astype(np.float32)
    return w_hh, bp.pack_weights(q, fmt), w_scale, gx, h, c


def _run(kern, device, gx, h, c, wp, w_scale, layers):
    batch, hidden = h.shape
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), device) for a in (gx, h, c, wp, w_scale)]
    outs = [tvm.runtime.tensor(np.full((batch, hidden), np.nan, np.float32), device) for _ in range(2)]
    kern(*args, layers, *outs)
    return outs[0].numpy(), outs[1].numpy()


def test_unit_major_rows_groups_the_four_gates_of_a_unit():
    order = unit_major_rows(3)
    assert order.tolist() == [0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11]
    assert sorted(order.tolist()) == list(range(12))


def test_reference_equals_the_unfused_step_in_pytorch_row_order(rng):
    """Unit-major packing changes no value: per-row quantization commutes with the permutation."""
    fmt = bp.BitplaneFormat(4, 8)
    w_hh, wp, w_scale, gx, h, c = _case(rng, 40, 3, fmt)
    q, s = qz.quantize_weights(w_hh, fmt)
    gates = gx + qz.pb_linear_reference(h, bp.pack_weights(q, fmt), s, None, fmt)
    i, f, g, o = np.split(gates.astype(np.float64), 4, axis=1)
    sig = torch.sigmoid
    c_ref = sig(torch.from_numpy(f)) * torch.from_numpy(c) + sig(torch.from_numpy(i)) * torch.tanh(torch.from_numpy(g))
    h_ref = sig(torch.from_numpy(o)) * torch.tanh(c_ref)
    h_new, c_new = qz.pb_lstm_cell_reference(gx, h, c, wp, w_scale, fmt)
    np.testing.assert_allclose(c_new, c_ref.numpy(), atol=1e-6)
    np.testing.assert_allclose(h_new, h_ref.numpy(), atol=1e-6)


@pytest.mark.parametrize(
    ("hidden", "bits", "act_bits", "layout", "codebook"),
    [
        (20, 4, 8, "kNW", None),
        (32, 1, 8, "kNW", None),
        (50, 3, 16, "NkW", None),
        (100, 8, 8, "kNW", None),
        (256, 16, 16, "kNW", None),
        (32, 1, 8, "kNW", "offset_binary"),
        (50, 2, 8, "NkW", "offset_binary"),
        (100, 8, 16, "kNW", "offset_binary"),
    ],
)
def test_fused_cell_matches_reference_on_cpu(hidden, bits, act_bits, layout, codebook, rng):
    fmt = bp.BitplaneFormat(bits, act_bits, codebook, layout=layout)
    _, wp, w_scale, gx, h, c = _case(rng, hidden, 3, fmt)
    kern = kernels.build(kernels.lstm_cell_func(fmt, hidden), resolve_target("llvm"))
    for layers in sorted({1, (bits + 1) // 2, bits}):
        got_h, got_c = _run(kern, tvm.cpu(0), gx, h, c, wp, w_scale, layers)
        ref_h, ref_c = qz.pb_lstm_cell_reference(gx, h, c, wp, w_scale, fmt, layers)
        np.testing.assert_allclose(got_h, ref_h, atol=ATOL, err_msg=f"h, L={layers}")
        np.testing.assert_allclose(got_c, ref_c, atol=ATOL, err_msg=f"c, L={layers}")


def test_fused_cell_rejects_mismatched_shapes():
    from pbtvm._tvm import te
    from pbtvm.ops import pb_lstm_cell

    fmt = bp.BitplaneFormat(4, 8)
    h = te.placeholder((2, 16), "float32", "h")
    with pytest.raises(ValueError, match="gx"):
        pb_lstm_cell(te.placeholder((2, 60), "float32", "gx"), h, h, None, None, None, fmt)


def _kernels_in(source: str) -> list[str]:
    return re.findall(r'extern "C" __global__ void (?:__launch_bounds__\([\d, ]+\) )?(\w+)\([^;]*?\{', source)


@pytest.mark.parametrize(("hidden", "bits"), [(20, 4), (25, 3), (650, 4), (1500, 2), (4096, 8)])
def test_fused_cell_is_one_cuda_kernel_and_builds_with_nvcc(hidden, bits):
    fmt = bp.BitplaneFormat(bits, 8)
    ex = kernels.build(kernels.lstm_cell_func(fmt, hidden), resolve_target(SM90))  # nvcc runs here
    (dev,) = ex.mod.imports
    src = str(dev.inspect_source("cuda")) or str(dev.inspect_source())
    assert len(_kernels_in(src)) == 1, _kernels_in(src)
    assert "__popc" in src and "__shfl" in src and "__shared__" in src


def test_lstm_step_is_one_kernel_per_layer_on_cuda():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(24, 64, num_layers=2).eval()
    m = compile_lstm(lstm, SM90, bits=4)
    for cell in m._cells:
        (src,) = library._cuda_sources(cell._module.mod)
        assert len(_kernels_in(src)) == 1
        assert cell.manifest["layers"]["converted"][0]["shape"] == [256, 64]


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("hidden", "bits", "act_bits"), [(20, 4, 8), (25, 3, 8), (650, 4, 8), (1500, 3, 16), (256, 1, 8), (4096, 4, 8)]
)
def test_fused_cell_matches_reference_on_gpu(hidden, bits, act_bits, rng):
    fmt = bp.BitplaneFormat(bits, act_bits)
    _, wp, w_scale, gx, h, c = _case(rng, hidden, 5, fmt)
    kern = kernels.build(kernels.lstm_cell_func(fmt, hidden), resolve_target("cuda"))
    for layers in sorted({1, bits}):
        got_h, got_c = _run(kern, tvm.cuda(0), gx, h, c, wp, w_scale, layers)
        ref_h, ref_c = qz.pb_lstm_cell_reference(gx, h, c, wp, w_scale, fmt, layers)
        np.testing.assert_allclose(got_h, ref_h, atol=ATOL, err_msg=f"h, L={layers}")
        np.testing.assert_allclose(got_c, ref_c, atol=ATOL, err_msg=f"c, L={layers}")


# --------------------------------------------------------------- the step with its input projection
def _input_case(rng: np.random.Generator, n_in: int, hidden: int, batch: int, fmt: bp.BitplaneFormat, bias: bool):
    rows = unit_major_rows(hidden)
    w_ih = (rng.standard_normal((4 * hidden, n_in)) / np.sqrt(n_in)).astype(np.float32)
    q, ws_ih = qz.quantize_weights(w_ih[rows], fmt)
    b = rng.standard_normal(4 * hidden).astype(np.float32)[rows] if bias else None
    x = rng.standard_normal((batch, n_in)).astype(np.float32)
    _, wp_hh, ws_hh, _, h, c = _case(rng, hidden, batch, fmt)
    return x, bp.pack_weights(q, fmt), ws_ih, b, h, c, wp_hh, ws_hh


def _run_input(kern, device, case, layers):
    x, wp_ih, ws_ih, b, h, c, wp_hh, ws_hh = case
    arrays = [x, wp_ih, ws_ih] + ([b] if b is not None else []) + [h, c, wp_hh, ws_hh]
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), device) for a in arrays]
    outs = [tvm.runtime.tensor(np.full(h.shape, np.nan, np.float32), device) for _ in range(2)]
    kern(*args, layers, *outs)
    return outs[0].numpy(), outs[1].numpy()


INPUT_CASES = [  # (input, hidden, bits, act_bits, layout, bias)
    (40, 64, 4, 8, "kNW", True),
    (40, 64, -2, 8, "kNW", True),  # negative bits: the offset-binary codebook (zero point per row)
    (20, 20, -1, 8, "NkW", False),
    (20, 20, 1, 8, "kNW", False),  # one word per row in both legs
    (300, 100, 8, 16, "NkW", True),
    (650, 650, 4, 8, "kNW", True),  # the PTB model's size: 16-byte weight loads on CUDA
]


@pytest.mark.parametrize(("n_in", "hidden", "bits", "act_bits", "layout", "bias"), INPUT_CASES)
def test_step_with_input_projection_matches_reference_on_cpu(n_in, hidden, bits, act_bits, layout, bias, rng):
    fmt = bp.BitplaneFormat(abs(bits), act_bits, "offset_binary" if bits < 0 else None, layout=layout)
    bits = fmt.bits
    case = _input_case(rng, n_in, hidden, 3, fmt, bias)
    kern = kernels.build(kernels.lstm_cell_input_func(fmt, n_in, hidden, bias), resolve_target("llvm"))
    for layers in sorted({1, bits}):
        got_h, got_c = _run_input(kern, tvm.cpu(0), case, layers)
        ref_h, ref_c = qz.pb_lstm_cell_input_reference(*case, fmt, layers)
        np.testing.assert_allclose(got_h, ref_h, atol=ATOL, err_msg=f"h, L={layers}")
        np.testing.assert_allclose(got_c, ref_c, atol=ATOL, err_msg=f"c, L={layers}")


def test_input_reference_equals_projection_then_step(rng):
    """The fused projection is the separate PB GEMM's result, in unit-major order."""
    fmt = bp.BitplaneFormat(3, 8)
    x, wp_ih, ws_ih, b, h, c, wp_hh, ws_hh = _input_case(rng, 30, 16, 2, fmt, True)
    gx_um = qz.pb_linear_reference(x, wp_ih, ws_ih, b, fmt)
    gx = np.empty_like(gx_um)
    gx[:, unit_major_rows(16)] = gx_um  # back to PyTorch row order
    want = qz.pb_lstm_cell_reference(gx, h, c, wp_hh, ws_hh, fmt)
    got = qz.pb_lstm_cell_input_reference(x, wp_ih, ws_ih, b, h, c, wp_hh, ws_hh, fmt)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize(
    ("n_in", "hidden", "bits"), [(20, 20, 1), (40, 64, 4), (650, 650, 4), (1500, 1500, 2), (650, 650, -2), (20, 20, -1)]
)
def test_step_with_input_projection_is_one_cuda_kernel(n_in, hidden, bits):
    fmt = bp.BitplaneFormat(abs(bits), 8, "offset_binary" if bits < 0 else None)  # bits < 0: offset binary
    ex = kernels.build(kernels.lstm_cell_input_func(fmt, n_in, hidden), resolve_target(SM90))  # nvcc runs here
    (dev,) = ex.mod.imports
    src = str(dev.inspect_source("cuda")) or str(dev.inspect_source())
    assert len(_kernels_in(src)) == 1, _kernels_in(src)
    assert "pb_xpack_x_shared" in src and "pb_xpack_shared" in src  # both inputs packed in shared memory


@pytest.mark.gpu
@pytest.mark.parametrize(("n_in", "hidden", "bits", "act_bits", "layout", "bias"), INPUT_CASES)
def test_step_with_input_projection_matches_reference_on_gpu(n_in, hidden, bits, act_bits, layout, bias, rng):
    fmt = bp.BitplaneFormat(abs(bits), act_bits, "offset_binary" if bits < 0 else None, layout=layout)
    bits = fmt.bits
    case = _input_case(rng, n_in, hidden, 5, fmt, bias)
    kern = kernels.build(kernels.lstm_cell_input_func(fmt, n_in, hidden, bias), resolve_target("cuda"))
    for layers in sorted({1, bits}):
        got_h, got_c = _run_input(kern, tvm.cuda(0), case, layers)
        ref_h, ref_c = qz.pb_lstm_cell_input_reference(*case, fmt, layers)
        np.testing.assert_allclose(got_h, ref_h, atol=ATOL, err_msg=f"h, L={layers}")
        np.testing.assert_allclose(got_c, ref_c, atol=ATOL, err_msg=f"c, L={layers}")
