"""Exceptions for bad input: what a user passed (argument, model, file, tensor) is wrong.

They subclass the builtin ``ValueError`` / ``TypeError`` so code that catches those keeps
working, and are registered with TVM's FFI so they keep their type when raised
inside a pass; the CLI reports exactly these as user errors (exit status 2) and everything else as an
internal error with a request to report it.

This module does not import TVM (``tvm_ffi`` imports torch: seconds), so the CLI's help and
argument errors and :mod:`pbtvm.bitplane` stay quick. The classes are registered
(:func:`register_with_ffi`) by :mod:`pbtvm._tvm` when it imports TVM, and by any module that
imports ``tvm_ffi`` itself and calls back into Python from TVM (:mod:`pbtvm.cuda`'s nvcc hook),
before anything can raise them there.
"""

from __future__ import annotations

import contextlib
import numbers
import sys
from collections.abc import Iterator

__all__ = [
    "InputError",
    "InputTypeError",
    "check_int",
    "first_line",
    "naming_layer",
    "register_with_ffi",
    "shape_text",
]


class InputError(ValueError):
    """A value the user passed is wrong or unsupported; the message says which and why."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong type."""


def register_with_ffi() -> None:
    """Register the error classes with TVM's FFI, so that one raised inside a pass (Python called
    back from C++) comes back to the caller as itself, not as a RuntimeError. ``KeyboardInterrupt``
    too: Ctrl-C lands in Python code TVM calls back (a tuning run's builder), and came out of
    ``pbtvm.tune`` as a bare ``RuntimeError``. Imports ``tvm_ffi``; idempotent."""
    import tvm_ffi

    for cls in (InputError, InputTypeError, KeyboardInterrupt):
        tvm_ffi.register_error(cls)


if "tvm_ffi" in sys.modules:  # TVM came first (imported by the user): nothing to wait for
    register_with_ffi()


def check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    """``value`` as a Python int, or an error naming argument ``name``: an integer (Python or
    numpy, not a bool) in ``lo..hi`` (``hi`` None: no upper bound).

    Raises
    ------
    InputTypeError
        Not an integer (``4.0``, ``True``, ``"4"``).
    InputError
        Outside ``lo..hi``.
    """
    allowed = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputTypeError(f"{name} must be an int {allowed}, got {type(value).__name__} {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise InputError(f"{name} must be {allowed}, got {value}")
    return int(value)


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message ("" when empty): what an error report quotes."""
    return (str(err).strip().splitlines() or [""])[0]


def shape_text(value: object) -> str:
    """``[8, 7] float32`` for a tensor or array, else its type's name: how an error report shows an input."""
    shape = getattr(value, "shape", None)
    if shape is None:
        return type(value).__name__
    return f"{list(shape)} {str(getattr(value, 'dtype', '')).replace('torch.', '')}".strip()


@contextlib.contextmanager
def naming_layer(name: str) -> Iterator[None]:
    """Prefix ``layer {name}:`` to a ``ValueError`` raised inside, e.g. a weight holding NaN.

    Parameters
    ----------
    name : str
        How the message names the layer, e.g. ``lstm.weight_hh_l0 (LSTM)``.

    Raises
    ------
    InputError
        For a ``ValueError`` raised in the block: an :class:`InputError` (or subclass) keeps its
        class, any other ``ValueError`` becomes an InputError.
    """
    try:
        yield
    except ValueError as err:
        cls = type(err) if isinstance(err, InputError) else InputError
        raise cls(f"layer {name}: {err}") from None
