"""The ``lut16x4`` weight layout and the AVX2 table-lookup PB kernel (:mod:`pbtvm.ops.pb_lut`).

The layout is checked against the numpy reference on its own (round trip, product, the word
accessor the portable TE kernels read it through); the kernel's integer product equals the
reference exactly at every ``bitlayers``, and its float layer equals the byte-code kernel's bit
for bit. Built for Haswell (AVX2), so the kernel tests need a host with AVX2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pbtvm
from pbtvm import bitplane as bp
from pbtvm import kernels
from pbtvm._tvm import tir, tvm
from pbtvm.bitplane.lut_layout import from_lut_tiles, to_lut_tiles
from pbtvm.errors import InputError
from pbtvm.ops.pb_lut import pair_coefficients, pb_lut_func, unsupported_reason
from pbtvm.ops.pb_vnni import SERIAL_WEIGHT_BITS, target_supports
from pbtvm.schedules import rule_for
from pbtvm.schedules.cpu_vnni import CPUVnniGemm, CPUVnniLstmCell, one_kernel_layer
from pbtvm.target import DYNAMIC_BATCH, resolve_target, weight_layout

from .test_cpu_one_kernel_layer import _rows
from .test_cpu_vnni import _codes, _t, assert_exact_at_every_bitlayers

HOST = resolve_target("llvm")
AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
needs_avx2 = pytest.mark.skipif(not target_supports(HOST, ("avx2",)), reason="host CPU lacks AVX2")
LUT = "lut16x4"


@pytest.mark.parametrize(
    ("bits", "n", "k"), [(1, 1, 1), (2, 16, 32), (3, 17, 33), (4, 40, 100), (8, 5, 650), (16, 3, 70)]
)
def test_layout_round_trip_and_product_match_the_plane_major_layout(bits, n, k):
    rng = np.random.default_rng(bits)
    lut, plain = bp.BitplaneFormat(bits, 8, layout=LUT), bp.BitplaneFormat(bits, 8)
    q, xq = _codes(rng, plain, n, k, 3)
    packed = bp.pack_weights(q, lut)
    assert packed.shape == lut.weight_shape(n, k) and packed.dtype == np.uint32
    np.testing.assert_array_equal(bp.unpack_weights(packed, k, lut, n_rows=n), q)
    planes = bp.pack_weights(q, plain)
    np.testing.assert_array_equal(from_lut_tiles(to_lut_tiles(planes), bits, n), planes)
    xp = bp.pack_activations(xq, plain)
    for layers in range(1, bits + 1):
        np.testing.assert_array_equal(
            bp.bitplane_matmul(packed, xp, lut, layers, n_rows=n), bp.bitplane_matmul(planes, xp, plain, layers)
        )


def test_layout_places_each_bit_where_the_kernel_reads_it():
    """Byte ``2 m + q`` of octet ``o``: row ``m``, plane ``q``; nibble bit ``j``: input ``8 o + 4 h + j``."""
    planes = np.zeros((2, 16, 1), np.uint32)
    planes[1, 5, 0] = 1 << 13  # plane 1, row 5, input 13 = 8 * 1 + 4 * 1 + 1
    tiles = to_lut_tiles(planes).view(np.uint8).reshape(1, 1, 4, 32)
    want = np.zeros_like(tiles)
    want[0, 0, 1, 2 * 5 + 1] = 1 << (4 + 1)
    np.testing.assert_array_equal(tiles, want)


def test_layout_errors_name_the_problem():
    with pytest.raises(InputError, match="pass n_rows"):
        from_lut_tiles(np.zeros((1, 1, 4, 8), np.uint32), 2, None)
    with pytest.raises(InputError, match="hold 2 planes, not 4"):
        from_lut_tiles(np.zeros((1, 1, 4, 8), np.uint32), 4, 3)
    with pytest.raises(ValueError, match="weight_word"):
        bp.BitplaneFormat(4, layout=LUT).weight_index(0, 0, 0)
    with pytest.raises(InputError, match="table-lookup layout of x86 CPUs"):
        weight_layout(LUT, tvm.target.Target({"kind": "cuda", "arch": "sm_90"}))
    with pytest.raises(InputError, match="no AVX2"):
        weight_layout(LUT, tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v2"}))
    assert weight_layout(LUT, AVX2) == LUT


def test_auto_picks_the_layout_for_small_decoder_batches_on_avx2(monkeypatch):
    """A known batch (a decoder's) of at most 2 rows or a dynamic batch, 2..8 bits, a CPU whose
    best byte-code kernel is AVX2's; an unknown batch (an LSTM's rows) and the portable-kernel
    switch keep kNW."""
    icelake = tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server"})  # AVX-512 VNNI
    assert weight_layout("auto", AVX2, 4, 8, 1) == LUT
    assert weight_layout("auto", AVX2, 8, 8, 2) == LUT
    assert weight_layout("auto", AVX2, 2, 8, DYNAMIC_BATCH) == LUT
    for args in (
        (4, 8, 4),
        (4, 8, None),
        (1, 8, 1),
        (9, 8, 1),
        (4, 16, 1),
        (1, 8, DYNAMIC_BATCH),
        (4, 16, DYNAMIC_BATCH),
    ):
        assert weight_layout("auto", AVX2, *args) == "kNW", args
    assert weight_layout("auto", icelake, 4, 8, 1) == weight_layout("auto", icelake, 4, 8, DYNAMIC_BATCH) == "kNW"
    assert weight_layout("auto", AVX2) == "kNW"  # no batch given: compile then decides from the model
    monkeypatch.setenv("PBTVM_CPU_KERNEL", "popcount")
    assert weight_layout("auto", AVX2, 4, 8, 1) == weight_layout("auto", AVX2, 4, 8, DYNAMIC_BATCH) == "kNW"


def test_pair_coefficients_rebuild_the_plane_coefficients():
    for fmt in (bp.BitplaneFormat(b) for b in range(1, 9)):
        pairs = pair_coefficients(fmt)
        rebuilt = [c for s, a, b in pairs for c in (s * a, s * b)][: fmt.bits]
        assert rebuilt == list(fmt.plane_coefficients()) and all(abs(a) <= 2 and 0 <= b <= 1 for _, a, b in pairs)
    assert pair_coefficients(bp.BitplaneFormat(4, codebook="offset_binary")) == [(4, 2, 1), (1, 2, 1)]


def test_unsupported_formats_are_refused_with_the_reason():
    assert "reads the lut16x4 layout" in unsupported_reason(bp.BitplaneFormat(4), 64)
    assert "at most 8 bits" in unsupported_reason(bp.BitplaneFormat(9, layout=LUT), 64)
    assert "at most 8 bits" in unsupported_reason(bp.BitplaneFormat(4, 16, layout=LUT), 64)
    assert "too large" in unsupported_reason(bp.BitplaneFormat(8, layout=LUT), 1 << 16)
    with pytest.raises(ValueError, match="cannot compute this layer"):
        pb_lut_func(bp.BitplaneFormat(4), 8, 64, tir.Var("batch", "int64"), dense=False)


def test_portable_kernel_reads_the_layout():
    """Where the table-lookup kernel does not run, the popcount TE kernel reads ``lut16x4`` words."""
    fmt = bp.BitplaneFormat(3, 8, layout=LUT)
    q, xq = _codes(np.random.default_rng(1), fmt, 19, 70, 2)
    kern = kernels.build(kernels.int_product_func(fmt, 19, 70), tvm.target.Target("llvm"), schedule=False)
    assert_exact_at_every_bitlayers(kern, fmt, q, xq)


@needs_avx2
@pytest.mark.parametrize(
    ("bits", "act_bits", "codebook", "n", "k", "b"),
    [
        (1, 8, None, 7, 33, 1),
        (2, 2, None, 9, 64, 5),
        (3, 5, None, 17, 129, 3),
        (4, 8, None, 13, 100, 1),
        (4, 8, None, 70, 2100, 3),  # more than one 512-input widening, odd N
        (5, 3, None, 5, 300, 2),
        (6, 8, "offset_binary", 33, 200, 2),
        (7, 4, None, 11, 200, 3),
        (8, 8, None, 21, 1030, 2),
        (4, 8, None, 2100, 1024, 3),  # parallel tasks (>= 2^23 weight bits), a partial last task
    ],
)
def test_integer_product_is_exact_at_every_bitlayers(bits, act_bits, codebook, n, k, b):
    fmt = bp.BitplaneFormat(bits, act_bits, codebook, layout=LUT)
    q, xq = _codes(np.random.default_rng(bits * 100 + k), fmt, n, k, b)
    func = kernels.int_product_func(fmt, n, k)
    rule = rule_for(func, AVX2)
    assert isinstance(rule, CPUVnniGemm) and rule.knob_settings(func) == [{}]
    func = rule.apply(func).mod["main"]
    assert func.attrs["pbtvm.cpu_kernel"] == "avx2_lut"
    assert_exact_at_every_bitlayers(kernels.build(func, AVX2, schedule=False), fmt, q, xq)


@needs_avx2
@pytest.mark.parametrize(
    ("bits", "act_bits", "codebook", "n", "k", "b"),
    [
        (3, 8, None, 17, 129, 5),  # a partial last chunk, a partial tile
        (4, 8, None, 70, 2100, 9),  # two tasks (serial), the second partial; batch tiles 4 + 4 + 1
        (5, 3, None, 5, 300, 7),
        (6, 8, "offset_binary", 33, 200, 5),
        (7, 4, None, 16, 4096, 6),  # rows a line more than K apart
        (8, 8, None, 21, 1030, 6),  # split codes
        (8, 8, "offset_binary", 19, 700, 5),
        (4, 8, None, 2070, 1100, 8),  # parallel tasks, the last one partial
    ],
)
def test_rows_past_the_lookups_are_decoded_once_and_exact(bits, act_bits, codebook, n, k, b):
    """Past :func:`~pbtvm.ops.lut_decoded.lookup_max_rows` activation rows the kernel turns each
    tile back into plane words and decodes each row once (:mod:`pbtvm.ops.lut_decoded`): exact at
    every ``bitlayers``, as the lookups of the same kernel at fewer rows."""
    from pbtvm.ops import lut_decoded

    fmt = bp.BitplaneFormat(bits, act_bits, codebook, layout=LUT)
    most = lut_decoded.lookup_max_rows(fmt)
    assert most is not None and b > most and lut_decoded.decoded_problem(fmt, k) is None
    q, xq = _codes(np.random.default_rng(bits * 10 + b), fmt, n, k, b)
    kern = kernels.build(
        rule_for(f := kernels.int_product_func(fmt, n, k), AVX2).apply(f).mod["main"], AVX2, schedule=False
    )
    if n > 2000:  # parallel tasks of 4 tiles, the last one partial
        assert n * k * bits >= SERIAL_WEIGHT_BITS and -(-n // 16) % 4
    assert_exact_at_every_bitlayers(kern, fmt, q, xq)
    assert_exact_at_every_bitlayers(kern, fmt, q, xq[:most])  # the lookups
    assert_exact_at_every_bitlayers(kern, fmt, q, xq[: most + 1])
    wp, xp = _t(bp.pack_weights(q, fmt)), _t(bp.pack_activations(xq, fmt))
    out = _t(np.zeros((b, n), np.int32))
    for layers in range(fmt.bits, 0, -1):  # fewer planes after more: the words left from before are not read
        kern(xp, _t(xq.sum(1).astype(np.int32)), wp, layers, out)
        want = bp.bitplane_matmul(wp.numpy(), xp.numpy(), fmt, layers, n_rows=n)
        np.testing.assert_array_equal(out.numpy(), want, err_msg=f"L={layers} after more")
    with pytest.raises(ValueError, match="bitlayers must be in"):  # a raw call past bits is refused
        kern(xp, _t(xq.sum(1).astype(np.int32)), wp, fmt.bits + 3, out)


@needs_avx2
def test_extreme_codes_stay_exact():
    """Every weight the most negative code and every activation -qmax: the table's and the int16
    sums' bounds (``T = 512 - 508``, 32 blocks before widening) at their limits."""
    fmt = bp.BitplaneFormat(8, 8, layout=LUT)
    n, k = 17, 1100
    q = np.full((n, k), -128)
    xq = np.full((6, k), -127)
    xq[1::2] = 127
    kern = kernels.build(
        rule_for(f := kernels.int_product_func(fmt, n, k), AVX2).apply(f).mod["main"], AVX2, schedule=False
    )
    assert_exact_at_every_bitlayers(kern, fmt, q, xq[:2])  # the lookups
    assert_exact_at_every_bitlayers(kern, fmt, q, xq)  # the decoded rows (lut_decoded)


