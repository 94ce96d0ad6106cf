"""Tutorials run end to end in their reduced (--quick) mode."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIALS = sorted(glob.glob(os.path.join(ROOT, "tutorials", "*.py")))


@pytest.mark.parametrize("path", TUTORIALS, ids=os.path.basename)
def test_tutorial_runs(path):
    pytest.importorskip("mlxtend")
    out = subprocess.run([sys.executable, path, "--quick"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]


def test_demo_quick_runs():
    pytest.importorskip("mlxtend")
    out = subprocess.run(
        [sys.executable, "-m", "pbtvm.apps.demo", "--quick"], capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "PB W4A8" in out.stdout
    assert "bitlayers=1" in out.stdout and "twos_complement" in out.stdout  # the knob beside two's complement
