"""Weight bitplanes -> byte codes with AVX-512 byte unpacks and GFNI bit transposes, 512 inputs at once.

The AVX-512 PB kernel (:mod:`pbtvm.ops.pb_vnni`) multiplies unsigned byte weight codes with int8
activation codes (``vpdpbusd``). Its weights stay in the format's ``kNW`` planes (the same Relax
constant every PB kernel reads, so ``bitlayers`` still reads fewer bytes); a *block* of 512 inputs
of one output row is decoded from one 64-byte load per kept plane:

1. **interleave**: in-lane byte/word/dword unpacks (``vpunpck*``) put the ``G`` plane bytes of the
   same 8 inputs side by side, ``G = 1, 2, 4, 8`` for ``bits = 1, 2, 3..4, 5..8`` (absent planes,
   ``bitlayers < bits`` or ``bits < G``, are zero); each qword then holds ``8 / G`` *slots*, a slot
   being ``G`` plane bytes of 8 inputs;
2. **transpose**: ``vgf2p8affineqb`` with the plane qword as its matrix turns each qword's 8x8 bit
   matrix around, so byte ``j`` of a qword gathers bit ``j`` of its 8 bytes: per slot, the ``G``
   plane bits of input ``8 b + j``, plane ``p`` of slot ``s`` at bit ``7 - s G - p``; the sign
   plane of two's complement is inverted in the same instruction (its immediate);
3. **extract**: one more ``vgf2p8affineqb`` per slot (a constant bit matrix) moves the slot's field
   to the top of the byte and clears the rest.

Each resulting byte is ``2^(8 - bits) * u`` with ``u`` the unsigned code of the kept planes, MSB
plane first (see :func:`code_scale`). The bytes come out in a fixed order of the block's inputs
(:func:`block_permutation`); the kernel stores its activation codes in that order once per call.
Instructions per 64 weights, loads included: 1.25 (bits 1), 1.75 (bits 2), 3 (bits 3-4), 5
(bits 5-8); the masked-add decode takes ``2 bits``.

The same steps run on 32-byte ymm vectors (``width=32``; the VEX ``vgf2p8affineqb`` of CPUs with
GFNI but no AVX-512, Intel client cores from Alder Lake on): a block is then decoded as two
halves of 256 inputs, one 32-byte load per kept plane each, twice the instructions per weight.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from .._tvm import tir
from ..bitplane import BitplaneFormat

__all__ = [
    "BLOCK",
    "BLOCK_WORDS",
    "CPU_FEATURES",
    "WIDTHS",
    "block_permutation",
    "code_scale",
    "decode_block",
    "group_size",
]

#: Inputs per block: one 64-byte load (16 packed words) per plane (two 32-byte ones on ymm).
BLOCK = 512
BLOCK_WORDS = BLOCK // 32
#: Vector widths in bytes the decode runs at: zmm (AVX-512) and ymm (AVX + GFNI).
WIDTHS = (64, 32)
#: LLVM CPU feature of ``vgf2p8affineqb``.
CPU_FEATURES = ("gfni",)
#: ``x`` operand of the transpose: byte ``j`` selects bit ``j`` of every matrix byte.
_SELECT_BIT_J = 0x8040201008040201


def group_size(bits: int) -> int:
    """Plane bytes side by side per slot: the next power of two >= ``bits`` (at most 8)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"the GFNI decode handles 1..8 weight planes, got {bits}")
    return 1 << (bits - 1).bit_length()


def code_scale(fmt: BitplaneFormat) -> tuple[int, int]:
    """``(shift, factor)`` with ``sum_k u x = factor * (sum_k byte x >> shift)`` exactly.

    ``u`` is the masked-add decode's unsigned code ``sum_i |c_i| b_i`` (plane 0 inverted for two's
    complement); a decoded byte is ``2^(7 - p)`` per set plane ``p``, i.e. ``2^(8 - bits) u / |c|``
    with ``|c| = 2`` for bipolar weights and 1 otherwise.
    """
    return 8 - fmt.bits, 2 if fmt.codebook == "bipolar" else 1


def byte_coefficients(fmt: BitplaneFormat) -> list[int]:
    """Per plane, the byte it adds to a decoded code: ``2^(7 - p)`` (the scale of :func:`code_scale`)."""
    return [1 << (7 - p) for p in range(fmt.bits)]


