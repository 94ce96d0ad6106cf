"""Float floor division and remainder as torch computes them.

TVM lowers float ``floor_divide(a, b)`` to ``floor(a / b)`` and ``floor_mod(a, b)`` to
``a - floor(a / b) * b``. torch (``x // y``, ``torch.div(..., rounding_mode="floor")``,
``torch.remainder``) computes both from the exact ``fmod``, as Python does, so that the quotient
and remainder agree: ``1.0 // 0.1`` is 9 in torch (``a / b`` rounds up to 10.0 in float32), and
``remainder(1.0, 0.1)`` is 0.09999999 where TVM gave -1.5e-8 (a negative remainder of a positive
divisor). This pass writes torch's algorithm (``c10::div_floor_floating``, ``remainder``) in Relax
ops, elementwise, for float operands::

    m  = fmod(a, b)                                 (relax.mod: exact)
    fix = m != 0 and (b < 0) != (m < 0)
    remainder(a, b)   = where(fix, m + b, m)
    d  = (a - m) / b - fix                          (an exact integer but for rounding)
    f  = floor(d) + (d - floor(d) > 0.5)
    floor_divide(a, b) = where(b == 0, a / b, where(d != 0, f, (a / b) * 0))   (0 signed as a / b)

The last product's zero is a tensor (a scalar would be folded, see
:mod:`relay_passes.buildable_float_checks`). NaN and infinities come out as in torch's element-by-element
definition (and Python's): the same IEEE operations in the same order; float16 and bfloat16 in
float32, rounded once. (torch's vectorized CPU kernels, which it runs on larger tensors, can
differ from that definition: float16 ``1.0 // -0.000458`` is -2184 there, -2182 in one element.)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pbtvm._tvm import relax, tvm

from .rewrite_calls import CallRewritePass, is_float, scalar_as_tensor

#: The float ops this pass replaces.
DIVISION_OPS = ("relax.floor_divide", "relax.floor_mod")


def _torch_division(call: relax.Call, op: str | None, emit: Callable) -> relax.Expr | None:
    """``call`` computed as torch computes it (module docstring), or None (another op, or not float)."""
    if op not in DIVISION_OPS or not all(is_float(a) for a in call.args):
        return None
    dtype, ndim = str(call.ty.dtype), call.ty.ndim
    if any(str(x.ty.dtype) != dtype for x in call.args):
        return None  # TVM's type check refuses mixed dtypes already
    # a constant scalar operand as a tensor: TVM's simplifier folds ``0 % y`` to 0 (dropping NaN and
    # the zero's sign) and refuses a zero divisor; a 0-d result reshaped back
    a, b = (scalar_as_tensor(x, ndim) if isinstance(x, tvm.ir.Constant) and x.ty.ndim == 0 else x for x in call.args)
    half = dtype in ("float16", "bfloat16")  # torch computes them in float32 and rounds the result once
    if half:
        a, b = (emit(relax.op.astype(x, "float32")) for x in (a, b))
    result = _division(a, b, op, "float32" if half else dtype, ndim, emit)
    if half:
        result = relax.op.astype(emit(result), dtype)
    return relax.op.reshape(emit(result), relax.ShapeExpr([])) if ndim == 0 else result


def _division(a: relax.Expr, b: relax.Expr, op: str, dtype: str, ndim: int, emit: Callable) -> relax.Expr:
    """torch's ``floor_divide`` / ``remainder`` (``op``) of ``a``, ``b`` of ``dtype`` (result ``ndim`` axes)."""

    def const(value: float) -> relax.Expr:
        return relax.const(value, dtype)

    m = emit(relax.op.mod(a, b))
    nonzero = emit(relax.op.not_equal(m, const(0.0)))
    signs_differ = emit(relax.op.logical_xor(relax.op.less(b, const(0.0)), relax.op.less(m, const(0.0))))
    fix = emit(relax.op.logical_and(nonzero, signs_differ))
    if op == "relax.floor_mod":
        return relax.op.where(fix, emit(relax.op.add(m, b)), m)
    d = emit(relax.op.divide(emit(relax.op.subtract(a, m)), b))
    d = emit(relax.op.where(fix, emit(relax.op.subtract(d, const(1.0))), d))
    floor = emit(relax.op.floor(d))
    up = emit(relax.op.greater(emit(relax.op.subtract(d, floor)), const(0.5)))
    f = emit(relax.op.where(up, emit(relax.op.add(floor, const(1.0))), floor))
    quotient = emit(relax.op.divide(a, b))
    zero = relax.const(np.zeros((1,) * max(ndim, 1), dtype), dtype)  # a tensor: not folded
    signed_zero = emit(relax.op.multiply(quotient, zero))
    kept = emit(relax.op.where(emit(relax.op.not_equal(d, const(0.0))), f, signed_zero))
    return relax.op.where(emit(relax.op.equal(b, const(0.0))), quotient, kept)


@tvm.transform.module_pass(opt_level=0, name="TorchFloatDivision")
class TorchFloatDivision(CallRewritePass):
    """Module pass: float ``floor_divide`` and ``floor_mod`` computed as torch's (module docstring).

    ``rewritten``: calls rewritten by the last run.
    """

    rewrite = staticmethod(_torch_division)


__all__ = ["DIVISION_OPS", "TorchFloatDivision"]
