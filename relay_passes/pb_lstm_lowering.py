"""Lower the placeholder LSTM calls of an imported model into PB kernels and a Relax time loop.

:func:`pbtvm.recurrent.convert_lstm_stack` imports every ``nn.LSTM`` as one placeholder call
``(x, h0, c0, *weights) -> (y, h_n, c_n)`` with symbolic sequence length T and batch B. This
pass replaces each one, layer by layer and direction by direction, by::

    gx   = x.reshape(T*B, I) @ W_ih^T + (b_ih + b_hh)       # a plain dense layer: PBLinearRewrite,
                                                            # run after this pass, makes it one PB
                                                            # GEMM over all steps (format, quantizer,
                                                            # tuning log as any layer)
    ys, h_T, c_T = pb_lstm_loop(gx [T, B, 4H], h0[l], c0[l], ys = zeros [T, B, H], [0, T), bitlayers)

``pb_lstm_loop`` is a private Relax function per layer and direction, recursive with ``R.If``:
a range of one step runs the fused PB cell kernel (:func:`pbtvm.ops.lstm_cell.pb_lstm_cell_at`:
pack of ``h``, PB GEMV on ``W_hh``, gates, cell update) and writes ``h'`` into ``ys`` in place; a
longer range calls itself on both halves, carrying the state. Halving keeps the recursion depth at
log2(T): the Relax VM recurses in C++, and a one-step-per-call recursion overflowed the stack at
T = 4000 on the 2-core EPYC (``benchmarks/bench_relax_time_loop.py``: 3-7 us of VM time per step
for the halving loop from T = 100 to 100,000; the one-step loop 1.8 us at T = 100, 8.3 us at
T = 1000, then a crash). A reverse direction (bidirectional LSTMs) visits the steps from T - 1 down. An LSTM of another
float dtype (float16, bfloat16, float64) projects in its dtype, steps in float32, and casts its
outputs and state back.

The main function gains the ``bitlayers: R.Shape([L])`` parameter that PBLinearRewrite then
reuses, so one knob reaches the projections, the cell kernels and the other dense layers.
"""

from __future__ import annotations

import logging

import numpy as np
from tvm.relax.expr import _update_type
from tvm.relax.expr_functor import PyExprMutator, mutator

from pbtvm._tvm import relax, te, tir, tvm
from pbtvm.bitplane import BitplaneFormat
from pbtvm.lowering import LayerRecord, check_named_weights, constant_array, lower_weights, weight_key
from pbtvm.names import KernelKind
from pbtvm.ops import kernel_attrs, unit_major_rows
from pbtvm.ops.lstm_cell import pb_lstm_cell_at
from pbtvm.quantize import AUTO, choose_codebook
from pbtvm.recurrent import placeholder_config

from .block_builder import blocks_closed_on_error

logger = logging.getLogger(__name__)

#: Name of the ``bitlayers`` parameter shared with :class:`PBLinearRewrite`.
BITLAYERS = "bitlayers"


def bitlayers_param(func: relax.Function) -> relax.Var | None:
    """The function's trailing ``bitlayers: R.Shape([L])`` parameter, if it has one."""
    if not func.params:
        return None
    last = func.params[-1]
    if last.name == BITLAYERS and isinstance(last.ty, relax.ShapeType) and last.ty.values is not None:
        return last
    return None


