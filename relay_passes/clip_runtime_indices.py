"""Make every ``take`` with run-time indices safe, and find the inputs that are such indices.

TVM 0.27's torch importer lowers ``nn.Embedding`` (``aten.embedding``) and tensor indexing to
``R.take(table, ids, axis, mode="fast")``; the ``fast`` take reads ``table`` at whatever offset
an id gives, so a token id past the vocabulary crashed the process (measured: a segfault) or
returned garbage, and TVM logged a warning at every compile. This pass:

* switches every ``take`` whose indices are computed at run time to ``mode="clip"``: whatever
  the ids, no read leaves the table;
* records, for each function parameter that is such an index tensor (directly, or through a
  cast, reshape or transpose), the size of the axis it indexes. :func:`pbtvm.compile` writes it
  into the input's manifest entry (``index_range``) and the compiled model checks those inputs at
  every call, raising a ``ValueError`` that names the input and the range ``[0, n)``. Torch
  raises ``IndexError`` for such embedding ids; for tensor indexing (``w[ids]``) torch also
  accepts negative ids, which pbtvm refuses with the same error.

Only clipped, not checked: indices computed inside the model (not an input), and indices into
an axis whose size is only known at run time (the batch), constant ones too (``y[[0, 4]]``
compiled at batch 5 and called at batch 2 reads row 1 for row 4, where torch raises
``IndexError``; a ``fast`` take read past the tensor). Other constant indices are
:class:`.NormalizeConstantIndices`' business. ``gather`` (``gather_elements``) indices computed at
run time, or constant into the batch axis, are clamped into their axis the same way.
"""

from __future__ import annotations

from typing import Any

from tvm.relax.expr_functor import PyExprMutator, mutator

from pbtvm._tvm import relax, tvm

from .normalize_constant_indices import indexed_size, size_tensor

#: Ops that pass every value of their first argument through (a cast, a new shape): ids stay ids.
_PASS_VALUES = (
    "relax.astype",
    "relax.reshape",
    "relax.flatten",
    "relax.squeeze",
    "relax.expand_dims",
    "relax.permute_dims",
)


def _normalised_index(bound: relax.Expr, lookup: Any) -> relax.Expr | None:
    """The index ``t`` where ``bound`` is :mod:`pbtvm.torch_index`'s normalisation of it,
    ``minimum(maximum(where(less(t, 0), t + n, t), 0), n - 1)``, which keeps ids in ``[0, n)`` as
    they are; else None."""

    def call(expr: relax.Expr, name: str) -> relax.Call | None:
        expr = lookup(expr) if isinstance(expr, relax.Var) and lookup(expr) is not None else expr
        ok = isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name
        return expr if ok else None

    low = call(bound, "relax.minimum")
    wrap = call(low.args[0], "relax.maximum") if low is not None else None
    wrap = call(wrap.args[0], "relax.where") if wrap is not None else None
    test = call(wrap.args[0], "relax.less") if wrap is not None else None
    return wrap.args[2] if test is not None and test.args[0].same_as(wrap.args[2]) else None


def _static_size(data: relax.Expr, axis: int | None) -> int | None:
    """Rows the ids index (see :func:`.normalize_constant_indices.indexed_size`); None if unknown."""
    ty = data.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    return indexed_size(ty, None if axis is None else int(axis) % ty.ndim)


@mutator
class _Clipper(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.params: list[relax.Var] = []
        self.ranges: dict[int, int] = {}  # parameter position -> size of the axis it indexes

    def _param_of(self, expr: relax.Expr) -> int | None:
        while isinstance(expr, relax.Var):
            for i, p in enumerate(self.params):
                if p.same_as(expr):
                    return i
            bound = self.lookup_binding(expr)
            if isinstance(bound, relax.Call) and isinstance(bound.op, tvm.ir.Op) and bound.op.name in _PASS_VALUES:
                expr = bound.args[0]
            elif _normalised_index(bound, self.lookup_binding) is not None:  # torch_index: ids in [0, n) pass
                expr = _normalised_index(bound, self.lookup_binding)
            else:
                return None
        return None

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        op = call.op.name if isinstance(call.op, tvm.ir.Op) else None
        if op == "relax.gather_elements":  # constant indices only where the axis size is known at compile time
            data, indices = call.args
            if not isinstance(indices, tvm.ir.Constant) or _static_size(data, call.attrs.axis) is None:
                return self._clamped_gather(call)
            return call
        if op != "relax.take" or call.attrs.mode != "fast":
            return call
        data, indices = call.args
        size = _static_size(data, call.attrs.axis)
        if isinstance(indices, tvm.ir.Constant) and size is not None:  # checked at compile time
            return call
        param = self._param_of(indices)
        if param is not None and size is not None:
            self.ranges[param] = min(size, self.ranges.get(param, size))
        axis = None if call.attrs.axis is None else int(call.attrs.axis)
        return relax.op.take(data, indices, axis, mode="clip")

    def _clamped_gather(self, call: relax.Call) -> relax.Expr:
        """``gather_elements(data, clip(indices, 0, n - 1), axis)``, ``n`` the size of the axis."""
        data, indices = call.args
        axis = int(call.attrs.axis) % data.ty.ndim
        size = data.ty.shape.values[axis]
        last = size_tensor(size - 1, str(indices.ty.dtype))
        low = relax.const(0, str(indices.ty.dtype))
        clamped = self.builder_.emit(relax.op.minimum(relax.op.maximum(indices, low), last))
        return relax.op.gather_elements(data, clamped, axis)


@tvm.transform.module_pass(opt_level=0, name="ClipRuntimeIndices")
class ClipRuntimeIndices:
    """Module pass: run-time ``take`` indices clipped; ``input_ranges`` (of ``main``) filled.

    Attributes
    ----------
    input_ranges : dict of int to int
        After the pass: ``main``'s parameter position -> the number of rows its values index (an
        input indexing several tables gets the smallest). Ids must lie in ``[0, n)``.
    """

    def __init__(self) -> None:
        self.input_ranges: dict[int, int] = {}

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:  # noqa: D102
        clipper = _Clipper(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                clipper.params, clipper.ranges = list(func.params), {}
                clipper.builder_.update_func(gvar, clipper.visit_expr(func))
                if gvar.name_hint == "main":
                    self.input_ranges = dict(clipper.ranges)
        return clipper.builder_.get()
