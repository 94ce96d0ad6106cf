"""One-kernel copies between a Relax function's arguments and its own buffers.

TVM's CUDA-graph rewrite (``relax.backend.use_cuda_graph``) captures only kernels whose
arguments all live in the function's static (planned) memory; a kernel that reads an argument
or writes a returned tensor runs outside the graph, one launch each. A decode step therefore
copies its arguments into planned buffers with *one* kernel (:func:`repack_func`), runs every
other kernel inside the graph, and copies its results out with one more.

A repack kernel moves *groups*: within a group, the sources read in order, flattened and
concatenated, equal the destinations written in order, flattened and concatenated (e.g. a
state ``[L, B, H]`` into ``L`` tensors ``[B, H]``). On CUDA all groups share one flat loop (one
thread per element); on the CPU each run of elements one source and one destination share is
one serial loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._tvm import tir

#: Threads per CUDA block of a repack kernel.
REPACK_THREADS = 256


@dataclass(frozen=True)
class CopyGroup:
    """Sources and destinations (static shapes, one dtype) holding the same elements in order."""

    dtype: str
    sources: tuple[tuple[int, ...], ...]
    destinations: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        n_src, n_dst = (sum(int(np.prod(s)) for s in side) for side in (self.sources, self.destinations))
        if n_src != n_dst:
            raise ValueError(f"copy group moves {n_src} elements from its sources into {n_dst}")

    @property
    def size(self) -> int:
        """Elements in the group."""
        return sum(int(np.prod(s)) for s in self.sources)


def _unflatten(index: tir.PrimExpr, shape: Sequence[int]) -> list[tir.PrimExpr]:
    out = []
    for dim in reversed(shape):
        out.append(index % dim)
        index = index // dim
    return out[::-1]


def _starts(shapes: Sequence[Sequence[int]]) -> list[int]:
    return [int(v) for v in np.cumsum([0] + [int(np.prod(s)) for s in shapes])]


def repack_func(groups: Sequence[CopyGroup], target_kind: str, name: str = "repack") -> tir.PrimFunc:
    """A scheduled PrimFunc ``(sources of every group..., destinations of every group...)``.

    Parameters
    ----------
    groups : sequence of CopyGroup
    target_kind : str
        ``"cuda"`` (a thread per element) or ``"llvm"`` (a loop per run of elements, :func:`_copy_segments`).
    name : str

    Returns
    -------
    tir.PrimFunc
        Scheduled (``tirx.is_scheduled``): one kernel on CUDA.
    """
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    if not groups:
        raise ValueError("repack_func needs at least one copy group")
    total = max(g.size for g in groups)
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            src = [
                [T.arg(f"src{g}_{k}", T.buffer(s, grp.dtype)) for k, s in enumerate(grp.sources)]
                for g, grp in enumerate(groups)
            ]
            dst = [
                [T.arg(f"dst{g}_{k}", T.buffer(s, grp.dtype)) for k, s in enumerate(grp.destinations)]
                for g, grp in enumerate(groups)
            ]
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            if target_kind == "cuda":
                bx, tx = T.env_thread("blockIdx.x"), T.env_thread("threadIdx.x")
                with T.launch_thread(bx, (total + REPACK_THREADS - 1) // REPACK_THREADS):
                    with T.launch_thread(tx, REPACK_THREADS):
                        _copy_body(bx * REPACK_THREADS + tx, groups, src, dst)
            elif target_kind == "llvm":
                _copy_segments(groups, src, dst)
            else:
                raise ValueError(f"repack_func has no schedule for target kind {target_kind!r}")
    return ib.get()


def _copy_segments(groups: Sequence[CopyGroup], src: list, dst: list) -> None:
    """CPU: one serial loop per run of elements that one source and one destination share.

    A decode step moves a few thousand elements: a parallel loop over all of them with a branch
    per piece cost 5-15 µs a call on 2 cores; these loops vectorize and cost well under one.
    """
    from tvm.script.ir_builder import tirx as T

    for g, grp in enumerate(groups):
        s_start, d_start = _starts(grp.sources), _starts(grp.destinations)
        for k, shape in enumerate(grp.destinations):
            for j, s_shape in enumerate(grp.sources):
                lo, hi = max(d_start[k], s_start[j]), min(d_start[k + 1], s_start[j + 1])
                if lo >= hi:
                    continue
                with T.serial(0, hi - lo) as i:
                    value = src[g][j][tuple(_unflatten(lo - s_start[j] + i, s_shape))]
                    T.buffer_store(dst[g][k], value, _unflatten(lo - d_start[k] + i, shape))


def _copy_body(p: tir.PrimExpr, groups: Sequence[CopyGroup], src: list, dst: list) -> None:
    from tvm.script.ir_builder import tirx as T

    for g, grp in enumerate(groups):
        s_start = _starts(grp.sources)
        value = None  # the source element at flat position p: a chain over the source pieces
        for k in reversed(range(len(grp.sources))):
            v = src[g][k][tuple(_unflatten(p - s_start[k], grp.sources[k]))]
            value = v if value is None else tir.if_then_else(p < s_start[k + 1], v, value)
        d_start = _starts(grp.destinations)
        for k, shape in enumerate(grp.destinations):
            with T.If(tir.all(p >= d_start[k], p < d_start[k + 1])):
                with T.Then():
                    T.buffer_store(dst[g][k], value, _unflatten(p - d_start[k], shape))


def repack_out_types(groups: Sequence[CopyGroup]) -> list:
    """Relax ``TensorType`` of every destination, in argument order (for ``call_tir``)."""
    from ._tvm import relax

    return [relax.TensorType(list(s), g.dtype) for g in groups for s in g.destinations]


__all__ = ["CopyGroup", "REPACK_THREADS", "repack_func", "repack_out_types"]
