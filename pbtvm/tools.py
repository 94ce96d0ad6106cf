"""Locate CUDA tools (nvcc, cuobjdump, nvdisasm) in a CUDA install, on PATH or in pip wheels."""

from __future__ import annotations

import glob
import os
import shutil
import site
import subprocess


def find_cuda_tool(name: str) -> str | None:
    """Path of a CUDA tool (nvcc, cuobjdump, nvdisasm), or None.

    Looks in ``$CUDA_HOME/bin``, ``$CUDA_PATH/bin``, ``/usr/local/cuda/bin``, then PATH, then the
    ``bin`` folders of pip's ``nvidia-*`` wheels.
    """
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", name)):
            return os.path.join(home, "bin", name)
    found = shutil.which(name)
    if found:
        return found
    home = pip_cuda_home(name)
    return os.path.join(home, "bin", name) if home else None


def pip_cuda_home(tool: str = "nvcc") -> str | None:
    """Root of the CUDA toolkit that pip's ``nvidia-*`` wheels installed (``.../nvidia/cu13``), or None.

    ``pip install pbtvm[cuda]`` brings nvcc, its headers and libcu++ there; that is enough to build
    and export CUDA kernels on a machine with no system CUDA. Only a root whose ``bin`` holds
    ``tool`` counts.
    """
    for root in site.getsitepackages() + [site.getusersitepackages()]:
        hits = sorted(glob.glob(os.path.join(root, "nvidia", "cu*", "bin", tool)))
        if hits:
            return os.path.dirname(os.path.dirname(hits[-1]))
    return None


def cuobjdump(args: list[str], binary: bytes, tmpdir: str) -> str:
    """Run ``cuobjdump ARGS`` on an in-memory CUDA binary and return its output."""
    tool = find_cuda_tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found: pip install nvidia-cuda-cuobjdump")
    path = os.path.join(tmpdir, "kernels.fatbin")
    with open(path, "wb") as f:
        f.write(binary)
    env = dict(os.environ)
    nvdisasm = find_cuda_tool("nvdisasm")
    if nvdisasm:
        env["PATH"] = os.path.dirname(nvdisasm) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run([tool, *args, path], capture_output=True, text=True, env=env)
    return proc.stdout + proc.stderr
