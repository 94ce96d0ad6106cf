"""AMX-INT8 loops of the AVX-512 byte-code GEMM: batches of many rows on Intel Xeon tile units.

From Sapphire Rapids on, Intel server cores have AMX: eight tile registers of up to 16 rows x 64
bytes and ``tdpbusd``, which multiplies a 16 x 64 uint8 tile by a 64 x 16 int8 tile (held as 16
rows of 16 x 4 bytes, the "VNNI" order) into a 16 x 16 int32 tile, exactly, in one instruction:
16,384 multiply-adds, about 16 times what ``vpdpbusd`` on a zmm register does per cycle. Past
one batch tile the byte-code kernel (:mod:`pbtvm.ops.pb_vnni`) is bound by its dot products
(BENCHMARKS.md: 4096x4096 W4 batch 16 at 26 % of its memory floor, slower than torch's int8 at
W8), so from :func:`amx_min_batch` rows the GEMM takes these loops instead:

1. the activation codes of :func:`~pbtvm.ops.vnni_rows.prepare_kernel` (int8, zero past K) are
   copied once per call into the B-tile order, groups of :data:`TILE_ROWS` activation rows per
   64-input chunk (:func:`pack_activations`; rows past the batch are zero);
2. each parallel task takes :data:`TASK_ROWS` output rows, :data:`TILE_ROWS` at a time, and per
   pass of up to :data:`PASS_GROUPS` activation groups decodes their weight codes one 512-input
   segment at a time into L1 (:func:`~pbtvm.ops.vnni_rows.gfni_block`, the chunks after the
   blocks by the masked-add decode: the same unsigned bytes ``2^(8-k) u / |c|``, in the order
   the activation codes are stored), then multiplies the segment with one ``tdpbusd`` per chunk
   and group, accumulating in the tile registers; a batch past 64 rows multiplies each decoded
   segment pass after pass, each pass's accumulators loaded from L1 and stored back around it;
3. the 16 x 16 sums go through the kernel's exact epilogue
   (:func:`~pbtvm.ops.vnni_rows.store_total`), 16 output rows per vector.

Linux gives a process the tile registers' state only on request: the kernel asks itself
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``, once per call that would use the
tiles, a no-op once granted) and takes the zmm loops where the system refuses (:func:`use_tiles`;
Linux before 5.16, or a thread of the process with an alternate signal stack too small for the
tile state), so an exported library needs nothing but the TVM runtime. The grant is for the whole
process and cannot be undone: from then on every signal frame carries the 8 KiB of tile data, so
an alternate signal stack set up later must have room for it. The loops are built only for
x86-64 Linux targets (:func:`target_runs_tiles`). Each task loads its tile configuration
(``ldtilecfg``) and releases the tiles when done.
"""

from __future__ import annotations

import dataclasses

from .._tvm import tir
from .common import CPU_SCRATCH
from .gfni_decode import BLOCK
from .vnni_bytes import CHUNK
from .vnni_rows import Kernel, chunk_groups, decode_chunk, gfni_block, plane_offset, prefetch_into_l2, store_total

__all__ = [
    "AMX_FEATURES",
    "AMX_MIN_BATCH",
    "LIGHT_DECODE_BITS",
    "SEGMENT_BYTES",
    "SEGMENT_CHUNKS",
    "PASS_GROUPS",
    "PREFETCH_MIN_BYTES",
    "TASK_ROWS",
    "TILE_ROWS",
    "amx_gemm",
    "amx_min_batch",
    "amx_problem",
    "activation_tiles",
    "amx_rows",
    "pack_activations",
    "target_runs_tiles",
    "tiles_granted",
    "tiles_or_vectors",
    "use_tiles",
]

