"""The PB dense layer on binary tensor cores (``mma.sync.m16n8k256 .b1 .and.popc``), written in TIR.

One kernel per layer on packed activations (:func:`pbtvm.ops.act_quantize_pack`) and weights in
the ``mma16x256`` layout (:data:`pbtvm.bitplane.LAYOUTS`). The MMA's A operand is a 16-row x
256-bit tile of one weight plane (one 16-byte load per lane, pre-shuffled at compile time), its
B operand 8 *columns* of activation planes: column ``c = b * stride + j`` is activation plane
``j`` of batch row ``b`` (``stride`` = act_bits rounded up to 2, 4, 8 or 16; columns with
``j >= act_bits`` are zero). At batch 1 and act_bits 8 one MMA covers all 8 activation planes.
The packed activations are in the B-fragment order (:mod:`pbtvm.bitplane.mma_layout`): a lane
loads its two words of a K tile with one 8-byte load, a warp an 8-column tile as 256 contiguous
bytes (act_bits 5..16).

A warp owns ``tiles_m`` row tiles x ``tiles_n`` column tiles (the accumulators stay in
registers) and a ``1 / k_split`` share of the K tiles; it loops over K in steps of ``loads``
tiles, loads their activation fragments once, then per weight plane the plane's fragments and
their MMAs (a plane past ``bitlayers``, the run-time knob, is never read: up to
:data:`GUARDED_PLANES_MAX_TILES` register tiles, and in the K steps loaded before the pack, its
fragments are zeros and its MMAs still run; larger tiles branch around it in the other steps),
and folds the popcounts into the accumulator as ``acc += c_i * D_i`` (kernels that pack in the
block loop over the planes outside above W4 or with several column tiles a warp; otherwise they
load their first K steps' weight fragments before the pack, where the registers allow).
The epilogue goes through shared memory: every warp writes its accumulator tiles, then each
thread of the block sums one output's K-split parts and activation-plane columns with their
coefficients ``d_j`` and applies offset / truncation correction, scales and bias exactly as
:func:`pbtvm.ops.pb_dense`.

On sm_90+ (:attr:`pbtvm.target.TargetLimits.programmatic_launch`) every kernel is written for
programmatic dependent launch (:mod:`.cuda_pdl`): it prefetches its block's weight rows into the
L2 (:meth:`BMMALeg.prefetch`), then waits for the kernel before it, before it reads activations or
writes anything, then lets the next kernel launch; ``compile`` launches it so where the weights
are constants.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tvm.script import tirx as T

from pbtvm import names
from pbtvm._tvm import tir
from pbtvm.bitplane import MMA_LAYOUT, MMA_TILE_ROWS, MMA_TILE_WORDS, BitplaneFormat, act_column_stride
from pbtvm.ops.common import plane_coefficient, weight_plane_coefficient
from pbtvm.ops.epilogue import activated, dense_value
from pbtvm.target import TargetInfo, TargetLimits

from .cuda_ballot_pack import FUSED_PREFETCH_MAX, RowPackPhases, ballot_pack_launch, row_pack, row_pack_phases
from .cuda_pdl import declare_early_reads, let_next_start, wait_for_previous

#: Lanes of the warp that executes one ``mma.sync``: the PTX ISA defines the m16n8k256 fragment
#: layouts for 32 lanes (the rules check the target's warp size against it).
MMA_LANES = 32
#: Block limits (shared memory, threads) when the caller has no Target: those of every sm_70+ GPU.
DEFAULT_LIMITS = TargetInfo.from_summary({"kind": "cuda"}).limits
#: Kernel attribute (an ``AttrStmt`` in the device region) printed as ``__launch_bounds__(threads,
#: min_blocks)``. With ``__launch_bounds__(threads)`` alone ptxas (sm_90, nvcc 13.0) chooses the
#: register count itself, and for kernels that pack their activations in the block it chose too few
#: and spilled: 40 registers and 8 bytes for the one-launch W2 kernel of 4096x11008 at its batch-8
#: config (512 threads), 32 registers and 8 bytes for the W4A8 LSTM step.
LAUNCH_MIN_BLOCKS = names.ATTR_LAUNCH_MIN_BLOCKS
#: Most weight bits at which a kernel that packs in the block (:class:`BMMALeg` with
#: ``fused_pack``) with one column tile a warp (batch 1 at 8 activation bits, 1-2 at 4: the LSTM
#: step and head of a decoder) loops over the planes inside each K step, as the two-launch kernel
#: always does; otherwise the planes are the outer loop (fewer live registers: W8, and W4 with two
#: column tiles at 11008x4096, spilled under the declared budget the other way).
PLANES_INSIDE_MAX_FUSED_BITS = 4
#: Most weight bits at which such a kernel's pack holds its activations in registers
#: (:data:`.cuda_ballot_pack.FUSED_PREFETCH_MAX`): W16 spilled 4 bytes with them (4096x4096, batch 1).
FUSED_PREFETCH_MAX_BITS = 8
#: Register tiles (``tiles_m * tiles_n``) up to which the K-steps-outside order reads a plane past
#: ``bitlayers`` as zeros (a guarded load: every plane's loads of a step in flight together; with a
#: branch around each plane, 2600x650 W8 took 9.5 us on an H200 instead of 6.4); larger tiles
#: branch around the plane (guarded, their kernels took up to twice as long: 4096x4096 W4 at
#: batch 64, 4 x 4 tiles, 27 -> 51 us).
GUARDED_PLANES_MAX_TILES = 2
#: Most weight bytes of a layer whose kernel prefetches them all into the L2 before it waits for
#: the kernel before it (:meth:`BMMALeg.prefetch`): about half the L2 of an H100 (50 MB) or H200
#: (60 MB), the sm_90 GPUs; larger layers prefetch the first K tiles of every row tile, this much.
PREFETCH_MAX_BYTES = 24 * 2**20
#: 32-bit registers of an SM (every sm_70+ GPU).
SM_REGISTERS = 65536
#: Registers a lane of a light one-launch config is given (:func:`light_config`): enough for every
#: such config of the benchmark grid (``benchmarks/bench_bmma.py --dry-run --fused``), and a
#: 512-thread block leaves room for a second one on its SM.
LIGHT_LANE_REGISTERS = 64
#: Registers a lane needs beyond :func:`registers` (addresses, loop counters, the epilogue).
LANE_OVERHEAD = 32
#: Most registers a lane gives to one leg's weight fragments loaded before the in-block pack
#: (:meth:`BMMALeg.early_steps`) where the block is not held to :data:`LIGHT_LANE_REGISTERS`
#: (the LSTM step: both K steps of every W4 plane of a 650-wide leg at batch 1, 16 registers a step).
EARLY_LEG_REGISTERS = 32
#: Registers a lane of a declared light config needs beyond :func:`registers` and its early weight
#: fragments (:func:`early_budget`); less than :data:`LANE_OVERHEAD`, since the fragments are
#: live while the pack's registers are, not the epilogue's. Measured (ptxas, sm_90, 64 registers):
#: the W4 10000x650 head (14 estimated) held both its K steps early, 32 registers, without spills;
#: 4096x4096 W4 (20) spilled 8 bytes with its one step, 32 registers.
EARLY_LANE_OVERHEAD = 18


def registers(fmt: BitplaneFormat, k_dim: int, cfg: BMMAConfig) -> int:
    """Rough 32-bit registers per lane for ``cfg``'s accumulators and fragments (vs
    :data:`.cuda_bmma.REGISTER_BUDGET`, :data:`.cuda_bmma.DENSE_REGISTER_BUDGET`)."""
    acc_words = 2 if fmt.accumulator_dtype(k_dim) == "int64" else 1
    frag = cfg.tiles_m * cfg.tiles_n * 4
    return frag * (acc_words + 1) + cfg.loads * (4 * cfg.tiles_m + 2 * cfg.tiles_n)


def light_config(fmt: BitplaneFormat, k_dim: int, cfg: BMMAConfig) -> bool:
    """Whether ``cfg``'s fragments and accumulators fit :data:`LIGHT_LANE_REGISTERS` beside
    :data:`LANE_OVERHEAD`: its one-launch kernel then declares them (:data:`LAUNCH_MIN_BLOCKS`).

    Heavier configs, and the two-launch kernel, are left to ptxas's own choice, which spilled in
    none of the configs checked within the 128-register budget, while holding a heavy config near
    its estimate did (W16 4096x4096, tiles_m 2, k_split 2, tiles_n 4: 56 bytes at 168 registers).
    Past it some configs spill a little (W16A8 4096x4096 ``1,1,1,4,8`` at 176: 2 LDL/STL).
    """
    return registers(fmt, k_dim, cfg) + LANE_OVERHEAD <= LIGHT_LANE_REGISTERS


def early_budget(fmt: BitplaneFormat, k_dim: int, cfg: BMMAConfig, declared: bool) -> int:
    """Registers a lane of a one-launch kernel may give to weight fragments loaded before its
    in-block pack (:meth:`BMMALeg.early_steps`): what a declared light config
    (:func:`light_config`) has left of :data:`LIGHT_LANE_REGISTERS` beside
    :data:`EARLY_LANE_OVERHEAD`, else :data:`EARLY_LEG_REGISTERS`."""
    if declared:
        return max(0, LIGHT_LANE_REGISTERS - EARLY_LANE_OVERHEAD - registers(fmt, k_dim, cfg))
    return EARLY_LEG_REGISTERS


def launch_min_blocks(threads: int, lane_regs: int) -> int:
    """Blocks of ``threads`` an SM must hold at once so that ptxas may give a lane ``lane_regs``."""
    return max(1, SM_REGISTERS // (threads * lane_regs))


@dataclass(frozen=True)
class BMMAConfig:
    """The tunable knobs of the BMMA kernel (one point of the MetaSchedule design space).

    Attributes
    ----------
    tiles_m : int
        16-row weight tiles per warp (register blocking along N).
    warps_m : int
        Warps per block along the output rows.
    k_split : int
        Warps per block that split the K tiles of the same rows (reduced in shared memory).
    loads : int
        K tiles whose fragments a warp loads before it issues their MMAs (loads in flight).
    tiles_n : int
        8-column activation tiles per warp (batch columns; one weight fragment feeds them all).
    """

    tiles_m: int = 1
    warps_m: int = 4
    k_split: int = 2
    loads: int = 2
    tiles_n: int = 1

    @property
    def threads(self) -> int:
        """Threads per block."""
        return MMA_LANES * self.warps_m * self.k_split


def row_column_tiles(act_bits: int) -> int:
    """8-column MMA tiles one batch row spans: 1 for up to 8 activation planes, 2 for 9..16."""
    return max(1, act_column_stride(act_bits) // 8)


def config_problem(
    fmt: BitplaneFormat,
    k_dim: int,
    cfg: BMMAConfig,
    fused_pack: bool = False,
    limits: TargetLimits = DEFAULT_LIMITS,
) -> str | None:
    """Why ``cfg`` cannot serve this layer (None if it can): column tiles, shared memory, threads.

    ``fused_pack``: the block also packs its batch rows' activation planes into shared memory.
    ``limits``: the target's shared memory and threads per block.
    """
    stride = act_column_stride(fmt.act_bits)
    if (8 * cfg.tiles_n) % stride:
        return f"tiles_n={cfg.tiles_n} splits a batch row of {stride} columns"
    if fused_pack:
        warps = cfg.threads // MMA_LANES
        if warps & (warps - 1):
            return f"the fused pack needs a power-of-two number of warps, not {warps}"
    shared = shared_bytes(fmt, k_dim, cfg, fused_pack)
    if shared > limits.max_shared_memory_per_block:
        return f"the block needs {shared} bytes of shared memory (> {limits.max_shared_memory_per_block})"
    if cfg.threads > limits.max_threads_per_block:
        return f"{cfg.threads} threads per block"
    return None


def shared_bytes(fmt: BitplaneFormat, k_dim: int, cfg: BMMAConfig, fused_pack: bool = False) -> int:
    """Shared memory of one weight matrix's share of a block (:class:`BMMALeg`): the K-split
    accumulator tiles, and with ``fused_pack`` the packed batch rows, their scales and code sums
    and the pack's reduction buffers."""
    acc_bytes = 8 if fmt.accumulator_dtype(k_dim) == "int64" else 4
    shared = cfg.k_split * cfg.warps_m * cfg.tiles_m * MMA_TILE_ROWS * cfg.tiles_n * 8 * acc_bytes
    if fused_pack:
        block_batch = 8 * cfg.tiles_n // act_column_stride(fmt.act_bits)
        shared += 4 * fmt.act_bits * block_batch * fmt.words(k_dim) + cfg.threads * (4 + acc_bytes) + 12 * block_batch
    return shared


