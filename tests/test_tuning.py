"""MetaSchedule templates and tuning logs: sampled schedules are exact, logs are reused or refused.

The search itself runs in ``test_tune_then_compile_from_log`` (a few trials on the CPU); the CUDA
template is checked by building sampled candidates with nvcc (running them needs a GPU:
``tests/test_gpu.py``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

import pbtvm
from pbtvm import bitplane as bp
from pbtvm import kernels
from pbtvm import quantize as qz
from pbtvm._tvm import te, tir, tvm
from pbtvm.cuda import build as cuda_build
from pbtvm.schedules import tuning, verify
from pbtvm.target import resolve_target

from .models import MLP

CPU = resolve_target("llvm")
SM90 = resolve_target({"kind": "cuda", "arch": "sm_90"})


def _t(a: np.ndarray):
    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())


@pytest.mark.parametrize(("bits", "act_bits", "n", "k"), [(4, 8, 48, 200), (3, 6, 33, 96), (1, 8, 20, 64)])
def test_sampled_cpu_schedules_are_exact(bits, act_bits, n, k, rng):
    fmt = bp.BitplaneFormat(bits, act_bits)
    func = kernels.int_product_func(fmt, n, k)
    cands = tuning.sample_candidates(func, CPU, 3, seed=int(rng.integers(1 << 20)))
    (template,) = [r for r in tuning.rules_for(CPU) if isinstance(r, tuning.TunableRule)]
    assert len(cands) == 3 * len(template.variants(func))
    w = rng.standard_normal((n, k)).astype(np.float32)
    q, _ = qz.quantize_weights(w, fmt)
    wp = bp.pack_weights(q, fmt)
    for batch in (1, 3):
        x = rng.standard_normal((batch, k)).astype(np.float32)
        xq, _ = qz.quantize_activations(x, fmt)
        xp, rowsum = bp.pack_activations(xq, fmt), xq.sum(1).astype(fmt.accumulator_dtype(k))
        for sch in cands:
            kern = cuda_build(tuning.replay(func, sch.trace).with_attr("tirx.is_scheduled", True), CPU)
            out = _t(np.full((batch, n), -7, fmt.accumulator_dtype(k)))
            for layers in (1, bits):
                kern(_t(xp), _t(rowsum), _t(wp), layers, out)
                np.testing.assert_array_equal(
                    out.numpy(), bp.bitplane_matmul(wp, xp, fmt, layers), err_msg=str(sch.trace)
                )


@pytest.mark.parametrize(("n", "k"), [(64, 4096), (40, 650)])
def test_sampled_cuda_schedules_build_with_nvcc(n, k):
    fmt = bp.BitplaneFormat(4, 8)
    func = kernels.dense_func(fmt, n, k)
    variants = tuning.tunable_rule(func, SM90).variants(func)
    assert {v["x_shared"] for v in variants} == {False, True}
    if k == 4096:
        assert {v["vec"] for v in variants} == {1, 2, 4}
    cands = tuning.sample_candidates(func, SM90, 2, seed=5)
    assert len(cands) >= len(variants)
    shared = 0
    for sch in cands:
        ex = cuda_build(tuning.replay(func, sch.trace).with_attr("tirx.is_scheduled", True), SM90)
        (dev,) = ex.mod.imports
        src = str(dev.inspect_source("cuda")) or str(dev.inspect_source())
        assert "__global__" in src
        shared += "__shared__" in src
    assert shared > 0  # the shared-memory activation variant was generated


def test_custom_rule_is_registered_under_the_block_tag():
    for target, tags in ((CPU, ["pbtvm_bitplane_gemm"]), (SM90, ["pbtvm_bitplane_gemm", "pbtvm_bmma_gemm"])):
        tuning.register_templates(target)
        for tag in tags:
            assert tvm.get_global_func(f"s_tir.meta_schedule.{target.keys[0]}.{tag}", allow_missing=True)


def test_workload_fixes_batch_and_bitlayers():
    func = kernels.dense_func(bp.BitplaneFormat(3, 8), 16, 64)
    wl = tuning.workload(func, batch=4)
    assert len(wl.params) == len(func.params) - 1  # bitlayers is gone
    assert [int(d) for d in wl.params[0].shape] == [8, 4, 2]


def _mlp():
    torch.manual_seed(0)
    return MLP((64, 48, 10)).eval(), (torch.randn(2, 64),)


@pytest.mark.slow
def test_tune_then_compile_from_log(tmp_path, monkeypatch):
    # The MetaSchedule path: the popcount template (an AVX-512 host would use its fixed kernel,
    # whose knob search tests/test_cpu_vnni.py covers).
    monkeypatch.setenv("PBTVM_CPU_KERNEL", "popcount")
    model, example = _mlp()
    lines = []
    real_side_by_side = tuning.search.measure_side_by_side

    def best_twice_as_fast(*args):  # the real re-measure; its verdict fixed, so the test is not a coin toss
        default, best = real_side_by_side(*args)
        assert len(default) == len(best) == tuning.search.CONFIRM_ROUNDS
        return default, [t / 2 for t in default]

    monkeypatch.setattr(tuning.search, "measure_side_by_side", best_twice_as_fast)
    runners = []
    monkeypatch.setattr(
        tuning.search, "default_runner", lambda t: runners.append(tuning.default_runner(t)) or runners[-1]
    )
    report = pbtvm.tune(model, example, "llvm", bits=4, work_dir=tmp_path, trials=4, progress=lines.append)
    assert len(runners) == 1 and runners[0].pool._shutdown  # its worker ended by tune, not left to the GC
    assert len(report.kernels) == 2
    for k in report.kernels:
        assert k.trials >= 1 + 4 and k.built >= 1 and k.build_failed == 0, k.first_error  # default + search
        assert k.default_us and k.best_us and k.best_us <= k.default_us + 1e-9  # the default is in the log
        assert k.confirmed in (True, None)  # re-measured and kept, or the default was the best
        assert k.confirmed or k.best_us == k.default_us  # the default as best: no gain reported
    # One line per update: kernel i/2, candidates measured / (default + 4 trials), best so far, time left.
    updates = [
        re.match(r"\[pbtvm tune\] ([12])/2 (\S+): (\d+)/5 candidates measured, best ([0-9.]+) us", ln) for ln in lines
    ]
    updates = [m for m in updates if m]
    # the defaults (measured in one batch) start the clock; every update after them estimates
    timed = [m.string for m in updates if int(m[3]) > 1]
    assert {m[1] for m in updates} == {"1", "2"} and timed and all(ln.endswith(" left") for ln in timed)
    assert {m[2] for m in updates} == {k.name for k in report.kernels}
    assert min(int(m[3]) for m in updates) == 1 and max(int(m[3]) for m in updates) >= 5
    (log,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (log / "database_tuning_record.json").read_text().count("\n") >= 8

    # A second tuning run skips kernels already in the log.
    again = pbtvm.tune(model, example, "llvm", bits=4, work_dir=tmp_path, trials=4, progress=lines.append)
    assert again.kernels == []

    # Compiling from the log searches nothing and gives the default schedule's numbers.
    def no_search(*_a, **_k):
        raise AssertionError("compile searched although the log has every kernel")

    monkeypatch.setattr(tuning, "tune_kernels", no_search)
    monkeypatch.setattr(pbtvm.compiler, "tune_kernels", no_search)
    tuned = pbtvm.compile(model, example, "llvm", bits=4, work_dir=tmp_path)
    plain = pbtvm.compile(model, example, "llvm", bits=4)
    assert len(tuned.manifest["tuning"]["tuned_kernels"]) == 2
    x = torch.randn(5, 64)
    np.testing.assert_allclose(tuned(x).numpy(), plain(x).numpy(), rtol=1e-6, atol=1e-6)
    # The searched kernels are records only (their pins gone): at another batch the warning names them.
    with pytest.warns(UserWarning, match="decided none .* searched schedules of these names for another batch than 8"):
        at_8 = pbtvm.compile(model, example, "llvm", bits=4, work_dir=tmp_path, tune_batch=8)
    assert at_8.manifest["tuning"]["tuned_kernels"] == []

    # A tuned record whose kernel computes something else (here: nothing) is refused, loudly.
    monkeypatch.setattr(tuning.lookup, "replay", lambda func, _trace, *_limits: func.with_body(tir.Evaluate(0)))
    with pytest.warns(UserWarning, match="computes a different result than the default schedule"):
        refused = pbtvm.compile(model, example, "llvm", bits=4, work_dir=tmp_path)
    assert refused.manifest["tuning"]["tuned_kernels"] == []
    np.testing.assert_allclose(refused(x).numpy(), plain(x).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_an_unconfirmed_best_pins_the_kernel_to_its_default(tmp_path, monkeypatch, capsys):
    """The search's best, slower than the default side by side, is not used: the knob log pins the
    kernel, compile keeps the default schedule (no trace replayed) and inspect says so."""
    monkeypatch.setenv("PBTVM_CPU_KERNEL", "popcount")
    model, example = _mlp()
    monkeypatch.setattr(tuning.search, "_is_default", lambda *_: False)  # even if the search found the default
    monkeypatch.setattr(tuning.search, "measure_side_by_side", lambda *_: [[1e-5] * 3, [2e-5] * 3])
    report = pbtvm.tune(model, example, "llvm", bits=4, work_dir=tmp_path, trials=2, progress=lambda _: None)
    assert len(report.kernels) == 2
    for k in report.kernels:
        assert (k.confirmed, k.default_us, k.best_us) == (False, 10.0, 10.0) and k.search_us > 0
    (log,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    pins = json.loads((log / tuning.KNOB_LOG).read_text())
    assert sorted(k.split(":")[1] for k in pins) == sorted(k.name for k in report.kernels)
    assert all(k.startswith(tuning.DEFAULT_PIN) and v["schedule"] == "default" for k, v in pins.items())

    replayed = []
    monkeypatch.setattr(tuning.lookup, "replay", lambda func, _trace, *_limits: replayed.append(func) or func)
    m = pbtvm.compile(model, example, "llvm", bits=4, work_dir=tmp_path)
    assert replayed == []
    assert sorted(m.manifest["tuning"]["tuned_kernels"]) == sorted(k.name for k in report.kernels)  # from the log
    x = torch.randn(3, 64)
    np.testing.assert_array_equal(m(x).numpy(), pbtvm.compile(model, example, "llvm", bits=4)(x).numpy())
    from pbtvm.cli import main

    capsys.readouterr()
    assert main(["inspect", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    assert "knob search: 0 kernel(s)" in shown and "held at their default schedule" in shown, shown
    for k in report.kernels:
        assert f"    {k.name} (batch 1)  10.00 us, the search measured" in shown, shown


@pytest.mark.slow
def test_a_stopped_run_holds_its_kernels_at_the_default_until_tuned_again(tmp_path, monkeypatch, capsys):
    """Records reach the log while the search runs; a run stopped before the best was re-timed
    leaves each kernel held at its default (pending), compile uses no trace, and the next run
    searches again and, keeping the best, removes the hold."""
    monkeypatch.setenv("PBTVM_CPU_KERNEL", "popcount")
    model, example = _mlp()
    monkeypatch.setattr(tuning.search, "_is_default", lambda *_: False)

    def stopped(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(tuning.search, "measure_side_by_side", stopped)
    with pytest.raises(KeyboardInterrupt):
        pbtvm.tune(model, example, "llvm", bits=4, work_dir=tmp_path, trials=2, progress=lambda _: None)
    (log,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    held = json.loads((log / tuning.KNOB_LOG).read_text())
    assert len(held) == 2 and all(v == {"schedule": "default", "pending": True} for v in held.values())
    replayed = []
    monkeypatch.setattr(tuning.lookup, "replay", lambda func, _trace, *_limits: replayed.append(func) or func)
    with pytest.warns(UserWarning, match="stopped before it finished pb_gemm.*tune again to finish"):
        compiled = pbtvm.compile(model, example, "llvm", bits=4, work_dir=tmp_path)
    assert replayed == [] and compiled.manifest["tuning"]["tuned_kernels"] == []  # none decided by the log
    from pbtvm.cli import main

    capsys.readouterr()
    assert main(["inspect", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("a tuning run stopped before it re-timed the best") == 2

    monkeypatch.setattr(tuning.search, "measure_side_by_side", lambda *_: [[2e-5] * 3, [1e-5] * 3])
    again = pbtvm.tune(model, example, "llvm", bits=4, work_dir=tmp_path, trials=2, progress=lambda _: None)
    assert len(again.kernels) == 2 and all(k.confirmed for k in again.kernels)
    assert json.loads((log / tuning.KNOB_LOG).read_text()) == {}
    pbtvm.compile(model, example, "llvm", bits=4, work_dir=tmp_path)
    assert len(replayed) == 2


def test_bmma_problem_reads_a_sass_listing():
    from pbtvm.sass import BMMA_OPCODE, bmma_problem

    ok = f"  /*0090*/  {BMMA_OPCODE} R4, R8, R12, R4 ;"
    assert bmma_problem(ok) is None
    assert bmma_problem("  /*0090*/  POPC R4, R8 ;") == f"no {BMMA_OPCODE}"
    assert "emulated" in bmma_problem(ok + "\n  BMMA.168256.XOR.POPC R4, R8, R12, R4 ;")
    spilled = ok + "\n  /*00a0*/  STL [R1], R4 ;\n  /*00b0*/  LDL R4, [R1] ;"
    assert bmma_problem(spilled) == "2 LDL/STL (register spills)"


def test_measure_side_by_side_alternates_the_order():
    """Round 1 times a then b, round 2 b then a, ...; a module that fails to run drops out. Each
    module is sent alone and timed before the next is sent (never two at the same moment)."""
    ms = tuning.measure.meta_schedule()
    fmt = bp.BitplaneFormat(4, 8)
    mods = [tvm.IRModule({"main": tuning.workload(kernels.int_product_func(fmt, n, 64), 2)}) for n in (8, 16, 24)]
    order = []

    class Builder:
        def build(self, inputs):
            return [ms.builder.BuilderResult(f"/nonexistent/{i}/mod.tar", None) for i in range(len(inputs))]

    class Done:
        def __init__(self, path):
            self.path = path

        def result(self):
            failed = self.path.endswith("2/mod.tar") and len(order) > 3  # the third fails in round 2
            events.append("timed")
            return ms.runner.RunnerResult(None if failed else [1e-6, 3e-6], "boom" if failed else None)

    class Runner:
        def run(self, inputs):
            order.extend(str(i.artifact_path).split("/")[2] for i in inputs)
            events.append(f"sent {len(inputs)}")
            return [Done(str(i.artifact_path)) for i in inputs]

    events = []
    times = tuning.measure.measure_side_by_side(mods, CPU, Builder(), Runner(), rounds=3)
    assert order == ["0", "1", "2", "2", "1", "0", "0", "1"]
    assert events == ["sent 1", "timed"] * len(order)
    assert times == [[2e-6] * 3, [2e-6] * 3, None]


@pytest.mark.parametrize(
    ("default", "best", "kept", "default_us", "best_us"),
    [
        ([1e-5] * 3, [0.5e-5] * 3, True, 10.0, 5.0),
        ([1e-5, 3e-5, 1e-5], [0.9e-5, 0.5e-5, 4e-5], True, 10.0, 9.0),  # medians, not one lucky round
        ([1e-5] * 3, [0.99e-5] * 3, False, 10.0, 10.0),  # 1 % faster: within MIN_CONFIRMED_GAIN
        ([1e-5] * 3, [2e-5] * 3, False, 10.0, 10.0),
        ([1e-5] * 3, None, False, 10.0, 10.0),  # the best failed this time
        (None, [0.5e-5] * 3, True, 20.0, 5.0),  # the default failed this time: its earlier time stays
    ],
)
def test_confirm_keeps_the_best_only_when_faster_side_by_side(monkeypatch, default, best, kept, default_us, best_us):
    search = tuning.search
    monkeypatch.setattr(search, "measure_side_by_side", lambda *_args: [default, best])
    rep, lines = tuning.KernelReport("k", default_us=20.0, best_us=4.0), []
    assert search._confirm(rep, [], CPU, None, None, tuning.Progress(lines.append)) is kept
    assert (rep.confirmed, rep.default_us, rep.best_us, rep.search_us) == (kept, default_us, best_us, 4.0)
    assert lines[-1].endswith("best kept" if kept else "default kept")
    note = "the search's best (4.00 us) was not confirmed 3 % faster than the default"
    assert (note in tuning.TuneReport("log", "llvm", 1.0, [rep]).table()) is not kept


def test_measure_side_by_side_times_each_module_in_every_round():
    fmt = bp.BitplaneFormat(4, 8)
    mods = [tvm.IRModule({"main": tuning.workload(kernels.int_product_func(fmt, n, 64), 2)}) for n in (8, 16)]
    builder, runner = tuning.default_builder(CPU), tuning.default_runner(CPU)
    try:
        times = tuning.measure.measure_side_by_side(mods, CPU, builder, runner, rounds=3)
    finally:
        builder.close()
        tuning.measure.close_runner(runner)
    assert len(times) == 2 and all(len(t) == 3 and min(t) > 0 for t in times), times


def test_ctrl_c_while_candidates_build_stops_tuning_as_a_keyboard_interrupt(tmp_path):
    """Ctrl-C lands in Python code TVM calls back (the builder, inside MetaSchedule's FFI call):
    it came out of the tuning run as a bare RuntimeError (the CLI called it a bug in pbtvm)."""
    from tvm.ir.utils import derived_object

    ms = tuning.measure.meta_schedule()

    @derived_object
    class Interrupted(ms.builder.PyBuilder):
        def build(self, build_inputs):  # noqa: ARG002 - MetaSchedule's signature
            raise KeyboardInterrupt

    funcs = [kernels.int_product_func(bp.BitplaneFormat(4, 8), 8, 64)]
    with pytest.raises(KeyboardInterrupt):
        tuning.tune_kernels(funcs, CPU, tmp_path, trials_per_kernel=2, builder=Interrupted(), runner=object())


def test_time_left_leaves_out_the_start_up(monkeypatch):
    """10 s of start-up before the first result, then 1 s per candidate: 7 left is about 7 s, not
    the 28 s that counting the start-up in the rate gave."""
    from pbtvm.schedules.tuning.report import KernelReport, Progress

    clock = [0.0]
    monkeypatch.setattr(tuning.report.time, "perf_counter", lambda: clock[0])
    lines: list[str] = []
    prog = Progress(lines.append)
    rep = KernelReport("k")
    prog.add(rep, 10)
    for now, trials in ((10.0, 1), (12.0, 3)):
        clock[0], rep.trials = now, trials
        prog.update(rep)
    assert "left" not in lines[0] and lines[1].endswith("3/10 candidates measured, best -, about 7 s left")
    # Results of one batch arrive together (here 3 every 3 s): no "0 s left" within a burst.
    lines.clear()
    prog = Progress(lines.append)
    reps = [KernelReport(f"k{i}") for i in range(3)]
    for rep in reps:
        prog.add(rep, 3)
    for burst, now in enumerate((10.0, 13.0)):
        for i, rep in enumerate(reps):
            clock[0], rep.trials = now + 1e-4 * i, burst + 1
            prog.update(rep)
    assert all("left" not in ln for ln in lines[:3]), lines  # the first batch: start-up
    assert not any(ln.endswith(" 0 s left") for ln in lines) and lines[5].endswith("about 3 s left"), lines


def test_tuned_schedule_check_runs_on_a_local_device_only(rng):
    """A sampled schedule agrees with the default on the CPU; without a GPU nothing is claimed."""
    fmt = bp.BitplaneFormat(4, 8)
    func = kernels.dense_func(fmt, 40, 96, True)
    (sch,) = tuning.sample_candidates(func, CPU, 1, seed=int(rng.integers(1 << 20)))[:1]
    assert verify.agrees_with_default(func, tuning.replay(func, sch.trace), CPU) is True
    if verify.local_device(SM90) is None:
        assert verify.agrees_with_default(func, func, SM90) is None


def test_tuned_schedule_check_compares_every_output():
    """A tuned pack whose scales are wrong but whose code sums (the last output) are right is refused."""
    from pbtvm.ops import act_quantize_pack

    fmt = bp.BitplaneFormat(4, 8)
    func = kernels.act_pack_func(fmt, 96)
    assert [func.params[i].name for i in verify.output_params(func)] == ["pb_xpack", "pb_xscale", "pb_rowsum"]
    x = te.placeholder((tir.Var("batch", "int64"), 96), "float32", "x")
    xp, xs, rs = act_quantize_pack(x, fmt)
    wrong_scale = te.compute(xs.shape, lambda b: xs[b] * 2.0, name="pb_xscale_doubled")
    tampered = te.create_prim_func([x, xp, wrong_scale, rs]).with_attrs(dict(func.attrs))
    assert verify.agrees_with_default(func, tampered, CPU) is False
    assert verify.agrees_with_default(func, te.create_prim_func([x, xp, xs, rs]).with_attrs(dict(func.attrs)), CPU)


def _fake_log(path, target):
    log = tuning.TuningLog(path, target)
    with log.locked(exclusive=True):
        assert log.database(create=True) is not None
    return log


def _commit_default_record(database, func, target, secs):
    """Record ``func``'s default schedule as the tuner does: a trace replayed by the lookup."""
    ms = tuning.meta_schedule()
    mod = tvm.IRModule({"main": tuning.workload(func, 1)})
    sch = tuning.tunable_rule(func, target).traced_default(mod["main"])
    args = ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"])
    database.commit_tuning_record(
        ms.database.TuningRecord(sch.trace, database.commit_workload(mod), secs, target, args)
    )


def test_a_kernel_kept_at_its_default_is_decided_by_the_log(tmp_path):
    """As in the H200 log of three BMMA kernels (2026-12-04): one searched kernel replays its record,
    one whose best was not confirmed faster side by side has records and a default pin (the lookup
    gives None, yet the log decided it: ``kept_default`` says so), one kernel the log does not hold."""
    fmt = bp.BitplaneFormat(4, 8, layout="mma16x256")
    tuned, kept, absent = (kernels.dense_func(fmt, n, 256) for n in (64, 128, 32))
    log = _fake_log(tmp_path, SM90)
    database = log.database()
    for func in (tuned, kept):
        _commit_default_record(database, func, SM90, [5e-6] * 3)
    pin = {"schedule": "default", "us": 5.77, "default_us": 5.77, "search_us": 5.75}
    log.write_knobs({tuning.default_pin_key(kept, 1): pin})
    lookup, used = tuning.tuned_lookup(tmp_path, SM90)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "pbtvm: no local cuda device")  # no GPU here: replayed unchecked
        got = [lookup(func) for func in (tuned, kept, absent)]
    assert got[0] is not None and got[1] is None and got[2] is None
    assert used == [tuning.kernel_name(tuned), tuning.kernel_name(kept)]
    assert lookup.kept_default == [tuning.kernel_name(kept)]  # decided, as the default; absent: neither


