"""The run-time sizes an exported program is right for.

``torch.export`` traces a run-time size as a symbol and, where an op's output size would depend on
where the symbol lies, often assumes rather than checks: a slice ``x[:2]`` of a symbolic length is
taken as 2 long (torch assumes slices in bounds, its "size-oblivious" rule), ``y[:x.shape[1]]`` as
``x.shape[1]`` long, an index ``x[3]`` or ``topk(k)`` as valid, and a ``Dim.AUTO`` size as at least
2. The program (and TVM's import of it: the shapes of its reshapes come from torch's) is then
wrong where the assumption fails, where eager torch gives a shorter slice or raises.
:func:`assumed_conditions` finds those assumptions as conditions ``expr >= 0`` on the symbols;
:func:`pbtvm.torch_export.input_specs` records them on the inputs (a smallest size ``min`` per
dimension where one size decides, a polynomial over several inputs' sizes otherwise) and the
compiled model refuses sizes that break them.
"""

from __future__ import annotations

from typing import Any

#: how far :func:`smallest_value` looks for a symbol's smallest valid value
_SEARCH = 1024

#: the sizes a condition over several symbols is tried at before it is kept (never broken there:
#: it holds for every size, e.g. the length of ``y[::2]``)
_GRID = (1, 2, 3, 4, 5, 7, 8, 16, 33, 1000, 10**6)


def assumed_conditions(exported: Any, names: dict | None = None) -> list[tuple[Any, str]]:
    """(``expr``, why) for each condition ``expr >= 0`` on run-time sizes ``exported`` relies on.

    Parameters
    ----------
    exported : torch.export.ExportedProgram
        With shape metadata (``node.meta["val"]``) on its nodes.
    names : dict, optional
        sympy symbol -> a sympy symbol to show it as in the sentences (``x.shape[0]``).

    Returns
    -------
    list
        sympy expressions over the program's size symbols, each with a sentence for the user;
        from slices, indices and ``topk`` of symbolic dimensions, then ``range_constraints``
        (a ``Dim.AUTO`` size torch kept at least 2).
    """
    from .torch_import import module_name

    found = []
    for node in exported.graph.nodes:
        try:
            listed = _node_conditions(node, names or {}) + _index_conditions(node, exported)
        except TypeError:  # a bound that is not a size (a tensor's value): nothing torch assumed of a size
            listed = []
        for expr, what in listed:
            if getattr(expr, "free_symbols", None) and not _always_holds(expr):
                found.append((expr, f"torch.export traced {what} in {module_name(node)}"))
    inputs = _input_symbols(exported)
    for symbol, bounds in exported.range_constraints.items():
        if symbol not in inputs:  # run_decompositions leaves its own tracing's symbols there
            continue
        low, high = _int(bounds.lower), _int(bounds.upper)
        if getattr(symbol, "is_Symbol", False) and low is not None and low > 1:
            found.append((symbol - low, f"torch.export traced the model for sizes >= {low} there"))
        if getattr(symbol, "is_Symbol", False) and high is not None and high < 2**62:
            found.append((high - symbol, f"torch.export traced the model for sizes <= {high} there"))
    unique = {}
    for expr, why in found:  # one op used twice, or a bound torch derived from one: said once
        unique.setdefault(str(expr), (expr, why))
    return list(unique.values())


def _input_symbols(exported: Any) -> set:
    """The size symbols of the program's inputs' shapes."""
    import torch

    found = set()
    for node in exported.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        for size in value.shape if isinstance(value, torch.Tensor) else ():
            found |= getattr(_expr(size), "free_symbols", set())
    return found


