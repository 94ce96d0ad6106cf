"""The smallest run-time sizes an exported program is right for.

``torch.export`` traces a run-time size as a symbol and, where an op's output size would depend on
where the symbol lies, often assumes rather than checks: a slice ``x[:2]`` of a symbolic length is
taken as 2 long (torch assumes slices in bounds, its "size-oblivious" rule), an index ``x[3]`` as
valid, and a ``Dim.AUTO`` size as at least 2. The program (and TVM's import of it: the shapes of
its reshapes come from torch's) is then wrong below that size, where eager torch gives a shorter
slice or raises. :func:`assumed_minimums` finds those assumptions; the compiled model refuses
smaller sizes (:func:`pbtvm.torch_export.input_specs` records them per input dimension).
"""

from __future__ import annotations

from typing import Any

from .torch_import import module_name

#: how far above an assumed size :func:`_smallest_value` looks for the symbol's smallest value
_SEARCH = 1024


def assumed_minimums(exported: Any) -> dict[Any, tuple[int, str]]:
    """Symbol -> (smallest size the program is right for, why) of ``exported``'s run-time sizes.

    Parameters
    ----------
    exported : torch.export.ExportedProgram
        With shape metadata (``node.meta["val"]``) on its nodes.

    Returns
    -------
    dict
        Only symbols whose smallest valid size is above 1: from ``range_constraints`` (a
        ``Dim.AUTO`` size torch kept at least 2) and from slices / indices of a symbolic dimension
        whose traced result assumes the dimension long enough.
    """
    found: dict[Any, tuple[int, str]] = {}

    def need(symbol: Any, size: int, why: str) -> None:
        if size > max(1, found.get(symbol, (1, ""))[0]):
            found[symbol] = (size, why)

    for node in exported.graph.nodes:
        assumed = _assumed_length(node)
        if assumed is None:
            continue
        length, expr, what = assumed
        symbols = getattr(expr, "free_symbols", set())
        if len(symbols) != 1:
            continue  # a size of several run-time sizes: not one input dimension to check
        (symbol,) = symbols
        smallest = _smallest_value(expr, symbol, length)
        if smallest is not None:
            need(symbol, smallest, f"torch.export traced {what} in {module_name(node)} for a length >= {length}")
    # after the slices: a bound torch derived from one of them is said as that slice
    for symbol, bounds in exported.range_constraints.items():
        low = _int(bounds.lower)
        if getattr(symbol, "is_Symbol", False) and low is not None and low > 1:
            need(symbol, low, f"torch.export traced the model for sizes >= {low} there")
    return found


def _assumed_length(node: Any) -> tuple[int, Any, str] | None:
    """(length the traced node assumes its input's dimension has, that dimension's symbolic size,
    the op in words) for a slice or an index with constant bounds of a symbolic dimension."""
    import torch

    if node.op != "call_function" or node.target not in (torch.ops.aten.slice.Tensor, torch.ops.aten.select.int):
        return None
    source = node.args[0]
    value, out = source.meta.get("val") if hasattr(source, "meta") else None, node.meta.get("val")
    if not isinstance(value, torch.Tensor) or not isinstance(out, torch.Tensor):
        return None
    dim = node.args[1] if len(node.args) > 1 else 0
    dim = dim + value.ndim if dim < 0 else dim
    size = value.shape[dim]
    if not isinstance(size, torch.SymInt) or size.node.maybe_as_int() is not None:
        return None
    expr = size.node.expr
    if node.target is torch.ops.aten.select.int:
        index = node.args[2]
        if not isinstance(index, int):
            return None
        return (index + 1 if index >= 0 else -index), expr, f"the index [{index}] of dimension {dim}"
    start, end = (list(node.args[2:4]) + [None, None])[:2]
    step = node.args[4] if len(node.args) > 4 else 1
    out_size = out.shape[dim]
    if isinstance(out_size, torch.SymInt):
        out_size = out_size.node.maybe_as_int()
    if out_size is None or not isinstance(start, int | None) or not isinstance(end, int | None):
        return None  # a length that follows the input's: right at every size
    start = start or 0
    covered = (out_size - 1) * step + 1 if out_size > 0 else 0
    length = start + covered if start >= 0 else max(-start, covered)
    if isinstance(end, int) and end < 0:
        length = max(length, -end + covered)
    shown = f"[{'' if not start else start}:{'' if end is None else end}{'' if step == 1 else f':{step}'}]"
    return length, expr, f"the slice {shown} of dimension {dim} ({out_size} long)"


def _smallest_value(expr: Any, symbol: Any, length: int) -> int | None:
    """The smallest value >= 1 of ``symbol`` for which ``expr`` is at least ``length`` (``expr``
    grows with it: a size), None if that is 1 or beyond the search."""
    for value in range(1, length + _SEARCH):
        at = _int(expr.subs(symbol, value))
        if at is None:
            return None
        if at >= length:
            return value if value > 1 else None
    return None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):  # infinite, or not a number
        return None


__all__ = ["assumed_minimums"]
