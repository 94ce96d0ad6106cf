"""Tokens/s of PBDecoder.generate() (the token loop inside the module) vs torch, side by side.

Word-level LSTM LM with random weights (speed does not depend on training), greedy decoding of
``--tokens`` new tokens from a one-token prompt, at every ``--batch``. Rows:

* ``torch fp32`` / ``fp16``: eager, the token loop in Python (argmax and feedback on the device,
  no host sync per token), the model as trained (``nn.LSTM``); ``cells``: the same weights as one
  ``nn.LSTMCell`` per layer (on the CPU ``nn.LSTM`` single steps go through a much slower path:
  ~100 vs ~5 ms per token for 2x650 on the 2-core EPYC); on CUDA also ``+graph``: one step (model, argmax, feedback) captured as
  a CUDA graph and replayed per token, the strongest torch baseline for launch overhead.
* ``PB Wk generate``: :meth:`pbtvm.decoder.PBDecoder.generate`, ``--chunk`` tokens per call.
* ``--sample T,K``: also ``torch fp16 (+graph) sampled`` (top-k, softmax, ``torch.multinomial`` in
  the step) and ``PB Wk generate sampled`` (:class:`pbtvm.generate.Sampling`), each compared with
  the sampled torch rows.
* ``PB Wk stepwise``: the same decoder called token by token from Python (argmax in torch): the
  host overhead generate() removes.

On the CPU (``--target llvm``) it also prints, per W-k and batch, the host overhead left
(:func:`host_overhead`): ``--repeats`` interleaved rounds of (a) the kernels' own time per token,
two ways: *alone* (every kernel call of a chunk timed in a loop of its own on its real
arguments: warm caches) and *in sequence* (every call timed once, in C++, right after the
chunk's other calls ran in their real order: the caches hold what they hold in a decode loop,
e.g. the 6.6 MB of W4 weights a 2x650 token reads no longer sit in the 2 MB L2), (b) bare
``generate_chunk`` calls in TVM's C++ timing loop (kernels + VM, no Python) and (c) generate();
the medians and ranges of (b)/(a) and (c)/(a). generate() must stay within 10 % of (a); the
in-sequence ratio isolates the host work (VM + Python), the alone ratio also counts the cache
cost of running the kernels one after another. ``--breakdown`` also prints every kernel's own
time. And the prompt path:
``generate(prompt of --prompt tokens, 1 new)`` per prompt token vs ``PBWordLM`` (projection
GEMM over all steps + a fused step call per layer and step).

With ``--jobs`` above 1 (on CUDA by default: the host's cores less one) every decoder is compiled
first, in that many processes, then timed (``parallel_build.py``); otherwise each is compiled in
this process when its rows come.

    python benchmarks/bench_generate.py --target llvm --hidden 650 --bits 4 --batch 1,8
    python benchmarks/bench_generate.py --target cuda --bits 1,2,4,8 --batch 1,8
"""

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from parallel_build import build_all, default_workers

from pbtvm.apps.ptb import PBWordLM, word_lm
from pbtvm.cli_args import parse_target
from pbtvm.decoder import compile_decoder, load_decoder
from pbtvm.generate import Sampling

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--target", default="cuda", help="llvm, cuda or a JSON target dict")
ap.add_argument("--hidden", type=int, default=650)
ap.add_argument("--layers", type=int, default=2)
ap.add_argument("--vocab", type=int, default=10000)
ap.add_argument("--bits", default="4")
ap.add_argument("--batch", default="1,8")
ap.add_argument("--tokens", type=int, default=128, help="new tokens per generate() call")
ap.add_argument("--chunk", type=int, default=16)
ap.add_argument("--prompt", type=int, default=64, help="prompt length for the prompt-path rows (CPU)")
ap.add_argument("--repeats", type=int, default=5)
ap.add_argument("--breakdown", action="store_true", help="CPU: print every kernel's own time")
ap.add_argument("--skip-torch", action="store_true", help="no torch rows (quick host-overhead checks)")
ap.add_argument(
    "--sample",
    default=None,
    metavar="T,K",
    help="also time seeded sampling at temperature T over the top K logits (e.g. 0.8,40): torch fp16 "
    "(+graph on CUDA: softmax, top-k, multinomial in the step) and PB generate(), rows marked 'sampled'",
)
ap.add_argument(
    "--layouts",
    default="auto",
    help="weight layouts to compare, e.g. auto,kNW (on CUDA sm_80+ auto is the binary-tensor-core mma16x256)",
)
ap.add_argument(
    "--jobs",
    type=int,
    default=None,
    help="processes that compile the decoders before any timing (default: cores - 1 on CUDA; on the CPU 1: "
    "each decoder compiled in this process when its rows come)",
)
rows = []
args = target = cuda = dev = sync = model = None  # set by setup()


