"""Reading .safetensors files with the strictness of our own format (writing them:
:mod:`safeckpt.safetensors_writer`).

The safetensors format, as this module reads it (rule names [ST1]-[ST9] are used in messages):

- **[ST1]** The file starts with ``N``, an unsigned 64-bit little-endian integer: the length of the
  header. ``N`` MUST NOT exceed ``max_header_size`` (checked before anything is read or allocated;
  ``LimitError``) and ``8 + N`` MUST NOT exceed the file size (``TruncatedFileError``).
- **[ST2]** The ``N`` header bytes MUST be UTF-8 and start with ``{`` (whitespace before it is
  refused, and said so: a file is still recognised as safetensors when its length is followed by
  JSON whitespace and ``{``); they hold exactly one JSON object, which MAY be followed by JSON
  whitespace (writers pad the header with spaces to a multiple of 8). Duplicate keys, the
  constants ``NaN``/``Infinity``, and strings that are not valid Unicode are refused; nesting is
  bounded by the decoder's recursion limit. (``HeaderError``, ``LimitError``)
- **[ST3]** The key ``__metadata__``, when present, MUST map str keys to str values. Every other key
  is a non-empty tensor name; at most ``max_tensors`` of them. (``HeaderError``, ``LimitError``)
- **[ST4]** A tensor entry MUST be an object with exactly the keys ``dtype`` (a str of the table
  below), ``shape`` (an array of ints ``0 <= d < 2**63``, at most ``max_ndim`` of them, and never
  more than numpy holds) and ``data_offsets`` (two ints ``[begin, end]``, ``0 <= begin <= end <
  2**63``). An int is a JSON number without sign, fraction or exponent, as serde_json (which
  defines the header) reads a ``usize``: ``-0``, ``1.0`` and ``1e2`` are floats there, and
  refused here. A value of another JSON type is a ``HeaderError`` naming the tensor.
  (``HeaderError``, ``UnsupportedDtypeError``, ``LimitError``)
- **[ST5]** The product of the non-zero dimensions times the item size MUST be below 2**63 (as
  [T4] of our format, and numpy's own limit: a zero dimension does not make ``[0, 2**62]`` of F32
  readable; the item size of F4 and F6 is numpy's, 1), checked as it is built. ``prod(shape) x
  bits`` MUST be a multiple of 8 (safetensors refuses a tensor that ends inside a byte, its
  ``MisalignedSlice``), and ``end - begin`` MUST equal ``prod(shape) x bits / 8``, which is 0 when
  a dimension is 0. (``LayoutError``)
- **[ST6]** Sorted by ``(begin, end)``, the tensors MUST be contiguous: the first begins at 0 and
  each begins where the previous one ends (no gap, no overlap). (``LayoutError``)
- **[ST7]** The last ``end`` MUST be exactly the size of the data (the file size minus ``8 + N``):
  a shorter file is ``TruncatedFileError``, trailing bytes are ``LayoutError`` (no polyglots).
- **[ST8]** Offsets count from the first byte after the header. Tensor data needs no alignment
  (numpy reads unaligned arrays); files written here keep every tensor aligned to its item size.
- **[ST9]** The metadata key ``__safeckpt__`` is ours: base64 of a msgpack map ``{"metadata": {...},
  "tree": ...}`` holding the metadata values that are not str and the tree (FORMAT.md section 8) of
  a .sckpt file converted to safetensors, so that converting back loses nothing. It is decoded
  with the rules of our own header ([H1]-[H3], [H7], [R1]-[R6]). (``HeaderError``)

Dtypes (FORMAT.md section 10 has the table): safetensors' F4, F6_E2M3, F6_E3M2 and F8_E8M0 are our
codes 26, 24, 25 and 22. F4 and F6 are packed as FORMAT.md section 4 packs codes 24-26 (a bit stream,
least significant bit first): for F4 that is the order safetensors itself uses (it writes and reads
torch.float4_e2m1fn_x2's bytes, element 0 in the low nibble); for F6 safetensors (0.8) documents no
order and no library writes it, so the order is ours. Codes with no safetensors name (16, 19-21, 23,
27-34) are refused when writing a .safetensors file, naming the tensor.

Metadata mapping: safetensors metadata is str -> str. A .sckpt file's metadata entries whose value
is a str are written as they are (every safetensors tool sees them); all other values (ints, lists,
bytes, ...) and the tree go, exactly, into ``__safeckpt__`` [ST9]. Reading merges them back, so
``.sckpt -> .safetensors -> .sckpt`` keeps metadata, tree and tensors bit for bit.

Example:
    >>> import numpy as np, safeckpt, tempfile, os
    >>> from safeckpt import safetensors_writer
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> w = np.arange(3, dtype=np.float32)
    >>> safetensors_writer.save_file({"w": w}, path, metadata={"format": "np"})
    >>> with safeckpt.open(path) as f:                         # the format is detected
    ...     f.format, f.metadata, f["w"].tolist()
    ('safetensors', {'format': 'np'}, [0.0, 1.0, 2.0])
"""

