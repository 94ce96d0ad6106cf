"""Graph rewrites for PrecisionBatching, written as **Relax** passes.

The folder keeps its historical name, but TVM >= 0.20 has no Relay: Relax replaced it as TVM's
graph IR, so every pass here is a Relax ``module_pass``. Installed as ``pbtvm.relay_passes``.

One pass per file. ``pbtvm.compile`` runs :class:`OwnConstants` (a copy of the model's tensors
TVM's importer shares), :class:`NormalizeConstantIndices` (TVM's importer
emits out-of-bounds negative ``take`` indices), :class:`BoundedSliceShapes` (``y[:1]`` of a
run-time batch has size 1), :class:`ClipRuntimeIndices` (its run-time
``take`` reads wherever an id points), :class:`BuildableFloatChecks` (``isfinite``, bool
products and bfloat16 ``isnan`` in forms TVM builds), :class:`TorchFloatDivision` (float floor
division and remainder as torch's), :class:`ThroughFloat32` (half-precision ops
TVM cannot build, or builds wrong, in float32), :class:`PropagateNaN` (TVM's ``relu`` /
``clip`` / ``maximum`` / ``minimum`` drop NaN, torch's keep it), :class:`PBLSTMLowering` (LSTM layers into a PB
time loop), :class:`PBLinearRewrite`, on CUDA :class:`FuseActivationIntoPB` (a layer's ReLU / GELU / SiLU into its
binary-tensor-core kernel), then (optionally) tunes the
PB kernels it emitted, then :class:`ApplyPBSchedules`; TVM's own Relax pipeline follows.
"""

from .apply_pb_schedules import ApplyPBSchedules
from .bounded_slice_shapes import BoundedSliceShapes
from .buildable_float_checks import BuildableFloatChecks
from .clip_runtime_indices import ClipRuntimeIndices
from .fuse_activation import FuseActivationIntoPB
from .normalize_constant_indices import NormalizeConstantIndices
from .own_constants import OwnConstants, outputs_to_copy
from .pb_linear_rewrite import ConversionReport, PBLinearRewrite, dense_shapes
from .pb_lstm_lowering import PBLSTMLowering, lstm_weight_sizes
from .propagate_nan import PropagateNaN
from .through_float32 import ThroughFloat32
from .torch_float_division import TorchFloatDivision

__all__ = [
    "ApplyPBSchedules",
    "BoundedSliceShapes",
    "BuildableFloatChecks",
    "ClipRuntimeIndices",
    "ConversionReport",
    "FuseActivationIntoPB",
    "NormalizeConstantIndices",
    "OwnConstants",
    "PBLSTMLowering",
    "PBLinearRewrite",
    "PropagateNaN",
    "ThroughFloat32",
    "TorchFloatDivision",
    "dense_shapes",
    "lstm_weight_sizes",
    "outputs_to_copy",
]
