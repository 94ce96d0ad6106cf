"""PB layers on binary tensor cores (BMMA, ``mma16x256`` weights) vs torch fp16 / int4 and the roofline.

Side by side in one run, on one GPU: the PB layer on the BMMA kernel (activation pack + BMMA
kernel, and the BMMA kernel alone), optionally the one-launch kernel (``--fused``), the layer as
``pbtvm.compile`` builds it for any batch (``--compiled``: one function that dispatches by batch),
pbtvm's default CUDA-core PB layer, torch fp16
(cuBLAS, the better of ``F.linear`` and ``x @ W.T``), torch int4 (tinygemm, group 128), and the
k-bit DRAM roofline from the copy bandwidth measured in the same run. Every time is the median of
CUDA-graph replays in which each call reads another weight set (the sets exceed twice the L2),
as in ``bench_layers.py``, whose helpers this uses. ``--pdl`` chooses the PB kernels: ``on`` as
``compile`` builds them on sm_90 (programmatic dependent launch: a kernel starts while the one
before it runs and prefetches its weights meanwhile; the next launches after a kernel's wait),
``start`` with the next launching as a kernel starts (``PBTVM_CUDA_PDL=start``: kernels may run
ahead more than one deep), ``off`` without it (``PBTVM_CUDA_PDL=0``), ``both`` on and off, ``all``
the three, a row each, side by side.

    python benchmarks/bench_bmma.py --csv out/bmma.csv                 # the issue-13 grid
    python benchmarks/bench_bmma.py --shapes 4096x4096 --batches 1 --bits 4 --with-default
    python benchmarks/bench_bmma.py --dry-run                          # no GPU: build every kernel
    python benchmarks/bench_bmma.py --shapes 4096x4096 --bits 4 --pdl both --fused --compiled

Every kernel is built first, in ``--jobs`` processes (``parallel_build.py``), then timed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator

import torch
from bench_layers import (
    SHAPES,
    append_csv_row,
    bench_int4,
    bench_pb,
    bench_torch,
    graph_time,
    measure_bandwidth,
    n_sets_for,
    rand_u32,
)
from parallel_build import build_all, default_workers

from pbtvm import bitplane as bp
from pbtvm import kernels, names
from pbtvm._tvm import tvm
from pbtvm.cuda import cuda_source
from pbtvm.sass import bmma_problem, dropped_global_loads, source_sass
from pbtvm.schedules.cuda_bmma import default_config, kernel_for
from pbtvm.schedules.cuda_bmma_kernel import BMMAConfig
from pbtvm.target import TargetInfo, resolve_target

MMA = "mma16x256"
#: Largest batch the one-launch kernel is timed at with ``--fused`` (``--fused-max-batch``).
FUSED_MAX_BATCH = 16


def layer_configs(n: int, k: int, bits: int, batch: int) -> tuple[BMMAConfig, BMMAConfig]:
    """(config of the BMMA kernel, config of the one-launch kernel) for a layer at ``batch``
    (``pbtvm.compile`` builds these for the run-time batch's range, ``cuda_bmma.dispatch_configs``,
    or a tuning log's config for its batch's range)."""
    fmt = bp.BitplaneFormat(bits, 8, layout=MMA)
    return default_config(fmt, n, k, batch), default_config(fmt, n, k, batch, fused_pack=True)


def kernel_keys(
    shapes: list[str], bits: list[int], batches: list[int], fused_max_batch: int | None, compiled: bool = False
) -> list[tuple]:
    """Every kernel a run times, once: ``("pack", K, rowsum dtype)`` (the pack depends on nothing else:
    W-k layers share it), ``("bmma", N, K, bits, config)``, with ``fused_max_batch``
    ``("fused", N, K, bits, config)`` for batches up to it, and with ``compiled``
    ``("compiled", N, K, bits)`` (:func:`compiled_layer`)."""
    keys: dict[tuple, None] = {}
    for shape in shapes:
        n, k = (int(v) for v in shape.split("x"))
        for w in bits:
            if compiled:
                keys.update({pack_key(k, w): None, ("compiled", n, k, w): None})
            for batch in batches:
                cfg, fused_cfg = layer_configs(n, k, w, batch)
                keys.update({pack_key(k, w): None, ("bmma", n, k, w, cfg): None})
                if fused_max_batch is not None and batch <= fused_max_batch:
                    keys["fused", n, k, w, fused_cfg] = None
    return list(keys)


def pack_key(k: int, bits: int) -> tuple:
    """The activation pack a W-``bits`` layer of K inputs uses (see :func:`kernel_keys`)."""
    return ("pack", k, bp.BitplaneFormat(bits, 8, layout=MMA).accumulator_dtype(k))


#: ``--pdl`` values: which PB kernels a run builds and times. A kernel's mode: ``on``, programmatic
#: dependent launch as ``compile`` builds it (the next kernel launches after this one's wait);
#: ``start``, the next launches as this one starts (``PBTVM_CUDA_PDL=start``); ``off``, without
#: (``PBTVM_CUDA_PDL=0``).
PDL_MODES = {"on": ("on",), "off": ("off",), "start": ("start",), "both": ("on", "off"), "all": ("on", "start", "off")}
#: ``PBTVM_CUDA_PDL`` of each mode.
PDL_ENV = {"on": "1", "start": names.PDL_AT_START, "off": "0"}


@contextlib.contextmanager
def pdl_env(mode: str) -> Iterator[None]:
    """``PBTVM_CUDA_PDL`` of ``mode`` (:data:`PDL_ENV`) for the builds inside (read as they build)."""
    previous = os.environ.get(names.ENV_CUDA_PDL)
    os.environ[names.ENV_CUDA_PDL] = PDL_ENV[mode]
    try:
        yield
    finally:
        if previous is None:
            del os.environ[names.ENV_CUDA_PDL]
        else:
            os.environ[names.ENV_CUDA_PDL] = previous


def build_kernel(key: tuple, target, pdl: str = "on") -> tvm.runtime.Executable:
    """Compile the kernel ``key`` (see :func:`kernel_keys`) for ``target`` in the ``pdl`` mode
    (:data:`PDL_MODES`; on sm_90+)."""
    with pdl_env(pdl):
        return _build_kernel(key, target, pdl != "off")


def _build_kernel(key: tuple, target, pdl: bool) -> tvm.runtime.Executable:
    if key[0] == "pack":
        fmt = next(
            f
            for f in (bp.BitplaneFormat(b, 8, layout=MMA) for b in range(1, 17))
            if f.accumulator_dtype(key[1]) == key[2]
        )
        return kernels.build(kernels.act_pack_func(fmt, key[1]), target, programmatic=pdl)
    if key[0] == "compiled":
        return kernels.build(compiled_layer(*key[1:]), target, programmatic=pdl)
    kind, n, k, bits, cfg = key
    fmt = bp.BitplaneFormat(bits, 8, layout=MMA)
    func = kernels.dense_act_func(fmt, n, k) if kind == "fused" else kernels.dense_func(fmt, n, k)
    kernel = kernel_for(func, cfg, TargetInfo.of(target).limits).with_attr("tirx.is_scheduled", True)
    return kernels.build(kernel, target, schedule=False, programmatic=pdl)


def compiled_layer(n: int, k: int, bits: int):
    """The PB product function ``pbtvm.compile`` builds for an N x K layer with a symbolic batch
    whose input no other layer reads (``kernels.compiled_dense_func``): ``pb_dense_act`` that
    dispatches (one launch at small batches, ballot pack + BMMA kernel above), or above
    ``ONE_LAUNCH_MAX_WEIGHTS`` the BMMA kernels of a dispatch after the separate ballot pack."""
    fmt = bp.BitplaneFormat(bits, 8, layout=MMA)
    return kernels.compiled_dense_func(fmt, n, k, resolve_target({"kind": "cuda", "arch": "sm_90"}))


def export_kernel(job: tuple, path: str) -> None:
    """Worker (:func:`parallel_build.build_all`): ``job = (key, target, pdl mode)``, the kernel written to ``path``."""
    key, target, pdl = job
    build_kernel(key, target, pdl).export_library(path)


def check_kernel(job: tuple, path: str) -> None:
    """Worker of the dry run: build the kernel, nvcc it for sm_90 and write to ``path`` (JSON)
    whether its SASS lacks BMMA or has local-memory spills (a PB product kernel must have neither)
    or another number of global loads than its PTX (any kernel)."""
    key, target, pdl = job
    source = cuda_source(build_kernel(key, target, pdl))
    sass = source_sass(source, "sm_90")
    problems = []
    if key[0] in ("bmma", "fused", "compiled"):
        problems.append(bmma_problem("".join(sass.values())))
    dropped = dropped_global_loads(source, "sm_90", sass)
    if dropped:
        problems.append(f"global loads (PTX, SASS) differ: {dropped}")
    problem = "; ".join(p for p in problems if p) or None
    with open(path, "w") as f:
        json.dump({"problem": problem}, f)


def build_kernels(keys: list[tuple], target, workers: int, check: bool = False, pdl: tuple = ("on",)) -> dict:
    """Build ``keys`` in ``workers`` processes for each ``pdl`` mode (:func:`build_kernel`):
    {(key, pdl): executable}, or with ``check`` {(key, pdl): problem or None}."""
    jobs = [(key, target, mode) for mode in pdl for key in keys]
    with tempfile.TemporaryDirectory(prefix="pbtvm_bench_bmma_") as tmp:
        worker = check_kernel if check else export_kernel
        paths = build_all(
            worker, jobs, tmp, workers, label=lambda job: f"{job[0]}{'' if job[2] == 'on' else ' PDL ' + job[2]}"
        )
        done = [(key, mode) for key, _, mode in jobs]
        if check:
            return {job: _read_json(path)["problem"] for job, path in zip(done, paths, strict=True)}
        return {job: tvm.runtime.Executable(tvm.runtime.load_module(p)) for job, p in zip(done, paths, strict=True)}


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def bench_bmma(n: int, k: int, batch: int, bits: int, l2: int, built: dict, part: str, pdl: str = "on") -> float:
    """Seconds per call: ``part`` "layer" (pack + BMMA kernel), "gemm" (BMMA kernel alone),
    "fused" (one kernel: every block packs its batch rows, then the BMMA product) or "compiled"
    (:func:`compiled_layer`, after the ballot pack where it does not pack itself); ``built``
    holds the kernels (:func:`build_kernels`), ``pdl`` which of them."""
    fmt = bp.BitplaneFormat(bits, 8, layout=MMA)
    cfg, fused_cfg = layer_configs(n, k, bits, batch)
    pack, dense = built[pack_key(k, bits), pdl], built[("bmma", n, k, bits, cfg), pdl]
    fused = built[("fused", n, k, bits, fused_cfg), pdl] if part == "fused" else None
    if part == "compiled":  # packs its input itself, or after the separate pack
        compiled, fused = built[("compiled", n, k, bits), pdl], None
        if names.kernel_kind(compiled_layer(n, k, bits)) == names.KernelKind.DENSE_ACT:
            fused = compiled
        else:
            dense, part = compiled, "layer"
    sets = n_sets_for(4 * math.prod(fmt.weight_shape(n, k)), l2)
    ws = [weight_set(fmt, n, k) for _ in range(sets)]
    xs = [torch.randn(batch, k, device="cuda") for _ in range(sets)]
    xp, sx, rs, y = packed_inputs(fmt, n, k, batch)

    def step(i: int) -> None:
        w, s, b = ws[i]
        if fused is not None:
            fused(xs[i], w, s, b, bits, y)
            return
        if part == "layer":
            pack(xs[i], xp, sx, rs)
        dense(xp, sx, rs, w, s, b, bits, y)

    return graph_time(step, sets)


def weight_set(fmt: bp.BitplaneFormat, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random CUDA weights of an N x K layer: packed planes (uint32, ``fmt.weight_shape``), scales
    and bias (float32 [N])."""
    return rand_u32(fmt.weight_shape(n, k)), torch.rand(n, device="cuda"), torch.randn(n, device="cuda")


