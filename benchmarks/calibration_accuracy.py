"""Calibration vs data-free weight quantization: the weighted error, MNIST accuracy, fitting time.

Three measurements, printed as markdown tables:

1. **The error calibration minimizes**, ``sum_k c_k (w_nk - w'_nk)^2`` with ``c`` the mean squares
   ``E[x_k^2]`` scaled to mean 1 and floored at 1e-3 (:func:`pbtvm.weight_fit.column_weights`), data-free vs
   calibrated fit, on a 32 x 64 matrix whose input 0 has ``power`` times the others' mean square
   (its weights small, as in a layer fed by an outlier feature). Before the fix the calibrated fit
   took its clip range from input 0 alone past ``power`` ~ 100 K and clipped every other weight.
2. **MNIST MLP accuracy** (the built-in model, ``python -m pbtvm.apps.demo``'s) of the compiled PB
   models at W1-W4, full bitlayers, with and without ``calibration=`` 2,000 training digits.
3. **Fitting time** of one 2048 x 4096 matrix, data-free and calibrated, per codebook.

Run ``python benchmarks/calibration_accuracy.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import time

import numpy as np
import torch

import pbtvm
from pbtvm import bitplane as bp
from pbtvm import quantize as qz
from pbtvm import weight_fit
from pbtvm.apps.examples import accuracy, builtin_mnist_mlp, torch_accuracy


def weighted_errors() -> None:
    rng = np.random.default_rng(0)
    w = (0.5 * rng.standard_normal((32, 64))).astype(np.float32)
    w[:, 0] = 0.01 * rng.standard_normal(32)
    print("\n| input 0 power | codebook | bits | weighted error data-free | calibrated | calibrated / data-free |")
    print("|---|---|---|---|---|---|")
    for power in (30, 1e3, 1e4, 1e6):
        importance = np.ones(64)
        importance[0] = power
        weights = weight_fit.column_weights(importance, 64)  # what the fit minimizes: mean 1, floor 1e-3
        for codebook in ("twos_complement", "offset_binary"):
            for bits in (4, 8):
                fmt = bp.BitplaneFormat(bits, 8, codebook)
                errors = []
                for imp in (None, importance):
                    q, s = qz.quantize_weights(w, fmt, importance=imp)
                    errors.append(float(((qz.dequantize_weights(q, s, fmt) - w) ** 2 @ weights).sum()))
                print(
                    f"| {power:g} | {codebook} | {bits} | {errors[0]:.4g} | {errors[1]:.4g} | {errors[1] / errors[0]:.3f} |"
                )


def mnist_accuracy() -> None:
    model, split = builtin_mnist_mlp()
    example = (torch.from_numpy(split.x_train[:2]),)
    batches = [torch.from_numpy(split.x_train[i : i + 500]) for i in range(0, 2000, 500)]
    print(
        f"\nfp32 (torch): {torch_accuracy(model, split.x_test, split.y_test):.1f} % on {len(split.y_test)} test digits"
    )
    print("\n| weights | data-free % | calibrated % | codebooks (calibrated) |")
    print("|---|---|---|---|")
    for bits in (1, 2, 3, 4):
        accs = []
        for calibration in (None, batches):
            m = pbtvm.compile(model, example, "llvm", bits=bits, calibration=calibration)
            accs.append(accuracy(m, split.x_test, split.y_test))
        codebooks = sorted({layer["codebook"] for layer in m.manifest["layers"]["converted"]})
        print(f"| W{bits}A8 | {accs[0]:.1f} | {accs[1]:.1f} | {', '.join(codebooks)} |")


def fitting_time() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2048, 4096)).astype(np.float32)
    importance = rng.random(4096) ** 4  # unequal inputs, some nearly never active
    print("\n| codebook (W4) | data-free s | calibrated s | ratio |")
    print("|---|---|---|---|")
    for codebook in ("twos_complement", "offset_binary"):
        fmt = bp.BitplaneFormat(4, 8, codebook)
        seconds = []
        for imp in (None, importance):
            t0 = time.perf_counter()
            qz.quantize_weights(w, fmt, importance=imp)
            seconds.append(time.perf_counter() - t0)
        print(f"| {codebook} | {seconds[0]:.2f} | {seconds[1]:.2f} | {seconds[1] / seconds[0]:.2f} |")


if __name__ == "__main__":
    weighted_errors()
    mnist_accuracy()
    fitting_time()
