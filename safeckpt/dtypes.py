"""The one table of dtypes a .sckpt file can hold (FORMAT.md section 4).

Names, item sizes and the minor version of every code are plain tuples. The numpy dtypes of
bfloat16 and the float8 codes come from ml_dtypes, whose import costs 0.5-1.3 s, so it is imported
only when one of those codes is first looked up (``DTYPE_BY_CODE[12]``, a file holding one, or an
array of one being saved, which means its caller has imported ml_dtypes already).

Byte order. A file holds little-endian bytes. A dtype's byte order is ``'<'``, ``'>'``, ``'|'``
(single bytes: no order) or ``'='``, native, which means big-endian on a big-endian host
(s390x): :func:`is_little_endian` and :func:`to_little_endian` resolve ``'='`` with
``BIG_ENDIAN_HOST``, which tests set to force the big-endian path on any machine.
``CODE_BY_DTYPE`` holds only little-endian dtypes, so its lookups miss for a dtype whose bytes must
be swapped; :func:`code_of` accepts either order.

Example:
    >>> import numpy as np
    >>> from safeckpt.dtypes import code_of, dtype_of
    >>> code_of(np.dtype("float32"))
    10
    >>> dtype_of(10) == np.dtype("<f4")
    True
"""

from __future__ import annotations

import collections.abc
import sys
from typing import Any, Iterator

import numpy as np

from .errors import UnsupportedDtypeError

# (code, name, item size, bits, minor version that added it). Codes are never reused; new ones come
# with a new minor version (FORMAT.md section 5), so the minor never decreases along the table. The item
# size is numpy's (one byte per element for the sub-byte types); bits is what an element takes in a
# file: fewer than 8 means the code is packed (FORMAT.md section 4, [T11]).
_TABLE = (
    (0, "bool", 1, 8, 0),
    (1, "int8", 1, 8, 0),
    (2, "int16", 2, 16, 0),
    (3, "int32", 4, 32, 0),
    (4, "int64", 8, 64, 0),
    (5, "uint8", 1, 8, 0),
    (6, "uint16", 2, 16, 0),
    (7, "uint32", 4, 32, 0),
    (8, "uint64", 8, 64, 0),
    (9, "float16", 2, 16, 0),
    (10, "float32", 4, 32, 0),
    (11, "float64", 8, 64, 0),
    (12, "bfloat16", 2, 16, 0),
    (13, "float8_e4m3fn", 1, 8, 0),
    (14, "float8_e5m2", 1, 8, 0),
    (15, "complex64", 8, 64, 0),
    (16, "complex128", 16, 128, 0),
    (17, "float8_e4m3fnuz", 1, 8, 3),
    (18, "float8_e5m2fnuz", 1, 8, 3),
    (19, "float8_e4m3b11fnuz", 1, 8, 5),
    (20, "float8_e3m4", 1, 8, 5),
    (21, "float8_e4m3", 1, 8, 5),
    (22, "float8_e8m0fnu", 1, 8, 5),
    (23, "float8_e5m3fnu", 1, 8, 5),
    (24, "float6_e2m3fn", 1, 6, 5),
    (25, "float6_e3m2fn", 1, 6, 5),
    (26, "float4_e2m1fn", 1, 4, 5),
    (27, "int4", 1, 4, 5),
    (28, "uint4", 1, 4, 5),
    (29, "int2", 1, 2, 5),
    (30, "uint2", 1, 2, 5),
    (31, "int1", 1, 1, 5),
    (32, "uint1", 1, 1, 5),
    (33, "complex32", 4, 32, 5),
    (34, "bcomplex32", 4, 32, 5),
)
# Codes whose numpy dtype is ml_dtypes' attribute of the same name (resolved on first use): every
# code that numpy itself does not have.
_ML_CODES = frozenset(code for code, name, _, _, _ in _TABLE
                      if name.startswith(("bfloat", "float8_", "float6_", "float4_")) or code >= 27)
ML_DTYPES_MIN = "0.7"  # the ml_dtypes release that has every code of the table

NAME_BY_CODE = tuple(row[1] for row in _TABLE)
ITEMSIZE_BY_CODE = tuple(row[2] for row in _TABLE)  # numpy's item size
BITS_BY_CODE = tuple(row[3] for row in _TABLE)  # bits per element in a file
MINOR_BY_CODE = tuple(row[4] for row in _TABLE)
PACKED_CODES = frozenset(code for code, bits in enumerate(BITS_BY_CODE) if bits < 8)  # [T11]
NUMPY_MAX_NDIM = 64 if int(np.__version__.split(".")[0]) >= 2 else 32  # numpy's NPY_MAXDIMS
# What native byte order ('=') means here; read by is_little_endian() at each call, so that a test
# can set it to True and take the path of a big-endian host on a little-endian one.
BIG_ENDIAN_HOST = sys.byteorder == "big"
_resolved = False


