"""The module-pass shell shared by the passes that rewrite single calls with a ``PyExprMutator``."""

from __future__ import annotations

from pbtvm._tvm import relax, tvm


def rewrite_every_function(mutator: object, mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every Relax function visited by ``mutator`` (a ``PyExprMutator`` made on ``mod``)."""
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    return mutator.builder_.get()


class CallRewritePass:
    """Base of a module pass whose ``mutator`` class (a ``PyExprMutator`` taking the module and
    counting its rewrites in ``rewritten``) visits every Relax function.

    Attributes
    ----------
    rewritten : int
        Calls rewritten by the last run.
    """

    mutator: type

    def __init__(self) -> None:
        self.rewritten = 0

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:  # noqa: D102
        mutator = self.mutator(mod)
        mod = rewrite_every_function(mutator, mod)
        self.rewritten = mutator.rewritten
        return mod


__all__ = ["CallRewritePass", "rewrite_every_function"]
