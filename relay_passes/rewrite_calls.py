"""The module pass shared by the passes that rewrite single calls: one ``PyExprMutator`` visits every
Relax function and hands each call (its arguments already visited) to the pass's ``rewrite``."""

from __future__ import annotations

from collections.abc import Callable

from tvm.relax.expr_functor import PyExprMutator, mutator

from pbtvm._tvm import relax, tvm

#: ``rewrite(call, op, emit)``: the replacement of ``call`` (``op`` its op's name, or None), or None
#: to keep it; ``emit`` binds a helper expression in the function being rewritten.
Rewrite = Callable[[relax.Call, "str | None", Callable[[relax.Expr], relax.Var]], "relax.Expr | None"]


@mutator
class _CallRewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, rewrite: Rewrite) -> None:
        super().__init__(mod)
        self.rewrite = rewrite
        self.rewritten = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        op = call.op.name if isinstance(call.op, tvm.ir.Op) else None
        new = self.rewrite(call, op, self.builder_.emit)
        if new is None:
            return call
        self.rewritten += 1
        return new


def rewrite_every_function(mutator: object, mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every Relax function visited by ``mutator`` (a ``PyExprMutator`` made on ``mod``)."""
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    return mutator.builder_.get()


def op_name(expr: relax.Expr) -> str | None:
    """The name of ``expr``'s op if it is a call of one (``relax.reshape``), else None."""
    return expr.op.name if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) else None


def is_float(expr: relax.Expr) -> bool:
    """Whether ``expr`` is a tensor of a float dtype (bfloat16 included)."""
    ty = expr.ty
    return isinstance(ty, relax.TensorType) and str(ty.dtype).startswith(("float", "bfloat"))


def scalar_as_tensor(const: relax.Constant, ndim: int) -> relax.Constant:
    """The constant scalar ``const`` as a constant of shape ``(1,) * max(ndim, 1)``: TVM's simplifier
    folds arithmetic with a scalar (``x * 0`` to 0) and refuses a zero divisor, a tensor's
    elements it does not look into."""
    return relax.const(const.value.numpy().reshape((1,) * max(ndim, 1)), str(const.ty.dtype))


class CallRewritePass:
    """Base of a module pass that rewrites single calls with its ``rewrite`` function (a
    :data:`Rewrite`, set as a ``staticmethod``) in every Relax function.

    Attributes
    ----------
    rewritten : int
        Calls rewritten by the last run.
    """

    rewrite: Rewrite

    def __init__(self) -> None:
        self.rewritten = 0

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:  # noqa: D102
        mutator = _CallRewriter(mod, self.rewrite)
        mod = rewrite_every_function(mutator, mod)
        self.rewritten = mutator.rewritten
        return mod


__all__ = ["CallRewritePass", "Rewrite", "is_float", "op_name", "rewrite_every_function", "scalar_as_tensor"]
