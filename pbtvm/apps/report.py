"""Accuracy / latency trade-off report: sweeps, a table and a Pareto plot (``pbtvm eval``).

The sweep axes are the weight bitwidth (one compile each), the run-time ``bitlayers`` knob
(one compiled model, no recompilation) and optionally act_bits; every point is measured:
held-out accuracy and the median batch-1 latency of the compiled model.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

BASELINE = "fp32 (torch)"


def _progress(items: list, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, leave=False, disable=None)  # None: a bar only on a terminal
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return items


def median_latency_ms(fn: Any, x: Any, repeat: int, sync: Any = None) -> float:
    """Median wall time of ``fn(x)`` in ms over ``repeat`` calls after one warm-up call.

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called inside the timed region for devices
    that run asynchronously.
    """
    fn(x)
    return 1e3 * float(np.median(_timed_calls(fn, x, repeat, sync)))


def _timed_calls(fn: Any, x: Any, count: int, sync: Any = None) -> list[float]:
    """Wall seconds of each of ``count`` calls ``fn(x)`` (``sync()`` inside the timed region)."""
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        fn(x)
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
    return times


def plausible_speedup(bits: int) -> float:
    """The largest PB-vs-torch-fp32 speed-up ``pbtvm bench`` shows without a warning: twice what
    reading ``bits``-bit instead of 32-bit weights explains (``32 / bits``), and at least 16x (torch's
    per-call overhead on tiny models). Past it torch was slowed by something else: on a busy 2-vCPU
    guest torch fp32 took 16 ms per call where it takes 0.02, and bench printed '571x faster'."""
    return max(16.0, 64.0 / bits)


#: Between-round spread (slowest / fastest round median) past which a latency is flagged.
UNSTABLE_SPREAD = 1.5
#: Rounds of :func:`interleaved_latency_ms`.
LATENCY_ROUNDS = 5


def calls_per_round(repeat: int, rounds: int = LATENCY_ROUNDS) -> int:
    """Timed calls per entry and round of :func:`interleaved_latency_ms` for ``repeat`` calls in
    all: ``ceil(repeat / rounds)``, at least 2."""
    return max(2, -(-repeat // rounds))


def interleaved_latency_ms(calls: dict, repeat: int, sync: Any = None, rounds: int = LATENCY_ROUNDS) -> dict:
    """Median wall time in ms of each ``fn(x)`` in ``calls`` (``{name: (fn, x)}``), timed in
    ``rounds`` rounds that take turns (each round :func:`calls_per_round` calls per entry, after
    one untimed call), so that a change of the machine's state hits every entry alike.

    Returns ``{name: (median over all calls, fastest round's median, slowest round's median)}``:
    a slowest round :data:`UNSTABLE_SPREAD` times the fastest or more means the machine was busy
    or thread pools contended while measuring.
    """
    per_round = calls_per_round(repeat, rounds)
    times = {name: [] for name in calls}
    medians = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (fn, x) in calls.items():
            fn(x)
            if sync is not None:
                sync()
            batch = _timed_calls(fn, x, per_round, sync)
            times[name] += batch
            medians[name].append(float(np.median(batch)))
    return {
        name: (1e3 * float(np.median(times[name])), 1e3 * min(medians[name]), 1e3 * max(medians[name]))
        for name in calls
    }


#: Weight bits of the models of the act_bits sweep.
ACT_SWEEP_BITS = 4


def evaluate_tradeoffs(
    bits: list[int],
    act_bits_sweep: list[int] = (),
    knob: bool = True,
    target: Any = "llvm",
    repeat: int = 30,
    codebook: str = "auto",
) -> list[dict]:
    """Train the MNIST MLP once, compile it at every setting, measure accuracy and latency.

    Parameters
    ----------
    bits : list of int
        Weight bitwidths (act_bits 8).
    act_bits_sweep : list of int
        Activation bitwidths to try at W4 (empty: none).
    knob : bool
        Also sweep ``bitlayers`` 1..max(bits) on the widest model.
    target : str or dict
        Where the compiled models run (latency is measured there).
    repeat : int
        Timed batch-1 calls per point (median).
    codebook : str
        Weight codebook of every compiled model (``pbtvm.compile``'s: ``"auto"`` picks per layer).
        The knob series depends on it: offset binary's top plane splits each row's range at its
        middle, not at zero, so at ``bitlayers=1`` the weights between zero and that middle take
        the wrong sign (two's complement's top plane is the sign plane).

    Returns
    -------
    list of dict
        One row per point: ``series``, ``config``, ``bits``, ``bitlayers``, ``act_bits``,
        ``codebook`` (what the model uses: a name, ``"per layer"`` or ``""`` for fp32),
        ``accuracy`` (%), ``latency_ms``.
    """
    import torch

    import pbtvm

    from ..target import TargetInfo, resolve_target
    from .examples import accuracy, builtin_mnist_mlp, torch_accuracy

    if not bits:
        raise InputError("give at least one weight bitwidth")
    conflict = codebook_conflict(codebook, bits, act_bits_sweep)  # before training or compiling anything
    if conflict:
        width, problem = conflict
        sweep = "" if width in bits else f" (the act_bits sweep's models are W{ACT_SWEEP_BITS})"
        raise InputError(f"codebook {codebook!r}: {problem}{sweep}")
    target = resolve_target(target)
    cuda = TargetInfo.of(target).device == "cuda"
    if cuda and not torch.cuda.is_available():  # before training or compiling anything
        raise InputError("eval on a CUDA target runs the models, so it needs a CUDA GPU, and torch sees none")
    dev, sync = ("cuda", torch.cuda.synchronize) if cuda else ("cpu", None)
    model, split = builtin_mnist_mlp()
    example = (torch.from_numpy(split.x_train[:2]),)
    x1 = torch.from_numpy(split.x_test[:1]).to(dev)  # latency: input and output on the model's device
    rows = []
    with torch.no_grad():
        fp32_ms = median_latency_ms(copy.deepcopy(model).to(dev), x1, repeat, sync)
    rows.append(
        {
            "series": BASELINE,
            "config": "fp32",
            "bits": 32,
            "bitlayers": None,
            "act_bits": 32,
            "codebook": "",
            "accuracy": torch_accuracy(model, split.x_test, split.y_test),
            "latency_ms": fp32_ms,
        }
    )
    compiled = {}
    for b in _progress(sorted(bits), "weight bits"):
        m = pbtvm.compile(model, example, target=target, bits=b, act_bits=8, codebook=codebook)
        compiled[b] = m
        rows.append(
            {
                "series": "weight bits (A8)",
                "config": f"W{b}A8",
                "bits": b,
                "bitlayers": b,
                "act_bits": 8,
                "codebook": model_codebook(m),
                "accuracy": accuracy(m, split.x_test, split.y_test),
                "latency_ms": median_latency_ms(m, x1, repeat, sync),
            }
        )
    top = max(bits)
    if knob and top > 1:
        m = compiled[top]
        for layers in _progress(list(range(1, top)), "bitlayers"):

            def fn(x, n=layers):
                return m(x, bitlayers=n)

            rows.append(
                {
                    "series": f"run-time bitlayers (W{top} model)",
                    "config": f"W{top}A8 L={layers}",
                    "bits": top,
                    "bitlayers": layers,
                    "act_bits": 8,
                    "codebook": model_codebook(m),
                    "accuracy": accuracy(fn, split.x_test, split.y_test),
                    "latency_ms": median_latency_ms(fn, x1, repeat, sync),
                }
            )
    for a in _progress(list(act_bits_sweep), "act bits"):
        if a == 8 and ACT_SWEEP_BITS in bits:
            continue  # W4A8 is already a point of the weight-bits series: one model, one point
        m = pbtvm.compile(model, example, target=target, bits=ACT_SWEEP_BITS, act_bits=a, codebook=codebook)
        rows.append(
            {
                "series": f"activation bits (W{ACT_SWEEP_BITS})",
                "config": f"W{ACT_SWEEP_BITS}A{a}",
                "bits": ACT_SWEEP_BITS,
                "bitlayers": ACT_SWEEP_BITS,
                "act_bits": a,
                "codebook": model_codebook(m),
                "accuracy": accuracy(m, split.x_test, split.y_test),
                "latency_ms": median_latency_ms(m, x1, repeat, sync),
            }
        )
    return rows


def codebook_conflict(codebook: str, bits: list[int], act_bits_sweep: list[int] = ()) -> tuple[int, str] | None:
    """The first weight width :func:`evaluate_tradeoffs` would compile that ``codebook`` has no code
    for, and why (``(width, message)``); None when every model can use it."""
    from ..quantize import check_codebook

    for width in sorted(set(bits) | ({ACT_SWEEP_BITS} if act_bits_sweep else set())):
        try:
            check_codebook(codebook, width)
        except InputError as err:
            return width, str(err)
    return None


def model_codebook(model: Any) -> str:
    """The compiled model's weight codebook for a table: its name, or ``"per layer"``."""
    from ..runtime import codebook_text

    return codebook_text(model.manifest).removeprefix("codebook ")


def pareto_front(rows: list[dict]) -> list[dict]:
    """Points no other point beats on both latency (lower) and accuracy (higher), by latency."""
    front = []
    for r in sorted(rows, key=lambda r: (r["latency_ms"], -r["accuracy"])):
        if not front or r["accuracy"] > front[-1]["accuracy"]:
            front.append(r)
    return front


#: What ``write_table`` writes, by the file's suffix (any case; none: Markdown).
TABLE_KINDS = {"": "markdown", ".md": "markdown", ".markdown": "markdown", ".txt": "markdown", ".csv": "csv"}


def table_kind(path: str) -> str | None:
    """``"csv"`` or ``"markdown"`` for a table file name (by its suffix, any case), None for
    another suffix."""
    return TABLE_KINDS.get(Path(path).suffix.lower())


def write_table(rows: list[dict], path: str | None = None) -> str:
    """Markdown table of the rows (returned); also written to ``path`` (.md / .txt, or .csv:
    :func:`table_kind`)."""
    lines = ["| config | series | codebook | accuracy % | latency ms (batch 1) |", "|---|---|---|---|---|"]
    for r in rows:
        codebook = r.get("codebook", "")
        lines.append(f"| {r['config']} | {r['series']} | {codebook} | {r['accuracy']:.1f} | {r['latency_ms']:.3f} |")
    text = "\n".join(lines)
    if path:
        if table_kind(path) == "csv":
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(key for r in rows for key in r)))
            writer.writeheader()
            writer.writerows(rows)
            Path(path).write_text(buf.getvalue())
        else:
            Path(path).write_text(text + "\n")
    return text


