"""Whole-sequence call of an LM compiled by ``pbtvm.compile`` vs the token decoder, per step (issue 15).

Same model (embedding -> LSTM -> Linear head, random weights), same bits: ``sequence`` is one call
of :class:`pbtvm.ptb.PBWordLM` (the whole LM through ``pbtvm.compile``: one PB projection GEMM per
layer over all steps, the lowered time loop of the fused PB cell kernel, one head GEMM over all
steps) on T tokens; ``decoder`` is :func:`pbtvm.decoder.compile_decoder` called T times with the
state carried (one call per token). Printed: medians (µs) and ``sequence / (decoder per token x T)``;
the issue's bar is <= 1.3.

    python benchmarks/bench_lstm_sequence.py --hidden 256 --layers 2 --bits 4
"""

import argparse
import statistics
import time

import torch

from pbtvm.decoder import compile_decoder
from pbtvm.ptb import PBWordLM, word_lm

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


def median_us(fn, reps: int) -> float:  # noqa: ANN001
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


tokens = torch.randint(0, args.vocab, (max(int(t) for t in args.lengths.split(",")), args.batch))


carried = [None]


def decode_one() -> None:
    carried[0] = dec(tokens[0], carried[0])[1]  # state carried, as in generation


per_token = median_us(decode_one, args.reps * 10)
print(f"model: embedding {args.hidden}, LSTM {args.layers}x{args.hidden}, head {args.vocab}; W{args.bits}A8, batch {args.batch}")
print(f"decoder: {per_token:.1f} us per token (median of {args.reps * 10} calls)\n")
print(f"{'T':>4}{'sequence us':>14}{'decoder x T us':>16}{'ratio':>8}{'seq us/step':>13}")
for steps in (int(t) for t in args.lengths.split(",")):
    x = tokens[:steps]
    whole = median_us(lambda x=x: seq(x), args.reps)
    print(f"{steps:>4}{whole:>14.1f}{per_token * steps:>16.1f}{whole / (per_token * steps):>8.2f}{whole / steps:>13.1f}")
