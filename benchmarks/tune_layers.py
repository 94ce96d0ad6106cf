"""Tune PB layer kernels with MetaSchedule and compare with the default template.

Prints, per shape: trials, candidates built / failed, default vs best time (measured by the same
runner), gain, then the time to replay every kernel's schedule from the log. The default shapes are
meant as the ~20-minute GPU tuning subset; their GPU duration has not been measured yet.

    python benchmarks/tune_layers.py --target cuda --trials 64 --work-dir logs/h100
    python benchmarks/tune_layers.py --target llvm --shapes 1024x1024,4096x4096 --trials 32
    python benchmarks/tune_layers.py --target cuda --layout kNW   # the CUDA-core popcount template
"""

import argparse
import time

from pbtvm.bitplane import BitplaneFormat
from pbtvm.cli_args import parse_target
from pbtvm.kernels import dense_func
from pbtvm.schedules import tuning
from pbtvm.target import resolve_target, weight_layout

DEFAULT_SHAPES = "4096x4096,11008x4096,4096x11008,8192x2048,2600x650"

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--target", default="cuda", help="llvm, cuda or a JSON target dict")
parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="NxK list (out x in)")
parser.add_argument("--bits", type=int, default=4)
parser.add_argument("--batch", type=int, default=1)
parser.add_argument("--trials", type=int, default=64)
parser.add_argument("--work-dir", default="pbtvm_tune_logs")
parser.add_argument(
    "--layout",
    default="auto",
    help="weight layout, as pbtvm.compile: auto (binary tensor cores on CUDA sm_80+, else kNW), mma16x256 or kNW",
)
args = parser.parse_args()

target = resolve_target(parse_target(args.target))
fmt = BitplaneFormat(args.bits, 8, layout=weight_layout(args.layout, target))
shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
funcs = [dense_func(fmt, n, k) for n, k in shapes]
report = tuning.tune_kernels(funcs, target, args.work_dir, trials_per_kernel=args.trials, batch=args.batch)

t0 = time.perf_counter()
lookup, used = tuning.tuned_lookup(args.work_dir, target, args.batch)
for func in funcs:
    assert lookup is not None and lookup(func) is not None, "a tuned kernel did not replay from the log"
replay_s = time.perf_counter() - t0

print(f"\n{tuning.target_key(target)} {fmt.name} batch {args.batch}, {args.trials} trials per kernel")
print(report.table())
gains = [k.speedup for k in report.kernels if k.speedup]
print(
    f"kernels >=5% faster than the default: {sum(g >= 1.05 for g in gains)}/{len(gains)}; "
    f"schedules replayed from the log in {replay_s:.2f}s"
)
