"""Per-call cost of small PB models at batch 1 on the CPU, beside torch fp32 (issue 19).

Prints median µs per call for a tiny 32-32-32-10 MLP (almost no arithmetic: the fixed cost of a
call), the built-in MNIST MLP, and single W4 layers at batch 1 and 8. Run it twice, with
``PBTVM_CPU_KERNEL=popcount`` and/or ``TVM_NUM_THREADS=1`` to compare kernels and thread pools.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

import pbtvm
from pbtvm.apps.examples import builtin_mnist_mlp


def median_us(fn, x, n: int = 300) -> float:
    fn(x)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e6)


def main() -> None:
    print(
        f"kernel={os.environ.get('PBTVM_CPU_KERNEL', 'default')} TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', '-')}"
    )
    torch.manual_seed(0)
    tiny = torch.nn.Sequential(
        torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    ).eval()
    mnist, split = builtin_mnist_mlp()
    cases = [
        ("tiny 32-32-32-10", tiny, torch.randn(2, 32)),
        ("MNIST 784-512-512-10", mnist, torch.from_numpy(split.x_test[:2])),
    ]
    with torch.no_grad():
        for name, model, example in cases:
            pb = pbtvm.compile(model, (example,), target="llvm", bits=4)
            x = example[:1]
            print(f"{name:<22} torch fp32 {median_us(model, x):7.0f} us   PB W4 {median_us(pb, x):7.0f} us")
        for n, k in [(512, 784), (1024, 1024), (2048, 2048)]:
            layer = torch.nn.Linear(k, n).eval()
            pb = pbtvm.compile(layer, (torch.randn(2, k),), target="llvm", bits=4)
            b1, b8 = median_us(pb, torch.randn(1, k), 200), median_us(pb, torch.randn(8, k), 200)
            print(f"layer {n}x{k:<6}        PB W4 batch 1 {b1:7.0f} us   batch 8 {b8:7.0f} us")


if __name__ == "__main__":
    main()
