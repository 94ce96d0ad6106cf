"""Rotten Tomatoes sentence classifier (LSTM): test accuracy of fp32 vs PB W1..W8 and act_bits.

Our offline stand-in for the paper's SNLI task. Runs on the CPU (accuracy does not depend on the
target); ``python benchmarks/sentiment_accuracy.py [--epochs 3]``. Prints a markdown table last.
"""

import argparse
import time

from pbtvm.apps.sentiment import PBSentenceLSTM, accuracy, load_reviews, train_classifier

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--target", default="llvm")
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
