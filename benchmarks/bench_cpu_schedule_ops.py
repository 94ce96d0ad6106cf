"""Small models of ops a review found slower under the default CPU schedule, schedule off vs on.

``schedules/cpu_default.py`` must never make a model slower than TVM's unscheduled lowering. A
review measured its first version at 3.5-9.8x slower on convolutions (a padding inlined into the
product; dlight's Reduction rule recomputing the padding per output), 1.4-1.6x on exp / tanh /
sigmoid (vectors of libm calls) and 5x on a softmax of 37 values (a parallel region for it). Each
model is compiled with ``pbtvm.cuda.CPU_DEFAULT_SCHEDULE`` off and on (W16A16: the PB layers are
the same either way); results are checked equal, then timed in interleaved rounds.

    TVM_NUM_THREADS=2 python benchmarks/bench_cpu_schedule_ops.py
"""

import statistics
import time
import warnings

import torch

import pbtvm
import pbtvm.cuda


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
        self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.c3 = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.lin = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn(self.c1(x))), 2)
        return self.lin(torch.nn.functional.adaptive_avg_pool2d(self.c3(self.c2(x)), 1).flatten(1))


class Activations(torch.nn.Module):
    def forward(self, x):
        return torch.tanh(x) + torch.sigmoid(x) * torch.exp(-x.abs())


class PaddedConv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(x)


class SmallNorm(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(37)

    def forward(self, x):
        return self.norm(x).softmax(-1)


CASES = [
    (SmallCNN, (8, 3, 32, 32)),
    (Activations, (8, 64, 256)),
    (PaddedConv, (8, 8, 24, 24)),
    (SmallNorm, (1, 37)),
]

torch.manual_seed(0)
print(f"TVM threads: see TVM_NUM_THREADS; torch {torch.__version__}")
for make, shape in CASES:
    model, x = make().eval(), torch.randn(*shape)
    compiled = {}
    for scheduled in (False, True):
        pbtvm.cuda.CPU_DEFAULT_SCHEDULE = scheduled
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled[scheduled] = pbtvm.compile(model, (x,), target="llvm", bits=16, act_bits=16)
    with torch.no_grad():
        diff = float((compiled[True](x) - compiled[False](x)).abs().max())
        rounds = {flag: [] for flag in compiled}
        for _ in range(7):
            for flag, m in compiled.items():
                m(x)
                t = time.perf_counter()
                for _ in range(20):
                    m(x)
                rounds[flag].append((time.perf_counter() - t) / 20 * 1e3)
    off, on = (statistics.median(rounds[f]) for f in (False, True))
    print(
        f"{make.__name__:12s} {tuple(shape)}: off {off:.3f} ms, on {on:.3f} ms ({min(rounds[True]):.3f}-"
        f"{max(rounds[True]):.3f}), on/off {on / off:.2f}, max |on - off| {diff:.1e}"
    )
