"""Choose the backend once, at import: the C core if it is built, else pure Python.

``SAFECKPT_BACKEND=python`` forces the pure-Python backend; ``SAFECKPT_BACKEND=c`` demands
the C core and fails at import if it is not built. Both backends export the same names:

``NAME``
    ``"c"`` or ``"python"``.
``crc32c(data, value=0) -> int``
    CRC32C of a C-contiguous bytes-like ``data``, continuing from ``value`` (as ``zlib.crc32``).
``crc32c_ranges(buffer, offsets, lengths) -> numpy uint32 array``
    The CRC32C of each range ``buffer[offsets[i]:offsets[i] + lengths[i]]`` (uint64 arrays); the
    C core splits large inputs across threads. Raises ``ValueError`` for a range outside.
``bytes_equal(a, b) -> bool``
    True when two C-contiguous bytes-like objects (numpy arrays of any dtype, memoryviews, bytes)
    hold exactly the same bytes; different byte lengths are unequal. The C core runs memcmp with
    the GIL released, split over threads from 16 MiB; the fallback compares numpy chunks of 1 MiB.
    The module-level :func:`bytes_equal` calls the backend in force.
``copy_into(dst, src)``, ``copy_many(dsts, srcs)``
    Copy the bytes of C-contiguous ``src`` into the writable C-contiguous ``dst`` of the same byte
    length (``copy_many``: each pair, all checked before any is copied); a destination that
    overlaps its source is refused (``ValueError``), one that is its source is left as it is;
    different pairs must not overlap (not checked: the C core copies them on threads at once).
    The C core runs memcpy with the GIL released, split over threads from 16 MiB in all; the
    fallback uses ``numpy.copyto`` on byte views. The module-level :func:`copy_into` and
    :func:`copy_many` call the backend in force.
``parse_prefix(prefix, file_size, max_header_size) -> (code, fields)``
    Checks [P1]-[P7] in order on the first ``min(32, file_size)`` bytes of a file. ``fields`` is
    ``(major, minor, flags, header_len, align, header_crc)``, or ``None`` when ``code != 0``.
``validate_table(n, dtypes, ndims, shape, offsets, nbytes, header_end, align, file_size, max_ndim)
-> (code, index)``
    Checks the column lengths [H4] and [T1]-[T8] on the raw ``bin`` columns of the header;
    ``index`` is the first bad tensor (``n`` for a whole-file error such as [T8]).
``check_padding(source, n, offsets, nbytes, header_end) -> (code, index)``
    [T9] on a table that ``validate_table`` accepted; ``source`` is a ``Mapping``, a bytes-like
    object holding the whole file, or an ``int`` file descriptor (read with pread).
``map_file(fd, size) -> Mapping``
    A private copy-on-write mapping of the whole file: ``.buffer`` is writable, and the mapping
    lives as long as anything (a numpy array) refers to ``.buffer``; ``.address`` is its start.
``advise(mapping, offset, length, advice)``
    Best-effort madvise; ``advice`` is ``"sequential"``, ``"willneed"`` or ``"random"``.
``read_into(fd, offsets, lengths, dests, checksum=False) -> None or numpy uint32 array``
    Reads ``lengths[i]`` bytes at ``offsets[i]`` into the writable buffer ``dests[i]`` (in
    parallel in C). ``checksum`` (``True``, or one flag per range): also returns the CRC32C of
    each range asked for (0 for the others), which C computes piece by piece on the reading
    threads, right after each pread, while the bytes are in cache. Raises ``OSError``, or
    ``TruncatedFileError`` on a short read.
``write_tensors(fd, pos, buffers, align, checksum) -> (crcs, end)``
    For each buffer: zero padding from ``pos`` up to the next multiple of ``align``, then the
    buffer's bytes; ``pos`` moves to its end. Returns the CRC32C of each buffer (``None`` when
    ``checksum`` is false) and the final position. Raises ``OSError``.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Sequence

backend: ModuleType  # the chosen one: _native or _pybackend
_choice = os.environ.get("SAFECKPT_BACKEND", "").strip().lower()
if _choice not in ("", "c", "python"):
    raise ImportError(f"SAFECKPT_BACKEND={_choice!r}: use 'c' or 'python'")

# Only the chosen backend is imported: the C extension may be missing (then the fallback), and
# importing _pybackend too would add about 7 ms (ctypes) to every `import safeckpt`. Both are
# below this module, so these imports dodge no cycle.
if _choice == "python":
    from . import _pybackend as backend
else:
    try:
        from . import _native as backend
    except ImportError:
        if _choice == "c":
            raise
        from . import _pybackend as backend

NAME = backend.NAME


def use(name: str) -> str:
    """Switch the backend used by every reader and writer (for tests); return the previous one.

    The backend is imported here, on first use, so that a process that never switches loads
    only the one chosen at import (both are below this module: no import cycle).

    Raises:
        ValueError: ``name`` is not ``"c"`` or ``"python"``.
        ImportError: ``"c"`` and the C core is not built.

    Example:
        >>> previous = use("python"); use(previous)              # doctest: +SKIP
    """
    global backend, NAME
    previous = NAME
    chosen: ModuleType
    if name == "python":
        from . import _pybackend as chosen
    elif name == "c":
        from . import _native as chosen
    else:
        raise ValueError(f"unknown backend {name!r}: use 'c' or 'python'")
    backend, NAME = chosen, chosen.NAME
    return previous


def bytes_equal(a: object, b: object) -> bool:
    """True when ``a`` and ``b`` hold exactly the same bytes (the backend in force compares).

    Exact, never a checksum: incremental checkpoints refer to an earlier file's bytes only when
    this says they are equal (FORMAT.md [X7]). Buffers of different byte lengths are unequal;
    the dtypes of numpy arrays play no part (``-0.0`` and ``0.0`` differ, a NaN equals itself).

    Parameters:
        a, b: C-contiguous bytes-like objects: numpy arrays, memoryviews, bytes, bytearrays.

    Raises:
        BufferError, ValueError: an argument is not a C-contiguous buffer.

    Example:
        >>> import numpy as np
        >>> bytes_equal(np.zeros(4, np.float32), bytes(16))
        True
    """
    return bool(backend.bytes_equal(a, b))


def copy_into(dst: object, src: object) -> None:
    """Copy the bytes of ``src`` into ``dst`` (the backend in force copies; threads share a large
    copy in the C core).

    Parameters:
        dst: a writable C-contiguous bytes-like object (a numpy array of any dtype, a bytearray).
        src: a C-contiguous bytes-like object of the same byte length; dtypes play no part.

    Raises:
        ValueError: the byte lengths differ, or ``dst`` overlaps ``src``; BufferError,
            ValueError: a buffer is not C-contiguous, or ``dst`` is read-only.

    Example:
        >>> import numpy as np
        >>> dst = np.zeros(2, np.float32); copy_into(dst, np.ones(2, np.float32)); dst.tolist()
        [1.0, 1.0]
    """
    backend.copy_into(dst, src)


def copy_many(dsts: Sequence[object], srcs: Sequence[object]) -> None:
    """:func:`copy_into` for each pair ``(dsts[i], srcs[i])`` in one call: every pair is checked
    before any byte is copied, and the C core shares all the copies among its threads (many small
    tensors cost one call, not one each).

    Raises:
        ValueError: the lists differ in length; else as :func:`copy_into`, naming the pair.

    Example:
        >>> import numpy as np
        >>> a, b = np.zeros(2, np.int8), np.zeros(3, np.int8)
        >>> copy_many([a, b], [np.ones(2, np.int8), bytes([7, 8, 9])]); b.tolist()
        [7, 8, 9]
    """
    backend.copy_many(dsts, srcs)
