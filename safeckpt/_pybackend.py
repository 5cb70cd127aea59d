"""The pure-Python backend: the same names and error codes as the C core (``_native``).

``safeckpt._backend`` documents the interface. Every check returns ``(code, index)`` with the
codes of :class:`safeckpt.errors.Code`, and both backends find the same first failure for the
same input: the order of the checks below is part of the interface. Rule names such as [T6]
refer to docs/FORMAT.md.

Only numpy and the standard library are used. The table check screens every tensor at once with
numpy and runs the exact Python-int rules only on the tensors the screen flags, so a valid table
of 20,000 tensors costs a few numpy calls; the CRC lives in ``_pycrc32c``.

Example:
    >>> from safeckpt import _pybackend as backend
    >>> backend.parse_prefix(b"\\x89SCK\\n\\x1a\\n" + bytes(25), 100, 1 << 20)
    (<Code.MAGIC_TEXT: -3>, None)
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import struct
import sys
import weakref
from typing import Any, Sequence, Union

import numpy as np

from ._pycrc32c import crc32c
from .dtypes import BITS_BY_CODE, ITEMSIZE_BY_CODE, nbytes_of
from .errors import Code, error_for
from .format import (
    ALIGN_MAX,
    ALIGN_MIN,
    KNOWN_FLAGS,
    MAGIC,
    MAGIC_TEXT_MANGLED,
    PREFIX_SIZE,
    PREFIX_STRUCT,
    VERSION_MAJOR,
)

__all__ = [
    "NAME", "Mapping", "advise", "bytes_equal", "check_padding", "copy_into", "copy_many",
    "crc32c", "map_file", "parse_prefix", "read_into", "validate_table", "write_tensors",
]

NAME = "python"

Buffer = Any  # a C-contiguous bytes-like object: bytes, bytearray, memoryview, mmap, numpy array
Ints = Union[Sequence[int], np.ndarray]  # non-negative ints (offsets, lengths): a list or an array

WRITE_CHUNK = 8 << 20  # bytes written (and checksummed) per pwrite: bounds memory and latency
PAD_CHUNK = 1 << 20  # bytes of padding read per pread: bounds memory whatever a table claims
COMPARE_CHUNK = 1 << 20  # bytes compared per numpy call: bounds the temporary (1/8 of this)
_U64 = np.dtype("<u8")
_DIM_LIMIT = 1 << 63  # [T3] every dimension is below 2**63; [T4] so is the byte size
_SCREEN_LOG2 = 62.0  # screen: a product whose float log2 is below this is exactly below 2**63
_ITEMSIZES = np.array(ITEMSIZE_BY_CODE, dtype=_U64)  # numpy's: 1 for a packed code [T4]
_BITS = np.array(BITS_BY_CODE, dtype=_U64)  # in the file [T5]
_ADVICE = {
    "normal": "MADV_NORMAL",
    "sequential": "MADV_SEQUENTIAL",
    "willneed": "MADV_WILLNEED",
    "random": "MADV_RANDOM",
}


def _align_ok(align: int) -> bool:
    """[P7] ``align`` is a power of two in [ALIGN_MIN, ALIGN_MAX]."""
    return ALIGN_MIN <= align <= ALIGN_MAX and align & (align - 1) == 0


def _nbytes(buf: Buffer) -> int:
    return memoryview(buf).nbytes


def crc32c_ranges(buffer: Buffer, offsets: Ints, lengths: Ints) -> np.ndarray:
    """The CRC32C of each ``buffer[offsets[i]:offsets[i] + lengths[i]]``, as uint32 array.

    Raises:
        ValueError: the lists differ in length; SafeckptError (a ValueError): a range is not
            inside the buffer.
    """
    data = memoryview(buffer).cast("B")
    if len(offsets) != len(lengths):
        raise ValueError(f"crc32c_ranges: {len(offsets)} offsets, {len(lengths)} lengths")
    crcs = np.empty(len(offsets), np.uint32)
    for i, (offset, length) in enumerate(zip(map(int, offsets), map(int, lengths))):
        if offset + length > len(data):
            raise error_for(Code.ARG, "crc32c_ranges", f": range {i} ({length} bytes at {offset}) "
                            f"is not inside the {len(data)}-byte buffer")
        crcs[i] = crc32c(data[offset:offset + length])
    return crcs


def parse_prefix(prefix: Buffer, file_size: int, max_header_size: int
                 ) -> tuple[int, tuple[int, int, int, int, int, int] | None]:
    """Check [P1]-[P7] on the first ``min(32, file_size)`` bytes of a file.

    Returns:
        ``(Code.OK, (major, minor, flags, header_len, align, header_crc))``, or ``(code, None)``
        for the first rule broken. The header CRC [P8] is left to the caller.
    """
    if _nbytes(prefix) < PREFIX_SIZE or file_size < PREFIX_SIZE:
        return Code.TRUNCATED, None  # [P1]
    magic, major, minor, flags, header_len, align, header_crc = PREFIX_STRUCT.unpack_from(prefix)
    if magic != MAGIC:  # [P2]
        return (Code.MAGIC_TEXT if magic.startswith(MAGIC_TEXT_MANGLED) else Code.MAGIC), None
    if major != VERSION_MAJOR:
        return Code.VERSION, None  # [P3]
    if flags & ~KNOWN_FLAGS:
        return Code.FLAGS, None  # [P4]
    if header_len > max_header_size:
        return Code.HEADER_LIMIT, None  # [P5]
    if PREFIX_SIZE + header_len > file_size:
        return Code.TRUNCATED, None  # [P6]
    if not _align_ok(align):
        return Code.ALIGN, None  # [P7]
    return Code.OK, (major, minor, flags, header_len, align, header_crc)


def _check_tensor(dtype: int, ndim: int, shape: Buffer, start: int, offset: int, size: int,
                  prev_end: int, align: int, file_size: int, max_ndim: int) -> Code:
    """The first rule of [T1]-[T7] that one tensor breaks, with exact integers; OK if none.

    ``start`` is the index of its first dimension in the ``shape`` column (raw bytes).
    """
    if dtype >= len(ITEMSIZE_BY_CODE):
        return Code.DTYPE  # [T1]
    if ndim > max_ndim:
        return Code.NDIM  # [T2]
    if 8 * (start + ndim) > len(shape):
        return Code.COLUMN  # [H4] the shape column ends inside this tensor's dimensions
    dims = struct.unpack_from(f"<{ndim}Q", shape, 8 * start)
    if any(dim >= _DIM_LIMIT for dim in dims):
        return Code.DIM  # [T3]
    itemsize = ITEMSIZE_BY_CODE[dtype]
    if math.prod(dim for dim in dims if dim) * itemsize >= _DIM_LIMIT:
        return Code.TOO_LARGE  # [T4]
    if size != nbytes_of(dtype, math.prod(dims)):
        return Code.NBYTES  # [T5] ceil(count * bits / 8)
    if offset % align:
        return Code.MISALIGNED  # [T6]
    expected = -(-prev_end // align) * align
    if offset < expected:
        return Code.OVERLAP  # [T6]
    if offset > expected:
        return Code.GAP  # [T6]
    if offset + size > file_size:
        return Code.TENSOR_TRUNCATED  # [T7]
    return Code.OK


def _table_start(n: int, dtypes: Buffer, ndims: Buffer, offsets: Buffer, nbytes: Buffer,
                 header_end: int, align: int, file_size: int) -> Code:
    """The whole-table checks that come before any tensor; returns a code."""
    if not _align_ok(align):
        return Code.ALIGN
    if (len(dtypes), len(ndims), len(offsets), len(nbytes)) != (n, n, 8 * n, 8 * n):
        return Code.COLUMN  # [H4]
    if header_end > file_size:
        return Code.TRUNCATED
    return Code.OK


def _table_end(n: int, shape: Buffer, consumed: int, end: int, file_size: int
               ) -> tuple[Code, int]:
    """The checks after the last tensor: shape column fully used [H4], no trailing bytes [T8]."""
    if len(shape) > 8 * consumed:
        return Code.COLUMN, n
    if file_size != end:
        return Code.TRAILING, n
    return Code.OK, 0


def _validate_table_scalar(n: int, dtypes: Buffer, ndims: Buffer, shape: Buffer, offsets: Buffer,
                           nbytes: Buffer, header_end: int, align: int, file_size: int,
                           max_ndim: int) -> tuple[Code, int]:
    """``validate_table`` as one plain loop over the tensors: the reference of the rule order."""
    dtypes, ndims, shape = bytes(dtypes), bytes(ndims), bytes(shape)
    offsets, nbytes = bytes(offsets), bytes(nbytes)
    code = _table_start(n, dtypes, ndims, offsets, nbytes, header_end, align, file_size)
    if code:
        return code, n
    offs = struct.unpack(f"<{n}Q", offsets)
    sizes = struct.unpack(f"<{n}Q", nbytes)
    start, end = 0, header_end
    for i in range(n):
        code = _check_tensor(dtypes[i], ndims[i], shape, start, offs[i], sizes[i], end, align,
                             file_size, max_ndim)
        if code:
            return code, i
        start += ndims[i]
        end = offs[i] + sizes[i]
    return _table_end(n, shape, start, end, file_size)


def validate_table(n: int, dtypes: Buffer, ndims: Buffer, shape: Buffer, offsets: Buffer,
                   nbytes: Buffer, header_end: int, align: int, file_size: int, max_ndim: int
                   ) -> tuple[Code, int]:
    """Check the column lengths [H4] and [T1]-[T8] on the raw ``bin`` columns of the header.

    Order: (a) align [P7], the lengths of dtypes/ndims/offsets/nbytes, ``header_end`` within
    the file, each with index ``n``; (b) for each tensor in turn, the first of [T1] dtype, [T2]
    ndim, the shape column long enough, [T3], [T4], [T5], [T6] misaligned / overlap / gap, [T7];
    (c) the shape column fully used, then [T8], with index ``n``.

    Returns:
        ``(Code.OK, 0)``, or ``(code, index)`` of the first failure.
    """
    dtypes, ndims, shape, offsets, nbytes = (
        _byte_view(column, False) for column in (dtypes, ndims, shape, offsets, nbytes)
    )
    code = _table_start(n, dtypes, ndims, offsets, nbytes, header_end, align, file_size)
    if code:
        return code, n
    if n == 0:
        return _table_end(n, shape, 0, header_end, file_size)
    if file_size >= _DIM_LIMIT or n < 16:
        # Tiny tables, or sizes where the uint64 screen below could wrap: the plain loop.
        return _validate_table_scalar(n, dtypes, ndims, shape, offsets, nbytes, header_end,
                                      align, file_size, max_ndim)

    # Screen all tensors with numpy. A tensor not flagged here passes every rule of (b) provided
    # the tensor before it passed (its end, the prev_end of this one, is then exact). Flagged
    # tensors get the exact check in order, so the first real failure is the one reported.
    codes = np.frombuffer(dtypes, dtype=np.uint8)
    dims_per = np.frombuffer(ndims, dtype=np.uint8)
    offs = np.frombuffer(offsets, dtype=_U64)
    sizes = np.frombuffer(nbytes, dtype=_U64)
    flagged, starts, ends = _screen_shapes(codes, dims_per, shape, sizes, max_ndim)
    flagged |= _screen_layout(offs, sizes, header_end, align, file_size)
    for i in np.flatnonzero(flagged).tolist():
        prev_end = header_end if i == 0 else int(offs[i - 1]) + int(sizes[i - 1])
        code = _check_tensor(int(codes[i]), int(dims_per[i]), shape, int(starts[i]),
                             int(offs[i]), int(sizes[i]), prev_end, align, file_size, max_ndim)
        if code:
            return code, i
    return _table_end(n, shape, int(ends[-1]), int(offs[-1]) + int(sizes[-1]), file_size)


def _screen_shapes(codes: np.ndarray, dims_per: np.ndarray, shape: Buffer, sizes: np.ndarray,
                   max_ndim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flag the tensors that may break [T1]-[T5] or whose dimensions the shape column lacks.

    Returns:
        ``(flagged, starts, ends)``: a bool per tensor, and where its dimensions start and end
        in the shape column (counted in dimensions).
    """
    flagged = codes >= len(ITEMSIZE_BY_CODE)  # [T1]
    flagged |= dims_per > max_ndim  # [T2]
    ends = np.cumsum(dims_per, dtype=np.int64)
    starts = ends - dims_per
    available = len(shape) // 8
    have = int(np.searchsorted(ends, available, side="right"))  # tensors whose dims are there
    flagged[have:] = True
    if not have:
        return flagged, starts, ends
    consumed = int(ends[have - 1])
    dims = np.frombuffer(shape, dtype=_U64, count=consumed)
    first = starts[:have]
    big = np.concatenate(([0], np.cumsum(dims >= _DIM_LIMIT, dtype=np.int64)))
    flagged[:have] |= big[ends[:have]] != big[first]  # [T3]
    # [T4] screened in floating point with a wide margin; exact for what passes.
    log_dims = np.log2(np.maximum(dims, 1).astype(np.float64))
    log_sum = np.concatenate(([0.0], np.cumsum(log_dims)))
    itemsizes = _ITEMSIZES[np.minimum(codes[:have], len(ITEMSIZE_BY_CODE) - 1)]
    log_bytes = log_sum[ends[:have]] - log_sum[first] + np.log2(itemsizes.astype(np.float64))
    flagged[:have] |= log_bytes >= _SCREEN_LOG2
    # [T5] ceil(products * bits / 8), exact in uint64 wherever the screen above passed (the
    # product is below 2**62): whole groups of 8 elements take `bits` bytes, then the rest.
    products = np.multiply.reduceat(np.append(dims, np.uint64(1)), first)
    products[dims_per[:have] == 0] = 1
    bits = _BITS[np.minimum(codes[:have], len(BITS_BY_CODE) - 1)]
    three, seven = np.uint64(3), np.uint64(7)
    expected = (products >> three) * bits + (((products & seven) * bits + seven) >> three)
    flagged[:have] |= expected != sizes[:have]
    return flagged, starts, ends


