"""Rewrite value tests, integer clips and non-finite fills into forms TVM 0.27 builds.

``torch.isfinite(x)`` reaches Relax as ``multiply(equal(x, x), not_equal(abs(x), inf))``, and
``torch.nan_to_num`` / ``isnan`` / ``isinf`` of bfloat16 as ``isnan`` / ``isinf`` of bfloat16.
TVM 0.27 builds none of them: LLVM codegen has no multiply of bool tensors, and ``isnan`` /
``isinf`` / ``isfinite`` refuse bfloat16 ("not supported for isnan op"), so compiling such a
model failed with an internal error. Nor does it build an integer ``clip`` with an infinite bound
(``F.interpolate`` decomposes into ``clamp(int64 indices, max=n-1)``, which TVM's importer gives the
bound ``-inf``: "Cannot convert infinity to BigInt"), nor a ``full`` of ``-inf`` / ``+inf`` / NaN
(the causal mask ``torch.full((T, T), float("-inf")).triu(1)``: TVM's ``topi.full`` tests its dtype
as a string and fails). This pass rewrites::

    multiply(a, b)    ->  logical_and(a, b)     (bool a, b: torch's product of bools)
    add(a, b)         ->  logical_or(a, b)      (bool a, b: torch's sum of bools)
    equal(x, x)       ->  logical_not(isnan(x)) (float x: a NaN is the one value unequal to itself)
    not_equal(x, x)   ->  isnan(x)
    isnan(x)          ->  isnan(astype(x, "float32"))    (bfloat16 x; isinf, isfinite alike)
    clip(i, -inf, hi) ->  clip(i, min of i's dtype, hi)  (integer i; a bound past the dtype alike)
    full(s, -inf)     ->  add(full(s, 0), -inf)          (+inf, NaN and full_like alike)
    multiply(x, 0.0)  ->  multiply(x, [[0.0]])           (float x, the zero either side; divide,
                                                          floor_divide, floor_mod by it alike)

A constant scalar zero becomes a constant tensor of ones' shape: TVM's simplifier folds ``x * 0``
to 0 (torch gives NaN for a NaN or infinite ``x``, ``y * 0`` of a layer's output with a NaN row
came back 0) and refuses a constant zero divisor ("Divide by zero": ``y / 0``, ``y // 0.0``,
``torch.remainder(y, 0.0)`` did not compile; torch gives ±inf and NaN). A tensor's elements are
not folded.

``isnan`` replaces the self-comparison because TVM's simplifier may fold ``x == x`` to true
(it does for bfloat16). Every bfloat16 value is exact in float32, so the tests give the same
answers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pbtvm._tvm import relax, tvm

from .rewrite_calls import CallRewritePass, is_float, scalar_as_tensor

#: Binary ops of two bool tensors, as the logical op torch means by them.
BOOL_OPS = {"relax.multiply": relax.op.logical_and, "relax.add": relax.op.logical_or}
#: A float tensor compared with itself: the NaN test it is.
SELF_COMPARISONS = {
    "relax.equal": lambda x: relax.op.logical_not(relax.op.isnan(x)),
    "relax.not_equal": relax.op.isnan,
}
#: Value tests TVM 0.27 builds for float16/32/64 but not bfloat16.
VALUE_TESTS = {"relax.isnan": relax.op.isnan, "relax.isinf": relax.op.isinf, "relax.isfinite": relax.op.isfinite}


#: Ops by a constant scalar zero TVM folds or refuses -> the operands where that zero is meant.
ZERO_OPERAND_OPS = {"relax.multiply": (0, 1), "relax.divide": (1,), "relax.floor_divide": (1,), "relax.floor_mod": (1,)}


def _dtype(expr: relax.Expr) -> str | None:
    ty = expr.ty
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def _non_finite(fill: relax.Expr) -> bool:
    """Whether ``fill`` is a constant scalar that is ±inf or NaN."""
    if not isinstance(fill, tvm.ir.Constant) or fill.ty.ndim != 0:
        return False
    if not str(fill.ty.dtype).startswith(("float", "bfloat")):
        return False
    return not np.isfinite(fill.value.numpy().astype(np.float64))  # bfloat16 through float64


def _scalar_zero(expr: relax.Expr) -> bool:
    """Whether ``expr`` is a constant float scalar equal to 0 (either sign)."""
    if not isinstance(expr, tvm.ir.Constant) or expr.ty.ndim != 0:
        return False
    return str(expr.ty.dtype).startswith(("float", "bfloat")) and expr.value.numpy().astype(np.float64) == 0


def _zero_as_tensor(call: relax.Call, op: str, emit: Callable) -> relax.Expr | None:
    """``call`` with its constant scalar zero operand (see :data:`ZERO_OPERAND_OPS`) as a tensor of
    ones' shape (a 0-d ``call``: ``[1]``, its result reshaped back), or None."""
    for i in ZERO_OPERAND_OPS[op]:
        other = call.args[1 - i]
        ndim = other.ty.ndim if is_float(other) else -1
        if _scalar_zero(call.args[i]) and ndim >= 0:
            args = list(call.args)
            args[i] = scalar_as_tensor(call.args[i], ndim)
            if ndim >= 1:
                return relax.Call(call.op, args, call.attrs)
            return relax.op.reshape(emit(relax.Call(call.op, args, call.attrs)), relax.ShapeExpr([]))  # 0-d
    return None


