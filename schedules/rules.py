"""Rule protocol and dispatch: which rule schedules which PB PrimFunc on which target.

A rule has a *default* schedule (measured, no search) and a *tunable template*: a set of
structural variants (:meth:`ScheduleRule.variants`), each a MetaSchedule design space whose
numeric knobs are sampled (``sample_perfect_tile``, ``sample_categorical``) so that the
evolutionary search and the XGBoost cost model can explore them. Structure that changes the
sequence of schedule instructions must be a variant, not a sample: a trace replays its
instructions with new decisions, it cannot take another branch of Python code.
"""

from __future__ import annotations

import logging

from pbtvm import names
from pbtvm._tvm import s_tir, tir, tvm

logger = logging.getLogger(__name__)

UNROLL_STEPS = (0, 16, 64, 512)


class ScheduleRule:
    """A schedule for one PB kernel kind on one target kind.

    Subclasses set ``kernel`` (the PrimFunc's ``pbtvm.kernel`` attribute) and ``target_kinds``,
    and implement :meth:`schedule` (and :meth:`variants` if the template has structural choices).
    """

    kernel: names.KernelKind | None = None
    target_kinds: tuple[str, ...] = ()

    def matches(self, func: tir.PrimFunc, target: tvm.target.Target) -> bool:
        """Whether this rule handles ``func`` on ``target``."""
        return target.kind.name in self.target_kinds and names.kernel_kind(func) == self.kernel

    def variants(self, func: tir.PrimFunc, target: tvm.target.Target) -> list[dict]:
        """Structural variants of the tunable template (one MetaSchedule design space each)."""
        return [{}]

    def apply(self, func: tir.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule:
        """The default schedule of ``func`` (no sampled decisions); see :func:`rule_for`."""
        sch = s_tir.Schedule(func, debug_mask=0)
        self.schedule(sch, func, target, False, {})
        return sch

    def schedule(
        self, sch: s_tir.Schedule, func: tir.PrimFunc, target: tvm.target.Target, tunable: bool, variant: dict
    ) -> None:
        """Transform ``sch`` in place.

        ``tunable`` asks for sampled (``sample_*``) decisions within the structural ``variant``.
        """
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


def rules_for(target: tvm.target.Target | str) -> list[ScheduleRule]:
    """The rules for a target (or target kind, ``"llvm"`` or ``"cuda"``)."""
    from . import cpu, cpu_vnni, cuda, cuda_ballot_pack, cuda_bmma

    kind = target if isinstance(target, str) else target.kind.name
    if kind == "llvm":
        # The AVX-512 GEMM first: it matches only where the CPU and the format allow it.
        return [
            cpu.CPUActPack(),
            cpu_vnni.CPUVnniGemm(),
            cpu.CPUBitplaneGemm(),
            cpu.CPUDenseAct(),
            cpu.CPULSTMCell(),
        ]
    if kind == "cuda":
        return [
            cuda.CUDAActPack(),
            cuda.CUDABitplaneGemm(),
            cuda.CUDADenseAct(),
            cuda.CUDALSTMCell(),
            # binary tensor cores: kernels of the mma16x256 layout (rule_for prefers them)
            cuda_bmma.CUDABmmaGemm(),
            cuda_bmma.CUDABmmaDenseAct(),
            cuda_ballot_pack.CUDABallotPack(),
        ]
    raise ValueError(f"pbtvm has no schedules for target kind {kind!r} (supported: llvm, cuda)")


def rule_for(func: tir.PrimFunc, target: tvm.target.Target) -> ScheduleRule:
    """The rule that handles ``func`` on ``target``.

    Raises
    ------
    ValueError
        If ``func`` is a PB kernel that no rule for ``target`` handles.
    """
    rules = rules_for(target)
    # A rule for one weight layout (``layout`` attribute) goes before the generic ones.
    for rule in sorted(rules, key=lambda r: getattr(r, "layout", None) is None):
        if rule.matches(func, target):
            return rule
    raise ValueError(f"no schedule rule for PB kernel {func.attrs.get('pbtvm.kernel')!r} on {target.kind.name}")


def apply_default_schedule(func: tir.PrimFunc, target: tvm.target.Target) -> tir.PrimFunc:
    """Apply the default schedule of the matching rule; the result is marked scheduled for DLight.

    Raises
    ------
    ValueError
        If ``func`` is a PB kernel that no rule for ``target`` handles.
    """
    sch = rule_for(func, target).apply(func, target)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