@needs_avx2
@pytest.mark.parametrize(
    ("bits", "act_bits", "codebook", "n", "k", "b"),
    [
        (4, 8, None, 37, 300, 3),
        (1, 8, None, 16, 650, 1),
        (8, 8, None, 20, 520, 4),
        (3, 6, "offset_binary", 21, 90, 3),
        (4, 8, None, 37, 300, 7),  # the decoded rows (lut_decoded)
        (8, 8, None, 20, 520, 9),
    ],
)
def test_one_kernel_layer_equals_the_byte_code_kernels_floats(bits, act_bits, codebook, n, k, b):
    """The float layer (rows quantized inside) gives the same floats as the ``kNW`` byte-code kernel."""
    rng = np.random.default_rng(bits)
    lut = bp.BitplaneFormat(bits, act_bits, codebook, layout=LUT)
    plain = bp.BitplaneFormat(bits, act_bits, codebook)
    assert one_kernel_layer(lut, k, AVX2) and one_kernel_layer(plain, k, AVX2)
    q, _ = _codes(rng, plain, n, k, 1)
    w_scale = rng.uniform(0.01, 0.1, plain.scale_shape(n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)

    def build(fmt):
        func = kernels.dense_act_func(fmt, n, k, bias=True)
        return kernels.build(rule_for(func, AVX2).apply(func).mod["main"], AVX2, schedule=False)

    fast, slow = build(lut), build(plain)
    x = _rows(rng, b, k)
    for layers in range(1, bits + 1):
        got, want = _t(np.full((b, n), 7, np.float32)), _t(np.zeros((b, n), np.float32))
        fast(_t(x), _t(bp.pack_weights(q, lut)), _t(w_scale), _t(bias), layers, got)
        slow(_t(x), _t(bp.pack_weights(q, plain)), _t(w_scale), _t(bias), layers, want)
        np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=f"bitlayers={layers}")