def bmma_dense_kernel(
    fmt: BitplaneFormat,
    n_out: int,
    k_dim: int,
    bias: bool,
    cfg: BMMAConfig | Sequence[tuple[int | None, BMMAConfig]],
    integer: bool = False,
    fused_pack: bool = False,
    limits: TargetLimits = DEFAULT_LIMITS,
    activation: str | None = None,
) -> tir.PrimFunc:
    """The BMMA PB dense kernel for one layer shape and configuration (or one per batch size).

    Parameters
    ----------
    fmt : BitplaneFormat
        ``layout`` must be ``"mma16x256"``.
    n_out, k_dim : int
        N (output features) and K (input features, unpadded).
    bias : bool
        Whether the layer has a bias.
    cfg : BMMAConfig, or a sequence of (largest batch or None, BMMAConfig[, in_block])
        One config, or a dispatch by batch size: the first entry whose largest batch is at least
        the run-time batch (None: any) chooses the launch, one kernel per config (the host
        branches). With ``fused_pack``, entries whose ``in_block`` is False (default True) come
        after those whose is True: past the last of those the function runs the ballot pack
        (:func:`.cuda_ballot_pack.ballot_pack_launch`, one launch) into workspaces, then the
        two-launch kernel of the entry's config: past small batches that beats every block
        packing its own rows (BENCHMARKS.md, H200).
    integer : bool
        Return the exact integer product instead (for exactness tests): the signature of
        :func:`pbtvm.kernels.int_product_func`, ``bias`` ignored.
    fused_pack : bool
        Pack the activations in the kernel (see Returns).
    limits : TargetLimits
        The target's block limits (``cfg`` must fit them).
    activation : str, optional
        Applied to every float output in the epilogue (:func:`pbtvm.ops.epilogue.activated`):
        the layer's ReLU, GELU or SiLU folded in, one kernel less.

    Returns
    -------
    tir.PrimFunc
        ``(xp u32 fmt.act_shape(B, K), x_scale f32 [B], rowsum acc [B], wp u32 fmt.weight_shape(N, K),
        w_scale f32 [N][, bias f32 [N]], bitlayers int64, y f32 [B, N])`` with a symbolic B: the
        signature of :func:`pbtvm.kernels.dense_func`. Already scheduled (thread-bound). With
        ``integer``: ``(xp, rowsum, wp, bitlayers, acc [B, N])``, ``acc`` in
        ``fmt.accumulator_dtype(K)``, equal to :func:`pbtvm.bitplane.bitplane_matmul`. With
        ``fused_pack`` (one launch per layer where ``in_block``: each block quantizes and packs its
        batch rows into shared memory with ``__ballot_sync`` first, :func:`.cuda_ballot_pack.row_pack`):
        ``(x f32 [B, K], wp, w_scale[, bias], bitlayers, y)``, the signature of
        :func:`pbtvm.kernels.dense_act_func`.
    """
    if integer and fused_pack:
        raise ValueError("the integer-output kernel reads packed activations (no fused_pack)")
    if integer and activation is not None:
        raise ValueError("the integer-output kernel has no float epilogue to apply an activation in")
    configs = [(None, cfg, fused_pack)] if isinstance(cfg, BMMAConfig) else [(*e, fused_pack)[:3] for e in cfg]
    if not configs or configs[-1][0] is not None or any(most is None for most, *_ in configs[:-1]):
        raise ValueError(f"a dispatch by batch ends with (None, config) and only there, got {configs}")
    if not fused_pack and any(in_block for *_, in_block in configs):
        raise ValueError("a launch that packs in the block needs fused_pack (the kernel reads x)")
    in_block = [(most, c) for most, c, inside in configs if fused_pack and inside]
    packed = [(most, c) for most, c, inside in configs if not (fused_pack and inside)]
    if configs[: len(in_block)] != [(most, c, True) for most, c in in_block]:
        raise ValueError(f"the launches that pack in the block come first, got {configs}")

    def dispatch(entries: list, fused: bool):
        return _dispatch(
            [(most, _launch(fmt, n_out, k_dim, bias, c, integer, fused, limits, activation)) for most, c in entries]
        )

    if not fused_pack or not packed:
        run = dispatch(packed if not fused_pack else in_block, fused_pack)
    else:
        run = _pack_then(fmt, k_dim, dispatch(packed, False), limits.programmatic_launch)
        if in_block:
            run = _dispatch([(in_block[-1][0], dispatch(in_block, True)), (None, run)])
    acc_t, wshape = fmt.accumulator_dtype(k_dim), fmt.weight_shape(n_out, k_dim)

    @T.prim_func(private=True)
    def kernel(
        x_h: T.handle,
        xp_h: T.handle,
        xs_h: T.handle,
        rs_h: T.handle,
        wp_h: T.handle,
        ws_h: T.handle,
        b_h: T.handle,
        bitlayers: T.int64,
        y_h: T.handle,
    ):
        T.func_attr({"tirx.noalias": True})
        batch = T.int64()
        x = T.match_buffer(x_h, (batch, k_dim), "float32")
        xp = T.match_buffer(xp_h, fmt.act_shape(batch, k_dim), "uint32")
        x_scale = T.match_buffer(xs_h, (batch,), "float32")
        rowsum = T.match_buffer(rs_h, (batch,), acc_t)
        wp = T.match_buffer(wp_h, wshape, "uint32")
        w_scale = T.match_buffer(ws_h, fmt.scale_shape(n_out), "float32")
        bias_buf = T.match_buffer(b_h, (n_out,), "float32")
        y = T.match_buffer(y_h, (batch, n_out), acc_t if integer else "float32")
        run(x, xp, x_scale, rowsum, wp, w_scale, bias_buf, y, batch, bitlayers)

    # Parameters: x, xp, x_scale, rowsum, wp, w_scale, bias, bitlayers, y; drop what this mode does not read.
    if integer:
        kernel = without_params(kernel, (0, 2, 5, 6))
    else:
        unused = (1, 2, 3) if fused_pack else (0,)
        kernel = without_params(kernel, unused if bias else (*unused, 6))
    # the weight planes are read before griddepcontrol.wait (BMMALeg.product's early steps)
    return declare_early_reads(kernel, ["wp"], limits.programmatic_launch)


