"""A GPT-2-style decoder on the CPU: PB with and without the default CPU schedule vs torch.

The PB layers are the same either way; what changes is the ops left in full precision
(attention's products, softmax, LayerNorm, GELU, residual adds), which TVM 0.27's CPU pipeline
leaves as serial scalar loops unless :mod:`pbtvm.schedules.cpu_default` schedules them. One run
compiles the model twice (``pbtvm.cuda.CPU_DEFAULT_SCHEDULE`` off, on) and times, interleaved:
both, torch fp32 eager and torch ``quantize_dynamic`` int8 (the CPU baseline a user would pick),
in ms per call (median of ``--number`` calls, ``--rounds`` rounds, min-max of the round medians).

    python benchmarks/bench_transformer_cpu.py --layers 4 --width 768 --heads 12 --seq 64 --batch 1,8
"""

import argparse
import statistics
import time
import warnings

import torch

import pbtvm
import pbtvm.cuda

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--width", type=int, default=768)
ap.add_argument("--heads", type=int, default=12)
ap.add_argument("--seq", type=int, default=64)
ap.add_argument("--batch", default="1,8")
ap.add_argument("--bits", type=int, default=4)
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--number", type=int, default=10)
args = ap.parse_args()


class Block(torch.nn.Module):
    """Pre-norm causal self-attention + GELU MLP, as GPT-2 writes it."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.qkv, self.proj = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.fc, self.out = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (
            z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(d, dim=2)
        )
        scores = (q @ k.transpose(-1, -2)) / (d // self.heads) ** 0.5
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        y = (scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(torch.nn.functional.gelu(self.fc(self.ln2(x))))


class Decoder(torch.nn.Module):
    def __init__(self, layers: int, width: int, heads: int) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def median_ms(fn) -> float:
    fn()
    times = []
    for _ in range(args.number):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


torch.manual_seed(0)
model = Decoder(args.layers, args.width, args.heads).eval()
example = torch.randn(1, args.seq, args.width)
compiled = {}
for scheduled in (False, True):
    pbtvm.cuda.CPU_DEFAULT_SCHEDULE = scheduled
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # attention's activation products stay fp32 (said once per compile)
        compiled[scheduled] = pbtvm.compile(model, (example,), target="llvm", bits=args.bits)
    print(f"compiled W{args.bits} default schedule {'on' if scheduled else 'off'} in {time.perf_counter() - t0:.1f} s")
int8 = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
print(
    f"{args.layers} layers x {args.width} wide, {args.heads} heads, seq {args.seq}; torch {torch.__version__}, "
    f"{torch.get_num_threads()} threads"
)
with torch.no_grad():
    for batch in (int(b) for b in args.batch.split(",")):
        x = torch.randn(batch, args.seq, args.width)
        want = model(x)
        for scheduled, m in compiled.items():
            err = float((m(x) - want).abs().max() / want.abs().max())
            print(f"batch {batch}: PB schedule {'on' if scheduled else 'off'} max error / max |torch| = {err:.4f}")
        rows = {
            f"PB W{args.bits} schedule off": lambda x=x: compiled[False](x),
            f"PB W{args.bits} schedule on": lambda x=x: compiled[True](x),
            "torch fp32": lambda x=x: model(x),
            "torch int8 dynamic": lambda x=x: int8(x),
        }
        rounds = {name: [] for name in rows}
        for _ in range(args.rounds):
            for name, fn in rows.items():
                rounds[name].append(median_ms(fn))
        on = statistics.median(rounds[f"PB W{args.bits} schedule on"])
        for name, r in rounds.items():
            mid = statistics.median(r)
            print(
                f"batch {batch:3d} {name:24s} {mid:9.2f} ms ({min(r):.2f}-{max(r):.2f})  "
                f"schedule-on PB speed-up vs this {mid / on:5.2f}x"
            )
