"""PBLinearRewrite: Before/Expected structural equality, numerics, sharing, what stays fp32."""

from __future__ import annotations

import numpy as np
import pytest

from pbtvm import bitplane as bp
from pbtvm import quantize as qz
from pbtvm._tvm import relax, te, tir, tvm
from pbtvm.ops import act_quantize_pack, kernel_attrs, pb_dense
from pbtvm.relay_passes import PBLinearRewrite
from pbtvm.target import resolve_target

FMT = bp.BitplaneFormat(4, 8)
K, N = 40, 16


def _linear_module(w: np.ndarray, b: np.ndarray | None, bias_first: bool = False, ndim: int = 2) -> tvm.IRModule:
    """What from_exported_program emits for nn.Linear: matmul(x, permute_dims(W)) [+ b]."""
    batch = tir.Var("n", "int64")
    shape = [batch, K] if ndim == 2 else [batch, 3, K]
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            wt = bb.emit(relax.op.permute_dims(relax.const(w), [1, 0]))
            y = bb.emit(relax.op.matmul(x, wt, out_dtype="float32"))
            if b is not None:
                args = (relax.const(b), y) if bias_first else (y, relax.const(b))
                y = bb.emit(relax.op.add(*args))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _expected(w: np.ndarray, b: np.ndarray) -> tvm.IRModule:
    """Hand-built result: pack the activation, then one PB dense call on packed constants."""
    batch = tir.Var("n", "int64")
    layers = tir.Var("bitlayers", "int64")
    x = relax.Var("x", relax.TensorType([batch, K], "float32"))
    bl = relax.Var("bitlayers", relax.ShapeType([layers]))
    q, ws = qz.quantize_weights(w, FMT)
    wp = bp.pack_weights(q, FMT)

    def prim(fn, holders, _name, kernel, extra=()):
        outs = fn(*holders, *extra)
        outs = list(outs) if isinstance(outs, list) else [outs]
        f = te.create_prim_func([*holders, *extra, *outs]).without_attr("global_symbol")
        types = [relax.TensorType([batch if isinstance(d, tir.Var) else d for d in o.shape], o.dtype) for o in outs]
        return f.with_attrs(kernel_attrs(kernel, FMT, K)), types

    bb = relax.BlockBuilder()
    with bb.function("main", [x, bl]):
        with bb.dataflow():
            xh = te.placeholder([tir.Var("d0", "int64"), K], "float32", "in0")
            f_pack, pack_ty = prim(lambda t: act_quantize_pack(t, FMT), [xh], "act_pack", "act_pack")
            g_pack = bb.add_func(f_pack, f"pb_act_pack_a8_k{K}")
            packed = bb.emit(relax.call_tir(g_pack, [x], pack_ty))
            xp, xs, rs = (bb.emit(relax.TupleGetItem(packed, i)) for i in range(3))
            d0 = tir.Var("d0", "int64")
            holders = [
                te.placeholder(
                    [d0 if isinstance(d, tir.Var) else int(d) for d in v.ty.shape.values], str(v.ty.dtype), f"in{i}"
                )
                for i, v in enumerate([xp, xs, rs])
            ]
            consts = [relax.const(wp, "uint32"), relax.const(ws, "float32"), relax.const(b, "float32")]
            holders += [
                te.placeholder([int(d) for d in c.ty.shape.values], str(c.ty.dtype), f"in{3 + i}")
                for i, c in enumerate(consts)
            ]
            f_dense, dense_ty = prim(lambda *t: pb_dense(*t[:6], t[6], FMT, K), holders, "dense", "pb_gemm", (layers,))
            g_dense = bb.add_func(f_dense, f"pb_dense_w4a8_n{N}_k{K}_bias")
            y = bb.emit(relax.call_tir(g_dense, [xp, xs, rs, *consts, relax.prim_value(layers)], dense_ty[0]))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("bias_first", [False, True])
