"""The AMX-INT8 loops of the AVX-512 byte-code GEMM against the numpy reference and the zmm loops.

From :func:`~pbtvm.ops.amx_gemm.amx_min_batch` activation rows on (6 for up to 4-bit weights, 16 past), a GEMM built for a CPU with
AMX (Sapphire Rapids and newer Xeons) multiplies 16 output rows x 16 activation rows x 64 inputs
per ``tdpbusd`` (:mod:`pbtvm.ops.amx_gemm`). Building and reading the code needs no such CPU;
running it needs one, and Linux's permission for the tile state (the kernel asks for it itself).
The exactness tests build with ``amx_min_batch=1`` so that small batches exercise every pass
shape (groups of 16 activation rows, passes of up to 4 groups, rows past N and past the batch).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys

import numpy as np
import pytest

import pbtvm
from pbtvm import bitplane as bp
from pbtvm import kernels, names
from pbtvm._tvm import tvm
from pbtvm.errors import InputError
from pbtvm.names import ATTR_AMX_MIN_BATCH
from pbtvm.ops import amx_gemm
from pbtvm.ops.pb_vnni import pb_vnni_func
from pbtvm.schedules.cpu_vnni import _operands, _out_rows, _replacing, vnni_kernel_for, vnni_lstm_kernel_for
from pbtvm.schedules.rules import format_of
from pbtvm.target import cpu_flags, host_mattr, library_cpu_features, resolve_target, unportable_off

from .concurrency import run_threads
from .test_cpu_one_kernel_layer import _rows, assert_same_floats
from .test_cpu_vnni import _codes, _t, assert_exact_at_every_bitlayers
from .test_cpu_vnni_lstm import _call, assert_given_projection_step, assert_step_matches, input_step_case

#: AVX-512 + GFNI + AMX, named as LLVM calls this project's Xeon guests (and without AMX).
AMX = tvm.target.Target({"kind": "llvm", "mcpu": "rocketlake", "mattr": ["+amx-tile", "+amx-int8"]})
ZMM = tvm.target.Target({"kind": "llvm", "mcpu": "rocketlake"})
SPR = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"})


def _host_runs_amx() -> bool:
    """Linux lists ``amx_int8`` and ``amx_tile`` and grants this process the tile state."""
    if not {"amx_int8", "amx_tile", "avx512_vnni", "avx512bw"} <= cpu_flags():
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return libc.syscall(158, 0x1023, 18) == 0  # arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)


needs_amx = pytest.mark.skipif(not _host_runs_amx(), reason="host CPU or OS gives no AMX-INT8 tiles")


def _amx_kernel(func, min_batch: int = 1, target=AMX, gfni: bool = True, batch: int | None = None):
    """``func`` (a TE GEMM of :mod:`pbtvm.kernels`) as the AVX-512 kernel with the AMX loops from
    ``min_batch`` rows, built for ``target`` (with the GFNI block decode where ``gfni``; for a
    fixed ``batch`` where given)."""
    x, _, dense, bias, float_input = _operands(func)
    fmt, n_out, k_dim = format_of(func), _out_rows(func), int(func.attrs[names.ATTR_K])
    if batch is None:
        batch = x.shape[0] if float_input else x.shape[1]
    new = pb_vnni_func(fmt, n_out, k_dim, batch, dense, bias, 4, 2, float_input, None, gfni, "avx512", min_batch)
    return kernels.build(_replacing(func, new, "avx512_vnni"), target, schedule=False)


def _asm(built) -> str:
    return str(built.mod.inspect_source("asm"))


def test_rule_adds_amx_loops_where_the_target_has_amx():
    """The byte-code rule gives the GEMM AMX loops from amx_min_batch rows on AMX targets only
    (Sapphire Rapids by name, or features added to another CPU), in every GEMM form."""
    fmt = bp.BitplaneFormat(4, 8)
    for make in (
        lambda: kernels.dense_act_func(fmt, 32, 600, True),
        lambda: kernels.dense_func(fmt, 32, 600, False),
        lambda: kernels.int_product_func(fmt, 32, 600),
    ):
        for target in (AMX, SPR):
            assert vnni_kernel_for(make(), target=target).attrs[ATTR_AMX_MIN_BATCH] == amx_gemm.AMX_MIN_BATCH[0]
        assert ATTR_AMX_MIN_BATCH not in vnni_kernel_for(make(), target=ZMM).attrs
    # the ymm kernels have no AMX loops (they do not decode to the zmm kernel's codes)
    adl = tvm.target.Target({"kind": "llvm", "mcpu": "alderlake", "mattr": ["+amx-tile", "+amx-int8"]})
    assert ATTR_AMX_MIN_BATCH not in vnni_kernel_for(kernels.int_product_func(fmt, 32, 600), target=adl).attrs


def test_amx_code():
    """Tile configuration, tile loads, ``tdpbusd``, stores and release, the permission request,
    and the zmm loops beside them (read, not run: any host)."""
    asm = _asm(_amx_kernel(kernels.dense_act_func(bp.BitplaneFormat(4, 8), 40, 1100, True), min_batch=16))
    for instruction in ("ldtilecfg", "tileloadd", "tdpbusd", "tilestored", "tilerelease", "tilezero", "syscall"):
        assert instruction in asm, instruction
    assert "vpdpbusd" in asm and "vgf2p8affineqb" in asm  # the zmm loops below 16 rows, the GFNI decode
    assert "tdpbusd" not in _asm(
        kernels.build(
            vnni_kernel_for(kernels.int_product_func(bp.BitplaneFormat(4, 8), 40, 1100), target=ZMM),
            ZMM,
            schedule=False,
        )
    )


def test_host_mattr_adds_amx_the_cpu_name_lacks(tmp_path):
    """A guest whose CPU LLVM names after a core without AMX gets the features its flags show."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_vnni amx_bf16 amx_tile amx_int8 gfni\n")
    assert host_mattr("rocketlake", str(info)) == ["+amx-tile", "+amx-int8"]
    assert host_mattr("sapphirerapids", str(info)) == []  # its name implies them
    info.write_text("flags\t\t: fpu avx2 avx512f\n")
    assert host_mattr("rocketlake", str(info)) == []
    assert host_mattr("rocketlake", str(tmp_path / "missing")) == []
    host = resolve_target("llvm")
    off = unportable_off(str(host.attrs["mcpu"]))  # -sse4a on an AMD host
    assert list(host.attrs.get("mattr", [])) == host_mattr(str(host.attrs["mcpu"])) + off
    assert "mattr" not in resolve_target({"kind": "llvm", "mcpu": "rocketlake"}).attrs
    extra = host_mattr(str(host.attrs["mcpu"]))  # an mattr of the user's keeps them (dropped them before)
    assert list(resolve_target("llvm -mattr=-gfni").attrs["mattr"]) == ["-gfni", *extra, *off]
    assert list(resolve_target("llvm -mattr=-amx-tile").attrs["mattr"]) == ["-amx-tile", *off]  # named: as given
    # a Zen build runs on Intel CPUs: LLVM may use AMD's SSE4a (EXTRQ / INSERTQ) in shuffles
    assert list(resolve_target("llvm -mcpu=znver4").attrs["mattr"]) == ["-sse4a"]
    assert list(resolve_target("llvm -mcpu=znver4 -mattr=+sse4a").attrs["mattr"]) == ["+sse4a"]
    assert "mattr" not in resolve_target("llvm -mcpu=bdver4").attrs  # its FMA4 / XOP imply SSE4a
    assert "sse4a" not in library_cpu_features(resolve_target("llvm -mcpu=znver3"))


