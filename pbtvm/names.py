"""Names shared by ops, kernels, passes and schedules: kernel kinds, PrimFunc attributes, blocks.

A PB PrimFunc carries ``pbtvm.kernel`` (a :class:`KernelKind`) and the format fields; schedule
rules find their blocks by the names below. Computes name their blocks with these constants and
schedules look them up with the same constants, so renaming a block is a one-line change.
Blocks of a second PB product inside one PrimFunc (the LSTM step's input projection) carry a
suffix; :func:`block` adds it.
"""

from __future__ import annotations

from enum import StrEnum


class KernelKind(StrEnum):
    """Value of the ``pbtvm.kernel`` PrimFunc attribute: which PB kernel a PrimFunc is."""

    #: Activation quantize + pack into bitplanes (:func:`pbtvm.ops.act_quantize_pack`).
    ACT_PACK = "act_pack"
    #: PB GEMM over packed activations and weight planes, with the dense epilogue.
    GEMM = "pb_gemm"
    #: Pack fused into the GEMM (one kernel per layer).
    DENSE_ACT = "pb_dense_act"
    #: One fused LSTM step (recurrent product, optionally the input projection, gates).
    LSTM_CELL = "pb_lstm_cell"


# PrimFunc attributes (read by rules, the tuner and the bitlayers check).
ATTR_KERNEL = "pbtvm.kernel"
ATTR_BITS = "pbtvm.bits"
ATTR_ACT_BITS = "pbtvm.act_bits"
ATTR_LAYOUT = "pbtvm.layout"
ATTR_CODEBOOK = "pbtvm.codebook"
ATTR_K = "pbtvm.k"
ATTR_FORMAT_VERSION = "pbtvm.format_version"
ATTR_INPUT_SIZE = "pbtvm.input_size"
ATTR_CPU_KERNEL = "pbtvm.cpu_kernel"
#: Manifest key of an exported decoder's settings (:mod:`pbtvm.decoder`; :func:`pbtvm.load` gives
#: such a library back as the decoder).
MANIFEST_DECODER = "decoder"
#: CUDA kernel attribute (an ``AttrStmt`` in the device region) that TVM prints as
#: ``__launch_bounds__(threads, min_blocks)``: ptxas then may give a lane 65536 / (threads x
#: min_blocks) registers (with the thread count alone it guesses, and some kernels spilled).
ATTR_LAUNCH_MIN_BLOCKS = "tirx.launch_bounds_min_blocks_per_sm"
#: On a ``pb_dense_act`` PrimFunc with a symbolic batch in the ``mma16x256`` layout (a CUDA dense
#: layer of ``compile``): the largest batch at which its blocks pack their own rows (one launch);
#: above it the function runs the ballot pack and the two-launch BMMA kernel (a dispatch by batch,
#: :func:`pbtvm.schedules.cuda_bmma.dispatch_configs`). Without it such a function is one launch at
#: every batch (a decoder's head).
ATTR_IN_BLOCK_MAX_BATCH = "pbtvm.in_block_max_batch"
#: On a CUDA kernel PrimFunc written for programmatic dependent launch (sm_90+: every kernel of it
#: waits for the kernel before it with ``griddepcontrol.wait`` before it reads anything that
#: kernel may write, then lets the next one launch): the names of the buffer parameters it may
#: read before that wait (the weight planes, whose loads then overlap the previous kernel). Such a
#: PrimFunc is launched with :data:`LAUNCH_PROGRAMMATIC` only where those buffers are constants
#: (:class:`relay_passes.ApplyPBSchedules`): nothing on the stream writes them.
ATTR_EARLY_READS = "pbtvm.early_reads"
#: On a PB dense PrimFunc: the activation its epilogue applies to each output (one of
#: :data:`ACTIVATIONS`), folded into the layer by :class:`relay_passes.FuseActivationIntoPB`.
ATTR_ACTIVATION = "pbtvm.activation"
#: Activations a PB dense epilogue applies: ``relu`` keeps NaN, as torch's does; ``gelu``
#: (erf), ``gelu_tanh`` and ``silu`` by TVM's own formulas (its legalization of ``relax.nn.*``).
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
#: TVM's kernel launch flag (spelt as TVM spells it) for CUDA's programmatic stream serialization:
#: the kernel may start before the kernel before it in the stream ends (``cuLaunchKernelEx``).
LAUNCH_PROGRAMMATIC = "tirx.use_programtic_dependent_launch"
#: PrimFunc attribute holding the launch flags of its kernels (TVM's ``tirx.kernel_launch_params``).
ATTR_KERNEL_LAUNCH_PARAMS = "tirx.kernel_launch_params"
#: On a byte-code CPU GEMM: the batch from which it multiplies with the AMX tile instructions.
ATTR_AMX_MIN_BATCH = "pbtvm.amx_min_batch"
#: On a byte-code CPU kernel: the LLVM CPU features its instructions need (the build checks them).
ATTR_CPU_FEATURES = "pbtvm.cpu_features"
#: Environment variable: ``popcount`` forces the portable CPU kernels (for comparisons).
ENV_CPU_KERNEL = "PBTVM_CPU_KERNEL"
#: Environment variable: ``0`` builds CUDA kernels without programmatic dependent launch
#: (:attr:`pbtvm.target.TargetLimits.programmatic_launch`; for comparisons); :data:`PDL_AT_START`
#: builds them to let the next kernel launch as they start, not after their wait
#: (:func:`pbtvm.schedules.cuda_pdl.next_launches_at_start`; for comparisons).
ENV_CUDA_PDL = "PBTVM_CUDA_PDL"
#: The :data:`ENV_CUDA_PDL` value for ``launch_dependents`` first in every kernel.
PDL_AT_START = "start"
#: Environment variable: ``1`` keeps torch importable in pbtvm's TVM worker processes (:mod:`pbtvm.worker_env`).
ENV_WORKER_TORCH = "PBTVM_WORKER_TORCH"
#: Environment variable: ``1`` makes :func:`pbtvm.load` skip comparing a CPU library's x86 features
#: with this CPU's (:func:`pbtvm.target.missing_cpu_features`).
ENV_SKIP_CPU_CHECK = "PBTVM_SKIP_CPU_CHECK"

