"""One kernel per dense layer on AVX-512 and AVX2 CPUs: quantize + GEMM fused, equal to pack + GEMM bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pbtvm
from pbtvm import bitplane as bp
from pbtvm import kernels
from pbtvm import quantize as qz
from pbtvm._tvm import tvm
from pbtvm.names import KernelKind, kernel_kind
from pbtvm.ops.pb_vnni import MAX_ACCUMULATORS_PER_ISA, SERIAL_WEIGHT_BITS, cpu_isa, target_supports
from pbtvm.schedules import rule_for
from pbtvm.schedules.cpu_vnni import CPUVnniDenseAct, single_row_tile_for, vnni_kernel_for
from pbtvm.target import resolve_target

from .activations import extreme_rows, near_tie_rows
from .test_cpu_vnni import NO_GFNI

CPU = resolve_target("llvm")
needs_vnni = pytest.mark.skipif(not target_supports(CPU), reason="host CPU lacks AVX-512 BW/VNNI")
#: The byte-code kernels: AVX-512 VNNI, else AVX2 (``vpmaddubsw``).
needs_byte_kernel = pytest.mark.skipif(cpu_isa(CPU) is None, reason="host CPU lacks AVX2 and AVX-512 VNNI")


def _t(a: np.ndarray):
    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())


def assert_same_floats(fast, slow, x: np.ndarray, weights: list, n_out: int, layers_to_check) -> None:
    """Two dense-layer kernels ``(x, *weights, bitlayers, y [B, n_out])`` give the same floats bit for bit."""
    shape = (x.shape[0], n_out)
    for layers in layers_to_check:
        got, want = _t(np.full(shape, 7, np.float32)), _t(np.zeros(shape, np.float32))
        fast(_t(x), *weights, layers, got)
        slow(_t(x), *weights, layers, want)
        np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=f"bitlayers={layers}")


def _rows(rng, b: int, k: int) -> np.ndarray:
    """Float rows with rounding ties (x * qmax / amax = m + 0.5), zeros, NaN and +-inf rows."""
    x = (rng.standard_normal((b, k)) * 3).astype(np.float32)
    x[0, : min(k, 6)] = [127.0, -0.5, 0.5, 1.5, 0.0, -126.5][: min(k, 6)]  # amax 127: codes tie at .5
    if b > 2:
        x[1, k // 2] = np.nan
        x[2, 0] = -np.inf
    if b > 3:
        x[3] = 0.0
    return x


@needs_byte_kernel
@pytest.mark.parametrize(
    ("bits", "act_bits", "codebook", "n", "k", "b", "bias"),
    [
        (4, 8, None, 37, 100, 5, True),  # K tail within a 64-chunk, batch tile + rest
        (1, 8, None, 16, 64, 1, False),  # bipolar, batch 1 nest
        (2, 4, None, 65, 33, 2, True),
        (3, 8, "offset_binary", 24, 200, 4, True),  # zero points
        (8, 8, None, 10, 784, 3, True),
        (4, 8, "offset_binary", 96, 1024, 1, False),  # full chunks only
        (8, 8, None, 1100, 1024, 2, False),  # above SERIAL_WEIGHT_BITS: parallel tiles
        (3, 8, None, 40, 700, 7, True),  # batch > tile: each row decoded once (hosts without GFNI)
    ],
)
def test_fused_layer_equals_pack_then_gemm(bits, act_bits, codebook, n, k, b, bias, rng):
    fmt = bp.BitplaneFormat(bits, act_bits, codebook)
    q, s = qz.quantize_weights(rng.standard_normal((n, k)).astype(np.float32), fmt)
    weights = [_t(bp.pack_weights(q, fmt)), _t(s)] + ([_t(rng.standard_normal(n).astype(np.float32))] if bias else [])
    x = _rows(rng, b, k)
    func = kernels.dense_act_func(fmt, n, k, bias)
    assert isinstance(rule_for(func, CPU), CPUVnniDenseAct)
    fused = kernels.build(func, CPU)
    pack, dense = (
        kernels.build(kernels.act_pack_func(fmt, k), CPU),
        kernels.build(kernels.dense_func(fmt, n, k, bias), CPU),
    )
    xp = _t(np.zeros((act_bits, b, fmt.words(k)), np.uint32))
    xs, rs = _t(np.zeros(b, np.float32)), _t(np.zeros(b, fmt.accumulator_dtype(k)))
    pack(_t(x), xp, xs, rs)
    for layers in range(1, bits + 1):
        got, want = _t(np.full((b, n), 7, np.float32)), _t(np.zeros((b, n), np.float32))
        fused(_t(x), *weights, layers, got)
        dense(xp, xs, rs, *weights, layers, want)
        np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=f"bitlayers={layers}")
    if b > 2:  # non-finite rows propagate as in torch
        assert np.isnan(got.numpy()[1]).all() and not np.isfinite(got.numpy()[2]).any()


@needs_byte_kernel
@pytest.mark.parametrize("isa", ["host", "avx2"])
@pytest.mark.parametrize(
    ("bits", "act_bits", "n", "k", "b"), [(4, 8, 37, 700, 1), (3, 4, 20, 300, 5), (8, 8, 9, 96, 3)]
)
def test_fused_layer_rounds_as_the_reference_near_halves(isa, bits, act_bits, n, k, b, rng, monkeypatch):
    """The fused kernel's codes are the reference's where products lie a few ulps from a half (a
    fused multiply-add rounded them otherwise): its floats equal the GEMM fed the reference's codes."""
    target = CPU if isa == "host" else tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    if isa == "avx2" and not target_supports(CPU, ("avx2",)):
        pytest.skip("host CPU lacks AVX2")
    fmt = bp.BitplaneFormat(bits, act_bits)
    q, s = qz.quantize_weights(rng.standard_normal((n, k)).astype(np.float32), fmt)
    weights = [_t(bp.pack_weights(q, fmt)), _t(s), _t(rng.standard_normal(n).astype(np.float32))]
    x = np.concatenate([near_tie_rows(rng, b, k, fmt), extreme_rows(rng, k)])  # and extreme ranges
    b = x.shape[0]
    func = kernels.dense_act_func(fmt, n, k, True)
    assert isinstance(rule_for(func, target), CPUVnniDenseAct)
    fused = kernels.build(func, target)
    monkeypatch.setenv("PBTVM_CPU_KERNEL", "popcount")
    gemm = kernels.build(kernels.dense_func(fmt, n, k, True), CPU)
    xq, xs = qz.quantize_activations(x, fmt)
    codes = [_t(bp.pack_activations(xq, fmt)), _t(xs), _t(xq.sum(1).astype(fmt.accumulator_dtype(k)))]
    for layers in sorted({1, bits}):
        got, want = _t(np.full((b, n), 7, np.float32)), _t(np.zeros((b, n), np.float32))
        fused(_t(x), *weights, layers, got)
        gemm(*codes, *weights, layers, want)
        np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=f"bitlayers={layers}")