@needs_amx
@pytest.mark.parametrize(
    ("bits", "act_bits", "codebook", "n", "k", "batches"),
    [
        (4, 8, "twos_complement", 64, 512, [1, 16, 17, 64, 65, 100]),  # one block; passes of 4, then 1-3 groups
        (1, 8, "bipolar", 20, 64, [3, 16, 18]),  # one chunk: masked-add decode only
        (2, 4, "twos_complement", 37, 700, [5, 33]),  # a block and a partial chunk; N % 16 != 0
        (3, 5, "twos_complement", 130, 1536, [16, 80]),  # three blocks
        (5, 8, "offset_binary", 17, 1100, [2, 49]),  # two blocks and 76 inputs after them
        (8, 8, "twos_complement", 50, 4100, [31]),  # 8 blocks and a partial chunk
        (6, 6, "twos_complement", 3, 300, [16]),  # fewer rows than one tile
        (1, 8, "bipolar", 40, 1100, [20, 70]),  # bipolar codes from the GFNI blocks; two passes
        (4, 8, "twos_complement", 2048, 1100, [20, 150]),  # parallel tasks (9 Mbit); 3 passes
    ],
)
def test_amx_product_is_exact(bits, act_bits, codebook, n, k, batches):
    """The integer product with the AMX loops equals the reference at every bitlayers."""
    fmt = bp.BitplaneFormat(bits, act_bits, codebook=codebook)
    kern = _amx_kernel(kernels.int_product_func(fmt, n, k))
    rng = np.random.default_rng(bits * 100 + k)
    for b in batches:
        q, xq = _codes(rng, fmt, n, k, b)
        assert_exact_at_every_bitlayers(kern, fmt, q, xq)


