"""Sub-byte packing of the dtype codes with fewer than 8 bits (FORMAT.md section 4, [T11]).

numpy (through ml_dtypes) holds an int4, float6 or uint1 element in a whole byte, its value in the
low ``bits`` bits. A file holds them packed: N elements are a stream of ``N * bits`` bits, element
``k`` at stream bits ``[k * bits, (k + 1) * bits)``, stream bit ``j`` being bit ``j % 8`` of byte
``j // 8`` (least significant bit first: for 4-bit types element 0 is the low nibble of byte 0). The
unused high bits of the last byte are zero [T11]. Both directions are vectorised numpy: one pass
per element slot of a group (``8 / bits`` elements per byte, or 4 elements per 3 bytes for 6 bits).

Example:
    >>> import ml_dtypes, numpy as np
    >>> from safeckpt.packing import pack, unpack
    >>> x = np.array([1, -2, 7], ml_dtypes.int4)
    >>> pack(x, 27).tolist()  # 0x1 | 0xE << 4, then 0x7 and four zero bits
    [225, 7]
    >>> unpack(pack(x, 27), 27, (3,), "x").tolist()
    [1, -2, 7]
"""

from __future__ import annotations

import math
from typing import Tuple, Union

import numpy as np

from .dtypes import (BITS_BY_CODE, NAME_BY_CODE, PACKED_CODES, nbytes_of, numpy_dtype,
                     to_little_endian)
from .errors import LayoutError

Raw = Union[np.ndarray, bytes, bytearray, memoryview]
# The packed float codes (float6_e2m3fn, float6_e3m2fn, float4_e2m1fn): ml_dtypes gives a byte
# with bits set above the element's a value of its own (0x40 as float6_e2m3fn is -0.0), so such a
# byte is packed as the canonical byte of that value. Integers are their low bits, whatever the
# rest (ml_dtypes' int4 negation sets the high ones).
_FLOAT_CODES = frozenset(code for code in PACKED_CODES if NAME_BY_CODE[code].startswith("float"))


def _group(bits: int) -> Tuple[int, int]:
    """``(elements, bytes)`` of the smallest whole-byte group of ``bits``-bit elements."""
    span = math.lcm(bits, 8)
    return span // bits, span // 8


def pack(array: np.ndarray, code: int) -> np.ndarray:
    """The bytes a file holds for ``array`` as dtype ``code``: 1-D uint8, C order.

    For a packed code (bits < 8) each element's canonical byte (its value's, with no bit set
    above ``bits``) gives its ``bits`` bits of the stream, and the padding bits are zero [T11]; for
    any other code these are the array's little-endian bytes.

    Parameters:
        array: an array of the code's numpy dtype (any layout, any byte order).
        code: its dtype code.

    Returns:
        A new or viewed uint8 array of ``nbytes_of(code, array.size)`` bytes.

    Example:
        >>> import ml_dtypes
        >>> pack(np.array([1, 0, 1], ml_dtypes.uint1), 32).tolist()
        [5]
    """
    if code not in PACKED_CODES:
        flat = np.ascontiguousarray(to_little_endian(np.asarray(array))).reshape(-1)
        return flat.view(np.uint8)
    bits = BITS_BY_CODE[code]
    count = int(np.asarray(array).size)
    per_group, group_bytes = _group(bits)
    groups = -(-count // per_group)
    flat = np.ascontiguousarray(array).reshape(-1)
    values = np.zeros(groups * per_group, np.uint8)
    values[:count] = flat.view(np.uint8)
    mask = (1 << bits) - 1
    if code in _FLOAT_CODES:  # a float whose byte has high bits set (ml_dtypes reads them)
        odd = np.flatnonzero(values[:count] > mask)
        if len(odd):  # its value, as ml_dtypes reads it, in its canonical byte
            values[odd] = flat[odd].astype(np.float32).astype(flat.dtype).view(np.uint8)
    values &= mask  # an integer's value is its low bits (arithmetic may set the others)
    slots = values.reshape(groups, per_group)
    out = np.zeros((groups, group_bytes), np.uint8)
    for slot in range(per_group):
        first, shift = divmod(slot * bits, 8)
        out[:, first] |= slots[:, slot] << np.uint8(shift)
        if shift + bits > 8:  # the element runs into the next byte (6-bit types)
            out[:, first + 1] |= slots[:, slot] >> np.uint8(8 - shift)
    return out.reshape(-1)[:nbytes_of(code, count)]


def unpack(raw: Raw, code: int, shape: Tuple[int, ...], name: str) -> np.ndarray:
    """A fresh array of dtype ``code`` and ``shape`` from the bytes a file holds for it.

    Parameters:
        raw: exactly ``nbytes_of(code, prod(shape))`` bytes (already checked against [T5]).
        code: the tensor's dtype code.
        shape: the tensor's shape (``()`` is one element).
        name: the tensor's name, for messages.

    Returns:
        A new C-ordered array of the code's numpy dtype, owning no file memory.

    Raises:
        LayoutError: ``raw`` has the wrong length, or a padding bit of the last byte is set [T11].
        UnsupportedDtypeError: the installed ml_dtypes lacks the code's type.

    Example:
        >>> unpack(b"\\x01\\x00", 9, (), "h").view(np.uint16).tolist()
        1
    """
    dtype = numpy_dtype(code, name)
    count = math.prod(shape)
    size = nbytes_of(code, count)
    data = np.frombuffer(raw, np.uint8)
    if data.size != size:
        raise LayoutError(f"tensor {name!r}: {data.size} bytes for {count} elements of "
                          f"{dtype} (needs {size}) [T5]")
    if code not in PACKED_CODES:
        return data.view(dtype).reshape(shape).copy()
    bits = BITS_BY_CODE[code]
    used = count * bits % 8
    if used and data[-1] >> used:
        raise LayoutError(f"tensor {name!r}: the unused high bits of its last byte are "
                          f"{int(data[-1]) >> used:#x}, not zero [T11]")
    per_group, group_bytes = _group(bits)
    groups = -(-count // per_group)
    padded = np.zeros(groups * group_bytes, np.uint8)
    padded[:size] = data
    rows = padded.reshape(groups, group_bytes)
    slots = np.empty((groups, per_group), np.uint8)
    mask = np.uint8((1 << bits) - 1)
    for slot in range(per_group):
        first, shift = divmod(slot * bits, 8)
        value = rows[:, first] >> np.uint8(shift)
        if shift + bits > 8:
            value |= rows[:, first + 1] << np.uint8(8 - shift)
        np.bitwise_and(value, mask, out=slots[:, slot])
    return slots.reshape(-1)[:count].view(dtype).reshape(shape)
