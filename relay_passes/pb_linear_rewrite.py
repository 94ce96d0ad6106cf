"""Rewrite dense layers with constant weights into PrecisionBatching kernels.

Matches what ``from_exported_program`` emits for ``nn.Linear`` and friends::

    matmul(x, permute_dims(W))            W: constant [N, K] (also under broadcast_to)
    matmul(x, C)                          C: constant [K, N]
    add(<one of the above>, b)            b: constant [N], either operand order

for 2-D and higher-rank ``x`` (flattened to [-1, K] and reshaped back), float32/16 activations.
Each match becomes ``call_tir(act_pack)`` + ``call_tir(pb_dense)`` on pre-packed weight planes.
Identical weight constants are quantized and packed once; layers that read the same activation
share one activation pack. Every rewritten function gains a last parameter
``bitlayers: R.Shape([L])`` - the run-time precision knob. Anything else that looks like a layer
(matmuls with a non-constant operand, convolutions) is left in full precision and listed in the
:class:`ConversionReport` (the caller warns).
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field

import numpy as np
import tvm_ffi
from tvm.relax.expr_functor import PyExprMutator, PyExprVisitor, mutator, visitor

from pbtvm._tvm import relax, tir, tvm
from pbtvm.bitplane import BitplaneFormat
from pbtvm.errors import naming_layer
from pbtvm.lowering import LayerRecord, constant_array, lower_weights, weight_key
from pbtvm.names import ATTR_IN_BLOCK_MAX_BATCH, KernelKind
from pbtvm.ops import act_quantize_pack, kernel_attrs, pb_dense, pb_dense_act
from pbtvm.quantize import AUTO
from pbtvm.schedules.cpu_vnni import one_kernel_layer
from pbtvm.schedules.cuda_bmma import one_launch_layer, one_launch_max_batch

from .block_builder import blocks_closed_on_error
from .rewrite_calls import op_name
from .te_call import emit_te_call

logger = logging.getLogger(__name__)

#: Layer ops that PB does not convert; they are reported as kept in full precision.
UNCONVERTED_LAYER_OPS = (
    "relax.nn.conv1d",
    "relax.nn.conv2d",
    "relax.nn.conv3d",
    "relax.nn.conv1d_transpose",
    "relax.nn.conv2d_transpose",
)
#: Activation dtypes the rewrite converts (the PB kernels compute in float32 and cast back).
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclass
class ConversionReport:
    """What the rewrite converted and what it left in full precision.

    ``converted``: one dict per rewritten layer (``weight_key``, ``shape`` [N, K], ``bias``).
    ``skipped``: one dict per layer-like op left alone (``op``, ``reason``, ``weight_key`` or None).
    ``weight_key`` is :func:`weight_key` of the float weight, so callers can map layers back to
    module names.
    """

    converted: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    #: ``relax.matmul`` calls seen, converted or not; a skipped one has its ``matmul_index``.
    n_matmuls: int = 0
    #: Weight key of a constant's slice (``split`` / ``strided_slice``, as ``nn.MultiheadAttention``
    #: splits ``in_proj_weight`` into q, k, v for cross-attention) -> (whole constant's key, axis,
    #: the slice along it, or the index of one entry: ``W[i]`` of a stacked weight).
    parts: dict[str, tuple[str, int, slice | int]] = field(default_factory=dict)
    #: Weight key of a constant transposed, reshaped or cast to another dtype (``torch.autocast``)
    #: -> the constant's key: the same weight, named as it.
    derived: dict[str, str] = field(default_factory=dict)

    def name_of(self, key: str, names: dict[str, str]) -> str | None:
        """The name of the weight ``key`` from ``names`` (weight key -> name): its own, or that of
        the weight it was cut from (``"a.in_proj_weight[32:96] (MultiheadAttention)"``, an entry
        ``"experts[1] (MoE)"``) or transposed, reshaped or cast from; None if none is named."""
        seen = set()
        while key not in names and key not in seen:
            seen.add(key)
            if key in self.parts:
                whole, axis, cut = self.parts[key]
                whole_name = self.name_of(whole, names)
                return None if whole_name is None else _part_name(whole_name, axis, cut)
            if key not in self.derived:
                return None
            key = self.derived[key]
        return names.get(key)


def _part_name(whole: str, axis: int, cut: slice | int) -> str:
    """``whole``'s name with the slice or index ``cut`` along ``axis``."""
    path, sep, kind = whole.partition(" (")
    if isinstance(cut, int):
        return f"{path}[{':, ' * axis}{cut}]{sep}{kind}"
    step = f":{cut.step}" if cut.step not in (None, 1) else ""
    return f"{path}[{':, ' * axis}{cut.start}:{cut.stop}{step}]{sep}{kind}"