@needs_byte_kernel
@pytest.mark.parametrize("single", [2, 5, 16])
def test_batch_one_nest_any_row_tile(single, rng):
    """The batch-1 loop nest (its own row tile) equals the general nest; N not a multiple of the tile."""
    if single > MAX_ACCUMULATORS_PER_ISA[cpu_isa(CPU)]:
        pytest.skip(f"{single} rows side by side need more registers than {cpu_isa(CPU)} has")
    fmt = bp.BitplaneFormat(4, 8)
    n, k = 45, 300
    q, s = qz.quantize_weights(rng.standard_normal((n, k)).astype(np.float32), fmt)
    weights = [_t(bp.pack_weights(q, fmt)), _t(s), _t(np.ones(n, np.float32))]
    func = kernels.dense_act_func(fmt, n, k, True)
    one = kernels.build(vnni_kernel_for(func, single_row_tile=single), CPU, schedule=False)
    x = _rows(rng, 3, k)
    full = _t(np.zeros((3, n), np.float32))
    one(_t(x), *weights, 4, full)
    for row in range(3):
        got = _t(np.zeros((1, n), np.float32))
        one(_t(x[row : row + 1]), *weights, 4, got)
        np.testing.assert_array_equal(got.numpy()[0], full.numpy()[row])


def test_single_row_tile_by_blocks():
    fmt = bp.BitplaneFormat(4, 8)
    assert single_row_tile_for(fmt, 10, 480) == 16  # under one block: many rows side by side
    assert single_row_tile_for(fmt, 4096, 4096) is None  # whole blocks: rows one by one at any batch
    assert 512 * 784 * 4 < SERIAL_WEIGHT_BITS < 2048 * 2048 * 4  # MNIST-sized layers serially, 2048² W4 in parallel