def setup(argv: list[str] | None = None) -> None:
    """Parse the arguments; the word LM with seed 0."""
    global args, target, cuda, dev, sync, model
    args = ap.parse_args(argv)
    target = parse_target(args.target)
    cuda = (target if isinstance(target, str) else target["kind"]) == "cuda"
    dev = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    model = word_lm(args.vocab, args.hidden, args.layers, dropout=0.0).eval()


def median_s(fn, repeats: int | None = None) -> float:
    repeats = args.repeats if repeats is None else repeats
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def add(name: str, batch: int, seconds: float, tokens: int, note: str = "") -> None:
    us = 1e6 * seconds / tokens
    rows.append((name, batch, us, batch * tokens / seconds, note))
    print(
        f"  {name:<22} batch {batch:<3}{us:>10.1f} us/token {batch * tokens / seconds:>10.0f} tokens/s {note}",
        flush=True,
    )


class CellLM(torch.nn.Module):
    """The word LM with one ``nn.LSTMCell`` per layer (same weights): ``(tok [1, B], (h, c)) -> logits``."""

    def __init__(self, m) -> None:
        super().__init__()
        self.embedding, self.head = m.embedding, m.head
        self.cells = torch.nn.ModuleList()
        for k in range(m.lstm.num_layers):
            cell = torch.nn.LSTMCell(m.lstm.input_size if k == 0 else m.lstm.hidden_size, m.lstm.hidden_size)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, name).data = getattr(m.lstm, f"{name}_l{k}").data
            self.cells.append(cell)

    def forward(self, tok, state):
        x, hs, cs = self.embedding(tok[0]), [], []
        for k, cell in enumerate(self.cells):
            x, c = cell(x, (state[0][k], state[1][k]))
            hs.append(x)
            cs.append(c)
        return self.head(x)[None], (torch.stack(hs), torch.stack(cs))


def sampling() -> tuple[float, int] | None:
    """``--sample`` as ``(temperature, top_k)``, or None."""
    if args.sample is None:
        return None
    t, k = args.sample.split(",")
    return float(t), int(k)


def torch_pick(logits, mode: tuple[float, int] | None):
    """The next token [1, B]: argmax, or a draw from the softmax of the top-k ``logits / T``."""
    if mode is None:
        return logits.argmax(-1)
    temperature, top_k = mode
    values, index = torch.topk(logits[0].float() / temperature, top_k, dim=-1)
    drawn = torch.multinomial(torch.softmax(values, dim=-1), 1)
    return index.gather(-1, drawn).T


def torch_loop(m, batch: int, graph: bool, mode: tuple[float, int] | None = None):
    """Decoding in torch (greedy, or ``mode`` = (T, top-k) sampling): the chosen token stays on the
    device and is fed back."""
    dtype = next(m.parameters()).dtype
    tok = torch.ones(1, batch, dtype=torch.long, device=dev)
    h = torch.zeros(args.layers, batch, args.hidden, device=dev, dtype=dtype)
    c = torch.zeros_like(h)

    def step() -> None:
        logits, (h2, c2) = m(tok, (h, c))
        tok.copy_(torch_pick(logits, mode))
        h.copy_(h2)
        c.copy_(c2)

    if not graph:
        return lambda: [step() for _ in range(args.tokens)]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        step()
    return lambda: [g.replay() for _ in range(args.tokens)]