#: LLVM CPU features of the tile instructions (``ldtilecfg``, ``tileloadd``, ``tdpbusd``).
AMX_FEATURES = ("amx-tile", "amx-int8")
#: Fewest activation rows that take the AMX loops (fewer keep the zmm dot products), for weights
#: of up to :data:`LIGHT_DECODE_BITS` bits and for more (:func:`amx_min_batch`). On 4096x4096 the
#: tile loops cost about the same up to batch 16 (W4: 381 us at batch 2, 448 at 16); the zmm loops
#: grow about linearly with the batch. Measured on the 2-vCPU Xeon guest (weights warm, AMX vs
#: zmm, 4096x4096, 10000x650, 2600x1300): W2/W4 0.77-1.27x at batch 4, 1.11-1.81x at 6,
#: 2.08-3.13x at 16; W8, whose decode is heavier, 0.90-1.18x at 8, 1.30-1.63x at 16
#: (BENCHMARKS.md, twentieth session).
AMX_MIN_BATCH = (6, 16)
#: Weight bits up to which the first threshold of :data:`AMX_MIN_BATCH` applies (the GFNI
#: decode of up to 4 planes takes 3 instructions per 64 weights, of 5-8 planes 5).
LIGHT_DECODE_BITS = 4
#: Rows of a tile: output rows of an A tile, activation rows of a B tile's group.
TILE_ROWS = 16
#: Accumulator tiles (tiles ``0 ..``): a pass multiplies up to this many activation groups (fewer
#: groups share them out, :func:`_splits`); two A and two B tiles take the other four of the
#: eight registers.
PASS_GROUPS = 4
#: Output rows per parallel task (:data:`TILE_ROWS` at a time).
TASK_ROWS = 64
#: Layers whose weight planes take at least this many bytes prefetch the next tile of output
#: rows' planes into L2 before decoding a tile: the tile decode reads 16 rows x bits planes 64
#: bytes at a time, which the hardware prefetchers follow badly from DRAM. Measured (6 weight
#: sets rotated, AMX with / without): 11008x4096 (22-45 MB) W4 1.30x at batch 8, 1.22x at 16,
#: 1.08x at 32, W8 1.29-1.30x at 16-32; 4096x4096 W4 (8 MB) 0.80-1.17x over two runs (in the
#: caches, noisy); 10000x650 and 2600x1300 W4 (3.3 and 1.7 MB, in the caches) 0.73-0.91x.
PREFETCH_MIN_BYTES = 16 << 20
#: Linux x86-64: ``arch_prctl`` system call, its request for a feature's permission, and the
#: feature number of the tile data.
_SYS_ARCH_PRCTL = 158
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
#: Bytes of a tile configuration (``ldtilecfg``): palette, start row, 14 reserved, 16 column
#: widths (uint16), 16 row counts (uint8), 16 reserved.
_CONFIG_BYTES = 64
_TILE_BYTES = TILE_ROWS * CHUNK
#: Chunks of a segment (one 512-input block) and the bytes a tile row's codes take: one chunk
#: more, so that the 16 rows of an A tile do not all map to one cache set.
SEGMENT_CHUNKS = BLOCK // CHUNK
SEGMENT_BYTES = BLOCK + CHUNK


def amx_min_batch(bits: int) -> int:
    """Fewest activation rows whose GEMM of ``bits``-bit weights takes the AMX loops
    (:data:`AMX_MIN_BATCH`)."""
    return AMX_MIN_BATCH[0] if bits <= LIGHT_DECODE_BITS else AMX_MIN_BATCH[1]


def target_runs_tiles(target) -> bool:
    """Whether the AMX loops may be built for an LLVM ``target``: its CPU has
    :data:`AMX_FEATURES` and it is x86-64 Linux (its ``mtriple``, else LLVM's default), whose
    ``arch_prctl`` system call the loops make."""
    from ..target import llvm_triple
    from .pb_vnni import target_supports

    triple = llvm_triple(target)
    return target_supports(target, AMX_FEATURES) and triple.startswith("x86_64") and "linux" in triple


