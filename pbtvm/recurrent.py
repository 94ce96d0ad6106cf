"""Import ``nn.LSTM`` layers as one graph node each, so that ``pbtvm.compile`` can lower them.

``torch.export`` traces ``nn.LSTM`` step by step, which fixes the sequence length of the
compiled model. While :func:`pbtvm.model_import.import_model` exports a model, every ``nn.LSTM`` in
it runs :data:`LSTM_OP` instead (:func:`lstm_stand_ins`), a ``torch.library`` custom op whose
fake implementation gives outputs symbolic in the sequence length and batch: the exported
program keeps one node per LSTM and the length stays a run-time dimension. Its eager
implementation is torch's own LSTM, so the stand-in computes exactly what the module does.

:func:`convert_lstm_stack` turns that node into a *placeholder* Relax call,
``call_dps_packed(ExternFunc("pbtvm.lstm_stack:<json config>"), [x, h0, c0, *weights])``, which
:class:`relay_passes.pb_lstm_lowering.PBLSTMLowering` replaces by the PB input projection over
all steps and a time loop of the fused PB cell kernel. The placeholder is not a runnable
function: a module that skipped the lowering fails to build instead of computing something else.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from ._tvm import relax
from .errors import InputError, InputTypeError

#: Name prefix of the placeholder ``ExternFunc``; the rest of the name is the layer's JSON config.
PLACEHOLDER_PREFIX = "pbtvm.lstm_stack:"
#: ``node.target.__name__`` of the custom op in the exported program (the converter's key).
OP_KEY = "lstm_stack.default"

_OP = None


def _lstm_op() -> Any:
    """Register (once) and return the custom op ``pbtvm::lstm_stack``."""
    global _OP
    if _OP is not None:
        return _OP
    import torch

    schema = (
        "(Tensor x, Tensor h0, Tensor c0, Tensor[] weights, int num_layers, bool has_bias, bool batch_first, "
        "bool bidirectional) -> (Tensor, Tensor, Tensor)"
    )

    @torch.library.custom_op("pbtvm::lstm_stack", mutates_args=(), schema=schema)
    def lstm_stack(x, h0, c0, weights, num_layers, has_bias, batch_first, bidirectional):
        y, h, c = torch._VF.lstm(x, (h0, c0), weights, has_bias, num_layers, 0.0, False, bidirectional, batch_first)
        return y, h, c

    @lstm_stack.register_fake
    def _(x, h0, c0, weights, num_layers, has_bias, batch_first, bidirectional):  # noqa: ARG001 - the op's schema
        dirs = 2 if bidirectional else 1
        hidden = weights[1].shape[1]
        steps, batch = (x.shape[1], x.shape[0]) if batch_first else (x.shape[0], x.shape[1])
        torch._check(x.shape[2] == weights[0].shape[1])
        for state in (h0, c0):
            torch._check(state.shape[0] == num_layers * dirs)
            torch._check(state.shape[1] == batch)
            torch._check(state.shape[2] == hidden)
        y = x.new_empty((batch, steps, dirs * hidden) if batch_first else (steps, batch, dirs * hidden))
        return y, h0.new_empty(h0.shape), c0.new_empty(c0.shape)

    _OP = lstm_stack
    return _OP


def _no_projection(where: str, lstm: Any) -> None:
    if getattr(lstm, "proj_size", 0):
        raise InputError(f"{where} has proj_size={lstm.proj_size}; LSTMs with projections are not supported")


def check_lstm(name: str, lstm: Any) -> None:
    """Raise ValueError / TypeError for LSTMs the lowering does not handle (projections, dtypes)."""
    import torch

    _no_projection(f"pbtvm.compile: {name} ({type(lstm).__name__})", lstm)
    dtypes = {w.dtype for w in lstm.parameters()}
    if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.float16, torch.bfloat16, torch.float64}:
        raise InputTypeError(
            f"pbtvm.compile: {name} ({type(lstm).__name__}) has {sorted(map(str, dtypes))} weights; recurrent "
            "layers need one of float32, float16, bfloat16 and float64"
        )


def check_step_lstm(lstm: Any, api: str) -> None:
    """The checks of ``api`` (``compile_lstm``, ``compile_decoder``), which compile one
    unidirectional ``nn.LSTM`` from its weights: its type, direction and projection, and a warning
    for a forward of its own (:func:`warn_own_forward`).

    Raises
    ------
    TypeError
        Not an ``nn.LSTM``.
    ValueError
        Bidirectional, or with ``proj_size``.
    """
    import torch

    if not isinstance(lstm, torch.nn.LSTM):
        raise InputTypeError(f"{api} takes a torch.nn.LSTM, got {type(lstm).__name__}")
    warn_own_forward(lstm, api)
    if lstm.bidirectional:
        raise InputError(
            f"pbtvm.{api}: the {type(lstm).__name__} is bidirectional; {api} runs one direction (a bidirectional "
            "LSTM in a model compiles with pbtvm.compile)"
        )
    _no_projection(f"pbtvm.{api}: the {type(lstm).__name__}", lstm)


def has_own_forward(lstm: Any) -> bool:
    """Whether ``lstm`` (an ``nn.LSTM``) runs a ``forward`` other than ``nn.LSTM.forward``: a
    subclass's, or one set on the instance. :func:`lstm_stand_ins` replaces only
    ``nn.LSTM.forward``'s computation; such a module is traced as torch runs it."""
    import torch

    return type(lstm).forward is not torch.nn.LSTM.forward or "forward" in vars(lstm)


