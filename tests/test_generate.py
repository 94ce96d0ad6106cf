"""generate(): the token loop inside the module equals the decoder called token by token + numpy pick."""

from __future__ import annotations

import re
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch

import pbtvm
from pbtvm import library, names
from pbtvm.apps.ptb import word_lm
from pbtvm.decoder import compile_decoder, load_decoder
from pbtvm.generate import Sampling, generate_stepwise
from pbtvm.sampling import PICK_THREADS, philox4x32, philox_uniform, pick_func, pick_reference, sampling_weights
from pbtvm.sampling_tir import CUDA_PICK_HELD_MAX, CUDA_PICK_LOADS
from pbtvm.sass import loads_before_wait, reads_before_wait, source_sass

from .concurrency import run_threads
from .cuda_emulator import EmulatedKernel
from .test_decoder import _kernel_calls, _vm_functions

SM90 = {"kind": "cuda", "arch": "sm_90"}
VOCAB = 40
MODES = [None, Sampling(0.8, 0, 7), Sampling(1.5, 5, 2**40 + 3), Sampling(1.0, 1, 9)]


def _lm(vocab=VOCAB, hidden=16, layers=2):
    torch.manual_seed(0)
    return word_lm(vocab, hidden, layers, dropout=0.0).eval()


@pytest.fixture(scope="module")
def dec3():
    m = _lm()
    return compile_decoder(m.lstm, "llvm", 4, embedding=m.embedding, head=m.head, batch=3, generate_chunk=4)


@pytest.fixture(scope="module")
def dec1():
    m = _lm()
    return compile_decoder(m.lstm, "llvm", 4, embedding=m.embedding, head=m.head, batch=1, generate_chunk=5)


def _nonfinite_row(rng, row, kind):
    """Put NaN (twice, so the first one must win; at an end sometimes), ±inf or only -inf into
    ``row`` (in place)."""
    spots = rng.choice(row.size, 2, replace=False)
    if kind == 0:
        spots[0] = [spots[0], 0, row.size - 1][rng.integers(3)]
        row[spots] = np.nan
    elif kind == 1:
        row[spots[0]] = np.inf
    elif kind == 2:
        row[spots] = np.inf  # a tie at +inf
    else:
        row[:] = -np.inf


def _random_pick_cases(rng, batch, vocab, chunk, n):
    """Logits with ties, NaN and infinities, forced rows, finished rows (both done flags), every
    mode and top-k edge, large seeds/counters; each drawn on its own, so every kind of row meets
    every mode."""
    for trial in range(n):
        logits = (rng.standard_normal((batch, vocab)) * 2).astype(np.float32)
        if trial % 5 == 0:
            logits[:, 3] = logits[:, 7] = logits.max(axis=1)  # a tie at the top
        if trial % 4 == 2:  # ties everywhere (-0.0 beside +0.0 too) and masked tokens: the top-k threshold
            logits = np.round(logits)
            logits[rng.random(logits.shape) < 0.1] = -np.inf
        if rng.random() < 0.4:
            _nonfinite_row(rng, logits[rng.integers(batch)], int(rng.integers(4)))
        forced = np.where(rng.random((chunk, batch)) < 0.3, rng.integers(0, vocab, (chunk, batch)), -1)
        done = rng.integers(0, 4, batch) if rng.random() < 0.4 else np.zeros(batch, np.int64)
        ctrl = np.array(
            [
                rng.integers(0, 2**62),
                rng.integers(0, 2**40),
                rng.integers(-1, vocab),
                [0, 1, 2, 3, 5, 17, vocab - 1, vocab, 99][rng.integers(9)],
            ]
        )
        yield (
            logits,
            forced.astype(np.int64),
            done.astype(np.int64),
            ctrl,
            [0.0, 0.7, 1.0, 2.5][rng.integers(4)],
            int(rng.integers(chunk)),
        )


def _check_pick(run, batch, vocab, chunk, n):
    """``run`` returns the kernel's token, done and weights: tokens and flags equal the reference's,
    and every row that sampled weighted the tokens the reference keeps (its top-k set)."""
    rng = np.random.default_rng(0)
    sampled = 0
    for logits, forced, done, ctrl, temp, step in _random_pick_cases(rng, batch, vocab, chunk, n):
        token, new_done, weights = run(logits, forced, done, ctrl, temp, step)
        seed, counter, eos, top_k = (int(v) for v in ctrl)
        want = pick_reference(
            logits, done, temperature=temp, top_k=top_k, seed=seed, counter=counter + step, eos=eos, forced=forced[step]
        )
        np.testing.assert_array_equal(token, want[0])
        np.testing.assert_array_equal(new_done, want[1])
        for r in range(batch):
            row = logits[r]
            if forced[step, r] < 0 and not done[r] & 1 and temp > 0 and np.isfinite(row.max()):
                kept = sampling_weights(row, temp, top_k) > 0
                np.testing.assert_array_equal(weights[r] > 0, kept, err_msg=f"top_k={top_k}")
                sampled += 1
    assert sampled >= n // 4


