"""The byte-code PB kernels on AVX2 (``vpmaddubsw`` + ``vpmaddwd``) against the numpy reference.

CPUs without AVX-512 VNNI (AMD Zen 2/3, Intel client cores) get the kernels of
:mod:`pbtvm.ops.pb_vnni` built for AVX2: plain codes ``u`` decoded with masked adds, int16 pair
sums (exact while :func:`pbtvm.ops.vnni_rows.madd_exact`; 8-bit weights split their codes,
``u = 16 u_hi + u_lo``), int32 lanes. The tests build for an
AVX2-only target (Haswell), so they also run on AVX-512 hosts; they need a host with AVX2.
"""

from __future__ import annotations

import numpy as np
import pytest

from pbtvm import bitplane as bp
from pbtvm import kernels
from pbtvm import quantize as qz
from pbtvm._tvm import tir, tvm
from pbtvm.ops.pb_vnni import cpu_isa, pb_vnni_func, target_supports, tile_problem, unsupported_reason
from pbtvm.ops.vnni_rows import INT16_MAX, madd_exact, pair_bound, split_codes
from pbtvm.schedules import rule_for
from pbtvm.schedules.cpu import CPUBitplaneGemm
from pbtvm.schedules.cpu_vnni import CPUVnniGemm, CPUVnniLstmCell, one_kernel_layer
from pbtvm.target import resolve_target

from .test_cpu_one_kernel_layer import _rows, assert_same_floats
from .test_cpu_vnni import _codes, _t, assert_exact_at_every_bitlayers

HOST = resolve_target("llvm")
AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
pytestmark = pytest.mark.skipif(not target_supports(HOST, ("avx2",)), reason="host CPU lacks AVX2")


def _check_int(fmt, n, k, b, rng, q=None, xq=None, **knobs):
    """Every bitlayers of the AVX2 integer product equals the reference (and ``xq @ q.T`` at all planes)."""
    if q is None:
        q, xq = _codes(rng, fmt, n, k, b)
    func = kernels.int_product_func(fmt, n, k)
    rule = rule_for(func, AVX2)
    assert isinstance(rule, CPUVnniGemm) and rule.label == "avx2"
    func = rule.kernel_with(func, knobs) if knobs else rule.apply(func).mod["main"]
    assert func.attrs["pbtvm.cpu_kernel"] == "avx2_madd"
    assert_exact_at_every_bitlayers(kernels.build(func, AVX2, schedule=False), fmt, q, xq)


@pytest.mark.parametrize(
    ("bits", "act_bits", "codebook", "n", "k", "b"),
    [
        (1, 8, None, 7, 33, 1),
        (2, 2, None, 9, 64, 5),
        (3, 5, None, 17, 129, 9),
        (4, 8, None, 13, 100, 6),
        (6, 6, None, 3, 31, 4),
        (7, 8, None, 11, 200, 3),  # the largest codes the int16 pair sums hold
        (8, 8, None, 33, 300, 6),  # split codes
        (8, 6, None, 5, 1030, 2),  # split codes, planes past bitlayers add 0 in whole blocks
        (8, 8, "offset_binary", 5, 100, 1),  # split codes in the batch-1 nest
        (8, 5, None, 9, 700, 1),
        # K >= 512: whole blocks (masked-add decode, rows streamed), then the chunks after them
        (4, 8, None, 70, 1100, 5),  # batch > tile: each row decoded once (vnni_batch)
        (8, 8, None, 9, 650, 7),  # ... with split codes and a partial chunk
        (3, 8, "offset_binary", 7, 600, 9),  # ... offset binary, two whole tiles and one row
        (2, 8, None, 6, 600, 9),  # W2 keeps a decode per batch tile (DECODE_ONCE_MIN_BITS)
        (2, 8, None, 9, 1024, 1),
        (7, 4, None, 11, 1500, 3),
        (1, 8, "bipolar", 6, 700, 2),
        (3, 8, "offset_binary", 5, 600, 4),
        (5, 7, "offset_binary", 4, 90, 3),
    ],
)
def test_int_product_exact(bits, act_bits, codebook, n, k, b, rng):
    """Odd N, K not a multiple of 32 or 64, every batch remainder of the tile, every bitlayers."""
    _check_int(bp.BitplaneFormat(bits, act_bits, codebook), n, k, b, rng)


