"""Schedule rules for the PrecisionBatching kernels, one module per target kind.

Installed as ``pbtvm.schedules``. A rule is an object with
``apply(func, target, tunable=False) -> s_tir.Schedule | None``; ``None`` means "not mine".
"""

from .rules import ScheduleRule, apply_default_schedule, rules_for

__all__ = ["ScheduleRule", "apply_default_schedule", "rules_for"]
