"""pbtvm: PrecisionBatching on TVM.

k-bit weights are stored as binary planes; at run time activations are quantized per row and
split into planes too, and each layer becomes AND + popcount over planes with a shift-accumulate.

>>> m = pbtvm.compile(model, (x,), target="llvm", bits=4)   # doctest: +SKIP
>>> y = m(x, bitlayers=3)                                  # doctest: +SKIP
>>> m.export("model.so"); m2 = pbtvm.load("model.so")      # doctest: +SKIP
>>> pbtvm.compile(model, (x,), tune=True, work_dir="logs/")  # doctest: +SKIP
"""

__version__ = "0.1.0"

from .bitplane import PRESETS, BitplaneFormat
from .compiler import compile, tune
from .library import LibraryError
from .runtime import CompiledModel, load

__all__ = ["BitplaneFormat", "CompiledModel", "LibraryError", "PRESETS", "compile", "load", "tune", "__version__"]

#: Application modules that moved into :mod:`pbtvm.apps` (old attribute -> new module).
_MOVED = {name: f"pbtvm.apps.{name}" for name in ("demo", "examples", "ptb", "report", "sentiment")}


def __getattr__(name: str) -> object:
    """``pbtvm.examples`` and the other moved application modules, with a DeprecationWarning."""
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(f"pbtvm.{name} moved to {_MOVED[name]}", DeprecationWarning, stacklevel=2)
        return importlib.import_module(_MOVED[name])
    raise AttributeError(f"module 'pbtvm' has no attribute {name!r}")
