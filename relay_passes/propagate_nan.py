"""Make the imported graph's clamps keep NaN, as torch's do.

TVM lowers ``relu``, ``clip`` (``clamp``, ``hardtanh``, ``relu6``), ``maximum`` and ``minimum`` to
a compare-and-select, which returns the other operand when one is NaN: ``relu(nan) = 0``,
``hardtanh(nan) = 1``. torch returns NaN for all of them, so a NaN reaching a PB layer's output
(a row with a NaN gives NaN outputs, as in torch) was turned back into finite numbers one op
later. This pass wraps each such float op so that NaN passes through::

    relu(x)         ->  where(isnan(x), x, relu(x))
    maximum(a, b)   ->  where(isnan(a) | isnan(b), a + b, maximum(a, b))   (a + b is NaN there)
    max_pool(x)     ->  where(max_pool(float(isnan(x))) > 0, nan, max_pool(x))
    max(x, axis)    ->  where(max(float(isnan(x)), axis) > 0, nan, max(x, axis))    (min alike)
    argmax(x, axis) ->  where(max(isnan(x), axis) > 0, argmax(isnan(x), axis), argmax(x, axis))
    median(x, axis) ->  where(any NaN, (nan, first NaN's index), median(x, axis))
    argsort(x)      ->  argsort(key(x))              (sort alike, with gather_elements)
    topk(x, k)      ->  i = topk(key(x), k, "indices");  gather_elements(x, i), i

torch's ``argmax`` / ``argmin`` (and the index of ``torch.max(x, dim)``, which
:mod:`pbtvm.torch_import` imports as ``max`` and ``argmax``) give the first NaN's index; TVM's skip
NaN. The elementwise ``where`` fuses into the op's own kernel; max pooling and the reductions
reduce the NaN indicator over the same window or axes (one more pass).

torch sorts NaN above every number (``torch.sort``, imported as ``argsort`` + ``gather_elements``,
``argsort``, ``topk``); TVM's comparison sorts leave a row holding NaN in no order at all. They
sort a float64 key instead, :func:`order_key`: the number itself, ``+inf`` raised to the largest
float64 and NaN made ``+inf``, so numbers < ``+inf`` < NaN; the values are gathered from the input.
Float64 inputs have no wider type: their ``+inf`` and the largest float64 (1.8e308) sort as equal
there, so either may come first.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pbtvm._tvm import relax, tvm

from .rewrite_calls import CallRewritePass, is_float

#: Ops of one tensor operand that drop NaN in TVM (argument 0 is the tensor).
UNARY_OPS = ("relax.nn.relu", "relax.clip")
#: Elementwise binary ops that drop NaN in TVM.
BINARY_OPS = ("relax.maximum", "relax.minimum")
#: Max pooling: a window holding NaN gives the largest of its other values in TVM.
POOL_OPS = ("relax.nn.max_pool1d", "relax.nn.max_pool2d", "relax.nn.max_pool3d")
#: Reductions: NaN survives only as the last element reduced.
REDUCE_OPS = ("relax.max", "relax.min")
#: Index reductions: the index of an extreme number, never of a NaN.
INDEX_OPS = ("relax.argmax", "relax.argmin")
#: Sorts: a NaN breaks TVM's comparison sort.
SORT_OPS = ("relax.argsort", "relax.sort", "relax.topk")
#: ``median`` (values, and indices along an axis): a number even where the axis holds NaN.
MEDIAN_OPS = ("relax.median",)


def _isnan_ready(x: relax.Expr) -> relax.Expr:
    """``x``, bfloat16 as float32: TVM 0.27 has no bfloat16 ``isnan`` (and its simplifier folds
    ``x != x`` to false)."""
    return relax.op.astype(x, "float32") if x.ty.dtype == "bfloat16" else x


def _isnan(x: relax.Expr) -> relax.Expr:
    """``isnan(x)``, of bfloat16 through float32."""
    return relax.op.isnan(_isnan_ready(x))


def order_key(x: relax.Expr) -> relax.Expr:
    """A float64 tensor that sorts as torch sorts ``x``: numbers < ``+inf`` < NaN.

    Every float32, float16 and bfloat16 number is exact in float64 and below its largest value,
    which ``+inf`` becomes; NaN becomes ``+inf``.
    """
    key = x if x.ty.dtype == "float64" else relax.op.astype(_isnan_ready(x), "float64")
    inf = relax.const(float("inf"), "float64")
    top = relax.op.where(relax.op.equal(key, inf), relax.const(np.finfo(np.float64).max, "float64"), key)
    return relax.op.where(relax.op.isnan(key), inf, top)


def _propagating(call: relax.Call, op: str | None, emit: Callable) -> relax.Expr | None:
    """``call`` giving NaN where torch's op does (see the module docstring), or None where TVM's
    already does (not an op listed here, or a non-float operand)."""
    tensors = [a for a in call.args if isinstance(a.ty, relax.TensorType)]
    ops = UNARY_OPS + BINARY_OPS + POOL_OPS + REDUCE_OPS + INDEX_OPS + SORT_OPS + MEDIAN_OPS
    if op not in ops or not all(is_float(a) for a in tensors):
        return None
    if op in SORT_OPS:
        return _sort(call, op, emit)
    if op in MEDIAN_OPS:
        return _median(call, emit)
    if op in INDEX_OPS and call.args[0].ty.dtype == "bfloat16":  # TVM 0.27 builds no bfloat16
        # argmax / argmin; in float32 every value and so the order is the same
        call = relax.Call(call.op, [emit(relax.op.astype(call.args[0], "float32"))], call.attrs)
    kept = emit(call)
    if op in INDEX_OPS:  # the first NaN is torch's extreme: argmax of the indicator finds it
        axis, keepdims = call.attrs.axis, call.attrs.keepdims
        flag = emit(relax.op.astype(_isnan(call.args[0]), "int32"))
        axes = None if axis is None else [axis]
        found = emit(relax.op.max(flag, axes, keepdims))
        hit = emit(relax.op.greater(found, relax.const(0, "int32")))
        return relax.op.where(hit, emit(relax.op.argmax(flag, axis, keepdims)), kept)
    if op in POOL_OPS + REDUCE_OPS:  # the same window / axes over the NaN indicator
        x, dtype = call.args[0], call.args[0].ty.dtype
        flag = emit(relax.op.astype(_isnan(x), dtype))
        if op in POOL_OPS:
            pooled = emit(relax.Call(call.op, [flag], call.attrs))
        else:
            pooled = emit(relax.op.max(flag, call.attrs.axis, call.attrs.keepdims))
        hit = emit(relax.op.greater(pooled, relax.const(0, dtype)))
        return relax.op.where(hit, relax.const(float("nan"), dtype), kept)
    if op in UNARY_OPS:
        x = call.args[0]
        nan, value = _isnan(x), x
    else:
        a, b = call.args
        nan, value = relax.op.logical_or(_isnan(a), _isnan(b)), relax.op.add(a, b)
    value = value if isinstance(value, relax.Var) else emit(value)
    return relax.op.where(emit(nan), value, kept)


def _median(call: relax.Call, emit: Callable) -> relax.Expr:
    """NaN (and the first NaN's index) where the reduced axes hold one, as torch's median."""
    x, at = call.args[0], call.attrs
    kept = emit(call)
    flag = emit(relax.op.astype(_isnan(x), "int32"))
    axes = None if at.axis is None else [int(a) for a in at.axis]
    hit = emit(relax.op.greater(emit(relax.op.max(flag, axes, at.keepdims)), relax.const(0, "int32")))
    nan = relax.const(float("nan"), x.ty.dtype)
    if isinstance(kept.ty, relax.TensorType):  # all axes: the value alone
        return relax.op.where(hit, nan, kept)
    values, indices = emit(relax.TupleGetItem(kept, 0)), emit(relax.TupleGetItem(kept, 1))
    first = emit(relax.op.astype(emit(relax.op.argmax(flag, axes[0], at.keepdims)), indices.ty.dtype))
    return relax.Tuple([emit(relax.op.where(hit, nan, values)), emit(relax.op.where(hit, first, indices))])


def _sort(call: relax.Call, op: str, emit: Callable) -> relax.Expr:
    """``argsort`` / ``sort`` / ``topk`` of :func:`order_key`, the values gathered from ``x``."""
    x, at = call.args[0], call.attrs
    key = emit(order_key(x))
    if op == "relax.argsort":
        return relax.op.argsort(key, at.axis, at.descending, at.dtype)
    if op == "relax.sort":
        order = emit(relax.op.argsort(key, at.axis, at.descending, "int64"))
        return relax.op.gather_elements(x, order, at.axis)
    order = emit(relax.op.topk(key, at.k, at.axis, "indices", at.largest, at.dtype))
    if at.ret_type == "indices":
        return order
    values = emit(relax.op.gather_elements(x, order, at.axis))
    return values if at.ret_type == "values" else relax.Tuple([values, order])


@tvm.transform.module_pass(opt_level=0, name="PropagateNaN")
class PropagateNaN(CallRewritePass):
    """Module pass: NaN-keeping ``relu`` / ``clip`` / ``maximum`` / ``minimum`` / max pooling /
    ``max`` / ``min``, NaN-finding ``argmax`` / ``argmin`` and sorts with NaN largest (``argsort``,
    ``sort``, ``topk``) in every Relax function.

    ``rewritten``: calls rewritten by the last run.
    """

    rewrite = staticmethod(_propagating)
