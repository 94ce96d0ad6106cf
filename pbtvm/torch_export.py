"""``torch.export`` of a model with the dimensions pbtvm keeps at run time, and the input specs.

Plain models: dimension 0 (the batch) is dynamic. Models with ``nn.LSTM`` layers (exported with
:func:`pbtvm.recurrent.lstm_stand_ins`): every dimension the model leaves free (sequence length,
batch) is dynamic, the others (feature sizes) static.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import sys
import traceback
import warnings
from typing import Any

from .errors import InputError
from .user_frame import user_stacklevel


def export_program(model: Any, example_inputs: tuple, dynamic_batch: bool, recurrent_dims: bool) -> tuple[Any, bool]:
    """``torch.export`` with a dynamic batch (dimension 0) if possible; returns (program, dynamic).

    An input whose example has size 1 in dimension 0 while another's is larger is taken as broadcast
    over the batch, and keeps size 1 there.

    With ``recurrent_dims`` (the model has LSTMs) every dimension of every input may stay
    dynamic (``Dim.AUTO``: torch keeps symbolic what the model allows, e.g. sequence length and
    batch, and fixes the rest, e.g. feature sizes); example dimensions of size 1 are fixed.
    """
    import torch

    why_static = None
    if dynamic_batch:
        try:
            with _no_partial_graph_print():
                if recurrent_dims:
                    with _quiet_size_one_log():
                        return _export_free_dims(model, example_inputs), True
                return _export_dynamic_batch(model, example_inputs), True
        except Exception as err:
            if str(err).startswith("pbtvm.compile:"):  # an unsupported LSTM (recurrent.check_lstm)
                raise
            why_static = _export_reason(err)
    try:
        with _no_partial_graph_print():
            program = torch.export.export(model, example_inputs)
    except Exception as err:
        if str(err).startswith("pbtvm.compile:"):
            raise
        raise InputError(f"torch.export cannot trace the model: {_export_reason(err)}{_export_advice(err)}") from err
    if why_static is not None:
        what = "batch and sequence dimensions" if recurrent_dims else "batch dimension (dimension 0 of every input)"
        warnings.warn(
            f"pbtvm: the {what} could not be made dynamic ({why_static}); "
            "the model is compiled for the example's sizes only",
            stacklevel=user_stacklevel(),  # the user's compile / tune call
        )
    return program, False


def _export_dynamic_batch(model: Any, example_inputs: tuple) -> Any:
    """``torch.export`` with dimension 0 of the inputs dynamic (one symbol for all of them)."""
    import torch

    batch = torch.export.Dim("batch", min=1)
    # An input of size 1 in dimension 0 beside a larger batch is broadcast over the batch
    # (HF-style position_ids of shape [1, S]): its dimension 0 stays 1.
    largest = max(x.shape[0] for x in example_inputs)
    shared = [x.shape[0] > 1 or largest == 1 for x in example_inputs]
    if not all(shared):
        fixed = ", ".join(str(i) for i, s in enumerate(shared) if not s)
        warnings.warn(
            f"pbtvm: input(s) {fixed} have size 1 in dimension 0 beside a batch of {largest}: taken as "
            "broadcast over the batch (e.g. position_ids of [1, S]), they keep size 1 there; give "
            "examples of one batch size if dimension 0 is their batch",
            stacklevel=user_stacklevel(),
        )
    shapes = tuple({0: batch} if s else None for s in shared)
    # torch.export specialises size-1 dimensions; trace with a batch of 2 instead.
    traced = tuple(
        torch.cat([x, x]) if s and x.shape[0] == 1 else x for x, s in zip(example_inputs, shared, strict=True)
    )
    return torch.export.export(model, traced, dynamic_shapes=by_signature(model, shapes))


def _causes(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions its traceback shows it raised from or while handling
    (``__cause__``, an unsuppressed ``__context__``), outermost first: torch.export re-raises some
    failures wrapped."""
    chain: list[BaseException] = []
    while err is not None and all(err is not seen for seen in chain):
        chain.append(err)
        err = err.__cause__ if err.__cause__ is not None or err.__suppress_context__ else err.__context__
    return chain


