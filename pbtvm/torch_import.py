"""Converters that replace TVM 0.27's torch importer where it changes a model's meaning.

``from_exported_program`` converts ``aten.linear``, ``addmm``, ``mm``, ``bmm`` and ``matmul`` with a
matmul whose ``out_dtype`` is always float32, so a float16 / bfloat16 / float64 layer with a bias fails to
build (``R.add`` of a float16 bias and a float32 product) and one without a bias silently returns
float32. The converters here keep the model's dtype: the product has the dtype of its operands,
as in torch. They are passed as ``custom_convert_map`` (see :func:`pbtvm.model_import.import_model`).

Each matmul converter emits exactly one ``relax.matmul`` and records which torch module called the
op (``nn_module_stack``), so a matmul left in full precision can be reported by module name.

``squeeze`` removes only axes of size 1, as torch's does: TVM's removed every axis listed, and
torch.export lists every axis for ``x.squeeze()`` when a size is symbolic, so a ``[batch, 1, 1]``
tensor came out a scalar holding row 0's value, whatever the batch.

Group and instance norms come from :mod:`pbtvm.torch_norms`, convolutions (in the model's dtype)
from :mod:`pbtvm.torch_conv`, advanced indexing (``x[:, i, j]``) from :mod:`pbtvm.torch_index`.

``torch.max(x, dim)`` / ``torch.min(x, dim)`` become a ``max`` / ``min`` reduction and an ``argmax`` /
``argmin`` (TVM imports the first as ``topk``, which a NaN-keeping pass cannot tell from
``torch.topk``, and lacks the second), and ``amax`` / ``amin`` a reduction (TVM lacks both):
:class:`pbtvm.relay_passes.PropagateNaN` then gives NaN and its index as torch does.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any

import tvm_ffi

from ._tvm import relax, tir, tvm
from .relay_passes.normalize_constant_indices import size_tensor
from .torch_conv import CONV_CONVERTERS
from .torch_index import INDEX_CONVERTERS
from .torch_norms import NORM_CONVERTERS
from .user_frame import user_stacklevel


def module_name(node: Any) -> str:
    """``"path (Type)"`` of the innermost torch module whose ``forward`` made ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return f"<model> ({node.target.__name__})"
    path, kind = list(stack.values())[-1]
    kind = getattr(kind, "__name__", None) or str(kind).rsplit(".", 1)[-1].rstrip("'>")
    return f"{path or '<model>'} ({kind})"


def _linear(node: Any, importer: Any) -> relax.Var:
    """``aten.linear(x, W, b=None)`` in the dtype of ``x`` (TVM's forces float32)."""
    args = importer.retrieve_args(node)
    bias = args[2] if len(args) > 2 else None
    return importer.block_builder.emit(relax.op.linear(args[0], args[1], bias))


def _matmul(node: Any, importer: Any) -> relax.Var:
    """``aten.mm / bmm / matmul(a, b)`` in the operands' dtype (torch requires them equal)."""
    a, b = importer.retrieve_args(node)[:2]
    return importer.block_builder.emit(relax.op.matmul(a, b))


def _mv(constants: frozenset) -> Any:
    """``aten.mv(A [N, K], v [K])`` (``torch.mv``, ``A @ v``) as 2-D matmuls the PB rewrite takes for
    dense layers: ``(v[None] @ A^T)[0]`` when ``A`` is computed from ``constants`` alone (names of
    the exported program's parameter, buffer and constant placeholders: a layer applied to one
    vector), else ``(A @ v[:, None])[:, 0]`` (rows times a weight vector: a layer of one output).
    torch's decomposition makes it a multiply and a sum, which no rewrite sees (it stayed full
    precision without a word); :mod:`pbtvm.model_import` keeps the op for this converter."""

    def convert(node: Any, importer: Any) -> relax.Var:
        a, v = importer.retrieve_args(node)[:2]
        emit = importer.block_builder.emit
        matrix_fixed = _from_constants(node.args[0], constants)
        if matrix_fixed and _from_constants(node.args[1], constants):  # no activation at all: not a layer
            return emit(relax.op.matmul(a, v))
        if matrix_fixed:
            out = emit(relax.op.matmul(emit(relax.op.expand_dims(v, 0)), emit(relax.op.permute_dims(a))))
            return emit(relax.op.squeeze(out, [0]))
        return emit(relax.op.squeeze(emit(relax.op.matmul(a, emit(relax.op.expand_dims(v, 1)))), [1]))

    return convert


