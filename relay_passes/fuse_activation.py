"""Fold the activation after a binary-tensor-core PB layer (ReLU, GELU, SiLU) into the layer's kernel.

After :class:`PBLinearRewrite`, ``Linear`` + ``ReLU`` is a PB call and TVM's NaN-keeping relu
(:class:`PropagateNaN`)::

    y = call_tir(pb_dense_act_..., (x, wp, w_scale, bias, bitlayers))
    r = relu(y);  n = isnan(y);  out = where(n, y, r)

which TVM builds as a kernel of its own after the PB kernel: on a GPU at batch 1 a launch, a
round trip of ``y`` through memory and a kernel boundary per layer, next to a PB kernel of a few
microseconds. Where ``y`` is read by nothing else (a ``reshape`` or ``astype`` of the rewrite may
sit between: relu commutes with both), this pass makes ``out`` the call of the same layer with
the activation in its epilogue (``pbtvm.names.ATTR_ACTIVATION``, :func:`pbtvm.ops.epilogue.activated`:
NaN kept), then drops the dead bindings. ``gelu`` (erf or tanh) and ``silu`` (``relax.nn.silu``, or
``z * sigmoid(z)`` as torch's SiLU imports) of a layer's output go in the same way (through a reshape only: a cast to fp16 before them rounds their input).

Only layers in the ``mma16x256`` layout (CUDA sm_80+), whose kernel (:mod:`pbtvm.schedules.cuda_bmma`)
applies the attribute (the AVX-512 and table-lookup kernels are built from the format and would
drop it: :func:`pbtvm.schedules.rules.check_activation` refuses that), and only within one dataflow
block.
"""

from __future__ import annotations

from pbtvm import names
from pbtvm._tvm import relax, tir, tvm
from pbtvm.bitplane import MMA_LAYOUT

from .pb_linear_rewrite import dense_layer_compute
from .rewrite_calls import op_name, rewrite_every_function
from .te_call import emit_te_call

__all__ = ["FuseActivationIntoPB"]

#: Ops between the PB call and the activation that commute with it (relu(reshape(y)) = reshape(relu(y))).
_PASS_THROUGH = ("relax.reshape", "relax.astype")
_KINDS = (names.KernelKind.DENSE_ACT, names.KernelKind.GEMM)
#: Activations of one op (NaN passes through them in TVM as in torch), by op name.
_UNARY = {"relax.nn.gelu": "gelu", "relax.nn.gelu_tanh": "gelu_tanh", "relax.nn.silu": "silu"}


class _Function:
    """The bindings of one Relax function: each variable's value and how many bindings (and the
    function's result) read it."""

    def __init__(self, func: relax.Function) -> None:
        self.values: dict = {}
        self.uses: dict = {}
        for block in func.body.blocks:
            for binding in block.bindings:  # VarBinding and MatchCast: both read their value
                if isinstance(binding, relax.VarBinding):
                    self.values[binding.var] = binding.value
                self._count(binding.value)
        self._count(func.body.body)

    def _count(self, expr: relax.Expr) -> None:
        for var in relax.analysis.free_vars(expr):
            self.uses[var] = self.uses.get(var, 0) + 1

    def value(self, expr: relax.Expr) -> relax.Expr | None:
        return self.values.get(expr) if isinstance(expr, relax.Var) else None


