"""TVM version shims: the one module that knows where apache-tvm 0.27 keeps things.

TVM >= 0.20 renamed ``tvm.tir`` to ``tvm.tirx``, moved scheduling to ``tvm.s_tir`` (DLight at
``tvm.s_tir.dlight``, MetaSchedule at ``tvm.s_tir.meta_schedule``) and replaced Relay with Relax.
Everything else in pbtvm imports these names from here.
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, te
from tvm import tirx as tir
from tvm.s_tir import dlight

__all__ = ["tvm", "relax", "te", "tir", "s_tir", "dlight", "meta_schedule", "TVM_VERSION"]

TVM_VERSION: str = tvm.__version__


def meta_schedule():  # noqa: ANN201 - module object
    """Import MetaSchedule lazily (it pulls in xgboost)."""
    from tvm.s_tir import meta_schedule as ms

    return ms