def _from_constants(node: Any, constants: frozenset) -> bool:
    """Whether the fx ``node`` is computed from placeholders named in ``constants`` alone."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" and n.name not in constants:
            return False
        todo.extend(n.all_input_nodes)
    return True


def _addmm(node: Any, importer: Any) -> relax.Var:
    """``aten.addmm(b, x, W, beta=1, alpha=1)`` = ``beta * b + alpha * (x @ W)`` in the operands' dtype."""
    bias, x, weight = (importer.env[a] for a in node.args[:3])
    alpha = node.kwargs.get("alpha", 1)
    beta = node.kwargs.get("beta", 1)
    emit = importer.block_builder.emit
    out = None
    if alpha != 0:
        out = emit(relax.op.matmul(x, weight))
        if alpha != 1:
            out = emit(relax.op.multiply(out, relax.const(alpha, out.ty.dtype)))
    if beta != 0:
        if beta != 1:
            bias = emit(relax.op.multiply(bias, relax.const(beta, bias.ty.dtype)))
        out = bias if out is None else emit(relax.op.add(bias, out))
    return out


def _reduced(x: relax.Expr, reduce: Any, emit: Any, **attrs: Any) -> relax.Var:
    """``reduce(x, **attrs)`` for a max / min / argmax / argmin; a bool tensor goes through uint8
    (max is any, min is all), which TVM can reduce, and a max / min comes back as bool."""
    if x.ty.dtype != "bool":
        return emit(reduce(x, **attrs))
    out = emit(reduce(emit(relax.op.astype(x, "uint8")), **attrs))
    return emit(relax.op.astype(out, "bool")) if out.ty.dtype == "uint8" else out


def _reduce_with_index(reduce: Any, arg: Any) -> Any:
    """``aten.max.dim / min.dim(x, dim, keepdim=False)`` -> ``(values, indices)``; an index is that
    of the first extreme value (torch's rule and TVM's ``argmax`` / ``argmin``'s), int64."""

    def convert(node: Any, importer: Any) -> relax.Var:
        x, dim = importer.env[node.args[0]], node.args[1]
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        emit = importer.block_builder.emit
        values = _reduced(x, reduce, emit, axis=[dim], keepdims=keepdim)
        indices = _reduced(x, arg, emit, axis=dim, keepdims=keepdim)
        return emit(relax.Tuple([values, indices]))

    return convert


def _reduce(reduce: Any) -> Any:
    """``aten.amax / amin(x, dim=(), keepdim=False)``: an empty ``dim`` reduces every axis."""

    def convert(node: Any, importer: Any) -> relax.Var:
        x = importer.env[node.args[0]]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", ())
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        axis = list(dim) if isinstance(dim, (list, tuple)) else [dim]
        return _reduced(x, reduce, importer.block_builder.emit, axis=axis or None, keepdims=keepdim)

    return convert


def _squeeze(node: Any, importer: Any) -> relax.Expr:
    """``aten.squeeze(x)`` / ``.dim(x, dim)`` / ``.dims(x, dims)``: the listed axes (all if none)
    whose size is 1. A run-time size stays, with a warning if it may be 1: torch drops it only where
    it is 1."""
    x = importer.env[node.args[0]]
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("dims"))
    shape = list(x.ty.shape)
    if not shape:  # a 0-d tensor: nothing to squeeze
        return x
    listed = range(len(shape)) if dims is None else [dims] if isinstance(dims, int) else list(dims)
    axes = sorted({int(d) % len(shape) for d in listed})
    ones = [a for a in axes if isinstance(shape[a], tir.IntImm) and int(shape[a]) == 1]
    # a run-time size torch might find 1 (a bare dimension; 2 * batch is never 1): kept, with a warning
    runtime = [a for a in axes if isinstance(shape[a], tir.Var)]
    if runtime:
        warnings.warn(
            f"pbtvm: squeeze in {module_name(node)} keeps the run-time dimension(s) {runtime} of its "
            f"{len(shape)}-d input: torch drops such a dimension where its size is 1 (e.g. a batch of 1), "
            "the compiled model keeps the rank; name the dims to squeeze (x.squeeze(-1)) to silence this",
            stacklevel=user_stacklevel("tvm", "torch"),
        )
    return importer.block_builder.emit(relax.op.squeeze(x, ones)) if ones else x


def _is_runtime_size(value: Any) -> bool:
    """Whether an importer value is a run-time size (``x.shape[0]``, ``x.numel()``): an integer
    expression of a dimension, not a constant and not a tensor."""
    return isinstance(getattr(value, "ty", None), tvm.ir.PrimType) and not isinstance(value, tir.IntImm)


