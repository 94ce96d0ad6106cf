"""One CPU PB kernel as two source trees build it, timed side by side in one process.

For a kernel change: each tree (a checkout of pbtvm, e.g. a ``git worktree`` of the commit before)
builds the kernel in its own process, with the default rule for this host as ``pbtvm.compile``
does, and exports it; then this process loads both and times them in alternating rounds (TVM's
``time_evaluator``, ``--number`` calls per round, median of ``--rounds``), so a noisy neighbour
hits both alike. It prints each build's seconds, both times, the ratio A / B (above 1: B is
faster) and whether the two gave identical outputs (they must: a change of schedule, not of
result). Kernels:

* ``lstm_step``: the decoder's LSTM step with its input projection
  (:func:`pbtvm.kernels.lstm_cell_input_func`), ``--shape INPUTxHIDDEN``;
* ``dense``: a dense layer, float rows in and out (:func:`pbtvm.kernels.dense_act_func`),
  ``--shape NxK``.

Usage::

    git worktree add /tmp/before HEAD~1
    python benchmarks/ab_kernels.py /tmp/before . --kernel lstm_step --shape 650x650 --bits 3 4 8
    python benchmarks/ab_kernels.py /tmp/before . --kernel dense --shape 4096x4096 --weight-sets 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: Run in a child process with the tree's directory as argv[1]: pbtvm and its two mapped
#: packages (``pbtvm.schedules``, ``pbtvm.relay_passes`` live outside ``pbtvm/``, see
#: pyproject.toml) imported from that tree, not from the installed copy.
_BUILD = r"""
import importlib.abc, importlib.util, json, sys, time
from pathlib import Path
tree = sys.argv[1]
sys.path.insert(0, tree)
MAPPED = {"pbtvm.schedules": "schedules", "pbtvm.relay_passes": "relay_passes"}


class TreeFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in MAPPED:
            folder = f"{tree}/{MAPPED[name]}"
            return importlib.util.spec_from_file_location(name, f"{folder}/__init__.py", submodule_search_locations=[folder])
        return None


sys.meta_path.insert(0, TreeFinder())
import pbtvm
from pbtvm import kernels
from pbtvm.bitplane import BitplaneFormat
from pbtvm.target import resolve_target

import pbtvm.relay_passes, pbtvm.schedules
for module in (pbtvm, pbtvm.schedules, pbtvm.relay_passes):
    assert Path(module.__file__).resolve().is_relative_to(tree), module.__file__
kind, a, b, out = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
seconds = {}
for bits in json.loads(sys.argv[6]):
    fmt = BitplaneFormat(bits, 8)
    func = kernels.lstm_cell_input_func(fmt, a, b, True) if kind == "lstm_step" else kernels.dense_act_func(fmt, a, b, True)
    start = time.perf_counter()
    cpu = sys.argv[7]
    target = resolve_target("llvm") if cpu == "host" else resolve_target({"kind": "llvm", "mcpu": cpu})
    lib = kernels.build(func, target)
    seconds[bits] = time.perf_counter() - start
    lib.mod.export_library(f"{out}/w{bits}.so")
print(json.dumps(seconds))
"""


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tree_a", help="a pbtvm checkout (A, e.g. before a change)")
    p.add_argument("tree_b", help="another (B, e.g. after)")
    p.add_argument("--kernel", choices=["lstm_step", "dense"], default="lstm_step")
    p.add_argument("--shape", default="650x650", help="INPUTxHIDDEN (lstm_step) or NxK (dense)")
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4, 8])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--mcpu", default="host", help="LLVM CPU to build for (the host must run its code)")
    p.add_argument("--number", type=int, default=20, help="calls per round")
    p.add_argument(
        "--weight-sets",
        type=int,
        default=1,
        help="rotate this many sets of operands, so that weights larger than the caches come from memory "
        "(timed by a Python loop over them, a few µs per call more than time_evaluator's; outputs compared "
        "on the first set)",
    )
    return p.parse_args()


def _build(tree: str, kind: str, shape: tuple, bits: list, out: str, mcpu: str) -> dict:
    """Build and export the kernels from ``tree`` in a child process: ``{bits: seconds}``."""
    root = Path(tree).resolve()
    for folder in ("pbtvm", "schedules", "relay_passes"):
        if not (root / folder / "__init__.py").is_file():
            sys.exit(f"ab_kernels: {tree} is not a pbtvm checkout (no {folder}/__init__.py)")
    args = [str(root), kind, *map(str, shape), out, json.dumps(bits), mcpu]
    done = subprocess.run([sys.executable, "-c", _BUILD, *args], capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"ab_kernels: building in {tree} failed:\n{done.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(done.stdout.splitlines()[-1]).items()}


def _operands(kind: str, shape: tuple, bits: int, batch: int, rng) -> tuple[list, list]:
    """Random inputs in the kernel's argument order (without ``bitlayers``) and its outputs."""
    from pbtvm import bitplane as bp
    from pbtvm import quantize as qz

    fmt = bp.BitplaneFormat(bits, 8)

    def weights(rows: int, k: int) -> list:
        q, scale = qz.quantize_weights((rng.standard_normal((rows, k)) / np.sqrt(k)).astype(np.float32), fmt)
        return [bp.pack_weights(q, fmt), scale]

    def floats(*dims) -> np.ndarray:
        return rng.standard_normal(dims).astype(np.float32)

    if kind == "lstm_step":
        n_in, hidden = shape
        ins = [floats(batch, n_in), *weights(4 * hidden, n_in), floats(4 * hidden)]
        ins += [np.tanh(floats(batch, hidden)), floats(batch, hidden), *weights(4 * hidden, hidden)]
        return ins, [np.zeros((batch, hidden), np.float32) for _ in range(2)]
    n_out, k_dim = shape
    return [floats(batch, k_dim), *weights(n_out, k_dim), floats(n_out)], [np.zeros((batch, n_out), np.float32)]


