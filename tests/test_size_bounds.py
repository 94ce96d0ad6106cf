"""Run-time sizes below what torch.export assumed are refused, not run wrong.

torch.export takes a slice ``x[:2]`` of a run-time size as 2 long (its "size-oblivious" rule) and
an LSTM model's ``Dim.AUTO`` sizes as at least 2; the shapes of the reshapes after them come from
those assumptions, so at size 1 the compiled model returned 2 rows where torch returns 1.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import pbtvm
from pbtvm.cli import main
from pbtvm.errors import InputError
from pbtvm.size_bounds import _node_conditions


def _compiled(model, example, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = pbtvm.compile(model.eval(), (example,), bits=16, act_bits=16, **kw)
    return compiled, [str(w.message) for w in caught if str(w.message).startswith("pbtvm: dimension")]


def _same(compiled, model, x):
    with torch.no_grad():
        want = model(x)
    got = compiled(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3)


class _FirstRows(torch.nn.Module):
    """A layer over the first two rows of a 3-D batch (the layer's reshape takes torch's shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.lin(x[:2])


def test_a_slice_of_the_batch_is_refused_below_its_length(tmp_path, capsys):
    torch.manual_seed(0)
    model = _FirstRows().eval()
    compiled, said = _compiled(model, torch.randn(4, 3, 6))
    assert said == [
        "pbtvm: dimension 0 of input 0 (x) is a run-time size from 2 up, not from 1: torch.export traced the "
        "slice [:2] of dimension 0 (2 long) in <model> (_FirstRows); the compiled model refuses smaller sizes"
    ]
    for batch in (2, 5):
        _same(compiled, model, torch.randn(batch, 3, 6))
    with pytest.raises(InputError, match=r"input 0 has size 1 in dimension 0; the compiled model takes 2 or more"):
        compiled(torch.randn(1, 3, 6))  # returned 2 rows (torch: 1)
    compiled.export(tmp_path / "m.so")
    loaded = pbtvm.load(tmp_path / "m.so")
    with pytest.raises(InputError, match="takes 2 or more"):
        loaded(torch.randn(1, 3, 6))
    _same(loaded, model, torch.randn(3, 3, 6))
    assert main(["inspect", str(tmp_path / "m.so")]) == 0
    assert "  sizes    input 0 dimension 0 (batch) from 2 up (smaller ones refused)\n" in capsys.readouterr().out


class _LstmThen(torch.nn.Module):
    """An LSTM, then ``after(y)`` of its output ``y``, then a layer."""

    def __init__(self, after=lambda y: y) -> None:
        super().__init__()
        self.rnn = torch.nn.LSTM(6, 8)
        self.lin = torch.nn.Linear(8, 4)
        self.after = after

    def forward(self, x):
        return self.lin(self.after(self.rnn(x)[0]))


def test_lstm_models_run_from_size_one_unless_a_slice_needs_more():
    """Every free size was exported ``Dim.AUTO`` (at least 2): now ``Dim(min=1)``, so a model
    without assumptions records none, and ``lin(y[:2])`` needs a length of 2, not a batch of 2."""
    torch.manual_seed(0)
    plain = _LstmThen().eval()
    compiled, said = _compiled(plain, torch.randn(5, 3, 6))
    assert said == [] and "min" not in compiled.manifest["inputs"][0]
    for steps, batch in ((1, 1), (1, 3), (4, 1)):
        _same(compiled, plain, torch.randn(steps, batch, 6))

    sliced = _LstmThen(lambda y: y[:2]).eval()
    compiled, said = _compiled(sliced, torch.randn(5, 3, 6))
    assert len(said) == 1 and "dimension 0 of input 0 (x) is a run-time size from 2 up" in said[0]
    assert compiled.manifest["inputs"][0]["min"] == [2, None, None]
    for steps, batch in ((2, 1), (5, 3)):
        _same(compiled, sliced, torch.randn(steps, batch, 6))
    with pytest.raises(InputError, match="size 1 in dimension 0; the compiled model takes 2 or more"):
        compiled(torch.randn(1, 2, 6))


class _BranchOnLength(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.LSTM(6, 8)

    def forward(self, x):
        y = self.rnn(x)[0]
        if y.shape[0] > 1:  # torch.export refuses Dim(min=1) for the length: it stays Dim.AUTO (>= 2)
            y = y[1:] - y[:-1]
        return y


def test_a_size_torch_export_keeps_at_two_is_refused_at_one_and_the_others_stay_free():
    torch.manual_seed(0)
    model = _BranchOnLength().eval()
    compiled, said = _compiled(model, torch.randn(5, 3, 6))
    assert said == [
        "pbtvm: dimension 0 of input 0 (x) is a run-time size from 2 up, not from 1: torch.export traced the "
        "model for sizes >= 2 there; the compiled model refuses smaller sizes"
    ]
    for steps, batch in ((2, 1), (3, 4)):
        _same(compiled, model, torch.randn(steps, batch, 6))
    with pytest.raises(InputError, match="size 1 in dimension 0"):
        compiled(torch.randn(1, 1, 6))  # torch: the branch not taken; the program always takes it


class _LastTwo(torch.nn.Module):
    """The slice's start written with the size: still 2 long in torch's program (a review)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.lin(x[x.shape[0] - 2 :])


class _TopTwo(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.lin(x.topk(2, dim=0).values)


@pytest.mark.parametrize("model", [_LastTwo, _TopTwo])
def test_a_slice_from_the_size_and_topk_are_refused_below_their_length(model):
    """``x[n - 2:]`` returned 2 rows at batch 1 (torch: 1); ``topk(2)`` of a batch of 1 crashed
    the process (torch raises)."""
    torch.manual_seed(0)
    module = model().eval()
    compiled, said = _compiled(module, torch.randn(4, 3, 6))
    assert len(said) == 1 and "from 2 up" in said[0]
    _same(compiled, module, torch.randn(3, 3, 6))
    with pytest.raises(InputError, match="size 1 in dimension 0; the compiled model takes 2 or more"):
        compiled(torch.randn(1, 3, 6))


class _Picked(torch.nn.Module):
    """Rows picked by constant indices: torch raises an IndexError where the batch lacks them,
    the compiled program clipped them (a review)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("rows", torch.tensor([0, 2]))
        self.lin = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.lin(x[[0, 1]] + x.index_select(0, self.rows))


def test_constant_indices_are_refused_where_the_batch_lacks_them():
    torch.manual_seed(0)
    model = _Picked().eval()
    compiled, said = _compiled(model, torch.randn(4, 6))
    assert len(said) == 1 and "from 3 up" in said[0] and "constant indices [0..2] of dimension 0" in said[0]
    _same(compiled, model, torch.randn(3, 6))
    with pytest.raises(InputError, match="size 2 in dimension 0; the compiled model takes 3 or more"):
        compiled(torch.randn(2, 6))


@pytest.mark.parametrize(
    ("flat", "wrong", "right", "shown"),
    [
        (False, [(1, 3), (3, 5)], [(3, 3), (5, 2), (1, 1)], r"x\.shape\[0\] - x\.shape\[1\] >= 0"),
        (True, [(1, 1), (1, 2), (2, 1)], [(3, 1), (1, 3), (2, 2)], r"x\.shape\[0\]\*x\.shape\[1\] - 3 >= 0"),
    ],
)
def test_relations_between_run_time_sizes_are_checked(flat, wrong, right, shown):
    """Slices of an LSTM's output by another run-time size: torch assumes ``B <= T`` (``[:B]``)
    and ``T * B >= 3`` (``flatten(0, 1)[:3]``), relations a smallest size per dimension cannot hold."""
    torch.manual_seed(0)
    after = (lambda y: y.flatten(0, 1)[:3].unsqueeze(1)) if flat else (lambda y: y[: y.shape[1]])
    model = _LstmThen(after).eval()
    compiled, _ = _compiled(model, torch.randn(5, 3, 6))
    for steps, batch in right:
        _same(compiled, model, torch.randn(steps, batch, 6))
    assert compiled.manifest["inputs"][0]["conditions"][0]["shown"] == shown.replace("\\", "")
    for steps, batch in wrong:  # returned the traced length (torch: shorter)
        with pytest.raises(InputError, match=rf"shapes \({steps}, {batch}, 6\) break {shown}: torch.export traced"):
            compiled(torch.randn(steps, batch, 6))


def test_a_start_counted_from_the_end_by_another_size_is_checked():
    """``y[-B:]`` of an LSTM's output: a start negative at every size, counted from the end (a
    review: no condition was recorded, and (T, B) = (5, 6) returned 6 rows of 5). Written twice:
    one condition, said once."""
    torch.manual_seed(0)
    model = _LstmThen(lambda y: y[-y.shape[1] :] + y[-y.shape[1] :]).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = pbtvm.compile(model, (torch.randn(5, 3, 6),), bits=16, act_bits=16)
    said = [str(w.message) for w in caught if "x.shape[0] - x.shape[1] >= 0" in str(w.message)]
    assert len(said) == 1 and len(compiled.manifest["inputs"][0]["conditions"]) == 1
    for steps, batch in ((5, 3), (2, 1), (4, 4)):
        _same(compiled, model, torch.randn(steps, batch, 6))
    with pytest.raises(InputError, match=r"shapes \(5, 6, 6\) break x\.shape\[0\] - x\.shape\[1\] >= 0"):
        compiled(torch.randn(5, 6, 6))


class _Sliced(torch.nn.Module):
    def __init__(self, index) -> None:
        super().__init__()
        self.index = index

    def forward(self, x):
        return x[self.index] * 2


@pytest.mark.parametrize(
    ("index", "least"),
    [
        (slice(None, 2), 2),
        (slice(1, 3), 3),
        (slice(-3, -1), 3),
        (slice(-2, None), 2),
        (slice(None, 4, 2), 3),
        (2, 3),
        (-2, 2),
        (slice(None, -1), None),  # follows the length: right at every size
        (slice(1, None), None),
        (-1, None),
    ],
)
def test_the_length_each_slice_and_index_assumes(index, least):
    from pbtvm.size_bounds import _always_holds, smallest_value

    program = torch.export.export(_Sliced(index), (torch.randn(6, 2),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    found = [expr for node in program.graph.nodes for expr, _ in _node_conditions(node, {})]
    found = [expr for expr in found if getattr(expr, "free_symbols", None) and not _always_holds(expr)]
    lengths = [smallest_value(expr, *expr.free_symbols) for expr in found]
    assert lengths == ([] if least is None else [least])


def test_ordinary_models_say_nothing_about_sizes():
    """``run_decompositions`` leaves symbols of its own tracing in ``range_constraints`` (sizes
    >= 2 no input has): they were warned as unchecked conditions on every plain MLP."""
    mlp = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5)).eval()
    for model, example in ((mlp, torch.randn(2, 40)), (_LstmThen(), torch.randn(5, 3, 6))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = pbtvm.compile(model.eval(), (example,), bits=8)
        assert not [w for w in caught if "size" in str(w.message) or "right only where" in str(w.message)]
        assert not {"min", "conditions"} & set(compiled.manifest["inputs"][0])