def _integer_clip_bounds(call: relax.Call, dtype: str) -> tuple[int, int] | None:
    """The bounds of ``clip(x, lo, hi)`` on a tensor of integer ``dtype`` held within that dtype's
    range (an infinite or too large bound becomes the dtype's limit), or None where both already lie
    within it or a bound is not a constant."""
    info = np.iinfo(dtype)
    bounds = [getattr(b, "value", None) for b in call.args[1:]]
    if any(not isinstance(b, (int, float)) for b in bounds) or all(info.min <= b <= info.max for b in bounds):
        return None
    lo, hi = bounds
    return (info.min if lo < info.min else int(lo)), (info.max if hi > info.max else int(hi))


def _buildable(call: relax.Call, op: str | None, emit: Callable) -> relax.Expr | None:
    """The buildable form of ``call`` (see the module docstring), or None where it builds as it is."""
    dtypes = [_dtype(a) for a in call.args]
    if op in BOOL_OPS and dtypes == ["bool", "bool"]:
        return BOOL_OPS[op](*call.args)
    if op in SELF_COMPARISONS and call.args[0].same_as(call.args[1]) and str(dtypes[0]).startswith(("float", "bf")):
        x = call.args[0]
        return SELF_COMPARISONS[op](emit(relax.op.astype(x, "float32")) if dtypes[0] == "bfloat16" else x)
    if op in VALUE_TESTS and dtypes[0] == "bfloat16":
        return VALUE_TESTS[op](emit(relax.op.astype(call.args[0], "float32")))
    if op in ("relax.full", "relax.full_like") and _non_finite(call.args[1]):
        fill = call.args[1]
        zeros = emit(relax.Call(call.op, [call.args[0], relax.const(0, str(fill.ty.dtype))], call.attrs))
        return relax.op.add(zeros, fill)
    if op in ZERO_OPERAND_OPS:
        return _zero_as_tensor(call, op, emit)
    if op == "relax.clip" and str(dtypes[0]).startswith(("int", "uint")):
        bounds = _integer_clip_bounds(call, dtypes[0])
        if bounds is not None:
            return relax.op.clip(call.args[0], *(relax.prim_value(tvm.tirx.IntImm(dtypes[0], b)) for b in bounds))
    return None


@tvm.transform.module_pass(opt_level=0, name="BuildableFloatChecks")
class BuildableFloatChecks(CallRewritePass):
    """Module pass: bool ``multiply`` / ``add`` as logical ops, a float compared with itself as
    ``isnan``, bfloat16 ``isnan`` / ``isinf`` / ``isfinite`` through float32, integer ``clip``
    bounds within the dtype, a ``full`` of a non-finite value as zeros plus that value, a constant
    scalar zero factor or divisor as a tensor.

    ``rewritten``: calls rewritten by the last run.
    """

    rewrite = staticmethod(_buildable)
