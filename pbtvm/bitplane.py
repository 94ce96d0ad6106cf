"""The PrecisionBatching bitplane format: one frozen dataclass and its numpy reference.

This module is the single source of truth for how quantized integers become binary planes and
back. Every other file (TE operators, schedules, the Relax pass, the runtime) reads plane
counts, plane coefficients, word sizes and layouts from :class:`BitplaneFormat`.

Maths
-----
A k-bit weight code ``q`` is stored as k binary planes ``b_0 .. b_{k-1}`` (plane 0 is the most
significant, "MSB first") so that ``q = sum_i c_i * b_i + offset`` where

* ``twos_complement`` (k >= 2): ``c = (-2^(k-1), 2^(k-2), ..., 2, 1)``, ``offset = 0``;
* ``bipolar`` (k == 1): ``q = 2*b - 1``, i.e. ``c = (2,)``, ``offset = -1``;
* ``offset_binary`` (any k): unsigned ``q in 0..2^k-1``, ``c = (2^(k-1), ..., 2, 1)``,
  ``offset = 0``, and the weight is ``w ~= s[n] * (q - z[n])`` with a per-row float zero point
  ``z`` (:attr:`BitplaneFormat.has_zero_point`). All ``2^k`` levels are used (two's complement
  uses ``2^k - 1``, the symmetric ones), and the grid may sit off-centre.

Activations use two's complement with ``act_bits`` planes and coefficients ``d_j``. The exact
integer product of one weight row ``n`` and one activation row ``b`` is then::

    acc[b, n] = sum_i sum_j c_i d_j popcount(W_i[n, :] & X_j[b, :]) + offset * rowsum[b]
    rowsum[b] = sum_j d_j popcount(X_j[b, :]) = sum_k xq[b, k]

The zero point costs one float term in the epilogue, ``-z[n] * rowsum[b]``, so every kernel stays
a plane product: ``sum_k s (q - z) x = s (acc - z rowsum)``.

Keeping only the top ``bitlayers`` weight planes (the run-time precision knob) zeroes the low
``k - bitlayers`` bits of every weight; their expected value, ``(2^(k-L) - 1) / 2`` per weight
(the dropped bits are ``sum_{p<k-L} 2^p b_p`` with non-negative coefficients in both two's
complement and offset binary; each bit 0 or 1 with mean 1/2) is added back as
``correction * rowsum`` in the float epilogue. Bipolar has no lower planes to drop.

Planes are packed along K into little-endian uint32 words: bit ``t`` of word ``w`` holds element
``32*w + t``. K is zero-padded to a multiple of 32; padded bits are 0 in both operands.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "LAYOUTS",
    "PRESETS",
    "BitplaneFormat",
    "pack_planes",
    "unpack_planes",
    "pack_weights",
    "unpack_weights",
    "pack_activations",
    "bitplane_matmul",
    "plane_rowsum",
    "mma_tile_index",
]

#: Bumped whenever the meaning of packed bytes changes; stored in every manifest and tuning key.
FORMAT_VERSION = 1
#: Bits per packed word.
WORD_BITS = 32
#: Weight-plane memory layouts a schedule may choose. ``kNW``: ``[planes, N, words]`` (a plane is
#: contiguous, so dropping planes reads fewer bytes); ``NkW``: ``[N, planes, words]`` (a row's
#: planes are contiguous); ``mma16x256``: each plane cut into 16-row x 256-bit tiles stored in the
#: A-fragment order of ``mma.m16n8k256.b1`` (see :func:`mma_tile_index`), shape
#: ``[planes, ceil(N/16), ceil(words/8), 32 lanes, 4]``: a warp loads a tile as one 16-byte load
#: per lane. Rows and words are zero-padded to whole tiles.
LAYOUTS = ("kNW", "NkW", "mma16x256")
#: Rows x words of one ``mma16x256`` tile (16 rows x 256 bits).
MMA_TILE_ROWS, MMA_TILE_WORDS = 16, 8
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
        _check_int("bits", self.bits, 1, 16)
        _check_int("act_bits", self.act_bits, 2, 16)
        if self.codebook is None:
            object.__setattr__(self, "codebook", "bipolar" if self.bits == 1 else "twos_complement")
        if self.codebook not in CODEBOOKS:
            raise ValueError(f"codebook must be one of {CODEBOOKS}, got {self.codebook!r}")
        if self.codebook == "bipolar" and self.bits != 1:
            raise ValueError(f"the bipolar codebook is for bits=1, got bits={self.bits}")
        if self.codebook == "twos_complement" and self.bits < 2:
            raise ValueError("bits=1 needs the bipolar codebook (two's complement has no 1-bit code)")
        if self.word_dtype != "uint32":
            raise ValueError(f"word_dtype must be 'uint32', got {self.word_dtype!r}")
        if self.pack_axis != "K":
            raise ValueError(f"pack_axis must be 'K', got {self.pack_axis!r}")
        if self.plane_order != "msb_first":
            raise ValueError(f"plane_order must be 'msb_first', got {self.plane_order!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.version != FORMAT_VERSION:
            raise ValueError(
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
        if self.layout == "mma16x256":
            tiles_k = -(-self.words(k_dim) // MMA_TILE_WORDS)
            return (self.bits, -(-int(n) // MMA_TILE_ROWS), tiles_k, 32, 4)
        return (n, self.bits, self.words(k_dim))

    def weight_index(self, plane: Any, row: Any, word: Any) -> tuple[Any, Any, Any]:
        """Index of (plane, row, word) in the packed weight array; works for ints and TIR vars."""
        if self.layout == "kNW":
            return (plane, row, word)
        if self.layout == "mma16x256":
            return (plane, *mma_tile_index(row, word))
        return (row, plane, word)

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
        _check_int("bitlayers", bitlayers, 1, self.bits)
        return int(bitlayers)

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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; :meth:`from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BitplaneFormat:
        """Build from :meth:`to_dict` output, validating every field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown bitplane format fields: {sorted(unknown)}")
        return cls(**data)


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int in {lo}..{hi}, got {value!r}")
    if not lo <= int(value) <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {value}")


