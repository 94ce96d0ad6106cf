"""Where a warning should point: the user's line, not pbtvm's (or TVM's, torch's) internals."""

from __future__ import annotations

import os
import sys


def _package_dir(module: str) -> str | None:
    loaded = sys.modules.get(module)
    path = getattr(loaded, "__file__", None)
    return os.path.dirname(os.path.abspath(path)) + os.sep if path else None


def user_stacklevel(*through: str) -> int:
    """``stacklevel`` for a ``warnings.warn`` made by the calling function: that of the first frame
    outside pbtvm and the packages named in ``through`` (e.g. ``"tvm", "torch"`` for a warning
    raised in a converter that TVM's importer calls).

    Returns
    -------
    int
        1 is the caller itself; one more for each frame skipped.
    """
    ours = ("pbtvm", "pbtvm.relay_passes", "pbtvm.schedules")  # the last two live outside pbtvm/
    skipped = [d for d in map(_package_dir, (*ours, *through)) if d]
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(tuple(skipped)):
        frame, level = frame.f_back, level + 1
    return level


__all__ = ["user_stacklevel"]
