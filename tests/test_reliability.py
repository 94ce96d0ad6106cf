"""Reliability (issue 18): threads, shared inputs, negative indices, NaN, dicts, dtypes, deployed
libraries, tuning logs, CLI and manifest errors. One test (or a few) per item, each one failing
before its fix."""

from __future__ import annotations

import collections
import gc
import json
import re
import warnings

import numpy as np
import pytest
import torch

import pbtvm
from pbtvm import bitplane as bp
from pbtvm import library
from pbtvm import quantize as qz
from pbtvm._tvm import relax, tvm
from pbtvm.cli import main
from pbtvm.decoder import compile_decoder
from pbtvm.lstm import compile_lstm
from pbtvm.relay_passes import NormalizeConstantIndices
from pbtvm.schedules import tuning
from pbtvm.target import resolve_target

from .concurrency import run_threads

CPU = resolve_target("llvm")
F = torch.nn.functional


def _compile(model, *example, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pbtvm.compile(model.eval(), example, **{"bits": 8, **kw})


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 0.03) -> None:
    """PB (W8A8 unless said) against torch: error within ``rel`` of the output's scale."""
    assert got.dtype == want.dtype and got.shape == want.shape
    got, want = got.double(), want.detach().double()
    assert (got - want).abs().max() <= rel * max(want.abs().max(), 1e-3)


class Small(torch.nn.Module):
    def __init__(self, k: int = 32, h: int = 16, n: int = 8) -> None:
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(k, h), torch.nn.Linear(h, n)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


# ----------------------------------------------------------------------------- 1 threads
def test_one_model_called_from_four_threads_equals_single_threaded():
    torch.manual_seed(0)
    model = Small()
    m = _compile(model, torch.randn(2, 32))
    inputs = [torch.randn(1 + i % 3, 32) for i in range(8)]
    want = [m(x).clone() for x in inputs]
    errors: list[str] = []

    def worker(t: int) -> None:
        for call in range(200):
            i = (t + call) % len(inputs)
            got = m(inputs[i], bitlayers=None)
            if not torch.equal(got, want[i]):
                errors.append(f"thread {t} call {call}")

    run_threads(worker)
    assert errors == []


def test_compiles_from_four_threads_take_turns_and_equal_serial_compiles():
    """torch.export keeps process-wide state while it traces: compiles in four threads at once
    failed (torch internals, some reported as 'the model does not run on the example input'),
    and a compile_lstm model came back with its batch fixed."""
    torch.manual_seed(0)

    class LM(torch.nn.Module):
        def __init__(self, hidden: int) -> None:
            super().__init__()
            self.emb, self.lstm, self.head = (
                torch.nn.Embedding(40, 16),
                torch.nn.LSTM(16, hidden),
                torch.nn.Linear(hidden, 40),
            )

        def forward(self, tokens):
            return self.head(self.lstm(self.emb(tokens))[0])

    models = [LM(16 + 8 * t).eval() for t in range(4)]
    tokens, x = torch.randint(0, 40, (7, 3)), torch.randn(6, 5, 16)
    results: dict[int, torch.Tensor] = {}

    def worker(t: int) -> None:
        if t % 2:
            results[t] = compile_lstm(models[t].lstm, bits=4)(x)[0]
        else:
            results[t] = pbtvm.compile(models[t], (torch.randint(0, 40, (5, 2)),), bits=4)(tokens)

    with warnings.catch_warnings():  # process-wide: set here, not in each thread
        warnings.simplefilter("ignore")
        run_threads(worker)
    for t in range(4):  # the same compiles, one after another
        if t % 2:
            want = compile_lstm(models[t].lstm, bits=4)(x)[0]
        else:
            want = _compile(models[t], torch.randint(0, 40, (5, 2)), bits=4)(tokens)
        assert torch.equal(results[t], want), t


FORK_WHILE_COMPILING = """
import os, sys, threading
from pbtvm import serial
held, done = threading.Event(), threading.Event()
def compiling():
    with serial._COMPILING:
        held.set()
        done.wait()
threading.Thread(target=compiling).start()
held.wait()
pid = os.fork()
if pid == 0:
    os._exit(0 if serial._COMPILING.acquire(timeout=5) else 1)
status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
done.set()
sys.exit(status)
"""


def test_a_child_forked_while_another_thread_compiles_can_compile():
    """The child of a fork inherits the lock as held by a thread it does not have: it gets a new one."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", FORK_WHILE_COMPILING], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_a_worker_thread_that_raises_fails_the_test():
    """run_threads re-raises: a model call that crashes in a thread is not a passing test."""

    def worker(t: int) -> None:
        if t == 2:
            raise RuntimeError("boom")

    with pytest.raises(AssertionError, match="thread 2 of 4 failed: RuntimeError: boom"):
        run_threads(worker)


# ----------------------------------------------------------------------------- 2 shared inputs
class SwiGLU(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down = torch.nn.Linear(24, 32), torch.nn.Linear(24, 32), torch.nn.Linear(32, 24)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


class QKV(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))

    def forward(self, x):
        att = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 4.0, dim=-1)
        return att @ self.v(x)


@pytest.mark.parametrize("cls", [SwiGLU, QKV])
def test_biased_linears_sharing_an_input_compile_and_are_correct(cls):
    torch.manual_seed(1)
    model = cls().eval()
    x = torch.randn(2, 5, model.gate.in_features if cls is SwiGLU else 16)
    m = _compile(model, x)
    assert len(m.converted_layers) == 3
    _close(m(x), model(x))
    if cls is QKV:  # the activation x activation matmuls stay in fp32, named by their module
        assert m.fp32_layers == ["<model> (QKV): relax.matmul"] * 2


# ----------------------------------------------------------------------------- 3 indices
class LastStep(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.head = torch.nn.Linear(16, 12), torch.nn.Linear(12, 4)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        return self.head(h[:, -1]) + h[:, -2, :4] + h[-1, 0, :4]


def test_negative_constant_indices_match_torch():
    torch.manual_seed(2)
    model = LastStep()
    x = torch.randn(3, 5, 16)
    m = _compile(model, x)
    _close(m(x), model(x))
    _close(m(x[:1]), model(x[:1]))  # h[-1] on the dynamic batch: the last row of any batch


def test_negative_take_index_is_normalised_in_the_graph():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([2, 5, 3], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.take(x, relax.const(-1, "int64"), axis=1))
        bb.emit_func_output(out)
    text = NormalizeConstantIndices()(bb.get())["main"].script()
    assert 'R.const(4, "int64")' in text and "R.const(-1" not in text


def test_out_of_bounds_constant_index_is_a_clear_error():
    class Oob(torch.nn.Module):
        def forward(self, x):
            return torch.index_select(x, 1, torch.tensor([0, 7]))

    # torch refuses it when the model runs on the example: named as the example's error
    with pytest.raises(ValueError, match=r"does not run on the example input\(s\) \(\[2, 5, 3\] float32\).*bounds"):
        _compile(Oob(), torch.randn(2, 5, 3))


class AdvancedIndexing(torch.nn.Module):
    """torch's advanced indexing with several index tensors, constant and computed, beside and apart."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(16, 16)
        upper = torch.triu_indices(4, 4, offset=1)
        self.register_buffer("rows", upper[0])
        self.register_buffer("cols", upper[1])
        self.register_buffer("grid", torch.tensor([[0, 1], [1, 0]]))

    def forward(self, x, idx):
        z = self.l1(x).view(-1, 4, 4)
        w = z.view(-1, 2, 2, 4)
        return (
            z[:, self.rows, self.cols],  # the pairs, not every pairing: [B, 6]
            z[:, [0, 1, 2], [1, 2, 3]],
            z[torch.arange(x.shape[0]), idx],  # negative idx counts from the end
            w[:, self.grid, :, self.cols[:1]],  # apart: the index shape comes first
            w[:, :, self.grid[0], self.grid[1]],
            z[:, [-1, -2]],
        )


