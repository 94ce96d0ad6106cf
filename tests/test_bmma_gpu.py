"""Binary tensor cores (issue 13) on a CUDA device: the BMMA kernel equals the numpy reference.

Skipped without a GPU (not yet run: written in a session without one). The code-generation side
runs on every machine in ``tests/test_bmma_codegen.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pbtvm
from pbtvm import bitplane as bp
from pbtvm import kernels
from pbtvm import quantize as qz
from pbtvm._tvm import tvm
from pbtvm.schedules import cuda_bmma
from pbtvm.schedules.cuda_bmma_kernel import BMMAConfig, bmma_dense_kernel
from pbtvm.target import resolve_target

from .models import MLP

pytestmark = pytest.mark.gpu
MMA = "mma16x256"
BATCHES = (1, 3, 8, 64)
#: Odd N (a partial 16-row tile) and K not a multiple of 256 (a partial K tile, 22 words).
N_OUT, K_DIM = 257, 700


def _t(a: np.ndarray):
    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cuda(0))


def _int_kernel(fmt: bp.BitplaneFormat, cfg: BMMAConfig):
    func = bmma_dense_kernel(fmt, N_OUT, K_DIM, False, cfg, integer=True).with_attr("global_symbol", "main")
    return kernels.build(func, resolve_target("cuda"), schedule=False)


def _check_exact(kern, fmt: bp.BitplaneFormat, rng: np.random.Generator, batches=BATCHES) -> None:
    q, _ = qz.quantize_weights(rng.standard_normal((N_OUT, K_DIM)).astype(np.float32), fmt)
    wp = bp.pack_weights(q, fmt)
    acc_t = fmt.accumulator_dtype(K_DIM)
    for batch in batches:
        xq = rng.integers(-fmt.act_qmax, fmt.act_qmax + 1, (batch, K_DIM))  # full-scale codes
        xp = bp.pack_activations(xq, fmt)
        out = _t(np.full((batch, N_OUT), -7, acc_t))
        # Every bitlayers value; at batch 64 three of them (the numpy reference is the slow part).
        every = range(1, fmt.bits + 1) if batch <= 8 else sorted({1, (fmt.bits + 1) // 2, fmt.bits})
        for layers in every:
            kern(_t(xp), _t(xq.sum(1).astype(acc_t)), _t(wp), layers, out)
            ref = bp.bitplane_matmul(wp, xp, fmt, layers, n_rows=N_OUT)
            np.testing.assert_array_equal(out.numpy(), ref, err_msg=f"batch={batch} bitlayers={layers}")
        np.testing.assert_array_equal(out.numpy(), xq @ q.T)  # all planes: the exact integer product


@pytest.mark.parametrize("act_bits", [4, 8, 16])
@pytest.mark.parametrize("bits", [*range(1, 9), 16])
def test_bmma_int_product_exact_on_gpu(bits, act_bits, rng):
    fmt = bp.BitplaneFormat(bits, act_bits, layout=MMA)
    _check_exact(_int_kernel(fmt, cuda_bmma.default_config(fmt, N_OUT, K_DIM)), fmt, rng)


@pytest.mark.parametrize(
    "cfg",
    [BMMAConfig(1, 1, 1, 1, 2), BMMAConfig(2, 2, 2, 2, 2), BMMAConfig(4, 1, 2, 1, 4), BMMAConfig(1, 4, 1, 2, 4)],
)
@pytest.mark.parametrize(("bits", "act_bits"), [(1, 4), (4, 8), (16, 16)])
def test_bmma_configs_exact_on_gpu(bits, act_bits, cfg, rng):
    fmt = bp.BitplaneFormat(bits, act_bits, layout=MMA)
    _check_exact(_int_kernel(fmt, cfg), fmt, rng, batches=(3, 64))


def test_sampled_design_space_points_exact_on_gpu(rng):
    """Random points of the tunable template's design space compute the exact product too."""
    fmt = bp.BitplaneFormat(4, 8, layout=MMA)
    space = cuda_bmma.config_space(fmt, N_OUT, K_DIM, 8)
    for pick in rng.choice(len(space), 4, replace=False):
        _check_exact(_int_kernel(fmt, space[pick]), fmt, rng, batches=(8,))