def _screen_layout(offs: np.ndarray, sizes: np.ndarray, header_end: int, align: int,
                   file_size: int) -> np.ndarray:
    """Flag the tensors that may break [T6] or [T7]: a bool per tensor.

    uint64 arithmetic cannot wrap for a tensor whose predecessor passed [T7].
    """
    prev_ends = np.empty(len(offs), dtype=_U64)
    prev_ends[0] = header_end
    np.add(offs[:-1], sizes[:-1], out=prev_ends[1:])
    aligned = (prev_ends + np.uint64(align - 1)) & np.uint64(~(align - 1) & (2**64 - 1))
    flagged = offs != aligned
    limit = np.uint64(file_size)
    flagged |= (offs > limit) | (sizes > limit - offs)
    return flagged


class Mapping:
    """A private, copy-on-write mapping of a whole file.

    Attributes:
        buffer: a writable ``memoryview`` of its bytes (writes never reach the file). It stays
            mapped as long as anything refers to it, e.g. an array made with
            ``np.frombuffer(buffer)``; it is never closed explicitly.
        address: the address of its first byte.
        size: its length in bytes.
    """

    __slots__ = ("buffer", "address", "size")

    def __init__(self, buffer: memoryview, address: int, size: int) -> None:
        self.buffer = buffer
        self.address = address
        self.size = size

    def __repr__(self) -> str:
        return f"<safeckpt._pybackend.Mapping size={self.size} address={self.address:#x}>"


