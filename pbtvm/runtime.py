"""Running compiled PB models: the callable :class:`CompiledModel` and :func:`load`."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import numpy as np

from . import library, outputs
from ._tvm import TVM_VERSION, relax, tvm
from .bitplane import FORMAT_VERSION, BitplaneFormat
from .errors import InputError, InputTypeError
from .names import ENV_SKIP_CPU_CHECK, MANIFEST_DECODER
from .size_bounds import evaluate_terms, size_minimums
from .target import TargetInfo, missing_cpu_features, skip_cpu_check

logger = logging.getLogger(__name__)

MANIFEST_SCHEMA = 1


class CompiledModel:
    """A PB-compiled model: call it like the torch module it came from.

    Parameters
    ----------
    module : tvm.runtime.Executable or tvm.runtime.Module
        Built Relax VM executable (from ``tvm.compile``) or a loaded library.
    manifest : dict
        What was compiled (see :func:`pbtvm.compile`).
    device : str
        ``"cpu"`` or ``"cuda"`` (optionally ``"cuda:N"``).
    cpu_checked : bool
        Whether this CPU was checked for the features the model's kernels use (:func:`load` does);
        else the first call checks (:func:`cpu_problem`).
    """

    def __init__(self, module: Any, manifest: dict, device: str, cpu_checked: bool = False) -> None:
        check_device(device)
        self._module = module
        self.manifest = manifest
        self.format = BitplaneFormat.from_dict(manifest["format"])
        self.device = device
        self._vm = None
        self._dev = None
        self._main = None  # the VM's "main", looked up once
        self._on_cuda = False
        self._layer_args: dict[int, Any] = {}  # bitlayers -> ShapeTuple argument, made once
        self._shapes = [tuple(spec["shape"]) for spec in manifest["inputs"]]
        self._labels = dim_labels(manifest["inputs"])
        self._ties = tied_dims(manifest["inputs"])
        self._conditions = [c for spec in manifest["inputs"] for c in spec.get("conditions", ())]
        self._checked: list[tuple | None] = [None] * len(self._shapes)  # last accepted (kind, dtype, shape)
        self._staging: dict[tuple, Any] = {}  # (input, shape) -> aligned tensor that unaligned inputs are copied into
        structure = manifest.get("output_structure")
        self._one_tensor = structure == outputs.TENSOR or (structure is None and manifest["single_output"])
        # outputs the VM may return as memory it keeps (constants, staged inputs): handed out as copies
        self._copied_outputs = frozenset(manifest.get("copied_outputs", ()))
        self._cpu_checked = cpu_checked  # pbtvm.load checked the CPU: no second check at the first call
        # One Relax VM per model; the VM keeps per-call state (register file, frames), so calls
        # from several threads take turns (see README, "Thread safety, NaN and op semantics").
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ properties
    @property
    def bits(self) -> int:
        """Weight bits k."""
        return self.format.bits

    @property
    def converted_layers(self) -> list[str]:
        """Names of the layers running in PrecisionBatching."""
        return [layer["name"] for layer in self.manifest["layers"]["converted"]]

    @property
    def fp32_layers(self) -> list[str]:
        """Layers left in full precision."""
        return [layer["name"] for layer in self.manifest["layers"]["skipped"]]

    # ------------------------------------------------------------------ running
    def _ensure_vm(self) -> None:
        if self._vm is not None:
            return
        kind, _, index = self.device.partition(":")
        if kind == "cuda":
            TargetInfo.from_summary(self.manifest["target"]).check_local_gpu()
            self._dev = tvm.cuda(int(index or 0))
        else:
            problem = None if self._cpu_checked else cpu_problem(self.manifest, "this model")
            if problem:  # compiled here for another CPU
                raise InputError(problem)
            self._dev = tvm.cpu(0)
        self._vm = relax.VirtualMachine(self._module, self._dev)
        self._main = self._vm["main"]
        self._on_cuda = self._dev.dlpack_device_type() == 2

    def _to_tvm(self, value: Any, spec: dict, index: int) -> Any:
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a dependency
            torch = None
        is_torch = torch is not None and isinstance(value, torch.Tensor)
        if is_torch:
            key = (True, value.dtype, value.shape)
        elif isinstance(value, np.ndarray):
            key = (False, value.dtype, value.shape)
        else:
            raise InputTypeError(f"input {index} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")
        if key != self._checked[index]:  # validate each new kind / dtype / shape once
            self._check_input(value, spec, index, is_torch)
            self._checked[index] = key
        if "index_range" in spec:  # ids into a table: the values, at every call
            _check_ids(value, spec["index_range"], index)
        if is_torch:
            value = value.detach()
            on_device = value.is_cuda == self._on_cuda
            # Zero-copy needs TVM's 64-byte alignment; a slice of a larger tensor may lack it.
            if on_device and value.is_contiguous() and value.data_ptr() % 64 == 0:
                return tvm.runtime.from_dlpack(value)
            if on_device and value.device.type == "cuda":
                return tvm.runtime.from_dlpack(value.clone(memory_format=torch.contiguous_format))
            if on_device:  # a CPU tensor that is unaligned or strided: copy it into a cached aligned one
                staging = self._staging_tensor(index, tuple(value.shape), spec["dtype"])
                torch.from_dlpack(staging).copy_(value)
                return staging
            value = value.cpu().contiguous().numpy()
        return tvm.runtime.tensor(np.ascontiguousarray(value), self._dev)

    def _bitlayers_arg(self, layers: int) -> Any:
        """The ``bitlayers`` argument (a ShapeTuple) of the module's functions, made once per value."""
        if layers not in self._layer_args:
            self._layer_args[layers] = tvm.runtime.ShapeTuple([layers])
        return self._layer_args[layers]

    def _staging_tensor(self, index: int, shape: tuple, dtype: str) -> Any:
        """An aligned device tensor for input ``index`` of this shape, made once and reused.

        Only called under the model's lock; the VM has finished with the previous call's input
        when the next call copies into it.
        """
        key = (index, shape)
        if key not in self._staging:
            if len(self._staging) > 16:  # many batch sizes: keep memory bounded
                self._staging.clear()
            self._staging[key] = tvm.runtime.empty(shape, dtype, self._dev)
        return self._staging[key]

    def _check_input(self, value: Any, spec: dict, index: int, is_torch: bool) -> None:
        """Raise InputError / InputTypeError unless ``value`` has the dtype and shape the model takes."""
        if is_torch:
            dtype = str(value.dtype).replace("torch.", "")
            shape = tuple(value.shape)
        else:
            dtype, shape = str(value.dtype), value.shape
        if dtype != spec["dtype"]:
            raise InputTypeError(f"input {index} has dtype {dtype}, the model was compiled for {spec['dtype']}")
        want = self._shapes[index]
        if shape != want and (
            len(shape) != len(want) or any(w is not None and w != s for w, s in zip(want, shape, strict=True))
        ):
            shown = "(" + ", ".join(str(w) for w in self._labels[index]) + ("," if len(want) == 1 else "") + ")"
            named = any(isinstance(w, str) and w != "batch" for w in self._labels[index])
            note = " (n0, n1, ...: any size, the same wherever a name repeats across inputs)" if named else ""
            pairs = enumerate(zip(want, shape, strict=True)) if len(shape) == len(want) else ()
            fixed = [d for d, (w, s) in pairs if isinstance(w, int) and w != s]
            if fixed:
                sizes = ", ".join(f"dimension {d} ({want[d]})" for d in fixed)
                note += f"; {sizes}: fixed at the example's size, compile with an example of the size to run"
            raise InputError(f"input {index} has shape {tuple(shape)}, the model expects {shown}{note}")
        if any(s == 0 for s in shape):
            raise InputError(f"input {index} has an empty dimension: {tuple(shape)}")
        for d, least, why in size_minimums(spec):
            if shape[d] < least:
                raise InputError(
                    f"input {index} has size {shape[d]} in dimension {d}; the compiled model takes {least} or more "
                    f"there: {why} (below it, the compiled program is not the model's)"
                )

    def __call__(self, *inputs: Any, bitlayers: int | None = None, **named: Any) -> Any:
        """Run the model.

        Parameters
        ----------
        *inputs : torch.Tensor or numpy.ndarray
            As the example inputs given to :func:`pbtvm.compile`; the batch (first) dimension may
            differ.
        **named : torch.Tensor or numpy.ndarray
            Inputs by the name of the torch model's ``forward`` parameter (``position_ids=...``),
            after or instead of positional ones.
        bitlayers : int, optional
            Run-time precision knob: accumulate only the top ``bitlayers`` weight planes
            (1..bits; default all). Changing it never recompiles.

        Returns
        -------
        torch.Tensor / numpy.ndarray, or a tuple / list / dict of them
            Same kind as the first input, same structure as the torch model's output (nested
            tuples and dicts included).

        Notes
        -----
        Thread-safe: one model may be called from several threads; the calls take turns on the
        model's one VM (a lock), so threads get correct results but no parallel speed-up.
        """
        specs = self.manifest["inputs"]
        if bitlayers is not None and not isinstance(bitlayers, int | np.integer):
            if any(spec.get("name") == "bitlayers" for spec in specs):
                raise InputTypeError(
                    "the model's input named 'bitlayers' shares its name with the precision knob "
                    "(bitlayers=<int>): pass that input by position"
                )
        if named:
            inputs = _by_position(inputs, named, specs)
        if len(inputs) != len(specs):
            raise InputTypeError(f"the model takes {len(specs)} input(s), got {len(inputs)}")
        layers = self.format.check_bitlayers(bitlayers)
        with self._lock:
            self._ensure_vm()
            args = [self._to_tvm(x, s, i) for i, (x, s) in enumerate(zip(inputs, specs, strict=True))]
            for (i, d), (j, e) in self._ties:  # run-time sizes the model needs equal
                if inputs[i].shape[d] != inputs[j].shape[e]:
                    raise InputError(
                        f"input {j} has size {inputs[j].shape[e]} in dimension {e} and input {i} has "
                        f"{inputs[i].shape[d]} in dimension {d}: the model needs them equal (one run-time "
                        f"size, {self._labels[i][d]}, in both)"
                    )
            for condition in self._conditions:  # relations of run-time sizes torch's program assumed
                if evaluate_terms(condition["terms"], [x.shape for x in inputs]) < 0:
                    shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
                    raise InputError(
                        f"the inputs' shapes {shapes} break {condition['shown']}: {condition['why']} "
                        "(otherwise, the compiled program is not the model's)"
                    )
            if self.manifest["has_bitlayers"]:
                args.append(self._bitlayers_arg(layers))
            out = self._main(*args)
        as_torch = _is_torch(inputs[0])
        if self._one_tensor and not self._copied_outputs:  # the common case, without the general rebuild
            return _from_tvm(out[0] if isinstance(out, tvm.ir.Array) else out, as_torch)
        outs = list(out) if isinstance(out, tvm.ir.Array | list | tuple) else [out]
        converted = [_from_tvm(o, as_torch, i in self._copied_outputs) for i, o in enumerate(outs)]
        if self._one_tensor:
            return converted[0]
        structure = self.manifest.get("output_structure")
        if structure is not None:
            return outputs.rebuild(structure, converted)
        return converted[0] if self.manifest["single_output"] else tuple(converted)

    # ------------------------------------------------------------------ export
    def export(self, path: str) -> str:
        """Write the model as one deployable .so (needs only the TVM runtime to load).

        Returns the path written.

        A symbolic link at ``path`` is replaced by the library (as ``ld -o`` does), not written
        through.

        Raises
        ------
        FileNotFoundError, PermissionError, IsADirectoryError
            The folder is missing or not writable; ``path`` is a directory.
        pbtvm.library.ExportError
            The linker could not write the output (a full disk, a read-only file system).
        InputError
            ``path`` is empty or names a device, FIFO or socket; the model was loaded from a library.
        """
        path = os.fspath(path)
        if not path:
            raise InputError("export needs a file path to write, e.g. 'model.so'; got an empty path")
        if os.path.isdir(path):
            raise IsADirectoryError(
                f"cannot write {path}: it is a directory (give a file, e.g. {os.path.join(path, 'model.so')})"
            )
        if os.path.exists(path) and not os.path.isfile(path):  # export moves a new file over it
            raise InputError(
                f"cannot write {path}: it is not a regular file (a device, FIFO or socket, which export would "
                "replace with the library); give a file path"
            )
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"cannot write {path}: the directory {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"cannot write {path}: the directory {folder} is not writable")
        if not hasattr(self._module, "mod"):
            raise InputError("this model was loaded from a library; copy the .so instead of re-exporting")
        arch = self.manifest["target"].get("arch")
        library.export_library(self._module, path, self.manifest, arch)
        return path

    def __reduce__(self) -> Any:
        """Refused: the model holds a native TVM module, which pickle (``copy.copy``,
        ``copy.deepcopy``, ``torch.save``) cannot carry; it is saved and moved as a library."""
        raise TypeError(
            "a compiled pbtvm model cannot be pickled or copied (it holds a native TVM module): "
            "save it with m.export(path) and read it back with pbtvm.load(path)"
        )

    def __repr__(self) -> str:
        m, f = self.manifest, self.format
        return (
            f"CompiledModel(W{f.bits}A{f.act_bits} {codebook_text(m)} {f.layout}, target={m['target']}, "
            f"{len(m['layers']['converted'])} PB layers, {len(m['layers']['skipped'])} fp32)"
        )