def packed_inputs(fmt: bp.BitplaneFormat, n: int, k: int, batch: int) -> tuple[torch.Tensor, ...]:
    """The BMMA kernel's other CUDA arguments: random packed activations ``xp`` (uint32,
    ``fmt.act_shape(batch, K)``), row scales (float32 [batch]), zero row sums (accumulator dtype [batch]) and the
    output ``y`` (float32 [batch, N])."""
    xp = rand_u32(fmt.act_shape(batch, k))
    rowsum = torch.zeros(batch, dtype=getattr(torch, fmt.accumulator_dtype(k)), device="cuda")
    return xp, torch.rand(batch, device="cuda"), rowsum, torch.empty(batch, n, device="cuda")


def dry_run(args: argparse.Namespace) -> int:
    """Build every kernel the benchmark would run, for sm_90, without a device; nvcc + SASS check."""
    target = resolve_target({"kind": "cuda", "arch": "sm_90"})
    t0 = time.time()
    keys = kernel_keys(
        args.shapes, args.bits, args.batches, args.fused_max_batch if args.fused else None, args.compiled
    )
    problems = build_kernels(keys, target, args.jobs, check=True, pdl=PDL_MODES[args.pdl])
    bad = {key: p for key, p in problems.items() if p}
    print(f"dry run: {len(problems)} kernels built for sm_90 and checked with nvcc in {time.time() - t0:.0f}s")
    for key, problem in bad.items():
        print(f"  {problem}: {key}", file=sys.stderr)
    return 1 if bad else 0