@relax.expr_functor.mutator
class _Fuser(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod = mod
        self.fn: _Function | None = None
        self.fused = 0

    def visit_function_(self, func: relax.Function) -> relax.Expr:
        outer, self.fn = self.fn, _Function(func)
        try:
            return super().visit_function_(func)
        finally:
            self.fn = outer

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        found = self._activation_of_layer(call) if self.fn is not None else None
        if found is None:
            return call
        layer, chain, activation = found
        out = self._with_activation(layer, activation)
        if out is None:
            return call
        for step in reversed(chain):  # the reshape / astype between, in their order
            out = relax.Call(step.op, [self.builder_.emit(out), *step.args[1:]], step.attrs)
        self.fused += 1
        return out

    def _activation_of_layer(self, call: relax.Call) -> tuple[relax.Call, list[relax.Call], str] | None:
        """``(layer call, [reshape / astype calls from the layer's output on], activation)`` if
        ``call`` is ``where(isnan(z), z, relu(z))`` (:class:`PropagateNaN`'s relu) or one of
        :data:`_UNARY` of a PB layer's output ``z`` that nothing else reads."""
        fn, op = self.fn, op_name(call)
        if op in _UNARY:
            z, activation, reads = call.args[0], _UNARY[op], 1
        elif op == "relax.multiply" and (silu := self._silu_operand(call)) is not None:
            z, activation, reads = silu, "silu", 2
        elif op == "relax.where":
            cond, z, kept = call.args
            is_nan, relu = fn.value(cond), fn.value(kept)
            if op_name(is_nan) != "relax.isnan" or op_name(relu) != "relax.nn.relu":
                return None
            if not (is_nan.args[0].same_as(z) and relu.args[0].same_as(z)):
                return None
            if fn.uses.get(cond) != 1 or fn.uses.get(kept) != 1:
                return None
            activation, reads = "relu", 3
        else:
            return None
        # Dataflow variables all: the layer, the ops between and the activation are in one dataflow
        # block (a DataflowVar is read only in its own), so the new call, which takes the
        # activation's place, has the layer's inputs in scope and nothing between writes them.
        if not isinstance(z, relax.DataflowVar) or fn.uses.get(z) != reads:
            return None
        # relu commutes with a reshape and with a cast between floats; the others only with a reshape
        through = _PASS_THROUGH if activation == "relu" else ("relax.reshape",)
        chain, var = [], z
        while op_name(value := fn.value(var)) in through and isinstance(value.args[0], relax.DataflowVar):
            chain.append(value)
            var = value.args[0]
            if fn.uses.get(var) != 1:
                return None
        if not (isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.call_tir"))):
            return None
        if any(op_name(step) == "relax.astype" and not str(step.ty.dtype).startswith("float") for step in chain):
            return None
        return value, chain, activation

    def _silu_operand(self, call: relax.Call) -> relax.Var | None:
        """``z`` where ``call`` is ``z * sigmoid(z)`` (torch's SiLU as imported), the sigmoid read once."""
        for z, other in (call.args, reversed(call.args)):
            sig = self.fn.value(other)
            if op_name(sig) == "relax.sigmoid" and sig.args[0].same_as(z) and self.fn.uses.get(other) == 1:
                return z
        return None

    def _with_activation(self, layer: relax.Call, activation: str) -> relax.Expr | None:
        """The call of ``layer``'s PB function with ``activation`` in its epilogue, or None where
        the layer is not a PB dense function in the ``mma16x256`` layout without one."""
        from pbtvm.schedules.rules import format_of

        gvar = layer.args[0]
        func = self.mod[gvar] if isinstance(gvar, relax.GlobalVar) else None
        if not isinstance(func, tir.PrimFunc) or names.kernel_kind(func) not in _KINDS:
            return None
        attrs = dict(func.attrs)
        fmt = format_of(func)
        if fmt is None or fmt.layout != MMA_LAYOUT or names.ATTR_ACTIVATION in attrs:
            return None
        args = list(layer.args[1].fields)
        if not isinstance(getattr(args[-1], "ty", None), tvm.ir.PrimType):  # bitlayers, a run-time int
            return None
        tensors, layers = args[:-1], args[-1]
        fused = names.kernel_kind(func) == names.KernelKind.DENSE_ACT
        has_bias = len(tensors) == (4 if fused else 6)
        compute = dense_layer_compute(fused, fmt, int(attrs[names.ATTR_K]), has_bias, activation)
        attrs[names.ATTR_ACTIVATION] = activation
        return emit_te_call(self.builder_, compute, tensors, f"{gvar.name_hint}_{activation}", attrs, (layers,))


@tvm.transform.module_pass(opt_level=0, name="FuseActivationIntoPB")
class FuseActivationIntoPB:
    """Module pass: NaN-keeping ``relu``, ``gelu``, ``gelu_tanh`` or ``silu`` after a PB layer in the
    ``mma16x256`` layout folded into the layer's kernel (see the module docstring).

    ``fused``: layers that took their activation in, by the last run.
    """

    def __init__(self) -> None:
        self.fused = 0

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:  # noqa: D102
        mutator = _Fuser(mod)
        mod = rewrite_every_function(mutator, mod)
        self.fused = mutator.fused
        if self.fused:
            mod = relax.transform.DeadCodeElimination()(mod)
        return mod
