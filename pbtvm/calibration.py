"""Optional calibration: per-input activation statistics that weight the weight quantizer's error.

``pbtvm.compile(model, x, calibration=batches)`` runs the torch model on the batches and records,
for every matrix product of an activation by one of the model's own weights (``nn.Linear``,
``F.linear``, ``x @ W.T``, ``einsum``, attention's projections: whatever reaches torch's ``mm`` /
``addmm`` / ``bmm`` / ``mv`` with a parameter or buffer, or its copy cast by ``torch.autocast``, as its
second operand), the mean square of each input feature,
``E[x_k^2]``. The quantizer then minimizes ``sum_k E[x_k^2] (w_nk - w'_nk)^2`` per row instead of
the plain weight MSE - the expected squared output error when inputs are uncorrelated
(activation-aware, in the spirit of AWQ) - in the clip search, the least-squares refits and the
per-layer codebook choice, and keeps the data-free fit of a row where that one is better on this
same error. Inputs that are never active (e.g. the border pixels of MNIST digits) then stop
pulling the scale and offset of the others. ``nn.LSTM`` runs without oneDNN / cuDNN while calibrating, so
its layers are such products too (``W_ih`` over the sequence, ``W_hh`` at every step). A PB layer
whose weight no such product used (a weight computed by ops, e.g. ``weight_norm``) is quantized
data-free, with a warning naming it. Without calibration nothing changes (data-free).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np

from .errors import InputError, InputTypeError, first_line, shape_text

__all__ = ["input_importance"]


def input_importance(model: Any, batches: Any, names: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Mean square of each input feature of every product by a model weight, over calibration batches.

    Parameters
    ----------
    model : torch.nn.Module
    batches : iterable
        Each item one model input (a tensor) or a tuple of input tensors, as ``forward`` takes them.
    names : dict, optional
        :func:`pbtvm.lowering.weight_key` -> layer name, for messages (default: the key).

    Returns
    -------
    dict
        :func:`pbtvm.lowering.weight_key` of each weight ``W`` [N, K] (as ``x @ W.T`` takes it) ->
        float64 [K] mean of ``x_k^2`` over every row multiplied by it (products by equal weights,
        an untrained deep copy, are pooled: they share one quantization).

    Raises
    ------
    ValueError
        No batch given, a batch the model does not run on, or non-finite inputs of a product.
    TypeError
        ``batches`` is not an iterable of batches, or a batch is not made of tensors.
    """
    import torch

    if isinstance(batches, torch.Tensor | dict | str | bytes) or not hasattr(batches, "__iter__"):
        raise InputTypeError(
            f"calibration takes an iterable of batches (e.g. a list of input tensors), got {type(batches).__name__}"
        )
    products = _WeightProducts(model)
    n_batches = _run_batches(model, batches, products)
    if n_batches == 0:
        raise InputError("calibration: no batch given (pass an iterable of example inputs)")
    names = names or {}
    bad = sorted(
        names.get(key, f"the layer with weight key {key}")
        for key, s in products.sums.items()
        if not np.isfinite(s).all()
    )
    if bad:
        raise InputError(
            f"calibration: the inputs of {', '.join(bad)} hold NaN or inf over the calibration batches; "
            "calibrate with finite data"
        )
    return {key: products.sums[key] / products.rows[key] for key in products.sums if products.rows[key]}


def _run_batches(model: Any, batches: Any, products: _WeightProducts) -> int:
    """Run the model on every batch with ``products`` recording; returns the number of batches."""
    import torch

    n_batches = 0
    # Outside inference mode, where composite ops (einsum, linear) reach the dispatch mode as mm;
    # without oneDNN / cuDNN, whose LSTM is one op: torch's own LSTM runs W_ih over the sequence
    # and W_hh at every step as addmm / mm (a subclass's forward and packed sequences included).
    with (
        torch.inference_mode(False),
        torch.no_grad(),
        _attention_unfused(),
        _rnn_unfused(),
    ):
        for batch in batches:
            args = tuple(batch) if isinstance(batch, tuple | list) else (batch,)
            leaves = torch.utils._pytree.tree_leaves(args)  # (x, (h0, c0)) for an nn.LSTM
            wrong = [type(a).__name__ for a in leaves if not isinstance(a, torch.Tensor)]
            if wrong:
                raise InputTypeError(
                    f"calibration batch {n_batches} holds a {wrong[0]}: each batch is one input tensor or a tuple "
                    "of input tensors (nested as the model's forward takes them), as the example inputs"
                )
            try:
                with products:
                    model(*args)
            except Exception as err:  # the batch does not fit the model: the user's calibration data
                shown = ", ".join(shape_text(a) for a in args)
                raise InputError(
                    f"calibration batch {n_batches} ({shown}) does not run through the model: "
                    f"{type(err).__name__}: {first_line(err)}"
                ) from err
            n_batches += 1
    return n_batches


@contextlib.contextmanager
def _attention_unfused() -> Iterator[None]:
    """``nn.MultiheadAttention`` without torch's fused inference path, whose projections run
    inside one op: unfused, they are products by the model's weights like any other (same
    results)."""
    import torch

    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


