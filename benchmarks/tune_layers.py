"""Tune PB layer kernels with MetaSchedule and compare with the default template.

Prints, per shape: trials, candidates built / failed, default vs best time (measured by the same
runner), gain; then every kernel looked up in the log as ``pbtvm.compile(..., work_dir=...)`` does:
a tuned schedule replayed, or the default schedule the log keeps (the search's best was not
confirmed faster side by side), and the time that took. Exits with status 1 when the log decides
a kernel neither way. The default shapes are meant as the ~20-minute GPU tuning subset; their GPU
duration has not been measured yet.

    python benchmarks/tune_layers.py --target cuda --trials 64 --work-dir logs/h100
    python benchmarks/tune_layers.py --target llvm --shapes 1024x1024,4096x4096 --trials 32
    python benchmarks/tune_layers.py --target cuda --layout kNW   # the CUDA-core popcount template
"""

import argparse
import sys
import time

from pbtvm.bitplane import BitplaneFormat
from pbtvm.cli_args import parse_target
from pbtvm.kernels import compiled_dense_func
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
# what compile builds for these layers, tuned at this batch (a pb_dense_act that packs its input
# where one_launch_layer / one_kernel_layer say so, else the product kernel after the pack)
funcs = [compiled_dense_func(fmt, n, k, target, tune_batch=args.batch) for n, k in shapes]
report = tuning.tune_kernels(funcs, target, args.work_dir, trials_per_kernel=args.trials, batch=args.batch)


def replayed_from_log(funcs: list, work_dir: str, target: object, batch: int) -> dict[str, str | None]:
    """Look every kernel up in the log as ``pbtvm.compile`` does: per kernel name, what the log
    decided (``"tuned"``: a searched schedule replayed, ``"default"``: the default schedule kept),
    None where it decided nothing (not in the log, or refused with a warning)."""
    lookup, _ = tuning.tuned_lookup(work_dir, target, batch)
    if lookup is None:
        return {tuning.kernel_name(func): None for func in funcs}
    decided = {tuning.kernel_name(func): "tuned" if lookup(func) is not None else None for func in funcs}
    lookup.warn_if_unmatched()  # a run stopped before it re-timed a best, or a log of other kernels
    return {name: "default" if name in lookup.kept_default else got for name, got in decided.items()}


def replay_line(name: str, decision: str | None, report: tuning.TuneReport) -> str:
    """What the log gives kernel ``name``, in words (with the search's note where this run tuned it)."""
    searched = next((k for k in report.kernels if k.name == name), None)
    if decision == "tuned" and searched is not None and searched.confirmed is None:
        return f"  {name}: tuned record replayed, which is the default schedule (the search found none faster)"
    if decision == "tuned":
        return f"  {name}: tuned schedule replayed"
    if decision == "default":
        return f"  {name}: default schedule, as the log says (the search's best was not confirmed faster)"
    return f"  {name}: no schedule from the log (not in it, no candidate ran, or refused: a warning says why)"


t0 = time.perf_counter()
decided = replayed_from_log(funcs, args.work_dir, target, args.batch)
replay_s = time.perf_counter() - t0

print(f"\n{tuning.target_key(target)} {fmt.name} batch {args.batch}, {args.trials} trials per kernel")
print(report.table())
gains = [k.speedup for k in report.kernels if k.speedup]
print(f"kernels >=5% faster than the default: {sum(g >= 1.05 for g in gains)}/{len(gains)}")
print(f"schedules from the log, {replay_s:.2f}s to replay:")
print("\n".join(replay_line(name, decision, report) for name, decision in decided.items()))
missing = [name for name, decision in decided.items() if decision is None]
if missing:
    sys.exit(f"the tuning log {args.work_dir} decides no schedule for {len(missing)} kernel(s): {', '.join(missing)}")
