"""TVMScript macros find their parser by walking frames, not by ``inspect.getouterframes``.

Each call of a ``T.macro`` / ``T.inline`` inside a parsed ``T.prim_func`` looks for the parser
that is running it: TVM 0.27's ``ScriptMacro._find_parser_def`` takes
``inspect.getouterframes(inspect.currentframe())`` and returns the first frame whose globals hold
``__current_script_parser__``. ``getouterframes`` builds a ``FrameInfo`` for every frame of the
stack (file name, source lines, ``inspect.getmodule`` — a scan of ``sys.modules``, slower the more
modules are loaded: cpython issue 92041) only to read ``frame.f_globals``. The evaluator recurses
deeply, so with torch imported each macro call cost ~0.2 s: one PB BMMA kernel (dozens of macro
calls) took ~19 s to parse, ~85 % of compiling a three-layer model for sm_90.

:func:`install` replaces the method with one that follows ``f_back`` and reads the same globals in
the same order: the same parser, the same error when there is none.
"""

from __future__ import annotations

import sys
from typing import Any

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

    Raises
    ------
    RuntimeError
        If this TVM's ``ScriptMacro`` names its parser global otherwise (the walk would find none).
    """
    from tvm.script.parser.core.parser import ScriptMacro

    if ScriptMacro.parser_object_name != PARSER_GLOBAL:
        raise RuntimeError(
            f"TVMScript's parser global is {ScriptMacro.parser_object_name!r}, not {PARSER_GLOBAL!r}: "
            "update pbtvm.tvmscript_frames for this TVM"
        )
    ScriptMacro._find_parser_def = find_parser
