"""Data-free weight quantizers: per-row scale / clipping search minimizing the weight MSE.

Every codebook of :class:`pbtvm.bitplane.BitplaneFormat` has a fitter here; each works on whole
``[N, K]`` matrices at once (vectorized over rows, in row chunks small enough that the ~140 passes
over each stay in the core's caches, the chunks on every thread: :func:`fit_threads`) and returns
integer codes plus per-row float parameters, the same whatever the chunks and threads.

* ``twos_complement`` (symmetric, ``w ~= s q``, ``|q| <= 2^(k-1) - 1``): the scale is searched over
  clip ratios ``r * max|w| / qmax`` for ``r`` in :data:`CLIP_RATIOS`, then refined by alternating
  rounding and the least-squares scale ``s = <w, q> / <q, q>``; the lowest-MSE scale per row wins.
* ``offset_binary`` (``w ~= s (q - z)``, ``q in 0..2^k-1``): the range ``[min, max]`` of each row
  is shrunk about its midpoint by each clip ratio, then refined by alternating rounding and the
  least-squares line fit ``w ~= s q + c`` (``z = -c / s``). For k = 1 the exact optimum is
  found instead: the best two-level quantizer of a row (1-D 2-means) from its sorted prefix sums,
  i.e. ``w ~= a (2q - 1) + m`` with a fitted offset ``m``.
* ``bipolar`` (``w ~= s (2q - 1)``): ``s = mean|w|``, already the least-squares optimum.

The ``"max"`` method keeps the original quantizer (``s = max|w| / qmax``, round to nearest) for
comparison; it takes no importance.

With ``importance`` (calibration, :func:`column_weights`) every error above is weighted per input,
the clip ratios scale both the whole row's range and that of its columns weighted at least 1 % of
the mean (never-active inputs then stop stretching it), and each row keeps the unweighted fit where
that one has the lower weighted error: calibration never does worse on the error it minimizes
(one dominant input once made the significant columns that input alone, whose range clipped every
other weight). Fitting then takes about 2-3x as long.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable

import numpy as np

from .errors import InputError
from .threads import physical_cores

__all__ = [
    "CLIP_RATIOS",
    "REFINE_STEPS",
    "each_chunk",
    "fit_bipolar",
    "fit_offset_binary",
    "fit_symmetric",
    "fit_two_level",
    "row_squared_errors",
]

#: Clip ratios tried per row (fractions of the row's max |w|, or of its half range).
CLIP_RATIOS = np.linspace(0.30, 1.0, 15)
#: Alternating round / least-squares refinement steps after the grid search.
REFINE_STEPS = 4
#: Offset binary keeps the centred zero point (symmetric grid, signs kept) unless a free zero point
#: lowers the row's squared error by more than this fraction (measured, BENCHMARKS.md issue 17).
CENTER_MARGIN = 0.05
#: Weights per row chunk (one row at least): each of the fit's ~140 passes over a chunk then reads
#: and writes ~1 MB float64 temporaries, which stay in the core's L2 / L3, instead of going to DRAM.
#: Chunks of 2^16-2^18 weights fitted equally fast on an AMD EPYC (2 MB L2), 2^14 slower (numpy's
#: cost per call), 2^24 (before) 3-6x slower (BENCHMARKS.md, forty-third session).
_CHUNK_ELEMS = 1 << 17
#: Weights from which a matrix is fitted in row chunks on several threads (:func:`fit_threads`): the
#: fit is most of a large model's compile time (~50-120 ns per weight per codebook on one core);
#: a 2048-4096-2048 MLP at W4 compiled in 8.8 s instead of 11.0 with the two codebooks on one
#: thread each (2 vCPUs, ``benchmarks/bench_compile.py``), and more cores now take part.
FIT_PARALLEL_MIN = 1 << 18


def _chunks(n: int, k: int, parts: int = 1) -> list[slice]:
    """Row slices of an ``[n, k]`` matrix: ``parts`` chunks or more (``n`` allowing), each of at
    most :data:`_CHUNK_ELEMS` weights or one row."""
    step = max(1, min(_CHUNK_ELEMS // max(k, 1), -(-n // parts)))
    return [slice(lo, min(n, lo + step)) for lo in range(0, n, step)]


def each_chunk(n: int, k: int, work: Callable[[slice], None]) -> None:
    """Call ``work(rows)`` on every row chunk (:func:`_chunks`) of an ``[n, k]`` matrix, on
    :func:`fit_threads` threads: a fit, or its error (:func:`row_squared_errors`).

    Each row's fit depends on that row alone (and on the shared column weights), so the chunks
    write disjoint rows and the result is that of one thread; numpy releases the GIL in the
    array work; an exception in a chunk is raised here. A thread pool per call: nothing is left
    running (or broken by a fork) after it.
    """
    threads = fit_threads(n * k)
    chunks = _chunks(n, k, threads)
    if threads == 1 or len(chunks) == 1:
        for rows in chunks:
            work(rows)
        return
    with concurrent.futures.ThreadPoolExecutor(min(threads, len(chunks)), thread_name_prefix="pbtvm-fit") as pool:
        for done in [pool.submit(work, rows) for rows in chunks]:
            done.result()


def fit_threads(elements: int) -> int:
    """Threads that fit a matrix of ``elements`` weights: one below :data:`FIT_PARALLEL_MIN`,
    else the threads pbtvm's kernels use (``TVM_NUM_THREADS``, :mod:`pbtvm.threads`)."""
    if elements < FIT_PARALLEL_MIN:
        return 1
    try:
        return max(1, int(os.environ.get("TVM_NUM_THREADS") or physical_cores()))
    except ValueError:
        return physical_cores()


