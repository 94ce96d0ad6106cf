"""Per-token latency of a word-level LSTM LM step at batch 1: PB vs torch fp32 / fp16 (cuDNN).

One step = embedding lookup, every LSTM layer, the output head (vocabulary logits). Weights are
random (latency does not depend on training). Medians over ``--tokens`` steps with the state
carried, after a warm-up. Prints a short table last.

``--unfused`` also times the same PB model with the step built the pre-fusion way (``pbtvm.compile``
of a torch cell: activation pack, PB GEMV and the gate math as separate kernels, 3 + 1 + 1
launches on CUDA) against the fused step (one kernel per layer), side by side.

    python benchmarks/bench_lstm.py --target cuda --hidden 650 --layers 2 --bits 4
    python benchmarks/bench_lstm.py --target llvm --hidden 256      # CPU
"""

import argparse
import json
import statistics
import time

import torch

import pbtvm
from pbtvm.ptb import PBWordLM, word_lm

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--target", default="cuda", help="llvm, cuda or a JSON target dict")
parser.add_argument("--hidden", type=int, default=650)
parser.add_argument("--layers", type=int, default=2)
parser.add_argument("--vocab", type=int, default=10000)
parser.add_argument("--bits", default="1,2,4,8")
parser.add_argument("--tokens", type=int, default=200)
parser.add_argument("--unfused", action="store_true", help="also time the unfused (pre-fusion) step")
args = parser.parse_args()
target = json.loads(args.target) if args.target.startswith("{") else args.target
cuda = (target if isinstance(target, str) else target["kind"]) == "cuda"
dev = "cuda" if cuda else "cpu"
sync = torch.cuda.synchronize if cuda else (lambda: None)

torch.manual_seed(0)
model = word_lm(args.vocab, args.hidden, args.layers, dropout=0.0).eval()


def per_token_us(step) -> float:
    state = None
    tok = torch.tensor([[1]], device=dev)
    for _ in range(10):
        state = step(tok, state)
    times = []
    for _ in range(args.tokens):
        sync()
        t0 = time.perf_counter()
        state = step(tok, state)
        sync()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


class UnfusedCell(torch.nn.Module):
    """The step as a torch module, ``(gx, h, c) -> (h', c')``: what pbtvm.compile splits into kernels."""

    def __init__(self, w_hh: torch.Tensor) -> None:
        super().__init__()
        self.hh = torch.nn.Linear(w_hh.shape[1], w_hh.shape[0], bias=False)
        with torch.no_grad():
            self.hh.weight.copy_(w_hh)

    def forward(self, gx, h, c):  # noqa: ANN001, ANN201, D102
        i, f, g, o = (gx + self.hh(h)).chunk(4, dim=1)
        c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c2), c2


def pb_step(pb):  # noqa: ANN001, ANN201
    def step(tok, state):  # noqa: ANN001, ANN202
        with torch.no_grad():
            emb = pb.embedding.to(dev)(tok[0])
        h, state = pb.lstm.step(emb, state)
        pb.head(h)
        return state

    return step


rows = []
with torch.no_grad():
    for name, dtype in [("torch fp32", torch.float32)] + ([("torch fp16", torch.float16)] if cuda else []):
        m = word_lm(args.vocab, args.hidden, args.layers, dropout=0.0).eval()
        m.load_state_dict(model.state_dict())
        m = m.to(dev, dtype)

        def step(tok, state, m=m):
            logits, state = m(tok, state)
            return state

        rows.append((name, per_token_us(step)))


for bits in [int(b) for b in args.bits.split(",")]:
    pb = PBWordLM(model, target, bits=bits)
    rows.append((f"PB W{bits}A8", per_token_us(pb_step(pb))))
    if args.unfused:
        h = args.hidden
        example = (torch.zeros(2, 4 * h), torch.zeros(2, h), torch.zeros(2, h))
        pb.lstm._cells = [
            pbtvm.compile(UnfusedCell(getattr(model.lstm, f"weight_hh_l{k}").detach()), example, target, bits)
            for k in range(args.layers)
        ]
        rows.append((f"  unfused W{bits}", per_token_us(pb_step(pb))))

base = rows[0][1]
print(f"\nLSTM LM step, batch 1, {args.layers}x{args.hidden}, vocab {args.vocab}, target {target}")
print(f"{'model':<14}{'us/token':>10}{'vs fp32':>9}")
for name, us in rows:
    print(f"{name:<14}{us:>10.1f}{base / us:>8.2f}x")
