"""Whole-sequence call of an LM compiled by ``pbtvm.compile`` vs the token decoder, per step (issue 15).

Same model (embedding -> LSTM -> Linear head, random weights), same bits: ``sequence`` is one call
of :class:`pbtvm.apps.ptb.PBWordLM` (the whole LM through ``pbtvm.compile``: one PB projection GEMM per
layer over all steps, the lowered time loop of the fused PB cell kernel, one head GEMM over all
steps) on T tokens; ``decoder`` is :func:`pbtvm.decoder.compile_decoder` called T times with the
state carried (one call per token). Both run alternately, ``--reps`` times per length; printed:
medians (µs) and ``sequence / (decoder loop over T tokens)``; the issue's bar is <= 1.3.

    python benchmarks/bench_lstm_sequence.py --hidden 256 --layers 2 --bits 4
"""

import argparse
import statistics
import time

import torch

from pbtvm.apps.ptb import PBWordLM, word_lm
from pbtvm.decoder import compile_decoder

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--hidden", type=int, default=256)
parser.add_argument("--layers", type=int, default=2)
parser.add_argument("--vocab", type=int, default=10000)
parser.add_argument("--bits", type=int, default=4)
parser.add_argument("--lengths", default="1,5,17,64")
parser.add_argument("--batch", type=int, default=1)
parser.add_argument("--reps", type=int, default=30, help="timed calls per length (sequence) / tokens x reps (decoder)")
args = parser.parse_args()

torch.manual_seed(0)
model = word_lm(args.vocab, args.hidden, args.layers, dropout=0.0).eval()
seq = PBWordLM(model, "llvm", bits=args.bits)
dec = compile_decoder(model.lstm, "llvm", bits=args.bits, embedding=model.embedding, head=model.head, batch=args.batch)
dec.check_tokens = False


tokens = torch.randint(0, args.vocab, (max(int(t) for t in args.lengths.split(",")), args.batch))


def decode(x: torch.Tensor) -> None:
    state = None
    for t in range(x.shape[0]):  # one call per token, the state carried, as in generation
        state = dec(x[t], state)[1]


def timed_us(fn, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    fn(x)
    return (time.perf_counter() - t0) * 1e6


print(
    f"model: embedding {args.hidden}, LSTM {args.layers}x{args.hidden}, head {args.vocab}; W{args.bits}A8, batch {args.batch}"
)
print(f"medians of {args.reps} runs, sequence call and decoder loop alternating\n")
print(f"{'T':>4}{'sequence us':>14}{'decoder x T us':>16}{'ratio':>8}{'seq us/step':>13}{'dec us/token':>14}")
for steps in (int(t) for t in args.lengths.split(",")):
    x = tokens[:steps]
    for _ in range(3):
        seq(x)
        decode(x)
    whole, loop = [], []
    for _ in range(args.reps):
        whole.append(timed_us(seq, x))
        loop.append(timed_us(decode, x))
    w, d = statistics.median(whole), statistics.median(loop)
    print(f"{steps:>4}{w:>14.1f}{d:>16.1f}{w / d:>8.2f}{w / steps:>13.1f}{d / steps:>14.1f}")
