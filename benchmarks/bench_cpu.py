"""PB linear layers on the CPU vs torch fp32 / bf16 / int8 dynamic / int4 tinygemm, in one process.

Every method runs a stack of ``--layers`` different weight sets (more bytes than the L3 at
4096x4096 and W >= 2), the same activation into each layer, and reports microseconds per layer:
the median over ``--rounds`` rounds in which the methods take turns (so a noisy neighbour hits
them alike; each method's timed pass follows a 0.3 s pause, so no library's spinning worker
threads take the cores from the next, and untimed passes for at least 50 ms, so its own workers
are awake and the clock has ramped up, as in a model that runs continuously). The PB layer is what ``pbtvm.compile`` runs per dense layer: on
a CPU with AVX-512 BW+VNNI one kernel that quantizes the rows and runs the AVX-512 GEMM
(``pbtvm.ops.pb_vnni``, GFNI block decode where the CPU has it), on AVX2 CPUs the same kernel
built with ``vpmaddubsw`` + ``vpmaddwd``, elsewhere the activation quantize+pack kernel
and the popcount GEMM; on a CPU with AMX-INT8 from
:func:`pbtvm.ops.amx_gemm.amx_min_batch` rows its tile loops (``PB Wk zmm``, ``--zmm``: built
without them); ``PB-old`` (``--old``) is the portable path; ``PB Wk lut`` (``--lut``)
the layer in the ``lut16x4`` layout, on AVX2 CPUs the table-lookup kernel (``pbtvm.ops.pb_lut``). ``floor``
is the k-bit weight bytes over the read bandwidth measured in the same run.

Usage::

    python benchmarks/bench_cpu.py [--quick] [--old] [--lut] [--threads 2] [--shapes 4096x4096 ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import warnings

THREADS_ENV = ("TVM_NUM_THREADS", "OMP_NUM_THREADS")


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096"], help="NxK")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8, 16])
    p.add_argument("--bits", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--act-bits", type=int, default=8)
    p.add_argument("--layers", type=int, default=6, help="weight sets in the stack (>= 6)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="thread: CPU time of the calling thread (needs --threads 1; robust on a shared machine)",
    )
    p.add_argument("--old", action="store_true", help="also time the portable popcount kernel (slow)")
    p.add_argument(
        "--lut",
        action="store_true",
        help="also time the layers in the lut16x4 layout (the AVX2 table-lookup kernel, pbtvm.ops.pb_lut)",
    )
    p.add_argument(
        "--zmm",
        action="store_true",
        help="on a CPU with AMX, also time the layers built without it (the AVX-512 loops at every batch)",
    )
    p.add_argument("--quick", action="store_true", help="4096x4096, batches 1 and 8, W1/W4, 5 rounds")
    args = p.parse_args()
    if args.clock == "thread" and args.threads != 1:
        p.error("--clock thread measures one thread: use --threads 1")
    if args.quick:
        args.shapes, args.batches, args.bits, args.rounds = ["4096x4096"], [1, 8], [1, 4], 5
    return args


ARGS = _parse()
for _name in THREADS_ENV:
    os.environ[_name] = str(ARGS.threads)
# Every library keeps its default thread behaviour (TVM's and torch's idle workers spin for a
# while after each call); the pause before each method (SETTLE_S) lets the other's go idle.

import numpy as np
import torch

from pbtvm import bitplane as bp
from pbtvm import kernels
from pbtvm._tvm import tvm
from pbtvm.target import resolve_target

warnings.filterwarnings("ignore")
torch.set_num_threads(ARGS.threads)
SETTLE_S = 0.3
#: Each method runs untimed for at least this long before its timed pass: after the pause the
#: cores' clock takes ~20 ms to ramp up (the 2-vCPU Xeon guest: a W4 4096x4096 layer at batch 8
#: 690 -> 540 us (AVX-512) and 840 -> 400 us (AMX) over its first 30 calls), and a model that
#: runs continuously runs at the ramped clock.
WARM_S = 0.05
CLOCK = time.thread_time if ARGS.clock == "thread" else time.perf_counter


def uptime() -> str:
    """The machine's load line (the CPU is shared; say how busy it was)."""
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def cpu_name() -> str:
    """``Model name`` from lscpu."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")


def read_bandwidth() -> float:
    """Bytes/s of a streaming read (torch sum over 512 MB) with the benchmark's threads and clock."""
    a = torch.ones(1 << 27, dtype=torch.float32)
    a.sum()
    times = []
    for _ in range(5):
        t0 = CLOCK()
        a.sum()
        times.append(CLOCK() - t0)
    return a.numel() * 4 / min(times)


