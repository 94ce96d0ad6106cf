"""Per-token latency of a word-level LSTM LM step at batch 1: PB vs torch fp32 / fp16 (cuDNN) / int8.

One step = embedding lookup, every LSTM layer, the output head (vocabulary logits). Weights are
random (latency does not depend on training). Medians over ``--tokens`` steps with the state
carried, after a warm-up, host clock around a synchronised call: the latency a generation loop
sees. The same weights serve every token, so they stay in cache where they fit, as in real
decoding (the table prints the weight megabytes read per token). On the CPU torch's dynamic int8
(``quantize_dynamic`` of the LSTM and the head) is timed too, and the "vs int8" column is the
median over rounds of its time over each model's in the same round. Every model but CPU torch fp32
(tens of ms per token, timed once) is timed in ``--rounds`` alternating passes, each after a 0.3 s
rest (the other library's idle threads spin for a while after its last call).

PB rows: ``decoder`` is :func:`pbtvm.decoder.compile_decoder` (the whole token in one call; on CUDA
captured as one CUDA graph between two repack kernels; ``--no-graph`` adds the same without the
graph), ``seq path`` is :class:`pbtvm.apps.ptb.PBWordLM` (the whole LM through ``pbtvm.compile``, its LSTM
lowered to a PB time loop) called with one token. (Before 2026-11-30 ``seq path`` was the
hand-split model: per layer an input-projection GEMM call and a fused step call, then the head.) On CUDA, torch also runs captured in a CUDA graph
(``+graph`` rows), the fairest baseline for launch overhead.

The pre-fusion step (``--unfused`` until 2026-12-01) is gone: since ``PBWordLM`` became one
``pbtvm.compile`` of the whole LM there is no per-layer step to swap.

    python benchmarks/bench_lstm.py --target cuda --hidden 650 --layers 2 --bits 4
    python benchmarks/bench_lstm.py --target llvm --hidden 256      # CPU
"""

import argparse
import statistics
import time

import torch

from pbtvm.apps.ptb import PBWordLM, word_lm
from pbtvm.cli_args import parse_target
from pbtvm.decoder import compile_decoder

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--target", default="cuda", help="llvm, cuda or a JSON target dict")
parser.add_argument("--hidden", type=int, default=650)
parser.add_argument("--layers", type=int, default=2)
parser.add_argument("--vocab", type=int, default=10000)
parser.add_argument("--bits", default="1,2,4,8")
parser.add_argument("--tokens", type=int, default=200)
parser.add_argument(
    "--rounds", type=int, default=5, help="passes over all models, alternating; the table shows their median"
)
parser.add_argument("--no-graph", action="store_true", help="CUDA: also time the decoder built without a CUDA graph")
args = parser.parse_args()
target = parse_target(args.target)
cuda = (target if isinstance(target, str) else target["kind"]) == "cuda"
dev = "cuda" if cuda else "cpu"
sync = torch.cuda.synchronize if cuda else (lambda: None)

torch.manual_seed(0)
model = word_lm(args.vocab, args.hidden, args.layers, dropout=0.0).eval()


#: Seconds of rest before each timed pass: the other library's idle worker threads spin for a
#: while after its last call and would slow the next one (see BENCHMARKS.md, bench_cpu.py).
SETTLE_S = 0.3


def per_token_us(step, tokens: int | None = None) -> float:
    state = None
    tok = torch.tensor([[1]], device=dev)
    time.sleep(SETTLE_S)
    for _ in range(10):
        state = step(tok, state)
    times = []
    for _ in range(tokens or args.tokens):
        sync()
        t0 = time.perf_counter()
        state = step(tok, state)
        sync()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def decoder_step(dec):
    dec.check_tokens = False  # no device-to-host copy of the token per step (ids are known good)

    def step(tok, state):
        return dec(tok[0], state)[1]

    return step


def torch_graph_step(m):
    """The torch step captured in a CUDA graph: static token/state buffers, one replay per token."""
    tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
    h = torch.zeros(args.layers, 1, args.hidden, device=dev, dtype=next(m.parameters()).dtype)
    c = torch.zeros_like(h)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            m(tok, (h, c))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        _, (h2, c2) = m(tok, (h, c))

    def step(t, state):
        tok.copy_(t)
        graph.replay()
        h.copy_(h2)
        c.copy_(c2)
        return state

    return step


