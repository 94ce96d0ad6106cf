"""Optional calibration: per-input activation statistics that weight the weight quantizer's error.

``pbtvm.compile(model, x, calibration=batches)`` runs the torch model on the batches with a hook
on every ``nn.Linear`` and records the mean square of each input feature, ``E[x_k^2]``. The
quantizer then minimizes ``sum_k E[x_k^2] (w_nk - w'_nk)^2`` per row instead of the plain weight
MSE - the expected squared output error when inputs are uncorrelated (activation-aware, in the
spirit of AWQ) - in the clip search, the least-squares refits and the per-layer codebook choice.
Inputs that are never active (e.g. the border pixels of MNIST digits) then stop pulling the
scale and offset of the others. Without calibration nothing changes (data-free).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InputError, InputTypeError, first_line, shape_text

__all__ = ["input_importance"]


def input_importance(model: Any, batches: Any) -> dict[str, np.ndarray]:
    """Mean square of each ``nn.Linear`` input feature over calibration batches.

    Parameters
    ----------
    model : torch.nn.Module
    batches : iterable
        Each item one model input (a tensor) or a tuple of inputs, as the model's ``forward`` takes.

    Returns
    -------
    dict
        :func:`pbtvm.lowering.weight_key` of each Linear's weight ->
        float64 [in_features] mean of ``x_k^2`` over every calibration row (of every Linear with
        that weight).

    Raises
    ------
    ValueError
        No batch given, a batch the model does not run on, non-finite Linear inputs, or the model
        has no ``nn.Linear``.
    TypeError
        ``batches`` is not an iterable of batches.
    """
    import torch

    from .lowering import torch_weight_key

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise InputError("calibration: the model has no nn.Linear layer to calibrate")
    sums = {id(m): np.zeros(m.in_features) for m in linears}
    counts = {id(m): 0 for m in linears}

    def hook(module: Any, inputs: tuple) -> None:
        x = inputs[0].detach().float().reshape(-1, module.in_features).cpu().numpy().astype(np.float64)
        sums[id(module)] += (x * x).sum(axis=0)
        counts[id(module)] += x.shape[0]

    if isinstance(batches, torch.Tensor) or not hasattr(batches, "__iter__"):
        raise InputTypeError(
            f"calibration takes an iterable of batches (e.g. a list of input tensors), got {type(batches).__name__}"
        )
    handles = [m.register_forward_pre_hook(hook) for m in linears]
    n_batches = 0
    try:
        with torch.no_grad():
            for batch in batches:
                args = tuple(batch) if isinstance(batch, tuple | list) else (batch,)
                try:
                    model(*args)
                except Exception as err:  # the batch does not fit the model: the user's calibration data
                    shown = ", ".join(shape_text(a) for a in args)
                    raise InputError(
                        f"calibration batch {n_batches} ({shown}) does not run through the model: "
                        f"{type(err).__name__}: {first_line(err)}"
                    ) from err
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
    if n_batches == 0:
        raise InputError("calibration: no batch given (pass an iterable of example inputs)")
    bad = [name for name, m in _named(model, linears) if not np.isfinite(sums[id(m)]).all()]
    if bad:
        raise InputError(
            f"calibration: the inputs of {', '.join(bad)} hold NaN or inf over the calibration batches; "
            "calibrate with finite data"
        )
    # Layers are keyed by weight value, as the rewrite finds them: Linears with equal weights (an
    # untrained deep copy) share one quantization, so their inputs are pooled (the last one won).
    pooled: dict[str, list] = {}
    for m in linears:
        if counts[id(m)]:
            total = pooled.setdefault(torch_weight_key(m.weight), [0.0, 0])
            total[0] = total[0] + sums[id(m)]
            total[1] += counts[id(m)]
    return {key: total / count for key, (total, count) in pooled.items()}


def _named(model: Any, linears: list) -> list[tuple[str, Any]]:
    """``("path (Linear)", module)`` for each of ``linears``, in ``model``'s order."""
    wanted = {id(m) for m in linears}
    return [(f"{name} ({type(m).__name__})".strip(), m) for name, m in model.named_modules() if id(m) in wanted]