def row_squared_errors(
    w: np.ndarray, approx_rows: Callable[[slice], np.ndarray], c: np.ndarray | None = None
) -> np.ndarray:
    """Per-row (weighted) squared error of an approximation of ``w``, in row chunks on every
    thread (:func:`each_chunk`): the whole-matrix float64 difference went to DRAM.

    Parameters
    ----------
    w : np.ndarray, float, [N, K]
    approx_rows : callable
        ``approx_rows(rows)``: the approximation of ``w[rows]``, float [len(rows), K].
    c : np.ndarray, float64, [K], optional
        Column weights (:func:`column_weights`); None: plain squared error.

    Returns
    -------
    np.ndarray, float64, [N]
        ``sum_k c_k (w_nk - approx_nk)^2``, each row's independent of the chunks.
    """
    n, k = w.shape
    errors = np.empty(n)

    def error_rows(rows: slice) -> None:
        errors[rows] = _sse(np.asarray(w[rows], np.float64), approx_rows(rows), c)

    each_chunk(n, k, error_rows)
    return errors


def _dot(a: np.ndarray, b: np.ndarray, c: np.ndarray | None) -> np.ndarray:
    """Row-wise ``sum_k c_k a_nk b_nk`` (``c`` None: unweighted)."""
    return np.einsum("nk,nk->n", a, b) if c is None else np.einsum("nk,nk,k->n", a, b, c)