def _tvm(a: np.ndarray):
    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())


class PBStack:
    """``layers`` PB dense layers (no bias) of one shape and format, as ``pbtvm.compile`` runs them:
    one kernel per layer where :func:`one_kernel_layer` says so, else the pack and the GEMM."""

    def __init__(self, n: int, k: int, fmt: bp.BitplaneFormat, layers: int, target, old: bool) -> None:
        from pbtvm.schedules.cpu_vnni import one_kernel_layer

        rng = np.random.default_rng(0)
        if old:
            os.environ["PBTVM_CPU_KERNEL"] = "popcount"
        try:
            self.one = one_kernel_layer(fmt, k, target)
            if self.one:
                self.layer = kernels.build(kernels.dense_act_func(fmt, n, k, bias=False), target)
            else:
                self.pack = kernels.build(kernels.act_pack_func(fmt, k), target)
                self.gemm = kernels.build(kernels.dense_func(fmt, n, k, bias=False), target)
        finally:
            os.environ.pop("PBTVM_CPU_KERNEL", None)
        self.fmt, self.n, self.k = fmt, n, k
        self.w = [_tvm(rng.integers(0, 2**32, fmt.weight_shape(n, k), dtype=np.uint32)) for _ in range(layers)]
        self.ws = _tvm(np.full(n, 1e-3, np.float32))
        self.bufs: dict[int, tuple] = {}

    def run(self, x: np.ndarray) -> None:
        """One pass through the stack with activation ``x`` [B, K]."""
        b = x.shape[0]
        if b not in self.bufs:
            xp = _tvm(np.zeros((self.fmt.act_bits, b, self.fmt.words(self.k)), np.uint32))
            self.bufs[b] = (
                _tvm(x),
                xp,
                _tvm(np.zeros(b, np.float32)),
                _tvm(np.zeros(b, np.int32)),
                _tvm(np.zeros((b, self.n), np.float32)),
            )
        xt, xp, xs, rs, y = self.bufs[b]
        for w in self.w:
            if self.one:
                self.layer(xt, w, self.ws, self.fmt.bits, y)
            else:
                self.pack(xt, xp, xs, rs)
                self.gemm(xp, xs, rs, w, self.ws, self.fmt.bits, y)


