"""A dense model compiled for one batch size (``dynamic_batch=False``) vs a dynamic batch, on the CPU.

With a static batch every dense layer's rows are known when it compiles, so ``layout="auto"``
can take the table-lookup layout (``lut16x4``) on AVX2 CPUs without AVX-512 VNNI where no layer
runs more than 2 rows (:func:`pbtvm.target.weight_layout`); with a dynamic batch it takes it on
AVX2 CPUs without AVX-VNNI (past a few rows that kernel decodes each weight row once). This times
the same model compiled four ways (dynamic batch / auto; dynamic / ``kNW``; static / auto; static
/ ``kNW``) in alternating rounds of
``--calls`` calls (median of ``--rounds``), checks their outputs agree, and prints each one's
layout, µs per call and its speed relative to the dynamic-batch build. The model is the MNIST
MLP's shape (784-512-512-10) with random weights, or ``--hidden`` wider.

    python benchmarks/bench_static_batch.py --batch 1 --bits 4 [--target "llvm -mcpu=haswell"]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch

import pbtvm


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--target", default="llvm", help='e.g. "llvm -mcpu=haswell": the AVX2 kernels on this host')
    return p.parse_args()


def main() -> None:
    args = _parse()
    torch.manual_seed(0)
    h = args.hidden
    model = torch.nn.Sequential(
        torch.nn.Linear(784, h), torch.nn.ReLU(), torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 10)
    ).eval()
    x = torch.randn(args.batch, 784)
    builds = {
        "dynamic batch, auto": {},
        "dynamic batch, kNW": {"layout": "kNW"},
        "static batch, auto": {"dynamic_batch": False},
        "static batch, kNW": {"dynamic_batch": False, "layout": "kNW"},
    }
    models = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, options in builds.items():
            models[name] = pbtvm.compile(model, (x,), target=args.target, bits=args.bits, **options)
    xs = x.numpy()
    reference = np.asarray(models["dynamic batch, auto"](xs))
    for name, m in models.items():
        diff = float(np.abs(np.asarray(m(xs)) - reference).max())
        print(f"{name}: layout {m.format.layout}, max |output - dynamic batch's| = {diff:.2e}")
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, m in models.items():
            for _ in range(args.calls // 10):  # warm: its threads awake, its weights in cache
                m(xs)
            start = time.perf_counter()
            for _ in range(args.calls):
                m(xs)
            times[name].append(1e6 * (time.perf_counter() - start) / args.calls)
    base = statistics.median(times["dynamic batch, auto"])
    print(
        f"\n784-{h}-{h}-10 MLP, W{args.bits}, batch {args.batch}, target {args.target!r}, "
        f"median of {args.rounds} rounds of {args.calls} calls"
    )
    print(f"{'build':<22}{'layout':>9}{'us/call':>10}{'speed vs dynamic':>18}")
    for name, m in models.items():
        us = statistics.median(times[name])
        print(f"{name:<22}{m.format.layout:>9}{us:>10.1f}{base / us:>17.2f}x")


if __name__ == "__main__":
    main()