@pytest.mark.parametrize("act_bits", [2, 8, 16])
def test_ballot_pack_exact_on_gpu(act_bits, rng):
    fmt = bp.BitplaneFormat(4, act_bits, layout=MMA)
    k, b = 1001, 7
    x = (rng.standard_normal((b, k)) * 5).astype(np.float32)
    x[3] = 0
    xq, xs = qz.quantize_activations(x, fmt)
    kern = kernels.build(kernels.act_pack_func(fmt, k), resolve_target("cuda"))
    xp = _t(np.full(fmt.act_shape(b, k), 0xDEADBEEF, np.uint32))
    scale, rowsum = _t(np.full(b, -1, np.float32)), _t(np.full(b, -1, fmt.accumulator_dtype(k)))
    kern(_t(x), xp, scale, rowsum)
    np.testing.assert_array_equal(xp.numpy(), bp.pack_activations(xq, fmt))
    np.testing.assert_array_equal(scale.numpy(), xs)
    np.testing.assert_array_equal(rowsum.numpy(), xq.sum(1))


@pytest.mark.parametrize(("bits", "batches"), [(1, (1, 2)), (4, (1, 8, 9, 32, 33, 64)), (8, (3, 40))])
def test_bmma_dense_layer_on_gpu(bits, batches, rng):
    """The default schedule of a ``pb_gemm`` in the mma layout (float epilogue, bias) vs the
    reference; any batch: a kernel per batch range (cuda_bmma.dispatch_configs), each range's bounds."""
    fmt = bp.BitplaneFormat(bits, 8, layout=MMA)
    w = rng.standard_normal((N_OUT, K_DIM)).astype(np.float32)
    bias = rng.standard_normal(N_OUT).astype(np.float32)
    q, ws = qz.quantize_weights(w, fmt)
    wp = bp.pack_weights(q, fmt)
    kern = kernels.build(kernels.dense_func(fmt, N_OUT, K_DIM), resolve_target("cuda"))
    for batch in batches:
        x = rng.standard_normal((batch, K_DIM)).astype(np.float32)
        _check_dense(kern, fmt, x, wp, ws, bias, bits)