def test_advanced_indexing_with_several_index_tensors_matches_torch():
    """TVM's converter took ``z[:, i, j]`` one index after the other: ``[B, 6, 6]``, every pairing,
    where torch gives the ``[B, 6]`` pairs; negative computed indices read outside the tensor."""
    torch.manual_seed(20)
    model = AdvancedIndexing().eval()
    m = _compile(model, torch.randn(5, 16), torch.tensor([-1, 0, 3, -4, 2]), bits=16, act_bits=16)
    for batch in (2, 6):
        x, idx = torch.randn(batch, 16), torch.randint(-4, 4, (batch,))
        for got, want in zip(m(x, idx), model(x, idx), strict=True):
            _close(got, want, rel=1e-3)


def test_indices_past_their_axis_read_inside_the_tensor():
    """torch raises ``IndexError``; pbtvm cannot raise inside the compiled graph, so a computed index
    past its axis (and a constant gather index past a smaller run-time batch) reads the clamped
    element: a ``fast`` take or ``gather`` read past the tensor (garbage such as 1.7e22 or NaN).
    Constant indices of a run-time dimension (``y[[0, 2]]``) are checked against its size instead
    (tests/test_size_bounds.py)."""

    class Reads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = torch.nn.Linear(4, 4)

        def forward(self, x, idx):
            y = self.l1(x)
            picked = y[torch.arange(x.shape[0]), idx]
            gathered = y.gather(1, idx[:, None, None].expand(-1, 1, 4)).squeeze(1)
            return picked, gathered, y[:, 0].gather(0, torch.tensor([[2, 2, 2, 2]]))

    torch.manual_seed(21)
    model = Reads().eval()
    m = _compile(model, torch.randn(3, 8, 4), torch.tensor([7, 0, 3]), bits=16, act_bits=16)
    x, far = torch.randn(2, 8, 4), torch.tensor([8, 100])
    picked, gathered, constant_gather = m(x, far)
    last = model.l1(x)[:, 7]  # clamped to the last position
    _close(picked, last, rel=1e-3)
    _close(gathered, last, rel=1e-3)
    _close(constant_gather, model.l1(x)[1:, 0], rel=1e-3)


def test_ids_given_as_input_that_index_a_parameter_are_checked():
    """``self.table[ids]`` with ``ids`` an input: the compiled model refuses ids outside the table, as
    for ``nn.Embedding`` (the indexing converter's wrap and clamp must not hide the input)."""

    class Lookup(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table, self.proj = torch.nn.Parameter(torch.randn(50, 16)), torch.nn.Linear(16, 8)

        def forward(self, ids):
            return self.proj(self.table[ids])

    model = Lookup().eval()
    m = _compile(model, torch.randint(0, 50, (5, 3)), bits=16, act_bits=16)
    assert m.manifest["inputs"][0]["index_range"] == 50
    ids = torch.randint(0, 50, (2, 3))
    _close(m(ids), model(ids), rel=1e-3)
    with pytest.raises(ValueError, match=r"input 0 holds ids .*60; it indexes a table of 50 rows"):
        m(torch.tensor([[1, 60, 2]]))


def test_the_index_pass_checks_constant_bounds_itself():
    """``NormalizeConstantIndices`` names an out-of-bounds constant index (graphs that never ran in torch)."""
    from pbtvm._tvm import relax
    from pbtvm.relay_passes import NormalizeConstantIndices

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([2, 5, 3], "float32"))
    with bb.function("main", [x]):
        out = bb.emit(relax.op.take(x, relax.const(np.array([0, 7]), "int64"), axis=1))
        bb.emit_func_output(out)
    with pytest.raises(ValueError, match="constant index 7 is out of bounds for axis 1 of size 5"):
        NormalizeConstantIndices()(bb.get())


class TokenModel(torch.nn.Module):
    """Embedding of 2-D token ids (cast and reshaped before the lookup), then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.proj = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 8)

    def forward(self, ids):
        return self.proj(self.embed(ids))


def test_token_ids_outside_the_table_are_refused_not_read(tmp_path, capfd):
    """An id past the vocabulary crashed the process (TVM's ``fast`` take read outside the table)."""
    torch.manual_seed(3)
    model = TokenModel().eval()
    ids = torch.randint(0, 50, (2, 5))
    m = pbtvm.compile(model, (ids,), bits=8)
    assert "Fast mode" not in capfd.readouterr().err  # TVM's warning about the unchecked take
    with torch.no_grad():
        _close(m(ids), model(ids))
    loaded = pbtvm.load(m.export(str(tmp_path / "tokens.so")))
    for bad_id in (50, 50_000_000, -1, 2**32 + 3):  # the last one wraps to 3 in the int32 lookup
        bad = ids.clone()
        bad[1, 2] = bad_id
        for compiled in (m, loaded):
            with pytest.raises(
                ValueError, match=r"input 0 holds ids .* table of 50 rows, so ids must lie in \[0, 50\)"
            ):
                compiled(bad)
        with pytest.raises(IndexError):  # torch refuses them too
            model(bad)
    assert m(ids.numpy()).shape == (2, 5, 8)
    with pytest.raises(ValueError, match="input 0 holds ids"):  # numpy ids are checked the same way
        m(bad.numpy())


def test_transposed_token_ids_are_checked_too():
    """A sequence-first LM transposes its ids before the lookup (``embed(ids.t())``)."""

    class SeqFirst(TokenModel):
        def forward(self, ids):
            return self.proj(self.embed(ids.t()))

    torch.manual_seed(4)
    model = SeqFirst().eval()
    ids = torch.randint(0, 50, (3, 4))
    m = pbtvm.compile(model, (ids,), bits=8)
    with torch.no_grad():
        _close(m(ids), model(ids))
    with pytest.raises(ValueError, match="table of 50 rows"):
        m(torch.full((3, 4), 50))


# ----------------------------------------------------------------------------- 4 NaN / inf
def test_nan_and_inf_inputs_propagate_like_torch():
    torch.manual_seed(3)
    model = torch.nn.Linear(40, 8)
    m = _compile(model, torch.randn(2, 40))
    x = torch.randn(5, 40)
    x[0, 3] = float("nan")
    x[1, :] = float("nan")  # an all-NaN row once returned the bias
    x[2, 5] = float("inf")
    x[3, 7] = -float("inf")
    got, want = m(x), model(x).detach()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.isinf(), want.isinf()) and torch.equal(got[2:4].sign(), want[2:4].sign())
    _close(got[4:], want[4:])


class Clamps(torch.nn.Module):
    """A PB layer, then every op TVM lowers to a NaN-dropping compare-and-select (and max
    pooling), then PB again."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(40, 16), torch.nn.Linear(16 * 6 + 8, 8)

    def forward(self, x):
        y = self.l1(x)
        f = torch.nn.functional
        clamps = [torch.relu(y), torch.clamp(y, -0.1, 0.1), f.relu6(y), f.hardtanh(y), f.hardsigmoid(y)]
        clamps.append(torch.maximum(y, torch.minimum(y, torch.zeros_like(y))))
        clamps.append(f.max_pool1d(y[:, None, :], 2, 2).flatten(1))
        return torch.cat([self.l2(torch.cat(clamps, 1)), *clamps], 1)


def test_nan_survives_relu_clamp_maximum_like_torch():
    """TVM's relu / clip / maximum / minimum return the other operand for NaN (relu(nan) = 0,
    hardtanh(nan) = 1): a NaN row came out of the model finite. Now it is NaN where torch's is."""
    torch.manual_seed(5)
    model = Clamps().eval()
    m = _compile(model, torch.randn(2, 40))
    x = torch.randn(4, 40)
    x[0, 3] = float("nan")
    got, want = m(x), model(x).detach()
    assert want[0].isnan().all() and not want[1:].isnan().any()
    assert torch.equal(got.isnan(), want.isnan())
    _close(got[1:], want[1:])


def test_torch_ops_tvm_cannot_import_are_named():
    class Kth(torch.nn.Module):
        def forward(self, x):
            return x.kthvalue(2, 1).values

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), Kth())
    with pytest.raises(
        ValueError,
        match=r"torch importer cannot convert ops of this model: \['kthvalue.default'\] \(aten names\) in 1 \(Kth\);",
    ):
        _compile(model, torch.randn(2, 8))


