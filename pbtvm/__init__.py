"""pbtvm: PrecisionBatching on TVM.

k-bit weights are stored as binary planes; at run time activations are quantized per row and
split into planes too, and each layer becomes AND + popcount over planes with a shift-accumulate.

>>> m = pbtvm.compile(model, (x,), target="llvm", bits=4)   # doctest: +SKIP
>>> y = m(x, bitlayers=3)                                  # doctest: +SKIP
>>> m.export("model.so"); m2 = pbtvm.load("model.so")      # doctest: +SKIP
>>> pbtvm.compile(model, (x,), tune=True, work_dir="logs/")  # doctest: +SKIP
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from .bitplane import PRESETS, BitplaneFormat
from .threads import default_threads as _default_threads

if TYPE_CHECKING:  # what the lazy names below are, for type checkers
    from .compiler import compile, tune
    from .library import LibraryError
    from .runtime import CompiledModel, load
del TYPE_CHECKING

_default_threads()  # before TVM's thread pool starts, also where the user imports TVM next

__all__ = ["BitplaneFormat", "CompiledModel", "LibraryError", "PRESETS", "compile", "load", "tune", "__version__"]

#: Public names imported on first use, from these modules: TVM (with torch, which ``tvm_ffi``
#: imports) takes seconds to import, and ``pbtvm --help``, the CLI's argument errors and
#: :mod:`pbtvm.bitplane` need neither.
_LAZY = {
    "compile": "compiler",
    "tune": "compiler",
    "LibraryError": "library",
    "CompiledModel": "runtime",
    "load": "runtime",
}
#: Application modules that moved into :mod:`pbtvm.apps` (old attribute -> new module).
_MOVED = {name: f"pbtvm.apps.{name}" for name in ("demo", "examples", "ptb", "report", "sentiment")}


def __getattr__(name: str) -> object:
    """The public names of :data:`_LAZY` on first use; a submodule not imported yet (``pbtvm.kernels``
    after ``import pbtvm``, as when this package imported the compiler eagerly); ``pbtvm.examples`` and
    the other moved application modules, with a DeprecationWarning."""
    import importlib
    import importlib.util

    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _MOVED:
        import warnings

        warnings.warn(f"pbtvm.{name} moved to {_MOVED[name]}", DeprecationWarning, stacklevel=2)
        return importlib.import_module(_MOVED[name])
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'pbtvm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
