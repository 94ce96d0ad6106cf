"""The token pick of generate() alone (``pbtvm.sampling.pick_func``): greedy, sampling, top-k.

generate() runs the pick kernel after the head of every step. This times it by itself, per
``top_k``, beside greedy and plain sampling (``top_k = 0``) measured in the same run, and checks
each token against ``pick_reference``. A small ``top_k`` finds its threshold with ``top_k - 1``
ordered passes over the row, a larger one by bisection (CPU) or radix (CUDA) on the order key,
whatever ``top_k`` is (``pbtvm/sampling_tir.py``).

    python benchmarks/bench_pick.py                          # this CPU, vocab 10,000, batch 1 and 8
    python benchmarks/bench_pick.py --target cuda --vocab 10000 50257

Times: median of ``--repeat`` rounds of ``--number`` calls (TVM's ``time_evaluator``), µs per call.
"""

from __future__ import annotations

import argparse

import numpy as np

from pbtvm._tvm import tvm
from pbtvm.cuda import build
from pbtvm.sampling import pick_func, pick_reference
from pbtvm.target import resolve_target

TOP_KS = (1, 2, 3, 5, 9, 40, 50, 200, 1000)
TEMPERATURE = 0.9


def bench(target: str, batch: int, vocab: int, top_ks: tuple[int, ...], number: int, repeat: int) -> list[dict]:
    """Rows ``{mode, top_k, us}`` for greedy, sampling and each top-k; tokens checked on the way."""
    tgt = resolve_target(target)
    kind = tgt.kind.name
    dev = tvm.cuda(0) if kind == "cuda" else tvm.cpu(0)
    mod = build(pick_func(batch, vocab, 1, kind), tgt).mod
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((batch, vocab)) * 3).astype(np.float32)
    ins = [tvm.runtime.tensor(a, dev) for a in (logits, np.full((1, batch), -1, np.int64), np.zeros(batch, np.int64))]
    outs = [tvm.runtime.empty(s, d, dev) for s, d in (((batch,), "int64"),) * 2 + (((batch, vocab), "float64"),)]
    timer = mod.time_evaluator("pick", dev, number=number, repeat=repeat)
    rows = []
    for mode, temp, top_k in [("greedy", 0.0, 0), ("sample", TEMPERATURE, 0)] + [
        ("top-k", TEMPERATURE, k) for k in top_ks
    ]:
        ctrl = tvm.runtime.tensor(np.array([7, 0, -1, top_k], np.int64), dev)
        temp_t = tvm.runtime.tensor(np.array([temp]), dev)
        us = float(np.median(timer(*ins, ctrl, temp_t, 0, *outs).results)) * 1e6
        want = pick_reference(
            logits, np.zeros(batch, np.int64), temperature=temp, top_k=top_k, seed=7, counter=0, eos=-1
        )
        if not np.array_equal(outs[0].numpy(), want[0]):
            raise SystemExit(f"{mode} top_k={top_k}: tokens {outs[0].numpy()} differ from the reference {want[0]}")
        rows.append({"mode": mode, "top_k": top_k, "us": us})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="llvm", help="llvm (this CPU) or cuda")
    ap.add_argument("--vocab", type=int, nargs="+", default=[10000])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--top-k", type=int, nargs="+", default=list(TOP_KS))
    ap.add_argument("--number", type=int, default=50)  # 20: batch 8 timed as if on one thread
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(f"target {resolve_target(args.target)}")
    print("| vocab | batch | mode | top_k | µs per pick | vs sampling (top_k 0) |")
    print("|---|---|---|---|---|---|")
    for vocab in args.vocab:
        for batch in args.batch:
            rows = bench(args.target, batch, vocab, tuple(args.top_k), args.number, args.repeat)
            plain = next(r["us"] for r in rows if r["mode"] == "sample")
            for r in rows:
                k = r["top_k"] if r["mode"] == "top-k" else "-"
                print(f"| {vocab} | {batch} | {r['mode']} | {k} | {r['us']:.1f} | {r['us'] / plain:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