_libc: Any = None


def _c_library() -> Any:
    """libc's mmap, munmap and madvise, through ctypes (loaded on first use)."""
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long)
        libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _libc = libc
    return _libc


class _Pages:
    """The owner of a mapping: numpy views it through ``__array_interface__``; it is unmapped
    when the last view goes."""

    def __init__(self, address: int, size: int) -> None:
        self.__array_interface__ = {"data": (address, False), "shape": (size,),
                                    "typestr": "|u1", "version": 3}


def map_file(fd: int, size: int) -> Mapping:
    """Map ``size`` bytes of the open file ``fd`` privately (copy-on-write); ``size`` > 0.

    The mapping keeps no descriptor: it is made with libc's ``mmap`` rather than the ``mmap``
    module, whose objects hold a duplicate of ``fd`` for their whole life (before Python 3.13),
    so that a checkpoint of thousands of mapped shards does not run out of descriptors.

    Raises:
        OSError: the mapping failed.
        SafeckptError (a ValueError): ``size`` is 0 or does not fit the address space.
    """
    if not 0 < size <= sys.maxsize:  # ctypes would wrap a size_t above it
        raise error_for(Code.ARG, f"mmap of {size} bytes",
                        ": the size must be > 0 and fit in memory")
    libc = _c_library()
    address = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, 0)
    if address is None or address == ctypes.c_void_p(-1).value:  # MAP_FAILED
        raise error_for(Code.IO, f"mmap of {size} bytes", errno=ctypes.get_errno())
    pages = _Pages(address, size)
    weakref.finalize(pages, libc.munmap, address, size).atexit = False  # views may outlive exit
    return Mapping(np.asarray(pages).data, address, size)