def test_reference_pick_of_nonfinite_logits_follows_torch_argmax_and_flags_the_row():
    from pbtvm.sampling import DONE_FINISHED, DONE_NONFINITE

    nan, inf = np.nan, np.inf
    logits = np.array([[0, nan, 3, nan], [0, inf, 3, inf], [-inf] * 4, [0, 5, 5, 1]], np.float32)
    want_argmax = torch.from_numpy(logits).argmax(-1).numpy()  # 1, 1, 0, 1: the first NaN, else the first max
    done = np.array([0, 0, 0, DONE_NONFINITE])  # a flag set earlier stays set
    greedy = pick_reference(logits, done, temperature=0, top_k=0, seed=0, counter=0, eos=1)
    np.testing.assert_array_equal(greedy[0], want_argmax)
    np.testing.assert_array_equal(greedy[1], [DONE_FINISHED | DONE_NONFINITE, DONE_FINISHED, 0, 3])
    sampled = pick_reference(logits, done, temperature=0.5, top_k=2, seed=0, counter=0, eos=-1)
    np.testing.assert_array_equal(sampled[0][:3], want_argmax[:3])  # no softmax exists for these rows
    np.testing.assert_array_equal(sampled[1], [DONE_NONFINITE] * 4)


def test_philox_matches_the_published_known_answers():
    """Random123's kat_vectors for philox4x32_10."""
    got = philox4x32(np.zeros(4, np.uint32), np.zeros(2, np.uint32))
    assert got.tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    got = philox4x32(np.full(4, 0xFFFFFFFF, np.uint32), np.full(2, 0xFFFFFFFF, np.uint32))
    assert got.tolist() == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    u = philox_uniform(5, np.arange(20000), 0)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01 and len(np.unique(u)) == 20000


def test_reference_sampler_follows_the_softmax_and_top_k():
    logits = np.array([[2.0, 1.0, 0.0, 1.0, -1.0]], np.float32)
    draws = np.array(
        [pick_reference(logits, [0], temperature=0.7, top_k=0, seed=3, counter=i, eos=-1)[0][0] for i in range(6000)]
    )
    p = np.exp(logits[0] / 0.7) / np.exp(logits[0] / 0.7).sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=5) / 6000, p, atol=0.02)
    top3 = [pick_reference(logits, [0], temperature=5.0, top_k=3, seed=3, counter=i, eos=-1)[0][0] for i in range(300)]
    assert set(top3) == {0, 1, 3}  # the tie 1.0 at index 1 and 3: both kept (3 largest by value, then index)
    top2 = [pick_reference(logits, [0], temperature=5.0, top_k=2, seed=3, counter=i, eos=-1)[0][0] for i in range(300)]
    assert set(top2) == {0, 1}  # the tie is broken by the lower index


def _cpu_pick(batch, vocab, chunk, mcpu="host", embedding=None):
    """The CPU pick kernel built for ``mcpu`` as ``run(logits, forced, done, ctrl, temp, step) ->
    (token, done, weights)``; with ``embedding`` (rows, dim) it also looks the token up in a
    random table, which ``run`` checks (:func:`_check_lookup`)."""
    from pbtvm._tvm import tvm
    from pbtvm.target import resolve_target

    target = resolve_target("llvm" if mcpu == "host" else {"kind": "llvm", "mcpu": mcpu})
    ex = tvm.compile(pick_func(batch, vocab, chunk, "llvm", embedding), target=target)
    table = _table(embedding)

    def run(logits, forced, done, ctrl, temp, step):
        shapes = (((batch,), "int64"),) * 2 + (((batch, vocab), "float64"),)
        shapes += (((batch, embedding[1]), "float32"),) if embedding else ()
        outs = [tvm.runtime.tensor(np.zeros(s, d)) for s, d in shapes]
        ins = [tvm.runtime.tensor(a) for a in (logits, forced, done, ctrl, np.array([temp]))]
        ins += [tvm.runtime.tensor(table)] if embedding else []
        ex(*ins, step, *outs)
        token = outs[0].numpy()
        if embedding:
            _check_lookup(outs[3].numpy(), table, token)
        return token, outs[1].numpy(), outs[2].numpy()

    return run


def _table(embedding):
    """A random float32 embedding table of shape ``embedding`` (None: None)."""
    return None if embedding is None else np.random.default_rng(9).standard_normal(embedding).astype(np.float32)


def _check_lookup(x, table, token):
    """The pick's lookup: row ``r`` of ``x`` is the table's row of ``token[r]``, clipped to the table
    (``take(mode="clip")``), bit for bit."""
    np.testing.assert_array_equal(x, table[np.clip(token, 0, table.shape[0] - 1)])


@pytest.mark.parametrize(("mcpu", "embedding"), [("host", (53, 7)), ("x86-64", None)])
def test_cpu_pick_kernel_equals_the_reference(mcpu, embedding):
    """The kernel as generate() builds it for this CPU (vector exp, bisection, the lookup of the
    token in the embedding) and for a generic x86-64 without the lookup."""
    batch, vocab, chunk = 3, 50, 4
    _check_pick(_cpu_pick(batch, vocab, chunk, mcpu, embedding), batch, vocab, chunk, 240)


