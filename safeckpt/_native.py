"""The C backend: thin wrappers over ``safeckpt._sckpt`` (csrc/, built with cffi).

Exports exactly the names documented in ``safeckpt/_backend.py``; ``_pybackend`` is the
pure-Python twin. Validators return ``(code, ...)`` with a ``safeckpt.errors.Code`` value;
I/O functions raise. cffi releases the GIL around every C call, so reads, writes and CRCs of
large buffers run in parallel with other Python threads.

Inputs may be any C-contiguous bytes-like object (bytes, bytearray, memoryview, numpy arrays);
they are passed to C without a copy and kept referenced for the duration of the call.

Example:
    >>> from safeckpt import _native
    >>> hex(_native.crc32c(b"123456789"))
    '0xe3069283'
"""

from __future__ import annotations

import os
from typing import Any, Sequence, Union

import numpy as np

from ._sckpt import ffi, lib
from .errors import Code, error_for

NAME = "c"

Buffer = Any  # a C-contiguous bytes-like object: bytes, bytearray, memoryview, mmap, numpy array
Ints = Union[Sequence[int], np.ndarray]  # non-negative ints (offsets, lengths): a list or an array

_U64_MAX = (1 << 64) - 1
_U32_MAX = (1 << 32) - 1
_ADVICE = {
    "normal": lib.SCK_ADVICE_NORMAL,
    "sequential": lib.SCK_ADVICE_SEQUENTIAL,
    "willneed": lib.SCK_ADVICE_WILLNEED,
    "random": lib.SCK_ADVICE_RANDOM,
}
_from_buffer = ffi.from_buffer
_new = ffi.new


def crc32c(data: Buffer, value: int = 0) -> int:
    """CRC32C of a C-contiguous bytes-like ``data``, continuing from ``value`` (as zlib.crc32)."""
    buf = _from_buffer(data)
    return lib.sck_crc32c(value & _U32_MAX, buf, len(buf))


def crc32c_ranges(buffer: Buffer, offsets: Ints, lengths: Ints) -> np.ndarray:
    """The CRC32C of each ``buffer[offsets[i]:offsets[i] + lengths[i]]``, as uint32 array.

    One C call for all ranges; from 16 MiB in all, threads share the work (the GIL released).

    Raises:
        ValueError: the lists differ in length; SafeckptError (a ValueError): a range is not
            inside the buffer.
    """
    buf = _from_buffer(buffer)
    offsets = np.ascontiguousarray(offsets, np.uint64)
    lengths = np.ascontiguousarray(lengths, np.uint64)
    n = len(offsets)
    if len(lengths) != n:
        raise ValueError(f"crc32c_ranges: {n} offsets, {len(lengths)} lengths")
    crcs = np.empty(n, np.uint32)
    index = _new("uint64_t *")
    code = lib.sck_crc32c_ranges(buf, len(buf), n, _from_buffer("uint64_t[]", offsets),
                                 _from_buffer("uint64_t[]", lengths),
                                 _from_buffer("uint32_t[]", crcs, require_writable=True), 0, index)
    if code:
        i = index[0]
        raise error_for(code, "crc32c_ranges", f": range {i} ({int(lengths[i])} bytes at "
                        f"{int(offsets[i])}) is not inside the {len(buf)}-byte buffer")
    return crcs


def bytes_equal(a: Buffer, b: Buffer) -> bool:
    """True when two C-contiguous bytes-like objects hold exactly the same bytes.

    memcmp in C with the GIL released; from 16 MiB, threads share the comparison. Buffers of
    different byte lengths are unequal; the dtypes of numpy arrays play no part (bytes compared).

    Raises:
        BufferError, ValueError: an argument is not a C-contiguous buffer.
    """
    x = _from_buffer(a)
    y = _from_buffer(b)
    if len(x) != len(y):
        return False
    equal = _new("int *")
    code = lib.sck_bytes_equal(x, y, len(x), 0, equal)
    if code:
        raise error_for(code, "bytes_equal", f" of {len(x)} bytes")
    return bool(equal[0])