def _export_advice(err: Exception) -> str:
    """What to change in the model for a ``torch.export`` failure pbtvm recognises, else a pointer."""
    chain = _causes(err)
    text = " ".join(f"{type(e).__name__}: {e}" for e in chain).lower()
    frames = {frame.f_code.co_name for e in chain for frame, _ in traceback.walk_tb(e.__traceback__)}
    if "_detect_is_causal_mask" in frames:
        return (
            "; torch's nn.Transformer* layers compare a mask given without is_causal with a causal mask (its "
            "values: not traceable): pass is_causal=True (a decoder: tgt_is_causal=True) with a causal mask, "
            "is_causal=False with any other"
        )
    if "inference tensor" in text:
        return (
            "; the model's parameters or buffers were made in torch.inference_mode, which torch.export cannot "
            "trace: build or load the model outside inference_mode (or clone its tensors there)"
        )
    if "datadependent" in text or "data-dependent" in text:
        return (
            "; a Python condition or a size depends on a tensor's values (if x.sum() > 0, .item(), "
            "x.nonzero()): compute both branches and choose with torch.where, or use torch.cond"
        )
    return "; pbtvm compiles what torch.export can trace (see torch.export's documentation of what it supports)"


#: torch's loggers that report a failed trace as it fails (``fake_tensor``: the traceback of the
#: failing op's meta function; ``symbolic_shapes``: "Unable to find user code ..."): pbtvm names the
#: failure itself, or falls back from it.
_TRACE_FAILURE_LOGS = ("torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes")


@contextlib.contextmanager
def _no_partial_graph_print() -> Any:
    """Inside, what is written to ``sys.stderr`` is held and written out after the block, except
    the partial graph that ``torch.export`` prints when a trace fails (hundreds of lines before
    its error, also for a first try pbtvm falls back from; pbtvm reports the failure itself);
    torch's loggers of :data:`_TRACE_FAILURE_LOGS` log only critical records."""
    held = io.StringIO()
    real = sys.stderr
    graph = None
    loggers = [logging.getLogger(name) for name in _TRACE_FAILURE_LOGS]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException as err:  # Ctrl-C too: what was held is written all the same
        graph = getattr(err, "partial_fx_graph", None)
        raise
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)
        text = held.getvalue()
        real.write(text.replace(f"{graph}\n", "") if graph else text)  # torch prints it once per wrapper


def by_signature(model: Any, shapes: tuple) -> tuple:
    """``shapes`` (one entry per example input) in the structure of ``model.forward``'s parameters,
    as ``torch.export`` wants ``dynamic_shapes``: the inputs a ``*args`` parameter takes as one
    tuple (``forward(self, x, *rest)``: ``(s0, (s1, s2))``). Unchanged without ``*args``, or when
    the example gives it nothing (the inputs all go to the parameters before it)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin): as given
        return shapes
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for n, p in enumerate(params):
        if p.kind is p.VAR_POSITIONAL:
            return shapes if len(shapes) <= n else (*shapes[:n], tuple(shapes[n:]))
        if p.kind not in positional:
            break
    return shapes


def _export_reason(err: Exception) -> str:
    """The line of torch.export's error that says why: its first listed violation (``- You marked
    batch as dynamic but your code specialized it to be a constant (6)...``), else its first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    listed = [line[2:] for line in lines if line.startswith("- ")]
    reason = (listed or lines or [""])[0]
    reason = reason.split(". If you're using", 1)[0]  # drop torch's advice on its own API
    return f"{type(err).__name__}: {reason}" if reason else type(err).__name__


