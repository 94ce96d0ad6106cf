"""Choosing the next token inside a compiled module: greedy or seeded temperature/top-k sampling.

:func:`pick_func` is the TIR kernel that :mod:`pbtvm.generate` runs after the head of every
decoded step; :func:`pick_reference` is its numpy twin, the definition tests compare against.
Per row ``r`` of the logits ``[B, V]`` and step ``j`` of a chunk:

1. ``forced[j, r] >= 0`` (a prompt token to feed next): the token is ``forced[j, r]``, ``done``
   is unchanged, nothing is drawn.
2. else a finished row (``done[r] & DONE_FINISHED``) emits ``eos``.
3. else ``best`` is the first index of a NaN logit if the row holds one, else the first index of
   its largest logit (``numpy.argmax`` and ``torch.argmax`` agree on both). A row whose ``best``
   logit is NaN, or, when sampling, ±inf (the softmax is undefined there) is *non-finite*: its
   token is ``best`` and ``done[r]`` gains :data:`DONE_NONFINITE`, which generate() reports.
4. else, with temperature ``T <= 0``: the token is ``best``.
5. else sampling: order the logits by (value descending, index ascending) and keep the first
   ``top_k`` (all when ``top_k <= 0`` or ``>= V``); weights ``w_i = exp((l_i - max) / T)`` in
   float64 for kept ``i``, 0 otherwise; ``u`` in [0, 1) from :func:`philox_uniform` on
   ``(seed, counter + j, r)``; the token is the first ``i`` with ``w_i > 0`` whose running sum
   (in index order) exceeds ``u * sum(w)``, else the last ``i`` with ``w_i > 0``.

In 3-5, ``done[r]`` gains :data:`DONE_FINISHED` when the token is ``eos`` (``eos >= 0``).

``ctrl`` carries ``(seed, counter, eos, top_k)`` as int64 and ``temp`` the temperature as
float64, so one compiled kernel serves every mode. The CPU kernel sums in index order like the
twin; its ``exp`` is vectorized arithmetic within an ulp of libm's
(:func:`pbtvm.ops.vector_math.exp_f64`), so a token differs only where ``u * sum`` lies within
float64 rounding of a bucket boundary; the CUDA kernel (one block per row) sums
per thread segment and scans, equal to the twin unless ``u * sum`` lies within float64 rounding
of a bucket boundary. A ``-inf`` logit is never drawn; a row of ``-inf`` alone gives index 0
when greedy and is non-finite when sampling.
"""

from __future__ import annotations

import numpy as np

from ._tvm import tir
from .errors import InputError

#: Threads per CUDA block (one block per row) of the pick kernel: 512 keeps its shared memory
#: (the radix top-k's digit counts, 16 int32 a thread) under 48 KB; with 256 a greedy pick of
#: 10,000 logits took 6.8 us on an H200 (five rounds of loads a thread).
PICK_THREADS = 512
#: ``ctrl`` entries, in order.
CTRL_FIELDS = ("seed", "counter", "eos", "top_k")
#: Flags of a row's ``done`` value: the row emitted ``eos`` (it emits ``eos`` from then on) ...
DONE_FINISHED = 1
#: ... and a pick of the row met a NaN logit, or a ±inf largest logit while sampling.
DONE_NONFINITE = 2

_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85


