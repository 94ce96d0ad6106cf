"""On a CUDA device: PB kernels equal the reference exactly; compiled models run and reload."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pbtvm
from pbtvm import bitplane as bp
from pbtvm import kernels
from pbtvm import quantize as qz
from pbtvm._tvm import tvm
from pbtvm.target import resolve_target

from .models import MLP

pytestmark = pytest.mark.gpu


def _t(a: np.ndarray):
    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cuda(0))


@pytest.mark.parametrize("layout", ["kNW", "NkW"])
@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("bits", [*range(1, 9), 16])
def test_int_product_exact_on_gpu(bits, act_bits, layout, rng):
    fmt = bp.BitplaneFormat(bits, act_bits, layout=layout)
    n, k, b = 257, 1000 + int(rng.integers(0, 31)), 5
    q, _ = qz.quantize_weights(rng.standard_normal((n, k)).astype(np.float32), fmt)
    xq, _ = qz.quantize_activations(rng.standard_normal((b, k)).astype(np.float32), fmt)
    wp, xp = bp.pack_weights(q, fmt), bp.pack_activations(xq, fmt)
    kern = kernels.build(kernels.int_product_func(fmt, n, k), resolve_target("cuda"))
    out = _t(np.full((b, n), -7, fmt.accumulator_dtype(k)))
    for layers in range(1, bits + 1):
        kern(_t(xp), _t(xq.sum(1).astype(fmt.accumulator_dtype(k))), _t(wp), layers, out)
        np.testing.assert_array_equal(out.numpy(), bp.bitplane_matmul(wp, xp, fmt, layers), err_msg=f"L={layers}")


@pytest.mark.parametrize("act_bits", [2, 8, 16])
def test_act_pack_exact_on_gpu(act_bits, rng):
    fmt = bp.BitplaneFormat(4, act_bits)
    k, b = 1001, 7
    x = (rng.standard_normal((b, k)) * 5).astype(np.float32)
    xq, xs = qz.quantize_activations(x, fmt)
    kern = kernels.build(kernels.act_pack_func(fmt, k), resolve_target("cuda"))
    xp = _t(np.full((act_bits, b, fmt.words(k)), 0xDEADBEEF, np.uint32))
    scale, rowsum = _t(np.full(b, -1, np.float32)), _t(np.full(b, -1, fmt.accumulator_dtype(k)))
    kern(_t(x), xp, scale, rowsum)
    np.testing.assert_array_equal(xp.numpy(), bp.pack_activations(xq, fmt))
    np.testing.assert_array_equal(scale.numpy(), xs)
    np.testing.assert_array_equal(rowsum.numpy(), xq.sum(1))


@pytest.mark.parametrize(
    ("n", "k", "bits", "batch"), [(33, 20, 1, 1), (100, 650, 4, 3), (10000, 650, 4, 1), (512, 4096, 8, 2)]
)
def test_dense_with_pack_in_one_kernel_on_gpu(n, k, bits, batch, rng):
    fmt = bp.BitplaneFormat(bits, 8)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    q, ws = qz.quantize_weights(w, fmt)
    wp = bp.pack_weights(q, fmt)
    kern = kernels.build(kernels.dense_act_func(fmt, n, k), resolve_target("cuda"))
    y = _t(np.full((batch, n), np.nan, np.float32))
    for layers in sorted({1, bits}):
        kern(_t(x), _t(wp), _t(ws), _t(bias), layers, y)
        ref = qz.pb_linear_reference(x, wp, ws, bias, fmt, layers)
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_model_on_gpu_matches_cpu_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = MLP((256, 512, 128, 10)).eval()
    ex = (torch.randn(2, 256),)
    gpu = pbtvm.compile(model, ex, target="cuda", bits=4)
    cpu = pbtvm.compile(model, ex, target="llvm", bits=4)
    x = np.random.default_rng(3).standard_normal((9, 256)).astype(np.float32)
    for layers in (4, 2):
        np.testing.assert_allclose(gpu(x, bitlayers=layers), cpu(x, bitlayers=layers), rtol=1e-4, atol=1e-4)
    if torch.cuda.is_available():
        y = gpu(torch.from_numpy(x).cuda())
        assert y.is_cuda and y.shape == (9, 10)
    path = str(tmp_path / "mlp.so")
    gpu.export(path)
    again = pbtvm.load(path)
    np.testing.assert_array_equal(again(x), gpu(x))


def test_the_candidate_ptxas_broke_is_exact_on_gpu():
    """The W1 candidate that returned -rowsum on an H100 (ptxas dropped its guarded weight load;
    tests/test_cuda_template_emulated.py) and its siblings agree with the default schedule."""
    from pbtvm.schedules import tuning, verify

    from .cuda_sources import h100_candidates

    target = resolve_target("cuda")
    func, candidates = h100_candidates(target)
    verdicts = [verify.agrees_with_default(func, tuning.replay(func, c.trace), target) for c in candidates]
    assert verdicts == [True] * len(candidates), verdicts


@pytest.mark.parametrize(("bits", "k"), [(4, 4096), (3, 1000), (1, 2048)])
def test_sampled_tunable_schedules_exact_on_gpu(bits, k, rng):
    """Every design space of the CUDA template, with random knobs, computes the exact product."""
    from pbtvm.cuda import build
    from pbtvm.schedules import tuning

    target = resolve_target("cuda")
    fmt = bp.BitplaneFormat(bits, 8)
    n, b = 96, 3
    func = kernels.int_product_func(fmt, n, k)
    q, _ = qz.quantize_weights(rng.standard_normal((n, k)).astype(np.float32), fmt)
    xq, _ = qz.quantize_activations(rng.standard_normal((b, k)).astype(np.float32), fmt)
    wp, xp = bp.pack_weights(q, fmt), bp.pack_activations(xq, fmt)
    rowsum = xq.sum(1).astype(fmt.accumulator_dtype(k))
    for sch in tuning.sample_candidates(func, target, 3, seed=int(rng.integers(1 << 20))):
        kern = build(tuning.replay(func, sch.trace).with_attr("tirx.is_scheduled", True), target)
        out = _t(np.full((b, n), -7, fmt.accumulator_dtype(k)))
        for layers in (1, bits):
            kern(_t(xp), _t(rowsum), _t(wp), layers, out)
            np.testing.assert_array_equal(out.numpy(), bp.bitplane_matmul(wp, xp, fmt, layers), err_msg=str(sch.trace))