@contextlib.contextmanager
def _quiet_size_one_log():
    """torch logs a warning for every size-1 dimension that ``Dim.AUTO`` fixes (e.g. the state of
    a one-layer LSTM); pbtvm warns itself where it matters (an LSTM's length or batch)."""
    torch_log = logging.getLogger("torch._export.non_strict_utils")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        torch_log.setLevel(level)


def _export_free_dims(model: Any, example_inputs: tuple) -> Any:
    """``torch.export`` with every dimension the model leaves free dynamic down to size 1.

    A first export with ``Dim.AUTO`` everywhere tells which dimensions the model fixes (feature
    sizes; TVM's importer would keep those symbolic too, so the real export marks them static) and
    which free ones are one size (a batch shared by the tokens and an initial state). ``Dim.AUTO``
    traces as if every free size were at least 2 (torch specialises 0 and 1), so a program whose
    graph depends on it (``y[:2]`` of a length) is wrong at size 1: the real export declares each
    free size ``Dim(min=1)``. Where torch refuses that (the model branches on a size being 1), the
    ``Dim.AUTO`` program is kept: its sizes' lower bounds (2) are in its ``range_constraints``, which
    :func:`input_specs` records and the compiled model checks.
    """
    import torch

    auto = torch.export.Dim.AUTO
    every = tuple({d: auto for d in range(x.ndim)} for x in example_inputs)
    probe = torch.export.export(model, example_inputs, dynamic_shapes=by_signature(model, every))
    shapes = _user_input_shapes(probe)
    free = tuple({d: auto for d, size in enumerate(shape) if _symbolic(size)} or None for shape in shapes)
    named = _dims_from_one(shapes)
    while named is not None:
        try:
            return torch.export.export(model, example_inputs, dynamic_shapes=by_signature(model, named))
        except Exception as err:  # torch refuses size 1 for a dimension: that one as Dim.AUTO
            named = _without_refused(named, str(err))
    return torch.export.export(model, example_inputs, dynamic_shapes=by_signature(model, free))


def _without_refused(shapes: tuple, error: str) -> tuple | None:
    """``shapes`` with ``Dim.AUTO`` for the ``Dim`` s torch's ``error`` names (``Constraints
    violated (n0)!``); None if it names none of them (then every free size is ``Dim.AUTO``)."""
    import re

    import torch

    refused = set(re.findall(r"\b(n\d+)\b", error.split("\n", 1)[0]))
    relaxed, changed = [], False
    for entry in shapes:
        if entry is None:
            relaxed.append(None)
            continue
        kept = {}
        for d, dim in entry.items():
            named = dim is not torch.export.Dim.AUTO and getattr(dim, "__name__", None) in refused
            kept[d] = torch.export.Dim.AUTO if named else dim
            changed = changed or named
        relaxed.append(kept)
    return tuple(relaxed) if changed else None


def _dims_from_one(shapes: list) -> tuple | None:
    """``dynamic_shapes`` with one ``Dim(min=1)`` per symbol of a probe export's input ``shapes``
    (dimensions with one symbol share it); None where a size is an expression of symbols (torch
    relates them: only ``Dim.AUTO`` keeps the relation)."""
    import torch

    dims: dict[Any, Any] = {}
    out = []
    for shape in shapes:
        entry = {}
        for d, size in enumerate(shape):
            if not _symbolic(size):
                continue
            expr = size.node.expr
            if not expr.is_Symbol:
                return None
            if expr not in dims:
                dims[expr] = torch.export.Dim(f"n{len(dims)}", min=1)
            entry[d] = dims[expr]
        out.append(entry or None)
    return tuple(out)


def _symbolic(size: Any) -> bool:
    import torch

    return isinstance(size, torch.SymInt) and size.node.maybe_as_int() is None


