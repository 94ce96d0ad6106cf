"""pbtvm.compile / CompiledModel / export / load on the CPU, including bad input."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import pbtvm
from pbtvm import bitplane as bp
from pbtvm import quantize as qz
from pbtvm.worker_env import env_without_torch

from .models import MLP, WithConv


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture(scope="module")
def compiled(mlp):
    return pbtvm.compile(mlp, (torch.randn(2, 40),), target="llvm", bits=4)


def _reference(model: MLP, x: np.ndarray, bits: int, act_bits: int = 8, bitlayers: int | None = None) -> np.ndarray:
    """The numpy PB reference applied layer by layer (codebook chosen per layer, as compile does)."""
    h = x
    for i, layer in enumerate(model.layers):
        fmt, [(q, s)] = qz.layer_format([layer.weight.detach().numpy()], bp.BitplaneFormat(bits, act_bits))
        h = qz.pb_linear_reference(h, bp.pack_weights(q, fmt), s, layer.bias.detach().numpy(), fmt, bitlayers)
        if i < len(model.layers) - 1:
            h = np.maximum(h, 0)
    return h


def test_torch_in_torch_out_numpy_in_numpy_out_dynamic_batch(compiled, mlp):
    for batch in (1, 3, 17):
        x = torch.randn(batch, 40)
        y = compiled(x)
        assert isinstance(y, torch.Tensor) and y.shape == (batch, 10)
        yn = compiled(x.numpy())
        assert isinstance(yn, np.ndarray)
        np.testing.assert_array_equal(y.numpy(), yn)
        np.testing.assert_allclose(yn, _reference(mlp, x.numpy(), 4), rtol=1e-4, atol=1e-4)


def test_unaligned_tensor_slices_are_accepted(compiled):
    """A row slice of a larger tensor is not 64-byte aligned (TVM's zero-copy needs that)."""
    base = torch.randn(4, 40)
    for start in (1, 2, 3):  # 160, 320, 480 bytes in: 32-byte misaligned for odd starts
        x = base[start:]
        np.testing.assert_array_equal(compiled(x).numpy(), compiled(x.clone()).numpy())


def test_bitlayers_knob_matches_reference_and_never_compiles(compiled, mlp, monkeypatch):
    import tvm

    def boom(*_a, **_k):
        raise AssertionError("compilation triggered at run time")

    for mod, name in ((tvm, "compile"), (tvm.relax, "build"), (tvm.tirx, "build"), (tvm.te, "create_prim_func")):
        monkeypatch.setattr(mod, name, boom)
    x = np.random.default_rng(1).standard_normal((4, 40)).astype(np.float32)
    errors = []
    for layers in range(1, 5):
        y = compiled(x, bitlayers=layers)
        np.testing.assert_allclose(y, _reference(mlp, x, 4, bitlayers=layers), rtol=1e-4, atol=1e-4)
        errors.append(np.abs(y - mlp(torch.from_numpy(x)).detach().numpy()).mean())
    assert errors[-1] < errors[0]  # more planes, closer to fp32


def test_an_input_named_bitlayers_is_told_from_the_knob():
    """A forward parameter named ``bitlayers`` cannot be passed as ``bitlayers=tensor`` (that is
    the knob): a clear error, while by position it works and ``bitlayers=<int>`` stays the knob."""

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(16, 8)

        def forward(self, x, bitlayers):
            return self.lin(x) * bitlayers

    model = Scaled().eval()
    x, scale = torch.randn(3, 16), torch.rand(3, 8)
    m = pbtvm.compile(model, (x, scale), bits=4)
    with pytest.raises(TypeError, match="input named 'bitlayers' shares its name with the precision knob"):
        m(x, bitlayers=scale)
    torch.testing.assert_close(m(x, scale), model(x, scale), rtol=0.1, atol=0.1)
    assert not torch.equal(m(x, scale, bitlayers=1), m(x, scale))


def test_layers_report_and_manifest(compiled):
    assert compiled.converted_layers == ["layers.0 (Linear)", "layers.1 (Linear)", "layers.2 (Linear)"]
    assert compiled.fp32_layers == []
    m = compiled.manifest
    assert m["format"]["bits"] == 4 and m["target"]["kind"] == "llvm" and m["target"]["mcpu"]
    (spec,) = m["inputs"]
    assert spec["dtype"] == "float32" and spec["shape"] == [None, 40]
    assert spec["dims"] == ["batch", None]  # the run-time batch's symbol
    assert m["quantizer"] == {"codebook": "auto", "method": "mse", "calibrated": False}
    assert [layer["codebook"] for layer in m["layers"]["converted"]] == ["offset_binary"] * 3
    # the model's format is what its layers use, not the two's-complement default of W4
    assert m["format"]["codebook"] == compiled.format.codebook == "offset_binary"


def test_layers_are_listed_in_the_order_the_model_runs_them():
    """Not the order ``__init__`` defines them in."""

    class Backwards(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.out = torch.nn.Linear(16, 4)
            self.inp = torch.nn.Linear(8, 16)

        def forward(self, x):
            return self.out(torch.relu(self.inp(x)))

    cm = pbtvm.compile(Backwards().eval(), (torch.randn(2, 8),), bits=4)
    assert cm.converted_layers == ["inp (Linear)", "out (Linear)"]


def test_unsupported_layers_warn_with_names():
    torch.manual_seed(0)
    model = WithConv().eval()
    with pytest.warns(UserWarning, match=r"conv \(Conv2d\)"):
        cm = pbtvm.compile(model, (torch.randn(2, 1, 8, 8),), bits=8)
    assert cm.converted_layers == ["fc (Linear)"]
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():  # the conv in fp32 (torch), the fc in PB (the numpy reference)
        h = torch.relu(model.conv(x)).flatten(1).numpy()
    fmt, [(q, s)] = qz.layer_format([model.fc.weight.detach().numpy()], bp.BitplaneFormat(8, 8))
    want = qz.pb_linear_reference(h, bp.pack_weights(q, fmt), s, model.fc.bias.detach().numpy(), fmt)
    np.testing.assert_allclose(cm(x).numpy(), want, rtol=1e-4, atol=1e-4)


def test_export_load_fresh_process_bit_identical(compiled, tmp_path):
    path = str(tmp_path / "mlp.so")
    compiled.export(path)
    x = np.random.default_rng(2).standard_normal((5, 40)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    for layers in (4, 2):
        np.save(tmp_path / f"y{layers}.npy", compiled(x, bitlayers=layers))
    script = f"""
import sys
import numpy as np, pbtvm, tvm
assert "torch" not in sys.modules
def boom(*a, **k): raise AssertionError("compiler used after load")
tvm.compile = tvm.relax.build = tvm.tirx.build = boom
m = pbtvm.load({path!r})
x = np.load({str(tmp_path / "x.npy")!r})
for layers in (4, 2):
    assert np.array_equal(m(x, bitlayers=layers), np.load({str(tmp_path)!r} + f"/y{{layers}}.npy")), layers
print("OK", m)
"""
    # without torch, as a deployment with only the TVM runtime (and numpy) would run it
    env = env_without_torch(force=True)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"bits": 0}, ValueError, "bits must be in 1..16"),
        ({"bits": 17}, ValueError, "bits must be in 1..16"),
        ({"bits": 4, "act_bits": 1}, ValueError, "act_bits"),
        ({"bits": 4, "target": "rocm"}, ValueError, "unsupported target"),
        ({"bits": 4, "target": 3}, TypeError, "target must be"),
    ],
)
def test_compile_rejects_bad_arguments(mlp, kwargs, error, match):
    with pytest.raises(error, match=match):
        pbtvm.compile(mlp, (torch.randn(2, 40),), **kwargs)


