"""Schedule rules for the PrecisionBatching kernels, one module per target kind, and their tuning.

Installed as ``pbtvm.schedules``. A rule (:class:`ScheduleRule`) has a measured default schedule
and a tunable template; :mod:`.tuning` registers the templates as MetaSchedule custom rules,
runs the search and reads / writes the tuning log; :mod:`.verify` checks a tuned kernel against
the default schedule on a local device before the compiler uses it.
"""

from .rules import ScheduleRule, apply_default_schedule, rule_for, rules_for

__all__ = ["ScheduleRule", "apply_default_schedule", "rule_for", "rules_for"]