from __future__ import annotations

import base64
import binascii
import collections.abc
import json
import reprlib
from typing import Any, Callable, Dict, NoReturn, Sequence, Tuple, Union

import msgpack

from . import format as fmt
from .dtypes import BITS_BY_CODE, ITEMSIZE_BY_CODE, NUMPY_MAX_NDIM
from .errors import (TRUNCATED_HINT, HeaderError, LayoutError, LimitError, SafeckptError,
                     TruncatedFileError, UnsupportedDtypeError)

LENGTH_SIZE = 8  # the u64 header length [ST1]
METADATA_KEY = "__metadata__"
SAFECKPT_KEY = "__safeckpt__"  # our lossless extras in the metadata [ST9]
TENSOR_KEYS = frozenset(("dtype", "shape", "data_offsets"))
HEADER_WHERE = "the safetensors header [ST2]"  # how the JSON hooks name a header in messages
_LIMIT = 1 << 63  # dims, offsets and byte sizes stay below it, as in our format [T3, T4]
_JSON_SPACE = " \t\n\r"  # JSON's whitespace (RFC 8259)
# Bad values are quoted in messages within a few dozen characters, however large or deep they are.
_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxlong, _SHOW.maxother = 2, 40, 40, 40
_SHOW.maxlist = _SHOW.maxdict = 4

# safetensors dtype string <-> our dtype code (FORMAT.md sections 4 and 10). The codes safetensors
# has no name for (complex128, the other float8s, int4 .. uint1, complex32) are refused when writing.
DTYPE_CODES = {
    "BOOL": 0, "I8": 1, "I16": 2, "I32": 3, "I64": 4, "U8": 5, "U16": 6, "U32": 7, "U64": 8,
    "F16": 9, "F32": 10, "F64": 11, "BF16": 12, "F8_E4M3": 13, "F8_E5M2": 14, "C64": 15,
    "F8_E4M3FNUZ": 17, "F8_E5M2FNUZ": 18, "F8_E8M0": 22, "F6_E2M3": 24, "F6_E3M2": 25, "F4": 26,
}
DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}

Table = collections.namedtuple("Table", "names codes ndims dims offsets nbytes metadata tree")
Table.__doc__ = """A validated safetensors header, in the shape of our tensor table: ``codes`` and
``ndims`` are bytes, ``dims`` the flat shape list, ``offsets`` absolute file offsets."""


def looks_like(prefix: bytes) -> bool:
    """Whether the first bytes of a file are a safetensors header (u64 length, then ``{``) [ST2].

    JSON whitespace before the ``{`` still counts, so that :func:`parse` refuses such a header
    saying why. Our own files start with ``\\x89SCK``, so the two formats never overlap.
    """
    body = bytes(prefix[LENGTH_SIZE:]).lstrip(_JSON_SPACE.encode())
    return len(prefix) > LENGTH_SIZE and body[:1] == b"{" and not prefix.startswith(fmt.MAGIC[:4])