def test_cpu_pick_never_reads_before_a_row_with_subnormals_flushed():
    """With denormals flushed (``torch.set_flush_denormal(True)``, DAZ), the bisection's float
    compares and the order keys disagree on subnormal logits: the top-k threshold index stayed -1,
    the kernel read ``logits[r, -1]`` (the row before) and, after a NaN there, returned token -1."""
    batch, vocab = 2, 40
    run = _cpu_pick(batch, vocab, 1)
    row = -np.arange(vocab, dtype=np.float32) - 1
    row[0], row[1], row[2] = 1.0, 1e-40, -1e-40
    logits = np.stack([np.zeros(vocab, np.float32), row])
    logits[0, -1] = np.nan  # row 0 is non-finite; its last logit is what row 1 read
    assert torch.set_flush_denormal(True)  # x86 with SSE3: DAZ and FTZ on this thread
    try:
        for top_k in (2, 3):
            ctrl = np.array([5, 0, -1, top_k], np.int64)
            token, _, _ = run(logits, np.full((1, batch), -1, np.int64), np.zeros(batch, np.int64), ctrl, 1.0, 0)
            assert token[0] == vocab - 1 and 0 <= token[1] < top_k, token  # row 0: its NaN; row 1: a kept one
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize(
    ("batch", "vocab", "cases", "embedding"),
    [(2, 700, 72, None), (1, 100, 36, (98, 600)), (2, 5000, 24, (5003, 37))],
)
def test_cuda_pick_kernel_emulated_equals_the_reference(batch, vocab, cases, embedding):
    """The generated CUDA (one block of ``PICK_THREADS`` threads per row, shuffle reductions, scan),
    run on the CPU. 700: a full stride and a partial one, segments of 2; 100: fewer logits than
    threads; 5000: two groups of loads (``CUDA_PICK_LOADS`` strides each), the second partial. The
    emulator ends the logits at an unreadable page (``cuda_emulator.GUARD``): the radix top-k read
    up to 255 floats past a row (past the buffer on the last row), loaded before the bounds test
    that guarded only the compare. With the token's lookup in an embedding table: 600 wide (two
    rounds of the block), rows fewer than the vocabulary (the clip), and 37 wide."""
    from pbtvm.cuda import build, cuda_source
    from pbtvm.target import resolve_target

    chunk = 3
    # as generate() builds it on sm_90: written for programmatic dependent launch (no-ops here)
    pick = pick_func(batch, vocab, chunk, "cuda", embedding, programmatic=True)
    src = cuda_source(build(pick, resolve_target(SM90)))
    assert "griddepcontrol_wait" in src
    kernel = EmulatedKernel(src, warp_ops=False)
    table = _table(embedding)

    def run(logits, forced, done, ctrl, temp, step):
        token, new_done, weights = np.zeros(batch, np.int64), np.zeros(batch, np.int64), np.zeros((batch, vocab))
        lookup = {}
        if embedding:
            lookup = {"table_ptr": table, "x_next_ptr": np.zeros((batch, embedding[1]), np.float32)}
        kernel(
            (batch, 1, 1),
            (PICK_THREADS, 1, 1),
            logits_ptr=logits,
            forced_ptr=forced,
            done_in_ptr=done,
            ctrl_ptr=ctrl.astype(np.int64),
            temp_ptr=np.array([temp]),
            step=step,
            token_ptr=token,
            done_out_ptr=new_done,
            weights_ptr=weights,
            **lookup,
        )
        if embedding:
            _check_lookup(lookup["x_next_ptr"], table, token)
        return token, new_done, weights

    _check_pick(run, batch, vocab, chunk, cases)


@pytest.mark.parametrize(
    ("vocab", "embedding", "arch", "pdl"),
    [
        (10000, (10000, 650), "sm_90", "1"),
        (10000, (10000, 650), "sm_90", "0"),
        (10000, (10000, 650), "sm_80", "1"),
        (8192, None, "sm_90", "1"),
    ],
)
def test_cuda_pick_builds_without_spills(vocab, embedding, arch, pdl, monkeypatch):
    """The pick's register budget (``__launch_bounds__(512, 1)``: 128 a thread) holds its logits in
    registers (up to ``CUDA_PICK_HELD_MAX``: 8,192 a sampling segment of 16 too; 10,000 a group a
    pass) without spills; at 10,000 with the segment held as well it spilled 28 bytes
    (``CUDA_PICK_HELD_SEGMENT_MAX``), with the row held 16-24 bytes once compiled without
    ``__restrict__`` (sm_90's programmatic launch: written for it, as generate() builds it, or
    made to wait first by the build) and on sm_80 with the lookup. A row past it (50,257: 64
    registers) is far from the cap."""
    from pbtvm.cuda import build, cuda_source
    from pbtvm.sass import local_memory_ops, source_sass
    from pbtvm.target import TargetInfo, resolve_target

    monkeypatch.setenv(names.ENV_CUDA_PDL, pdl)
    target = resolve_target({"kind": "cuda", "arch": arch})
    programmatic = TargetInfo.of(target).limits.programmatic_launch
    assert programmatic == (arch == "sm_90" and pdl == "1")
    for written_for_it in {programmatic, False}:
        src = cuda_source(build(pick_func(1, vocab, 4, "cuda", embedding, written_for_it), target))
        assert ("griddepcontrol" in src) == programmatic  # wait_first, where not written for it
        (sass,) = source_sass(src, arch).values()
        assert local_memory_ops(sass) == 0, (written_for_it, local_memory_ops(sass))


