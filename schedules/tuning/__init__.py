"""Tuning of the PB kernels: MetaSchedule search over the tunable rules, the log, and its use.

One concern a module:

========================  ==========================================================================
:mod:`.space`             which kernels are tunable (from the rules), their design spaces registered
                          as MetaSchedule custom rules, workloads and names
:mod:`.log`               the tuning log (MetaSchedule JSON database + metadata, lock, knob log)
:mod:`.rows`              what a valid database row is (checked before MetaSchedule reads it)
:mod:`.measure`           builders and runners (local or RPC), measuring one candidate
:mod:`.rpc_guard`         RPC runs that stop with an error when the tracker or the devices go away
:mod:`.report`            per-kernel reports and progress lines
:mod:`.search`            :func:`tune_kernels`: measure defaults and knobs, run the search
:mod:`.lookup`            :func:`tuned_lookup`: replay the best record, verified against the default
========================  ==========================================================================

The public names below are re-exported here: ``pbtvm.schedules.tuning.tune_kernels`` etc.
"""

from __future__ import annotations

from pbtvm._tvm import meta_schedule

from ..rules import KnobRule, ScheduleRule, TunableRule, rules_for
from .log import (
    KNOB_LOG,
    LOG_META,
    RECORDS,
    WORKLOADS,
    TuningLog,
    TuningLogError,
    check_rows,
    meta_mismatch,
    read_knob_file,
    target_key,
)
from .lookup import replay, tuned_lookup
from .measure import build_candidate, default_builder, default_runner, rpc_runner
from .report import KernelReport, Progress, TuneReport
from .rpc_guard import RPCDeviceError
from .search import tune_kernels
from .space import (
    DEFAULT_PIN,
    default_pin_key,
    kernel_name,
    knob_key,
    register_templates,
    sample_candidates,
    tunable_rule,
    tune_context,
    workload,
)

__all__ = [
    "DEFAULT_PIN",
    "meta_mismatch",
    "default_pin_key",
    "KNOB_LOG",
    "LOG_META",
    "RECORDS",
    "WORKLOADS",
    "KernelReport",
    "RPCDeviceError",
    "KnobRule",
    "Progress",
    "ScheduleRule",
    "TunableRule",
    "TuneReport",
    "TuningLog",
    "TuningLogError",
    "build_candidate",
    "check_rows",
    "default_builder",
    "default_runner",
    "kernel_name",
    "knob_key",
    "meta_schedule",
    "register_templates",
    "replay",
    "rpc_runner",
    "rules_for",
    "read_knob_file",
    "sample_candidates",
    "target_key",
    "tunable_rule",
    "tune_context",
    "tune_kernels",
    "tuned_lookup",
    "workload",
]