def philox4x32(counter: np.ndarray, key: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Philox4x32-``rounds`` (Salmon et al. 2011) of uint32 ``counter [..., 4]``, ``key [..., 2]``."""
    x = [np.asarray(counter[..., i], np.uint64) for i in range(4)]
    k0, k1 = (np.asarray(key[..., i], np.uint64) for i in range(2))
    mask = np.uint64(0xFFFFFFFF)
    for _ in range(rounds):
        p0, p1 = x[0] * np.uint64(_M0), x[2] * np.uint64(_M1)
        x = [(p1 >> np.uint64(32)) ^ x[1] ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ x[3] ^ k1, p0 & mask]
        k0, k1 = (k0 + np.uint64(_W0)) & mask, (k1 + np.uint64(_W1)) & mask
    return np.stack(x, axis=-1).astype(np.uint32)


def philox_uniform(seed: int, counter: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Float64 in [0, 1) (53 random bits) for ``(seed, counter, row)``; arrays broadcast.

    Counter block ``(row, counter low, counter high, 0)``, key ``(seed low, seed high)``.
    """
    counter, row = np.broadcast_arrays(np.asarray(counter, np.int64), np.asarray(row, np.int64))
    c = counter.astype(np.uint64)
    block = np.stack([row.astype(np.uint64), c & 0xFFFFFFFF, c >> np.uint64(32), np.zeros_like(c)], axis=-1)
    key = np.array([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF], np.uint64)
    out = philox4x32(block, np.broadcast_to(key, block.shape[:-1] + (2,))).astype(np.float64)
    return ((out[..., 0] // 32) * 67108864.0 + out[..., 1] // 64) * 2.0**-53


def pick_reference(
    logits: np.ndarray,
    done: np.ndarray,
    *,
    temperature: float,
    top_k: int,
    seed: int,
    counter: int,
    eos: int,
    forced: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Numpy twin of one pick (see the module docstring).

    Parameters
    ----------
    logits : float32 [B, V]
    done : int64 [B]
        :data:`DONE_FINISHED` and :data:`DONE_NONFINITE` flags.
    forced : int64 [B], optional
        Prompt tokens to feed instead of a pick (``-1`` = pick).

    Returns
    -------
    tokens : int64 [B]
    done : int64 [B]
    """
    batch, vocab = logits.shape
    forced = np.full(batch, -1, np.int64) if forced is None else np.asarray(forced, np.int64)
    tokens, new_done = np.zeros(batch, np.int64), np.array(done, np.int64)
    temperature = float(np.float64(temperature))
    for r in range(batch):
        row = np.asarray(logits[r], np.float32)
        if forced[r] >= 0:
            tokens[r] = forced[r]
            continue
        if done[r] & DONE_FINISHED:
            tokens[r] = eos
            continue
        best = int(np.argmax(row))  # the first NaN if any, as torch.argmax
        nonfinite = np.isnan(row[best]) or (temperature > 0 and np.isinf(row[best]))
        if temperature <= 0 or nonfinite:
            tok = best
        else:
            w = sampling_weights(row, temperature, top_k)
            running = np.cumsum(w)  # sequential, like the kernel
            target = philox_uniform(seed, counter, r)[()] * running[-1]
            hits = np.flatnonzero((w > 0) & (running > target))
            tok = int(hits[0]) if hits.size else int(np.flatnonzero(w > 0)[-1])
        tokens[r] = tok
        new_done[r] |= (DONE_FINISHED if eos >= 0 and tok == eos else 0) | (DONE_NONFINITE if nonfinite else 0)
    return tokens, new_done


def sampling_weights(row: np.ndarray, temperature: float, top_k: int) -> np.ndarray:
    """Step 5's weights of one row that samples (no NaN, largest logit finite), float64 [V]:
    ``exp((l_i - max) / T)`` for the first ``top_k`` logits in (value descending, index ascending)
    order (all when ``top_k <= 0`` or ``>= V``; ``-0.0`` ties ``+0.0``), 0 for the others."""
    vocab = row.shape[0]
    keep = np.ones(vocab, bool)
    if 0 < top_k < vocab:
        order = np.lexsort((np.arange(vocab), -row.astype(np.float64)))
        keep[:] = False
        keep[order[:top_k]] = True
    with np.errstate(over="ignore"):  # a tiny temperature: -inf, weight 0, as the kernel's exp gives
        return np.where(keep, np.exp((row.astype(np.float64) - np.float64(row.max())) / temperature), 0.0)


def pick_func(
    batch: int,
    vocab: int,
    chunk: int,
    target_kind: str,
    embedding: tuple[int, int] | None = None,
    programmatic: bool = False,
) -> tir.PrimFunc:
    """The pick kernel ``(logits, forced, done, ctrl, temp, step) -> (token, done', weights)``;
    with ``embedding``, ``(logits, forced, done, ctrl, temp, table, step) -> (token, done',
    weights, x)``: ``x[r]`` is the table's row of the token (``take(table, token, mode="clip")``),
    the next step's input, so generate() needs no lookup kernel between the pick and the layers.

    Parameters
    ----------
    batch, vocab : int
        Logits shape ``[batch, vocab]`` (float32).
    chunk : int
        Steps per call: ``forced`` is int64 ``[chunk, batch]``, ``step`` selects its row.
    target_kind : str
        ``"llvm"`` (rows in a parallel loop) or ``"cuda"`` (one block of :data:`PICK_THREADS`
        threads per row).
    embedding : (int, int), optional
        ``(rows, dim)`` of a float32 embedding table to look the token up in.
    programmatic : bool
        CUDA sm_90+: the kernel is written for programmatic dependent launch
        (:attr:`pbtvm.target.TargetLimits.programmatic_launch`; ``compile`` then launches it so).

    Returns
    -------
    tir.PrimFunc
        Scheduled; ``ctrl`` int64 [4] (:data:`CTRL_FIELDS`), ``temp`` float64 [1], ``step`` int64;
        outputs ``token`` int64 [B], ``done'`` int64 [B] and the float64 [B, V] weight scratch
        (and ``x`` float32 [B, dim] with ``embedding``).
    """
    if target_kind == "llvm":
        from .sampling_tir import cpu_pick

        return cpu_pick(batch, vocab, chunk, embedding)
    if target_kind == "cuda":
        from .sampling_tir import cuda_pick

        return cuda_pick(batch, vocab, chunk, PICK_THREADS, embedding, programmatic)
    raise InputError(f"pick_func has no schedule for target kind {target_kind!r}")


__all__ = [
    "CTRL_FIELDS",
    "DONE_FINISHED",
    "DONE_NONFINITE",
    "PICK_THREADS",
    "philox4x32",
    "philox_uniform",
    "pick_func",
    "pick_reference",
    "sampling_weights",
]
