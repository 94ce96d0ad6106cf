"""Converters for torch's convolutions that keep the model's dtype.

TVM 0.27's importer gives every convolution ``out_dtype="float32"``: a float16 / bfloat16 / float64
convolution came back as float32 (float64 computed in float32, 1e-7 off), and one followed by a
layer or a bias failed to build with a dtype mismatch. Here a convolution accumulates in float32
for float16 / bfloat16 (torch's accumulation type) and in its own dtype otherwise; the bias is
added in that accumulation type, and the result rounded once to the input's dtype, as torch does.
"""

from __future__ import annotations

from typing import Any

from ._tvm import relax

#: Relax op, data layout and kernel layout by (transposed, spatial rank).
_OPS = {
    (False, 1): (relax.op.nn.conv1d, "NCW", "OIW"),
    (False, 2): (relax.op.nn.conv2d, "NCHW", "OIHW"),
    (False, 3): (relax.op.nn.conv3d, "NCDHW", "OIDHW"),
    (True, 1): (relax.op.nn.conv1d_transpose, "NCW", "IOW"),
    (True, 2): (relax.op.nn.conv2d_transpose, "NCHW", "IOHW"),
}


def _emit_convolution(importer: Any, x: Any, weight: Any, bias: Any, transposed: bool, **attrs: Any) -> relax.Var:
    """The convolution of ``x`` [N, C, *spatial] by ``weight`` (+ ``bias`` per output channel) in
    ``x``'s dtype; ``attrs`` as torch names them (strides, padding, dilation, output_padding, groups)."""
    emit = importer.block_builder.emit
    dtype = str(x.ty.dtype)
    rank = x.ty.ndim - 2
    if (transposed, rank) not in _OPS:
        kind = "transposed " if transposed else ""
        raise ValueError(f"TVM 0.27 has no {kind}convolution of a {x.ty.ndim}-d input")
    op, data_layout, kernel_layout = _OPS[transposed, rank]
    accumulate = "float32" if dtype in ("float16", "bfloat16") else dtype
    if not transposed:
        attrs.pop("output_padding", None)
    out = emit(op(x, weight, data_layout=data_layout, kernel_layout=kernel_layout, out_dtype=accumulate, **attrs))
    if bias is not None:
        if str(bias.ty.dtype) != accumulate:
            bias = emit(relax.op.astype(bias, accumulate))
        out = emit(relax.op.add(out, relax.op.reshape(bias, [1, -1] + [1] * rank)))
    return out if accumulate == dtype else emit(relax.op.astype(out, dtype))


def _convolution(node: Any, importer: Any) -> relax.Var:
    """``aten.convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups)``."""
    args = importer.retrieve_args(node)
    x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = args[:9]
    return _emit_convolution(
        importer,
        x,
        weight,
        bias,
        transposed,
        strides=stride,
        padding=padding,
        dilation=dilation,
        output_padding=output_padding,
        groups=groups,
    )


#: ``custom_convert_map`` entries, by aten name.
CONV_CONVERTERS = {"convolution.default": _convolution}  # torch.export's decompositions leave only this form

__all__ = ["CONV_CONVERTERS"]
