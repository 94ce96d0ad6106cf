"""The AVX-512 LSTM step (``pbtvm.ops.pb_vnni_lstm``) against the popcount step and the numpy reference.

Every form the rule replaces: ``gx`` given (one step), ``gx`` of a sequence read at step ``t``
(the time loop), the input projection inside (the decoder). Rows per task ragged, hidden below
and above one 512-input block, batch 1..5 (tiles of 4 and the rest), every ``bitlayers``, the
masked-add decode (a target without GFNI). The gate pre-activations are the same floats as the
popcount kernel's (exact integer products, the shared epilogue); ``h'`` and ``c'`` differ only by
the polynomial ``exp`` (about 1e-7).
"""

from __future__ import annotations

import numpy as np
import pytest

from pbtvm import bitplane as bp
from pbtvm import kernels
from pbtvm import quantize as qz
from pbtvm._tvm import te, tvm
from pbtvm.ops import unit_major_rows, vnni_rows
from pbtvm.ops import vector_math as vmath
from pbtvm.ops.pb_vnni import target_supports
from pbtvm.relay_passes.pb_lstm_lowering import _step_func
from pbtvm.schedules.cpu_vnni import CPUVnniLstmCell, vnni_lstm_kernel_for
from pbtvm.target import resolve_target

from .test_cpu_vnni import NO_GFNI

CPU = resolve_target("llvm")
needs_avx512 = pytest.mark.skipif(not target_supports(CPU), reason="needs a CPU with AVX-512 BW + VNNI")
#: |AVX-512 step - popcount step| on h' and c' (the exp polynomial vs libm).
STEP_ATOL = 2e-6
#: |AVX-512 step - float64 numpy reference|, as tests/test_lstm_cell.py allows the popcount step.
REF_ATOL = 2e-5


def _weights(rng, rows: int, k: int, fmt: bp.BitplaneFormat) -> tuple:
    q, scale = qz.quantize_weights((rng.standard_normal((rows, k)) / np.sqrt(k)).astype(np.float32), fmt)
    return bp.pack_weights(q, fmt), scale


def _state(rng, batch: int, hidden: int) -> tuple:
    h = np.tanh(2 * rng.standard_normal((batch, hidden))).astype(np.float32)
    return h, rng.standard_normal((batch, hidden)).astype(np.float32)


def _call(kern, arrays: list, scalars: list, batch: int, hidden: int) -> tuple:
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
    outs = [tvm.runtime.tensor(np.full((batch, hidden), np.nan, np.float32)) for _ in range(2)]
    kern(*args, *scalars, *outs)
    return outs[0].numpy(), outs[1].numpy()


def _popcount(func, monkeypatch):
    monkeypatch.setenv("PBTVM_CPU_KERNEL", "popcount")
    kern = kernels.build(func, CPU)
    monkeypatch.delenv("PBTVM_CPU_KERNEL")
    return kern


def _close(got: tuple, want: tuple, atol: float, what: str) -> None:
    for name, g, w in zip(("h", "c"), got, want, strict=True):
        assert np.isfinite(g).all(), f"{what}: {name} has non-finite values"
        np.testing.assert_allclose(g, w, atol=atol, err_msg=f"{what}: {name}")


INPUT_CASES = [  # (input, hidden, bits, codebook, batch)
    (650, 650, 4, None, 1),  # the PTB LM: one block + chunks, rows side by side at batch 1
    (650, 650, 1, None, 3),
    (40, 70, 3, None, 5),  # below one block: chunks only; a tile of 4 and one row left
    (1100, 520, 8, None, 2),  # two blocks in the input leg
    (600, 530, 2, "offset_binary", 1),
    (530, 100, 1, "bipolar", 4),
    (1100, 640, 4, None, 1),  # legs of two and one blocks, 40 tasks of 16 units (none ragged)
    (512, 512, 2, None, 1),  # one block exactly, no chunks after it
    (650, 650, 4, None, 6),  # past one tile: rows with chunks after their block decoded once (GFNI too)
    (1100, 520, 8, None, 9),  # ... both legs, two tiles and one row over the decoded codes
    (1024, 650, 4, None, 6),  # the input leg (whole blocks) tiled, the hidden leg decoded once
]