def amx_problem(kern: Kernel) -> str | None:
    """Why the AMX loops cannot compute ``kern``'s layer (None when they can): they multiply the
    zmm kernel's unsigned one-byte codes (``isa="avx512"``, scaled codes, no split codes)."""
    if kern.isa != "avx512":
        return f"the AMX loops extend the AVX-512 kernel, not {kern.isa}"
    if not kern.scaled or kern.hi:
        return "the AMX loops multiply the scaled byte codes, which this K does not use (int32 sums would overflow)"
    return None


def _intrin(name: str, *args) -> tir.PrimExpr:
    """A ``void`` LLVM intrinsic call (the tile instructions; tile numbers as int8 immediates).

    The tile loads of the codes and activation tiles take ``Buffer.access_ptr`` pointers: with
    ``T.address_of(buf[i])`` TVM's CompactBufferAllocation took most of a build (512x784 W4: 2.6 s
    against 0.9 s); the few into the sums take ``address_of`` (:func:`_sums_at`)."""
    return tir.call_llvm_intrin("void", f"llvm.x86.{name}", *args)


def _sums_at(sums: tir.Buffer, offset) -> tir.PrimExpr:
    """Pointer to ``sums[offset]`` (int32) for a tile load or store: ``T.address_of``, not
    ``Buffer.access_ptr``. With a batch fixed at build time and one tile of output rows, TVM's
    StorageRewrite may place the sums in the segment codes' memory (their lifetimes do not
    overlap); an int32 ``access_ptr`` into that uint8 allocation then fails to lower
    ("tvm_access_ptr element type must match the source buffer"), while loads and ``address_of``
    are rewritten with the allocation. The codes and activation tiles keep ``access_ptr`` (their
    many ``address_of`` made builds 2.7x longer, :func:`_intrin`); 180 static-batch GEMM builds
    (W1/W4/W8, N 1-64, K 32/600, batch 6-70) lowered with them."""
    return tir.address_of(sums[offset])


def _tile(number: int) -> tir.PrimExpr:
    return tir.const(number, "int8")


def tiles_granted() -> tir.PrimExpr:
    """Whether Linux gives this process the tile data state (bool): asks for it, once per call
    (per process: granted once, then a no-op; about a microsecond)."""
    granted = tir.call_extern(
        "int64",
        "syscall",
        tir.const(_SYS_ARCH_PRCTL, "int64"),
        tir.const(_ARCH_REQ_XCOMP_PERM, "int64"),
        tir.const(_XFEATURE_XTILEDATA, "int64"),
    )
    return granted == tir.const(0, "int64")


def use_tiles(batch, min_batch: int) -> tir.PrimExpr:
    """Whether a call runs the AMX loops (bool): ``min_batch`` activation rows or more, and the
    system lets the process use the tiles (:func:`tiles_granted`, only asked then). Where it does
    not (Linux before 5.16, a sandbox) the call takes the zmm loops: the same results."""
    return tir.if_then_else(batch >= min_batch, tiles_granted(), tir.const(False, "bool"))


def tiles_or_vectors(T, batch, min_batch: int | None, tiles, vectors) -> None:
    """``tiles()`` (the AMX loops) on calls that run them (:func:`use_tiles`), else ``vectors()``
    (the zmm loops); ``vectors()`` alone where ``min_batch`` is None (no AMX loops built)."""
    if min_batch is None:
        vectors()
        return
    with T.If(use_tiles(batch, min_batch)):
        with T.Then():
            tiles()
        with T.Else():
            vectors()


def _configure_tiles(T, tiles: int) -> None:
    """Load a configuration of ``tiles`` tiles of :data:`TILE_ROWS` x 64 bytes (palette 1)."""
    config = T.alloc_buffer((_CONFIG_BYTES,), "uint8", scope=CPU_SCRATCH)
    with T.serial(0, _CONFIG_BYTES) as i:
        T.buffer_store(config, tir.const(0, "uint8"), [i])
    T.buffer_store(config, tir.const(1, "uint8"), [0])
    for t in range(tiles):
        T.buffer_store(config, tir.const(CHUNK, "uint8"), [16 + 2 * t])  # bytes per row (uint16, little end)
        T.buffer_store(config, tir.const(TILE_ROWS, "uint8"), [48 + t])
    T.evaluate(_intrin("ldtilecfg", T.address_of(config[0])))


