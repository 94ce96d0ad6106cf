"""Rotten Tomatoes sentence classifier (LSTM): test accuracy of fp32 vs PB W1..W8 and act_bits.

Our offline stand-in for the paper's SNLI task. Runs on the CPU (accuracy does not depend on the
target); ``python benchmarks/sentiment_accuracy.py [--epochs 3]``. Prints a markdown table last.

``--calibrate N`` (e.g. 256) adds a second table: the whole classifier compiled by
:func:`pbtvm.compile` (embedding lookup, the LSTM lowered in the module, PB head) at
``--calib-bits`` (default 1 2 3 4), data-free and with ``calibration=`` N **training** snippets
(evenly spaced over the training split, in batches of 64 as the module takes them, ``tokens [B,
48]``); never a test snippet. The data-free whole-model numbers should equal the first table's
(the same quantizer; the first table's LSTM comes from ``compile_lstm``).
"""

import argparse
import time

import numpy as np
import torch

import pbtvm
from pbtvm.apps.sentiment import PBSentenceLSTM, accuracy, load_reviews, train_classifier

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--target", default="llvm")
parser.add_argument("--calibrate", type=int, default=0, help="training snippets to calibrate with (0: no second table)")
parser.add_argument("--calib-bits", type=int, nargs="+", default=[1, 2, 3, 4])
args = parser.parse_args()

t0 = time.time()
data = load_reviews()
model = train_classifier(data, epochs=args.epochs)
fp32 = accuracy(model, data)
rows = [("fp32 (torch)", fp32)]
for bits in range(1, 9):
    rows.append((f"PB W{bits}A8", accuracy(PBSentenceLSTM(model, args.target, bits), data)))
for act_bits in (4, 6, 16):
    rows.append((f"PB W4A{act_bits}", accuracy(PBSentenceLSTM(model, args.target, 4, act_bits), data)))
print(
    f"\nRotten Tomatoes fresh/rotten, {len(data.y_train)} train / {len(data.y_test)} test snippets, "
    f"LSTM 64-128, {args.epochs} epochs ({time.time() - t0:.0f}s)"
)
print("| model | test accuracy % | vs fp32 |\n|---|---|---|")
for name, acc in rows:
    print(f"| {name} | {acc:.1f} | {acc - fp32:+.1f} |")

if args.calibrate:
    picked = np.linspace(0, len(data.x_train) - 1, args.calibrate).round().astype(np.int64)
    snippets = torch.from_numpy(data.x_train[picked])
    batches = [(snippets[i : i + 64],) for i in range(0, len(snippets), 64)]
    example = (torch.from_numpy(data.x_test[:2]),)
    table = []
    for bits in args.calib_bits:
        results = []
        for calibration in (None, batches):
            start = time.time()
            compiled = pbtvm.compile(model, example, args.target, bits, calibration=calibration)
            seconds = time.time() - start
            results.append((accuracy(compiled, data), seconds))
            print(f"W{bits}A8 {'calibrated' if calibration else 'data-free'}: {results[-1][0]:.2f} % ({seconds:.1f} s)")
        table.append((bits, results))
    print(f"\nWhole classifier by pbtvm.compile, calibration = {args.calibrate} training snippets")
    print("| weights | accuracy % data-free | vs fp32 | calibrated | vs fp32 | compile s data-free / calibrated |")
    print("|---|---|---|---|---|---|")
    print(f"| fp32 (torch) | {fp32:.2f} | | | | |")
    for bits, ((free, t_free), (cal, t_cal)) in table:
        print(
            f"| W{bits}A8 | {free:.2f} | {free - fp32:+.2f} | {cal:.2f} | {cal - fp32:+.2f} | {t_free:.1f} / {t_cal:.1f} |"
        )
