"""The byte-code PB kernels on AVX-VNNI (``vpdpbusd`` on ymm registers) against the numpy reference.

Intel client CPUs from Alder Lake on have no AVX-512 but the VEX-encoded ``vpdpbusd``: the
ymm kernels of :mod:`pbtvm.ops.pb_vnni` take it for their dot products, one instruction per 32
bytes instead of ``vpmaddubsw`` + ``vpmaddwd``, exact in int32 on codes scaled by ``2^(8-k)`` (8-bit
weights keep one code), and decode whole blocks with GFNI in two ymm halves (the chunks after them,
and every chunk without GFNI, by the dword-broadcast masked-add decode). The kernels are built for
Alder Lake (AVX2 + AVX-VNNI + GFNI, no AVX-512), and without GFNI; building and reading their code
needs no such CPU, running them needs one with AVX-VNNI (Sapphire Rapids and Zen 5 have it too).
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
from pbtvm.ops.gfni_decode import block_permutation
from pbtvm.ops.pb_vnni import MAX_ACCUMULATORS_PER_ISA, cpu_isa, target_supports, unsupported_reason
from pbtvm.ops.vnni_rows import split_codes
from pbtvm.schedules import rule_for
from pbtvm.schedules.cpu_vnni import CPUVnniGemm, CPUVnniLstmCell, one_kernel_layer
from pbtvm.target import cpu_flags, resolve_target, weight_layout

from .test_cpu_one_kernel_layer import _rows, assert_same_floats
from .test_cpu_vnni import _codes, _t, assert_exact_at_every_bitlayers

HOST = resolve_target("llvm")
ADL = tvm.target.Target({"kind": "llvm", "mcpu": "alderlake"})
NO_GFNI = tvm.target.Target({"kind": "llvm", "mcpu": "alderlake", "mattr": ["-gfni"]})


def _host_has_avx_vnni() -> bool:
    """The host target's features, or Linux's CPU flags (a virtual machine's CPU model may be
    one LLVM knows without the feature, as a Sapphire Rapids guest detected as Rocket Lake)."""
    return target_supports(HOST, ("avx2", "avxvnni")) or {"avx_vnni", "avx2"} <= cpu_flags()


needs_avx_vnni = pytest.mark.skipif(not _host_has_avx_vnni(), reason="host CPU lacks AVX-VNNI (Alder Lake and newer)")


def _kernel(func, target=ADL):
    rule = rule_for(func, target)
    assert isinstance(rule, CPUVnniGemm) and rule.label == "avxvnni"
    func = rule.apply(func).mod["main"]
    assert func.attrs["pbtvm.cpu_kernel"] == "avx2_vnni"
    return kernels.build(func, target, schedule=False)


def test_isa_of_targets():
    """AVX-VNNI without AVX-512 VNNI is its own instruction set; with both, AVX-512 wins."""
    for mcpu, isa in [("alderlake", "avxvnni"), ("arrowlake", "avxvnni"), ("haswell", "avx2")]:
        assert cpu_isa(tvm.target.Target({"kind": "llvm", "mcpu": mcpu})) == isa, mcpu
    assert cpu_isa(tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"})) == "avx512"
    fmt = bp.BitplaneFormat(8, 8)
    assert not split_codes(fmt, "avxvnni") and split_codes(fmt, "avx2")  # int32 sums: one code per weight
    assert unsupported_reason(fmt, 4096, "avxvnni") is None and one_kernel_layer(fmt, 4096, ADL)
    assert MAX_ACCUMULATORS_PER_ISA["avxvnni"] == MAX_ACCUMULATORS_PER_ISA["avx2"]


def test_kernel_is_avx_vnni_code():
    """``vpdpbusd`` and the GFNI block decode on ymm registers, no ``vpmaddubsw`` left and no zmm
    register (runs anywhere this builds: the code is read, not run)."""
    func = kernels.dense_act_func(bp.BitplaneFormat(8, 8), 16, 600, True)
    rule = rule_for(func, ADL)
    built = kernels.build(rule.apply(func).mod["main"], ADL, schedule=False)
    asm = str(built.mod.inspect_source("asm"))
    assert "vpdpbusd" in asm and "vgf2p8affineqb" in asm and "ymm" in asm
    assert "vpmaddubsw" not in asm and "zmm" not in asm
    plain = kernels.build(rule_for(func, NO_GFNI).apply(func).mod["main"], NO_GFNI, schedule=False)
    assert "vgf2p8affineqb" not in str(plain.mod.inspect_source("asm"))  # the masked-add decode


def test_ymm_block_order_is_a_permutation_of_the_block():
    """Two 256-input halves: each half's qwords hold its own inputs, every input once."""
    for bits in range(1, 9):
        perm = block_permutation(bits, 32)
        assert sorted(perm) == list(range(64)) and max(perm[:32]) < 32 <= min(perm[32:]), bits


