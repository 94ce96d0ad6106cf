"""The AVX-512 VNNI PB GEMM equals the reference exactly, and is chosen only where it can run."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from pbtvm import bitplane as bp
from pbtvm import kernels
from pbtvm import quantize as qz
from pbtvm._tvm import tir, tvm
from pbtvm.ops import vnni_batch, vnni_rows
from pbtvm.ops.pb_vnni import (
    MAX_ACCUMULATORS,
    cpu_isa,
    pb_vnni_func,
    target_supports,
    tile_problem,
    unsupported_reason,
)
from pbtvm.ops.vnni_batch import DECODE_ONCE_MIN_BITS
from pbtvm.schedules import rule_for
from pbtvm.schedules.cpu import CPUBitplaneGemm
from pbtvm.schedules.cpu_vnni import KNOBS, CPUVnniGemm, vnni_kernel_for
from pbtvm.target import resolve_target

CPU = resolve_target("llvm")
HAS_VNNI = target_supports(CPU)
needs_vnni = pytest.mark.skipif(not HAS_VNNI, reason="host CPU lacks AVX-512 BW/VNNI")


def _t(a: np.ndarray):
    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())


def _codes(rng, fmt, n, k, b):
    """Random weight and activation codes covering the full ranges (extremes included)."""
    if fmt.codebook == "bipolar":
        q = 2 * rng.integers(0, 2, (n, k)) - 1
    elif fmt.codebook == "offset_binary":
        q = rng.integers(0, 2**fmt.bits, (n, k))
    else:
        q = rng.integers(-(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1), (n, k))
    xq = rng.integers(-fmt.act_qmax, fmt.act_qmax + 1, (b, k))
    xq[0, 0], q[0, 0] = -fmt.act_qmax, q.min()
    return q, xq


def _check_int(fmt, n, k, b, rng, **knobs):
    q, xq = _codes(rng, fmt, n, k, b)
    func = kernels.int_product_func(fmt, n, k)
    if knobs:
        func = vnni_kernel_for(func, **knobs)
    assert isinstance(rule_for(func, CPU), CPUVnniGemm)
    assert_exact_at_every_bitlayers(kernels.build(func, CPU), fmt, q, xq)


def assert_exact_at_every_bitlayers(kern, fmt, q, xq) -> None:
    """The integer product kernel ``kern`` equals the reference at every ``bitlayers`` and ``xq @ q.T``
    at all planes (the reference is told N, which layouts with padded rows need)."""
    wp, xp = bp.pack_weights(q, fmt), bp.pack_activations(xq, fmt)
    acc = fmt.accumulator_dtype(q.shape[1])
    out = _t(np.full((xq.shape[0], q.shape[0]), -7, acc))
    for layers in range(1, fmt.bits + 1):
        kern(_t(xp), _t(xq.sum(1).astype(acc)), _t(wp), layers, out)
        want = bp.bitplane_matmul(wp, xp, fmt, layers, n_rows=q.shape[0])
        np.testing.assert_array_equal(out.numpy(), want, err_msg=f"L={layers}")
    np.testing.assert_array_equal(out.numpy(), xq @ q.T)


@needs_vnni
@pytest.mark.parametrize(
    ("bits", "act_bits", "n", "k", "b"),
    [
        (1, 8, 7, 33, 1),
        (2, 2, 9, 64, 5),
        (3, 5, 17, 129, 9),
        (4, 8, 13, 100, 17),
        (5, 3, 5, 300, 2),
        (6, 6, 3, 31, 4),
        (7, 4, 11, 200, 3),
        (8, 8, 33, 4100, 6),
        (8, 7, 1, 1, 1),
        (4, 8, 64, 4096, 8),
        # K >= 512: whole blocks take the GFNI decode, the rest the masked-add decode
        (1, 8, 7, 1100, 3),
        (2, 2, 9, 1024, 5),
        (3, 5, 17, 600, 9),
        (5, 3, 5, 520, 2),
        (6, 6, 3, 1030, 4),
        (7, 4, 11, 1500, 3),
        (4, 8, 2100, 1040, 6),  # parallel, chunks after the blocks: rows decoded once past a tile
    ],
)
def test_int_product_exact(bits, act_bits, n, k, b, rng):
    """Odd N, K not a multiple of 32 or 64, every batch remainder of the tile, every bitlayers."""
    _check_int(bp.BitplaneFormat(bits, act_bits), n, k, b, rng)


@needs_vnni
@pytest.mark.parametrize(("row_tile", "batch_tile"), [(1, 1), (3, 2)])
def test_tiles_exact(row_tile, batch_tile, rng):
    """Tiles outside KNOBS (the offered ones: test_every_offered_knob_setting_is_exact)."""
    _check_int(bp.BitplaneFormat(4, 8), 19, 260, 11, rng, row_tile=row_tile, batch_tile=batch_tile)


@needs_vnni
@pytest.mark.parametrize("batch_tile", [1, 3])
def test_block_batch_tiles_exact(batch_tile, rng):
    """Whole blocks: any batch tile, a ragged last task (N = 70 with 64 rows per task)."""
    _check_int(bp.BitplaneFormat(4, 8), 70, 600, 7, rng, batch_tile=batch_tile)


@needs_vnni
@pytest.mark.parametrize(
    ("bits", "act_bits", "n", "k", "b"),
    [(1, 8, 7, 33, 3), (2, 8, 9, 100, 5), (4, 6, 13, 129, 17), (8, 8, 5, 300, 2), (1, 8, 7, 600, 2), (4, 8, 6, 700, 3)],
)
def test_offset_binary_int_product_exact(bits, act_bits, n, k, b, rng):
    """Unsigned planes of the offset-binary codebook: no sign plane to invert, no shift to undo."""
    _check_int(bp.BitplaneFormat(bits, act_bits, "offset_binary"), n, k, b, rng)


@needs_vnni
@pytest.mark.parametrize("k", [150, 1030])
def test_nkw_layout_exact(k, rng):
    _check_int(bp.PRESETS["w4a8-NkW"], 9, k, 3, rng)


NO_GFNI = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "mattr": ["-gfni"]})


def _asm(func) -> str:
    return str(kernels.build(func, CPU, schedule=False).mod.inspect_source("asm"))


@needs_vnni
@pytest.mark.skipif(not target_supports(CPU, ("gfni",)), reason="host CPU lacks GFNI")
def test_gfni_decode_where_the_cpu_has_it(rng):
    """Blocks of 512 inputs use the GFNI transpose; without ``gfni`` the masked-add decode does all."""
    func = kernels.int_product_func(bp.BitplaneFormat(4, 8), 8, 1024)
    assert "vgf2p8affineqb" in _asm(vnni_kernel_for(func, target=CPU))
    assert "vgf2p8affineqb" not in _asm(vnni_kernel_for(func, target=NO_GFNI))
    _check_int(bp.BitplaneFormat(3, 8), 5, 1100, 3, rng, row_tile=2, batch_tile=2, target=NO_GFNI)


@needs_vnni
@pytest.mark.skipif(not target_supports(CPU, ("gfni",)), reason="host CPU lacks GFNI")
def test_layers_of_many_bytes_prefetch_their_planes(monkeypatch):
    """From :data:`~pbtvm.ops.vnni_rows.PREFETCH_AHEAD_MIN_BYTES` of weight planes on, the GFNI
    block loops prefetch ahead; smaller layers and the masked-add decode (no GFNI) do not."""
    func = kernels.int_product_func(bp.BitplaneFormat(4, 8), 8, 1024)
    size = 4 * 8 * 1024 // 8  # bytes of its planes
    monkeypatch.setattr(vnni_rows, "PREFETCH_AHEAD_MIN_BYTES", size)
    assert "prefetcht1" in _asm(vnni_kernel_for(func))
    assert "prefetcht1" not in _asm(vnni_kernel_for(func, target=NO_GFNI))
    monkeypatch.setattr(vnni_rows, "PREFETCH_AHEAD_MIN_BYTES", size + 1)
    assert "prefetcht1" not in _asm(vnni_kernel_for(func))


@needs_vnni
@pytest.mark.skipif(not target_supports(CPU, ("gfni",)), reason="host CPU lacks GFNI")
@pytest.mark.parametrize(
    ("bits", "n", "k", "b"),
    [(4, 70, 512, 1), (2, 9, 1100, 1), (3, 70, 1030, 3), (8, 67, 1100, 9), (1, 5, 2048, 2)],
)
def test_prefetching_kernels_exact(bits, n, k, b, rng, monkeypatch):
    """With the prefetch in every layer (rows four at a time, blocks then chunks, batch tiles, rows
    decoded once past a tile, prefetches past the planes' last rows): exact at every
    ``bitlayers``. (A prefetch cannot change a result: this checks the loops around it.)"""
    monkeypatch.setattr(vnni_rows, "PREFETCH_AHEAD_MIN_BYTES", 0)
    assert "prefetcht1" in _asm(vnni_kernel_for(kernels.int_product_func(bp.BitplaneFormat(bits, 8), n, k)))
    _check_int(bp.BitplaneFormat(bits, 8), n, k, b, rng)


@needs_vnni
@pytest.mark.skipif(not target_supports(CPU, ("gfni",)), reason="host CPU lacks GFNI")
def test_rows_decoded_once_prefetch_too(monkeypatch):
    """The decode-once loop (zmm rows with chunks after their blocks, past one batch tile) asks
    for its rows' planes ahead as the row loop does."""
    calls = []

    def record(T, kern, row, word):
        calls.append(kern.streams)
        return vnni_rows.prefetch_ahead(T, kern, row, word)

    monkeypatch.setattr(vnni_rows, "PREFETCH_AHEAD_MIN_BYTES", 0)
    monkeypatch.setattr(vnni_batch, "prefetch_ahead", record)
    vnni_kernel_for(kernels.int_product_func(bp.BitplaneFormat(DECODE_ONCE_MIN_BITS, 8), 16, 1100))
    assert calls and all(calls)


@needs_vnni
@pytest.mark.parametrize(
    ("bits", "codebook"), [(1, None), (3, None), (8, None), (1, "offset_binary"), (3, "offset_binary")]
)
@pytest.mark.parametrize("bias", [True, False])
def test_dense_equals_popcount_kernel(bits, codebook, bias, rng):
    """The float layer is the TE epilogue on the same integers: equal to the popcount kernel's output."""
    fmt = bp.BitplaneFormat(bits, 8, codebook)
    n, k, b = 21, 77, 6
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((b, k)).astype(np.float32)
    q, ws = qz.quantize_weights(w, fmt)
    xq, xs = qz.quantize_activations(x, fmt)
    args = [
        _t(bp.pack_activations(xq, fmt)),
        _t(xs),
        _t(xq.sum(1).astype(np.int32)),
        _t(bp.pack_weights(q, fmt)),
        _t(ws),
    ]
    if bias:
        args.append(_t(rng.standard_normal(n).astype(np.float32)))
    func = kernels.dense_func(fmt, n, k, bias=bias)
    fast = kernels.build(func, CPU)
    slow = kernels.build(CPUBitplaneGemm(CPU).apply(func).mod["main"], CPU, schedule=False)
    for layers in range(1, bits + 1):
        y_fast, y_slow = _t(np.zeros((b, n), np.float32)), _t(np.zeros((b, n), np.float32))
        fast(*args, layers, y_fast)
        slow(*args, layers, y_slow)
        np.testing.assert_array_equal(y_fast.numpy(), y_slow.numpy())


@pytest.mark.parametrize("name", ["w16a16", "w4a16", "w8a8"])
def test_formats_outside_int8_fall_back(name):
    fmt = bp.PRESETS[name]
    func = kernels.int_product_func(fmt, 8, 64)
    if unsupported_reason(fmt, 64) is None:  # w8a8: the byte-code kernel on AVX-512 and AVX2 CPUs
        assert isinstance(rule_for(func, CPU), CPUVnniGemm) == (cpu_isa(CPU) is not None)
    else:
        assert isinstance(rule_for(func, CPU), CPUBitplaneGemm)
        with pytest.raises(ValueError, match="cannot compute"):
            pb_vnni_func(fmt, 8, 64, tir.Var("batch", "int64"), dense=False)


def test_large_k_falls_back():
    assert "too large" in unsupported_reason(bp.BitplaneFormat(8, 8), 70_000)


@needs_vnni
def test_long_rows_keep_plain_codes():
    """Past ~66k inputs the scaled GFNI bytes could overflow int32: plain codes, masked-add decode.

    Extreme codes (-128 activations, the largest weights) at the longest K of each regime.
    """
    for fmt, k in ((bp.BitplaneFormat(7, 8), 66_256), (bp.BitplaneFormat(4, 8), 70_000)):
        assert unsupported_reason(fmt, k) is None
        q = np.full((1, k), 2 ** (fmt.bits - 1) - 1)
        xq = np.full((2, k), -(2 ** (fmt.act_bits - 1)))
        xq[1, ::3] = 127
        wp, xp = bp.pack_weights(q, fmt), bp.pack_activations(xq, fmt)
        kern = kernels.build(kernels.int_product_func(fmt, 1, k), CPU)
        out = _t(np.zeros((2, 1), np.int32))
        kern(_t(xp), _t(xq.sum(1).astype(np.int32)), _t(wp), fmt.bits, out)
        np.testing.assert_array_equal(out.numpy(), xq @ q.T)


@needs_vnni
@pytest.mark.parametrize(
    ("n", "k", "b", "dense_act"),
    [(19, 260, 11, False), (8, 32, 3, True), (70, 600, 7, False), (70, 600, 7, True)],
)
def test_every_offered_knob_setting_is_exact(n, k, b, dense_act, rng):
    """The tuner measures any offered setting and a log replays it (``rule.kernel_with``): each
    builds and equals the reference (integer products) or the default kernel bit for bit (the
    one-kernel layer), at bitlayers 1 and all. (8, 32): a ``(row_tile 4, batch_tile 8)``
    setting needed 32 accumulators and crashed ``pbtvm tune``; (70, 600): whole 512-input blocks."""
    fmt = bp.BitplaneFormat(4, 8)
    func = kernels.dense_act_func(fmt, n, k, True) if dense_act else kernels.int_product_func(fmt, n, k)
    rule = rule_for(func, CPU)
    assert isinstance(rule, CPUVnniGemm)
    settings = rule.knob_settings(func)
    assert settings and settings[0] == {"row_tile": KNOBS[0][0], "batch_tile": KNOBS[0][1]}
    q, xq = _codes(rng, fmt, n, k, b)
    wp = _t(bp.pack_weights(q, fmt))
    if dense_act:
        x = (xq + rng.uniform(-0.5, 0.5, xq.shape)).astype(np.float32)
        scale, bias = _t(rng.uniform(0.5, 2, n).astype(np.float32)), _t(rng.standard_normal(n).astype(np.float32))
        args = (_t(x), wp, scale, bias)
        default = kernels.build(func, CPU)
    else:
        args = (_t(bp.pack_activations(xq, fmt)), _t(xq.sum(1).astype(np.int32)), wp)
    for knobs in settings:
        kern = kernels.build(rule.kernel_with(func, knobs), CPU, schedule=False)
        for layers in (1, fmt.bits):
            out = _t(np.full((b, n), -7, np.float32 if dense_act else np.int32))
            kern(*args, layers, out)
            if dense_act:
                want = _t(np.zeros((b, n), np.float32))
                default(*args, layers, want)
                want = want.numpy()
            else:
                want = bp.bitplane_matmul(bp.pack_weights(q, fmt), bp.pack_activations(xq, fmt), fmt, layers)
            np.testing.assert_array_equal(out.numpy(), want, err_msg=f"{knobs}, bitlayers={layers}")


def test_knob_settings_drop_what_does_not_fit(monkeypatch):
    """A knob list holding a setting too large for small layers (it once held (4, 8)) offers it
    only where it fits."""
    import pbtvm.schedules.cpu_vnni as cpu_vnni

    monkeypatch.setattr(cpu_vnni, "KNOBS", (*KNOBS, (4, 8)))
    fmt = bp.BitplaneFormat(4, 8)
    rule = rule_for(kernels.int_product_func(fmt, 8, 32), tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}))
    small = rule.knob_settings(kernels.int_product_func(fmt, 8, 32))
    assert {"row_tile": 4, "batch_tile": 8} not in small and len(small) == len(KNOBS)