def test_log_for_another_target_is_ignored_with_a_warning(tmp_path):
    _fake_log(tmp_path, resolve_target({"kind": "cuda", "arch": "sm_80"}))
    with pytest.warns(UserWarning, match="cuda-sm_80 but none for cuda-sm_90"):
        lookup, _ = tuning.tuned_lookup(tmp_path, SM90)
    assert lookup is None


@pytest.mark.parametrize(
    ("asked", "held", "said"),
    [
        (  # tuned at another batch only
            {"pb_gemm_w4a8_kNW_48x64"},
            ["pb_gemm_w4a8_kNW_48x64:b1:ab", "pb_gemm_w4a8_kNW_48x64:b16:cd"],
            "tuned at batch 1, 16, not 8 (compile(..., tune_batch=1) or pbtvm compile --tune-batch 1 uses those)",
        ),
        (  # the same name at this batch: its workload hash changed
            {"pb_gemm_w4a8_kNW_48x64"},
            ["pb_gemm_w4a8_kNW_48x64:b8:ab", "pb_gemm_w4a8_kNW_48x64:b1:cd"],
            "or builds for other instruction sets: tune this model for this target)",
        ),
        (  # the same layer in another weight layout
            {"pb_dense_act_w4a8o_lut16x4_16x48", "pb_dense_act_w4a8o_lut16x4_48x64"},
            ["pb_dense_act_w4a8o_kNW_48x64:b8:ab"],
            "weight layout 'kNW', this build uses 'lut16x4' (compile(..., layout='kNW') uses those)",
        ),
        (  # the same layer at another format
            {"pb_gemm_w3a8_kNW_48x64"},
            ["pb_gemm_w4a8o_kNW_48x64:b8:ab"],
            "tuned as w4a8o, this build is w3a8",
        ),
        (  # another kernel kind, or a shape and a layout apart: nothing to suggest
            {"pb_gemm_w4a8_kNW_48x64"},
            ["pb_lstm_cell_w4a8_kNW_48x64:b8:ab", "pb_gemm_w4a8_lut16x4_16x64:b8:cd"],
            "it holds 2 other kernel(s), e.g. pb_lstm_cell_w4a8_kNW_48x64 (another model or format)",
        ),
        ({"pb_gemm_w4a8_kNW_48x64"}, ["not a key"], None),
        (  # a hand-edited batch: no batch to suggest (and no crash)
            {"pb_gemm_w4a8_kNW_48x64"},
            ["pb_gemm_w4a8_kNW_48x64:bx:ab"],
            "it holds 1 other kernel(s)",
        ),
        (  # searched (MetaSchedule) records: named, their batch not
            {"pb_gemm_w4a8_kNW_48x64"},
            ["searched:pb_gemm_w4a8_kNW_48x64"],
            "searched schedules of these names for another batch than 8",
        ),
        (  # ... and the same layer searched in another layout
            {"pb_gemm_w4a8_mma16x256_48x64"},
            ["searched:pb_gemm_w4a8_kNW_48x64"],
            "weight layout 'kNW', this build uses 'mma16x256'",
        ),
    ],
)
def test_a_log_that_matches_no_kernel_says_why(asked, held, said):
    searched = [key.removeprefix("searched:") for key in held if key.startswith("searched:")]
    held = [key for key in held if not key.startswith("searched:")]
    reason = tuning.lookup.unmatched_reason(asked, held, 8, searched)
    assert reason == said if said is None else said in reason, reason