# Blocks of the activation quantize + pack (:func:`pbtvm.ops.act_quantize_pack`).
AMAX = "pb_amax"
XSCALE = "pb_xscale"
XINV = "pb_xinv"
XQ = "pb_xq"
XPACK = "pb_xpack"
ROWSUM = "pb_rowsum"
# Blocks of the PB product and its epilogue (:mod:`pbtvm.ops.pb_gemm`).
#: The integer plane-pair product (all PB GEMM kernels, CPU, CUDA, BMMA).
GEMM = "pb_gemm"
#: Integer product plus the row-sum correction (:func:`pbtvm.ops.pb_int_product`).
ACC = "pb_acc"
#: The float epilogue of a dense product (scales, offsets, bias): the gate pre-activations of
#: an LSTM step.
DENSE_OUT = "pb_out"
# Blocks of the LSTM step (:mod:`pbtvm.ops.lstm_cell`).
#: The step's output compute; TE names its two blocks (h' and c', one loop nest) ``<name>_v0/_v1``.
CELL = "pb_lstm_cell"
#: The block computing c' (an intermediate the output blocks read).
CELL_C = "pb_lstm_c"
#: Block-name suffix of the LSTM step's input leg (pack of x, PB product on W_ih).
INPUT_TAG = "_x"

# MetaSchedule custom-rule names on the GEMM block (``schedule_rule`` block attribute).
#: The bitplane GEMM template (CPU popcount and CUDA-core kernels).
RULE_BITPLANE_GEMM = "pbtvm_bitplane_gemm"
#: The binary-tensor-core template.
RULE_BMMA_GEMM = "pbtvm_bmma_gemm"


def kernel_kind(func: object) -> KernelKind | None:
    """The :class:`KernelKind` of a PrimFunc, or None for a PrimFunc that is not a PB kernel."""
    value = (getattr(func, "attrs", None) or {}).get(ATTR_KERNEL)
    return None if value is None else KernelKind(str(value))


def block(name: str, tag: str = "") -> str:
    """Block ``name`` of the PB product tagged ``tag`` (``""`` for the first product)."""
    return f"{name}{tag}"
