"""CUDA binaries: compile TVM's CUDA source to a fatbin with nvcc, at build time, never at load.

TVM 0.27 compiles CUDA kernels through the ``tvm_callback_cuda_compile`` hook (NVRTC by
default, which needs ``cuda-bindings``), and on a machine without a CUDA driver it keeps the raw
CUDA source in the module, to be compiled when the .so is loaded. A deployable pbtvm module must
not need a compiler at load time, so pbtvm (1) installs an nvcc hook while it compiles, and (2)
rewrites any CUDA module still holding source into a fatbin when it exports.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import tvm_ffi

from .errors import InputError, register_with_ffi
from .tools import find_cuda_tool

register_with_ffi()  # the nvcc hook below raises InputError from inside TVM's build
logger = logging.getLogger(__name__)


def find_nvcc() -> str:
    """Path of nvcc; raises RuntimeError if it is missing."""
    found = find_cuda_tool("nvcc")
    if found is None:
        raise RuntimeError("nvcc was not found (set CUDA_HOME or put it on PATH): it is needed to build CUDA kernels")
    return found


@functools.cache
def nvcc_archs(nvcc: str) -> tuple[str, ...]:
    """The ``sm_XY`` archs the nvcc at path ``nvcc`` builds (``nvcc --list-gpu-arch``), oldest
    first; empty where it cannot say."""
    try:
        proc = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(f"sm_{n}" for n in sorted({int(d) for d in re.findall(r"compute_(\d+)", proc.stdout)}))


def check_nvcc_builds(arch: str) -> None:
    """Refuse, before anything is built, a CUDA ``arch`` (``sm_90``, ``sm_90a`` ...) the nvcc that
    pbtvm would use cannot build (one it dropped, like sm_70 in nvcc 13, or no GPU's, like sm_99);
    nothing is checked without an nvcc or where it cannot list its archs.

    Raises
    ------
    InputError
        Naming the archs this nvcc builds.
    """
    nvcc = find_cuda_tool("nvcc")
    known = nvcc_archs(nvcc) if nvcc else ()
    base = re.match(r"sm_(\d+)", arch)
    if known and base and f"sm_{base.group(1)}" not in known:
        raise InputError(_unbuildable_arch(nvcc, arch))


def _unbuildable_arch(nvcc: str, arch: str, nvcc_said: str | None = None) -> str:
    """The message for an ``arch`` the ``nvcc`` cannot build (with what nvcc said, if it ran)."""
    known = nvcc_archs(nvcc)
    builds = f"it builds for {', '.join(known)}" if known else "it lists no archs"
    said = f" ({nvcc_said})" if nvcc_said else ""
    return (
        f"this nvcc ({nvcc}) cannot build for {arch}{said}; {builds}: give the GPU's compute capability "
        f"among those (e.g. sm_90 for an H100 or H200), or use an nvcc that supports {arch}"
    )


def compile_fatbin(source: str, arch: str) -> bytes:
    """Compile CUDA C++ ``source`` into a fatbin holding SASS for ``arch`` (e.g. ``sm_90``).

    Raises
    ------
    RuntimeError
        If nvcc is missing or fails (its message is included).
    """
    return nvcc_output(source, arch, "--fatbin", f"-gencode=arch=compute_{arch[3:]},code=sm_{arch[3:]}")[0]


def compile_ptx(source: str, arch: str) -> str:
    """The PTX nvcc makes of CUDA C++ ``source`` for ``arch`` (the input of ptxas), same options
    as :func:`compile_fatbin`."""
    return nvcc_output(source, arch, "--ptx", f"-arch=compute_{arch[3:]}")[0].decode()


def nvcc_output(source: str, arch: str, kind: str, *options: str) -> tuple[bytes, str]:
    """Run nvcc on CUDA C++ ``source`` with pbtvm's options, the output ``kind`` (e.g.
    ``"--cubin"``) and extra ``options``: the output file's bytes and nvcc's messages.

    Raises
    ------
    RuntimeError
        If nvcc is missing or fails (its message is included).
    """
    if not arch.startswith("sm_"):
        raise InputError(f"CUDA arch must look like 'sm_90', got {arch!r}")
    source = without_restrict_where_waiting(source)
    nvcc = find_nvcc()
    with tempfile.TemporaryDirectory(prefix="pbtvm_nvcc_") as tmp:
        src, out = os.path.join(tmp, "kernels.cu"), os.path.join(tmp, "kernels.out")
        with open(src, "w") as f:
            f.write(source)
        # --fmad=false: no fused multiply-add contraction, so float arithmetic rounds step by step
        # as the numpy reference does. The activation codes no longer depend on it
        # (pbtvm.ops.common.act_code gives no add the product to fuse).
        cmd = [nvcc, kind, "-O3", "--fmad=false", "-std=c++17", *options, "-o", out, src]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            if "Unsupported gpu architecture" in proc.stderr:  # the user's arch, not a bug of pbtvm
                raise InputError(_unbuildable_arch(nvcc, arch, proc.stderr.strip().splitlines()[-1]))
            raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
        with open(out, "rb") as f:
            return f.read(), proc.stderr


#: TVM's call of ``griddepcontrol.wait`` in CUDA C++ (programmatic dependent launch).
GRID_WAIT_CALL = "tvm_builtin_ptx_griddepcontrol_wait()"
#: A kernel's declaration or definition in TVM's CUDA C++: name, then its parameter list.
_KERNEL_SIGNATURE = re.compile(r'(extern "C" __global__ void (?:__launch_bounds__\([\d, ]+\) )?(\w+)\()([^;{)]*)\)')


def kernel_definitions(source: str) -> list[tuple[str, str, str]]:
    """``(name, parameter list, body)`` of each kernel defined in TVM's CUDA C++ ``source`` (not its
    declarations); a body runs to the next kernel's declaration or definition."""
    signatures = list(_KERNEL_SIGNATURE.finditer(source))
    out = []
    ends = [m.start() for m in signatures[1:]] + [len(source)]
    for m, end in zip(signatures, ends[: len(signatures)], strict=True):
        body = source[m.end() : end]
        if body.lstrip()[:1] == "{":
            out.append((m.group(2), m.group(3), body))
    return out