def _user_input_shapes(exported: Any) -> list:
    names = [s.arg.name for s in exported.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    nodes = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
    return [nodes[name].meta["val"].shape for name in names]


def input_specs(exported: Any, example_inputs: tuple, batch_only: bool = True) -> list[dict]:
    """dtype and shape of each user input, None for a dimension the exported program keeps symbolic.

    Where an input has symbolic dimensions, ``dims`` names each one's symbol (None for static
    ones): dimensions with one symbol must be equal at run time (e.g. the batch of the tokens
    and of an initial state). ``batch_only``: the export kept only the batch (dimension 0)
    symbolic, and the symbol is named ``"batch"``; else torch's names (``s13``, ...).

    Where the program is right only for some sizes (:func:`pbtvm.size_bounds.assumed_conditions`):
    ``min`` holds the smallest size per dimension (None elsewhere) and ``min_why`` says why; a
    condition over several sizes is recorded in ``conditions`` of the first input it involves
    (``terms``: see :func:`pbtvm.size_bounds.polynomial_terms`, ``shown``, ``why``).
    """
    names = [s.arg.name for s in exported.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    shapes = _user_input_shapes(exported)
    where: dict[Any, tuple[int, int]] = {}
    for i, shape in enumerate(shapes):
        for d, size in enumerate(shape):
            if _symbolic(size) and size.node.expr.is_Symbol:
                where.setdefault(size.node.expr, (i, d))
    minimums, conditions = _size_conditions(exported, where, names)
    specs = []
    for name, shape, x in zip(names, shapes, example_inputs, strict=True):
        spec = {
            "name": name,  # the forward's parameter name: the compiled model takes the input by it too
            "dtype": str(x.dtype).replace("torch.", ""),
            "shape": [None if _symbolic(d) else int(d) for d in shape],
        }
        if None in spec["shape"]:
            spec["dims"] = [("batch" if batch_only else str(d)) if _symbolic(d) else None for d in shape]
            bounds = [minimums.get(d.node.expr) if _symbolic(d) else None for d in shape]
            if any(bounds):
                spec["min"] = [b and b[0] for b in bounds]
                spec["min_why"] = [b and b[1] for b in bounds]
        specs.append(spec)
    for first, condition in conditions:
        specs[first].setdefault("conditions", []).append(condition)
    return specs


def _size_conditions(exported: Any, where: dict, names: list[str]) -> tuple[dict, list]:
    """The program's size conditions (:func:`pbtvm.size_bounds.assumed_conditions`) as input
    checks: {symbol: (smallest size, why)} for lower bounds of one size, [(first input,
    condition)] for polynomials over input sizes (several sizes, upper bounds); the others are
    named in a warning (not checked)."""
    import sympy

    from .size_bounds import assumed_conditions, polynomial_terms, smallest_value

    minimums: dict[Any, tuple[int, str]] = {}
    conditions, unchecked = [], []
    shown = {s: sympy.Symbol(f"{names[i]}.shape[{d}]") for s, (i, d) in where.items()}
    for expr, why in assumed_conditions(exported, shown):
        symbols = expr.free_symbols
        if len(symbols) == 1 and next(iter(symbols)) in where:
            (symbol,) = symbols
            least = smallest_value(expr, symbol)
            if least is not None:  # a lower bound: the smallest size, per dimension
                if least > minimums.get(symbol, (1, ""))[0]:
                    minimums[symbol] = (least, why)
                continue
        terms = polynomial_terms(expr, where)
        text = f"{expr.subs(shown)} >= 0"
        if terms is None:
            unchecked.append(f"{text} ({why})")
            continue
        first = min(where[s][0] for s in symbols)
        conditions.append((first, {"terms": terms, "shown": text, "why": why}))
    if unchecked:
        warnings.warn(
            f"pbtvm: the compiled model is right only where {'; '.join(unchecked)}, which it cannot check at run "
            "time: keep to those sizes",
            stacklevel=user_stacklevel(),
        )
    return minimums, conditions


__all__ = ["export_program", "input_specs"]
