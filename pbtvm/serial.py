"""Compiling takes turns: one ``compile`` / ``tune`` / ``compile_lstm`` / ``compile_decoder`` at a
time in a process.

``torch.export`` keeps process-wide state while it traces (dispatch modes, patched functions,
operator registrations), and so do pbtvm's stand-ins (the LSTM custom op, ``nn.LSTM`` forwards):
four threads compiling at once failed in 6-8 of 8 compiles, some with errors that blamed the
example input, and one LSTM model came back with its batch fixed. A compile already uses every
core (TVM's builds, the tuner's workers), so taking turns costs little. Calling compiled models
from many threads has its own, per-model lock (README, "Thread safety, NaN and op semantics").
Torch code the user runs in other threads while a compile traces is not covered by this lock.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["one_compile_at_a_time"]

_F = TypeVar("_F", bound=Callable)
#: Reentrant: compile_lstm and compile_decoder call pbtvm.compile's pieces, tune_kernels runs in compile.
#: Held while compile runs the user's model (the example check, calibration): a model that hands a
#: compile to another thread and waits for it would wait forever.
_COMPILING = threading.RLock()


def _fresh_lock_after_fork() -> None:
    """A child forked while another thread compiled would inherit the lock held, forever."""
    global _COMPILING
    _COMPILING = threading.RLock()


os.register_at_fork(after_in_child=_fresh_lock_after_fork)


def one_compile_at_a_time(func: _F) -> _F:
    """Decorate a compile entry point: calls from several threads run one after another."""

    @functools.wraps(func)
    def take_turns(*args, **kwargs):
        with _COMPILING:
            return func(*args, **kwargs)

    return take_turns  # type: ignore[return-value]
