"""The schedule-rule protocol: registry, tunable rules, and limits read from the Target."""

from __future__ import annotations

import pytest

from pbtvm import bitplane as bp
from pbtvm import kernels, names
from pbtvm.schedules import RULES, KnobRule, ScheduleRule, TunableRule, apply_default_schedule, rule_for, rules_for
from pbtvm.schedules.cpu import CPUBitplaneGemm
from pbtvm.schedules.rules import rule_classes
from pbtvm.target import resolve_target

CPU = resolve_target("llvm")
SM90 = resolve_target({"kind": "cuda", "arch": "sm_90"})


def test_registry_lists_every_rule_once_per_target_kind():
    for kind, target in (("llvm", CPU), ("cuda", SM90)):
        classes = rule_classes(kind)
        assert len(classes) == len(set(classes)) == len(RULES[kind])
        assert all(issubclass(c, ScheduleRule) and c.target_kind == kind for c in classes)
        assert [type(r) for r in rules_for(target)] == classes
    with pytest.raises(ValueError, match="no schedules for target kind 'vulkan'"):
        rule_classes("vulkan")


def test_tunable_rules_are_the_gemms_and_the_bmma_lstm_step():
    """The GEMM rules tune: MetaSchedule templates (popcount CPU / CUDA, BMMA) and the AVX-512 knobs
    (the GEMM and the one-kernel layer); so does the BMMA LSTM step (knobs: its config)."""
    tunable = {type(r).__name__ for t in (CPU, SM90) for r in rules_for(t) if isinstance(r, TunableRule)}
    assert tunable == {"CPUBitplaneGemm", "CUDABitplaneGemm", "CUDABmmaGemm", "CUDABmmaDenseAct"}
    knobs = {type(r).__name__ for t in (CPU, SM90) for r in rules_for(t) if isinstance(r, KnobRule)}
    assert knobs == {"CPUVnniGemm", "CPUVnniDenseAct", "CUDABmmaLstmCell"}
    for rule in (r for t in (CPU, SM90) for r in rules_for(t) if isinstance(r, TunableRule)):
        assert rule.custom_rule in (names.RULE_BITPLANE_GEMM, names.RULE_BMMA_GEMM)


def test_a_rule_is_built_for_its_own_target_kind():
    with pytest.raises(ValueError, match="CPUBitplaneGemm schedules for llvm, not cuda"):
        CPUBitplaneGemm(SM90)


def test_cuda_rules_read_the_warp_size_from_the_target():
    """A 16-lane target splits K words over 16 lanes; the default schedule's loops say so."""
    func = kernels.dense_func(bp.BitplaneFormat(4, 8), 64, 4096)
    warp16 = resolve_target({"kind": "cuda", "arch": "sm_90", "thread_warp_size": 16})
    assert rule_for(func, warp16).limits.warp_size == 16

    def lane_loops(target, extent):
        return apply_default_schedule(func, target).script().count(f'T.thread_binding({extent}, thread="threadIdx.x")')

    assert (lane_loops(SM90, 32), lane_loops(SM90, 16)) == (1, 0)
    assert (lane_loops(warp16, 32), lane_loops(warp16, 16)) == (0, 1)
    with pytest.raises(ValueError, match="mma.sync needs 32-lane warps; the target has 16"):
        apply_default_schedule(kernels.dense_func(bp.BitplaneFormat(4, 8, layout="mma16x256"), 64, 512), warp16)


def test_cuda_rules_respect_the_threads_per_block_limit():
    small = resolve_target({"kind": "cuda", "arch": "sm_90", "max_threads_per_block": 256})
    func = kernels.dense_act_func(bp.BitplaneFormat(4, 8), 64, 650)
    with pytest.raises(ValueError, match="16 warps per block are 512 threads; the target allows 256"):
        apply_default_schedule(func, small)
    apply_default_schedule(func, SM90)
