"""The structure of a model's output (tensor, tuple, list, dict, nested), kept in the manifest.

``torch.export`` flattens whatever ``forward`` returns into a list of tensors; the compiled model
returns that list. :func:`describe` records the structure as JSON so that
:func:`rebuild` can return the outputs as the torch module does, also from a loaded library.

A structure is ``"tensor"``, ``"none"`` (a ``None`` in the output, as ``nn.MultiheadAttention``'s
attention weights with ``need_weights=False``: no tensor), ``{"tuple": [s, ...]}``, ``{"list": [s, ...]}``,
``{"dict": [[key, s], ...]}`` (keys str or int, in the module's order) or
``{"namedtuple": {"class": "module:QualName", "fields": [name, ...], "items": [s, ...]}}`` (a
``collections.namedtuple`` or a ``torch.return_types`` result: ``out.logits``, ``y.max(1).values``).
"""

from __future__ import annotations

import collections
import functools
import sys
from typing import Any

from .errors import InputError, InputTypeError

TENSOR = "tensor"
NONE = "none"


def describe(output: Any) -> Any:
    """JSON structure of ``output`` (what ``forward`` returned for the example).

    Raises
    ------
    TypeError
        A leaf that is not a tensor, or a dict key that is not a str or int.
    """
    import torch

    if isinstance(output, torch.Tensor):
        return TENSOR
    if output is None:
        return NONE
    fields = _fields(type(output))
    if fields is not None and len(fields) == len(output):  # else (hidden fields) as a plain tuple
        kind = type(output)
        items = [describe(o) for o in output]
        return {"namedtuple": {"class": f"{kind.__module__}:{kind.__qualname__}", "fields": fields, "items": items}}
    if isinstance(output, tuple | list):
        return {type(output).__name__ if type(output) in (tuple, list) else "tuple": [describe(o) for o in output]}
    if isinstance(output, dict):
        for key in output:
            if not isinstance(key, str | int) or isinstance(key, bool):
                raise InputTypeError(f"the model returns a dict with key {key!r}; pbtvm keeps str and int keys only")
        return {"dict": [[key, describe(value)] for key, value in output.items()]}
    name = type(output).__name__
    shown = repr(output) if len(repr(output)) <= 40 else f"{repr(output)[:37]}..."
    raise InputTypeError(
        f"the model returns {'an' if name[0] in 'aeiou' else 'a'} {name} ({shown}); pbtvm models return tensors "
        "(in tuples/lists/dicts): return it as a tensor or leave it out of forward"
    )


def count(structure: Any) -> int:
    """Number of leaves in ``structure``: its tensors and Nones (torch.export keeps a None as an
    output, TVM as a null value), the compiled model's outputs."""
    return len(_leaves(structure))


def count_tensors(structure: Any) -> int:
    """Number of tensors in ``structure``."""
    return _leaves(structure).count(TENSOR)


def _leaves(structure: Any) -> list[str]:
    """The leaves of ``structure`` (``TENSOR`` or ``NONE``) in order."""
    if structure in (TENSOR, NONE):
        return [structure]
    ((kind, items),) = structure.items()
    if kind == "namedtuple":
        items = items["items"]
    return [leaf for s in items for leaf in _leaves(s if kind != "dict" else s[1])]


def rebuild(structure: Any, leaves: list) -> Any:
    """Nest the flat ``leaves`` (in ``torch.export`` order) as ``structure`` says."""
    if len(leaves) != count(structure):
        raise InputError(
            f"the compiled model returned {len(leaves)} outputs, its manifest describes {count(structure)}"
        )
    it = iter(leaves)

    def build(s: Any) -> Any:
        if s in (TENSOR, NONE):
            leaf = next(it)
            return leaf if s == TENSOR else None
        ((kind, items),) = s.items()
        if kind == "dict":
            return {key: build(sub) for key, sub in items}
        if kind == "namedtuple":
            return _named_tuple(items["class"], tuple(items["fields"]))([build(sub) for sub in items["items"]])
        built = [build(sub) for sub in items]
        return built if kind == "list" else tuple(built)

    return build(structure)


def _fields(kind: type) -> list[str] | None:
    """The field names of a named tuple type (``collections.namedtuple``'s ``_fields``, a
    ``torch.return_types`` structseq's ``__match_args__``), else None."""
    if not issubclass(kind, tuple) or kind is tuple:
        return None
    fields = getattr(kind, "_fields", None) or getattr(kind, "__match_args__", None)
    return list(fields) if fields and all(isinstance(f, str) for f in fields) else None


def _named_tuple(qualified: str, fields: tuple) -> Any:
    """A function making the named tuple ``qualified`` (``module:QualName``) from a list of items:
    the class itself where its module is already imported and it has these fields (looked up at
    every call: a class defined again, in a notebook, is the new one; nothing is imported for a
    manifest's sake), else a ``collections.namedtuple`` of that name and fields."""
    module, _, qualname = qualified.partition(":")
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if isinstance(found, type) and _fields(found) == list(fields):
        return found._make if hasattr(found, "_make") else found  # a structseq takes one sequence
    return _stand_in(qualname.rsplit(".", 1)[-1], fields)._make


@functools.lru_cache(maxsize=64)
def _stand_in(name: str, fields: tuple) -> Any:
    """One ``collections.namedtuple`` per name and fields (``Outputs`` for a name it refuses)."""
    return collections.namedtuple(name if name.isidentifier() else "Outputs", fields, rename=True)


__all__ = ["NONE", "TENSOR", "count", "count_tensors", "describe", "rebuild"]