def torch_stacks(n: int, k: int, layers: int) -> dict:
    """Per method, a function running ``x`` through ``layers`` torch layers (int4 tinygemm only
    where N is a multiple of 16 and K of 128)."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, k, generator=g) * 0.02 for _ in range(layers)]
    bf = [w.to(torch.bfloat16) for w in ws]
    lin = []
    for w in ws:
        m = torch.nn.Linear(k, n, bias=False)
        m.weight.data = w
        lin.append(torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(m), {torch.nn.Linear}, dtype=torch.qint8))
    group = 128
    int4 = []
    methods = {
        "fp32": lambda x: [torch.nn.functional.linear(x, w) for w in ws],
        "bf16": lambda x: [torch.nn.functional.linear(x.to(torch.bfloat16), w) for w in bf],
        "int8 dyn": lambda x: [m(x) for m in lin],
    }
    if n % 16 or k % group:  # tinygemm's packing needs whole 16-row tiles and 128-input groups
        return methods
    for _ in range(layers):
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g)
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
        sz = torch.rand(k // group, n, 2, generator=g) * 0.01
        int4.append((packed, sz))
    methods["int4 tinygemm"] = lambda x: [torch._weight_int4pack_mm_for_cpu(x, p, group, sz) for p, sz in int4]
    return methods


def without_amx(target):
    """``target`` without the AMX features (its ``mattr`` minus them, each switched off)."""
    from pbtvm.ops.amx_gemm import AMX_FEATURES

    mattr = [f for f in target.attrs.get("mattr", []) if f.lstrip("+-") not in AMX_FEATURES]
    spec = {"kind": "llvm", "mcpu": str(target.attrs["mcpu"]), "mattr": [*mattr, *(f"-{f}" for f in AMX_FEATURES)]}
    return tvm.target.Target(spec)


def bench_shape(n: int, k: int, target, bw: float) -> list[str]:
    """Markdown rows for one shape, every batch."""
    layers = ARGS.layers
    methods: dict = {name: (fn, None) for name, fn in torch_stacks(n, k, layers).items()}
    for bits in ARGS.bits:
        fmt = bp.BitplaneFormat(bits, ARGS.act_bits)
        methods[f"PB W{bits}"] = (PBStack(n, k, fmt, layers, target, old=False), bits)
        if ARGS.zmm:
            methods[f"PB W{bits} zmm"] = (PBStack(n, k, fmt, layers, without_amx(target), old=False), bits)
        if ARGS.old:
            methods[f"PB-old W{bits}"] = (PBStack(n, k, fmt, layers, target, old=True), bits)
        if ARGS.lut:
            lut = bp.BitplaneFormat(bits, ARGS.act_bits, layout=bp.LUT_LAYOUT)
            methods[f"PB W{bits} lut"] = (PBStack(n, k, lut, layers, target, old=False), bits)
    rows = []
    for batch in ARGS.batches:
        x = torch.randn(batch, k)
        xn = x.numpy()
        calls = {
            name: (lambda f=f, xn=xn: f.run(xn)) if isinstance(f, PBStack) else (lambda f=f, x=x: f(x))
            for name, (f, _) in methods.items()
        }
        times: dict[str, list[float]] = {name: [] for name in calls}
        with torch.no_grad():
            for call in calls.values():
                call()  # warm-up
            for _ in range(ARGS.rounds):
                for name, call in calls.items():
                    # let the previous method's worker threads go idle first (torch's OpenMP and
                    # TVM's pool spin after each call and would take the cores from the next
                    # method), then one untimed pass wakes this method's own workers
                    time.sleep(SETTLE_S)
                    warm_until = time.perf_counter() + WARM_S
                    call()
                    while time.perf_counter() < warm_until:
                        call()
                    t0 = CLOCK()
                    call()
                    times[name].append((CLOCK() - t0) / layers * 1e6)
        us = {name: statistics.median(v) for name, v in times.items()}
        base = us["int8 dyn"]
        for name, t in us.items():
            bits = methods[name][1]
            floor = f"{n * k * bits / 8 / bw * 1e6:,.0f}" if bits else "-"
            rows.append(f"| {n}x{k} | {batch} | {name} | {t:,.0f} | {base / t:.2f}x | {floor} |")
        print("\n".join(rows[-len(us) :]), flush=True)
    return rows


def main() -> int:
    """Run every shape and print a markdown table."""
    target = resolve_target("llvm")
    from pbtvm.ops.amx_gemm import AMX_FEATURES, AMX_MIN_BATCH
    from pbtvm.ops.pb_vnni import cpu_isa, target_supports

    amx = (
        f", AMX from batch {AMX_MIN_BATCH[0]} (W1-4) / {AMX_MIN_BATCH[1]} (W5-8)"
        if target_supports(target, AMX_FEATURES)
        else ""
    )
    print(
        f"# {cpu_name()}, {ARGS.threads} threads, target {target.attrs.get('mcpu')}, "
        f"byte-code PB kernel: {cpu_isa(target) or 'none (popcount)'}{amx}, torch {torch.__version__}, tvm {tvm.__version__}"
    )
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load at start: {uptime()}")
    bw = read_bandwidth()
    print(
        f"# read bandwidth (torch sum, 512 MB): {bw / 1e9:.1f} GB/s; {ARGS.layers} layers per stack, "
        f"median of {ARGS.rounds} interleaved rounds, {ARGS.clock} clock, act_bits {ARGS.act_bits}"
    )
    print("| shape | batch | method | us/layer | vs int8 dyn | k-bit floor us |")
    print("|---|---|---|---|---|---|", flush=True)
    for shape in ARGS.shapes:
        n, k = (int(v) for v in shape.split("x"))
        bench_shape(n, k, target, bw)
    print(f"# load at end: {uptime()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
