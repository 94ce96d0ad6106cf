"""Time and memory of ``CompiledModel.export`` as the weights grow.

The model is an ``nn.Embedding(vocab, 1024)`` (stays float32: its table goes into the library as
it is) and a PB ``nn.Linear(1024, 256)``; ``--vocab`` sets the size of the blob the library
carries (4 KB per row). Prints one line per size: export seconds, library size, and the peak
resident memory of this process and of the largest child (the C compiler and linker TVM runs).

Compare two checkouts by running the script under each (``PYTHONPATH=<checkout>``), one after
the other::

    python benchmarks/bench_export.py --vocab 2500 10000
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import torch

import pbtvm

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--vocab", type=int, nargs="+", default=[2500, 10000])
args = parser.parse_args()

print(f"pbtvm from {os.path.dirname(pbtvm.__file__)}")
for vocab in args.vocab:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, 1024), torch.nn.Linear(1024, 256)).eval()
    compiled = pbtvm.compile(model, (torch.randint(0, vocab, (2, 3)),), bits=4)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.so")
        start = time.perf_counter()
        compiled.export(path)
        seconds = time.perf_counter() - start
        size = os.path.getsize(path)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(
        f"vocab {vocab:6d}: export {seconds:6.1f} s, library {size / 2**20:6.1f} MiB, peak RSS this process "
        f"{own:5.2f} GiB, largest child {child:5.2f} GiB"
    )
