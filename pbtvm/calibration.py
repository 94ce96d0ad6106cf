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

from .errors import InputError

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
        float64 [in_features] mean of ``x_k^2`` over every calibration row.

    Raises
    ------
    ValueError
        No batch given, or the model has no ``nn.Linear``.
    """
    import torch

    from .lowering import weight_key

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise InputError("calibration: the model has no nn.Linear layer to calibrate")
    sums = {id(m): np.zeros(m.in_features) for m in linears}
    counts = {id(m): 0 for m in linears}

    def hook(module: Any, inputs: tuple) -> None:
        x = inputs[0].detach().float().reshape(-1, module.in_features).cpu().numpy().astype(np.float64)
        sums[id(module)] += (x * x).sum(axis=0)
        counts[id(module)] += x.shape[0]

    handles = [m.register_forward_pre_hook(hook) for m in linears]
    n_batches = 0
    try:
        with torch.no_grad():
            for batch in batches:
                args = tuple(batch) if isinstance(batch, tuple | list) else (batch,)
                model(*args)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
    if n_batches == 0:
        raise InputError("calibration: no batch given (pass an iterable of example inputs)")
    return {
        weight_key(m.weight.detach().cpu().numpy()): sums[id(m)] / max(counts[id(m)], 1)
        for m in linears
        if counts[id(m)]
    }
