"""Whole compiled models on a CUDA GPU: programmatic dependent launch modes, vs torch fp16.

``bench_bmma.py --pdl both`` times one layer called back to back, where every kernel is a PB
kernel. In a model TVM's own kernels (GELU, relu, residual add, layer norm) run between the PB
layers (where the activation is not folded into the layer); since ``cuda_pdl.wait_first`` they
wait first and let the next kernel launch too. This times what a user runs: ``pbtvm.compile`` of
a transformer-style feed-forward stack and of a ReLU MLP, each built three times in one run
(default: the next kernel launches after a kernel's wait; ``PBTVM_CUDA_PDL=start``: as it
starts; ``PBTVM_CUDA_PDL=0``: no PDL), every call captured in a torch CUDA graph (the launches a
graph replays; no host time), beside the torch fp16 model in a CUDA graph (cuBLAS) and the
k-bit weight roofline at the copy bandwidth measured in the same run. At the defaults both
stacks hold more than the 60 MB L2 at W4 (FFN, 2 blocks: 99 MB; MLP, 8 x 4096^2: 67 MB): calls
do not find their weights in the L2.

Usage::

    python benchmarks/bench_models_gpu.py [--hidden 4096] [--blocks 2] [--batches 1 8] [--bits 4] [--csv out.csv]
    python benchmarks/bench_models_gpu.py --dry-run   # no GPU: build both variants for sm_90, check the launch flags
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import tvm_ffi
from bench_bmma import PDL_ENV, pdl_env
from bench_layers import append_csv_row, graph_time, measure_bandwidth

import pbtvm
from pbtvm import library, names


class FeedForward(torch.nn.Module):
    """``blocks`` pre-norm transformer feed-forward blocks: x + down(gelu(up(norm(x)))), then a head."""

    def __init__(self, hidden: int, ffn: int, blocks: int) -> None:
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(hidden) for _ in range(blocks))
        self.ups = torch.nn.ModuleList(torch.nn.Linear(hidden, ffn) for _ in range(blocks))
        self.downs = torch.nn.ModuleList(torch.nn.Linear(ffn, hidden) for _ in range(blocks))
        self.head = torch.nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, up, down in zip(self.norms, self.ups, self.downs, strict=True):
            x = x + down(torch.nn.functional.gelu(up(norm(x))))
        return self.head(x)


class ReluMLP(torch.nn.Module):
    """``layers`` square Linear + ReLU layers (the paper's MLP shape, widened)."""

    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def make_models(hidden: int, blocks: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    ffn = (hidden * 8 // 3 + 255) // 256 * 256  # 4096 -> 11008 (LLaMA's ratio, rounded)
    return {
        f"ffn{blocks}x{hidden}-{ffn}": FeedForward(hidden, ffn, blocks).eval(),
        f"mlp{4 * blocks}x{hidden}": ReluMLP(hidden, 4 * blocks).eval(),
    }


def weight_count(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def compile_modes(model: torch.nn.Module, example: torch.Tensor, target, bits: int) -> dict[str, object]:
    """The model compiled in every programmatic-launch mode (``bench_bmma.PDL_ENV``: on, start,
    off), ``{mode: compiled}``."""
    built = {}
    for mode in PDL_ENV:
        with pdl_env(mode):
            t0 = time.time()
            built[mode] = pbtvm.compile(model, (example,), target=target, bits=bits)
            print(f"  compiled pdl={mode} in {time.time() - t0:.0f} s", flush=True)
    return built


def launch_flags(compiled, path: str) -> tuple[int, int]:
    """(kernels launched early, kernels) of ``compiled`` exported to ``path``."""
    compiled.export(path)
    tags = library.cuda_launch_tags(path)
    return sum(names.LAUNCH_PROGRAMMATIC in v for v in tags.values()), len(tags)


def graph_us(call, calls: int = 20) -> float:
    """Microseconds per ``call()`` replayed from a torch CUDA graph of ``calls`` calls
    (:func:`bench_layers.graph_time`: median of 7 replays, warmed up outside the capture)."""
    return graph_time(lambda _: call(), 1, calls) * 1e6


def stream_us(call, calls: int = 50) -> float:
    """Microseconds per ``call()`` launched back to back on the current stream (median of 5 rounds;
    the host's time per call counts where it exceeds the GPU's)."""
    with tvm_ffi.use_torch_stream():  # TVM launches on torch's current stream, where the events are
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(calls):
                call()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1e3 / calls)
    return statistics.median(times)


def dry_run(args: argparse.Namespace) -> int:
    """Build both variants of each model for sm_90 here (no GPU) and check the launch flags."""
    import tempfile

    target = {"kind": "cuda", "arch": "sm_90"}
    models = make_models(args.hidden, args.blocks)
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            print(name, flush=True)
            built = compile_modes(model, torch.randn(2, args.hidden), target, args.bits[0])
            flags = {mode: launch_flags(m, os.path.join(tmp, f"{mode}.so")) for mode, m in built.items()}
            print("  " + "; ".join(f"pdl {mode}: {e}/{n} kernels launched early" for mode, (e, n) in flags.items()))
            if any(e != n for mode, (e, n) in flags.items() if mode != "off") or flags["off"][0] != 0:
                print("dry run: wrong launch flags", file=sys.stderr)
                return 1
    print(f"dry run: {len(models)} models built for sm_90 in the modes {', '.join(PDL_ENV)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--blocks", type=int, default=2, help="feed-forward blocks (the MLP has 4 layers per block)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--bits", nargs="+", type=int, default=[4])
    ap.add_argument("--csv", default=None)
    ap.add_argument("--dry-run", action="store_true", help="no GPU: build for sm_90 and check the launch flags")
    args = ap.parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (or --dry-run)", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    bw = measure_bandwidth()
    print(f"device {props.name}, L2 {props.L2_cache_size / 1e6:.0f} MB, copy bandwidth {bw / 1e12:.2f} TB/s, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")  # fmt: skip
    first = True
    print(f"{'model':>22} {'bits':>4} {'batch':>5} {'on us':>8} {'start us':>8} {'off us':>8} {'off/on':>6} "
          f"{'start/on':>8} {'fp16 us':>8} {'fp16/on':>7} {'roof us':>8} {'%roof':>6} timing")  # fmt: skip
    for name, model in make_models(args.hidden, args.blocks).items():
        half = copy.deepcopy(model).to("cuda", torch.float16)
        for bits in args.bits:
            print(f"{name} W{bits}", flush=True)
            built = compile_modes(model, torch.randn(2, args.hidden), "cuda", bits)
            for batch in args.batches:
                x = torch.randn(batch, args.hidden, device="cuda")
                xh = x.half()
                try:
                    method = "graph"
                    us = {mode: graph_us(lambda m=m, x=x: m(x)) for mode, m in built.items()}
                except Exception as err:  # the capture failed: time the calls as they are launched
                    print(f"  batch {batch}: capture failed ({type(err).__name__}: {str(err)[:200]}); "
                          "timing back-to-back calls (host time included)", file=sys.stderr)  # fmt: skip
                    method = "stream"
                    us = {mode: stream_us(lambda m=m, x=x: m(x)) for mode, m in built.items()}
                with torch.no_grad():
                    fp16 = graph_us(lambda h=half, xh=xh: h(xh))
                on, start, off = us["on"], us["start"], us["off"]
                roof = (weight_count(model) * bits / 8 + 2 * batch * args.hidden * 4) / bw * 1e6
                row = {
                    "model": name, "bits": bits, "batch": batch, "method": method, "pdl_on_us": on,
                    "pdl_start_us": start, "pdl_off_us": off, "off_over_on": off / on, "start_over_on": start / on,
                    "fp16_us": fp16, "fp16_over_on": fp16 / on, "roof_us": roof, "pct_roof": 100 * roof / on,
                }  # fmt: skip
                print(f"{name:>22} {bits:>4} {batch:>5} {on:8.1f} {start:8.1f} {off:8.1f} {off / on:6.2f} "
                      f"{start / on:8.2f} {fp16:8.1f} {fp16 / on:7.2f} {roof:8.1f} {100 * roof / on:6.1f} {method}",
                      flush=True)  # fmt: skip
                if args.csv:
                    append_csv_row(args.csv, row, first)
                    first = False
    return 0


if __name__ == "__main__":
    sys.exit(main())