def advise(mapping: Mapping, offset: int, length: int, advice: str) -> None:
    """Best-effort ``madvise`` on ``[offset, offset + length)`` of a mapping.

    ``advice`` is ``"sequential"``, ``"willneed"``, ``"random"`` or ``"normal"``; the range is
    widened to whole pages and clamped to the mapping. Errors of the OS are ignored.

    Raises:
        ValueError: unknown ``advice``.
    """
    if advice not in _ADVICE:
        raise ValueError(f"advice {advice!r}: use one of {sorted(_ADVICE)}")
    option = getattr(mmap, _ADVICE[advice], None)
    if option is None:
        return
    start = max(offset, 0) // mmap.PAGESIZE * mmap.PAGESIZE
    end = min(offset + length, mapping.size)
    if end <= start:
        return
    _c_library().madvise(mapping.address + start, end - start, option)  # errors ignored


def _byte_view(buf: Buffer, writable: bool) -> memoryview:
    """A flat ``memoryview`` of the bytes of a C-contiguous buffer (a numpy array of any dtype)."""
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise ValueError("buffer must be C-contiguous")
        if writable and not buf.flags.writeable:
            raise ValueError("destination array is read-only")
        return buf.reshape(-1).view(np.uint8).data
    view = memoryview(buf)
    if not view.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    if writable and view.readonly:
        raise ValueError("destination buffer is read-only")
    return view if view.ndim == 1 and view.format == "B" else view.cast("B")