def _groups(batch) -> tir.PrimExpr:
    """Groups of :data:`TILE_ROWS` activation rows (the last one partial)."""
    return (batch + (TILE_ROWS - 1)) // TILE_ROWS


def activation_tiles(T, kern: Kernel, batch) -> tir.Buffer:
    """A buffer for :func:`pack_activations` (int8; its groups of :data:`TILE_ROWS` activation
    rows, each chunk one B tile of :data:`TILE_ROWS` x 64 bytes)."""
    return T.alloc_buffer((_groups(batch) * kern.chunks * _TILE_BYTES,), "int8")


def pack_activations(T, kern: Kernel, batch, packed: tir.Buffer, serial: bool = False) -> None:
    """The activation codes in B-tile order into ``packed`` (:func:`activation_tiles`): chunk
    ``c`` of group ``g`` at ``(g chunks + c) * 1024``, its 16 rows the chunk's 16 dwords, each row
    the group's :data:`TILE_ROWS` activation rows' 4 bytes of that dword (zero past the batch);
    the groups one after another with ``serial`` (small layers), else in parallel."""
    chunks, dwords, groups = kern.chunks, CHUNK // 4, _groups(batch)
    with T.serial(0, groups) if serial else T.parallel(0, groups) as g:
        with T.serial(0, chunks) as c:
            base = (g * chunks + c) * _TILE_BYTES
            with T.serial(0, TILE_ROWS) as b:
                row = g * TILE_ROWS + b
                with T.If(row < batch):
                    with T.Then():
                        for q in range(dwords):
                            value = kern.codes[row, tir.Ramp(c * CHUNK + q * 4, 1, 4)]
                            T.buffer_store(packed, value, [tir.Ramp(base + q * CHUNK + b * 4, 1, 4)])
                    with T.Else():
                        for q in range(dwords):
                            zero = tir.Broadcast(tir.const(0, "int8"), 4)
                            T.buffer_store(packed, zero, [tir.Ramp(base + q * CHUNK + b * 4, 1, 4)])


