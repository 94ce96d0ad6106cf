"""TVMScript macros find their parser by walking frames, not by ``inspect.getouterframes``.

Each call of a ``T.macro`` / ``T.inline`` inside a parsed ``T.prim_func`` looks for the parser
that is running it: TVM 0.27's ``ScriptMacro._find_parser_def`` takes
``inspect.getouterframes(inspect.currentframe())`` and returns the first frame whose globals hold
``__current_script_parser__``. ``getouterframes`` builds a ``FrameInfo`` for every frame of the
stack (file name, source lines, ``inspect.getmodule`` — a scan of ``sys.modules``, slower the more
modules are loaded: cpython issue 92041) only to read ``frame.f_globals``. The evaluator recurses
deeply, so with torch imported each macro call cost up to ~0.2 s: one PB BMMA kernel (~90 macro
calls) took ~19 s to parse under pytest, and compiling a three-layer MLP for sm_90 from a script
took 18.8 s where it takes 6.5 s with the walk (BENCHMARKS.md, forty-second session).

:func:`install` replaces the method with one that follows ``f_back`` and reads the same globals in
the same order: the same parser, the same error when there is none.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

logger = logging.getLogger(__name__)

#: the name under which TVMScript's parser puts itself into the globals of the code it evaluates
PARSER_GLOBAL = "__current_script_parser__"


def find_parser(_macro: Any) -> Any:
    """The TVMScript parser running the caller: the first frame outward whose globals hold it.

    Same result as TVM's ``ScriptMacro._find_parser_def`` (which starts at its own frame, in the
    module of the macro's ``__call__``: the caller's globals here).

    Raises
    ------
    RuntimeError
        If no frame holds a parser (the macro was called outside a parsed function).
    """
    frame = sys._getframe(1)
    while frame is not None:
        parser = frame.f_globals.get(PARSER_GLOBAL)
        if parser is not None:
            return parser
        frame = frame.f_back
    raise RuntimeError(f"{PARSER_GLOBAL} not available")


def install() -> None:
    """Make every TVMScript macro (TIR, Relax) use :func:`find_parser`; idempotent.

    A TVM whose ``ScriptMacro`` has no ``_find_parser_def`` or names its parser global otherwise
    keeps its own lookup (correct, slower), with a warning in the log: the walk would find nothing.
    """
    from tvm.script.parser.core.parser import ScriptMacro

    name = getattr(ScriptMacro, "parser_object_name", None)
    if name != PARSER_GLOBAL or not callable(getattr(ScriptMacro, "_find_parser_def", None)):
        logger.warning(
            "this TVM's TVMScript macros find their parser otherwise (global %r): they keep TVM's own "
            "lookup, ~0.2 s a macro call with torch loaded; update pbtvm.tvmscript_frames",
            name,
        )
        return
    ScriptMacro._find_parser_def = find_parser