def test_compiling_from_a_log_that_decides_no_kernel_warns(tmp_path):
    """An empty log and a log of another weight layout are named; the model is still built."""
    model, example = _mlp()
    tuning.TuningLog(tmp_path, CPU).database(create=True)
    with pytest.warns(
        UserWarning, match=r"decided none of this model's 2 tunable PB kernel\(s\): the log holds no kernel"
    ):
        m = pbtvm.compile(model, example, "llvm", bits=4, work_dir=tmp_path)
    assert m.manifest["tuning"]["tuned_kernels"] == []
    # the layers tuned in the kNW layout (AVX2 kernels: one knob setting measured), read by a lut16x4 build
    haswell = "llvm -mcpu=haswell"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a log of another target beside it is no reason to warn while tuning
        pbtvm.tune(model, example, haswell, bits=4, layout="kNW", work_dir=tmp_path, trials=1, progress=lambda _: None)
    with pytest.warns(
        UserWarning, match=r"weight layout 'kNW', this build uses 'lut16x4' \(compile\(\.\.\., layout='kNW'\)"
    ):
        pbtvm.compile(model, example, "llvm -mcpu=haswell", bits=4, layout="lut16x4", work_dir=tmp_path)


def test_compile_lstm_tunes_its_cells_into_the_log(tmp_path, monkeypatch):
    """``compile_lstm(tune=True)`` tunes the steps' kernels as well as the projections (those
    through ``compile``), into the same log, and reads it back without a warning."""
    from pbtvm.lstm import compile_lstm

    tuned = []
    real = tuning.search.tune_kernels

    def recording(funcs, *args, **kwargs):
        tuned.extend(str(f.attrs["pbtvm.kernel"]) for f in funcs)
        return real(funcs, *args, **kwargs)

    monkeypatch.setattr(tuning, "tune_kernels", recording)
    monkeypatch.setattr(pbtvm.compiler, "tune_kernels", recording)
    lstm = torch.nn.LSTM(20, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        compiled = compile_lstm(lstm, "llvm", bits=4, tune=True, work_dir=tmp_path, trials=1)
    assert "pb_lstm_cell" in tuned and any(kind.startswith("pb_dense") or kind == "pb_gemm" for kind in tuned), tuned
    x = torch.randn(3, 2, 20)
    np.testing.assert_array_equal(compiled(x)[0].numpy(), compile_lstm(lstm, "llvm", bits=4)(x)[0].numpy())


def test_the_target_log_directory_itself_is_accepted_as_work_dir(tmp_path, monkeypatch):
    """``tune`` prints ``log <work_dir>/<target key>``; passing that directory finds the same log.
    Another target's log directory is named in a warning; a file is an error."""
    log = _fake_log(tmp_path, CPU)
    assert tuning.TuningLog(log.path, CPU).path == log.path and tuning.TuningLog(log.path, CPU).usable()
    monkeypatch.chdir(log.path)  # "." from inside the log directory
    assert tuning.TuningLog(".", CPU).path.resolve() == log.path.resolve()
    sm80 = _fake_log(tmp_path / "gpu", resolve_target({"kind": "cuda", "arch": "sm_80"}))
    with pytest.warns(UserWarning, match=rf"{sm80.path} is the tuning log of cuda-sm_80, not of cuda-sm_90"):
        assert not tuning.TuningLog(sm80.path, SM90).usable()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(tuning.TuningLogError, match="notes.txt is a file, not a directory of tuning logs"):
        tuning.TuningLog(tmp_path / "notes.txt", CPU)


@pytest.mark.parametrize(
    ("key", "value"),
    [("tvm_version", "0.19.0"), ("format_version", 0), ("kernel_version", 1), ("kernel_version", None)],
)
def test_log_from_another_version_is_ignored_with_a_warning(tmp_path, key, value):
    """Another TVM, bitplane format or PB compute (whose workloads no longer match the log's
    records; None: a log from before the kernel version was recorded)."""
    log = _fake_log(tmp_path, CPU)
    meta = json.loads((log.path / tuning.LOG_META).read_text())
    meta[key] = value
    if value is None:
        del meta[key]
    (log.path / tuning.LOG_META).write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=f"ignoring tuning log .*{key}"):
        lookup, _ = tuning.tuned_lookup(tmp_path, CPU)
    assert lookup is None
    with warnings.catch_warnings(record=True) as caught:  # tuning moves it aside and starts afresh
        warnings.simplefilter("always")
        assert log.database(create=True) is not None
    assert any("moved the old tuning log aside" in str(w.message) for w in caught)
    assert tuning.TuningLog(tmp_path, CPU).usable()


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_corrupt_log_is_a_clear_error(tmp_path, damage):
    log = _fake_log(tmp_path, CPU)
    rec = log.path / tuning.RECORDS
    if damage == "garbage":
        rec.write_text('[0, {"trace": "ok"}]\nnot json at all\n')
    else:
        rec.write_text('[0, [["GetSBlock", [], ["pb_gemm"')
    with pytest.raises(tuning.TuningLogError, match=f"{rec.name} is corrupt at line"):
        tuning.tuned_lookup(tmp_path, CPU)
    (log.path / tuning.LOG_META).write_text("{oops")
    with pytest.raises(tuning.TuningLogError, match="pbtvm_log.json is corrupt"):
        tuning.tuned_lookup(tmp_path, CPU)


