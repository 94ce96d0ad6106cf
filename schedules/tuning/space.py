"""What is searched: the tunable rules' design spaces, registered as MetaSchedule custom rules.

* :func:`tunable_rule` -- which kernels are tunable comes from the rules: the rule that schedules a
  kernel on a target is a :class:`~pbtvm.schedules.rules.TunableRule` (a MetaSchedule template) or
  a :class:`~pbtvm.schedules.rules.KnobRule` (a few knobs measured directly), or the kernel is not
  tuned.
* :func:`register_templates` registers each tunable rule's template under the name TVM's
  ``ApplyCustomRule`` looks up for blocks tagged ``schedule_rule=<rule.custom_rule>``
  (``s_tir.meta_schedule.<target key>.<name>``). Every structural variant is one design space; its
  sampled knobs are explored by the evolutionary search with the XGBoost cost model.
* Kernels have a symbolic batch and a symbolic ``bitlayers``; MetaSchedule measures concrete
  workloads, so a kernel is tuned as :func:`workload` (batch and bitlayers fixed) and the winning
  trace is replayed onto the symbolic kernel at compile time (:mod:`.lookup`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from collections.abc import Callable, Iterator

from pbtvm import names
from pbtvm._tvm import meta_schedule, s_tir, tir, tvm

from ..rules import KnobRule, TunableRule, check_activation, rules_for


def tunable_rule(func: tir.PrimFunc, target: tvm.target.Target) -> TunableRule | KnobRule | None:
    """The rule that tunes ``func`` on ``target``: the matching rule if it is tunable, else None."""
    if names.kernel_kind(func) is None:
        return None
    check_activation(func)
    rule = next((r for r in rules_for(target) if r.matches(func)), None)
    return rule if isinstance(rule, TunableRule | KnobRule) else None


def _template_for(target: tvm.target.Target, custom_rule: str) -> Callable:
    """The MetaSchedule custom rule ``(sch, block) -> design spaces`` for one ``schedule_rule`` tag.

    It dispatches to the first :class:`TunableRule` of ``target`` with that tag that matches the
    kernel (a kernel another rule schedules by default, e.g. the AVX-512 GEMM, still gets the
    template of its kind when sampled directly).
    """
    templates = [r for r in rules_for(target) if isinstance(r, TunableRule) and r.custom_rule == custom_rule]

    def apply(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> list[s_tir.Schedule]:  # noqa: ARG001 - custom-rule signature
        func = sch.mod["main"]
        rule = next((r for r in templates if r.matches(func)), None)
        if rule is None:
            raise ValueError(f"no {custom_rule} template on {target.kind.name} for {names.kernel_kind(func)!r}")
        return rule.design_spaces(sch)

    return apply


def register_templates(target: tvm.target.Target) -> None:
    """Register ``target``'s templates under the names MetaSchedule's ``ApplyCustomRule`` looks up.

    The registration is per target kind (MetaSchedule's target key, e.g. ``cpu`` or ``cuda``) and
    binds the rules of ``target`` (their limits); the last target registered wins, so one process
    tunes one target at a time (as :func:`~.search.tune_kernels` does).
    """
    key = str(target.keys[0])
    tags = {r.custom_rule for r in rules_for(target) if isinstance(r, TunableRule)}
    for tag in tags:
        tvm.register_global_func(f"s_tir.meta_schedule.{key}.{tag}", _template_for(target, tag), override=True)


def workload(func: tir.PrimFunc, batch: int = 1) -> tir.PrimFunc:
    """``func`` with its symbolic dimensions set to ``batch``, ``bitlayers`` to all planes and any
    other scalar (the time loop step's ``t``) to 0.

    Parameters
    ----------
    func : tir.PrimFunc
        A PB kernel (``pbtvm.kernel`` attribute) with symbolic batch and a ``bitlayers`` scalar.
    batch : int
        The batch size to tune for.

    Returns
    -------
    tir.PrimFunc
        Static-shape copy with ``global_symbol`` "main", the unit MetaSchedule measures.
    """
    bits = int(func.attrs[names.ATTR_BITS])
    binds: dict = {}
    for param in func.params:
        if tir.is_buffer_var(param):
            if any(not isinstance(d, tir.IntImm) for d in param.shape):
                shape = [d if isinstance(d, tir.IntImm) else tir.const(batch, str(d.ty)) for d in param.shape]
                binds[param] = tir.decl_buffer(
                    shape, param.dtype, param.name, elem_offset=param.elem_offset, offset_factor=param.offset_factor
                )
        else:
            binds[param] = tir.const(bits if param.name == "bitlayers" else 0, str(param.ty))
    return func.specialize(binds).with_attr("global_symbol", "main")


def kernel_name(func: tir.PrimFunc) -> str:
    """A readable task name: kernel kind, format and shape, e.g. ``pb_gemm_w4a8_kNW_4096x4096``."""
    a = func.attrs
    n_rows = int(func.params[-1].shape[-1])
    zp = "o" if str(a.get(names.ATTR_CODEBOOK, "")) == "offset_binary" else ""  # zero-point epilogue
    act = f"_{a[names.ATTR_ACTIVATION]}" if names.ATTR_ACTIVATION in a else ""  # folded into the epilogue
    return (
        f"{a[names.ATTR_KERNEL]}_w{a[names.ATTR_BITS]}a{a[names.ATTR_ACT_BITS]}{zp}_{a[names.ATTR_LAYOUT]}"
        f"_{n_rows}x{a[names.ATTR_K]}{act}"
    )


def _space_generator(target: tvm.target.Target) -> object:
    ms = meta_schedule()
    post = ms.postproc
    postprocs = [post.VerifyGPUCode()] if target.kind.name == "cuda" else []
    return ms.space_generator.PostOrderApply(
        sch_rules=[ms.schedule_rule.ApplyCustomRule()],
        postprocs=postprocs,
        mutator_probs={ms.mutator.MutateTileSize(): 0.6, ms.mutator.MutateUnroll(): 0.4},
    )


def tune_context(func: tir.PrimFunc, target: tvm.target.Target, batch: int = 1, seed: int = -1) -> object:
    """A MetaSchedule ``TuneContext`` for one PB kernel with the pbtvm design spaces."""
    register_templates(target)
    ms = meta_schedule()
    mod = tvm.IRModule({"main": workload(func, batch)})
    with _without_tensor_intrinsics():
        return ms.TuneContext(
            mod,
            target=target,
            space_generator=_space_generator(target),
            # The PB design spaces are small (a few hundred points), so a smaller population than
            # MetaSchedule's default 512 explores them fully at a fraction of the cost.
            search_strategy=ms.search_strategy.EvolutionarySearch(
                population_size=128, init_min_unmeasured=32, genetic_num_iters=3
            ),
            task_name=kernel_name(func),
            rand_state=seed,
            num_threads=max(1, os.cpu_count() or 1),
        )


@contextlib.contextmanager
def _without_tensor_intrinsics() -> Iterator[None]:
    """Let ``TuneContext`` skip its ``import tvm.s_tir.tensor_intrin`` (see :func:`.measure.build_candidate`).

    While a placeholder module stands in for it, the import is a no-op; the placeholder is removed
    afterwards, so a later real import (someone tensorizing) still registers the intrinsics.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    placeholder = types.ModuleType(name)
    sys.modules[name] = placeholder
    try:
        yield
    finally:
        if sys.modules.get(name) is placeholder:
            del sys.modules[name]


def sample_candidates(
    func: tir.PrimFunc, target: tvm.target.Target, count: int, seed: int = 0, batch: int = 1
) -> list[s_tir.Schedule]:
    """``count`` random schedules from every design space, postprocessed as the search would.

    Returns
    -------
    list of s_tir.Schedule
        Candidates whose postprocessors all passed (a candidate the GPU verifier rejects is
        dropped, as in the search).
    """
    out = []
    for i in range(count):
        ctx = tune_context(func, target, batch, seed=seed + i)
        for space in ctx.generate_design_space():
            sch = space.copy()
            if all(p.apply(sch) for p in ctx.space_generator.postprocs):
                out.append(sch)
    return out


def knob_key(func: tir.PrimFunc, batch: int, variant: str = "") -> str:
    """Knob-log key of one :class:`KnobRule` kernel workload: its name plus a hash of the workload
    at ``batch``, and the rule's :meth:`~pbtvm.schedules.rules.KnobRule.knob_variant` after the hash
    (``name:b8:1f2e-avx512+gfni+amx``): one mcpu's log keeps the knobs of its AVX2, AVX-512 and
    AMX builds apart."""
    import tvm_ffi

    suffix = f"-{variant}" if variant else ""
    return f"{kernel_name(func)}:b{batch}:{tvm_ffi.structural_hash(workload(func, batch)):x}{suffix}"


#: Prefix of :func:`default_pin_key` entries in the knob log.
DEFAULT_PIN = "default-schedule:"


def default_pin_key(func: tir.PrimFunc, batch: int) -> str:
    """Knob-log key that pins a MetaSchedule kernel to its default schedule: the search's best was
    not confirmed faster side by side (:func:`.search._confirm`), or was not re-timed yet
    (``pending``). Its own prefix: a knob kernel of the same workload (another rule for the same
    function, e.g. under ``PBTVM_CPU_KERNEL``) keeps its entry."""
    return DEFAULT_PIN + knob_key(func, batch)


__all__ = [
    "DEFAULT_PIN",
    "default_pin_key",
    "kernel_name",
    "knob_key",
    "register_templates",
    "sample_candidates",
    "tunable_rule",
    "tune_context",
    "workload",
]