@needs_avx2
def test_compile_with_the_layout_matches_the_default_layout():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(70, 40), torch.nn.ReLU(), torch.nn.Linear(40, 10)).eval()
    x = torch.randn(3, 70)
    lut = pbtvm.compile(model, x, target="llvm", bits=4, layout=LUT)
    plain = pbtvm.compile(model, x, target="llvm", bits=4)
    np.testing.assert_array_equal(np.asarray(lut(x)), np.asarray(plain(x)))


class _LSTMHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.head = torch.nn.LSTM(70, 16), torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


@needs_avx2
def test_compile_auto_picks_the_layout_for_a_static_batch_of_at_most_two_rows():
    """``dynamic_batch=False``: every dense layer's rows are known when it compiles, so on an AVX2
    CPU without AVX-512 VNNI ``auto`` takes the table lookup where no layer runs more than 2 rows
    (the same floats as ``kNW``); more rows (batch x time too) keep ``kNW``. A dynamic batch takes
    it too (past a few rows the kernel decodes each weight row once, :mod:`pbtvm.ops.lut_decoded`),
    except on AVX-VNNI CPUs, and so does a model with an LSTM at any batch (its step too)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(70, 40), torch.nn.ReLU(), torch.nn.Linear(40, 10)).eval()
    x = torch.randn(2, 70)
    static = pbtvm.compile(model, x, target=AVX2, bits=4, dynamic_batch=False)
    assert static.format.layout == LUT
    plain = pbtvm.compile(model, x, target=AVX2, bits=4, dynamic_batch=False, layout="kNW")
    assert plain.format.layout == "kNW"  # an explicit layout stays as asked
    np.testing.assert_array_equal(np.asarray(static(x)), np.asarray(plain(x)))
    dynamic = pbtvm.compile(model, x, target=AVX2, bits=4)
    assert dynamic.format.layout == LUT
    many = torch.randn(9, 70)  # past the lookups' rows: the decoded path, the same floats
    np.testing.assert_array_equal(
        np.asarray(dynamic(many)), np.asarray(pbtvm.compile(model, x, target=AVX2, bits=4, layout="kNW")(many))
    )
    alderlake = tvm.target.Target({"kind": "llvm", "mcpu": "alderlake"})  # AVX-VNNI: its own ymm kernels
    assert weight_layout("auto", alderlake, 4, 8, DYNAMIC_BATCH) == "kNW"
    for rows in (torch.randn(3, 70), torch.randn(1, 3, 70)):
        assert pbtvm.compile(model, rows, target=AVX2, bits=4, dynamic_batch=False).format.layout == "kNW"
    # an LSTM: its step decodes its rows past a few too, so any batch takes the table lookup (the
    # same floats as kNW, at 1 and at 6 rows per step); not on AVX-VNNI CPUs, nor past the kernel's K
    head = _LSTMHead().eval()
    for example, dynamic_batch in ((torch.randn(2, 1, 70), False), (torch.randn(2, 2, 70), True)):
        lstm = pbtvm.compile(head, example, target=AVX2, bits=4, dynamic_batch=dynamic_batch)
        assert lstm.format.layout == LUT, dynamic_batch
    knw = pbtvm.compile(head, example, target=AVX2, bits=4, layout="kNW")
    for seq in (torch.randn(3, 1, 70), torch.randn(3, 6, 70)):
        np.testing.assert_array_equal(np.asarray(lstm(seq)), np.asarray(knw(seq)))
    assert pbtvm.compile(head, example, target=alderlake, bits=4).format.layout == "kNW"
    # compile_lstm likewise, its projections with it
    from pbtvm.lstm import compile_lstm

    lut, knw = (compile_lstm(head.lstm, AVX2, bits=4, **kw) for kw in ({}, {"layout": "kNW"}))
    assert lut.format.layout == LUT and knw.format.layout == "kNW"
    assert {m.format.layout for m in (*lut._proj, *lut._cells)} == {LUT}
    for seq in (torch.randn(3, 1, 70), torch.randn(3, 6, 70)):
        (y_lut, (h_lut, c_lut)), (y_knw, (h_knw, c_knw)) = lut(seq), knw(seq)
        for a, b in ((y_lut, y_knw), (h_lut, h_knw), (c_lut, c_knw)):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_lstm_weight_sizes_reads_every_placeholder_lstm():
    """The row lengths ``auto`` checks for an LSTM model: W_ih and W_hh of every layer and
    direction of every LSTM, batch_first or not, before the lowering."""
    from pbtvm.model_import import import_model
    from pbtvm.relay_passes import lstm_weight_sizes

    class TwoLSTMs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.LSTM(30, 12, num_layers=2, bidirectional=True, batch_first=True)
            self.b = torch.nn.LSTM(24, 20)

        def forward(self, x):
            return self.b(self.a(x)[0])[0]

    mod, _, _ = import_model(TwoLSTMs().eval(), (torch.randn(2, 3, 30),))
    assert sorted(lstm_weight_sizes(mod)) == sorted([30, 12, 30, 12, 24, 12, 24, 12, 24, 20])


class _SelfAttentionHead(torch.nn.Module):
    """A projection, attention scores over 4 heads (activation x activation matmuls of 4 x 2 rows)
    and a dense head: two dense layers of 2 rows each."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = torch.nn.Linear(70, 40), torch.nn.Linear(40, 10)

    def forward(self, x):
        h = self.proj(x).reshape(2, 4, 10).transpose(0, 1)  # [heads, rows, 10]
        mixed = torch.softmax(h @ h.transpose(1, 2), dim=-1) @ h
        return self.head(mixed.transpose(0, 1).reshape(2, 40))