def test_cuda_pick_refuses_a_block_that_is_not_whole_warps():
    """The warp-shuffle reductions need full warps and a power-of-two count of them."""
    from pbtvm.errors import InputError
    from pbtvm.sampling_tir import cuda_pick

    for threads in (16, 48):
        with pytest.raises(InputError, match="at least a warp"):
            cuda_pick(1, 100, 1, threads)


def _pick_rows(vocab: int) -> list[np.ndarray]:
    """Rows whose ties, NaNs and maxima sit on one thread's logits on both sides of a load-group
    boundary (a group: ``CUDA_PICK_LOADS * PICK_THREADS`` logits)."""
    g = CUDA_PICK_LOADS * PICK_THREADS
    assert vocab > g, "needs two load groups"
    rng = np.random.default_rng(3)
    t = min(100, vocab - 1 - g)
    # (indices, value) pairs set on a fresh normal row; the last row is rounded (ties for top-k)
    cases = [
        ([t, t + g], 50.0),  # a tie across the groups on one thread: the lower index wins
        ([t + g, t + PICK_THREADS], 50.0),  # group 0's second stride wins
        ([vocab - 1], 50.0),  # the last logit (the clamped loads read it too)
        ([g, vocab - 1], np.nan),  # the first NaN, in group 1
        ([vocab - 1], np.nan),  # a NaN beats an earlier inf (set below)
        ([t, t + g, g - 1, g, vocab - 1], 7.0),
        ([t, t + g, vocab - 1, g - 1], 40.0),
    ]
    rows = []
    for k, (idx, value) in enumerate(cases):
        row = (rng.standard_normal(vocab) * 2).astype(np.float32)
        if k == len(cases) - 1:
            row = np.round(row)
            row[3] = 39.0
        row[idx] = value
        if k == 4:
            row[t] = np.inf
        rows.append(row)
    row = np.full(vocab, -np.inf, np.float32)
    row[vocab - 1] = 1.0
    rows.append(row)
    return rows


@pytest.mark.parametrize("vocab", [CUDA_PICK_LOADS * PICK_THREADS + 1, 5000, CUDA_PICK_HELD_MAX * PICK_THREADS + 1])
def test_cuda_pick_ties_and_nan_across_load_groups(vocab):
    """The CUDA pick's grouped loads (review, 2026-12-04): greedy and top-k 2..17 on rows with ties
    and NaNs across a load-group boundary, emulated; a load group that re-read another's logits
    passed the other pick tests. The first two rows are held in registers, the last is one logit
    too long for that (``CUDA_PICK_HELD_MAX``): a group at a time in every pass."""
    from pbtvm.cuda import build, cuda_source
    from pbtvm.target import resolve_target

    batch, chunk = 1, 1
    src = cuda_source(build(pick_func(batch, vocab, chunk, "cuda"), resolve_target(SM90)))
    kernel = EmulatedKernel(src, warp_ops=False)
    for row in _pick_rows(vocab):
        logits = row[None, :].copy()
        for temp, top_k in ((0.0, 0), (1.0, 2), (1.0, 3), (1.0, 5), (2.5, 8), (1.0, 9), (1.0, 17)):
            ctrl = np.array([5, 0, -1, top_k], np.int64)
            forced = np.full((chunk, batch), -1, np.int64)
            done = np.zeros(batch, np.int64)
            token, new_done, weights = np.zeros(batch, np.int64), np.zeros(batch, np.int64), np.zeros((batch, vocab))
            kernel(
                (batch, 1, 1), (PICK_THREADS, 1, 1), logits_ptr=logits, forced_ptr=forced, done_in_ptr=done,
                ctrl_ptr=ctrl, temp_ptr=np.array([temp]), step=0, token_ptr=token, done_out_ptr=new_done,
                weights_ptr=weights,
            )  # fmt: skip
            want = pick_reference(
                logits, done, temperature=temp, top_k=top_k, seed=5, counter=0, eos=-1, forced=forced[0]
            )
            np.testing.assert_array_equal(token, want[0], err_msg=f"temp={temp} top_k={top_k}")
            np.testing.assert_array_equal(new_done, want[1])
            if temp > 0 and np.isfinite(row.max()) and not np.isnan(row).any():
                kept = sampling_weights(row, temp, top_k) > 0
                np.testing.assert_array_equal(weights[0] > 0, kept, err_msg=f"top_k={top_k}")


@pytest.mark.gpu
def test_cuda_pick_kernel_on_gpu_equals_the_reference():
    """The same cases on the device (NaN tests compiled by nvcc, not g++)."""
    from pbtvm._tvm import tvm
    from pbtvm.cuda import build
    from pbtvm.target import resolve_target

    batch, vocab, chunk = 3, 700, 4
    kern, dev = build(pick_func(batch, vocab, chunk, "cuda"), resolve_target("cuda")), tvm.cuda(0)

    def run(logits, forced, done, ctrl, temp, step):
        outs = [tvm.runtime.empty(s, d, dev) for s, d in (((batch,), "int64"),) * 2 + (((batch, vocab), "float64"),)]
        ins = [tvm.runtime.tensor(a, dev) for a in (logits, forced, done, ctrl, np.array([temp]))]
        kern(*ins, step, *outs)
        return outs[0].numpy(), outs[1].numpy(), outs[2].numpy()

    _check_pick(run, batch, vocab, chunk, 240)


