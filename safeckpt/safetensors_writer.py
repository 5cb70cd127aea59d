"""Writing .safetensors files that any safetensors reader loads (reading them:
:mod:`safeckpt.safetensors_format`, which states the rules [ST1]-[ST9] cited here).

Example:
    >>> import numpy as np, safeckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> save_file({"w": np.arange(3, dtype=np.float32)}, path, metadata={"step": 3})
    >>> safeckpt.open(path).metadata
    {'step': 3}
"""

from __future__ import annotations

import base64
import collections.abc
import json
import math
from typing import Any, BinaryIO, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import msgpack
import numpy as np

from . import _fs
from . import format as fmt
from .dtypes import (BITS_BY_CODE, CODE_BY_DTYPE, ITEMSIZE_BY_CODE, NAME_BY_CODE, PACKED_CODES,
                     little_endian)
from .errors import InvalidValueError, LimitError, UnsupportedDtypeError
from .filekind import PathLike
from .packing import pack
from .remote import RemotePath
from .safetensors_format import DTYPE_NAMES, LENGTH_SIZE, METADATA_KEY, SAFECKPT_KEY
from .writer import (LazyArray, destination_format, stream_array, unicode_error,
                     warn_beyond_reader_defaults)


def encode_metadata(metadata: Optional[Mapping[str, Any]],
                    tree: Any = fmt.NO_TREE) -> Dict[str, str]:
    """Our metadata (and tree) as safetensors' str -> str metadata [ST9]; see the module docstring.

    Raises:
        InvalidValueError: a metadata value msgpack cannot hold, or the reserved key ``__safeckpt__``.
    """
    metadata = fmt.check_metadata(metadata)
    if SAFECKPT_KEY in metadata:
        raise InvalidValueError(f"metadata key {SAFECKPT_KEY!r} is reserved for safeckpt's own "
                                "extras in safetensors files [ST9]; rename it")
    plain = {k: v for k, v in metadata.items() if type(v) is str}
    extras = {}
    if len(plain) != len(metadata):
        extras["metadata"] = {k: v for k, v in metadata.items() if type(v) is not str}
    if tree is not fmt.NO_TREE:
        extras["tree"] = tree
    if extras:
        try:
            packed = msgpack.packb(extras, use_bin_type=True)
        except UnicodeEncodeError as exc:
            raise unicode_error(exc, (), "[ST9]") from None
        plain[SAFECKPT_KEY] = base64.b64encode(packed).decode("ascii")
    return plain


class Planned(NamedTuple):
    """A safetensors file checked and laid out, nothing written yet: its length and header
    (``head``) and its arrays in data order; made by :func:`plan`, written by :func:`write`."""

    head: bytes
    arrays: List[Any]


def plan(tensors: Mapping[str, Any], metadata: Optional[Mapping[str, Any]] = None,
         tree: Any = fmt.NO_TREE) -> Planned:
    """Check every tensor and the metadata, and lay out the file; see :func:`save_file`.

    Raises:
        InvalidValueError, UnsupportedDtypeError, LimitError: as :func:`save_file`.

    Example:
        >>> len(plan({"w": np.zeros(2, np.float32)}).head)   # 8-byte length + padded JSON
        64
    """
    if not isinstance(tensors, collections.abc.Mapping):
        raise InvalidValueError(f"tensors must be a dict of name -> numpy array, "
                                f"not {type(tensors).__name__}")
    entries: Dict[str, Dict[str, Any]]
    order: List[Tuple[int, int, str, Any]]  # (-itemsize, position, name, array)
    entries, order = {}, []
    for name, value in tensors.items():
        if type(name) is not str or not name:
            raise InvalidValueError(f"key {name!r}: tensor names must be non-empty str")
        if name == METADATA_KEY:
            raise InvalidValueError(f"tensor name {name!r} is reserved by safetensors; rename it")
        if isinstance(value, np.generic):
            value = np.asarray(value)
        if not isinstance(value, (np.ndarray, LazyArray)):
            raise InvalidValueError(f"tensor {name!r}: a {type(value).__module__}."
                                    f"{type(value).__name__} is not a numpy array")
        code = CODE_BY_DTYPE.get(little_endian(value.dtype))
        if code not in DTYPE_NAMES:
            raise UnsupportedDtypeError(
                f"tensor {name!r}: dtype {value.dtype} has no safetensors equivalent"
                + (f" (safetensors has no {NAME_BY_CODE[code]}); save as .sckpt, which holds it"
                   if code is not None else ""))
        if value.ndim > fmt.MAX_NDIM:  # [W4]: what readers refuse by default is not written
            raise LimitError(f"tensor {name!r}: {value.ndim} dimensions, more than readers accept "
                             f"by default ({fmt.MAX_NDIM}) [ST4]")
        if code in PACKED_CODES:
            value = _packed(value, code, name)
        entries[name] = {"dtype": DTYPE_NAMES[code], "shape": list(value.shape)}
        order.append((-ITEMSIZE_BY_CODE[code], len(order), name, value))
    # [ST8]: data sorted by item size, largest first (stable), so every tensor is aligned to its
    # item size; the header keeps the caller's order, which is the order a reader lists.
    order.sort(key=lambda item: item[:2])
    position, arrays = 0, []
    for _, _, name, value in order:
        data = value.bytes if isinstance(value, _Packed) else value
        entries[name]["data_offsets"] = [position, position + data.nbytes]
        position += data.nbytes
        arrays.append(data)
    header: Dict[str, Any] = {}
    plain = encode_metadata(metadata, tree)
    if plain:
        header[METADATA_KEY] = plain
    header.update(entries)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False)
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: name the str that holds it
        for item in (*entries, *plain, *plain.values()):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise unicode_error(exc, entries, "[ST2]") from None
        raise
    raw += b" " * (-(LENGTH_SIZE + len(raw)) % 8)  # data starts on an 8-byte boundary
    return Planned(len(raw).to_bytes(LENGTH_SIZE, "little") + raw, arrays)