def bytes_equal(a: Buffer, b: Buffer) -> bool:
    """True when two C-contiguous bytes-like objects hold exactly the same bytes.

    Compared in chunks of COMPARE_CHUNK bytes, as 8-byte words (the tail byte by byte), so the
    temporaries stay small and the first chunk that differs ends the comparison. Buffers of
    different byte lengths are unequal; the dtypes of numpy arrays play no part.

    Raises:
        BufferError, ValueError: an argument is not a C-contiguous buffer.
    """
    x = _byte_view(a, False)
    y = _byte_view(b, False)
    n = x.nbytes
    if n != y.nbytes:
        return False
    words = n // 8
    xw = np.frombuffer(x, np.uint64, words)  # an unaligned view is fine: numpy copes
    yw = np.frombuffer(y, np.uint64, words)
    step = COMPARE_CHUNK // 8
    for start in range(0, words, step):
        if not np.array_equal(xw[start:start + step], yw[start:start + step]):
            return False
    return bytes(x[words * 8:]) == bytes(y[words * 8:])


def copy_many(dsts: Sequence[Buffer], srcs: Sequence[Buffer]) -> None:
    """Copy the bytes of each ``srcs[i]`` into ``dsts[i]`` (C-contiguous, the same byte length),
    with ``numpy.copyto`` on byte views. Every pair is checked before any byte is copied; a
    destination that is its source (the same memory) is left as it is. The pairs must not overlap
    one another, as for the C core's (not checked).

    Raises:
        ValueError: the lists or a pair's byte lengths differ, a destination overlaps its source,
            a buffer is not C-contiguous, or a destination is read-only.
    """
    n = len(dsts)
    if len(srcs) != n:
        raise ValueError(f"copy_many: {n} destinations, {len(srcs)} sources")
    pairs = []
    for i, (d, s) in enumerate(zip(dsts, srcs)):
        dst = np.frombuffer(_byte_view(d, True), np.uint8)
        src = np.frombuffer(_byte_view(s, False), np.uint8)
        if dst.nbytes != src.nbytes:
            raise ValueError(f"copy_many: destination {i} has {dst.nbytes} bytes, its source "
                             f"{src.nbytes}")
        if dst.nbytes and dst.ctypes.data == src.ctypes.data:
            continue  # copied onto itself: left as it is, as the C core does
        if np.may_share_memory(dst, src):  # exact for two contiguous byte ranges
            raise ValueError(f"copy_many: destination {i} ({dst.nbytes} bytes) overlaps its "
                             "source")
        pairs.append((dst, src))
    for dst, src in pairs:
        np.copyto(dst, src)