@contextlib.contextmanager
def _rnn_unfused() -> Iterator[None]:
    """torch's RNNs without oneDNN / cuDNN (one op each, whose products the dispatch mode cannot
    see): its own implementation runs them as ``addmm`` / ``mm`` (same results up to rounding).
    The switches are set directly (``flags()`` warns about TF32 on builds without Intel GPUs)."""
    import torch

    backends = (torch.backends.mkldnn, torch.backends.cudnn)
    was = [b.enabled for b in backends]
    for b in backends:
        b.enabled = False
    try:
        yield
    finally:
        for b, on in zip(backends, was, strict=True):
            b.enabled = on


class _WeightProducts:
    """A torch dispatch mode (entered once per batch) summing ``x_k^2`` over the rows of every
    product of an activation by a weight that lies in a parameter's or buffer's storage
    (:func:`_weight_operand`), keyed as the rewrite keys that weight's constant. Below autograd,
    ``nn.Linear`` / ``F.linear`` / ``matmul`` reach ``mm`` / ``addmm`` (``bmm`` with the weight
    broadcast, for frozen weights and strided inputs; ``mv`` for a vector) with the input's leading
    dimensions folded into rows; under ``torch.inference_mode`` ``linear`` / ``matmul`` themselves;
    ``nn.LSTM`` without oneDNN / cuDNN ``addmm`` / ``mm`` per layer (inputs) and step (states)."""

    def __init__(self, model: Any) -> None:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        self.sums: dict[str, np.ndarray] = {}
        self.rows: dict[str, int] = {}
        self._owned = {
            _storage(t) for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()
        }
        self._owned.discard(None)
        self._keys: dict[tuple, str] = {}  # a weight view's identity -> its key (hashing a weight is not free)
        self._casts: list = []
        self._to_copy = torch.ops.aten._to_copy.default
        outer = self

        class Products(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return outer._dispatch(func, args, kwargs)

        self._mode_type = Products
        self._mode: Any = None

    def _dispatch(self, func: Any, args: tuple, kwargs: dict | None) -> Any:
        """Run one op, recording it first if it multiplies an activation by a weight."""
        found = _weight_operand(func, args, self._owned)
        if found is not None:
            self._record(*found)
        out = func(*args, **(kwargs or {}))
        if func is self._to_copy and _storage(args[0]) in self._owned:
            self._own_cast(out)
        return out

    def _record(self, x: Any, weight: Any) -> None:
        """Add the squares of the rows of ``x`` [..., K] (multiplied by ``weight`` [N, K])."""
        from .lowering import torch_weight_key

        try:
            view = (_storage(weight), weight.storage_offset(), tuple(weight.shape), weight.stride(), weight._version)
        except RuntimeError:  # an inference-mode tensor has no version counter: not cached
            view = None
        key = self._keys.get(view) if view else None
        if key is None:
            key = torch_weight_key(weight)
            if view:
                self._keys[view] = key
        rows = x.detach().cpu().double().reshape(-1, weight.shape[1]).numpy()
        self.sums[key] = self.sums.get(key, 0.0) + (rows**2).sum(0)
        self.rows[key] = self.rows.get(key, 0) + rows.shape[0]

    def _own_cast(self, cast: Any) -> None:
        """A weight's copy in another dtype (``torch.autocast`` casts each weight before its product,
        as the compiled graph does): products by it are products by a weight, keyed as the rewrite
        keys the cast constant. Held until the batch ends, so no activation takes its storage's
        address meanwhile."""
        storage = _storage(cast) if cast.is_floating_point() else None
        if storage is not None:
            self._casts.append(cast)
            self._owned.add(storage)

    def __enter__(self) -> _WeightProducts:
        self._mode = self._mode_type()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        freed = {_storage(t) for t in self._casts}  # the next batch's casts may take these addresses
        self._owned.difference_update(freed)
        for view in [view for view in self._keys if view[0] in freed]:
            del self._keys[view]
        self._casts.clear()


def _storage(t: Any) -> int | None:
    """The address of a tensor's storage (None for tensors without one: sparse, subclasses)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _weight_operand(func: Any, args: tuple, owned: set) -> tuple[Any, Any] | None:
    """``(x, W)`` where ``func(*args)`` computes ``x @ W.T`` with ``W`` [N, K] (a view) in a storage
    of ``owned`` and ``x`` an activation (not in one), else None."""
    import torch

    aten = torch.ops.aten
    if len(args) < 2:
        return None
    if func is aten.addmm.default:
        x, b = args[1], args[2]
    elif func in (aten.mm.default, aten.matmul.default, aten.mv.default, aten.bmm.default):
        x, b = args[0], args[1]
    elif func is aten.linear.default:
        x, b = args[0], args[1].t() if isinstance(args[1], torch.Tensor) and args[1].dim() == 2 else None
    else:
        return None
    if not (isinstance(x, torch.Tensor) and isinstance(b, torch.Tensor) and x.is_floating_point()):
        return None
    if x.layout != torch.strided or b.layout != torch.strided:  # sparse: pbtvm does not compile those
        return None
    if _storage(b) not in owned or _storage(x) in owned:
        return None
    if func is aten.bmm.default:  # the weight broadcast over the batch (stride 0) or a batch of one
        if b.shape[0] != 1 and b.stride(0) != 0:
            return None
        b = b[0]
    if b.dim() == 1:  # x @ v: a layer of one output, weight [1, K]
        return x, b[None]
    return (x, b.t()) if b.dim() == 2 and x.shape[-1] == b.shape[0] else None