class _Packed(NamedTuple):
    """A tensor of a packed code: its shape (the header's) and its packed bytes (lazily)."""

    shape: Tuple[int, ...]
    bytes: LazyArray


def _packed(value: Any, code: int, name: str) -> _Packed:
    """A tensor of F4 or F6 as safetensors holds it: a whole number of packed bytes [ST5].

    Raises:
        InvalidValueError: its ``size x bits`` is not a multiple of 8 (safetensors refuses a
            tensor that ends inside a byte), naming the tensor and the way out.
    """
    count = int(np.prod(value.shape, dtype=object))
    bits = count * BITS_BY_CODE[code]
    if bits % 8:
        raise InvalidValueError(
            f"tensor {name!r}: {count} elements of {NAME_BY_CODE[code]} are {bits} bits, not a whole "
            f"number of bytes, which safetensors cannot hold [ST5]; pad it to a multiple of "
            f"{8 // math.gcd(8, BITS_BY_CODE[code])} elements, or save as .sckpt")

    def load() -> np.ndarray:
        return pack(value.load() if isinstance(value, LazyArray) else value, code)
    return _Packed(tuple(value.shape), LazyArray(np.uint8, (bits // 8,), load))


def save_file(tensors: Mapping[str, Any], path: Union[PathLike, RemotePath], *,
              metadata: Optional[Mapping[str, Any]] = None, tree: Any = fmt.NO_TREE,
              atomic: bool = True, progress: Optional[Callable[[int], None]] = None) -> None:
    """Write ``{name: array}`` as a .safetensors file that any safetensors reader loads.

    As every save, it writes a new file, never into the one at ``path`` (FORMAT.md [W3]).

    Parameters:
        tensors: names to numpy arrays (or :class:`safeckpt.writer.LazyArray`) of the dtypes
            of FORMAT.md section 4 that safetensors has (section 10); float4_e2m1fn and the
            float6 types are written packed, a whole number of bytes each.
        path: a str, bytes or path-like; not a ``*.sckpt`` name, nor one of a format that
            safeckpt does not write (``.pt``, ``.npz``, ...). Or a remote object
            (:class:`safeckpt.remote.RemotePath`), streamed and visible only once whole [RS7].
        metadata: our metadata (any msgpack primitives); see the module docstring for the mapping.
        tree: an encoded skeleton (FORMAT.md section 8) to keep in ``__safeckpt__`` [ST9].
        atomic: as for :func:`safeckpt.save_file` [W2].
        progress: called as ``progress(nbytes)`` after each tensor is written.

    Raises:
        InvalidValueError, UnsupportedDtypeError: naming the tensor, metadata key or path.
        LimitError: more dimensions than readers accept by default [W4].

    Warns:
        UserWarning: the header or the tensor count is over the readers' default limit [W4].

    Example:
        >>> save_file({"w": np.zeros(2)}, "w.safetensors", metadata={"step": 3})  # doctest: +SKIP
    """
    target, kind = destination_format(path)
    if kind == "sckpt":
        where = target.url if isinstance(target, RemotePath) else repr(target)
        raise InvalidValueError(f"{where}: a .sckpt name for a safetensors file; name it "
                                "*.safetensors (safeckpt.save_file writes .sckpt files)")
    write(plan(tensors, metadata, tree), target, atomic=atomic, progress=progress)


def write(planned: Planned, path: Union[str, RemotePath], *, atomic: bool = True,
          progress: Optional[Callable[[int], None]] = None) -> None:
    """Write a :func:`plan` to ``path`` as a new file [W2], [W3], or as a stream into a remote
    object [RS7] (the name is the caller's to check); ``atomic`` and ``progress`` as for
    :func:`save_file`.

    Warns:
        UserWarning: the header or the tensor count is over the readers' default limit [W4].
    """
    head, arrays = planned
    warn_beyond_reader_defaults(len(head) - LENGTH_SIZE, len(arrays), "[ST1]", "[ST3]")
    if isinstance(path, RemotePath):
        with path.open_write() as out:
            _stream(planned, out, progress)
        return
    with _fs.new_file(path, atomic) as fd, open(fd, "wb", closefd=False) as f:
        _stream(planned, f, progress)


def _stream(planned: Planned, out: BinaryIO, progress: Optional[Callable[[int], None]]) -> None:
    """Write the file in order to ``out``: its header, then each array in pieces of at most
    :data:`safeckpt.writer.PIECE` bytes (no checksums: one pass)."""
    stream_array(out, np.frombuffer(planned.head, np.uint8))
    for array in planned.arrays:
        stream_array(out, array)
        if progress is not None:
            progress(array.nbytes)
