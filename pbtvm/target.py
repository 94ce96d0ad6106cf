"""Resolve user target specs into TVM targets with what PB needs (popcount, an explicit arch)."""

from __future__ import annotations

import logging
from typing import Any

from ._tvm import tvm

logger = logging.getLogger(__name__)

#: Portable x86-64 level that has POPCNT; used when the host CPU cannot be named.
FALLBACK_MCPU = "x86-64-v2"
#: Per-block limits every arch from sm_70 on shares; MetaSchedule's GPU verifier needs them and
#: TVM only fills them in when it can query a local GPU.
CUDA_LIMITS = {
    "max_shared_memory_per_block": 49152,
    "max_threads_per_block": 1024,
    "thread_warp_size": 32,
    "registers_per_block": 65536,
}


def host_mcpu() -> str:
    """LLVM name of this machine's CPU (it has a popcount instruction on any x86-64-v2+)."""
    from tvm.target import codegen

    name = codegen.llvm_get_system_cpu()
    if not name or name == "generic" or not codegen.llvm_is_valid_cpu(name, "x86_64-unknown-linux-gnu"):
        return FALLBACK_MCPU
    return str(name)


def local_cuda_arch() -> str | None:
    """``sm_XY`` of CUDA device 0, or None when there is no usable GPU."""
    try:
        dev = tvm.cuda(0)
        if not dev.exist:
            return None
        return "sm_" + dev.compute_version.replace(".", "")
    except Exception:  # noqa: BLE001 - no driver / no runtime means no GPU
        return None


def resolve_target(target: Any) -> tvm.target.Target:
    """Turn ``"llvm"``, ``"cuda"``, a dict or a ``tvm.target.Target`` into a PB-ready Target.

    * ``llvm`` without ``mcpu`` gets the host CPU (plain llvm has no popcount instruction and is
      about 10x slower); the host is always llvm with the same mcpu.
    * ``cuda`` without ``arch`` gets the local GPU's arch; without a GPU this is an error that asks
      for an explicit one, e.g. ``{"kind": "cuda", "arch": "sm_90"}``.

    Raises
    ------
    ValueError
        For unknown target kinds, or ``cuda`` with neither an arch nor a local GPU.
    """
    if isinstance(target, tvm.target.Target):
        spec = dict(target.export())
    elif isinstance(target, str):
        spec = {"kind": target.split()[0]} if " " not in target else dict(tvm.target.Target(target).export())
    elif isinstance(target, dict):
        spec = dict(target)
    else:
        raise TypeError(f"target must be a str, dict or tvm.target.Target, got {type(target).__name__}")
    kind = spec.get("kind")
    spec.pop("host", None)
    # Device code does the work; a portable host keeps the exported .so loadable on any x86-64.
    host = tvm.target.Target({"kind": "llvm", "mcpu": FALLBACK_MCPU})
    if kind == "llvm":
        spec.setdefault("mcpu", host_mcpu())
        return tvm.target.Target(_clean(spec), host=tvm.target.Target({"kind": "llvm", "mcpu": spec["mcpu"]}))
    if kind == "cuda":
        if not spec.get("arch"):
            arch = local_cuda_arch()
            if arch is None:
                raise ValueError(
                    "target='cuda' needs a GPU to pick the arch; none was found. Pass an explicit arch, "
                    "e.g. target={'kind': 'cuda', 'arch': 'sm_90'}"
                )
            spec["arch"] = arch
        for key, value in CUDA_LIMITS.items():
            spec.setdefault(key, value)
        return tvm.target.Target(_clean(spec), host=host)
    hint = " (for an NVIDIA GPU use 'cuda')" if str(kind).lower() in ("gpu", "nvidia", "nvptx") else ""
    raise ValueError(f"unsupported target kind {kind!r}: pbtvm compiles for 'llvm' (CPU) and 'cuda'{hint}")


def _clean(spec: dict) -> dict:
    """Drop exported keys that Target() does not accept back (e.g. derived 'keys' / 'tag')."""
    return {k: v for k, v in spec.items() if k not in ("keys", "tag", "features") and v not in (None, "")}


def target_summary(target: tvm.target.Target) -> dict[str, str]:
    """JSON-ready description stored in manifests and tuning-log keys."""
    kind = target.kind.name
    out = {"kind": kind}
    attrs = target.export()
    for key in ("mcpu", "arch"):
        if attrs.get(key):
            out[key] = str(attrs[key])
    return out
