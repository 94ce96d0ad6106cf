"""A user's everyday calls print nothing: compile, export, load and run are silent when all is well."""

from __future__ import annotations

import warnings

import torch

import pbtvm

from .models import MLP


def test_compile_export_load_run_print_no_warnings(tmp_path, capfd):
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = pbtvm.compile(MLP(), (torch.randn(2, 40),), target="llvm", bits=4)
        m(torch.randn(2, 40))  # exporting a model that has run printed a TVM warning per weight
        path = m.export(str(tmp_path / "mlp.so"))
        y = pbtvm.load(path)(torch.randn(3, 40))
    assert y.shape == (3, 10)
    assert [str(w.message) for w in caught] == []
    out, err = capfd.readouterr()  # TVM's C++ log lines go straight to the file descriptors
    assert out == "" and err == "", (out, err)
