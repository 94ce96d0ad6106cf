"""Schedule rules for the PrecisionBatching kernels, one module per kernel family, and their tuning.

Installed as ``pbtvm.schedules``. Every rule (:class:`ScheduleRule`) has a default schedule; the
tunable ones are :class:`TunableRule` (a MetaSchedule template: the bitplane GEMM on CPU and CUDA,
the binary-tensor-core GEMM) or :class:`KnobRule` (a kernel built scheduled, with knobs measured
directly: the AVX-512 GEMM). Rules are built per target (:func:`rules_for`) with the target's
limits; :data:`~.rules.RULES` lists them per target kind. :mod:`.tuning` runs the search and reads /
writes the tuning log; :mod:`.verify` checks a tuned kernel against the default schedule on a local
device before the compiler uses it.
"""

from .rules import RULES, KnobRule, ScheduleRule, TunableRule, apply_default_schedule, rule_for, rules_for

__all__ = ["RULES", "KnobRule", "ScheduleRule", "TunableRule", "apply_default_schedule", "rule_for", "rules_for"]