@pytest.mark.parametrize(("n", "k", "batch"), [(4, 32, 6), (16, 600, 20), (10, 40, 70)])
def test_amx_kernel_of_a_fixed_batch_builds(n, k, batch):
    """A dense layer whose batch is fixed at build time (``dynamic_batch=False``, torch.export's
    GRU / RNN models) with one tile of output rows builds with the AMX loops, where TVM places the
    sums in the codes' memory, and equals the zmm kernel where the host runs AMX."""
    fmt = bp.BitplaneFormat(4, 8)
    fast = _amx_kernel(kernels.dense_act_func(fmt, n, k, True), batch=batch)
    assert "tdpbusd" in _asm(fast)
    if _host_runs_amx():
        _assert_dense_equals_zmm(fast, fmt, n, k, batch, np.random.default_rng(n))


@needs_amx
def test_amx_product_without_gfni_is_exact():
    """Built for an AMX CPU without GFNI (``-gfni``), every chunk takes the masked-add decode, 8
    chunks a segment (a loop of segments from K = 512 on): exact at every bitlayers."""
    fmt, n, k = bp.BitplaneFormat(3, 8), 40, 1100
    no_gfni = tvm.target.Target({"kind": "llvm", "mcpu": "rocketlake", "mattr": ["+amx-tile", "+amx-int8", "-gfni"]})
    kern = _amx_kernel(kernels.int_product_func(fmt, n, k), target=no_gfni, gfni=False)
    assert "vgf2p8affineqb" not in _asm(kern)
    rng = np.random.default_rng(13)
    for b in (20, 70):
        q, xq = _codes(rng, fmt, n, k, b)
        assert_exact_at_every_bitlayers(kern, fmt, q, xq)


@needs_amx
@pytest.mark.parametrize(
    ("bits", "k", "batch", "codebook"),
    [
        (4, 1100, 33, "twos_complement"),
        (8, 512, 16, "twos_complement"),
        (2, 300, 20, "twos_complement"),
        (4, 700, 18, "offset_binary"),  # zero points in the 16-lane epilogue
    ],
)
def test_amx_dense_floats_equal_the_zmm_kernel(bits, k, batch, codebook):
    """The one-kernel float layer (rows quantized inside, bias, scales) gives the same floats bit
    for bit from the AMX loops as from the zmm loops, at every bitlayers; so does the layer on
    packed activation planes."""
    fmt, n = bp.BitplaneFormat(bits, 8, codebook), 45
    fast = _amx_kernel(kernels.dense_act_func(fmt, n, k, True))
    _assert_dense_equals_zmm(fast, fmt, n, k, batch, np.random.default_rng(bits))


def _assert_dense_equals_zmm(fast, fmt, n: int, k: int, batch: int, rng) -> None:
    """The float layer ``fast`` (AMX loops) gives the zmm kernel's floats bit for bit at every
    bitlayers, on random codes, scales (with zero points for offset binary) and bias."""
    q = rng.integers(*fmt.weight_code_range, (n, k), endpoint=True)
    scale = rng.uniform(0.5, 2, fmt.scale_shape(n)).astype(np.float32)
    weights = [_t(bp.pack_weights(q, fmt)), _t(scale), _t(rng.standard_normal(n).astype(np.float32))]
    slow = kernels.build(vnni_kernel_for(kernels.dense_act_func(fmt, n, k, True), target=ZMM), ZMM, schedule=False)
    assert_same_floats(fast, slow, _rows(rng, batch, k), weights, n, range(1, fmt.bits + 1))