def test_tile_problem_names_the_limit():
    fmt = bp.BitplaneFormat(4, 8)
    assert tile_problem(fmt, 32, 2, 4) is None
    assert "32 accumulators" in tile_problem(fmt, 32, 4, 8) and str(MAX_ACCUMULATORS) in tile_problem(fmt, 32, 4, 8)
    assert tile_problem(fmt, 600, 4, 8) is None  # whole blocks hold one row at a time
    assert ">= 1" in tile_problem(fmt, 32, 0, 1)
    with pytest.raises(ValueError, match="accumulators"):
        pb_vnni_func(fmt, 8, 32, tir.Var("b", "int64"), dense=False, batch_tile=8, row_tile=4)


def test_target_features_decide():
    assert target_supports(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}))
    assert target_supports(tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"}))
    assert not target_supports(tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v2"}))
    assert not target_supports(tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "mattr": ["-avx512vnni"]}))
    assert target_supports(
        tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v2", "mattr": ["+avx512bw", "+avx512vnni"]})
    )
    func = kernels.int_product_func(bp.BitplaneFormat(4, 8), 8, 64)
    portable = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v2"})
    assert isinstance(rule_for(func, portable), CPUBitplaneGemm)


def test_env_forces_popcount(monkeypatch):
    monkeypatch.setenv("PBTVM_CPU_KERNEL", "popcount")
    func = kernels.int_product_func(bp.BitplaneFormat(4, 8), 8, 64)
    assert isinstance(rule_for(func, tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})), CPUBitplaneGemm)


