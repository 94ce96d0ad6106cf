"""Standalone PB kernels (outside a model): for tests, benchmarks and tuning.

Each builder returns the scheduled PrimFunc; :func:`build` compiles it for a target.
"""

from __future__ import annotations

from ._tvm import te, tir, tvm
from .bitplane import BitplaneFormat
from .names import ATTR_BITS, ATTR_IN_BLOCK_MAX_BATCH, ATTR_INPUT_SIZE, KernelKind
from .ops import (
    act_quantize_pack,
    kernel_attrs,
    pb_dense,
    pb_dense_act,
    pb_int_product,
    pb_lstm_cell,
    pb_lstm_cell_input,
)


def _batch_var() -> tir.Var:
    return tir.Var("batch", "int64")


def act_pack_func(fmt: BitplaneFormat, k_dim: int) -> tir.PrimFunc:
    """``(x f32 [B, K]) -> (xp, x_scale, rowsum)`` with a symbolic B."""
    x = te.placeholder((_batch_var(), k_dim), "float32", "x")
    return te.create_prim_func([x, *act_quantize_pack(x, fmt)]).with_attrs(
        kernel_attrs(KernelKind.ACT_PACK, fmt, k_dim)
    )


def _operands(fmt: BitplaneFormat, n_out: int, k_dim: int, batch: int | None = None) -> tuple:
    batch = _batch_var() if batch is None else batch
    xp = te.placeholder(fmt.act_shape(batch, k_dim), "uint32", "xp")
    xs = te.placeholder((batch,), "float32", "x_scale")
    rs = te.placeholder((batch,), fmt.accumulator_dtype(k_dim), "rowsum")
    wp = te.placeholder(fmt.weight_shape(n_out, k_dim), "uint32", "wp")
    return xp, xs, rs, wp, tir.Var("bitlayers", "int64")


def int_product_func(fmt: BitplaneFormat, n_out: int, k_dim: int) -> tir.PrimFunc:
    """``(xp, rowsum, wp, bitlayers) -> acc [B, N]`` (exact integers)."""
    xp, _, rs, wp, layers = _operands(fmt, n_out, k_dim)
    acc = pb_int_product(xp, rs, wp, layers, fmt, k_dim, n_out)
    return te.create_prim_func([xp, rs, wp, layers, acc]).with_attrs(kernel_attrs(KernelKind.GEMM, fmt, k_dim))


def dense_func(
    fmt: BitplaneFormat,
    n_out: int,
    k_dim: int,
    bias: bool = True,
    batch: int | None = None,
    activation: str | None = None,
) -> tir.PrimFunc:
    """``(xp, x_scale, rowsum, wp, w_scale[, bias], bitlayers) -> y f32 [B, N]``, B symbolic or ``batch``.

    ``w_scale`` has ``fmt.scale_shape(N)`` (``[2, N]`` scales and zero points for offset binary),
    as in every builder here. ``activation``: applied to every output (:func:`pbtvm.ops.pb_dense`).
    """
    xp, xs, rs, wp, layers = _operands(fmt, n_out, k_dim, batch)
    ws = te.placeholder(fmt.scale_shape(n_out), "float32", "w_scale")
    b = te.placeholder((n_out,), "float32", "bias") if bias else None
    y = pb_dense(xp, xs, rs, wp, ws, b, layers, fmt, k_dim, activation=activation)
    args = [xp, xs, rs, wp, ws] + ([b] if bias else []) + [layers, y]
    return te.create_prim_func(args).with_attrs(kernel_attrs(KernelKind.GEMM, fmt, k_dim, activation))


def dense_act_func(
    fmt: BitplaneFormat, n_out: int, k_dim: int, bias: bool = True, activation: str | None = None
) -> tir.PrimFunc:
    """``(x f32 [B, K], wp, w_scale[, bias], bitlayers) -> y f32 [B, N]``: pack and PB GEMM in one
    (``activation`` applied to every output)."""
    x = te.placeholder((_batch_var(), k_dim), "float32", "x")
    wp = te.placeholder(fmt.weight_shape(n_out, k_dim), "uint32", "wp")
    ws = te.placeholder(fmt.scale_shape(n_out), "float32", "w_scale")
    b = te.placeholder((n_out,), "float32", "bias") if bias else None
    layers = tir.Var("bitlayers", "int64")
    y = pb_dense_act(x, wp, ws, b, layers, fmt, activation)
    args = [x, wp, ws] + ([b] if bias else []) + [layers, y]
    return te.create_prim_func(args).with_attrs(kernel_attrs(KernelKind.DENSE_ACT, fmt, k_dim, activation))


