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

``group_norm`` computes the variance from the deviations, in float32 for half precision, as torch
does (TVM's cancels, and refuses bfloat16).

``torch.max(x, dim)`` / ``torch.min(x, dim)`` become a ``max`` / ``min`` reduction and an ``argmax`` /
``argmin`` (TVM imports the first as ``topk``, which a NaN-keeping pass cannot tell from
``torch.topk``, and lacks the second), and ``amax`` / ``amin`` a reduction (TVM lacks both):
:class:`pbtvm.relay_passes.PropagateNaN` then gives NaN and its index as torch does.
"""

from __future__ import annotations

import warnings
from typing import Any

from ._tvm import relax, tir
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


def _group_norm(native: bool) -> Any:
    """``aten.group_norm(x, groups, weight=None, bias=None, eps=1e-5)`` or
    ``aten.native_group_norm(x, weight, bias, N, C, HxW, groups, eps)`` over ``x`` of shape
    ``[N, C, *spatial]``, as torch computes it: the mean first, then the mean square of the
    deviations, in float32 for float16 / bfloat16 (torch's accumulation type), rounded once.

    TVM's ``group_norm`` takes the variance as ``E[x^2] - E[x]^2`` in float32, which cancels: over
    1,024 values of mean 100 and spread 3 its output was 2e-3 off (torch's 5e-6); it refuses bfloat16
    and a missing weight. Only the normalised tensor is made, as TVM's converter makes it.
    """

    def convert(node: Any, importer: Any) -> relax.Var:
        args = list(node.args)
        if native:
            x, weight, bias, groups, eps = args[0], args[1], args[2], args[6], args[7]
        else:
            x, groups = args[0], args[1]
            weight, bias, eps = (args[2:5] + [None, None, 1e-5][len(args[2:5]) :])[:3]
        emit = importer.block_builder.emit
        data = importer.env[x]
        dtype, shape = str(data.ty.dtype), list(data.ty.shape)
        compute = "float64" if dtype == "float64" else "float32"
        if compute != dtype:
            data = emit(relax.op.astype(data, compute))
        grouped = emit(relax.op.reshape(data, [shape[0], groups, -1]))
        centred = emit(relax.op.subtract(grouped, relax.op.mean(grouped, axis=[2], keepdims=True)))
        variance = emit(relax.op.mean(relax.op.multiply(centred, centred), axis=[2], keepdims=True))
        scaled = relax.op.multiply(centred, relax.op.rsqrt(relax.op.add(variance, relax.const(eps, compute))))
        out = emit(relax.op.reshape(emit(scaled), shape))
        per_channel = [int(shape[1])] + [1] * (len(shape) - 2)
        for arg, combine in ((weight, relax.op.multiply), (bias, relax.op.add)):
            if arg is not None:
                value = importer.env[arg]
                if str(value.ty.dtype) != compute:
                    value = emit(relax.op.astype(value, compute))
                out = emit(combine(out, relax.op.reshape(value, per_channel)))
        return out if compute == dtype else emit(relax.op.astype(out, dtype))

    return convert


_REDUCTION_CONVERTERS = {
    "max.dim": _reduce_with_index(relax.op.max, relax.op.argmax),
    "min.dim": _reduce_with_index(relax.op.min, relax.op.argmin),
    "amax.default": _reduce(relax.op.max),
    "amin.default": _reduce(relax.op.min),
}
_SHAPE_CONVERTERS = {"squeeze.default": _squeeze, "squeeze.dim": _squeeze, "squeeze.dims": _squeeze}
_NORM_CONVERTERS = {
    "group_norm.default": _group_norm(native=False),
    "native_group_norm.default": _group_norm(native=True),
}

_MATMUL_CONVERTERS = {
    "linear.default": _linear,
    "addmm.default": _addmm,
    "mm.default": _matmul,
    "bmm.default": _matmul,
    "matmul.default": _matmul,
}


def converters(owners: list[str]) -> dict:
    """``custom_convert_map`` for ``from_exported_program``: the matmul-like ops, the reductions,
    ``squeeze`` and ``group_norm`` above.

    ``owners`` receives, in emission order, :func:`module_name` of every converted matmul-like op
    (one ``relax.matmul`` each; ``addmm`` with ``alpha=0`` emits none and records none).
    """

    def recording(convert: Any) -> Any:
        def run(node: Any, importer: Any) -> relax.Var:
            if node.target.__name__ != "addmm.default" or node.kwargs.get("alpha", 1) != 0:
                owners.append(module_name(node))
            return convert(node, importer)

        return run

    matmuls = {name: recording(convert) for name, convert in _MATMUL_CONVERTERS.items()}
    return matmuls | _REDUCTION_CONVERTERS | _SHAPE_CONVERTERS | _NORM_CONVERTERS


__all__ = ["converters", "module_name"]
