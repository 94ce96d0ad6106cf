"""Rule protocol and dispatch: which rule schedules which PB PrimFunc on which target.

In the spirit of TVM dlight's ``ScheduleRule.apply(func, target, tunable)``, with the target
bound when a rule is made (:func:`rules_for` builds the rules of one target):

* :class:`ScheduleRule` -- every rule. ``apply(func)`` returns the *default* schedule (measured,
  no search). A rule reads hardware limits from :attr:`ScheduleRule.limits` (warp size, threads and
  shared memory per block, from the Target), never from literals.
* :class:`TunableRule` -- a rule with a MetaSchedule *template*: structural variants
  (:meth:`TunableRule.variants`), each a design space whose numeric knobs are sampled
  (``sample_perfect_tile``, ``sample_categorical``) so that the evolutionary search and the XGBoost
  cost model can explore them. Structure that changes the sequence of schedule instructions must
  be a variant, not a sample: a trace replays its instructions with new decisions, it cannot take
  another branch of Python code.
* :class:`KnobRule` -- a rule that builds a kernel already scheduled, with a few named knobs that
  the tuner measures directly (no MetaSchedule trace: there is nothing to replay).

Adding a kernel family: a new module with its rule class and one line in :data:`RULES`.
"""

from __future__ import annotations

import importlib
import logging

from pbtvm import names
from pbtvm._tvm import s_tir, tir, tvm
from pbtvm.bitplane import MMA_LAYOUT, BitplaneFormat
from pbtvm.target import TargetInfo, TargetLimits

logger = logging.getLogger(__name__)

UNROLL_STEPS = (0, 16, 64, 512)

#: The rules of each target kind, as ``"module:Class"`` under this package, in match order: a rule
#: for one weight layout or one CPU feature set goes before the generic rule of its kernel kind.
RULES: dict[str, tuple[str, ...]] = {
    "llvm": (
        "cpu:CPUActPack",
        "cpu_vnni:CPUVnniGemm",  # the AVX-512 GEMM first: it matches only where the CPU and the format allow it
        "cpu:CPUBitplaneGemm",
        "cpu_vnni:CPUVnniDenseAct",  # one kernel per layer on AVX-512 CPUs (quantize + GEMM)
        "cpu:CPUDenseAct",
        "cpu_vnni:CPUVnniLstmCell",  # the LSTM step with the AVX-512 products, same condition
        "cpu:CPULSTMCell",
    ),
    "cuda": (
        # binary tensor cores: kernels of the mma16x256 layout
        "cuda_bmma:CUDABmmaGemm",
        "cuda_bmma:CUDABmmaDenseAct",
        "cuda_ballot_pack:CUDABallotPack",
        "cuda_bmma_lstm:CUDABmmaLstmCell",
        "cuda:CUDAActPack",
        "cuda:CUDABitplaneGemm",
        "cuda:CUDADenseAct",
        "cuda:CUDALSTMCell",
    ),
}


class ScheduleRule:
    """The default schedule of one PB kernel kind on one target.

    Subclasses set ``kernel`` (the PrimFunc's ``pbtvm.kernel`` attribute) and ``target_kind``, and
    implement :meth:`schedule` (or override :meth:`apply` when they build a new kernel instead).
    The PrimFunc being scheduled is ``sch.mod["main"]``.

    Parameters
    ----------
    target : tvm.target.Target
        The (resolved) target the rule schedules for; :attr:`limits` comes from it.

    Raises
    ------
    ValueError
        If ``target`` is not of the rule's ``target_kind``.
    """

    kernel: names.KernelKind
    target_kind: str

    def __init__(self, target: tvm.target.Target) -> None:
        if target.kind.name != self.target_kind:
            raise ValueError(f"{type(self).__name__} schedules for {self.target_kind}, not {target.kind.name}")
        self.target = target
        self.limits: TargetLimits = TargetInfo.of(target).limits

    def matches(self, func: tir.PrimFunc) -> bool:
        """Whether this rule handles ``func``."""
        return names.kernel_kind(func) == self.kernel

    def apply(self, func: tir.PrimFunc) -> s_tir.Schedule:
        """The default schedule of ``func`` (no sampled decisions)."""
        sch = s_tir.Schedule(func, debug_mask=0)
        self.schedule(sch)
        return sch

    def schedule(self, sch: s_tir.Schedule) -> None:
        """Transform ``sch`` (a fresh schedule of the kernel) in place into the default schedule."""
        raise NotImplementedError


