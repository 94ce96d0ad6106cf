"""``ptxas -v`` resource usage of the BMMA kernel's default configs (no GPU needed).

For each layer shape and weight bits of issue 13, the kernel ``pbtvm.compile(..., layout=
"mma16x256")`` would use at batch 1 and the config the benchmark uses at batch >= 8: registers,
shared memory, spills, and the BMMA instructions in its SASS (``--fused``: also the one-launch
kernel that packs its own rows, which the decoder head uses); then the one-launch activation pack;
then the LSTM step (``schedules/cuda_bmma_lstm.py``) of an H x H layer in its two model forms
(the decoder's step with the input projection inside, the time loop's step reading ``gx`` at
step ``t``) at the default config for each batch. Prints Markdown tables. The kernels are
sm_90's, written for programmatic dependent launch as ``compile`` builds them there
(``PBTVM_CUDA_PDL=0``: without it).

    python benchmarks/bmma_resources.py [--shapes 4096x4096 ...] [--bits 1 2 4 8]
    python benchmarks/bmma_resources.py --lstm-only --lstm-hidden 650 1500
"""

from __future__ import annotations

import argparse

from bench_bmma import FUSED_MAX_BATCH, SHAPES  # the benchmark's shapes; its largest one-launch batch

from pbtvm import bitplane as bp
from pbtvm import kernels
from pbtvm.cuda import build, cuda_source
from pbtvm.sass import BMMA_OPCODE, local_memory_ops, ptxas_usage, source_sass
from pbtvm.schedules import apply_default_schedule
from pbtvm.schedules.cuda_ballot_pack import pack_warps
from pbtvm.schedules.cuda_bmma import default_config, kernel_for
from pbtvm.schedules.cuda_bmma_lstm import bmma_lstm_kernel, default_lstm_config
from pbtvm.target import TargetInfo, resolve_target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=SHAPES)
    ap.add_argument("--bits", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--packs-only", action="store_true", help="only the activation-pack table")
    ap.add_argument(
        "--fused", action="store_true", help=f"also the one-launch kernel (batches up to {FUSED_MAX_BATCH})"
    )
    ap.add_argument("--lstm-only", action="store_true", help="only the LSTM step table")
    ap.add_argument("--lstm-hidden", nargs="+", type=int, default=[650, 1500], help="LSTM layer sizes (input = hidden)")
    args = ap.parse_args()
    if args.lstm_only:
        args.shapes, args.packs_only = [], True
    target = resolve_target({"kind": "cuda", "arch": "sm_90"})
    limits = TargetInfo.of(target).limits
    print(
        "| shape (NxK) | W | batch | kernel | config (tiles_m, warps_m, k_split, loads, tiles_n) | threads | "
        "registers | smem B | spill B | BMMA in SASS | LDL/STL |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in [] if args.packs_only else args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        for bits in args.bits:
            fmt = bp.BitplaneFormat(bits, 8, layout="mma16x256")
            for batch in args.batches:
                for fused in (False, True) if args.fused and batch <= FUSED_MAX_BATCH else (False,):
                    cfg = default_config(fmt, n, k, batch, fused_pack=fused)
                    func = kernels.dense_act_func(fmt, n, k) if fused else kernels.dense_func(fmt, n, k)
                    kernel = kernel_for(func, cfg, limits).with_attr("global_symbol", "pb_bmma")
                    name = "one-launch" if fused else "BMMA"
                    print(f"| {shape} | {bits} | {batch} | {name} | {_usage_cells(kernel, cfg, target)}", flush=True)
    print(
        "\n| K | activation pack (ballot, one launch) threads | registers | smem B | spill B | VOTE in SASS | LDL/STL |"
    )
    print("|---|---|---|---|---|---|---|")
    for k in sorted({int(s.split("x")[1]) for s in args.shapes}):
        fmt = bp.BitplaneFormat(4, 8, layout="mma16x256")
        pack = apply_default_schedule(kernels.act_pack_func(fmt, k), target).with_attr("global_symbol", "pb_pack")
        source = cuda_source(build(pack, target))
        (use,) = ptxas_usage(source, "sm_90").values()
        (sass,) = source_sass(source, "sm_90").values()
        print(
            f"| {k} | {32 * pack_warps(k)} | {use['registers']} | {use.get('smem_bytes', 0)} | "
            f"{use['spill_stores'] + use['spill_loads']} | {sass.count('VOTE.ANY')} | {local_memory_ops(sass)} |",
            flush=True,
        )
    _lstm_table(args, target, limits)
    return 0


def _lstm_table(args: argparse.Namespace, target, limits) -> None:
    """ptxas usage of the BMMA LSTM step's default configs (both model forms)."""
    print(
        "\n| LSTM H (= I) | W | batch | form | config | threads | registers | smem B | spill B | BMMA in SASS | LDL/STL |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for hidden in args.lstm_hidden:
        for bits in args.bits:
            fmt = bp.BitplaneFormat(bits, 8, layout="mma16x256")
            for batch in args.batches:
                for form, n_in in (("decoder (x inside)", hidden), ("time loop (gx[t])", None)):
                    cfg = default_lstm_config(fmt, hidden, n_in, batch, limits)
                    kernel = bmma_lstm_kernel(
                        fmt, hidden, cfg, n_in, bias=n_in is not None, sequence=n_in is None, limits=limits
                    )
                    kernel = kernel.with_attr("global_symbol", "pb_step")
                    print(f"| {hidden} | {bits} | {batch} | {form} | {_usage_cells(kernel, cfg, target)}", flush=True)


def _usage_cells(kernel, cfg, target) -> str:
    """A table row's last cells for a BMMA kernel built for sm_90: config, threads, then ptxas's
    registers, shared memory and spills, and the BMMA and LDL/STL instructions in its SASS."""
    source = cuda_source(build(kernel.with_attr("tirx.is_scheduled", True), target))
    (use,) = ptxas_usage(source, "sm_90").values()
    (sass,) = source_sass(source, "sm_90").values()
    knobs = f"{cfg.tiles_m}, {cfg.warps_m}, {cfg.k_split}, {cfg.loads}, {cfg.tiles_n}"
    return (
        f"{knobs} | {cfg.threads} | {use['registers']} | {use.get('smem_bytes', 0)} | "
        f"{use['spill_stores'] + use['spill_loads']} | {sass.count(BMMA_OPCODE)} | {local_memory_ops(sass)} |"
    )


if __name__ == "__main__":
    raise SystemExit(main())
