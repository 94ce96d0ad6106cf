"""One PB dense layer, weights warm in the caches: the table-lookup kernel (``lut16x4``) vs the byte-code kernel (``kNW``).

The layer as ``pbtvm.compile`` runs it on the CPU (one kernel that quantizes the rows and
multiplies), built for the host, in both weight layouts; the two take turns for ``--rounds``
rounds of ``--calls`` calls each on the same weights (so they stay in the caches, as in a
decoder's step), and the median per call is printed with the ratio. Where the weights stream from
memory see ``bench_cpu.py --lut``. The float outputs of both are checked equal first.

Usage::

    python benchmarks/bench_lut.py [--shapes 2600x1300 10000x650 4096x4096] [--bits 2 4 8] [--batches 1 2 4 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from pbtvm import bitplane as bp
from pbtvm import kernels
from pbtvm._tvm import tvm
from pbtvm.target import resolve_target


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["2600x1300", "10000x650", "4096x4096"], help="NxK")
    p.add_argument("--bits", nargs="+", type=int, default=[2, 4, 8])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--calls", type=int, default=5)
    return p.parse_args()


def _t(a: np.ndarray):
    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())


def main() -> int:
    """Print a markdown table: µs per call of both layouts and their ratio."""
    args = _parse()
    target = resolve_target("llvm")
    rng = np.random.default_rng(0)
    print(f"# target {target.attrs.get('mcpu')}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| shape | W | batch | kNW byte-code µs | lut16x4 µs | kNW / lut |")
    print("|---|---|---|---|---|---|", flush=True)
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        for bits in args.bits:
            lo, hi = bp.BitplaneFormat(bits).weight_code_range
            q = rng.integers(lo, hi, (n, k), endpoint=True)
            if bits == 1:  # bipolar codes
                q = 2 * (q > 0) - 1
            layers = {}
            for layout in ("kNW", bp.LUT_LAYOUT):  # the same codes in both layouts
                fmt = bp.BitplaneFormat(bits, layout=layout)
                layer = kernels.build(kernels.dense_act_func(fmt, n, k, bias=False), target)
                layers[layout] = (layer, _t(bp.pack_weights(q, fmt)))
            w_scale = _t(np.full(n, 1e-3, np.float32))
            for batch in args.batches:
                x = _t(rng.standard_normal((batch, k)).astype(np.float32))
                out = {layout: _t(np.zeros((batch, n), np.float32)) for layout in layers}
                times: dict[str, list[float]] = {layout: [] for layout in layers}
                for _ in range(args.rounds):
                    for layout, (layer, wp) in layers.items():
                        layer(x, wp, w_scale, bits, out[layout])  # wakes the thread pool
                        t0 = time.perf_counter()
                        for _ in range(args.calls):
                            layer(x, wp, w_scale, bits, out[layout])
                        times[layout].append((time.perf_counter() - t0) / args.calls * 1e6)
                np.testing.assert_array_equal(out["kNW"].numpy(), out[bp.LUT_LAYOUT].numpy())
                plain, lut = (statistics.median(times[layout]) for layout in layers)
                print(f"| {n}x{k} | {bits} | {batch} | {plain:,.0f} | {lut:,.0f} | {plain / lut:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