@needs_avx512
@pytest.mark.parametrize(("n_in", "hidden", "bits", "codebook", "batch"), INPUT_CASES)
def test_step_with_input_matches_popcount_step_and_reference(n_in, hidden, bits, codebook, batch, rng, monkeypatch):
    fmt = bp.BitplaneFormat(bits, 8, codebook)
    arrays = input_step_case(rng, fmt, n_in, hidden, batch)
    func = kernels.lstm_cell_input_func(fmt, n_in, hidden, True)
    assert CPUVnniLstmCell(CPU).matches(func)
    fast = kernels.build(func, CPU)  # the rule picks the AVX-512 step
    assert_step_matches(fast, _popcount(func, monkeypatch), arrays, range(1, bits + 1), fmt, batch, hidden)


def input_step_case(rng, fmt: bp.BitplaneFormat, n_in: int, hidden: int, batch: int) -> list:
    """``[x, wp_ih, ws_ih, bias, h, c, wp_hh, ws_hh]`` of a decoding step with its input projection."""
    rows = unit_major_rows(hidden)
    wp_ih, ws_ih = _weights(rng, 4 * hidden, n_in, fmt)
    wp_hh, ws_hh = _weights(rng, 4 * hidden, hidden, fmt)
    bias = rng.standard_normal(4 * hidden).astype(np.float32)[rows]
    x = rng.standard_normal((batch, n_in)).astype(np.float32)
    h, c = _state(rng, batch, hidden)
    return [x, wp_ih, ws_ih, bias, h, c, wp_hh, ws_hh]


def assert_step_matches(fast, slow, arrays: list, layers_to_check, fmt, batch: int, hidden: int) -> None:
    """``fast`` gives the popcount step's (``slow``) h', c' up to the polynomial exp, and the
    float64 reference's, at each ``bitlayers``."""
    for layers in layers_to_check:
        got = _call(fast, arrays, [layers], batch, hidden)
        _close(got, _call(slow, arrays, [layers], batch, hidden), STEP_ATOL, f"vs popcount, L={layers}")
        want = qz.pb_lstm_cell_input_reference(*arrays, fmt, layers)
        _close(got, want, REF_ATOL, f"vs reference, L={layers}")


@needs_avx512
@pytest.mark.parametrize(
    ("hidden", "bits", "batch", "sequence"),
    [(650, 4, 1, False), (100, 2, 5, True), (520, 4, 2, True), (650, 4, 6, True)],
)
def test_step_with_given_projection_matches_popcount_step(hidden, bits, batch, sequence, rng, monkeypatch):
    assert_given_projection_step(CPU, hidden, bits, [batch], sequence, rng, monkeypatch)


def assert_given_projection_step(
    target, hidden: int, bits: int, batches: list, sequence: bool, rng, monkeypatch, layout: str = "kNW"
):
    """The step with ``gx`` given (one step, or read at step ``t`` of a sequence: the time loop's),
    built for ``target`` once, against the popcount step and the reference at each batch."""
    fmt = bp.BitplaneFormat(bits, 8, layout=layout)
    wp, ws = _weights(rng, 4 * hidden, hidden, fmt)
    steps = 3
    # the time loop's step is a module-internal function: exported here to be called alone
    func = (
        _step_func(fmt, hidden).with_attr("global_symbol", "main") if sequence else kernels.lstm_cell_func(fmt, hidden)
    )
    fast = kernels.build(func, target)
    monkeypatch.setenv("PBTVM_CPU_KERNEL", "popcount")
    slow = kernels.build(func, target)
    monkeypatch.delenv("PBTVM_CPU_KERNEL")
    for batch in batches:
        h, c = _state(rng, batch, hidden)
        gx_seq = rng.standard_normal((steps, batch, 4 * hidden)).astype(np.float32)
        for layers in sorted({1, bits}):
            for t in range(steps) if sequence else [0]:
                arrays = [gx_seq if sequence else gx_seq[t], h, c, wp, ws]
                scalars = [t, layers] if sequence else [layers]
                got = _call(fast, arrays, scalars, batch, hidden)
                what = f"batch {batch}, L={layers}, t={t}"
                _close(got, _call(slow, arrays, scalars, batch, hidden), STEP_ATOL, f"vs popcount, {what}")
                want = qz.pb_lstm_cell_reference(gx_seq[t], h, c, wp, ws, fmt, layers)
                _close(got, want, REF_ATOL, f"vs reference, {what}")


