"""Import a torch model into Relax: ``torch.export`` (LSTMs stood in for), the converters, checks.

:func:`import_model` is the first step of :func:`pbtvm.compile`; :func:`layer_names` maps weights
back to the torch modules that own them (for manifests and error messages).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import re
import warnings
from collections.abc import Iterator
from typing import Any

from . import outputs, recurrent
from ._tvm import relax, tvm
from .errors import InputError, InputTypeError, first_line, shape_text
from .lowering import torch_weight_key
from .relay_passes import (
    BoundedSliceShapes,
    BuildableFloatChecks,
    ClipRuntimeIndices,
    NormalizeConstantIndices,
    OwnConstants,
    PropagateNaN,
    ThroughFloat32,
    TorchFloatDivision,
)
from .size_bounds import size_minimums
from .torch_export import export_program, input_specs
from .torch_import import converters, module_name
from .user_frame import user_stacklevel

__all__ = ["import_model", "layer_names"]


#: An attribute torch's recurrent modules assign in a call: their ``_flat_weights`` list, and a weight
#: a ``weight_norm`` hook computes (``weight_hh_l0_reverse``); pbtvm takes the values before export.
_RNN_ATTRIBUTE = r"\S*\.(_flat_weights\[\d+\]|(weight|bias)_(ih|hh)_l\d+(_reverse)?)"


#: Where torch's quantized modules live (``quantize_dynamic``'s ``DynamicQuantizedLinear``, ...).
_TORCH_QUANTIZED_MODULES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "torch.nn.quantized")
#: Float modules among them (quantization-ready float models use them; ``convert`` swaps them).
_FLOAT_MODULES_THERE = ("FloatFunctional",)


def _without_torch_export_noise(fn: Any) -> Any:
    """Hide torch's own warnings from inside ``torch.export`` that say nothing to users: the
    ``LeafSpec`` FutureWarning, and the "must be registered as buffers" warning that every
    ``nn.GRU`` / ``nn.RNN`` gives for ``_flat_weights`` (torch's own module refreshes that list in
    forward), as an LSTM with a ``weight_norm`` hook does for its weights."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message=rf"The tensor attributes ({_RNN_ATTRIBUTE}(, )?)+ were")
            return fn(*args, **kwargs)

    return wrapper