def test_compile_rejects_bad_models_and_inputs(mlp):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        pbtvm.compile(lambda x: x, (torch.randn(2, 40),))
    with pytest.raises(TypeError, match="torch.Tensor"):
        pbtvm.compile(mlp, (np.zeros((2, 40), np.float32),))


def test_call_rejects_bad_inputs(compiled):
    with pytest.raises(ValueError, match=r"shape \(2, 41\)"):
        compiled(torch.randn(2, 41))
    with pytest.raises(TypeError, match="dtype float64"):
        compiled(np.zeros((2, 40)))
    with pytest.raises(TypeError, match="takes 1 input"):
        compiled(torch.randn(2, 40), torch.randn(2, 40))
    with pytest.raises(ValueError, match="bitlayers must be in 1..4"):
        compiled(torch.randn(2, 40), bitlayers=5)
    with pytest.raises(TypeError, match="torch.Tensor or numpy"):
        compiled([1.0] * 40)


def test_load_rejects_foreign_corrupt_and_mismatched_files(compiled, tmp_path):
    with pytest.raises(FileNotFoundError):
        pbtvm.load(str(tmp_path / "missing.so"))
    text = tmp_path / "notes.so"
    text.write_text("hello")
    with pytest.raises(pbtvm.LibraryError, match="not an ELF"):
        pbtvm.load(str(text))
    foreign = tmp_path / "foreign.so"
    src = tmp_path / "f.c"
    src.write_text("int f(void) { return 1; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(foreign), str(src)], check=True)
    with pytest.raises(pbtvm.LibraryError, match="not a pbtvm module"):
        pbtvm.load(str(foreign))
    good = tmp_path / "good.so"
    compiled.export(str(good))
    truncated = tmp_path / "truncated.so"
    truncated.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    with pytest.raises(pbtvm.LibraryError):
        pbtvm.load(str(truncated))
    with pytest.raises(pbtvm.LibraryError, match="compiled for llvm"):
        pbtvm.load(str(good), device="cuda")


def test_directories_are_named_as_directories(compiled, tmp_path):
    """Exporting to a directory, or loading one, says so (not a linker failure, not "no such file");
    an exported LSTM's directory points to its loader."""
    with pytest.raises(IsADirectoryError, match=rf"cannot write {tmp_path}: it is a directory .*model\.so"):
        compiled.export(tmp_path)
    with pytest.raises(IsADirectoryError, match=rf"{tmp_path} is a directory, not a pbtvm library \(\.so\)$"):
        pbtvm.load(tmp_path)
    (tmp_path / "lstm.json").write_text("{}")
    with pytest.raises(IsADirectoryError, match="an exported LSTM, load it with pbtvm.lstm.load_lstm"):
        pbtvm.load(tmp_path)


def test_load_rejects_other_tvm_version(compiled, tmp_path, monkeypatch):
    good = tmp_path / "good.so"
    compiled.export(str(good))
    monkeypatch.setattr(pbtvm.runtime, "TVM_VERSION", "0.0.1")
    with pytest.raises(pbtvm.LibraryError, match="built with TVM"):
        pbtvm.load(str(good))


def test_load_refuses_a_library_for_a_cpu_with_more_instructions(mlp, tmp_path, monkeypatch):
    """The manifest lists the x86 features of the CPU a library was built for; pbtvm.load refuses
    one whose features this CPU lacks (it would stop with an illegal instruction), naming them."""
    from pbtvm.target import library_cpu_features, missing_cpu_features, resolve_target

    haswell = pbtvm.compile(mlp, (torch.randn(2, 40),), target={"kind": "llvm", "mcpu": "haswell"}, bits=4)
    assert haswell.manifest["cpu_features"] == (
        "sse3 ssse3 sse4.1 sse4.2 popcnt lzcnt movbe pclmul avx avx2 fma f16c bmi bmi2".split()
    )
    path = haswell.export(str(tmp_path / "haswell.so"))
    if not missing_cpu_features(haswell.manifest["cpu_features"]):  # this CPU runs Haswell code
        np.testing.assert_array_equal(
            pbtvm.load(path)(np.ones((1, 40), np.float32)), haswell(np.ones((1, 40), np.float32))
        )
    monkeypatch.setattr(
        pbtvm.runtime, "missing_cpu_features", lambda needed: [f for f in needed if f.startswith("avx2")]
    )
    with pytest.raises(pbtvm.LibraryError, match=r"compiled for a CPU with avx2 \(haswell\), which this CPU lacks"):
        pbtvm.load(path)
    monkeypatch.setenv("PBTVM_SKIP_CPU_CHECK", "0")
    with pytest.raises(pbtvm.LibraryError, match="PBTVM_SKIP_CPU_CHECK=1 skips this check"):
        pbtvm.load(path)
    monkeypatch.setenv("PBTVM_SKIP_CPU_CHECK", "1")  # a CPU with features neither Linux nor LLVM lists
    assert pbtvm.load(path).manifest["cpu_features"] == haswell.manifest["cpu_features"]
    assert "avx512bw" in library_cpu_features(resolve_target({"kind": "llvm", "mcpu": "znver4"}))
    assert "amx-int8" not in library_cpu_features(resolve_target({"kind": "llvm", "mcpu": "sapphirerapids"}))
    assert library_cpu_features(resolve_target({"kind": "cuda", "arch": "sm_90"})) == []
    # instructions beyond the vector units: AMD's FMA4 / XOP (a bdver build holds vfmaddss) and the
    # APX registers of a diamondrapids build stopped this machine with SIGILL after the check passed
    assert {"fma4", "xop"} <= set(library_cpu_features(resolve_target({"kind": "llvm", "mcpu": "bdver4"})))
    assert {"egpr", "ndd"} <= set(library_cpu_features(resolve_target({"kind": "llvm", "mcpu": "diamondrapids"})))
    assert "egpr" in library_cpu_features(resolve_target({"kind": "llvm", "mcpu": "x86-64", "mattr": ["+egpr"]}))


def test_missing_cpu_features_reads_linux_flags(tmp_path):
    """LLVM's feature names against Linux's cpuinfo spellings (sse4_2, bmi1, avx512_vnni); a
    feature LLVM's view of this CPU has counts as present (Linux may list fewer: an old kernel, a
    guest with features masked), so a library built here always loads here."""
    from pbtvm.target import library_cpu_features, missing_cpu_features, resolve_target

    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor : 0\nflags : fpu pni abm pclmulqdq sse4_2 popcnt avx avx2 bmi1 avx512f avx512_vnni gfni\n"
    )
    needed = [
        "sse3",
        "lzcnt",
        "pclmul",
        "sse4.2",
        "bmi",
        "avx2",
        "avx512f",
        "avx512vnni",
        "avx512bw",
        "avxvnni",
        "gfni",
    ]
    assert missing_cpu_features(needed, cpuinfo=str(info), llvm_host=set()) == ["avx512bw", "avxvnni"]
    assert missing_cpu_features(["fma4", "egpr"], cpuinfo=str(info), llvm_host=set()) == ["fma4", "egpr"]
    assert missing_cpu_features(needed, cpuinfo=str(info), llvm_host={"avx512bw"}) == ["avxvnni"]
    assert missing_cpu_features(needed, cpuinfo=str(tmp_path / "none"), llvm_host=set(needed)) == []
    here = library_cpu_features(resolve_target("llvm"))
    assert missing_cpu_features(here, cpuinfo=str(info)) == []  # built here, loads here