class TunableRule(ScheduleRule):
    """A rule with a MetaSchedule template next to its default schedule.

    Subclasses set ``custom_rule`` (the ``schedule_rule`` annotation on the kernel's block that
    MetaSchedule's ``ApplyCustomRule`` looks up) and implement :meth:`template`.
    """

    custom_rule: str

    def variants(self, func: tir.PrimFunc) -> list[dict]:
        """Structural variants of the template for ``func`` (one MetaSchedule design space each)."""
        raise NotImplementedError

    def template(self, sch: s_tir.Schedule, variant: dict) -> None:
        """Transform ``sch`` in place with sampled (``sample_*``) decisions within ``variant``."""
        raise NotImplementedError

    def traced_default(self, func: tir.PrimFunc) -> s_tir.Schedule:
        """The default schedule as schedule instructions on ``func``, so that its trace can be replayed.

        The same as :meth:`apply` unless the rule turns the scheduled function into a new kernel
        afterwards (the BMMA rule: the trace annotates a config, the build materializes it). The
        tuner records this trace for the default, next to the search's candidates.
        """
        sch = s_tir.Schedule(func, debug_mask=0)
        self.schedule(sch)
        return sch

    def design_spaces(self, sch: s_tir.Schedule) -> list[s_tir.Schedule]:
        """One copy of ``sch`` per variant, each with the template applied (MetaSchedule custom rule)."""
        func = sch.mod["main"]
        spaces = []
        for variant in self.variants(func):
            space = sch.copy()
            self.template(space, variant)
            spaces.append(space)
        return spaces


class KnobRule(ScheduleRule):
    """A rule whose kernel is built scheduled, with knobs the tuner measures one setting at a time.

    Subclasses set ``label`` (how reports name the kernel, e.g. ``"avx512"``).
    """

    label: str

    def knob_variant(self) -> str:
        """What besides the workload decides the kernel a knob setting builds (e.g. the CPU's
        instruction sets): part of the knob-log key (:func:`~pbtvm.schedules.tuning.space.knob_key`),
        so knobs timed on one kernel are not used for another. Empty: the workload alone."""
        return ""

    def knob_settings(self, func: tir.PrimFunc) -> list[dict]:
        """Knob settings to measure, the default first."""
        raise NotImplementedError

    def kernel_with(self, func: tir.PrimFunc, knobs: dict) -> tir.PrimFunc:
        """The kernel for ``func`` with ``knobs`` (a setting from :meth:`knob_settings`)."""
        raise NotImplementedError


def sample_unroll(sch: s_tir.Schedule, loop: s_tir.LoopRV) -> None:
    """Sample an explicit-unroll depth for the loops under ``loop`` (a tunable knob).

    The pragma goes on a loop, not on the root block as MetaSchedule's own rules do: in TVM
    0.27 annotating the root block breaks copy-on-write, so a later primitive edits the
    function every other design space was copied from.
    """
    depth = sch.sample_categorical(list(UNROLL_STEPS), [1.0 / len(UNROLL_STEPS)] * len(UNROLL_STEPS))
    sch.annotate(loop, "pragma_auto_unroll_max_step", depth)
    sch.annotate(loop, "pragma_unroll_explicit", 1)


def inline_act_quantization(sch: s_tir.Schedule, tag: str = "") -> None:
    """Inline the activation scale inverse and codes into their consumers (pack and code sum).

    ``tag`` is the block-name suffix of the pack (see :func:`pbtvm.ops.act_quantize_pack`).
    """
    sch.compute_inline(sch.get_sblock(names.XINV + tag))
    sch.compute_inline(sch.get_sblock(names.XQ + tag))


def lstm_cell_legs(func: tir.PrimFunc) -> tuple[str, ...]:
    """Block-name suffixes of the PB products in an LSTM-step PrimFunc.

    ``("",)`` for the recurrent product alone; ``("", names.INPUT_TAG)`` when the step computes its
    input projection too (:func:`pbtvm.ops.pb_lstm_cell_input`, attribute ``pbtvm.input_size``).
    """
    return ("", names.INPUT_TAG) if names.ATTR_INPUT_SIZE in (func.attrs or {}) else ("",)