@needs_avx2
def test_static_batch_layout_counts_dense_layers_not_attention_scores():
    """Only matmuls by a constant weight decide the static-batch layout: the attention's
    activation x activation matmuls (8 rows, not converted) do not keep the model off the table
    lookup its 2-row dense layers are faster with; the floats are those of ``kNW``."""
    from pbtvm.model_import import import_model
    from pbtvm.relay_passes import dense_shapes

    torch.manual_seed(0)
    model, x = _SelfAttentionHead().eval(), torch.randn(2, 70)
    mod, _, _ = import_model(model, (x,), dynamic_batch=False)
    assert dense_shapes(mod) == [(2, 70), (2, 40)]
    with pytest.warns(UserWarning, match="product.s. of two run-time tensors"):  # the scores stay float
        auto = pbtvm.compile(model, x, target=AVX2, bits=4, dynamic_batch=False)
    assert auto.format.layout == LUT
    with pytest.warns(UserWarning, match="product.s. of two run-time tensors"):
        plain = pbtvm.compile(model, x, target=AVX2, bits=4, dynamic_batch=False, layout="kNW")
    np.testing.assert_allclose(np.asarray(auto(x)), np.asarray(plain(x)), rtol=1e-5, atol=1e-5)


def test_static_batch_layout_needs_every_layer_to_fit_the_table_lookup_kernel():
    """The choice from the dense layers' (rows, K): the most rows decide, and a K the table-lookup
    kernel cannot accumulate in int32 (W8, K of 40,000) keeps ``kNW`` for the whole model."""
    from pbtvm.compiler import _batch_format

    for bits, shapes, layout in [
        (8, [(1, 70), (2, 40)], LUT),
        (8, [(1, 70), (1, 40000)], "kNW"),
        (4, [(1, 70), (3, 40)], "kNW"),
        (4, [(1, 70), (None, 40)], "kNW"),
        (4, [], "kNW"),
    ]:
        fmt = bp.BitplaneFormat(bits, 8)
        assert _batch_format(fmt, AVX2, shapes).layout == layout, (bits, shapes)
    # a dynamic batch: any rows, the same K check; not on AVX-VNNI or AVX-512 VNNI CPUs
    alderlake = tvm.target.Target({"kind": "llvm", "mcpu": "alderlake"})
    icelake = tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server"})
    for fmt, target, shapes, layout in [
        (bp.BitplaneFormat(4, 8), AVX2, [(None, 70), (None, 40)], LUT),
        (bp.BitplaneFormat(8, 8), AVX2, [(None, 70), (None, 40000)], "kNW"),
        (bp.BitplaneFormat(4, 8), AVX2, [], "kNW"),
        (bp.BitplaneFormat(4, 16), AVX2, [(None, 70)], "kNW"),
        (bp.BitplaneFormat(1, 8), AVX2, [(None, 70)], "kNW"),
        (bp.BitplaneFormat(4, 8), alderlake, [(None, 70)], "kNW"),
        (bp.BitplaneFormat(4, 8), icelake, [(None, 70)], "kNW"),
    ]:
        assert _batch_format(fmt, target, shapes, dynamic=True).layout == layout, (fmt.name, target, shapes)