def _dispatch(launches: list[tuple[int | None, object]]):
    """A TVMScript macro running the first launch whose largest batch is at least ``batch``
    (the last one's is None: any); ``launches`` are ``(largest batch, macro)`` pairs, each macro
    with :func:`_launch`'s arguments (a launch, a pack then a launch, or a dispatch of them)."""
    (most, first), rest = launches[0], launches[1:]
    if not rest:
        return first
    later = _dispatch(rest)

    @T.macro
    def run(x, xp, x_scale, rowsum, wp, w_scale, bias_buf, y, batch, bitlayers):
        if batch <= most:
            first(x, xp, x_scale, rowsum, wp, w_scale, bias_buf, y, batch, bitlayers)
        else:
            later(x, xp, x_scale, rowsum, wp, w_scale, bias_buf, y, batch, bitlayers)

    return run


def _pack_then(fmt: BitplaneFormat, k_dim: int, product, programmatic: bool = False):
    """A TVMScript macro with :func:`_launch`'s arguments for a kernel that reads ``x``: the ballot
    pack of every batch row into workspaces (global memory the host allocates from TVM's workspace
    pool, at the function's entry), then ``product`` (a two-launch kernel's launch, or a dispatch
    of them) on them (``xp``, ``x_scale``, ``rowsum`` unused). ``programmatic``: the pack is written
    for programmatic dependent launch (:mod:`.cuda_pdl`)."""
    pack = ballot_pack_launch(fmt, k_dim, programmatic)
    acc_t = fmt.accumulator_dtype(k_dim)

    @T.macro
    def launch(x, _xp, _x_scale, _rowsum, wp, w_scale, bias_buf, y, batch, bitlayers):
        packed = T.alloc_buffer(fmt.act_shape(batch, k_dim), "uint32", scope="global")
        scale = T.alloc_buffer((batch,), "float32", scope="global")
        codesum = T.alloc_buffer((batch,), acc_t, scope="global")
        pack(x, packed, scale, codesum, batch)
        product(x, packed, scale, codesum, wp, w_scale, bias_buf, y, batch, bitlayers)

    return launch


