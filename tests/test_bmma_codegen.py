"""Binary tensor cores (issue 13), CPU side: the mma16x256 layout, the TE reference, the BMMA
kernel's sm_90 SASS (BMMA present, no spills), its MetaSchedule template and ``compile``.

The GPU exactness checks of the same kernels are in ``tests/test_bmma_gpu.py``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import tvm_ffi

import pbtvm
from pbtvm import bitplane as bp
from pbtvm import kernels, library, names
from pbtvm import quantize as qz
from pbtvm._tvm import relax, s_tir, tir, tvm
from pbtvm.compiler import _rewrite
from pbtvm.cuda import build, cuda_source, without_restrict_where_waiting
from pbtvm.errors import InputError
from pbtvm.relay_passes import ApplyPBSchedules
from pbtvm.sass import (
    BMMA_OPCODE,
    bmma_problem,
    loads_before_wait,
    ptxas_usage,
    reads_before_wait,
    sass_by_kernel,
    source_sass,
)
from pbtvm.schedules import apply_default_schedule, cuda_bmma, cuda_pdl, tuning
from pbtvm.schedules.cuda_bmma_kernel import BMMAConfig, BMMALeg, bmma_dense_kernel, config_problem, registers
from pbtvm.target import TargetInfo, resolve_target, weight_layout

from .cuda_emulator import dispatched_launch, dispatched_launches
from .models import MLP

SM90 = resolve_target({"kind": "cuda", "arch": "sm_90"})
SM90_LIMITS = TargetInfo.of(SM90).limits  # the kernels programmatic dependent launch (cuda_pdl)
MMA = "mma16x256"


def _codes(fmt: bp.BitplaneFormat, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    if fmt.codebook == "bipolar":
        return rng.choice([-1, 1], (n, k))
    half = 2 ** (fmt.bits - 1)
    return rng.integers(-half, half, (n, k))


# ------------------------------------------------------------------ layout (numpy reference)
@pytest.mark.parametrize("bits", [1, 2, 4, 16])
@pytest.mark.parametrize(("n", "k"), [(1, 1), (16, 256), (33, 300), (7, 700)])
def test_mma_layout_round_trip_and_index(bits, n, k, rng):
    fmt, flat = bp.BitplaneFormat(bits, 8, layout=MMA), bp.BitplaneFormat(bits, 8)
    q = _codes(fmt, n, k, rng)
    wp, planes = bp.pack_weights(q, fmt), bp.pack_weights(q, flat)
    assert wp.shape == fmt.weight_shape(n, k) == (bits, -(-n // 16), -(-fmt.words(k) // 8), 32, 4)
    np.testing.assert_array_equal(bp.unpack_weights(wp, k, fmt, n_rows=n), q)
    p, r, w = np.meshgrid(np.arange(bits), np.arange(n), np.arange(fmt.words(k)), indexing="ij")
    np.testing.assert_array_equal(wp[fmt.weight_index(p, r, w)], planes)  # every word where the index says
    assert wp.sum(dtype=np.uint64) == planes.sum(dtype=np.uint64)  # padding is zero


def test_mma_layout_is_the_a_fragment_order():
    """Lane l, register r of a tile holds row l//4 + 8(r%2), word l%4 + 4(r//2) (PTX m16n8k256 .b1)."""
    fmt = bp.BitplaneFormat(2, 8, layout=MMA)
    for lane in range(32):
        for reg in range(4):
            row, word = lane // 4 + 8 * (reg % 2), lane % 4 + 4 * (reg // 2)
            assert fmt.weight_index(1, 16 + row, 8 + word) == (1, 1, 1, lane, reg)