def unique_object(pairs: Sequence[Tuple[Any, Any]], where: str = HEADER_WHERE) -> Dict[Any, Any]:
    """json object_pairs_hook: a dict, refusing a key given twice [ST2]; ``where`` names the JSON
    text in the message (``functools.partial(unique_object, where="the index [HF1]")``).

    Raises:
        HeaderError: "duplicate JSON key in <where>: <key>".
    """
    return fmt.unique_pairs(pairs, f"JSON key in {where}")


def refuse_constant(name: str, where: str = HEADER_WHERE) -> NoReturn:
    """json parse_constant: NaN and Infinity are not JSON [ST2]; ``where`` as for
    :func:`unique_object`.

    Raises:
        HeaderError: always, "JSON constant <name> is not allowed in <where>".
    """
    raise HeaderError(f"JSON constant {name} is not allowed in {where}")


def _check_str(value: str, what: str) -> None:
    """A str that is valid Unicode (json accepts lone surrogates such as "\\ud800")."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise HeaderError(f"{what} {value!r} is not valid Unicode [ST2]") from None


def _json_int(literal: str) -> Union[int, float]:
    """json's ``parse_int``: serde_json reads ``-0`` as the float -0.0, so no int here [ST4]."""
    return -0.0 if literal == "-0" else int(literal)


def _uint(value: Any, what: str, name: str) -> int:
    if type(value) is not int or not 0 <= value < _LIMIT:
        raise HeaderError(f"tensor {name!r}: {what} {_SHOW.repr(value)} must be an int in "
                          "0 .. 2**63-1, written without sign, fraction or exponent [ST4]")
    return value


def parse(read: Callable[[int, int], Union[bytes, memoryview]], size: int, *, where: str,
          max_header_size: int = fmt.MAX_HEADER_SIZE, max_tensors: int = fmt.MAX_TENSORS,
          max_ndim: int = fmt.MAX_NDIM, max_depth: int = fmt.MAX_DEPTH) -> Table:
    """Validate a safetensors file [ST1]-[ST9] and return its :class:`Table`.

    Parameters:
        read: ``read(offset, length)`` returns that many bytes of the file (bounds checked here).
        size: the file size in bytes.
        where: names the file in messages.

    Raises:
        LimitError, TruncatedFileError, HeaderError, LayoutError, UnsupportedDtypeError: naming the
            file, the tensor and the bad value.
    """
    if size < LENGTH_SIZE:
        raise TruncatedFileError(f"{where}: file is shorter than the 8-byte header length "
                                 f"({TRUNCATED_HINT}) [ST1]")
    header_len = int.from_bytes(bytes(read(0, LENGTH_SIZE)), "little")
    if header_len > max_header_size:
        raise LimitError(f"{where}: safetensors header is larger than max_header_size: {header_len} > "
                         f"{max_header_size}; pass max_header_size=... if you trust this file [ST1]")
    if header_len > size - LENGTH_SIZE:
        raise TruncatedFileError(f"{where}: safetensors header of {header_len} bytes runs past the "
                                 f"end of the file ({size} bytes; {TRUNCATED_HINT}) [ST1]")
    raw = bytes(read(LENGTH_SIZE, header_len))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"{where}: safetensors header is not UTF-8: {exc} [ST2]") from None
    if not text.startswith("{"):
        if text.lstrip(_JSON_SPACE).startswith("{"):
            raise HeaderError(f"{where}: safetensors header has whitespace before '{{'; the format "
                              "requires '{' as its first byte [ST2]")
        raise HeaderError(f"{where}: safetensors header does not start with '{{' [ST2]")
    try:
        with fmt.collector_paused():
            header = json.loads(text.rstrip(" "), object_pairs_hook=unique_object,
                                parse_constant=refuse_constant, parse_int=_json_int)
    except HeaderError as exc:
        raise HeaderError(f"{where}: {exc}") from None
    except RecursionError:
        raise LimitError(f"{where}: safetensors header nesting is too deep to decode [ST2]") from None
    except ValueError as exc:  # json.JSONDecodeError, or an int of more than 4300 digits
        raise HeaderError(f"{where}: safetensors header is not one JSON object: {exc} [ST2]") from None
    if type(header) is not dict:  # cannot happen after '{', but say so rather than assume
        raise HeaderError(f"{where}: safetensors header is not a JSON object [ST2]")
    try:
        return _table(header, header_len, size, max_tensors, max_ndim, max_depth, where)
    except SafeckptError as exc:
        if str(exc).startswith(where):
            raise
        raise type(exc)(f"{where}: {exc}") from None


