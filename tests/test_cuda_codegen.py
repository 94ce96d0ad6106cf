"""CUDA code generation and export without a GPU (nvcc must be installed: these fail, not skip)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import pbtvm
from pbtvm import bitplane as bp
from pbtvm import kernels, library, names
from pbtvm.cuda import cuda_source, find_nvcc
from pbtvm.target import resolve_target
from pbtvm.tools import cuobjdump, find_cuda_tool

from .models import MLP

SM90 = {"kind": "cuda", "arch": "sm_90"}


def test_nvcc_is_installed():
    assert find_nvcc()


def test_cuda_kernels_build_with_the_pip_toolkit_alone(monkeypatch, tmp_path):
    """The `cuda` extra's nvcc wheel builds and exports kernels with no system CUDA on PATH."""
    from pbtvm.tools import pip_cuda_home

    home = pip_cuda_home()
    assert home, "the CUDA toolkit wheels are missing: pip install -e '.[cuda]'"
    monkeypatch.setenv("CUDA_HOME", home)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert find_nvcc().startswith(home)
    torch.manual_seed(0)
    path = str(tmp_path / "mlp_pip_nvcc.so")
    pbtvm.compile(MLP(), (torch.randn(2, 40),), target=SM90, bits=4).export(path)
    (binary,) = library.cuda_binaries(path)
    assert "sm_90" in cuobjdump(["--list-elf"], binary, str(tmp_path))


def warp_reduced_blocks(src: str, warp: int = 32) -> set[str]:
    """Blocks whose per-thread partial a full warp-shuffle tree reduces in the CUDA source ``src``.

    TVM's cross-thread reduction copies a block's in-thread partial (``in_thread_<block>``) into a
    reduction buffer ``red_bufN`` and combines the lanes with ``__shfl_down_sync`` at offsets
    warp/2, ..., 2, 1 (width ``warp``); a block is in the result only if all of them are there.
    """
    want = {warp >> s for s in range(1, warp.bit_length())}
    out = set()
    for buf, partial in re.findall(r"\b(red_buf\w+)\[0\] = (in_thread_\w+)\[0\];", src):
        offsets = re.findall(rf"__shfl_down_sync\(\w+\[0\], {buf}\[0\], (\d+), {warp}\)", src)
        if want <= {int(o) for o in offsets}:
            out.add(re.sub(r"(_local|_shared)?(_ptr)?(_\d+)?$", "", partial.removeprefix("in_thread_")))
    return out


def _cuda_source(func) -> str:
    ex = kernels.build(func, resolve_target(SM90))
    (dev,) = ex.mod.imports
    assert dev.kind == "cuda"
    return cuda_source(ex)


