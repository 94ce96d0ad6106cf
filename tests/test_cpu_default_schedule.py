"""The default CPU schedule of the ops PB layers leave in full precision (schedules/cpu_default.py).

It reorders, vectorizes and parallelizes loops without changing any element's order of
accumulation, so results match the unscheduled build to float rounding, at every batch and at
extents that are not multiples of the vector width.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from tvm import topi

import pbtvm
import pbtvm.cuda
from pbtvm._tvm import te, tir, tvm
from pbtvm.schedules import cpu_default
from pbtvm.target import resolve_target

CPU = resolve_target("llvm")


class _Attention(torch.nn.Module):
    """LayerNorm, causal softmax attention, GELU MLP: the ops a transformer leaves in fp32."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.fc = torch.nn.Linear(width, 2 * width)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (
            z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(self.norm(x)).split(d, dim=2)
        )
        scores = (q @ k.transpose(-1, -2)) / (d // self.heads) ** 0.5
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        y = (scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        return torch.nn.functional.gelu(self.fc(x + y)).sum(-1)


def _compile(model, example, scheduled, monkeypatch):
    monkeypatch.setattr(pbtvm.cuda, "CPU_DEFAULT_SCHEDULE", scheduled)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # attention's activation products stay in fp32
        return pbtvm.compile(model, (example,), target="llvm", bits=8)


@pytest.mark.parametrize(("width", "heads", "seq"), [(64, 4, 48), (36, 3, 7)])  # 36 / 3 / 7: no lane multiples
def test_scheduled_model_matches_the_unscheduled_build(width, heads, seq, monkeypatch):
    torch.manual_seed(0)
    model = _Attention(width, heads).eval()
    example = torch.randn(2, seq, width)
    plain = _compile(model, example, False, monkeypatch)
    scheduled = _compile(model, example, True, monkeypatch)
    with torch.no_grad():
        for batch in (1, 3, 8):
            x = torch.randn(batch, seq, width)
            want = plain(x)
            torch.testing.assert_close(scheduled(x), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(want, model(x), rtol=0.05, atol=0.05 * float(want.abs().max()))


def _scheduled(func: tir.PrimFunc) -> str:
    mod = tvm.IRModule({"main": func})
    with CPU:
        return cpu_default.cpu_default_schedule()(mod)["main"].script()


def _matmul(m: int, k: int, n: int) -> tir.PrimFunc:
    a = te.placeholder((m, k), name="a")
    b = te.placeholder((k, n), name="b")
    r = te.reduce_axis((0, k), name="r")
    c = te.compute((m, n), lambda i, j: te.sum(a[i, r] * b[r, j], axis=r), name="c")
    return te.create_prim_func([a, b, c])


def test_a_large_product_runs_parallel_with_its_output_row_vectorized():
    """``c[i, j] += a[i, k] * b[k, j]``: the reduction outside a vectorized run of ``j``."""
    script = _scheduled(_matmul(256, 64, 64))
    assert "T.parallel(256)" in script
    nest = re.search(
        r'for (\w+), \w+ in T\.grid\(64, 4\):\s*for \w+ in T\.vectorized\(16\):\s*with T\.sblock\("c_update"\)', script
    )
    assert nest is not None, script
    assert f"T.axis.reduce(64, {nest.group(1)})" in script


def test_small_ops_stay_serial():
    """An LSTM step's elementwise work at batch 1: a parallel region would cost more than the op."""
    x = te.placeholder((640,), name="x")
    y = te.compute((640,), lambda i: x[i] * 2.0, name="y")
    script = _scheduled(te.create_prim_func([x, y]))
    assert "T.parallel" not in script and "T.vectorized" in script


def test_scheduled_product_is_exact():
    """A reordered, vectorized, parallel product equals numpy's to float rounding (odd sizes too)."""
    import numpy as np

    for m, k, n in ((256, 64, 64), (300, 33, 37)):
        mod = tvm.IRModule({"main": _matmul(m, k, n)})
        with CPU:
            mod = cpu_default.cpu_default_schedule()(mod)
        lib = tvm.compile(mod, target=CPU)
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
        c = tvm.runtime.tensor(np.zeros((m, n), np.float32))
        lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), c)
        np.testing.assert_allclose(c.numpy(), a @ b, rtol=1e-4, atol=1e-4)


def test_what_a_review_measured_slower_is_left_as_tvm_lowers_it():
    """Vectorized libm calls (exp 1.4x slower), a padded convolution (its padding inlined or
    recomputed: 3.5-9.8x), a parallel softmax of 37 values (5x), vectors of bool (wrong values)."""
    x = te.placeholder((8, 64, 256), name="x")
    exp = te.compute(x.shape, lambda *i: te.exp(x(*i)), name="e")
    script = _scheduled(te.create_prim_func([x, exp]))
    assert "T.parallel" in script and "T.vectorized" not in script

    image = te.placeholder((8, 8, 24, 24), name="image")
    kernel = te.placeholder((8, 8, 3, 3), name="kernel")
    conv = topi.nn.conv2d_nchw(image, kernel, 1, 1, 1)
    script = _scheduled(te.create_prim_func([image, kernel, conv]))
    conv_nest = script.split('T.sblock("conv2d_nchw")')[0].rsplit('T.sblock("pad_temp")', 1)[1]
    assert "T.parallel" not in conv_nest and "T.vectorized" not in conv_nest  # the padding may be

    row = te.placeholder((1, 37), name="row")
    script = _scheduled(te.create_prim_func([row, topi.nn.softmax(row)]))
    assert "T.parallel" not in script

    mask = te.placeholder((64, 64), name="mask", dtype="bool")
    inverted = te.compute(mask.shape, lambda i, j: tir.bitwise_not(mask[i, j]), name="inverted")
    assert "T.vectorized" not in _scheduled(te.create_prim_func([mask, inverted]))


def test_accumulating_scatters_run_serially():
    """TOPI's ``index_put(accumulate=True)`` added in a parallel loop: repeated indices lost
    additions with 2 threads (sums 25-37 % low, a review). The accumulation is serial, the copy
    before it stays parallel, and a model with repeated indices sums exactly (the race shows
    only with 2 or more TVM threads: pbtvm uses every physical core, 2 in CI)."""
    data = te.placeholder((300,), name="data")
    index = te.placeholder((4000,), name="index", dtype="int64")
    values = te.placeholder((4000,), name="values")
    out = topi.index_put(data, [index], values, accumulate=True)
    mod = tvm.IRModule({"main": te.create_prim_func([data, index, values, out])})
    assert mod["main"].script().count("T.parallel(") == 2  # TOPI's: the copy and the accumulation
    script = cpu_default.serial_indirect_accumulation()(mod)["main"].script()
    assert script.count("T.parallel(") == 1 and script.index("T.parallel(") < script.index("+ values")

    class Counts(torch.nn.Module):
        def forward(self, ids):
            return torch.zeros(300).index_put((ids.reshape(-1) % 300,), torch.ones(ids.numel()), accumulate=True)

    ids = torch.randint(0, 5, (4, 50000))
    with pytest.MonkeyPatch.context() as patch:
        compiled = _compile(Counts().eval(), ids, True, patch)
    for _ in range(3):
        torch.testing.assert_close(compiled(ids), Counts()(ids), rtol=0, atol=0)
