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


#: Ops the VM runs as views of their first argument (no copy): a constant seen through them is
#: still the module's own memory.
VIEW_OPS = ("relax.reshape", "relax.memory.view")


def constant_outputs(func: relax.Function) -> list[int]:
    """Positions of ``func``'s (flat) outputs whose value is one of the module's constants, directly
    or through :data:`VIEW_OPS`: the VM returns such an output as that very tensor, so a caller
    that changed it in place would change every later call's result (the runtime copies these)."""
    body = func.body
    blocks, result = (body.blocks, body.body) if isinstance(body, relax.SeqExpr) else ([], body)
    bound = {}
    for block in blocks:
        for binding in block.bindings:
            if isinstance(binding, relax.VarBinding):
                bound[binding.var] = binding.value

    def value_of(expr: relax.Expr) -> relax.Expr:
        while isinstance(expr, relax.Var) and expr in bound:
            expr = bound[expr]
        return expr

    def constant(expr: relax.Expr) -> bool:
        expr = value_of(expr)
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name in VIEW_OPS:
            return constant(expr.args[0])
        return isinstance(expr, tvm.ir.GenericConst)

    result = value_of(result)
    leaves = list(result.fields) if isinstance(result, relax.Tuple) else [result]
    return [i for i, leaf in enumerate(leaves) if constant(leaf)]
