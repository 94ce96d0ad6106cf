"""Structural hashes of scheduled PB kernels: default and sampled schedules, CPU and CUDA.

A refactor of the schedule rules or the tuner must not change what they produce. Run this before
and after the change and compare::

    python benchmarks/schedule_hashes.py --out before.json        # on the old commit
    python benchmarks/schedule_hashes.py --compare before.json    # on the new one

Every kernel kind (pack, GEMM, fused pack + GEMM, LSTM steps) in several formats is scheduled
with its rule's default schedule, and every tunable GEMM is sampled with fixed seeds the way the
search samples it. The hash is ``tvm_ffi.structural_hash`` of the scheduled PrimFunc (block and
variable names do not enter it; the loop structure, bindings, annotations and types do).
"""

from __future__ import annotations

import argparse
import json
import sys

import tvm_ffi

from pbtvm.bitplane import BitplaneFormat
from pbtvm.kernels import act_pack_func, dense_act_func, dense_func, lstm_cell_func, lstm_cell_input_func
from pbtvm.schedules.rules import apply_default_schedule
from pbtvm.schedules.tuning import sample_candidates
from pbtvm.target import resolve_target

FORMATS = {
    "w1a8": BitplaneFormat(1, 8),
    "w4a8": BitplaneFormat(4, 8),
    "w2a4": BitplaneFormat(2, 4),
    "w4a8o": BitplaneFormat(4, 8, codebook="offset_binary"),
    "w16a16": BitplaneFormat(16, 16),
}
BMMA = {"w4a8m": BitplaneFormat(4, 8, layout="mma16x256"), "w1a8m": BitplaneFormat(1, 8, layout="mma16x256")}
SAMPLES = 3


def kernels(formats: dict) -> dict:
    """Name -> PrimFunc of every kernel kind in every format (small shapes, K not a multiple of 256)."""
    out = {}
    for name, fmt in formats.items():
        out[f"act_pack_{name}"] = act_pack_func(fmt, 300)
        out[f"dense_{name}"] = dense_func(fmt, 96, 300)
        out[f"dense_nobias_{name}"] = dense_func(fmt, 96, 1024, bias=False)
        out[f"dense_act_{name}"] = dense_act_func(fmt, 96, 300)
        if fmt.layout == "kNW":
            out[f"lstm_cell_{name}"] = lstm_cell_func(fmt, 64)
            out[f"lstm_cell_input_{name}"] = lstm_cell_input_func(fmt, 40, 64)
    return out


def hashes() -> dict:
    """``{target: {kernel: {"default": hash, "sampled": [hash, ...]}}}``."""
    targets = {
        "llvm": (resolve_target("llvm"), FORMATS),
        "cuda": (resolve_target({"kind": "cuda", "arch": "sm_90"}), {**FORMATS, **BMMA}),
    }
    out: dict = {}
    for tname, (target, formats) in targets.items():
        table = out.setdefault(tname, {})
        for kname, func in kernels(formats).items():
            row = {"default": str(tvm_ffi.structural_hash(apply_default_schedule(func, target)))}
            if kname.startswith("dense_") and not kname.startswith("dense_act"):
                cands = sample_candidates(func, target, SAMPLES, seed=7)
                row["sampled"] = [str(tvm_ffi.structural_hash(c.mod["main"])) for c in cands]
            table[kname] = row
            print(f"{tname:5s} {kname:28s} {row['default']}", file=sys.stderr, flush=True)
    return out


def main() -> int:
    """Write or compare the hash table; exit 1 when a comparison differs."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the table to this JSON file")
    ap.add_argument("--compare", help="compare against this JSON file")
    args = ap.parse_args()
    table = hashes()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
    if args.compare:
        with open(args.compare) as f:
            ref = json.load(f)
        diffs = [
            f"{t}/{k}: {ref[t].get(k)} -> {row}"
            for t in ref
            for k, row in table.get(t, {}).items()
            if ref[t].get(k) != row
        ]
        missing = [f"{t}/{k}" for t in ref for k in ref[t] if k not in table.get(t, {})]
        for line in diffs + [f"missing: {m}" for m in missing]:
            print(line)
        n = sum(len(v) for v in table.values())
        print(
            f"{n} kernels compared: {'identical' if not diffs and not missing else f'{len(diffs) + len(missing)} differ'}"
        )
        return 1 if diffs or missing else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