@needs_avx_vnni
@pytest.mark.parametrize(
    ("bits", "act_bits", "codebook", "n", "k", "b"),
    [
        (1, 8, None, 7, 33, 1),
        (2, 2, None, 9, 64, 5),
        (3, 5, None, 17, 129, 9),
        (4, 8, None, 13, 100, 6),
        (7, 8, None, 11, 200, 3),
        (8, 8, None, 33, 300, 6),
        (8, 8, "offset_binary", 5, 100, 1),
        # K >= 512: whole blocks by the ymm GFNI decode (two halves each), the chunks after them
        # by the masked-add decode in the dword-broadcast order
        (1, 8, None, 7, 1100, 2),
        (2, 8, None, 6, 600, 9),
        (3, 8, "offset_binary", 9, 1030, 5),
        (4, 8, None, 70, 1100, 5),
        (5, 6, "offset_binary", 6, 600, 1),
        (6, 4, None, 3, 2048, 6),
        (7, 8, None, 13, 1100, 3),
        (8, 6, None, 21, 1030, 7),
        (8, 8, None, 21, 520, 9),
    ],
)
@pytest.mark.parametrize("gfni", [True, False])
def test_int_product_exact(bits, act_bits, codebook, n, k, b, gfni, rng):
    """Odd N, K not a multiple of 32 or 64, every batch remainder of the tile, every bitlayers;
    with GFNI (Alder Lake) and without it (every chunk by the masked-add decode; from batch 2
    rows of whole blocks decoded once)."""
    fmt = bp.BitplaneFormat(bits, act_bits, codebook)
    q, xq = _codes(rng, fmt, n, k, b)
    target = ADL if gfni else NO_GFNI
    assert_exact_at_every_bitlayers(_kernel(kernels.int_product_func(fmt, n, k), target), fmt, q, xq)


@needs_avx_vnni
@pytest.mark.parametrize("k", [150, 1100])
def test_eight_bit_extremes_are_exact(k):
    """Codes 127 (plain 255) and -128 (plain 0) against -qmax and qmax: ``vpdpbusd`` adds the
    four products of a dword in int32, where AVX2's int16 pair sums would saturate."""
    fmt = bp.BitplaneFormat(8, 8)
    kern = _kernel(kernels.int_product_func(fmt, 3, k))
    q = np.full((3, k), 127)
    q[1] = -128
    q[2, ::2] = -128
    xq = np.full((2, k), -127)
    xq[1, 1::2] = 127
    assert_exact_at_every_bitlayers(kern, fmt, q, xq)


@needs_avx_vnni
@pytest.mark.parametrize(("bits", "n", "k", "b"), [(4, 21, 77, 6), (4, 40, 700, 3), (8, 9, 600, 5)])
def test_one_kernel_layer_equals_popcount_kernels(bits, n, k, b, rng, monkeypatch):
    """The float layer (rows quantized inside the kernel) is bit for bit the popcount pack + GEMM's."""
    fmt = bp.BitplaneFormat(bits, 8)
    q, ws = qz.quantize_weights(rng.standard_normal((n, k)).astype(np.float32), fmt)
    func = kernels.dense_act_func(fmt, n, k, True)
    fast = kernels.build(func, ADL)
    monkeypatch.setenv("PBTVM_CPU_KERNEL", "popcount")
    slow = kernels.build(func, ADL)
    weights = [_t(bp.pack_weights(q, fmt)), _t(ws), _t(rng.standard_normal(n).astype(np.float32))]
    assert_same_floats(fast, slow, _rows(rng, b, k), weights, n, sorted({1, 3, bits}))


@needs_avx_vnni
@pytest.mark.parametrize(("bits", "n_in", "hidden", "gfni"), [(8, 1100, 520, True), (4, 600, 520, False)])
def test_lstm_step_matches_the_reference(bits, n_in, hidden, gfni, rng, monkeypatch):
    """The decoder's step (input projection inside), with and without GFNI: one row, one tile
    and past it (each row decoded once): the popcount step's h', c' up to the polynomial exp,
    and the float64 reference's."""
    from .test_cpu_vnni_lstm import assert_step_matches, input_step_case

    target = ADL if gfni else NO_GFNI
    fmt = bp.BitplaneFormat(bits, 8)
    func = kernels.lstm_cell_input_func(fmt, n_in, hidden, True)
    assert CPUVnniLstmCell(target).matches(func)
    fast = kernels.build(func, target)
    monkeypatch.setenv("PBTVM_CPU_KERNEL", "popcount")
    slow = kernels.build(func, target)
    for batch in (1, 4, 9):
        arrays = input_step_case(rng, fmt, n_in, hidden, batch)
        assert_step_matches(fast, slow, arrays, sorted({1, 4, bits}), fmt, batch, hidden)