def stepwise(dec, batch: int):
    dec.check_tokens = False

    def run() -> None:
        tok, state = torch.ones(batch, dtype=torch.long, device=dev), None
        for _ in range(args.tokens):
            logits, state = dec(tok, state)
            tok = logits.argmax(-1)

    return run


def chunk_calls(dec, batch: int):
    """A VM, the arguments of ``generate_chunk`` and every kernel call one chunk makes.

    The calls are captured with another VM's instrument hook (real arguments, in order); the
    VM returned has no hook.
    """
    from pbtvm._tvm import relax, tvm

    cpu = tvm.cpu()
    vm = relax.VirtualMachine(dec.model._module, cpu)
    calls = []

    def capture(func, symbol, before, ret, *call_args):  # noqa: ARG001 - the VM instrument's signature
        if before and not symbol.startswith("vm.builtin"):
            calls.append((symbol, call_args))
        return 0

    state = np.zeros((args.layers, batch, args.hidden), np.float32)
    ins = [np.ones(batch, np.int64), np.full((args.chunk, batch), -1), np.zeros(batch, np.int64)]
    ins += [np.array([0, 0, -1, 0]), np.array([0.0]), state, state]
    tvm_args = [tvm.runtime.tensor(a, cpu) for a in ins] + [tvm.runtime.ShapeTuple([dec.format.bits])]
    vm.set_instrument(capture)
    vm["generate_chunk"](*tvm_args)
    return relax.VirtualMachine(dec.model._module, cpu), tvm_args, calls


#: The global function :func:`in_sequence` registers as the timer's preprocessing step.
SEQUENCE_PREPROC = "pbtvm.bench.run_the_other_kernels"


def in_sequence(lib, calls, repeat: int = 5) -> float:
    """Seconds per chunk of the kernels in their real order: each call timed once per repeat.

    Before each timed call TVM's timer runs a preprocessing function; here it makes the chunk's
    other calls in chunk order (from the next call round to the previous one), so the timed call
    finds the caches as a decode loop leaves them. Only the call itself is timed (C++ clock).
    """
    import tvm_ffi

    from pbtvm._tvm import tvm

    cpu, funcs, at = tvm.cpu(), [lib[s] for s, _ in calls], [0]

    def run_the_others(*_) -> None:
        k = at[0]
        for i in [*range(k + 1, len(calls)), *range(k)]:
            funcs[i](*calls[i][1])

    tvm_ffi.register_global_func(SEQUENCE_PREPROC, run_the_others, override=True)
    total = 0.0
    for k, (symbol, call_args) in enumerate(calls):
        at[0] = k
        timer = lib.time_evaluator(symbol, cpu, number=1, repeat=repeat, f_preproc=SEQUENCE_PREPROC)
        total += statistics.median(timer(*call_args).results)
    return total


def host_overhead(dec, batch: int, prompt) -> dict:
    """``--repeats`` interleaved rounds of seconds per token: kernels alone and in sequence, bare
    chunk calls, generate().

    Kernels alone: every captured kernel call timed by itself with ``time_evaluator`` (a C++
    loop: no host work, warm caches), summed. In sequence: :func:`in_sequence`. Chunk calls:
    ``generate_chunk`` in the C++ timing loop (kernels + VM). generate(): ``--tokens`` new
    tokens, median of 3 calls.
    """
    from pbtvm._tvm import tvm

    cpu = tvm.cpu()
    vm, tvm_args, calls = chunk_calls(dec, batch)
    module = dec.model._module  # an Executable when compiled here, a Module when loaded (--jobs)
    lib = (module.mod if isinstance(module, tvm.runtime.Executable) else module).imports[0]
    rounds = {"kernels": [], "sequence": [], "chunk": [], "generate": [], "each": []}
    for _ in range(args.repeats):
        each = [statistics.median(lib.time_evaluator(s, cpu, number=20, repeat=5)(*a).results) for s, a in calls]
        rounds["each"].append(each)
        rounds["kernels"].append(sum(each) / args.chunk)
        rounds["sequence"].append(in_sequence(lib, calls) / args.chunk)
        timer = vm.time_evaluator("generate_chunk", cpu, number=4, repeat=5)
        rounds["chunk"].append(statistics.median(timer(*tvm_args).results) / args.chunk)
        rounds["generate"].append(median_s(lambda: dec.generate(prompt, args.tokens), 3) / args.tokens)
    if args.breakdown:
        per_call: dict[str, list] = {}
        for each in rounds["each"]:
            for (symbol, _), t in zip(calls, each, strict=True):
                per_call.setdefault(symbol, []).append(t)
        for symbol, times in per_call.items():
            n = len(times) // args.repeats
            print(f"    {symbol:<24} {n:>3} calls/chunk, {1e6 * statistics.median(times):8.1f} us each")
    return rounds