def current_weight(module: Any, name: str) -> Any:
    """``module``'s tensor ``name`` (a weight or bias) as its forward would use it now, detached.

    A ``torch.nn.utils.parametrize`` parametrization computes its weight when read. A
    ``torch.nn.utils.weight_norm`` or ``spectral_norm`` hook computes it before each forward and
    leaves the last value on the module, stale once ``g``/``v`` changed (an optimizer step, a
    state dict loaded): it is computed again here, as the hook would (spectral norm without a
    power iteration, as in eval mode).
    """
    import torch
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    hooks = [h for h in module._forward_pre_hooks.values() if isinstance(h, WeightNorm | SpectralNorm)]
    hook = next((h for h in hooks if h.name == name), None)
    with torch.no_grad():
        if isinstance(hook, SpectralNorm):
            return hook.compute_weight(module, do_power_iteration=False).detach()
        if hook is not None:
            return hook.compute_weight(module).detach()
        return getattr(module, name).detach()


def flat_weights(lstm: Any) -> dict[str, Any]:
    """``lstm``'s weights by name (``_flat_weights_names`` order), as its forward would use them
    now, detached (:func:`current_weight`)."""
    return {name: current_weight(lstm, name) for name in lstm._flat_weights_names}


def _computed_weights(lstm: Any) -> list | None:
    """Copies of ``lstm``'s flat weights (:func:`flat_weights`) when some are not parameters of
    its own (a parametrization, a ``weight_norm`` hook: computed from other tensors, which a trace
    would record as operations rather than constants); None when all are."""
    own = dict(lstm.named_parameters(recurse=False))
    if all(n in own for n in lstm._flat_weights_names):
        return None
    return [w.clone() for w in flat_weights(lstm).values()]


def warn_own_forward(lstm: Any, api: str) -> None:
    """Warn that ``api`` (``compile_lstm``, ``compile_decoder``) compiles ``nn.LSTM``'s computation
    from ``lstm``'s weights, not the forward of its own that ``lstm`` has (:func:`has_own_forward`)."""
    if has_own_forward(lstm):
        import warnings

        from .user_frame import user_stacklevel

        warnings.warn(
            f"pbtvm.{api}: the {type(lstm).__name__} given has a forward of its own; {api} compiles nn.LSTM's "
            "computation from its weights, not that forward",
            stacklevel=user_stacklevel(),
        )


def _stand_in_forward(lstm: Any, name: str, fixed: list) -> Any:
    import torch

    op = _lstm_op()
    frozen = _computed_weights(lstm)

    def forward(input: Any, hx: Any = None) -> tuple:
        x = input
        if not isinstance(x, torch.Tensor):
            raise InputTypeError(
                f"pbtvm.compile: {name} (LSTM) gets a {type(x).__name__}; packed sequences are not supported"
            )
        if x.ndim != 3:
            raise InputError(
                f"pbtvm.compile: {name} (LSTM) gets a {x.ndim}-D input; only batched 3-D inputs are supported"
            )
        dirs = 2 if lstm.bidirectional else 1
        batch = x.shape[0] if lstm.batch_first else x.shape[1]
        steps = x.shape[1] if lstm.batch_first else x.shape[0]
        for what, size in (("sequence length", steps), ("batch", batch)):
            if not isinstance(size, torch.SymInt) and size == 1 and (name, what) not in fixed:
                fixed.append((name, what))
        # Python comparisons (not torch._check) so that torch.export fixes these dims to constants.
        if x.shape[2] != lstm.input_size:
            raise InputError(f"pbtvm.compile: {name} (LSTM) takes {lstm.input_size} features, got {tuple(x.shape)}")
        if hx is None:
            h0 = x.new_zeros(lstm.num_layers * dirs, batch, lstm.hidden_size)
            hx = (h0, h0)
        want = (lstm.num_layers * dirs, batch, lstm.hidden_size)
        for state in hx:
            if state.ndim != 3 or any(s != w for s, w in zip(state.shape, want, strict=True)):
                raise InputError(f"pbtvm.compile: {name} (LSTM) state must be {want}, got {tuple(state.shape)}")
        weights = frozen if frozen is not None else [getattr(lstm, n) for n in lstm._flat_weights_names]
        y, h, c = op(x, hx[0], hx[1], weights, lstm.num_layers, lstm.bias, lstm.batch_first, lstm.bidirectional)
        return y, (h, c)

    return forward


def recurrent_modules(model: Any) -> list[tuple[str, Any]]:
    """``(name, module)`` of every ``nn.RNNBase`` (LSTM, GRU, RNN) in ``model``."""
    import torch

    return [(name or "<model>", m) for name, m in model.named_modules() if isinstance(m, torch.nn.RNNBase)]