def weight_mb(bits: float) -> float:
    """Megabytes of weights one token reads at ``bits`` per weight (embedding: one fp32 row)."""
    h, n = args.hidden, args.layers
    return (n * 4 * h * 2 * h + args.vocab * h) * bits / 8 / 1e6 + h * 4 / 1e6


def pb_step(pb):
    def step(tok, state):
        return pb(tok, state)[1]  # the whole LM compiled by pbtvm.compile, called with T = 1

    return step


rows = []  # (name, [us per round], MB)
timed = []  # (name, step, MB): timed in alternating rounds after everything is built


def add(name: str, us: float, mb: float) -> None:
    """Record a row timed once (torch fp32: too slow for rounds) and print it at once."""
    rows.append((name, [us], mb))
    print(f"  {name:<20}{us:>10.1f} us/token", flush=True)


with torch.no_grad():
    for name, dtype in [("torch fp32", torch.float32)] + ([("torch fp16", torch.float16)] if cuda else []):
        m = word_lm(args.vocab, args.hidden, args.layers, dropout=0.0).eval()
        m.load_state_dict(model.state_dict())
        m = m.to(dev, dtype)

        def step(tok, state, m=m):
            logits, state = m(tok, state)
            return state

        bits_of = 32 if dtype == torch.float32 else 16
        if cuda:
            timed.append((name, step, weight_mb(bits_of)))
        else:  # tens of ms per token on the CPU: once, 20 tokens
            add(name, per_token_us(step, 20), weight_mb(bits_of))
        if not cuda:  # the CPU user's quantized alternative: int8 weights, activations per call
            q = torch.ao.quantization.quantize_dynamic(m, {torch.nn.LSTM, torch.nn.Linear}, dtype=torch.qint8)

            def q_step(tok, state, q=q):
                return q(tok, state)[1]

            timed.append(("torch int8 dyn", q_step, weight_mb(8)))
        if cuda:
            try:
                timed.append((f"{name} +graph", torch_graph_step(m), weight_mb(bits_of)))
            except RuntimeError as err:  # e.g. an op torch cannot capture
                print(f"{name}: CUDA-graph capture failed ({str(err).splitlines()[0]})")


for bits in [int(b) for b in args.bits.split(",")]:
    dec = compile_decoder(model.lstm, target, bits, embedding=model.embedding, head=model.head)
    timed.append((f"PB W{bits} decoder", decoder_step(dec), weight_mb(bits)))
    if cuda and args.no_graph:
        dec = compile_decoder(model.lstm, target, bits, embedding=model.embedding, head=model.head, cuda_graph=False)
        timed.append((f"  W{bits} no graph", decoder_step(dec), weight_mb(bits)))
    pb = PBWordLM(model, target, bits=bits)
    timed.append((f"  W{bits} seq path", pb_step(pb), weight_mb(bits)))

rounds = {name: [] for name, _, _ in timed}
with torch.no_grad():
    for r in range(args.rounds):
        for name, step, _ in timed:
            rounds[name].append(per_token_us(step))
        print(f"round {r + 1}: " + ", ".join(f"{n.strip()} {v[-1]:.0f}" for n, v in rounds.items()), flush=True)
rows += [(name, rounds[name], mb) for name, _, mb in timed]

base = statistics.median(rows[0][1])
device = torch.cuda.get_device_name() if cuda else "CPU"
print(f"\nLSTM LM step, batch 1, {args.layers}x{args.hidden}, vocab {args.vocab}, target {target}, {device}")
print(f"median of {args.rounds} alternating rounds of {args.tokens} tokens (range: fastest-slowest round)")
int8 = rounds.get("torch int8 dyn")
print(f"{'model':<20}{'us/token':>10}{'vs fp32':>9}{'vs int8':>9}{'weight MB':>11}  range")
for name, us, mb in rows:
    mid = statistics.median(us)
    # vs int8: the median over rounds of (int8 / this) in the same round
    vs = (
        f"{statistics.median(a / b for a, b in zip(int8, us, strict=True)):>8.2f}x"
        if int8 and len(us) == len(int8)
        else " " * 9
    )
    print(f"{name:<20}{mid:>10.1f}{base / mid:>8.2f}x{vs}{mb:>11.2f}  {min(us):.0f}-{max(us):.0f}")
