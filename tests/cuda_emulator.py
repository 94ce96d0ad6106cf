"""Run a TVM-generated CUDA kernel on the CPU: the kernel's own source, compiled with g++.

For exactness checks without a GPU. Every CUDA thread of a block is a fiber (``ucontext``) on
the launching thread: it runs until it waits at a barrier, then the next one runs (one OS thread,
so a busy machine slows it no more than any single-threaded code; with a ``std::thread`` per CUDA
thread a test took up to 8x longer beside another test process on two cores). ``__syncthreads``
is a block barrier, ``__shared__`` a static (blocks run one after another),
and each ``mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc`` becomes a warp-collective
function that gathers the 32 lanes' fragments (PTX ISA fragment layouts for ``.b1`` m16n8k256,
the same ones ``../shared/examples/bmma_tensorize.py`` verified on an H100) and computes
``D = C + popcount(A & B)``; ``__ballot_sync`` and the ``__shfl*_sync`` shuffles are
warp-collective too. What it checks: TVM's generated indexing, predicates, K split, plane loop,
reductions and epilogue. The lanes of a warp run one after another between warp-collective calls
(CUDA allows any order since Volta), so code that silently assumes a warp runs in lock step fails
here; the order alternates between ascending and descending thread index from one round of the
scheduler to the next, and a kernel's launches alternate the order they start with (the first
ascending), so a kernel launched twice shows a missing barrier whichever thread writes first.
Every buffer of a launch is a copy that ends at an unreadable page (:data:`GUARD`, on unless
``PBTVM_EMULATOR_GUARD=0``), so a read or write past its end faults as compute-sanitizer would
report it (the radix top-k of the pick kernel read up to 255 floats past the logits).
What it cannot check: timing, and races that neither order exposes. Shuffle masks are not
checked (the generated kernels use full warps). A thread that returns no longer counts at
``__syncthreads`` (as on a GPU, where an exited thread releases the block barrier); warp
operations still need every lane. A block whose threads all wait at barriers that cannot
complete (a warp operation only some lanes reach) raises ``RuntimeError`` at once; a launch that
runs longer than :data:`TIMEOUT_S` (a loop that never reaches a barrier, e.g. a spin on another
thread's write, which cannot end here since that thread never runs meanwhile) raises
``TimeoutError``. Each kernel runs one launch at a time (its ``__shared__`` arrays are statics).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from typing import Any

import numpy as np

#: Whether every buffer of a launch ends at an unreadable page (:func:`guarded`), so that a read
#: or write past its end faults.
GUARD = os.environ.get("PBTVM_EMULATOR_GUARD", "1") != "0"
#: Seconds an emulated launch may run (the slowest case in the tests takes a few seconds).
TIMEOUT_S = float(os.environ.get("PBTVM_EMULATOR_TIMEOUT", 300))

_PRELUDE = r"""
#include <algorithm>
#include <cmath>
#include <memory>
#include <cstdint>
#include <limits>
#include <vector>
#include <sys/mman.h>
#include <ucontext.h>
#define uint unsigned int
#define CUDART_INF_F std::numeric_limits<float>::infinity()
#define CUDART_NAN_F std::numeric_limits<float>::quiet_NaN()
#define __global__
#define __launch_bounds__(...)
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
static inline int __popc(unsigned v) { return __builtin_popcount(v); }
// Programmatic dependent launch and the L2 prefetch (TVM's helpers): no-ops here, where a
// kernel's launches run one after another.
static inline void tvm_builtin_ptx_griddepcontrol_launch_dependents() {}
static inline void tvm_builtin_ptx_griddepcontrol_wait() {}
static inline void tvm_builtin_ptx_cp_async_bulk_prefetch_async_bulk_prefetch_L2_global(const void*, unsigned) {}
static inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }
static inline uint2 make_uint2(unsigned a, unsigned b) { return uint2{a, b}; }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline float min(float a, float b) { return fminf(a, b); }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
struct Dim { unsigned x, y, z; };
// The running fiber's: set by the scheduler each time it resumes one (all run on one OS thread).
thread_local Dim threadIdx, blockIdx;
struct Fiber { ucontext_t ctx; unsigned t; bool done; };
thread_local ucontext_t emu_scheduler;
thread_local Fiber* emu_current;
thread_local unsigned long long emu_progress;  // arrivals and finished fibers: a round without any is a deadlock
static void emu_yield() { swapcontext(&emu_current->ctx, &emu_scheduler); }
// A barrier of ``expected`` fibers: the last to arrive opens it and runs on; the others wait for the phase to change.
struct Barrier {
  explicit Barrier(unsigned n) : expected(n) {}
  unsigned expected, count = 0;
  unsigned long long phase = 0;
  void arrive_and_wait() {
    ++emu_progress;
    unsigned long long mine = phase;
    if (++count == expected) { count = 0; ++phase; return; }
    while (phase == mine) emu_yield();
  }
  void leave() {  // one fiber fewer: a barrier its peers were waiting at may open
    --expected;
    if (count && count == expected) { count = 0; ++phase; }
  }
};
struct Warp {
  explicit Warp(unsigned lanes) : sync(lanes) {}  // the last warp of a block may be partial
  unsigned a[32][4], b[32][2], vote[32];
  unsigned long long shfl[32];
  int c[32][4];
  Barrier sync;
};
thread_local Warp* my_warp;
thread_local int my_lane;  // the lane within the warp: linear thread index % 32
static unsigned __ballot_sync(unsigned mask, int pred) {
  Warp& w = *my_warp;
  w.vote[my_lane] = pred != 0;
  w.sync.arrive_and_wait();
  unsigned out = 0;
  for (int l = 0; l < 32; ++l) out |= w.vote[l] << l;
  w.sync.arrive_and_wait();
  return out & mask;
}
// Warp shuffles: every lane publishes its value, then reads its source lane's (within ``width``).
// The emulation runs the whole warp in lock step at each shuffle, so __activemask() is all lanes.
static unsigned __activemask() { return 0xFFFFFFFFu; }
template <typename T> static T emu_shfl(T value, int src) {
  Warp& w = *my_warp;
  static_assert(sizeof(T) <= sizeof(unsigned long long));
  unsigned long long bits = 0;
  __builtin_memcpy(&bits, &value, sizeof(T));
  w.shfl[my_lane] = bits;
  w.sync.arrive_and_wait();
  bits = w.shfl[src];
  w.sync.arrive_and_wait();
  T out;
  __builtin_memcpy(&out, &bits, sizeof(T));
  return out;
}
// ``width`` splits the warp into segments; a source outside the caller's segment reads the caller.
template <typename T> static T __shfl_sync(unsigned, T value, int src, int width = 32) {
  int base = my_lane / width * width;
  return emu_shfl(value, base + ((src % width) + width) % width);
}
template <typename T> static T __shfl_down_sync(unsigned, T value, unsigned delta, int width = 32) {
  int in_segment = my_lane % width;
  return emu_shfl(value, in_segment + (int)delta < width ? my_lane + (int)delta : my_lane);
}
template <typename T> static T __shfl_up_sync(unsigned, T value, unsigned delta, int width = 32) {
  int in_segment = my_lane % width;
  return emu_shfl(value, in_segment >= (int)delta ? my_lane - (int)delta : my_lane);
}
// CUDA: a source lane in a later segment than the caller's returns the caller's own value.
template <typename T> static T __shfl_xor_sync(unsigned, T value, int lane_mask, int width = 32) {
  int src = my_lane ^ lane_mask;
  return emu_shfl(value, src < (my_lane / width + 1) * width ? src : my_lane);
}
thread_local Barrier* my_block;
static void __syncthreads() { my_block->arrive_and_wait(); }
static void emu_bmma(int* d0, int* d1, int* d2, int* d3, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                     unsigned b0, unsigned b1, int c0, int c1, int c2, int c3) {
  Warp& w = *my_warp;
  int lane = my_lane;
  unsigned a[4] = {a0, a1, a2, a3};
  int c[4] = {c0, c1, c2, c3};
  for (int r = 0; r < 4; ++r) { w.a[lane][r] = a[r]; w.c[lane][r] = c[r]; }
  w.b[lane][0] = b0; w.b[lane][1] = b1;
  w.sync.arrive_and_wait();
  int* d[4] = {d0, d1, d2, d3};
  int out[4];
  for (int r = 0; r < 4; ++r) {
    int row = lane / 4 + 8 * (r / 2), col = 2 * (lane % 4) + r % 2, acc = w.c[lane][r];
    for (int word = 0; word < 8; ++word) {
      unsigned av = w.a[4 * (row % 8) + word % 4][row / 8 + 2 * (word / 4)];
      unsigned bv = w.b[4 * col + word % 4][word / 4];
      acc += __builtin_popcount(av & bv);
    }
    out[r] = acc;
  }
  w.sync.arrive_and_wait();  // every lane has read the fragments before any lane overwrites them
  for (int r = 0; r < 4; ++r) *d[r] = out[r];
}
"""

#: The compiler and the flags every emulated kernel (and the precompiled prelude) is built with.
_GXX = ["g++", "-std=c++20", "-O1", "-fPIC", "-pthread", "-w"]


@functools.cache
def _precompiled_prelude() -> str | None:
    """A directory holding ``prelude.h`` and its precompiled header (once per machine).

    The prelude's standard headers (``<vector>``, ``<cmath>`` ...) took ~0.85 s of the ~1.5 s
    that g++ spent on each emulated kernel; with the precompiled header a kernel compiles in
    ~0.25 s more than its own code. It is kept in pbtvm's cache directory under a hash of the
    prelude, the flags and the g++ version (~60 MB; a stale one is never used), made in a
    temporary directory and moved in place, so concurrent test workers do not race. None (the
    prelude is then inlined) if g++ cannot make one.
    """
    from pbtvm.apps.examples import cache_dir

    version = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha1("\0".join([_PRELUDE, *_GXX, version]).encode()).hexdigest()[:16]
    final = os.path.join(cache_dir(), "cuda-emulator", key)
    if os.path.exists(os.path.join(final, "prelude.h.gch")):
        return final
    os.makedirs(os.path.dirname(final), exist_ok=True)
    work = tempfile.mkdtemp(prefix=f"{key}-", dir=os.path.dirname(final))
    try:
        header = os.path.join(work, "prelude.h")
        with open(header, "w") as f:
            f.write(_PRELUDE)
        proc = subprocess.run([*_GXX, "-x", "c++-header", "-o", header + ".gch", header], capture_output=True)
        if proc.returncode:
            return None
        with contextlib.suppress(OSError):  # another worker moved its copy first: use that one
            os.rename(work, final)
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


_LAUNCH = r"""
thread_local void** emu_ptrs;
thread_local int64_t* emu_scalars;
static void emu_fiber_main() {
  void** ptrs = emu_ptrs;
  int64_t* scalars = emu_scalars;
  KERNEL(CALL_ARGS);
  emu_current->done = true;
  ++emu_progress;
  my_block->leave();  // an exited thread no longer holds the block barrier
}  // returns to uc_link: the scheduler
static unsigned emu_launches;
// 0, or 1 + the linear index of a block whose threads all wait at barriers that cannot complete.
extern "C" long long launch(void** ptrs, int64_t* scalars, unsigned gx, unsigned gy, unsigned gz,
                            unsigned bx, unsigned by, unsigned bz) {
  const unsigned threads = bx * by * bz;
  const size_t stack = size_t(1) << 20;  // per fiber; reserved, touched pages only are committed
  char* stacks = (char*)mmap(nullptr, stack * threads, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (stacks == MAP_FAILED) return -1;
  for (unsigned t = 0; t < threads; ++t) mprotect(stacks + stack * t, 4096, PROT_NONE);  // overflow: a clean crash
  emu_ptrs = ptrs;
  emu_scalars = scalars;
  std::vector<Fiber> fibers(threads);
  bool descending = emu_launches++ % 2;
  long long stuck = 0;
  for (unsigned z = 0; z < gz && !stuck; ++z) for (unsigned y = 0; y < gy && !stuck; ++y)
  for (unsigned x = 0; x < gx && !stuck; ++x) {
    std::vector<std::unique_ptr<Warp>> warps;
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) warps.emplace_back(new Warp(std::min(32u, threads - 32 * w)));
    Barrier block(threads);
    blockIdx = Dim{x, y, z};
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = fibers[t];
      f.t = t;
      f.done = false;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = stacks + stack * t;
      f.ctx.uc_stack.ss_size = stack;
      f.ctx.uc_link = &emu_scheduler;
      makecontext(&f.ctx, emu_fiber_main, 0);
    }
    for (unsigned live = threads; live && !stuck; descending = !descending) {
      unsigned long long before = emu_progress;
      for (unsigned i = 0; i < threads; ++i) {
        Fiber& f = fibers[descending ? threads - 1 - i : i];
        if (f.done) continue;
        threadIdx = Dim{f.t % bx, (f.t / bx) % by, f.t / (bx * by)};
        my_warp = warps[f.t / 32].get();
        my_lane = f.t % 32;
        my_block = &block;
        emu_current = &f;
        swapcontext(&emu_scheduler, &f.ctx);
        live -= f.done;
      }
      if (live && emu_progress == before) stuck = 1 + x + gx * (y + gy * (long long)z);
    }
  }
  munmap(stacks, stack * threads);
  return stuck;
}
"""

_ASM = re.compile(
    r"__asm__ __volatile__\(\s*\"mma\.sync\.aligned\.m16n8k256[^\"]*and\.popc\"\s*\"[^\"]*\"\s*:(.*?)\);\s*", re.S
)


def _operands(text: str) -> list[str]:
    """The expressions of an asm operand list ``"=r"(e0), ... : "r"(e4), ...`` in order."""
    out, i = [], 0
    while True:
        m = re.compile(r"\"=?r\"\(").search(text, i)
        if not m:
            return out
        depth, j = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(text[j], 0)
            j += 1
        out.append(text[m.end() : j - 1])
        i = j


#: A kernel's definition (not its declaration: no ``;`` before the ``{``).
_DEFINITION = re.compile(r'extern "C" __global__ void __launch_bounds__\([\d, ]+\) (\w+)\(([^;{]*?)\) \{', re.S)


def _translate(source: str, warp_ops: bool = True, kernel: str | None = None) -> tuple[str, str, list[tuple[str, str]]]:
    """(C++ kernel text, kernel name, [(type, name)] parameters) of the one kernel in ``source``
    (or of the one named ``kernel``, in a source with several)."""
    defs = list(_DEFINITION.finditer(source))
    if kernel is None and len(defs) != 1:
        raise ValueError(f"{len(defs)} kernels in the source: name one ({[d.group(1) for d in defs]})")
    pick = defs[0] if kernel is None else next(d for d in defs if d.group(1) == kernel)
    after = source.find('extern "C"', pick.end())
    body = source[pick.start() : after if after >= 0 else len(source)]
    sig = _DEFINITION.match(body)
    name, params = sig.group(1), [p.strip() for p in sig.group(2).split(",")]
    parsed = [(" ".join(p.split()[:-1]).replace("__restrict__", "").strip(), p.split()[-1]) for p in params]

    def repl(m: re.Match) -> str:
        ops = _operands(m.group(1))
        if len(ops) != 14:
            raise ValueError(f"unexpected mma operands: {ops}")
        return "emu_bmma(" + ", ".join([f"&({o})" for o in ops[:4]] + ops[4:]) + ");\n"

    body = re.sub(r"__shared__ (alignas\(\d+\) )?", lambda m: (m.group(1) or "") + "static ", body)
    body, count = _ASM.subn(repl, body)
    if warp_ops and count == 0 and "__ballot_sync" not in body and "__shfl" not in body:
        raise ValueError("no mma.sync m16n8k256 .and.popc, __ballot_sync or __shfl in the kernel source")
    return body.replace('extern "C" ', "static ", 1), name, parsed


class EmulatedKernel:
    """A generated CUDA kernel compiled for the CPU; call with numpy arrays and int scalars by name."""

    def __init__(self, source: str, warp_ops: bool = True, kernel: str | None = None) -> None:
        text, self.name, self.params = _translate(source, warp_ops, kernel)
        ptrs = [n for t, n in self.params if "*" in t]
        call = ", ".join(
            f"({t})ptrs[{ptrs.index(n)}]"
            if "*" in t
            else f"scalars[{[m for tt, m in self.params if '*' not in tt].index(n)}]"
            for t, n in self.params
        )
        launch = _LAUNCH.replace("KERNEL", self.name).replace("CALL_ARGS", call)
        # The library stays mapped once loaded: the directory goes right away (nothing left in /tmp).
        with tempfile.TemporaryDirectory(prefix="pbtvm_emu_") as work:
            src, lib = os.path.join(work, "k.cc"), os.path.join(work, "k.so")
            header = _precompiled_prelude()
            with open(src, "w") as f:
                f.write(('#include "prelude.h"\n' if header else _PRELUDE) + text + launch)
            include = ["-I", header] if header else []
            proc = subprocess.run([*_GXX, "-shared", *include, "-o", lib, src], capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"g++ failed on the emulated kernel:\n{proc.stderr[-3000:]}")
            self._lib = ctypes.CDLL(lib)
            self._lib.launch.restype = ctypes.c_longlong

    def __call__(self, grid: tuple[int, int, int], block: tuple[int, int, int], **args: object) -> None:
        """Run the kernel; ``args`` by the source's parameter names (``xp_ptr``, ``batch`` ...)."""
        keep, ptrs, scalars, given = [], [], [], []
        for t, n in self.params:
            if "*" in t:
                arr = args[n]
                assert isinstance(arr, np.ndarray) and arr.flags.c_contiguous, n
                if GUARD and arr.nbytes:  # every buffer ends at an unreadable page; copied back after
                    given.append((arr, guarded(arr)))
                    arr = given[-1][1]
                keep.append(arr)
                ptrs.append(arr.ctypes.data_as(ctypes.c_void_p))
            else:
                scalars.append(int(args[n]))
        p_arr = (ctypes.c_void_p * max(1, len(ptrs)))(*ptrs)
        s_arr = (ctypes.c_int64 * max(1, len(scalars)))(*scalars)
        dims = [ctypes.c_uint(v) for v in (*grid, *block)]
        # In a thread of its own, so that a kernel that never finishes (a loop that never reaches a
        # barrier) fails the test instead of hanging the run.
        # ctypes releases the GIL during the call; a stuck launch is abandoned (a daemon thread).
        # The thread holds the arrays (``keep``): an abandoned launch never writes to freed memory.
        failure: list[BaseException] = []

        def launch(keep: list, *launch_args: object) -> None:  # noqa: ARG001 - keep: held, not used
            try:
                stuck = self._lib.launch(*launch_args)
            except BaseException as err:  # re-raised in the caller
                failure.append(err)
                return
            if stuck < 0:
                failure.append(MemoryError(f"emulated kernel {self.name}: no memory for the threads' stacks"))
            elif stuck:
                at = ((stuck - 1) % grid[0], (stuck - 1) // grid[0] % grid[1], (stuck - 1) // (grid[0] * grid[1]))
                failure.append(
                    RuntimeError(
                        f"emulated kernel {self.name} {grid} x {block} deadlocked in block {at}: its threads "
                        "wait at a barrier or warp operation that the others never reach"
                    )
                )

        runner = threading.Thread(target=launch, args=(keep, p_arr, s_arr, *dims), daemon=True)
        runner.start()
        runner.join(TIMEOUT_S)
        if runner.is_alive():
            raise TimeoutError(
                f"emulated kernel {self.name} {grid} x {block} did not finish in {TIMEOUT_S} s: a loop that "
                "never reaches a barrier (a spin on another thread's write cannot end here)?"
            )
        if failure:
            raise failure[0]
        for arr, copy in given:
            arr[...] = copy


def launch_dims(func: Any, batch: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, block) of a scheduled, thread-bound PrimFunc whose symbolic dimensions are ``batch``.

    Read off the TVMScript of ``func`` with its symbolic buffer dimensions bound to ``batch``
    (every ``T.thread_binding`` extent is then a constant).
    """
    from pbtvm._tvm import tir

    binds = {}
    for p in func.params:
        if tir.is_buffer_var(p) and any(not isinstance(d, tir.IntImm) for d in p.shape):
            shape = [d if isinstance(d, tir.IntImm) else tir.const(batch, "int64") for d in p.shape]
            binds[p] = tir.decl_buffer(shape, p.dtype, p.name)
    text = func.specialize(binds).script()
    pattern = r'T\.thread_binding\((?:0, )?(?:T\.int64\()?(\d+)\)?, thread="(\w+\.[xyz])"\)'
    extents = {tag: int(v) for v, tag in re.findall(pattern, text)}
    grid = tuple(extents.get(f"blockIdx.{a}", 1) for a in "xyz")
    block = tuple(extents.get(f"threadIdx.{a}", 1) for a in "xyz")
    return grid, block


def dispatched_launches(func: Any, batch: int) -> list[tuple[int, tuple[int, int, int], tuple[int, int, int]]]:
    """(index, grid, block) of each launch, in order, that a kernel with a dispatch by batch runs
    at ``batch`` (``schedules.cuda_bmma_kernel.bmma_dense_kernel`` with several configs): its host
    branches on the batch evaluated, then the taken branch's nests of thread-bound loops (past the
    one-launch range a ``pb_dense_act`` dispatch runs two: the ballot pack, then the BMMA kernel).
    The index counts the nests in order (the generated kernels ``<name>_kernel``,
    ``<name>_kernel_1`` ...)."""
    return _host_path(func, batch)[0]


def host_workspaces(func: Any, batch: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{kernel parameter name: (shape, dtype)}`` of the global buffers the host allocates on the
    path it takes at ``batch`` (TVM's workspaces, passed to the kernels as ``<name>_ptr``)."""
    return _host_path(func, batch)[1]