class _DtypeByCode(dict):
    """``DTYPE_BY_CODE[code]``: the numpy dtype (little-endian) of a code.

    It reads as a sequence in code order (``len``, iteration, ``in``); a lookup is a dict lookup,
    as fast as a tuple's, and the ml_dtypes codes are filled in by the first lookup of one.
    """

    __slots__ = ()

    def __missing__(self, code: int) -> np.dtype:
        if code in _ML_CODES:
            if not _resolved:
                _resolve()
            if dict.__contains__(self, code):
                return dict.__getitem__(self, code)
            raise UnsupportedDtypeError(missing_ml_dtype(code))
        raise IndexError(f"dtype code {code!r} is not in 0..{len(NAME_BY_CODE) - 1}")

    def __len__(self) -> int:
        return len(NAME_BY_CODE)

    def __iter__(self) -> Iterator[np.dtype]:  # the values, as a sequence in code order
        return (self[code] for code in range(len(NAME_BY_CODE)))

    def __contains__(self, dtype: object) -> bool:
        return any(dtype == dt for dt in self)

    def __repr__(self) -> str:
        return f"DTYPE_BY_CODE{tuple(self)!r}"


class _CodeByDtype(dict):
    """``CODE_BY_DTYPE[dtype]``, ``.get(dtype)``: the code of a little-endian numpy dtype.

    An ml_dtypes dtype exists only once its caller has imported ml_dtypes; a miss while ml_dtypes
    is imported and the table not yet resolved resolves it and looks again.
    """

    __slots__ = ()

    def __missing__(self, dtype: np.dtype) -> int:
        if _resolve_if_imported():
            return self[dtype]
        raise KeyError(dtype)

    def get(self, dtype: Any, default: Any = None) -> Any:
        code = dict.get(self, dtype)
        if code is None and _resolve_if_imported():
            code = dict.get(self, dtype)
        return default if code is None else code

    def __contains__(self, dtype: object) -> bool:
        return self.get(dtype) is not None


# Read as a sequence and sampled as one (e.g. by hypothesis), though a dict underneath.
collections.abc.Sequence.register(_DtypeByCode)
DTYPE_BY_CODE = _DtypeByCode((code, np.dtype(name).newbyteorder("<"))
                             for code, name, *_ in _TABLE if code not in _ML_CODES)
CODE_BY_DTYPE = _CodeByDtype((dt, code) for code, dt in DTYPE_BY_CODE.items())  # little-endian only


class _Dtypes(collections.abc.Sequence):
    """``DTYPES``: ``(code, name, numpy dtype)`` for every code, in code order."""

    __slots__ = ()

    def __len__(self) -> int:
        return len(NAME_BY_CODE)

    def __getitem__(self, index: Any) -> Any:
        code = range(len(NAME_BY_CODE))[index]
        return code, NAME_BY_CODE[code], DTYPE_BY_CODE[code]


DTYPES = _Dtypes()


def _resolve() -> None:
    """Fill in the ml_dtypes codes of ``DTYPE_BY_CODE`` and ``CODE_BY_DTYPE`` (imports it).

    A code whose type this ml_dtypes lacks (a release older than ``ML_DTYPES_MIN``) stays out of
    both: looking it up raises :class:`UnsupportedDtypeError` (:func:`missing_ml_dtype`), and an
    array of it cannot exist here to be saved.
    """
    global _resolved
    import ml_dtypes
    for code in sorted(_ML_CODES):
        kind = getattr(ml_dtypes, NAME_BY_CODE[code], None)
        if kind is None:
            dt = dict.pop(DTYPE_BY_CODE, code, None)
            if dt is not None:
                dict.pop(CODE_BY_DTYPE, dt, None)
            continue
        dt = np.dtype(kind)
        dict.__setitem__(CODE_BY_DTYPE, dt, code)
        dict.__setitem__(DTYPE_BY_CODE, code, dt)
    _resolved = True


def missing_ml_dtype(code: int, name: str | None = None) -> str:
    """The message for a known code whose type the installed ml_dtypes lacks (tensor ``name``).

    Example: ``missing_ml_dtype(27, "w")`` says tensor 'w' has dtype code 27 (int4), which
    needs ml_dtypes>=0.7.
    """
    import ml_dtypes
    where = f"tensor {name!r}: " if name is not None else ""
    return (f"{where}dtype code {code} ({NAME_BY_CODE[code]}) needs ml_dtypes>={ML_DTYPES_MIN}; "
            f"the installed ml_dtypes {getattr(ml_dtypes, '__version__', '?')} lacks it "
            f"(pip install -U ml_dtypes)")