def _launch(
    fmt: BitplaneFormat,
    n_out: int,
    k_dim: int,
    bias: bool,
    cfg: BMMAConfig,
    integer: bool,
    fused_pack: bool,
    limits: TargetLimits,
    activation: str | None = None,
):
    """A TVMScript macro launching the kernel of one config (:func:`bmma_dense_kernel`'s
    arguments): ``launch(x, xp, x_scale, rowsum, wp, w_scale, bias_buf, y, batch, bitlayers)``."""
    leg = BMMALeg(fmt, n_out, k_dim, cfg, fused_pack, limits)
    acc_t, offset = leg.acc_dtype, fmt.weight_offset
    threads, block_rows, block_batch = cfg.threads, leg.block_rows, leg.block_batch
    out_rounds = -(-(block_rows * block_batch) // threads)
    declare = fused_pack and light_config(fmt, k_dim, cfg)  # LAUNCH_MIN_BLOCKS, see light_config
    min_blocks = launch_min_blocks(threads, LIGHT_LANE_REGISTERS)
    # A one-launch kernel with the K steps outside loads its first K steps' weights before the
    # pack, as many as the registers allow: under the declared 64, 4096x4096 W4 (loads 2, 32
    # registers a step) spilled 8 bytes with one step early.
    early = leg.early_steps(early_budget(fmt, k_dim, cfg, declare))
    product = leg.product()
    column_total = leg.column_total()
    packed_product, shapes = (leg.packed_product(early), leg.packed_shapes()) if fused_pack else (None, None)
    start, prefetch, wait = let_next_start(leg.programmatic), leg.prefetch(), wait_for_previous(leg.programmatic)

    def result(total, scale, codesum, n, w_scale, bias_buf, layers):
        if integer:
            return total + T.Cast(acc_t, offset) * codesum
        value = dense_value(fmt, scale, codesum, total, w_scale, n, bias_buf if bias else None, layers)
        return activated(value, activation)

    @T.macro
    def block(x, xp, x_scale, rowsum, wp, w_scale, bias_buf, y, batch, bitlayers, bx, by, tz, ty, tx):
        part = T.alloc_shared(leg.part_shape, acc_t)
        acc = T.alloc_local((leg.frag,), acc_t)
        dot = T.alloc_local((leg.frag,), "int32")
        af = T.alloc_local((cfg.loads * cfg.tiles_m,), "uint32x4")  # one 16-byte A fragment each
        bf = T.alloc_local(*leg.b_fragments)
        total = T.alloc_local((1,), acc_t)
        start()
        if fused_pack:  # this block's batch rows, packed into shared memory first (it waits in there)
            xpack = T.alloc_shared(shapes["packed"], "uint32")
            rscale = T.alloc_shared(shapes["row_scale"], "float32")
            rcode = T.alloc_shared(shapes["row_code"], acc_t)
            packed_product(
                x, wp, bitlayers, batch, bx, by, tz, ty, tx, acc, dot, af, bf, part, xpack, rscale, rcode, total
            )
        else:
            prefetch(wp, bitlayers, bx, tz, ty, tx)
            wait()
            product(xp, wp, bitlayers, batch, bx, by, tz, ty, tx, acc, dot, af, bf, part)
        T.tvm_storage_sync("shared")
        for o in range(out_rounds):  # a thread per output (row fastest: coalesced y)
            idx = T.meta_var(o * threads + (tz * cfg.warps_m + ty) * MMA_LANES + tx)
            n_glob = T.meta_var(bx * block_rows + idx % block_rows)
            b_glob = T.meta_var(by * block_batch + idx // block_rows)
            if idx < block_rows * block_batch and n_glob < n_out and b_glob < batch:
                column_total(part, total, idx)
                if fused_pack:
                    y[b_glob, n_glob] = result(
                        total[0], rscale[idx // block_rows], rcode[idx // block_rows], n_glob, w_scale, bias_buf,
                        bitlayers,
                    )  # fmt: skip
                else:
                    y[b_glob, n_glob] = result(
                        total[0], x_scale[b_glob], rowsum[b_glob], n_glob, w_scale, bias_buf, bitlayers
                    )

    @T.macro
    def launch(x, xp, x_scale, rowsum, wp, w_scale, bias_buf, y, batch, bitlayers):
        for bx in T.thread_binding(leg.grid_x, thread="blockIdx.x"):
            for by in T.thread_binding(leg.grid_y(batch), thread="blockIdx.y"):
                for tz in T.thread_binding(cfg.k_split, thread="threadIdx.z"):
                    for ty in T.thread_binding(cfg.warps_m, thread="threadIdx.y"):
                        for tx in T.thread_binding(MMA_LANES, thread="threadIdx.x"):
                            if declare:
                                with T.attr(0, LAUNCH_MIN_BLOCKS, min_blocks):
                                    block(x, xp, x_scale, rowsum, wp, w_scale, bias_buf, y, batch, bitlayers,
                                          bx, by, tz, ty, tx)  # fmt: skip
                            else:
                                block(x, xp, x_scale, rowsum, wp, w_scale, bias_buf, y, batch, bitlayers,
                                      bx, by, tz, ty, tx)  # fmt: skip

    return launch


class BMMALeg:
    """One weight matrix's share of a BMMA kernel: sizes, and TVMScript macros that compute it.

    A block of ``cfg`` owns ``block_rows`` output rows (``warps_m * tiles_m`` row tiles,
    ``blockIdx.x``) and ``block_batch`` batch rows (``blockIdx.y``). :meth:`product` leaves the
    integer plane products of the block's K-split warps in shared memory, :meth:`column_total`
    sums one output's parts and activation-plane columns, :meth:`pack` (``fused_pack``) packs a
    batch row into shared memory first. The dense kernel has one leg; the LSTM step
    (:mod:`.cuda_bmma_lstm`) one per weight matrix, on the same block.

    Raises
    ------
    ValueError
        If ``fmt`` is not the ``mma16x256`` layout or ``cfg`` does not fit the layer.
    """

    def __init__(
        self,
        fmt: BitplaneFormat,
        n_rows: int,
        k_dim: int,
        cfg: BMMAConfig,
        fused_pack: bool = False,
        limits: TargetLimits = DEFAULT_LIMITS,
    ) -> None:
        if fmt.layout != MMA_LAYOUT:
            raise ValueError(f"the BMMA kernel reads the {MMA_LAYOUT} weight layout, not {fmt.layout!r}")
        problem = config_problem(fmt, k_dim, cfg, fused_pack, limits)
        if problem:
            raise ValueError(f"BMMA config {cfg} does not fit {fmt.name} N={n_rows} K={k_dim}: {problem}")
        self.fmt, self.n_rows, self.k_dim, self.cfg, self.fused_pack = fmt, n_rows, k_dim, cfg, fused_pack
        #: Whether the kernel waits for the one before it (programmatic dependent launch,
        #: :mod:`.cuda_pdl`): after the early weight loads, before it reads activations.
        self.programmatic = limits.programmatic_launch
        self.words = fmt.words(k_dim)
        self.acc_dtype = fmt.accumulator_dtype(k_dim)
        self.stride = act_column_stride(fmt.act_bits)
        _, self.row_tiles, self.k_tiles, *_ = fmt.weight_shape(n_rows, k_dim)
        self.block_rows = cfg.warps_m * cfg.tiles_m * MMA_TILE_ROWS
        self.block_batch = cfg.tiles_n * 8 // self.stride
        self.grid_x = -(-self.row_tiles // (cfg.warps_m * cfg.tiles_m))
        self.frag = cfg.tiles_m * cfg.tiles_n * 4
        self.part_shape = (cfg.k_split, cfg.warps_m, cfg.tiles_m * MMA_TILE_ROWS, cfg.tiles_n * 8)

    def grid_y(self, batch: tir.PrimExpr) -> tir.PrimExpr:
        """Blocks along the batch: ``ceil(batch * stride / (8 tiles_n))``."""
        return (batch * self.stride + self.cfg.tiles_n * 8 - 1) // (self.cfg.tiles_n * 8)

    @property
    def b_fragments(self) -> tuple[tuple[int], str]:
        """Shape and dtype of the warp's B fragments (``bf`` of :meth:`product`): two uint32 each,
        ``loads * tiles_n`` of them (from the B-fragment order in global memory one 8-byte load
        each, from the block's planes in shared memory two 4-byte loads)."""
        return ((2 * self.cfg.loads * self.cfg.tiles_n,), "uint32")

    def packed_shapes(self) -> dict[str, tuple]:
        """Shapes of the shared buffers :meth:`pack_block` fills: ``packed``, ``row_scale``, ``row_code``."""
        rows = self.block_batch
        return {"packed": (self.fmt.act_bits, rows, self.words), "row_scale": (rows,), "row_code": (rows,)}

    def pack_block(self):
        """A TVMScript macro: the block quantizes and packs its batch rows into shared memory.

        ``pack_block(act, batch, by, tz, ty, tx, packed, row_scale, row_code, total)``: ``act`` is
        float32 ``[B, K]``; rows ``by * block_batch + bb < batch`` go to ``packed[plane, bb, word]``
        (uint32), their scales to ``row_scale[bb]`` (float32) and code sums to ``row_code[bb]``
        (accumulator dtype), shapes :meth:`packed_shapes`, as :func:`.cuda_ballot_pack.row_pack`
        (one row at a time, every thread of the block). ``total`` (one-element local, accumulator
        dtype) is scratch. Needs ``fused_pack``.
        """
        if not self.fused_pack:
            raise ValueError("pack_block is for a leg made with fused_pack=True")
        cfg, acc_t, block_batch, threads = self.cfg, self.acc_dtype, self.block_batch, self.cfg.threads
        pack = row_pack(self.fmt, self.k_dim, threads // MMA_LANES, self._prefetch())

        @T.macro
        def pack_block(act, batch, by, tz, ty, tx, packed, row_scale, row_code, total):
            red = T.alloc_shared((threads,), "float32")
            sums = T.alloc_shared((threads,), acc_t)
            best = T.alloc_local((1,), "float32")  # the max, then the inverse scale
            code = T.alloc_local((1,), "int32")
            vote = T.alloc_local((2,), "uint32")
            for bb in range(block_batch):
                if by * block_batch + bb < batch:  # block-uniform
                    pack(
                        act, by * block_batch + bb, packed, bb, row_scale, row_code,
                        tz * cfg.warps_m + ty, tx, red, sums, best, total, code, vote,
                    )  # fmt: skip

        return pack_block

    def _prefetch(self) -> int:
        """The in-block pack's ``prefetch_max`` (:func:`.cuda_ballot_pack.row_pack`)."""
        return FUSED_PREFETCH_MAX if self.fmt.bits <= FUSED_PREFETCH_MAX_BITS else 0

    def pack_phases(self) -> RowPackPhases:
        """The phases of :meth:`pack_block`'s row pack, for a kernel that packs the rows of several
        legs with one barrier chain (:func:`.cuda_ballot_pack.row_pack_phases`). Needs ``fused_pack``."""
        if not self.fused_pack:
            raise ValueError("pack_phases is for a leg made with fused_pack=True")
        return row_pack_phases(self.fmt, self.k_dim, self.cfg.threads // MMA_LANES, self._prefetch())

    def prefetch(self, budget: int = PREFETCH_MAX_BYTES):
        """A TVMScript macro ``prefetch(wp, bitlayers, bx, tz, ty, tx)``: with :attr:`programmatic`,
        the block's weight rows of every plane below ``bitlayers`` into the L2 cache
        (``cp.async.bulk.prefetch.L2``: a row tile's first :meth:`prefetch_k_tiles` K tiles, one
        contiguous range, a thread each), for a kernel that may run before the one before it
        ends: the weights stream from DRAM during that wait (:mod:`.cuda_pdl`). Registers
        would hold them too, but ptxas moved such loads past the wait (their ``ld.global.nc``
        ignores the wait's memory clobber); a prefetch is an asm statement it keeps in place.
        ``budget``: the most bytes the kernel's blocks prefetch together (this leg's share where
        a kernel has several). Nothing without :attr:`programmatic`."""
        fmt, cfg, row_tiles = self.fmt, self.cfg, self.row_tiles
        wm, mt, threads = cfg.warps_m, cfg.tiles_m, cfg.threads
        ranges = fmt.bits * wm * mt  # (plane, block row tile) pairs
        tile_bytes = MMA_TILE_ROWS * MMA_TILE_WORDS * 4 * self.prefetch_k_tiles(budget)
        enabled = self.programmatic

        @T.macro
        def prefetch(wp, bitlayers, bx, tz, ty, tx):
            if enabled:
                for r in range(-(-ranges // threads)):
                    idx = T.meta_var(r * threads + (tz * wm + ty) * MMA_LANES + tx)
                    plane = T.meta_var(idx // (wm * mt))
                    tile = T.meta_var(bx * wm * mt + idx % (wm * mt))
                    if idx < ranges and tile < row_tiles and T.Cast("int64", plane) < bitlayers:
                        T.ptx.cp.async_.bulk.prefetch.L2.global_(
                            wp.ptr_to([plane, tile, 0, 0, 0]), T.uint32(tile_bytes)
                        )

        return prefetch

    @property
    def weight_bytes(self) -> int:
        """Bytes of this leg's weight planes (all ``fmt.bits`` of them, padded to whole tiles)."""
        return self.fmt.bits * self.row_tiles * self.k_tiles * MMA_TILE_ROWS * MMA_TILE_WORDS * 4

    def prefetch_k_tiles(self, budget: int = PREFETCH_MAX_BYTES) -> int:
        """K tiles of each row tile :meth:`prefetch` fetches: all of them, or the share of
        ``budget`` (:data:`PREFETCH_MAX_BYTES`) of a layer with more weights (every block
        prefetching its own would evict the first ones from the L2 before they are read)."""
        return max(1, min(self.k_tiles, self.k_tiles * budget // self.weight_bytes))

    @property
    def planes_outside(self) -> bool:
        """Whether :meth:`product` loops over the weight planes outside the K steps."""
        bits, nt = self.fmt.bits, self.cfg.tiles_n
        return self.fused_pack and (bits > PLANES_INSIDE_MAX_FUSED_BITS or nt > 1)

    @property
    def steps(self) -> int:
        """K steps of a warp (``loads`` K tiles each)."""
        return -(-self.k_tiles // (self.cfg.k_split * self.cfg.loads))

    @property
    def step_fragments(self) -> int:
        """uint32x4 weight fragments of one K step, every plane's."""
        return self.fmt.bits * self.cfg.loads * self.cfg.tiles_m

    def early_steps(self, budget: int) -> int:
        """K steps whose weight fragments :meth:`product` can take loaded before the in-block pack,
        in ``budget`` registers a lane (all of them at most): 0 unless the leg packs in the block
        with the K steps outside (the planes-outside order loads a plane's steps in turn)."""
        if not self.fused_pack or self.planes_outside:
            return 0
        return min(self.steps, budget // (4 * self.step_fragments))

    def product(self, early: int = 0):
        """A TVMScript macro: the block's integer plane products into shared memory ``part``.

        ``product(act, wp, bitlayers, batch, bx, by, tz, ty, tx, acc, dot, af, bf, part)``: ``act``
        is the packed activations, ``fmt.act_shape(B, K)`` (global, the B-fragment order) or with
        ``fused_pack`` the block's ``[act_bits, block_batch, W]`` (shared); ``wp`` the weights in
        the ``mma16x256`` layout; ``acc``, ``dot``, ``af``, ``bf`` the warp's register fragments
        (``frag`` accumulators, ``frag`` int32, ``loads * tiles_m`` uint32x4, :attr:`b_fragments`);
        ``part`` shared, :attr:`part_shape`. The caller synchronizes the block before
        reading ``part``.

        ``early`` (at most :meth:`early_steps`): returns ``(first_loads, product)``;
        ``first_loads(wp, bitlayers, bx, tz, ty, tx, af0)`` loads the weight fragments of the
        first ``early`` K steps, every plane's, into ``af0`` (``early * step_fragments``
        uint32x4; zeros past ``bitlayers``, never read), to be called before the in-block pack so
        that their DRAM latency overlaps it (the weights were otherwise requested only after the
        pack), and ``product`` takes ``af0`` as a last argument and starts from it.
        ``product`` reads activations: with :attr:`programmatic` the caller waits before it.
        """
        fmt, cfg = self.fmt, self.cfg
        n_act, words, acc_t, stride, fused = fmt.act_bits, self.words, self.acc_dtype, self.stride, self.fused_pack
        mt, ks, ld, nt, frag = cfg.tiles_m, cfg.k_split, cfg.loads, cfg.tiles_n, self.frag
        wm, k_tiles, row_tiles, bits = cfg.warps_m, self.k_tiles, self.row_tiles, fmt.bits
        steps, step_frags = self.steps, self.step_fragments
        planes_outside = self.planes_outside
        guarded = mt * nt <= GUARDED_PLANES_MAX_TILES
        if early > self.early_steps(4 * step_frags * steps):
            raise ValueError(f"{early} early K steps: the leg has {self.early_steps(4 * step_frags * steps)}")

        def w_coef(i):
            return weight_plane_coefficient(i, fmt, acc_t)

        @T.macro
        def load_b(act, batch, s, by, tz, tx, bf):
            """The activation fragments of K step ``s`` (``loads`` tiles) into ``bf``."""
            for u in T.unroll(ld):
                kt = T.meta_var((s * ld + u) * ks + tz)  # K tile
                for n in T.unroll(nt):
                    col = T.meta_var((by * nt + n) * 8 + tx // 4)  # B fragment column
                    if fused:  # the block's rows, [plane, (n*8 + tx//4) // stride, word] in shared memory
                        for r in T.unroll(2):
                            word = T.meta_var(kt * MMA_TILE_WORDS + tx % 4 + 4 * r)
                            ok = T.meta_var(col % stride < n_act and col // stride < batch and word < words)
                            bf[(u * nt + n) * 2 + r] = T.if_then_else(
                                ok, act[col % stride, (n * 8 + tx // 4) // stride, word], T.uint32(0)
                            )
                    else:
                        # B-fragment order: the lane's two words adjacent (one 8-byte load; the
                        # padding planes and words are zero, though no output reads them: column_total
                        # sums planes < act_bits, padding words meet zero weights). Read as one uint64
                        # into two uint32 registers, the low word first (little-endian: register r=0):
                        # a uint2 array of fragments was put on the stack by ptxas (W1 33x20, 2 x 4 tiles).
                        pair = T.decl_buffer((batch, k_tiles, stride, MMA_TILE_WORDS // 2), "uint64", data=act.data)
                        if col // stride < batch and kt < k_tiles:
                            b, t, j, e = T.meta_var(fmt.act_index(col % stride, col // stride, kt * 8 + tx % 4))
                            both = T.meta_var(pair[b, t, j, e // 2])
                            bf[(u * nt + n) * 2] = T.Cast("uint32", both)
                            bf[(u * nt + n) * 2 + 1] = T.Cast("uint32", T.shift_right(both, T.uint64(32)))
                        else:
                            bf[(u * nt + n) * 2] = T.uint32(0)
                            bf[(u * nt + n) * 2 + 1] = T.uint32(0)

        @T.macro
        def load_a(wp, i, s, bx, tz, ty, tx, af, used, base=0):
            """Weight plane ``i``'s fragments of K step ``s`` into ``af`` from ``base`` on (zero
            where not ``used``)."""
            for u in T.unroll(ld):
                kt = T.meta_var((s * ld + u) * ks + tz)
                for m in T.unroll(mt):
                    tile = T.meta_var((bx * wm + ty) * mt + m)
                    if used and kt < k_tiles and tile < row_tiles:
                        af[base + u * mt + m] = wp[i, tile, kt, tx, T.ramp(0, 1, 4)]
                    else:
                        af[base + u * mt + m] = T.Broadcast(T.uint32(0), 4)

        @T.macro
        def mmas(dot, af, bf, base=0):
            for u in T.unroll(ld):
                for m in T.unroll(mt):
                    for n in T.unroll(nt):
                        T.evaluate(
                            T.ptx_legacy.mma(
                                "m16n8k256", "row", "col", "int1", "int1", "int32",
                                af.data, base + u * mt + m,  # in uint4 units
                                bf.data, (u * nt + n) * 2,
                                dot.data, (m * nt + n) * 4,
                                False, "and", dtype="int32",
                            )
                        )  # fmt: skip

        @T.macro
        def first_loads(wp, bitlayers, bx, tz, ty, tx, af0):
            for s in T.unroll(early):
                for i in T.unroll(bits):
                    used = T.meta_var(T.Cast("int64", i) < bitlayers)
                    load_a(wp, i, s, bx, tz, ty, tx, af0, used, s * step_frags + i * ld * mt)

        @T.macro
        def plane(i, dot, af, bf, acc, base):
            """Plane ``i``'s MMAs of a K step (fragments ``af[base:]``), folded into ``acc``."""
            for e in T.unroll(frag):
                dot[e] = 0
            mmas(dot, af, bf, base)
            for e in T.unroll(frag):
                acc[e] = acc[e] + w_coef(i) * T.Cast(acc_t, dot[e])

        @T.macro
        def run(act, wp, bitlayers, batch, bx, by, tz, ty, tx, acc, dot, af, bf, part, af0):
            for e in T.unroll(frag):
                acc[e] = T.Cast(acc_t, 0)
            # Planes unrolled to ``bits`` under a uniform ``i < bitlayers`` guard: unused planes
            # are never read; a plane's popcounts are folded with its coefficient (acc += c_i D_i).
            if planes_outside:
                # Planes outside: one-launch kernels above W4 or with several column tiles keep
                # their tight register budget (the order below spilled 2-8 bytes in W8 kernels at
                # 11008x4096 and 4096x4096, in W4 at 11008x4096 batch 8).
                for i in T.unroll(bits):
                    if T.Cast("int64", i) < bitlayers:
                        for e in T.unroll(frag):
                            dot[e] = 0
                        for s in range(steps):
                            load_a(wp, i, s, bx, tz, ty, tx, af, True)
                            load_b(act, batch, s, by, tz, tx, bf)
                            mmas(dot, af, bf)
                        for e in T.unroll(frag):
                            acc[e] = acc[e] + w_coef(i) * T.Cast(acc_t, dot[e])
            else:
                # K steps outside: the activation fragments once for every plane. Loaded per
                # plane from global memory they were ~90 % of the L1 wavefronts (eight 32-byte
                # pieces a load in the [act_bits, B, W] order that preceded the B-fragment order),
                # and at batch 64 the kernel was L1-bound (Nsight Compute, H200: L1 86 %, DRAM
                # 1 %). And every used plane's weight loads of a step are issued
                # together: planes outside, a small layer (the LSTM step, K = 650) waited for one
                # weight load per plane and step in turn.
                # A plane past ``bitlayers`` is not read: its fragments are zero (a guarded load,
                # not a branch around the plane: with one, the planes' loads of a step waited for
                # each other, and a small layer got slower, 2600x650 W8 6.4 -> 9.5 us).
                # With ``early`` the first steps' weight fragments were loaded before the pack.
                if early > 0:
                    for s in T.unroll(early):
                        load_b(act, batch, s, by, tz, tx, bf)
                        for i in T.unroll(bits):
                            plane(i, dot, af0, bf, acc, s * step_frags + i * ld * mt)
                # Larger register tiles (GUARDED_PLANES_MAX_TILES) branch around the plane: a
                # plane's loads are many already, and guarded, ptxas interleaved them with the
                # MMAs (4096x4096 W4 batch 64, 4 x 4 tiles: 27 -> 51 us).
                for s in range(early, steps):
                    load_b(act, batch, s, by, tz, tx, bf)
                    for i in T.unroll(bits):
                        if guarded:
                            load_a(wp, i, s, bx, tz, ty, tx, af, T.Cast("int64", i) < bitlayers)
                            plane(i, dot, af, bf, acc, 0)
                        elif T.Cast("int64", i) < bitlayers:
                            load_a(wp, i, s, bx, tz, ty, tx, af, True)
                            plane(i, dot, af, bf, acc, 0)
            # C fragment: lane tx, register r holds row tx//4 + 8(r//2), column 2(tx%4) + r%2.
            for m in T.unroll(mt):
                for n in T.unroll(nt):
                    for r in T.unroll(4):
                        row = T.meta_var(m * MMA_TILE_ROWS + tx // 4 + 8 * (r // 2))
                        part[tz, ty, row, n * 8 + 2 * (tx % 4) + r % 2] = acc[(m * nt + n) * 4 + r]

        if early > 0:
            return first_loads, run

        @T.macro
        def product(act, wp, bitlayers, batch, bx, by, tz, ty, tx, acc, dot, af, bf, part):
            run(act, wp, bitlayers, batch, bx, by, tz, ty, tx, acc, dot, af, bf, part, None)

        return product

    def packed_product(self, early: int = 0):
        """A TVMScript macro: :meth:`pack_block` of the block's rows, then :meth:`product` of them,
        with the weight fragments of the first ``early`` K steps loaded before the pack (with
        :attr:`programmatic`: the weights prefetched, the wait for the kernel before this one,
        those fragments loaded (from the L2 by then, or in flight), then the pack).

        ``packed_product(act, wp, bitlayers, batch, bx, by, tz, ty, tx, acc, dot, af, bf, part,
        packed, row_scale, row_code, total)``: ``act`` float32 ``[B, K]``; ``packed``,
        ``row_scale``, ``row_code`` the shared buffers of :meth:`packed_shapes`; the rest as in
        :meth:`product`. Needs ``fused_pack``.
        """
        pack_block, step_frags = self.pack_block(), self.step_fragments
        prefetch, wait = self.prefetch(), wait_for_previous(self.programmatic)
        if early == 0:
            product = self.product()

            @T.macro
            def packed_product(
                act,
                wp,
                bitlayers,
                batch,
                bx,
                by,
                tz,
                ty,
                tx,
                acc,
                dot,
                af,
                bf,
                part,
                packed,
                row_scale,
                row_code,
                total,
            ):
                prefetch(wp, bitlayers, bx, tz, ty, tx)
                wait()
                pack_block(act, batch, by, tz, ty, tx, packed, row_scale, row_code, total)
                product(packed, wp, bitlayers, batch, bx, by, tz, ty, tx, acc, dot, af, bf, part)

            return packed_product

        first_loads, product = self.product(early)

        @T.macro
        def packed_product_early(
            act, wp, bitlayers, batch, bx, by, tz, ty, tx, acc, dot, af, bf, part, packed, row_scale, row_code, total
        ):
            af0 = T.alloc_local((early * step_frags,), "uint32x4")
            prefetch(wp, bitlayers, bx, tz, ty, tx)
            wait()  # before it only the prefetch: a load could be moved past it by ptxas either way
            first_loads(wp, bitlayers, bx, tz, ty, tx, af0)
            pack_block(act, batch, by, tz, ty, tx, packed, row_scale, row_code, total)
            product(packed, wp, bitlayers, batch, bx, by, tz, ty, tx, acc, dot, af, bf, part, af0)

        return packed_product_early

    def column_total(self):
        """A TVMScript macro: ``column_total(part, total, idx)`` sets ``total[0]`` to the integer product
        of the block's output ``idx`` (row ``idx % block_rows``, batch row ``idx // block_rows``):
        its K-split parts and activation-plane columns summed with the coefficients ``d_j``."""
        fmt, cfg = self.fmt, self.cfg
        n_act, acc_t, stride, block_rows = fmt.act_bits, self.acc_dtype, self.stride, self.block_rows
        tile_rows = cfg.tiles_m * MMA_TILE_ROWS

        def x_coef(j):
            return plane_coefficient(j, n_act, True, acc_t)

        @T.macro
        def column_total(part, total, idx):
            total[0] = T.Cast(acc_t, 0)
            for z in T.unroll(cfg.k_split):
                for j in T.unroll(n_act):
                    col = T.meta_var(idx // block_rows * stride + j)
                    row = T.meta_var(idx % block_rows)
                    total[0] = total[0] + x_coef(j) * part[z, row // tile_rows, row % tile_rows, col]

        return column_total


def without_params(func: tir.PrimFunc, indices: tuple[int, ...]) -> tir.PrimFunc:
    """``func`` without the (buffer) parameters at ``indices``, which its body never reads."""
    params = [p for k, p in enumerate(func.params) if k not in indices]
    return tir.PrimFunc(params, func.body, func.ret_type, func.attrs)