def _table(header: Dict[str, Any], header_len: int, size: int, max_tensors: int, max_ndim: int,
           max_depth: int, where: str) -> Table:
    metadata = header.pop(METADATA_KEY, {})
    if type(metadata) is not dict:
        raise HeaderError(f"'{METADATA_KEY}' must be an object of str -> str, "
                          f"not {type(metadata).__name__} [ST3]")
    for key, value in metadata.items():
        _check_str(key, "metadata key")
        if type(value) is not str:
            raise HeaderError(f"metadata[{key!r}]: {_SHOW.repr(value)} is not a str [ST3]")
        _check_str(value, f"metadata[{key!r}]")
    if len(header) > max_tensors:
        raise LimitError(f"file has {len(header)} tensors, more than max_tensors={max_tensors}; "
                         "pass max_tensors=... if you trust this file [ST3]")
    names, codes, ndims, dims, begins, ends = list(header), [], [], [], [], []
    for name, entry in header.items():
        if not name:
            raise HeaderError("tensor name '' is not a non-empty str [ST3]")
        _check_str(name, "tensor name")
        if type(entry) is not dict or entry.keys() != TENSOR_KEYS:
            got = sorted(entry) if type(entry) is dict else type(entry).__name__
            raise HeaderError(f"tensor {name!r}: entry must be an object with exactly the keys "
                              f"dtype, shape and data_offsets, not {got} [ST4]")
        dtype, shape, span = entry["dtype"], entry["shape"], entry["data_offsets"]
        if type(dtype) is not str:
            raise HeaderError(f"tensor {name!r}: dtype must be a str such as 'F32', not "
                              f"{_SHOW.repr(dtype)} [ST4]")
        code = DTYPE_CODES.get(dtype)
        if code is None:
            raise UnsupportedDtypeError(f"tensor {name!r}: unknown safetensors dtype "
                                        f"{_SHOW.repr(dtype)}; known: {', '.join(DTYPE_CODES)} "
                                        "[ST4]")
        if type(shape) is not list:
            raise HeaderError(f"tensor {name!r}: shape must be an array of ints, not "
                              f"{_SHOW.repr(shape)} [ST4]")
        if len(shape) > max_ndim:
            raise LimitError(f"tensor {name!r}: {len(shape)} dimensions > max_ndim={max_ndim}; pass "
                             "max_ndim=... to allow it [ST4]")
        if len(shape) > NUMPY_MAX_NDIM:
            raise LimitError(f"tensor {name!r}: {len(shape)} dimensions, more than numpy holds "
                             f"({NUMPY_MAX_NDIM}) [ST4]")
        if type(span) is not list or len(span) != 2:
            raise HeaderError(f"tensor {name!r}: data_offsets must be [begin, end], not "
                              f"{_SHOW.repr(span)} [ST4]")
        begin, end = (_uint(x, "data offset", name) for x in span)
        if end < begin:
            raise LayoutError(f"tensor {name!r}: data_offsets {span} end before they begin [ST4]")
        count, empty = ITEMSIZE_BY_CODE[code], False
        for d in shape:  # every dimension, zero or not: [0, 2**62] of F32 is too large for numpy
            if _uint(d, "dimension", name) == 0:
                empty = True
                continue
            count *= d
            if count >= _LIMIT:
                raise LayoutError(f"tensor {name!r}: shape {_SHOW.repr(shape)} of {dtype} is too "
                                  "large (its non-zero dimensions make 2**63 bytes or more) [ST5]")
        bits = 0 if empty else count * BITS_BY_CODE[code] // ITEMSIZE_BY_CODE[code]
        if bits % 8:
            raise LayoutError(f"tensor {name!r}: shape {shape} of {dtype} is {bits} bits, not a "
                              "whole number of bytes, which safetensors cannot hold [ST5]")
        if bits // 8 != end - begin:
            raise LayoutError(f"tensor {name!r}: {end - begin} bytes in data_offsets {span}, but "
                              f"shape {shape} of {dtype} needs {bits // 8} [ST5]")
        codes.append(code)
        ndims.append(len(shape))
        dims.extend(shape)
        begins.append(begin)
        ends.append(end)
    data_size = size - LENGTH_SIZE - header_len
    position = 0
    for i in sorted(range(len(names)), key=lambda i: (begins[i], ends[i])):
        if begins[i] != position:
            problem = "leaves a gap after" if begins[i] > position else "overlaps"
            raise LayoutError(f"tensor {names[i]!r}: data_offsets [{begins[i]}, {ends[i]}] "
                              f"{problem} the previous tensor (ending at {position}) [ST6]")
        position = ends[i]
    if position > data_size:
        raise TruncatedFileError(f"tensor data ends at {position} but the file holds {data_size} "
                                 f"bytes of data ({TRUNCATED_HINT}) [ST7]")
    if position < data_size:
        raise LayoutError(f"{data_size - position} trailing bytes after the last tensor [ST7]")
    base = LENGTH_SIZE + header_len
    metadata, tree = decode_extras(metadata, max_depth)
    return Table(names, bytes(codes), bytes(ndims), dims, [base + b for b in begins],
                 [e - b for b, e in zip(begins, ends)], metadata, tree)