def _host_path(func: Any, batch: int) -> tuple[list, dict]:
    """(launches, workspaces) of :func:`dispatched_launches` and :func:`host_workspaces`."""
    from tvm import sym as arith

    from pbtvm._tvm import tir

    def at_batch(expr):
        analyzer = arith.Analyzer()
        for var in tir.analysis.undefined_vars(expr):
            analyzer.bind(var, tir.const(batch, "int64"))  # the only free variable: the batch
        return int(analyzer.simplify(expr))

    def children(node) -> list:
        if isinstance(node, tir.SeqStmt):
            return list(node.seq)
        return [node.body] if getattr(node, "body", None) is not None else []

    def nests(node) -> int:
        if isinstance(node, tir.IfThenElse):
            return nests(node.then_case) + (nests(node.else_case) if node.else_case is not None else 0)
        if isinstance(node, tir.For) and node.thread_binding is not None:
            return 1
        return sum(nests(c) for c in children(node))

    def launch(node) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        extents = {}
        while isinstance(node, tir.For) and node.thread_binding is not None:
            extents[node.thread_binding.thread_tag] = at_batch(node.extent)
            node = node.body
        grid = tuple(extents.get(f"blockIdx.{a}", 1) for a in "xyz")
        return grid, tuple(extents.get(f"threadIdx.{a}", 1) for a in "xyz")

    launches, workspaces = [], {}

    def walk(node, index: int) -> int:
        """Record the launches and allocations ``node`` runs; returns the index past its nests."""
        if isinstance(node, tir.IfThenElse):
            if at_batch(node.condition):
                walk(node.then_case, index)
            elif node.else_case is not None:
                walk(node.else_case, index + nests(node.then_case))
            return index + nests(node)
        if isinstance(node, tir.For) and node.thread_binding is not None:
            launches.append((index, *launch(node)))
            return index + 1
        if isinstance(node, tir.AllocBuffer):
            buf = node.buffer
            workspaces[f"{buf.name}_ptr"] = (tuple(at_batch(d) for d in buf.shape), str(buf.dtype))
        for child in children(node):
            index = walk(child, index)
        return index

    walk(func.body, 0)
    return launches, workspaces


