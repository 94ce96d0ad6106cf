"""Make every constant index in an imported graph non-negative and in bounds.

TVM 0.27's torch importer turns ``x[:, -1]`` (``aten.select``) into ``R.take(x, -1, axis=1,
mode="fast")``, and the ``fast`` take reads ``x[:, -1]`` as a raw offset: out of bounds, silent
garbage (or a crash). This pass rewrites every ``take`` and ``gather_elements`` whose indices are
a constant:

* along a static axis of size ``n``, negative indices become ``i + n``; an index outside
  ``[-n, n)`` is a :class:`ValueError` naming the op, axis and size (torch would raise too);
* along a symbolic axis (the dynamic batch), a scalar negative index becomes
  ``squeeze(strided_slice(x, [i, i + 1]))`` (``strided_slice`` counts negative bounds from the
  end); other negative indices there are an error, as there is no size to check them against.

A ``take`` whose constant indices are checked in bounds gets ``mode="clip"`` (same result; topi
logs "Fast mode segfaults ..." at compile time for every ``fast`` take). ``strided_slice``
itself handles negative bounds correctly and clamps, so it is left alone.
"""

from __future__ import annotations

import numpy as np
from tvm.relax.expr_functor import PyExprMutator, mutator

from pbtvm._tvm import relax, tir, tvm
from pbtvm.errors import InputError

#: Ops whose constant ``indices`` operand (argument 1) index ``data`` (argument 0) along ``axis``.
INDEXING_OPS = ("relax.take", "relax.gather_elements")


def _const_indices(expr: relax.Expr, lookup) -> np.ndarray | None:
    while isinstance(expr, relax.Var):
        bound = lookup(expr)
        if bound is None:
            return None
        expr = bound
    if isinstance(expr, tvm.ir.Constant) and str(expr.value.dtype).startswith(("int", "uint")):
        return expr.value.numpy()
    return None


def size_tensor(size: int | tir.PrimExpr, dtype: str = "int64") -> relax.Expr:
    """A 0-d tensor of ``dtype`` holding the axis size ``size``: a constant, or for a size known
    only at run time (the batch) the value of the shape expression."""
    if isinstance(size, (int, tir.IntImm)):
        return relax.const(int(size), dtype)
    tensor = relax.op.reshape(relax.op.shape_to_tensor(relax.ShapeExpr([size])), [])
    return tensor if dtype == "int64" else relax.op.astype(tensor, dtype)


def indexed_size(ty: relax.TensorType, axis: int | None) -> int | None:
    """How many entries indices into a tensor of type ``ty`` can address along ``axis`` (every
    element without an axis: take indexes the flattened tensor); None where a size is symbolic."""
    dims = ty.shape.values if axis is None else [ty.shape.values[axis]]
    if not all(isinstance(d, tir.IntImm) for d in dims):
        return None
    return int(np.prod([int(d) for d in dims]))


@mutator
class _Normalizer(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        op = call.op.name if isinstance(call.op, tvm.ir.Op) else None
        if op not in INDEXING_OPS:
            return call
        indices = _const_indices(call.args[1], self.lookup_binding)
        data_ty = call.args[0].ty
        if indices is None or not isinstance(data_ty, relax.TensorType) or data_ty.shape is None:
            return call
        axis = None if call.attrs.axis is None else int(call.attrs.axis) % data_ty.ndim
        size = indexed_size(data_ty, axis)
        axis_shown = "flattened" if axis is None else str(axis)
        if size is not None:
            bad = indices[(indices < -size) | (indices >= size)]
            if bad.size:
                raise InputError(
                    f"{op} with constant index {int(bad.flat[0])} is out of bounds for axis {axis_shown} of size {size}"
                )
            if (indices < 0).any():
                indices = np.where(indices < 0, indices + size, indices).astype(indices.dtype)
            if op == "relax.take":  # checked in bounds: "clip" computes the same, without topi's
                # "Fast mode segfaults" warning that every fast take logs at compile time
                return relax.op.take(call.args[0], relax.const(indices, str(indices.dtype)), call.attrs.axis, "clip")
            return relax.Call(call.op, [call.args[0], relax.const(indices, str(indices.dtype))], call.attrs)
        if not (indices < 0).any():
            return call
        if op == "relax.take" and indices.ndim == 0 and axis is not None:
            i = int(indices)
            end = i + 1 if i != -1 else np.iinfo(np.int64).max
            sliced = self.builder_.emit(relax.op.strided_slice(call.args[0], [axis], [i], [end]))
            return relax.op.squeeze(sliced, [axis])
        raise InputError(f"{op} with negative constant indices along the dynamic axis {axis_shown} is not supported")


@tvm.transform.module_pass(opt_level=0, name="NormalizeConstantIndices")
class NormalizeConstantIndices:
    """Module pass: constant ``take`` / ``gather_elements`` indices made non-negative, bounds checked.

    Raises
    ------
    ValueError
        A constant index is out of bounds (names the op, the axis and its size).
    """

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:  # noqa: D102
        normalizer = _Normalizer(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                normalizer.builder_.update_func(gvar, normalizer.visit_expr(func))
        return normalizer.builder_.get()
