"""Vectorized bit packing: whole arrays of variable-width fields in, bytes out, and back.

Fields are written most significant bit first. Exp-Golomb codes are split into a unary-length
section and a suffix section so that both halves can be packed and parsed without a Python loop
per value (a plain interleaved Exp-Golomb stream can only be parsed one code at a time).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .errors import ErrorCode, ProtocolError

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]

#: Longest Exp-Golomb code length prefix accepted when parsing (values below 2**40).
MAX_CODE_BITS = 41


def zigzag(values: npt.ArrayLike) -> U64:
    """Signed to unsigned: 0, -1, 1, -2, 2 ... become 0, 1, 2, 3, 4 ..."""
    v = np.asarray(values, dtype=np.int64)
    return ((v << 1) ^ (v >> 63)).astype(np.uint64)


def unzigzag(values: npt.ArrayLike) -> I64:
    """Inverse of :func:`zigzag`."""
    u = np.asarray(values, dtype=np.uint64)
    return ((u >> np.uint64(1)).astype(np.int64)) ^ -((u & np.uint64(1)).astype(np.int64))


def bit_length(values: U64) -> npt.NDArray[np.int64]:
    """Number of bits needed for each value (0 for 0); exact below 2**53."""
    _, exp = np.frexp(np.asarray(values, dtype=np.float64))
    return exp.astype(np.int64)


def exp_golomb_fields(
    unsigned: npt.ArrayLike,
) -> tuple[U64, npt.NDArray[np.int64], U64, npt.NDArray[np.int64]]:
    """Order-0 Exp-Golomb codes, split: (prefix values, prefix widths, suffix values, widths).

    The code of ``u`` is ``u + 1`` in ``2 * L - 1`` bits, ``L`` its bit length: ``L - 1`` zeros,
    a one, then the low ``L - 1`` bits. The prefix is the zeros and the one, the suffix the rest.
    """
    v = np.asarray(unsigned, dtype=np.uint64).ravel() + np.uint64(1)
    length = bit_length(v)
    suffix = v - (np.uint64(1) << (length - 1).astype(np.uint64))
    return np.ones(v.shape, dtype=np.uint64), length, suffix, length - 1


def pack_bits(values: U64, widths: npt.NDArray[np.int64]) -> bytes:
    """Each value in its width, most significant bit first, zero-padded to whole bytes.

    Works per field, not per bit: each field is shifted into place within a 64-bit word (and
    the next one, if it crosses), and the fields of a word are summed (their bits never overlap,
    so the sum is their OR). Widths must be at most 57 bits and values must fit their widths.
    """
    if values.size == 0:
        return b""
    values = np.asarray(values, dtype=np.uint64)
    widths = np.asarray(widths, dtype=np.int64)
    ends = np.cumsum(widths)
    total = int(ends[-1])
    if total == 0:
        return b""
    starts = ends - widths
    word = starts >> 6
    room = 64 - (starts & 63)  # bits left in the field's first word
    over = widths - room  # > 0: bits spilling into the next word
    fits = over <= 0
    left = np.where(fits, -over, 0).astype(np.uint64)
    right = np.where(fits, 0, over).astype(np.uint64)
    head = (values >> right) << left
    out = np.zeros(int(word[-1]) + 2, dtype=np.uint64)
    first = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])
    out[word[first]] = np.add.reduceat(head, first)
    spill = np.flatnonzero(~fits)
    if spill.size:
        # At most one field crosses each word boundary, so these targets are distinct.
        out[word[spill] + 1] += values[spill] << (64 - right[spill])
    return out.astype(">u8").tobytes()[: (total + 7) // 8]


class BitReader:
    """Reads sections back from a packed bit string; every read is checked against the length."""

    __slots__ = ("_bits", "_pos")

    def __init__(self, data: bytes | memoryview) -> None:
        self._bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
        self._pos = 0

    @property
    def remaining(self) -> int:
        return int(self._bits.size - self._pos)

    def _take(self, n: int) -> npt.NDArray[np.uint8]:
        if n < 0 or n > self.remaining:
            raise ProtocolError(ErrorCode.MALFORMED, "bit stream truncated")
        out = self._bits[self._pos : self._pos + n]
        self._pos += n
        return out

    def fixed(self, count: int, width: int) -> U64:
        """Read ``count`` values of ``width`` bits each."""
        if count == 0:
            return np.zeros(0, dtype=np.uint64)
        bits = self._take(count * width).reshape(count, width).astype(np.uint64)
        weights = np.uint64(1) << np.arange(width - 1, -1, -1, dtype=np.uint64)
        values: npt.NDArray[np.uint64] = (bits * weights).sum(axis=1, dtype=np.uint64)
        return values

    def exp_golomb_lengths(self, count: int) -> npt.NDArray[np.int64]:
        """Read ``count`` unary prefixes; return each code's suffix width."""
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        ones = np.flatnonzero(self._bits[self._pos :])
        if ones.size < count:
            raise ProtocolError(ErrorCode.MALFORMED, "bit stream truncated in code lengths")
        ends = ones[:count]
        widths = np.diff(ends, prepend=-1) - 1
        if int(widths.max()) >= MAX_CODE_BITS:
            raise ProtocolError(ErrorCode.MALFORMED, "code too long")
        self._pos += int(ends[-1]) + 1
        return widths.astype(np.int64)

    def fields(self, widths: npt.NDArray[np.int64]) -> U64:
        """Read one value per width."""
        n = widths.size
        if n == 0:
            return np.zeros(0, dtype=np.uint64)
        total = int(widths.sum())
        bits = self._take(total).astype(np.float64)
        owner = np.repeat(np.arange(n), widths)
        starts = np.cumsum(widths) - widths
        pos = np.arange(total, dtype=np.int64) - starts[owner]
        weight = np.exp2((widths[owner] - 1 - pos).astype(np.float64))
        # Values stay below 2**41, so float64 sums are exact.
        return np.bincount(owner, weights=bits * weight, minlength=n).astype(np.uint64)

    def exp_golomb_values(self, widths: npt.NDArray[np.int64]) -> U64:
        """Read the suffixes of codes whose lengths came from :meth:`exp_golomb_lengths`."""
        suffix = self.fields(widths)
        return suffix + (np.uint64(1) << widths.astype(np.uint64)) - np.uint64(1)

    def check_padding(self) -> None:
        """The rest must be fewer than 8 zero bits."""
        rest = self._bits[self._pos :]
        if rest.size >= 8 or rest.any():
            raise ProtocolError(ErrorCode.MALFORMED, "trailing data after bit stream")
