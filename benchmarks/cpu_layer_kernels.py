"""One PB layer's kernels on the CPU, each timed alone, beside torch fp32 (issues 14 and 19).

For each shape: the activation pack kernel, the AVX-512 GEMM on packed planes, the popcount GEMM,
the one-kernel layer (quantize + AVX-512 GEMM, what ``pbtvm.compile`` uses on AVX-512 CPUs) and
``torch.nn.Linear`` fp32. ``--clock thread`` reports CPU time of the calling thread
(``time.thread_time``), which stays meaningful on a loaded machine; use it with
``TVM_NUM_THREADS=1`` (torch is set to one thread here)::

    TVM_NUM_THREADS=1 python benchmarks/cpu_layer_kernels.py --clock thread
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pbtvm import bitplane as bp
from pbtvm import kernels
from pbtvm import quantize as qz
from pbtvm._tvm import tvm
from pbtvm.schedules.cpu import CPUBitplaneGemm
from pbtvm.target import resolve_target

SHAPES = [(512, 784, 1), (512, 512, 1), (10, 512, 1), (512, 784, 8), (4096, 4096, 1), (4096, 4096, 8)]


def median_us(fn, args: list, clock, n: int) -> float:
    for _ in range(max(3, n // 20)):
        fn(*args)
    times = []
    for _ in range(5):
        t = clock()
        for _ in range(n):
            fn(*args)
        times.append((clock() - t) / n * 1e6)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--codebook", default=None)
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall")
    args = ap.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    torch.set_num_threads(1)
    target, dev = resolve_target("llvm"), tvm.cpu()
    fmt = bp.BitplaneFormat(args.bits, 8, args.codebook)
    rng = np.random.default_rng(0)

    def t(a: np.ndarray):
        return tvm.runtime.tensor(np.ascontiguousarray(a), dev)

    print(f"{fmt.name}, {args.clock} clock, µs per call (median of 5 runs)")
    print("| N×K | batch | pack | AVX-512 GEMM | popcount GEMM | pack + AVX-512 | one-kernel layer | torch fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for n, k, b in SHAPES:
        reps = 20 if n * k > 4_000_000 else 400
        q, s = qz.quantize_weights(rng.standard_normal((n, k)).astype(np.float32), fmt)
        x = rng.standard_normal((b, k)).astype(np.float32)
        xp, xs = t(np.zeros((fmt.act_bits, b, fmt.words(k)), np.uint32)), t(np.zeros(b, np.float32))
        rs, out = t(np.zeros(b, fmt.accumulator_dtype(k))), t(np.zeros((b, n), np.float32))
        weights = [t(bp.pack_weights(q, fmt)), t(s), t(np.zeros(n, np.float32))]
        pack = kernels.build(kernels.act_pack_func(fmt, k), target)
        dense_func = kernels.dense_func(fmt, n, k, True)
        avx = kernels.build(dense_func, target)
        popcount = kernels.build(CPUBitplaneGemm(target).apply(dense_func).mod["main"], target, schedule=False)
        one = kernels.build(kernels.dense_act_func(fmt, n, k, True), target)
        dense_args = [xp, xs, rs, *weights, fmt.bits, out]
        times = [
            median_us(pack, [t(x), xp, xs, rs], clock, reps),
            median_us(avx, dense_args, clock, reps),
            median_us(popcount, dense_args, clock, reps),
        ]
        times.append(times[0] + times[1])
        times.append(median_us(one, [t(x), *weights, fmt.bits, out], clock, reps))
        lin, xt = torch.nn.Linear(k, n), torch.from_numpy(x)
        with torch.no_grad():
            times.append(median_us(lin, [xt], clock, reps))
        print(f"| {n}×{k} | {b} | " + " | ".join(f"{v:,.1f}" for v in times) + " |", flush=True)


if __name__ == "__main__":
    main()
