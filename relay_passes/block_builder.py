"""Helpers for passes that rewrite a module through a ``PyExprMutator``'s block builder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pbtvm._tvm import relax, tvm

__all__ = ["blocks_closed_on_error"]


@contextlib.contextmanager
def blocks_closed_on_error(builder: relax.BlockBuilder) -> Iterator[None]:
    """Close the blocks an exception left open in ``builder``.

    An error raised mid-rewrite (e.g. a weight holding NaN) leaves the mutator's binding blocks
    open, and TVM logs "BlockBuilder destroyed with remaining blocks!" when the builder goes; the
    user's error then comes with a warning from TVM's C++ that means nothing to them.
    """
    try:
        yield
    except Exception:
        for _ in range(64):  # the rewrite nests a few blocks at most
            try:
                builder._end_block()
            except tvm.error.InternalError:  # no block left
                break
        raise
