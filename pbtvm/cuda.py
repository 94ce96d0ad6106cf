"""CUDA binaries: compile TVM's CUDA source to a fatbin with nvcc, at build time, never at load.

TVM 0.27 compiles CUDA kernels through the ``tvm_callback_cuda_compile`` hook (NVRTC by
default, which needs ``cuda-bindings``), and on a machine without a CUDA driver it keeps the raw
CUDA source in the module, to be compiled when the .so is loaded. A deployable pbtvm module must
not need a compiler at load time, so pbtvm (1) installs an nvcc hook while it compiles, and (2)
rewrites any CUDA module still holding source into a fatbin when it exports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import tvm_ffi

logger = logging.getLogger(__name__)


def find_nvcc() -> str:
    """Path of nvcc (``$CUDA_HOME/bin`` first, then PATH); raises RuntimeError if missing."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found is None:
        raise RuntimeError("nvcc was not found (set CUDA_HOME or put it on PATH): it is needed to build CUDA kernels")
    return found


def compile_fatbin(source: str, arch: str) -> bytes:
    """Compile CUDA C++ ``source`` into a fatbin holding SASS for ``arch`` (e.g. ``sm_90``).

    Raises
    ------
    RuntimeError
        If nvcc is missing or fails (its message is included).
    """
    if not arch.startswith("sm_"):
        raise ValueError(f"CUDA arch must look like 'sm_90', got {arch!r}")
    nvcc = find_nvcc()
    cc = arch[3:]
    with tempfile.TemporaryDirectory(prefix="pbtvm_nvcc_") as tmp:
        src, out = os.path.join(tmp, "kernels.cu"), os.path.join(tmp, "kernels.fatbin")
        with open(src, "w") as f:
            f.write(source)
        cmd = [nvcc, "--fatbin", "-O3", "-std=c++17", f"-gencode=arch=compute_{cc},code=sm_{cc}", "-o", out, src]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
        with open(out, "rb") as f:
            return f.read()


@contextlib.contextmanager
def nvcc_compile_hook(arch: str) -> Iterator[None]:
    """While active, TVM compiles CUDA modules with nvcc into fatbins for ``arch``."""
    name = "tvm_callback_cuda_compile"
    previous = tvm_ffi.get_global_func(name, allow_missing=True)

    def hook(code: str, *_: object) -> bytes:
        return compile_fatbin(str(code), arch)

    tvm_ffi.register_global_func(name, hook, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(name, previous, override=True)