def _twos_complement_coefficients(nbits: int) -> tuple[int, ...]:
    return tuple((-1 if p == 0 else 1) * 2 ** (nbits - 1 - p) for p in range(nbits))


def mma_tile_index(row: Any, word: Any) -> tuple[Any, Any, Any, Any]:
    """Where (row, word) of a plane lives in the ``mma16x256`` layout: (tile_m, tile_k, lane, reg).

    The A fragment of ``mma.sync.m16n8k256.row.col.b1``: lane ``l`` holds in register ``r`` the
    word ``4 * (r // 2) + l % 4`` of tile row ``l // 4 + 8 * (r % 2)``. Works for ints and TIR.
    """
    r16, w8 = row % MMA_TILE_ROWS, word % MMA_TILE_WORDS
    return (row // MMA_TILE_ROWS, word // MMA_TILE_WORDS, 4 * (r16 % 8) + w8 % 4, r16 // 8 + 2 * (w8 // 4))


def _to_mma_tiles(planes: np.ndarray) -> np.ndarray:
    """``[p, N, W]`` planes -> ``[p, ceil(N/16), ceil(W/8), 32, 4]`` (zero-padded tiles)."""
    p, n, w = planes.shape
    tn, tk = -(-n // MMA_TILE_ROWS), -(-w // MMA_TILE_WORDS)
    padded = np.zeros((p, tn * MMA_TILE_ROWS, tk * MMA_TILE_WORDS), np.uint32)
    padded[:, :n, :w] = planes
    # row = 16 tm + 8 rh + rl, word = 8 tk + 4 wh + wl  ->  [p, tm, tk, lane = 4 rl + wl, reg = rh + 2 wh]
    t = padded.reshape(p, tn, 2, 8, tk, 2, 4).transpose(0, 1, 4, 3, 6, 5, 2)
    return np.ascontiguousarray(t.reshape(p, tn, tk, 32, 4))


def _from_mma_tiles(tiles: np.ndarray, n_rows: int | None) -> np.ndarray:
    """Invert :func:`_to_mma_tiles`: ``[p, N, W_padded]`` planes (rows cut to ``n_rows``)."""
    if n_rows is None:
        raise ValueError("the mma16x256 layout pads rows to 16: pass n_rows (the layer's N)")
    tiles = np.asarray(tiles, np.uint32)
    p, tn, tk = tiles.shape[:3]
    if tiles.shape[3:] != (32, 4) or not 0 < n_rows <= tn * MMA_TILE_ROWS:
        raise ValueError(f"mma16x256 weights of shape {tiles.shape} cannot hold {n_rows} rows")
    t = tiles.reshape(p, tn, tk, 8, 4, 2, 2).transpose(0, 1, 6, 3, 2, 5, 4)
    return t.reshape(p, tn * MMA_TILE_ROWS, tk * MMA_TILE_WORDS)[:, :n_rows]


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


# ====================================================================== numpy reference
def pack_planes(codes: np.ndarray, nbits: int) -> np.ndarray:
    """Pack the low ``nbits`` bits of integer codes into MSB-first uint32 planes.

    Parameters
    ----------
    codes : np.ndarray, int, shape [R, K]
        Integers whose low ``nbits`` bits are stored (two's complement bits for negatives).
    nbits : int
        Number of planes.

    Returns
    -------
    np.ndarray, uint32, shape [nbits, R, ceil(K / 32)]
        Bit ``t`` of word ``w`` of plane ``p`` is bit ``nbits - 1 - p`` of ``codes[r, 32 w + t]``.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be a 2-D integer array, got {codes.dtype} {codes.shape}")
    rows, k_dim = codes.shape
    kw = BitplaneFormat.words(k_dim)
    u = codes.astype(np.int64, copy=False)
    out = np.empty((nbits, rows, kw), np.uint32)
    bits = np.zeros((rows, kw * WORD_BITS), np.uint8)
    for p in range(nbits):  # one plane at a time keeps memory at O(rows * K) bytes
        bits[:, :k_dim] = (u >> (nbits - 1 - p)) & 1
        out[p] = np.packbits(bits, axis=1, bitorder="little").view("<u4").reshape(rows, kw)
    return out


def unpack_planes(planes: np.ndarray, k_dim: int, signed: bool) -> np.ndarray:
    """Invert :func:`pack_planes`: ``[nbits, R, W]`` uint32 -> ``[R, k_dim]`` int64 codes."""
    planes = np.asarray(planes, dtype=np.uint32)
    nbits = planes.shape[0]
    bits = (planes[..., None] >> np.arange(WORD_BITS, dtype=np.uint32)) & 1
    bits = bits.reshape(nbits, planes.shape[1], -1)[:, :, :k_dim].astype(np.int64)
    value = np.zeros(bits.shape[1:], np.int64)
    for p in range(nbits):
        value = (value << 1) | bits[p]
    if signed:
        value = np.where(value >= 2 ** (nbits - 1), value - 2**nbits, value)
    return value


def pack_weights(q: np.ndarray, fmt: BitplaneFormat) -> np.ndarray:
    """Pack weight codes ``q`` ``[N, K]`` (int) into ``fmt.weight_shape(N, K)`` uint32 planes."""
    q = np.asarray(q)
    if q.ndim != 2:
        raise ValueError(f"weight codes must be [N, K], got shape {q.shape}")
    lo, hi = fmt.weight_code_range
    if q.size and (q.min() < lo or q.max() > hi):
        raise ValueError(f"weight codes out of range [{lo}, {hi}] for {fmt.name}")
    if fmt.codebook == "bipolar":
        if np.any(q == 0):
            raise ValueError("bipolar weight codes must be -1 or +1")
        codes = (q > 0).astype(np.int64)
    else:
        codes = q
    planes = pack_planes(codes, fmt.bits)
    if fmt.layout == "mma16x256":
        return _to_mma_tiles(planes)
    return planes if fmt.layout == "kNW" else np.ascontiguousarray(planes.transpose(1, 0, 2))


def _plane_major(packed: np.ndarray, fmt: BitplaneFormat, n_rows: int | None) -> np.ndarray:
    """Packed weights of any layout as ``[bits, N, W]`` planes (W padded for ``mma16x256``)."""
    if fmt.layout == "mma16x256":
        return _from_mma_tiles(packed, n_rows)
    return np.asarray(packed) if fmt.layout == "kNW" else np.asarray(packed).transpose(1, 0, 2)


def unpack_weights(packed: np.ndarray, k_dim: int, fmt: BitplaneFormat, n_rows: int | None = None) -> np.ndarray:
    """Invert :func:`pack_weights`: packed planes -> ``[N, k_dim]`` int64 weight codes.

    ``n_rows`` (N) is needed by the ``mma16x256`` layout, whose rows are padded to 16.
    """
    planes = _plane_major(packed, fmt, n_rows)
    if fmt.codebook == "bipolar":
        return 2 * unpack_planes(planes, k_dim, signed=False) - 1
    return unpack_planes(planes, k_dim, signed=fmt.weight_signed)


def pack_activations(xq: np.ndarray, fmt: BitplaneFormat) -> np.ndarray:
    """Pack activation codes ``xq`` ``[B, K]`` into ``[act_bits, B, ceil(K/32)]`` uint32 planes."""
    return pack_planes(xq, fmt.act_bits)


def plane_rowsum(xp: np.ndarray, fmt: BitplaneFormat) -> np.ndarray:
    """``rowsum[b] = sum_j d_j popcount(X_j[b, :])`` = sum of the activation codes, int64 [B]."""
    d = np.array(fmt.act_plane_coefficients, np.int64)
    pc = np.bitwise_count(np.asarray(xp, np.uint32)).sum(-1, dtype=np.int64)  # [a, B]
    return (d[:, None] * pc).sum(0)


def bitplane_matmul(
    wp: np.ndarray, xp: np.ndarray, fmt: BitplaneFormat, bitlayers: int | None = None, n_rows: int | None = None
) -> np.ndarray:
    """Exact integer PB product from packed planes, as the kernels compute it.

    Parameters
    ----------
    wp : np.ndarray, uint32, shape ``fmt.weight_shape(N, K)``
        Packed weight planes.
    xp : np.ndarray, uint32, shape [act_bits, B, W]
        Packed activation planes.
    fmt : BitplaneFormat
    bitlayers : int, optional
        Accumulate only the top ``bitlayers`` weight planes (default: all).
    n_rows : int, optional
        N; needed by the ``mma16x256`` layout (rows padded to 16).

    Returns
    -------
    np.ndarray, int64, shape [B, N]
        ``sum_{i<L} sum_j c_i d_j popcount(W_i & X_j) + offset * rowsum``; with all planes this
        equals ``xq @ q.T`` exactly.
    """
    bitlayers = fmt.check_bitlayers(bitlayers)
    planes = _plane_major(np.asarray(wp, np.uint32), fmt, n_rows)
    xp = np.asarray(xp, np.uint32)
    if fmt.layout == "mma16x256":  # words padded to 8: the padding is zero, drop it
        planes = planes[:, :, : xp.shape[2]]
    if planes.shape[2] != xp.shape[2]:
        raise ValueError(f"word count mismatch: weights {planes.shape}, activations {xp.shape}")
    c = fmt.plane_coefficients(bitlayers)
    d = fmt.act_plane_coefficients
    acc = np.zeros((xp.shape[1], planes.shape[1]), np.int64)
    for i, ci in enumerate(c):
        for j, dj in enumerate(d):
            pc = np.bitwise_count(xp[j][:, None, :] & planes[i][None, :, :]).sum(-1, dtype=np.int64)
            acc += ci * dj * pc
    return acc + fmt.weight_offset * plane_rowsum(xp, fmt)[:, None]