def test_structural_equal_to_expected(bias_first, rng):
    w = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    rewrite = PBLinearRewrite(FMT, codebook=None)  # FMT's own codebook (two's complement)
    after = rewrite(_linear_module(w, b, bias_first))
    tvm.ir.assert_structural_equal(after, _expected(w, b))
    assert len(rewrite.report.converted) == 1 and rewrite.report.converted[0]["bias"]
    assert rewrite.report.converted[0]["codebook"] == "twos_complement"
    assert not rewrite.report.skipped


def _run(mod: tvm.IRModule, *args):
    target = resolve_target("llvm")
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) if isinstance(a, np.ndarray) else a for a in args])


@pytest.mark.parametrize("codebook", ["auto", None])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("with_bias", [True, False])
def test_numerics_match_reference(ndim, with_bias, codebook, rng):
    w = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32) if with_bias else None
    rewrite = PBLinearRewrite(FMT, codebook)
    mod = rewrite(_linear_module(w, b, ndim=ndim))
    x = rng.standard_normal((5, K) if ndim == 2 else (5, 3, K)).astype(np.float32)
    fmt, [(q, ws)] = qz.layer_format([w], FMT, codebook)
    assert rewrite.report.converted[0]["codebook"] == fmt.codebook
    assert fmt.codebook == ("offset_binary" if codebook == "auto" else "twos_complement")
    wp = bp.pack_weights(q, fmt)
    for layers in (1, 4):
        y = _run(mod, x, tvm.runtime.ShapeTuple([layers])).numpy()
        ref = qz.pb_linear_reference(x.reshape(-1, K), wp, ws, b, fmt, layers).reshape(*x.shape[:-1], N)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def _count_packed(mod: tvm.IRModule) -> int:
    """Distinct uint32 weight constants passed to calls in main."""
    consts = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            args = (
                list(value.args[1].fields)
                if isinstance(value, relax.Call) and isinstance(value.args[1], relax.Tuple)
                else []
            )
            for a in args:
                if isinstance(a, tvm.ir.Constant) and str(a.value.dtype) == "uint32":
                    if not any(a.same_as(c) for c in consts):
                        consts.append(a)
    return len(consts)


def test_identical_weights_packed_once_and_activation_packed_once(rng):
    w = rng.standard_normal((N, K)).astype(np.float32)
    batch = tir.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([batch, K], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y1 = bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(relax.const(w.copy()), [1, 0]))))
            y2 = bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(relax.const(w.copy()), [1, 0]))))
            out = bb.emit_output(bb.emit(relax.op.add(y1, y2)))
        bb.emit_func_output(out)
    rewrite = PBLinearRewrite(FMT)
    mod = rewrite(bb.get())
    assert len(rewrite.report.converted) == 2
    assert _count_packed(mod) == 1
    text = mod["main"].script()
    assert text.count("pb_act_pack") == 1, text


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_layers_on_one_3d_input_share_its_rows_and_pack(dtype, rng):
    """Two layers on one [B, T, K] input (q and k projections, an MLP's gate and up): one reshape
    to rows (and one cast from fp16), one activation pack, as for a 2-D float32 input; a second
    dataflow block reading the same input gets its own (a block's variables end with it)."""
    batch = tir.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([batch, 3, K], dtype))
    bb = relax.BlockBuilder()

    def layer(inp):
        w = rng.standard_normal((N, K)).astype(dtype)
        return bb.emit(relax.op.matmul(inp, bb.emit(relax.op.permute_dims(relax.const(w), [1, 0]))))

    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit_output(bb.emit(relax.op.add(layer(x), layer(x))))
        a = bb.emit(relax.op.negative(a))  # a binding outside: the next dataflow block is another
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.add(a, layer(x))))
        bb.emit_func_output(out)
    rewrite = PBLinearRewrite(FMT)
    mod = rewrite(bb.get())
    assert len(rewrite.report.converted) == 3
    text = mod["main"].script()
    assert text.count("pb_act_pack") == 2, text  # one a block
    assert text.count("R.dataflow()") == 2 and text.count("R.reshape(x") == 2, text
    assert text.count("R.astype(") == (2 + 3 if dtype == "float16" else 0), text  # in: one a block; out: one a layer
    relax.analysis.well_formed(mod)  # raises where a variable is used outside its block