def print_table(rows: list[dict], fused: bool, compiled: bool = False) -> None:
    """The Markdown table of BENCHMARKS.md (ratios > 1: the BMMA layer is faster)."""

    def us(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1f}"

    def ratio(a: float | None, b: float) -> str:
        return "n/a" if a is None else f"{a / b:.2f}"

    extra = (" one-launch µs |" if fused else "") + (" compiled µs |" if compiled else "")
    print(
        "\n| shape (NxK) | batch | W | PDL | BMMA layer µs |" + extra + " BMMA kernel µs | k-bit roofline µs | "
        "% roofline (layer / kernel) | fp16 µs | int4 µs | fp16/layer | int4/layer |"
    )
    print("|---" * (12 + fused + compiled) + "|")
    for r in rows:
        one = (f" {us(r.get('fused_us'))} |" if fused else "") + (f" {us(r.get('compiled_us'))} |" if compiled else "")
        print(
            f"| {r['shape']} | {r['batch']} | {r['bits']} | {r['pdl']} | {r['bmma_layer_us']:.1f} |{one} "
            f"{r['bmma_kernel_us']:.1f} | "
            f"{r['roof_us']:.1f} | {r['pct_roof_layer']:.0f}% / {r['pct_roof_kernel']:.0f}% | {r['fp16_us']:.1f} | "
            f"{us(r['int4_us'])} | {ratio(r['fp16_us'], r['bmma_layer_us'])} | {ratio(r['int4_us'], r['bmma_layer_us'])} |"
        )