def copy_into(dst: Buffer, src: Buffer) -> None:
    """Copy the bytes of ``src`` into ``dst`` (C-contiguous, the same byte length) with
    ``numpy.copyto``. Raises as :func:`copy_many`."""
    copy_many((dst,), (src,))


def check_padding(source: Mapping | Buffer | int, n: int, offsets: Buffer, nbytes: Buffer,
                  header_end: int) -> tuple[Code, int]:
    """[T9] every padding byte, before tensor 0 and between tensors, is zero.

    Parameters:
        source: a :class:`Mapping`, a bytes-like object holding the whole file, or an ``int``
            file descriptor (read with ``os.pread``).
        offsets, nbytes: the raw columns of a table that ``validate_table`` accepted.

    Returns:
        ``(Code.OK, 0)``, ``(Code.PADDING, i)`` for the gap before tensor ``i``, or
        ``(Code.TRUNCATED, i)`` when that gap lies outside the source.
    """
    if n == 0:
        return Code.OK, 0
    offs = np.frombuffer(offsets, dtype=_U64, count=n).tolist()
    sizes = np.frombuffer(nbytes, dtype=_U64, count=n).tolist()
    ends = [header_end] + [o + s for o, s in zip(offs[:-1], sizes[:-1])]
    gaps = [(i, ends[i], offs[i]) for i in range(n) if offs[i] > ends[i]]
    if not gaps:
        return Code.OK, 0
    if isinstance(source, int) and not isinstance(source, bool):
        size = os.fstat(source).st_size
        for i, start, stop in gaps:
            if stop > size:
                return Code.TRUNCATED, i
            for piece in range(start, stop, PAD_CHUNK):  # memory bounded whatever the gap
                want = min(PAD_CHUNK, stop - piece)
                data = os.pread(source, want, piece)
                if len(data) != want:
                    return Code.TRUNCATED, i
                if data.count(0) != want:
                    return Code.PADDING, i
        return Code.OK, 0
    with _byte_view(source.buffer if isinstance(source, Mapping) else source, False) as view:
        for i, start, stop in gaps:
            if stop > len(view):
                return Code.TRUNCATED, i
            if np.frombuffer(view, np.uint8, stop - start, start).any():  # a view: no copy
                return Code.PADDING, i
    return Code.OK, 0