def _sse(w: np.ndarray, approx: np.ndarray, c: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Row-wise (weighted) squared error of ``approx``; the difference is written to ``out`` (may
    be ``approx`` itself)."""
    d = np.subtract(w, approx, out=out)
    return _dot(d, d, c)


class _Scratch:
    """Two float64 buffers shaped like a row chunk, reused by every candidate of its fit: each
    candidate's fresh ~1 MB temporaries came from new pages (glibc hands freed blocks of that size
    back to the system), 1.5 million page faults in a 4096 x 4096 fit, 2-4x its time.

    Attributes
    ----------
    codes : np.ndarray, float64, [rows, K]
        A candidate's codes.
    diff : np.ndarray, float64, [rows, K]
        Its approximation of the weights, then their difference.
    """

    def __init__(self, w: np.ndarray) -> None:
        self.codes, self.diff = np.empty_like(w), np.empty_like(w)

    def keep_better(self, best_q: np.ndarray, better: np.ndarray) -> None:
        """Copy the rows of :attr:`codes` where ``better`` into ``best_q``."""
        np.copyto(best_q, self.codes, where=better[:, None])


def _clip_ranges(w: np.ndarray, c: np.ndarray | None) -> list[np.ndarray]:
    """The column sets whose range the clip search scales: all columns, and with error weights
    also the columns weighted at least 1 % of the mean, so never-active inputs do not stretch the
    range. Both are searched: when one input dominates the weights (its mean square 100 K times
    the others'), the significant columns are that input alone and its range clips every other."""
    if c is None:
        return [w]
    keep = c >= 1e-2
    return [w, w[:, keep]] if keep.any() and not keep.all() else [w]


def _clip_grid(n_ranges: int) -> list[tuple[int, float]]:
    """``(range index, r)`` for every clip ratio ``r`` of each of ``n_ranges`` ranges
    (:func:`_clip_ranges`), but the last range's ratio 1: the search's starting point."""
    return [(i, r) for i in range(n_ranges) for r in (CLIP_RATIOS[:-1] if i == n_ranges - 1 else CLIP_RATIOS)]


def column_weights(importance: np.ndarray | None, k: int) -> np.ndarray | None:
    """Validated per-input weights of the squared error (mean 1, strictly positive), or None.

    ``importance[k]`` is e.g. the mean of ``x_k^2`` over calibration data: the weighted squared
    error ``sum_k importance_k (w_nk - w'_nk)^2`` is then the expected squared output error of row
    ``n`` when inputs are uncorrelated. A floor of 1e-3 of the mean keeps never-active inputs
    representable.
    """
    if importance is None:
        return None
    c = np.asarray(importance, np.float64)
    if c.shape != (k,) or not np.all(np.isfinite(c)) or np.any(c < 0):
        raise InputError(f"importance must be {k} finite non-negative numbers, got shape {c.shape}")
    mean = c.mean()
    if mean <= 0:
        return None
    c = np.maximum(c / mean, 1e-3)
    return c / c.mean()


def fit_bipolar(w: np.ndarray, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``w ~= s (2q - 1)``; returns codes ``+-1`` int32 [N, K] and ``s = mean|w|`` float32 [N]
    (importance-weighted mean with ``importance``, see :func:`column_weights`)."""
    c = column_weights(importance, w.shape[1])
    # float64: a float32 sum of |w| overflows for finite rows near 1e37 (the scale came out inf)
    s = np.abs(w).mean(axis=1, dtype=np.float64) if c is None else np.abs(w).astype(np.float64) @ c / c.sum()
    return np.where(w >= 0, 1, -1).astype(np.int32), s.astype(np.float32)


def fit_symmetric(
    w: np.ndarray, qmax: int, method: str = "mse", importance: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric codes ``-qmax..qmax`` and per-row scales.

    Parameters
    ----------
    w : np.ndarray, float32, [N, K]
    qmax : int
        Largest code magnitude (``2^(k-1) - 1``).
    method : str
        ``"mse"`` (clip search + least-squares refinement) or ``"max"`` (``s = max|w| / qmax``).
    importance : np.ndarray, [K], optional
        Per-input weights of the squared error (:func:`column_weights`); None: plain MSE.

    Returns
    -------
    q : np.ndarray, int32, [N, K]
    scale : np.ndarray, float32, [N]
        ``w ~= q * scale[:, None]``; 0 for all-zero rows.
    """
    n, k = w.shape
    q = np.empty((n, k), np.int32)
    scale = np.empty(n, np.float32)
    c = column_weights(importance, k)
    c = c if method == "mse" else None  # "max": the row's full range, as without calibration

    def fit_rows(rows: slice) -> None:
        q[rows], scale[rows] = _fit_symmetric_rows(w[rows], qmax, method, c)

    each_chunk(n, k, fit_rows)
    return q, scale


def _round_sym(w: np.ndarray, s: np.ndarray, qmax: int, out: np.ndarray | None = None) -> np.ndarray:
    s = s.astype(np.float32)  # a scale below float32's smallest denormal is 0: the row's codes are 0
    safe = np.where(s > 0, s, np.float32(1.0))
    q = np.divide(w, safe[:, None], out=out)
    return np.clip(np.round(q, out=q), -qmax, qmax, out=q)


def _fit_symmetric_rows(w: np.ndarray, qmax: int, method: str, c: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    w = w.astype(np.float64)
    amaxes = [np.abs(cols).max(axis=1) for cols in _clip_ranges(w, c)]
    best_s = amaxes[-1] / qmax
    best_q = _round_sym(w, best_s, qmax)
    if method == "mse":
        scratch = _Scratch(w)
        best_e = _sse(w, np.multiply(best_q, best_s[:, None], out=scratch.diff), c, out=scratch.diff)

        def keep(s: np.ndarray) -> None:  # the codes of scale s are in scratch.codes
            nonlocal best_s, best_e
            e = _sse(w, np.multiply(scratch.codes, s[:, None], out=scratch.diff), c, out=scratch.diff)
            better = e < best_e
            best_e, best_s = np.where(better, e, best_e), np.where(better, s, best_s)
            scratch.keep_better(best_q, better)

        for i, r in _clip_grid(len(amaxes)):
            s = r * amaxes[i] / qmax
            _round_sym(w, s, qmax, out=scratch.codes)
            keep(s)
        for _ in range(REFINE_STEPS):  # least-squares scale for the best codes, re-round
            qq = _dot(best_q, best_q, c)
            s = np.where(qq > 0, _dot(w, best_q, c) / np.where(qq > 0, qq, 1), 0.0)
            _round_sym(w, s, qmax, out=scratch.codes)
            keep(s)
        if c is not None:  # never worse than the data-free fit on the weighted error
            q, s = _fit_symmetric_rows(w, qmax, method, None)
            scratch.codes[...] = q
            keep(s.astype(np.float64))
    return best_q.astype(np.int32), best_s.astype(np.float32)


def fit_offset_binary(
    w: np.ndarray, bits: int, method: str = "mse", importance: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Unsigned codes ``0..2^k-1`` with a per-row scale and zero point: ``w ~= s (q - z)``.

    Parameters
    ----------
    w : np.ndarray, float32, [N, K]
    bits : int
        k, 1..16.
    method : str
        ``"mse"`` (clip search + least-squares refinement; exact 2-means for k = 1) or ``"max"``
        (the full row range ``[min, max]`` split into ``2^k - 1`` steps).
    importance : np.ndarray, [K], optional
        Per-input weights of the squared error (:func:`column_weights`); None: plain MSE.

    Returns
    -------
    q : np.ndarray, int32, [N, K]
    params : np.ndarray, float32, [2, N]
        Row 0 the scales ``s``, row 1 the zero points ``z`` (float, in code units).
    """
    n, k = w.shape
    q = np.empty((n, k), np.int32)
    params = np.empty((2, n), np.float32)
    c = column_weights(importance, k)
    c = c if method == "mse" else None  # "max": the row's full range, as without calibration

    def fit_rows(rows: slice) -> None:
        if bits == 1 and method == "mse":
            q[rows], s, z = fit_two_level(w[rows], c)  # the exact optimum, weighted or not
        else:
            q[rows], s, z = _fit_offset_rows(w[rows], 2**bits - 1, method, c)
            if c is not None:  # never worse than the data-free fit on the weighted error
                q[rows], s, z = _lower_error(
                    w[rows], c, (q[rows], s, z), _fit_offset_rows(w[rows], 2**bits - 1, method)
                )
        params[0, rows], params[1, rows] = s, z

    each_chunk(n, k, fit_rows)
    return q, params


def _lower_error(w: np.ndarray, c: np.ndarray, fit: tuple, other: tuple) -> tuple:
    """Per row, whichever offset-binary fit ``(q [N, K], s [N], z [N])`` has the lower weighted
    squared error."""
    errors = [
        _sse(w.astype(np.float64), s[:, None].astype(np.float64) * (q - z[:, None]), c) for q, s, z in (fit, other)
    ]
    take = errors[1] < errors[0]
    return tuple(np.where(take[:, None] if a.ndim == 2 else take, b, a) for a, b in zip(fit, other, strict=True))


def _offset_codes(w: np.ndarray, lo: np.ndarray, s: np.ndarray, qmax: int, out: np.ndarray) -> np.ndarray:
    safe = np.where(s > 0, s, 1.0)
    q = np.divide(np.subtract(w, lo[:, None], out=out), safe[:, None], out=out)
    return np.clip(np.round(q, out=q), 0, qmax, out=q)


def _line_fit(w: np.ndarray, q: np.ndarray, c: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(Weighted) least-squares ``w ~= s q + lo`` per row; rows with constant codes keep ``s = 0``."""
    k = w.shape[1]
    if c is None:
        mq, mw = q.mean(axis=1), w.mean(axis=1)
    else:
        mq, mw = q @ c / k, w @ c / k  # c has mean 1
    var = _dot(q, q, c) / k - mq * mq
    cov = _dot(q, w, c) / k - mq * mw
    s = np.where(var > 1e-12, cov / np.where(var > 1e-12, var, 1), 0.0)
    return s, mw - s * mq


def _fit_offset_rows(
    w: np.ndarray, qmax: int, method: str, c: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    w64 = w.astype(np.float64)
    spans = [(cols.min(axis=1), cols.max(axis=1)) for cols in _clip_ranges(w64, c)]
    mids = [(hi + lo) / 2 for lo, hi in spans]
    halves = [(hi - lo) / 2 for lo, hi in spans]
    wmin, wmax = spans[-1]

    scratch = _Scratch(w64)

    def attempt(lo: np.ndarray, s: np.ndarray) -> np.ndarray:  # the codes in scratch.codes, the errors
        q = _offset_codes(w64, lo, s, qmax, out=scratch.codes)
        approx = np.add(lo[:, None], np.multiply(s[:, None], q, out=scratch.diff), out=scratch.diff)
        return _sse(w64, approx, c, out=scratch.diff)

    best_lo, best_s = wmin, (wmax - wmin) / qmax
    best_e = attempt(best_lo, best_s)
    best_q = scratch.codes.copy()
    if method == "mse":
        for i, r in _clip_grid(len(spans)):
            lo, s = mids[i] - r * halves[i], 2 * r * halves[i] / qmax
            e = attempt(lo, s)
            better = e < best_e
            best_lo, best_s, best_e = (np.where(better, a, b) for a, b in ((lo, best_lo), (s, best_s), (e, best_e)))
            scratch.keep_better(best_q, better)
        for _ in range(REFINE_STEPS):  # alternate: least-squares line for the codes, re-round
            s, lo = _line_fit(w64, best_q, c)
            s = np.maximum(s, 0)
            e = attempt(lo, s)
            better = (e < best_e) & (s > 0)
            best_lo, best_s, best_e = (np.where(better, a, b) for a, b in ((lo, best_lo), (s, best_s), (e, best_e)))
            scratch.keep_better(best_q, better)
        lo_c, s_c, e_c = _fit_centered_rows(w64, qmax, c, scratch)
        centred = ~(best_e < (1 - CENTER_MARGIN) * e_c)  # a free zero point must earn its keep
        best_lo, best_s = np.where(centred, lo_c, best_lo), np.where(centred, s_c, best_s)
        scratch.keep_better(best_q, centred)
    return _to_zero_point(best_q, best_lo, best_s)


def _fit_centered_rows(
    w: np.ndarray, qmax: int, c: np.ndarray | None, scratch: _Scratch
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offset binary with the zero point in the middle, ``z = qmax / 2``: a symmetric grid with no
    zero level (every weight keeps its sign; k = 2 gives ``s/2 * {-3, -1, 1, 3}``).

    Clip search over ``r * max|w|`` and least-squares scale refits, like :func:`fit_symmetric`.
    Returns ``(lo, s, sse)`` with ``w ~= lo + s q``, the codes ``q`` in ``scratch.codes``.
    """
    half = qmax / 2
    amaxes = [np.abs(cols).max(axis=1) for cols in _clip_ranges(w, c)]

    def attempt(s: np.ndarray) -> np.ndarray:  # the codes in scratch.codes, the errors
        safe = np.where(s > 0, s, 1.0)
        q = np.add(np.divide(w, safe[:, None], out=scratch.codes), half, out=scratch.codes)
        q = np.clip(np.round(q, out=q), 0, qmax, out=q)
        approx = np.multiply(s[:, None], np.subtract(q, half, out=scratch.diff), out=scratch.diff)
        return _sse(w, approx, c, out=scratch.diff)

    best_s = 2 * amaxes[-1] / qmax
    best_e = attempt(best_s)
    best_q = scratch.codes.copy()
    candidates = [2 * r * amaxes[i] / qmax for i, r in _clip_grid(len(amaxes))]
    for step in range(len(candidates) + REFINE_STEPS):
        if step < len(candidates):
            s = candidates[step]
        else:  # least-squares scale for the best codes so far
            d = np.subtract(best_q, half, out=scratch.diff)
            dd = _dot(d, d, c)
            s = np.where(dd > 0, _dot(w, d, c) / np.where(dd > 0, dd, 1), 0.0)
        e = attempt(s)
        better = (e < best_e) & (s > 0)
        best_e, best_s = np.where(better, e, best_e), np.where(better, s, best_s)
        scratch.keep_better(best_q, better)
    scratch.codes[...] = best_q
    return -best_s * half, best_s, best_e


def _to_zero_point(q: np.ndarray, lo: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``w ~= lo + s q`` -> ``s (q - z)`` with ``z = -lo / s``; a constant row ``lo`` gets ``q = 0``."""
    flat = s <= 0
    s_out = np.where(flat, np.abs(lo), s)
    z = np.where(s_out > 0, -lo / np.where(s_out > 0, s_out, 1), 0.0)
    q = np.where(flat[:, None], 0, q)
    return q.astype(np.int32), s_out.astype(np.float32), z.astype(np.float32)


def fit_two_level(w: np.ndarray, c: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact least-squares two-level quantizer per row (1-D 2-means): ``w ~= s (q - z)``, ``q in {0, 1}``.

    Sorting a row makes every candidate split a prefix; the split maximizing
    ``S_lo^2 / C_lo + S_hi^2 / C_hi`` (prefix sums ``S`` of ``c w`` and ``C`` of ``c``; ``c = 1``
    without column weights) minimizes the (weighted) squared error.

    Parameters
    ----------
    w : np.ndarray, float, [N, K]
    c : np.ndarray, float64, [K], optional
        Column weights from :func:`column_weights` (strictly positive).

    Returns
    -------
    q : np.ndarray, int32, [N, K]
    s, z : np.ndarray, float32, [N]
    """
    n, k = w.shape
    w64 = w.astype(np.float64)
    if k == 1:
        return _to_zero_point(np.zeros((n, 1)), w64[:, 0], np.zeros(n))
    order = np.argsort(w64, axis=1, kind="stable")
    srt = np.take_along_axis(w64, order, axis=1)
    cw = np.ones((n, k)) if c is None else c[order]
    s_lo = np.cumsum(cw * srt, axis=1)[:, :-1]
    c_lo = np.cumsum(cw, axis=1)[:, :-1]
    s_tot = (cw * srt).sum(axis=1, keepdims=True)
    c_tot = cw.sum(axis=1, keepdims=True)
    gain = s_lo**2 / c_lo + (s_tot - s_lo) ** 2 / (c_tot - c_lo)
    split = np.argmax(gain, axis=1) + 1
    thresh = srt[np.arange(n), split]
    q = (w64 >= thresh[:, None]).astype(np.float64)
    cc = np.ones(k) if c is None else c
    c_hi = q @ cc
    hi = (q * w64) @ cc / np.maximum(c_hi, 1e-300)
    lo = (w64 @ cc - hi * c_hi) / np.maximum(cc.sum() - c_hi, 1e-300)
    const = q.sum(axis=1) >= k  # ties made every element "high": a constant row
    lo = np.where(const, hi, lo)
    return _to_zero_point(q, lo, np.where(const, 0.0, hi - lo))