def _time_us(mod, timer, sets: list, bits: int, outs: list, number: int) -> float:
    """µs per call of ``mod``: by ``timer`` (its ``time_evaluator``) on one set of operands, else
    over ``number`` passes through ``sets`` (one call per set)."""
    if len(sets) == 1:
        return timer(*sets[0], bits, *outs).mean * 1e6
    main = mod["main"]
    for ins in sets:  # each set once untimed: the caches hold the last ones, as when timed
        main(*ins, bits, *outs)
    start = time.perf_counter()
    for _ in range(number):
        for ins in sets:
            main(*ins, bits, *outs)
    return (time.perf_counter() - start) / (number * len(sets)) * 1e6


def main() -> None:
    args = _parse()
    from pbtvm._tvm import tvm

    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    trees = (args.tree_a, args.tree_b)
    if args.weight_sets < 1:
        sys.exit("ab_kernels: --weight-sets must be at least 1")
    if Path(trees[0]).resolve() == Path(trees[1]).resolve():
        sys.exit("ab_kernels: A and B are the same tree")
    with tempfile.TemporaryDirectory() as tmp:
        builds = []
        for i, tree in enumerate(trees):
            os.makedirs(f"{tmp}/{i}")
            builds.append(_build(tree, args.kernel, shape, args.bits, f"{tmp}/{i}", args.mcpu))
        rotated = f", {args.weight_sets} weight sets rotated" if args.weight_sets > 1 else ""
        print(
            f"{args.kernel} {args.shape}, mcpu {args.mcpu}, threads: TVM default{rotated}; A = {trees[0]}, B = {trees[1]}"
        )
        for bits in args.bits:
            print(f"W{bits} build: A {builds[0][bits]:.2f} s, B {builds[1][bits]:.2f} s")
        print(f"{'W':>3} {'batch':>5} {'A us':>9} {'B us':>9} {'A / B':>6}  identical")
        rng = np.random.default_rng(0)
        for bits in args.bits:
            mods = [tvm.runtime.load_module(f"{tmp}/{i}/w{bits}.so") for i in range(2)]
            timers = [m.time_evaluator("main", tvm.cpu(), number=args.number, repeat=1) for m in mods]
            for batch in args.batches:
                operands = [_operands(args.kernel, shape, bits, batch, rng) for _ in range(args.weight_sets)]
                outs = operands[0][1]
                sets = [[tvm.runtime.tensor(a) for a in ins] for ins, _ in operands]
                results, times = [], ([], [])
                for i, mod in enumerate(mods):  # one untimed call each, its outputs kept
                    outs_i = [tvm.runtime.tensor(o) for o in outs]
                    mod["main"](*sets[0], bits, *outs_i)
                    results.append([o.numpy() for o in outs_i])
                    times[i].append(_time_us(mod, timers[i], sets, bits, outs_i, args.number))
                for _ in range(args.rounds - 1):
                    for i in range(2):
                        outs_i = [tvm.runtime.tensor(o) for o in outs]
                        times[i].append(_time_us(mods[i], timers[i], sets, bits, outs_i, args.number))
                same = all(np.array_equal(x, y) for x, y in zip(*results, strict=True))
                a, b = (statistics.median(t) for t in times)
                print(f"{bits:>3} {batch:>5} {a:>9.1f} {b:>9.1f} {a / b:>6.2f}  {same}", flush=True)


if __name__ == "__main__":
    main()