@pytest.mark.parametrize("sampling", MODES, ids=["greedy", "t0.8", "t1.5-top5", "top1"])
def test_generate_equals_the_stepwise_decoder_batch3(dec3, sampling):
    for length in (6, 5):  # 5 forced steps (a prefill chunk + 1 forced), 4 (a prefill chunk, none left)
        prompt = np.random.default_rng(length).integers(0, VOCAB, (3, length))
        tokens, logits = dec3.generate(prompt, 11, sampling, return_logits=True)
        want, want_logits = generate_stepwise(dec3, prompt, 11, sampling, return_logits=True)
        assert tokens.shape == (3, 11) and logits.shape == (3, 11, VOCAB)
        np.testing.assert_array_equal(tokens, want)
        np.testing.assert_array_equal(logits, want_logits)  # the same kernels: bit-identical
        np.testing.assert_array_equal(dec3.generate(prompt, 11, sampling), tokens)  # the logits-free function


def test_generate_equals_the_stepwise_decoder_batch1(dec1):
    for prompt, n in (([7], 1), ([7], 12), (np.arange(9) % VOCAB, 5)):
        for sampling in MODES:
            got = dec1.generate(np.array(prompt), n, sampling)
            assert got.shape == (1, n)
            np.testing.assert_array_equal(got, generate_stepwise(dec1, np.array(prompt), n, sampling))
    greedy = dec1.generate(np.array([3, 4]), 8)
    np.testing.assert_array_equal(dec1.generate(np.array([3, 4]), 8, Sampling(2.0, 1, 5)), greedy)  # top-1


def test_generate_with_inputs_written_by_copy_as_on_cuda(dec3):
    """On CUDA the kept chunk inputs are written with ``copyfrom`` (no host view): same tokens."""
    prompt = np.random.default_rng(5).integers(0, VOCAB, (3, 3))  # 2 forced steps: the kept ``forced``
    want = generate_stepwise(dec3, prompt, 10, MODES[2])
    dec3.generate((prompt + 1) % VOCAB, 1)  # leaves other values in the kept tensors
    kept = dec3._chunk_inputs
    views, kept._views = kept._views, None
    try:
        np.testing.assert_array_equal(dec3.generate(prompt, 10, MODES[2]), want)
    finally:
        kept._views = views


def test_generate_from_four_threads_equals_single_threaded(dec3):
    """Calls share the decoder's kept input tensors and take turns on the model's lock."""
    rng = np.random.default_rng(11)
    cases = [(rng.integers(0, VOCAB, (3, 1 + i % 6)), MODES[i % len(MODES)]) for i in range(6)]
    want = [dec3.generate(prompt, 7, sampling) for prompt, sampling in cases]
    errors: list[str] = []

    def worker(t: int) -> None:
        for call in range(12):
            i = (t + call) % len(cases)
            if not np.array_equal(dec3.generate(cases[i][0], 7, cases[i][1]), want[i]):
                errors.append(f"thread {t} call {call} case {i}")

    run_threads(worker)
    assert errors == []


def test_sampling_depends_on_seed_and_row_only(dec3):
    prompt = np.zeros((3, 2), np.int64)  # identical rows: they differ only by their row counter
    a = dec3.generate(prompt, 16, Sampling(1.0, 0, 1))
    np.testing.assert_array_equal(a, dec3.generate(prompt, 16, Sampling(1.0, 0, 1)))
    assert not np.array_equal(a, dec3.generate(prompt, 16, Sampling(1.0, 0, 2)))
    assert not np.array_equal(a[0], a[1])


def test_bitlayers_reaches_generate(dec3):
    prompt = np.random.default_rng(2).integers(0, VOCAB, (3, 3))
    one, logits1 = dec3.generate(prompt, 6, return_logits=True, bitlayers=1)
    _, logits4 = dec3.generate(prompt, 6, return_logits=True, bitlayers=4)
    assert not np.array_equal(logits1, logits4)
    want, want_logits = generate_stepwise(dec3, prompt, 6, return_logits=True, bitlayers=1)
    np.testing.assert_array_equal(one, want)
    np.testing.assert_array_equal(logits1, want_logits)