@needs_amx
def test_amx_from_several_threads():
    """Calls from four threads at once (a serial layer: each call loads the tile configuration on
    its own thread) all give the reference; the parallel tasks are in test_amx_product_is_exact."""
    fmt, n, k, b = bp.BitplaneFormat(4, 8), 200, 1024, 24
    kern = _amx_kernel(kernels.int_product_func(fmt, n, k))
    rng = np.random.default_rng(7)
    cases = [_codes(rng, fmt, n, k, b) for _ in range(4)]

    def worker(t: int) -> None:
        q, xq = cases[t]
        wp, xp = _t(bp.pack_weights(q, fmt)), _t(bp.pack_activations(xq, fmt))
        out = _t(np.zeros((b, n), np.int32))
        for _ in range(20):
            kern(xp, _t(xq.sum(1).astype(np.int32)), wp, 4, out)
            np.testing.assert_array_equal(out.numpy(), xq @ q.T)

    run_threads(worker)


#: An ``LD_PRELOAD`` library that counts the requests for the tile data state (``arch_prctl``,
#: system call 158, ``ARCH_REQ_XCOMP_PERM`` for feature 18) and, with ``PBTVM_TEST_REFUSE_TILES``
#: set, refuses them; every other call goes to libc's ``syscall``.
_TILE_REQUESTS = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
static long count;
long requests(void) { return count; }
long syscall(long number, ...) {
    static long (*real)(long, ...);
    long a[6];
    va_list ap;
    va_start(ap, number);
    for (int i = 0; i < 6; i++) a[i] = va_arg(ap, long);
    va_end(ap);
    if (number == 158 && a[0] == 0x1023 && a[1] == 18) {
        count++;
        if (getenv("PBTVM_TEST_REFUSE_TILES")) { errno = EPERM; return -1; }
    }
    if (!real) real = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
    return real(number, a[0], a[1], a[2], a[3], a[4], a[5]);
}
"""

#: Run an exported kernel once in this process (argv: library, case, shim) and print the shim's
#: count of tile requests; the outputs must equal the case's.
_CALL_FRESH = """
import ctypes, sys
import numpy as np
from pbtvm._tvm import tvm
kern = tvm.runtime.load_module(sys.argv[1])["main"]
case = np.load(sys.argv[2])
args = [tvm.runtime.tensor(case[f"arg{i}"]) for i in range(int(case["n_args"]))]
outs = [tvm.runtime.tensor(np.zeros_like(case[f"want{i}"])) for i in range(int(case["n_outs"]))]
kern(*args, *[int(v) for v in case["scalars"]], *outs)
for i, out in enumerate(outs):
    np.testing.assert_array_equal(out.numpy(), case[f"want{i}"], err_msg=f"output {i}")
