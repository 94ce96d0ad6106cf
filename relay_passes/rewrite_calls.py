"""The module-pass shell shared by the passes that rewrite single calls with a ``PyExprMutator``."""

from __future__ import annotations

from pbtvm._tvm import relax, tvm


def rewrite_every_function(mutator: object, mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every Relax function visited by ``mutator`` (a ``PyExprMutator`` made on ``mod``)."""
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    return mutator.builder_.get()


__all__ = ["rewrite_every_function"]