def numpy_dtype(code: int, name: str) -> np.dtype:
    """The numpy dtype of a known ``code`` (0 <= code < len(NAME_BY_CODE)) for tensor ``name``.

    Raises:
        UnsupportedDtypeError: the installed ml_dtypes lacks the code's type; names the tensor.

    Example:
        >>> numpy_dtype(10, "w") == np.dtype("<f4")
        True
    """
    try:
        return DTYPE_BY_CODE[code]
    except UnsupportedDtypeError:
        raise UnsupportedDtypeError(missing_ml_dtype(code, name)) from None


def nbytes_of(code: int, count: int) -> int:
    """The byte length in a file of ``count`` elements of ``code``: ``ceil(count * bits / 8)``.

    Example:
        >>> nbytes_of(10, 3), nbytes_of(27, 3), nbytes_of(24, 5), nbytes_of(31, 0)
        (12, 2, 4, 0)
    """
    return (count * BITS_BY_CODE[code] + 7) // 8


def _resolve_if_imported() -> bool:
    """Resolve the table if ml_dtypes is imported and it is not resolved yet; whether it was."""
    if _resolved or "ml_dtypes" not in sys.modules:
        return False
    _resolve()
    return True


def is_little_endian(dtype: Any) -> bool:
    """Whether the items of ``dtype`` are stored little-endian, as a file holds them.

    Native order (``'='``) is little unless ``BIG_ENDIAN_HOST``; single bytes always are.

    Example:
        >>> is_little_endian(np.dtype("<f4")), is_little_endian(np.dtype(">f4"))
        (True, False)
    """
    dt = np.dtype(dtype)
    order = dt.byteorder
    if order == "=":
        return not BIG_ENDIAN_HOST or dt.itemsize <= 1
    return order != ">"


def little_endian(dtype: Any) -> np.dtype:
    """The little-endian twin of ``dtype``: the key of ``CODE_BY_DTYPE`` for either byte order.

    A dtype that numpy has in native order only (ml_dtypes' bfloat16 on a big-endian host, whose
    swapped twin would be a plain void) is returned as it is.

    Example:
        >>> little_endian(np.dtype(">i8")) == np.dtype("<i8")
        True
    """
    dt = np.dtype(dtype)
    if is_little_endian(dt):
        return dt
    twin = dt.newbyteorder("<")
    return twin if twin.type is dt.type else dt


def to_little_endian(array: np.ndarray) -> np.ndarray:
    """``array`` itself when its bytes are little-endian, else a C-ordered copy whose are.

    The copy has the dtype of :func:`little_endian`: its values are the array's, except for a
    dtype that numpy has in native order only, where only its bytes (what a file holds) are right.

    Example:
        >>> list(to_little_endian(np.array([1, 2], ">u2")).tobytes())
        [1, 0, 2, 0]
    """
    if is_little_endian(array.dtype):
        return array
    swapped = np.ascontiguousarray(array.byteswap())  # byteswap() copies, keeping the layout
    return swapped.view(little_endian(array.dtype))


def code_of(dtype: Any, name: str | None = None) -> int:
    """Return the format's code for a numpy dtype (either byte order).

    Raises:
        UnsupportedDtypeError: the dtype cannot be stored (object, string, structured, ...);
            the message names the tensor when ``name`` is given.

    Example:
        >>> code_of(np.dtype(">f4")), code_of(np.dtype("<f4"))
        (10, 10)
    """
    dt = little_endian(dtype)
    code = CODE_BY_DTYPE.get(dt)
    if code is None:
        where = f"tensor {name!r}: " if name is not None else ""
        raise UnsupportedDtypeError(
            f"{where}dtype {dt!s} cannot be stored; supported: {', '.join(NAME_BY_CODE)}"
        )
    return code


def dtype_of(code: int) -> np.dtype:
    """Return the numpy dtype (little-endian) of a dtype code; IndexError if unknown."""
    if not 0 <= code < len(NAME_BY_CODE):
        raise IndexError(code)
    return DTYPE_BY_CODE[code]


def minor_of(codes: bytes) -> int:
    """The lowest minor version that holds every code of ``codes`` (bytes, e.g. a dtypes column).

    Example: ``minor_of(bytes([10, 17])) == 3``.
    """
    return MINOR_BY_CODE[max(codes)] if codes else 0
