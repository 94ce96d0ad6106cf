"""Applications built on pbtvm: datasets, training, demo models and the accuracy/speed report.

Nothing in the compiler core (``pbtvm`` outside this package, ``pbtvm.schedules``,
``pbtvm.relay_passes``) imports from here; the CLI and the tutorials do.

* :mod:`pbtvm.apps.examples` — MNIST split and the cached built-in MNIST MLP.
* :mod:`pbtvm.apps.demo` — ``python -m pbtvm.apps.demo``: accuracy per weight bitwidth.
* :mod:`pbtvm.apps.report` — accuracy/latency trade-off table and Pareto plot (``pbtvm eval``).
* :mod:`pbtvm.apps.ptb` — Penn Treebank word LM (tutorial 02).
* :mod:`pbtvm.apps.sentiment` — Rotten Tomatoes sentence classifier.
"""