def test_cuda_without_arch_and_without_gpu_is_a_clear_error(mlp):
    from pbtvm.target import local_cuda_arch

    if local_cuda_arch() is not None:
        pytest.skip("a GPU is present: target='cuda' resolves")
    with pytest.raises(
        ValueError, match=r"none was found \((TVM sees no CUDA device|TVM's CUDA runtime failed).*explicit arch"
    ):
        pbtvm.compile(mlp, (torch.randn(2, 40),), target="cuda")


def test_target_strings_in_every_form():
    """A kind, a JSON dict (with or without spaces) and the command-line form TVM 0.20+ no longer
    parses (``llvm -mcpu=... -mattr=...``) give the same targets; unreadable text names the problem."""
    from pbtvm.errors import InputError
    from pbtvm.target import TargetInfo, host_mattr, host_mcpu, resolve_target, unportable_off

    for text in ("llvm -mcpu=haswell -mattr=+avx2,-fma", '{"kind":"llvm","mcpu":"haswell","mattr":["+avx2","-fma"]}'):
        target = resolve_target(text)
        assert target.kind.name == "llvm" and target.attrs["mcpu"] == "haswell", text
        assert list(target.attrs["mattr"]) == ["+avx2", "-fma"], text
        # a resolved Target resolves to itself: its mattr is an ffi Array, not a list (was refused, so
        # on hosts with AMX, whose default target has an mattr, `pbtvm eval` failed before compiling)
        assert str(resolve_target(target)) == str(target), text
    # manifests and inspect show the features beside mcpu (an AMX build and one without looked alike)
    summary = TargetInfo.of(resolve_target("llvm -mcpu=haswell -mattr=-fma")).summary()
    assert summary == {"kind": "llvm", "mcpu": "haswell", "mattr": ["-fma"]}
    assert TargetInfo.from_summary(summary).summary() == summary
    host = resolve_target("llvm")  # on hosts with AMX this one carries an mattr of its own
    assert str(resolve_target(host)) == str(host)
    assert resolve_target("nvidia/nvidia-h100").attrs["arch"] == "sm_90a"  # a TVM tag (was "unsupported kind")
    with pytest.raises(InputError, match="'nvidia/h1' is not a target tag TVM knows"):
        resolve_target("nvidia/h1")
    assert resolve_target("cuda -arch=sm_90 -max_num_threads=512").attrs["max_num_threads"] == 512
    assert resolve_target("llvm -mcpu='haswell' -libs=cblas").attrs["mcpu"] == "haswell"
    assert resolve_target(" llvm ").kind.name == "llvm"
    assert str(resolve_target("llvm -mcpu=native")) == str(resolve_target("llvm"))  # "native" was refused
    for unset in (None, ""):  # was "LLVM does not know the CPU 'None'"
        assert str(resolve_target({"kind": "llvm", "mcpu": unset})) == str(resolve_target("llvm"))
    for text, message in [
        ("  ", "empty string"),
        ("llvm mcpu=x", "expected -key=value"),
        ("{bad", "not valid JSON"),
        ("metal", "unsupported target kind"),
        ("llvm -mcpu=skylake-avx51", "LLVM does not know the CPU 'skylake-avx51'.*did you mean 'skylake-avx512'"),
        ('{"kind": "cuda", "arch": "sm90"}', "CUDA arch 'sm90' must look like 'sm_90'"),
        (
            '{"kind": "cuda", "arch": "sm_9"}',
            "CUDA arch 'sm_9' must look like 'sm_90'",
        ),  # was TVM's ValueError at build
        ("llvm -mcpu=znver4 -mattr=+avx512vnn", "CPU feature 'avx512vnn'.*did you mean 'avx512vnni'"),
        ("llvm -mattr=-AMX-TILE", "CPU feature 'AMX-TILE' \\(mattr '-AMX-TILE'\\); did you mean 'amx-tile'"),
        ("llvm -mattr=avx2", "mattr entry 'avx2' must be a sign.*'\\+avx2' turns it on, '-avx2' off"),
        ("cuda -mcpu=sm_90", "a CUDA target takes its GPU as arch, not mcpu: -arch=sm_90"),
    ]:
        with pytest.raises(InputError, match=message):
            resolve_target(text)
    with pytest.raises(InputError, match="mattr must be a list"):
        resolve_target({"kind": "llvm", "mattr": [1]})
    # LLVM ignores an unknown or unsigned feature (a warning per kernel, or nothing): a compile for
    # what was not asked. Names it knows pass, those of no CPU (retpoline) and other triples' too.
    amx = host_mattr(host_mcpu()) + unportable_off(host_mcpu())  # this host's tiles (Intel) or -sse4a (AMD)
    assert list(resolve_target({"kind": "llvm", "mattr": "+avx2, -fma"}).attrs["mattr"]) == ["+avx2", "-fma", *amx]
    assert list(resolve_target("llvm -mattr=+retpoline,+sse4.2").attrs["mattr"]) == ["+retpoline", "+sse4.2", *amx]
    # Another architecture (or an unknown one, on whose CPU names LLVM segfaulted) is refused before
    # any name is checked: pbtvm links, checks and runs CPU libraries on this machine, and such a
    # build failed later, at the call or at export. So is another OS (ELF only).
    if platform.machine() != "x86_64":
        return
    for spec, why in (
        ({"kind": "llvm", "mcpu": "neoverse-v1", "mtriple": "aarch64-linux-gnu", "mattr": ["+sve"]}, "architecture"),
        ({"kind": "llvm", "mcpu": "cortex-a7x", "mtriple": "aarch64-linux-gnu"}, "architecture"),
        ({"kind": "llvm", "mcpu": "haswell", "mtriple": "foo-linux-gnu"}, "architecture"),
        ({"kind": "llvm", "mcpu": "haswell", "mtriple": "X86_64-pc-linux-gnu"}, "architecture"),
        ({"kind": "llvm", "mcpu": "haswell", "mtriple": "x86_64-pc-windows-msvc"}, "not Linux"),
    ):
        with pytest.raises(InputError, match=why):
            resolve_target(spec)
    for triple in ("x86_64-pc-linux-gnu", "x86_64-unknown-linux-gnu", "amd64-unknown-linux-gnu"):
        same = resolve_target({"kind": "llvm", "mcpu": "haswell", "mtriple": triple})
        assert same.host.attrs["mtriple"] == triple  # the host code is for the same CPU


