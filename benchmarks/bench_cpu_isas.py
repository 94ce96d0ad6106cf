"""One PB dense layer built for several x86 instruction sets and layouts, timed side by side on this host.

Each variant is ``layout@mcpu``: the layer as ``pbtvm.compile`` runs it on the CPU (one kernel
that quantizes the rows and multiplies) in that weight layout, built for that LLVM CPU, so one
host measures the kernels other CPUs would get: ``kNW@haswell`` is the AVX2 byte-code kernel
(``vpmaddubsw`` + ``vpmaddwd``; AMD Zen 2/3), ``kNW@alderlake`` the AVX-VNNI one (``vpdpbusd`` on
ymm; Intel client cores from Alder Lake on), ``lut16x4@haswell`` the AVX2 table lookup,
``kNW@host`` the host's own best; ``kNW@alderlake:-gfni`` drops an LLVM feature (``mattr``),
``kNW@rocketlake:+amx-tile,+amx-int8`` adds the AMX tile loops (``--amx-from 1``: at every batch);
``lut16x4/lookups@haswell`` and ``lut16x4/decoded@haswell`` force the table lookup's path at
every batch (:data:`pbtvm.ops.lut_decoded.LOOKUP_MAX_ROWS`: lookups, or each row decoded once). The host must have every variant's instructions. The weights
stay warm in the caches (a decoder's case); the variants take turns for ``--rounds`` rounds of
``--calls`` calls, the median per call is printed with each variant's speed relative to the
first, and the float outputs of all variants are checked equal first.

Usage::

    python benchmarks/bench_cpu_isas.py [--variants kNW@haswell kNW@alderlake lut16x4@haswell]
        [--shapes 2600x1300 10000x650 4096x4096] [--bits 2 4 8] [--batches 1 2 4 8 16]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import numpy as np

from pbtvm import bitplane as bp
from pbtvm import kernels
from pbtvm._tvm import tvm
from pbtvm.ops import lut_decoded
from pbtvm.target import resolve_target


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["kNW@haswell", "kNW@alderlake", "lut16x4@haswell"])
    p.add_argument("--shapes", nargs="+", default=["2600x1300", "10000x650", "4096x4096"], help="NxK")
    p.add_argument("--bits", nargs="+", type=int, default=[2, 4, 8])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument(
        "--amx-from",
        type=int,
        default=None,
        help="build variants with AMX (e.g. kNW@rocketlake:+amx-tile,+amx-int8) with the tile loops from this batch",
    )
    return p.parse_args()


def _t(a: np.ndarray):
    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())


def _target(cpu: str) -> tvm.target.Target:
    """``mcpu``, or ``mcpu:+feature,-feature`` (LLVM ``mattr``), or ``host``."""
    if cpu == "host":
        return resolve_target("llvm")
    mcpu, _, mattr = cpu.partition(":")
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, **({"mattr": mattr.split(",")} if mattr else {})})


@contextlib.contextmanager
def _lut_path(path: str, bits: int):
    """Build ``lut16x4`` kernels with the lookups (``"lookups"``) or the decoded rows
    (``"decoded"``) at every batch; ``""``: the default switch."""
    if path not in ("", "lookups", "decoded"):
        raise SystemExit(f"unknown table-lookup path {path!r}: lookups or decoded")
    default = dict(lut_decoded.LOOKUP_MAX_ROWS)
    if path:
        lut_decoded.LOOKUP_MAX_ROWS[bits] = 1 << 30 if path == "lookups" else 0
    try:
        yield
    finally:
        lut_decoded.LOOKUP_MAX_ROWS.clear()
        lut_decoded.LOOKUP_MAX_ROWS.update(default)


def main() -> int:
    """Print a markdown table: µs per call of every variant and its speed-up over the first."""
    args = _parse()
    if args.amx_from is not None:
        from pbtvm.ops import amx_gemm

        amx_gemm.AMX_MIN_BATCH = (args.amx_from, args.amx_from)
    variants = [v.split("@") for v in args.variants]
    rng = np.random.default_rng(0)
    host = resolve_target("llvm").attrs.get("mcpu")
    print(f"# host {host}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, µs per call (speed-up vs the first)")
    print(f"| shape | W | batch | {' | '.join(args.variants)} |")
    print(f"|---|---|---|{'---|' * len(variants)}", flush=True)
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        for bits in args.bits:
            lo, hi = bp.BitplaneFormat(bits).weight_code_range
            q = rng.integers(lo, hi, (n, k), endpoint=True)
            if bits == 1:  # bipolar codes
                q = 2 * (q > 0) - 1
            layers = []
            for layout, mcpu in variants:  # the same codes in every layout
                layout, _, path = layout.partition("/")
                fmt = bp.BitplaneFormat(bits, layout=layout)
                with _lut_path(path, bits):
                    layer = kernels.build(kernels.dense_act_func(fmt, n, k, bias=False), _target(mcpu))
                layers.append((layer, _t(bp.pack_weights(q, fmt))))
            w_scale = _t(np.full(n, 1e-3, np.float32))
            for batch in args.batches:
                x = _t(rng.standard_normal((batch, k)).astype(np.float32))
                out = [_t(np.zeros((batch, n), np.float32)) for _ in layers]
                times: list[list[float]] = [[] for _ in layers]
                for _ in range(args.rounds):
                    for i, (layer, wp) in enumerate(layers):
                        layer(x, wp, w_scale, bits, out[i])  # wakes the thread pool
                        t0 = time.perf_counter()
                        for _ in range(args.calls):
                            layer(x, wp, w_scale, bits, out[i])
                        times[i].append((time.perf_counter() - t0) / args.calls * 1e6)
                for o in out[1:]:
                    np.testing.assert_array_equal(out[0].numpy(), o.numpy())
                med = [statistics.median(t) for t in times]
                cells = [f"{m:,.0f}" + ("" if i == 0 else f" ({med[0] / m:.2f}x)") for i, m in enumerate(med)]
                print(f"| {n}x{k} | {bits} | {batch} | {' | '.join(cells)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
