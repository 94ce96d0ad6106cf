"""Converters for the norms whose statistics come from the input: group, instance and layer norm.

TVM 0.27's ``group_norm`` and ``instance_norm`` take the variance as ``E[x^2] - E[x]^2`` in float32,
which cancels where the mean is large against the spread: over groups of 1,024 values of mean 100
and spread 3 the output was 2e-3 off, where torch's is 5e-6 off. TVM's ``group_norm`` also refuses
bfloat16 data and a missing weight, and its converter of ``_native_batch_norm_legit.no_stats``
(which ``InstanceNorm`` and a ``BatchNorm`` without running statistics become) fails on a run-time
batch: torch views the input as ``[1, N*C, ...]`` and the converter takes ``int(N*C)``.

TVM's ``layer_norm`` refuses float64 ("only support float32 and float16", an internal error at
build); float64 layer norms are computed here too, the others left to TVM's converter.

These converters compute as torch does: the mean first, then the mean square of the deviations
(biased), in float32 for float16 / bfloat16 (torch's accumulation type), rounded once to the
input's dtype; then the weight and bias where given (per channel, axis 1, for group and instance
norm; over the normalised trailing axes for layer norm). The ``native`` ops return torch's tuple
``(out, mean, rstd)``. torch.export's decompositions (which TVM's importer runs) leave only the
``native`` forms of group and layer norm.
"""

from __future__ import annotations

from typing import Any

from ._tvm import relax


def _compute_dtype(dtype: str) -> str:
    return "float64" if dtype == "float64" else "float32"


def _normalised(emit: Any, data: relax.Expr, axes: list[int], eps: float) -> tuple[relax.Var, ...]:
    """``((data - mean) * rstd, mean, rstd)`` with ``mean`` and ``rstd = 1 / sqrt(var + eps)`` over
    ``axes`` (kept as size 1) and ``var`` the mean square of the deviations, in ``data``'s dtype."""
    mean = emit(relax.op.mean(data, axis=axes, keepdims=True))
    centred = emit(relax.op.subtract(data, mean))
    variance = emit(relax.op.mean(relax.op.multiply(centred, centred), axis=axes, keepdims=True))
    rstd = emit(relax.op.rsqrt(relax.op.add(variance, relax.const(eps, str(data.ty.dtype)))))
    return emit(relax.op.multiply(centred, rstd)), mean, rstd


def _per_channel(emit: Any, out: relax.Var, importer: Any, weight: Any, bias: Any) -> relax.Var:
    """``out * weight + bias`` with the 1-d ``weight`` / ``bias`` (fx nodes, or None: skipped) along
    ``out``'s axis 1."""
    rank, dtype = out.ty.ndim, str(out.ty.dtype)
    for arg, combine in ((weight, relax.op.multiply), (bias, relax.op.add)):
        if arg is None:
            continue
        value = importer.env[arg]
        if str(value.ty.dtype) != dtype:
            value = emit(relax.op.astype(value, dtype))
        if rank > 2:
            value = emit(relax.op.expand_dims(value, list(range(1, rank - 1))))
        out = emit(combine(out, value))
    return out


def _finish(emit: Any, dtype: str, out: relax.Var, stats: tuple[relax.Expr, ...] | None) -> relax.Var:
    """``out`` rounded to ``dtype``; with ``stats`` the tuple ``(out, *stats)``, stats rounded too."""
    items = [out, *(stats or ())]
    if str(out.ty.dtype) != dtype:
        items = [emit(relax.op.astype(v, dtype)) for v in items]
    return items[0] if stats is None else emit(relax.Tuple(items))


def _group_norm(node: Any, importer: Any) -> relax.Var:
    """``aten.native_group_norm(x, weight, bias, N, C, HxW, groups, eps)`` -> ``(out, mean, rstd)``
    (``mean`` and ``rstd`` of shape ``[N, groups]``), over ``x`` of shape ``[N, C, *spatial]``."""
    x, weight, bias, *_, groups, eps = node.args
    emit = importer.block_builder.emit
    data = importer.env[x]
    dtype, shape = str(data.ty.dtype), list(data.ty.shape)
    data = emit(relax.op.astype(data, _compute_dtype(dtype)))
    grouped = emit(relax.op.reshape(data, [shape[0], groups, -1]))
    scaled, mean, rstd = _normalised(emit, grouped, [2], eps)
    out = _per_channel(emit, emit(relax.op.reshape(scaled, shape)), importer, weight, bias)
    return _finish(emit, dtype, out, (emit(relax.op.squeeze(mean, [2])), emit(relax.op.squeeze(rstd, [2]))))


def _batch_statistics_norm(node: Any, importer: Any) -> relax.Var:
    """``aten._native_batch_norm_legit.no_stats(x, weight, bias, training, momentum, eps)`` ->
    ``(out, mean, rstd)``: ``x`` of shape ``[N, C, *spatial]`` normalised per channel over every
    other axis (``mean`` and ``rstd`` of shape ``[C]``). ``InstanceNorm`` comes as this op on ``x``
    viewed as ``[1, N*C, *spatial]``."""
    x, weight, bias = node.args[:3]
    eps = node.args[5] if len(node.args) > 5 else node.kwargs.get("eps", 1e-5)
    emit = importer.block_builder.emit
    data = importer.env[x]
    dtype, rank = str(data.ty.dtype), data.ty.ndim
    data = emit(relax.op.astype(data, _compute_dtype(dtype)))
    axes = [0, *range(2, rank)]
    scaled, mean, rstd = _normalised(emit, data, axes, eps)
    out = _per_channel(emit, scaled, importer, weight, bias)
    return _finish(emit, dtype, out, (emit(relax.op.squeeze(mean, axes)), emit(relax.op.squeeze(rstd, axes))))


def _layer_norm(node: Any, importer: Any) -> relax.Var:
    """``aten.native_layer_norm(x, shape, weight, bias, eps)`` -> ``(out, mean, rstd)``: ``x``
    normalised over its last ``len(shape)`` axes. float64 here; other dtypes by TVM's converter."""
    data = importer.env[node.args[0]]
    if str(data.ty.dtype) != "float64":  # TVM 0.27's own converter (float32 / float16 kernels)
        return importer._native_layer_norm(node)
    _, shape, weight, bias, eps = node.args
    emit = importer.block_builder.emit
    axes = list(range(data.ty.ndim - len(shape), data.ty.ndim))
    out, mean, rstd = _normalised(emit, data, axes, eps)
    for arg, combine in ((weight, relax.op.multiply), (bias, relax.op.add)):
        if arg is not None:  # of shape ``shape``: broadcast over the leading axes
            out = emit(combine(out, importer.env[arg]))
    return emit(relax.Tuple([out, mean, rstd]))


#: ``custom_convert_map`` entries, by aten name.
NORM_CONVERTERS = {
    "native_group_norm.default": _group_norm,
    "_native_batch_norm_legit.no_stats": _batch_statistics_norm,
    "native_layer_norm.default": _layer_norm,
}

__all__ = ["NORM_CONVERTERS"]
