"""PB linear layers on a CUDA GPU vs torch fp16 / fp32 / int4 and the k-bit DRAM roofline.

Every time is the median of CUDA-graph replays in which each call reads a different weight set
(sets rotate so that the weights in flight exceed twice the L2), divided by the calls per
replay. The PB time is the whole layer: activation quantize+pack kernel plus the PB kernel. The
DRAM bandwidth is measured in the same run (device copy, bytes read + written).

Usage::

    python benchmarks/bench_layers.py --shapes 4096x4096 --batches 1 8 --bits 4 [--csv out.csv]
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time

import torch
import tvm_ffi

from pbtvm import bitplane as bp
from pbtvm import kernels
from pbtvm.target import resolve_target

SHAPES = ["4096x4096", "11008x4096", "4096x11008", "6000x1500", "8192x2048", "2600x650"]


def measure_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    a = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * a.numel() * 4 / statistics.median(times)


def graph_time(step, n_sets: int, reps: int = 4) -> float:
    """Seconds per call of ``step(i)`` (i cycles over the weight sets), via a captured CUDA graph."""
    calls = n_sets * reps
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), tvm_ffi.use_torch_stream():
        for i in range(n_sets):  # warm-up (module load, allocations) outside the capture
            step(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with tvm_ffi.use_torch_stream(torch.cuda.graph(graph, stream=stream)):
        for c in range(calls):
            step(c % n_sets)
    times = []
    for _ in range(7):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / calls)
    return statistics.median(times)


def n_sets_for(bytes_per_set: int, l2: int) -> int:
    return max(2, math.ceil(2 * l2 / max(bytes_per_set, 1)))


def rand_u32(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, device="cuda").view(torch.uint32)


def bench_pb(n: int, k: int, batch: int, bits: int, l2: int, cache: dict, part: str = "layer") -> float:
    """Seconds per PB layer call; ``part``: "layer" (pack + PB kernel), "pack", "gemm" alone, or
    "inblock" (``pb_dense_act``: one kernel whose blocks pack the row themselves)."""
    fmt = bp.BitplaneFormat(bits, 8)
    key = (n, k, bits)
    if key not in cache:
        target = resolve_target("cuda")
        cache[key] = (
            kernels.build(kernels.act_pack_func(fmt, k), target),
            kernels.build(kernels.dense_func(fmt, n, k), target),
            kernels.build(kernels.dense_act_func(fmt, n, k), target),
        )
    pack, dense, dense_act = cache[key]
    wbytes = bits * n * fmt.words(k) * 4
    sets = n_sets_for(wbytes, l2)
    acc = getattr(torch, fmt.accumulator_dtype(k))
    ws = [
        (rand_u32(fmt.weight_shape(n, k)), torch.rand(n, device="cuda"), torch.randn(n, device="cuda"))
        for _ in range(sets)
    ]
    xs = [torch.randn(batch, k, device="cuda") for _ in range(sets)]
    xp = torch.empty(fmt.act_shape(batch, k), dtype=torch.int32, device="cuda").view(torch.uint32)
    sx, rs = torch.empty(batch, device="cuda"), torch.empty(batch, dtype=acc, device="cuda")
    y = torch.empty(batch, n, device="cuda")

    def step(i: int) -> None:
        if part == "inblock":
            w, s, b = ws[i]
            dense_act(xs[i], w, s, b, bits, y)
            return
        if part != "gemm":
            pack(xs[i], xp, sx, rs)
        if part != "pack":
            w, s, b = ws[i]
            dense(xp, sx, rs, w, s, b, bits, y)

    return graph_time(step, sets)


def bench_torch(n: int, k: int, batch: int, dtype: torch.dtype, l2: int) -> float:
    sets = n_sets_for(n * k * torch.finfo(dtype).bits // 8, l2)
    ws = [torch.randn(n, k, device="cuda", dtype=dtype) for _ in range(sets)]
    wts = [w.t().contiguous() for w in ws]
    x = torch.randn(batch, k, device="cuda", dtype=dtype)
    best = graph_time(lambda i: torch.nn.functional.linear(x, ws[i]), sets)
    return min(best, graph_time(lambda i: x @ wts[i], sets))


def bench_int4(n: int, k: int, batch: int, l2: int) -> float | None:
    """torch's tinygemm int4 kernel (group 128), or None where this torch lacks it."""
    try:
        sets = n_sets_for(n * k // 2, l2)
        group = 128
        packed = []
        for _ in range(sets):
            q = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
            qp = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            w = torch._convert_weight_to_int4pack(qp, 8)
            sz = torch.rand(k // group, n, 2, dtype=torch.bfloat16, device="cuda")
            packed.append((w, sz))
        x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
        return graph_time(lambda i: torch._weight_int4pack_mm(x, packed[i][0], group, packed[i][1]), sets)
    except Exception as err:
        print(f"  int4 tinygemm unavailable for {n}x{k}: {type(err).__name__}: {str(err)[:120]}", file=sys.stderr)
        return None


def append_csv_row(path: str, row: dict, first: bool) -> None:
    """Write one result row to the CSV at ``path`` (``first``: a new file with the header), so a run
    cut short by its timeout keeps every row it measured."""
    with open(path, "w" if first else "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if first:
            w.writeheader()
        w.writerow(row)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="NxK (out x in)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8, 16])
    ap.add_argument("--bits", nargs="+", type=int, default=[1, 2, 3, 4, 6, 8])
    ap.add_argument("--csv", default=None)
    ap.add_argument("--breakdown", action="store_true", help="also time the pack and PB kernels alone")
    ap.add_argument("--in-block", action="store_true", help="also time pb_dense_act (pack inside the PB kernel)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    l2 = props.L2_cache_size
    bw = measure_bandwidth()
    print(f"device {props.name}, L2 {l2 / 1e6:.0f} MB, copy bandwidth {bw / 1e12:.2f} TB/s, torch {torch.__version__}")
    rows, cache = [], {}
    t0 = time.time()
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        for batch in args.batches:
            fp16 = bench_torch(n, k, batch, torch.float16, l2)
            fp32 = bench_torch(n, k, batch, torch.float32, l2)
            int4 = bench_int4(n, k, batch, l2)
            for bits in args.bits:
                pb = bench_pb(n, k, batch, bits, l2, cache)
                fmt = bp.BitplaneFormat(bits, 8)
                roof = (bits * n * fmt.words(k) * 4 + batch * (k + n) * 4) / bw
                rows.append(
                    {
                        "shape": shape,
                        "batch": batch,
                        "bits": bits,
                        "pb_us": pb * 1e6,
                        "roof_us": roof * 1e6,
                        "pct_roof": 100 * roof / pb,
                        "fp16_us": fp16 * 1e6,
                        "fp32_us": fp32 * 1e6,
                        "int4_us": None if int4 is None else int4 * 1e6,
                    }
                )
                r = rows[-1]
                if args.in_block:
                    r["inblock_us"] = bench_pb(n, k, batch, bits, l2, cache, "inblock") * 1e6
                    print(f"    one kernel (pb_dense_act) {r['inblock_us']:.1f} us")
                if args.breakdown:
                    r["pack_us"] = bench_pb(n, k, batch, bits, l2, cache, "pack") * 1e6
                    r["gemm_us"] = bench_pb(n, k, batch, bits, l2, cache, "gemm") * 1e6
                    print(f"    pack alone {r['pack_us']:.1f} us, PB kernel alone {r['gemm_us']:.1f} us")
                if args.csv:
                    append_csv_row(args.csv, r, first=len(rows) == 1)
                print(
                    f"  {shape:>11} b={batch:<2} W{bits}A8  pb {r['pb_us']:8.1f} us  roof {r['roof_us']:6.1f}  "
                    f"fp16 {r['fp16_us']:7.1f}  fp32 {r['fp32_us']:7.1f}  int4 {r['int4_us'] or float('nan'):7.1f}  "
                    f"[{time.time() - t0:.0f}s]",
                    flush=True,
                )
    extra = " one-kernel us |" if args.in_block else ""
    print(f"\n| shape (NxK) | batch | W | PB us | % k-bit roofline | fp16/PB | fp32/PB | int4/PB |{extra}")
    print("|---|---|---|---|---|---|---|---|" + ("---|" if args.in_block else ""))
    for r in rows:
        i4 = f"{r['int4_us'] / r['pb_us']:.2f}" if r["int4_us"] else "n/a"
        one = f" {r['inblock_us']:.1f} |" if args.in_block else ""
        print(
            f"| {r['shape']} | {r['batch']} | {r['bits']} | {r['pb_us']:.1f} | {r['pct_roof']:.0f}% | "
            f"{r['fp16_us'] / r['pb_us']:.2f} | {r['fp32_us'] / r['pb_us']:.2f} | {i4} |{one}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