def decode_extras(metadata: Dict[str, Any], max_depth: int) -> Tuple[Dict[str, Any], Any]:
    """Merge ``__safeckpt__`` [ST9] back into the metadata; return ``(metadata, raw tree)``.

    For a file's metadata (str values) and a Hugging Face index's (any JSON values); the tree is
    returned unchecked (the caller checks it against its tensor names).

    Raises:
        HeaderError: ``__safeckpt__`` is not base64 of one msgpack map of that schema, or one
            of its keys is also a plain entry.
    """
    blob = metadata.pop(SAFECKPT_KEY, None)
    if blob is None:
        return metadata, fmt.NO_TREE
    if type(blob) is not str:
        raise HeaderError(f"metadata[{SAFECKPT_KEY!r}] must be a str (base64), not "
                          f"{type(blob).__name__} [ST9]")
    try:
        with fmt.collector_paused():
            extras = msgpack.unpackb(base64.b64decode(blob, validate=True), raw=False,
                                     strict_map_key=False, object_pairs_hook=fmt.unique_pairs,
                                     timestamp=0)
    except HeaderError:
        raise
    except (binascii.Error, ValueError, TypeError, msgpack.ExtraData, msgpack.StackError,
            msgpack.FormatError) as exc:
        raise HeaderError(f"metadata[{SAFECKPT_KEY!r}] is not base64 of one msgpack map: {exc} "
                          "[ST9]") from None
    if type(extras) is not dict or not extras.keys() <= {"metadata", "tree"}:
        raise HeaderError(f"metadata[{SAFECKPT_KEY!r}] must be a map with the keys 'metadata' and "
                          "'tree' [ST9]")
    more = extras.get("metadata", {})
    if type(more) is not dict:
        raise HeaderError(f"metadata[{SAFECKPT_KEY!r}]['metadata'] must be a map [ST9]")
    fmt.walk_metadata(more, max_depth, HeaderError)
    clash = more.keys() & metadata.keys()
    if clash:
        raise HeaderError(f"metadata key {sorted(clash)[0]!r} is both a str entry and in "
                          f"{SAFECKPT_KEY!r} [ST9]")
    metadata.update(more)
    return metadata, extras.get("tree", fmt.NO_TREE)
