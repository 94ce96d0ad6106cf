"""Wall time of ``pbtvm.compile`` for a wide MLP (on the CPU most of it the weight fit).

``--widths 2048 4096 2048`` builds ``Linear(2048, 4096) -> ReLU -> Linear(4096, 2048)``; each
``--bits`` value is compiled ``--repeat`` times (the best is printed). ``--target`` takes what the
CLI takes (``llvm``, ``cuda``, a JSON dict such as ``'{"kind": "cuda", "arch": "sm_90"}'``: CUDA
kernels build with nvcc, no GPU needed). Compare two checkouts by running the script under each
(``PYTHONPATH=<checkout>``), one after the other::

    python benchmarks/bench_compile.py --widths 2048 4096 2048 --bits 2 4
    python benchmarks/bench_compile.py --widths 300 130 64 10 --bits 4 --target '{"kind": "cuda", "arch": "sm_90"}'
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import pbtvm
from pbtvm.cli_args import parse_target

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--widths", type=int, nargs="+", default=[2048, 4096, 2048])
parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
parser.add_argument("--repeat", type=int, default=2)
parser.add_argument("--target", default="llvm", help="llvm, cuda or a JSON target dict")
args = parser.parse_args()
target = parse_target(args.target)

print(f"pbtvm from {os.path.dirname(pbtvm.__file__)}, TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')}")
torch.manual_seed(0)
layers = []
for n_in, n_out in zip(args.widths[:-1], args.widths[1:], strict=True):
    layers += [torch.nn.Linear(n_in, n_out), torch.nn.ReLU()]
model = torch.nn.Sequential(*layers[:-1]).eval()
example = (torch.randn(2, args.widths[0]),)
for bits in args.bits:
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        pbtvm.compile(model, example, target=target, bits=bits)
        times.append(time.perf_counter() - start)
    print(f"widths {args.widths} W{bits} {args.target}: compile {min(times):.1f} s (best of {args.repeat})")
