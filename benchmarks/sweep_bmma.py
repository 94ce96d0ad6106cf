"""Sweep the BMMA kernel's configs (``BMMAConfig``) per layer shape, bits and batch on one GPU.

For every point (shape NxK, W bits, batch) the configs of ``config_space`` are thinned to at most
``--max-configs`` (:func:`pick_configs`: the default first, then spread over the knobs), every
kernel of the run is built first in ``--jobs`` processes (``parallel_build.py``, through
``bench_bmma.py``'s builders: a kernel has a symbolic batch, so points that share a config share
its kernel), then each is timed alone (the "kernel" column of ``bench_bmma.py``: the median of
CUDA-graph replays in which each call reads another weight set, the sets exceeding twice the L2;
helpers of ``bench_layers.py``). Before it is timed, each kernel's output is compared with the
default's on the same inputs (``rel_err``; the integer product makes them agree to rounding): a
config that disagrees is reported and never ranked best. The default and the best ``--top``
configs are then timed again ``--confirm`` times, interleaved, and ranked by the median of their
times. Every timing is a CSV row, written as it is measured.

    python benchmarks/sweep_bmma.py --csv out/bmma_sweep.csv --time-limit 240      # the default grid
    python benchmarks/sweep_bmma.py --csv out/bmma_sweep.csv --time-limit 240 --max-configs 48 --register-budget 200
    python benchmarks/sweep_bmma.py --shapes 4096x4096 --batches 64 --max-configs 0  # every config
    python benchmarks/sweep_bmma.py --dry-run --shapes 4096x4096 --batches 1 64 --max-configs 6

The default grid (2 shapes x 4 batches, W4, 40 configs a point) is 142 kernels: batches 8, 16 and
64 have the same space, so they share them. ``--register-budget 200`` adds the largest block
tiles (``tiles_m`` 4 x ``tiles_n`` 4, 2 x 8: 192 fragment bytes per MMA against the batch-1
shape's 384; the fastest at batch 16-64 on the H200, BENCHMARKS.md, and the defaults there since),
which ``config_space``'s register estimate (128) leaves out. ``--dry-run`` of that grid (nvcc 13,
sm_90): 3 of its 174 kernels spilled a little, 11008x4096 ``m4 w2 k2 l1 n4`` (12 LDL/STL, the same
config at 4096x4096 none) and 4096x4096 ``m4 w1 k8 l1/l2 n1`` (2 each, in ``config_space``); they
are timed like the others.

``--dry-run`` needs no GPU: it builds every kernel for sm_90 and checks its SASS with nvcc
(``bench_bmma.check_kernel``: BMMA present, no register spills) and stops.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import astuple, dataclass, fields

import torch
import tvm_ffi
from bench_bmma import MMA, build_kernels, packed_inputs, weight_set
from bench_layers import append_csv_row, graph_time, n_sets_for
from parallel_build import default_workers

from pbtvm import bitplane as bp
from pbtvm.schedules.cuda_bmma import REGISTER_BUDGET, config_space, default_config, knob_grid
from pbtvm.schedules.cuda_bmma_kernel import BMMAConfig, config_problem, registers
from pbtvm.target import resolve_target

#: Knob names, in :class:`BMMAConfig` order (CSV columns).
KNOBS = tuple(f.name for f in fields(BMMAConfig))
#: Largest ``max|y - y_default| / max|y_default|`` at which a config counts as agreeing with the default.
REL_TOL = 1e-5
#: Seconds a kernel takes to build in one process on the 16-core H200 host (the first
#: ``bench_bmma.py`` run there: 101 kernels in 16 s on 15 processes), for the up-front estimate.
BUILD_S_PER_KERNEL = 2.5
#: Seconds before the first build finishes (spawned interpreters importing pbtvm and TVM).
BUILD_START_S = 6


@dataclass(frozen=True)
class Point:
    """One layer shape, weight bits and batch the sweep times configs at."""

    n: int
    k: int
    bits: int
    batch: int

    @property
    def shape(self) -> str:
        """``"NxK"``."""
        return f"{self.n}x{self.k}"

    @property
    def fmt(self) -> bp.BitplaneFormat:
        """The layer's format: W ``bits``, A8, weights in the ``mma16x256`` layout."""
        return bp.BitplaneFormat(self.bits, 8, layout=MMA)

    def __str__(self) -> str:
        return f"{self.shape} W{self.bits}A8 b={self.batch}"