@pytest.mark.parametrize("layout", ["kNW", "NkW"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
def test_pb_kernels_generate_warp_reduction_code(bits, layout):
    """Every PB kernel reduces its popcount partials (and the pack its row max / code sum) across a warp.

    The lanes of a warp split the K words of an output row; without the shuffle tree each lane
    would hold only part of the product.
    """
    fmt = bp.BitplaneFormat(bits, 8, layout=layout)
    gemm, pack = {names.GEMM}, {names.AMAX, names.ROWSUM}
    cases = [
        (kernels.dense_func(fmt, 33, 100), gemm),
        (kernels.dense_func(fmt, 64, 4096), gemm),
        (kernels.act_pack_func(fmt, 100), pack),
        (kernels.dense_act_func(fmt, 40, 650), gemm | pack),
    ]
    if layout == "kNW":
        legs = gemm | pack | {names.block(b, names.INPUT_TAG) for b in gemm | pack}
        cases += [(kernels.lstm_cell_func(fmt, 64), gemm | pack), (kernels.lstm_cell_input_func(fmt, 40, 64), legs)]
    for func, reduced in cases:
        src = _cuda_source(func)
        assert reduced <= warp_reduced_blocks(src), (func.attrs[names.ATTR_KERNEL], warp_reduced_blocks(src))


def test_warp_reduction_check_fails_without_a_shuffle_tree():
    """The check above is not vacuous: the ballot pack reduces through shared memory, no shuffles."""
    fmt = bp.BitplaneFormat(4, 8, layout="mma16x256")
    src = _cuda_source(kernels.act_pack_func(fmt, 300))
    assert "__ballot_sync" in src
    assert warp_reduced_blocks(src) == set()
    assert warp_reduced_blocks(src.replace("__shfl_down_sync", "__shfl_up_sync")) == set()
    tree = _cuda_source(kernels.dense_func(bp.BitplaneFormat(4, 8), 64, 4096))
    assert warp_reduced_blocks(tree.replace(", 16, 32)", ", 0, 32)")) == set()  # one level missing


def test_gemm_uses_popcount_and_shuffle_reduction():
    target = resolve_target(SM90)
    ex = kernels.build(kernels.dense_func(bp.BitplaneFormat(4, 8), 64, 256), target)
    src = cuda_source(ex)
    assert "__popc" in src
    assert "__shfl" in src  # cross-thread (warp) reduction, not a serial loop per thread


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_offset_binary_kernels_build_for_sm90(bits):
    """The zero-point epilogue (offset binary) in every PB kernel kind: it builds with nvcc and keeps
    the popcount + warp-shuffle GEMM (its results: test_cuda_core_emulated.py)."""
    target = resolve_target(SM90)
    fmt = bp.BitplaneFormat(bits, 8, "offset_binary")
    for func in (
        kernels.dense_func(fmt, 64, 4096),
        kernels.dense_act_func(fmt, 100, 650),
        kernels.lstm_cell_func(fmt, 64),
        kernels.lstm_cell_input_func(fmt, 40, 64),
    ):
        ex = kernels.build(func, target)  # nvcc runs here
        src = cuda_source(ex)
        assert src.count("__global__") == 2, func.attrs["pbtvm.kernel"]  # one kernel
        assert "__popc" in src and "__shfl" in src


@pytest.mark.parametrize(("n", "k", "bits"), [(33, 20, 1), (100, 650, 4), (10000, 650, 4), (64, 4096, 8)])
def test_dense_with_pack_is_one_kernel(n, k, bits):
    """``pb_dense_act``: every block packs the row into shared memory, then a warp per output."""
    ex = kernels.build(kernels.dense_act_func(bp.BitplaneFormat(bits, 8), n, k), resolve_target(SM90))
    src = cuda_source(ex)
    assert src.count("__global__") == 2  # declaration + definition of one kernel
    assert "pb_xpack_shared" in src and "__popc" in src and "__shfl" in src
    # Each activation is quantized once (codes in shared memory), not once per plane and word:
    # re-quantizing per plane made this kernel 8x slower on an H100 (BENCHMARKS.md).
    assert "pb_xq_shared" in src and src.count("nearbyintf(") == 1


@pytest.fixture(scope="module")
def cuda_library(tmp_path_factory):
    torch.manual_seed(0)
    cm = pbtvm.compile(MLP(), (torch.randn(2, 40),), target=SM90, bits=4)
    path = str(tmp_path_factory.mktemp("cuda") / "mlp_sm90.so")
    cm.export(path)
    return cm, path


def test_cuda_export_holds_sm90_binary_not_source(cuda_library, tmp_path):
    cm, path = cuda_library
    assert cm.manifest["target"] == {"kind": "cuda", "arch": "sm_90"}
    mods = library.device_modules(path)
    cuda = [m for m in mods if m["kind"] == "cuda"]
    # pbtvm writes a fatbin; TVM labels an nvcc result "cubin" when it compiled on a GPU machine.
    assert len(cuda) == 1 and cuda[0]["format"] in ("fatbin", "cubin"), mods
    (binary,) = library.cuda_binaries(path)
    assert b"__global__" not in binary and b".version" not in binary[:64]  # neither CUDA source nor PTX
    if find_cuda_tool("cuobjdump") is None:
        pytest.fail("cuobjdump missing: pip install nvidia-cuda-cuobjdump")
    listing = cuobjdump(["--list-elf"], binary, str(tmp_path))
    assert "sm_90" in listing, listing
    assert "No PTX" in cuobjdump(["--list-ptx"], binary, str(tmp_path))


def test_cuda_library_manifest_and_cpu_load_error(cuda_library):
    _, path = cuda_library
    assert library.read_manifest(path)["format"]["bits"] == 4
    with pytest.raises(pbtvm.LibraryError, match="compiled for cuda"):
        pbtvm.load(path, device="cpu")


def test_loading_a_cuda_library_with_a_cpu_only_tvm_is_a_clear_error(cuda_library):
    """TVM's own text named a loader 'ffi.Module.load_from_bytes.cuda' that is not registered."""
    import tvm

    if tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is not None:
        pytest.skip("this TVM has its CUDA runtime loaded")
    _, path = cuda_library
    with pytest.raises(pbtvm.LibraryError, match="compiled for CUDA, and this TVM has no CUDA runtime loaded"):
        pbtvm.load(path)


def test_running_cuda_model_without_gpu_is_a_clear_error(cuda_library):
    from pbtvm.target import local_cuda_arch

    if local_cuda_arch() is not None:
        pytest.skip("a GPU is present")
    cm, _ = cuda_library
    with pytest.raises(RuntimeError, match=r"no CUDA device is available \((TVM sees no CUDA device|TVM's CUDA)"):
        cm(np.zeros((1, 40), np.float32))


def test_arch_specific_builds_run_on_their_base_arch(monkeypatch):
    """``sm_90a`` (what TVM's ``nvidia/nvidia-h100`` tag gives) runs on an H100 / H200, which
    reports ``sm_90``: the check before the first call refused it ("recompile it")."""
    from pbtvm import target as tg

    assert tg.arch_runs_on("sm_90a", "sm_90") and tg.arch_runs_on("sm_90", "sm_90")
    assert not tg.arch_runs_on("sm_90a", "sm_89") and not tg.arch_runs_on("sm_80", "sm_90")
    assert tg.arch_runs_on("sm_80", "sm_86") and not tg.arch_runs_on("sm_86", "sm_80")  # same major, minor up
    assert tg.arch_runs_on("sm_100f", "sm_103") and not tg.arch_runs_on("sm_100a", "sm_103")
    assert tg.arch_runs_on("sm_120", "sm_121") and not tg.arch_runs_on("sm_100", "sm_120")
    monkeypatch.setattr(tg, "_cuda_device", lambda: ("sm_90", None))
    info = tg.TargetInfo.of(tg.resolve_target(tg.tvm.target.Target("nvidia/nvidia-h100")))
    assert info.arch == "sm_90a"
    info.check_local_gpu()  # no error
    assert info.local_device() is not None
    with pytest.raises(RuntimeError, match="compiled for sm_90a; the local GPU is sm_89"):
        monkeypatch.setattr(tg, "_cuda_device", lambda: ("sm_89", None))
        info.check_local_gpu()


def test_an_arch_nvcc_cannot_build_is_named():
    """An arch this nvcc dropped (nvcc 13: sm_70) or no GPU has (sm_99) is the user's choice, not an
    internal error: refused when the target is resolved (it compiled, then export failed), and by
    nvcc's own message where a build gets that far, each naming the archs this nvcc builds."""
    import shutil
    import subprocess

    from pbtvm.cuda import compile_fatbin
    from pbtvm.errors import InputError

    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    try:
        archs = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no nvcc")
    if "compute_70" in archs or "compute_90" not in archs:
        pytest.skip("this nvcc still builds sm_70, or not sm_90")
    with pytest.raises(
        InputError, match=r"cannot build for sm_70 \(.*Unsupported gpu architecture.*builds for .*sm_90"
    ):
        compile_fatbin("__global__ void k() {}", "sm_70")
    for arch in ("sm_70", "sm_99"):
        with pytest.raises(InputError, match=f"cannot build for {arch}; it builds for .*sm_90.*: give the GPU's"):
            resolve_target({"kind": "cuda", "arch": arch})
    assert resolve_target({"kind": "cuda", "arch": "sm_90a"}).attrs["arch"] == "sm_90a"


def test_nvcc_compile_hooks_of_two_threads_take_turns():
    """TVM's compile hook is one process-wide global: a second thread's hook waits until the
    first thread's block ends, and the hook registered before is back after both."""
    import threading

    import tvm_ffi

    from pbtvm.cuda import nvcc_compile_hook

    name = "tvm_callback_cuda_compile"
    before = tvm_ffi.get_global_func(name, allow_missing=True)
    entered, release, seen = threading.Event(), threading.Event(), []

    def first() -> None:
        with nvcc_compile_hook("sm_90"):
            hook = tvm_ffi.get_global_func(name)
            entered.set()
            release.wait(10)
            seen.append(tvm_ffi.get_global_func(name).same_as(hook))

    def second() -> None:
        entered.wait(10)
        with nvcc_compile_hook("sm_80"):
            seen.append("second")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    entered.wait(10)
    threads[1].join(0.5)
    assert threads[1].is_alive() and seen == []  # the second waits for the first block
    release.set()
    for t in threads:
        t.join(10)
    assert seen == [True, "second"]
    assert tvm_ffi.get_global_func(name, allow_missing=True).same_as(before)
