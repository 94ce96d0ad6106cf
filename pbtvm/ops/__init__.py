"""Pure TE computes for PrecisionBatching; schedules live in ``pbtvm.schedules``.

Every PrimFunc made from these computes carries the attribute ``pbtvm.kernel`` (a
:class:`pbtvm.names.KernelKind`) and the format fields, so schedule rules read the format instead
of guessing; blocks are named by :mod:`pbtvm.names`.
"""

from .. import names
from ..bitplane import BitplaneFormat
from .act_pack import act_quantize_pack
from .lstm_cell import pb_lstm_cell, pb_lstm_cell_input, unit_major_rows
from .pb_gemm import pb_dense, pb_dense_act, pb_int_product

__all__ = [
    "KERNEL_VERSION",
    "act_quantize_pack",
    "pb_dense",
    "pb_dense_act",
    "pb_int_product",
    "pb_lstm_cell",
    "pb_lstm_cell_input",
    "unit_major_rows",
    "kernel_attrs",
]


#: Version of the PB kernels' TE computes. A tuning log holds MetaSchedule workloads by their
#: structural hash, so a change of a compute leaves every record unmatched: logs record this number
#: and one made for another is set aside with a warning. 2: the product reads plane
#: ``min(i, bits - 1)`` (:func:`pb_int_product`). 3: activation codes round the product to nearest
#: even (:func:`.common.act_code`; ``floor(x * inv + 0.5)`` was fused into a multiply-add on CPUs).
KERNEL_VERSION = 3


def kernel_attrs(kernel: names.KernelKind, fmt: BitplaneFormat, k_dim: int, activation: str | None = None) -> dict:
    """PrimFunc attributes for a PB kernel; schedules and the tuner key on them (``activation``:
    :data:`pbtvm.names.ATTR_ACTIVATION`, only where the epilogue applies one)."""
    attrs = {
        names.ATTR_KERNEL: names.KernelKind(kernel).value,
        names.ATTR_BITS: fmt.bits,
        names.ATTR_ACT_BITS: fmt.act_bits,
        names.ATTR_LAYOUT: fmt.layout,
        names.ATTR_CODEBOOK: fmt.codebook,
        names.ATTR_K: int(k_dim),
        names.ATTR_FORMAT_VERSION: fmt.version,
    }
    if activation is not None:
        attrs[names.ATTR_ACTIVATION] = activation
    return attrs
