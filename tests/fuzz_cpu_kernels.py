"""Random-shape exactness sweep of the CPU byte-code kernels for every x86 instruction set this host runs.

Not collected by pytest (a manual sweep, minutes long): each case draws a kernel (the integer
GEMM, the one-kernel float layer or the decoder's LSTM step), a format, N, K, a batch and a
build (``host``; ``host:amx@1``: with AMX-INT8, its tile loops from one activation row
instead of :func:`pbtvm.ops.amx_gemm.amx_min_batch`; ``host:prefetch``: the AVX-512 GFNI loops
prefetching the planes at every size, not only from
:data:`pbtvm.ops.vnni_rows.PREFETCH_AHEAD_MIN_BYTES`; ``alderlake``: AVX-VNNI + ymm GFNI;
``alderlake:-gfni``; ``haswell``: AVX2; ``haswell:lut16x4``: its table lookup, weights in that layout),
builds it with the default rule and checks it as the tests do: the GEMM equals the numpy
reference at every ``bitlayers`` (and at a smaller batch on the same build), the float layer and
the step equal the popcount kernels' results. Builds the host cannot run are left out (on an
AVX2-only host only ``haswell``).

Usage::

    python tests/fuzz_cpu_kernels.py [--seed 1] [--cases 200] [--kinds gemm dense lstm]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pbtvm import bitplane as bp
from pbtvm import kernels
from pbtvm import quantize as qz
from pbtvm._tvm import tvm
from pbtvm.bitplane.lut_layout import LUT_LAYOUT
from pbtvm.ops import amx_gemm, vnni_rows
from pbtvm.ops.gfni_decode import CPU_FEATURES as GFNI
from pbtvm.ops.pb_vnni import target_supports
from pbtvm.target import resolve_target
from tests.test_cpu_avx_vnni import _host_has_avx_vnni
from tests.test_cpu_one_kernel_layer import _rows, assert_same_floats
from tests.test_cpu_vnni import _codes, _t, assert_exact_at_every_bitlayers
from tests.test_cpu_vnni_lstm import assert_step_matches, input_step_case


def _builds() -> dict:
    host = resolve_target("llvm")
    builds = {"host": host} if target_supports(host, ("avx512bw", "avx512vnni")) else {}
    if builds and target_supports(host, amx_gemm.AMX_FEATURES):
        builds[AMX_FROM_ONE] = host
    if builds and target_supports(host, GFNI):
        builds[PREFETCH_ALL] = host
    if _host_has_avx_vnni():
        builds["alderlake"] = tvm.target.Target({"kind": "llvm", "mcpu": "alderlake"})
        builds["alderlake:-gfni"] = tvm.target.Target({"kind": "llvm", "mcpu": "alderlake", "mattr": ["-gfni"]})
    if target_supports(host, ("avx2",)):
        builds["haswell"] = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
        builds[LUT_BUILD] = builds["haswell"]
    return builds


#: The host build with the AMX loops from one activation row (every kernel kind).
AMX_FROM_ONE = "host:amx@1"
#: The host build prefetching the planes in layers of any size.
PREFETCH_ALL = "host:prefetch"
#: The AVX2 table-lookup kernels (weights in ``lut16x4``; past a few rows each row decoded once).
LUT_BUILD = "haswell:lut16x4"


@contextlib.contextmanager
def _prefetch_all(on: bool):
    """Build with the AVX-512 GFNI loops prefetching the planes of every layer (``on``)."""
    default = vnni_rows.PREFETCH_AHEAD_MIN_BYTES
    vnni_rows.PREFETCH_AHEAD_MIN_BYTES = 0 if on else default
    try:
        yield
    finally:
        vnni_rows.PREFETCH_AHEAD_MIN_BYTES = default


@contextlib.contextmanager
def _amx_from(rows: int | None):
    """Build with the AMX loops from ``rows`` activation rows (None: the default)."""
    default = amx_gemm.AMX_MIN_BATCH
    amx_gemm.AMX_MIN_BATCH = (rows, rows) if rows else default
    try:
        yield
    finally:
        amx_gemm.AMX_MIN_BATCH = default


def _both(func, target):
    """The byte-code build and the popcount build of ``func``."""
    os.environ.pop("PBTVM_CPU_KERNEL", None)
    fast = kernels.build(func, target)
    os.environ["PBTVM_CPU_KERNEL"] = "popcount"
    try:
        return fast, kernels.build(func, target)
    finally:
        os.environ.pop("PBTVM_CPU_KERNEL", None)


def _case(kind: str, rnd: random.Random, rng, target, layout: str = "kNW") -> str:
    """Run one random case in weight ``layout``; returns its description."""
    if kind == "gemm":
        bits = rnd.randint(1, 8)
        codebook = "bipolar" if bits == 1 else rnd.choice(["twos_complement", "offset_binary"])
        fmt = bp.BitplaneFormat(bits, rnd.choice([2, 4, 5, 6, 8, 8]), codebook, layout=layout)
        n = rnd.choice([1, 16, 17, 65, rnd.randint(1, 400)])
        k = rnd.choice([rnd.randint(1, 3000), 512, 600, 650, 768, 1040, 1100])
        q, xq = _codes(
            rng,
            fmt,
            n,
            k,
            rnd.choice([rnd.randint(1, 12), rnd.randint(1, 12), rnd.randint(13, 70), rnd.randint(65, 160)]),
        )
        kern = kernels.build(kernels.int_product_func(fmt, n, k), target)
        assert_exact_at_every_bitlayers(kern, fmt, q, xq)
        assert_exact_at_every_bitlayers(kern, fmt, q, xq[: max(1, len(xq) // 2)])
        return f"{fmt.name} {n}x{k} batch {len(xq)}"
    fmt = bp.BitplaneFormat(rnd.randint(2, 8), 8, layout=layout)
    if kind == "dense":
        n, k, b = (
            rnd.choice([1, 17, 130, rnd.randint(1, 300)]),
            rnd.choice([rnd.randint(1, 2500), 650, 1040]),
            rnd.randint(1, 10),
        )
        q, ws = qz.quantize_weights(rng.standard_normal((n, k)).astype(np.float32), fmt)
        fast, slow = _both(kernels.dense_act_func(fmt, n, k, True), target)
        weights = [_t(bp.pack_weights(q, fmt)), _t(ws), _t(rng.standard_normal(n).astype(np.float32))]
        assert_same_floats(fast, slow, _rows(rng, b, k), weights, n, sorted({1, fmt.bits}))
        return f"{fmt.name} {n}x{k} batch {b}"
    n_in, hidden = (
        rnd.choice([40, 600, 650, 1100, rnd.randint(1, 1300)]),
        rnd.choice([16, 130, 520, rnd.randint(1, 700)]),
    )
    batch = rnd.choice([1, 2, 4, 5, 6, 9])
    fast, slow = _both(kernels.lstm_cell_input_func(fmt, n_in, hidden, True), target)
    arrays = input_step_case(rng, fmt, n_in, hidden, batch)
    assert_step_matches(fast, slow, arrays, sorted({1, fmt.bits}), fmt, batch, hidden)
    return f"{fmt.name} {n_in}->{hidden} batch {batch}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cases", type=int, default=200)
    p.add_argument("--kinds", nargs="+", default=["gemm", "dense", "lstm"], choices=["gemm", "dense", "lstm"])
    args = p.parse_args()
    builds = _builds()
    print(f"builds: {', '.join(builds) or 'none (no AVX2)'}", flush=True)
    rnd, failed, start = random.Random(args.seed), 0, time.time()
    for i in range(args.cases if builds else 0):
        kind, name = rnd.choice(args.kinds), rnd.choice(list(builds))
        try:
            with _amx_from(1 if name == AMX_FROM_ONE else None), _prefetch_all(name == PREFETCH_ALL):
                layout = LUT_LAYOUT if name == LUT_BUILD else "kNW"
                what, status = _case(kind, rnd, np.random.default_rng([args.seed, i]), builds[name], layout), "ok"
        except Exception as err:  # report and go on: the sweep lists every failing case
            what, status = "", f"FAILED {type(err).__name__}: {str(err)[:300]}"
            failed += 1
        print(f"{i} {kind} {name} {what} {status}", flush=True)
    print(f"{args.cases} cases, {failed} failed, {time.time() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