def copy_many(dsts: Sequence[Buffer], srcs: Sequence[Buffer]) -> None:
    """Copy the bytes of each ``srcs[i]`` into ``dsts[i]`` (C-contiguous, the same byte length).

    One C call for all: memcpy with the GIL released; from 16 MiB in all, threads share the
    copies in pieces of 8 MiB. Every pair is checked before any byte is copied; a destination
    that is its source (the same memory) is left as it is. The pairs MUST NOT overlap one another
    (not checked: threads copy them at once, so such a copy would race; the snapshot's
    destinations are its own buffers).

    Raises:
        ValueError: the lists or a pair's byte lengths differ, or a destination overlaps its
            source; BufferError, ValueError: a buffer is not C-contiguous, or a destination is
            read-only.
    """
    n = len(dsts)
    if len(srcs) != n:
        raise ValueError(f"copy_many: {n} destinations, {len(srcs)} sources")
    dst = [_from_buffer(d, require_writable=True) for d in dsts]
    src = list(map(_from_buffer, srcs))
    lens = list(map(len, dst))
    src_lens = list(map(len, src))
    if lens != src_lens:
        i = next(i for i, (a, b) in enumerate(zip(lens, src_lens)) if a != b)
        raise ValueError(f"copy_many: destination {i} has {lens[i]} bytes, its source "
                         f"{src_lens[i]}")
    index = _new("uint64_t *")
    code = lib.sck_copy_many(n, _new("void *[]", dst), _new("void *[]", src),
                             _new("uint64_t[]", lens), 0, index)
    if code == Code.ARG:  # the lengths are real buffers' (no overflow): an overlap
        i = index[0]
        raise ValueError(f"copy_many: destination {i} ({lens[i]} bytes) overlaps its source")
    if code:
        raise error_for(code, "copy_many", f" of {n} buffers")


def copy_into(dst: Buffer, src: Buffer) -> None:
    """Copy the bytes of ``src`` into ``dst`` (C-contiguous, the same byte length): memcpy with
    the GIL released, shared by threads from 16 MiB. Raises as :func:`copy_many`."""
    copy_many((dst,), (src,))


def parse_prefix(prefix: Buffer, file_size: int, max_header_size: int
                 ) -> tuple[int, tuple[int, int, int, int, int, int] | None]:
    """Check [P1]-[P7] on the first ``min(32, file_size)`` bytes of a file.

    Returns:
        ``(code, fields)``: ``fields`` is ``(major, minor, flags, header_len, align, header_crc)``,
        or ``None`` when ``code != 0``.
    """
    buf = _from_buffer(prefix)
    out = _new("sck_prefix *")
    code = lib.sck_parse_prefix(buf, len(buf), file_size, min(max_header_size, _U64_MAX), out)
    if code:
        return code, None
    return 0, (out.major, out.minor, out.flags, out.header_len, out.align, out.header_crc)


def validate_table(n: int, dtypes: Buffer, ndims: Buffer, shape: Buffer, offsets: Buffer,
                   nbytes: Buffer, header_end: int, align: int, file_size: int, max_ndim: int
                   ) -> tuple[int, int]:
    """Check the column lengths [H4] and [T1]-[T8] on the raw ``bin`` columns of the header.

    [T4]/[T5] use each code's bits per element (``dtypes.BITS_BY_CODE``): ``nbytes`` must be
    ``ceil(count * bits / 8)``, the packed length for the sub-byte codes. Tensor bytes are never
    read here; their padding bits [T11] are checked where they are unpacked (``packing.unpack``).

    Returns:
        ``(code, index)``: ``index`` is the first bad tensor, ``n`` for a whole-file error
        (column lengths, [T8]), 0 when ``code == 0``.
    """
    d = _from_buffer(dtypes)
    k = _from_buffer(ndims)
    s = _from_buffer(shape)
    o = _from_buffer(offsets)
    b = _from_buffer(nbytes)
    table = _new("sck_table *", (n, d, len(d), k, len(k), s, len(s), o, len(o), b, len(b)))
    index = _new("uint64_t *")
    code = lib.sck_validate_table(table, header_end, align, file_size,
                                  min(max_ndim, _U32_MAX), index)
    return code, index[0]