def compiled_dense_func(
    fmt: BitplaneFormat, n_out: int, k_dim: int, target: tvm.target.Target, bias: bool = True, tune_batch: int = 1
) -> tir.PrimFunc:
    """The PB product PrimFunc ``pbtvm.compile`` builds on ``target`` for a dense layer with a
    symbolic batch whose input no other layer reads (``relay_passes.pb_linear_rewrite``), tuned at
    ``tune_batch``: on CUDA :func:`dense_act_func` with :data:`pbtvm.names.ATTR_IN_BLOCK_MAX_BATCH`
    where :func:`pbtvm.schedules.cuda_bmma.one_launch_layer` says so (it packs its input itself,
    in the block up to that batch); on CPUs :func:`dense_act_func` where
    :func:`pbtvm.schedules.cpu_vnni.one_kernel_layer` says so; else :func:`dense_func` (after
    :func:`act_pack_func`). For benchmarks and tuning that should run what ``compile`` runs."""
    from .schedules.cpu_vnni import one_kernel_layer
    from .schedules.cuda_bmma import one_launch_layer, one_launch_max_batch

    if one_launch_layer(fmt, n_out, k_dim, None, target, tune_batch):
        return dense_act_func(fmt, n_out, k_dim, bias).with_attr(ATTR_IN_BLOCK_MAX_BATCH, one_launch_max_batch(k_dim))
    if one_kernel_layer(fmt, k_dim, target):
        return dense_act_func(fmt, n_out, k_dim, bias)
    return dense_func(fmt, n_out, k_dim, bias)


def lstm_cell_func(fmt: BitplaneFormat, hidden: int) -> tir.PrimFunc:
    """``(gx [B, 4H], h [B, H], c [B, H], wp, w_scale [4H], bitlayers) -> (h', c')``, one LSTM step.

    ``wp``/``w_scale`` hold ``W_hh`` unit-major (see :func:`pbtvm.ops.unit_major_rows`).
    """
    batch = _batch_var()
    gx = te.placeholder((batch, 4 * hidden), "float32", "gx")
    h = te.placeholder((batch, hidden), "float32", "h")
    c = te.placeholder((batch, hidden), "float32", "c")
    wp = te.placeholder(fmt.weight_shape(4 * hidden, hidden), "uint32", "wp")
    ws = te.placeholder(fmt.scale_shape(4 * hidden), "float32", "w_scale")
    layers = tir.Var("bitlayers", "int64")
    outs = pb_lstm_cell(gx, h, c, wp, ws, layers, fmt)
    return te.create_prim_func([gx, h, c, wp, ws, layers, *outs]).with_attrs(
        kernel_attrs(KernelKind.LSTM_CELL, fmt, hidden)
    )


def lstm_cell_input_func(fmt: BitplaneFormat, input_size: int, hidden: int, bias: bool = True) -> tir.PrimFunc:
    """``(x [B, I], wp_ih, ws_ih [4H][, bias [4H]], h, c, wp_hh, ws_hh, bitlayers) -> (h', c')``.

    One LSTM step including its input projection (:func:`pbtvm.ops.pb_lstm_cell_input`); every
    weight, scale and bias unit-major. The PrimFunc's ``pbtvm.input_size`` attribute tells the
    schedule rules that it has the input leg.
    """
    batch = _batch_var()
    x = te.placeholder((batch, input_size), "float32", "x")
    wp_ih = te.placeholder(fmt.weight_shape(4 * hidden, input_size), "uint32", "wp_ih")
    ws_ih = te.placeholder(fmt.scale_shape(4 * hidden), "float32", "ws_ih")
    b = te.placeholder((4 * hidden,), "float32", "bias") if bias else None
    h = te.placeholder((batch, hidden), "float32", "h")
    c = te.placeholder((batch, hidden), "float32", "c")
    wp_hh = te.placeholder(fmt.weight_shape(4 * hidden, hidden), "uint32", "wp_hh")
    ws_hh = te.placeholder(fmt.scale_shape(4 * hidden), "float32", "ws_hh")
    layers = tir.Var("bitlayers", "int64")
    outs = pb_lstm_cell_input(x, wp_ih, ws_ih, b, h, c, wp_hh, ws_hh, layers, fmt)
    args = [x, wp_ih, ws_ih] + ([b] if bias else []) + [h, c, wp_hh, ws_hh, layers, *outs]
    attrs = {**kernel_attrs(KernelKind.LSTM_CELL, fmt, hidden), ATTR_INPUT_SIZE: int(input_size)}
    return te.create_prim_func(args).with_attrs(attrs)


def build(
    func: tir.PrimFunc, target: tvm.target.Target, schedule: bool = True, programmatic: bool = False
) -> tvm.runtime.Executable:
    """Schedule ``func`` with the default rule for ``target`` (unless told not to) and compile it;
    a PB kernel (one with the :data:`pbtvm.names.ATTR_BITS` attribute) gets the entry check of
    ``bitlayers`` that compiled models have (``1 <= bitlayers <= bits``).

    ``programmatic``: launch its kernels with programmatic dependent launch where they are written
    for it (CUDA sm_90+, :mod:`pbtvm.schedules.cuda_pdl`), as ``compile`` does for layers whose
    weights are constants. The caller promises that no kernel on the stream writes the weights
    while such a kernel may run: it reads them before it waits for the kernel before it. Kernels
    that do not use ``griddepcontrol`` at all (a TVM-scheduled one) are launched early either way
    on such targets: they wait first (:func:`pbtvm.schedules.cuda_pdl.wait_first`).
    """
    from .cuda import build as cuda_aware_build
    from .relay_passes.apply_pb_schedules import check_bitlayers
    from .schedules import apply_default_schedule
    from .schedules.cuda_pdl import early_read_indices, with_programmatic_launch

    if schedule:
        func = apply_default_schedule(func, target)
    if func.attrs is not None and ATTR_BITS in func.attrs:
        func = check_bitlayers(func)
    if programmatic and early_read_indices(func) is not None:
        func = with_programmatic_launch(func)
    return cuda_aware_build(func, target)