def _node_conditions(node: Any, names: dict) -> list[tuple[Any, str]]:
    """The conditions (``expr >= 0``) under which a slice / index / topk node's traced output
    shape is its real one."""
    import torch

    aten = torch.ops.aten
    if node.op != "call_function" or node.target not in (aten.slice.Tensor, aten.select.int, aten.topk.default):
        return []
    source, out = node.args[0], node.meta.get("val")
    value = source.meta.get("val") if hasattr(source, "meta") else None
    if node.target is aten.topk.default:
        out = out[0] if isinstance(out, tuple | list) and out else out
    if not isinstance(value, torch.Tensor) or not isinstance(out, torch.Tensor):
        return []
    if node.target is aten.topk.default:
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
    else:
        dim = node.args[1] if len(node.args) > 1 else 0
    dim = dim + value.ndim if dim < 0 else dim
    size = _expr(value.shape[dim])
    if isinstance(size, int):
        return []
    if node.target is aten.topk.default:
        k = _expr(node.args[1])
        return [(size - k, f"topk({_text(k, names)}) of dimension {dim}")]
    if node.target is aten.select.int:
        index = _expr(node.args[2])
        if isinstance(index, int) and index < 0:
            return [(size + index, f"the index [{index}] of dimension {dim}")]
        return [(size - index - 1, f"the index [{_text(index, names)}] of dimension {dim}")]
    start, end = (list(node.args[2:4]) + [None, None])[:2]
    step = node.args[4] if len(node.args) > 4 else 1
    start, end, length = _expr(start) or 0, _expr(end), _expr(out.shape[dim])
    if not isinstance(step, int) or step < 1 or (isinstance(length, int) and length < 1):
        return []  # a run-time step, or an empty slice: nothing read
    if isinstance(end, int) and end >= 2**62:
        end = None  # x[a:] (torch writes the end as the largest int64)
    start = size + start if _negative(start) else start
    end = size + end if end is not None and _negative(end) else end
    bounds = f"{_text(start, names, 0)}:{'' if end is None else _text(end, names)}{'' if step == 1 else f':{step}'}"
    shown = f"the slice [{bounds}] of dimension {dim} ({_text(length, names)} long)"
    if _same(length, size):  # taken whole: right where the bounds cover the dimension
        conditions = [(-start, shown)] if not _same(start, 0) else []
        return conditions + ([(end - size, shown)] if end is not None else [])
    covered = (length - 1) * step + 1
    return [(start, shown), (size - start - covered, shown)]


def _index_conditions(node: Any, exported: Any) -> list[tuple[Any, str]]:
    """``x[[0, 1]]`` / ``index_select`` of a symbolic dimension by constant indices: valid where
    the dimension holds the largest (and the most negative) of them; eager torch raises below,
    the compiled program would clip them. (A constant ``gather`` index is not checked: clipped.)"""
    import torch

    aten = torch.ops.aten
    if node.op != "call_function" or node.target not in (aten.index.Tensor, aten.index_select.default):
        return []
    value = node.args[0].meta.get("val") if hasattr(node.args[0], "meta") else None
    if not isinstance(value, torch.Tensor):
        return []
    if node.target is aten.index.Tensor:
        by_dim, dim = [], 0
        for index in node.args[1]:  # a boolean mask spans as many dimensions as it has
            mask = index is not None and getattr(index.meta.get("val"), "dtype", None) in (torch.bool, torch.uint8)
            by_dim.append((dim, None if mask else index))
            dim += index.meta["val"].ndim if mask else 1
    else:
        by_dim = [(node.args[1] + value.ndim if node.args[1] < 0 else node.args[1], node.args[2])]
    conditions = []
    for dim, index in by_dim:
        size = _expr(value.shape[dim]) if index is not None else 0
        values = _constant(index, exported) if not isinstance(size, int) else None
        if values is None or values.numel() == 0 or values.dtype in (torch.bool, torch.uint8):
            continue
        low, high = int(values.min()), int(values.max())
        shown = f"the constant indices [{low}..{high}] of dimension {dim}"
        conditions += [(size - high - 1, shown)] + ([(size + low, shown)] if low < 0 else [])
    return conditions


def _constant(node: Any, exported: Any) -> Any:
    """The tensor a graph node holds when it is a constant or a buffer of the program (through
    copies), else None."""
    import torch

    copies = (torch.ops.aten.lift_fresh_copy.default, torch.ops.aten.clone.default, torch.ops.aten._to_copy.default)
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in copies:
        node = node.args[0]
    if not isinstance(node, torch.fx.Node) or node.op != "placeholder":
        return None
    signature = exported.graph_signature
    name = signature.inputs_to_lifted_tensor_constants.get(node.name) or signature.inputs_to_buffers.get(node.name)
    held = exported.constants.get(name) if name in exported.constants else exported.state_dict.get(name)
    return held if isinstance(held, torch.Tensor) else None