def _check_dense(kern, fmt: bp.BitplaneFormat, x: np.ndarray, wp, ws, bias, bits: int) -> None:
    batch = x.shape[0]
    xq, xs = qz.quantize_activations(x, fmt)
    y = _t(np.full((batch, N_OUT), np.nan, np.float32))
    for layers in sorted({1, bits}):
        kern(
            _t(bp.pack_activations(xq, fmt)),
            _t(xs),
            _t(xq.sum(1).astype(np.int32)),
            _t(wp),
            _t(ws),
            _t(bias),
            layers,
            y,
        )
        ref = qz.pb_linear_reference(x, wp, ws, bias, fmt, layers)
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize(("bits", "batch"), [(1, 1), (4, 3), (8, 8)])
def test_fused_pack_kernel_on_gpu(bits, batch, rng):
    """One launch per layer (``pb_dense_act`` in the mma layout) vs the reference."""
    fmt = bp.BitplaneFormat(bits, 8, layout=MMA)
    w = rng.standard_normal((N_OUT, K_DIM)).astype(np.float32)
    x = rng.standard_normal((batch, K_DIM)).astype(np.float32)
    bias = rng.standard_normal(N_OUT).astype(np.float32)
    q, ws = qz.quantize_weights(w, fmt)
    wp = bp.pack_weights(q, fmt)
    kern = kernels.build(kernels.dense_act_func(fmt, N_OUT, K_DIM), resolve_target("cuda"))
    y = _t(np.full((batch, N_OUT), np.nan, np.float32))
    for layers in sorted({1, bits}):
        kern(_t(x), _t(wp), _t(ws), _t(bias), layers, y)
        ref = qz.pb_linear_reference(x, wp, ws, bias, fmt, layers)
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize(
    ("bits", "in_block_max", "batches"), [(4, 1, (1, 2, 8, 9, 32, 33, 64)), (8, 1, (1, 40)), (2, 16, (8, 16, 17, 40))]
)
def test_dense_act_dispatch_on_gpu(bits, in_block_max, batches, rng):
    """``pb_dense_act`` with a symbolic batch and ``ATTR_IN_BLOCK_MAX_BATCH`` (compile's dense layer):
    one launch up to that batch, the ballot pack into workspaces and the BMMA kernel of each range
    above (cuda_bmma.dispatch_configs), vs the reference at each range's bounds."""
    from pbtvm import names

    fmt = bp.BitplaneFormat(bits, 8, layout=MMA)
    q, ws = qz.quantize_weights(rng.standard_normal((N_OUT, K_DIM)).astype(np.float32), fmt)
    wp = bp.pack_weights(q, fmt)
    bias = rng.standard_normal(N_OUT).astype(np.float32)
    func = kernels.dense_act_func(fmt, N_OUT, K_DIM).with_attr(names.ATTR_IN_BLOCK_MAX_BATCH, in_block_max)
    kern = kernels.build(func, resolve_target("cuda"))
    for batch in batches:
        x = rng.standard_normal((batch, K_DIM)).astype(np.float32)
        y = _t(np.full((batch, N_OUT), np.nan, np.float32))
        for layers in sorted({1, bits}):
            kern(_t(x), _t(wp), _t(ws), _t(bias), layers, y)
            ref = qz.pb_linear_reference(x, wp, ws, bias, fmt, layers)
            np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=str(batch))


def test_compiled_mma_model_matches_cpu_on_gpu():
    torch.manual_seed(0)
    model = MLP((300, 257, 64, 10)).eval()
    ex = (torch.randn(2, 300),)
    gpu = pbtvm.compile(model, ex, target="cuda", bits=4, layout=MMA)
    cpu = pbtvm.compile(model, ex, target="llvm", bits=4)
    for batch in (1, 9, 40):  # one launch up to 16 at these K, pack + the ranges' kernels above (dispatch_configs)
        x = np.random.default_rng(batch).standard_normal((batch, 300)).astype(np.float32)
        for layers in (None, 2):
            np.testing.assert_allclose(gpu(x, bitlayers=layers), cpu(x, bitlayers=layers), rtol=1e-4, atol=1e-4)


