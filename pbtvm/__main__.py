"""``python -m pbtvm``: the ``pbtvm`` command line (:mod:`pbtvm.cli`), also without the console
script (a source checkout on ``PYTHONPATH``)."""

from .cli import run

run()