@needs_avx_vnni
@pytest.mark.parametrize("gfni", [True, False])
def test_lstm_time_loop_step(gfni, rng, monkeypatch):
    """The time loop's step (``gx`` of the sequence read at step ``t``) at 520 units (one block):
    batch 2 (one tile) and 6 (each row decoded once)."""
    from .test_cpu_vnni_lstm import assert_given_projection_step

    assert_given_projection_step(ADL if gfni else NO_GFNI, 520, 4, [2, 6], True, rng, monkeypatch)


@needs_avx_vnni
def test_parallel_gemm_is_exact(rng):
    """A layer past the serial threshold (2^23 weight bits): tasks of 64 rows in parallel, the
    last one partial, rows decoded once at batch 6."""
    fmt = bp.BitplaneFormat(4, 8)
    q, xq = _codes(rng, fmt, 2100, 1100, 6)
    assert_exact_at_every_bitlayers(_kernel(kernels.int_product_func(fmt, 2100, 1100)), fmt, q, xq)


def test_auto_layout_takes_the_table_lookup_where_it_was_measured_faster():
    """With GFNI the byte-code kernel's ymm block decode ties with the lookup at W8 and wins at W4
    from two rows: ``auto`` picks the lookup for rows x bits <= 4. Without GFNI (the masked-add
    decode) as on AVX2: 1-2 rows (BENCHMARKS.md, nineteenth session)."""
    for bits, rows, layout in [(2, 1, "lut16x4"), (4, 1, "lut16x4"), (2, 2, "lut16x4"), (4, 2, "kNW"), (8, 1, "kNW")]:
        assert weight_layout("auto", ADL, bits, 8, rows) == layout, (bits, rows)
    no_gfni = tvm.target.Target({"kind": "llvm", "mcpu": "alderlake", "mattr": ["-gfni"]})
    assert weight_layout("auto", no_gfni, 8, 8, 2) == "lut16x4"
    assert weight_layout("auto", no_gfni, 4, 8, 4) == "kNW"
    assert weight_layout("auto", ADL) == "kNW"


@needs_avx_vnni
def test_compile_gives_the_avx2_kernels_floats():
    """``pbtvm.compile`` for Alder Lake: the same floats as the AVX2 builds, its byte-code kernel
    (``kNW``) and the layout ``auto`` gives it with a dynamic batch (``lut16x4``, here past the
    lookups' rows): exact products, the same epilogue."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(700, 40), torch.nn.ReLU(), torch.nn.Linear(40, 10)).eval()
    x = torch.randn(5, 700)
    haswell = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    for bits in (4, 8):
        got = pbtvm.compile(model, x, target=ADL, bits=bits)
        assert got.format.layout == "kNW"
        for layout in ("kNW", "auto"):
            want = pbtvm.compile(model, x, target=haswell, bits=bits, layout=layout)
            assert want.format.layout == ("kNW" if layout == "kNW" else "lut16x4")
            np.testing.assert_array_equal(np.asarray(got(x)), np.asarray(want(x)))


def test_which_rows_are_decoded_once():
    """Whole blocks and 3+ bits; with the zmm GFNI decode only rows with chunks after their
    blocks; from batch 2 with the masked-add decode, past one tile with GFNI."""
    from pbtvm.ops.vnni_batch import decode_once_past, decodes_once
    from pbtvm.ops.vnni_rows import Kernel

    def kern(bits: int, k_dim: int, isa: str, gfni: bool) -> Kernel:
        words = bp.BitplaneFormat.words(k_dim)
        full, tail = divmod(words, 2)
        return Kernel(bp.BitplaneFormat(bits), 8, full, tail, *[None] * 7, blocks=words // 16, gfni=gfni, isa=isa)

    assert decodes_once(kern(4, 1100, "avxvnni", True)) and decodes_once(kern(4, 1024, "avxvnni", True))
    assert decodes_once(kern(4, 1100, "avx512", True)) and not decodes_once(kern(4, 1024, "avx512", True))
    assert decodes_once(kern(4, 1024, "avx512", False)) and decodes_once(kern(3, 600, "avx2", False))
    assert not decodes_once(kern(2, 1100, "avxvnni", True)) and not decodes_once(kern(8, 480, "avx2", False))
    assert decode_once_past(kern(4, 1100, "avxvnni", True), 4) == 4
    assert decode_once_past(kern(4, 1100, "avx2", False), 4) == 1