def test_ops_with_side_effects_are_named():
    """torch.export threads an effect token through torch.linalg.inv's error check; TVM's importer
    failed on it with 'Unsupported input kind: InputKind.TOKEN', reported as a pbtvm bug."""

    class Inverse(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.inv(x.reshape(-1, 4, 4))

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), Inverse())
    with pytest.raises(
        ValueError, match=r"cannot convert ops with side effects .*: _linalg_check_errors.default in 1 \(Inverse\)"
    ):
        _compile(model, torch.randn(2, 16))


def test_complex_buffers_are_named():
    """A complex buffer (Meta's rotary ``freqs_cis``) failed in TVM's importer with a bare
    NotImplementedError naming nothing."""

    class Rotary(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = torch.nn.Linear(8, 8)
            self.register_buffer("freqs_cis", torch.polar(torch.ones(4, 4), torch.rand(4, 4)))

        def forward(self, x):
            q = torch.view_as_complex(self.q(x).reshape(x.shape[0], 4, 4, 2))
            return torch.view_as_real(q * self.freqs_cis).flatten(2)

    with pytest.raises(ValueError, match=r"importer has no complex tensors: freqs_cis; keep the model real"):
        _compile(Rotary(), torch.randn(2, 4, 8))


def test_an_op_tvm_fails_to_convert_is_named_with_its_module():
    """TVM's converter for ``pow`` fails on a run-time size (``x ** x.shape[0]``) with an internal
    TypeError; the error names the aten op and the module that made it."""

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.l1(x) ** x.shape[0]

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), Head())
    with pytest.raises(ValueError, match=r"importer failed on pow.Tensor_Scalar in 1 \(Head\): Binary operators"):
        _compile(model, torch.randn(3, 8))


class Extremes(torch.nn.Module):
    """A PB layer, then every extreme-value op whose NaN handling TVM's differs from torch's, over the
    input itself (NaN where the test puts it) beside the layer's output."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(10, 10)

    def forward(self, x):
        y = torch.cat([x, self.l1(x.nan_to_num())], 1)
        hi, hi_at = torch.max(y, 1)
        lo, lo_at = torch.min(y, 1, keepdim=True)
        values = [hi, lo.flatten(), y.amax(1), y.amin((0, 1)).expand(y.shape[0])]
        indices = [hi_at, lo_at.flatten(), y.argmax(1), y.argmin(1), y.argmax().expand(y.shape[0])]
        return torch.stack(values, 1), torch.stack(indices, 1)


def test_nan_is_the_extreme_of_max_min_and_their_indices_like_torch():
    """torch's argmax / argmin and the indices of torch.max(x, dim) / torch.min(x, dim) point at the
    first NaN; TVM's skipped NaN (a row holding NaN gave the index of its largest number), and
    torch.max(x, dim) imported as topk, which kept no NaN. Ties keep the first index."""
    torch.manual_seed(8)
    model = Extremes().eval()
    m = _compile(model, torch.randn(3, 10))
    x = torch.randn(5, 10)
    x[0, 6], x[0, 2] = float("nan"), float("nan")  # the first NaN (2) is the index
    x[1, 3], x[1, 4] = float("inf"), float("nan")  # NaN above +inf
    x[2, 1], x[2, 7] = 9.0, 9.0  # a tie without NaN: the first
    x[3, 0], x[3, 9] = -9.0, -9.0
    got_values, got_at = m(x)
    want_values, want_at = (t.detach() for t in model(x))
    assert want_at[0, 0] == 2 and want_at[1, 0] == 4 and want_at[2, 0] == 1 and want_at[3, 1] == 0
    assert torch.equal(got_at[:4], want_at[:4])  # row 4 has no NaN or tie: PB may round its extreme elsewhere
    assert torch.equal(got_values.isnan(), want_values.isnan()) and got_values[:2].isnan().all()
    _close(got_values[2:, :3], want_values[2:, :3])


class Sorts(torch.nn.Module):
    """Every sort torch offers that TVM imports, over the input itself, beside a PB layer."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(10, 4)

    def forward(self, x):
        up, up_at = torch.sort(x, 1)
        down, down_at = torch.sort(x, 0, descending=True)
        big, big_at = torch.topk(x, 4, 1)
        small = torch.topk(x, 3, 1, largest=False).values
        order = [up_at, down_at, big_at, torch.argsort(x, 1, descending=True), torch.topk(x, 2, 1).indices]
        return self.l1(x), [up, down, big, small], order  # the orders along dims ORDER_DIMS