def test_eos_rows_keep_emitting_eos_and_generation_stops_when_all_finished(dec3):
    prompt = np.random.default_rng(3).integers(0, VOCAB, (3, 2))
    sampling = Sampling(1.3, 0, 11)
    free = dec3.generate(prompt, 40, sampling)
    eos = int(np.bincount(free.ravel()).argmax())  # a token every row is likely to emit
    firsts = [int(np.flatnonzero(row == eos)[0]) for row in free]  # rows agree with the EOS-free run until then
    got, logits = dec3.generate(prompt, 40, sampling, eos_token=eos, return_logits=True)
    want, want_logits = generate_stepwise(dec3, prompt, 40, sampling, eos_token=eos, return_logits=True)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(logits, want_logits)
    assert got.shape == (3, max(firsts) + 1)  # stopped after the last row's first EOS
    for row, free_row, first in zip(got, free, firsts, strict=True):
        np.testing.assert_array_equal(row[: first + 1], free_row[: first + 1])  # same draws until it finished
        assert (row[first:] == eos).all()
    never = int(np.setdiff1d(np.arange(VOCAB), free)[0]) if len(np.unique(free)) < VOCAB else None
    if never is not None:  # an EOS no row emits: full length
        assert dec3.generate(prompt, 40, sampling, eos_token=never).shape == (3, 40)


def test_nan_logits_warn_when_greedy_and_refuse_sampling():
    """A NaN embedding row makes row 1's state and logits NaN: greedy decoding picks the first
    NaN's index there (torch.argmax) and warns; sampling raises, as torch.multinomial does."""
    m = _lm()
    with torch.no_grad():
        m.embedding.weight[5] = float("nan")
    dec = compile_decoder(m.lstm, "llvm", 4, embedding=m.embedding, head=m.head, batch=3, generate_chunk=4)
    prompt = np.array([[1, 2, 3], [1, 5, 3], [4, 4, 4]])
    with pytest.warns(RuntimeWarning, match=r"batch rows \[1\] held NaN.*torch.argmax") as record:
        got = dec.generate(prompt, 6)
    assert record[0].filename == __file__  # the warning points at the caller
    with pytest.warns(RuntimeWarning, match=r"batch rows \[1\]"):
        want = generate_stepwise(dec, prompt, 6)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[1], 0)  # every logit NaN from then on: the first index
    for sampling in (Sampling(0.8, 0, 1), Sampling(1.0, 3, 2)):
        with pytest.raises(FloatingPointError, match=r"cannot sample batch rows \[1\]"):
            dec.generate(prompt, 6, sampling)
        with pytest.raises(FloatingPointError, match=r"cannot sample batch rows \[1\]"):
            generate_stepwise(dec, prompt, 6, sampling)
    # The NaN row picks token 0; as the end token it finishes that row (flags 3), the others run on
    with pytest.warns(RuntimeWarning, match=r"batch rows \[1\]"):
        got = dec.generate(prompt, 6, eos_token=0)
    with pytest.warns(RuntimeWarning, match=r"batch rows \[1\]"):
        np.testing.assert_array_equal(got, generate_stepwise(dec, prompt, 6, eos_token=0))
    assert got.shape == (3, 6) and (got[1] == 0).all() and (got[[0, 2]] != 0).any()