def amx_gemm(T, kern: Kernel, batch, serial: bool) -> None:
    """Every output row x every activation row with the tile instructions (module docstring).

    Parameters
    ----------
    T : the TVMScript IR builder (``tvm.script.ir_builder.tirx``)
    kern : Kernel
        From :func:`~pbtvm.ops.vnni_rows.prepare_kernel` on AVX-512 (:func:`amx_problem` None).
    batch : PrimExpr
        Activation rows (any number; the loops are meant for :func:`amx_min_batch` or more).
    serial : bool
        Run the tasks one after another (small layers, :data:`pbtvm.ops.pb_vnni.SERIAL_WEIGHT_BITS`).
    """
    problem = amx_problem(kern)
    if problem:
        raise ValueError(problem)
    packed = activation_tiles(T, kern, batch)
    pack_activations(T, kern, batch, packed, serial)
    tasks = -(-kern.n_out // TASK_ROWS)
    with T.serial(0, tasks) if serial else T.parallel(0, tasks) as task:
        n0 = task * TASK_ROWS
        count = tir.min(TASK_ROWS, kern.n_out - n0) if kern.n_out % TASK_ROWS else TASK_ROWS
        amx_rows(T, [kern], [packed], n0, count, batch)


def amx_rows(T, legs: list, packed: list, n0, count, batch) -> None:
    """Output rows ``n0 .. n0 + count`` of each leg x every activation row: one parallel task.

    Parameters
    ----------
    T : the TVMScript IR builder (``tvm.script.ir_builder.tirx``)
    legs : list of Kernel
        GEMMs sharing the task (an LSTM step's two legs), each passing :func:`amx_problem`.
    packed : list of tir.Buffer
        Each leg's activation tiles (:func:`pack_activations`, filled before the parallel loop).
    n0, count : PrimExpr or int
        The task's first output row and its rows (up to :data:`TASK_ROWS`; ``n0 + count <= N``).
    batch : PrimExpr
        Activation rows.
    """
    # a segment's codes (16 rows of SEGMENT_BYTES), 9 KiB, and the passes' sums (4 KiB a pass:
    # past about 512 rows more than L1 holds beside the codes; measured up to 256): a workspace
    # allocation per task, from the thread's pool, so the same memory every task, hot in L1 (a
    # part per task of a buffer made once per call, cold at each task's start, measured 10000x650
    # W4 205 vs 144 us at batch 6, 280 vs 224 at 16; 4096x4096 within 1-10 %)
    groups = _groups(batch)
    codes = T.alloc_buffer((TILE_ROWS * SEGMENT_BYTES,), "uint8", scope=CPU_SCRATCH)
    passing = _Passes(T, groups)  # allocates the sums
    _configure_tiles(T, PASS_GROUPS + 4)
    whole = isinstance(count, int) and count % TILE_ROWS == 0  # every tile's rows stored as one vector
    total = T.alloc_buffer((TILE_ROWS,), "int32", scope=CPU_SCRATCH)
    for kern, acts in zip(legs, packed, strict=True):
        with T.serial(0, (count + (TILE_ROWS - 1)) // TILE_ROWS) as rt:
            first = n0 + rt * TILE_ROWS
            if kern.weight_bytes >= PREFETCH_MIN_BYTES:
                _prefetch_rows(T, kern, first + TILE_ROWS)
            passing.start()
            _segments(T, _Tiles(kern, codes, acts, first, tir.const(0, "int32"), groups), passing)
            passing.finish()
            with T.serial(0, passing.count) as p:
                rows = TILE_ROWS if whole else tir.min(TILE_ROWS, count - rt * TILE_ROWS)
                g0, n_groups = p * PASS_GROUPS, passing.groups_in(p)
                _epilogue(T, kern, passing.sums, passing.offset(p), total, first, rows, g0, n_groups, batch)
    T.evaluate(_intrin("tilerelease"))


def _prefetch_rows(T, kern: Kernel, n0) -> None:
    """Prefetch into L2 the kept planes of output rows ``n0 .. n0 + 16`` (the last row past N),
    every 64-byte line of each row's plane in order (one more than its words fill: a row need not
    start a line)."""
    fmt, words = kern.fmt, kern.words
    with T.serial(0, TILE_ROWS) as r:
        row = tir.min(n0 + r, kern.n_out - 1)
        for i in range(fmt.bits):
            with T.If(kern.layers > i):
                with T.Then():
                    with T.serial(0, -(-words // 16) + 1) as line:
                        prefetch_into_l2(T, kern.wp, plane_offset(kern, i, row, tir.min(line * 16, words - 1)))


@dataclasses.dataclass
class _Tiles:
    """What one pass's segments read: 16 output rows from ``n0`` x groups ``g0 .. g0 + count``
    (``count`` 1 .. :data:`PASS_GROUPS`, known at run time)."""

    kern: Kernel
    codes: tir.Buffer
    packed: tir.Buffer
    n0: tir.PrimExpr
    g0: tir.PrimExpr
    count: tir.PrimExpr

    def row(self, r) -> tir.PrimExpr:
        """Output row of tile row ``r``: rows past N repeat the last one (not stored)."""
        return tir.min(self.n0 + r, self.kern.n_out - 1)


@dataclasses.dataclass
class _Passes:
    """The passes of one 16-row tile: up to :data:`PASS_GROUPS` activation groups each, their
    sums in the accumulator tiles ``0 ..``. A batch of one pass keeps them there from the first
    segment to the last; with several, each segment (decoded once) is multiplied pass after pass,
    each pass's accumulators loaded from ``sums`` before and stored after (decoding again per
    pass took about 40 % of a W4 4096x4096 call at batch 256, sampled)."""

    T: object
    groups: tir.PrimExpr  # activation groups in all
    sums: tir.Buffer = dataclasses.field(init=False)  # int32, every pass's accumulators

    def __post_init__(self) -> None:
        self.sums = self.T.alloc_buffer((self.offset(self.count),), "int32", scope=CPU_SCRATCH)

    @property
    def count(self) -> tir.PrimExpr:
        """Passes."""
        return (self.groups + (PASS_GROUPS - 1)) // PASS_GROUPS

    def groups_in(self, p) -> tir.PrimExpr:
        """Activation groups of pass ``p`` (the last one may have fewer)."""
        return tir.min(PASS_GROUPS, self.groups - p * PASS_GROUPS)

    def offset(self, p) -> tir.PrimExpr:
        """Where pass ``p``'s sums start in ``sums`` (its accumulators one after another)."""
        return p * PASS_GROUPS * TILE_ROWS * TILE_ROWS

    def _tiles(self, name: str, p) -> None:
        for t in range(PASS_GROUPS):
            at = _sums_at(self.sums, self.offset(p) + t * TILE_ROWS * TILE_ROWS)
            self.T.evaluate(_intrin(name, _tile(t), at, tir.const(CHUNK, "int64")))

    def _several(self, body) -> None:
        with self.T.If(self.count > 1):
            with self.T.Then():
                body()

    def start(self) -> None:
        """Zero the accumulators (and, with several passes, every pass's sums)."""
        for t in range(PASS_GROUPS):
            self.T.evaluate(_intrin("tilezero", _tile(t)))

        def zero_sums() -> None:
            with self.T.serial(0, self.count) as p:
                self._tiles("tilestored64", p)

        self._several(zero_sums)

    def each(self, tiles: _Tiles, body) -> None:
        """``body(pass_tiles)`` for every pass (its groups in ``pass_tiles``), its accumulators
        loaded and stored around it where there are several."""
        with self.T.serial(0, self.count) as p:
            one = dataclasses.replace(tiles, g0=p * PASS_GROUPS, count=self.groups_in(p))
            self._several(lambda: self._tiles("tileloadd64", p))
            body(one)
            self._several(lambda: self._tiles("tilestored64", p))

    def finish(self) -> None:
        """Store a single pass's accumulators into its sums."""
        with self.T.If(self.count == 1):
            with self.T.Then():
                self._tiles("tilestored64", 0)


def _segments(T, tiles: _Tiles, passing: _Passes) -> None:
    """The 16 rows' codes one segment of up to :data:`SEGMENT_CHUNKS` chunks at a time (whole
    blocks with GFNI, the other chunks with the masked-add decode), each segment's tile products
    right after it, for every pass (its codes still in L1). ``tiles`` holds all the groups."""
    kern = tiles.kern
    start = 0
    if kern.gfni:
        with T.serial(0, kern.blocks) as blk:
            with T.serial(0, TILE_ROWS) as r:
                gfni_block(T, kern, tiles.row(r), blk, tiles.codes, r * SEGMENT_BYTES)

            def block(one: _Tiles) -> None:
                with T.serial(0, SEGMENT_CHUNKS // _PERIOD) as p:  # a loop: straight-line code builds slowly
                    chunks = [blk * SEGMENT_CHUNKS + p * _PERIOD + j for j in range(_PERIOD)]
                    _products(T, one, chunks, p * _PERIOD)

            passing.each(tiles, block)
        start = kern.blocks * SEGMENT_CHUNKS
    masked = dataclasses.replace(kern, decoded=tiles.codes)

    def segment(chunks: list, full: list) -> None:
        with T.serial(0, TILE_ROWS) as r:
            for j, c in enumerate(chunks):
                at = tir.Ramp(r * SEGMENT_BYTES + j * CHUNK, 1, CHUNK)
                decode_chunk(T, masked, tiles.row(r), c, full[j], at)
        passing.each(tiles, lambda one: _products(T, one, chunks))

    chunk_groups(T, kern, start, segment, SEGMENT_CHUNKS)


#: Chunks per iteration of a block's product loop: the registers' turns repeat after 4 chunks
#: (two A and two B registers, up to four accumulators per group).
_PERIOD = 4


def _products(T, tiles: _Tiles, chunks: list, first=0) -> None:
    """``C += A_j B_{t,c}`` for the segment's chunks ``c`` (its ``j``-th from ``first``, A from
    the segment's codes) and the pass's groups ``t``: straight-line code per group count (the
    tile registers are immediates), group ``t``'s chunks taking turns in its :func:`_splits`
    accumulator tiles, the A and B tiles in two registers each (consecutive products do not wait
    for each other)."""
    all_chunks = tiles.kern.chunks
    for count in range(1, PASS_GROUPS + 1):
        with T.If(tiles.count == count):
            with T.Then():
                split = _splits(count)
                for j, c in enumerate(chunks):
                    a_tile = PASS_GROUPS + j % 2
                    weights = tiles.codes.access_ptr("r", offset=(first + j) * CHUNK)
                    T.evaluate(_intrin("tileloadd64", _tile(a_tile), weights, tir.const(SEGMENT_BYTES, "int64")))
                    for t in range(count):
                        b_tile = PASS_GROUPS + 2 + (j * count + t) % 2
                        acts = tiles.packed.access_ptr("r", offset=((tiles.g0 + t) * all_chunks + c) * _TILE_BYTES)
                        T.evaluate(_intrin("tileloadd64", _tile(b_tile), acts, tir.const(CHUNK, "int64")))
                        accumulator = t * split + j % split
                        T.evaluate(_intrin("tdpbusd", _tile(accumulator), _tile(a_tile), _tile(b_tile)))


def _splits(count):
    """Accumulator tiles per group in a pass of ``count`` groups (an int or a PrimExpr): all
    :data:`PASS_GROUPS` of them shared out (a ``tdpbusd`` waits for the last one into its
    accumulator)."""
    return PASS_GROUPS // count


def _epilogue(T, kern: Kernel, sums: tir.Buffer, offset, total: tir.Buffer, n0, rows, g0, count, batch) -> None:
    """Outputs of rows ``n0 .. n0 + rows`` (``rows`` up to 16) x groups ``g0 .. g0 + count`` (one
    pass) from their sums (``sums[offset + s 256 + r 16 + b]``: accumulator ``s``, output row
    ``r``, activation row ``b``; group ``t``'s accumulators ``t split ..`` added into ``total``)."""
    square, split = TILE_ROWS * TILE_ROWS, _splits(count)

    def add_up(t, b, lanes: int) -> None:  # the group's accumulators of column b, lanes output rows
        def one(s) -> tir.PrimExpr:
            base = offset + (t * split + s) * square + b
            return sums[tir.Ramp(base, TILE_ROWS, lanes) if lanes > 1 else base]

        at = tir.Ramp(0, 1, lanes) if lanes > 1 else 0
        T.buffer_store(total, one(0), [at])
        with T.serial(1, split) as s:
            T.buffer_store(total, total[at] + one(s), [at])

    with T.serial(0, count) as t:
        with T.serial(0, TILE_ROWS) as b:
            row = (g0 + t) * TILE_ROWS + b
            with T.If(row < batch):
                with T.Then():
                    vector = tir.Ramp(n0, 1, TILE_ROWS)

                    def whole_tile() -> None:
                        add_up(t, b, TILE_ROWS)
                        store_total(T, kern, total[tir.Ramp(0, 1, TILE_ROWS)], vector, row)

                    if isinstance(rows, int):
                        whole_tile()
                        return
                    with T.If(rows == TILE_ROWS):
                        with T.Then():
                            whole_tile()
                        with T.Else():
                            with T.serial(0, rows) as r:
                                add_up(t, r * TILE_ROWS + b, 1)
                                store_total(T, kern, total[0], n0 + r, row)
