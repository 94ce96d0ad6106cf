"""The :class:`BitplaneFormat` dataclass, its constants and presets (maths in :mod:`pbtvm.bitplane`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import InputError, check_int
from .lut_layout import LUT_LAYOUT, lut_shape, lut_word
from .mma_layout import MMA_LAYOUT, MMA_TILE_ROWS, MMA_TILE_WORDS, mma_act_index, mma_act_shape, mma_tile_index

#: Bumped whenever the meaning of packed bytes changes; stored in every manifest and tuning key.
FORMAT_VERSION = 1
#: Bits per packed word.
WORD_BITS = 32
#: Weight-plane memory layouts a schedule may choose. ``kNW``: ``[planes, N, words]`` (a plane is
#: contiguous, so dropping planes reads fewer bytes); ``NkW``: ``[N, planes, words]`` (a row's
#: planes are contiguous); ``mma16x256``: each plane cut into 16-row x 256-bit tiles stored in the
#: A-fragment order of ``mma.m16n8k256.b1`` (see :func:`mma_tile_index`), shape
#: ``[planes, ceil(N/16), ceil(words/8), 32 lanes, 4]``: a warp loads a tile as one 16-byte load
#: per lane. Rows and words are zero-padded to whole tiles; in this layout the activations are
#: packed in the B-fragment order too (:meth:`BitplaneFormat.act_shape`). ``lut16x4``: plane pairs of 16-row
#: tiles as the 4-bit table indices of the AVX2 table-lookup kernel (:mod:`pbtvm.bitplane.lut_layout`),
#: shape ``[ceil(planes/2), ceil(N/16), 4 * words, 8]``.
LAYOUTS = ("kNW", "NkW", MMA_LAYOUT, LUT_LAYOUT)
CODEBOOKS = ("twos_complement", "bipolar", "offset_binary")
#: Default activation bits, chosen by measurement (see README, "act_bits"): 8 keeps the MNIST MLP
#: within 0.1 point of 16 while needing half the activation planes.
DEFAULT_ACT_BITS = 8


@dataclass(frozen=True)
class BitplaneFormat:
    """How k-bit weights and act_bits activations are laid out as binary planes.

    Parameters
    ----------
    bits : int
        Weight bits k, 1..16.
    act_bits : int
        Activation bits, 2..16 (two's complement, dynamic per-row scale).
    codebook : str, optional
        ``"twos_complement"`` (k >= 2), ``"bipolar"`` (k == 1) or ``"offset_binary"`` (any k,
        per-row zero point). Derived from ``bits`` if None (two's complement / bipolar, as before
        offset binary existed; :func:`pbtvm.quantize.choose_codebook` picks per layer).
    word_dtype : str
        Packed word type; only ``"uint32"``.
    pack_axis : str
        Axis packed into words; only ``"K"`` (the reduction axis).
    plane_order : str
        Only ``"msb_first"``: plane 0 is the most significant (sign) plane.
    layout : str
        Weight plane layout, one of :data:`LAYOUTS`.
    version : int
        Format version; must equal :data:`FORMAT_VERSION`.
    """

    bits: int
    act_bits: int = DEFAULT_ACT_BITS
    codebook: str | None = None
    word_dtype: str = "uint32"
    pack_axis: str = "K"
    plane_order: str = "msb_first"
    layout: str = "kNW"
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        # numpy integers as Python ints from here on (manifests are JSON)
        object.__setattr__(self, "bits", check_int("bits", self.bits, 1, 16))
        object.__setattr__(self, "act_bits", check_int("act_bits", self.act_bits, 2, 16))
        if self.codebook is None:
            object.__setattr__(self, "codebook", "bipolar" if self.bits == 1 else "twos_complement")
        if self.codebook not in CODEBOOKS:
            raise InputError(f"codebook must be one of {CODEBOOKS}, got {self.codebook!r}")
        if self.codebook == "bipolar" and self.bits != 1:
            raise InputError(f"the bipolar codebook is for bits=1, got bits={self.bits}")
        if self.codebook == "twos_complement" and self.bits < 2:
            raise InputError("bits=1 needs the bipolar codebook (two's complement has no 1-bit code)")
        if self.word_dtype != "uint32":
            raise InputError(f"word_dtype must be 'uint32', got {self.word_dtype!r}")
        if self.pack_axis != "K":
            raise InputError(f"pack_axis must be 'K', got {self.pack_axis!r}")
        if self.plane_order != "msb_first":
            raise InputError(f"plane_order must be 'msb_first', got {self.plane_order!r}")
        if self.layout not in LAYOUTS:
            raise InputError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.version != FORMAT_VERSION:
            raise InputError(
                f"bitplane format version {self.version} is not supported by this pbtvm "
                f"(it reads version {FORMAT_VERSION}); recompile the model"
            )

    # ------------------------------------------------------------------ sizes
    @staticmethod
    def words(k_dim: int) -> int:
        """Number of uint32 words that hold ``k_dim`` packed elements (K padded to 32)."""
        return -(-int(k_dim) // WORD_BITS)

    def weight_shape(self, n: int, k_dim: int) -> tuple[int, int, int]:
        """Shape of the packed weight array for an ``[n, k_dim]`` matrix in this layout."""
        if self.layout == "kNW":
            return (self.bits, n, self.words(k_dim))
        if self.layout == MMA_LAYOUT:
            tiles_k = -(-self.words(k_dim) // MMA_TILE_WORDS)
            return (self.bits, -(-int(n) // MMA_TILE_ROWS), tiles_k, 32, 4)
        if self.layout == LUT_LAYOUT:
            return lut_shape(self.bits, n, self.words(k_dim))
        return (n, self.bits, self.words(k_dim))

    def act_shape(self, batch: Any, k_dim: int) -> tuple[Any, ...]:
        """Shape of the packed activations of ``batch`` rows of ``k_dim`` (``batch`` may be symbolic).

        ``[act_bits, B, W]``, or in the ``mma16x256`` layout the B-fragment order of
        ``mma.m16n8k256.b1``, ``[B, ceil(W/8), stride, 8]`` (:mod:`pbtvm.bitplane.mma_layout`).
        """
        if self.layout == MMA_LAYOUT:
            return mma_act_shape(self.act_bits, batch, self.words(k_dim))
        return (self.act_bits, batch, self.words(k_dim))

    @property
    def act_batch_axis(self) -> int:
        """The batch axis of :meth:`act_shape`."""
        return 0 if self.layout == MMA_LAYOUT else 1

    def act_index(self, plane: Any, row: Any, word: Any) -> tuple[Any, ...]:
        """Index of (plane, row, word) in the packed activations; works for ints and TIR vars."""
        if self.layout == MMA_LAYOUT:
            return mma_act_index(plane, row, word)
        return (plane, row, word)

    def weight_index(self, plane: Any, row: Any, word: Any) -> tuple[Any, Any, Any]:
        """Index of (plane, row, word) in the packed weight array; works for ints and TIR vars.

        Not for ``lut16x4``, where a word's bits are spread over four elements: use :meth:`weight_word`.
        """
        if self.layout == LUT_LAYOUT:
            raise ValueError(f"a {LUT_LAYOUT} word is spread over four elements: use BitplaneFormat.weight_word")
        if self.layout == "kNW":
            return (plane, row, word)
        if self.layout == MMA_LAYOUT:
            return (plane, *mma_tile_index(row, word))
        return (row, plane, word)

    def weight_word(self, wp: Any, plane: Any, row: Any, word: Any) -> Any:
        """Word ``word`` (inputs ``32 word ..``) of ``plane`` and ``row`` read from the packed
        weights ``wp`` (a TE tensor or TIR buffer, uint32) in any layout."""
        if self.layout == LUT_LAYOUT:
            return lut_word(wp, plane, row, word)
        return wp[self.weight_index(plane, row, word)]

    # ------------------------------------------------------------------ codes
    @property
    def weight_qmax(self) -> int:
        """Largest weight code magnitude used by the symmetric quantizer (1 for bipolar).

        For offset binary: the largest code, ``2^k - 1``.
        """
        if self.codebook == "offset_binary":
            return 2**self.bits - 1
        return 1 if self.codebook == "bipolar" else 2 ** (self.bits - 1) - 1

    @property
    def weight_code_range(self) -> tuple[int, int]:
        """``(lo, hi)`` of the integer weight codes :func:`pack_weights` accepts."""
        if self.codebook == "offset_binary":
            return 0, 2**self.bits - 1
        if self.codebook == "bipolar":
            return -1, 1
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1

    @property
    def weight_signed(self) -> bool:
        """Whether plane 0 has a negative coefficient (the two's complement sign plane)."""
        return self.codebook == "twos_complement"

    @property
    def has_zero_point(self) -> bool:
        """Whether each weight row carries a float zero point ``z`` (epilogue term ``-z * rowsum``)."""
        return self.codebook == "offset_binary"

    def scale_shape(self, n: int) -> tuple[int, ...]:
        """Shape of the per-row float weight parameters the kernels take (``w_scale``).

        ``(n,)`` scales, or ``(2, n)`` = (scales, zero points) when :attr:`has_zero_point`.
        """
        return (2, int(n)) if self.has_zero_point else (int(n),)

    @property
    def act_qmax(self) -> int:
        """Largest activation code magnitude (symmetric, ``-act_qmax..act_qmax``)."""
        return 2 ** (self.act_bits - 1) - 1

    @property
    def weight_offset(self) -> int:
        """Constant added to ``sum_i c_i b_i`` to get the weight code (-1 for bipolar)."""
        return -1 if self.codebook == "bipolar" else 0

    def plane_coefficients(self, bitlayers: int | None = None) -> tuple[int, ...]:
        """Weight plane coefficients ``c_i``, MSB first, for the top ``bitlayers`` planes."""
        bitlayers = self.check_bitlayers(bitlayers)
        if self.codebook == "bipolar":
            return (2,)
        if self.codebook == "offset_binary":
            return tuple(2 ** (self.bits - 1 - p) for p in range(bitlayers))
        return _twos_complement_coefficients(self.bits)[:bitlayers]

    @property
    def act_plane_coefficients(self) -> tuple[int, ...]:
        """Activation plane coefficients ``d_j``, MSB first."""
        return _twos_complement_coefficients(self.act_bits)

    def check_bitlayers(self, bitlayers: int | None) -> int:
        """Validate the run-time precision knob; None means all ``bits`` planes."""
        if bitlayers is None:
            return self.bits
        return check_int("bitlayers", bitlayers, 1, self.bits)

    def truncation_correction(self, bitlayers: int | None = None) -> float:
        """Expected value of the dropped low weight bits, added back as ``corr * rowsum``."""
        bitlayers = self.check_bitlayers(bitlayers)
        if self.codebook == "bipolar":
            return 0.0
        return (2.0 ** (self.bits - bitlayers) - 1.0) / 2.0

    def max_abs_accumulator(self, k_dim: int) -> int:
        """Bound on ``|acc|`` for a K of ``k_dim`` (weights and activations at full scale)."""
        wmax = 2**self.bits if self.codebook == "offset_binary" else max(2 ** (self.bits - 1), 1)
        return int(k_dim) * (wmax + 1) * 2 ** (self.act_bits - 1)

    def accumulator_dtype(self, k_dim: int) -> str:
        """``"int32"`` when the exact product cannot overflow it, else ``"int64"``."""
        return "int32" if self.max_abs_accumulator(k_dim) < 2**31 else "int64"

    # ------------------------------------------------------------------ identity
    @property
    def name(self) -> str:
        """Short name such as ``w4a8`` (``w4a8-NkW`` for the non-default layout, ``w4a8o`` for
        offset binary)."""
        base = f"w{self.bits}a{self.act_bits}" + ("o" if self.codebook == "offset_binary" else "")
        return base if self.layout == LAYOUTS[0] else f"{base}-{self.layout}"

    @property
    def label(self) -> str:
        """Readable description for people, e.g. ``W4A8 offset_binary kNW`` (reprs, ``pbtvm inspect``)."""
        return f"W{self.bits}A{self.act_bits} {self.codebook} {self.layout}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; :meth:`from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BitplaneFormat:
        """Build from :meth:`to_dict` output, validating every field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"unknown bitplane format fields: {sorted(unknown)}")
        return cls(**data)


def _twos_complement_coefficients(nbits: int) -> tuple[int, ...]:
    return tuple((-1 if p == 0 else 1) * 2 ** (nbits - 1 - p) for p in range(nbits))


#: Named presets; tests parametrize over them.
PRESETS: dict[str, BitplaneFormat] = {
    "w1a8": BitplaneFormat(1, 8),
    "w2a8": BitplaneFormat(2, 8),
    "w3a8": BitplaneFormat(3, 8),
    "w4a8": BitplaneFormat(4, 8),
    "w4a8-NkW": BitplaneFormat(4, 8, layout="NkW"),
    "w8a8": BitplaneFormat(8, 8),
    "w4a16": BitplaneFormat(4, 16),
    "w16a16": BitplaneFormat(16, 16),
    "w1a8o": BitplaneFormat(1, 8, "offset_binary"),
    "w2a8o": BitplaneFormat(2, 8, "offset_binary"),
    "w3a8o": BitplaneFormat(3, 8, "offset_binary"),
    "w4a8o-NkW": BitplaneFormat(4, 8, "offset_binary", layout="NkW"),
    "w16a16o": BitplaneFormat(16, 16, "offset_binary"),
}