@needs_avx512
def test_masked_add_decode_gives_the_gfni_steps_results(rng):
    """A CPU without GFNI decodes every chunk with masked adds: the same step, bit for bit; past
    one batch tile (batch 6) each row decoded once (``vnni_batch``), the GFNI step still by tiles."""
    fmt, n_in, hidden = bp.BitplaneFormat(4, 8), 600, 520
    wp_ih, ws_ih = _weights(rng, 4 * hidden, n_in, fmt)
    wp_hh, ws_hh = _weights(rng, 4 * hidden, hidden, fmt)
    func = kernels.lstm_cell_input_func(fmt, n_in, hidden, False)
    gfni = kernels.build(vnni_lstm_kernel_for(func, target=CPU), CPU, schedule=False)
    plain_func = vnni_lstm_kernel_for(func, target=NO_GFNI)
    asm = str(kernels.build(plain_func, NO_GFNI, schedule=False).mod.inspect_source("asm"))
    assert "vgf2p8affineqb" not in asm and "vpdpbusd" in asm
    plain = kernels.build(plain_func, CPU, schedule=False)
    for batch in (2, 6):
        x = rng.standard_normal((batch, n_in)).astype(np.float32)
        h, c = _state(rng, batch, hidden)
        arrays = [x, wp_ih, ws_ih, h, c, wp_hh, ws_hh]
        for layers in (1, 3, 4):
            got = _call(plain, arrays, [layers], batch, hidden)
            for a, b in zip(_call(gfni, arrays, [layers], batch, hidden), got, strict=True):
                np.testing.assert_array_equal(a, b)


@needs_avx512
@pytest.mark.skipif(not target_supports(CPU, ("gfni",)), reason="host CPU lacks GFNI")
def test_prefetching_step_gives_the_same_results(rng, monkeypatch):
    """An LSTM step whose weights are large enough to prefetch ahead (here: any) gives its results
    bit for bit, at batch 1 (rows four at a time) and past one batch tile."""
    fmt, n_in, hidden = bp.BitplaneFormat(4, 8), 600, 130
    wp_ih, ws_ih = _weights(rng, 4 * hidden, n_in, fmt)
    wp_hh, ws_hh = _weights(rng, 4 * hidden, hidden, fmt)
    func = kernels.lstm_cell_input_func(fmt, n_in, hidden, False)
    plain = kernels.build(vnni_lstm_kernel_for(func, target=CPU), CPU, schedule=False)
    monkeypatch.setattr(vnni_rows, "PREFETCH_AHEAD_MIN_BYTES", 0)
    ahead = kernels.build(vnni_lstm_kernel_for(func, target=CPU), CPU, schedule=False)
    assert "prefetcht1" in str(ahead.mod.inspect_source("asm"))
    assert "prefetcht1" not in str(plain.mod.inspect_source("asm"))
    for batch in (1, 6):
        x = rng.standard_normal((batch, n_in)).astype(np.float32)
        h, c = _state(rng, batch, hidden)
        arrays = [x, wp_ih, ws_ih, h, c, wp_hh, ws_hh]
        for layers in (1, 4):
            got = _call(ahead, arrays, [layers], batch, hidden)
            for a, b in zip(_call(plain, arrays, [layers], batch, hidden), got, strict=True):
                np.testing.assert_array_equal(a, b)


