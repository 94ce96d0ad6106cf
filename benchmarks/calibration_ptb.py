"""Calibration vs data-free weight quantization on the Penn Treebank word LM: test perplexity.

The model is tutorial 02's (:func:`pbtvm.apps.ptb.word_lm`: embedding 256 -> LSTM 1x256 -> Linear
10,000), compiled whole by :func:`pbtvm.compile` as :class:`pbtvm.apps.ptb.PBWordLM` (embedding
lookup, the LSTM lowered by ``PBLSTMLowering``: PB input projection + time loop of the PB cell,
PB head), once data-free (the default) and once with ``calibration=``: ``--calibrate N`` sequences
of ``--calib-len`` (35) tokens of the **training** split, evenly spaced over it, in batches of
``--calib-batch`` (32) as the compiled module's forward takes them, ``(tokens [35, B], h0, c0)``.
The initial state is zero (``--calib-state zero``) or the fp32 model's state after the
``--calib-len`` training tokens that precede each sequence (``warm``). Calibration weights each
row's quantization error by the mean squares of its inputs (embeddings for ``W_ih``, ``h`` for
``W_hh``, the LSTM output for the head); see :mod:`pbtvm.calibration`. Never a test token.

Perplexity: :func:`pbtvm.apps.ptb.perplexity` (10 parallel streams, 70-token windows, state
carried) on the first ``--tokens`` test tokens, the compiled model called on each window.

Before the table, a sanity check at ``--check-bits`` (default 3): the data-free ``PBWordLM``
against the hand-split model (``compile_lstm`` for the LSTM, ``pbtvm.compile`` of the head,
embedding in torch; what ``benchmarks/ptb_compile_vs_split.py`` compares), so that the numbers
are comparable with the earlier data-free tables; they should agree within ~0.1 %.

Run (the BENCHMARKS.md "cheaper setting"; training 1 epoch on 300k tokens took 76 s on 2 shared cores
(BENCHMARKS.md recorded 765 s), once, then cached; the rest ~1.5 min)::

    python benchmarks/calibration_ptb.py --epochs 1 --train-tokens 300000 --tokens 20000 \\
        --model-cache ptb.pt --bits 2 3 4 --calibrate 64

Prints one line per compile (wall time of each ``pbtvm.compile``, data-free and calibrated) and
a markdown table last: weights | perplexity data-free | vs fp32 | perplexity calibrated | vs fp32
| codebooks.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch

import pbtvm
from pbtvm.apps.ptb import PBWordLM, load_ptb, perplexity, train_word_lm, word_lm
from pbtvm.lstm import compile_lstm


class SplitLM:
    """The hand-split model: ``compile_lstm`` + compiled head, the embedding in torch (data-free)."""

    def __init__(self, model: torch.nn.Module, bits: int, act_bits: int) -> None:
        self.embedding = model.embedding
        self.lstm = compile_lstm(model.lstm, "llvm", bits, act_bits)
        self.head = pbtvm.compile(model.head, (torch.zeros(2, model.head.in_features),), "llvm", bits, act_bits)

    def __call__(self, tokens: torch.Tensor, state: tuple | None = None) -> tuple:
        with torch.no_grad():
            emb = self.embedding(tokens)
        y, state = self.lstm(emb, state)
        steps, batch, hidden = y.shape
        return self.head(y.reshape(steps * batch, hidden)).reshape(steps, batch, -1), state


def calibration_batches(model: torch.nn.Module, train: np.ndarray, args: argparse.Namespace) -> list[tuple]:
    """``args.calibrate`` training sequences of ``args.calib_len`` tokens as ``(tokens [L, B], h0, c0)``."""
    length, n = args.calib_len, args.calibrate
    # Evenly spaced starts, each with room for its warm-up window before it and its tokens after.
    starts = np.linspace(length, len(train) - length - 1, n).astype(np.int64)
    seqs = torch.from_numpy(np.stack([train[s : s + length] for s in starts], axis=1))  # [L, N]
    layers, hidden = model.lstm.num_layers, model.lstm.hidden_size
    if args.calib_state == "warm":
        warm = torch.from_numpy(np.stack([train[s - length : s] for s in starts], axis=1))
        with torch.no_grad():
            _, (h0, c0) = model(warm)
    else:
        h0 = c0 = torch.zeros(layers, n, hidden)
    return [
        (seqs[:, i : i + args.calib_batch], h0[:, i : i + args.calib_batch], c0[:, i : i + args.calib_batch])
        for i in range(0, n, args.calib_batch)
    ]


def codebooks(compiled: PBWordLM) -> str:
    """The codebooks of the compiled LM's PB layers (LSTM W_ih, W_hh and head)."""
    return ", ".join(sorted({layer.get("codebook", "?") for layer in compiled.model.manifest["layers"]["converted"]}))


def timed_compile(model: torch.nn.Module, bits: int, act_bits: int, calibration: list | None) -> tuple:
    """``PBWordLM`` (one ``pbtvm.compile``) and its wall time; warnings are printed, not lost."""
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = PBWordLM(model, "llvm", bits=bits, act_bits=act_bits, calibration=calibration)
    seconds = time.perf_counter() - t0
    for w in caught:
        print(f"  warning: {w.message}", flush=True)
    return lm, seconds