def test_a_log_tvm_cannot_read_is_a_clear_error(tmp_path):
    """Rows of valid JSON that TVM's reader still refuses (a hand edit) are named with what to do,
    not TVM's "parallel_for_dynamic error"; an empty work_dir (an unset setting) is refused."""
    log = _fake_log(tmp_path, CPU)
    (log.path / tuning.WORKLOADS).write_text('["0x1", "not a module"]\n')
    with pytest.raises(tuning.TuningLogError, match=r"is corrupt: TVM cannot read its records .* then tune again"):
        tuning.tuned_lookup(tmp_path, CPU)
    with pytest.raises(tuning.TuningLogError, match="work_dir is empty"):
        pbtvm.compile(*_mlp(), "llvm", work_dir="")


def test_tuning_runs_into_one_work_dir_take_turns(tmp_path):
    """A second process cannot write the log while a tuning run holds it."""
    log = _fake_log(tmp_path, CPU)
    probe = textwrap.dedent(
        f"""
        import fcntl, sys
        fh = open({str(log.lock_path)!r}, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit(3)
        sys.exit(0)
        """
    )
    with log.locked(exclusive=True):
        assert subprocess.run([sys.executable, "-c", probe], check=False).returncode == 3
    assert subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0
    # a run that moves a stale log aside keeps its lock (it was a file inside the moved directory:
    # a second run locked a fresh one and overwrote the first's knobs)
    meta = log.path / tuning.LOG_META
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "kernel_version": -1}))
    with log.locked(exclusive=True):
        with pytest.warns(UserWarning, match="moved the old tuning log aside"):
            assert log.database(create=True) is not None
        assert subprocess.run([sys.executable, "-c", probe], check=False).returncode == 3