@_without_torch_export_noise
def import_model(
    model: Any, example_inputs: tuple, dynamic_batch: bool = True, matmul_owners: list[str] | None = None
) -> tuple[tvm.IRModule, list[dict], bool]:
    """Import a torch module with ``torch.export`` + ``from_exported_program``.

    Returns the Relax module, the input specs (dtype, shape with None for a dynamic batch, and
    ``index_range`` n for an input of ids that index a table of n rows) and whether the batch
    dimension is dynamic. If torch cannot export a dynamic batch (the model
    specialises on it), the batch is fixed with a warning. ``matmul_owners``, if given, receives
    the torch module of every ``relax.matmul`` in the module, in order (see
    :func:`pbtvm.torch_import.converters`).
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise InputTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    scripted = [name or "the model" for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    if scripted:  # torch.export traces eager Python; on TorchScript it fails with an unrelated TypeError
        raise InputTypeError(
            f"pbtvm compiles eager torch modules; {', '.join(scripted[:5])} "
            f"{'is' if len(scripted) == 1 else 'are'} TorchScript (torch.jit.script / trace): pass the eager module"
        )
    quantized = []
    for name, m in model.named_modules():  # the outermost ones, not their packed-weight children
        kind = type(m).__module__
        quantized_here = kind.startswith(_TORCH_QUANTIZED_MODULES) and type(m).__name__ not in _FLOAT_MODULES_THERE
        if quantized_here and not any(q == "" or name.startswith(f"{q}.") for q, _ in quantized):
            quantized.append((name, f"{name or '<model>'} ({kind.split('.modules')[0]}.{type(m).__name__})"))
    quantized = [shown for _, shown in quantized]
    if quantized:  # torch.export fails on their packed weights with an AttributeError naming none of them
        raise InputTypeError(
            f"pbtvm compiles float models and quantizes their layers itself; {', '.join(quantized[:5])} "
            f"{'is a' if len(quantized) == 1 else 'are'} torch quantized module{'s' if len(quantized) > 1 else ''} "
            "(torch.ao.quantization.quantize_dynamic / convert): pass the float model"
        )
    if not isinstance(example_inputs, tuple | list):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    if not example_inputs:
        raise InputError("example_inputs is empty: give one example tensor per model input")
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise InputTypeError(f"example input {i} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim == 0:
            raise InputError(f"example input {i} is a scalar; inputs need a batch dimension")
        if 0 in x.shape:  # the compiled model could never be called: it takes no empty input
            raise InputError(
                f"example input {i} is empty (shape {tuple(x.shape)}); give an example with data in every "
                "dimension (the compiled model takes other batch sizes too)"
            )
    # torch.export treats one tensor passed as two inputs as one input (e.g. a zero state as both
    # h0 and c0): the second would be ignored in the compiled model. Give each its own copy.
    # An example made in torch.inference_mode cannot be traced outside it; a copy can.
    pointers: set[int] = set()
    unique = []
    for x in example_inputs:
        outside = x.is_inference() and not torch.is_inference_mode_enabled()
        unique.append(x.clone() if x.data_ptr() in pointers or outside else x)
        pointers.add(x.data_ptr())
    example_inputs = tuple(unique)
    with eval_mode(model):
        return _import_eval_model(model, example_inputs, dynamic_batch, matmul_owners)


def _version(tensor: Any) -> int | None:
    """How many times ``tensor`` was changed in place (torch's version counter); None for a tensor
    made in ``torch.inference_mode``, which has none."""
    try:
        return tensor._version
    except RuntimeError:
        return None


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """``model`` in eval mode inside the block (inference: dropout off, batch norms on the running
    statistics they keep), each of its modules back in its own train / eval mode after it:
    compiling does not change the caller's model (:func:`state_kept` keeps its tensors)."""
    import torch

    if not isinstance(model, torch.nn.Module):  # import_model names the problem
        yield model
        return
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


@contextlib.contextmanager
def state_kept(model: Any) -> Iterator[list[str]]:
    """Run ``model`` eagerly inside the block (compile's checks, calibration) without changing it:
    a parameter or buffer that an op is about to change in place (``self.steps.add_(1)``, through
    ``.data`` too) is copied first and put back at the end, and a buffer the forward replaces
    (``self.n = self.n + 1``) is put back. Only what changes is copied. Yields a list that names
    them (``buffer steps``), filled at the end of the block."""
    import torch

    watched = {}  # storage address -> (name, tensor)
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if not torch.nn.parameter.is_lazy(t) and t.device.type != "meta" and t.untyped_storage().data_ptr():
                watched.setdefault(t.untyped_storage().data_ptr(), (f"{kind} {name}", t))
    slots = [
        (f"{path}.{attr}" if path else attr, m, attr, b)
        for path, m in model.named_modules()
        for attr, b in m._buffers.items()
    ]
    changed: list[str] = []
    saver = _save_before_write(watched)
    try:
        with saver:
            yield changed
    finally:
        with torch.no_grad():
            for name, tensor, saved in saver.saved.values():
                # an inference tensor is written in inference mode only; inference_mode(False) would
                # turn grad mode back on
                with torch.inference_mode() if tensor.is_inference() else contextlib.nullcontext():
                    tensor.copy_(saved)
                changed.append(name)
        for name, m, attr, b in slots:
            if m._buffers.get(attr) is not b:
                m._buffers[attr] = b
                changed.append(f"buffer {name}")


@functools.cache
def _save_before_write_class() -> type:
    from torch.utils._python_dispatch import TorchDispatchMode

    class SaveBeforeWrite(TorchDispatchMode):
        """Copies a watched tensor before the first op that writes into its storage."""

        def __init__(self, watched: dict) -> None:
            super().__init__()
            self.watched, self.saved = watched, {}

        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            kwargs = kwargs or {}
            if func._schema.is_mutable:
                named = dict(zip((a.name for a in func._schema.arguments), args, strict=False)) | kwargs
                for arg in func._schema.arguments:
                    value = named.get(arg.name)
                    if arg.alias_info is not None and arg.alias_info.is_write and hasattr(value, "untyped_storage"):
                        self._save(value)
            return func(*args, **kwargs)

        def _save(self, value: Any) -> None:
            key = value.untyped_storage().data_ptr()
            if key in self.watched and key not in self.saved:
                name, tensor = self.watched[key]
                self.saved[key] = (name, tensor, tensor.detach().clone())

    return SaveBeforeWrite


def _save_before_write(watched: dict) -> Any:
    """A :class:`SaveBeforeWrite` dispatch mode (the class is made once, importing torch then)."""
    return _save_before_write_class()(watched)


def _import_eval_model(
    model: Any, example_inputs: tuple, dynamic_batch: bool, matmul_owners: list[str] | None
) -> tuple[tvm.IRModule, list[dict], bool]:
    """:func:`import_model` of ``model`` in eval mode, its ``example_inputs`` checked."""
    from tvm.relax.frontend.torch import from_exported_program

    checked = recurrent.checked_lstms(model)  # an unsupported LSTM is named before anything runs it
    _check_runs(model, example_inputs)
    with recurrent.lstm_stand_ins(checked) as lstms:
        exported, dynamic = export_program(model, example_inputs, dynamic_batch, bool(lstms))
        unused = _unused_complex_state(exported)
        if unused:  # TVM's importer converts every lifted tensor, read or not, and has no complex dtype
            found = lstms[1:]
            del lstms[1:]  # the trace again finds the same size-1 dimensions
            with _real_stand_ins(model, unused), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the first trace's, said once
                again, dynamic_again = export_program(model, example_inputs, dynamic_batch, bool(lstms))
            if _ops(again) == _ops(exported):  # the same program (no branch on the dtype): keep it
                exported, dynamic = again, dynamic_again
            else:  # refused below, naming them
                lstms[1:] = found
    if dynamic and lstms[1:]:
        by_layer: dict[str, list[str]] = {}
        for name, what in lstms[1:]:
            by_layer.setdefault(name, []).append(what)
        fixed = "; ".join(f"{' and '.join(whats)} of {name}" for name, whats in by_layer.items())
        verb = "are" if len(lstms[1:]) > 1 else "is"
        warnings.warn(
            f"pbtvm: the {fixed} {verb} 1 in the example, and torch.export fixes dimensions of size 1: the compiled "
            "model only takes 1 there. Give an example with size >= 2 to keep it a run-time dimension.",
            stacklevel=user_stacklevel(),  # the user's compile / tune call
        )
    direct = recurrent.direct_recurrent_calls(exported, model)
    if direct:
        warnings.warn(
            f"pbtvm: {', '.join(direct)} call{'s' if len(direct) == 1 else ''} a recurrent op of torch directly "
            "(torch.lstm / torch.gru ..., not an nn.LSTM module), which is not lowered as recurrent: torch.export "
            "unrolls it over the example's length (its matmuls become one layer per step), so the compiled model "
            "only runs the example's sequence length. Call an nn.LSTM module to keep the length a run-time size.",
            stacklevel=user_stacklevel(),  # the user's compile / tune call
        )
    _refuse_complex(exported, example_inputs)
    if not _holds_sparse(exported):  # as TVM's importer does: it decomposes only without sparse tensors
        exported = exported.run_decompositions(_decompositions())
    _refuse_effects(exported)
    constants = frozenset(
        spec.arg.name for spec in exported.graph_signature.input_specs if spec.kind.name != "USER_INPUT"
    )
    convert_map = converters([] if matmul_owners is None else matmul_owners, constants)
    convert_map[recurrent.OP_KEY] = recurrent.convert_lstm_stack
    try:
        mod = from_exported_program(exported, custom_convert_map=convert_map, run_ep_decomposition=False)
    except AssertionError as err:  # TVM's importer asserts on torch ops it has no converter for
        if "Unsupported function types" not in str(err):
            raise
        listed = str(err).split("Unsupported function types", 1)[1].strip()
        raise InputError(
            f"TVM {tvm.__version__}'s torch importer cannot convert ops of this model: "
            f"{_with_modules(listed, exported)}; write them with supported ops (e.g. "
            "x.sort(dim).values for torch.kthvalue) or keep them outside the compiled model"
        ) from None
    except (InputError, Warning, MemoryError, RecursionError):
        raise
    except Exception as err:  # one of TVM's converters fails on this use of its op: name the op and module
        node = _failing_node(err.__traceback__)
        if node is None or node.target.__name__ in convert_map:  # pbtvm's own converters: our bug
            raise
        raise InputError(
            f"TVM {tvm.__version__}'s torch importer failed on {node.target.__name__} in "
            f"{module_name(node)}: {_readable(first_line(err))[:300]}; write that step with other ops or keep "
            "it outside the compiled model"
        ) from err
    mod = OwnConstants()(mod)  # a snapshot: the importer's constants are the model's own tensors
    mod = NormalizeConstantIndices()(mod)  # before anything lowers an out-of-bounds take
    mod = BoundedSliceShapes()(mod)  # y[:1] of a run-time batch is [1, ...], not [min(1, batch), ...]
    clip = ClipRuntimeIndices()
    mod = PropagateNaN()(ThroughFloat32()(TorchFloatDivision()(BuildableFloatChecks()(clip(mod)))))
    # an index nobody reads (x.max(dim).values imports as max + argmax in a tuple) is not computed
    mod = relax.transform.DeadCodeElimination()(relax.transform.CanonicalizeBindings()(mod))
    specs = input_specs(exported, example_inputs, batch_only=not lstms)
    if len(mod["main"].params) != len(specs):  # input_ranges is keyed by main's parameter position
        raise RuntimeError(f"main takes {len(mod['main'].params)} parameters for {len(specs)} model inputs")
    for i, rows in clip.input_ranges.items():  # checked by the compiled model at every call
        specs[i]["index_range"] = rows
    _warn_minimums(specs)
    return mod, specs, dynamic


def _warn_minimums(specs: list[dict]) -> None:
    """Warn once per run-time dimension that the compiled model takes only from some size up
    (``min`` in its input spec), and once per condition over several sizes (``conditions``;
    :func:`pbtvm.size_bounds.assumed_conditions`)."""
    said = set()
    for spec in specs:
        for condition in spec.get("conditions", ()):
            warnings.warn(
                f"pbtvm: the compiled model takes only inputs with {condition['shown']}: {condition['why']}; it "
                "refuses others",
                stacklevel=user_stacklevel(),  # the user's compile / tune call
            )
    for i, spec in enumerate(specs):
        for d, least, why in size_minimums(spec):
            symbol = spec["dims"][d]
            if symbol in said:
                continue
            said.add(symbol)
            warnings.warn(
                f"pbtvm: dimension {d} of input {i} ({spec['name']}) is a run-time size from {least} up, not from 1: "
                f"{why}; the compiled model refuses smaller sizes",
                stacklevel=user_stacklevel(),  # the user's compile / tune call
            )


def _holds_sparse(exported: Any) -> bool:
    """Whether the program's parameters, buffers or constants hold a sparse tensor."""
    import torch

    tensors = [*exported.state_dict.values(), *exported.constants.values()]
    return any(isinstance(t, torch.Tensor) and t.layout != torch.strided for t in tensors)


def _decompositions() -> dict:
    """torch.export's default decompositions (what TVM's importer runs), but for ``aten.mv``, which
    :func:`pbtvm.torch_import.converters` takes as a matmul (decomposed, it is a multiply and a sum)."""
    import torch

    table = torch.export.default_decompositions()
    table.pop(torch.ops.aten.mv.default, None)
    return table


def _failing_node(tb: Any) -> Any:
    """The torch.fx ``call_function`` node TVM's importer was converting when ``tb`` was raised, or
    None: the ``node`` of its loop over the graph (the outermost frame holding ``node`` and
    ``func_name``; helpers deeper down name their arguments ``node`` too)."""
    import torch

    while tb is not None:
        local = tb.tb_frame.f_locals
        node = local.get("node")
        if "func_name" in local and isinstance(node, torch.fx.Node) and node.op == "call_function":
            return node
        tb = tb.tb_next
    return None


def _readable(message: str) -> str:
    """``message`` with each of TVM's ``ir.Op(span=None, ..., name="relax.x", ...)`` reprs (which
    hold nested parentheses) cut to its name."""
    out, at = [], 0
    while (start := message.find("ir.Op(", at)) >= 0:
        depth, end = 0, start + len("ir.Op")
        while end < len(message):
            depth += {"(": 1, ")": -1}.get(message[end], 0)
            if depth == 0:
                break
            end += 1
        name = re.search(r'name="([\w.]+)"', message[start:end])
        out += [message[at:start], name.group(1) if name else "an op"]
        at = end + 1
    return "".join(out) + message[at:]


def _with_modules(listed: str, exported: Any) -> str:
    """``"['prod.dim_int'] (aten names) in head (Pool)"``: TVM's list of aten names it has no
    converter for, and the torch modules whose ``forward`` made those ops (``exported`` is the
    decomposed program TVM imported)."""
    names = set(re.findall(r"'([^']+)'", listed))
    named = f"{listed} (aten names)"
    graph = exported.graph  # decomposed before TVM imported it
    owners = {
        module_name(n) for n in graph.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") in names
    }
    return f"{named} in {', '.join(sorted(owners))}" if owners else named


def _unused_complex_state(exported: Any) -> list[str]:
    """Names of the complex parameters and buffers the exported graph lifts but never reads (a
    rotary table kept beside a real implementation)."""
    import torch

    unread = {node.name for node in exported.graph.nodes if node.op == "placeholder" and not node.users}
    state = {**exported.state_dict, **exported.constants}  # a non-persistent buffer is a constant
    return [
        spec.target
        for spec in exported.graph_signature.input_specs
        if spec.arg.name in unread
        and spec.kind.name in ("PARAMETER", "BUFFER")
        and isinstance(state.get(spec.target), torch.Tensor)
        and state[spec.target].is_complex()
    ]


@contextlib.contextmanager
def _real_stand_ins(model: Any, names: list[str]) -> Iterator[None]:
    """While active, each complex parameter or buffer of ``names`` (dotted paths) is a real zero of
    its shape (a forward may read its size); restored on exit."""
    import torch

    swapped = []
    try:
        for name in names:
            path, _, attr = name.rpartition(".")
            module = model.get_submodule(path)
            table = module._parameters if attr in module._parameters else module._buffers
            swapped.append((table, attr, table[attr]))
            stand_in = torch.zeros(table[attr].shape, dtype=table[attr].real.dtype)
            table[attr] = torch.nn.Parameter(stand_in, requires_grad=False) if table is module._parameters else stand_in
        yield
    finally:
        for table, attr, value in reversed(swapped):
            table[attr] = value


def _ops(exported: Any) -> list[tuple[str, ...]]:
    """The exported graph's nodes as ``(op, target, args, kwargs)``, to compare two traces of one
    model."""
    return [(node.op, str(node.target), str(node.args), str(node.kwargs)) for node in exported.graph.nodes]


def _refuse_complex(exported: Any, example_inputs: tuple) -> None:
    """Raise InputError naming the complex inputs, parameters and buffers: TVM 0.27's importer has no
    complex dtype (it raised a bare NotImplementedError naming none of them)."""
    import torch

    tensors = {**exported.state_dict, **exported.constants}
    names = [name for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_complex()]
    names += [f"input {i}" for i, x in enumerate(example_inputs) if x.is_complex()]
    if names:
        raise InputError(
            f"TVM {tvm.__version__}'s torch importer has no complex tensors: {', '.join(names)}; keep the model "
            "real (e.g. a rotary embedding with cos / sin buffers and rotate_half) or that step outside the "
            "compiled model"
        )


def _check_runs(model: Any, example_inputs: tuple) -> None:
    """Run the model on the example once (no grad): an example it cannot take (a wrong shape or
    dtype) is the caller's error, named as such, not a failure deep inside ``torch.export``; so is
    an output that is not a tensor (in tuples, lists and dicts).

    One more eager forward per compile (``torch.export`` traces the model anyway); a model whose
    forward needs autograd, or changes its own state when called, is reported or changed here.
    """
    import torch

    copies = tuple(x.clone() for x in example_inputs)  # the caller's example stays as it is
    versions = [_version(x) for x in copies]
    try:
        # the model's tensors back before torch.export reads them
        with torch.no_grad(), eval_mode(model), state_kept(model) as changed:
            out = model(*copies)
    except Exception as err:
        shown = ", ".join(shape_text(x) for x in example_inputs)
        raise InputError(
            f"the model does not run on the example input(s) ({shown}): {type(err).__name__}: {first_line(err)}"
        ) from err
    # an output pbtvm cannot return (an int, a string) named before TVM's importer fails on it
    if outputs.count_tensors(outputs.describe(out)) == 0:
        raise InputTypeError(f"the model returns no tensor ({type(out).__name__}): there is nothing to compile")
    changed += [f"input {i}" for i, (x, v) in enumerate(zip(copies, versions, strict=True)) if _version(x) != v]
    if changed:
        warnings.warn(
            f"pbtvm: the model's forward changes {', '.join(changed)}. The compiled model keeps no "
            "state and changes none of its inputs: every call computes from the values at compile time (a "
            "buffer's update, e.g. a step counter, is not kept from call to call). compile leaves the model "
            "and the example as they were.",
            stacklevel=user_stacklevel(),  # the user's compile / tune call
        )


def _refuse_effects(exported: Any) -> None:
    """Name the ops with side effects (``torch.linalg.inv``'s error check after decomposition),
    which torch.export orders with an effect token that TVM's importer cannot take (its
    ``ValueError: Unsupported input kind: InputKind.TOKEN`` was reported as a pbtvm bug)."""
    if not any(spec.kind.name == "TOKEN" for spec in exported.graph_signature.input_specs):
        return
    effects = [n for n in exported.graph.nodes if n.op == "call_function" and "with_effects" in str(n.target)]
    listed = ", ".join(sorted({f"{getattr(n.args[1], '__name__', n.args[1])} in {module_name(n)}" for n in effects}))
    raise InputError(
        f"TVM {tvm.__version__}'s torch importer cannot convert ops with side effects (torch.export orders them "
        f"with an effect token): {listed or 'ops of this model'} (torch.linalg's inv / solve check their input "
        "this way); keep them outside the compiled model"
    )


def layer_names(model: Any) -> dict[str, str]:
    """Weight key -> readable layer name (torch module path and type) for every weight of ``model``.

    A weight held by several modules is named by the first that multiplies by it, so a language
    model's head tied to its embedding table is named as the head: embeddings come last. Buffers
    are named as parameters are (a frozen weight registered as a buffer)."""
    import torch

    lookups = (torch.nn.Embedding, torch.nn.EmbeddingBag)
    modules = sorted(model.named_modules(), key=lambda item: isinstance(item[1], lookups))  # stable
    names = {}
    for path, module in modules:
        name = path or "<model>"  # the top module: "<model> (Linear)", not " (Linear)"
        if isinstance(module, torch.nn.LSTM):  # its weights by name (the lowering's dense layers), computed ones too
            for param, w in recurrent.flat_weights(module).items():
                names.setdefault(torch_weight_key(w), f"{f'{path}.' if path else ''}{param} (LSTM)")
        weight = getattr(module, "weight", None)
        if weight is not None and hasattr(weight, "detach"):
            names.setdefault(torch_weight_key(weight), f"{name} ({type(module).__name__})")
        # other matrices a module may multiply by (nn.MultiheadAttention's in_proj_weight), by name,
        # also as ``x @ W`` takes them (the layer's weight is then W transposed); a vector ``v`` in
        # ``x @ v`` is a layer of one output, weight [1, K]; a stack of matrices [L, N, K] too, so
        # that its entries ``W[i]`` are named after it
        own = itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
        for param, w in own:  # a buffer too: a frozen weight registered as one
            if w.ndim >= 1 and w.is_floating_point():
                label = f"{f'{path}.' if path else ''}{param} ({type(module).__name__})"
                names.setdefault(torch_weight_key(w if w.ndim >= 2 else w[None]), label)
                if param != "weight" and w.ndim == 2:
                    names.setdefault(torch_weight_key(w.t()), label)
    return names