@pytest.mark.parametrize(("bits", "k"), [(6, 150), (7, 150), (7, 1030), (8, 150), (8, 1030)])
def test_extreme_codes_do_not_saturate(bits, k, rng):
    """The largest weight codes against -qmax activations: W6 adds both halves' pair sums in
    int16 before widening, W7 widens each (its pair sums alone reach 32,258), W8 splits its codes
    (255 x 127 x 2 would saturate)."""
    fmt = bp.BitplaneFormat(bits, 8)
    assert (2 * pair_bound(fmt) <= INT16_MAX) == (bits <= 6)
    assert madd_exact(fmt) == (bits <= 7) == (not split_codes(fmt, "avx2"))
    q = np.full((3, k), 2 ** (bits - 1) - 1)
    q[1] = -(2 ** (bits - 1))  # the most negative code: plain code 0 after the sign flip
    q[2, ::2] = -(2 ** (bits - 1))
    xq = np.full((2, k), -fmt.act_qmax)
    xq[1, 1::2] = fmt.act_qmax
    _check_int(fmt, 3, k, 2, rng, q=q, xq=xq)


@pytest.mark.parametrize(("row_tile", "batch_tile"), [(1, 1), (1, 5), (5, 1)])
def test_tiles_exact(row_tile, batch_tile, rng):
    _check_int(bp.BitplaneFormat(4, 8), 19, 260, 11, rng, row_tile=row_tile, batch_tile=batch_tile)


@pytest.mark.parametrize(("name", "k"), [("w4a8-NkW", 150), ("w4a8-NkW", 1030)])
def test_nkw_layout_exact(name, k, rng):
    _check_int(bp.PRESETS[name], 9, k, 3, rng)


def test_eight_bit_weights_split_their_codes():
    """W8 codes reach 255 (pair sums past int16): two byte codes per weight, still one kernel."""
    fmt = bp.BitplaneFormat(8, 8)
    assert split_codes(fmt, "avx2") and not split_codes(fmt, "avx512")
    assert unsupported_reason(fmt, 64, "avx2") is None and one_kernel_layer(fmt, 64, AVX2)
    assert isinstance(rule_for(kernels.int_product_func(fmt, 8, 64), AVX2), CPUVnniGemm)
    wide = bp.BitplaneFormat(16, 8)  # past int8 dot products: the popcount kernel
    assert "w16a8" in unsupported_reason(wide, 64, "avx2")
    assert isinstance(rule_for(kernels.int_product_func(wide, 8, 64), AVX2), CPUBitplaneGemm)
    with pytest.raises(ValueError, match="must be <= 8 bits"):
        pb_vnni_func(wide, 8, 64, tir.Var("batch", "int64"), dense=False, isa="avx2")


