"""Emit a TE compute as a ``call_tir`` in a Relax function being rewritten, keeping int32 loops."""

from __future__ import annotations

import tvm_ffi

from pbtvm._tvm import relax, te, tir

__all__ = ["emit_te_call"]


def emit_te_call(
    builder: relax.BlockBuilder, fn, inputs: list[relax.Expr], name: str, attrs: dict, prim_args: tuple = ()
) -> relax.Expr:
    """``call_tir`` of the PrimFunc ``fn(*placeholders, *prim_args)`` makes, added to ``builder`` as ``name``.

    Like ``call_te`` but without its int64 index normalisation.

    ``call_te`` widens every loop-derived integer to int64, which turns the int32 popcount
    accumulation into ``int32(int64(acc) + ...)``; TVM's cross-thread reduction then finds no
    reducer. Building the PrimFunc here keeps static loops int32.
    """
    # Symbolic dims (``n * 3`` after a reshape) become fresh PrimFunc variables, matched up
    # across inputs, so the PrimFunc binds them from its buffers' shapes.
    fresh: list[tuple[tir.PrimExpr, tir.Var]] = []

    def dim(d: tir.PrimExpr) -> tir.PrimExpr:
        if isinstance(d, tir.IntImm):
            return int(d)  # static dims as plain ints: int32 loops, as the schedules expect
        for expr, var in fresh:
            if tvm_ffi.structural_equal(expr, d):
                return var
        fresh.append((d, tir.Var(f"d{len(fresh)}", "int64")))
        return fresh[-1][1]

    def undim(d: tir.PrimExpr) -> tir.PrimExpr:
        return next((expr for expr, var in fresh if var.same_as(d)), d)

    holders = [
        te.placeholder([dim(d) for d in e.ty.shape.values], str(e.ty.dtype), f"in{i}") for i, e in enumerate(inputs)
    ]
    outs = fn(*holders, *prim_args)
    outs = list(outs) if isinstance(outs, list | tuple) else [outs]
    func = te.create_prim_func([*holders, *prim_args, *outs]).without_attr("global_symbol").with_attrs(attrs)
    gvar = builder.add_func(func, name)
    args = [*inputs, *(relax.prim_value(p) for p in prim_args)]
    out_ty = [relax.TensorType([undim(d) for d in o.shape], o.dtype) for o in outs]
    return relax.call_tir(gvar, args, out_ty if len(out_ty) > 1 else out_ty[0])