def load_model(args: argparse.Namespace, data) -> torch.nn.Module:
    if args.model_cache and os.path.exists(args.model_cache):
        model = word_lm(len(data.vocab), 256, 1)
        model.load_state_dict(torch.load(args.model_cache))
        return model.eval()
    t0 = time.perf_counter()
    max_tokens = args.train_tokens or None
    model = train_word_lm(data, hidden=256, layers=1, epochs=args.epochs, max_tokens=max_tokens)
    print(f"trained in {time.perf_counter() - t0:.0f}s", flush=True)
    if args.model_cache:
        torch.save(model.state_dict(), args.model_cache)
    return model


def main(args: argparse.Namespace) -> None:
    data = load_ptb()
    model = load_model(args, data)
    test = data.test[: args.tokens] if args.tokens else data.test

    def fp32_step(x: torch.Tensor, state: tuple | None) -> tuple:
        with torch.no_grad():
            return model(x, state)

    fp32 = perplexity(fp32_step, test)
    print(f"fp32 perplexity {fp32:.2f} on {len(test)} test tokens", flush=True)

    if args.check_bits:
        bits = args.check_bits
        t0 = time.perf_counter()
        split = perplexity(SplitLM(model, bits, args.act_bits), test)
        t1 = time.perf_counter()
        whole, seconds = timed_compile(model, bits, args.act_bits, None)
        whole = perplexity(whole, test)
        print(
            f"sanity W{bits}A{args.act_bits}: split (compile_lstm + head) {split:.3f} ({t1 - t0:.0f}s), "
            f"PBWordLM data-free {whole:.3f} (compile {seconds:.1f}s): {100 * (whole / split - 1):+.3f} %",
            flush=True,
        )

    batches = calibration_batches(model, data.train, args)
    n_tokens = sum(b[0].numel() for b in batches)
    print(
        f"calibration: {args.calibrate} training sequences x {args.calib_len} tokens ({n_tokens} tokens), "
        f"{len(batches)} batch(es), {args.calib_state} initial state",
        flush=True,
    )
    rows = []
    for bits in args.bits:
        result = []
        for calibration in (None, batches):
            lm, seconds = timed_compile(model, bits, args.act_bits, calibration)
            assert lm.model.manifest["quantizer"]["calibrated"] == (calibration is not None)
            t0 = time.perf_counter()
            ppl = perplexity(lm, test)
            kind = "data-free" if calibration is None else "calibrated"
            print(
                f"W{bits}A{args.act_bits} {kind}: compile {seconds:.1f}s, perplexity {ppl:.3f} "
                f"(eval {time.perf_counter() - t0:.0f}s), codebooks {codebooks(lm)}",
                flush=True,
            )
            result.append((ppl, seconds, codebooks(lm)))
            del lm
        rows.append((bits, *result))

    print(
        f"\nPTB word LM (tutorial 02 model), test perplexity on {len(test)} tokens; calibration: "
        f"{args.calibrate} x {args.calib_len} training tokens, {args.calib_state} state"
    )
    print("| weights | perplexity data-free | vs fp32 | perplexity calibrated | vs fp32 | codebooks |")
    print("|---|---|---|---|---|---|")
    print(f"| fp32 (torch) | {fp32:.2f} | | | | |")
    for bits, (free, _, cb_free), (cal, _, cb_cal) in rows:
        cb = cb_free if cb_free == cb_cal else f"{cb_free} / {cb_cal} (calibrated)"
        print(
            f"| W{bits}A{args.act_bits} | {free:.2f} | {100 * (free / fp32 - 1):+.1f} % | {cal:.2f} | "
            f"{100 * (cal / fp32 - 1):+.1f} % | {cb} |"
        )
    print("\n| weights | compile s data-free | compile s calibrated |")
    print("|---|---|---|")
    for bits, (_, s_free, _), (_, s_cal, _) in rows:
        print(f"| W{bits}A{args.act_bits} | {s_free:.1f} | {s_cal:.1f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-cache", default=None, help="state dict to reuse (written after training)")
    ap.add_argument("--epochs", type=int, default=1, help="training epochs (tutorial 02: 2)")
    ap.add_argument("--train-tokens", type=int, default=300_000, help="training tokens per epoch (0: all)")
    ap.add_argument("--tokens", type=int, default=20_000, help="evaluate on the first N test tokens (0: all)")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4], help="weight bitwidths")
    ap.add_argument("--act-bits", type=int, default=8)
    ap.add_argument("--calibrate", type=int, default=64, help="calibration sequences from the training split")
    ap.add_argument("--calib-len", type=int, default=35, help="tokens per calibration sequence")
    ap.add_argument("--calib-batch", type=int, default=32, help="sequences per calibration batch")
    ap.add_argument("--calib-state", choices=["zero", "warm"], default="zero", help="initial (h, c) of each sequence")
    ap.add_argument("--check-bits", type=int, default=3, help="bitwidth of the split-model sanity check (0: skip)")
    args = ap.parse_args()
    t0 = time.time()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main(args)
    print(f"\ndone in {time.time() - t0:.0f}s")