@needs_vnni
@pytest.mark.slow
def test_knob_search_then_compile_from_log(tmp_path, capsys):
    """``pbtvm.tune`` measures the AVX-512 kernel's knobs; compiling from the log uses them."""
    import json

    import torch

    import pbtvm
    from tests.models import MLP

    torch.manual_seed(0)
    model, example = MLP((64, 48, 10)).eval(), (torch.randn(2, 64),)
    lines: list[str] = []
    report = pbtvm.tune(model, example, "llvm", bits=4, work_dir=tmp_path, trials=2, progress=lines.append)
    assert len(report.kernels) == 2
    for k in report.kernels:
        assert k.name.endswith("(avx512)") and k.trials == 2 and k.built == 2, k.first_error
        assert k.best_us <= k.default_us
    (log,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    chosen = json.loads((log / "pbtvm_cpu_kernels.json").read_text())
    assert len(chosen) == 2 and all({"row_tile", "batch_tile"} <= set(v) for v in chosen.values())
    from pbtvm.cli import main

    capsys.readouterr()
    assert main(["inspect", str(tmp_path)]) == 0  # the knob log is what this tuning wrote: inspect shows it
    shown = capsys.readouterr().out
    assert "knob search: 2 kernel(s)" in shown, shown
    assert ": target {'kind': 'llvm', 'mcpu': " in shown  # as a library's manifest shows it, not TVM's JSON
    for key, setting in chosen.items():
        label = f"{key.split(':')[0]} (batch 1)"  # the batch it was tuned at tells entries of one kernel apart
        assert f"{label}  row_tile={setting['row_tile']} batch_tile={setting['batch_tile']}" in shown
    assert pbtvm.tune(model, example, "llvm", bits=4, work_dir=tmp_path, trials=2, progress=lines.append).kernels == []
    tuned = pbtvm.compile(model, example, "llvm", bits=4, work_dir=tmp_path)
    plain = pbtvm.compile(model, example, "llvm", bits=4)
    assert len(tuned.manifest["tuning"]["tuned_kernels"]) == 2
    x = torch.randn(5, 64)
    for layers in (1, 4):
        np.testing.assert_array_equal(tuned(x, bitlayers=layers).numpy(), plain(x, bitlayers=layers).numpy())
    # A setting the rule does not offer (a hand-edited log; row tile 3 x batch tile 5 would build)
    # is not used: only offered settings are checked exact by the tests.
    edited = {key: {**setting, "row_tile": 3, "batch_tile": 5} for key, setting in chosen.items()}
    (log / "pbtvm_cpu_kernels.json").write_text(json.dumps(edited))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        untuned = pbtvm.compile(model, example, "llvm", bits=4, work_dir=tmp_path)
    assert untuned.manifest["tuning"]["tuned_kernels"] == []
    said = [str(w.message) for w in said if str(w.message).startswith("pbtvm:")]  # why, and nothing more
    assert len(said) == 2 and all(
        re.search(r"row_tile': 3, 'batch_tile': 5.* are not among the settings", m) for m in said
    )
    floats = {key: {**setting, "row_tile": float(setting["row_tile"])} for key, setting in chosen.items()}
    (log / "pbtvm_cpu_kernels.json").write_text(json.dumps(floats))  # 4.0 is not a setting the tuner writes
    with pytest.warns(UserWarning, match=r"row_tile': \d\.0, .* are not among the settings"):
        untuned = pbtvm.compile(model, example, "llvm", bits=4, work_dir=tmp_path)
    assert untuned.manifest["tuning"]["tuned_kernels"] == []
    # A log that decides none of the model's kernels says so, and why.
    (log / "pbtvm_cpu_kernels.json").write_text(json.dumps(chosen))
    with pytest.warns(
        UserWarning, match=r"decided none of this model's 2 tunable PB kernel\(s\): it has them tuned at batch 1, not 8"
    ):
        at_8 = pbtvm.compile(model, example, "llvm", bits=4, work_dir=tmp_path, tune_batch=8)
    assert at_8.manifest["tuning"]["tuned_kernels"] == []
    other = MLP((32, 8)).eval()
    with pytest.warns(
        UserWarning, match=r"none of this model's 1 tunable PB kernel\(s\): it holds 2 other kernel\(s\), e\.g\. pb_"
    ):
        pbtvm.compile(other, (torch.randn(2, 32),), "llvm", bits=4, work_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tuned model itself: no warning
        pbtvm.compile(model, example, "llvm", bits=4, work_dir=tmp_path)
    # The keys name the instruction sets the kernels were built with: the same mcpu's AVX2 build
    # (one log directory) is tuned on its own, not "already in the log" with AVX-512 knobs.
    assert all(key.split(":")[2].split("-")[1].startswith("avx512") for key in chosen), chosen
    avx2 = pbtvm.tune(model, example, "llvm -mattr=-avx512vnni,-avxvnni", bits=4, work_dir=tmp_path, trials=2)
    assert [k.name.endswith("(avx2)") for k in avx2.kernels] == [True, True]
    logged = json.loads((log / "pbtvm_cpu_kernels.json").read_text())
    assert len(logged) == 4 and sum("-avx2" in key for key in logged) == 2, logged
    # A log written before the keys named them (name:b1:hash) still serves this machine's builds.
    (log / "pbtvm_cpu_kernels.json").write_text(json.dumps({key.rsplit("-", 1)[0]: v for key, v in chosen.items()}))
    assert (
        len(pbtvm.compile(model, example, "llvm", bits=4, work_dir=tmp_path).manifest["tuning"]["tuned_kernels"]) == 2
    )