print("requests", ctypes.CDLL(sys.argv[3]).requests())
"""


def _tile_requests_in_a_fresh_process(tmp_path, kern, args: list, scalars: list, wants: list, refuse: bool) -> int:
    """Call ``kern`` (built here) in a new process, where the tile state is not yet granted, with
    the :data:`_TILE_REQUESTS` shim: its outputs must be ``wants``; returns the kernel's requests.
    A tile instruction without the grant kills that process with SIGILL."""
    kern.mod.export_library(str(tmp_path / "kernel.so"))
    arrays = {f"arg{i}": np.ascontiguousarray(a) for i, a in enumerate(args)}
    arrays |= {f"want{i}": w for i, w in enumerate(wants)}
    np.savez(tmp_path / "case.npz", **arrays, n_args=len(args), n_outs=len(wants), scalars=np.array(scalars))
    shim = tmp_path / "requests.so"
    if not shim.exists():
        (tmp_path / "requests.c").write_text(_TILE_REQUESTS)
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(shim), str(tmp_path / "requests.c"), "-ldl"], check=True)
    env = {**os.environ, "LD_PRELOAD": str(shim)}
    env.pop("PBTVM_TEST_REFUSE_TILES", None)
    if refuse:
        env["PBTVM_TEST_REFUSE_TILES"] = "1"
    script = [sys.executable, "-c", _CALL_FRESH, str(tmp_path / "kernel.so"), str(tmp_path / "case.npz"), str(shim)]
    done = subprocess.run(script, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, f"exit {done.returncode} (-4: SIGILL)\n{done.stderr[-3000:]}"
    return int(done.stdout.split()[-1])


@needs_amx
@pytest.mark.parametrize("refuse", [False, True], ids=["granted", "refused"])
def test_amx_kernels_ask_linux_for_the_tiles_themselves(tmp_path, refuse, monkeypatch):
    """In a fresh process the GEMM and the LSTM step ask Linux for the tile state (feature 18)
    themselves before their first tile instruction, and give the same outputs as here; where Linux
    refuses (before 5.16, a sandbox) they take the zmm loops: the same outputs, no SIGILL."""
    fmt, n, k, b = bp.BitplaneFormat(4, 8), 70, 700, 20
    gemm = _amx_kernel(kernels.int_product_func(fmt, n, k))
    q, xq = _codes(np.random.default_rng(11), fmt, n, k, b)
    args = [bp.pack_activations(xq, fmt), xq.sum(1).astype(fmt.accumulator_dtype(k)), bp.pack_weights(q, fmt)]
    want = (xq @ q.T).astype(fmt.accumulator_dtype(k))
    assert _tile_requests_in_a_fresh_process(tmp_path, gemm, args, [fmt.bits], [want], refuse) >= 1

    monkeypatch.setattr(amx_gemm, "AMX_MIN_BATCH", (1, 1))
    func = kernels.lstm_cell_input_func(fmt, 600, 40, True)
    step = kernels.build(vnni_lstm_kernel_for(func, target=AMX), AMX, schedule=False)
    arrays = input_step_case(np.random.default_rng(12), fmt, 600, 40, b)
    wants = list(_call(step, arrays, [fmt.bits], b, 40))
    assert _tile_requests_in_a_fresh_process(tmp_path, step, arrays, [fmt.bits], wants, refuse) >= 1


@needs_amx
def test_compiled_model_on_the_host_uses_amx_at_large_batches():
    """``pbtvm.compile`` for the host (whose target gets AMX where its flags show it,
    :func:`pbtvm.target.host_mattr`) builds the AMX loops and gives the floats of the same model
    compiled without AMX, at batches below and past amx_min_batch."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(600, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()
    x = torch.randn(max(amx_gemm.AMX_MIN_BATCH) + 3, 600)
    target = resolve_target("llvm")
    dense = kernels.dense_act_func(bp.BitplaneFormat(4, 8), 64, 600, True)
    assert ATTR_AMX_MIN_BATCH in vnni_kernel_for(dense, target=target).attrs
    without = {"kind": "llvm", "mcpu": str(target.attrs["mcpu"]), "mattr": ["-amx-tile", "-amx-int8"]}
    host, plain = pbtvm.compile(model, (x,), target="llvm", bits=4), pbtvm.compile(model, (x,), target=without, bits=4)
    for rows in (x, x[:5], torch.cat([x, x])):
        np.testing.assert_array_equal(np.asarray(host(rows)), np.asarray(plain(rows)))


def test_building_for_a_cpu_without_the_kernels_instructions_is_an_error():
    """A kernel made for an AMX (or AVX-512) CPU built for a target without those instructions
    raises InputError naming them, instead of LLVM aborting the process; so does one with the GFNI
    decode built for a CPU without GFNI."""
    fmt = bp.BitplaneFormat(4, 8)
    amx = vnni_kernel_for(kernels.int_product_func(fmt, 32, 600), target=AMX)
    with pytest.raises(InputError, match="amx-tile, amx-int8"):
        kernels.build(amx, ZMM, schedule=False)
    haswell = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    with pytest.raises(InputError, match="avx512bw"):
        kernels.build(vnni_kernel_for(kernels.int_product_func(fmt, 32, 600), target=ZMM), haswell, schedule=False)
    # the GFNI block decode (Ice Lake and newer) on Cascade Lake (AVX-512 VNNI, no GFNI)
    cascade = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})
    step = vnni_lstm_kernel_for(kernels.lstm_cell_input_func(fmt, 600, 130, True), target=ZMM)
    with pytest.raises(InputError, match="gfni"):
        kernels.build(step, cascade, schedule=False)
    kernels.build(vnni_lstm_kernel_for(kernels.lstm_cell_input_func(fmt, 600, 130, True), target=cascade), cascade)


