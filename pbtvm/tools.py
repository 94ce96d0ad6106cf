"""Locate CUDA binary tools (cuobjdump) here or in the ``nvidia-cuda-cuobjdump`` wheel."""

from __future__ import annotations

import glob
import os
import shutil
import site
import subprocess


def find_cuda_tool(name: str) -> str | None:
    """Path of ``cuobjdump``/``nvdisasm``: PATH, ``$CUDA_HOME/bin``, then pip's nvidia wheels."""
    found = shutil.which(name)
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", name)):
            return os.path.join(home, "bin", name)
    for root in site.getsitepackages() + [site.getusersitepackages()]:
        hits = sorted(glob.glob(os.path.join(root, "nvidia", "cu*", "bin", name)))
        if hits:
            return hits[-1]
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