def test_rule_leaves_formats_the_avx512_products_cannot_take():
    """16-bit activations stay on the popcount step (the rule does not match)."""
    fmt = bp.BitplaneFormat(4, 16)
    assert not CPUVnniLstmCell(CPU).matches(kernels.lstm_cell_input_func(fmt, 40, 64))
    with pytest.raises(ValueError, match="must be <= 8 bits"):
        vnni_lstm_kernel_for(kernels.lstm_cell_func(fmt, 64), target=CPU)


def test_vector_exp_sigmoid_tanh_match_numpy():
    """The polynomial exp is within 2e-7 relative on [-87, 88]; sigmoid/tanh within 2e-7, tanh also
    relative near 0 (an adversarial run: tanh(1e-7) 19 % off, tanh(1e-8) 0), finite for every
    number, NaN for NaN."""
    n = 1 << 16
    x = te.placeholder((n,), "float32", "x")

    def elementwise(f, name):
        return te.compute((n,), lambda i: f(x[i]), name=name)

    outs = [elementwise(vmath.exp, "e"), elementwise(vmath.sigmoid, "s"), elementwise(vmath.tanh, "t")]
    func = kernels.build(te.create_prim_func([x, *outs]).with_attr("tirx.is_scheduled", True), CPU, schedule=False)
    tiny = np.logspace(-40, 0, n // 4) * np.where(np.arange(n // 4) % 2, 1, -1)  # tanh(1e-8) was 0
    values = np.concatenate(
        [np.linspace(-120, 120, n // 4), np.random.default_rng(0).standard_normal(n // 2) * 4, tiny]
    ).astype(np.float32)
    args = [tvm.runtime.tensor(values)] + [tvm.runtime.tensor(np.zeros(n, np.float32)) for _ in range(3)]
    func(*args)
    e, s, t = (a.numpy() for a in args[1:])
    x64 = values.astype(np.float64)
    inside = (x64 > -87) & (x64 < 88)
    assert np.max(np.abs(e[inside] / np.exp(x64[inside]) - 1)) < 2e-7
    assert np.max(np.abs(s - 1 / (1 + np.exp(-x64)))) < 2e-7
    assert np.max(np.abs(t - np.tanh(x64))) < 2e-7
    near_zero = (np.abs(x64) < 1) & (x64 != 0)
    assert np.max(np.abs(t[near_zero] / np.tanh(x64[near_zero]) - 1)) < 2e-7  # relative, also near 0
    assert np.isfinite(s).all() and np.isfinite(t).all()
    args[0].copyfrom(np.full(n, np.nan, np.float32))
    func(*args)
    assert all(np.isnan(a.numpy()).all() for a in args[1:]), "NaN must propagate (torch does)"


def test_float64_exp_is_within_an_ulp_of_libm():
    """The pick kernel's sampling weights: ``exp_f64`` on ``x <= 0`` (vectorized arithmetic, where
    ``tir.exp`` is one libm call per logit, most of the 60 µs of sampling 10,000 logits) is within an
    ulp of numpy's, subnormal results included, 0 exactly where numpy's is (``-inf`` too)."""
    n = 1 << 15
    x = te.placeholder((n,), "float64", "x")
    out = te.compute((n,), lambda i: vmath.exp_f64(x[i]), name="e")
    func = kernels.build(te.create_prim_func([x, out]).with_attr("tirx.is_scheduled", True), CPU, schedule=False)
    rng = np.random.default_rng(0)
    edges = [0.0, -0.0, -np.inf, -1e-300, -708.39, -708.4, -745.13, -745.14, -745.2, -800.0]
    values = np.concatenate([-rng.uniform(0, 30, n // 2), -rng.uniform(0, 760, n // 2 - len(edges)), edges])
    args = [tvm.runtime.tensor(values), tvm.runtime.tensor(np.zeros(n))]
    func(*args)
    got, want = args[1].numpy(), np.exp(values)
    np.testing.assert_array_equal(got > 0, want > 0)
    ulps = np.abs(got - want) / np.spacing(np.maximum(want, 5e-324))
    assert ulps.max() <= 1, values[np.argmax(ulps)]