def without_restrict_where_waiting(source: str) -> str:
    """TVM's CUDA C++ ``source`` with no ``__restrict__`` on the parameters of the kernels that
    wait for the kernel before them (``griddepcontrol.wait``, :mod:`pbtvm.schedules.cuda_pdl`).

    TVM marks every kernel parameter ``__restrict__``, and nvcc then reads a buffer the kernel never
    writes with ``ld.global.nc`` (``LDG.E.CONSTANT``), which the PTX ISA allows only for memory that
    stays read-only for the kernel's whole lifetime. Under programmatic dependent launch that
    lifetime overlaps the kernel before it, which may still be writing the kernel's input; ptxas
    did move such loads of ``x`` above the wait (``ACQBULK``) in one-launch layers, the LSTM step
    and the decoder head, and nothing makes a non-coherent load after the wait see that kernel's
    writes. Without ``__restrict__`` they are coherent loads. Other kernels are unchanged.
    """
    waiting = {name for name, _, body in kernel_definitions(source) if GRID_WAIT_CALL in body}
    if not waiting:
        return source

    def plain(m: re.Match) -> str:
        params = m.group(3).replace(" __restrict__", "") if m.group(2) in waiting else m.group(3)
        return m.group(1) + params + ")"

    return _KERNEL_SIGNATURE.sub(plain, source)


#: Held while :func:`nvcc_compile_hook` is active. The hook is one process-wide TVM global: two
#: threads building for two arches at once could compile with the other's arch, and restoring in
#: exit order could leave the wrong hook registered. Reentrant: a build inside a build nests.
_HOOK_LOCK = threading.RLock()


@contextlib.contextmanager
def nvcc_compile_hook(arch: str) -> Iterator[None]:
    """While active, TVM compiles CUDA modules with nvcc into fatbins for ``arch``.

    Builds through the hook take turns across threads (:data:`_HOOK_LOCK`). A TVM without its CUDA
    runtime (the wheel on a host without a GPU) does not call it: the module keeps the source,
    which :mod:`pbtvm.library` compiles with :func:`compile_fatbin` at export.
    """
    name = "tvm_callback_cuda_compile"

    def hook(code: str, *_: object) -> bytes:
        return compile_fatbin(str(code), arch)

    with _HOOK_LOCK:
        previous = tvm_ffi.get_global_func(name, allow_missing=True)
        tvm_ffi.register_global_func(name, hook, override=True)
        try:
            yield
        finally:
            if previous is not None:
                tvm_ffi.register_global_func(name, previous, override=True)


