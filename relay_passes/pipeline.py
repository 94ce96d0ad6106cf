"""The PrecisionBatching pass pipeline, run before TVM's own Relax pipeline."""

from __future__ import annotations

from pbtvm._tvm import tvm
from pbtvm.bitplane import BitplaneFormat

from .apply_pb_schedules import ApplyPBSchedules
from .pb_linear_rewrite import PBLinearRewrite


def pb_passes(
    fmt: BitplaneFormat, target: tvm.target.Target, lookup=None
) -> tuple[PBLinearRewrite, tvm.transform.Pass]:  # noqa: ANN001
    """Return the rewrite pass (kept for its report) and the whole PB pipeline.

    Phases: (1) graph rewrite of dense layers into PB kernels; (2) schedules for the PB kernels.
    TVM's default pipeline (legalize, fuse, DLight for the rest, VM lowering) follows in
    ``tvm.compile``.
    """
    rewrite = PBLinearRewrite(fmt)
    return rewrite, tvm.transform.Sequential([rewrite, ApplyPBSchedules(target, lookup)], name="pbtvm")
