"""The ``pbtvm`` command line: every subcommand once, and a bad-input case for each."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pbtvm.cli import main
from pbtvm.ops import KERNEL_VERSION

from .models import MLP

MODEL_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
        return model, (torch.randn(2, 64),)

    def not_a_model():
        return 42

    def raises():
        raise KeyError("a bug in the user's factory")

    def wrong_example():
        return nn.Linear(64, 10), (torch.randn(2, 63),)
    """
)


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "zoo.py"
    path.write_text(MODEL_FILE)
    return f"{path}:make"


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("module", ["pbtvm.cli", "pbtvm"])
def test_console_script_help(module):
    """``python -m pbtvm`` is the command line too (it said "'pbtvm' is a package and cannot be
    directly executed"), with its argument errors' exit status."""
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0
    for cmd in ("compile", "tune", "bench", "eval", "inspect"):
        assert cmd in proc.stdout
    proc = subprocess.run([sys.executable, "-m", module, "compile"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "pbtvm" in proc.stderr and "error" in proc.stderr


#: In a fresh process: the CLI's help and an argument error, then a pbtvm input error raised inside
#: a pass (Python called back from TVM's C++) once TVM is imported. Prints what was imported when.
LAZY_IMPORTS = textwrap.dedent(
    """
    import contextlib, io, sys
    from pbtvm.cli import main

    for argv in (["--help"], ["compile", "--bits"]):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                main(argv)
            except SystemExit as done:
                assert done.code in (0, 2), done.code
    print("before:", sorted(m for m in ("tvm", "tvm_ffi", "torch") if m in sys.modules))

    from pbtvm._tvm import tvm
    from pbtvm.errors import InputTypeError

    @tvm.transform.module_pass(opt_level=0)
    def refuse(mod, ctx):
        raise InputTypeError("layer fc: a made-up problem")

    try:
        refuse(tvm.IRModule())
    except Exception as err:
        print("from the pass:", type(err).__name__)
    """
)


def test_help_needs_no_tvm_and_input_errors_cross_the_ffi_as_themselves():
    """``pbtvm --help`` and argument errors import neither TVM nor torch (they took 7 s, now a
    fraction of one); pbtvm registers its input errors with TVM's FFI when it imports TVM, so one
    raised inside a pass still reaches the CLI as a user error."""
    proc = subprocess.run([sys.executable, "-c", LAZY_IMPORTS], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "before: []" in proc.stdout, proc.stdout
    assert "from the pass: InputTypeError" in proc.stdout, proc.stdout


def test_compile_and_inspect(spec, tmp_path, capsys):
    so = tmp_path / "m.so"
    code, out, _ = _run(["compile", spec, "--bits", 3, "--codebook", "offset_binary", "-o", so], capsys)
    assert code == 0 and so.exists() and "2 layer(s) in PrecisionBatching" in out
    code, out, _ = _run(["inspect", so], capsys)
    assert code == 0 and "W3A8 offset_binary" in out and out.count("PB ") == 2
    assert len(re.findall(r"^  PB .* offset_binary$", out, re.M)) == 2, out  # each layer's codebook
    assert "checks   manifest, weights and code match their checksums" in out
    code, out, _ = _run(["inspect", so, "--json"], capsys)
    assert json.loads(out)["format"]["bits"] == 3
    data = bytearray(so.read_bytes())  # a flipped weight byte: inspect says load would refuse it
    from pbtvm import library

    (blob,) = [s for s in library.elf_sections(bytes(data), str(so)) if s.name == library.DEVBIN_SECTION]
    data[blob.offset + blob.size // 2] ^= 0xFF
    so.write_bytes(bytes(data))
    code, out, _ = _run(["inspect", so], capsys)
    assert code == 0 and "checks   FAILED, pbtvm.load refuses it: " in out and "checksum mismatch" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compile", "missing.py:make", "-o", "x.so"], "missing.py does not exist"),
        (["compile", "{spec_dir}/zoo.py:not_a_model", "-o", "x.so"], "must return (model, example_inputs)"),
        (["compile", "{spec_dir}/zoo.py:make", "--bits", "0", "-o", "x.so"], "bits"),
        (["compile", "{spec_dir}/zoo.py:make", "--target", "metal", "-o", "x.so"], "unsupported target kind"),
        (["compile", "model.pt", "-o", "x.so"], "model file model.pt does not exist"),
        (["compile", "justaname", "-o", "x.so"], "MODEL must be"),
        (["compile", "{spec_dir}/zoo.py:make", "--layout", "mma16x256", "-o", "x.so"], "not on llvm"),
        (
            ["compile", "{spec_dir}/zoo.py:make", "--codebook", "bipolar", "-o", "x.so"],
            "bipolar codebook is for bits=1",
        ),
        # the user's code and example are the user's errors (exit 2), not "internal error" (exit 1)
        (["compile", "{spec_dir}/zoo.py:raises", "-o", "x.so"], "zoo.py:raises() raised KeyError"),
        (["compile", "{spec_dir}/zoo.py:wrong_example", "-o", "x.so"], "does not run on the example input(s) ([2, 63]"),
    ],
)
def test_compile_bad_input(argv, message, spec, tmp_path, capsys):  # noqa: ARG001 - spec writes the model file
    argv = [a.replace("{spec_dir}", str(tmp_path)) for a in argv]
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert err.startswith("pbtvm: error:") and message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_bench_on_cuda_without_a_gpu_is_refused_before_compiling(spec, capsys):
    code, _, err = _run(["bench", spec, "--target", '{"kind": "cuda", "arch": "sm_90"}'], capsys)
    assert code == 2 and "needs a CUDA GPU" in err, err


def test_pt_model_with_a_wrong_input_shape(tmp_path, capsys):
    path = tmp_path / "mlp.pt"
    torch.save(MLP((16, 8, 4)), path)
    code, _, err = _run(["compile", path, "--input-shape", "1x15", "-o", tmp_path / "x.so"], capsys)
    assert code == 2 and "does not run on the example input(s) ([1, 15] float32)" in err, err


def test_output_to_standard_output_and_batches_a_model_cannot_take_are_named(tmp_path, capsys):
    """``-o -`` wrote a file named "-"; bench of a model without a batch dimension failed inside its
    timing loop as an internal error."""
    path = tmp_path / "lin.pt"
    torch.save(torch.nn.Linear(8, 4), path)
    code, _, err = _run(["compile", path, "--input-shape", "1x8", "-o", "-"], capsys)
    assert code == 2 and "not to standard output" in err, err
    with pytest.warns(UserWarning, match="could not be made dynamic"):
        code, _, err = _run(["bench", path, "--input-shape", "8"], capsys)
    assert code == 2 and "torch fp32 does not run on a batch of 1 made from the example" in err, err


def test_pt_model_needs_input_shape(tmp_path, capsys):
    path = tmp_path / "mlp.pt"
    torch.save(MLP((16, 8, 4)), path)
    code, _, err = _run(["compile", path, "-o", tmp_path / "x.so"], capsys)
    assert code == 2 and "--input-shape" in err
    code, out, _ = _run(["compile", path, "--input-shape", "1x16", "-o", tmp_path / "x.so"], capsys)
    assert code == 0, out


def test_inspect_bad_input(tmp_path, capsys):
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"\x7fELF" + bytes(100))
    code, _, err = _run(["inspect", junk], capsys)
    assert code == 2 and "junk.so" in err
    code, _, err = _run(["inspect", tmp_path / "nothing"], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = _run(["inspect", "/dev/null"], capsys)  # was "no such file"
    assert code == 2 and "/dev/null is not a regular file" in err
    code, _, err = _run(["inspect", tmp_path], capsys)
    assert code == 2 and "no pbtvm tuning log" in err
    log = tmp_path / "logs" / "llvm-x"
    log.mkdir(parents=True)
    (log / "pbtvm_log.json").write_text("{}")
    (log / "pbtvm_cpu_kernels.json").write_text("[1, 2]")
    code, _, err = _run(["inspect", tmp_path / "logs"], capsys)
    assert code == 2 and "pbtvm_cpu_kernels.json is corrupt" in err
    # a setting whose default failed to build has no default time: shown as "-"
    knobs = {"pb_gemm_w4a8_kNW_8x64:b1:ab": {"row_tile": 2, "batch_tile": 4, "us": 1.5, "default_us": None}}
    (log / "pbtvm_cpu_kernels.json").write_text(json.dumps(knobs))
    code, out, _ = _run(["inspect", tmp_path / "logs"], capsys)
    assert code == 0 and "pb_gemm_w4a8_kNW_8x64 (batch 1)  row_tile=2 batch_tile=4  1.50 us (default -)" in out, out
    # a log of no known version (here: no metadata at all) is one compile would not use
    assert "compile ignores this log and tune sets it aside: it has no schema (an older pbtvm made it)" in out, out


def test_tune_then_inspect_log(spec, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PBTVM_CPU_KERNEL", "popcount")  # the MetaSchedule path (AVX-512 knobs: test_cpu_vnni)
    logs = tmp_path / "logs"
    code, out, _ = _run(["tune", spec, "--work-dir", logs, "--trials", 2], capsys)
    assert code == 0 and "pb_gemm_w4a8" in out and "tuning time" in out
    # progress: one line per update, per kernel measured / total (default + 2 trials), best, time left
    progress = re.findall(r"^\[pbtvm tune\] [12]/2 pb_gemm_\S+: (\d)/3 candidates measured.*best.*$", out, re.M)
    assert "1" in progress and max(progress) >= "2", out
    # after the defaults' batch every update estimates the time left
    assert all(ln.endswith(" left") for ln in re.findall(r"^\[pbtvm tune\] .*: [23]/3 candidates.*$", out, re.M)), out
    code, out, _ = _run(["inspect", logs], capsys)
    assert code == 0 and "2 kernel workload(s)" in out
    # 2 kernels x (default schedule + 2 trials), and the line says so
    assert re.search(r"\b6 measured candidate\(s\) \(per kernel: its default schedule plus every trial\)", out), out
    assert f"PB kernels v{KERNEL_VERSION}" in out and "compile ignores" not in out, out
    code, out, _ = _run(["compile", spec, "--work-dir", logs, "-o", tmp_path / "t.so"], capsys)
    assert code == 0 and "2 kernel(s) scheduled as the tuning log says" in out
    # a log tuned at another batch is read at that one (--tune-batch), here it is not (the reason
    # reads the records: kept defaults are listed by batch, searched schedules by name)
    with pytest.warns(
        UserWarning, match=r"(tuned at batch 1, not 3|another batch than 3).* pbtvm compile --tune-batch"
    ):
        code, _, _ = _run(["compile", spec, "--work-dir", logs, "--tune-batch", 3, "-o", tmp_path / "t3.so"], capsys)
    assert code == 0


def test_compile_tune_without_work_dir_names_the_option(spec, capsys):
    """The CLI names its option; it prints warnings on one line and gives the caller's warning
    format back when it returns."""
    import warnings

    before = warnings.formatwarning
    code, _, err = _run(["compile", spec, "--tune", "-o", "t.so"], capsys)
    assert code == 2 and "--tune needs --work-dir" in err
    code, _, err = _run(["compile", spec, "--tune-batch", 4, "-o", "t.so"], capsys)
    assert code == 2 and "--tune-batch goes with --work-dir" in err
    assert warnings.formatwarning is before


def test_tune_bad_input(spec, capsys):
    code, _, err = _run(["tune", spec, "--work-dir", "logs", "--rpc", "127.0.0.1:9190"], capsys)
    assert code == 2 and "--rpc and --key go together" in err
    for argv, flag in (
        (["tune", spec, "--work-dir", "logs", "--trials", 0], "--trials"),
        (["tune", spec, "--work-dir", "logs", "--batch", -1], "--batch"),
        (["bench", spec, "--batch", 0], "--batch"),
        (["bench", spec, "--repeat", -3], "--repeat"),
        (["compile", spec, "-o", "m.so", "--tune", "--trials", "x"], "--trials"),
    ):  # counts are checked by the parser: one usage line and the flag named, status 2
        with pytest.raises(SystemExit) as exit_:
            _run(argv, capsys)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"argument {flag}: expected a whole number >= 1" in err, err


def test_bench(spec, capsys):
    code, out, _ = _run(["bench", spec, "--batch", 2, "--repeat", 3], capsys)
    assert code == 0 and "torch fp32" in out and "PB W4A8" in out and "speed vs torch fp32" in out
    assert re.search(r"PB W4A8 +[0-9.]+ +[0-9.]+-[0-9.]+ +([0-9.]+x (faster|slower)|same)$", out, re.M), out
    code, _, err = _run(["bench", spec, "--target", "{not json"], capsys)
    assert code == 2 and "not valid JSON" in err


def test_bench_warns_about_a_speedup_bits_cannot_explain(spec, monkeypatch, capsys):
    """Torch fp32 slowed to 16 ms a call by a busy machine (steadily, alone too) made bench print
    '571x faster' with no warning."""
    from pbtvm.apps import report

    def timed(calls, *_):  # torch 16 ms, PB 0.028 ms, steady rounds
        return {name: (16.0, 15.9, 16.1) if name.startswith("torch") else (0.028, 0.027, 0.029) for name in calls}

    monkeypatch.setattr(report, "interleaved_latency_ms", timed)
    code, out, err = _run(["bench", spec, "--repeat", 3], capsys)
    assert code == 0 and "571.43x faster" in out
    assert "PB W4A8 571x faster than torch fp32 is more than 4-bit weights explain" in err, err
    assert report.plausible_speedup(4) == 16 and report.plausible_speedup(1) == 64


def test_interleaved_latency_flags_a_call_whose_rounds_differ():
    """Entries take turns round by round; each gets its median and its fastest / slowest round, so
    a call that slows down between rounds (a busy machine) shows a spread past UNSTABLE_SPREAD."""
    import time

    from pbtvm.apps.report import UNSTABLE_SPREAD, interleaved_latency_ms

    order, slow = [], iter([0.0] * 6 + [0.004] * 100)

    def steady(_x):
        order.append("steady")

    def slowing(_x):
        order.append("slowing")
        time.sleep(next(slow))

    rows = interleaved_latency_ms({"steady": (steady, None), "slowing": (slowing, None)}, repeat=10, rounds=5)
    assert order[:6] == ["steady"] * 3 + ["slowing"] * 3  # one untimed call, then 2 timed, per round
    assert len(order) == 5 * 2 * 3
    _, low, high = rows["slowing"]
    assert high >= UNSTABLE_SPREAD * low and rows["steady"][2] < 1.0


def test_eval_writes_table_and_pareto_png(tmp_path, capsys):
    import matplotlib.image as mpimg

    png, table = tmp_path / "pareto.png", tmp_path / "t.md"
    code, out, _ = _run(["eval", "mnist-mlp", "--bits", "1,4", "--plot", png, "--table", table], capsys)
    assert code == 0 and "| W4A8 |" in out and "| fp32 |" in out
    assert "| W1A8 | weight bits (A8) | bipolar |" in out, out  # the codebook each model uses
    assert table.read_text().count("\n") >= 2 + 2 + 3  # header, fp32, W1, W4, bitlayers 1..3
    img = mpimg.imread(png)
    assert img.shape[0] > 300 and img.shape[1] > 500
    assert float(np.std(img[..., :3])) > 0.05  # not blank
    series = json.loads((tmp_path / "pareto.png.json").read_text())
    assert set(series) == {"fp32 (torch)", "weight bits (A8)", "run-time bitlayers (W4 model)", "Pareto front"}
    assert len(series["weight bits (A8)"]) == 2 and len(series["run-time bitlayers (W4 model)"]) == 3


def test_pareto_labels_merge_at_one_place_and_far_points_sit_on_the_edge():
    """Points at one place share one label; a point far below the rest sits on the lower edge with
    its accuracy in its label instead of stretching the axis; the plotted data keep the values."""
    import matplotlib.pyplot as plt

    from pbtvm.apps.report import _merged_label, pareto_figure

    assert _merged_label(["W8A8 L=10", "W8A8 L=7", "W8A8 L=6"]) == "W8A8 L=6,7,10"
    assert _merged_label(["W8A8", "W8A8 L=7", "W4A8"]) == "W8A8, W8A8 L=7, W4A8"
    knob = "run-time bitlayers (W4 model)"
    rows = [
        {"config": "fp32", "series": "fp32 (torch)", "accuracy": 93.4, "latency_ms": 0.12},
        {"config": "W4A8", "series": "weight bits (A8)", "accuracy": 93.1, "latency_ms": 0.03},
        {"config": "W4A8 L=1", "series": knob, "accuracy": 60.0, "latency_ms": 0.029},
        {"config": "W4A8 L=2", "series": knob, "accuracy": 92.0, "latency_ms": 0.029},
        {"config": "W4A8 L=3", "series": knob, "accuracy": 93.1, "latency_ms": 0.03},
    ]
    fig, ax, data = pareto_figure(rows)
    labels = sorted(t.get_text() for t in ax.texts)
    plt.close(fig)
    assert labels == ["W4A8 L=1 (60.0%)", "W4A8 L=2", "W4A8, W4A8 L=3", "fp32"], labels
    assert ax.get_ylim()[0] > 90 and "below" in ax.get_ylabel()
    assert sorted(y for _, y in data[knob]) == [60.0, 92.0, 93.1]


def test_eval_bad_input(capsys):
    code, _, err = _run(["eval", "zoo.py:make"], capsys)
    assert code == 2 and "built-in task is mnist-mlp" in err
    code, _, err = _run(["eval", "mnist-mlp", "--bits", "4,x"], capsys)
    assert code == 2 and "comma-separated" in err
    # before the sweep: a plot format matplotlib cannot write (an internal error after it), a folder
    code, _, err = _run(["eval", "mnist-mlp", "--plot", "pareto.v2"], capsys)
    assert code == 2 and "matplotlib cannot write .v2; use one of" in err, err
    code, _, err = _run(["eval", "mnist-mlp", "--plot", "."], capsys)
    assert code == 2 and "is a directory" in err, err
    for args, message in (
        (["--bits", "1,2,17"], "--bits: bit widths must be in 1..16, got 17"),
        (["--act-bits-sweep", "4,1"], "--act-bits-sweep: bit widths must be in 2..16, got 1"),
        (["--table", "t.xyz"], "--table t.xyz: name a .md or .txt file"),
        (["--plot", "/proc/pareto.png"], "--plot /proc/pareto.png: cannot write in /proc"),
        (["--codebook", "twos_complement", "--bits", "1,4"], "--codebook twos_complement: bits=1 needs the bipolar"),
        (["--codebook", "bipolar", "--bits", "1", "--act-bits-sweep", "4"], "compiles W4 models; leave it out or"),
        (["--codebook", "bipolar"], "got bits=2; leave 2 out of --bits (default 1,2,3,4,6,8) or use --codebook auto"),
    ):
        code, _, err = _run(["eval", "mnist-mlp", *args], capsys)
        assert code == 2 and message in err, err


def test_eval_codebook_reaches_every_model(monkeypatch, capsys):
    """``--codebook`` goes to every compile of the sweep (the knob series depends on it)."""
    import pbtvm

    seen = []
    monkeypatch.setattr(pbtvm, "compile", _recording(seen))
    code, out, err = _run(
        ["eval", "mnist-mlp", "--bits", "2", "--act-bits-sweep", "4", "--codebook", "twos_complement"], capsys
    )
    assert code == 0, err
    assert [(kw["bits"], kw["act_bits"], kw["codebook"]) for kw in seen] == [
        (2, 8, "twos_complement"),
        (4, 4, "twos_complement"),
    ]
    assert "| W2A8 L=1 | run-time bitlayers (W2 model) | twos_complement |" in out, out


def test_eval_checks_the_codebook_of_every_model_before_training(monkeypatch):
    """The act_bits sweep's W4 models too: a codebook they cannot use is refused before the
    built-in model is trained or any model compiled (was: after the weight-bits series)."""
    from pbtvm.apps import examples, report
    from pbtvm.errors import InputError

    def no_training(*_):
        raise AssertionError("trained before checking the codebook")

    monkeypatch.setattr(examples, "builtin_mnist_mlp", no_training)
    with pytest.raises(InputError, match="bits=4 .*act_bits sweep's models are W4"):
        report.evaluate_tradeoffs(bits=[1], act_bits_sweep=[4], codebook="bipolar")
    with pytest.raises(InputError, match="codebook 'twos_complement': bits=1 needs the bipolar"):
        report.evaluate_tradeoffs(bits=[4, 1], codebook="twos_complement")


def _recording(seen: list):
    """A stand-in for ``pbtvm.compile`` recording its keywords; its model says it is two's complement."""

    class Compiled:
        manifest = {
            "format": {"codebook": "twos_complement"},
            "layers": {"converted": [{"codebook": "twos_complement"}]},
        }

        def __call__(self, x, bitlayers=None):
            assert bitlayers is None or 1 <= bitlayers <= 16
            return np.zeros((len(x), 10), np.float32)

    def compile(model, example, **kw):
        assert model is not None and example
        seen.append(kw)
        return Compiled()

    return compile


def test_eval_write_failures_are_user_errors(tmp_path, monkeypatch, capsys):
    """A table or plot that cannot be written after the sweep names its flag (was an internal error)."""
    from pbtvm.apps import report

    monkeypatch.setattr(
        report,
        "evaluate_tradeoffs",
        lambda **_: [{"config": "fp32", "series": "s", "accuracy": 1.0, "latency_ms": 1.0}],
    )
    if os.path.exists("/dev/full"):  # every write there fails with ENOSPC
        code, _, err = _run(["eval", "mnist-mlp", "--table", "/dev/full"], capsys)
        assert code == 2 and "--table /dev/full: cannot write it (No space left on device)" in err, err
    (tmp_path / "p.png.json").mkdir()
    code, _, err = _run(["eval", "mnist-mlp", "--plot", tmp_path / "p.png"], capsys)
    assert code == 2 and "p.png.json, which is a directory" in err, err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal without a GPU")
def test_eval_on_cuda_without_a_gpu_is_refused_first(capsys):
    code, _, err = _run(["eval", "mnist-mlp", "--target", '{"kind": "cuda", "arch": "sm_90"}'], capsys)
    assert code == 2 and "eval on a CUDA target runs the models, so it needs a CUDA GPU" in err, err


def test_internal_errors_are_not_reported_as_user_errors(monkeypatch, capsys):
    """A bug inside pbtvm (here a KeyError from the inspect command) is an internal error, exit 1."""
    from pbtvm import cli

    def broken(_args):
        raise KeyError("boom")

    monkeypatch.setattr(cli, "cmd_inspect", broken)
    status = cli.main(["inspect", "nothing.so"])
    err = capsys.readouterr().err
    assert status == cli.INTERNAL_ERROR == 1
    assert "internal error: KeyError" in err and "--debug" in err and "bug in pbtvm" in err


def test_ctrl_c_is_reported_as_interrupted(monkeypatch, capsys):
    """Ctrl-C ends a command with exit status 130 and one line, not a traceback or "internal error"."""
    from pbtvm import cli

    def interrupted(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_inspect", interrupted)
    assert cli.main(["inspect", "x.so"]) == cli.INTERRUPTED == 130
    assert capsys.readouterr().err == "pbtvm: interrupted\n"
    with pytest.raises(KeyboardInterrupt):  # --debug shows the traceback
        cli.main(["--debug", "inspect", "x.so"])


def test_the_console_script_ends_at_once_after_an_interrupt(monkeypatch):
    """``run`` skips Python's teardown after Ctrl-C (TVM's pools could hang in it): it flushes what
    it can (a pipe whose reader is gone raised BrokenPipeError), removes the stand-in torch
    directory whose exit handler will not run, then exits 130."""
    from pbtvm import cli, worker_env

    class GonePipe:
        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

        def write(self, text):
            return len(text)

    stub = worker_env.stub_dir()
    ended = []
    monkeypatch.setattr(cli, "main", lambda: cli.INTERRUPTED)

    def exit_now(status):  # os._exit does not return
        ended.append(status)
        raise SystemExit(status)

    monkeypatch.setattr(cli.os, "_exit", exit_now)
    monkeypatch.setattr(cli.sys, "stdout", GonePipe())
    with pytest.raises(SystemExit):
        cli.run()
    assert ended == [130] and not os.path.exists(stub)


def test_plain_value_errors_from_inside_pbtvm_are_internal(monkeypatch, capsys):
    """ValueError/TypeError are no longer blanket user errors; pbtvm's own InputError is."""
    from pbtvm import cli
    from pbtvm.errors import InputError

    for exc, want in ((ValueError("internal"), cli.INTERNAL_ERROR), (InputError("bad bits"), cli.USAGE_ERROR)):

        def broken(_args, exc=exc):
            raise exc

        monkeypatch.setattr(cli, "cmd_inspect", broken)
        assert cli.main(["inspect", "x.so"]) == want
    assert "pbtvm: error: bad bits" in capsys.readouterr().err


def test_global_flags_also_after_the_command():
    """``pbtvm compile ... --debug`` (what the internal-error text suggests) was an argparse error."""
    from pbtvm.cli import build_parser

    parser = build_parser()
    for argv, debug, verbose in (
        (["inspect", "x"], False, False),
        (["inspect", "x", "--debug"], True, False),
        (["-v", "inspect", "x", "--debug"], True, True),
        (["--debug", "compile", "mnist-mlp", "-o", "m.so", "-v"], True, True),
    ):
        args = parser.parse_args(argv)
        assert (args.debug, args.verbose) == (debug, verbose), argv


def test_inspect_of_an_exported_lstm_directory(tmp_path, capsys):
    """It said 'holds no pbtvm tuning log'; it now shows what lstm.json describes."""
    meta = {
        "kind": "pbtvm.lstm",
        "num_layers": 1,
        "input_size": 8,
        "hidden_size": 16,
        "batch_first": True,
        "format": {"bits": 4, "act_bits": 8, "codebook": "twos_complement", "layout": "kNW", "version": 1},
        "files": {"proj0.so": "x", "cell0.so": "y"},
    }
    (tmp_path / "lstm.json").write_text(json.dumps(meta))
    code, out, _ = _run(["inspect", tmp_path], capsys)
    assert code == 0 and "an exported PB LSTM (load it with pbtvm.lstm.load_lstm)" in out, out
    assert "1 layer(s), input 8, hidden 16" in out and "W4A8 twos_complement layout kNW" in out
    assert "cell0.so, proj0.so" in out
    (tmp_path / "lstm.json").write_text("{")
    code, _, err = _run(["inspect", tmp_path], capsys)
    assert code == 2 and "lstm.json is corrupt" in err, err


def test_a_reader_that_leaves_early_is_no_internal_error(tmp_path):
    """``pbtvm inspect x.so | head -3``: the write to a closed pipe was reported as "internal error:
    BrokenPipeError ... a bug in pbtvm"; it ends quietly with 141 (128 + SIGPIPE), as shell tools do."""
    import torch

    import pbtvm

    path = tmp_path / "m.so"
    pbtvm.compile(torch.nn.Linear(8, 4), (torch.randn(2, 8),), bits=4).export(path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pbtvm.cli", "inspect", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # before the child has imported TVM, let alone written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err