def read_into(fd: int, offsets: Ints, lengths: Ints, dests: Sequence[Buffer],
              checksum: bool | Sequence[bool] = False) -> np.ndarray | None:
    """Read ``lengths[i]`` bytes at ``offsets[i]`` of ``fd`` into ``dests[i]``, for each ``i``.

    ``dests`` are writable C-contiguous buffers (numpy arrays of any dtype) of at least
    ``lengths[i]`` bytes; the bytes go straight into them (``os.preadv``), with no copy.
    ``checksum``: ``False``, ``True``, or one flag per range.

    Returns:
        ``None`` unless ``checksum``; else a uint32 array: the CRC32C of each range asked for,
        0 for the others.

    Raises:
        TruncatedFileError: the file ends inside a range.
        OSError: the read failed.
        ValueError: the argument lists differ in length, or a destination is unusable.

    Example:
        >>> # fd: a file that starts with b"123456789"
        >>> read_into(fd, [0], [9], [bytearray(9)], checksum=True)  # doctest: +SKIP
        array([3808858755], dtype=uint32)
    """
    if not len(offsets) == len(lengths) == len(dests):
        raise ValueError("offsets, lengths and dests must have the same length")
    if isinstance(checksum, (bool, np.bool_)):
        want = [bool(checksum)] * len(dests)
    elif len(checksum) != len(dests):
        raise ValueError(f"read_into: {len(checksum)} checksum flags for {len(dests)} ranges")
    else:
        want = [bool(flag) for flag in checksum]
    crcs = np.zeros(len(dests), np.uint32)
    for i, (offset, length, dest) in enumerate(zip(offsets, lengths, dests)):
        offset, length = int(offset), int(length)
        with _byte_view(dest, True) as view:
            if len(view) < length:
                raise ValueError(f"destination of {len(view)} bytes for a read of {length} bytes")
            done = 0
            while done < length:
                got = os.preadv(fd, [view[done:length]], offset + done)
                if got == 0:  # the reader checked the size: the file shrank since
                    raise error_for(Code.TENSOR_TRUNCATED,
                                    f"reading bytes [{offset}, {offset + length})")
                done += got
            if want[i]:
                crcs[i] = crc32c(view[:length])
    return crcs if not isinstance(checksum, (bool, np.bool_)) or checksum else None


def _pwrite_all(fd: int, data: Buffer, pos: int) -> None:
    """``os.pwrite`` until all of ``data`` is written at ``pos``."""
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], pos + done)


def write_tensors(fd: int, pos: int, buffers: Sequence[Buffer], align: int, checksum: bool
                  ) -> tuple[list[int] | None, int]:
    """Write each buffer at the next multiple of ``align`` after ``pos``, zero-padding the gap.

    Big buffers go out in chunks of ``WRITE_CHUNK`` bytes, each checksummed just before it is
    written; buffers are never joined, so memory stays bounded.

    Returns:
        ``(crcs, end)``: the CRC32C of each buffer (``None`` when ``checksum`` is false) and the
        position after the last one.

    Raises:
        OSError: a write failed.
        LayoutError: ``align`` is not a power of two in [8, 1 MiB] [P7].
        ValueError: a buffer is not C-contiguous.
    """
    if not _align_ok(align):
        raise error_for(Code.ALIGN, "write_tensors", f" (align={align!r})")
    crcs: list[int] = []
    for buf in buffers:
        with _byte_view(buf, False) as view:
            pad = -pos % align
            if pad:
                _pwrite_all(fd, bytes(pad), pos)
                pos += pad
            crc = 0
            for start in range(0, len(view), WRITE_CHUNK):
                with view[start:start + WRITE_CHUNK] as chunk:
                    if checksum:
                        crc = crc32c(chunk, crc)
                    _pwrite_all(fd, chunk, pos)
                    pos += len(chunk)
            if checksum:
                crcs.append(crc)
    return (crcs if checksum else None), pos