def format_of(func: tir.PrimFunc) -> BitplaneFormat | None:
    """The :class:`BitplaneFormat` a PB PrimFunc was made for (None if its attributes lack one)."""
    attrs = func.attrs or {}
    codebook = attrs.get(names.ATTR_CODEBOOK)
    try:
        return BitplaneFormat(
            int(attrs[names.ATTR_BITS]),
            int(attrs[names.ATTR_ACT_BITS]),
            None if codebook is None else str(codebook),
            layout=str(attrs[names.ATTR_LAYOUT]),
        )
    except (KeyError, ValueError, TypeError):
        return None


def lstm_cell_operands(func: tir.PrimFunc) -> tuple | None:
    """``(batch var, input size or None, bias, steps var or None)`` of a ``pb_lstm_cell``
    PrimFunc from :mod:`pbtvm.kernels` / the LSTM time loop, None if its parameters are not one's.

    The rules that replace the TE step with a kernel of their own (the AVX-512 and the BMMA step)
    read from it which of the step's forms to build."""
    buffers = [p for p in func.params if tir.is_buffer_var(p)]
    input_size = (func.attrs or {}).get(names.ATTR_INPUT_SIZE)
    if input_size is not None:  # x, wp_ih, ws_ih[, bias], h, c, wp_hh, ws_hh, h', c'
        if len(buffers) not in (9, 10):
            return None
        return buffers[0].shape[0], int(input_size), len(buffers) == 10, None
    if len(buffers) != 7:  # gx, h, c, wp, w_scale, h', c'
        return None
    gx = buffers[0]
    return buffers[1].shape[0], None, False, gx.shape[0] if len(gx.shape) == 3 else None


def rule_classes(kind: str) -> list[type[ScheduleRule]]:
    """The rule classes registered for a target kind (:data:`RULES`), in match order.

    Raises
    ------
    ValueError
        For a target kind without rules.
    """
    if kind not in RULES:
        raise ValueError(f"pbtvm has no schedules for target kind {kind!r} (supported: {', '.join(RULES)})")
    out = []
    for entry in RULES[kind]:
        module, cls = entry.split(":")
        out.append(getattr(importlib.import_module(f"{__package__}.{module}"), cls))
    return out


def rules_for(target: tvm.target.Target) -> list[ScheduleRule]:
    """The rules for ``target``, built with its limits, in match order."""
    return [cls(target) for cls in rule_classes(target.kind.name)]


def check_activation(func: tir.PrimFunc, name: str = "the PB kernel") -> None:
    """Raise ValueError for a PB function with an activation (:data:`pbtvm.names.ATTR_ACTIVATION`)
    outside the ``mma16x256`` layout: only the binary-tensor-core kernels apply it (the AVX-512 and
    table-lookup kernels are built from the format and would drop it, silently)."""
    attrs = func.attrs or {}
    activation, layout = attrs.get(names.ATTR_ACTIVATION), attrs.get(names.ATTR_LAYOUT)
    if activation is not None and str(layout) != MMA_LAYOUT:
        raise ValueError(
            f"{name}: its epilogue applies {activation}, which only the {MMA_LAYOUT} (binary tensor core) "
            f"kernels do; this one is in the {layout} layout (FuseActivationIntoPB folds activations only there)"
        )


def rule_for(func: tir.PrimFunc, target: tvm.target.Target) -> ScheduleRule:
    """The first rule for ``target`` that handles ``func``.

    Raises
    ------
    ValueError
        If ``func`` is a PB kernel that no rule for ``target`` handles, or has an activation
        outside the ``mma16x256`` layout (:func:`check_activation`).
    """
    check_activation(func)
    for rule in rules_for(target):
        if rule.matches(func):
            return rule
    raise ValueError(f"no schedule rule for PB kernel '{names.kernel_kind(func)}' on {target.kind.name}")


def apply_default_schedule(func: tir.PrimFunc, target: tvm.target.Target) -> tir.PrimFunc:
    """Apply the default schedule of the matching rule; the result is marked scheduled for DLight.

    Raises
    ------
    ValueError
        If ``func`` is a PB kernel that no rule for ``target`` handles.
    """
    sch = rule_for(func, target).apply(func)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
