"""Compute the float16 / bfloat16 ops TVM 0.27 cannot build, or builds wrong, in float32.

TVM keeps bfloat16 tensors as uint16 bit patterns. Some of its op lowerings then fail to build
(``layer_norm``: "only support float32 and float16"; ``power``: "only applies to float";
``mod``: a uint16 store of a float) and ``median`` sorts the bit patterns, so it silently
returned another element (``[-0.50, -0.17, -0.27]`` for torch's ``[-0.35, 0.52, -0.10]``). For
float16, LLVM codegen lacks ``atan2``, and ``batch_norm`` came back as float32. (``group_norm``
never reaches this pass: pbtvm's converter in :mod:`pbtvm.torch_norms` computes it from simpler
ops, in float32 for half precision.) This pass casts the half-precision operands of those ops to
float32, runs the op there, and casts its float results back::

    median(x)  ->  (astype(v, "bfloat16"), i)  where (v, i) = median(astype(x, "float32"))

torch computes these ops in float32 and rounds to the half type too (its "opmath" type), and
every float16 and bfloat16 value is exact in float32, so the results are torch's up to the op's
own rounding.
"""

from __future__ import annotations

from collections.abc import Callable

from pbtvm._tvm import relax, tvm

from .rewrite_calls import CallRewritePass

#: Per half-precision dtype, the ops TVM 0.27 cannot build or computes wrong in it (measured).
OPS = {
    "bfloat16": (
        "relax.median",
        "relax.nn.layer_norm",
        "relax.nn.rms_norm",
        "relax.nn.batch_norm",
        "relax.power",
        "relax.mod",
        "relax.floor_mod",
    ),
    "float16": ("relax.atan2", "relax.nn.batch_norm"),  # batch_norm: TVM returns float32
}


def _half(expr: relax.Expr) -> str | None:
    """The dtype of a float16 / bfloat16 tensor, else None."""
    ty = expr.ty
    dtype = str(ty.dtype) if isinstance(ty, relax.TensorType) else None
    return dtype if dtype in OPS else None


def _in_float32(call: relax.Call, op: str | None, emit: Callable) -> relax.Expr | None:
    """``call`` on float32 copies of its half-precision operands, its float results cast back; None
    unless it is an op of :data:`OPS` for its operands' dtype."""
    half = next((d for d in map(_half, call.args) if d), None)
    if half is None or op not in OPS[half]:
        return None
    args = [emit(relax.op.astype(a, "float32")) if _half(a) else a for a in call.args]
    out = emit(relax.Call(call.op, args, call.attrs))

    def back(value: relax.Expr) -> relax.Expr:  # a float32 result in ``half`` again; an index as it is
        return emit(relax.op.astype(value, half)) if str(value.ty.dtype) == "float32" else value

    if isinstance(out.ty, relax.TensorType):
        return back(out)
    return relax.Tuple([back(emit(relax.TupleGetItem(out, i))) for i in range(len(out.ty.fields))])


@tvm.transform.module_pass(opt_level=0, name="ThroughFloat32")
class ThroughFloat32(CallRewritePass):
    """Module pass: the half-precision ops of :data:`OPS` computed in float32.

    ``rewritten``: calls rewritten by the last run.
    """

    rewrite = staticmethod(_in_float32)
