"""TVM version shims: where apache-tvm 0.27 keeps the names pbtvm uses most.

TVM >= 0.20 renamed ``tvm.tir`` to ``tvm.tirx``, moved scheduling to ``tvm.s_tir`` (DLight at
``tvm.s_tir.dlight``, MetaSchedule at ``tvm.s_tir.meta_schedule``) and replaced Relay with Relax.
pbtvm's modules take ``tvm``, ``relax``, ``te``, ``tir``, ``s_tir``, ``dlight`` and
:func:`meta_schedule` from here. Leaf APIs are imported where they are used: TVMScript and its IR
builder (``tvm.script.tirx``), ``tvm.target.codegen``, the torch frontend, ``tvm.rpc``,
``tvm.relax.expr_functor`` and MetaSchedule internals in the tuner; when a TVM upgrade moves one
of those, ``grep -rn "from tvm" pbtvm schedules relay_passes`` lists every place.
"""

from __future__ import annotations

from .threads import default_threads

default_threads()  # before TVM's thread pool starts: one thread per physical core

import tvm  # noqa: E402
from tvm import relax, s_tir, te  # noqa: E402
from tvm import tirx as tir  # noqa: E402
from tvm.s_tir import dlight  # noqa: E402

from .errors import register_with_ffi  # noqa: E402

register_with_ffi()  # pbtvm's input errors keep their class across the FFI

from .tvmscript_frames import install as _fast_macro_parser_lookup  # noqa: E402

_fast_macro_parser_lookup()  # a TVMScript macro call ~0.2 s -> ~0 (see pbtvm.tvmscript_frames)

__all__ = ["tvm", "relax", "te", "tir", "s_tir", "dlight", "meta_schedule", "TVM_VERSION"]

TVM_VERSION: str = tvm.__version__


def meta_schedule():
    """Import MetaSchedule lazily (it pulls in xgboost)."""
    from tvm.s_tir import meta_schedule as ms

    return ms