def test_lstm_rule_adds_amx_loops_where_the_target_has_amx():
    """The LSTM step gets the AMX gate rows on AMX targets only, in the zmm kernel's code."""
    func = kernels.lstm_cell_input_func(bp.BitplaneFormat(4, 8), 600, 130, True)
    step = vnni_lstm_kernel_for(func, target=AMX)
    assert step.attrs[ATTR_AMX_MIN_BATCH] == amx_gemm.amx_min_batch(4)
    assert "tdpbusd" in _asm(kernels.build(step, AMX, schedule=False))
    assert ATTR_AMX_MIN_BATCH not in vnni_lstm_kernel_for(func, target=ZMM).attrs


@needs_amx
@pytest.mark.parametrize(
    ("n_in", "hidden", "bits", "batches"),
    [(600, 130, 4, [1, 17, 35]), (40, 24, 8, [3, 20]), (520, 32, 8, [70])],  # last: W8 blocks, whole tiles, 2 passes
)
def test_amx_lstm_step_equals_the_zmm_step(n_in, hidden, bits, batches, monkeypatch):
    """The decoder's step (input projection inside) with its gate rows from the AMX loops gives
    the zmm step's h' and c' bit for bit, and the popcount step's and the reference's within
    their tolerances, at every batch (forced from one row) and bitlayers."""
    fmt = bp.BitplaneFormat(bits, 8)
    func = kernels.lstm_cell_input_func(fmt, n_in, hidden, True)
    monkeypatch.setattr(amx_gemm, "AMX_MIN_BATCH", (1, 1))
    fast = kernels.build(vnni_lstm_kernel_for(func, target=AMX), AMX, schedule=False)
    zmm = kernels.build(vnni_lstm_kernel_for(func, target=ZMM), ZMM, schedule=False)
    monkeypatch.setenv("PBTVM_CPU_KERNEL", "popcount")
    slow = kernels.build(func, ZMM)
    monkeypatch.delenv("PBTVM_CPU_KERNEL")
    rng = np.random.default_rng(hidden)
    for batch in batches:
        arrays = input_step_case(rng, fmt, n_in, hidden, batch)
        for layers in sorted({1, bits}):
            got, want = _call(fast, arrays, [layers], batch, hidden), _call(zmm, arrays, [layers], batch, hidden)
            np.testing.assert_array_equal(got[0], want[0], err_msg=f"h', batch {batch}, L={layers}")
            np.testing.assert_array_equal(got[1], want[1], err_msg=f"c', batch {batch}, L={layers}")
        assert_step_matches(fast, slow, arrays, range(1, bits + 1), fmt, batch, hidden)


@needs_amx
def test_amx_lstm_step_of_a_sequence(monkeypatch):
    """The time loop's step (``gx`` of a sequence read at step ``t``) with AMX gate rows against
    the popcount step and the reference."""
    monkeypatch.setattr(amx_gemm, "AMX_MIN_BATCH", (1, 1))
    assert_given_projection_step(AMX, 130, 4, [2, 18], True, np.random.default_rng(3), monkeypatch)


@needs_amx
def test_amx_product_with_the_next_rows_prefetched(monkeypatch):
    """Layers of PREFETCH_MIN_BYTES or more prefetch the next 16 rows' kept planes (the last
    tile's past N, clamped): forced here on small layers, exact at every bitlayers."""
    monkeypatch.setattr(amx_gemm, "PREFETCH_MIN_BYTES", 0)
    rng = np.random.default_rng(5)
    for bits, n, k, b in [(4, 70, 1100, 20), (3, 33, 512, 7)]:
        fmt = bp.BitplaneFormat(bits, 8)
        kern = _amx_kernel(kernels.int_product_func(fmt, n, k))
        assert "prefetcht1" in _asm(kern)
        q, xq = _codes(rng, fmt, n, k, b)
        assert_exact_at_every_bitlayers(kern, fmt, q, xq)
