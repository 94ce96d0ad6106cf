"""One PB dense layer, weights warm in the caches: the table-lookup kernel (``lut16x4``) vs the byte-code kernel (``kNW``).

``bench_cpu_isas.py`` with the variants ``kNW@host lut16x4@host``: the layer as ``pbtvm.compile``
runs it on the CPU, built for the host in both weight layouts, timed in turns on the same weights
(so they stay in the caches, as in a decoder's step); the table's last column is the lookup's
speed-up. Where the weights stream from memory see ``bench_cpu.py --lut``.

Usage::

    python benchmarks/bench_lut.py [--shapes 2600x1300 10000x650 4096x4096] [--bits 2 4 8] [--batches 1 2 4 8]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cpu_isas

if __name__ == "__main__":
    if "--variants" not in sys.argv:
        sys.argv[1:1] = ["--variants", "kNW@host", "lut16x4@host", "--batches", "1", "2", "4", "8"]
    sys.exit(bench_cpu_isas.main())