def test_unusual_log_directories_are_named(tmp_path):
    """A file where the log directory goes, a directory without pbtvm's metadata, a read-only
    log: clear errors or warnings (were FileExistsError / OSError as internal errors, or silence)."""
    log = tuning.TuningLog(tmp_path, CPU)
    log.path.write_text("x")
    with pytest.raises(tuning.TuningLogError, match=r"is a file, not a tuning log directory.*another work_dir"):
        tuning.tuned_lookup(tmp_path, CPU)
    log.path.unlink()
    log.path.mkdir()
    (log.path / tuning.KNOB_LOG).write_text("{}")
    with pytest.warns(UserWarning, match="holds files but no pbtvm_log.json"):
        assert tuning.tuned_lookup(tmp_path, CPU)[0] is None
    with log.locked(exclusive=True), pytest.warns(UserWarning, match="moved the old tuning log aside"):
        assert log.database(create=True) is not None
    shared = tmp_path / "shared"
    _fake_log(shared, CPU).lock_path.unlink()
    tuning.TuningLog(shared, CPU).lock_path.mkdir()  # a lock file that cannot be opened, even by root,
    # as in a read-only work_dir (a shared copy of a log): read without the lock (was an OSError)
    assert tuning.tuned_lookup(shared, CPU)[0] is not None
    with pytest.raises(tuning.TuningLogError, match="cannot tune into"):
        tuning.TuningLog(shared, CPU).locked(exclusive=True).__enter__()


def test_compile_tune_needs_work_dir():
    model, example = _mlp()
    with pytest.raises(ValueError, match="needs a work_dir"):
        pbtvm.compile(model, example, "llvm", tune=True)