#: schedule the ops PB layers leave in full precision (:mod:`pbtvm.schedules.cpu_default`)
CPU_DEFAULT_SCHEDULE = True


def cpu_fusion() -> Any:
    """Operator fusion for CPU builds: TVM's legalize-and-fuse passes, without constant folding.

    ``tvm.compile`` runs them only for GPU targets in TVM 0.27 (its CPU default pipeline goes
    straight from ``LegalizeOps`` to lowering), so every elementwise op between two PB layers was
    a kernel of its own: a ``relu`` one launch, the NaN-keeping ``relu`` of
    :class:`pbtvm.relay_passes.PropagateNaN` three. The PB kernels are opaque
    (:data:`pbtvm.relay_passes.apply_pb_schedules.OPAQUE`): nothing is fused into them. No
    ``FoldConstant``: a folded run-time tensor becomes a VM constant that calls share (and may
    hand out as an output).
    """
    from ._tvm import relax, tvm

    return tvm.transform.Sequential(
        [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ],
        name="pbtvm.cpu_fusion",
    )


def _check_cpu_features(mod: Any, target: Any) -> None:
    """Raise InputError where a CPU kernel of ``mod`` (a PrimFunc or an IRModule) uses instructions
    ``target`` lacks (:func:`pbtvm.ops.pb_vnni.missing_features`): LLVM would abort the process."""
    from ._tvm import tir
    from .ops.pb_vnni import missing_features

    funcs = mod.functions_items() if hasattr(mod, "functions_items") else [("main", mod)]
    for name, func in funcs:
        missing = missing_features(func, target) if isinstance(func, tir.PrimFunc) else []
        if missing:
            raise InputError(
                f"kernel {name} was made for a CPU with {', '.join(missing)}, which the build target "
                f"{target} lacks: schedule and build for the same target"
            )


def cuda_source(executable: Any) -> str:
    """The CUDA C++ of the kernels in ``executable`` (built by :func:`build` for a CUDA target)."""
    return executable.mod.imports[0].inspect_source()


def build(mod: Any, target: Any, cuda_graph: bool = False, config: dict | None = None) -> Any:
    """``tvm.compile(mod, target)``, with CUDA kernels built by nvcc for the target's arch and,
    on CPUs, the Relax operators fused first (:func:`cpu_fusion`). Where the target launches
    programmatically (sm_90+, :attr:`pbtvm.target.TargetLimits.programmatic_launch`), every kernel
    that does not use ``griddepcontrol`` is rewritten to wait first and launched early
    (:func:`pbtvm.schedules.cuda_pdl.wait_first`, TIR pipeline ``pbtvm_wait_first``).

    Parameters
    ----------
    mod : tvm.IRModule or tvm.tirx.PrimFunc
    target : tvm.target.Target
    cuda_graph : bool
        Run TVM's CUDA-graph rewrite on the Relax functions (``relax.backend.use_cuda_graph``):
        static regions are captured on their first run and replayed as one graph launch.
    config : dict, optional
        More pass options for a CUDA build (e.g. ``{"tirx.disable_cse_tir": True}``: a kernel with a
        dispatch by batch then takes no host-computed common subexpressions as parameters, which
        the kernel emulator of the tests cannot supply).

    Returns
    -------
    tvm.runtime.Executable
    """
    from ._tvm import relax, tvm

    if target.kind.name != "cuda":
        _check_cpu_features(mod, target)
        if isinstance(mod, tvm.IRModule) and any(isinstance(f, relax.Function) for _, f in mod.functions_items()):
            with target:
                mod = cpu_fusion()(mod)
                from .schedules.cpu_default import cpu_default_schedule, serial_indirect_accumulation

                if CPU_DEFAULT_SCHEDULE:
                    mod = cpu_default_schedule()(mod)
                mod = serial_indirect_accumulation()(mod)
        return tvm.compile(mod, target=target)
    from .schedules.cuda_pdl import WAIT_FIRST_PIPELINE
    from .target import TargetInfo

    config = {**({"relax.backend.use_cuda_graph": True} if cuda_graph else {}), **(config or {})}
    pipeline = WAIT_FIRST_PIPELINE if TargetInfo.of(target).limits.programmatic_launch else "default"
    with nvcc_compile_hook(str(target.export()["arch"])), tvm.transform.PassContext(config=config):
        return tvm.compile(mod, target=target, tir_pipeline=pipeline)