def dense_layer_compute(fused: bool, fmt: BitplaneFormat, k_dim: int, has_bias: bool, activation: str | None = None):
    """The TE compute of a PB dense layer's function, as :func:`emit_te_call` calls it with the
    layer's tensors and ``bitlayers``: ``(x, wp, w_scale[, bias], bitlayers)`` for
    :func:`pbtvm.ops.pb_dense_act` (``fused``: it packs its input), else ``(xp, x_scale, rowsum,
    wp, w_scale[, bias], bitlayers)`` for :func:`pbtvm.ops.pb_dense`; ``activation`` in the
    epilogue (:class:`FuseActivationIntoPB`)."""

    def compute(*t):
        bias, bitlayers = (t[-2] if has_bias else None), t[-1]
        if fused:
            return pb_dense_act(t[0], t[1], t[2], bias, bitlayers, fmt, activation)
        return pb_dense(*t[:5], bias, bitlayers, fmt, k_dim, activation=activation)

    return compute


#: The reason's words for a matmul of two run-time tensors (attention's ``q kᵀ``): no weight at all.
RUNTIME_PRODUCT = "a product of run-time tensors"
#: Elementwise ops folded over constant operands (numpy broadcasts as Relax does).
_ELEMENTWISE = {
    "relax.multiply": np.multiply,
    "relax.add": np.add,
    "relax.subtract": np.subtract,
    "relax.divide": np.divide,
    "relax.negative": np.negative,
    # weight_norm's ``g * v / ||v||`` (torch's decomposition: abs, power 2, sum, power 0.5)
    "relax.abs": np.abs,
    "relax.power": np.power,
    "relax.sqrt": np.sqrt,
}
#: Reductions folded over a constant operand (``weight_norm``'s norm of each row).
_REDUCTIONS = {"relax.sum": np.sum}
#: Ops :meth:`_Rewriter._constant` evaluates over constants.
_FOLDED_OPS = (
    "relax.permute_dims",
    "relax.expand_dims",
    "relax.squeeze",
    "relax.reshape",
    "relax.astype",
    *_ELEMENTWISE,
    *_REDUCTIONS,
)


