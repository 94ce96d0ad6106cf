"""Resolve user target specs into TVM targets with what PB needs (popcount, an explicit arch)."""

from __future__ import annotations

import difflib
import functools
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._tvm import tvm
from .bitplane import LUT_LAYOUT, MMA_LAYOUT
from .cuda import check_nvcc_builds
from .errors import InputError, InputTypeError, first_line
from .names import ENV_CPU_KERNEL, ENV_CUDA_PDL, ENV_SKIP_CPU_CHECK

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


#: ``layout="auto"`` (the default of :func:`pbtvm.compile` and friends): see :func:`weight_layout`.
AUTO_LAYOUT = "auto"
#: Most rows per layer (a decoder's batch, a static-batch compile's largest) for which ``layout="auto"``
#: picks the table-lookup layout on AVX2 CPUs:
#: each activation row repeats the lookups, while the byte-code kernel decodes a weight once for
#: several rows, so from batch 4 it is as fast (W4) or faster (BENCHMARKS.md, sixteenth session).
LUT_AUTO_MAX_BATCH = 2
#: With AVX-VNNI and GFNI (Intel client cores from Alder Lake on) the byte-code kernel decodes
#: 512-input blocks with ymm GFNI transposes and is much closer: ``auto`` picks the lookup only
#: where rows x weight bits is at most this (W2-W4 at one row, W2 at two). Measured on the 2x650 LM
#: decoder's ``generate()``: lookup vs byte code W2 1.69x / 1.28x at batch 1 / 2, W4 1.25x /
#: 0.94x, W8 0.99x / 0.91x (BENCHMARKS.md, nineteenth session).
LUT_YMM_GFNI_MAX_ROW_BITS = 4
#: ``batch`` of :func:`weight_layout` for a dynamic-batch compile: any number of rows per call.
DYNAMIC_BATCH = "dynamic"
#: First arch with ``mma.sync.m16n8k256 .b1 .and.popc`` (PTX ISA: sm_80; sm_75 has only
#: m8n8k128 ``.xor.popc``).
BMMA_MIN_SM = 80
#: First arch with programmatic dependent launch (``griddepcontrol``, PTX ISA: sm_90).
PDL_MIN_SM = 90


def programmatic_launch(arch: str | None) -> bool:
    """Whether kernels built for CUDA ``arch`` (``sm_XY``) use programmatic dependent launch: sm_90
    and newer, unless the environment variable :data:`pbtvm.names.ENV_CUDA_PDL` is ``0``."""
    match = re.fullmatch(r"sm_(\d+)[a-z]?", arch or "")
    if match is None or int(match.group(1)) < PDL_MIN_SM:
        return False
    return os.environ.get(ENV_CUDA_PDL, "1").strip().lower() not in ("0", "false", "no", "off")


def host_mcpu() -> str:
    """LLVM name of this machine's CPU (it has a popcount instruction on any x86-64-v2+)."""
    from tvm.target import codegen

    name = codegen.llvm_get_system_cpu()
    if not name or name == "generic" or not codegen.llvm_is_valid_cpu(name, "x86_64-unknown-linux-gnu"):
        return FALLBACK_MCPU
    return str(name)


