"""The BMMA kernel's generated CUDA, run on the CPU (``tests/cuda_emulator.py``), equals the reference.

Each CUDA thread is a fiber of the emulator and every ``mma.sync m16n8k256 .b1 .and.popc`` a warp-collective
emulation of the PTX fragment layouts, so this checks TVM's generated indexing, predicates, K
split, plane loop and epilogue exactly, without a GPU. ``tests/test_bmma_gpu.py`` checks the same
on a device (the hardware MMA itself).
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from pbtvm import bitplane as bp
from pbtvm import kernels
from pbtvm import quantize as qz
from pbtvm._tvm import tvm
from pbtvm.cuda import build, cuda_source
from pbtvm.schedules import apply_default_schedule, cuda_bmma
from pbtvm.schedules.cuda_ballot_pack import PREFETCH_MAX, pack_warps
from pbtvm.schedules.cuda_bmma import default_config
from pbtvm.schedules.cuda_bmma_kernel import BMMAConfig, bmma_dense_kernel
from pbtvm.target import TargetInfo, resolve_target

from .activations import extreme_rows, near_tie_rows
from .cuda_emulator import EmulatedKernel, dispatched_launch, dispatched_launches, host_workspaces, kernel_name

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20) to emulate the kernel")
SM90 = resolve_target({"kind": "cuda", "arch": "sm_90"})
#: sm_90's limits: the kernels are written for programmatic dependent launch (griddepcontrol,
#: the weights prefetched into L2 before the wait: no-ops in the emulator, the code around them runs)
SM90_LIMITS = TargetInfo.of(SM90).limits
CPU = resolve_target("llvm")
MMA = "mma16x256"


def _emulate_exact(
    bits: int, act_bits: int, n: int, k: int, batches: tuple, cfg: BMMAConfig | None, rng, codebook: str | None = None
):
    fmt = bp.BitplaneFormat(bits, act_bits, codebook, layout=MMA)
    cfg = cfg or default_config(fmt, n, k)
    func = bmma_dense_kernel(fmt, n, k, False, cfg, integer=True, limits=SM90_LIMITS)
    func = func.with_attr("global_symbol", "bmma_int")
    kernel = EmulatedKernel(cuda_source(build(func.with_attr("tirx.is_scheduled", True), SM90)))
    q, _ = qz.quantize_weights(rng.standard_normal((n, k)).astype(np.float32), fmt)
    wp = bp.pack_weights(q, fmt)
    acc_t = fmt.accumulator_dtype(k)
    for batch in batches:
        xq = rng.integers(-fmt.act_qmax, fmt.act_qmax + 1, (batch, k))
        xp = bp.pack_activations(xq, fmt)
        grid = (
            -(-wp.shape[1] // (cfg.warps_m * cfg.tiles_m)),
            -(-batch * bp.act_column_stride(act_bits) // (8 * cfg.tiles_n)),
            1,
        )
        for layers in sorted({1, (bits + 1) // 2, bits}):
            y = np.full((batch, n), -7, acc_t)
            args = {"xp_ptr": xp, "rowsum_ptr": xq.sum(1).astype(acc_t), "wp_ptr": wp, "y_ptr": y}
            kernel(grid, (32, cfg.warps_m, cfg.k_split), **args, batch=batch, bitlayers=layers)
            ref = bp.bitplane_matmul(wp, xp, fmt, layers, n_rows=n)
            np.testing.assert_array_equal(y, ref, err_msg=f"{fmt.name} {cfg} batch={batch} bitlayers={layers}")


@pytest.mark.parametrize("act_bits", [4, 8, 16])
@pytest.mark.parametrize("bits", [1, 2, 5, 16])
def test_default_kernel_exact_in_emulation(bits, act_bits, rng):
    """Odd N (partial row tile), K = 700 (a partial K tile), batches that fill tiles partly."""
    _emulate_exact(bits, act_bits, 257, 700, (1, 3), None, rng)


@pytest.mark.parametrize(
    ("bits", "act_bits", "n", "k", "cfg"),
    [
        (4, 16, 257, 700, BMMAConfig(2, 2, 2, 2, 4)),  # every knob above 1, a batch row over 2 tiles
        (1, 4, 100, 1000, BMMAConfig(4, 1, 4, 1, 1)),  # 4 row tiles a warp, K split 4, 2 rows a tile
        (8, 8, 257, 700, BMMAConfig(1, 4, 1, 4, 4)),  # 4 K tiles in flight (more than K has)
        (3, 8, 64, 256, BMMAConfig(1, 1, 1, 1, 1)),  # exactly one K tile
    ],
)
def test_configs_exact_in_emulation(bits, act_bits, n, k, cfg, rng):
    _emulate_exact(bits, act_bits, n, k, (8,), cfg, rng)


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_offset_binary_exact_in_emulation(bits, rng):
    """Unsigned planes (all coefficients positive, no sign plane) of the offset-binary codebook."""
    _emulate_exact(bits, 8, 100, 700, (1, 3), None, rng, "offset_binary")


def test_batch_64_exact_in_emulation(rng):
    fmt = bp.BitplaneFormat(4, 8, layout=MMA)
    _emulate_exact(4, 8, 70, 300, (64,), default_config(fmt, 70, 300, batch=64), rng)


@pytest.mark.parametrize(
    ("act_bits", "k", "batch"),
    [(2, 1001, 3), (8, 4096, 1), (16, 650, 3), (4, 11008, 2), (8, 20, 3), (3, 700, 2), (12, 300, 2)],
)
def test_ballot_pack_exact_in_emulation(act_bits, k, batch, rng):
    """The one-launch ``__ballot_sync`` pack: planes, scales and code sums bit-exact (a zero row too,
    and products a few ulps from a half, which a fused multiply-add would round otherwise); act_bits
    3 and 12 have zero padding planes in the B-fragment order (4 and 16 columns a row)."""
    fmt = bp.BitplaneFormat(4, act_bits, layout=MMA)
    x = (rng.standard_normal((batch, k)) * 5).astype(np.float32)
    x[0] = near_tie_rows(rng, 1, k, fmt)[0]
    x[-1] = 0 if batch > 1 else x[-1]
    _check_ballot_pack(fmt, np.concatenate([x, extreme_rows(rng, k)]))  # FLT_MAX, tiny, subnormal, +-inf rows


def _check_ballot_pack(fmt: bp.BitplaneFormat, x: np.ndarray) -> None:
    """The emulated one-launch pack of ``x`` (float32 [B, K]): planes, scales and code sums exact."""
    batch, k = x.shape
    func = apply_default_schedule(kernels.act_pack_func(fmt, k), SM90).with_attr("global_symbol", "pack")
    kernel = EmulatedKernel(cuda_source(build(func, SM90)))
    xq, xs = qz.quantize_activations(x, fmt)
    xp = np.full(fmt.act_shape(batch, k), 0xDEADBEEF, np.uint32)  # every word written, padding too
    scale, rowsum = np.full(batch, -1, np.float32), np.full(batch, -1, fmt.accumulator_dtype(k))
    kernel((batch, 1, 1), (32, pack_warps(k), 1), x_ptr=x, xp_ptr=xp, x_scale_ptr=scale, rowsum_ptr=rowsum, batch=batch)
    np.testing.assert_array_equal(xp, bp.pack_activations(xq, fmt))
    np.testing.assert_array_equal(scale, xs)
    np.testing.assert_array_equal(rowsum, xq.sum(1))


def test_ballot_pack_keeps_the_nan_policy_in_emulation(rng):
    """Rows with NaN or +-inf pack as the TE pack does on the CPU (README, "Thread safety, NaN
    and op semantics"): a NaN row's scale is NaN and an infinite entry's row scale inf with the code +-qmax
    there. The ballot pack took ``|x|`` with a max that drops NaN, so a NaN row got a finite scale
    (finite outputs), and an infinite row all-zero codes (all-NaN outputs)."""
    fmt, k, batch = bp.BitplaneFormat(4, 8, layout=MMA), 300, 4
    func = kernels.act_pack_func(fmt, k)
    emulated = EmulatedKernel(
        cuda_source(build(apply_default_schedule(func, SM90).with_attr("global_symbol", "pack"), SM90))
    )
    on_cpu = kernels.build(kernels.act_pack_func(fmt, k), CPU)  # the TE pack, in the same order
    x = rng.standard_normal((batch, k)).astype(np.float32)
    x[0, 7] = np.nan
    x[1, 3], x[2, 5], x[2, 9] = np.inf, -np.inf, np.inf
    outs = []
    for run in ("cuda", "cpu"):
        xp = np.full(fmt.act_shape(batch, k), 0xDEADBEEF, np.uint32)
        scale, rowsum = np.full(batch, -1, np.float32), np.full(batch, -1, fmt.accumulator_dtype(k))
        if run == "cuda":
            emulated(
                (batch, 1, 1),
                (32, pack_warps(k), 1),
                x_ptr=x,
                xp_ptr=xp,
                x_scale_ptr=scale,
                rowsum_ptr=rowsum,
                batch=batch,
            )
        else:
            xp, scale, rowsum = (tvm.runtime.tensor(a) for a in (xp, scale, rowsum))
            on_cpu(tvm.runtime.tensor(x), xp, scale, rowsum)
            xp, scale, rowsum = xp.numpy(), scale.numpy(), rowsum.numpy()
        outs.append((xp, scale, rowsum))
    (xp, scale, rowsum), (cpu_xp, cpu_scale, cpu_rowsum) = outs
    assert np.isnan(scale[0]) and scale[1] == scale[2] == np.inf and np.isfinite(scale[3])
    np.testing.assert_array_equal(scale, cpu_scale)
    # the NaN row's codes are whatever NaN converts to (x86 and a GPU differ); its outputs are NaN
    np.testing.assert_array_equal(xp[1:], cpu_xp[1:])  # rows are the first axis in mma16x256
    np.testing.assert_array_equal(rowsum[1:], cpu_rowsum[1:])


@pytest.mark.parametrize(
    ("bits", "act_bits", "n", "k", "batch", "cfg", "codebook"),
    [
        (4, 8, 33, 300, 1, BMMAConfig(1, 2, 2, 1, 1), None),
        (4, 16, 257, 700, 3, BMMAConfig(2, 2, 2, 2, 4), None),  # 3 of the block's 4 batch rows used
        (1, 4, 100, 1000, 8, BMMAConfig(1, 2, 4, 1, 2), None),
        (3, 8, 100, 700, 3, BMMAConfig(1, 2, 2, 1, 1), "offset_binary"),  # the zero-point epilogue
    ],
)
def test_fused_pack_kernel_in_emulation(bits, act_bits, n, k, batch, cfg, codebook, rng):
    """One launch per layer: the blocks pack their batch rows (ballots into shared memory) first."""
    fmt = bp.BitplaneFormat(bits, act_bits, codebook, layout=MMA)
    func = bmma_dense_kernel(fmt, n, k, True, cfg, fused_pack=True, limits=SM90_LIMITS)
    func = func.with_attr("global_symbol", "fused")
    kernel = EmulatedKernel(cuda_source(build(func.with_attr("tirx.is_scheduled", True), SM90)))
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    x[-1] = 0 if batch > 1 else x[-1]
    bias = rng.standard_normal(n).astype(np.float32)
    q, ws = qz.quantize_weights(w, fmt)
    wp = bp.pack_weights(q, fmt)
    grid = (
        -(-wp.shape[1] // (cfg.warps_m * cfg.tiles_m)),
        -(-batch * bp.act_column_stride(act_bits) // (8 * cfg.tiles_n)),
        1,
    )
    for layers in sorted({1, bits}):
        y = np.full((batch, n), np.nan, np.float32)
        args = {"x_ptr": x, "wp_ptr": wp, "w_scale_ptr": ws, "bias_buf_ptr": bias, "y_ptr": y}
        kernel(grid, (32, cfg.warps_m, cfg.k_split), **args, batch=batch, bitlayers=layers)
        ref = qz.pb_linear_reference(x, wp, ws, bias, fmt, layers)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _rule_args(fused: bool, fmt, x, wp, ws, bias, y, layers: int) -> dict:
    """The emulated launch arguments of the rule's dense kernel: ``x`` itself where it packs its
    rows (``dense_act_func``), else ``x`` quantized and packed (``dense_func``)."""
    args = {"wp_ptr": wp, "w_scale_ptr": ws, "bias_buf_ptr": bias, "y_ptr": y, "batch": len(x), "bitlayers": layers}
    if fused:
        return {**args, "x_ptr": x}
    xq, xs = qz.quantize_activations(x, fmt)
    return {**args, "xp_ptr": bp.pack_activations(xq, fmt), "x_scale_ptr": xs, "rowsum_ptr": xq.sum(1).astype(np.int32)}


@pytest.mark.parametrize("fused", [False, True])
def test_rule_kernel_for_offset_binary_in_emulation(fused, rng):
    """The kernel the rule builds from a ``dense_func`` / ``dense_act_func`` (what ``compile`` runs) takes
    the codebook and N from the PrimFunc: offset binary's scales are ``[2, N]`` (scales, zero points).
    For any batch (``dense_func``) it is a kernel per batch range (cuda_bmma.dispatch_configs): the
    one the host launches at each batch, emulated, is exact."""
    fmt = bp.BitplaneFormat(3, 8, "offset_binary", layout=MMA)
    n, k = 100, 300
    func = (kernels.dense_act_func if fused else kernels.dense_func)(fmt, n, k)
    sched = apply_default_schedule(func, SM90).with_attr("global_symbol", "rule")
    # no host-side CSE: the dispatch's kernels would take the branches' common subexpressions
    source = cuda_source(build(sched, SM90, config={"tirx.disable_cse_tir": True}))
    q, ws = qz.quantize_weights(rng.standard_normal((n, k)).astype(np.float32), fmt)
    wp = bp.pack_weights(q, fmt)
    bias = rng.standard_normal(n).astype(np.float32)
    launched = set()
    for batch in (2,) if fused else (1, 2, 9, 33):
        x = rng.standard_normal((batch, k)).astype(np.float32)
        index, grid, block = dispatched_launch(sched, batch)
        launched.add(index)
        kernel = EmulatedKernel(source, kernel=kernel_name("rule", index))
        for layers in (1, 3):
            y = np.full((batch, n), np.nan, np.float32)
            kernel(grid, block, **_rule_args(fused, fmt, x, wp, ws, bias, y, layers))
            ref = qz.pb_linear_reference(x, wp, ws, bias, fmt, layers)
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert len(launched) == (1 if fused else len(cuda_bmma.dispatch_configs(fmt, n, k)))


def _activation_reference(y: np.ndarray, activation: str) -> np.ndarray:
    """numpy of :func:`pbtvm.ops.epilogue.activated` (in float64)."""
    v = y.astype(np.float64)
    if activation == "relu":
        return np.where(np.isnan(v), v, np.maximum(v, 0))
    if activation == "gelu":
        return v * (0.5 + 0.5 * np.vectorize(math.erf)(v / math.sqrt(2)))
    if activation == "gelu_tanh":
        return 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))
    return v / (1 + np.exp(-v))  # silu


@pytest.mark.parametrize(
    ("fused", "activation"), [(False, "relu"), (True, "relu"), (True, "gelu"), (False, "gelu_tanh"), (True, "silu")]
)
def test_activation_in_the_epilogue_in_emulation(fused, activation, rng):
    """A layer with its activation folded in (``pbtvm.names.ATTR_ACTIVATION``, what ``compile`` makes
    of Linear + ReLU / GELU / SiLU on sm_80+): the rule's kernel applies it to every output, NaN
    kept (a row with a NaN gives NaN outputs, and the activation keeps them, as torch does)."""
    fmt = bp.BitplaneFormat(4, 8, layout=MMA)
    n, k = 100, 300
    func = (kernels.dense_act_func if fused else kernels.dense_func)(fmt, n, k, activation=activation)
    sched = apply_default_schedule(func, SM90).with_attr("global_symbol", "rule")
    source = cuda_source(build(sched, SM90, config={"tirx.disable_cse_tir": True}))
    q, ws = qz.quantize_weights(rng.standard_normal((n, k)).astype(np.float32), fmt)
    wp = bp.pack_weights(q, fmt)
    bias = rng.standard_normal(n).astype(np.float32)
    batch = 3
    x = rng.standard_normal((batch, k)).astype(np.float32)
    x[1, 5] = np.nan
    index, grid, block = dispatched_launch(sched, batch)
    kernel = EmulatedKernel(source, kernel=kernel_name("rule", index))
    for layers in (2, 4):
        y = np.full((batch, n), -5, np.float32)
        kernel(grid, block, **_rule_args(fused, fmt, x, wp, ws, bias, y, layers))
        plain = qz.pb_linear_reference(x, wp, ws, bias, fmt, layers)
        ref = _activation_reference(plain, activation)
        assert np.isnan(y[1]).all() and (plain[[0, 2]] < -1).any()  # where the activations differ most
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.nanmax(np.abs(ref)))


def _garbage(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """An array of ``shape`` and ``dtype`` holding what a kernel must not read (NaN, a bit pattern)."""
    if np.dtype(dtype).kind == "f":
        return np.full(shape, np.nan, dtype)
    return np.full(shape, 0xA5A5A5A5, np.uint32).astype(dtype)


@pytest.mark.parametrize(
    ("bits", "act_bits", "codebook", "n", "k", "in_block_max"),
    [
        (4, 8, None, 300, 700, 1),  # K not a multiple of 256: the pack writes the padding words
        (3, 4, "offset_binary", 100, 300, 16),  # two batch rows a column tile; zero points
        (2, 16, None, 70, 260, 1),  # a batch row over 2 column tiles
        (16, 16, None, 70, 260, 16),  # int64 accumulators: the code sums' workspace; compile's bound at K = 260
    ],
)
def test_dense_act_dispatch_packs_in_block_then_in_a_workspace_in_emulation(
    bits, act_bits, codebook, n, k, in_block_max, rng
):
    """``pb_dense_act`` with a symbolic batch and ``ATTR_IN_BLOCK_MAX_BATCH`` (a CUDA dense layer of
    ``compile``): up to that batch one launch (the blocks pack their rows), above it the ballot pack
    into workspaces and the two-launch kernel of the range (``cuda_bmma.dispatch_configs``); every
    launch the host runs at batches 1, 2, 9, 17, 33, emulated in order, gives the reference. The
    workspaces start as garbage: the pack writes every word the kernel reads."""
    from pbtvm import names

    fmt = bp.BitplaneFormat(bits, act_bits, codebook, layout=MMA)
    func = kernels.dense_act_func(fmt, n, k).with_attr(names.ATTR_IN_BLOCK_MAX_BATCH, in_block_max)
    sched = apply_default_schedule(func, SM90).with_attr("global_symbol", "layer")
    source = cuda_source(build(sched, SM90, config={"tirx.disable_cse_tir": True}))
    q, ws = qz.quantize_weights(rng.standard_normal((n, k)).astype(np.float32), fmt)
    wp = bp.pack_weights(q, fmt)
    bias = rng.standard_normal(n).astype(np.float32)
    emulated: dict[int, EmulatedKernel] = {}
    ranges = set()
    for batch in (1, 2, 9, 17, 33):
        launches = dispatched_launches(sched, batch)
        assert len(launches) == (1 if batch <= in_block_max else 2), (batch, launches)
        ranges.add(launches[-1][0])  # the product kernel (one pack serves every range past the block)
        x = (rng.standard_normal((batch, k)) * 3).astype(np.float32)
        for layers in (1, bits):
            y = np.full((batch, n), np.nan, np.float32)
            args = {"x_ptr": x, "wp_ptr": wp, "w_scale_ptr": ws, "bias_buf_ptr": bias, "y_ptr": y}
            args.update(batch=batch, bitlayers=layers)
            # the host's workspaces as it allocates them (the emulator guards their ends), not cleared
            workspaces = host_workspaces(sched, batch)
            scalars = {"scale_ptr": ((batch,), "float32"), "codesum_ptr": ((batch,), fmt.accumulator_dtype(k))}
            assert (batch <= in_block_max) == (not workspaces)
            assert workspaces in ({}, {"packed_ptr": (fmt.act_shape(batch, k), "uint32"), **scalars})
            args.update({name: _garbage(shape, dtype) for name, (shape, dtype) in workspaces.items()})
            for index, grid, block in launches:
                if index not in emulated:
                    emulated[index] = EmulatedKernel(source, kernel=kernel_name("layer", index))
                emulated[index](grid, block, **args)
            ref = qz.pb_linear_reference(x, wp, ws, bias, fmt, layers)
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=f"batch {batch}")
    dispatch = cuda_bmma.dispatch_configs(fmt, n, k, in_block_max=in_block_max)
    assert [in_block for most, _, in_block in dispatch] == [
        most is not None and most <= in_block_max for most, *_ in dispatch
    ]
    assert len(ranges) == len(dispatch)


@pytest.mark.parametrize(
    ("bits", "act_bits", "n", "k", "batches", "codebook"),
    [
        (4, 4, 70, 300, (3, 7), None),  # act_bits 4: two rows a column tile
        (4, 16, 70, 300, (2, 9), None),  # a batch row over 2 column tiles
        (1, 8, 64, 256, (5,), None),  # bipolar, one K tile
        (3, 8, 33, 20, (9,), "offset_binary"),  # K = 20
        (8, 16, 40, 700, (33,), None),
    ],
)
def test_batch_knob_default_configs_exact_in_emulation(bits, act_bits, n, k, batches, codebook, rng):
    """The two-launch kernel at its default configs past one column tile (``BATCH_KNOBS``): act_bits
    4 and 16, bipolar, K = 20, W8 (review of the batch defaults, 2026-12-04)."""
    fmt = bp.BitplaneFormat(bits, act_bits, codebook, layout=MMA)
    for batch in batches:
        cfg = default_config(fmt, n, k, batch)
        _emulate_exact(bits, act_bits, n, k, (batch, 1), cfg, rng, codebook)


def test_ballot_pack_chunked_path_one_store_exact_in_emulation(rng):
    """K large enough that a thread holds more than PREFETCH_MAX activations (the chunked reads)
    with the one-store select."""
    k, batch, act_bits = 16 * 32 * (PREFETCH_MAX + 1) + 5, 2, 8
    assert -(-k // (32 * pack_warps(k))) > PREFETCH_MAX
    x = (rng.standard_normal((batch, k)) * 5).astype(np.float32)
    _check_ballot_pack(bp.BitplaneFormat(4, act_bits, layout=MMA), x)


@pytest.mark.parametrize(
    ("bits", "act_bits", "n", "k", "batch", "cfg_args", "fused"),
    [
        (4, 8, 70, 700, 1, None, False),  # two-launch, planes inside, batch-1 default
        (4, 4, 70, 300, 5, None, False),  # two-launch, batch-knob default (2 x 2 tiles: a branch a plane)
        (3, 8, 33, 300, 1, (1, 2, 2, 1, 1), True),  # fused, planes inside (bits <= 4, one column tile)
        (4, 8, 33, 1300, 1, (1, 2, 2, 1, 1), True),  # fused, 2 of 3 K steps' weights loaded before the pack
        (2, 8, 100, 1300, 2, (3, 1, 1, 1, 1), True),  # fused, 3 tiles: 1 K step early, a branch a plane after
        (8, 8, 33, 300, 1, (1, 2, 2, 1, 1), True),  # fused, planes outside (W8)
    ],
)
def test_planes_past_bitlayers_are_not_read_in_emulation(bits, act_bits, n, k, batch, cfg_args, fused, rng):
    """The weights passed hold only the first ``layers`` planes, so that the guard page sits right
    after them: a read of a plane >= bitlayers faults."""
    fmt = bp.BitplaneFormat(bits, act_bits, layout=MMA)
    cfg = BMMAConfig(*cfg_args) if cfg_args else default_config(fmt, n, k, batch)
    func = bmma_dense_kernel(fmt, n, k, True, cfg, fused_pack=fused).with_attr("global_symbol", "k")
    kernel = EmulatedKernel(cuda_source(build(func.with_attr("tirx.is_scheduled", True), SM90)))
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    q, ws = qz.quantize_weights(w, fmt)
    wp = bp.pack_weights(q, fmt)
    xq, xs = qz.quantize_activations(x, fmt)
    grid = (
        -(-wp.shape[1] // (cfg.warps_m * cfg.tiles_m)),
        -(-batch * bp.act_column_stride(act_bits) // (8 * cfg.tiles_n)),
        1,
    )
    for layers in (1, bits - 1):
        y = np.full((batch, n), np.nan, np.float32)
        args = {"wp_ptr": np.ascontiguousarray(wp[:layers]), "w_scale_ptr": ws, "bias_buf_ptr": bias, "y_ptr": y}
        if fused:
            args["x_ptr"] = x
        else:
            args.update(
                xp_ptr=bp.pack_activations(xq, fmt),
                x_scale_ptr=xs,
                rowsum_ptr=xq.sum(1).astype(fmt.accumulator_dtype(k)),
            )
        kernel(grid, (32, cfg.warps_m, cfg.k_split), **args, batch=batch, bitlayers=layers)
        ref = qz.pb_linear_reference(x, wp, ws, bias, fmt, layers)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_int64_accumulator_two_launch_batch_knobs_exact_in_emulation(rng):
    """W4A16 at K = 8000: int64 accumulators (planes inside, folded per K step), batch-knob config."""
    fmt = bp.BitplaneFormat(4, 16, layout=MMA)
    assert fmt.accumulator_dtype(8000) == "int64"
    _emulate_exact(4, 16, 20, 8000, (3,), default_config(fmt, 20, 8000, 3), rng)