def _unpack_indices(elem: int, high: bool, width: int = 64) -> list[int]:
    """Byte indices into ``concat(a, b)`` of ``vpunpck{l,h}`` on ``elem``-byte elements (in-lane)
    of two ``width``-byte vectors."""
    per = 16 // elem
    out = []
    for lane in range(width // 16):
        for i in range(per // 2):
            for src in range(2):
                e = lane * per + i + (per // 2 if high else 0)
                out.extend(src * width + e * elem + byte for byte in range(elem))
    return out


def _interleave(vectors: list, elem: int, unpack) -> list:
    """Recursively unpack ``G`` plane vectors into ``G`` vectors of ``G``-byte plane groups."""
    if len(vectors) == 1:
        return vectors
    half = len(vectors) // 2
    left = _interleave(vectors[:half], elem, unpack)
    right = _interleave(vectors[half:], elem, unpack)
    size = elem * half
    return [v for a, b in zip(left, right, strict=True) for v in (unpack(a, b, size, False), unpack(a, b, size, True))]


@cache
def block_permutation(bits: int, width: int = 64) -> np.ndarray:
    """int64 [64]: the block's decoded bytes in order (:func:`decode_block`'s code vectors one
    after another, on ymm the second half's after the first's), qword ``q`` holds inputs
    ``8 perm[q] .. 8 perm[q] + 7`` of the block (in byte order)."""
    if width not in WIDTHS:
        raise ValueError(f"the GFNI decode runs on {WIDTHS}-byte vectors, not {width}")
    g = group_size(bits)
    labels = [np.arange(width) for _ in range(g)]  # byte b of every plane vector: input byte b

    def unpack(a, b, size, high):
        return np.concatenate([a, b])[_unpack_indices(size, high, width)]

    mixed = _interleave(labels, 1, unpack)
    qwords = width // 8  # per vector
    half = np.empty(len(mixed) * (8 // g) * qwords, np.int64)
    for v, vec in enumerate(mixed):
        for s in range(8 // g):
            for q in range(qwords):
                half[(v * (8 // g) + s) * qwords + q] = vec[8 * q + s * g]
    return np.concatenate([half + h * width for h in range(64 // width)])  # input bytes of half h


def _affine(x: tir.PrimExpr, matrix: tir.PrimExpr, imm: int, width: int) -> tir.PrimExpr:
    name = f"llvm.x86.vgf2p8affineqb.{8 * width}"
    return tir.call_llvm_pure_intrin(f"uint8x{width}", name, x, matrix, tir.const(imm, "uint8"))


def _bytes_of(value: int, width: int) -> tir.PrimExpr:
    """uint8 x ``width``: the little-endian bytes of a 64-bit ``value``, in every qword."""
    signed = value - (1 << 64) if value >= 1 << 63 else value  # TIR constants are int64
    return tir.reinterpret(f"uint8x{width}", tir.Broadcast(tir.const(signed, "int64"), width // 8))


def _extract_matrix(g: int, slot: int) -> int:
    """Bit matrix whose affine map gives ``(t << slot g) & top g bits`` (the slot's field, on top)."""
    matrix = 0
    for i in range(8 - g, 8):  # output bit i = input bit i - slot g
        matrix |= (1 << (i - slot * g)) << (8 * (7 - i))
    return matrix


def decode_block(
    fmt: BitplaneFormat, planes: list[tir.PrimExpr | None], bind=None, width: int = 64
) -> list[tir.PrimExpr]:
    """The 8 uint8 x ``width`` code vectors of one block (on ymm: of one half-block) of one row.

    Parameters
    ----------
    fmt : BitplaneFormat
        Weight format (1..8 bits).
    planes : list of (uint8 x ``width`` PrimExpr or None), length ``fmt.bits``
        The block's (half-block's) ``width`` bytes of each plane, MSB plane first; None for planes
        left out (``bitlayers``); plane 0 must be present.
    bind : callable, optional
        ``bind(value) -> PrimExpr`` materialises an intermediate vector once (``T.Bind``, a
        bound variable); without it every result repeats the shared unpack and transpose trees, which
        TVM's and LLVM's common-subexpression passes then take minutes to merge.
    width : int
        Vector bytes, one of :data:`WIDTHS`.

    Returns
    -------
    list of uint8 x ``width`` PrimExpr
        Code vector ``c`` holds, in qword ``q``, inputs ``8 perm[c width / 8 + q] + j`` at byte
        ``j`` (:func:`block_permutation`; on ymm the first half's), each ``2^(7-p)`` per kept set
        plane ``p`` (sign plane inverted for two's complement).
    """
    g = group_size(fmt.bits)
    if len(planes) != fmt.bits or planes[0] is None:
        raise ValueError("decode_block needs one entry per plane and the MSB plane")
    bind = bind or (lambda value: value)
    planes = [None if p is None else bind(p) for p in planes]
    if width not in WIDTHS:
        raise ValueError(f"the GFNI decode runs on {WIDTHS}-byte vectors, not {width}")
    zero = tir.Broadcast(tir.const(0, "uint8"), width)

    def unpack(a, b, size, high):
        if a is None and b is None:
            return None
        idx = [tir.const(i, "int32") for i in _unpack_indices(size, high, width)]
        return bind(tir.Shuffle([zero if a is None else a, zero if b is None else b], idx))

    mixed = _interleave([*planes, *([None] * (g - fmt.bits))], 1, unpack)
    flip = sum(1 << (7 - s * g) for s in range(8 // g)) if fmt.weight_signed else 0
    out = []
    for vec in mixed:
        turned = bind(_affine(_bytes_of(_SELECT_BIT_J, width), vec, flip, width))
        if g == 8:
            out.append(turned)
        else:
            out.extend(_affine(turned, _bytes_of(_extract_matrix(g, s), width), 0, width) for s in range(8 // g))
    return out