def _cast(value: np.ndarray, dtype: str) -> np.ndarray:
    """``value`` cast to ``dtype``; to bfloat16 rounded as torch rounds (to nearest even, by
    ``ml_dtypes``, TVM's own bfloat16) and held as float32, as bfloat16 constants are read."""
    if dtype != "bfloat16":
        return np.ascontiguousarray(value.astype(dtype))
    import ml_dtypes

    return np.asarray(value, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def _same_matrices(outer: relax.Expr, inner: relax.Expr) -> bool:
    """Whether ``outer`` (a broadcast or reshape of ``inner``) keeps ``inner``'s last two axes, so that
    its matrices are ``inner``'s (a reshape then only regroups the leading axes)."""
    shapes = [getattr(e.ty, "shape", None) for e in (outer, inner)]
    if any(s is None for s in shapes) or inner.ty.ndim < 2 or outer.ty.ndim < 2:
        return False
    (o1, o2), (i1, i2) = (list(s.values)[-2:] for s in shapes)
    return all(tvm_ffi.structural_equal(a, b) for a, b in ((o1, i1), (o2, i2)))


def _shape_text(expr: relax.Expr) -> str:
    """``[3, 5, 8]`` for a tensor of that shape (run-time sizes by name), ``?`` where unknown."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return "?"
    return "[" + ", ".join(re.sub(r"T\.int64\((-?\d+)\)", r"\1", str(d)) for d in ty.shape.values) + "]"


@dataclass
class _Linear:
    x: relax.Expr
    weight: np.ndarray  # [N, K] float
    bias: np.ndarray | None
    result: relax.Expr
    out_dtype: str


#: Ops through which a matmul's right operand may still be a constant weight (:func:`dense_shapes`):
#: those the rewrite folds, cuts (:meth:`_Rewriter._constant`) or looks through (``_weight_of``).
_WEIGHT_PATH_OPS = (*_FOLDED_OPS, "relax.broadcast_to", "relax.split", "relax.strided_slice")
#: Ops computed from constants only where every operand is one (``take``: its indices too; a
#: lookup of run-time ids in a constant table is not).
_ALL_OPERANDS_OPS = (*_ELEMENTWISE, "relax.take")


def _from_constants(expr: relax.Expr, bound: dict) -> bool:
    """Whether ``expr`` is computed from constants alone through :data:`_WEIGHT_PATH_OPS`
    (``bound``: the function's variables and their values)."""
    while isinstance(expr, relax.Var) and expr in bound:
        expr = bound[expr]
    if isinstance(expr, tvm.ir.Constant):
        return True
    if isinstance(expr, relax.TupleGetItem):
        return _from_constants(expr.tuple_value, bound)
    name = op_name(expr)
    if name in _ALL_OPERANDS_OPS:
        return all(_from_constants(arg, bound) for arg in expr.args)
    return name in _WEIGHT_PATH_OPS and _from_constants(expr.args[0], bound)


def dense_shapes(mod: tvm.IRModule) -> list[tuple[int | None, int | None]]:
    """``(rows, K)`` of every ``matmul`` in ``mod``'s Relax functions whose right operand is a
    constant (a dense layer's weight, maybe transposed, cut or scaled): ``rows`` the product of
    the left operand's leading dimensions, ``K`` its last; None where a size is only known at run
    time (a dynamic batch). Activation x activation matmuls (attention's scores) stay in float and
    are not listed."""
    shapes: list[tuple[int | None, int | None]] = []

    def static(dims: list) -> int | None:
        return int(np.prod([int(d) for d in dims])) if all(isinstance(d, tir.IntImm) for d in dims) else None

    matmuls: list[relax.Call] = []
    bound: dict = {}  # every function's variables (distinct objects) and their values

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Call) and op_name(expr) == "relax.matmul":
            matmuls.append(expr)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            bound.update(relax.analysis.get_var2val(func))
            relax.analysis.post_order_visit(func.body, visit)
    for call in (c for c in matmuls if _from_constants(c.args[1], bound)):
        shape = getattr(call.args[0].ty, "shape", None)
        dims = list(shape.values) if isinstance(shape, relax.ShapeExpr) else None
        shapes.append((static(dims[:-1]), static(dims[-1:])) if dims else (None, None))
    return shapes


@visitor
class _VarReads(PyExprVisitor):
    """How many times each variable of a function is read (``reads[var]``; a binding's own
    variable is not a read)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: dict[relax.Var, int] = {}

    def visit_var_(self, var: relax.Var) -> None:
        self.reads[var] = self.reads.get(var, 0) + 1

    def visit_dataflow_var_(self, var: relax.DataflowVar) -> None:
        self.reads[var] = self.reads.get(var, 0) + 1


def _matmul_reads(func: relax.Function) -> dict[relax.Var, int]:
    """How many ``matmul`` calls of ``func`` read each variable as their left operand."""
    counts: dict[relax.Var, int] = {}

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Call) and op_name(expr) == "relax.matmul" and isinstance(expr.args[0], relax.Var):
            counts[expr.args[0]] = counts.get(expr.args[0], 0) + 1

    relax.analysis.post_order_visit(func.body, visit)
    return counts


@mutator
class _Rewriter(PyExprMutator):
    def __init__(
        self,
        mod: tvm.IRModule,
        fmt: BitplaneFormat,
        report: ConversionReport,
        codebook: str | None,
        method: str,
        importance: dict | None,
        layer_names: dict[str, str],
        codebooks: dict[str, str | None] | None = None,
        tune_batch: int = 1,
    ) -> None:
        super().__init__(mod)
        self.codebooks = codebooks or {}
        self.tune_batch = tune_batch
        self.fmt = fmt
        self.importance = importance or {}
        self.codebook = codebook
        self.method = method
        self.layer_names = layer_names
        self.report = report
        self.bitlayers = tir.Var("bitlayers", "int64")
        self._packed_weights: dict[str, tuple[tvm.ir.Constant, tvm.ir.Constant, BitplaneFormat]] = {}
        self._act_packs: list[tuple[relax.Expr, relax.Expr]] = []
        self._float_inputs: list[tuple[relax.Expr, relax.Expr]] = []  # (input, its float32 rows)
        self._linears: list[_Linear] = []
        self._reads: dict[relax.Var, int] = {}  # of the function being rewritten, before the rewrite
        self._matmul_reads: dict[relax.Var, int] = {}  # the same, as a matmul's left operand
        self.n_rewritten = 0

    # ------------------------------------------------------------------ matching helpers
    def _unwrap(self, expr: relax.Expr) -> relax.Expr:
        while isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            if bound is None:
                break
            expr = bound
        return expr

    def _constant(self, expr: relax.Expr) -> np.ndarray | None:
        """The value of a constant operand, or of one part of a constant cut by ``split`` or a
        ``strided_slice`` along one axis; bfloat16 (no numpy dtype) comes back as float32."""
        expr = self._unwrap(expr)
        if isinstance(expr, relax.TupleGetItem):
            return self._split_part(self._unwrap(expr.tuple_value), int(expr.index))
        if op_name(expr) == "relax.strided_slice":
            return self._sliced(expr)
        if op_name(expr) == "relax.take":
            return self._taken(expr)
        if op_name(expr) in _FOLDED_OPS:
            return self._folded(expr)
        if not isinstance(expr, tvm.ir.Constant):
            return None
        return constant_array(expr)

    def _folded(self, call: relax.Call) -> np.ndarray | None:
        """A layout op (transpose, new or dropped axes, reshape), a cast or an elementwise op of
        constants, in numpy, as torch's decompositions of ``einsum('bsd,ed->bse', x, W)`` and ``x @
        (W * 0.5).T`` leave the weight (and ``-W``, and ``torch.autocast`` its cast); None where an
        operand is not a constant. A layout op's or cast's result is remembered in the report's
        ``derived``, for naming."""
        name, attrs = op_name(call), call.attrs
        if name in _ELEMENTWISE:
            values = [self._constant(arg) for arg in call.args]
            if any(v is None for v in values):
                return None
            with np.errstate(all="ignore"):  # inf / NaN as TVM would compute them (the quantizer names them)
                result = np.asarray(_ELEMENTWISE[name](*values))
            # the operand that is the weight (``W * 0.5``, ``-W``, ``v * g / ||v||``): the one of the
            # result's shape, where only one is
            shaped = [v for v in values if v.shape == result.shape]
            if len(shaped) == 1 and result.ndim >= 2:
                self.report.derived.setdefault(weight_key(result), weight_key(shaped[0]))
            return result
        value = self._constant(call.args[0])
        if value is None:
            return None
        if name in _REDUCTIONS:
            axes = None if attrs.axis is None else tuple(int(a) for a in attrs.axis)
            return _REDUCTIONS[name](value, axis=axes, keepdims=bool(attrs.keepdims))
        if name == "relax.permute_dims":
            result = np.transpose(value, None if attrs.axes is None else [int(a) for a in attrs.axes])
        elif name == "relax.expand_dims":
            result = np.expand_dims(value, tuple(int(a) for a in attrs.axis))
        elif name == "relax.squeeze":
            result = np.squeeze(value, None if attrs.axis is None else tuple(int(a) for a in attrs.axis))
        elif name == "relax.astype":  # torch.autocast's cast of a weight
            result = _cast(value, str(attrs.dtype))
        else:  # relax.reshape to a constant shape
            shape = getattr(call.args[1], "values", None)
            if shape is None or not all(isinstance(d, tir.IntImm) for d in shape):
                return None
            result = np.reshape(value, [int(d) for d in shape])
        self.report.derived.setdefault(weight_key(result), weight_key(value))
        return result

    def _taken(self, call: relax.Call) -> np.ndarray | None:
        """``take(constant, constant indices, axis)``, as ``W[i]`` (torch's ``select``) of a stacked
        weight leaves it, or None; a scalar index is remembered in the report's ``parts``."""
        whole, indices = self._constant(call.args[0]), self._unwrap(call.args[1])
        if whole is None or not isinstance(indices, tvm.ir.Constant):
            return None
        index = indices.value.numpy()
        axis = None if call.attrs.axis is None else int(call.attrs.axis) % whole.ndim  # None: flattened
        mode = "wrap" if str(call.attrs.mode) == "wrap" else "clip"  # in bounds after NormalizeConstantIndices
        taken = np.ascontiguousarray(np.take(whole, index, axis=axis, mode=mode))
        if index.ndim == 0 and axis is not None:
            self.report.parts.setdefault(weight_key(taken), (weight_key(whole), axis, int(index)))
        return taken

    def _part(self, whole: np.ndarray, axis: int, cut: slice) -> np.ndarray:
        """``whole[cut]`` along ``axis``, remembered in the report's ``parts`` for naming."""
        part = np.ascontiguousarray(np.take(whole, range(*cut.indices(whole.shape[axis])), axis=axis))
        self.report.parts.setdefault(weight_key(part), (weight_key(whole), axis, cut))
        return part

    def _split_part(self, split: relax.Expr, index: int) -> np.ndarray | None:
        """Part ``index`` of ``split(constant, indices_or_sections, axis)``, or None."""
        whole = self._constant(split.args[0]) if op_name(split) == "relax.split" else None
        if whole is None:
            return None
        axis = int(split.attrs.axis) % whole.ndim
        cuts = split.attrs.indices_or_sections
        if isinstance(cuts, (int, tir.IntImm)):  # n equal sections
            size = whole.shape[axis] // int(cuts)
            bounds = [size * i for i in range(int(cuts) + 1)]
        else:
            bounds = [0, *(int(c) for c in cuts), whole.shape[axis]]
        return self._part(whole, axis, slice(bounds[index], bounds[index + 1]))

    def _sliced(self, call: relax.Call) -> np.ndarray | None:
        """``strided_slice(constant)`` along one axis, or None."""
        whole = self._constant(call.args[0])
        fields = [getattr(a, "fields", None) for a in call.args[1:]]  # tuples of IntImm, or run-time
        if whole is None or any(f is None or not all(isinstance(v, tir.IntImm) for v in f) for f in fields):
            return None
        axes, begin, end, *strides = ([int(v) for v in f] for f in fields)  # strides may be left out
        strides = strides[0] if strides else [1] * len(axes)
        if len(axes) != 1:
            return None
        axis = axes[0] % whole.ndim
        start, stop, step = slice(begin[0], end[0], strides[0]).indices(whole.shape[axis])
        return self._part(whole, axis, slice(start, stop, step))

    def _reads_inputs(self, expr: relax.Expr) -> bool:
        """Whether ``expr`` depends on a parameter of the function (an input), not only constants."""
        stack, seen = [expr], set()
        while stack:
            e = self._unwrap(stack.pop())
            if isinstance(e, relax.Var):  # unbound: a parameter
                return True
            if e in seen:
                continue
            seen.add(e)
            if isinstance(e, relax.Call):
                stack.extend(e.args)
            elif isinstance(e, relax.Tuple):
                stack.extend(e.fields)
            elif isinstance(e, relax.TupleGetItem):
                stack.append(e.tuple_value)
        return False

    def _weight_of(self, rhs: relax.Expr, x_rank: int = 2) -> tuple[np.ndarray | None, str]:
        """W [N, K] from the matmul's right operand, or (None, reason).

        The operand may be W (or its transpose) broadcast over leading axes and those axes reshaped,
        as torch's decomposition of ``nn.Linear`` on a non-contiguous 4-D input makes it (``bmm`` of
        ``reshape(broadcast_to(permute_dims(W)), [B*H, K, N])``): every matrix of it is W."""
        rhs = self._unwrap(rhs)
        while op_name(rhs) in ("relax.broadcast_to", "relax.reshape") and _same_matrices(rhs, rhs.args[0]):
            rhs = self._unwrap(rhs.args[0])
        if op_name(rhs) == "relax.permute_dims":  # W^T: the layer's weight is W itself
            axes = rhs.attrs.axes
            inner = self._constant(rhs.args[0])
            if inner is None:
                return None, "weight is not a constant"
            if inner.ndim == 2 and (axes is None or [int(a) for a in axes] == [1, 0]):
                return inner, ""
        const = original = self._constant(rhs)  # any other transpose is folded here
        if const is None:
            return None, "weight is not a constant"
        if 2 < const.ndim <= x_rank and all(d == 1 for d in const.shape[:-2]):  # [1, K, N] beside x's axes
            const = const.reshape(const.shape[-2:])
        if const.ndim != 2:
            return None, f"weight has rank {const.ndim}, not 2"
        if not isinstance(rhs, tvm.ir.Constant):  # cut or folded: no hashes for a model's own constant
            # the layer's weight is the constant transposed, named as it (``x @ W[a:b]`` as the slice,
            # einsum's reshaped weight as the weight)
            self.report.derived.setdefault(weight_key(const.T), weight_key(original))
        return const.T, ""

    def _constant_left(self, call: relax.Call) -> relax.Expr | None:
        """``W @ Y`` with a constant 2-D ``W`` [N, K] and a run-time 2-D ``Y`` [K, M] (``(W @ x.T).T``,
        column-vector code) as the PB layer ``(Y^T @ W^T)^T``: ``Y``'s columns are the layer's
        rows. None for any other product."""
        left, rhs = call.args
        weight = self._constant(left)
        ty = rhs.ty
        if (
            weight is None
            or weight.ndim != 2
            or not np.issubdtype(weight.dtype, np.floating)
            or not isinstance(ty, relax.TensorType)
            or ty.ndim != 2
            or ty.shape is None
            or str(ty.dtype) not in FLOAT_DTYPES
            or not self._reads_inputs(rhs)
        ):
            return None
        k_dim = ty.shape.values[0]
        if not isinstance(k_dim, tir.IntImm) or int(k_dim) != weight.shape[1]:
            return None
        out_dtype = str(call.attrs.out_dtype)
        rows = self.builder_.emit(relax.op.permute_dims(rhs))
        out = self._record(rows, weight, None, out_dtype if out_dtype not in ("", "void", "None") else str(ty.dtype))
        return relax.op.permute_dims(self.builder_.emit(out))

    def _match_matmul(self, call: relax.Call) -> tuple[relax.Expr | None, np.ndarray | None, str]:
        x, rhs = call.args
        weight, reason = self._weight_of(rhs, x.ty.ndim if isinstance(x.ty, relax.TensorType) else 2)
        if weight is None:
            if reason == "weight is not a constant":  # e.g. attention's q k^T: tell the products apart
                if self._constant(x) is not None:
                    made = "the constant is the left operand, W @ x,"
                elif self._reads_inputs(rhs):
                    made = RUNTIME_PRODUCT
                else:
                    made = "made from constants by ops"
                reason += f" ({made} {_shape_text(x)} @ {_shape_text(rhs)})"
            return None, None, reason
        if not np.issubdtype(weight.dtype, np.floating):
            return None, None, f"weight dtype {weight.dtype} is not floating point"
        xv = self._unwrap(x)
        if op_name(xv) == "relax.broadcast_to":  # the exporter's no-op broadcast of 3-D inputs
            inner = xv.args[0]
            if tvm_ffi.structural_equal(inner.ty.shape, x.ty.shape):
                x = inner
        ty = x.ty
        if not isinstance(ty, relax.TensorType) or ty.ndim < 2 or ty.shape is None:
            return None, None, "activation has unknown rank or shape"
        if str(ty.dtype) not in FLOAT_DTYPES:
            return None, None, f"activation dtype {ty.dtype} is not one of {', '.join(FLOAT_DTYPES)}"
        k_dim = ty.shape.values[-1]
        if not isinstance(k_dim, tir.IntImm) or int(k_dim) != weight.shape[1]:
            return None, None, f"activation K {k_dim} does not match weight {weight.shape}"
        return x, weight, ""

    # ------------------------------------------------------------------ emission
    def _emit_te(self, fn, inputs: list[relax.Expr], name: str, attrs: dict, prim_args: tuple = ()) -> relax.Expr:
        """:func:`emit_te_call` into this rewrite's module."""
        return emit_te_call(self.builder_, fn, inputs, name, attrs, prim_args)

    def _packed(self, weight: np.ndarray) -> tuple[tvm.ir.Constant, tvm.ir.Constant, BitplaneFormat]:
        """Packed planes, row parameters and the layer's format (codebook chosen per weight)."""
        key = weight_key(weight)
        if key not in self._packed_weights:
            imp = [self.importance.get(key)]
            codebook = self.codebooks.get(key, self.codebook)
            shown = self.report.name_of(key, self.layer_names)
            with naming_layer(shown or f"the dense layer with weight {list(weight.shape)}"):
                fmt, [(planes, params)] = lower_weights([weight], self.fmt, (codebook, self.method), imp)
            self._packed_weights[key] = (planes, params, fmt)
        return self._packed_weights[key]

    def _act_pack(self, x2: relax.Expr, k_dim: int) -> relax.Expr:
        for src, packed in self._act_packs:
            if src.same_as(x2):
                return packed
        fmt = self.fmt
        packed = self.builder_.emit(
            self._emit_te(
                lambda x: act_quantize_pack(x, fmt),
                [x2],
                f"pb_act_pack_a{fmt.act_bits}_k{k_dim}",
                kernel_attrs(KernelKind.ACT_PACK, fmt, k_dim),
            )
        )
        self._act_packs.append((x2, packed))
        return packed

    def _float_rows(self, x: relax.Expr, k_dim: int) -> relax.Expr:
        """``x`` as float32 ``[rows, K]``: itself, or one reshape / cast per input for every layer
        that reads it (layers on one 3-D or fp16 input then share its activation pack, as q, k
        and v projections or an MLP's gate and up do)."""
        for src, rows in self._float_inputs:
            if src.same_as(x):
                return rows
        rows = x
        if x.ty.ndim != 2:
            rows = self.builder_.emit(relax.op.reshape(rows, [-1, k_dim]))
        if str(x.ty.dtype) != "float32":
            rows = self.builder_.emit(relax.op.astype(rows, "float32"))
        if not rows.same_as(x):
            self._float_inputs.append((x, rows))
        return rows

    def _emit_linear(self, x: relax.Expr, weight: np.ndarray, bias: np.ndarray | None, out_dtype: str) -> relax.Expr:
        """PB layer on ``x``; computes in float32, returns ``out_dtype`` (the matmul's)."""
        n_out, k_dim = (int(d) for d in weight.shape)
        ty = x.ty
        dims = list(ty.shape.values)
        x2 = self._float_rows(x, k_dim)
        wp, ws, fmt = self._packed(weight)
        has_bias = bias is not None
        bias_const = [relax.const(np.asarray(bias, np.float32), "float32")] if has_bias else []
        rows = x2.ty.shape.values[0]
        static_rows = int(rows) if isinstance(rows, tir.IntImm) else None
        # A symbolic batch packs in the layer only where no other layer shares the input's pack:
        # past its one-launch batches the function packs its own rows (a launch) where a shared
        # pack is one.
        one_launch = one_launch_layer(fmt, n_out, k_dim, static_rows, tune_batch=self.tune_batch) and (
            static_rows is not None or self._one_matmul_reads(x)
        )
        if one_kernel_layer(fmt, k_dim) or one_launch:
            attrs = kernel_attrs(KernelKind.DENSE_ACT, fmt, k_dim)
            if one_launch and static_rows is None:  # one launch at small batches, pack + kernel above
                attrs[ATTR_IN_BLOCK_MAX_BATCH] = one_launch_max_batch(k_dim)
            out = self._emit_te(
                dense_layer_compute(True, fmt, k_dim, has_bias),
                [x2, wp, ws, *bias_const],
                f"pb_dense_act_{fmt.name.replace('-', '_')}_n{n_out}_k{k_dim}" + ("_bias" if has_bias else ""),
                attrs,
                (self.bitlayers,),
            )
            return self._finish_linear(out, out_dtype, ty, dims, n_out)
        packed = self._act_pack(x2, k_dim)
        xp, xs, rowsum = (self.builder_.emit(relax.TupleGetItem(packed, i)) for i in range(3))
        out = self._emit_te(
            dense_layer_compute(False, fmt, k_dim, has_bias),
            [xp, xs, rowsum, wp, ws, *bias_const],
            f"pb_dense_{fmt.name.replace('-', '_')}_n{n_out}_k{k_dim}" + ("_bias" if has_bias else ""),
            kernel_attrs(KernelKind.GEMM, fmt, k_dim),
            (self.bitlayers,),
        )
        return self._finish_linear(out, out_dtype, ty, dims, n_out)

    def _finish_linear(self, out: relax.Expr, out_dtype: str, ty: object, dims: list, n_out: int) -> relax.Expr:
        """The layer's float32 [B, N] result in the matmul's dtype and shape."""
        if out_dtype != "float32":
            out = relax.op.astype(self.builder_.emit(out), out_dtype)
        if ty.ndim != 2:
            out = relax.op.reshape(self.builder_.emit(out), dims[:-1] + [n_out])
        self.n_rewritten += 1
        return out

    def _record(self, x: relax.Expr, weight: np.ndarray, bias: np.ndarray | None, out_dtype: str) -> relax.Expr:
        result = self._emit_linear(x, weight, bias, out_dtype)
        self._linears.append(_Linear(x, weight, bias, result, out_dtype))
        return result

    def _reads_of(self, var: relax.Var, counts: dict | None = None) -> int:
        """How often the function read ``var`` before the rewrite (``counts``: of those reads, the
        ones :attr:`_matmul_reads` counts); for a variable the rewrite made anew (a matmul's
        variable typed looser than the PB result), its original's count."""
        counts = self._reads if counts is None else counts
        if var in self._reads:  # a variable of the function before the rewrite
            return counts.get(var, 0)
        originals = (v for v in self._reads if isinstance(v, relax.Var) and self.get_var_remap(v) is not None)
        return max((counts.get(v, 0) for v in originals if self.get_var_remap(v).same_as(var)), default=1)

    def _one_matmul_reads(self, x: relax.Expr) -> bool:
        """Whether the layer's input ``x`` is read by no other matmul, so that no other layer would
        share its activation pack (:meth:`_act_pack`, through :meth:`_float_rows`); other readers
        (a residual add) share nothing."""
        return not isinstance(x, relax.Var) or self._reads_of(x, self._matmul_reads) <= 1

    def _read_once(self, expr: relax.Expr) -> bool:
        """Whether ``expr`` (and every variable it is bound through) is read only here: a bias
        add may then take over its linear."""
        while isinstance(expr, relax.Var):
            if self._reads_of(expr) > 1:
                return False
            bound = self.lookup_binding(expr)
            if bound is None:
                break
            expr = bound
        return True

    def _linear_of(self, expr: relax.Expr) -> _Linear | None:
        bound = self._unwrap(expr) if isinstance(expr, relax.Var) else expr
        for lin in self._linears:
            if lin.result.same_as(bound):
                return lin
        return None

    # ------------------------------------------------------------------ visitor
    def visit_dataflow_block_(self, block: relax.DataflowBlock) -> relax.BindingBlock:
        """The block, its layers sharing packs and float inputs only among themselves (a variable
        emitted in one block is not visible in the next, nor outside an ``If`` branch or a
        nested function, whose blocks are visited inside the enclosing block's)."""
        with self._block_caches():
            return super().visit_dataflow_block_(block)

    def visit_binding_block_(self, block: relax.BindingBlock) -> relax.BindingBlock:
        """As :meth:`visit_dataflow_block_`, for a block outside a dataflow region."""
        with self._block_caches():
            return super().visit_binding_block_(block)

    @contextlib.contextmanager
    def _block_caches(self):
        """Empty pack and float-input caches for one block; the enclosing block's back after it."""
        saved = self._act_packs, self._float_inputs
        self._act_packs, self._float_inputs = [], []
        try:
            yield
        finally:
            self._act_packs, self._float_inputs = saved

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        name = op_name(call)
        if name == "relax.add":
            for lhs, rhs in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
                lin = self._linear_of(lhs)
                # a result read elsewhere too (``h = x @ W.T; return h, h + b``) keeps its linear
                # and a float add: fusing would run the layer twice, with and without the bias
                fusable = lin is not None and lin.bias is None and self._read_once(lhs)
                bias = self._constant(rhs) if fusable else None
                if bias is not None and bias.shape == (lin.weight.shape[0],):
                    self.n_rewritten -= 1  # the bias-free version becomes dead code
                    # By identity: ``remove`` compares with ==, which numpy weights do not support.
                    self._linears = [other for other in self._linears if other is not lin]
                    return self._record(lin.x, lin.weight, bias, lin.out_dtype)
        elif name == "relax.matmul":
            index = self.report.n_matmuls
            self.report.n_matmuls += 1
            transposed = self._constant_left(call)
            if transposed is not None:
                return transposed
            x, weight, reason = self._match_matmul(call)
            if weight is not None:
                out_dtype = str(call.attrs.out_dtype)
                return self._record(
                    x, weight, None, out_dtype if out_dtype not in ("", "void", "None") else str(x.ty.dtype)
                )
            const = self._weight_of(call.args[1])[0]
            key = weight_key(const) if const is not None else None
            self.report.skipped.append({"op": name, "reason": reason, "weight_key": key, "matmul_index": index})
        elif name in UNCONVERTED_LAYER_OPS:
            w = self._constant(call.args[1])
            key = weight_key(w) if w is not None else None
            self.report.skipped.append({"op": name, "reason": "not a dense layer", "weight_key": key})
        return call

    def rewrite(self, func: relax.Function) -> relax.Function:
        """Rewrite one function; adds the ``bitlayers`` parameter if anything was converted.

        A function that already ends in ``bitlayers: R.Shape([L])`` (from :class:`PBLSTMLowering`)
        keeps it, and its layers read the same knob.
        """
        reads = _VarReads()
        reads.visit_expr(func)
        self._reads = reads.reads
        self._matmul_reads = _matmul_reads(func)
        last = func.params[-1] if func.params else None
        if last is not None and last.name == "bitlayers" and isinstance(last.ty, relax.ShapeType):
            self.bitlayers = last.ty.values[0]
            before = self.n_rewritten
            new_func = self.visit_expr(func)
            return func if self.n_rewritten == before else new_func
        before = self.n_rewritten
        new_func = self.visit_expr(func)
        if self.n_rewritten == before:
            return func
        param = relax.Var("bitlayers", relax.ShapeType([self.bitlayers]))
        return relax.Function(
            list(new_func.params) + [param], new_func.body, new_func.ret_ty, new_func.is_pure, new_func.attrs
        )

    def finish_report(self) -> None:
        """Record the converted layers in the report."""
        for lin in self._linears:
            fmt = self._packed_weights[weight_key(lin.weight)][2]
            self.report.converted.append(LayerRecord.of(None, lin.weight, fmt, lin.bias is not None).as_dict())


@tvm.transform.module_pass(opt_level=0, name="PBLinearRewrite")
class PBLinearRewrite:
    """Module pass: every dense layer with a constant weight becomes a PB kernel pair.

    Parameters
    ----------
    fmt : BitplaneFormat
        Weight bits, activation bits and layout of every converted layer.
    codebook : str or None
        ``"auto"`` (default): each weight gets the codebook :func:`pbtvm.quantize.choose_codebook`
        picks (lowest weight MSE); a codebook name forces it; None keeps ``fmt.codebook``.
    method : str
        Weight quantizer, see :func:`pbtvm.quantize.quantize_weights`.
    importance : dict, optional
        :func:`weight_key` of a float weight -> per-input error weights [K] (calibration
        statistics, see :func:`pbtvm.calibration.input_importance`); other weights plain MSE.
    layer_names : dict, optional
        :func:`weight_key` -> layer name, for error messages (e.g. a weight holding NaN).
    codebooks : dict, optional
        :func:`weight_key` -> codebook for particular weights (e.g. an LSTM's input projection,
        whose codebook :class:`PBLSTMLowering` chose with its recurrent weight); others ``codebook``.
    tune_batch : int
        The batch the kernels are tuned at (or their tuning log looked up for): a CUDA layer with a
        symbolic batch packs in its own function (:func:`pbtvm.schedules.cuda_bmma.one_launch_layer`)
        only where that batch runs the one-launch kernel.

    Attributes
    ----------
    report : ConversionReport
        Filled by the last run.
    """

    def __init__(
        self,
        fmt: BitplaneFormat,
        codebook: str | None = AUTO,
        method: str = "mse",
        importance: dict | None = None,
        layer_names: dict[str, str] | None = None,
        codebooks: dict[str, str | None] | None = None,
        tune_batch: int = 1,
    ) -> None:
        self.fmt = fmt
        self.tune_batch = tune_batch
        self.codebooks = dict(codebooks or {})
        self.codebook = codebook
        self.method = method
        self.importance = importance
        self.layer_names = dict(layer_names or {})
        self.report = ConversionReport()

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:  # noqa: D102
        self.report = ConversionReport()
        rewriter = _Rewriter(
            mod,
            self.fmt,
            self.report,
            self.codebook,
            self.method,
            self.importance,
            self.layer_names,
            self.codebooks,
            self.tune_batch,
        )
        with blocks_closed_on_error(rewriter.builder_):
            for gvar, func in mod.functions_items():
                if isinstance(func, relax.Function):
                    rewriter.builder_.update_func(gvar, rewriter.rewrite(func))
        rewriter.finish_report()
        mod = rewriter.builder_.get()
        mod = relax.transform.DeadCodeElimination()(mod)
        logger.info(
            "PBLinearRewrite: %d layers converted, %d left", len(self.report.converted), len(self.report.skipped)
        )
        return mod