def _arithmetic(op: Any, intrinsic: Any) -> Any:
    """``aten.add / sub / mul / div.Tensor(a, b)``; a run-time size operand (``x / x.shape[0]``)
    becomes a 0-d tensor of the other operand's dtype (float32 for an integer tensor divided, as
    torch's true division), which TVM's converter cannot make. Anything else is TVM's converter."""

    def convert(node: Any, importer: Any) -> relax.Var:
        args = importer.retrieve_args(node)[:2]
        if not any(_is_runtime_size(a) for a in args):
            return importer._binary_op(op, intrinsic)(node)  # TVM 0.27's own converter (pinned version)
        tensor = next((a for a in args if isinstance(getattr(a, "ty", None), relax.TensorType)), None)
        if tensor is None:  # both are sizes: a size again, as torch computes it
            return intrinsic(*args)
        emit = importer.block_builder.emit
        dtype = str(tensor.ty.dtype)
        if op is relax.op.divide and not dtype.startswith(("float", "bfloat")):
            dtype = "float32"
        operands = []
        for a in args:
            if _is_runtime_size(a):
                a = emit(size_tensor(a))
            elif not isinstance(a, relax.Expr):  # a Python number
                a = relax.const(a, dtype)
            operands.append(a if str(a.ty.dtype) == dtype else emit(relax.op.astype(a, dtype)))
        return emit(op(*operands))

    return convert


def _div_mode(node: Any, importer: Any) -> relax.Var:
    """``aten.div.Tensor_mode(a, b, rounding_mode)`` (``x // 2.0``, ``torch.div(x, y, rounding_mode=
    "trunc")``) with a Python number operand typed as torch types it: TVM's converter made every
    float number a float32 constant and every int an int64 one, so a float16 / bfloat16 / float64
    ``x // 2.0`` and an int32 ``x // 2`` failed to import.

    torch's rules: an integer tensor and a float number compute in float32 (the default dtype);
    a float16 / bfloat16 tensor and a number compute in float32 and round the result once (a
    number in the first place rounded to the tensor's dtype first, one in the second place not);
    otherwise the tensor's dtype. Floor division is :class:`pbtvm.relay_passes.TorchFloatDivision`'s
    afterwards."""
    args = importer.retrieve_args(node)
    a, b = args[:2]
    mode = args[2] if len(node.args) > 2 else node.kwargs.get("rounding_mode")
    tensors = [x for x in (a, b) if isinstance(getattr(x, "ty", None), relax.TensorType)]
    numbers = [x for x in (a, b) if isinstance(x, (int, float)) and not isinstance(x, bool)]
    if len(tensors) != 1 or len(numbers) != 1 or any(_is_runtime_size(x) for x in (a, b)):
        return importer._div(node)  # TVM 0.27's own converter (pinned version)
    emit = importer.block_builder.emit
    dtype = str(tensors[0].ty.dtype)
    floating = dtype.startswith(("float", "bfloat"))
    if not floating and isinstance(numbers[0], float):
        result_dtype = compute = "float32"
    else:
        result_dtype = dtype
        compute = "float32" if dtype in ("float16", "bfloat16") else dtype

    def operand(x: Any, first: bool) -> relax.Expr:
        if isinstance(x, relax.Expr):
            return x if str(x.ty.dtype) == compute else emit(relax.op.astype(x, compute))
        if first and floating and compute != dtype:
            return emit(relax.op.astype(relax.const(x, dtype), compute))
        return relax.const(x, compute)

    a, b = operand(a, True), operand(b, False)
    if mode == "floor":
        result = emit(relax.op.floor_divide(a, b))
    else:
        result = emit(relax.op.divide(a, b))
        result = emit(relax.op.trunc(result)) if mode == "trunc" else result
    return result if compute == result_dtype else emit(relax.op.astype(result, result_dtype))


_REDUCTION_CONVERTERS = {
    "max.dim": _reduce_with_index(relax.op.max, relax.op.argmax),
    "min.dim": _reduce_with_index(relax.op.min, relax.op.argmin),
    "amax.default": _reduce(relax.op.max),
    "amin.default": _reduce(relax.op.min),
}


