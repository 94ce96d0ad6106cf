"""The structure of a model's output (tensor, tuple, list, dict, nested), kept in the manifest.

``torch.export`` flattens whatever ``forward`` returns into a list of tensors; the compiled model
returns that list. :func:`describe` records the structure as JSON so that
:func:`rebuild` can return the outputs as the torch module does, also from a loaded library.

A structure is ``"tensor"``, ``{"tuple": [s, ...]}``, ``{"list": [s, ...]}`` or
``{"dict": [[key, s], ...]}`` (keys str or int, in the module's order).
"""

from __future__ import annotations

from typing import Any

from .errors import InputError, InputTypeError

TENSOR = "tensor"


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
    """Number of tensors in ``structure``."""
    if structure == TENSOR:
        return 1
    ((kind, items),) = structure.items()
    return sum(count(s if kind != "dict" else s[1]) for s in items)


def rebuild(structure: Any, leaves: list) -> Any:
    """Nest the flat ``leaves`` (in ``torch.export`` order) as ``structure`` says."""
    if len(leaves) != count(structure):
        raise InputError(
            f"the compiled model returned {len(leaves)} outputs, its manifest describes {count(structure)}"
        )
    it = iter(leaves)

    def build(s: Any) -> Any:
        if s == TENSOR:
            return next(it)
        ((kind, items),) = s.items()
        if kind == "dict":
            return {key: build(sub) for key, sub in items}
        built = [build(sub) for sub in items]
        return built if kind == "list" else tuple(built)

    return build(structure)


__all__ = ["TENSOR", "count", "describe", "rebuild"]
