"""Launch one BMMA PB layer kernel a few times, plainly, for Nsight Compute to read its counters.

No CUDA graph, no timing: ``ncu`` replays the launch it profiles. The kernel is the one
``benchmarks/bench_bmma.py`` times (``("bmma", N, K, bits, config)``), at the default config for
the batch unless ``--config`` names one (``tiles_m,warps_m,k_split,loads,tiles_n``).

    ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section WarpStateStats --section Occupancy --section LaunchStats \\
        -k regex:main_kernel --launch-skip 2 --launch-count 1 \\
        python3 benchmarks/ncu_bmma.py --shape 4096x4096 --bits 4 --batch 64
"""

from __future__ import annotations

import argparse

import torch
from bench_bmma import build_kernel, layer_configs, packed_inputs, weight_set

from pbtvm import bitplane as bp
from pbtvm.schedules.cuda_bmma_kernel import BMMAConfig
from pbtvm.target import resolve_target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4096x4096", help="NxK (out x in)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--config", default=None, help="tiles_m,warps_m,k_split,loads,tiles_n (default: the batch's)")
    ap.add_argument("--launches", type=int, default=4)
    args = ap.parse_args()
    n, k = (int(v) for v in args.shape.split("x"))
    fmt = bp.BitplaneFormat(args.bits, 8, layout="mma16x256")
    cfg = (
        BMMAConfig(*(int(v) for v in args.config.split(",")))
        if args.config
        else layer_configs(n, k, args.bits, args.batch)[0]
    )
    kernel = build_kernel(("bmma", n, k, args.bits, cfg), resolve_target("cuda"))
    w, s, b = weight_set(fmt, n, k)
    xp, sx, rs, y = packed_inputs(fmt, n, k, args.batch)
    for _ in range(args.launches):
        kernel(xp, sx, rs, w, s, b, args.bits, y)
    torch.cuda.synchronize()
    print(f"launched {args.launches}x: {args.shape} W{args.bits} batch {args.batch} {cfg}")


if __name__ == "__main__":
    main()
