"""The one table of dtypes a .sckpt file can hold (FORMAT.md section 4).

Example:
    >>> import numpy as np
    >>> from safeckpt.dtypes import code_of, dtype_of
    >>> code_of(np.dtype("float32"))
    10
    >>> dtype_of(10)
    dtype('float32')
"""

import ml_dtypes
import numpy as np

from .errors import UnsupportedDtypeError

# (code, name, numpy dtype). Codes are never reused; new ones come with a new minor version.
DTYPES = (
    (0, "bool", np.dtype(np.bool_)),
    (1, "int8", np.dtype("<i1")),
    (2, "int16", np.dtype("<i2")),
    (3, "int32", np.dtype("<i4")),
    (4, "int64", np.dtype("<i8")),
    (5, "uint8", np.dtype("<u1")),
    (6, "uint16", np.dtype("<u2")),
    (7, "uint32", np.dtype("<u4")),
    (8, "uint64", np.dtype("<u8")),
    (9, "float16", np.dtype("<f2")),
    (10, "float32", np.dtype("<f4")),
    (11, "float64", np.dtype("<f8")),
    (12, "bfloat16", np.dtype(ml_dtypes.bfloat16)),
    (13, "float8_e4m3fn", np.dtype(ml_dtypes.float8_e4m3fn)),
    (14, "float8_e5m2", np.dtype(ml_dtypes.float8_e5m2)),
    (15, "complex64", np.dtype("<c8")),
    (16, "complex128", np.dtype("<c16")),
)

DTYPE_BY_CODE = tuple(dt for _, _, dt in DTYPES)
NAME_BY_CODE = tuple(name for _, name, _ in DTYPES)
ITEMSIZE_BY_CODE = tuple(dt.itemsize for dt in DTYPE_BY_CODE)
CODE_BY_DTYPE = {dt: code for code, _, dt in DTYPES}  # little-endian dtypes only


def code_of(dtype, name=None):
    """Return the format's code for a numpy dtype (either byte order).

    Raises:
        UnsupportedDtypeError: the dtype cannot be stored (object, string, structured, ...);
            the message names the tensor when ``name`` is given.
    """
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    code = CODE_BY_DTYPE.get(dt)
    if code is None:
        where = f"tensor {name!r}: " if name is not None else ""
        raise UnsupportedDtypeError(
            f"{where}dtype {dt!s} cannot be stored; supported: {', '.join(NAME_BY_CODE)}"
        )
    return code


def dtype_of(code):
    """Return the numpy dtype (little-endian) of a dtype code; IndexError if unknown."""
    if not 0 <= code < len(DTYPE_BY_CODE):
        raise IndexError(code)
    return DTYPE_BY_CODE[code]
