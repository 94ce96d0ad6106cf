"""The run-time ``bitlayers`` knob by codebook, and whether per-row refitted levels would help it.

A float simulation of the built-in MNIST MLP (``python -m pbtvm.apps.demo``'s model, held-out
1,000 digits, activations not quantized): each layer's weights are quantized by
:func:`pbtvm.quantize.quantize_weights` (the default ``"mse"`` fit) and rebuilt from their top
``bitlayers`` planes two ways:

* **kernels**: what every PB kernel computes, ``s (sum_top c_i b_i + corr - z)`` with ``corr =
  (2^(k-L) - 1) / 2`` (:meth:`pbtvm.bitplane.BitplaneFormat.truncation_correction`);
* **least squares**: per row and per ``bitlayers``, the affine map ``a * sum_top c_i b_i + d``
  closest to the float row (what a per-row, per-L scale and offset in the epilogue could give).

Run ``python benchmarks/bitlayers_codebook.py`` (under a minute on 2 cores). Prints a markdown
table last. The compiled models' own numbers are the demo's knob table.
"""

from __future__ import annotations

import numpy as np
import torch

from pbtvm.apps.examples import builtin_mnist_mlp
from pbtvm.bitplane import BitplaneFormat
from pbtvm.quantize import quantize_weights


def top_plane_codes(q: np.ndarray, fmt: BitplaneFormat, bitlayers: int) -> np.ndarray:
    """``sum_top c_i b_i``: the codes with their low ``bits - bitlayers`` planes dropped, float64."""
    k = fmt.bits
    pattern = q.astype(np.int64) % 2**k  # two's complement codes as their bit pattern
    top = (pattern >> (k - bitlayers)) << (k - bitlayers)
    if fmt.weight_signed:
        top = np.where(top >= 2 ** (k - 1), top - 2**k, top)
    return top.astype(np.float64)


def rebuilt_weights(w: np.ndarray, fmt: BitplaneFormat, bitlayers: int, how: str) -> np.ndarray:
    """The float weights [N, K] a layer computes with at ``bitlayers`` planes (``how``: kernels / lsq)."""
    q, params = quantize_weights(w, fmt)
    scale, zero = (params[0], params[1]) if fmt.has_zero_point else (params, np.zeros(len(params)))
    top = top_plane_codes(q, fmt, bitlayers)
    if how == "kernels":
        return scale[:, None] * (top + fmt.truncation_correction(bitlayers) - zero[:, None])
    mean_t, mean_w = top.mean(1, keepdims=True), w.mean(1, keepdims=True)
    var_t = ((top - mean_t) ** 2).sum(1, keepdims=True)
    slope = np.where(var_t > 0, ((top - mean_t) * (w - mean_w)).sum(1, keepdims=True) / np.maximum(var_t, 1e-300), 0)
    return slope * (top - mean_t) + mean_w


def main() -> None:
    model, split = builtin_mnist_mlp()
    layers = [m for m in model if isinstance(m, torch.nn.Linear)]
    weights = [m.weight.detach().double().numpy() for m in layers]
    biases = [m.bias.detach().double().numpy() for m in layers]

    def accuracy(ws: list[np.ndarray]) -> float:
        h = split.x_test.astype(np.float64)
        for i, (w, b) in enumerate(zip(ws, biases, strict=True)):
            h = h @ w.T + b
            h = np.maximum(h, 0) if i < len(ws) - 1 else h
        return 100.0 * float((h.argmax(1) == split.y_test).mean())

    print(f"fp32 {accuracy(weights):.1f}%", flush=True)
    rows = []
    for codebook in ("offset_binary", "twos_complement"):
        for bits in (3, 4, 8):
            fmt = BitplaneFormat(bits, 8, codebook)
            for bitlayers in range(1, bits + 1):
                accs = [
                    accuracy([rebuilt_weights(w, fmt, bitlayers, how) for w in weights]) for how in ("kernels", "lsq")
                ]
                rows.append((codebook, bits, bitlayers, *accs))
                print(rows[-1], flush=True)
    print("\n| codebook | bits | bitlayers | accuracy % (kernels) | accuracy % (least-squares levels) |")
    print("|---|---|---|---|---|")
    for codebook, bits, bitlayers, kern, lsq in rows:
        print(f"| {codebook} | {bits} | {bitlayers} | {kern:.1f} | {lsq:.1f} |")


if __name__ == "__main__":
    main()