def codebook_text(manifest: dict) -> str:
    """The model's weight codebook, or ``"codebook per layer"`` where its PB layers' differ
    (``codebook="auto"`` picks one per layer)."""
    fmt = manifest["format"]
    codebooks = {layer.get("codebook", fmt["codebook"]) for layer in manifest["layers"]["converted"]}
    return fmt["codebook"] if codebooks <= {fmt["codebook"]} else "codebook per layer"


def _symbols(spec: dict) -> list:
    """Per dimension of an input spec: its run-time symbol (``"batch"`` in manifests from before
    ``dims`` was recorded), None for a static size."""
    dims = spec.get("dims") or ["batch" if size is None else None for size in spec["shape"]]
    return [None if size is not None else (sym or "batch") for size, sym in zip(spec["shape"], dims, strict=True)]


def dim_labels(specs: list[dict]) -> list[tuple]:
    """How error messages show each input's shape: the static sizes, and for the run-time
    dimensions ``batch`` (the symbol a plain model's export names so) or ``n0``, ``n1`` ... (one
    name per other symbol; e.g. an LSTM model's sequence length and batch)."""
    symbols = dict.fromkeys(sym for spec in specs for sym in _symbols(spec) if sym not in (None, "batch"))
    names = {"batch": "batch"} | {sym: f"n{n}" for n, sym in enumerate(symbols)}
    return [
        tuple(size if sym is None else names[sym] for size, sym in zip(spec["shape"], _symbols(spec), strict=True))
        for spec in specs
    ]