class Mapping:
    """A private copy-on-write mapping of a whole file, made by :func:`map_file`.

    ``buffer`` is a writable buffer of ``size`` bytes starting at ``address``. The mapping is
    removed when nothing refers to ``buffer`` any more (the Mapping itself, or numpy arrays made
    with ``np.frombuffer(mapping.buffer, ...)``): writes go to private pages, never to the file.
    """

    __slots__ = ("buffer", "address", "size", "_base", "__weakref__")

    def __init__(self, base: Any, size: int) -> None:
        self._base = base  # cdata with the munmap destructor; the buffer refers to it too
        self.size = size
        self.address = int(ffi.cast("uintptr_t", base))
        self.buffer = ffi.buffer(base, size)

    def __repr__(self) -> str:
        return f"<safeckpt Mapping of {self.size} bytes at {self.address:#x}>"


def map_file(fd: int, size: int) -> Mapping:
    """Map the first ``size`` (> 0) bytes of ``fd`` privately; returns a :class:`Mapping`.

    Raises:
        OSError: mmap failed.
        SafeckptError (a ValueError): ``size`` is 0 or does not fit the address space.
    """
    out = _new("void **")
    err = _new("int *")
    code = lib.sck_map(fd, size, out, err)
    if code:
        detail = ": the size must be > 0 and fit in memory" if code == lib.SCK_E_ARG else ""
        raise error_for(code, f"mmap of {size} bytes", detail, errno=err[0])
    # sck_unmap is bound now: at interpreter exit the module's globals (lib) may be gone before
    # the last array on the mapping is.
    base = ffi.gc(ffi.cast("uint8_t *", out[0]),
                  lambda p, size=size, unmap=lib.sck_unmap: unmap(p, size))
    return Mapping(base, size)


def advise(mapping: Mapping, offset: int, length: int, advice: str) -> None:
    """Best-effort madvise of ``[offset, offset + length)`` of a :class:`Mapping`.

    ``advice`` is ``"sequential"``, ``"willneed"``, ``"random"`` or ``"normal"``.
    """
    code = _ADVICE.get(advice)
    if code is None:
        raise ValueError(f"advice {advice!r}: use one of {', '.join(map(repr, _ADVICE))}")
    lib.sck_advise(mapping._base, mapping.size, min(offset, _U64_MAX), min(length, _U64_MAX), code)


def check_padding(source: Mapping | Buffer | int, n: int, offsets: Buffer, nbytes: Buffer,
                  header_end: int) -> tuple[int, int]:
    """[T9] on a table that :func:`validate_table` accepted.

    ``source`` is a :class:`Mapping`, a bytes-like object holding the whole file, or an ``int``
    file descriptor (read with pread). Returns ``(code, index)``.

    Raises:
        OSError: reading the file descriptor failed.
    """
    o = _from_buffer(offsets)
    b = _from_buffer(nbytes)
    table = _new("sck_table *", {"n": n, "offsets": o, "offsets_len": len(o),
                                 "nbytes": b, "nbytes_len": len(b)})
    index = _new("uint64_t *")
    if isinstance(source, Mapping):
        code = lib.sck_check_padding_mem(source._base, source.size, table, header_end, index)
    elif isinstance(source, int):
        err = _new("int *")
        size = os.fstat(source).st_size
        code = lib.sck_check_padding_fd(source, size, table, header_end, index, err)
        if code == lib.SCK_E_IO or code == lib.SCK_E_NOMEM:
            raise error_for(code, "reading padding bytes", errno=err[0])
    else:
        data = _from_buffer(source)
        code = lib.sck_check_padding_mem(data, len(data), table, header_end, index)
    return code, index[0]


