"""Activation rows whose codes are hard to round: products ``x * inv`` a few ulps from ``m + 0.5``.

A kernel that lets a fused multiply-add compute ``x * inv + 0.5`` rounds once where the reference
rounds the product first, and gets another code for such values (TVM's LLVM backend contracts
every multiply-add). Random rows almost never contain one, so tests of the activation codes mix
these in.
"""

from __future__ import annotations

import numpy as np

from pbtvm.bitplane import BitplaneFormat


def near_tie_rows(rng: np.random.Generator, b: int, k: int, fmt: BitplaneFormat) -> np.ndarray:
    """Rows of products 0-3 ulps from a half (and exact halves), float32 [b, k].

    Each row has its own max ``amax`` (its first entry, sign random), so ``inv = qmax / amax`` as
    :func:`pbtvm.quantize.quantize_activations` computes it; the rest are ``(m + 0.5) / inv``
    moved 0-3 float32 steps up or down. Row 0 has ``amax = qmax`` (``inv`` exactly 1) and, for
    ``qmax >= 3``, holds ``+-0.49999997`` (float32 ``p + 0.5`` rounds it up to 1) and exact halves.
    """
    qmax = np.float32(fmt.act_qmax)
    x = np.empty((b, k), np.float32)
    for row in range(b):
        amax = qmax if row == 0 else np.float32(rng.uniform(0.01, 100))
        inv = np.float32(qmax / amax)
        m = rng.integers(-int(qmax), int(qmax), k)
        v = ((m + 0.5) / np.float64(inv)).astype(np.float32)
        for _ in range(3):
            step = rng.integers(0, 2, k).astype(bool)
            v = np.where(step, np.nextafter(v, np.where(rng.random(k) < 0.5, np.inf, -np.inf).astype(np.float32)), v)
        x[row] = np.clip(v, -amax, amax)
        x[row, 0] = amax if rng.random() < 0.5 else -amax
    if k >= 6 and qmax >= 3:  # inside row 0's range
        below_half = np.nextafter(np.float32(0.5), np.float32(0))
        x[0, 1:6] = [below_half, -below_half, 0.5, -1.5, 2.5]
    return x


def extreme_rows(rng: np.random.Generator, k: int) -> np.ndarray:
    """Six rows of extreme ranges, float32 [6, k]: a finite row holding +-FLT_MAX (once taken for an
    infinite row), rows around 1e-38 with zeros and -0.0 and of subnormals (whose ``qmax / max|x|``
    overflowed: every code +-qmax, zeros NaN), one with +-inf entries, one near 1e-20 and one of zeros.
    """
    big = np.finfo(np.float32).max
    x = rng.standard_normal((6, k)).astype(np.float32)
    x[0, 0], x[0, k // 2] = big, -big
    x[1] *= np.float32(1e-38)
    x[1, 1 % k] = 0.0
    x[1, 2 % k] = -0.0
    x[2] *= np.float32(1e-44)
    x[3, 0], x[3, k - 1] = np.inf, -np.inf
    x[4] *= np.float32(3e-20)
    x[5] = 0.0
    return x
