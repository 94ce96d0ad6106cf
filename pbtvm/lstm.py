"""A standalone ``nn.LSTM`` with PrecisionBatching, for any sequence length, and a stateful step API.

The explicit step API. A model that *contains* LSTMs compiles whole with :func:`pbtvm.compile`,
which lowers each LSTM inside the compiled module (:mod:`pbtvm.recurrent`,
``relay_passes/pb_lstm_lowering.py``: same format, quantizer and fused cell kernel, the time
loop in Relax). :func:`compile_lstm` remains for a bare LSTM driven from Python - one step at a
time (:meth:`PBLSTM.step`) or a sequence - and builds it layer by layer:

* the input projection of all time steps at once: one PB GEMM ``[T*B, I] x W_ih^T`` (+ both
  biases), a :class:`~pbtvm.runtime.CompiledModel` with a dynamic row count;
* one fused *step* kernel per layer and time step (:func:`pbtvm.ops.pb_lstm_cell`): the
  activation pack of ``h``, the PB GEMV on ``W_hh``, the gate nonlinearities and the cell
  update - a single kernel launch on CUDA, a single function call on CPU.

The time loop runs in :class:`PBLSTM` (the sequence length is a run-time value; nothing is
compiled after :func:`compile_lstm`). The projection comes from :func:`pbtvm.compile`, the step
from :func:`pbtvm.compiler.build_model`; both use the foundation's bitplane format, quantizer and
schedule rules, and the projection's GEMMs use a tuning log when one is given (the step kernel
has a default schedule only).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from .bitplane import DEFAULT_ACT_BITS, BitplaneFormat
from .errors import InputError, InputTypeError
from .lowering import layers_format
from .serial import one_compile_at_a_time
from .target import AUTO_LAYOUT, resolve_target, weight_layout


def _torch():
    import torch

    return torch


def _projection_module(w_ih: Any, bias: Any) -> Any:
    """``nn.Linear`` computing the input projection ``x W_ih^T (+ b_ih + b_hh)`` of every step."""
    torch = _torch()
    lin = torch.nn.Linear(w_ih.shape[1], w_ih.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w_ih)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin.eval()


def _cell_model(
    w_hh: np.ndarray,
    fmt: BitplaneFormat,
    tvm_target: Any,
    name: str,
    quant: tuple = ("auto", "mse"),
    tune: bool = False,
    trials: int = 64,
    **build_kwargs: Any,
) -> Any:
    """The fused step ``(gx [B, 4H], h [B, H], c [B, H]) -> (h', c')`` as a CompiledModel.

    ``main`` is one ``call_tir`` of :func:`pbtvm.kernels.lstm_cell_func` (one kernel launch on
    CUDA) with ``W_hh`` packed unit-major as a constant, in the codebook ``quant = (codebook,
    method)`` gives (:func:`pbtvm.quantize.layer_format`). ``tune``: its kernel is tuned into
    ``build_kwargs["work_dir"]`` first (``trials``, ``tune_batch``), as :func:`pbtvm.compile` does.
    """
    from ._tvm import relax, tir
    from .compiler import _pb_kernels, build_model
    from .kernels import lstm_cell_func
    from .lowering import LayerRecord, lower_weights
    from .ops import unit_major_rows
    from .schedules.tuning import tune_kernels

    hidden = w_hh.shape[1]
    fmt, [weights] = lower_weights([w_hh], fmt, quant, rows=unit_major_rows(hidden))
    batch, layers = tir.Var("batch", "int64"), tir.Var("bitlayers", "int64")
    state = relax.TensorType([batch, hidden], "float32")
    params = [
        relax.Var("gx", relax.TensorType([batch, 4 * hidden], "float32")),
        relax.Var("h", state),
        relax.Var("c", state),
        relax.Var("bitlayers", relax.ShapeType([layers])),
    ]
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        kernel = bb.add_func(
            lstm_cell_func(fmt, hidden).without_attr("global_symbol"), f"pb_lstm_cell_{fmt.name}_h{hidden}"
        )
        out = bb.emit(relax.call_tir(kernel, [*params[:3], *weights, relax.prim_value(layers)], [state, state]))
        bb.emit_func_output(out)
    specs = [{"dtype": "float32", "shape": [None, d]} for d in (4 * hidden, hidden, hidden)]
    converted = [LayerRecord.of(name, w_hh, fmt, bias=False).as_dict()]
    mod = bb.get()
    if tune:
        batch = build_kwargs.get("tune_batch", 1)
        tune_kernels(_pb_kernels(mod), tvm_target, build_kwargs["work_dir"], trials_per_kernel=trials, batch=batch)
    return build_model(
        mod, fmt, tvm_target, specs, dynamic=True, single_output=False, converted=converted, **build_kwargs
    )


def _layer_codebook(weights: list[np.ndarray], fmt: BitplaneFormat, quant: tuple) -> str | None:
    """The codebook of one LSTM layer: ``quant[0]`` unless "auto", then the joint choice for ``weights``."""
    from .quantize import AUTO, choose_codebook

    if quant[0] != AUTO:
        return quant[0]
    return choose_codebook(weights, fmt, quant[1])[0]


class PBLSTM:
    """An ``nn.LSTM`` compiled with PrecisionBatching; call it like the torch module.

    Use :func:`compile_lstm` to build one.

    Attributes
    ----------
    format : BitplaneFormat
    num_layers, hidden_size, input_size : int
    batch_first : bool
    """

    def __init__(self, projections: list, cells: list, lstm: Any, fmt: BitplaneFormat) -> None:
        self._proj = projections
        self._cells = cells
        self.format = fmt
        self.num_layers = lstm.num_layers
        self.hidden_size = lstm.hidden_size
        self.input_size = lstm.input_size
        self.batch_first = lstm.batch_first

    def initial_state(self, batch: int, device: str = "cpu") -> tuple[Any, Any]:
        """Zero ``(h, c)``, each float32 [num_layers, batch, hidden]."""
        torch = _torch()
        z = torch.zeros(self.num_layers, batch, self.hidden_size, device=device)
        return z, z.clone()

    def __call__(self, x: Any, state: tuple[Any, Any] | None = None, bitlayers: int | None = None) -> tuple:
        """Run a whole sequence.

        Parameters
        ----------
        x : torch.Tensor, float32, [T, B, I] (or [B, T, I] if ``batch_first``)
            Any T >= 1 and B >= 1; no recompilation.
        state : (h0, c0), optional
            Each [num_layers, B, hidden]; zeros when omitted.
        bitlayers : int, optional
            Run-time precision knob of every PB kernel (1..bits).

        Returns
        -------
        y : torch.Tensor, [T, B, hidden] (or [B, T, hidden])
        (h_n, c_n) : torch.Tensor, each [num_layers, B, hidden]
        """
        torch = _torch()
        x = _float32_tensor(x, "LSTM input")
        if x.ndim != 3 or x.shape[-1] != self.input_size:
            raise InputError(
                f"LSTM input must be [T, B, {self.input_size}] (batch_first={self.batch_first}), got {tuple(x.shape)}"
            )
        if self.batch_first:
            x = x.transpose(0, 1)
        steps, batch = int(x.shape[0]), int(x.shape[1])
        if steps < 1 or batch < 1:
            raise InputError(f"LSTM input needs at least one step and one sequence, got {tuple(x.shape)}")
        if state is not None and (not isinstance(state, tuple | list) or len(state) != 2):
            raise InputTypeError(f"state must be a pair (h0, c0), got {type(state).__name__}")
        h0, c0 = state if state is not None else self.initial_state(batch, str(x.device))
        h0, c0 = _float32_tensor(h0, "h0"), _float32_tensor(c0, "c0")
        want = (self.num_layers, batch, self.hidden_size)
        if tuple(h0.shape) != want or tuple(c0.shape) != want:
            raise InputError(f"state must be two tensors of shape {want}, got {tuple(h0.shape)}, {tuple(c0.shape)}")
        layer_in = x.contiguous()
        hs, cs = [], []
        for layer in range(self.num_layers):
            gx = self._proj[layer](layer_in.reshape(steps * batch, -1), bitlayers=bitlayers).reshape(steps, batch, -1)
            h, c = h0[layer].contiguous(), c0[layer].contiguous()
            outs = []
            for t in range(steps):
                h, c = self._cells[layer](gx[t], h, c, bitlayers=bitlayers)
                outs.append(h)
            layer_in = torch.stack(outs)
            hs.append(h)
            cs.append(c)
        y = layer_in.transpose(0, 1) if self.batch_first else layer_in
        return y, (torch.stack(hs), torch.stack(cs))

    def step(self, x_t: Any, state: tuple[Any, Any] | None = None, bitlayers: int | None = None) -> tuple:
        """One time step for generation: ``x_t`` [B, I] -> (h_top [B, hidden], new state)."""
        y, state = self(x_t.unsqueeze(1 if self.batch_first else 0), state, bitlayers)
        return (y[:, 0] if self.batch_first else y[0]), state

    def export(self, directory: str | os.PathLike) -> Path:
        """Write every compiled piece as a .so plus ``lstm.json`` into ``directory``.

        :func:`load_lstm` reads it back with only the TVM runtime (no compiler).
        """
        if not os.fspath(directory):  # an empty setting, not a wish to write into the working directory
            raise InputError("export needs a directory to write into, e.g. 'lstm_lib'; got an empty path")
        from .library import checksum, read_manifest

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "lstm.json").unlink(missing_ok=True)  # an export stopped part-way leaves nothing loadable
        files = {}
        for layer in range(self.num_layers):
            for name, piece in ((f"proj{layer}.so", self._proj[layer]), (f"cell{layer}.so", self._cells[layer])):
                piece.export(out / name)
                files[name] = read_manifest(str(out / name))["checksum"]  # ties the pieces to this export
        meta = {
            "kind": "pbtvm.lstm",
            "num_layers": self.num_layers,
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "batch_first": self.batch_first,
            "format": self.format.to_dict(),
            "files": files,
        }
        meta["checksum"] = checksum(meta, b"")  # as a library's manifest signs itself: an edited lstm.json is refused
        partial = out / f".lstm.json.{os.getpid()}.tmp"
        partial.write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(partial, out / "lstm.json")
        return out

    def __reduce__(self) -> Any:
        """Refused: the model holds a native TVM module, which pickle (``copy.copy``,
        ``copy.deepcopy``, ``torch.save``) cannot carry; it is saved and moved as a library."""
        raise TypeError(
            "a compiled pbtvm model cannot be pickled or copied (it holds a native TVM module): "
            "save it with m.export(directory) and read it back with pbtvm.lstm.load_lstm(directory)"
        )

    def __repr__(self) -> str:
        return (
            f"PBLSTM({self.format.label}, layers={self.num_layers}, input={self.input_size}, "
            f"hidden={self.hidden_size}, batch_first={self.batch_first})"
        )


def _float32_tensor(value: Any, what: str) -> Any:
    """``value`` (a torch tensor or anything numpy reads) as a float32 torch tensor; other dtypes
    are refused, naming ``what``."""
    torch = _torch()
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(np.asarray(value))
    if value.dtype != torch.float32:
        raise InputTypeError(f"{what} must be float32, got {value.dtype}")
    return value


@one_compile_at_a_time
def compile_lstm(
    lstm: Any, target: Any = "llvm", bits: int = 4, act_bits: int = DEFAULT_ACT_BITS, **compile_kwargs: Any
) -> PBLSTM:
    """Compile an ``nn.LSTM`` (any number of layers, with or without bias, batch_first either way).

    Parameters
    ----------
    lstm : torch.nn.LSTM
        Unidirectional, no projection (``proj_size=0``).
    target, bits, act_bits, compile_kwargs
        As in :func:`pbtvm.compile` (e.g. ``work_dir`` for a tuning log).

    Returns
    -------
    PBLSTM

    Raises
    ------
    TypeError, ValueError
        Not an ``nn.LSTM``; bidirectional or projected LSTMs; bits out of range.
    """
    from .compiler import compile as pb_compile
    from .lowering import check_module_weights
    from .quantize import AUTO, check_codebook
    from .recurrent import check_step_lstm, flat_weights

    torch = _torch()
    check_step_lstm(lstm, "compile_lstm")
    check_module_weights({"": lstm})
    if "calibration" in compile_kwargs:
        raise InputError("calibration is supported by pbtvm.compile only, not by compile_lstm")
    if compile_kwargs.pop("dynamic_batch", True) is not True:
        raise InputError(
            "compile_lstm's layers take any batch and sequence length; dynamic_batch=False is for pbtvm.compile "
            "(compile a module holding the LSTM with an example of the batch to fix it)"
        )
    quant = (compile_kwargs.get("codebook", AUTO), compile_kwargs.get("quantizer", "mse"))
    check_codebook(quant[0], bits, quant[1])
    tvm_target = resolve_target(target)
    layout = compile_kwargs.get("layout", AUTO_LAYOUT)
    fmt = BitplaneFormat(bits, act_bits, layout=weight_layout(layout, tvm_target))
    if layout == AUTO_LAYOUT:  # any batch: lut16x4 on AVX2-only CPUs, as pbtvm.compile picks for an LSTM
        from .compiler import _batch_format

        sizes = [(None, lstm.input_size), (None, lstm.hidden_size)]
        fmt = _batch_format(fmt, tvm_target, sizes, dynamic=True)
        compile_kwargs = {**compile_kwargs, "layout": fmt.layout}  # the projections' too
    # the cells are tuned into the same log as the projections (compile(tune=True) tunes those)
    build_kwargs = {k: compile_kwargs[k] for k in ("work_dir", "tune_batch", "tune", "trials") if k in compile_kwargs}
    projections, cells = [], []
    weights = flat_weights(lstm)
    with torch.no_grad():
        for layer in range(lstm.num_layers):
            w_ih = weights[f"weight_ih_l{layer}"].float()
            w_hh = weights[f"weight_hh_l{layer}"].float()
            bias = None
            if lstm.bias:
                bias = (weights[f"bias_ih_l{layer}"] + weights[f"bias_hh_l{layer}"]).float()
            proj = _projection_module(w_ih, bias)
            # one codebook per layer for W_ih and W_hh, as the decoder's one-kernel step needs
            layer_quant = (_layer_codebook([w_ih.numpy(), w_hh.numpy()], fmt, quant), quant[1])
            kwargs = {**compile_kwargs, "codebook": layer_quant[0]}
            projections.append(pb_compile(proj, (torch.zeros(2, w_ih.shape[1]),), target, bits, act_bits, **kwargs))
            cells.append(
                _cell_model(
                    w_hh.numpy(), fmt, tvm_target, f"weight_hh_l{layer} (LSTM cell)", layer_quant, **build_kwargs
                )
            )
    converted = [layer for m in (*projections, *cells) for layer in m.manifest["layers"]["converted"]]
    return PBLSTM(projections, cells, lstm, layers_format(fmt, converted))


def load_lstm(directory: str | os.PathLike, device: str | None = None) -> PBLSTM:
    """Load an LSTM written by :meth:`PBLSTM.export`.

    Raises
    ------
    FileNotFoundError, pbtvm.LibraryError
        Missing directory or pieces; a piece that is not a pbtvm library; ``lstm.json`` corrupt,
        or not describing the pieces beside it (files of another export, an export stopped
        part-way, an edited format or layer count).
    """
    from .library import LibraryError, checksum
    from .runtime import load_model

    if not os.fspath(directory):
        raise InputError("load_lstm needs the directory PBLSTM.export wrote; got an empty path")
    path = Path(directory)
    described = path / "lstm.json"
    if path.is_file():
        raise LibraryError(
            f"{path} is a file; load_lstm takes the directory PBLSTM.export wrote (pbtvm.load reads a .so)"
        )
    try:
        meta = json.loads(described.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} holds no exported PB LSTM (lstm.json is missing)") from None
    except json.JSONDecodeError as err:
        raise LibraryError(f"{described} is corrupt: {err}") from None
    if not isinstance(meta, dict) or meta.get("kind") != "pbtvm.lstm":
        raise LibraryError(f"{described} does not describe a pbtvm LSTM")
    if "checksum" in meta and meta["checksum"] != checksum(meta, b""):  # none: exported before pbtvm kept one
        raise LibraryError(f"{described} was changed after export (checksum mismatch): export the LSTM again")
    try:
        layers = int(meta["num_layers"])
        fmt = BitplaneFormat.from_dict(meta["format"])
        shape = SimpleNamespace(
            num_layers=layers,
            hidden_size=int(meta["hidden_size"]),
            input_size=int(meta["input_size"]),
            batch_first=bool(meta["batch_first"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise LibraryError(f"{described} is corrupt: {type(err).__name__}: {err}") from None
    names = [f"{kind}{i}.so" for i in range(layers) for kind in ("proj", "cell")]
    files = meta.get("files")  # None: exported before pbtvm recorded the pieces
    if files is not None and sorted(files) != sorted(names):
        raise LibraryError(f"{described} lists {sorted(files)}, but its num_layers {layers} means {sorted(names)}")
    pieces = {name: load_model(path / name, device) for name in names}
    for name, piece in pieces.items():
        if files is not None and piece.manifest.get("checksum") != files[name]:
            raise LibraryError(
                f"{path / name} is not the file exported with {described} (a file of another export, or an export "
                "stopped part-way): export the LSTM again"
            )
        if (piece.format.bits, piece.format.act_bits) != (fmt.bits, fmt.act_bits):
            raise LibraryError(f"{path / name} is {piece.format.label}, {described} says {fmt.label}")
    projections = [pieces[f"proj{i}.so"] for i in range(layers)]
    cells = [pieces[f"cell{i}.so"] for i in range(layers)]
    return PBLSTM(projections, cells, shape, fmt)


__all__ = ["PBLSTM", "compile_lstm", "load_lstm"]
