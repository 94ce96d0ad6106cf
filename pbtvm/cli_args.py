"""What the command line's arguments mean: MODEL specs, ``--input-shape``, ``--target``, ``--bits``.

Every mistake raises :class:`CLIError` with a message for the user (``pbtvm: error: ...``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["CLIError", "bits_list", "load_model", "parse_target"]


class CLIError(Exception):
    """A user mistake: printed as one line, exit status 2."""


# --------------------------------------------------------------------------- model specs
def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise CLIError(f"--input-shape must look like 1x784, got {text!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise CLIError(f"--input-shape must have positive dimensions, got {text!r}")
    return shape


def _builtin_mnist() -> tuple[Any, tuple]:
    import torch

    from .apps.examples import builtin_mnist_mlp

    model, split = builtin_mnist_mlp()
    return model, (torch.from_numpy(split.x_train[:2]),)


def load_model(spec: str, input_shape: str | None = None) -> tuple[Any, tuple]:
    """Resolve a MODEL argument into ``(torch module, example inputs)``.

    Raises
    ------
    CLIError
        Unknown file or module, a function that returns something else, a .pt without
        ``--input-shape``.
    """
    import torch

    if spec == "mnist-mlp":
        return _builtin_mnist()
    if spec.endswith((".pt", ".pth")):
        path = Path(spec)
        if not path.is_file():
            raise CLIError(f"model file {spec} does not exist")
        try:
            model = torch.load(path, weights_only=False, map_location="cpu")
        except Exception as err:
            raise CLIError(f"{spec} is not a torch.save'd model: {err}") from None
        if not isinstance(model, torch.nn.Module):
            raise CLIError(f"{spec} holds a {type(model).__name__}, not a torch.nn.Module")
        if input_shape is None:
            raise CLIError(f"{spec} has no example inputs: pass --input-shape, e.g. --input-shape 1x784")
        return model.eval(), (torch.randn(*_parse_shape(input_shape)),)
    if ":" not in spec:
        raise CLIError(f"MODEL must be module:function, file.py:function, model.pt or mnist-mlp; got {spec!r}")
    where, func_name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        if not Path(where).is_file():
            raise CLIError(f"model file {where} does not exist")
        mod_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(mod_spec)
        _user_code(f"importing {where}", mod_spec.loader.exec_module, module)
    else:
        with _working_directory_importable():
            try:
                module = importlib.import_module(where)
            except ImportError as err:
                raise CLIError(f"cannot import {where}: {err}") from None
            except Exception as err:
                raise CLIError(f"importing {where} raised {type(err).__name__}: {err}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise CLIError(f"{where} has no function {func_name!r}")
    with _working_directory_importable():  # a factory importing its neighbours when called
        out = _user_code(f"{spec}()", fn)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.nn.Module)):
        raise CLIError(f"{spec} must return (model, example_inputs), got {type(out).__name__}")
    model, example = out
    example = tuple(example) if isinstance(example, list | tuple) else (example,)
    return model.eval(), example


@contextlib.contextmanager
def _working_directory_importable() -> Iterator[None]:
    """Inside, modules in the working directory import (as ``python -m`` finds them; the console
    script's path does not hold it), unless ``PYTHONSAFEPATH`` asks otherwise; after it, the path
    is as it was (a ``psutil.py`` there must not shadow what TVM imports later)."""
    cwd = os.getcwd()
    added = not sys.flags.safe_path and "" not in sys.path and cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _user_code(what: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)``: the user's file or model factory; what it raises is the user's error (exit 2)."""
    try:
        return fn(*args)
    except Exception as err:
        raise CLIError(f"{what} raised {type(err).__name__}: {err}") from None


def parse_target(text: str) -> Any:
    """``--target``: a kind (``llvm``, ``cuda``, a TVM target string) or a JSON dict."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise CLIError(f"--target is not valid JSON: {err}") from None
    return text


def bits_list(text: str, flag: str = "--bits") -> list[int]:
    """``--bits 1,2,4``: comma-separated integers, each once."""
    try:
        values = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise CLIError(f"{flag} must be comma-separated integers, got {text!r}") from None
    twice = sorted({b for b in values if values.count(b) > 1})
    if twice:
        raise CLIError(f"{flag} lists {', '.join(map(str, twice))} more than once: {text!r}")
    if not values:
        raise CLIError(f"{flag} lists no bit width: {text!r}")
    return values