@pytest.mark.parametrize("act_bits", [2, 3, 4, 7, 8, 9, 16])
@pytest.mark.parametrize(("b", "k"), [(1, 1), (3, 256), (2, 700)])
def test_mma_activation_order_round_trip_index_and_padding(act_bits, b, k, rng):
    """The activations' B-fragment order: every word where act_index says, padding planes (past
    act_bits, up to the column stride) and words (past ceil(K/32), up to the K tile) zero."""
    fmt, flat = bp.BitplaneFormat(4, act_bits, layout=MMA), bp.BitplaneFormat(4, act_bits)
    xq = rng.integers(-fmt.act_qmax - 1, fmt.act_qmax + 1, (b, k))
    xp, planes = bp.pack_activations(xq, fmt), bp.pack_activations(xq, flat)
    stride = bp.act_column_stride(act_bits)
    assert xp.shape == fmt.act_shape(b, k) == (b, -(-fmt.words(k) // 8), stride, 8)
    assert fmt.act_batch_axis == 0 and flat.act_shape(b, k) == planes.shape and flat.act_batch_axis == 1
    p, r, w = np.meshgrid(np.arange(act_bits), np.arange(b), np.arange(fmt.words(k)), indexing="ij")
    np.testing.assert_array_equal(xp[fmt.act_index(p, r, w)], planes)
    assert xp.sum(dtype=np.uint64) == planes.sum(dtype=np.uint64)  # padding is zero
    np.testing.assert_array_equal(bp.act_planes(xp, fmt)[:, :, : fmt.words(k)], planes)
    np.testing.assert_array_equal(bp.plane_rowsum(xp, fmt), xq.sum(1))


def test_mma_activation_order_is_the_b_fragment_order():
    """Lane l, register r of a B fragment holds word l%4 + 4r of column l//4 (PTX m16n8k256 .b1),
    column c = plane c % stride of batch row c // stride: lane l's two words are adjacent (one
    8-byte load a lane), a row's columns of a K tile contiguous, and with stride >= 8 an 8-column
    tile's 64 words too, lane l's at 2l and 2l + 1."""
    for act_bits in (2, 4, 8, 16):
        fmt = bp.BitplaneFormat(2, act_bits, layout=MMA)
        stride, batch, kt = bp.act_column_stride(act_bits), 4, 1
        offset = np.arange(np.prod(fmt.act_shape(batch, 512))).reshape(fmt.act_shape(batch, 512))
        for tile in range(batch * stride // 8):
            first = tile * 8  # the tile's first column
            tile_start = offset[fmt.act_index(first % stride, first // stride, 8 * kt)]
            for lane in range(32):
                col = tile * 8 + lane // 4
                row_start = offset[fmt.act_index(0, col // stride, 8 * kt)]
                for reg in range(2):
                    at = offset[fmt.act_index(col % stride, col // stride, 8 * kt + lane % 4 + 4 * reg)]
                    assert at == row_start + 8 * (col % stride) + 2 * (lane % 4) + reg, (act_bits, tile, lane)
                    assert stride < 8 or at == tile_start + 2 * lane + reg, (act_bits, tile, lane)


def test_mma_activations_of_the_wrong_shape_are_refused():
    fmt = bp.BitplaneFormat(4, 8, layout=MMA)
    xq = np.ones((2, 300), np.int64)
    wp = bp.pack_weights(np.ones((5, 300), np.int64), fmt)
    with pytest.raises(InputError, match=r"\[B, k_tiles, 8, 8\]"):
        bp.bitplane_matmul(wp, bp.pack_activations(xq, bp.BitplaneFormat(4, 8)), fmt, n_rows=5)
    with pytest.raises(InputError, match=r"\[8, B, W\]"):
        bp.plane_rowsum(bp.pack_activations(xq, fmt), bp.BitplaneFormat(4, 8))


@pytest.mark.parametrize("act_bits", [3, 8, 16])
def test_te_activation_pack_on_mma_order_matches_numpy_on_cpu(act_bits, rng):
    """The TE pack (the CPU build of what the CUDA ballot pack replaces) writes the B-fragment
    order, zero padding included."""
    fmt, k, b = bp.BitplaneFormat(4, act_bits, layout=MMA), 700, 3
    x = rng.standard_normal((b, k)).astype(np.float32)
    run = tvm.compile(kernels.act_pack_func(fmt, k), target="llvm")["main"]
    xp = tvm.runtime.tensor(np.full(fmt.act_shape(b, k), 0xDEADBEEF, np.uint32))
    scale = tvm.runtime.tensor(np.zeros(b, np.float32))
    rowsum = tvm.runtime.tensor(np.zeros(b, fmt.accumulator_dtype(k)))
    run(tvm.runtime.tensor(x), xp, scale, rowsum)
    xq, xs = qz.quantize_activations(x, fmt)
    np.testing.assert_array_equal(xp.numpy(), bp.pack_activations(xq, fmt))
    np.testing.assert_array_equal(scale.numpy(), xs)


@pytest.mark.parametrize("bits", [1, 3, 8])
@pytest.mark.parametrize("act_bits", [4, 8, 16])
def test_bitplane_matmul_on_mma_layout_is_exact(bits, act_bits, rng):
    fmt, flat = bp.BitplaneFormat(bits, act_bits, layout=MMA), bp.BitplaneFormat(bits, act_bits)
    n, k, b = 37, 555, 3
    q = _codes(fmt, n, k, rng)
    xq = rng.integers(-fmt.act_qmax, fmt.act_qmax + 1, (b, k))
    xp = bp.pack_activations(xq, fmt)
    wp = bp.pack_weights(q, fmt)
    np.testing.assert_array_equal(bp.bitplane_matmul(wp, xp, fmt, n_rows=n), xq @ q.T)
    for layers in range(1, bits + 1):
        np.testing.assert_array_equal(
            bp.bitplane_matmul(wp, xp, fmt, layers, n_rows=n),
            bp.bitplane_matmul(bp.pack_weights(q, flat), bp.pack_activations(xq, flat), flat, layers),
        )


def test_mma_layout_needs_n_rows():
    fmt = bp.BitplaneFormat(4, 8, layout=MMA)
    wp = bp.pack_weights(np.zeros((5, 40), np.int64), fmt)
    with pytest.raises(ValueError, match="n_rows"):
        bp.unpack_weights(wp, 40, fmt)
    with pytest.raises(ValueError, match="cannot hold 17 rows"):
        bp.unpack_weights(wp, 40, fmt, n_rows=17)


def test_te_reference_on_mma_layout_matches_numpy_on_cpu(rng):
    """The compute MetaSchedule tunes (built unscheduled for the CPU) equals the float reference."""
    fmt = bp.BitplaneFormat(4, 8, layout=MMA)
    n, k, b = 21, 300, 3
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((b, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    q, ws = qz.quantize_weights(w, fmt)
    wp = bp.pack_weights(q, fmt)
    xq, xs = qz.quantize_activations(x, fmt)
    xp = bp.pack_activations(xq, fmt)
    run = tvm.compile(kernels.dense_func(fmt, n, k), target="llvm")["main"]
    dev = tvm.cpu()
    y = tvm.runtime.tensor(np.zeros((b, n), np.float32), dev)
    args = [xp, xs, xq.sum(1).astype(np.int32), wp, ws, bias]
    for layers in (1, 2, 4):
        run(*(tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in args), layers, y)
        ref = qz.pb_linear_reference(x, wp, ws, bias, fmt, layers)
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# ------------------------------------------------------------------ SASS of the kernel
def _sass(func) -> dict[str, str]:
    ex = build(func.with_attr("tirx.is_scheduled", True), SM90)
    return source_sass(cuda_source(ex), "sm_90")


def _assert_bmma_no_spills(kernels_sass: dict[str, str], expect: int = 1) -> None:
    assert len(kernels_sass) == expect, list(kernels_sass)
    for name, sass in kernels_sass.items():
        problem = bmma_problem(sass)
        assert problem is None, f"{name}: {problem}"


def test_bmma_check_fails_on_a_kernel_without_tensor_cores():
    """The SASS check is not vacuous: the popcount kernel (kNW layout) has no BMMA and fails it."""
    func = apply_default_schedule(kernels.dense_func(bp.BitplaneFormat(4, 8), 64, 512), SM90)
    sass = _sass(func)
    assert "POPC" in next(iter(sass.values()))
    with pytest.raises(AssertionError, match=f"no {BMMA_OPCODE}"):
        _assert_bmma_no_spills(sass)


@pytest.mark.parametrize(
    ("bits", "act_bits", "n", "k", "bias"),
    [
        (1, 8, 33, 20, True),
        (2, 4, 100, 650, False),
        (4, 8, 4096, 4096, True),
        (8, 16, 257, 1000, True),
        (16, 16, 64, 700, False),
    ],
)
def test_default_bmma_kernel_sass_has_bmma_and_no_spills(bits, act_bits, n, k, bias):
    """Every kernel of the default (a symbolic batch: one per batch range) has BMMA, no spills."""
    fmt = bp.BitplaneFormat(bits, act_bits, layout=MMA)
    func = apply_default_schedule(kernels.dense_func(fmt, n, k, bias=bias), SM90)
    _assert_bmma_no_spills(_sass(func), expect=len(cuda_bmma.dispatch_configs(fmt, n, k)))


@pytest.mark.parametrize(("bits", "act_bits"), [(4, 8), (8, 8), (2, 16)])
def test_symbolic_batch_dispatches_a_config_per_batch_range(bits, act_bits):
    """A layer compiled for any batch (``dense_func``, symbolic B) gets a kernel per batch range
    (cuda_bmma.dispatch_configs), each with BMMA and no spills; the host launches the range's
    config: at each range's bounds the grid and block are that config's."""
    fmt, n, k = bp.BitplaneFormat(bits, act_bits, layout=MMA), 2600, 650
    func = apply_default_schedule(kernels.dense_func(fmt, n, k), SM90)
    dispatch = cuda_bmma.dispatch_configs(fmt, n, k)
    assert len(dispatch) == (4 if bits <= cuda_bmma.BATCH_KNOBS_MAX_BITS else 2)
    assert dispatch[0] == (1, cuda_bmma.default_config(fmt, n, k, 1), False)
    _assert_bmma_no_spills(_sass(func), expect=len(dispatch))
    lowest = 1
    for index, (most, cfg, _) in enumerate(dispatch):
        for batch in sorted({lowest, most or 2 * lowest}):
            leg = BMMALeg(fmt, n, k, cfg)
            grid = (leg.grid_x, int(leg.grid_y(tir.const(batch, "int64"))), 1)
            assert dispatched_launch(func, batch) == (index, grid, (32, cfg.warps_m, cfg.k_split)), (batch, cfg)
        lowest = (most or 0) + 1


@pytest.mark.parametrize(
    ("bits", "act_bits", "n", "k"),
    [
        (8, 16, 2600, 650),
        (16, 16, 2600, 650),
        (4, 16, 2600, 650),
        (16, 16, 130, 300),
        (12, 16, 130, 650),
        (16, 12, 70, 260),
    ],
)
def test_one_launch_defaults_past_one_batch_row_do_not_spill(bits, act_bits, n, k):
    """The one-launch kernel's default at batch 16 and K <= 650 (``compile`` runs it there since the
    one-launch bound, ``cuda_bmma.one_launch_max_batch``): BMMA and no spills; with 4 column tiles
    and int64 accumulators these spilled 2 to 66 LDL/STL before ``FUSED_REGISTER_BUDGET``."""
    fmt = bp.BitplaneFormat(bits, act_bits, layout=MMA)
    cfg = cuda_bmma.default_config(fmt, n, k, 16, fused_pack=True)
    assert registers(fmt, k, cfg) <= cuda_bmma.FUSED_REGISTER_BUDGET
    _assert_bmma_no_spills(_sass(cuda_bmma.kernel_for(kernels.dense_act_func(fmt, n, k), cfg)))


def test_a_static_batch_keeps_one_kernel():
    """A static batch builds one kernel, its batch's default config: the dispatch is for a symbolic batch."""
    fmt = bp.BitplaneFormat(4, 8, layout=MMA)
    func = apply_default_schedule(kernels.dense_func(fmt, 2600, 650, batch=16), SM90)
    _assert_bmma_no_spills(_sass(func), expect=1)
    cfg = cuda_bmma.default_config(fmt, 2600, 650, 16)
    assert dispatched_launch(func, 16)[2] == (32, cfg.warps_m, cfg.k_split)


@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (4096, 11008), (2600, 650)])
def test_fused_pack_kernel_is_one_kernel_with_bmma_and_ballots(n, k):
    fmt = bp.BitplaneFormat(4, 8, layout=MMA)
    sass = _sass(apply_default_schedule(kernels.dense_act_func(fmt, n, k), SM90).with_attr("global_symbol", "k"))
    _assert_bmma_no_spills(sass)
    assert "VOTE.ANY" in next(iter(sass.values()))


@pytest.mark.parametrize(
    "cfg",
    [
        BMMAConfig(1, 1, 1, 1, 1),
        BMMAConfig(2, 2, 2, 2, 2),
        BMMAConfig(4, 1, 4, 1, 1),
        BMMAConfig(1, 4, 1, 4, 4),
        BMMAConfig(2, 1, 8, 2, 2),
    ],
)
def test_configs_build_to_bmma_without_spills(cfg):
    fmt = bp.BitplaneFormat(4, 8, layout=MMA)
    assert config_problem(fmt, 2048, cfg) is None
    _assert_bmma_no_spills(_sass(bmma_dense_kernel(fmt, 1000, 2048, True, cfg).with_attr("global_symbol", "k")))


@pytest.mark.parametrize(
    ("bits", "n", "k", "batch", "cfg", "fused"),
    [
        # The one-launch W2 kernel at bench_bmma's batch-8 configs: with __launch_bounds__(512)
        # alone ptxas kept 40 registers and spilled 8 bytes; the kernel now asks for 64 (512, 2).
        (2, 4096, 11008, 8, BMMAConfig(1, 2, 8, 2, 2), True),
        (2, 6000, 1500, 8, BMMAConfig(1, 2, 4, 1, 2), True),
        # A heavy W16 two-launch config (int64 accumulators, 64 threads): ptxas's own choice (130
        # registers) does not spill, where holding it to 168 did (56 bytes, see light_config).
        (16, 4096, 4096, None, BMMAConfig(2, 1, 2, 2, 4), False),
    ],
)
def test_register_bound_configs_do_not_spill(bits, n, k, batch, cfg, fused):
    fmt = bp.BitplaneFormat(bits, 8, layout=MMA)
    if batch is not None:  # the config the benchmark (and an untuned batch-8 layer) uses
        assert cuda_bmma.default_config(fmt, n, k, batch, fused_pack=fused) == cfg
    func = kernels.dense_act_func(fmt, n, k) if fused else kernels.dense_func(fmt, n, k)
    _assert_bmma_no_spills(_sass(cuda_bmma.kernel_for(func, cfg).with_attr("global_symbol", "k")))


@pytest.mark.parametrize(
    ("fused", "cfg", "bound"),
    [
        (True, BMMAConfig(1, 2, 8, 2, 2), "(512, 2)"),  # light: 64 registers a lane declared
        (True, BMMAConfig(1, 2, 2, 1, 4), "(128)"),  # heavier (4 column tiles): ptxas's choice
        (False, BMMAConfig(1, 2, 8, 2, 2), "(512)"),  # the two-launch kernel: ptxas's choice
    ],
)
def test_only_light_one_launch_configs_declare_their_registers(fused, cfg, bound):
    fmt = bp.BitplaneFormat(2, 8, layout=MMA)
    func = kernels.dense_act_func(fmt, 4096, 4096) if fused else kernels.dense_func(fmt, 4096, 4096)
    kernel = cuda_bmma.kernel_for(func, cfg).with_attr("global_symbol", "k").with_attr("tirx.is_scheduled", True)
    source = cuda_source(build(kernel, SM90))
    assert f"__launch_bounds__{bound} k_kernel(" in source


def test_integer_kernel_and_ptxas_usage():
    fmt = bp.BitplaneFormat(16, 16, layout=MMA)
    func = bmma_dense_kernel(fmt, 257, 1000, False, cuda_bmma.default_config(fmt, 257, 1000), integer=True)
    assert [p.name for p in func.params] == ["xp", "rowsum", "wp", "bitlayers", "y"]
    ex = build(func.with_attr("global_symbol", "pb_int").with_attr("tirx.is_scheduled", True), SM90)
    (usage,) = ptxas_usage(cuda_source(ex), "sm_90").values()
    assert usage["spill_stores"] == usage["spill_loads"] == 0 and 0 < usage["registers"] <= 255
    assert usage["smem_bytes"] > 0  # the epilogue's shared accumulator tiles


def test_bad_configs_are_refused():
    fmt = bp.BitplaneFormat(4, 16, layout=MMA)  # 16 columns per batch row: tiles_n must be even
    with pytest.raises(ValueError, match="splits a batch row"):
        bmma_dense_kernel(fmt, 64, 256, True, BMMAConfig(tiles_n=1))
    with pytest.raises(ValueError, match="reads the mma16x256 weight layout"):
        bmma_dense_kernel(bp.BitplaneFormat(4, 8), 64, 256, True, BMMAConfig())


# ------------------------------------------------------------------ the MetaSchedule template
def test_config_space_is_valid_and_encoded_losslessly():
    fmt = bp.BitplaneFormat(4, 16, layout=MMA)
    for batch in (1, 8, 64, None):
        space = cuda_bmma.config_space(fmt, 4096, 4096, batch)
        assert len(space) > 20
        for cfg in space:
            assert config_problem(fmt, 4096, cfg) is None
            assert cuda_bmma.decode(cuda_bmma.encode(cfg)) == cfg
    assert max(c.tiles_n for c in cuda_bmma.config_space(fmt, 4096, 4096, 1)) == 2  # one batch row: 16 columns


def test_two_sampled_candidates_build_to_bmma(rng):
    """Two candidates of the tunable template: sampled, replayed onto the symbolic kernel (the
    sampled config serves the tuning batch's range of the dispatch), built."""
    fmt = bp.BitplaneFormat(4, 8, layout=MMA)
    func = kernels.dense_func(fmt, 100, 700)
    (space,) = tuning.tune_context(func, SM90, batch=8, seed=0).generate_design_space()
    inst, _ = next((i, d) for i, d in space.trace.decisions.items() if i.kind.name == "SampleCategorical")
    choices = [int(c) for c in inst.attrs[0]]
    picks = rng.choice(len(choices), 2, replace=False)
    for pick in picks:
        trace = space.trace.with_decision(inst, int(pick), remove_postproc=True)
        kernel = tuning.replay(func, trace)
        assert cuda_bmma.CONFIG_ANNOTATION not in kernel.script()  # materialized
        sampled = cuda_bmma.decode(choices[pick])
        assert dispatched_launch(kernel, 8)[2] == (32, sampled.warps_m, sampled.k_split)
        dispatch = cuda_bmma.dispatch_configs(fmt, 100, 700, tuned=(8, sampled))
        _assert_bmma_no_spills(_sass(kernel.with_attr("global_symbol", "k")), expect=len(dispatch))


@pytest.mark.slow
def test_tuning_builder_materializes_candidates(tmp_path):
    """The tuning builder (worker processes) builds a sampled BMMA candidate with nvcc, and its
    artifact carries the kernel as a fatbin (TVM keeps CUDA source on a host without a driver:
    the runner's host would compile that with its own NVRTC and options)."""
    from tvm.support import cc
    from tvm.support.tar import untar

    from pbtvm._tvm import meta_schedule

    ms = meta_schedule()
    fmt = bp.BitplaneFormat(2, 8, layout=MMA)
    (space,) = tuning.tune_context(kernels.dense_func(fmt, 64, 512), SM90, batch=1, seed=1).generate_design_space()
    builder = tuning.default_builder(SM90)
    try:
        (res,) = builder.build([ms.builder.BuilderInput(space.mod, SM90)])
        assert res.error_msg is None, res.error_msg
        untar(res.artifact_path, str(tmp_path))
        cc.create_shared(str(tmp_path / "candidate.so"), sorted(str(p) for p in tmp_path.iterdir()))
    finally:
        builder.close()
    (cuda,) = [m for m in library.device_modules(str(tmp_path / "candidate.so")) if m["kind"] == "cuda"]
    assert cuda["format"] == "fatbin"
    (image,) = library.cuda_binaries(str(tmp_path / "candidate.so"))
    assert all(BMMA_OPCODE in code for code in sass_by_kernel(image).values())


# ------------------------------------------------------------------ compile
#: The MLP's layers (N, K) in the compile tests below.
LAYERS = ((130, 300), (64, 130), (10, 64))


def _grid_control_order(sass: str) -> list[str]:
    """The kernel's launch_dependents (PREEXIT), L2 prefetches (UBLKPF.L2) and griddepcontrol.wait
    (ACQBULK), in SASS order."""
    return re.findall(r"\b(PREEXIT|UBLKPF\.L2|ACQBULK)\b", sass)


def _products_and_packs(sass: dict[str, str], prefix: str) -> tuple[dict[str, str], dict[str, str]]:
    """The kernels named ``prefix...`` split into PB products (BMMA) and ballot packs (the rest)."""
    mine = {k: v for k, v in sass.items() if k.startswith(prefix)}
    products = {k: v for k, v in mine.items() if BMMA_OPCODE in v}
    return products, {k: v for k, v in mine.items() if k not in products}


def test_compile_for_sm90_exports_bmma_kernels_by_default(tmp_path):
    """A symbolic batch (the default): every layer of the MLP (each reads an input no other layer
    reads) is one ``pb_dense_act`` function that dispatches by batch: up to its one-launch batch
    (``cuda_bmma.one_launch_max_batch``: 16 at these K <= 650) kernels that pack in the block,
    above it a ballot pack and a BMMA kernel per range (``cuda_bmma.dispatch_configs``). Every
    product kernel BMMA and no spills."""
    torch.manual_seed(0)
    model = MLP((300, 130, 64, 10)).eval()
    m = pbtvm.compile(model, (torch.randn(2, 300),), target=SM90, bits=4)  # layout="auto"
    assert m.manifest["format"]["layout"] == MMA
    m.export(str(tmp_path / "m.so"))
    (binary,) = library.cuda_binaries(str(tmp_path / "m.so"))
    sass = sass_by_kernel(binary)
    products, packs = _products_and_packs(sass, "pb_dense_act")
    fmt = bp.BitplaneFormat(4, 8, layout=MMA)
    dispatches = [cuda_bmma.dispatch_configs(fmt, n, k, in_block_max=16) for n, k in LAYERS]
    assert all(cuda_bmma.one_launch_max_batch(k) == 16 for _, k in LAYERS)
    _assert_bmma_no_spills(products, expect=sum(len(d) for d in dispatches))
    # each function one ballot pack, for all its ranges past the block
    assert all(not d[-1][2] for d in dispatches) and len(packs) == len(LAYERS)
    for name, body in packs.items():
        assert body.count("VOTE.ANY") >= 8, name  # a ballot per plane
    assert not any(k.startswith("pb_act_pack") for k in sass)
    assert not any(BMMA_OPCODE in v for k, v in sass.items() if not k.startswith("pb_dense"))
    # The ReLUs are in the first two layers' epilogues (FuseActivationIntoPB): no kernel of TVM's
    assert set(sass) == set(products) | set(packs)
    relu = {k.split("_kernel")[0] for k in sass if "_relu_kernel" in k}
    assert relu == {
        "pb_dense_act_w4a8o_mma16x256_n130_k300_bias_relu",
        "pb_dense_act_w4a8o_mma16x256_n64_k130_bias_relu",
    }
    # Programmatic dependent launch (sm_90): every PB kernel (its weights are constants) starts
    # while the kernel before it runs; before it waits it names only its weights (their L2
    # prefetch), after the wait it lets the next kernel launch (one kernel runs ahead at most).
    tags = library.cuda_launch_tags(str(tmp_path / "m.so"))
    assert {k for k, v in tags.items() if names.LAUNCH_PROGRAMMATIC in v} == set(sass)
    (src,) = library._cuda_sources(m._module.mod)
    reads = reads_before_wait(src)
    assert all(reads[k] == {"wp_ptr"} for k in products) and all(reads[k] == set() for k in packs)
    for name, body in sass.items():
        order = _grid_control_order(body)
        want = ["UBLKPF.L2", "ACQBULK", "PREEXIT"] if name in products else ["ACQBULK", "PREEXIT"]
        assert order == want, (name, order)
        # nor did ptxas move a load above the wait (it did, with TVM's __restrict__: ld.global.nc),
        # and no load is non-coherent (ld.global.nc: read-only for the kernel's lifetime, which
        # overlaps the kernel before it): compiled without __restrict__
        assert loads_before_wait(body) == [] and "LDG.E.CONSTANT" not in body, name


class _SharedInput(torch.nn.Module):
    """Two layers reading the same input: one activation pack for both."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(300, 130), torch.nn.Linear(300, 130)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) * self.b(x)


class _Residual(torch.nn.Module):
    """A layer whose input an add reads too."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(300, 300)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x)
        return self.a(h) + h


def test_compile_shares_the_pack_of_an_input_two_layers_read(tmp_path):
    """Two layers on one input with a symbolic batch: one ballot pack kernel (one launch, not the
    three of the CUDA-core path) and the two-launch BMMA kernel per batch range; and
    tuned past its one-launch batches (``tune_batch``) a layer reading its input alone is pack +
    kernel too: the function tuned is the one that runs at that batch."""
    torch.manual_seed(0)
    m = pbtvm.compile(_SharedInput().eval(), (torch.randn(2, 300),), target=SM90, bits=4)
    m.export(str(tmp_path / "m.so"))
    (binary,) = library.cuda_binaries(str(tmp_path / "m.so"))
    sass = sass_by_kernel(binary)
    fmt = bp.BitplaneFormat(4, 8, layout=MMA)
    products, _ = _products_and_packs(sass, "pb_dense")
    # the two layers call one function (same shape and format; the weights are its arguments)
    _assert_bmma_no_spills(products, expect=len(cuda_bmma.dispatch_configs(fmt, 130, 300)))
    assert not any(k.startswith("pb_dense_act") for k in sass)
    packs = {k: v for k, v in sass.items() if k.startswith("pb_act_pack")}
    assert sorted(packs) == ["pb_act_pack_a8_k300_kernel"]
    assert packs["pb_act_pack_a8_k300_kernel"].count("VOTE.ANY") >= 8
    with SM90:
        assert cuda_bmma.one_launch_layer(fmt, 130, 300, None)
        assert cuda_bmma.one_launch_layer(fmt, 130, 300, None, tune_batch=16)
        assert not cuda_bmma.one_launch_layer(fmt, 130, 300, None, tune_batch=17)

    def kinds(model: torch.nn.Module, tune_batch: int = 1) -> set:
        mod, *_ = _rewrite(model, (torch.randn(2, 300),), fmt, SM90, True, tune_batch=tune_batch)
        found = {names.kernel_kind(f) for _, f in mod.functions_items() if isinstance(f, tir.PrimFunc)}
        return found & {names.KernelKind.DENSE_ACT, names.KernelKind.GEMM}

    mlp = MLP((300, 130, 64, 10)).eval()
    assert kinds(mlp) == {names.KernelKind.DENSE_ACT}
    assert kinds(mlp, tune_batch=17) == {names.KernelKind.GEMM}
    assert kinds(_SharedInput().eval()) == {names.KernelKind.GEMM}
    assert kinds(_Residual().eval()) == {names.KernelKind.DENSE_ACT}  # an add reading the input shares no pack
    # compile passes its tune_batch to the rewrite where a log is looked up (the CLI refuses it without one)
    m = pbtvm.compile(mlp, (torch.randn(2, 300),), target=SM90, bits=4, work_dir=tmp_path, tune_batch=17)
    assert any(
        k.startswith("pb_act_pack") for k in sass_by_kernel(library.cuda_binaries(m.export(str(tmp_path / "t.so")))[0])
    )


def test_compile_at_a_static_batch_of_one_builds_one_launch_layers(tmp_path):
    """``dynamic_batch=False`` at batch 1: every dense layer one kernel that packs its own input in
    the block (``pb_dense_act``, BMMA, no spills), no pack kernels; the rule's bounds
    (``ONE_LAUNCH_MAX_WEIGHTS``, a static batch of 1 or a symbolic one tuned at 1, the mma layout)."""
    torch.manual_seed(0)
    model = MLP((300, 130, 64, 10)).eval()
    m = pbtvm.compile(model, (torch.randn(1, 300),), target=SM90, bits=4, dynamic_batch=False)
    m.export(str(tmp_path / "m.so"))
    (binary,) = library.cuda_binaries(str(tmp_path / "m.so"))
    sass = sass_by_kernel(binary)
    assert not any(k.startswith("pb_act_pack") for k in sass)
    one_launch = {k: v for k, v in sass.items() if k.startswith("pb_dense_act")}
    _assert_bmma_no_spills(one_launch, expect=3)
    with SM90:
        fmt = bp.BitplaneFormat(4, 8, layout=MMA)
        assert cuda_bmma.one_launch_layer(fmt, 4096, 4096, 1)
        assert not cuda_bmma.one_launch_layer(fmt, 4096, 4097, 1)  # too many weights
        assert not cuda_bmma.one_launch_layer(fmt, 4096, 4097, None)
        assert cuda_bmma.one_launch_layer(fmt, 64, 64, None)  # a symbolic batch: dispatches
        assert not cuda_bmma.one_launch_layer(fmt, 64, 651, 2)
        assert cuda_bmma.one_launch_layer(fmt, 64, 650, 16)  # small K: one launch up to batch 16
        assert not cuda_bmma.one_launch_layer(fmt, 64, 650, 17)
        assert not cuda_bmma.one_launch_layer(bp.BitplaneFormat(4, 8), 64, 64, 1)  # the CUDA-core layout


def _layer_module(constant_weights: bool) -> tvm.IRModule:
    """``main`` calling a PB dense layer whose weights are a constant, or ``main``'s parameter."""
    fmt, n, k = bp.BitplaneFormat(4, 8, layout=MMA), 64, 256
    wshape = fmt.weight_shape(n, k)
    x = relax.Var("x", relax.TensorType([1, k], "float32"))
    w_var = relax.Var("w", relax.TensorType(list(wshape), "uint32"))
    w = relax.const(np.zeros(wshape, np.uint32), "uint32") if constant_weights else w_var
    bb = relax.BlockBuilder()
    with bb.function("main", [x] if constant_weights else [x, w_var]):
        gv = bb.add_func(kernels.dense_act_func(fmt, n, k, bias=False).without_attr("global_symbol"), "layer")
        args = [x, w, relax.const(np.ones(n, np.float32), "float32"), relax.prim_value(tir.IntImm("int64", 4))]
        bb.emit_func_output(bb.emit(relax.call_tir(gv, args, relax.TensorType([1, n], "float32"))))
    return bb.get()


@pytest.mark.parametrize("constant_weights", [True, False])
def test_programmatic_launch_only_where_the_weights_are_constants(constant_weights):
    """A PB kernel reads its weights before it waits for the kernel before it: it is launched
    early only where they are constants (nothing on the stream writes them); with weights a
    caller passes, plainly (its code still waits: without the launch flag a no-op)."""
    with SM90:
        mod = ApplyPBSchedules(SM90)(_layer_module(constant_weights))
    attrs = mod["layer"].attrs
    assert list(attrs[names.ATTR_EARLY_READS]) == ["wp"]
    flags = [str(f) for f in attrs.get(names.ATTR_KERNEL_LAUNCH_PARAMS, [])]
    assert (names.LAUNCH_PROGRAMMATIC in flags) == constant_weights


def test_kernels_that_wait_are_compiled_without_restrict():
    """nvcc reads a ``__restrict__`` buffer the kernel never writes with ``ld.global.nc``, which
    ptxas moved above ``griddepcontrol.wait``: a kernel that waits loses ``__restrict__`` (in its
    declaration and definition), any other keeps it."""
    decl = 'extern "C" __global__ void __launch_bounds__(64) {}(float* __restrict__ x_ptr, int64_t n)'
    source = "".join(
        f"{decl.format(name)};\n{decl.format(name)} {{\n  {body}\n}}\n\n"
        for name, body in (
            ("waits", "tvm_builtin_ptx_griddepcontrol_wait();\n  x_ptr[0] = 1;"),
            ("plain", "x_ptr[0] = 1;"),
        )
    )
    out = without_restrict_where_waiting(source)
    assert out.count("waits(float* x_ptr, int64_t n)") == 2 and out.count("plain(float* __restrict__ x_ptr") == 2
    assert without_restrict_where_waiting(out) == out


def test_loads_before_wait_sees_every_global_access():
    """The SASS check of what precedes ``griddepcontrol.wait`` (ACQBULK): loads, stores, atomics,
    reductions and cp.async count, the L2 prefetch (UBLKPF) does not; no wait at all is None."""

    def listing(*ops: str) -> str:
        return "\n".join(f"        /*{16 * i:04x}*/                   {op} ;" for i, op in enumerate(ops))

    accesses = [
        "LDG.E.128 R4, desc[UR4][R2.64]",
        "STG.E desc[UR4][R6.64], R9",
        "ATOMG.E.ADD.STRONG.GPU PT, R0, [R2.64], R5",
    ]
    accesses += ["REDG.E.ADD.STRONG.GPU desc[UR4][R2.64], R5", "LDGSTS.E [R3], desc[UR4][R4.64]", "LD.E R4, [R2.64]"]
    for op in accesses:
        assert loads_before_wait(listing("PREEXIT", op, "ACQBULK", "EXIT")) == [op], op
    assert loads_before_wait(listing("PREEXIT", "UBLKPF.L2 [UR8], UR6", "LDC R1, c[0x0][0x28]", "ACQBULK")) == []
    assert loads_before_wait(listing("ACQBULK", "LDG.E R4, desc[UR4][R2.64]")) == []
    assert loads_before_wait(listing("LDG.E R4, desc[UR4][R2.64]", "EXIT")) is None


def test_programmatic_launch_needs_a_kernel_written_for_it(monkeypatch):
    """No launch flag for a kernel that does not wait (it could read its input before it is
    written): sm_80 and ``PBTVM_CUDA_PDL=0`` build kernels without griddepcontrol or prefetch."""
    fmt = bp.BitplaneFormat(4, 8, layout=MMA)
    plain = apply_default_schedule(kernels.dense_func(fmt, 64, 256), resolve_target({"kind": "cuda", "arch": "sm_80"}))
    with pytest.raises(ValueError, match="not written for programmatic dependent launch"):
        cuda_pdl.with_programmatic_launch(plain)
    monkeypatch.setenv(names.ENV_CUDA_PDL, "0")
    assert not TargetInfo.of(SM90).limits.programmatic_launch
    source = cuda_source(build(apply_default_schedule(kernels.dense_func(fmt, 64, 256), SM90), SM90))
    assert "griddepcontrol" not in source and "prefetch" not in source
    assert set(reads_before_wait(source).values()) == {None}


@pytest.mark.parametrize("mode", ["1", names.PDL_AT_START])
def test_the_next_kernel_launches_after_the_wait_or_at_the_start(monkeypatch, mode):
    """By default a PB kernel lets the next one launch right after its wait (one kernel runs ahead
    at most); with ``PBTVM_CUDA_PDL=start`` as it starts (for comparisons on a GPU)."""
    monkeypatch.setenv(names.ENV_CUDA_PDL, mode)
    fmt = bp.BitplaneFormat(4, 8, layout=MMA)
    source = cuda_source(build(apply_default_schedule(kernels.dense_func(fmt, 64, 256), SM90), SM90))
    kernels_sass = source_sass(source, "sm_90")
    assert len(kernels_sass) == len(cuda_bmma.dispatch_configs(fmt, 64, 256))  # a kernel per batch range
    for body in kernels_sass.values():
        order = _grid_control_order(body)
        at_start = ["PREEXIT", "UBLKPF.L2", "ACQBULK"]
        assert order == (at_start if mode == names.PDL_AT_START else ["UBLKPF.L2", "ACQBULK", "PREEXIT"])


def _device_kernel(flags: list[str], body: str) -> tir.PrimFunc:
    """A PrimFunc as SplitHostDevice leaves a kernel: TVM's kernel calling convention, launch flags."""
    from tvm.script import tirx as T

    @T.prim_func
    def kernel(x: T.Buffer((64,), "float32")):
        for i in T.thread_binding(64, thread="threadIdx.x"):
            if body == "waits":
                T.ptx.griddepcontrol.wait()
            x[i] = x[i] + T.float32(1)

    return kernel.with_attr("calling_conv", tir.IntImm("int32", 2)).with_attr(names.ATTR_KERNEL_LAUNCH_PARAMS, flags)


@pytest.mark.parametrize("mode", ["1", names.PDL_AT_START])
def test_wait_first_puts_the_flag_before_dynamic_shared_memory(monkeypatch, mode):
    """TVM's kernels are launched early and wait first (``cuda_pdl.wait_first``), then let the next
    kernel launch (before the wait with ``PBTVM_CUDA_PDL=start``); the runtime needs the dynamic
    shared memory flag last; a kernel written for programmatic launch (it waits already: whether
    it launches early was decided where it is called) is left as it is."""
    monkeypatch.setenv(names.ENV_CUDA_PDL, mode)
    kernel = _device_kernel(["threadIdx.x", cuda_pdl.DYN_SHARED_MEMORY], "plain")
    done = cuda_pdl.wait_first(kernel)
    flags = [str(f) for f in done.attrs[names.ATTR_KERNEL_LAUNCH_PARAMS]]
    assert flags == ["threadIdx.x", names.LAUNCH_PROGRAMMATIC, cuda_pdl.DYN_SHARED_MEMORY]
    first = [str(stmt.value.args[0].value) for stmt in list(done.body.seq)[:2]]
    want = ["launch_dependents", "wait"] if mode == names.PDL_AT_START else ["wait", "launch_dependents"]
    assert first == want and done.body.seq[2].same_as(kernel.body)
    assert cuda_pdl.uses_grid_control(done) and not cuda_pdl.uses_grid_control(kernel)
    assert cuda_pdl.wait_first(done).same_as(done)
    written = _device_kernel(["threadIdx.x"], "waits")
    assert cuda_pdl.wait_first(written).same_as(written)


@pytest.mark.parametrize(
    ("arch", "want"),
    [("sm_75", "kNW"), ("sm_80", MMA), ("sm_86", MMA), ("sm_89", MMA), ("sm_90", MMA), ("sm_90a", MMA)],
)
def test_auto_layout_is_the_binary_tensor_core_layout_from_sm80(arch, want):
    assert weight_layout("auto", resolve_target({"kind": "cuda", "arch": arch})) == want


def test_layouts_are_checked_against_the_target():
    assert weight_layout("auto", resolve_target("llvm")) == "kNW"
    assert weight_layout("kNW", SM90) == "kNW"  # the CUDA-core kernels on request
    with pytest.raises(InputError, match=r"sm_80 or newer\), not on cuda sm_75"):
        weight_layout(MMA, resolve_target({"kind": "cuda", "arch": "sm_75"}))


def test_mma_layout_is_refused_on_cpu():
    model = MLP((32, 8)).eval()
    with pytest.raises(ValueError, match="mma16x256.*CUDA"):
        pbtvm.compile(model, (torch.randn(2, 32),), target="llvm", bits=4, layout=MMA)


def test_recorded_default_replays_to_the_bmma_kernel():
    """The tuner records the default's trace (a config annotation); replayed, it becomes the kernel."""
    func = kernels.dense_func(bp.BitplaneFormat(4, 8, layout=MMA), 64, 512)
    rule = tuning.tunable_rule(func, SM90)
    traced = rule.traced_default(tuning.workload(func, 1))
    assert cuda_bmma.CONFIG_ANNOTATION in traced.mod["main"].script()
    kernel = tuning.replay(func, traced.trace, SM90_LIMITS)
    assert cuda_bmma.CONFIG_ANNOTATION not in kernel.script() and "mma" in kernel.script()
    # the workload's batch-1 config serves batch 1 of the symbolic layer's dispatch: the default's
    assert tvm_ffi.structural_equal(kernel, rule.apply(func).mod["main"])


def test_a_config_tuned_at_one_batch_serves_that_batch_range_of_any_batch():
    """A config tuned at batch 16 (its trace's batch annotation), replayed on the layer with a
    symbolic batch, takes the dispatch range of batch 16 (9..32); the other ranges keep their
    defaults. Without the annotation (logs of earlier versions) the config serves every batch."""
    fmt = bp.BitplaneFormat(4, 8, layout=MMA)
    func = kernels.dense_func(fmt, 256, 512)
    tuned = BMMAConfig(tiles_m=1, warps_m=1, k_split=2, loads=1, tiles_n=2)
    sch = s_tir.Schedule(func, debug_mask=0)
    sch.annotate(sch.get_sblock(names.GEMM), cuda_bmma.CONFIG_ANNOTATION, cuda_bmma.encode(tuned))
    sch.annotate(sch.get_sblock(names.GEMM), cuda_bmma.BATCH_ANNOTATION, 16)
    kernel = cuda_bmma.materialize(sch.mod["main"])
    dispatch = cuda_bmma.dispatch_configs(fmt, 256, 512)
    want = [(most, tuned if most == 32 else cfg) for most, cfg, _ in dispatch]
    assert tvm_ffi.structural_equal(kernel, cuda_bmma.kernel_for(func, want))
    for batch, index in ((1, 0), (8, 1), (9, 2), (32, 2), (33, 3)):
        assert dispatched_launch(kernel, batch)[0] == index
    assert dispatched_launch(kernel, 16)[2] == (32, tuned.warps_m, tuned.k_split)
    unannotated = s_tir.Schedule(func, debug_mask=0)
    unannotated.annotate(unannotated.get_sblock(names.GEMM), cuda_bmma.CONFIG_ANNOTATION, cuda_bmma.encode(tuned))
    assert tvm_ffi.structural_equal(cuda_bmma.materialize(unannotated.mod["main"]), cuda_bmma.kernel_for(func, tuned))


@pytest.mark.parametrize(
    ("bits", "act_bits", "n", "k", "batch"),
    [
        (4, 16, 2600, 650, 9),  # tiles_n 8 (4 x 8 register tiles): estimate 320 registers
        (16, 8, 4096, 4096, 16),  # int64 accumulators, 4 x 4 tiles: estimate 240
        (4, 8, 4096, 4096, 64),  # the swept shape: fine
    ],
)
def test_batch_knob_default_configs_do_not_spill(bits, act_bits, n, k, batch):
    """The two-launch default past one column tile (BATCH_KNOBS) stays in registers."""
    fmt = bp.BitplaneFormat(bits, act_bits, layout=MMA)
    cfg = cuda_bmma.default_config(fmt, n, k, batch)
    func = cuda_bmma.kernel_for(kernels.dense_func(fmt, n, k), cfg).with_attr("global_symbol", "k")
    sass = source_sass(cuda_source(build(func.with_attr("tirx.is_scheduled", True), SM90)), "sm_90")
    assert [bmma_problem(s) for s in sass.values()] == [None], cfg


def test_dense_act_dispatch_default_and_tuned_configs():
    """``pb_dense_act`` with a symbolic batch and ``ATTR_IN_BLOCK_MAX_BATCH`` (compile's dense layer):
    the default is one kernel at batch 1 and pack + kernel per range above; the tuner's default
    trace (at batch 1) replays to it; a config tuned at batch 1 takes the one-launch range, one
    tuned at 16 (compile makes none: it tunes what runs there) serves 9..32 as the two-launch kernel. Without
    the attribute (a decoder's head) the function stays one launch at every batch."""
    fmt = bp.BitplaneFormat(4, 8, layout=MMA)
    plain = kernels.dense_act_func(fmt, 256, 512)
    func = plain.with_attr(names.ATTR_IN_BLOCK_MAX_BATCH, 1)
    dispatch = cuda_bmma.dispatch_configs(fmt, 256, 512, in_block_max=1)
    rule = tuning.tunable_rule(func, SM90)
    kernel = rule.apply(func).mod["main"]
    assert tvm_ffi.structural_equal(kernel, cuda_bmma.kernel_for(func, dispatch, SM90_LIMITS))
    assert [len(dispatched_launches(kernel, b)) for b in (1, 2, 8, 9, 33)] == [1, 2, 2, 2, 2]
    traced = rule.traced_default(tuning.workload(func, 1))
    assert tvm_ffi.structural_equal(tuning.replay(func, traced.trace, SM90_LIMITS), kernel)
    tuned = BMMAConfig(tiles_m=1, warps_m=1, k_split=2, loads=1, tiles_n=2)
    for at, want in ((1, [(1, tuned, True), *dispatch[1:]]), (16, [*dispatch[:2], (32, tuned, False), dispatch[3]])):
        sch = s_tir.Schedule(func, debug_mask=0)
        sch.annotate(sch.get_sblock(names.GEMM), cuda_bmma.CONFIG_ANNOTATION, cuda_bmma.encode(tuned))
        sch.annotate(sch.get_sblock(names.GEMM), cuda_bmma.BATCH_ANNOTATION, at)
        assert cuda_bmma.dispatch_configs(fmt, 256, 512, tuned=(at, tuned), in_block_max=1) == want
        replayed = cuda_bmma.materialize(sch.mod["main"])
        assert tvm_ffi.structural_equal(replayed, cuda_bmma.kernel_for(func, want))
        assert dispatched_launches(replayed, at)[-1][2] == (32, tuned.warps_m, tuned.k_split)
    one = apply_default_schedule(plain, SM90)
    assert all(len(dispatched_launches(one, b)) == 1 for b in (1, 9, 33))
    with pytest.raises(ValueError, match="packs in the block needs fused_pack"):
        bmma_dense_kernel(fmt, 256, 512, True, [(1, tuned, True), (None, tuned)])