def tied_dims(specs: list[dict]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Pairs ``((input, dim), (input, dim))`` of run-time dimensions with one symbol: each later
    occurrence paired with the first (from the manifest's ``dims``; none for older manifests)."""
    first: dict[str, tuple[int, int]] = {}
    ties = []
    for i, spec in enumerate(specs):
        for d, sym in enumerate(spec.get("dims") or []):
            if sym is None:
                continue
            if sym in first:
                ties.append((first[sym], (i, d)))
            else:
                first[sym] = (i, d)
    return ties


def _check_ids(value: Any, rows: int, index: int) -> None:
    """Raise InputError unless every id in ``value`` (torch or numpy) lies in ``[0, rows)``.

    The compiled ``take`` clips ids (it never reads outside the table); the model refuses such
    an id rather than return another row's result (torch raises ``IndexError`` for an embedding).
    """
    lo, hi = int(value.min()), int(value.max())
    if lo < 0 or hi >= rows:
        raise InputError(
            f"input {index} holds ids {lo}..{hi}; it indexes a table of {rows} rows, so ids must lie in [0, {rows})"
        )


def _by_position(inputs: tuple, named: dict, specs: list[dict]) -> tuple:
    """``inputs`` followed by the ``named`` ones, in the order of the model's inputs (``specs``)."""
    names = [spec.get("name") for spec in specs]
    if None in names:
        raise InputTypeError("this model's manifest names no inputs: pass them in order")
    unknown = sorted(set(named) - set(names))
    if unknown:
        raise InputTypeError(f"the model has no input named {', '.join(unknown)}; its inputs: {', '.join(names)}")
    twice = [n for n in names[: len(inputs)] if n in named]
    if twice:
        raise InputTypeError(f"input {', '.join(twice)} given by position and by name")
    missing = [n for n in names[len(inputs) :] if n not in named]
    if missing:
        raise InputTypeError(f"the model takes {len(specs)} input(s): {', '.join(missing)} missing")
    return (*inputs, *(named[n] for n in names[len(inputs) :]))


def _is_torch(value: Any) -> bool:
    try:
        import torch

        return isinstance(value, torch.Tensor)
    except ImportError:  # pragma: no cover
        return False


def _from_tvm(value: Any, as_torch: bool, copy: bool = False) -> Any:
    """``value`` (a VM output) as a torch tensor sharing its memory, or a copy when ``copy`` (memory
    the model keeps: :func:`pbtvm.relay_passes.outputs_to_copy`), or as a numpy array (always a copy);
    None for a null value (a ``None`` the model returns)."""
    if value is None:
        return None
    if as_torch:
        import torch

        return torch.from_dlpack(value).clone() if copy else torch.from_dlpack(value)
    return value.numpy()


def check_manifest(manifest: dict, path: str) -> None:
    """Raise :class:`library.LibraryError` if ``manifest`` cannot be served by this pbtvm/TVM."""
    if manifest.get("schema") != MANIFEST_SCHEMA:
        raise library.LibraryError(f"{path}: manifest schema {manifest.get('schema')} is not {MANIFEST_SCHEMA}")
    fmt_version = manifest.get("format", {}).get("version")
    if fmt_version != FORMAT_VERSION:
        raise library.LibraryError(f"{path}: bitplane format version {fmt_version}, this pbtvm reads {FORMAT_VERSION}")
    if manifest.get("tvm_version") != TVM_VERSION:
        raise library.LibraryError(
            f"{path} was built with TVM {manifest.get('tvm_version')}, this is TVM {TVM_VERSION}: recompile it"
        )


def check_device(device: str) -> None:
    """Raise ValueError unless ``device`` is ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
    kind, sep, index = str(device).partition(":")
    if kind == "cpu" and not sep or kind == "cuda" and (not sep or index.isdigit()):
        return
    hint = " (an NVIDIA GPU is 'cuda' or 'cuda:N')" if kind.lower() in ("gpu", "nvidia", "cuda") else ""
    raise InputError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}{hint}")


def load(path: str, device: str | None = None):
    """Load a library written by :meth:`CompiledModel.export` (or :meth:`pbtvm.decoder.PBDecoder.export`).

    Parameters
    ----------
    path : str
    device : str, optional
        ``"cpu"`` or ``"cuda"``/``"cuda:N"``; defaults to the target the library was built for.

    Returns
    -------
    CompiledModel, or :class:`pbtvm.decoder.PBDecoder` for an exported decoder (``step``,
    ``generate``; as :func:`pbtvm.decoder.load_decoder` gives it)

    Raises
    ------
    ValueError
        ``device`` is not ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    FileNotFoundError, pbtvm.library.LibraryError
        Missing file; not a pbtvm library; corrupt; built by another TVM or format version; its
        target does not match ``device``; or built for a CPU with x86 features (its manifest's
        ``cpu_features``) that neither this CPU's ``/proc/cpuinfo`` nor LLVM's view of it lists
        (:func:`pbtvm.target.missing_cpu_features`; ``PBTVM_SKIP_CPU_CHECK=1`` skips that check).
    """
    model = load_model(path, device)
    if model.manifest.get(MANIFEST_DECODER) is not None:
        from .decoder import PBDecoder

        return PBDecoder(model)
    return model


def cpu_problem(manifest: dict, what: str) -> str | None:
    """Why the CPU model of ``manifest`` (``what``: a library path, or "this model") must not run on
    this machine: the CPU features it was compiled for that this CPU lacks. None when it may run
    (other targets; the check skipped, :func:`skip_cpu_check`)."""
    info = TargetInfo.from_summary(manifest["target"])
    if info.kind != "llvm" or skip_cpu_check():
        return None
    missing = missing_cpu_features(manifest.get("cpu_features", []))
    if not missing:
        return None
    return (
        f"{what} was compiled for a CPU with {', '.join(missing)} ({info.mcpu}), which this CPU lacks: "
        "running it may stop the process with an illegal instruction. Compile it for a CPU both have "
        "(e.g. target={'kind': 'llvm', 'mcpu': 'haswell'}, or target='llvm' for this one), or run it "
        f"on such a CPU; if this CPU does have them (neither Linux nor LLVM lists them), "
        f"{ENV_SKIP_CPU_CHECK}=1 skips this check"
    )


def load_model(path: str, device: str | None = None) -> CompiledModel:
    """:func:`load`, always as the :class:`CompiledModel` (a decoder's step function unwrapped)."""
    path = os.fspath(path)
    if device is not None:
        check_device(device)
    read_stat = os.stat(path) if os.path.isfile(path) else None  # read_library names a missing file
    data = library.read_library(path)  # once, for the manifest and both checksums
    manifest = library.read_manifest(path, data)
    check_manifest(manifest, path)
    library.verify_checksum(path, manifest, data)
    info = TargetInfo.from_summary(manifest["target"])
    kind, built_for = info.kind, info.device
    device = device or built_for
    if device.partition(":")[0] != built_for:
        raise library.LibraryError(f"{path} was compiled for {kind} and cannot run on device {device!r}")
    problem = cpu_problem(manifest, path)
    if problem:
        raise library.LibraryError(problem)
    if built_for == "cuda" and tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
        raise library.LibraryError(  # TVM's own text names a loader that is not registered
            f"{path} was compiled for CUDA, and this TVM has no CUDA runtime loaded (built without CUDA, or its CUDA "
            "library or the NVIDIA driver could not be loaded): load it on a machine with an NVIDIA GPU and its driver"
        )
    try:
        with library.without_scope_warnings(), library.dlopen_name(path, data, read_stat, manifest["checksum"]) as name:
            module = tvm.runtime.load_module(name)
    except library.LibraryError:
        raise
    except Exception as err:
        raise library.LibraryError(f"{path}: TVM could not load the library ({str(err).splitlines()[0]})") from err
    return CompiledModel(module, manifest, device, cpu_checked=True)