def points_of(shapes: list[str], bits: list[int], batches: list[int]) -> list[Point]:
    """Every (shape, bits, batch) of the command line, shapes outermost.

    Parameters
    ----------
    shapes : list of str
        ``"NxK"`` (out x in).
    bits, batches : list of int
        Weight bits and batch sizes.

    Returns
    -------
    list of Point
    """
    out = []
    for shape in shapes:
        n, k = (int(v) for v in shape.lower().split("x"))
        out += [Point(n, k, w, b) for w in bits for b in batches]
    return out


def space_of(point: Point, register_budget: int | None = None) -> list[BMMAConfig]:
    """The configs a point can use.

    Parameters
    ----------
    point : Point
    register_budget : int, optional
        None: ``config_space`` as the tuner sees it (registers within
        :data:`~pbtvm.schedules.cuda_bmma.REGISTER_BUDGET`). A number: the same filter with this
        budget instead, to reach tiles the budget leaves out (``--dry-run`` says
        whether ptxas spills them).

    Returns
    -------
    list of BMMAConfig
    """
    fmt, n, k = point.fmt, point.n, point.k
    if register_budget is None:
        return config_space(fmt, n, k, point.batch)
    _, row_tiles, k_tiles, *_ = fmt.weight_shape(n, k)
    return [
        cfg
        for cfg in knob_grid(fmt, row_tiles, k_tiles, point.batch)
        if not config_problem(fmt, k, cfg) and registers(fmt, k, cfg) <= register_budget
    ]


def bytes_per_mma(cfg: BMMAConfig) -> float:
    """Fragment bytes a warp loads per MMA: a 512-byte weight tile feeds ``tiles_n`` MMAs, a
    256-byte activation tile ``tiles_m`` (the L2 traffic model that orders :func:`pick_configs`)."""
    return 512 / cfg.tiles_n + 256 / cfg.tiles_m


def pick_configs(space: list[BMMAConfig], default: BMMAConfig, max_configs: int) -> list[BMMAConfig]:
    """At most ``max_configs`` configs of ``space``, the default first; deterministic.

    The rule: configs are grouped by their block shape (``tiles_m``, ``tiles_n``, ``warps_m``);
    within a group they are ordered by their distance from the default's (``k_split``,
    ``loads``) (sum of the log2 differences; ties: larger ``k_split``, then larger ``loads``).
    Picks go round-robin over the groups: the first round takes every group's nearest config (the
    default stands for its own group), the next round every group's second, and so on. Groups
    are visited in order of :func:`bytes_per_mma` (fewest first; then more ``warps_m``, whose
    warps share activation fragments in L1), so when the budget ends inside a round the
    block shapes the traffic model favours got the extra ``k_split`` / ``loads`` variety.

    Parameters
    ----------
    space : list of BMMAConfig
        The point's configs (:func:`space_of`).
    default : BMMAConfig
        ``default_config`` of the point; picked first even when ``space`` lacks it.
    max_configs : int
        The most configs to return; 0 or less: all of ``space``.

    Returns
    -------
    list of BMMAConfig
        The default, then the picks in the order they were made.
    """
    rest = [c for c in space if c != default]
    if max_configs <= 0 or len(rest) < max_configs:
        return [default, *rest]

    def primary(c: BMMAConfig) -> tuple[int, int, int]:
        return (c.tiles_m, c.tiles_n, c.warps_m)

    def distance(c: BMMAConfig) -> tuple[float, int, int]:
        d = abs(math.log2(c.k_split / default.k_split)) + abs(math.log2(c.loads / default.loads))
        return (d, -c.k_split, -c.loads)

    groups: dict[tuple[int, int, int], list[BMMAConfig]] = {}
    for c in rest:
        groups.setdefault(primary(c), []).append(c)
    for members in groups.values():
        members.sort(key=distance)
    order = sorted(groups, key=lambda g: (bytes_per_mma(groups[g][0]), -g[2], g))
    taken = dict.fromkeys(groups, 0)
    if primary(default) in taken:
        taken[primary(default)] = 1
    picked = [default]
    for rnd in range(1, len(rest) + 2):
        for g in order:
            if len(picked) >= max_configs:
                return picked
            if taken[g] < rnd and groups[g]:
                picked.append(groups[g].pop(0))
                taken[g] += 1
    return picked