def ratio_note(rounds: dict) -> str:
    """Median (min-max) over the rounds of chunk calls and generate() over the kernels' time,
    alone and in sequence."""
    parts = []
    for base, label in (("kernels", "alone"), ("sequence", "in sequence")):
        parts.append(f"kernels {label} {1e6 * statistics.median(rounds[base]):.0f} us/token")
        for name in ("chunk", "generate"):
            r = [x / k for x, k in zip(rounds[name], rounds[base], strict=True)]
            parts.append(f"{name} / {label} = {statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f})")
    return "; ".join(parts)


def lm_decoder(m, tgt, bits: int, batch: int, layout: str, chunk: int):
    """The generate() decoder of word LM ``m`` (embedding, LSTM, head) for one row of the table."""
    kw = {"embedding": m.embedding, "head": m.head, "batch": batch, "generate_chunk": chunk, "layout": layout}
    return compile_decoder(m.lstm, tgt, bits, **kw)


def export_decoder(job: tuple, path: str) -> None:
    """Worker (:func:`parallel_build.build_all`): compile one decoder of the LM saved at the job's
    state path and export it to ``path``."""
    state_path, (vocab, hidden, layers), tgt, bits, batch, chunk, layout = job
    m = word_lm(vocab, hidden, layers, dropout=0.0).eval()
    m.load_state_dict(torch.load(state_path))
    lm_decoder(m, tgt, bits, batch, layout, chunk).export(path)


def build_decoders(specs: list[tuple[int, int, str]]) -> dict:
    """{(bits, batch, layout): PBDecoder}, compiled in ``--jobs`` processes (exported, then loaded);
    empty with one job: :func:`decoder` compiles each in this process when it is needed."""
    jobs = args.jobs if args.jobs is not None else (default_workers() if cuda else 1)
    if jobs <= 1:
        return {}
    with tempfile.TemporaryDirectory(prefix="pbtvm_bench_generate_") as tmp:
        state_path = os.path.join(tmp, "lm.pt")
        torch.save(model.state_dict(), state_path)
        dims = (args.vocab, args.hidden, args.layers)
        work = [(state_path, dims, target, bits, batch, args.chunk, layout) for bits, batch, layout in specs]
        print(f"compiling {len(specs)} decoders in {min(jobs, len(specs))} processes", flush=True)
        paths = build_all(export_decoder, work, tmp, jobs, label=lambda j: f"W{j[3]} batch {j[4]} {j[6]}")
        return {spec: load_decoder(p, dev) for spec, p in zip(specs, paths, strict=True)}


def decoder(built: dict, bits: int, batch: int, layout: str):
    """The decoder of ``(bits, batch, layout)``: prebuilt (:func:`build_decoders`) or compiled now."""
    if (bits, batch, layout) in built:
        return built[bits, batch, layout]
    return lm_decoder(model, target, bits, batch, layout, args.chunk)


def _torch_best(name: str, batch: int, default: float) -> float:
    """The best torch tokens/s at ``batch`` in the mode of row ``name`` (sampled rows against the
    sampled torch rows, if any)."""
    torch_rows = [r for r in rows if r[0].startswith("torch") and r[1] == batch]
    same_mode = [r[3] for r in torch_rows if r[0].endswith("sampled") == name.endswith("sampled")]
    return max(same_mode or [r[3] for r in torch_rows], default=default)


