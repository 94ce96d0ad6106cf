"""Weight lowering shared by every PB layer: quantize, pack, make Relax constants, record the layer.

The dense rewrite (:mod:`pbtvm.relay_passes.pb_linear_rewrite`), the LSTM step models
(:mod:`pbtvm.lstm`) and the decoder (:mod:`pbtvm.decoder`) all turn float weights into packed
bitplanes the same way; this module is that one way, and the one record of a converted layer
that manifests, ``pbtvm inspect`` and error messages read.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np

from .bitplane import BitplaneFormat, pack_weights

__all__ = ["LayerRecord", "check_module_weights", "check_named_weights", "layers_format", "lower_weights", "weight_key"]


def weight_key(array: np.ndarray) -> str:
    """Content hash of a weight array (dtype, shape and bytes); equal weights share a key."""
    a = np.ascontiguousarray(array)
    h = hashlib.sha1(f"{a.dtype}{a.shape}".encode())
    h.update(a.data)  # the bytes without a copy
    return h.hexdigest()[:16]


def constant_array(const: Any) -> np.ndarray:
    """The value of a Relax constant in numpy; bfloat16 (no numpy dtype) as float32, as
    :func:`torch_weight_key` keys it."""
    value = const.value.numpy()
    return value.astype(np.float32) if str(const.value.dtype) == "bfloat16" else value


def torch_weight_key(weight: Any) -> str:
    """:func:`weight_key` of a torch weight as the rewrite keys its constant (bfloat16, which numpy
    lacks, as float32)."""
    import torch

    w = weight.detach().cpu()
    return weight_key((w.float() if w.dtype == torch.bfloat16 else w).numpy())


def check_module_weights(modules: dict[str, Any]) -> None:
    """Refuse a torch module whose weights hold NaN or Inf, naming the weight.

    Parameters
    ----------
    modules : dict
        Name (``""`` for the top module) -> ``nn.LSTM`` / ``nn.Linear`` (or None, skipped); every
        parameter whose name starts with ``weight`` is checked.

    Raises
    ------
    InputError
        ``layer head.weight (Linear): weights contain NaN or Inf``.
    """
    check_named_weights(
        (f"{prefix}{'.' if prefix else ''}{param} ({type(module).__name__})", w.detach().double().cpu().numpy())
        for prefix, module in modules.items()
        if module is not None
        for param, w in module.named_parameters()
        if param.startswith("weight")
    )


def check_named_weights(named: Iterable[tuple[str, np.ndarray]]) -> None:
    """:func:`pbtvm.quantize.checked_weights` on each ``(name, weight)``; an error names the layer
    (``layer NAME: weights contain NaN or Inf``, :func:`pbtvm.errors.naming_layer`)."""
    from .errors import naming_layer
    from .quantize import checked_weights

    for name, w in named:
        with naming_layer(name):
            checked_weights(w)


def _float_matrix(w: Any) -> np.ndarray:
    """A weight as float64 if it is, else float32."""
    a = np.asarray(w)
    return a if a.dtype == np.float64 else np.asarray(a, np.float32)


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """One converted weight matrix, as the manifest lists it (``layers.converted``).

    Attributes
    ----------
    name : str or None
        Readable layer name (the torch module path); None until the compiler names it.
    weight_key : str
        :func:`weight_key` of the float weight (maps layers back to torch modules).
    shape : list of int
        ``[N, K]`` of the float weight.
    bias : bool
        Whether the PB kernel adds a bias.
    codebook : str
        Codebook the layer's weights were quantized with.
    """

    name: str | None
    weight_key: str
    shape: list
    bias: bool
    codebook: str

    @classmethod
    def of(cls, name: str | None, weight: np.ndarray, fmt: BitplaneFormat, bias: bool) -> LayerRecord:
        """The record of float ``weight`` [N, K] lowered in ``fmt``."""
        return cls(name, weight_key(weight), [int(d) for d in weight.shape], bool(bias), fmt.codebook)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (no ``name`` key while the name is unknown)."""
        out = dataclasses.asdict(self)
        if self.name is None:
            del out["name"]
        return out


def layers_format(fmt: BitplaneFormat, converted: list[dict]) -> BitplaneFormat:
    """The model-level format of converted layers (:meth:`LayerRecord.as_dict`): ``fmt`` with
    their codebook when they all share one (``codebook="auto"`` picks it per layer), else ``fmt``
    (the manifest lists each layer's codebook)."""
    codebooks = {layer["codebook"] for layer in converted}
    if len(codebooks) != 1:
        return fmt
    return dataclasses.replace(fmt, codebook=codebooks.pop())


def lower_weights(
    weights: list[np.ndarray],
    fmt: BitplaneFormat,
    quant: tuple = (None, "mse"),
    importances: list | None = None,
    rows: np.ndarray | None = None,
) -> tuple[BitplaneFormat, list[tuple[Any, Any]]]:
    """Quantize and pack the weights of one PB kernel into Relax constants.

    Parameters
    ----------
    weights : list of np.ndarray, float, [N_i, K_i]
        Matrices that one kernel reads; they share one codebook (chosen jointly for ``"auto"``).
    fmt : BitplaneFormat
        Bits, act_bits and layout.
    quant : (codebook, method)
        As in :func:`pbtvm.quantize.layer_format`.
    importances : list of (np.ndarray [K_i] or None), optional
        Per-input error weights (calibration).
    rows : np.ndarray of int, optional
        Row permutation applied to every matrix first (the LSTM's unit-major order).

    Returns
    -------
    (BitplaneFormat, list of (planes, params))
        The layer's format (its codebook fixed) and per matrix the packed planes (uint32
        constant, ``fmt.weight_shape(N, K)``) and the row parameters (float32 constant: scales, and zero
        points for codebooks that have them).

    Raises
    ------
    ValueError
        For weights the quantizer rejects (e.g. NaN / Inf).
    """
    from ._tvm import relax
    from .quantize import layer_format

    # float64 kept: the quantizer casts to float32 and names values past its range (bfloat16, an
    # ml_dtypes type numpy does not call floating, as float32)
    mats = [_float_matrix(w) if rows is None else _float_matrix(w)[rows] for w in weights]
    layer_fmt, coded = layer_format(mats, fmt, *quant, importances)
    return layer_fmt, [(relax.const(pack_weights(q, layer_fmt), "uint32"), relax.const(s, "float32")) for q, s in coded]