def time_row(args, built, shape, batch, bits, pdl, l2, bw, fp16, int4, old_cache) -> dict:
    """One row of the table: the PB layer's parts at ``shape``, ``batch``, W``bits`` with the
    ``pdl`` kernels, beside the torch times ``fp16`` and ``int4`` (seconds) measured once for both."""
    n, k = (int(v) for v in shape.split("x"))
    fmt = bp.BitplaneFormat(bits, 8, layout=MMA)
    layer = bench_bmma(n, k, batch, bits, l2, built, "layer", pdl)
    gemm = bench_bmma(n, k, batch, bits, l2, built, "gemm", pdl)
    roof = (bits * n * fmt.words(k) * 4 + batch * (k + n) * 4) / bw
    r = {
        "shape": shape,
        "batch": batch,
        "bits": bits,
        "pdl": pdl,
        "config": str(layer_configs(n, k, bits, batch)[0]),
        "bmma_layer_us": layer * 1e6,
        "bmma_kernel_us": gemm * 1e6,
        "roof_us": roof * 1e6,
        "pct_roof_layer": 100 * roof / layer,
        "pct_roof_kernel": 100 * roof / gemm,
        "fp16_us": fp16 * 1e6,
        "int4_us": None if int4 is None else int4 * 1e6,
        "copy_tb_s": bw / 1e12,
    }
    if args.fused:
        fused = batch <= args.fused_max_batch
        r["fused_us"] = bench_bmma(n, k, batch, bits, l2, built, "fused", pdl) * 1e6 if fused else None
        r["fused_config"] = str(layer_configs(n, k, bits, batch)[1]) if fused else None
    if args.compiled:
        try:
            r["compiled_us"] = bench_bmma(n, k, batch, bits, l2, built, "compiled", pdl) * 1e6
        except Exception as err:  # report it, time the rest
            print(f"  compiled layer {shape} b={batch} W{bits}: {err}", file=sys.stderr, flush=True)
            r["compiled_us"] = None
    if args.with_default:
        r["cuda_core_layer_us"] = bench_pb(n, k, batch, bits, l2, old_cache) * 1e6
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="NxK (out x in)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16, 64])
    ap.add_argument("--bits", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--csv", default=None)
    ap.add_argument("--with-default", action="store_true", help="also time pbtvm's CUDA-core PB layer")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: build every kernel for sm_90 and stop")
    ap.add_argument("--fused", action="store_true", help="also the one-launch kernel (pack inside the BMMA kernel)")
    ap.add_argument("--compiled", action="store_true", help="also the layer as pbtvm.compile builds it (any batch)")
    ap.add_argument("--fused-max-batch", type=int, default=FUSED_MAX_BATCH, help="largest batch timed with --fused")
    ap.add_argument(
        "--pdl", choices=sorted(PDL_MODES), default="on", help="PB kernels with programmatic dependent launch (sm_90)"
    )
    ap.add_argument(
        "--jobs", type=int, default=default_workers(), help="processes that build the kernels (default: cores - 1)"
    )
    args = ap.parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (try --dry-run)", file=sys.stderr)
        return 2
    t0 = time.time()
    keys = kernel_keys(
        args.shapes, args.bits, args.batches, args.fused_max_batch if args.fused else None, args.compiled
    )
    print(f"building {len(keys)} kernels in {args.jobs} processes", flush=True)
    built = build_kernels(keys, resolve_target("cuda"), args.jobs, pdl=PDL_MODES[args.pdl])
    print(f"built in {time.time() - t0:.0f}s", flush=True)
    props = torch.cuda.get_device_properties(0)
    l2, bw = props.L2_cache_size, measure_bandwidth()
    print(f"device {props.name}, L2 {l2 / 1e6:.0f} MB, copy bandwidth {bw / 1e12:.2f} TB/s, torch {torch.__version__}")
    rows, old_cache = [], {}
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        for batch in args.batches:
            fp16 = bench_torch(n, k, batch, torch.float16, l2)
            int4 = bench_int4(n, k, batch, l2)
            for bits in args.bits:
                for pdl in PDL_MODES[args.pdl]:
                    r = time_row(args, built, shape, batch, bits, pdl, l2, bw, fp16, int4, old_cache)
                    rows.append(r)
                    if args.csv:  # row by row, so a run cut short by its timeout keeps what it measured
                        append_csv_row(args.csv, r, first=len(rows) == 1)
                    one = f"  one-launch {r['fused_us']:7.1f}" if r.get("fused_us") else ""
                    one += f"  compiled {r['compiled_us']:7.1f}" if r.get("compiled_us") else ""
                    print(
                        f"  {shape:>11} b={batch:<2} W{bits}A8 PDL {r['pdl']:<5}  layer {r['bmma_layer_us']:7.1f} us{one}"
                        f"  kernel {r['bmma_kernel_us']:7.1f}  roof {r['roof_us']:5.1f} ({r['pct_roof_kernel']:.0f}% "
                        f"kernel)  fp16 {fp16 * 1e6:6.1f}  int4 {r['int4_us'] or float('nan'):6.1f}  "
                        f"[{time.time() - t0:.0f}s]",
                        flush=True,
                    )
    print_table(rows, args.fused, args.compiled)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