@needs_avx2
@pytest.mark.parametrize(("bits", "batches"), [(3, [4, 5, 9]), (8, [5])])
def test_lstm_step_decodes_its_rows_past_the_lookups(bits, batches, rng, monkeypatch):
    """Past :data:`~pbtvm.ops.lut_decoded.LOOKUP_MAX_ROWS` activation rows the step's gate rows are
    decoded once each: h', c' bit for bit the lookups' at every bitlayers,
    for both legs (input projection inside), hidden units that end mid-task and mid-tile (38:
    152 gate rows, 9.5 tiles, tasks of 4) and W8's split codes."""
    from pbtvm.ops import lut_decoded

    from .test_cpu_vnni_lstm import _call, input_step_case

    fmt, n_in, hidden = bp.BitplaneFormat(bits, 8, layout=LUT), 70, 38
    func = kernels.lstm_cell_input_func(fmt, n_in, hidden, True)

    def step(lookups_at_every_batch: bool):
        if lookups_at_every_batch:
            monkeypatch.setitem(lut_decoded.LOOKUP_MAX_ROWS, bits, 1 << 30)
        built = kernels.build(rule_for(func, AVX2).apply(func).mod["main"], AVX2, schedule=False)
        monkeypatch.undo()
        return built

    decoded, lookups = step(False), step(True)
    for batch in batches:
        arrays = input_step_case(rng, fmt, n_in, hidden, batch)
        for layers in range(1, bits + 1):
            for got, want in zip(
                _call(decoded, arrays, [layers], batch, hidden),
                _call(lookups, arrays, [layers], batch, hidden),
                strict=True,
            ):
                np.testing.assert_array_equal(got, want, err_msg=f"batch {batch}, bitlayers {layers}")