def plan(args: argparse.Namespace) -> tuple[list[Point], dict[Point, list[BMMAConfig]], list[tuple]]:
    """The points, the configs each times (the default first) and the kernels to build, once each.

    Returns
    -------
    points : list of Point
    configs : dict
        ``{point: [config, ...]}``.
    keys : list of tuple
        ``("bmma", N, K, bits, config)``, the keys of ``bench_bmma.build_kernel``.
    """
    points = points_of(args.shapes, args.bits, args.batches)
    configs, keys = {}, {}
    for p in points:
        default = default_config(p.fmt, p.n, p.k, p.batch)
        configs[p] = pick_configs(space_of(p, args.register_budget), default, args.max_configs)
        keys.update({("bmma", p.n, p.k, p.bits, cfg): None for cfg in configs[p]})
    return points, configs, list(keys)


def print_plan(points: list[Point], configs: dict, keys: list[tuple], jobs: int) -> None:
    """Points, configs per point and kernels to build, with the build time expected on the GPU host."""
    total = sum(len(c) for c in configs.values())
    est = BUILD_START_S + math.ceil(len(keys) / max(jobs, 1)) * BUILD_S_PER_KERNEL
    print(
        f"{len(points)} points, {total} (point, config) timings, {len(keys)} distinct kernels to build "
        f"in {jobs} processes (~{est:.0f} s at {BUILD_S_PER_KERNEL} s a kernel, as on the 16-core H200 host)",
        flush=True,
    )
    for p in points:
        print(f"  {p}: {len(configs[p])} configs", flush=True)


def dry_run(args: argparse.Namespace) -> int:
    """Build every kernel of the sweep for sm_90 without a device and check its SASS (nvcc).

    Returns
    -------
    int
        0 if every kernel has BMMA and no spills, else 1 (the configs are listed).
    """
    t0 = time.time()
    points, configs, keys = plan(args)
    print_plan(points, configs, keys, args.jobs)
    problems = build_kernels(keys, resolve_target({"kind": "cuda", "arch": "sm_90"}), args.jobs, check=True)
    bad = {key: p for key, p in problems.items() if p}
    print(f"dry run: {len(keys)} kernels built for sm_90 and checked with nvcc in {time.time() - t0:.0f}s")
    for key, problem in bad.items():
        print(f"  {problem}: {key}", file=sys.stderr)
    if not bad:
        print("  no config lacks BMMA or spills")
    return 1 if bad else 0


class Bench:
    """A point's buffers on the device (weight sets rotated past the L2) and its default's output.

    The inputs are those of ``bench_bmma.bench_bmma(..., part="gemm")`` (``weight_set``,
    ``packed_inputs``): random packed activation planes, scales and weights, zero row sums.
    """

    def __init__(self, point: Point, l2: int):
        fmt, n, k, batch = point.fmt, point.n, point.k, point.batch
        self.bits = point.bits
        self.sets = n_sets_for(4 * math.prod(fmt.weight_shape(n, k)), l2)
        self.ws = [weight_set(fmt, n, k) for _ in range(self.sets)]
        self.xp, self.sx, self.rs, self.y = packed_inputs(fmt, n, k, batch)
        self.reference: torch.Tensor | None = None

    def output(self, dense) -> torch.Tensor:
        """``dense``'s output for weight set 0 (``y`` is filled with NaN first: unwritten outputs show)."""
        self.y.fill_(float("nan"))
        w, s, b = self.ws[0]
        with tvm_ffi.use_torch_stream():  # on torch's stream, after the fill (as graph_time launches)
            dense(self.xp, self.sx, self.rs, w, s, b, self.bits, self.y)
        torch.cuda.synchronize()
        return self.y.clone()

    def rel_err(self, dense) -> float:
        """``max|y - y_default| / max|y_default|`` (the first kernel checked is the default: 0)."""
        y = self.output(dense)
        if self.reference is None:
            self.reference = y
        diff = (y - self.reference).abs().max().item()
        scale = self.reference.abs().max().item()
        return diff / scale if scale and math.isfinite(scale) else float("nan")

    def time(self, dense) -> float:
        """Seconds per call of ``dense`` (:func:`bench_layers.graph_time`)."""

        def step(i: int) -> None:
            w, s, b = self.ws[i]
            dense(self.xp, self.sx, self.rs, w, s, b, self.bits, self.y)

        return graph_time(step, self.sets)