#: Label offsets (points) tried in order until a label overlaps no other label and no marker.
_LABEL_OFFSETS = [(5, 3), (5, -9), (-5, 3), (-5, -9), (0, 9), (0, -14), (10, 12), (-10, 12), (10, -18), (-10, -18)]
#: Markers closer than this (display pixels, both axes) share one label.
_SAME_PLACE_PX = 9.0
#: Points more than this many accuracy points below the best are drawn on the lower edge of the
#: plot (a down-pointing marker, the accuracy in the label): one broken setting (bitlayers=1)
#: would otherwise squeeze every other point into a line.
FAR_BELOW_POINTS = 10.0


def _merged_label(configs: list[str]) -> str:
    """One label for configs at one place: ``W8A8 L=3,5,6`` for run-time settings of one model."""
    parts: dict[str, list[str]] = {}
    for config in configs:
        base, _, layers = config.partition(" L=")
        parts.setdefault(base, []).append(layers)
    out = []
    for base, layers in parts.items():
        named = sorted((n for n in layers if n), key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
        if len(named) < len(layers):
            out.append(base)
        if named:
            out.append(f"{base} L={','.join(named)}")
    return ", ".join(out)


def _label_points(fig: Any, ax: Any, points: list[tuple[float, float, str]]) -> None:
    """Label the points ``(x, y, text)``: markers at one place share a label (:func:`_merged_label`);
    each label goes beside its markers where it overlaps no label or marker placed so far (greedy)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    places: list[tuple[float, float, list]] = []  # display x, y of the first marker, its points
    for x, y, text in sorted(points):
        px, py = ax.transData.transform((x, y))
        near = next((p for p in places if abs(p[0] - px) <= _SAME_PLACE_PX and abs(p[1] - py) <= _SAME_PLACE_PX), None)
        if near is None:
            places.append((px, py, [(x, y, text)]))
        else:
            near[2].append((x, y, text))
    taken = [_bbox(px - 6, py - 6, px + 6, py + 6) for px, py, _ in places]  # the markers
    area = ax.get_window_extent(renderer)
    for _, _, group in places:
        x, y, _ = group[0]
        label = _merged_label([text for *_, text in group])
        for dx, dy in _LABEL_OFFSETS:
            text = ax.annotate(
                label,
                (x, y),
                fontsize=7,
                xytext=(dx, dy),
                textcoords="offset points",
                ha="left" if dx >= 0 else "right",
            )
            box = text.get_window_extent(renderer)
            inside = area.contains(box.x0, box.y0) and area.contains(box.x1, box.y1)
            if inside and not any(box.overlaps(t) for t in taken):
                taken.append(box)
                break
            text.remove()
        else:  # crowded everywhere: keep the first place, readable enough and never silently dropped
            dx, dy = _LABEL_OFFSETS[0]
            ax.annotate(label, (x, y), fontsize=7, xytext=(dx, dy), textcoords="offset points")


def _bbox(x0: float, y0: float, x1: float, y1: float) -> Any:
    """A display-space box (matplotlib ``Bbox``) from its corners."""
    from matplotlib.transforms import Bbox

    return Bbox([[x0, y0], [x1, y1]])


def plot_pareto(rows: list[dict], path: str) -> dict:
    """Accuracy vs latency scatter per series, the Pareto front, fp32 marked; saved as PNG.

    Points at one place share a label; a point more than :data:`FAR_BELOW_POINTS` below the best
    accuracy sits on the lower edge (a down-pointing marker, its accuracy in the label), so the
    rest keep their resolution. Also writes ``<path>.json`` with the plotted series (for tests and scripts).

    Returns
    -------
    dict
        ``{series name: [[latency_ms, accuracy], ...]}``.
    """
    import matplotlib.pyplot as plt

    fig, _, data = pareto_figure(rows)
    fig.savefig(path)
    plt.close(fig)
    rounded = {name: [[round(float(v), 6) for v in point] for point in points] for name, points in data.items()}
    Path(f"{path}.json").write_text(json.dumps(rounded, indent=1))  # 92.8, not 92.80000000000001
    return data


def pareto_figure(rows: list[dict]) -> tuple[Any, Any, dict]:
    """The figure :func:`plot_pareto` saves: ``(figure, axes, plotted series)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list] = {}
    for r in rows:
        series.setdefault(r["series"], []).append(r)
    best = max(r["accuracy"] for r in rows)
    shown = [r["accuracy"] for r in rows if r["accuracy"] >= best - FAR_BELOW_POINTS]
    pad = max(0.5, 0.12 * (best - min(shown)))
    low, high = min(shown) - pad, best + pad
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.set_ylim(low, high)
    markers = iter(["o", "s", "^", "D", "P"])
    points, any_far = [], False
    for name, pts in series.items():
        near = [(p["latency_ms"], p["accuracy"], p["config"]) for p in pts if p["accuracy"] >= low]
        far = [(p["latency_ms"], low, f"{p['config']} ({p['accuracy']:.1f}%)") for p in pts if p["accuracy"] < low]
        style = {"marker": "*", "s": 160, "color": "black"} if name == BASELINE else {"marker": next(markers), "s": 45}
        if name == BASELINE:
            ax.axhline(pts[0]["accuracy"], color="grey", ls="--", lw=1)
        dots = ax.scatter([x for x, *_ in near], [y for _, y, _ in near], label=name, zorder=3, **style)
        if far:  # on the lower edge, pointing down: the accuracy is in the label
            color = dots.get_facecolor()[0] if near else style.get("color")
            ax.scatter([x for x, *_ in far], [low] * len(far), marker="v", s=60, color=color, zorder=3, clip_on=False)
        points += near + far
        any_far |= bool(far)
    _label_points(fig, ax, points)
    front = pareto_front(rows)
    ax.plot(
        [p["latency_ms"] for p in front],
        [p["accuracy"] for p in front],
        color="tab:red",
        lw=1,
        alpha=0.6,
        label="Pareto front",
        zorder=2,
    )
    ax.set_ylim(low, high)  # the front may reach below: it is clipped, the far points sit on the edge
    ax.set_xlabel("latency per sample, batch 1 (ms)")
    ax.set_ylabel("held-out accuracy (%)" + (f"; \u25bc: below {low:.1f}" if any_far else ""))
    ax.set_title("PrecisionBatching: accuracy vs latency (MNIST MLP)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    data = {name: [[p["latency_ms"], p["accuracy"]] for p in pts] for name, pts in series.items()}
    data["Pareto front"] = [[p["latency_ms"], p["accuracy"]] for p in front]
    return fig, ax, data