def _step_func(fmt: BitplaneFormat, hidden: int) -> tir.PrimFunc:
    """``(gx [T, B, 4H], h [B, H], c [B, H], wp, w_scale, t, bitlayers) -> (h', c')``."""
    steps, batch = tir.Var("steps", "int64"), tir.Var("batch", "int64")
    t, layers = tir.Var("t", "int64"), tir.Var("bitlayers", "int64")
    gx = te.placeholder((steps, batch, 4 * hidden), "float32", "gx")
    h = te.placeholder((batch, hidden), "float32", "h")
    c = te.placeholder((batch, hidden), "float32", "c")
    wp = te.placeholder(fmt.weight_shape(4 * hidden, hidden), "uint32", "wp")
    ws = te.placeholder(fmt.scale_shape(4 * hidden), "float32", "w_scale")
    outs = pb_lstm_cell_at(gx, t, h, c, wp, ws, layers, fmt)
    func = te.create_prim_func([gx, h, c, wp, ws, t, layers, *outs])
    return func.without_attr("global_symbol").with_attrs(kernel_attrs(KernelKind.LSTM_CELL, fmt, hidden))


#: Threads per block of the CUDA ``ys[t] = h`` copy.
WRITE_THREADS = 256


def write_step_func(target_kind: str) -> tir.PrimFunc:
    """``ys[t] = h`` in place: ``(ys [T, B, H], h [B, H], t)``, any T, B, H; scheduled for the target.

    One loop over the ``B * H`` elements on the CPU, a thread per element on CUDA.
    """
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    steps, batch, hidden = (tir.Var(n, "int64") for n in ("steps", "batch", "hidden"))
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name("pb_lstm_write_step")
            ys = T.arg("ys", T.buffer((steps, batch, hidden), "float32"))
            h = T.arg("h", T.buffer((batch, hidden), "float32"))
            t = T.arg("t", tir.Var("t", "int64"))
            T.func_attr({"tirx.is_scheduled": True})

            def store(p: tir.PrimExpr) -> None:
                b, u = tir.floordiv(p, hidden), tir.floormod(p, hidden)
                T.buffer_store(ys, h[b, u], [t, b, u])

            total = batch * hidden
            if target_kind == "cuda":
                bx, tx = T.env_thread("blockIdx.x"), T.env_thread("threadIdx.x")
                with T.launch_thread(bx, (total + WRITE_THREADS - 1) // WRITE_THREADS):
                    with T.launch_thread(tx, WRITE_THREADS):
                        p = bx.astype("int64") * WRITE_THREADS + tx.astype("int64")
                        with T.If(p < total):
                            with T.Then():
                                store(p)
            else:
                with T.serial(tir.const(0, "int64"), total) as p:
                    store(p)
    return ib.get().without_attr("global_symbol")


def _seq(*bindings: tuple[relax.Var, relax.Expr]) -> relax.SeqExpr:
    """One binding block of ``(var, value)`` pairs; its value is the last var."""
    return relax.SeqExpr([relax.BindingBlock([relax.VarBinding(v, e) for v, e in bindings])], bindings[-1][0])


@mutator
class _Lowerer(PyExprMutator):
    def __init__(
        self,
        mod: tvm.IRModule,
        fmt: BitplaneFormat,
        codebook: str | None,
        method: str,
        layer_names: dict[str, str],
        importance: dict[str, np.ndarray],
    ) -> None:
        super().__init__(mod)
        self.fmt = fmt
        self.codebook = codebook
        self.method = method
        self.layer_names = layer_names
        self.importance = importance
        self.converted: list[dict] = []
        self.codebooks: dict[str, str | None] = {}
        self.recurrent_of: dict[str, str] = {}
        self.bitlayers: relax.Var | None = None
        self.n_lowered = 0
        self._write = None

    # ------------------------------------------------------------------ the loop function
    def _loop(self, w_hh: np.ndarray, codebook: str | None, reverse: bool, name: str) -> relax.GlobalVar:
        """The recursive time-loop function of one layer and direction (W_hh packed inside)."""
        hidden = w_hh.shape[1]
        imp = [self.importance.get(weight_key(w_hh))]
        fmt, [weights] = lower_weights([w_hh], self.fmt, (codebook, self.method), imp, rows=unit_major_rows(hidden))
        self.converted.append(LayerRecord.of(name, w_hh, fmt, bias=False).as_dict())
        step = self.builder_.add_func(
            _step_func(fmt, hidden), f"pb_lstm_cell_seq_{fmt.name.replace('-', '_')}_h{hidden}"
        )
        if self._write is None:
            target = tvm.target.Target.current(allow_none=True)
            kind = target.kind.name if target is not None else "llvm"
            self._write = self.builder_.add_func(write_step_func(kind), "pb_lstm_write_step")
        steps, batch, lo, hi, layers = (tir.Var(n, "int64") for n in ("steps", "batch", "lo", "hi", "bitlayers"))
        seq_gx = relax.TensorType([steps, batch, 4 * hidden], "float32")
        seq_h = relax.TensorType([steps, batch, hidden], "float32")
        state = relax.TensorType([batch, hidden], "float32")
        ret = relax.TupleType([seq_h, state, state])
        gvar = relax.GlobalVar(f"pb_lstm_loop_{len(self.converted) - 1}")
        _update_type(
            gvar, relax.FuncType([seq_gx, state, state, seq_h, relax.ShapeType(None, 2), relax.ShapeType(None, 1)], ret)
        )
        gx, h, c, ys = relax.Var("gx", seq_gx), relax.Var("h", state), relax.Var("c", state), relax.Var("ys", seq_h)
        span, bits = relax.Var("span", relax.ShapeType([lo, hi])), relax.Var(BITLAYERS, relax.ShapeType([layers]))

        # [lo, hi) is one step: the fused cell at t, then ys[t] = h' in place.
        t = (steps - 1 - lo) if reverse else lo
        hc = relax.Var("hc", relax.TupleType([state, state]))
        h1, c1, ys1 = relax.Var("h1", state), relax.Var("c1", state), relax.Var("ys1", seq_h)
        cell_args = [gx, h, c, *weights, relax.prim_value(t), relax.prim_value(layers)]
        one_step = _seq(
            (hc, relax.call_tir(step, cell_args, [state, state])),
            (h1, relax.TupleGetItem(hc, 0)),
            (c1, relax.TupleGetItem(hc, 1)),
            (ys1, relax.call_tir_inplace(self._write, [ys, h1, relax.prim_value(t)], 0, seq_h)),
            (relax.Var("one", ret), relax.Tuple([ys1, h1, c1])),
        )
        # Longer: both halves in order, the state carried from the first to the second.
        mid = tir.floordiv(lo + hi, 2)
        first, ys2, h2, c2 = (
            relax.Var("first", ret),
            relax.Var("ys2", seq_h),
            relax.Var("h2", state),
            relax.Var("c2", state),
        )
        halves = _seq(
            (first, relax.Call(gvar, [gx, h, c, ys, relax.ShapeExpr([lo, mid]), bits])),
            (ys2, relax.TupleGetItem(first, 0)),
            (h2, relax.TupleGetItem(first, 1)),
            (c2, relax.TupleGetItem(first, 2)),
            (relax.Var("both", ret), relax.Call(gvar, [gx, h2, c2, ys2, relax.ShapeExpr([mid, hi]), bits])),
        )
        body = _seq((relax.Var("result", ret), relax.If(relax.prim_value(hi - lo == 1), one_step, halves)))
        func = relax.Function([gx, h, c, ys, span, bits], body, ret)
        self.builder_.update_func(gvar, func)
        return gvar

    # ------------------------------------------------------------------ one placeholder
    def _lower(self, call: relax.Call, config: dict) -> relax.Expr:
        emit = self.builder_.emit
        x, h0, c0, *consts = call.args[1].fields
        weights = [constant_array(w) for w in consts]
        layers, dirs, has_bias = config["num_layers"], config["dirs"], config["bias"]
        per = 4 if has_bias else 2
        hidden = weights[1].shape[1]
        # Another float dtype: each layer's input projection runs in it (a PB layer as any of that
        # dtype), its steps in float32 as a float32 LSTM's; the layers' outputs and the final state
        # are cast back, as torch's LSTM of that dtype gives them.
        dtype = x.ty.dtype

        def as_float32(value: relax.Expr) -> relax.Expr:
            return value if dtype == "float32" else emit(relax.op.astype(value, "float32"))

        def as_dtype(value: relax.Expr) -> relax.Expr:
            return value if dtype == "float32" else emit(relax.op.astype(value, dtype))

        h0, c0 = as_float32(h0), as_float32(c0)
        if config["batch_first"]:
            x = emit(relax.op.permute_dims(x, [1, 0, 2]))
        steps, batch = x.ty.shape.values[:2]
        hs, cs = [], []
        for layer in range(layers):
            outs = []
            n_in = int(x.ty.shape.values[2])
            x2 = emit(relax.op.reshape(x, relax.ShapeExpr([steps * batch, n_in])))
            for d in range(dirs):
                first = (layer * dirs + d) * per
                group = weights[first : first + per]
                w_ih, w_hh = group[0], group[1]
                suffix = "_reverse" if d else ""
                check_named_weights(  # a weight holding NaN: say which
                    (self.layer_names.get(weight_key(w), f"weight_{param}_l{layer}{suffix} (LSTM)"), w)
                    for w, param in ((w_ih, "ih"), (w_hh, "hh"))
                )
                gx = as_float32(emit(relax.op.matmul(x2, emit(relax.op.permute_dims(consts[first])))))
                if has_bias:
                    with np.errstate(over="ignore"):  # biases past float32 add to inf, as in torch's gates
                        bias = group[2].astype(np.float32) + group[3].astype(np.float32)
                    gx = emit(relax.op.add(gx, relax.const(bias, "float32")))
                gx = emit(relax.op.reshape(gx, relax.ShapeExpr([steps, batch, 4 * hidden])))
                index = relax.const(layer * dirs + d, "int64")
                h = emit(relax.op.take(h0, index, axis=0, mode="clip"))
                c = emit(relax.op.take(c0, index, axis=0, mode="clip"))
                # Every step writes ys[t] in place. An allocation, not zeros(): with a static shape
                # FoldConstant (in TVM's GPU pipeline) would fold zeros() into a VM constant, which
                # every call would then overwrite and hand out as its output.
                ys = emit(relax.op.builtin.alloc_tensor(relax.ShapeExpr([steps, batch, hidden]), "float32", 0))
                # One codebook for W_ih and W_hh of a layer, chosen jointly, as compile_lstm does.
                codebook = self.codebook
                if codebook == AUTO:
                    imps = [self.importance.get(weight_key(w)) for w in (w_ih, w_hh)]
                    codebook = choose_codebook([w_ih, w_hh], self.fmt, self.method, imps)[0]
                self.codebooks[weight_key(w_ih)] = codebook
                self.recurrent_of[weight_key(w_ih)] = weight_key(w_hh)
                loop = self._loop(w_hh, codebook, bool(d), f"weight_hh_l{layer}{suffix} (LSTM)")
                span = relax.ShapeExpr([tir.IntImm("int64", 0), steps])
                res = emit(relax.Call(loop, [gx, h, c, ys, span, self.bitlayers]))
                outs.append(emit(relax.TupleGetItem(res, 0)))
                hs.append(emit(relax.TupleGetItem(res, 1)))
                cs.append(emit(relax.TupleGetItem(res, 2)))
            x = as_dtype(outs[0] if dirs == 1 else emit(relax.op.concat(outs, axis=2)))
        y = emit(relax.op.permute_dims(x, [1, 0, 2])) if config["batch_first"] else x
        self.n_lowered += 1
        return relax.Tuple([y, as_dtype(emit(relax.op.stack(hs, axis=0))), as_dtype(emit(relax.op.stack(cs, axis=0)))])

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        config = placeholder_config(call)
        return call if config is None else self._lower(call, config)

    def lower(self, func: relax.Function) -> relax.Function:
        """Lower one function; it gains (or reuses) the ``bitlayers`` parameter if it had LSTMs."""
        existing = bitlayers_param(func)
        self.bitlayers = existing or relax.Var(BITLAYERS, relax.ShapeType([tir.Var(BITLAYERS, "int64")]))
        before = self.n_lowered
        new_func = self.visit_expr(func)
        if self.n_lowered == before:
            return func
        params = list(new_func.params) + ([] if existing is not None else [self.bitlayers])
        return relax.Function(params, new_func.body, None, new_func.is_pure, new_func.attrs)


def lstm_weight_sizes(mod: tvm.IRModule) -> list[int]:
    """K (inputs) of every ``W_ih`` and ``W_hh`` of the placeholder LSTM calls in ``mod`` (before
    :class:`PBLSTMLowering`): the input projections' and the steps' row lengths, for choosing a
    weight layout whose kernels take them all."""
    sizes: list[int] = []

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Call) and placeholder_config(expr) is not None:
            _x, _h0, _c0, *weights = expr.args[1].fields
            sizes.extend(int(w.ty.shape.values[1]) for w in weights if len(w.ty.shape.values) == 2)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return sizes