def test_no_converted_layer_warns():
    class Plain(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = pbtvm.compile(Plain(), (torch.randn(2, 3),))
    assert any("no dense layer" in str(w.message) for w in caught)
    x = torch.randn(4, 3)
    np.testing.assert_allclose(cm(x).numpy(), (torch.relu(x) * 2).numpy())


def test_call_path_unaligned_strided_and_changing_inputs():
    """Slices (unaligned), strided views, numpy and changing batch sizes all give the aligned result;
    validation still runs whenever the input's kind, dtype or shape changes."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5)).eval()
    x = torch.randn(9, 40)
    m = pbtvm.compile(model, (x[:2],), target="llvm", bits=8)
    assert x[1:4].data_ptr() % 64 and x[5:7].data_ptr() % 64  # rows of 160 bytes: unaligned views
    for rows in (slice(1, 4), slice(2, 3), slice(0, 9), slice(5, 7)):
        want = m(x[rows].clone())
        torch.testing.assert_close(m(x[rows]), want, rtol=0, atol=0)
        torch.testing.assert_close(m(x.t().contiguous().t()[rows]), want, rtol=0, atol=0)  # strided
        np.testing.assert_array_equal(m(x[rows].numpy()), want.numpy())
    first = m(x[1:4])
    m(x[0:9])
    torch.testing.assert_close(m(x[1:4]), first, rtol=0, atol=0)  # the cached staging tensor is refilled
    with pytest.raises(ValueError, match="expects"):
        m(x[:, :39])
    with pytest.raises(TypeError, match="dtype"):
        m(x[1:4].double())
    torch.testing.assert_close(m(x[1:4]), first, rtol=0, atol=0)


def test_run_time_dimensions_are_labelled_and_tied():
    """Error messages name run-time sizes; sizes with one symbol must agree across inputs."""
    from pbtvm.runtime import dim_labels, tied_dims

    plain = [{"dtype": "float32", "shape": [None, 40], "dims": ["batch", None]}]
    assert dim_labels(plain) == [("batch", 40)] and tied_dims(plain) == []
    older = [{"dtype": "float32", "shape": [None, 40]}]  # a manifest from before "dims"
    assert dim_labels(older) == [("batch", 40)] and tied_dims(older) == []
    lm = [
        {"dtype": "int64", "shape": [None, None], "dims": ["s13", "s15"]},  # tokens [T, B]
        {"dtype": "float32", "shape": [2, None, 24], "dims": [None, "s15", None]},  # h0 [L, B, H]
        {"dtype": "float32", "shape": [2, None, 24], "dims": [None, "s15", None]},
    ]
    assert dim_labels(lm) == [("n0", "n1"), (2, "n1", 24), (2, "n1", 24)]
    assert tied_dims(lm) == [((0, 1), (1, 1)), ((0, 1), (2, 1))]
    one_length = [{"dtype": "int64", "shape": [None, 1], "dims": ["s13", None]}]  # T run-time, batch fixed at 1
    assert dim_labels(one_length) == [("n0", 1)]  # not called "batch"


def test_codebook_text_says_when_layers_differ():
    """``repr`` and ``pbtvm inspect`` name the codebook only when every PB layer has it."""
    from pbtvm.runtime import codebook_text

    fmt = {"codebook": "twos_complement"}
    same = {"format": fmt, "layers": {"converted": [{"codebook": "twos_complement"}, {}]}}
    mixed = {"format": fmt, "layers": {"converted": [{"codebook": "twos_complement"}, {"codebook": "offset_binary"}]}}
    assert codebook_text(same) == "twos_complement"
    assert codebook_text(mixed) == "codebook per layer"


def test_inputs_whose_sizes_the_model_ties_are_named():
    class Sum(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 4), torch.nn.Linear(6, 4)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    m = pbtvm.compile(Sum().eval(), (torch.randn(3, 8), torch.randn(3, 6)), bits=4)
    with pytest.raises(
        ValueError,
        match=r"input 1 has size 2 in dimension 0 and input 0 has 5 in dimension 0: the "
        r"model needs them equal \(one run-time size, \w+, in both\)",
    ):
        m(torch.randn(5, 8), torch.randn(2, 6))