def _repeat(node: Any, importer: Any) -> relax.Expr:
    """``aten.repeat(x, repeats)``: ``x`` tiled ``repeats[i]`` times along axis ``i`` (``x`` padded with
    leading axes of size 1 to ``len(repeats)`` axes). With a run-time count (``w.repeat(batch)``, as
    ``InstanceNorm`` repeats its weight) ``x`` is broadcast along a new axis before each of its axes
    and merged into it: TVM's ``tile`` takes constant counts only."""
    args = importer.retrieve_args(node)
    x, repeats = args[0], list(args[1])
    emit = importer.block_builder.emit
    if all(isinstance(r, int) for r in repeats):
        return emit(relax.op.tile(x, repeats))
    shape = [1] * (len(repeats) - x.ty.ndim) + list(x.ty.shape)
    spread = emit(relax.op.reshape(x, [n for size in shape for n in (1, size)]))
    spread = emit(relax.op.broadcast_to(spread, [n for pair in zip(repeats, shape, strict=True) for n in pair]))
    return emit(relax.op.reshape(spread, [r * size for r, size in zip(repeats, shape, strict=True)]))


def _same_sizes(a: list, b: list) -> bool:
    """Whether the sizes ``a`` and ``b`` (ints and TIR expressions) are the same, term by term."""
    as_expr = lambda n: tir.IntImm("int64", n) if isinstance(n, int) else n  # noqa: E731
    return len(a) == len(b) and all(tvm_ffi.structural_equal(as_expr(m), as_expr(n)) for m, n in zip(a, b, strict=True))


def _reshape(node: Any, importer: Any) -> relax.Expr:
    """``aten.view / reshape(x, sizes)``, as TVM's converter reshapes (its torch-meaning of a literal 0
    in ``sizes``) but with the sizes compared term by term: TVM's compares the lists with ``==``, which
    for a constant size beside a run-time one (``[1, batch*C, L]`` to ``[batch, C, L]``, as
    ``InstanceNorm`` views) makes a TIR expression that has no truth value, and the import failed."""
    args = importer.retrieve_args(node)
    x, sizes = args[0], list(args[1]) if isinstance(args[1], (tuple, list)) else list(args[1:])
    shape = importer.shape_of(x)
    if shape is not None and _same_sizes(list(shape), sizes):
        return x
    return importer._emit_torch_reshape(x, sizes)  # TVM 0.27's own reshape steps (pinned version)


_SHAPE_CONVERTERS = {
    "view.default": _reshape,
    "reshape.default": _reshape,
    "squeeze.default": _squeeze,
    "squeeze.dim": _squeeze,
    "squeeze.dims": _squeeze,
    "repeat.default": _repeat,
}

_ARITHMETIC_CONVERTERS = {
    "add.Tensor": _arithmetic(relax.op.add, operator.add),
    "sub.Tensor": _arithmetic(relax.op.subtract, operator.sub),
    "mul.Tensor": _arithmetic(relax.op.multiply, operator.mul),
    "div.Tensor": _arithmetic(relax.op.divide, operator.truediv),
    "div.Tensor_mode": _div_mode,
}

_MATMUL_CONVERTERS = {
    "linear.default": _linear,
    "addmm.default": _addmm,
    "mm.default": _matmul,
    "bmm.default": _matmul,
    "matmul.default": _matmul,
}


def converters(owners: list[str], constants: frozenset = frozenset()) -> dict:
    """``custom_convert_map`` for ``from_exported_program``: the matmul-like ops, the reductions,
    ``squeeze`` above, the norms of :mod:`pbtvm.torch_norms`, the convolutions of
    :mod:`pbtvm.torch_conv` and the indexing of :mod:`pbtvm.torch_index`.

    ``constants``: the exported program's placeholders that are not user inputs (``aten.mv`` with a
    matrix computed from them alone is a layer applied to a vector). ``owners`` receives, in
    emission order, :func:`module_name` of every converted matmul-like op (one ``relax.matmul``
    each; ``addmm`` with ``alpha=0`` emits none and records none).
    """

    def recording(convert: Any) -> Any:
        def run(node: Any, importer: Any) -> relax.Var:
            if node.target.__name__ != "addmm.default" or node.kwargs.get("alpha", 1) != 0:
                owners.append(module_name(node))
            return convert(node, importer)

        return run

    matmuls = {
        name: recording(convert) for name, convert in (_MATMUL_CONVERTERS | {"mv.default": _mv(constants)}).items()
    }
    return (
        matmuls
        | _REDUCTION_CONVERTERS
        | _SHAPE_CONVERTERS
        | _ARITHMETIC_CONVERTERS
        | NORM_CONVERTERS
        | CONV_CONVERTERS
        | INDEX_CONVERTERS
    )


__all__ = ["converters", "module_name"]
