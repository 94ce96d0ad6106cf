"""Give the module its own copy of every constant that shares memory with the torch model.

TVM's torch importer wraps the exported program's parameters and buffers with
``tvm.runtime.from_dlpack``: the module's constants *are* the model's tensors. A compiled model
built on them changed with the float model after ``pbtvm.compile`` (an optimizer step, a
``load_state_dict``, an in-place edit of a LayerNorm weight or a buffer): its full-precision ops
read the new values while its PB layers kept the old ones, and ``export`` wrote whatever was
current. This pass copies each such constant once (constants sharing one tensor, e.g. a tied
weight used twice, still share one copy), so the compiled model is a snapshot of the model as it
was compiled. Constants the passes build themselves (packed weights, scales) are already private;
the pass runs right after the import, before any of them exists. The cost is one copy of the
model's tensors while compiling (a memcpy; the float weights that become PB layers are dropped
once packed).
"""

from __future__ import annotations

from tvm.relax.expr_functor import PyExprMutator, mutator

from pbtvm._tvm import relax, tvm

from .rewrite_calls import rewrite_every_function


@mutator
class _Copier(PyExprMutator):
    """Each constant replaced by a copy; one copy per distinct tensor (data pointer, shape, dtype)."""

    def __init__(self, mod: tvm.IRModule, copies: dict) -> None:
        super().__init__(mod)
        self.copies = copies

    def visit_generic_const_(self, op: tvm.ir.GenericConst) -> relax.Expr:
        data = op.value
        if not isinstance(data, tvm.runtime.Tensor):  # a scalar literal: nothing shared
            return op
        key = (data.data_ptr(), tuple(data.shape), str(data.dtype), str(data.device))
        if key not in self.copies:
            self.copies[key] = relax.const(data.copyto(data.device))
        return self.copies[key]


@tvm.transform.module_pass(opt_level=0, name="OwnConstants")
class OwnConstants:
    """Module pass: every Relax function's constants copied (see the module docstring).

    ``copied``: distinct tensors copied by the last run.
    """

    def __init__(self) -> None:
        self.copied = 0

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        """Copy the constants of every Relax function of ``mod``."""
        copies: dict = {}
        mod = rewrite_every_function(_Copier(mod, copies), mod)
        self.copied = len(copies)
        return mod


#: Ops whose result the VM may hand back as a view of their first argument: TVM's build turns
#: reshape-like kernels (``expand_dims``, ``squeeze``, ``flatten``, a ``permute_dims`` that only
#: moves axes of size 1 ...) into ``vm.builtin.reshape``, which copies nothing. Listed wider than
#: that: an output seen through one of them is copied, which costs a memcpy at most.
VIEW_OPS = (
    "relax.reshape",
    "relax.memory.view",
    "relax.expand_dims",
    "relax.squeeze",
    "relax.flatten",
    "relax.permute_dims",
    "relax.astype",
    "relax.strided_slice",
    "relax.broadcast_to",
)


def outputs_to_copy(func: relax.Function) -> list[int]:
    """Positions of ``func``'s (flat) outputs the VM may return as memory that outlives the call,
    which the runtime therefore hands out as copies: one of the module's constants or one of its
    inputs (an unaligned input is staged in a buffer the next call reuses), directly or through
    :data:`VIEW_OPS`, and any value computed from constants alone (TVM may fold it into one). A
    caller changing such an output in place would otherwise change the model's own tensors and
    every later call's result, or find it overwritten by the next call."""
    body = func.body
    blocks, result = (body.blocks, body.body) if isinstance(body, relax.SeqExpr) else ([], body)
    bound = {}
    depends = set(func.params)  # vars whose value depends on an input
    for block in blocks:
        for binding in block.bindings:
            if isinstance(binding, relax.VarBinding | relax.MatchCast):
                value = binding.value
                bound[binding.var] = value
                if any(v in depends for v in relax.analysis.free_vars(value)):
                    depends.add(binding.var)

    def value_of(expr: relax.Expr) -> relax.Expr:
        while isinstance(expr, relax.Var) and expr in bound:
            expr = bound[expr]
        return expr

    def kept(expr: relax.Expr) -> bool:  # a constant or an input, maybe through views
        expr = value_of(expr)
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name in VIEW_OPS:
            return kept(expr.args[0])
        return isinstance(expr, tvm.ir.GenericConst) or any(expr.same_as(p) for p in func.params)

    def from_constants_only(expr: relax.Expr) -> bool:
        return not any(v in depends for v in relax.analysis.free_vars(expr)) and not (
            isinstance(expr, relax.Var) and expr in depends
        )

    result = value_of(result)
    leaves = list(result.fields) if isinstance(result, relax.Tuple) else [result]
    return [i for i, leaf in enumerate(leaves) if kept(leaf) or from_constants_only(leaf)]