def test_steps_past_the_request_are_not_reported():
    """A chunk runs whole: with 1 new token of a 4-step chunk, 3 steps run past the request. The
    token picked (5, made likely by the head's bias) has a NaN embedding, so those steps meet NaN
    logits; generate() neither warns nor raises for them, as the stepwise definition does not."""
    m = _lm()
    with torch.no_grad():
        m.embedding.weight[5] = float("nan")
        m.head.bias[5] = 100.0
    dec = compile_decoder(m.lstm, "llvm", 4, embedding=m.embedding, head=m.head, batch=1, generate_chunk=4)
    for sampling in (None, Sampling(0.8, 0, 1)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = dec.generate(np.array([[1, 2]]), 1, sampling)
            np.testing.assert_array_equal(got, generate_stepwise(dec, np.array([[1, 2]]), 1, sampling))
        assert got.tolist() == [[5]]
        with pytest.raises(FloatingPointError) if sampling else pytest.warns(RuntimeWarning):
            dec.generate(np.array([[1, 2]]), 2, sampling)  # the second token is asked for: reported


def test_finished_reads_the_finished_flag_only():
    from pbtvm.generate import _finished

    assert not _finished(np.array([1, 2, 1])) and _finished(np.array([1, 3, 1])) and not _finished(np.zeros(2, int))


def test_torch_prompt_gives_torch_tokens(dec1):
    got = dec1.generate(torch.tensor([[1, 2, 3]]), 4)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.int64 and got.shape == (1, 4)
    np.testing.assert_array_equal(got.numpy(), dec1.generate(np.array([1, 2, 3]), 4))


def test_generate_rejects_bad_arguments(dec3):
    ok = np.zeros((3, 2), np.int64)
    with pytest.raises(ValueError, match=r"prompt must have shape \[batch=3"):
        dec3.generate(np.zeros((2, 2), np.int64), 4)
    with pytest.raises(ValueError, match="length >= 1"):
        dec3.generate(np.zeros((3, 0), np.int64), 4)
    with pytest.raises(TypeError, match="integer token ids"):
        dec3.generate(ok.astype(np.float32), 4)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 40\)"):
        dec3.generate(ok + 40, 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec3.generate(ok, 0)
    with pytest.raises(ValueError, match="eos_token"):
        dec3.generate(ok, 4, eos_token=40)
    with pytest.raises(TypeError, match="sampling must be"):
        dec3.generate(ok, 4, "nucleus")
    # numpy's own errors before: "inhomogeneous shape", "dtype float64", "truth value ... ambiguous"
    with pytest.raises(ValueError, match=r"rows of one length"):
        dec3.generate([[1, 2, 3], [4, 5], [6, 7]], 4)
    for empty in ([], [[], [], []]):
        with pytest.raises(ValueError, match=r"prompt must have shape \[batch=3, length >= 1\], got \((0,|3, 0)\)"):
            dec3.generate(empty, 4)
    for big, shown in (
        (2**64, "18446744073709551616"),
        (2**63, "9223372036854775808"),
        (10**400, r"100\.\.\.\(401 digits\)"),
    ):
        with pytest.raises(ValueError, match=rf"token ids must lie in \[0, 40\), got 1\.\.{shown}$"):
            dec3.generate([[1, big], [1, 2], [1, 2]], 4)
    with pytest.raises(TypeError, match="sampling must be"):
        dec3.generate(ok, 4, np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="bitlayers"):
        dec3.generate(ok, 4, bitlayers=5)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(-1.0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(float("nan"))
    with pytest.raises(ValueError, match="top_k"):
        Sampling(1.0, -2)
    with pytest.raises(ValueError, match="seed"):
        Sampling(1.0, 0, -1)
    m = _lm(hidden=8, layers=1)
    with pytest.raises(ValueError, match="needs an embedding"):
        compile_decoder(m.lstm, "llvm", head=m.head, generate_chunk=4)
    with pytest.raises(ValueError, match="generate_chunk must be"):
        compile_decoder(m.lstm, "llvm", embedding=m.embedding, head=m.head, generate_chunk=-1)
    no_gen = compile_decoder(m.lstm, "llvm", 2, embedding=m.embedding, head=m.head, generate_chunk=0)
    with pytest.raises(ValueError, match="compiled without generate"):
        no_gen.generate(np.zeros((1, 1), np.int64), 3)


def test_generate_needs_a_head_over_the_embeddings_vocabulary():
    """generate() feeds the token it picks back through the embedding: with a head of 60 outputs
    over 20 embedding rows it returned ids past the table and fed them back clipped."""
    torch.manual_seed(0)
    lstm, small = torch.nn.LSTM(8, 12), torch.nn.Embedding(20, 8)
    with pytest.raises(ValueError, match="one of the head's 60 outputs.*embedding, which has 20 rows"):
        compile_decoder(lstm, "llvm", 4, embedding=small, head=torch.nn.Linear(12, 60), generate_chunk=4)
    step_only = compile_decoder(
        lstm, "llvm", 4, embedding=small, head=torch.nn.Linear(12, 60)
    )  # the default: no generate
    assert step_only.generate_chunk == 0
    with pytest.raises(ValueError, match="compiled without generate.*whose outputs are embedding rows"):
        step_only.generate(np.array([[1, 2]]), 3)
    # fewer outputs than rows (rows for padding or a start token the head never predicts) is fine
    wide = torch.nn.Embedding(60, 8)
    dec = compile_decoder(lstm, "llvm", 4, embedding=wide, head=torch.nn.Linear(12, 20), generate_chunk=4)
    np.testing.assert_array_equal(dec.generate(np.array([[55, 2]]), 6), generate_stepwise(dec, np.array([[55, 2]]), 6))
    assert dec.outputs == 20
    # an end token the head cannot pick never ends generation: it ran to max_new_tokens silently
    with pytest.raises(ValueError, match="eos_token 50 is not one of the head's 20 outputs"):
        dec.generate(np.array([[55, 2]]), 6, eos_token=50)


def test_sampling_takes_numpy_scalars_and_any_large_top_k(dec3):
    """numpy numbers are numbers (np.float32 0.8 was refused as 'not a finite number'); a top_k
    past int64 is every token (it stopped generate() with an OverflowError)."""
    prompt = np.array([[1, 2], [3, 4], [5, 6]])
    as_python = dec3.generate(prompt, 5, Sampling(0.800000011920929, 0, 7))
    np.testing.assert_array_equal(
        dec3.generate(prompt, 5, Sampling(np.float32(0.8), np.int64(0), np.uint8(7))), as_python
    )
    every = dec3.generate(prompt, 5, Sampling(1.0, 0, 3))
    for top_k in (2**63, np.uint64(2**64 - 1)):
        np.testing.assert_array_equal(dec3.generate(prompt, 5, Sampling(1.0, top_k, 3)), every)
    assert type(Sampling(np.float32(0.5)).temperature) is float
    assert Sampling(Fraction(1, 2)).temperature == 0.5
    with pytest.raises(ValueError, match="temperature"):
        Sampling(Fraction(-1, 2))


def test_generate_survives_export_and_load(dec3, tmp_path):
    """load_decoder and pbtvm.load both give the decoder back (pbtvm.load gave its bare step
    function, without generate)."""
    path = dec3.export(tmp_path / "gen.so")
    for again in (load_decoder(path), pbtvm.load(path)):
        assert again.generate_chunk == 4 and again.model.manifest["decoder"]["generate_chunk"] == 4
        prompt = np.random.default_rng(4).integers(0, VOCAB, (3, 5))
        for sampling in MODES[:2]:
            np.testing.assert_array_equal(again.generate(prompt, 9, sampling), dec3.generate(prompt, 9, sampling))


def test_cuda_generate_chunk_is_one_graph_with_the_pick_kernel(tmp_path):
    """Between a chunk's two repacks every step (layers, head, pick with the lookup of the next input) is
    captured, after one lookup of the chunk's first token."""
    m = _lm(vocab=300, hidden=64, layers=2)
    dec = compile_decoder(m.lstm, SM90, 4, embedding=m.embedding, head=m.head, generate_chunk=3)
    funcs = _vm_functions(dec.model._module.as_text())
    for name in ("generate_chunk", "generate_chunk_logits"):
        assert _kernel_calls(funcs[name]) == [f"{name}_in", f"{name}_out"]
        assert "vm.builtin.cuda_graph.run_or_capture" in funcs[name]
        step = ["pb_lstm_step_l0", "pb_lstm_step_l0", "pb_dense_head", "pick_token"]  # the pick looks x up
        assert _kernel_calls(funcs[f"{name}_cuda_graph_capture"]) == ["take", *step * 3, "add"]  # + the next counter
    assert _kernel_calls(funcs["prefill_chunk"]) == ["prefill_chunk_in", "prefill_chunk_out"]
    assert _kernel_calls(funcs["prefill_chunk_cuda_graph_capture"]) == ["take", *step[:2]] * 3  # no head, no pick
    (src,) = library._cuda_sources(dec.model._module.mod)
    assert re.search(rf"__launch_bounds__\({PICK_THREADS}, 1\) pick_token_kernel", src)
    path = dec.export(tmp_path / "gen_sm90.so")
    assert library.read_manifest(path)["decoder"]["generate_chunk"] == 3
    # programmatic dependent launch (sm_90): a token's kernels each start while the one before runs
    # (TVM's take and add too: they wait first, cuda_pdl.wait_first)
    tags = library.cuda_launch_tags(str(path))
    early = {k for k, v in tags.items() if names.LAUNCH_PROGRAMMATIC in v}
    assert {"pb_lstm_step_l0_kernel", "pb_dense_head_kernel", "pick_token_kernel"} <= early == set(tags)
    reads = reads_before_wait(src)
    assert all(reads[k] == set() for k in early if not k.startswith("pb_"))  # nothing before they wait
    sass = source_sass(src, "sm_90")
    assert all(loads_before_wait(sass[k]) == [] and "LDG.E.CONSTANT" not in sass[k] for k in early)  # coherent


@pytest.mark.gpu
def test_cuda_generate_equals_its_stepwise_decoder():
    """The chunk replayed as a CUDA graph equals the decoder called per token + the numpy pick."""
    m = _lm(vocab=500, hidden=256, layers=2)
    dec = compile_decoder(m.lstm, "cuda", 4, embedding=m.embedding, head=m.head, batch=2, generate_chunk=8)
    prompt = torch.randint(0, 500, (2, 7), device="cuda")
    for sampling in MODES:
        got, logits = dec.generate(prompt, 20, sampling, return_logits=True)
        want, want_logits = generate_stepwise(dec, prompt, 20, sampling, return_logits=True)
        assert got.is_cuda
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0)
        torch.testing.assert_close(logits.cpu(), want_logits.cpu(), rtol=0, atol=1e-5)  # the same kernels


@pytest.mark.gpu
def test_cuda_generate_with_programmatic_launch_equals_without(monkeypatch):
    """generate() on sm_90+ chains step, step, head and pick kernels that each start while the one
    before runs (programmatic dependent launch): the same tokens and logits, bit for bit, as the
    decoder built without it (``PBTVM_CUDA_PDL=0``). A read before a wait would show here."""
    from pbtvm.target import local_cuda_arch, programmatic_launch

    if not programmatic_launch(local_cuda_arch()):
        pytest.skip("the GPU has no programmatic dependent launch (sm_90+)")
    m = _lm(vocab=500, hidden=256, layers=2)
    early = compile_decoder(m.lstm, "cuda", 4, embedding=m.embedding, head=m.head, batch=2, generate_chunk=8)
    monkeypatch.setenv(names.ENV_CUDA_PDL, "0")
    plain = compile_decoder(m.lstm, "cuda", 4, embedding=m.embedding, head=m.head, batch=2, generate_chunk=8)
    prompt = torch.randint(0, 500, (2, 7), device="cuda")
    for sampling in MODES:
        got, logits = early.generate(prompt, 40, sampling, return_logits=True)
        want, want_logits = plain.generate(prompt, 40, sampling, return_logits=True)
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0)
        torch.testing.assert_close(logits.cpu(), want_logits.cpu(), rtol=0, atol=0)


def test_the_reference_weights_of_a_tiny_temperature_keep_the_best_logit_without_warnings():
    """``(l - max) / 5e-324`` overflows to -inf for every logit below the best (weight 0), which
    numpy warned of."""
    row = np.array([0.5, -1.0, 2.0, 2.0 - 2**-22], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights = sampling_weights(row, 5e-324, 0)
    np.testing.assert_array_equal(weights, [0.0, 0.0, 1.0, 0.0])
