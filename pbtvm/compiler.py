"""``pbtvm.compile``: torch.nn.Module -> PB-compiled model (torch.export + Relax + TVM build)."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import time
import warnings
from typing import Any

from . import __version__, outputs, recurrent
from ._tvm import TVM_VERSION, tvm
from .bitplane import DEFAULT_ACT_BITS, LUT_LAYOUT, BitplaneFormat
from .cuda import build
from .errors import InputError, check_int
from .lowering import layers_format
from .model_import import eval_mode, import_model, layer_names, state_kept
from .names import kernel_kind
from .quantize import AUTO, check_codebook
from .relay_passes import (
    ApplyPBSchedules,
    FuseActivationIntoPB,
    PBLinearRewrite,
    PBLSTMLowering,
    dense_shapes,
    lstm_weight_sizes,
    outputs_to_copy,
)
from .relay_passes.pb_linear_rewrite import RUNTIME_PRODUCT
from .runtime import MANIFEST_SCHEMA, CompiledModel
from .schedules.tuning import TuneReport, tune_kernels, tuned_lookup
from .serial import one_compile_at_a_time
from .target import AUTO_LAYOUT, DYNAMIC_BATCH, TargetInfo, library_cpu_features, resolve_target, weight_layout
from .user_frame import user_stacklevel

logger = logging.getLogger(__name__)


def _rewrite(
    model: Any,
    example_inputs: Any,
    fmt: BitplaneFormat,
    tvm_target: tvm.target.Target,
    dynamic_batch: bool,
    codebook: str | None = AUTO,
    quantizer: str = "mse",
    calibration: Any = None,
    auto_layout: bool = False,
    tune_batch: int = 1,
):
    """Import the model and run the PB graph rewrite (kernels not yet scheduled).

    ``auto_layout``: ``fmt``'s layout is what ``layout="auto"`` gave; the dense layers' rows (or
    the dynamic batch) then decide it (:func:`_batch_format`), with an LSTM as for a dynamic batch
    (its steps run the batch's rows, its projections every step's). Returns ``(mod, specs,
    dynamic, converted, skipped, fmt)``, ``fmt`` the format the dense layers got. ``tune_batch``:
    the batch the kernels are tuned at or looked up for (:class:`PBLinearRewrite`).
    """
    t0 = time.perf_counter()
    owners: list[str] = []
    with eval_mode(model):  # the caller's model keeps its mode
        mod, specs, dynamic = import_model(model, example_inputs, dynamic_batch, owners)
        logger.info("imported model in %.1fs", time.perf_counter() - t0)
        names = layer_names(model)
        importance = None
        if calibration is not None:
            from .calibration import input_importance

            with state_kept(model):
                importance = input_importance(model, calibration, names)
    with tvm_target:
        if auto_layout:  # an LSTM's steps and projections take any rows: as a dynamic batch
            recurrent = [(None, k) for k in lstm_weight_sizes(mod)]
            fmt = _batch_format(fmt, tvm_target, dense_shapes(mod) + recurrent, dynamic or bool(recurrent))
        lstms = PBLSTMLowering(
            fmt, codebook, quantizer, names, importance
        )  # first: its input projections are dense layers
        mod = lstms(mod)
        rewrite = PBLinearRewrite(
            fmt, codebook, quantizer, importance, layer_names=names, codebooks=lstms.codebooks, tune_batch=tune_batch
        )
        mod = rewrite(mod)
        if tvm_target.kind.name == "cuda":
            mod = FuseActivationIntoPB()(mod)  # Linear + ReLU / GELU / SiLU one kernel (mma16x256)
    report = rewrite.report
    # In the order the model runs them (the rewrite's graph order), each LSTM layer's W_hh right
    # after its W_ih (the lowering's projection): not every W_hh after the dense layers.
    recurrent = {c["weight_key"]: {**c, "name": names.get(c["weight_key"], c["name"])} for c in lstms.converted}
    for key in {c["weight_key"] for c in report.converted + report.skipped} - names.keys():
        name = report.name_of(key, names)  # a slice, entry, transpose or cast of a named weight
        if name is not None:
            names[key] = name
    converted, listed = [], set()
    for c in report.converted:  # one entry per use: an LSTM run twice lists W_ih and W_hh twice
        converted.append({"name": names.get(c["weight_key"], f"dense{c['shape']}"), **c})
        hh = recurrent.get(lstms.recurrent_of.get(c["weight_key"], ""))
        if hh:
            converted.append(hh)
            listed.add(hh["weight_key"])
    converted += [hh for key, hh in recurrent.items() if key not in listed]
    # Matmuls are named by the torch module that called them when every one came from pbtvm's
    # converters (then the rewrite's matmul order is the converters' order).
    by_order = owners if len(owners) == report.n_matmuls else []

    def skipped_name(s: dict) -> str:
        if s["weight_key"] in names:
            return names[s["weight_key"]]
        index = s.get("matmul_index")
        return f"{by_order[index]}: {s['op']}" if index is not None and by_order else s["op"]

    skipped = [{"name": skipped_name(s), **s} for s in report.skipped]
    if importance is not None:
        _warn_uncalibrated(converted, importance)
    return mod, specs, dynamic, converted, skipped, fmt


def _warn_uncalibrated(converted: list[dict], importance: dict) -> None:
    """Warn, naming them, about the PB layers calibration recorded nothing for (data-free)."""
    missing = list(dict.fromkeys(c["name"] for c in converted if c["weight_key"] not in importance))
    if missing:
        warnings.warn(
            f"pbtvm: calibration saw no input of {len(missing)} layer(s), quantized data-free: {', '.join(missing)} "
            "(calibration records the products of an activation by a model weight as torch runs them in "
            "nn.Linear, F.linear, matmul, einsum or nn.LSTM; a weight computed by ops is none)",
            stacklevel=user_stacklevel(),
        )


def _batch_format(
    fmt: BitplaneFormat, tvm_target: tvm.target.Target, shapes: list, dynamic: bool = False
) -> BitplaneFormat:
    """For a compile with ``layout="auto"``, from the model's
    :func:`~pbtvm.relay_passes.dense_shapes` (and its LSTMs' row lengths, as ``(None, K)``): the
    format :func:`pbtvm.target.weight_layout` picks for the most rows any dense layer runs, or for
    a ``dynamic`` batch (``lut16x4`` on AVX2 CPUs at 1-2 rows, and at any batch without AVX-VNNI)
    if every layer's K fits that layout's kernel, else ``fmt``."""
    from .ops import pb_lut

    rows = [r for r, _ in shapes]
    most = DYNAMIC_BATCH if dynamic and rows else None if not rows or None in rows else max(rows)
    layout = weight_layout(AUTO_LAYOUT, tvm_target, fmt.bits, fmt.act_bits, most)
    chosen = BitplaneFormat(fmt.bits, fmt.act_bits, layout=layout)
    if chosen.layout == LUT_LAYOUT and any(k is None or pb_lut.unsupported_reason(chosen, k) for _, k in shapes):
        return fmt
    return chosen


def _warn_recurrent(model: Any) -> None:
    """GRU and plain RNN layers, and LSTMs with a forward of their own, are not lowered as recurrent
    layers: torch.export unrolls them over the example's length (their matmuls become per-step
    layers)."""
    import torch

    rnns = [
        f"{name} ({type(m).__name__}{', its own forward' if isinstance(m, torch.nn.LSTM) else ''})"
        for name, m in recurrent.recurrent_modules(model)
        if not isinstance(m, torch.nn.LSTM) or recurrent.has_own_forward(m)
    ]
    if rnns:
        verb = "are" if len(rnns) > 1 else "is"
        warnings.warn(
            f"pbtvm: {', '.join(rnns)} {verb} recurrent and not lowered (only nn.LSTM's own forward is): "
            "torch.export unrolls it over the example's length (its matmuls become one layer per step), so the "
            "compiled model only runs the example's sequence length.",
            stacklevel=user_stacklevel(),
        )


def _pb_kernels(mod: tvm.IRModule) -> list:
    """Every PB PrimFunc of ``mod``; the tuner keeps those whose rule is tunable."""
    return [f for _, f in mod.functions_items() if kernel_kind(f) is not None]


@one_compile_at_a_time
def tune(
    model: Any,
    example_inputs: Any,
    target: Any = "llvm",
    bits: int = 4,
    act_bits: int = DEFAULT_ACT_BITS,
    *,
    work_dir: str | os.PathLike = "pbtvm_logs",
    trials: int = 64,
    batch: int = 1,
    layout: str = AUTO_LAYOUT,
    dynamic_batch: bool = True,
    runner: Any = None,
    progress: Any = None,
    codebook: str | None = AUTO,
    quantizer: str = "mse",
) -> TuneReport:
    """Search schedules for a model's PB kernels with MetaSchedule; write the tuning log.

    A later ``compile(..., work_dir=work_dir)`` uses the log without searching.

    Parameters
    ----------
    model, example_inputs, target, bits, act_bits, layout, dynamic_batch, codebook, quantizer
        As in :func:`compile` (the same values give the same kernels).
    work_dir : path
        Tuning log directory (one JSON database per target arch inside).
    trials : int
        Measured candidates per distinct kernel.
    batch : int
        Batch size to tune for (kernels keep a dynamic batch; the schedule is tuned at this one).
    runner : MetaSchedule Runner, optional
        E.g. an ``RPCRunner`` for remote devices; default measures locally.
    progress : callable, optional
        Receives progress lines (default: stderr).

    Returns
    -------
    pbtvm.schedules.tuning.TuneReport
    """
    check_codebook(codebook, bits, quantizer)
    tvm_target = resolve_target(target)
    fmt = BitplaneFormat(bits, act_bits, layout=weight_layout(layout, tvm_target))
    trials = check_int("trials", trials, 1)
    batch = check_int("batch", batch, 1)
    auto = layout == AUTO_LAYOUT
    mod, *_ = _rewrite(model, example_inputs, fmt, tvm_target, dynamic_batch, codebook, quantizer, None, auto, batch)
    return tune_kernels(
        _pb_kernels(mod), tvm_target, work_dir, trials_per_kernel=trials, batch=batch, runner=runner, progress=progress
    )


def _warn_skipped(skipped: list[dict]) -> None:
    """Warn of the layers left in full precision, each with its reason; products of two run-time
    tensors (attention's scores and mixing: no weight to quantize) apart, in one line per module
    with their count (a 12-layer GPT-2 listed 24 of them, 3 KB, as layers that failed)."""
    products = collections.Counter(
        s["name"].removesuffix(f": {s['op']}") for s in skipped if RUNTIME_PRODUCT in s["reason"]
    )
    layers = [s for s in skipped if RUNTIME_PRODUCT not in s["reason"]]
    if layers:
        listed = ", ".join(f"{s['name']}: {s['reason']}" for s in layers)
        warnings.warn(f"pbtvm: {len(layers)} layer(s) stay in full precision: {listed}", stacklevel=user_stacklevel())
    if products:
        example = next(s["reason"] for s in skipped if RUNTIME_PRODUCT in s["reason"])
        shapes = example[example.index(RUNTIME_PRODUCT) + len(RUNTIME_PRODUCT) :].strip(" )")
        where = ", ".join(f"{name} x{n}" if n > 1 else name for name, n in products.items())
        warnings.warn(
            f"pbtvm: {sum(products.values())} product(s) of two run-time tensors (no weight to quantize, as "
            f"attention's q kᵀ; e.g. {shapes}) stay in full precision: {where}",
            stacklevel=user_stacklevel(),
        )


@one_compile_at_a_time
def compile(
    model: Any,
    example_inputs: Any,
    target: Any = "llvm",
    bits: int = 4,
    act_bits: int = DEFAULT_ACT_BITS,
    *,
    layout: str = AUTO_LAYOUT,
    dynamic_batch: bool = True,
    tune: bool = False,
    work_dir: str | os.PathLike | None = None,
    trials: int = 64,
    tune_batch: int = 1,
    codebook: str | None = AUTO,
    quantizer: str = "mse",
    calibration: Any = None,
) -> CompiledModel:
    """Compile a torch model with PrecisionBatching.

    Parameters
    ----------
    model : torch.nn.Module
        Compiled as in eval mode (dropout off, batch norms on the running statistics they keep); the
        model's own train / eval mode is left as it was.
    example_inputs : torch.Tensor or tuple of torch.Tensor
        One example per model input; dimension 0 is the batch and stays dynamic when possible.
    target : str, dict or tvm.target.Target
        ``"llvm"`` (host CPU), ``"cuda"`` (local GPU) or an explicit target such as
        ``{"kind": "cuda", "arch": "sm_90"}`` (works without a GPU: the kernels are built with
        nvcc and can be exported).
    bits : int
        Weight bits, 1..16.
    act_bits : int
        Activation bits, 2..16 (dynamic per-row scale).
    layout : str
        Weight plane layout, see :data:`pbtvm.bitplane.LAYOUTS`. The default ``"auto"``
        (:func:`pbtvm.target.weight_layout`) is ``"mma16x256"`` on CUDA sm_80 and newer: dense
        layers and LSTM steps run on the binary tensor cores (``mma.sync .b1 .and.popc``); exact
        in the CPU emulation of their CUDA code, not yet measured on a GPU (BENCHMARKS.md,
        "binary tensor cores"). ``"kNW"`` there keeps the CUDA-core popcount kernels; on a CPU
        (and CUDA before sm_80) ``"auto"`` is ``"kNW"`` except as follows. ``"lut16x4"`` (x86
        CPUs with AVX2): dense layers and LSTM steps by table lookup (:mod:`pbtvm.ops.pb_lut`),
        faster than ``"kNW"`` on CPUs without AVX-512 VNNI where layers run at most 2 rows (batch
        x time) at 2..8 bits (BENCHMARKS.md, sixteenth session; on AVX-VNNI CPUs with GFNI only up
        to rows x bits of 4, nineteenth session); past 4 rows its dense layers decode each weight
        row once (:mod:`pbtvm.ops.lut_decoded`, 0.84-1.18x ``"kNW"`` at 8-32 rows and 3-8 bits,
        twenty-third session), and so does its LSTM step (twenty-fourth session). ``"auto"`` is
        ``"lut16x4"`` on AVX2 CPUs without AVX-512 VNNI: with a dynamic batch, or with an LSTM in
        the model, where they have no AVX-VNNI either (the MNIST MLP 1.53x at batch 1, 0.97x at
        32; the 2x650 LSTM LM W4 1.5-2.3x at batch 1, 0.92-1.0x at 8-32), with
        ``dynamic_batch=False`` where no dense layer runs more than 2 rows and there is no LSTM
        (1.4-1.5x at batch 1, eighteenth session).
    dynamic_batch : bool
        Export with a symbolic batch dimension. False: the model runs the example's batch only.
    tune : bool
        Search schedules with MetaSchedule first (needs ``work_dir``); kernels already in the
        log are not searched again.
    work_dir : path, optional
        Tuning log directory. Without ``tune`` an existing log is used as is (no search); a log
        for another target / TVM / format version is ignored with a warning.
    trials, tune_batch : int
        Candidates per kernel and batch size when tuning or looking the log up (see :func:`tune`;
        ignored without ``work_dir``). On CUDA a dense layer built for its tuning batch is the
        function that runs at it: past the small batches that run in one launch, pack + kernel
        (:func:`pbtvm.schedules.cuda_bmma.one_launch_layer`).
    codebook : str or None
        Weight codebook. ``"auto"`` (default): per layer, the codebook with the lowest weight
        squared error (:func:`pbtvm.quantize.choose_codebook`; in practice offset binary, whose
        zero point costs one epilogue term); ``"twos_complement"``/``"bipolar"`` (the codes
        before offset binary existed) or ``"offset_binary"`` force one; None: two's complement
        for k >= 2, bipolar for k = 1. The manifest records each layer's codebook.
    quantizer : str
        ``"mse"`` (default): per-row clipping search minimizing the weight MSE; ``"max"``: the
        original max-scaled round to nearest (see :func:`pbtvm.quantize.quantize_weights`).
    calibration : iterable, optional
        Example batches (each a model input or a tuple of inputs). If given, the quantizer weights
        each input's error by its mean square over these batches, for every layer whose product
        the batches ran as ``nn.Linear`` / ``F.linear`` / ``x @ W.T`` / ``einsum`` / ``nn.LSTM``
        (:mod:`pbtvm.calibration`; the others, e.g. weights computed by ops, stay data-free, named
        in a warning); default None: data-free. Needs ``quantizer="mse"``.

    Returns
    -------
    CompiledModel
        Callable as ``m(*inputs, bitlayers=None)``; ``m.export(path)`` writes a deployable .so.

    Raises
    ------
    ValueError, TypeError
        Bits or act_bits out of range, unknown target, non-tensor inputs, ``tune`` without
        ``work_dir``.
    pbtvm.schedules.tuning.TuningLogError
        The tuning log in ``work_dir`` is corrupt.
    """
    check_codebook(codebook, bits, quantizer)
    if calibration is not None and quantizer != "mse":
        raise InputError(
            f"calibration weights the error the 'mse' quantizer minimizes; quantizer={quantizer!r} takes each row's "
            "full range and would ignore it: drop one of the two"
        )
    tvm_target = resolve_target(target)
    fmt = BitplaneFormat(bits, act_bits, layout=weight_layout(layout, tvm_target))
    if tune and work_dir is None:
        raise InputError("compile(tune=True) needs a work_dir to write the tuning log into")
    if tune:
        trials = check_int("trials", trials, 1)
    tune_batch = check_int("tune_batch", tune_batch, 1)
    mod, specs, dynamic, converted, skipped, fmt = _rewrite(
        model,
        example_inputs,
        fmt,
        tvm_target,
        dynamic_batch,
        codebook,
        quantizer,
        calibration,
        layout == AUTO_LAYOUT,
        tune_batch if tune or work_dir is not None else 1,  # without a log the batch tunes nothing
    )
    _warn_recurrent(model)
    _warn_skipped(skipped)
    if not converted:
        warnings.warn("pbtvm: no dense layer was converted to PrecisionBatching", stacklevel=user_stacklevel())

    if tune:
        tune_kernels(_pb_kernels(mod), tvm_target, work_dir, trials_per_kernel=trials, batch=tune_batch)
    with torch_no_grad(), eval_mode(model), state_kept(model):
        examples = example_inputs if isinstance(example_inputs, tuple | list) else (example_inputs,)
        out = model(*(x.clone() for x in examples))  # a forward changing its input in place: not the caller's
    structure = outputs.describe(out)
    return build_model(
        mod,
        fmt,
        tvm_target,
        specs,
        dynamic=dynamic,
        single_output=structure == outputs.TENSOR,
        converted=converted,
        skipped=skipped,
        work_dir=work_dir,
        tune_batch=tune_batch,
        extra={
            "output_structure": structure,
            "quantizer": {"codebook": codebook, "method": quantizer, "calibrated": calibration is not None},
        },
    )


def build_model(
    mod: tvm.IRModule,
    fmt: BitplaneFormat,
    tvm_target: tvm.target.Target,
    specs: list[dict],
    *,
    dynamic: bool,
    single_output: bool,
    converted: list[dict],
    skipped: list[dict] = (),
    work_dir: str | os.PathLike | None = None,
    tune_batch: int = 1,
    cuda_graph: bool = False,
    extra: dict | None = None,
) -> CompiledModel:
    """Schedule the PB kernels of a Relax module (tuning log first, else default), build it.

    Parameters
    ----------
    mod : tvm.IRModule
        Relax ``main`` taking the inputs of ``specs`` plus ``bitlayers: R.Shape([L])`` when
        ``converted`` is not empty; PB PrimFuncs tagged ``pbtvm.kernel``.
    fmt, tvm_target
        Format and resolved target of the kernels (the manifest records ``fmt`` with the
        converted layers' codebook when they share one, :func:`pbtvm.lowering.layers_format`).
    specs : list of dict
        Input ``dtype`` and ``shape`` (None for the dynamic batch), as in the manifest.
    dynamic, single_output : bool
        Whether the batch is dynamic; whether ``main`` returns one tensor (else a tuple).
    converted, skipped : list of dict
        Layers in PB / left in fp32, for the manifest (``name``, ``shape`` ...).
    work_dir, tune_batch
        Tuning log to take schedules from, see :func:`compile`.
    cuda_graph : bool
        Build with TVM's CUDA-graph rewrite (``relax.backend.use_cuda_graph``), CUDA only.
    extra : dict, optional
        More manifest entries (e.g. the decoder's shape).

    Returns
    -------
    CompiledModel
    """
    tuning, lookup = None, None
    if work_dir is not None:
        lookup, used = tuned_lookup(work_dir, tvm_target, tune_batch)
        tuning = {"work_dir": str(work_dir), "batch": tune_batch, "tuned_kernels": used}
    with tvm_target:
        mod = ApplyPBSchedules(tvm_target, lookup)(mod)
    if lookup is not None:
        lookup.warn_if_unmatched()
    if tuning is not None:
        logger.info("%d PB kernel(s) scheduled from the tuning log", len(tuning["tuned_kernels"]))

    summary = TargetInfo.of(tvm_target).summary()
    t1 = time.perf_counter()
    executable = build(mod, tvm_target, cuda_graph=cuda_graph)
    logger.info("built in %.1fs", time.perf_counter() - t1)
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "pbtvm_version": __version__,
        "tvm_version": TVM_VERSION,
        "format": layers_format(fmt, converted).to_dict(),
        "target": summary,
        "cpu_features": library_cpu_features(tvm_target),  # checked by pbtvm.load on the machine it runs on
        "inputs": specs,
        "dynamic_batch": dynamic,
        "single_output": single_output,
        "has_bitlayers": bool(converted),
        "layers": {"converted": list(converted), "skipped": list(skipped)},
        "tuning": tuning,
        "copied_outputs": outputs_to_copy(mod["main"]),  # copied at every call (pbtvm.runtime)
        **(extra or {}),
    }
    return CompiledModel(executable, manifest, TargetInfo.of(tvm_target).device)


@contextlib.contextmanager
def torch_no_grad():
    """``torch.no_grad`` without importing torch at module import."""
    import torch

    with torch.no_grad():
        yield


__all__ = ["build_model", "compile", "import_model", "tune"]
