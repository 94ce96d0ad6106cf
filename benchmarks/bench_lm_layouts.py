"""A whole LSTM LM through ``pbtvm.compile`` in several weight layouts, timed side by side on this host.

The model is :func:`pbtvm.apps.ptb.word_lm` (embedding -> LSTM -> Linear head, random weights) as
:class:`pbtvm.apps.ptb.PBWordLM` compiles it (dynamic sequence length and batch: PB input
projection over all steps, the lowered time loop of the fused PB step, the head over all steps),
built once per ``layout@mcpu`` variant (as in ``bench_cpu_isas.py``: ``kNW@haswell`` is what an
AVX2-only CPU got before ``auto`` picked ``lut16x4`` for LSTM models there). For each
``TxB`` the variants take turns for ``--rounds`` rounds; printed: the median µs per call and the
speed-up over the first variant. The logits of all variants are checked equal first.

Usage::

    python benchmarks/bench_lm_layouts.py [--hidden 650] [--bits 4] [--variants kNW@haswell lut16x4@haswell]
        [--runs 1x1 35x1 1x8 35x8 35x32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cpu_isas import in_turns, ratio_cells

from pbtvm.apps.ptb import PBWordLM, word_lm


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=650)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=10000)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--variants", nargs="+", default=["kNW@haswell", "lut16x4@haswell"])
    p.add_argument("--runs", nargs="+", default=["1x1", "35x1", "1x8", "35x8", "35x32"], help="TxB")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=3)
    return p.parse_args()


def main() -> int:
    """Print a markdown table: µs per call of every variant and its speed-up over the first."""
    args = _parse()
    torch.manual_seed(0)
    model = word_lm(args.vocab, args.hidden, args.layers, dropout=0.0).eval()
    lms = []
    for variant in args.variants:
        layout, _, mcpu = variant.partition("@")
        target = {"kind": "llvm", **({"mcpu": mcpu} if mcpu and mcpu != "host" else {})}
        lms.append(PBWordLM(model, target if len(target) > 1 else "llvm", bits=args.bits, layout=layout))
    print(
        f"# {args.layers}x{args.hidden} LSTM LM, vocab {args.vocab}, W{args.bits}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, µs per call (speed-up vs the first)"
    )
    print(f"| T x B | {' | '.join(args.variants)} |")
    print(f"|---|{'---|' * len(lms)}", flush=True)
    for run in args.runs:
        steps, batch = (int(v) for v in run.split("x"))
        tokens = torch.randint(0, args.vocab, (steps, batch))
        first = lms[0](tokens)[0].numpy()
        for lm in lms[1:]:
            np.testing.assert_array_equal(first, lm(tokens)[0].numpy())
        med = in_turns([lambda lm=lm, t=tokens: lm(t) for lm in lms], args.rounds, args.calls)
        print(f"| {steps} x {batch} | {' | '.join(ratio_cells(med))} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
