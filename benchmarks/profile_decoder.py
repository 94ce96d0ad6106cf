"""Where one token's time goes in the PB LSTM decoder on CUDA: per-kernel GPU time vs host time.

Builds :func:`pbtvm.decoder.compile_decoder` for a random word-level LM, then prints
1. the per-kernel GPU time of one token (torch.profiler/CUPTI sees TVM's kernels too),
2. medians of: the whole Python call (``dec(tok, state)``), the bare VM call on ready TVM tensors,
   each followed by a device synchronise, and
3. the same per-kernel table for ``dec.generate`` (greedy, ``--tokens`` new tokens from a one-token
   prompt: the chunks' CUDA graphs, the pick kernel included) beside its wall time per token: what
   the kernels leave idle between them.

    python benchmarks/profile_decoder.py --hidden 650 --layers 2 --bits 4
"""

import argparse
import statistics
import time

import torch
import tvm

from pbtvm.apps.ptb import word_lm
from pbtvm.decoder import compile_decoder
from pbtvm.schedules import cuda as cuda_rules

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--hidden", type=int, default=650)
ap.add_argument("--layers", type=int, default=2)
ap.add_argument("--vocab", type=int, default=10000)
ap.add_argument("--bits", type=int, default=4)
ap.add_argument("--tokens", type=int, default=100)
ap.add_argument("--batch", type=int, default=1, help="the decoder's (static) batch")
ap.add_argument("--no-graph", action="store_true", help="build without a CUDA graph")
ap.add_argument("--cell-units", type=int, default=None, help="override schedules.cuda.CELL_UNITS")
ap.add_argument("--dense-act-rows", type=int, default=None, help="override schedules.cuda.DENSE_ACT_ROWS")
ap.add_argument("--chunk", type=int, default=16, help="generate_chunk of the decoder (token steps per graph)")
args = ap.parse_args()
if args.cell_units:
    cuda_rules.CELL_UNITS = args.cell_units
if args.dense_act_rows:
    cuda_rules.DENSE_ACT_ROWS = args.dense_act_rows

torch.manual_seed(0)
model = word_lm(args.vocab, args.hidden, args.layers, dropout=0.0).eval()
t0 = time.perf_counter()
dec = compile_decoder(
    model.lstm,
    "cuda",
    args.bits,
    embedding=model.embedding,
    head=model.head,
    cuda_graph=not args.no_graph,
    generate_chunk=args.chunk,
    batch=args.batch,
)
print(
    f"compiled in {time.perf_counter() - t0:.1f} s: {dec}, CELL_UNITS={cuda_rules.CELL_UNITS}, "
    f"DENSE_ACT_ROWS={cuda_rules.DENSE_ACT_ROWS}"
)
dec.check_tokens = False
tok = torch.ones(args.batch, dtype=torch.long, device="cuda")
state = dec.initial_state("cuda")


def median_us(fn, n: int = args.tokens) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


def python_call() -> None:
    dec(tok, state)


dec(tok, state)  # the VM is created on the first call
vm = dec.model._vm
dev = tvm.cuda(0)
tvm_args = [tvm.runtime.from_dlpack(tok), tvm.runtime.from_dlpack(state[0]), tvm.runtime.from_dlpack(state[1])]
tvm_args.append(tvm.runtime.ShapeTuple([args.bits]))
main = vm["main"]


def vm_call() -> None:
    main(*tvm_args)


def vm_call_sync() -> None:
    main(*tvm_args)
    dev.sync()


def kernel_table(fn, title: str) -> float:
    """Profile ``fn`` (``args.tokens`` tokens' work), print GPU time per token by kernel; the sum (µs)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(ev.name, []).append(ev.device_time)
    print(
        f"\n{title}: GPU time per token by kernel ({args.tokens} tokens, W{args.bits}, {args.layers}x{args.hidden}, "
        f"batch {args.batch})"
    )
    total = 0.0
    for name, ts in sorted(kernels.items(), key=lambda kv: -sum(kv[1])):
        per_token = sum(ts) / args.tokens
        total += per_token
        print(
            f"  {name[:60]:<60}{len(ts) / args.tokens:>5.1f}x {statistics.median(ts):>9.1f} us"
            f"  {per_token:>9.1f} us/token"
        )
    print(f"  {'sum':<60}{'':>6} {'':>12}  {total:>9.1f} us/token")
    return total


kernel_table(lambda: [python_call() for _ in range(args.tokens)], "dec(tok, state)")

print("\nhost view, median per token:")
print(f"  dec(tok, state) + sync      {median_us(python_call):>9.1f} us")
print(f"  vm['main'](...) + sync      {median_us(vm_call):>9.1f} us")
print(f"  vm + tvm dev.sync           {median_us(vm_call_sync):>9.1f} us")

prompt = torch.ones(args.batch, 1, dtype=torch.long, device="cuda")


def generate() -> None:
    dec.generate(prompt, args.tokens)


generate()  # the chunks' graphs are captured on the first call
gen_gpu = kernel_table(generate, "generate()")
gen_wall = median_us(generate, 5) / args.tokens
print(
    f"\ngenerate(): {gen_wall:.1f} us/token wall, {gen_gpu:.1f} us/token in kernels "
    f"({100 * gen_gpu / gen_wall:.0f}% busy; the rest launch gaps and host work)"
)
