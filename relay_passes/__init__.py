"""Graph rewrites for PrecisionBatching, written as **Relax** passes.

The folder keeps its historical name, but TVM >= 0.20 has no Relay: Relax replaced it as TVM's
graph IR, so every pass here is a Relax ``module_pass``. Installed as ``pbtvm.relay_passes``.

One pass per file; :mod:`.pipeline` strings them together.
"""

from .apply_pb_schedules import ApplyPBSchedules
from .pb_linear_rewrite import ConversionReport, PBLinearRewrite
from .pipeline import pb_passes

__all__ = ["ApplyPBSchedules", "ConversionReport", "PBLinearRewrite", "pb_passes"]