def test_layers_in_if_branches_share_nothing_across_the_branch(rng):
    """A layer on ``x`` before an ``If``, one in each branch, one after: the branches (blocks of
    their own, visited inside the enclosing block) get their own rows and packs, the layers before
    and after share theirs, and the module is well-formed (a branch's pack was reused after it)."""
    batch = tir.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([batch, 3, K], "float32"))
    cond = relax.Var("c", relax.TensorType([], "bool"))

    def weight_t():
        return relax.op.permute_dims(relax.const(rng.standard_normal((N, K)).astype(np.float32)), [1, 0])

    def branch() -> relax.SeqExpr:
        wt = relax.Var("wt", relax.TensorType([K, N], "float32"))
        v = relax.Var("v", relax.TensorType([batch, 3, N], "float32"))
        bindings = [relax.VarBinding(wt, weight_t()), relax.VarBinding(v, relax.op.matmul(x, wt))]
        return relax.SeqExpr([relax.BindingBlock(bindings)], v)

    bb = relax.BlockBuilder()
    with bb.function("main", [x, cond]):
        a = bb.emit(relax.op.matmul(x, bb.emit(weight_t())))
        b = bb.emit(relax.If(cond, branch(), branch()))
        d = bb.emit(relax.op.matmul(x, bb.emit(weight_t())))
        bb.emit_func_output(bb.emit(relax.op.add(relax.op.add(a, b), d)))
    rewrite = PBLinearRewrite(FMT)
    mod = rewrite(bb.get())
    assert len(rewrite.report.converted) == 4
    relax.analysis.well_formed(mod)  # raises where a variable is used outside its block
    assert mod["main"].script().count("pb_act_pack") == 3  # before and after: one; a branch: one each


@pytest.mark.parametrize("loose", [False, True])
def test_a_result_also_read_without_its_bias_runs_the_layer_once(loose, rng):
    """``h = x @ W.T; return h, h + b``: one PB layer and a float add of the bias, not the layer
    twice (once with the bias fused, once without for ``h``); also where ``h`` is typed looser
    than the PB result (the rewrite then makes a new variable for it)."""
    w = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    x = relax.Var("x", relax.TensorType([tir.Var("n", "int64"), K], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            product = relax.op.matmul(x, bb.emit(relax.op.permute_dims(relax.const(w), [1, 0])))
            if loose:
                h = relax.DataflowVar("h", relax.TensorType(dtype="float32", ndim=2))
                bb.emit_normalized(relax.VarBinding(h, bb.normalize(product)))
            else:
                h = bb.emit(product)
            out = bb.emit_output(relax.Tuple([h, bb.emit(relax.op.add(h, relax.const(b)))]))
        bb.emit_func_output(out)
    rewrite = PBLinearRewrite(FMT, None)
    mod = rewrite(bb.get())
    text = mod["main"].script()
    assert text.count("call_tir(pb_dense") == 1 and "_bias" not in text, text
    assert [c["bias"] for c in rewrite.report.converted] == [False]
    xs = rng.standard_normal((3, K)).astype(np.float32)
    got = _run(mod, xs, tvm.runtime.ShapeTuple([FMT.bits]))
    fmt, [(q, ws)] = qz.layer_format([w], FMT, None)
    want = qz.pb_linear_reference(xs, bp.pack_weights(q, fmt), ws, None, fmt, FMT.bits)
    np.testing.assert_allclose(got[0].numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1].numpy(), want + b, rtol=1e-5, atol=1e-5)


def test_unsupported_layers_are_reported_and_left_alone(rng):
    batch = tir.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([batch, 1, 8, 8], "float32"))
    z = relax.Var("z", relax.TensorType([batch, 8], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, z]):
        with bb.dataflow():
            c = bb.emit(relax.op.nn.conv2d(x, relax.const(rng.standard_normal((2, 1, 3, 3)).astype(np.float32))))
            m = bb.emit(relax.op.matmul(z, relax.op.permute_dims(z)))  # activation x activation
            out = bb.emit_output(relax.Tuple([c, m]))
        bb.emit_func_output(out)
    before = bb.get()
    rewrite = PBLinearRewrite(FMT)
    after = rewrite(before)
    ops = sorted(s["op"] for s in rewrite.report.skipped)
    assert ops == ["relax.matmul", "relax.nn.conv2d"]
    assert "bitlayers" not in [p.name for p in after["main"].params]
    tvm.ir.assert_structural_equal(after, before)