def dispatched_launch(func: Any, batch: int) -> tuple[int, tuple[int, int, int], tuple[int, int, int]]:
    """The one launch (:func:`dispatched_launches`) a kernel runs at ``batch``."""
    launches = dispatched_launches(func, batch)
    assert len(launches) == 1, f"{len(launches)} launches at batch {batch}"
    return launches[0]


def kernel_name(symbol: str, index: int) -> str:
    """The name TVM gives the ``index``-th kernel (:func:`dispatched_launch`) of ``symbol``."""
    return f"{symbol}_kernel" if index == 0 else f"{symbol}_kernel_{index}"


def guarded(array: np.ndarray) -> np.ndarray:
    """A copy of ``array`` whose last byte ends where an unreadable page begins: an emulated kernel
    reading past the end faults (a segmentation fault of the test process) instead of reading
    whatever the heap holds there, which a GPU's compute-sanitizer would report."""
    import mmap

    page = mmap.PAGESIZE
    pages = -(-array.nbytes // page) + 1
    region = mmap.mmap(-1, pages * page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    if ctypes.CDLL(None).mprotect(ctypes.c_void_p(base + (pages - 1) * page), page, 0) != 0:
        raise OSError("mprotect failed: no guard page")
    raw = np.frombuffer(region, np.uint8, count=array.nbytes, offset=(pages - 1) * page - array.nbytes)
    out = raw.view(array.dtype).reshape(array.shape)  # holds ``region`` (its buffer) alive
    out[...] = array
    return out
