"""The converter of torch's advanced indexing, ``aten.index.Tensor`` (``x[:, i, j]``, ``x[rows, cols]``).

TVM 0.27's converter took several index tensors one after the other, each over its own axis, when
a ``None`` (a full slice, ``:``) stood beside them: ``Z[:, i, j]`` with ``i`` and ``j`` of 6 values
came out ``[B, 6, 6]``, every pairing of ``i`` and ``j``, where torch pairs them element by element
and gives ``[B, 6]``. Nothing said so. This converter computes torch's indexing:

* the index tensors broadcast together to a shape ``S`` and pick elements jointly: the indexed axes
  merge into one (a reshape) and one ``take`` reads it at ``sum(i_k * stride_k)``;
* ``S`` replaces the indexed axes where they stand together, and comes first where a full slice
  separates them (torch's rule);
* a negative index counts from the end of its axis, as in torch.

An index past its axis cannot raise inside a compiled graph as torch's ``IndexError`` does: it is
clamped into its axis (the last element), so no read leaves the tensor. Boolean masks have a
data-dependent shape and are refused.
"""

from __future__ import annotations

import math
from typing import Any

from ._tvm import relax, tir
from .errors import InputError
from .relay_passes.normalize_constant_indices import size_tensor


def _product(sizes: list) -> Any:
    return math.prod(int(s) for s in sizes) if all(isinstance(s, (int, tir.IntImm)) for s in sizes) else _mul(sizes)


def _mul(sizes: list) -> Any:
    out = sizes[0]
    for s in sizes[1:]:
        out = out * s
    return out


def _index(node: Any, importer: Any) -> relax.Var:
    """``aten.index.Tensor(x, indices)``: ``indices`` one entry per leading axis of ``x``, None for a
    full slice, else an integer tensor."""
    x, indices = importer.retrieve_args(node)[:2]
    emit = importer.block_builder.emit
    shape = list(x.ty.shape)
    axes = [a for a, index in enumerate(indices) if index is not None]
    tensors = [indices[a] for a in axes]
    for t in tensors:
        if str(t.ty.dtype) == "bool":
            raise InputError(
                "indexing with a boolean mask gives a shape that depends on the data, which a compiled "
                "model cannot have: use torch.where(mask, x, 0) or multiply by the mask instead"
            )
    together = axes == list(range(axes[0], axes[-1] + 1))
    if not together:  # a full slice between index tensors: the indexed axes go first, as in torch
        rest = [a for a in range(len(shape)) if a not in axes]
        x = emit(relax.op.permute_dims(x, axes + rest))
        shape = [shape[a] for a in axes + rest]
        axes = list(range(len(axes)))
    first, sizes = axes[0], [shape[a] for a in axes]
    flat = None  # sum of index_k * stride_k over the indexed axes, broadcast together
    for k, (t, size) in enumerate(zip(tensors, sizes, strict=True)):
        t = t if str(t.ty.dtype) == "int64" else emit(relax.op.astype(t, "int64"))
        n, zero = size_tensor(size), relax.const(0, "int64")
        t = emit(relax.op.where(relax.op.less(t, zero), relax.op.add(t, n), t))
        t = emit(relax.op.minimum(relax.op.maximum(t, zero), relax.op.subtract(n, relax.const(1, "int64"))))
        if k + 1 < len(sizes):
            t = emit(relax.op.multiply(t, size_tensor(_product(sizes[k + 1 :]))))
        flat = t if flat is None else emit(relax.op.add(flat, t))
    merged = shape[:first] + [_product(sizes)] + shape[first + len(sizes) :]
    if len(sizes) > 1:
        x = emit(relax.op.reshape(x, merged))
    return emit(relax.op.take(x, flat, axis=first))


INDEX_CONVERTERS = {"index.Tensor": _index}

__all__ = ["INDEX_CONVERTERS"]
