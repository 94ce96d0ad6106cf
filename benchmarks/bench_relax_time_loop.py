"""VM cost per step of a Relax time loop: one-step recursion vs halving recursion (issue 15).

The LSTM lowering (``relay_passes/pb_lstm_lowering.py``) runs its time loop as a recursive Relax
function. This script isolates the loop: the step is a trivial kernel (``h' = h + gx[t]`` on a
[2, 4] state, plus the in-place ``ys[t] = h'`` copy), so the time is the Relax VM's. ``linear``
calls itself once per step (depth T); ``halving`` calls itself on both halves of its range
(depth log2 T, 2T - 1 calls), as the lowering does. The linear loop is run only up to
``--linear-max`` steps: deeper, the VM's C++ recursion overflows the stack (segfaults at
T = 4,000 and 5,000 on the 2-core EPYC, 8 MB stack).

    python benchmarks/bench_relax_time_loop.py      # median of 5 runs per length
"""

import argparse
import statistics
import time

import numpy as np

from pbtvm._tvm import relax, te, tir, tvm

parser = argparse.ArgumentParser()
parser.add_argument("--lengths", default="1000,4000,20000,100000")
parser.add_argument("--linear-max", type=int, default=1000)
args = parser.parse_args()

B, H = 2, 4


def _step_func() -> tir.PrimFunc:
    steps, t = tir.Var("steps", "int64"), tir.Var("t", "int64")
    gx = te.placeholder((steps, B, H), "float32", "gx")
    h = te.placeholder((B, H), "float32", "h")
    out = te.compute((B, H), lambda b, u: h[b, u] + gx[t, b, u], name="step")
    return te.create_prim_func([gx, h, t, out]).without_attr("global_symbol")


def _seq(*bindings):
    return relax.SeqExpr([relax.BindingBlock([relax.VarBinding(v, e) for v, e in bindings])], bindings[-1][0])


def build(halving: bool):
    """``main(gx [T, B, H], h [B, H]) -> (ys, h_T)`` with the loop of the chosen kind."""
    from tvm.relax.expr import _update_type

    from pbtvm.relay_passes.pb_lstm_lowering import write_step_func

    bb = relax.BlockBuilder()
    step = bb.add_func(_step_func(), "step")
    write = bb.add_func(write_step_func("llvm"), "write")
    steps, lo, hi = (tir.Var(n, "int64") for n in ("steps", "lo", "hi"))
    seq, state = relax.TensorType([steps, B, H], "float32"), relax.TensorType([B, H], "float32")
    ret = relax.TupleType([seq, state])
    loop = relax.GlobalVar("loop")
    _update_type(loop, relax.FuncType([seq, state, seq, relax.ShapeType(None, 2)], ret))
    gx, h, ys = relax.Var("gx", seq), relax.Var("h", state), relax.Var("ys", seq)
    span = relax.Var("span", relax.ShapeType([lo, hi]))
    h1, ys1, r = relax.Var("h1", state), relax.Var("ys1", seq), relax.Var("r", ret)
    one = [
        (h1, relax.call_tir(step, [gx, h, relax.prim_value(lo)], state)),
        (ys1, relax.call_tir_inplace(write, [ys, h1, relax.prim_value(lo)], 0, seq)),
    ]
    if halving:
        mid = tir.floordiv(lo + hi, 2)
        first, a0, a1 = relax.Var("first", ret), relax.Var("a0", seq), relax.Var("a1", state)
        leaf = _seq(*one, (r, relax.Tuple([ys1, h1])))
        rest = _seq(
            (first, relax.Call(loop, [gx, h, ys, relax.ShapeExpr([lo, mid])])),
            (a0, relax.TupleGetItem(first, 0)),
            (a1, relax.TupleGetItem(first, 1)),
            (relax.Var("both", ret), relax.Call(loop, [gx, a1, a0, relax.ShapeExpr([mid, hi])])),
        )
        cond = hi - lo == 1
    else:
        leaf = _seq(*one, (r, relax.Call(loop, [gx, h1, ys1, relax.ShapeExpr([lo + 1, hi])])))
        rest = _seq((relax.Var("done", ret), relax.Tuple([ys, h])))
        cond = lo < hi
    body = _seq((relax.Var("res", ret), relax.If(relax.prim_value(cond), leaf, rest)))
    mod = bb.get()
    mod[loop] = relax.Function([gx, h, ys, span], body, ret)
    n = tir.Var("n", "int64")
    mseq = relax.TensorType([n, B, H], "float32")
    mgx, mh, ys0, out = relax.Var("gx", mseq), relax.Var("h", state), relax.Var("ys0", mseq), relax.Var("out", ret)
    zero = tir.IntImm("int64", 0)
    mod["main"] = relax.Function(
        [mgx, mh],
        _seq(
            (ys0, relax.op.zeros(relax.ShapeExpr([n, B, H]), "float32")),
            (out, relax.Call(loop, [mgx, mh, ys0, relax.ShapeExpr([zero, n])])),
        ),
        relax.TupleType([mseq, state]),
    ).with_attr("global_symbol", "main")
    vm = relax.VirtualMachine(tvm.compile(relax.transform.Normalize()(mod), "llvm"), tvm.cpu())
    return vm["main"]


print(f"{'T':>8}{'linear us/step':>16}{'halving us/step':>17}")
runs = {kind: build(kind == "halving") for kind in ("linear", "halving")}
for steps in (int(t) for t in args.lengths.split(",")):
    gx = np.random.rand(steps, B, H).astype("float32")
    row = []
    for kind, main in runs.items():
        if kind == "linear" and steps > args.linear_max:
            row.append("(stack)")
            continue
        args_in = (tvm.runtime.tensor(gx), tvm.runtime.tensor(np.zeros((B, H), "float32")))
        main(*args_in)  # warm-up
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            ys, h = main(*args_in)
            times.append(time.perf_counter() - t0)
        per_step = statistics.median(times) / steps * 1e6
        assert np.allclose(ys.numpy(), np.cumsum(gx, 0), rtol=1e-4, atol=1e-3), kind
        row.append(f"{per_step:.2f}")
    print(f"{steps:>8}{row[0]:>16}{row[1]:>17}")