def run() -> None:
    """Every row, then the table."""
    layouts = args.layouts.split(",")
    bits_list, batches = [int(b) for b in args.bits.split(",")], [int(b) for b in args.batch.split(",")]
    built = build_decoders([(bits, batch, layout) for bits in bits_list for batch in batches for layout in layouts])
    with torch.no_grad():
        for batch in batches:
            torch_rows = [("torch fp32", torch.float32), ("torch fp16", torch.float16)]
            for name, dtype in [] if args.skip_torch else torch_rows:
                m = word_lm(args.vocab, args.hidden, args.layers, dropout=0.0).eval()
                m.load_state_dict(model.state_dict())
                m = m.to(dev, dtype)
                for label, variant in ((name, m), (f"{name} cells", CellLM(m))):
                    try:
                        add(label, batch, median_s(torch_loop(variant, batch, False)), args.tokens)
                        if cuda:
                            add(f"{label} +graph", batch, median_s(torch_loop(variant, batch, True)), args.tokens)
                    except RuntimeError as err:  # e.g. an fp16 op missing on the CPU
                        print(f"  {label} batch {batch}: {str(err).splitlines()[0]}")
                if sampling() is not None and dtype == torch.float16:
                    try:
                        loop = torch_loop(m, batch, cuda, sampling())
                        add(f"{name}{' +graph' if cuda else ''} sampled", batch, median_s(loop), args.tokens)
                    except RuntimeError as err:
                        print(f"  {name} sampled batch {batch}: {str(err).splitlines()[0]}")

        for bits in bits_list:
            for batch in batches:
                for layout in layouts:
                    dec = decoder(built, bits, batch, layout)
                    label = f"PB W{bits}" + (f" {dec.format.layout}" if len(layouts) > 1 else "")
                    prompt = torch.ones(batch, 1, dtype=torch.long, device=dev)
                    if cuda:
                        gen_s, note = median_s(lambda dec=dec, prompt=prompt: dec.generate(prompt, args.tokens)), ""
                    else:
                        rounds = host_overhead(dec, batch, prompt)
                        gen_s, note = args.tokens * statistics.median(rounds["generate"]), ratio_note(rounds)
                    add(f"{label} generate", batch, gen_s, args.tokens, note)
                    if sampling() is not None:
                        how = Sampling(temperature=sampling()[0], top_k=sampling()[1], seed=0)
                        sampled_s = median_s(lambda dec=dec, p=prompt, how=how: dec.generate(p, args.tokens, how))
                        add(f"{label} generate sampled", batch, sampled_s, args.tokens)
                    step_s = median_s(stepwise(dec, batch), max(1, args.repeats // 2))
                    add(f"{label} stepwise", batch, step_s, args.tokens)
                if not cuda:
                    long_prompt = torch.randint(0, args.vocab, (batch, args.prompt))
                    pb = PBWordLM(model, target, bits=bits)
                    add(
                        f"PB W{bits} prompt/gen",
                        batch,
                        median_s(lambda d=dec, p=long_prompt: d.generate(p, 1)),
                        args.prompt,
                    )
                    add(f"PB W{bits} prompt/seq", batch, median_s(lambda pb=pb, p=long_prompt: pb(p.T)), args.prompt)

    device = torch.cuda.get_device_name() if cuda else "CPU"
    mode = "greedy" + (f" (rows 'sampled': T, top-k = {args.sample})" if args.sample else "")
    print(f"\ngenerate(), {mode}, {args.tokens} new tokens, {args.layers}x{args.hidden}, vocab {args.vocab}, {device}")
    print(f"{'model':<24}{'batch':>6}{'us/token':>11}{'tokens/s':>11}{'vs best torch (same batch)':>28}")
    for name, batch, us, tps, note in rows:
        base = _torch_best(name, batch, tps)
        print(f"{name:<24}{batch:>6}{us:>11.1f}{tps:>11.0f}{tps / base:>27.2f}x  {note}")


if __name__ == "__main__":
    setup()
    run()
