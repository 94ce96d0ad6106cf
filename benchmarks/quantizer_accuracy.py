"""Old vs new weight quantizer, W1..W8, on the three accuracy tasks (issue 17).

* old: the original codes and max scaling (``codebook=None, quantizer="max"``: symmetric two's
  complement scaled by the row's max|w| for k >= 2, bipolar ``mean|w|`` for k = 1);
* new: the defaults (``codebook="auto", quantizer="mse"``: per-row MSE clipping search, the codebook
  with the lowest weight error per layer - offset binary with a zero point in practice).

Every number comes from the compiled PB models on the CPU (accuracy does not depend on the
target: the integer product is exact). Tasks and their trained models are the ones of the README /
BENCHMARKS tables: ``python -m pbtvm.apps.demo`` (MNIST MLP), ``tutorials/02_lstm_language_model.py``
(PTB LM, 2 epochs, hidden 256), ``benchmarks/sentiment_accuracy.py`` (Rotten Tomatoes, 3 epochs).

Run ``python benchmarks/quantizer_accuracy.py mnist|ptb|sentiment [--model-cache PATH]``; the PTB
model takes ~20 min of training on 2 cores, so ``--model-cache`` saves / reuses its state dict.
Prints a markdown table last.
"""

import argparse
import os
import time

import torch

OLD = {"codebook": None, "quantizer": "max"}
NEW = {"codebook": "auto", "quantizer": "mse"}


def _table(title: str, metric: str, fp32: float, rows: list, lower_is_better: bool = False) -> None:
    print(f"\n{title}")
    print(f"| weights | {metric} old quantizer | vs fp32 | {metric} new quantizer | vs fp32 | codebook (new) |")
    print("|---|---|---|---|---|---|")
    print(f"| fp32 (torch) | {fp32:.2f} | | | | |")
    for name, old, new, codebooks in rows:
        if lower_is_better:
            d_old, d_new = f"{100 * (old / fp32 - 1):+.1f} %", f"{100 * (new / fp32 - 1):+.1f} %"
        else:
            d_old, d_new = f"{old - fp32:+.1f}", f"{new - fp32:+.1f}"
        print(f"| {name} | {old:.2f} | {d_old} | {new:.2f} | {d_new} | {codebooks} |")


def _codebooks(*compiled) -> str:
    names = set()
    for m in compiled:
        for layer in m.manifest["layers"]["converted"]:
            names.add(layer.get("codebook", "?"))
    return ", ".join(sorted(names))


def mnist(_args: argparse.Namespace) -> None:
    import pbtvm
    from pbtvm.apps.examples import accuracy, mnist_split, torch_accuracy, train_mnist_mlp

    split = mnist_split(seed=0)
    model = train_mnist_mlp(split, epochs=12)
    fp32 = torch_accuracy(model, split.x_test, split.y_test)
    example = (torch.from_numpy(split.x_train[:2]),)
    rows = []
    for bits in range(1, 9):
        old = pbtvm.compile(model, example, "llvm", bits, 8, **OLD)
        new = pbtvm.compile(model, example, "llvm", bits, 8, **NEW)
        acc = [accuracy(m, split.x_test, split.y_test) for m in (old, new)]
        rows.append((f"W{bits}A8", *acc, _codebooks(new)))
        print(rows[-1], flush=True)
    _table("MNIST MLP 784-512-512-10 (`python -m pbtvm.apps.demo` model), held-out 1000", "accuracy %", fp32, rows)


def ptb(args: argparse.Namespace) -> None:
    from pbtvm.apps.ptb import PBWordLM, load_ptb, perplexity, train_word_lm, word_lm

    data = load_ptb()
    if args.model_cache and os.path.exists(args.model_cache):
        model = word_lm(len(data.vocab), 256, 1)
        model.load_state_dict(torch.load(args.model_cache))
        model.eval()
    else:
        model = train_word_lm(data, hidden=256, layers=1, epochs=args.epochs, max_tokens=args.train_tokens)
        if args.model_cache:
            torch.save(model.state_dict(), args.model_cache)
    test = data.test if args.tokens is None else data.test[: args.tokens]

    def fp32_step(x, state):
        with torch.no_grad():
            return model(x, state)

    fp32 = perplexity(fp32_step, test)
    print(f"fp32 {fp32:.2f}", flush=True)
    rows = []
    for bits in args.bits:
        t0 = time.time()
        new = PBWordLM(model, "llvm", bits=bits, **NEW)
        ppl_new = perplexity(new, test)
        ppl_old = perplexity(PBWordLM(model, "llvm", bits=bits, **OLD), test) if not args.new_only else float("nan")
        rows.append((f"W{bits}A8", ppl_old, ppl_new, _codebooks(new.model)))  # one pbtvm.compile of the whole LM
        print(rows[-1], f"{time.time() - t0:.0f}s", flush=True)
    n = len(test)
    _table(f"PTB word LM (tutorial 02 model), test perplexity on {n} tokens", "perplexity", fp32, rows, True)


def sentiment(_args: argparse.Namespace) -> None:
    from pbtvm.apps.sentiment import PBSentenceLSTM, accuracy, load_reviews, train_classifier

    data = load_reviews()
    model = train_classifier(data, epochs=3)
    fp32 = accuracy(model, data)
    rows = []
    for bits in range(1, 9):
        new = PBSentenceLSTM(model, "llvm", bits, **NEW)
        acc = [accuracy(PBSentenceLSTM(model, "llvm", bits, **OLD), data), accuracy(new, data)]
        rows.append((f"W{bits}A8", *acc, _codebooks(new.head, *new.lstm._proj, *new.lstm._cells)))
        print(rows[-1], flush=True)
    _table("Rotten Tomatoes fresh / rotten (LSTM 64-128, 3 epochs), test accuracy", "accuracy %", fp32, rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("task", choices=["mnist", "ptb", "sentiment"])
    ap.add_argument("--model-cache", default=None, help="PTB: state dict to reuse (written after training)")
    ap.add_argument("--tokens", type=int, default=None, help="PTB: evaluate on the first N test tokens")
    ap.add_argument("--bits", type=int, nargs="+", default=list(range(1, 9)), help="PTB: weight bitwidths")
    ap.add_argument("--new-only", action="store_true", help="PTB: skip the old quantizer")
    ap.add_argument("--epochs", type=int, default=2, help="PTB: training epochs (tutorial: 2)")
    ap.add_argument("--train-tokens", type=int, default=None, help="PTB: training tokens per epoch (default all)")
    args = ap.parse_args()
    t0 = time.time()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    {"mnist": mnist, "ptb": ptb, "sentiment": sentiment}[args.task](args)
    print(f"\ndone in {time.time() - t0:.0f}s")