@needs_byte_kernel
def test_compile_emits_one_kernel_per_layer(monkeypatch):
    """On an AVX-512 or AVX2 CPU every dense layer is one pb_dense_act call; PBTVM_CPU_KERNEL=popcount keeps pack + GEMM."""
    from pbtvm import compiler

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10)).eval()
    x = torch.randn(3, 64)
    fmt = bp.BitplaneFormat(4, 8)
    mod, *_ = compiler._rewrite(model, (x,), fmt, CPU, True)
    kinds = sorted(str(kernel_kind(f)) for _, f in mod.functions_items() if kernel_kind(f) is not None)
    assert kinds == [KernelKind.DENSE_ACT] * 2
    monkeypatch.setenv("PBTVM_CPU_KERNEL", "popcount")
    mod, *_ = compiler._rewrite(model, (x,), fmt, CPU, True)
    kinds = sorted(str(kernel_kind(f)) for _, f in mod.functions_items() if kernel_kind(f) is not None)
    assert kinds == sorted([KernelKind.ACT_PACK] * 2 + [KernelKind.GEMM] * 2)
    two_kernels = pbtvm.compile(model, (x,), target="llvm", bits=4)
    monkeypatch.delenv("PBTVM_CPU_KERNEL")
    one_kernel = pbtvm.compile(model, (x,), target="llvm", bits=4)
    for rows in (x[:1], x):  # the batch-1 nest and the general one
        torch.testing.assert_close(one_kernel(rows), two_kernels(rows), rtol=0, atol=0)


@needs_vnni
@pytest.mark.parametrize(
    ("bits", "codebook", "n", "k", "b", "gfni"),
    [
        (4, None, 37, 650, 1, True),  # the LM head's rows: one block + chunks, 9 groups of 4 + 1 row
        (1, None, 33, 600, 1, True),  # bipolar through the vector epilogue
        (2, "offset_binary", 29, 512, 5, True),  # one block exactly; batch 5: a tile of 4, then one row
        (3, None, 30, 900, 1, False),  # the masked-add decode (CPUs without GFNI), rows sharing its slots
        (4, None, 64, 700, 1, True),  # N a multiple of 4: no row left over
    ],
)
def test_rows_side_by_side_equal_the_popcount_kernel(bits, codebook, n, k, b, gfni, rng, monkeypatch):
    """Batch-1 rows of one block run four at a time with one vector epilogue: the same floats."""
    fmt = bp.BitplaneFormat(bits, 8, codebook)
    q, s = qz.quantize_weights(rng.standard_normal((n, k)).astype(np.float32), fmt)
    weights = [_t(bp.pack_weights(q, fmt)), _t(s), _t(rng.standard_normal(n).astype(np.float32))]
    x = _rows(rng, b, k)
    func = kernels.dense_act_func(fmt, n, k, True)
    target = CPU if gfni else NO_GFNI
    fast = kernels.build(vnni_kernel_for(func, target=target), CPU, schedule=False)
    monkeypatch.setenv("PBTVM_CPU_KERNEL", "popcount")
    slow = kernels.build(func, CPU)
    assert_same_floats(fast, slow, x, weights, n, range(1, bits + 1))
