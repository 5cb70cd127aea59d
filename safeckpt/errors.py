"""Exceptions raised by safeckpt, and the error codes shared with the C core.

Every problem found in a file raises a subclass of :class:`SafeckptError`, which is a
:class:`ValueError`, so ``except ValueError`` keeps working. OS errors (a missing file, a
full disk) stay OS errors.

Error codes become exceptions in one place, :func:`error_for`, from one table, ``ERRORS``:
both backends and the reader raise what it returns, so a problem reads the same whichever found it.

Example:
    >>> import safeckpt
    >>> try:
    ...     safeckpt.load_bytes(b"not a checkpoint at all, clearly not")
    ... except safeckpt.NotSafeckptError as exc:
    ...     print(type(exc).__name__)
    NotSafeckptError
"""

from __future__ import annotations

import enum
import itertools
import os
from typing import Any

QUOTE_MAX = 100  # characters of a value from a file shown in a message (names are rarely longer)


def quote(value: object, limit: int = QUOTE_MAX) -> str:
    """``repr(value)`` for an error message: at most about ``limit`` characters, for any value.

    A value read from a file may be nested a thousand levels deep or hold millions of items:
    this never recurses, and looks at no more of the value than it shows. A long str keeps its
    start and its end.

    Example:
        >>> quote("model.layers.0.weight"), quote([[[[[]]]]])
        ("'model.layers.0.weight'", '[[[[[]]]]]')
        >>> quote("a" * 1000, limit=15)
        "'aaaaa...aaaaa'"
    """
    out: list[str] = []
    stack: list[Any] = [value]  # Any: type(item) is tested exactly, which mypy does not narrow
    size = 0
    while stack and size <= limit:
        item = stack.pop()
        kind = type(item)
        if kind is _Text:
            text = item
        elif isinstance(item, (list, tuple, dict)):
            stack.extend(reversed(_pieces(item, limit)))
            continue
        elif kind is str and len(item) > limit:
            half = max((limit - 5) // 2, 1)  # two quotes and the dots
            text = f"{item[:half]!r}"[:-1] + "..." + f"{item[-half:]!r}"[1:]
        elif kind in (bytes, bytearray):
            text = repr(bytes(item[:limit + 1]))
        elif kind is int and item.bit_length() > 256:  # repr() of a huge int is slow, or refused
            text = f"<int of {item.bit_length()} bits>"
        else:
            text = repr(item)
        out.append(text)
        size += len(text)
    text = "".join(out)
    return text if size <= limit and not stack else text[:limit] + "..."


class _Text(str):
    """Punctuation that :func:`quote` writes as it is."""


def _pieces(container: list | tuple | dict, limit: int) -> list[object]:
    """Brackets, separators and at most ``limit`` children of a container, in order."""
    is_map = isinstance(container, dict)
    brackets = ("{", "}") if is_map else ("[", "]") if isinstance(container, list) else ("(", ")")
    open_, close = brackets
    if type(container) is tuple and len(container) == 1:
        close = ",)"
    pieces: list[object] = [_Text(open_)]
    items: Any = container.items() if isinstance(container, dict) else container
    children = itertools.islice(items, limit)
    for j, child in enumerate(children):
        if j:
            pieces.append(_Text(", "))
        pieces.extend((child[0], _Text(": "), child[1]) if is_map else (child,))
    if len(container) > limit:
        pieces.append(_Text(", ..."))
    pieces.append(_Text(close))
    return pieces


def plural(count: int, noun: str) -> str:
    """``"1 tensor"``, ``"3 tensors"``.

    Example:
        >>> plural(1, "tensor"), plural(0, "tensor")
        ('1 tensor', '0 tensors')
    """
    return f"{count} {noun}{'' if count == 1 else 's'}"


class SafeckptError(ValueError):
    """Root of every error about the content of a .sckpt file or of what is saved."""


class NotSafeckptError(SafeckptError):
    """The file does not start with the safeckpt magic bytes [P2]."""


class UnsupportedVersionError(SafeckptError):
    """The file needs a newer reader: unknown major version or flag bits [P3, P4]."""


class TruncatedFileError(SafeckptError):
    """The file is shorter than its prefix or header says [P1, P6, T7]."""


class HeaderError(SafeckptError):
    """The msgpack header is malformed or breaks the schema [H1-H8]."""


class LayoutError(HeaderError):
    """Offsets, sizes, alignment or padding break the layout rules [P7, T3-T9]."""


class ChecksumError(SafeckptError):
    """A CRC32C does not match: the header's [P8], a tensor's [T10], or, in a streamed save, an
    array's bytes changed between the CRC pass and the write [RS7]."""


class LimitError(SafeckptError):
    """A size, count or depth in the file is above a limit the caller can raise [P5, H3, H6, T2]."""


class UnsupportedDtypeError(SafeckptError, TypeError):
    """A dtype that the format cannot store, or a dtype code this reader does not know [T1]."""


class InvalidValueError(SafeckptError, TypeError):
    """Something given to a save function cannot be stored: a bad key, type or metadata value."""


class StateMismatchError(SafeckptError):
    """A saved state does not fit the model it is loaded into: missing, unexpected or mismatched
    keys."""


class PickleRequiredError(SafeckptError):
    """A file to convert needs pickle to load (a torch file that ``weights_only=True`` refuses, an
    .npz of object arrays); safeckpt never unpickles."""


class ShardError(SafeckptError):
    """A shard does not match its index: another save's shard, a wrong size or names [S7]."""


class RefError(SafeckptError):
    """A file that a checkpoint refers to is not the one it names: another save of it, a wrong
    size, or no tensor of the same dtype, shape and checksum at the offset given [X5]."""


class ReaderClosedError(SafeckptError):
    """A reader was used after ``close()``."""


class RemoteError(SafeckptError, OSError):
    """Remote storage (an fsspec URL or filesystem) failed or misbehaved: an error status, a
    timeout, a lost connection, a response of the wrong length [RS2]; the message names the URL
    and the byte range. A missing object is a FileNotFoundError, as a missing local file is."""


class CommitError(SafeckptError):
    """A checkpoint's commit object is malformed, or the data objects it names are not the ones
    it describes (missing, another size or header_crc) [RS8]."""


class ObjectChangedError(RemoteError):
    """A remote object changed while it was read: its prefix and header differ from those read
    when it was opened [RS4]; nothing of that load is returned."""


class Code(enum.IntEnum):
    """Error codes returned by both backends; mirrored by ``enum sck_code`` in csrc/sck.h."""

    OK = 0
    TRUNCATED = -1
    MAGIC = -2
    MAGIC_TEXT = -3
    VERSION = -4
    FLAGS = -5
    HEADER_LIMIT = -6
    ALIGN = -7
    HEADER_CRC = -8
    COLUMN = -9
    DTYPE = -10
    NDIM = -11
    DIM = -12
    TOO_LARGE = -13
    NBYTES = -14
    MISALIGNED = -15
    OVERLAP = -16
    GAP = -17
    TENSOR_TRUNCATED = -18
    TRAILING = -19
    PADDING = -20
    CRC = -21
    IO = -22
    NOMEM = -23
    ARG = -24


# What every message about a file that ends too early says, whatever the code or the format.
TRUNCATED_HINT = "file seems not fully written or downloaded"

# The exception class and the message of each code: the one table of messages (the C core keeps
# none of its own). error_for() completes a message with the file, the tensor and the bad value.
ERRORS: dict[Code, tuple[type[Exception], str]] = {
    Code.TRUNCATED: (TruncatedFileError, "file ends before the end of its 32-byte prefix or of its "
                     f"header ({TRUNCATED_HINT}) [P1, P6]"),
    Code.MAGIC: (NotSafeckptError, "not a safeckpt file (nor a safetensors one): the magic bytes "
                 "that start every safeckpt file are missing [P2]"),
    Code.MAGIC_TEXT: (NotSafeckptError, "the magic bytes look converted by a text-mode transfer "
                      "(line endings changed); copy the file in binary mode [P2]"),
    Code.VERSION: (UnsupportedVersionError, "the file is in a major version of the format that "
                   "this safeckpt does not read; a newer safeckpt may [P3]"),
    Code.FLAGS: (UnsupportedVersionError, "the file uses features this safeckpt does not know "
                 "(unknown flag bits are set); a newer safeckpt may read it [P4]"),
    Code.HEADER_LIMIT: (LimitError, "header is larger than max_header_size [P5]"),
    Code.ALIGN: (LayoutError, "the alignment in the prefix is not a power of two between 8 and "
                 "1 MiB [P7]"),
    Code.HEADER_CRC: (ChecksumError, "header checksum mismatch: the header is corrupt [P8]"),
    Code.COLUMN: (HeaderError, "a column of the tensor table has the wrong length [H4]"),
    Code.DTYPE: (UnsupportedDtypeError, "unknown dtype code [T1]"),
    Code.NDIM: (LimitError, "more dimensions than max_ndim [T2]"),
    Code.DIM: (LayoutError, "a dimension is negative (2**63 or more as an unsigned number) [T3]"),
    Code.TOO_LARGE: (LayoutError, "shape times item size is too large (2**63 bytes or more) [T4]"),
    Code.NBYTES: (LayoutError, "byte length does not equal ceil(prod(shape) x bits / 8) [T5]"),
    Code.MISALIGNED: (LayoutError, "tensor data does not start at a multiple of the alignment "
                      "[T6]"),
    Code.OVERLAP: (LayoutError, "tensor overlaps the header or the previous tensor [T6]"),
    Code.GAP: (LayoutError, "more bytes before the tensor than its alignment needs (a gap) [T6]"),
    Code.TENSOR_TRUNCATED: (TruncatedFileError, "tensor data runs past the end of the file "
                            f"({TRUNCATED_HINT}) [T7]"),
    Code.TRAILING: (LayoutError, "trailing bytes after the last tensor: the file is longer than "
                    "its tensors [T8]"),
    Code.PADDING: (LayoutError, "a padding byte before the tensor is not zero [T9]"),
    Code.CRC: (ChecksumError, "tensor checksum mismatch: the data is corrupt [T10]"),
    Code.IO: (OSError, "I/O error"),
    Code.NOMEM: (MemoryError, "out of memory"),
    Code.ARG: (SafeckptError, "internal error: invalid argument to the backend"),
}


def error_for(code: int, where: str, detail: str = "", *, errno: int | None = None) -> Exception:
    """The exception of an error code, to ``raise``: its class and message from ``ERRORS``.

    Parameters:
        code: a :class:`Code` (or the int a backend returned), not ``Code.OK``.
        where: what the message names first: the file, and the tensor when there is one.
        detail: appended to the message as it is, so it starts with its separator: the bad
            value, what was expected (``" (stored 0x1, computed 0x2)"``, ``": ..."``).
        errno: for ``Code.IO``, the OS error number: the result is ``OSError(errno, ...)`` with
            the OS's words for it, so ``exc.errno`` says what failed.

    Returns:
        An exception whose message is ``f"{where}: {message}{detail}"``.

    Raises:
        ValueError: ``code`` is not a known error code.

    Example:
        >>> raise error_for(Code.HEADER_LIMIT, "m.sckpt", " (2 GiB)")
        Traceback (most recent call last):
        safeckpt.errors.LimitError: m.sckpt: header is larger than max_header_size [P5] (2 GiB)
    """
    known = ERRORS.get(Code(code))  # Code() raises ValueError for an unknown int
    if known is None:
        raise ValueError(f"error_for({code!r}): not an error code")
    cls, message = known
    if errno and cls is OSError:
        return OSError(errno, f"{where}: {os.strerror(errno)}{detail}")
    return cls(f"{where}: {message}{detail}")