#: torch's recurrent ops; in an exported graph they come from an ``nn.RNNBase``'s forward or from a
#: direct call (``torch.lstm``, ``torch._VF.gru``, ...).
_RECURRENT_OPS = ("lstm", "gru", "rnn_tanh", "rnn_relu")


def direct_recurrent_calls(exported: Any, model: Any) -> list[str]:
    """``"path (Type)"`` of each module whose own code calls a recurrent op of torch directly
    (``torch.lstm(...)``, not through an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` module), in
    ``exported`` (a ``torch.export.ExportedProgram`` of ``model``), once each, in graph order.
    Such a call is unrolled over the example's length like a GRU module's."""
    from .torch_import import module_name

    modules = {name for name, _ in recurrent_modules(model)}
    found: list[str] = []
    for node in exported.graph.nodes:
        op = getattr(node.target, "_opname", None) if node.op == "call_function" else None
        if op not in _RECURRENT_OPS:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        where = module_name(node) if stack else f"<model> (torch.{op})"
        if (path or "<model>") not in modules and where not in found:
            found.append(where)
    return found


def checked_lstms(model: Any) -> list:
    """``(name, module)`` of every ``nn.LSTM`` in ``model`` that runs ``nn.LSTM.forward`` (not
    :func:`has_own_forward`), each passed by :func:`check_lstm`.

    Raises
    ------
    ValueError, TypeError
        See :func:`check_lstm`.
    """
    import torch

    lstms = [
        (name, m) for name, m in recurrent_modules(model) if isinstance(m, torch.nn.LSTM) and not has_own_forward(m)
    ]
    for name, m in lstms:
        check_lstm(name, m)
    return lstms


@contextlib.contextmanager
def lstm_stand_ins(lstms: list) -> Iterator[list]:
    """While active, every ``nn.LSTM`` of ``lstms`` (``(name, module)`` from
    :func:`checked_lstms`) calls the custom op.

    Yields a list, empty if the model has no LSTM; else its first item is the number of LSTMs
    and the others ``(lstm name, "sequence length" | "batch")`` for each of those dimensions
    that a trace saw as the constant 1 (``torch.export`` fixes size-1 example dimensions).

    The modules keep their parameters (the exported program lifts them under their usual names);
    only ``forward`` is replaced, and restored on exit.
    """
    patched = []
    found: list = [len(lstms)] if lstms else []
    try:
        for name, m in lstms:
            m.forward = _stand_in_forward(m, name, found)
            patched.append(m)
        yield found
    finally:
        for m in patched:
            del m.forward


def convert_lstm_stack(node: Any, importer: Any) -> relax.Var:
    """``custom_convert_map`` entry: the LSTM node as a placeholder ``call_dps_packed``.

    The outputs are ``(y, h_n, c_n)`` typed from the input's (symbolic) shape; the weights are
    the constants the importer made of the LSTM's parameters, in ``_flat_weights_names`` order.
    """
    x, h0, c0, weights, num_layers, has_bias, batch_first, bidirectional = importer.retrieve_args(node)
    dirs = 2 if bidirectional else 1
    hidden = int(weights[1].ty.shape.values[1])
    config = {"num_layers": int(num_layers), "bias": bool(has_bias), "batch_first": bool(batch_first), "dirs": dirs}
    if x.ty.shape is None or h0.ty.shape is None:  # was an AttributeError, "a bug in pbtvm"
        from .torch_import import module_name

        raise InputError(
            f"pbtvm.compile: TVM's importer lost the shape of the input of {module_name(node)} (a broadcast "
            "of run-time sizes before it, such as x - x[:1] along the sequence or batch); compute that "
            "step outside the compiled model or with sizes it can follow (x - x[0])"
        )
    dims = list(x.ty.shape.values)
    y_dims = [*dims[:2], dirs * hidden]
    state = relax.TensorType(list(h0.ty.shape.values), x.ty.dtype)
    out = [relax.TensorType(y_dims, x.ty.dtype), state, state]
    func = relax.ExternFunc(PLACEHOLDER_PREFIX + json.dumps(config, sort_keys=True))
    return importer.block_builder.emit(relax.call_dps_packed(func, [x, h0, c0, *weights], out))


def placeholder_config(call: relax.Call) -> dict | None:
    """The config of a placeholder LSTM call (see :func:`convert_lstm_stack`), else None."""
    from ._tvm import tvm

    if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_dps_packed"):
        return None
    func = call.args[0]
    name = str(func.global_symbol) if isinstance(func, relax.ExternFunc) else ""
    return json.loads(name[len(PLACEHOLDER_PREFIX) :]) if name.startswith(PLACEHOLDER_PREFIX) else None


__all__ = [
    "OP_KEY",
    "PLACEHOLDER_PREFIX",
    "check_lstm",
    "checked_lstms",
    "convert_lstm_stack",
    "flat_weights",
    "has_own_forward",
    "lstm_stand_ins",
    "placeholder_config",
    "recurrent_modules",
    "warn_own_forward",
]
