"""TVMScript macros find their parser by a frame walk (pbtvm.tvmscript_frames), same as TVM's lookup."""

from __future__ import annotations

import inspect

import pytest

import pbtvm  # noqa: F401  (installs the walk)
from pbtvm import tvmscript_frames
from pbtvm._tvm import tvm


def tvm_lookup(_macro):
    """TVM 0.27's ScriptMacro._find_parser_def, verbatim in behaviour: getouterframes, first global."""
    for info in inspect.getouterframes(inspect.currentframe()):
        parser = info.frame.f_globals.get(tvmscript_frames.PARSER_GLOBAL)
        if parser is not None:
            return parser
    raise RuntimeError("not available")


def nested_macro_func():
    """A prim_func whose macros call a macro (two levels), and the same function written out."""
    from tvm.script import tirx as T

    @T.macro
    def add_one(buf, i):
        buf[i] = buf[i] + T.float32(1)

    @T.macro
    def add_two(buf, i):
        add_one(buf, i)
        add_one(buf, i)

    @T.prim_func(private=True)
    def with_macros(a: T.Buffer((8,), "float32")):
        for i in range(8):
            add_two(a, i)

    @T.prim_func(private=True)
    def written_out(a: T.Buffer((8,), "float32")):
        for i in range(8):
            a[i] = a[i] + T.float32(1)
            a[i] = a[i] + T.float32(1)

    return with_macros, written_out


def test_importing_pbtvm_installs_the_walk():
    from tvm.script.parser.core.parser import ScriptMacro

    assert ScriptMacro._find_parser_def is tvmscript_frames.find_parser


def test_the_walk_finds_the_parser_tvm_finds_for_every_macro_call(monkeypatch):
    from tvm.script.parser.core.parser import ScriptMacro

    found = []

    def both(macro):
        ours, theirs = tvmscript_frames.find_parser(macro), tvm_lookup(macro)
        found.append((ours, theirs))
        return ours

    monkeypatch.setattr(ScriptMacro, "_find_parser_def", both)
    with_macros, written_out = nested_macro_func()
    assert len(found) == 3  # add_two once, add_one twice inside it (the loop body is parsed once)
    assert all(ours is theirs for ours, theirs in found)
    tvm.ir.assert_structural_equal(with_macros, written_out)


def test_a_macro_called_outside_a_parsed_function_raises_as_before():
    from tvm.script import tirx as T

    @T.macro
    def noop():
        T.evaluate(0)

    with pytest.raises(RuntimeError, match="__current_script_parser__ not available"):
        noop()


def test_a_tvm_that_names_its_parser_otherwise_keeps_its_own_lookup(monkeypatch, caplog):
    from tvm.script.parser.core.parser import ScriptMacro

    def theirs(_macro):
        return None

    monkeypatch.setattr(ScriptMacro, "_find_parser_def", theirs)
    monkeypatch.setattr(ScriptMacro, "parser_object_name", "__another_name__")
    with caplog.at_level("WARNING", logger="pbtvm.tvmscript_frames"):
        tvmscript_frames.install()
    assert ScriptMacro._find_parser_def is theirs
    assert "'__another_name__'" in caplog.text and "keep TVM's own lookup" in caplog.text
