"""Give slices of run-time-sized axes the size their lower bounds prove.

``y[:1]`` of an input ``y [batch, 6]`` whose batch is a run-time size imports as
``strided_slice(y, [0], [0], [1])`` of type ``[min(1, batch), 6]``: TVM's type inference does
not use the function's ``tir_var_lower_bound`` (``batch >= 1``, as torch.export declares it). A
binary op of ``x [batch, 6]`` with it then has a broadcast TVM cannot decide (``batch`` against
``min(1, batch)``), its result type loses its shape, no legalization applies, and the build
failed with "CodeGenVM cannot emit this Relax operator directly" (``x / y[:1]``, ``x - x[:1]``,
``torch.remainder(x, y[:1])``).

This pass simplifies each slice's shape with the bounds and, where that changes it, states it
with a ``match_cast``: ``y[:1]`` and ``y[-1:]`` are ``[1, 6]``, and the op broadcasts as in torch.
A bound is taken as at most 1: run-time sizes of 0 are refused before a call, and torch.export
declares 2 for an LSTM model's sizes (its 0/1 specialization), which may be 1 (``x[:2]`` is
``min(2, T)`` then, as before).
"""

from __future__ import annotations

import tvm_ffi
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.sym.analyzer import Analyzer, ConstIntBound

from pbtvm._tvm import relax, tvm

from .rewrite_calls import rewrite_every_function

#: The largest run-time size the simplifier assumes.
MAX_SIZE = 1 << 62
#: Ops whose result sizes are expressions TVM leaves unsimplified.
SLICE_OPS = ("relax.strided_slice",)


@mutator
class _Bounded(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.analyzer = Analyzer()
        self.cast = 0

    def visit_function_(self, func: relax.Function) -> relax.Expr:
        self.analyzer = Analyzer()
        bounds = dict(func.attrs["tir_var_lower_bound"]) if func.attrs and "tir_var_lower_bound" in func.attrs else {}
        for var in relax.analysis.defined_symbolic_vars(func):
            if var.name in bounds:  # a run-time size: at least 1 (empty inputs are refused) and
                # below 2^62 (the slice of ``x[-1:]`` ends at INT64_MAX); torch.export's bound of 2
                # for an LSTM model's sizes comes from its 0/1 specialization: they may be 1
                self.analyzer.update(var, ConstIntBound(min(int(bounds[var.name]), 1), MAX_SIZE))
        new = super().visit_function_(func)
        if any(int(b) > 1 for b in bounds.values()):  # TVM's own passes read the bounds too
            new = new.with_attr("tir_var_lower_bound", {name: min(int(b), 1) for name, b in bounds.items()})
        return new

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name in SLICE_OPS):
            return call
        sliced = self.builder_.emit(call)
        ty = sliced.ty
        if not isinstance(ty, relax.TensorType) or ty.shape is None:
            return sliced
        dims = list(ty.shape.values)
        simple = [self.analyzer.simplify(d) for d in dims]
        if all(tvm_ffi.structural_equal(a, b) for a, b in zip(dims, simple, strict=True)):
            return sliced
        self.cast += 1
        return self.builder_.match_cast(sliced, relax.TensorType(simple, ty.dtype))


@tvm.transform.module_pass(opt_level=0, name="BoundedSliceShapes")
class BoundedSliceShapes:
    """Module pass: slices' shapes simplified with the functions' ``tir_var_lower_bound`` and
    stated by ``match_cast`` (module docstring).

    ``cast``: slices given a simpler shape by the last run.
    """

    def __init__(self) -> None:
        self.cast = 0

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:  # noqa: D102
        mutator = _Bounded(mod)
        mod = rewrite_every_function(mutator, mod)
        self.cast = mutator.cast
        return mod


__all__ = ["BoundedSliceShapes"]