@tvm.transform.module_pass(opt_level=0, name="PBLSTMLowering")
class PBLSTMLowering:
    """Module pass: every placeholder LSTM call becomes the projection + PB time loop above.

    Run it before :class:`PBLinearRewrite` (which turns the projections into PB GEMMs).

    Parameters
    ----------
    fmt : BitplaneFormat
    codebook, method
        Codebook and quantizer of the recurrent weights, as in :class:`PBLinearRewrite`.
    layer_names : dict, optional
        :func:`weight_key` -> readable name, for error messages (e.g. a weight holding NaN).
    importance : dict, optional
        :func:`weight_key` of ``W_ih`` / ``W_hh`` -> per-input error weights [K] (calibration,
        :func:`pbtvm.calibration.input_importance`): the joint codebook choice and ``W_hh``'s fit
        weigh their errors by them (``W_ih``'s fit is :class:`PBLinearRewrite`'s).

    Attributes
    ----------
    converted : list of dict
        One entry per recurrent weight ``W_hh`` (``name``, ``weight_key``, ``shape``, ``codebook``),
        filled by the last run.
    codebooks : dict
        :func:`weight_key` of each input-projection weight ``W_ih`` -> the codebook chosen for its
        layer (jointly with ``W_hh``); pass it to :class:`PBLinearRewrite` as ``codebooks``.
    recurrent_of : dict
        :func:`weight_key` of each ``W_ih`` -> that of the same layer's ``W_hh`` (reports list the
        two together).
    """

    def __init__(
        self,
        fmt: BitplaneFormat,
        codebook: str | None = AUTO,
        method: str = "mse",
        layer_names: dict[str, str] | None = None,
        importance: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.fmt = fmt
        self.codebook = codebook
        self.method = method
        self.layer_names = dict(layer_names or {})
        self.importance = importance or {}
        self.converted: list[dict] = []
        self.codebooks: dict[str, str | None] = {}
        self.recurrent_of: dict[str, str] = {}

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:  # noqa: D102
        lowerer = _Lowerer(mod, self.fmt, self.codebook, self.method, self.layer_names, self.importance)
        with blocks_closed_on_error(lowerer.builder_):
            for gvar, func in mod.functions_items():
                if isinstance(func, relax.Function):
                    lowerer.builder_.update_func(gvar, lowerer.lower(func))
        self.converted = lowerer.converted
        self.codebooks = lowerer.codebooks
        self.recurrent_of = lowerer.recurrent_of
        mod = lowerer.builder_.get()
        logger.info("PBLSTMLowering: %d LSTM(s), %d recurrent weights", lowerer.n_lowered, len(self.converted))
        return relax.transform.Normalize()(mod)
