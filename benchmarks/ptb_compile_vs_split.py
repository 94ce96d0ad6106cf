"""PTB perplexity: the whole LM through ``pbtvm.compile`` vs the hand-split model (issue 15).

The hand-split model is what tutorial 02 used before the compiler lowered LSTMs:
``compile_lstm`` for the LSTM, ``pbtvm.compile`` of the head, the embedding in torch. The whole
model is :class:`pbtvm.apps.ptb.PBWordLM` (one ``pbtvm.compile`` of embedding + LSTM + head). Both
use the same format, quantizer and kernels, so their perplexities should agree within 0.1 %.

Run: ``python benchmarks/ptb_compile_vs_split.py [--quick]``.
"""

import argparse
import time

import torch

import pbtvm
from pbtvm.apps.ptb import PBWordLM, load_ptb, perplexity, train_word_lm
from pbtvm.lstm import compile_lstm

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true", help="tutorial 02's --quick model and test slice")
parser.add_argument("--bits", default="1,2,3,4,5,6,8")
parser.add_argument("--act-bits", type=int, default=8)
args = parser.parse_args()


class SplitLM:
    """The pre-issue-15 tutorial model: compile_lstm + compiled head, embedding in torch."""

    def __init__(self, model, bits, act_bits):
        self.embedding = model.embedding
        self.lstm = compile_lstm(model.lstm, "llvm", bits, act_bits)
        self.head = pbtvm.compile(model.head, (torch.zeros(2, model.head.in_features),), "llvm", bits, act_bits)

    def __call__(self, tokens, state=None):
        with torch.no_grad():
            emb = self.embedding(tokens)
        y, state = self.lstm(emb, state)
        steps, batch, hidden = y.shape
        return self.head(y.reshape(steps * batch, hidden)).reshape(steps, batch, -1), state


data = load_ptb()
hidden = 128 if args.quick else 256
model = train_word_lm(data, hidden=hidden, epochs=1 if args.quick else 2, max_tokens=150_000 if args.quick else None)
test = data.test[:20_000] if args.quick else data.test
print(f"\n{'bits':<6}{'split ppl':>12}{'compile ppl':>13}{'diff %':>9}{'split s':>9}{'compile s':>11}")
for bits in [int(b) for b in args.bits.split(",")]:
    t0 = time.perf_counter()
    split = perplexity(SplitLM(model, bits, args.act_bits), test)
    t1 = time.perf_counter()
    whole = perplexity(PBWordLM(model, "llvm", bits=bits, act_bits=args.act_bits), test)
    t2 = time.perf_counter()
    print(
        f"W{bits}A{args.act_bits:<3}{split:>12.3f}{whole:>13.3f}{100 * (whole / split - 1):>+9.3f}{t1 - t0:>9.1f}{t2 - t1:>11.1f}"
    )