def _expr(value: Any) -> Any:
    """A size (an int, a SymInt, or the graph node computing one) as an int, or the sympy
    expression of a symbolic one; None stays None."""
    import torch

    if isinstance(value, torch.fx.Node):  # a size computed in the graph (x.shape[0] - 2)
        value = value.meta.get("val")
    if isinstance(value, torch.SymInt):
        known = value.node.maybe_as_int()
        return known if known is not None else value.node.expr
    return value


def _negative(value: Any) -> bool:
    """Whether a slice bound counts from the end: a negative int, or an expression negative at
    every size tried (``-x.shape[1]``)."""
    if isinstance(value, int):
        return value < 0
    return bool(getattr(value, "free_symbols", None)) and _always_holds(-value - 1)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a - b == 0)
    except TypeError:
        return False


def _text(value: Any, names: dict, hidden: Any = None) -> str:
    """``value`` as the user wrote it: symbols by ``names``, ``hidden`` (a default bound) as ''."""
    if hidden is not None and _same(value, hidden):
        return ""
    return str(value.subs(names)) if hasattr(value, "subs") else str(value)


def _always_holds(expr: Any) -> bool:
    """Whether ``expr >= 0`` at every size the grid tries (every symbol at each of :data:`_GRID`
    in turn, the others at 1 and at the same size)."""
    symbols = sorted(expr.free_symbols, key=str)
    for size in _GRID:
        for fixed in (1, size):
            for symbol in symbols:
                at = _int(expr.subs({s: (size if s == symbol else fixed) for s in symbols}))
                if at is None or at < 0:
                    return False
    return True


def smallest_value(expr: Any, symbol: Any) -> int | None:
    """The smallest value >= 1 of ``symbol`` from which ``expr >= 0`` holds (``expr`` grows with
    it: a length), None if the search finds none (then it is no lower bound: an upper one, or a
    condition that holds nowhere)."""
    for value in range(1, _SEARCH):
        at = _int(expr.subs(symbol, value))
        if at is None:
            return None
        if at >= 0:
            return value if all((_int(expr.subs(symbol, v)) or 0) >= 0 for v in _GRID if v > value) else None
    return None


def polynomial_terms(expr: Any, where: dict) -> list | None:
    """``expr`` as ``[[coefficient, [[input, dim], ...]], ...]`` (a sum of integer multiples of
    products of input sizes; ``where`` maps each symbol to its ``(input, dim)``), None where it is
    not such a polynomial."""
    import sympy

    symbols = sorted(expr.free_symbols, key=str)
    if any(s not in where for s in symbols):
        return None
    try:
        poly = sympy.Poly(sympy.expand(expr), *symbols)
    except sympy.PolynomialError:
        return None
    terms = []
    for powers, coefficient in poly.terms():
        if not coefficient.is_Integer:
            return None
        dims = [list(where[s]) for s, p in zip(symbols, powers, strict=True) for _ in range(p)]
        terms.append([int(coefficient), dims])
    return terms


def evaluate_terms(terms: list, shapes: list) -> int:
    """The value of :func:`polynomial_terms`' ``terms`` at the inputs' ``shapes``."""
    total = 0
    for coefficient, dims in terms:
        product = coefficient
        for i, d in dims:
            product *= int(shapes[i][d])
        total += product
    return total


def size_minimums(spec: dict) -> list[tuple[int, int, str]]:
    """(dimension, smallest size, why) of an input spec's ``min`` (``min_why`` may be missing)."""
    least_sizes = spec.get("min") or ()
    whys = spec.get("min_why") or [""] * len(least_sizes)
    return [(d, least, why) for d, (least, why) in enumerate(zip(least_sizes, whys, strict=True)) if least is not None]


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError, AttributeError, OverflowError):  # infinite (torch.int_oo), or not a number
        return None


__all__ = ["assumed_conditions", "evaluate_terms", "polynomial_terms", "size_minimums", "smallest_value"]