ORDER_DIMS = (1, 0, 1, 1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nan_sorts_above_every_number_like_torch(dtype):
    """torch sorts NaN above +inf; TVM's comparison sorts left a row holding NaN unsorted
    (``sort`` gave ``[-1.8, 0.6, 0.8, nan, 1.0, 1.4, 1.5, inf]``)."""
    torch.manual_seed(10)
    model = Sorts().eval().to(dtype)
    m = _compile(model, torch.randn(3, 10, dtype=dtype))
    x = torch.randn(5, 10).to(dtype)
    nan, inf = float("nan"), float("inf")
    x[0, 6], x[0, 2], x[0, 4] = nan, nan, inf  # two NaN (a tie) above +inf
    x[1, 3], x[1, 4], x[1, 8] = -inf, nan, inf
    x[2] = nan  # all NaN
    x[3, 0], x[3, 9] = -0.0, 0.0  # a tie torch does not order either
    _, got_values, got_order = m(x)
    _, want_values, want_order = model(x)
    for got, want in zip(got_values, want_values, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    # The order is determined where the sorted row or column holds no equal values (NaN equal NaN)
    untied = {1: [1, 4], 0: [0, 1, 3, 5, 7, 8, 9]}  # rows 0 (NaN twice), 2 (all NaN), 3 (-0 and 0) tie
    for got, want, dim in zip(got_order, want_order, ORDER_DIMS, strict=True):
        keep = untied[dim]
        assert torch.equal(got[keep] if dim else got[:, keep], want[keep] if dim else want[:, keep])
    torch.testing.assert_close(x.gather(1, got_order[0]), got_values[0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(x.gather(0, got_order[1]), got_values[1], rtol=0, atol=0, equal_nan=True)


class Squeezes(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = self.l1(x)
        dot = torch.bmm(y.unsqueeze(1), y.unsqueeze(2)).squeeze()  # [batch, 1, 1] -> [batch]
        return dot, y.unsqueeze(1).squeeze(1), y[:, None, :, None].squeeze((1, 3)), y.squeeze(-1)


@pytest.mark.filterwarnings("ignore:pbtvm. 1 product.s. of two run-time tensors")  # the bmm of two activations
def test_squeeze_removes_only_axes_of_size_1():
    """TVM squeezed every axis torch.export listed: ``x.squeeze()`` of a [batch, 1, 1] tensor came
    out a scalar holding row 0's value at any batch. A run-time axis stays, with a warning."""
    torch.manual_seed(12)
    model = Squeezes().eval()
    with pytest.warns(
        UserWarning, match=r"squeeze in <model> \(Squeezes\) keeps the run-time dimension\(s\) \[0\]"
    ) as got:
        m = pbtvm.compile(model, (torch.randn(3, 8),), bits=8)
    assert [w.filename for w in got if "squeeze" in str(w.message)] == [__file__]  # points at the compile call
    x = torch.randn(5, 8)
    for out, want in zip(m(x), model(x), strict=True):
        assert out.shape == want.shape
        _close(out, want)
    assert m(x[:1])[0].shape == (1,)  # torch gives a 0-d tensor at batch 1: the compiled model keeps the rank
    with warnings.catch_warnings():  # a warning made an error stays itself (not "TVM's importer failed")
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="keeps the run-time dimension"):
            pbtvm.compile(model, (torch.randn(3, 8),), bits=8)


class Medians(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(8, 4)

    def forward(self, x):
        values, at = x.median(-1)
        return self.l1(x), values, at, x.median().expand(1), x.median(0, keepdim=True).values, x.median(0).indices


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_is_the_median_where_the_axis_holds_one_like_torch(dtype):
    """TVM's median skipped NaN; torch's is NaN there, its index that of the first NaN."""
    torch.manual_seed(14)
    model = Medians().eval().to(dtype)
    m = _compile(model, torch.randn(3, 8, dtype=dtype))
    x = torch.randn(4, 8).to(dtype)
    x[0, 3], x[0, 5], x[2, 0] = float("nan"), float("nan"), float("nan")
    for got, want in list(zip(m(x), model(x), strict=True))[1:]:
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


class HalfOps(torch.nn.Module):
    """Ops TVM 0.27 cannot build, or builds wrong, in float16 or bfloat16, over the input."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(8, 4)
        self.norm = torch.nn.LayerNorm(8)
        self.batch_norm = torch.nn.BatchNorm1d(8)

    def forward(self, x):
        f = torch.nn.functional
        exact = [x.median(-1).values, x.pow(2), torch.fmod(x, 0.75), torch.remainder(x, 0.75)]
        norms = [self.norm(x), f.rms_norm(x, (8,)), self.batch_norm(x), x.norm(dim=-1, keepdim=True)]
        rounded = [*norms, torch.atan2(x, x.flip(-1))]
        return (
            self.l1(x),
            torch.cat(exact[:1] + [e.flatten() for e in exact[1:]]),
            torch.cat(rounded, -1),
            x.median(-1).indices,
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_ops_tvm_lacks_run_in_float32(dtype):
    """bfloat16 ``median`` returned another element (TVM sorted the bit patterns); bfloat16
    ``layer_norm``, ``power``, ``mod`` and float16 ``atan2`` failed to build; float16
    ``batch_norm`` came back as float32."""
    torch.manual_seed(13)
    model = HalfOps().eval().to(dtype)
    m = _compile(model, torch.randn(3, 8, dtype=dtype))
    x = torch.randn(5, 8).to(dtype)
    _, got_exact, got_rounded, got_at = m(x)
    _, want_exact, want_rounded, want_at = model(x)
    assert torch.equal(got_at, want_at) and got_exact.dtype == got_rounded.dtype == dtype
    torch.testing.assert_close(got_exact, want_exact, rtol=0, atol=0)  # computed in float32, one rounding
    torch.testing.assert_close(
        got_rounded, want_rounded, rtol={torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype], atol=1e-3
    )


class ValueTests(torch.nn.Module):
    """torch's value tests and bool arithmetic over the input, beside a PB layer."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(6, 4)

    def forward(self, x):
        ints = (x.nan_to_num() * 4).to(torch.int32)  # an integer compared with itself: always equal
        tests = [x.isnan(), x.isinf(), x.isfinite(), x == x, x != x, torch.isposinf(x), torch.isneginf(x), ints == ints]
        bools = [(x > 0) * (x < 1), (x > 0) + (x < -1)]
        return self.l1(x), torch.stack(tests + bools, 1), x.nan_to_num()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_value_tests_and_bool_arithmetic_build_and_match_torch(dtype):
    """``isfinite`` (a product of bools after torch's decomposition) and ``isnan`` / ``isinf`` /
    ``nan_to_num`` of bfloat16 failed to build in TVM 0.27 (internal errors)."""
    torch.manual_seed(11)
    model = ValueTests().eval().to(dtype)
    m = _compile(model, torch.randn(3, 6, dtype=dtype))
    x = torch.randn(4, 6).to(dtype)
    x[0, 1], x[1, 2], x[2, 3], x[3] = float("nan"), float("inf"), float("-inf"), 0.5
    _, got_tests, got_clean = m(x)
    _, want_tests, want_clean = model(x)
    assert torch.equal(got_tests, want_tests)
    assert torch.equal(got_clean, want_clean) and got_clean.dtype == dtype


class Resampled(torch.nn.Module):
    """Interpolation and integer clamps over the input, beside a PB layer."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(8, 4)

    def forward(self, x):
        wave, image = x.unsqueeze(1), x.view(-1, 1, 2, 4)
        resampled = [
            F.interpolate(wave, scale_factor=2, mode="linear"),
            F.interpolate(wave, scale_factor=3, mode="linear", align_corners=True),
            F.interpolate(wave, size=5, mode="nearest"),
            F.interpolate(image, scale_factor=2, mode="bilinear").flatten(2),
        ]
        ints = (x * 100).to(torch.int64)
        return self.l1(x), torch.cat(resampled, 2), torch.stack([ints.clamp(max=5), ints.clamp(min=-3)], 1)


def test_interpolation_and_integer_clamps_build_and_match_torch():
    """``F.interpolate`` decomposes into ``clamp`` of int64 indices with one bound; TVM's importer
    made the other ``-inf`` and its build failed ("Cannot convert infinity to BigInt")."""
    torch.manual_seed(14)
    model = Resampled().eval()
    m = _compile(model, torch.randn(3, 8))
    for batch in (1, 5):
        x = torch.randn(batch, 8)
        _, got_resampled, got_ints = m(x)
        _, want_resampled, want_ints = model(x)
        torch.testing.assert_close(got_resampled, want_resampled)
        assert torch.equal(got_ints, want_ints)


class RunTimeRepeats(torch.nn.Module):
    """``repeat`` by the batch and views from a constant leading size to the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(8, 4)
        self.offset = torch.nn.Parameter(torch.arange(8.0))

    def forward(self, x):
        batch = x.shape[0]
        flat = x.view(1, batch * 8)
        return (
            self.l1(x),
            flat.view(batch, 8) + self.offset.repeat(batch).view(batch, 8),
            self.offset.repeat(2, batch, 1),
            x.repeat(2, 1, 3),
            flat.reshape(batch, 2, 4),
        )


def test_repeat_by_the_batch_and_views_to_a_run_time_size_match_torch():
    """TVM's ``repeat`` took constant counts only, and its ``view`` compared ``[1, batch*8]`` with
    ``[batch, 8]`` by ``==``, a TIR expression without a truth value: both failed to import."""
    model = RunTimeRepeats().eval()
    m = _compile(model, torch.randn(3, 8))
    for batch in (1, 5):
        x = torch.randn(batch, 8)
        for got, want in list(zip(m(x), model(x), strict=True))[1:]:
            assert torch.equal(got, want)


def test_arithmetic_with_run_time_sizes_matches_torch():
    """``x / x.shape[0]`` and ``x * x.numel()`` failed to import: TVM's converter made a constant of
    the run-time size."""

    class Sized(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = torch.nn.Linear(8, 8)

        def forward(self, x):
            y = self.l1(x)
            ints = (x * 10).int()
            return (
                y / y.shape[0],
                y * y.numel(),
                x.shape[0] - x,
                ints / x.shape[0],
                ints * x.shape[0],
                x + 2 * x.shape[0],
            )

    model = Sized().eval()
    m = _compile(model, torch.randn(3, 8), bits=16, act_bits=16)
    for batch in (1, 5):
        x = torch.randn(batch, 8)
        got, want = m(x), model(x)
        _close(got[0], want[0], rel=1e-3)
        _close(got[1], want[1], rel=1e-3)
        for g, w in zip(got[2:], want[2:], strict=True):
            assert g.dtype == w.dtype
            torch.testing.assert_close(g, w)


class StatisticNorms(torch.nn.Module):
    """Norms whose statistics come from the input, beside a PB layer: ``nn.GroupNorm`` with a weight
    and bias, ``F.group_norm`` without, ``InstanceNorm1d`` with, ``InstanceNorm2d`` without, and a
    ``BatchNorm1d`` without running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(8, 4)
        self.group, self.instance = torch.nn.GroupNorm(4, 64), torch.nn.InstanceNorm1d(64, affine=True)
        self.instance2d, self.batch = torch.nn.InstanceNorm2d(64), torch.nn.BatchNorm1d(64, track_running_stats=False)
        for p in (self.group.weight, self.group.bias, self.instance.weight, self.instance.bias):
            torch.nn.init.normal_(p)

    def forward(self, x):
        grid = x.unflatten(2, (4, 8))
        norms = [self.group(x), F.group_norm(grid, 2), self.instance(x), self.instance2d(grid), self.batch(x)]
        return self.l1(x[:, :8, 0]), *norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_group_and_instance_norms_subtract_the_mean_before_squaring(dtype):
    """TVM's ``group_norm`` took the variance as E[x^2] - E[x]^2 in float32: over groups of mean 100
    and spread 3 its output was 2e-3 off in float32 (torch's 5e-6), and it refused bfloat16 and a
    missing weight; ``InstanceNorm`` (and ``BatchNorm`` without running statistics) failed to import
    on a run-time batch. Half precision is computed in float32 and rounded once: within one unit in
    the last place of the largest output of the exact result (torch's own half ``InstanceNorm`` is
    not: it rounds the mean to the half type first)."""
    torch.manual_seed(15)
    model = StatisticNorms().eval().to(dtype)
    m = _compile(model, torch.randn(3, 64, 32, dtype=dtype))
    for batch in (1, 5):
        x = (torch.randn(batch, 64, 32) * 3 + 100).to(dtype)
        got, want = m(x)[1:], model(x)[1:]
        exact = model.double()(x.double())[1:]
        model.to(dtype)
        for g, w, e in zip(got, want, exact, strict=True):
            assert g.dtype == dtype and g.shape == w.shape
            tolerance = 1e-4 if dtype == torch.float32 else torch.finfo(dtype).eps * e.abs().max()
            assert (g.double() - e).abs().max() <= tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_fills_build_and_match_torch(dtype):
    """``torch.full((T, T), float("-inf")).triu(1)`` (a causal mask), ``full_like`` / ``new_full`` of
    NaN or inf failed to build in TVM 0.27 (its ``topi.full`` tested the dtype as a string)."""

    class Masked(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = torch.nn.Linear(8, 8)

        def forward(self, x):
            mask = torch.full((8, 8), float("-inf"), dtype=x.dtype).triu(1)
            return (self.l1(x) + mask).softmax(-1), torch.full_like(x, float("nan")), x.new_full((2, 8), float("inf"))

    model = Masked().eval().to(dtype)
    m = _compile(model, torch.randn(2, 8, 8, dtype=dtype), bits=16, act_bits=16)
    x = torch.randn(3, 8, 8, dtype=dtype)
    got, want = m(x), model(x)
    _close(got[0], want[0], rel=1e-3 if dtype == torch.float32 else 2e-2)
    for g, w in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(g, w, equal_nan=True)


def test_extremes_of_bfloat16_and_bool_tensors():
    """TVM 0.27 builds no bfloat16 argmax and reduces no bool tensor: the indices of bfloat16
    tensors go through float32, bool reductions through uint8 (max is any, min is all)."""

    class Mixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = torch.nn.Linear(8, 4)

        def forward(self, x):
            positive = x > 0
            indices = [
                torch.max(x, 1).indices,
                x.argmin(1),
                torch.max(positive, 1).indices,
                torch.min(positive, 1).indices,
            ]
            return self.l1(x), torch.stack(indices, 1), torch.stack([positive.amax(1), positive.amin(1)], 1)

    torch.manual_seed(9)
    model = Mixed().eval().to(torch.bfloat16)
    m = _compile(model, torch.randn(3, 8, dtype=torch.bfloat16))
    x = torch.randn(6, 8, dtype=torch.bfloat16)
    x[0, 5], x[1] = float("nan"), x[1].abs()  # the first NaN is the extreme; a row with no False
    _, got_at, got_any = m(x)
    _, want_at, want_any = model(x)
    assert want_at[0, 0] == 5 and want_any[1].all()
    assert torch.equal(got_at, want_at) and torch.equal(got_any, want_any)


def test_an_unread_index_of_max_is_not_computed():
    """``x.max(dim).values`` imports as a max and an argmax in a tuple: the argmax (and its NaN
    check) must not reach the compiled graph."""
    from pbtvm.model_import import import_model

    class Values(torch.nn.Module):
        def forward(self, x):
            return (x * 2).max(1).values

    mod, _, _ = import_model(Values().eval(), (torch.randn(3, 8),))
    script = mod.script()
    assert "R.max(" in script and "argmax" not in script


def test_nan_survives_max_and_min_reductions():
    """TVM's max / min reductions keep a NaN only where it happens to be reduced first; wrapped,
    a NaN anywhere along the axis gives NaN."""
    from pbtvm._tvm import relax, tvm
    from pbtvm.relay_passes import PropagateNaN

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([2, 4, 10], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            hi = bb.emit(relax.op.max(x, axis=[1]))
            lo = bb.emit(relax.op.min(x, axis=[1], keepdims=True))
            out = bb.emit_output(relax.Tuple([hi, lo]))
        bb.emit_func_output(out)
    data = np.random.default_rng(0).standard_normal((2, 4, 10)).astype(np.float32)
    data[0, 2, 3] = np.nan  # the third of the four values reduced into [0, 3]
    vm = relax.VirtualMachine(tvm.compile(PropagateNaN()(bb.get()), "llvm"), tvm.cpu())
    hi, lo = (t.numpy() for t in vm["main"](tvm.runtime.tensor(data)))
    np.testing.assert_array_equal(hi, np.max(data, axis=1))  # numpy propagates NaN, as torch does
    np.testing.assert_array_equal(lo, np.min(data, axis=1, keepdims=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nan_survives_relu_in_half_precision(dtype):
    """bfloat16 has no ``isnan`` in TVM and ``x != x`` folds to false: the check goes through float32."""
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval().to(dtype)
    m = _compile(model, torch.randn(2, 16, dtype=dtype))
    x = torch.randn(3, 16, dtype=dtype)
    x[0, 1] = float("nan")
    got = m(x)
    assert got[0].isnan().all() and got[1:].isfinite().all()


def test_inf_rows_stay_non_finite_through_two_layers():
    """A row holding +inf: torch's next layer sums inf - inf (NaN); PB's gives +-inf or NaN (the
    README's NaN policy), never a finite number."""
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(40, 16), torch.nn.Linear(16, 8)).eval()
    m = _compile(model, torch.randn(2, 40))
    x = torch.randn(3, 40)
    x[0, 5] = float("inf")
    got = m(x)
    assert not got[0].isfinite().any() and got[1:].isfinite().all()


def test_nan_propagates_through_compile_lstm():
    torch.manual_seed(4)
    lstm = torch.nn.LSTM(8, 16, batch_first=True)
    m = compile_lstm(lstm, target="llvm", bits=8)
    x = torch.randn(2, 4, 8)
    x[0, 1, 3] = float("nan")
    y, (h, _) = m(x)
    want, (wh, _) = lstm(x)
    assert torch.equal(y.isnan(), want.isnan()) and torch.equal(h.isnan(), wh.isnan())
    assert y[0, 1:].isnan().all() and not y[1].isnan().any()


# ----------------------------------------------------------------------------- 5 outputs
Pair = collections.namedtuple("Pair", ["first", "second"])


class Structured(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 8)

    def forward(self, x):
        y = self.a(x)
        extra = (torch.relu(y), [y * 2], Pair(y, y.max(dim=-1)))
        return {"logits": y, "extra": extra, 3: y.sum(-1)}


def test_dict_and_nested_outputs_come_back_as_the_module_returns_them(tmp_path):
    torch.manual_seed(5)
    model = Structured()
    x = torch.randn(2, 16)
    m = _compile(model, x)
    path = m.export(tmp_path / "s.so")
    for compiled in (m, pbtvm.load(path)):
        got, want = compiled(x), model(x)
        assert list(got) == ["logits", "extra", 3]
        assert isinstance(got["extra"], tuple) and isinstance(got["extra"][1], list)
        pair = got["extra"][2]  # named tuples keep their class and fields (were plain tuples)
        assert type(pair) is Pair and type(pair.second) is torch.return_types.max
        _close(pair.second.values, want["extra"][2].second.values)
        assert torch.equal(pair.second.indices, want["extra"][2].second.indices)
        _close(got["logits"], want["logits"])
        _close(got["extra"][1][0], want["extra"][1][0])
        _close(got[3], want[3], rel=0.05)


# ----------------------------------------------------------------------------- 6 dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_half_bfloat_and_double_models_keep_their_dtype(dtype, bias):
    torch.manual_seed(6)
    model = torch.nn.Linear(32, 8, bias=bias).to(dtype)
    x = torch.randn(3, 32).to(dtype)
    m = _compile(model, x)
    assert len(m.converted_layers) == 1 and m.fp32_layers == []
    # PB computes in float32 and casts its result: the float32 reference, cast, within an ulp
    fmt, [(q, s)] = qz.layer_format([model.weight.detach().float().numpy()], bp.BitplaneFormat(8, 8))
    b = model.bias.detach().float().numpy() if bias else None
    want = torch.from_numpy(qz.pb_linear_reference(x.float().numpy(), bp.pack_weights(q, fmt), s, b, fmt)).to(dtype)
    got = m(x)
    assert got.dtype == dtype and got.shape == want.shape
    eps = torch.finfo(dtype).eps if dtype != torch.float64 else 1e-6
    torch.testing.assert_close(got, want, rtol=eps, atol=eps * float(want.abs().max()))


class ConvNet(torch.nn.Module):
    """Convolutions (with and without bias, grouped, transposed) and a PB layer after them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = torch.nn.Conv1d(2, 4, 3, padding=1)
        self.conv2d = torch.nn.Conv2d(2, 4, 2, padding=1, groups=2, bias=False)
        self.up = torch.nn.ConvTranspose1d(2, 3, 3, stride=2, output_padding=1)
        self.head = torch.nn.Linear(4 * 4, 8)

    def forward(self, x):
        features = self.conv1d(x)
        return self.head(features.flatten(1)), features, self.conv2d(x.view(-1, 2, 2, 2)), self.up(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_convolutions_keep_the_model_dtype(dtype):
    """TVM's importer gave every convolution a float32 result: a float16 / bfloat16 / float64
    convolution came back float32 (float64 computed 1e-7 off), and one followed by a Linear failed
    to build. Half precision accumulates in float32 and rounds once, as torch does."""
    torch.manual_seed(16)
    model = ConvNet().eval().to(dtype)
    with pytest.warns(UserWarning, match=r"conv1d \(Conv1d\).*conv2d \(Conv2d\).*up \(ConvTranspose1d\)"):
        m = pbtvm.compile(model, (torch.randn(3, 2, 4, dtype=dtype),), bits=8)
    assert len(m.converted_layers) == 1
    for batch in (1, 5):
        x = torch.randn(batch, 2, 4, dtype=dtype)
        got, want = m(x), model(x)
        _close(got[0], want[0])
        for g, w in zip(got[1:], want[1:], strict=True):
            assert g.dtype == dtype and g.shape == w.shape
            ulp = 1e-15 if dtype == torch.float64 else torch.finfo(dtype).eps
            assert (g - w).abs().max() <= ulp * w.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_norms_build_in_float64_too(dtype):
    """TVM's ``layer_norm`` refuses float64: compiling a float64 model with a LayerNorm (e.g. a
    ``TransformerEncoderLayer``) failed with an internal error at build."""

    class Norms(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = torch.nn.Linear(8, 8)
            self.norm, self.plain = torch.nn.LayerNorm(8), torch.nn.LayerNorm([2, 4], elementwise_affine=False)
            torch.nn.init.normal_(self.norm.weight)
            torch.nn.init.normal_(self.norm.bias)

        def forward(self, x):
            return self.norm(self.l1(x)), self.plain(x.view(-1, 2, 4) * 10 + 100), F.layer_norm(x, (8,), eps=0.1)

    torch.manual_seed(17)
    model = Norms().eval().to(dtype)
    m = _compile(model, torch.randn(3, 8, dtype=dtype), bits=16, act_bits=16)
    x = torch.randn(5, 8, dtype=dtype)
    got, want = m(x), model(x)
    _close(got[0], want[0], rel=1e-3)
    for g, w in zip(got[1:], want[1:], strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g, w)


def test_compile_leaves_the_model_in_its_own_mode():
    """``pbtvm.compile`` called ``model.eval()`` and left the caller's model in eval mode; it compiles
    eval semantics (dropout off, running statistics), and no running statistic moves."""

    class Trained(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.norm, self.drop = torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(self.norm(self.l1(x)))

    torch.manual_seed(18)
    model = Trained().train()
    model.drop.eval()  # a mixed mode comes back as it was, module by module
    before = model.norm.running_mean.clone()
    m = pbtvm.compile(model, (torch.randn(3, 8),), bits=16, act_bits=16, calibration=[torch.randn(4, 8)])
    assert model.training and model.norm.training and not model.drop.training
    assert torch.equal(model.norm.running_mean, before)
    x = torch.randn(5, 8)
    _close(m(x), model.eval()(x), rel=1e-3)


def test_a_linear_on_a_non_contiguous_4d_input_is_converted():
    """torch decomposes it into ``bmm`` with the weight broadcast over the leading axes and those
    axes merged (``reshape(broadcast_to(permute_dims(W)))``): it stayed in full precision."""

    class Heads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 8)

        def forward(self, x):
            return self.proj(x[..., :4])

    model = Heads().eval()
    m = _compile(model, torch.randn(3, 2, 6, 6), bits=16, act_bits=16)
    assert m.converted_layers == ["proj (Linear)"] and m.fp32_layers == []
    for batch in (1, 4):
        x = torch.randn(batch, 2, 6, 6)
        _close(m(x), model(x), rel=1e-3)


class CrossAttention(torch.nn.Module):
    """``nn.MultiheadAttention`` with keys from a second input, and slices of a plain weight."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.w, self.b = torch.nn.Parameter(torch.randn(24, 16)), torch.nn.Parameter(torch.randn(24))
        self.v = torch.nn.Parameter(torch.randn(16, 12))

    def forward(self, q, k):
        out = self.attn(q, k, k, need_weights=False)[0]
        sliced = [F.linear(out, self.w[8:], self.b[8:]), out @ self.w[4:20:2].T, out @ self.v[:, 2:10]]
        return (
            out,
            *sliced,
            out @ self.v,
            out @ (2 * self.v),
            torch.einsum("bsd,ed->bse", out, self.w),
            out @ self.v.tanh(),
        )


def test_slices_of_constant_weights_are_converted_and_named():
    """Cross-attention splits ``in_proj_weight`` into q and k/v rows: the slices were left in full
    precision as "weight is not a constant", in a warning whose entries could not be told apart; so
    were weights that torch's decompositions transpose or scale (``einsum``, ``x @ (2 * v)``)."""
    torch.manual_seed(19)
    model = CrossAttention().eval()
    q, k = torch.randn(3, 5, 16), torch.randn(3, 6, 16)
    with pytest.warns(UserWarning) as caught:  # both warnings, the products' and the layers'
        m = pbtvm.compile(model, (q, k), bits=16, act_bits=16)
    said = [str(w.message) for w in caught]
    assert [m for m in said if re.search(r"2 product\(s\) of two run-time tensors .*e\.g\. \[.*\] @ \[", m)], said
    assert [m for m in said if m.endswith("stay in full precision: attn (MultiheadAttention) x2")], said
    listed = [m for m in said if "layer(s) stay in full precision" in m][0]
    # tanh(v) is made from constants by an op pbtvm does not fold: not a PB layer, not an activation product
    assert listed.count("(CrossAttention): relax.matmul: weight is not a constant (made from constants") == 1
    assert m.converted_layers == [
        "attn.in_proj_weight[0:16] (MultiheadAttention)",
        "attn.in_proj_weight[16:48] (MultiheadAttention)",
        "attn.out_proj (NonDynamicallyQuantizableLinear)",
        "w[8:24] (CrossAttention)",
        "w[4:20:2] (CrossAttention)",
        "v[:, 2:10] (CrossAttention)",
        "v (CrossAttention)",
        "v (CrossAttention)",  # 2 * v, and einsum's transposes and new axes of w: folded in numpy
        "w (CrossAttention)",
    ]
    for batch in (1, 4):
        q, k = torch.randn(batch, 5, 16), torch.randn(batch, 6, 16)
        for got, want in zip(m(q, k), model(q, k), strict=True):
            _close(got, want, rel=1e-3)


def test_a_negated_weight_is_folded_like_a_scaled_one():
    """``x @ (-W).T`` stayed in full precision (``W * 0.5`` was folded, ``neg`` was not)."""

    class Negated(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(16, 32))

        def forward(self, x):
            return x @ (-self.w).T, F.linear(x, -self.w * 0.5)

    torch.manual_seed(4)
    model = Negated().eval()
    x = torch.randn(3, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left in full precision
        m = pbtvm.compile(model, (x,), bits=16, act_bits=16)
    assert len(m.converted_layers) == 2
    for got, want in zip(m(x), model(x), strict=True):
        _close(got, want, rel=1e-3)


def test_an_input_broadcast_over_the_batch_keeps_the_batch_dynamic():
    """HF-style ``position_ids`` of shape ``[1, S]`` beside ``ids`` of ``[B, S]``: the whole model was
    compiled for the example's batch; the input broadcast over the batch now keeps size 1."""

    class Positions(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens, self.positions = torch.nn.Embedding(30, 16), torch.nn.Embedding(8, 16)
            self.head = torch.nn.Linear(16, 4)

        def forward(self, ids, position_ids):
            return self.head(self.tokens(ids) + self.positions(position_ids))

    model = Positions().eval()
    with pytest.warns(UserWarning, match=r"input\(s\) 1 have size 1 in dimension 0 beside a batch of 3") as caught:
        m = pbtvm.compile(model, (torch.randint(0, 30, (3, 8)), torch.arange(8)[None]), bits=16, act_bits=16)
    assert not [w for w in caught if "could not be made dynamic" in str(w.message)]
    for batch in (1, 5):
        ids = torch.randint(0, 30, (batch, 8))
        _close(m(ids, torch.arange(8)[None]), model(ids, torch.arange(8)[None]), rel=1e-3)
    with pytest.raises(ValueError, match=r"input 1 has shape \(5, 8\), the model expects \(1, 8\)"):
        m(torch.randint(0, 30, (5, 8)), torch.arange(8).expand(5, -1))
    # inputs by the forward's parameter names, as HF-style callers pass them
    ids, positions = torch.randint(0, 30, (2, 8)), torch.arange(8)[None]
    want = m(ids, positions)
    assert torch.equal(m(ids, position_ids=positions), want)
    assert torch.equal(m(position_ids=positions, ids=ids), want)
    with pytest.raises(TypeError, match=r"no input named pos; its inputs: ids, position_ids"):
        m(ids, pos=positions)
    with pytest.raises(TypeError, match=r"input ids given by position and by name"):
        m(ids, ids=ids, position_ids=positions)
    with pytest.raises(TypeError, match=r"the model takes 2 input\(s\): position_ids missing"):
        m(ids=ids)


def test_a_batch_that_cannot_be_dynamic_is_explained():
    """The warning said only "could not be made dynamic (UserError)"; it now gives torch.export's
    reason: a time-first GRU (unrolled by torch.export) fixes dimension 0, its sequence length."""

    class TimeFirst(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = torch.nn.GRU(4, 8)

        def forward(self, x):
            return self.gru(x)[0]

    with (
        pytest.warns(UserWarning, match=r"gru \(GRU\) is recurrent and not lowered"),
        pytest.warns(
            UserWarning,
            match=r"dimension 0 of every input\) could not be made dynamic \(UserError: .*"
            r"specialized it to be a constant \(6\)\)",
        ),
    ):
        pbtvm.compile(TimeFirst().eval(), (torch.randn(6, 3, 4),), bits=8)


def test_a_head_tied_to_the_embedding_is_named_as_the_head():
    """Layers are named by weight: a tied head was listed as ``embed (Embedding)``."""

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(40, 16), torch.nn.Linear(16, 40, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.embed(ids)))

    model = Tied().eval()
    m = _compile(model, torch.randint(0, 40, (3, 5)))
    assert m.converted_layers == ["head (Linear)"]


# ----------------------------------------------------------------------------- 7 raw VM bitlayers
def test_deployed_library_refuses_out_of_range_bitlayers_through_the_raw_vm(tmp_path):
    torch.manual_seed(7)
    model = Small()
    x = torch.randn(2, 32)
    compiled = pbtvm.compile(model, (x,), bits=4)
    path = compiled.export(tmp_path / "m.so")
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())  # what a TVM-only app does (README)
    arg = tvm.runtime.tensor(x.numpy())
    for layers in (1, 4):
        got = vm["main"](arg, tvm.runtime.ShapeTuple([layers]))[0].numpy()
        np.testing.assert_array_equal(got, compiled(x.numpy(), bitlayers=layers))
    for layers in (0, -1, 5, 64, 100000):
        with pytest.raises(Exception, match=r"bitlayers must be in 1\.\.4"):
            vm["main"](arg, tvm.runtime.ShapeTuple([layers]))


# ----------------------------------------------------------------------------- 8 tuning logs
def _log(tmp_path) -> tuning.TuningLog:
    log = tuning.TuningLog(tmp_path, CPU)
    with log.locked(exclusive=True):
        log.database(create=True)
    return log


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (b'[0, "x"]\n', "not a MetaSchedule record row"),
        (b"[7, [[], [1e-5], {}, []]]\n", "workload index 7"),
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe garbage", "not text"),
        (b'{"a": 1}\n', "not a MetaSchedule record row"),
    ],
)
def test_corrupt_tuning_log_is_an_error_naming_file_and_line(tmp_path, capsys, text, why):
    log = _log(tmp_path)
    (log.path / tuning.RECORDS).write_bytes(b"\n" + text)
    with pytest.raises(tuning.TuningLogError, match=f"{tuning.RECORDS} is corrupt at line 2: .*{why}"):
        tuning.tuned_lookup(tmp_path, CPU)
    assert main(["inspect", str(tmp_path)]) == 2  # inspect rejects what compile rejects
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pbtvm: error: tuning log") and "line 2" in err[0]


def test_record_for_another_cpu_in_a_matching_directory_is_ignored_with_a_warning(tmp_path, monkeypatch):
    from pbtvm import bitplane as bp

    monkeypatch.setenv("PBTVM_CPU_KERNEL", "popcount")  # MetaSchedule records (the AVX-512 GEMM has none)
    from pbtvm import kernels

    ms = tuning.meta_schedule()
    log = _log(tmp_path)
    func = kernels.dense_func(bp.BitplaneFormat(4, 8), 16, 64, True)
    other = resolve_target(
        {"kind": "llvm", "mcpu": "skylake-avx512" if CPU.attrs["mcpu"] != "skylake-avx512" else "znver4"}
    )
    (sch,) = tuning.sample_candidates(func, CPU, 1, seed=3)[:1]
    mod = tvm.IRModule({"main": tuning.workload(func, 1)})
    db = log.database()
    args = ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"])
    db.commit_tuning_record(ms.database.TuningRecord(sch.trace, db.commit_workload(mod), [1e-6], other, args))
    lookup, used = tuning.tuned_lookup(tmp_path, CPU)
    with pytest.warns(UserWarning, match="record.s. for llvm-.* this is llvm-.*ignored"):
        assert lookup(func) is None
    assert used == []


# ----------------------------------------------------------------------------- 9 smaller items
def test_compile_to_a_missing_directory_is_one_error_line(capsys):
    assert main(["compile", "mnist-mlp", "-o", "/nonexistent/dir/x.so"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pbtvm: error: cannot write /nonexistent/dir/x.so: the directory /nonexistent/dir does not exist"]


def test_gpu_is_explained_as_cuda(tmp_path):
    with pytest.raises(ValueError, match="for an NVIDIA GPU use 'cuda'"):
        pbtvm.compile(Small(), (torch.randn(2, 32),), target="gpu")
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        pbtvm.load(tmp_path / "x.so", device="gpu")


class Tagger(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.fc = torch.nn.LSTM(8, 16, num_layers=2, batch_first=True), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.lstm(x)[0])


def _poisoned(weight: torch.Tensor, value: float = float("nan")) -> None:
    with torch.no_grad():
        weight[1, 2] = value


@pytest.mark.parametrize(
    "build, weight, name",
    [
        (lambda m: _compile(m, torch.randn(2, 32)), lambda m: m.l2.weight, r"l2 \(Linear\)"),
        (lambda m: _compile(m, torch.randn(2, 5, 8)), lambda m: m.lstm.weight_ih_l1, r"lstm\.weight_ih_l1 \(LSTM\)"),
        (lambda m: _compile(m, torch.randn(2, 5, 8)), lambda m: m.lstm.weight_hh_l0, r"lstm\.weight_hh_l0 \(LSTM\)"),
        (lambda m: compile_lstm(m.lstm), lambda m: m.lstm.weight_hh_l1, r"weight_hh_l1 \(LSTM\)"),
        (
            lambda m: compile_decoder(m.lstm, embedding=torch.nn.Embedding(5, 8), head=m.fc),
            lambda m: m.fc.weight,
            r"head\.weight \(Linear\)",
        ),
    ],
    ids=["linear", "lstm-ih", "lstm-hh", "compile_lstm", "decoder-head"],
)
def test_nan_weight_error_names_the_layer(build, weight, name, capfd):
    """The error names the weight, and TVM's C++ adds nothing to it (no "BlockBuilder destroyed
    with remaining blocks!" from a rewrite the error interrupted)."""
    model = Small() if "l2" in name else Tagger()
    _poisoned(weight(model), float("inf") if "hh" in name else float("nan"))
    with pytest.raises(ValueError, match=rf"^layer {name}: weights contain NaN or Inf$"):
        build(model.eval())
    gc.collect()
    assert "BlockBuilder" not in capfd.readouterr().err


def test_library_with_an_edited_manifest_refuses_to_load(tmp_path):
    path = _compile(Small(), torch.randn(2, 32), bits=4).export(tmp_path / "m.so")
    with open(path, "rb") as f:
        data = f.read()
    manifest = library.read_manifest(str(path))
    assert manifest["checksum"].startswith("sha256:") and pbtvm.load(path)
    claim = json.dumps(manifest["format"], sort_keys=True).encode()
    assert b'"bits": 4' in claim and data.count(b'"bits": 4') == 1
    edited = tmp_path / "edited.so"
    edited.write_bytes(data.replace(b'"bits": 4', b'"bits": 2'))
    with pytest.raises(library.LibraryError, match="checksum mismatch"):
        pbtvm.load(edited)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_products_and_quotients_by_a_constant_zero_match_torch(dtype):
    """TVM's simplifier folded ``y * 0`` to 0 (torch: NaN for a NaN or infinite ``y``; a layer's
    output of a NaN row came back 0), and a constant zero divisor (``y / 0``, ``y // 0.0``,
    ``torch.remainder(y, 0.0)``) stopped compile with an internal "Divide by zero"."""

    class ByZero(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = torch.nn.Linear(6, 6)

        def forward(self, x):
            y = self.l1(x)
            return torch.stack(
                [
                    x * 0,
                    0 * x,
                    x * -0.0,
                    x / 0,
                    x // 0.0,
                    torch.remainder(x, 0.0),
                    torch.div(x, 0.0, rounding_mode="trunc"),
                    y * 0 + x,
                    y / 0,
                ]
            ), torch.stack([y.sum() * 0, 0.0 * y.sum(), y.sum() / 0.0, y.sum() // 0.0])  # 0-d operands

    model = ByZero().eval().to(dtype)
    m = _compile(model, torch.randn(2, 6, dtype=dtype), bits=16, act_bits=16)
    x = torch.tensor(
        [[1.0, float("inf"), float("nan"), -2.0, 0.0, -0.0], [0.5, -1.0, 2.0, 3.0, -4.0, 1.0]], dtype=dtype
    )
    for got, want in zip(m(x), model(x), strict=True):
        want = want.detach()
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
        numbers = ~want.isnan()
        assert torch.equal(torch.signbit(got[numbers]), torch.signbit(want[numbers]))  # signed zeros, infinities


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_float_floor_division_and_remainder_match_torch(dtype):
    """TVM computed float ``a // b`` as ``floor(a / b)`` and ``remainder`` as ``a - floor(a / b) * b``:
    ``1.0 // 0.1`` was 10 (torch 9) and ``remainder(1.0, 0.1)`` -1.5e-8 (torch 0.09999999, the
    divisor's sign), silently. And ``x // 2.0`` of a float16 / bfloat16 / float64 tensor did not
    import (TVM made the number float32); int64 ``torch.div(x, 3, rounding_mode="trunc")`` neither."""

    class Division(torch.nn.Module):
        def forward(self, x, y):
            return torch.stack(
                [
                    x // 0.1,
                    torch.remainder(x, 0.1),
                    x // y,
                    torch.remainder(x, y),
                    torch.div(x, y, rounding_mode="floor"),
                    torch.div(x, 2.0, rounding_mode="trunc"),
                    3.0 // y,
                    0.09997 // y,  # a number first: rounded to the tensor's dtype (torch's rule)
                    0.0 // y,  # a constant zero dividend: NaN for y NaN or 0, the zero's sign
                    torch.remainder(-0.0 * x, y),
                ]
            )

    model = Division().eval()
    values = [1.0, -1.0, 7.0, -7.0, 0.3, 5.5, -0.0, 0.0, float("inf"), float("nan"), 1e-3, -2.5]
    divisors = [0.1, 0.1, -2.0, 2.0, 0.1, -0.5, 3.0, -3.0, 2.0, 1.0, float("inf"), float("-inf")]
    x, y = torch.tensor([values], dtype=dtype), torch.tensor([divisors], dtype=dtype)
    m = _compile(model, x, y)
    got, want = m(x, y), model(x, y)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
    numbers = ~want.isnan()
    assert torch.equal(torch.signbit(got[numbers]), torch.signbit(want[numbers]))  # signed zeros, infinities
    ints = torch.arange(-8, 8)[None]
    m = _compile(_IntDivision(), ints)
    for got, want in zip(m(ints), _IntDivision()(ints), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


class _IntDivision(torch.nn.Module):
    """Integers by integers stay integers; by a float number they are float32 (2.5 was cut to 2, and
    0.5 to a zero divisor)."""

    def forward(self, x):
        return torch.div(x, 3, rounding_mode="trunc") + x // 2, x // 2.5, torch.div(x, 0.5, rounding_mode="trunc")


def test_a_first_row_sliced_from_a_run_time_batch_broadcasts():
    """``y[:1]`` of a run-time batch was typed ``[min(1, batch), 6]``: a binary op with it had a
    broadcast TVM could not decide, and the build failed with "CodeGenVM cannot emit this Relax
    operator directly" (``h - h[:1]``, ``x / y[:1]``, ``torch.remainder(x, y[:1])``)."""

    class FirstRow(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = torch.nn.Linear(6, 6)

        def forward(self, x, y):
            h = self.l1(x)
            return h - h[:1], x / y[:1], torch.remainder(x, y[:1]), x * y[0:1, 2:4].sum(), x - x[-1:]

    torch.manual_seed(3)
    model = FirstRow().eval()
    m = _compile(model, torch.randn(2, 6), torch.randn(2, 6), bits=16, act_bits=16)
    for batch in (1, 3, 5):
        x, y = torch.randn(batch, 6), torch.randn(batch, 6)
        for got, want in zip(m(x, y), model(x, y), strict=True):
            _close(got, want.detach(), rel=1e-3)