def test_broadcast_to_variant(rng):
    """The 3-D exporter path: matmul(broadcast_to(x), broadcast_to(permute_dims(W)))."""
    w = rng.standard_normal((N, K)).astype(np.float32)
    x = relax.Var("x", relax.TensorType([2, 3, K], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            xb = bb.emit(relax.op.broadcast_to(x, [2, 3, K]))
            wt = bb.emit(relax.op.broadcast_to(relax.op.permute_dims(relax.const(w), [1, 0]), [K, N]))
            out = bb.emit_output(bb.emit(relax.op.matmul(xb, wt)))
        bb.emit_func_output(out)
    rewrite = PBLinearRewrite(FMT)
    mod = rewrite(bb.get())
    assert len(rewrite.report.converted) == 1
    xv = rng.standard_normal((2, 3, K)).astype(np.float32)
    fmt, [(q, ws)] = qz.layer_format([w], FMT)  # the default: codebook chosen per weight
    ref = qz.pb_linear_reference(xv.reshape(-1, K), bp.pack_weights(q, fmt), ws, None, fmt).reshape(2, 3, N)
    np.testing.assert_allclose(_run(mod, xv, tvm.runtime.ShapeTuple([4])).numpy(), ref, rtol=1e-5, atol=1e-5)


def test_broadcast_input_with_a_dynamic_batch_on_cuda():
    """The 3-D exporter path (``broadcast_to`` of the input) with a symbolic batch on sm_90: the
    input is read by no matmul itself, and counting its matmul reads went on to look for a variable
    the rewrite had made anew, which crashed TVM's mutator (null node); it is one pb_dense_act."""
    from pbtvm.target import resolve_target

    w = np.random.default_rng(0).standard_normal((N, K)).astype(np.float32)
    n = tir.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([n, 3, K], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            xb = bb.emit(relax.op.broadcast_to(x, [n, 3, K]))
            wt = bb.emit(relax.op.broadcast_to(relax.op.permute_dims(relax.const(w), [1, 0]), [K, N]))
            out = bb.emit_output(bb.emit(relax.op.matmul(xb, wt)))
        bb.emit_func_output(out)
    with resolve_target({"kind": "cuda", "arch": "sm_90"}):
        mod = PBLinearRewrite(bp.BitplaneFormat(4, 8, layout="mma16x256"))(bb.get())
    relax.analysis.well_formed(mod)
    assert mod["main"].script().count("pb_dense_act") == 1


@pytest.mark.parametrize("strides", [[2], None])
def test_slices_of_a_constant_are_constants_with_or_without_strides(strides):
    """``strided_slice`` may leave its strides out (TVM's own converters emit such slices); the
    weight matcher read four arguments and raised."""
    from pbtvm.relay_passes.pb_linear_rewrite import ConversionReport, _Rewriter

    whole = np.arange(32, dtype="float32").reshape(8, 4)
    rewriter = _Rewriter(tvm.IRModule(), None, ConversionReport(), None, "mse", None, {})
    args = [[0], [2], [7]] + ([strides] if strides else [])
    part = rewriter._constant(relax.op.strided_slice(relax.const(whole), *args))
    np.testing.assert_array_equal(part, whole[2 : 7 : (strides or [1])[0]])
    assert list(rewriter.report.parts.values())[0][1:] == (0, slice(2, 7, (strides or [1])[0]))