def read_into(fd: int, offsets: Ints, lengths: Ints, dests: Sequence[Buffer],
              checksum: bool | Sequence[bool] = False) -> np.ndarray | None:
    """Read ``lengths[i]`` bytes at ``offsets[i]`` of ``fd`` into ``dests[i]``, in parallel.

    ``dests`` are writable C-contiguous buffers of at least ``lengths[i]`` bytes. ``checksum``:
    ``False``, ``True``, or one flag per range; each thread checksums the piece it has just read.

    Returns:
        ``None`` unless ``checksum``; else a uint32 array: the CRC32C of each range asked for,
        0 for the others.

    Raises:
        OSError: a read failed.
        TruncatedFileError: the file ended before ``offsets[i] + lengths[i]``.
        ValueError: the lists differ in length, or a destination is too small.

    Example:
        >>> # fd: a file that starts with b"123456789"
        >>> read_into(fd, [0], [9], [bytearray(9)], checksum=True)  # doctest: +SKIP
        array([3808858755], dtype=uint32)
    """
    n = len(dests)
    if len(offsets) != n or len(lengths) != n:
        raise ValueError(f"read_into: {len(offsets)} offsets, {len(lengths)} lengths, "
                         f"{n} destinations")
    bufs = [_from_buffer(d, require_writable=True) for d in dests]
    offs = _new("uint64_t[]", offsets)
    lens = _new("uint64_t[]", lengths)
    for i in range(n):
        if len(bufs[i]) < lens[i]:
            raise ValueError(f"read_into: destination {i} holds {len(bufs[i])} bytes, "
                             f"{lens[i]} are to be read")
    want, crcs, out = ffi.NULL, None, ffi.NULL
    if not isinstance(checksum, (bool, np.bool_)):  # one flag per range
        if len(checksum) != n:
            raise ValueError(f"read_into: {len(checksum)} checksum flags for {n} ranges")
        want = _new("uint8_t[]", [1 if flag else 0 for flag in checksum])
    if not isinstance(checksum, (bool, np.bool_)) or checksum:
        crcs = np.empty(n, np.uint32)
        out = _from_buffer("uint32_t[]", crcs, require_writable=True)
    ptrs = _new("void *[]", bufs)
    index = _new("uint64_t *")
    err = _new("int *")
    code = lib.sck_pread_many(fd, n, offs, lens, ptrs, want, out, 0, index, err)
    if code:
        i = index[0]
        if code == lib.SCK_E_TRUNCATED:  # the reader checked the size: the file shrank since
            code = Code.TENSOR_TRUNCATED
        raise error_for(code, f"reading bytes [{offs[i]}, {offs[i] + lens[i]})", errno=err[0])
    return crcs


def write_tensors(fd: int, pos: int, buffers: Sequence[Buffer], align: int, checksum: bool
                  ) -> tuple[list[int] | None, int]:
    """Write each buffer at the next multiple of ``align`` from ``pos``, zero-padding before it.

    Returns:
        ``(crcs, end)``: the CRC32C of each buffer (``None`` unless ``checksum``) and the
        position after the last one.

    Raises:
        OSError: a write failed.
        LayoutError: ``align`` is not a power of two in [8, 1 MiB].
        SafeckptError (a ValueError): a tensor would end at 2**63 bytes or beyond.
    """
    bufs = [_from_buffer(b) for b in buffers]
    n = len(bufs)
    srcs = _new("void *[]", bufs)
    lens = _new("uint64_t[]", [len(b) for b in bufs])
    crcs = _new("uint32_t[]", n) if checksum else ffi.NULL
    end = _new("uint64_t *")
    index = _new("uint64_t *")
    err = _new("int *")
    code = lib.sck_write_tensors(fd, pos, n, srcs, lens, align, 1 if checksum else 0, crcs,
                                 end, index, err)
    if code == lib.SCK_E_ALIGN:
        raise error_for(code, "write_tensors", f" (align={align!r})")
    if code:
        detail = ": it would end at 2**63 bytes or beyond" if code == lib.SCK_E_ARG else ""
        raise error_for(code, f"writing tensor {index[0]}", detail, errno=err[0])
    return (list(crcs) if checksum else None), end[0]
