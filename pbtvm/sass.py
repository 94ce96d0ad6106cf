"""Inspect compiled CUDA kernels without a GPU: SASS per kernel and ``ptxas -v`` resource usage.

Used by the code-generation tests (binary tensor-core instructions present, no local-memory
spills) and by ``benchmarks/bmma_resources.py`` (the table in BENCHMARKS.md).
"""

from __future__ import annotations

import re
import tempfile

from .cuda import GRID_WAIT_CALL, compile_fatbin, compile_ptx, kernel_definitions, nvcc_output
from .tools import cuobjdump

#: The native binary tensor-core instruction of ``mma.sync.m16n8k256 .b1 .and.popc`` on sm_80+.
BMMA_OPCODE = "BMMA.168256.AND.POPC"
_FUNCTION = re.compile(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", re.S)
_LOCAL_MEMORY = re.compile(r"\b(LDL|STL)(\.\w+)*\b")
_PTX_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\((.*?)(?=\.entry\s|\Z)", re.S)
_PTX_GLOBAL_LOAD = re.compile(r"(?<![\w.])ldu?\.global\.")  # also inside inline-asm braces
_SASS_GLOBAL_LOAD = re.compile(r"\bLDG\.")  # not LDGSTS (cp.async) or LDGDEPBAR
#: sm_90 SASS opcodes that read or write global (or generic) memory: loads, stores, atomics and
#: reductions, ``cp.async`` (LDGSTS), bulk and tensor copies (not ``UBLKPF``, the L2 prefetch).
GLOBAL_ACCESS = re.compile(
    r"\b(LDG|STG|LD|ST|ATOMG?|REDG?|LDGSTS|UBLKCP|UBLKRED|UTMALDG|UTMASTG|UTMAREDG|SULD|SUST|SUATOM|SURED)\b"
)


def sass_by_kernel(binary: bytes) -> dict[str, str]:
    """``{kernel name: SASS text}`` of a cubin/fatbin (``cuobjdump -sass``)."""
    with tempfile.TemporaryDirectory(prefix="pbtvm_sass_") as tmp:
        listing = cuobjdump(["-sass"], binary, tmp)
    kernels = dict(_FUNCTION.findall(listing))
    if not kernels:
        raise RuntimeError(f"cuobjdump listed no kernels:\n{listing[-2000:]}")
    return kernels


def source_sass(source: str, arch: str) -> dict[str, str]:
    """``{kernel name: SASS text}`` of CUDA C++ ``source`` built by nvcc for ``arch`` (``"sm_90"``);
    :func:`pbtvm.cuda.cuda_source` gives a built module's source."""
    return sass_by_kernel(compile_fatbin(source, arch))


def local_memory_ops(sass: str) -> int:
    """Number of local-memory loads/stores (``LDL``/``STL``: register spills) in a SASS listing."""
    return len(_LOCAL_MEMORY.findall(sass))


def bmma_problem(sass: str) -> str | None:
    """Why a PB product kernel's SASS falls short, or None: it must run on the binary tensor cores
    (:data:`BMMA_OPCODE`; ``.xor.popc`` is emulated on sm_90) and must not spill (``LDL``/``STL``)."""
    if BMMA_OPCODE not in sass:
        return f"no {BMMA_OPCODE}"
    if "BMMA.168256.XOR" in sass:
        return "BMMA.168256.XOR (emulated on sm_90)"
    spills = local_memory_ops(sass)
    return f"{spills} LDL/STL (register spills)" if spills else None


def ptx_global_loads(ptx: str) -> dict[str, int]:
    """``{kernel: number of ld.global instructions}`` of a PTX listing."""
    return {name: len(_PTX_GLOBAL_LOAD.findall(body)) for name, body in _PTX_ENTRY.findall(ptx)}


def sass_global_loads(sass: str) -> int:
    """Number of global-memory loads (``LDG``) in a SASS listing."""
    return len(_SASS_GLOBAL_LOAD.findall(sass))


def dropped_global_loads(source: str, arch: str, sass: dict[str, str] | None = None) -> dict[str, tuple[int, int]]:
    """Kernels of CUDA C++ ``source`` whose SASS has fewer global loads than their PTX:
    ``{kernel: (PTX loads, SASS loads)}``; empty when every ``ld.global`` became at least one
    ``LDG`` (more is ptxas unrolling a loop, a copy of its loads per copy of the body: the ballot
    pack's chunk loop, once its row constants were hoisted out of it).

    A load ptxas dropped leaves the kernel reading whatever its registers held. This happened to a
    sampled CUDA-core candidate (BENCHMARKS.md, eleventh session: 5 loads in the PTX, 4 in the
    SASS): a load under ``if``, repeated in the loop's peeled last iteration, was taken to be done
    already. ptxas may also remove a load whose value is unused or merge two identical ones, so a
    difference is a reason to read the SASS, not proof of a miscompile; in the PB kernels
    (``tests/test_ptxas_loads.py``) none has fewer. ``sass``: the listing of
    :func:`source_sass`, if already made.
    """
    ptx = ptx_global_loads(compile_ptx(source, arch))
    listing = source_sass(source, arch) if sass is None else sass
    counts = {name: sass_global_loads(text) for name, text in listing.items()}
    if set(ptx) != set(counts):
        raise RuntimeError(f"PTX kernels {sorted(ptx)} are not the SASS kernels {sorted(counts)}")
    return {name: (ptx[name], counts[name]) for name in ptx if counts[name] < ptx[name]}


def ptxas_usage(source: str, arch: str) -> dict[str, dict[str, int]]:
    """``ptxas -v`` resource usage per kernel of CUDA C++ ``source`` built for ``arch``.

    Returns
    -------
    dict
        ``{kernel: {"registers", "smem_bytes", "stack_bytes", "spill_stores", "spill_loads"}}``.

    Raises
    ------
    RuntimeError
        If nvcc fails.
    """
    _, messages = nvcc_output(source, arch, "-cubin", f"-arch={arch}", "-Xptxas", "-v")
    usage: dict[str, dict[str, int]] = {}
    current = None
    for line in messages.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = usage.setdefault(m.group(1), {})
            continue
        if current is None:
            continue
        for key, pattern in (
            ("stack_bytes", r"(\d+) bytes stack frame"),
            ("spill_stores", r"(\d+) bytes spill stores"),
            ("spill_loads", r"(\d+) bytes spill loads"),
            ("registers", r"Used (\d+) registers"),
            ("smem_bytes", r"(\d+) bytes smem"),
        ):
            m = re.search(pattern, line)
            if m:
                current[key] = int(m.group(1))
    return usage


def reads_before_wait(source: str) -> dict[str, set[str] | None]:
    """``{kernel: pointer parameters named before its griddepcontrol.wait}`` of TVM's CUDA C++
    ``source`` (None for a kernel without the wait): what a kernel launched with programmatic
    dependent launch may read (or write) before the kernel before it ends. Textual, so
    conservative: an address computed from a parameter counts as a read. ptxas may still move a
    load above the wait: :func:`loads_before_wait` checks the SASS."""
    out: dict[str, set[str] | None] = {}
    for name, param_list, body in kernel_definitions(source):
        params = {p.split()[-1] for p in param_list.split(",") if "*" in p}
        at = body.find(GRID_WAIT_CALL)
        out[name] = None if at < 0 else {p for p in params if re.search(rf"\b{p}\b", body[:at])}
    return out


def loads_before_wait(sass: str) -> list[str] | None:
    """The instructions of a kernel's SASS that access global memory (:data:`GLOBAL_ACCESS`) before
    its first ``griddepcontrol.wait`` (``ACQBULK``), None if it has none: a kernel launched with
    programmatic dependent launch that reads or writes global memory before it may race with the
    kernel before it (its L2 prefetch, ``UBLKPF``, moves nothing into the kernel). Text order:
    every branch before the wait in the PB kernels is local."""
    offset = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s*")  # an instruction line starts with its offset
    lines = [offset.sub("", line.split(";")[0]).strip() for line in sass.splitlines() if offset.match(line)]
    at = next((i for i, line in enumerate(lines) if "ACQBULK" in line), None)
    if at is None:
        return None
    return [line for line in lines[:at] if GLOBAL_ACCESS.search(line)]