#: Short names of the knobs in the printed lines (``m1 w2 k8 l2 n4``).
SHORT = {"tiles_m": "m", "warps_m": "w", "k_split": "k", "loads": "l", "tiles_n": "n"}


def fmt_cfg(cfg: BMMAConfig) -> str:
    """A config in a few characters: ``m1 w2 k8 l2 n4`` (tiles_m, warps_m, k_split, loads, tiles_n)."""
    return " ".join(f"{SHORT[name]}{v}" for name, v in zip(KNOBS, astuple(cfg), strict=True))


class Sweep:
    """The timing loop: rows to the CSV as they come, a summary per point, the time limit."""

    def __init__(self, args: argparse.Namespace, built: dict, l2: int, t0: float):
        self.args, self.built, self.l2, self.t0 = args, built, l2, t0
        self.rows = 0
        self.summaries: list[dict] = []

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.time() - self.t0

    def out_of_time(self) -> bool:
        """Whether ``--time-limit`` has passed."""
        return bool(self.args.time_limit) and self.elapsed() > self.args.time_limit

    def record(self, p: Point, cfg: BMMAConfig, default: BMMAConfig, rnd: int, us: float | None, err, error=""):
        """One CSV row (flushed: a killed run keeps it)."""
        self.rows += 1
        if not self.args.csv:
            return
        row = {"shape": p.shape, "bits": p.bits, "batch": p.batch, **dict(zip(KNOBS, astuple(cfg), strict=True))}
        row |= {"threads": cfg.threads, "us": us, "is_default": int(cfg == default), "round": rnd}
        row |= {"rel_err": err, "error": error}
        append_csv_row(self.args.csv, row, first=self.rows == 1)

    def point(self, p: Point, cfgs: list[BMMAConfig]) -> None:
        """Check and time every config of ``p`` (the default first), confirm the best, print the summary."""
        default = cfgs[0]
        bench = Bench(p, self.l2)
        times: dict[BMMAConfig, list[float]] = {}
        errs: dict[BMMAConfig, float] = {}
        failed: list[BMMAConfig] = []
        print(f"{p}: {len(cfgs)} configs, {bench.sets} weight sets  [{self.elapsed():.0f}s]", flush=True)
        for i, cfg in enumerate(cfgs):
            if self.out_of_time():
                print(f"  --time-limit {self.args.time_limit}s reached: {len(cfgs) - i} configs left untimed")
                break
            dense = self.built["bmma", p.n, p.k, p.bits, cfg]
            try:
                errs[cfg] = bench.rel_err(dense)
                us = bench.time(dense) * 1e6
            except Exception as err:  # a config that fails at run time is reported, not fatal
                msg = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                print(f"  {fmt_cfg(cfg)}  FAILED {msg}", flush=True)
                self.record(p, cfg, default, 0, None, errs.get(cfg), msg)
                failed.append(cfg)
                continue
            times[cfg] = [us]
            self.record(p, cfg, default, 0, us, errs[cfg])
            flag = "  DIFFERS from the default" if not errs[cfg] <= REL_TOL else ""
            tag = "  (default)" if cfg == default else ""
            print(f"  {fmt_cfg(cfg)}  {us:8.2f} us{tag}{flag}  [{self.elapsed():.0f}s]", flush=True)
        ok = {c: t for c, t in times.items() if errs[c] <= REL_TOL}
        if ok and self.args.confirm > 0 and not self.out_of_time():
            again = sorted(ok, key=lambda c: ok[c][0])[: self.args.top]
            again += [default] if default in ok and default not in again else []
            for rnd in range(1, self.args.confirm + 1):
                for cfg in again:
                    us = bench.time(self.built["bmma", p.n, p.k, p.bits, cfg]) * 1e6
                    ok[cfg].append(us)
                    self.record(p, cfg, default, rnd, us, errs[cfg])
            print(f"  re-timed the best {len(again)} {self.args.confirm}x, interleaved  [{self.elapsed():.0f}s]")
        self.summarize(p, cfgs, default, ok, errs, failed)
        del bench
        torch.cuda.empty_cache()

    def summarize(self, p: Point, cfgs: list, default: BMMAConfig, ok: dict, errs: dict, failed: list) -> None:
        """Print the point's default, best and top configs (median over rounds) and keep them;
        list the configs that failed or disagree with the default."""
        med = {c: statistics.median(t) for c, t in ok.items()}
        ranked = sorted(med, key=med.get)
        wrong = [c for c in errs if not errs[c] <= REL_TOL]
        s = {"point": p, "default": default, "default_us": med.get(default), "ranked": ranked, "med": med}
        self.summaries.append(s)
        tried = len(errs) + len([c for c in failed if c not in errs])
        partial = f" (partial: {tried}/{len(cfgs)} configs)" if tried < len(cfgs) else ""
        if ranked:
            best, d_us = ranked[0], med.get(default)
            speed = f"{d_us / med[best]:.2f}x" if d_us else "n/a"
            d_txt = f"{d_us:.2f} us" if d_us else "n/a"
            print(
                f"  => {p}{partial}: default {fmt_cfg(default)} {d_txt}; "
                f"best {fmt_cfg(best)} {med[best]:.2f} us ({speed})"
            )
            print("     top: " + "; ".join(f"{fmt_cfg(c)} {med[c]:.2f}" for c in ranked[: self.args.top]))
        else:
            print(f"  => {p}{partial}: nothing timed")
        for c in wrong:
            print(f"     DIFFERS from the default (rel err {errs[c]:.2g}): {c}", file=sys.stderr)
        for c in failed:
            print(f"     FAILED: {c}", file=sys.stderr)

    def print_table(self) -> None:
        """The Markdown summary of every point timed (speedup > 1: the best beats the default)."""
        print("\n| shape (NxK) | W | batch | default config | default µs | best config | best µs | speedup | top 3 |")
        print("|---" * 9 + "|")
        for s in self.summaries:
            p, ranked, med, d_us = s["point"], s["ranked"], s["med"], s["default_us"]
            if not ranked:
                print(f"| {p.shape} | {p.bits} | {p.batch} | {fmt_cfg(s['default'])} | n/a | | n/a | n/a | |")
                continue
            best = ranked[0]
            top = ", ".join(f"{fmt_cfg(c)} ({med[c]:.1f})" for c in ranked[:3])
            d_cfg = fmt_cfg(s["default"])
            d_txt, speed = (f"{d_us:.1f}", f"{d_us / med[best]:.2f}") if d_us else ("n/a", "n/a")
            print(
                f"| {p.shape} | {p.bits} | {p.batch} | {d_cfg} | {d_txt} | {fmt_cfg(best)} | {med[best]:.1f} | "
                f"{speed} | {top} |"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096"], help="NxK (out x in)")
    ap.add_argument("--bits", nargs="+", type=int, default=[4], help="weight bits (activations: 8)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16, 64])
    ap.add_argument(
        "--max-configs", type=int, default=40, help="configs per point, the default included (0: every config)"
    )
    ap.add_argument(
        "--register-budget",
        type=int,
        default=None,
        help=f"widen the space to configs whose register estimate is within this (config_space: {REGISTER_BUDGET})",
    )
    ap.add_argument("--csv", default=None, help="every timing, a row each, written as measured")
    ap.add_argument(
        "--time-limit", type=float, default=0, help="seconds (from the start) after which nothing new is timed"
    )
    ap.add_argument("--confirm", type=int, default=2, help="rounds that re-time the default and the --top best")
    ap.add_argument("--top", type=int, default=3, help="configs listed (and re-timed) per point")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: build every kernel for sm_90, check its SASS, stop")
    ap.add_argument(
        "--jobs", type=int, default=default_workers(), help="processes that build the kernels (default: cores - 1)"
    )
    args = ap.parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        print("no CUDA device: this sweep needs a GPU (--dry-run builds the kernels without one)", file=sys.stderr)
        return 2
    t0 = time.time()
    points, configs, keys = plan(args)
    print_plan(points, configs, keys, args.jobs)
    built = {key: ex for (key, _), ex in build_kernels(keys, resolve_target("cuda"), args.jobs).items()}
    props = torch.cuda.get_device_properties(0)
    print(f"built in {time.time() - t0:.0f}s; device {props.name}, L2 {props.L2_cache_size / 1e6:.0f} MB", flush=True)
    sweep = Sweep(args, built, props.L2_cache_size, t0)
    for i, p in enumerate(points):
        if sweep.out_of_time():
            print(f"--time-limit {args.time_limit}s reached: {len(points) - i} points left untimed", flush=True)
            break
        sweep.point(p, configs[p])
    sweep.print_table()
    print(f"done in {sweep.elapsed():.0f}s, {sweep.rows} rows" + (f" in {args.csv}" if args.csv else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