class _Activations(torch.nn.Module):
    """A layer before each activation the CUDA build folds into it (FuseActivationIntoPB)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (
            torch.nn.Linear(a, b) for a, b in ((300, 257), (257, 130), (130, 64), (64, 10))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.a(x))
        h = torch.nn.functional.silu(self.b(h))
        return self.d(torch.relu(self.c(h)))


def test_activations_in_the_layers_match_cpu_on_gpu():
    """GELU, SiLU and ReLU in the BMMA kernels' epilogues (sm_80+) give the CPU build's outputs,
    where TVM runs them as ops of their own; a NaN row stays NaN."""
    torch.manual_seed(0)
    model = _Activations().eval()
    ex = (torch.randn(2, 300),)
    gpu = pbtvm.compile(model, ex, target="cuda", bits=4, layout=MMA)
    cpu = pbtvm.compile(model, ex, target="llvm", bits=4)
    from pbtvm import library

    (source,) = library._cuda_sources(gpu._module.mod)
    assert all(f"_{act}_kernel" in source for act in ("gelu", "silu", "relu"))
    for batch in (1, 5, 33):
        x = np.random.default_rng(batch).standard_normal((batch, 300)).astype(np.float32)
        x[-1, 7] = np.nan
        for layers in (None, 2):
            got, want = gpu(x, bitlayers=layers), cpu(x, bitlayers=layers)
            assert np.isnan(got[-1]).all() and np.isnan(want[-1]).all()
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_compiled_static_batch_one_model_matches_cpu_on_gpu():
    """``dynamic_batch=False`` at batch 1: the one-launch layers (``schedules.cuda_bmma.one_launch_layer``)."""
    torch.manual_seed(0)
    model = MLP((300, 257, 64, 10)).eval()
    ex = (torch.randn(1, 300),)
    gpu = pbtvm.compile(model, ex, target="cuda", bits=4, layout=MMA, dynamic_batch=False)
    cpu = pbtvm.compile(model, ex, target="llvm", bits=4, dynamic_batch=False)
    x = np.random.default_rng(4).standard_normal((1, 300)).astype(np.float32)
    for layers in (None, 2):
        np.testing.assert_allclose(gpu(x, bitlayers=layers), cpu(x, bitlayers=layers), rtol=1e-4, atol=1e-4)


class _MixedBlock(torch.nn.Module):
    """PB layers with TVM's kernels between them: GELU, relu, a residual add, a layer norm."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512)
        self.norm, self.out = torch.nn.LayerNorm(512), torch.nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.down(torch.nn.functional.gelu(self.up(x)))) + x
        return self.out(self.norm(h))


def _dense_stack() -> torch.nn.Module:
    widths = (512, 640, 512, 1024, 1024, 600, 10)
    return torch.nn.Sequential(*(torch.nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)))


@pytest.mark.parametrize("make", [_dense_stack, _MixedBlock], ids=["dense", "mixed"])
def test_programmatic_launch_chain_matches_plain_launch_on_gpu(monkeypatch, make):
    """Programmatic dependent launch (sm_90+, ``compile``'s default there): each PB kernel starts
    while the one before it runs, prefetches its weights and waits before it reads the previous
    layer's output; TVM's kernels between them wait first (``cuda_pdl.wait_first``). Dense layers
    back to back, and with GELU / relu / add / layer norm between them; one launch at K <= 650 up
    to batch 16, pack + kernel above; called many times in a row: the same bits as the model
    built without it (``PBTVM_CUDA_PDL=0``); a read before the wait would show as a mismatch."""
    from pbtvm import names

    if not pbtvm.target.programmatic_launch(pbtvm.target.local_cuda_arch()):
        pytest.skip("the GPU has no programmatic dependent launch (sm_90+)")
    torch.manual_seed(0)
    model = make().eval()
    ex = (torch.randn(2, 512),)
    early = pbtvm.compile(model, ex, target="cuda", bits=4, layout=MMA)
    monkeypatch.setenv(names.ENV_CUDA_PDL, "0")
    plain = pbtvm.compile(model, ex, target="cuda", bits=4, layout=MMA)
    for batch in (1, 9, 40):
        xs = [np.random.default_rng(batch * 100 + i).standard_normal((batch, 512)).astype(np.float32) for i in range(3)]
        want = [plain(x) for x in xs]
        for i in range(60):
            np.testing.assert_array_equal(early(xs[i % 3]), want[i % 3], err_msg=f"batch {batch}, call {i}")
        # Device tensors, calls back to back with no copy or sync between them: a call's first
        # kernel launches while the call before's last one runs (the overlap a CUDA graph has too).
        on_device = [torch.from_numpy(x).cuda() for x in xs]
        torch.cuda.synchronize()
        outs = [early(on_device[i % 3]) for i in range(60)]
        torch.cuda.synchronize()
        for i, out in enumerate(outs):
            np.testing.assert_array_equal(out.cpu().numpy(), want[i % 3], err_msg=f"batch {batch}, device call {i}")
