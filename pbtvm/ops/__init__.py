"""Pure TE computes for PrecisionBatching; schedules live in ``pbtvm.schedules``.

Every PrimFunc made from these computes carries the attribute ``pbtvm.kernel`` (``"act_pack"``,
``"pb_gemm"``, ``"pb_dense_act"`` or ``"pb_lstm_cell"``) and the format fields, so schedule rules read the format instead of guessing.
"""

from .act_pack import act_quantize_pack
from .lstm_cell import pb_lstm_cell, pb_lstm_cell_input, unit_major_rows
from .pb_gemm import pb_dense, pb_dense_act, pb_int_product

__all__ = [
    "act_quantize_pack",
    "pb_dense",
    "pb_dense_act",
    "pb_int_product",
    "pb_lstm_cell",
    "pb_lstm_cell_input",
    "unit_major_rows",
    "kernel_attrs",
]


def kernel_attrs(kernel: str, fmt, k_dim: int) -> dict:  # noqa: ANN001 - BitplaneFormat
    """PrimFunc attributes for a PB kernel; schedules and the tuner key on them."""
    return {
        "pbtvm.kernel": kernel,
        "pbtvm.bits": fmt.bits,
        "pbtvm.act_bits": fmt.act_bits,
        "pbtvm.layout": fmt.layout,
        "pbtvm.codebook": fmt.codebook,
        "pbtvm.k": int(k_dim),
        "pbtvm.format_version": fmt.version,
    }
