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
first; the float outputs of all variants are checked equal before timing. ``--kernel lstm_step``
times the decoder's LSTM step instead (its input projection inside,
:func:`pbtvm.kernels.lstm_cell_input_func`; ``--shapes HIDDENxINPUT``), whose ``h'`` and ``c'``
the variants must give bit for bit too.

Usage::

    python benchmarks/bench_cpu_isas.py [--variants kNW@haswell kNW@alderlake lut16x4@haswell]
        [--shapes 2600x1300 10000x650 4096x4096] [--bits 2 4 8] [--batches 1 2 4 8 16]
    python benchmarks/bench_cpu_isas.py --kernel lstm_step --shapes 650x650 --variants kNW@haswell lut16x4@haswell
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
    p.add_argument("--kernel", choices=["dense", "lstm_step"], default="dense")
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


def in_turns(calls: list, rounds: int, per_round: int) -> list[float]:
    """Median µs per call of each of ``calls`` (no-argument callables), which take turns for
    ``rounds`` rounds of ``per_round`` calls each (one untimed call first: it wakes the thread
    pool), so that a noisy neighbour slows them alike."""
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for i, call in enumerate(calls):
            call()
            t0 = time.perf_counter()
            for _ in range(per_round):
                call()
            times[i].append((time.perf_counter() - t0) / per_round * 1e6)
    return [statistics.median(t) for t in times]


def ratio_cells(med: list[float]) -> list[str]:
    """Table cells: each time, and after the first its speed-up over the first."""
    return [f"{m:,.0f}" + ("" if i == 0 else f" ({med[0] / m:.2f}x)") for i, m in enumerate(med)]


def _build(kernel: str, variants: list, n: int, k: int, bits: int, rng) -> list:
    """Per variant ``(built kernel, its weights)``: the same codes in every layout (one random
    draw per shape and bits, both legs of the LSTM step)."""
    lo, hi = bp.BitplaneFormat(bits).weight_code_range
    shapes = [(n, k)] if kernel == "dense" else [(4 * n, k), (4 * n, n)]  # the step: W_ih, W_hh
    codes = [rng.integers(lo, hi, shape, endpoint=True) for shape in shapes]
    if bits == 1:  # bipolar codes
        codes = [2 * (q > 0) - 1 for q in codes]
    layers = []
    for layout, mcpu in variants:
        layout, _, path = layout.partition("/")
        fmt = bp.BitplaneFormat(bits, layout=layout)
        func = (
            kernels.dense_act_func(fmt, n, k, bias=False)
            if kernel == "dense"
            else kernels.lstm_cell_input_func(fmt, k, n, True)
        )
        with _lut_path(path, bits):
            layer = kernels.build(func, _target(mcpu))
        layers.append((layer, [_t(bp.pack_weights(q, fmt)) for q in codes]))
    return layers


def _operands(kernel: str, layer: tuple, n: int, k: int, batch: int, bits: int) -> tuple:
    """``(kernel, its arguments, its outputs)`` for one variant at ``batch`` rows: the same float
    operands for every variant (a draw seeded by the shape, batch and bits)."""
    built, weights = layer
    draw = np.random.default_rng([n, k, batch, bits])  # every variant gets the same operands
    x = _t(draw.standard_normal((batch, k)).astype(np.float32))
    if kernel == "dense":
        out = _t(np.zeros((batch, n), np.float32))
        return built, [x, weights[0], _t(np.full(n, 1e-3, np.float32)), bits, out], [out]
    w_ih, w_hh = weights
    scale, bias = _t(np.full(4 * n, 1e-2, np.float32)), _t(draw.standard_normal(4 * n).astype(np.float32))
    h, c = (_t(draw.standard_normal((batch, n)).astype(np.float32)) for _ in range(2))
    h_out, c_out = (_t(np.zeros((batch, n), np.float32)) for _ in range(2))
    return built, [x, w_ih, scale, bias, h, c, w_hh, scale, bits, h_out, c_out], [h_out, c_out]


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
            layers = _build(args.kernel, variants, n, k, bits, rng)
            for batch in args.batches:
                calls = [_operands(args.kernel, layer, n, k, batch, bits) for layer in layers]
                for built, operands, _ in calls:
                    built(*operands)
                for _, _, outs in calls[1:]:  # every output of every variant equal to the first's
                    for first, out in zip(calls[0][2], outs, strict=True):
                        np.testing.assert_array_equal(first.numpy(), out.numpy())
                med = in_turns([lambda c=c: c[0](*c[1]) for c in calls], args.rounds, args.calls)
                print(f"| {n}x{k} | {bits} | {batch} | {' | '.join(ratio_cells(med))} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