@needs_avx2
@pytest.mark.parametrize("sequence", [False, True])
def test_lstm_step_with_given_projection_by_lookups_and_decoded_rows(sequence, rng, monkeypatch):
    """The ``gx``-given step (one step, or step ``t`` of the lowered time loop) in ``lut16x4``: the
    lookups at 1 row, the decoded rows at 5, against the popcount step and the reference."""
    from .test_cpu_vnni_lstm import assert_given_projection_step

    assert_given_projection_step(AVX2, 70, 4, [1, 5], sequence, rng, monkeypatch, layout=LUT)


@needs_avx2
@pytest.mark.parametrize(("bits", "n_in", "hidden", "batch"), [(3, 600, 130, 5), (4, 650, 650, 1)])
def test_lstm_step_matches_the_reference(bits, n_in, hidden, batch, monkeypatch):
    """The decoder's step (input projection inside) with its gate rows by table lookup: the
    popcount step's h', c' up to the polynomial exp, and the float64 reference's."""
    from .test_cpu_vnni_lstm import assert_step_matches, input_step_case

    fmt = bp.BitplaneFormat(bits, 8, layout=LUT)
    arrays = input_step_case(np.random.default_rng(hidden), fmt, n_in, hidden, batch)
    func = kernels.lstm_cell_input_func(fmt, n_in, hidden, True)
    rule = rule_for(func, AVX2)
    assert isinstance(rule, CPUVnniLstmCell)
    fast = rule.apply(func).mod["main"]
    assert fast.attrs["pbtvm.cpu_kernel"] == "avx2_lut"
    fast = kernels.build(fast, AVX2, schedule=False)
    monkeypatch.setenv("PBTVM_CPU_KERNEL", "popcount")
    assert_step_matches(fast, kernels.build(func, AVX2), arrays, sorted({1, 2, bits}), fmt, batch, hidden)