def test_isa_of_targets():
    assert cpu_isa(AVX2) == "avx2"
    assert cpu_isa(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})) == "avx512"
    assert cpu_isa(tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v2"})) is None
    assert "5 (avx2)" in tile_problem(bp.BitplaneFormat(4, 8), 64, 2, 4, "avx2")


def test_avx2_keeps_batch_one_rows_one_by_one():
    from pbtvm.ops.vnni_rows import Kernel, side_by_side

    kern = Kernel(bp.BitplaneFormat(4, 8), 8, 8, 0, None, None, None, None, None, None, None, blocks=1)
    assert side_by_side(kern, 1) == 4
    kern.isa = "avx2"
    assert side_by_side(kern, 1) == 1


def test_kernel_is_avx2_code():
    """``vpmaddubsw`` / ``vpmaddwd`` dot products; the masks from dword broadcasts (no byte shuffle
    per plane: the few ``vpshufb`` left reorder the activation codes once per call)."""
    func = kernels.dense_act_func(bp.BitplaneFormat(4, 8), 16, 600, True)
    asm = str(
        kernels.build(rule_for(func, AVX2).apply(func).mod["main"], AVX2, schedule=False).mod.inspect_source("asm")
    )
    assert "vpmaddubsw" in asm and "vpmaddwd" in asm
    # a shuffled decode takes two vpshufb per plane and chunk; the 26 left quantize and reorder the rows
    assert asm.count("vpbroadcastd") > 2 * asm.count("vpshufb"), "plane words should be broadcast, not shuffled"


@pytest.mark.parametrize(
    ("bits", "codebook", "n", "k", "b"),
    [(4, None, 37, 650, 1), (2, "offset_binary", 29, 512, 5), (4, None, 64, 700, 1)],
)
def test_batch_one_rows_of_one_block_equal_the_popcount_kernel(bits, codebook, n, k, b, rng, monkeypatch):
    """Batch-1 rows of one block (on AVX-512 four at a time; on AVX2 one by one, measured no
    slower), N not a multiple of four: the popcount kernel's floats."""
    fmt = bp.BitplaneFormat(bits, 8, codebook)
    q, s = qz.quantize_weights(rng.standard_normal((n, k)).astype(np.float32), fmt)
    weights = [_t(bp.pack_weights(q, fmt)), _t(s), _t(rng.standard_normal(n).astype(np.float32))]
    x = _rows(rng, b, k)
    func = kernels.dense_act_func(fmt, n, k, True)
    fast = kernels.build(func, AVX2)
    monkeypatch.setenv("PBTVM_CPU_KERNEL", "popcount")
    slow = kernels.build(func, AVX2)
    assert_same_floats(fast, slow, x, weights, n, range(1, bits + 1))


@pytest.mark.parametrize(("bits", "n", "k", "b"), [(4, 21, 77, 6), (4, 40, 700, 3), (4, 512, 784, 1), (8, 9, 600, 5)])
def test_one_kernel_layer_equals_popcount_kernels(bits, n, k, b, rng, monkeypatch):
    """The float layer (rows quantized inside the kernel) is bit for bit the popcount pack + GEMM's."""
    fmt = bp.BitplaneFormat(bits, 8)
    w = rng.standard_normal((n, k)).astype(np.float32)
    q, ws = qz.quantize_weights(w, fmt)
    x = rng.standard_normal((b, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    func = kernels.dense_act_func(fmt, n, k, True)
    fast = kernels.build(func, AVX2)
    monkeypatch.setenv("PBTVM_CPU_KERNEL", "popcount")
    slow = kernels.build(func, AVX2)
    weights = [_t(bp.pack_weights(q, fmt)), _t(ws), _t(bias)]
    assert_same_floats(fast, slow, x, weights, n, sorted({1, 3, bits} | ({5} if bits > 5 else set())))


@pytest.mark.parametrize(
    ("bits", "n_in", "hidden"),
    [
        (3, 600, 130),  # past one tile the input leg decodes each row once, the hidden leg (K < 512) tiles
        (8, 1100, 520),  # both legs decode once (split codes), rows of different lengths in one buffer
    ],
)
def test_lstm_step_matches_the_reference(bits, n_in, hidden, rng, monkeypatch):
    """The decoder's step (input projection inside) on AVX2: the popcount step's h', c' up to the
    polynomial exp, and the float64 reference's; one tile (batch 4) and past it (each row decoded
    once, tiles of 4, 4 and 1 over its codes)."""
    from .test_cpu_vnni_lstm import assert_step_matches, input_step_case

    fmt = bp.BitplaneFormat(bits, 8)
    func = kernels.lstm_cell_input_func(fmt, n_in, hidden, True)
    assert CPUVnniLstmCell(AVX2).matches(func)
    fast = kernels.build(func, AVX2)
    monkeypatch.setenv("PBTVM_CPU_KERNEL", "popcount")
    slow = kernels.build(func, AVX2)
    for batch in (4, 9):
        arrays = input_step_case(rng, fmt, n_in, hidden, batch)
        assert_step_matches(fast, slow, arrays, sorted({1, 3, bits}), fmt, batch, hidden)


def test_lstm_time_loop_step_past_one_tile(rng, monkeypatch):
    """The time loop's step (``gx`` of the sequence read at step ``t``) at 520 units (one block):
    batch 6 decodes each row once."""
    from .test_cpu_vnni_lstm import assert_given_projection_step

    assert_given_projection_step(AVX2, 520, 4, [6], True, rng, monkeypatch)