#: The AMX-INT8 tile instructions' LLVM features and the ``/proc/cpuinfo`` flags that show them.
HOST_AMX_FLAGS = {"amx-tile": "amx_tile", "amx-int8": "amx_int8"}


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's flags as Linux lists them in ``cpuinfo`` (its first ``flags`` line; empty where
    the file cannot be read, e.g. off Linux)."""
    try:
        with open(cpuinfo, encoding="utf-8") as info:
            return set(next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), []))
    except OSError:
        return set()


#: x86 instruction-set features (LLVM's names) whose instructions LLVM may put in code it builds
#: from pbtvm's kernels (vector, bit-manipulation and, with APX, general-register encodings): a
#: library built for a CPU with one of them stops with an illegal instruction on a CPU without it
#: (:func:`library_cpu_features`). An AMD ``bdver`` build holds FMA4 / XOP, a ``diamondrapids``
#: one APX registers. Left out: AMX (the kernels use the tiles only after the system grants them,
#: which it does only on a CPU that has them); instructions LLVM emits only for their own intrinsics, which no
#: kernel calls (AVX512-VP2INTERSECT, AVX-IFMA, AVX-NE-CONVERT, AVX-VNNI-INT8/16); AVX10 (its
#: instructions are the AVX-512 features listed). APX has no ``cpuinfo`` flag: it is found only
#: through LLVM's name for the host CPU. Features LLVM gives no CPU here are skipped.
X86_ISA_FEATURES = (
    "sse3", "ssse3", "sse4.1", "sse4.2", "sse4a", "popcnt", "lzcnt", "movbe", "pclmul", "adx",
    "avx", "avx2", "fma", "fma4", "xop", "tbm", "f16c", "bmi", "bmi2", "vpclmulqdq",
    "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512vnni", "avx512vbmi", "avx512vbmi2",
    "avx512bitalg", "avx512vpopcntdq", "avx512bf16", "avx512fp16", "avx512ifma", "avxvnni", "gfni",
    "egpr", "ndd", "ppx", "push2pop2", "ccmp", "nf", "zu",
)  # fmt: skip
#: Features x86 llvm targets get turned off (``-name`` appended unless their ``mattr`` names them):
#: AMD's SSE4a, which LLVM may use for byte shuffles (EXTRQ / INSERTQ) and no Intel CPU has, so a
#: library built for a Zen CPU also runs on Intel ones (the kernels' hot loops are AVX2 / AVX-512).
#: Not for ``bdver`` CPUs, whose FMA4 and XOP imply it.
UNPORTABLE_FEATURES = ("sse4a",)
#: LLVM feature names that Linux's ``cpuinfo`` spells otherwise (beyond ``_`` / ``.`` / ``-``).
_CPUINFO_NAMES = {"bmi": "bmi1", "sse3": "pni", "lzcnt": "abm", "pclmul": "pclmulqdq"}


def _feature_key(name: str) -> str:
    return re.sub(r"[-_.]", "", _CPUINFO_NAMES.get(name, name).lower())


def llvm_triple(target: tvm.target.Target) -> str:
    """An LLVM ``target``'s ``mtriple``, else LLVM's default (this machine's)."""
    from tvm.target import codegen

    return str(target.attrs.get("mtriple", "") or codegen.llvm_get_system_triple())


@functools.cache
def _mcpu_features(mcpu: str) -> frozenset:
    """The features LLVM gives its CPU ``mcpu`` (for this machine's triple)."""
    from tvm.target import codegen

    return frozenset(codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": mcpu})))


def unportable_off(mcpu: str, mattr: list[str] = ()) -> list[str]:
    """The ``-feature`` entries :func:`resolve_target` appends to an llvm target of CPU ``mcpu``
    and ``mattr``: its :data:`UNPORTABLE_FEATURES` that ``mattr`` does not name (none for ``bdver``
    CPUs, whose FMA4 / XOP imply SSE4a)."""
    named = {entry[1:] for entry in mattr}
    cpu = _mcpu_features(mcpu)
    return [f"-{f}" for f in UNPORTABLE_FEATURES if f not in named and f in cpu and "fma4" not in cpu]


def library_cpu_features(target: tvm.target.Target) -> list[str]:
    """The :data:`X86_ISA_FEATURES` an x86-64 LLVM ``target``'s CPU (its ``mcpu`` and ``mattr``)
    has: what a CPU needs to run a library built for it (empty for other targets)."""
    from tvm.target import codegen

    if target.kind.name != "llvm" or not llvm_triple(target).startswith("x86_64"):
        return []
    have = set(codegen.llvm_get_cpu_features(target))
    return [f for f in X86_ISA_FEATURES if f in have]


def missing_cpu_features(needed: list[str], cpuinfo: str = "/proc/cpuinfo", llvm_host=None) -> list[str]:
    """Those of ``needed`` (:func:`library_cpu_features`) this machine's CPU lacks: neither its
    ``cpuinfo`` flags (where Linux lists them) nor LLVM's view of it (``llvm_host``, default: the
    features of the CPU ``target="llvm"`` builds for here) have them. A CPU LLVM names with more
    features than Linux lists (an old kernel, a guest with features masked) is taken at LLVM's
    word, as every local build already is."""
    if not needed:  # an older library, or not x86: nothing to check (and no LLVM needed)
        return []
    host = _llvm_host_features() if llvm_host is None else llvm_host
    have = {_feature_key(f) for f in cpu_flags(cpuinfo) | set(host)}
    return [f for f in needed if _feature_key(f) not in have]


def popcount_forced() -> bool:
    """Whether ``PBTVM_CPU_KERNEL`` forces the portable popcount CPU kernels (``popcount``, any
    case). Another value is named in a warning (once) and ignored: a typo used to pass silently."""
    value = os.environ.get(ENV_CPU_KERNEL, "").strip().lower()
    if value not in ("", "popcount"):
        _warn_once(
            f"{ENV_CPU_KERNEL}={os.environ[ENV_CPU_KERNEL]!r} is ignored: its only value is 'popcount' (the portable "
            "CPU kernels); unset it for the default kernels"
        )
    return value == "popcount"


@functools.cache
def _warn_once(message: str) -> None:
    import warnings

    warnings.warn(message, stacklevel=3)


def skip_cpu_check() -> bool:
    """Whether ``PBTVM_SKIP_CPU_CHECK`` asks to skip the CPU feature check: ``1``, ``true``,
    ``yes`` or ``on`` (any case); anything else, ``0``/``false``/``no`` included, keeps it."""
    return os.environ.get(ENV_SKIP_CPU_CHECK, "").strip().lower() in ("1", "true", "yes", "on")


def features_this_cpu_lacks(target: tvm.target.Target) -> list[str]:
    """What code built here for ``target`` needs that this machine's CPU lacks (:func:`library_cpu_features`
    against :func:`missing_cpu_features`): running it here would stop the process with an illegal
    instruction. Empty for other targets and with ``PBTVM_SKIP_CPU_CHECK=1``."""
    if skip_cpu_check():
        return []
    return missing_cpu_features(library_cpu_features(target))


@functools.cache
def _llvm_host_features() -> frozenset:
    """LLVM's features of this machine's CPU (:func:`host_mcpu`); empty with a TVM runtime built
    without LLVM (then ``cpuinfo`` alone decides)."""
    try:
        return _mcpu_features(host_mcpu())
    except Exception:  # no LLVM in this TVM
        return frozenset()


def host_mattr(mcpu: str, cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """``+feature`` for the AMX features this machine has (its ``cpuinfo`` flags) that LLVM's CPU
    ``mcpu`` lacks: a virtual machine's CPU model may be named after an older core (an AMX Xeon
    guest that LLVM calls ``rocketlake``), and the kernels would not use its tile units."""
    flags = cpu_flags(cpuinfo)
    if not flags:
        return []
    known = _mcpu_features(mcpu)
    return [f"+{feature}" for feature, flag in HOST_AMX_FLAGS.items() if flag in flags and feature not in known]


@functools.cache
def _this_host_mattr(mcpu: str) -> tuple[str, ...]:
    """:func:`host_mattr` of this machine, read once per process (every ``resolve_target("llvm")``
    asks, and the rules resolve the host for each kernel; reading the file and LLVM's features
    doubled its time)."""
    return tuple(host_mattr(mcpu))


def _cuda_device() -> tuple[str | None, str | None]:
    """``(sm_XY, None)`` for CUDA device 0, or ``(None, why TVM cannot use it)``."""
    try:
        if not tvm.cuda(0).exist:
            return None, "TVM sees no CUDA device (tvm.cuda(0).exist is False)"
        version = tvm.cuda(0).compute_version  # raises if the device's properties cannot be read
        if not version:
            return None, "TVM reads no compute capability of CUDA device 0"
        return "sm_" + version.replace(".", ""), None
    except Exception as err:  # e.g. a TVM build without CUDA, a driver that fails to load
        return None, f"TVM's CUDA runtime failed: {type(err).__name__}: {str(err).strip()[:300]}"


def cuda_device_problem() -> str | None:
    """Why TVM cannot use CUDA device 0 (no device, or its CUDA runtime failing to load), or None."""
    return _cuda_device()[1]


def arch_runs_on(built: str, device: str) -> bool:
    """Whether code built for CUDA arch ``built`` runs on a GPU of arch ``device`` (``sm_XY``, as
    :func:`local_cuda_arch` reports it), as CUDA's binary compatibility says: arch-specific code
    (``sm_90a``, what TVM's ``nvidia/nvidia-h100`` tag gives) on that arch only; plain and family
    code (``sm_80``, ``sm_100f``) on the same major version with a minor at least as high
    (``sm_86``; ``sm_103``)."""
    match, have = re.fullmatch(r"sm_(\d+)(\d)([af]?)", built), re.fullmatch(r"sm_(\d+)(\d)", device)
    if not match or not have:
        return built == device
    major, minor, suffix = match.groups()
    if suffix == "a":
        return (major, minor) == have.groups()
    return major == have.group(1) and int(have.group(2)) >= int(minor)


def local_cuda_arch() -> str | None:
    """``sm_XY`` of CUDA device 0, or None when there is no usable GPU (:func:`cuda_device_problem`)."""
    return _cuda_device()[0]


def resolve_target(target: Any) -> tvm.target.Target:
    """Turn ``"llvm"``, ``"cuda"``, a dict, its JSON text, TVM's old command-line form (``"llvm
    -mcpu=alderlake"``) or a ``tvm.target.Target`` into a PB-ready Target.

    * ``llvm`` without ``mcpu`` (or with ``mcpu=native``) gets the host CPU (plain llvm has no popcount instruction and is
      about 10x slower), plus the AMX features the host has but LLVM's name for its CPU lacks
      (:func:`host_mattr`) unless ``mattr`` names an AMX feature itself (``-mattr=-gfni`` keeps
      them, ``-mattr=-amx-tile`` turns them off); the host is always llvm with the same mcpu,
      mattr and mtriple.
    * x86 CPUs with :data:`UNPORTABLE_FEATURES` (AMD's SSE4a) get them turned off (Zen builds run
      on Intel CPUs).
    * ``cuda`` without ``arch`` gets the local GPU's arch; without a GPU this is an error that asks
      for an explicit one, e.g. ``{"kind": "cuda", "arch": "sm_90"}``.

    Raises
    ------
    ValueError
        (:class:`~pbtvm.errors.InputError`) For unknown target kinds, an ``mcpu`` or an ``mattr``
        feature LLVM does not know (with the closest names), an ``mattr`` entry without its
        ``+`` / ``-``, an ``mtriple`` of another architecture than this machine's (no
        cross-compiling), a CUDA ``arch`` not spelt like ``sm_90``, or ``cuda`` with
        neither an arch nor a local GPU.
    """
    if isinstance(target, tvm.target.Target):
        spec = dict(target.export())
    elif isinstance(target, str):
        spec = _target_string(target)
    elif isinstance(target, dict):
        spec = dict(target)
    else:
        raise InputTypeError(f"target must be a str, dict or tvm.target.Target, got {type(target).__name__}")
    kind = spec.get("kind")
    spec.pop("host", None)
    # Device code does the work; a portable host keeps the exported .so loadable on any x86-64.
    host = tvm.target.Target({"kind": "llvm", "mcpu": FALLBACK_MCPU})
    if kind == "llvm":
        _check_same_arch(spec.get("mtriple"))  # first: LLVM crashes on CPU names of a triple it does not know
        if "mcpu" in spec and spec["mcpu"] in ("native", None, ""):  # "this machine's CPU" (clang's spelling), unset
            del spec["mcpu"]
        if "mcpu" in spec:
            _check_llvm_cpu(str(spec["mcpu"]), spec.get("mtriple"))
        if "mattr" in spec:
            spec["mattr"] = _check_llvm_mattr(spec["mattr"], spec.get("mtriple"))
        if "mcpu" not in spec:  # the host, with the tile instructions its CPU's name may not imply
            spec["mcpu"] = host_mcpu()
            extra = _this_host_mattr(spec["mcpu"])
            given = spec.get("mattr", [])
            if extra and not any(entry[1:].startswith("amx") for entry in given):  # "-mattr=-gfni" keeps AMX
                spec["mattr"] = [*given, *extra]
        off = unportable_off(str(spec["mcpu"]), spec.get("mattr", []))
        if off:  # a Zen build runs on Intel CPUs too
            spec["mattr"] = [*spec.get("mattr", []), *off]
        # the host builds the CPU kernels of a Relax module: the same CPU, features included
        same_cpu = {key: spec[key] for key in ("mcpu", "mattr", "mtriple") if key in spec}
        return tvm.target.Target(_clean(spec), host=tvm.target.Target({"kind": "llvm", **same_cpu}))
    if kind == "cuda":
        if not spec.get("arch") and str(spec.get("mcpu", "")).startswith("sm_"):  # llvm's key for a GPU arch
            raise InputError(
                f"a CUDA target takes its GPU as arch, not mcpu: -arch={spec['mcpu']} / 'arch': '{spec['mcpu']}'"
            )
        if not spec.get("arch"):
            arch = local_cuda_arch()
            if arch is None:
                raise InputError(
                    f"target='cuda' needs a GPU to pick the arch; none was found ({cuda_device_problem()}). "
                    "Pass an explicit arch, e.g. target={'kind': 'cuda', 'arch': 'sm_90'}"
                )
            spec["arch"] = arch
        if not re.fullmatch(r"sm_[1-9]\d{1,2}[a-z]?", str(spec["arch"])):  # TVM needs major and minor digits
            raise InputError(f"CUDA arch {spec['arch']!r} must look like 'sm_90' (sm_ and the compute capability)")
        check_nvcc_builds(str(spec["arch"]))
        for key, value in CUDA_LIMITS.items():
            spec.setdefault(key, value)
        return tvm.target.Target(_clean(spec), host=host)
    hint = " (for an NVIDIA GPU use 'cuda')" if str(kind).lower() in ("gpu", "nvidia", "nvptx") else ""
    raise InputError(f"unsupported target kind {kind!r}: pbtvm compiles for 'llvm' (CPU) and 'cuda'{hint}")


def _check_same_arch(mtriple: str | None) -> None:
    """Refuse an ``mtriple`` of another architecture than this machine's: pbtvm links, checks and
    runs CPU libraries here (no cross toolchain; CPU features read from this machine), so such a
    build failed later (LLVM errors, "architecture mismatch" at the call, a linker error at export)."""
    if not mtriple:
        return
    from tvm.target import codegen

    system = str(codegen.llvm_get_system_triple())
    if _arch_of(str(mtriple)) != _arch_of(system):
        raise InputError(
            f"target mtriple {mtriple!r} is another architecture than this machine's ({system}): pbtvm "
            "does not cross-compile CPU libraries; compile on a machine of that architecture"
        )
    if "linux" not in str(mtriple).lower():
        raise InputError(f"target mtriple {mtriple!r} is not Linux: pbtvm builds Linux (ELF) libraries only")


#: Spellings of one architecture in target triples (LLVM reads them alike).
_ARCH_ALIASES = {"amd64": "x86_64", "x86_64h": "x86_64", "arm64": "aarch64"}


def _arch_of(triple: str) -> str:
    """The architecture of an LLVM target triple, its aliases folded (``amd64-...`` is ``x86_64``);
    case kept, as LLVM reads it (``X86_64`` is no architecture it knows)."""
    arch = triple.split("-")[0]
    return _ARCH_ALIASES.get(arch, arch)


@functools.cache
def _llvm_cpus(mtriple: str | None) -> frozenset:
    """The CPU names LLVM knows for ``mtriple`` (default: this host's); empty where this LLVM
    cannot build for that triple."""
    from tvm.target import codegen

    try:
        spec = {"kind": "llvm", **({"mtriple": mtriple} if mtriple else {})}
        return frozenset(codegen.llvm_get_cpu_archlist(tvm.target.Target(spec)))
    except Exception:  # an LLVM without this triple: leave the check to LLVM
        return frozenset()


def _check_llvm_cpu(mcpu: str, mtriple: str | None) -> None:
    """Raise InputError where LLVM does not know ``mcpu`` for ``mtriple`` (default: this host's
    triple); LLVM itself would log an error per kernel and build for a generic CPU."""
    known = _llvm_cpus(mtriple)
    if known and mcpu not in known:
        close = difflib.get_close_matches(mcpu, sorted(known), n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise InputError(f"LLVM does not know the CPU {mcpu!r} (mcpu){hint}")


@functools.cache
def _llvm_cpu_features(mtriple: str | None) -> frozenset:
    """Every feature some CPU LLVM knows for ``mtriple`` has (default: this host's triple)."""
    from tvm.target import codegen

    triple = {"mtriple": mtriple} if mtriple else {}
    names: set[str] = set()
    for cpu in _llvm_cpus(mtriple):
        names |= set(codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": cpu, **triple})))
    return frozenset(names)


@functools.cache
def _llvm_knows_feature(name: str, mtriple: str | None) -> bool:
    """Whether LLVM turns on ``+name`` for ``mtriple``: it ignores names it does not know (printing a
    warning per kernel), so a feature no CPU has (``retpoline``) is asked for itself."""
    from tvm.target import codegen

    if name in _llvm_cpu_features(mtriple):
        return True
    spec = {"kind": "llvm", "mattr": [f"+{name}"], **({"mtriple": mtriple} if mtriple else {})}
    return name in set(codegen.llvm_get_cpu_features(tvm.target.Target(spec)))


def _check_llvm_mattr(mattr: Any, mtriple: str | None) -> list[str]:
    """``mattr`` as a list of ``+feature`` / ``-feature`` (a comma-separated string is split), each a
    feature LLVM knows for ``mtriple``; raise InputError otherwise. LLVM itself ignores an entry
    without its sign and, with a warning per kernel, a name it does not know: the kernels would be
    built without what was asked for (``+avx512vnn`` for ``+avx512vnni``)."""
    given = mattr
    if isinstance(mattr, str):
        mattr = [entry for entry in mattr.split(",") if entry.strip()]
    elif isinstance(mattr, Sequence) and not isinstance(mattr, (bytes, bytearray)):  # a Target's own: an ffi Array
        mattr = list(mattr)
    if not isinstance(mattr, list) or not all(isinstance(entry, str) for entry in mattr):
        raise InputTypeError(f"mattr must be a list of '+feature' / '-feature' strings, got {given!r}")
    entries = [entry.strip() for entry in mattr]
    for entry in entries:
        name = entry[1:]
        if entry[:1] not in ("+", "-") or not name:
            bare = entry.lstrip("+-")
            how = f"'+{bare}' turns it on, '-{bare}' off" if bare else "e.g. '+avx2' or '-gfni'"
            raise InputError(f"mattr entry {entry!r} must be a sign and a CPU feature: {how}")
        if _llvm_cpus(mtriple) and not _llvm_knows_feature(name, mtriple):
            close = difflib.get_close_matches(name.lower(), sorted(_llvm_cpu_features(mtriple)), n=3)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise InputError(f"LLVM does not know the CPU feature {name!r} (mattr {entry!r}){hint}")
    return entries


def weight_layout(
    layout: str,
    target: tvm.target.Target,
    bits: int | None = None,
    act_bits: int | None = None,
    batch: int | str | None = None,
) -> str:
    """The weight layout a compile uses: ``layout``, with ``"auto"`` resolved for ``target``.

    ``"auto"`` is the binary-tensor-core layout (``mma16x256``) on CUDA targets that have the
    instruction (sm_80 and newer); the table-lookup layout (``lut16x4``, :mod:`pbtvm.ops.pb_lut`)
    on x86 CPUs with AVX2 but not AVX-512 VNNI when ``batch`` is given (a decoder's, whose every
    step runs that many rows; a static-batch compile's, the most rows any dense layer runs) and at
    most :data:`LUT_AUTO_MAX_BATCH` (AVX-VNNI CPUs with GFNI: rows x bits at most
    :data:`LUT_YMM_GFNI_MAX_ROW_BITS`), or is :data:`DYNAMIC_BATCH` on AVX2 CPUs without AVX-VNNI
    (the kernel then decodes each weight row once past a few rows,
    :mod:`pbtvm.ops.lut_decoded`: 1.3-3.4x the byte-code kernel at 1-2 rows, W3-W8 0.84-1.18x
    at 8-32, W2 by lookups 1.2-1.75x), for 2..8-bit
    weights and activations of at most 8 bits (where it was measured faster), unless
    ``PBTVM_CPU_KERNEL=popcount`` asks for the portable kernels; else ``"kNW"`` (the byte-code
    and popcount CPU kernels, the CUDA-core kernels). An explicit layout is checked against the
    target.

    Raises
    ------
    pbtvm.InputError
        ``mma16x256`` for a target without binary tensor cores (a CPU, or a GPU before sm_80);
        ``lut16x4`` (the AVX2 table-lookup layout) for a GPU or a CPU without AVX2.
    """
    info = TargetInfo.of(target)
    if layout == AUTO_LAYOUT:
        if info.has_binary_tensor_cores:
            return MMA_LAYOUT
        return LUT_LAYOUT if _table_lookup_wins(target, bits, act_bits, batch) else "kNW"
    if layout == MMA_LAYOUT and not info.has_binary_tensor_cores:
        where = f"{info.kind} {info.arch}" if info.arch else info.kind
        raise InputError(
            f"layout {MMA_LAYOUT!r} runs on binary tensor cores (CUDA sm_{BMMA_MIN_SM} or newer), not on {where}"
        )
    if layout == LUT_LAYOUT:
        from .ops.pb_vnni import target_supports

        if info.kind != "llvm" or not target_supports(target, ("avx2",)):
            where = info.kind if info.kind != "llvm" else f"llvm -mcpu={target.attrs.get('mcpu', '?')} (no AVX2)"
            raise InputError(f"layout {LUT_LAYOUT!r} is the table-lookup layout of x86 CPUs with AVX2, not for {where}")
    return layout


#: Options of TVM's old command-line target form whose value is a comma-separated list.
_LIST_OPTIONS = ("mattr", "keys", "libs")


def _target_string(text: str) -> dict:
    """A target given as text: a kind (``"llvm"``), a TVM tag (``"nvidia/nvidia-h100"``), a JSON dict (``'{"kind": "llvm", "mcpu":
    "alderlake"}'``) or the command-line form TVM 0.20+ no longer parses (``"llvm -mcpu=alderlake
    -mattr=+avx2,-gfni"``, ``"cuda -arch=sm_90"``), as a target dict."""
    text = text.strip()
    if not text:
        raise InputError("target is an empty string: pass 'llvm', 'cuda' or a target dict")
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"target {text!r} is not valid JSON: {err}") from None
        if not isinstance(spec, dict):
            raise InputError(f"a JSON target must be a dict, got {type(spec).__name__}")
        return spec
    kind, *flags = text.split()
    if "/" in kind and not flags:  # a TVM tag, e.g. "nvidia/nvidia-h100"
        try:
            return dict(tvm.target.Target(kind).export())
        except Exception as err:  # TVM raises its own error kinds for unknown tags
            raise InputError(f"target {kind!r} is not a target tag TVM knows ({first_line(err)})") from None
    spec: dict[str, Any] = {"kind": kind}
    for flag in flags:
        key, eq, value = flag.lstrip("-").partition("=")
        if not flag.startswith("-") or not eq or not key:
            raise InputError(f"cannot read {flag!r} in target {text!r}: expected -key=value, e.g. -mcpu=alderlake")
        value = value.strip("'\"")
        if key in _LIST_OPTIONS or "," in value:
            spec[key] = [v for v in value.split(",") if v]
        else:
            spec[key] = int(value) if re.fullmatch(r"-?\d+", value) else value
    return spec


def _table_lookup_wins(target: tvm.target.Target, bits: int | None, act_bits: int | None, batch: int | None) -> bool:
    """Whether ``"auto"`` means ``lut16x4``: an AVX2 CPU without AVX-512 VNNI (whose byte-code
    kernel is faster), 2..8-bit weights, activations of at most 8 bits, a known batch of at most
    :data:`LUT_AUTO_MAX_BATCH` rows (with AVX-VNNI and GFNI at most
    :data:`LUT_YMM_GFNI_MAX_ROW_BITS` rows x bits) or a dynamic batch without AVX-VNNI, and the
    byte-code kernels not switched off."""
    if target.kind.name != "llvm" or None in (bits, act_bits, batch) or popcount_forced():
        return False
    from .ops.gfni_decode import CPU_FEATURES as GFNI
    from .ops.pb_vnni import cpu_isa, target_supports
    from .ops.vnni_rows import YMM_ISAS

    isa = cpu_isa(target)
    if batch == DYNAMIC_BATCH:  # the kernel's decoded rows are AVX2's (vpmaddubsw)
        return 2 <= bits <= 8 and act_bits <= 8 and isa == "avx2"
    if not (2 <= bits <= 8 and act_bits <= 8 and 1 <= batch <= LUT_AUTO_MAX_BATCH):
        return False
    if isa == "avxvnni" and target_supports(target, GFNI):
        return batch * bits <= LUT_YMM_GFNI_MAX_ROW_BITS
    return isa in YMM_ISAS  # the ymm byte-code kernels, whose decode the lookup replaces


def _clean(spec: dict) -> dict:
    """Drop exported keys that Target() does not accept back (e.g. derived 'keys' / 'tag')."""
    return {k: v for k, v in spec.items() if k not in ("keys", "tag", "features") and v not in (None, "")}


@dataclass(frozen=True)
class TargetLimits:
    """Hardware limits schedules read instead of literals (:attr:`TargetInfo.limits`).

    Attributes
    ----------
    warp_size : int
        Threads that execute in lock step (32 on NVIDIA GPUs; 1 on a CPU).
    max_threads_per_block : int
        Largest thread block (1 on a CPU).
    max_shared_memory_per_block : int
        Bytes of shared memory one block may use (0 on a CPU).
    programmatic_launch : bool
        Whether kernels are launched while the kernel before them runs, wait for it with
        ``griddepcontrol.wait``, then let the next one launch (programmatic dependent launch, CUDA
        sm_90+: :func:`programmatic_launch`).
    """

    warp_size: int = 1
    max_threads_per_block: int = 1
    max_shared_memory_per_block: int = 0
    programmatic_launch: bool = False


@dataclass(frozen=True)
class TargetInfo:
    """What pbtvm needs to know about a target, in one place.

    Made from a resolved ``tvm.target.Target`` (:meth:`of`) or from the JSON summary stored in a
    manifest or a tuning log (:meth:`from_summary`). Compiler, runtime, tuner and CLI ask it for the
    target kind, the runtime device, the tuning-log key, the manifest summary and the local device.

    Attributes
    ----------
    kind : str
        TVM target kind, ``"llvm"`` or ``"cuda"``.
    arch : str or None
        ``sm_XY`` for CUDA.
    mcpu : str or None
        LLVM CPU name for ``llvm``.
    limits : TargetLimits
        Warp size, threads and shared memory per block.
    mattr : tuple of str
        LLVM features turned on / off beside ``mcpu`` (``+amx-tile``, ``-sse4a``).
    """

    kind: str
    arch: str | None = None
    mcpu: str | None = None
    limits: TargetLimits = TargetLimits()
    mattr: tuple[str, ...] = ()

    @classmethod
    def of(cls, target: tvm.target.Target) -> TargetInfo:
        """The info of a TVM target (limits from its attributes, as :func:`resolve_target` sets them)."""
        attrs = target.attrs
        kind = target.kind.name
        limits = TargetLimits()
        if kind == "cuda":
            limits = TargetLimits(
                **{
                    key: int(attrs.get(key, CUDA_LIMITS[key]))
                    for key in ("max_threads_per_block", "max_shared_memory_per_block")
                },
                warp_size=int(attrs.get("thread_warp_size", CUDA_LIMITS["thread_warp_size"])),
                programmatic_launch=programmatic_launch(str(attrs["arch"]) if attrs.get("arch") else None),
            )
        return cls(
            kind,
            str(attrs["arch"]) if attrs.get("arch") else None,
            str(attrs["mcpu"]) if attrs.get("mcpu") else None,
            limits,
            tuple(str(entry) for entry in attrs.get("mattr", None) or ()),
        )

    @classmethod
    def from_summary(cls, summary: dict) -> TargetInfo:
        """The info stored in a manifest (:meth:`summary`); limits are the kind's defaults."""
        kind = summary["kind"]
        limits = (
            TargetLimits(
                CUDA_LIMITS["thread_warp_size"],
                CUDA_LIMITS["max_threads_per_block"],
                CUDA_LIMITS["max_shared_memory_per_block"],
            )
            if kind == "cuda"
            else TargetLimits()
        )
        return cls(kind, summary.get("arch"), summary.get("mcpu"), limits, tuple(summary.get("mattr", ())))

    @property
    def has_binary_tensor_cores(self) -> bool:
        """Whether the target runs ``mma.sync.m16n8k256 .b1 .and.popc`` (CUDA sm_80 and newer)."""
        match = re.fullmatch(r"sm_(\d+)[a-z]?", self.arch or "")
        return self.kind == "cuda" and match is not None and int(match.group(1)) >= BMMA_MIN_SM

    @property
    def device(self) -> str:
        """The runtime device kind that runs code for this target: ``"cpu"`` or ``"cuda"``."""
        return "cuda" if self.kind == "cuda" else "cpu"

    @property
    def log_key(self) -> str:
        """Directory name of this target's tuning log: kind plus arch (CUDA) or mcpu (LLVM)."""
        detail = self.arch if self.kind == "cuda" else self.mcpu
        return f"{self.kind}-{detail or 'generic'}"

    def summary(self) -> dict[str, Any]:
        """JSON-ready description stored in manifests."""
        out: dict = {"kind": self.kind}
        for key in ("mcpu", "arch"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.mattr:  # which ISA a library holds: AMX or not, AVX2 builds of an AVX-512 CPU
            out["mattr"] = list(self.mattr)
        return out

    def local_device(self) -> tvm.runtime.Device | None:
        """The local device that runs code built for this target, or None (e.g. no GPU of its arch)."""
        if self.kind == "llvm":
            return tvm.cpu(0)
        if self.kind == "cuda":
            arch = local_cuda_arch()
            if arch is not None and (self.arch is None or arch_runs_on(self.arch, arch)):
                return tvm.cuda(0)
        return None

    def check_local_gpu(self) -> None:
        """Raise RuntimeError unless a local GPU of this target's arch exists (CUDA targets only)."""
        if self.kind != "cuda":
            return
        arch = local_cuda_arch()
        if arch is None:
            raise RuntimeError(
                f"this model was compiled for CUDA but no CUDA device is available ({cuda_device_problem()})"
            )
        if self.arch and not arch_runs_on(self.arch, arch):
            raise RuntimeError(f"this model was compiled for {self.arch}; the local GPU is {arch}: recompile it")
