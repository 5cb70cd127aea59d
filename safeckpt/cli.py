"""The ``safeckpt`` command: ``inspect``, ``verify``, ``convert``, ``consolidate`` and ``diff``.

A checkpoint may refer to tensors stored in other files of its directory (an incremental
checkpoint, FORMAT.md section 11): ``inspect`` lists those files and which file holds each tensor,
``verify`` checks each of them [X5] and the referred bytes [X6] and says what it checked where,
and ``convert`` or ``consolidate`` writes a self-contained copy. Neither replaces a file that
another checkpoint refers to [X8].

Exit codes (stable; scripts may test them):

====  ==============================================================================
0     success; ``diff``: the files hold the same tensors, bit for bit, and metadata
1     ``diff``: the files differ
2     usage: a bad option or argument, an unknown output extension, an output that another
      checkpoint refers to (never a file's fault)
3     bad file: not a checkpoint, malformed, truncated, over a limit, needs pickle
4     checksum mismatch: a tensor's or the header's CRC32C (``verify``; ``convert`` and
      ``consolidate`` check the bytes they copy too)
5     not found: a file or a shard that does not exist
6     other OS error: permission denied, a directory, a full disk, out of memory
7     a needed optional package is missing (torch, to read a .pt file)
8     ``verify``: the structure is sound but a file holds no checksums, so its data is unverified
9     remote storage failed: an error status, a timeout, a lost connection, a response of the
      wrong length, an object that changed while it was read (a missing object is 5)
70    a bug in safeckpt (an unexpected exception; ``--traceback`` shows where): please report it
====  ==============================================================================

``verify`` over several files exits with the code of the first file that failed; 8 only when
none failed. Problems are reported on stderr as one line, ``safeckpt: error: ...``, without a
traceback. Everything printed that comes from a file (names, keys, values, messages that quote
them) is escaped as :func:`repr` escapes it, so a file cannot send control sequences to the
terminal.

Every FILE, SRC and DST may be an fsspec URL (``s3://``, ``gs://``, ``az://``, ``http(s)://``;
FORMAT.md section 12; ``pip install 'safeckpt[remote]'`` and the filesystem's package, e.g.
s3fs): a remote file is read with ranged requests, never downloaded whole. ``--storage-option
KEY=VALUE`` (repeatable) passes options to the URLs' filesystem; a VALUE that parses as JSON is
that value (``anon=true``, ``client_kwargs={"region_name": "eu-west-1"}``), any other is a
string (quote one that looks like JSON: ``key='"1234"'``). An S3-compatible server: ``--storage-option endpoint_url=http://127.0.0.1:9000``
(s3fs's own option; credentials come from the environment, or ``key=...`` and ``secret=...``).

Example:
    $ safeckpt inspect model.sckpt --json | jq '.tensors[0]'
    $ safeckpt inspect s3://bucket/model.sckpt --storage-option endpoint_url=http://127.0.0.1:9000
    $ safeckpt verify *.sckpt && echo intact
    $ safeckpt convert model.safetensors model.sckpt
    $ safeckpt convert model.sckpt hf/model.safetensors --max-shard-size 5GB
    $ safeckpt consolidate ckpt/step-0000000030.sckpt      # copy in what it refers to, in place
    $ safeckpt diff before.sckpt after.sckpt --max-header-size 200000000
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import math
import os
import re
import sys
import traceback
from typing import Any, Callable, Iterable, Iterator, NoReturn, Sequence, TextIO

import numpy as np

from ._version import __version__
from . import api
from . import interop as _convert
from . import format as fmt
from . import refs as _refs
from . import remote as _remote
from . import shard as _shard
from . import tree as _tree
from .dtypes import DTYPE_BY_CODE
from .errors import ChecksumError, RemoteError, SafeckptError, plural, quote
from .reader import TensorInfo, TensorMap
from .writer import LazyArray

EXIT_OK = 0
EXIT_DIFFERENT = 1
EXIT_USAGE = 2
EXIT_BAD_FILE = 3
EXIT_CHECKSUM = 4
EXIT_NOT_FOUND = 5
EXIT_OS_ERROR = 6
EXIT_MISSING_PACKAGE = 7
EXIT_NO_CHECKSUMS = 8
EXIT_REMOTE = 9
EXIT_BUG = 70  # EX_SOFTWARE of sysexits.h: an internal error

PROGRESS_MIN_BYTES = 64 << 20  # below this a conversion takes well under a second: no bar
DIFF_CHUNK = 1 << 20  # elements compared at a time, so diff needs no copy of a whole tensor
OUTLINE_MAX_LINES = 200  # inspect's outline of the tree (--json writes all of it)
VALUE_MAX = 200  # characters of a metadata value that inspect shows (--json writes all of it)
JSON_BATCH = 1 << 16  # characters of JSON text written at a time
JSON_INT_MAX = 2**53  # beyond this a JSON reader that uses doubles (JavaScript, jq) rounds an int

# The reader limits (keyword argument: metavar, what it bounds); the flag of max_header_size is
# --max-header-size, and messages that advise "max_header_size=..." are shown with the flag.
LIMITS = {"max_header_size": ("BYTES", "largest header"), "max_tensors": ("N", "most tensors"),
          "max_ndim": ("N", "most dimensions of a tensor"), "max_depth": ("N", "deepest nesting")}
# convert and diff also take max_expansion: how many times its size a .npz or torch file may expand
EXPANSION = "max_expansion"
# The library's keyword arguments that messages name, as the CLI's flags (not when quoted)
_FLAGS = {**{name: "--" + name.replace("_", "-") for name in [*LIMITS, EXPANSION]},
          "storage_options": "--storage-option"}
_FLAG_WORD = re.compile(r"(?<![\w'\"])(" + "|".join(_FLAGS) + r")\b")


class _Usage(Exception):
    """A usage problem found after argument parsing (exit code 2)."""


def _escape(text: str, *, backslash: bool = True) -> str:
    r"""``text`` with every character a terminal acts on written as :func:`repr` writes it.

    Control characters (C0, C1, DEL, so ESC and newlines), format characters (bidi overrides such
    as U+202E, zero-width characters), separators other than the space, lone surrogates and
    unassigned code points are escaped; letters, digits, punctuation and symbols of every script
    stay readable. With ``backslash`` (for names and values from a file), a backslash is doubled,
    so that a name holding the four characters ``\x1b`` never looks like one holding ESC.

    Example:
        >>> _escape("w\x1b[2J\u202e.é")
        'w\\x1b[2J\\u202e.é'
    """
    if text.isprintable() and not (backslash and "\\" in text):
        return text
    return "".join(repr(c)[1:-1] if not c.isprintable() or (backslash and c == "\\") else c
                   for c in text)


def _say(stream: TextIO, line: str) -> None:
    """Write one line; whatever it quotes from a file cannot act on the terminal."""
    stream.write(_escape(line, backslash=False) + "\n")


def _exit_code(exc: BaseException) -> int:
    """The exit code for an exception that ends a command (EXIT_BUG for one we did not expect)."""
    if isinstance(exc, ChecksumError):
        return EXIT_CHECKSUM
    if isinstance(exc, RemoteError):  # a SafeckptError and an OSError: the storage, not the file
        return EXIT_REMOTE
    if isinstance(exc, SafeckptError):
        return EXIT_BAD_FILE
    if isinstance(exc, FileNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(exc, (OSError, MemoryError)):
        return EXIT_OS_ERROR
    if isinstance(exc, ImportError):
        return EXIT_MISSING_PACKAGE
    if isinstance(exc, _Usage):
        return EXIT_USAGE
    return EXIT_BUG


def _message(exc: BaseException) -> str:
    """The message of an exception, the keyword arguments its advice names (limits,
    storage_options) spelled as the CLI's flags."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, MemoryError):
        return f"out of memory: {exc}" if str(exc) else "out of memory"
    return _FLAG_WORD.sub(lambda m: _FLAGS[m.group(1)], str(exc))


def _report(exc: BaseException, args: argparse.Namespace) -> int:
    """Print the one line for an exception that ends a command (or a file of ``verify``)."""
    code = _exit_code(exc)
    if code != EXIT_BUG:
        _say(sys.stderr, f"safeckpt: error: {_message(exc)}")
        return code
    if getattr(args, "traceback", False):
        for line in "".join(traceback.format_exception(exc)).splitlines():
            _say(sys.stderr, line)
    _say(sys.stderr, "safeckpt: internal error (a bug in safeckpt; please report it, with the "
                     f"output of --traceback): {type(exc).__name__}: {exc}")
    return code


def _open_checkpoint(path: str, args: argparse.Namespace) -> TensorMap:
    """``safeckpt.open(path)`` with the limits (and, for a URL, the storage options) given (a .pt
    or .npz: the error says to convert)."""
    return api.open(path, **_limits(args), **_storage(args, path))


def _file_of(reader: TensorMap) -> Callable[[str], str] | None:
    """For a checkpoint held in several files (shards, or references into other files of its
    directory): the plain name of the file that holds a tensor. None for a single file."""
    if not getattr(reader, "shards", None):
        return None
    return lambda name: os.path.basename(reader.shard_of(name) or "")


def _references(reader: TensorMap) -> list[tuple[str, int, int]]:
    """``(file, tensors, bytes)`` for each other file that the checkpoint refers to (FORMAT.md
    section 11), in the order of its ``refs``; empty for a self-contained checkpoint."""
    references = getattr(reader, "references", None)
    return references() if references is not None else []


# -- inspect ----------------------------------------------------------------------------------------

def _human(n: float) -> str:
    """``n`` bytes for a person: ``512 B``, ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class _Lazy:
    """A JSON array (or object, of ``(str key, value)`` pairs) whose items are made only when
    :func:`_json_pieces` reaches them: no copy of a file's values is ever built whole."""

    __slots__ = ("items", "is_object")
    items: Iterable[Any]  # values, or (str key, value) pairs of an object
    is_object: bool

    def __init__(self, items: Iterable[Any], is_object: bool = False) -> None:
        self.items, self.is_object = items, is_object


def _object(pairs: Iterable[tuple[str, Any]]) -> _Lazy:
    """A lazy JSON object of ``(key, value)`` pairs."""
    return _Lazy(pairs, is_object=True)


def _jsonable(value: Any) -> Any:
    r"""Any metadata or tree value as JSON, without loss and without NaN (strict JSON), lazily.

    None, bool, str, finite floats, lists and dicts of str keys are themselves; the rest are
    tagged objects: ``{"int": "18446744073709551615"}`` beyond 2**53 (where readers that use
    doubles round), ``{"float": "nan"}`` (and ``"inf"``, ``"-inf"``), ``{"complex": [re, im]}``,
    ``{"base64": ...}`` for bytes, ``{"type": "tuple", "items": [...]}``, ``{"type": "dict",
    "items": [[key, value], ...]}`` when a key is not a str, numpy scalars as their Python value,
    and ``{"repr": ...}`` for any other type (a valid file holds none). A container becomes a
    :class:`_Lazy` whose items are converted as they are written, so this costs O(1).

    Example:
        >>> json.loads("".join(_json_pieces(_jsonable((float("nan"), b"\x00")))))
        {'type': 'tuple', 'items': [{'float': 'nan'}, {'base64': 'AA=='}]}
    """
    kind = type(value)
    if value is None or kind in (bool, str):
        return value
    if kind is int:
        return value if -JSON_INT_MAX <= value <= JSON_INT_MAX else _object([("int", str(value))])
    if kind is float:
        return value if math.isfinite(value) else _object([("float", str(value))])
    if kind is complex:
        return _object([("complex", _Lazy([_jsonable(value.real), _jsonable(value.imag)]))])
    if kind in (bytes, bytearray):
        return _object([("base64", base64.b64encode(value).decode("ascii"))])
    if kind is list:
        return _Lazy(map(_jsonable, value))
    if kind is tuple:
        return _object([("type", "tuple"), ("items", _Lazy(map(_jsonable, value)))])
    if isinstance(value, dict):
        if all(type(k) is str for k in value):
            return _object((k, _jsonable(v)) for k, v in value.items())
        return _object([("type", "dict"), ("items", _Lazy(_Lazy((_jsonable(k), _jsonable(v)))
                                                          for k, v in value.items()))])
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return _object([("repr", repr(value))])


_END = object()


def _json_pieces(value: Any) -> Iterator[str]:
    """``value`` (JSON scalars and :class:`_Lazy` containers, nested) as JSON text, piece by
    piece, laid out as ``json.dump(value, indent=2)`` lays it out; ASCII only.

    Memory grows with the nesting depth, never with the number of items, and nothing recurses.
    """
    stack: list[tuple[Iterator[Any], bool]] = []  # the open containers: items, whether an object
    text = ""  # to write before the next piece
    while True:
        item: Any = _END
        if type(value) is _Lazy:
            items = iter(value.items)
            item = next(items, _END)
            if item is _END:
                yield text + ("{}" if value.is_object else "[]")
            else:
                stack.append((items, value.is_object))
                text += "{" if value.is_object else "["
        else:
            yield text + _json_scalar(value)
        if item is _END:  # the value is written: on to the next item, closing finished containers
            while stack:
                item = next(stack[-1][0], _END)
                if item is not _END:
                    text = ","
                    break
                is_object = stack.pop()[1]
                yield "\n" + "  " * len(stack) + ("}" if is_object else "]")
            else:
                return
        text += "\n" + "  " * len(stack)
        if stack[-1][1]:
            key, value = item
            text += _json_str(key) + ": "
        else:
            value = item


_json_str = json.encoder.encode_basestring_ascii  # what json.dump uses (ensure_ascii)


def _json_scalar(value: Any) -> str:
    """A JSON scalar as json.dump writes it (a float is finite: see :func:`_jsonable`)."""
    kind = type(value)
    if kind is str:
        return _json_str(value)
    if kind is int:
        return int.__repr__(value)
    if kind is float:
        return float.__repr__(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    raise TypeError(f"not a JSON scalar: {type(value).__name__}")


def _write_json(out: TextIO, value: Any) -> None:
    """Write ``value`` (see :func:`_json_pieces`) to ``out`` in batches, then a newline."""
    batch: list[str] = []
    size = 0
    for piece in _json_pieces(value):
        batch.append(piece)
        size += len(piece)
        if size >= JSON_BATCH:
            out.write("".join(batch))
            batch, size = [], 0
    out.write("".join(batch) + "\n")


def _shown(value: Any) -> str:
    """A metadata value for a person: :func:`quote`'s ``repr`` of at most about ``VALUE_MAX``
    characters; a value cut short says how large it is.

    Example:
        >>> _shown([[]] * 300000)[-40:]
        '(300,000 items in all; --json shows all)'
    """
    text = quote(value, VALUE_MAX)
    if isinstance(value, (list, tuple, dict)):
        unit = "item"
    elif isinstance(value, str):
        unit = "character"
    elif isinstance(value, (bytes, bytearray)):
        unit = "byte"
    else:
        return text
    if len(text) <= VALUE_MAX and len(value) <= VALUE_MAX:
        return text
    unit += "" if len(value) == 1 else "s"
    return f"{text} ({len(value):,} {unit} in all; --json shows all)"


def _scalar(node: list[Any]) -> np.generic:
    """The numpy scalar of a tree's scalar node (FORMAT.md section 8)."""
    return np.frombuffer(node[2], DTYPE_BY_CODE[node[1]])[0]


def _children(node: list[Any]) -> Iterator[tuple[Any, Any]]:
    """A container node's ``(key, child)`` pairs, one at a time."""
    if node[0] in (_tree.DICT, _tree.ODICT):
        return zip(itertools.islice(node, 1, None, 2), itertools.islice(node, 2, None, 2))
    return enumerate(itertools.islice(node, 1, None))


def _outline(skeleton: Any, names: Sequence[str], infos: Sequence[TensorInfo]
             ) -> Iterator[str]:
    """The tree as indented lines (containers with their lengths; leaves with type or value),
    at most ``OUTLINE_MAX_LINES``, made one at a time."""
    stack: list[Iterator[tuple[Any, Any]]] = [iter([(None, skeleton)])]  # (key, node) per open
    count = 0  # container; lines made
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        if count == OUTLINE_MAX_LINES:
            yield f"... (outline cut at {OUTLINE_MAX_LINES} lines; --json shows all)"
            return
        count += 1
        key, node = entry
        label = "" if key is None else f"{quote(key)}: "
        pad = "  " * (len(stack) - 1)
        if type(node) is list and node[0] in _tree.CONTAINERS:
            size = (len(node) - 1) // 2 if node[0] in (_tree.DICT, _tree.ODICT) else len(node) - 1
            yield f"{pad}{label}{node[0]} ({size})"
            stack.append(_children(node))
        elif type(node) is list and node[0] in _tree.WRAPPERS:  # [R9] [R10]
            kind = "weak" if node[0] == _tree.WEAK else f"PRNG key ({node[1]}) of"
            inner = node[-1]
            if inner[0] == _tree.SCALAR:
                value = _scalar(inner)
                yield f"{pad}{label}{kind} {value.dtype} scalar {quote(value.item())}"
            else:
                info = infos[inner[1]]
                what = "tensor" if inner[0] == _tree.TENSOR else "same tensor as"
                yield (f"{pad}{label}{kind} {what} {_escape(names[inner[1]])} {info.dtype} "
                       f"{list(info.shape)}")
        elif type(node) is list and node[0] in (_tree.TENSOR, _tree.REF):
            info = infos[node[1]]
            kind = "tensor" if node[0] == _tree.TENSOR else "same tensor as"
            yield f"{pad}{label}{kind} {_escape(names[node[1]])} {info.dtype} {list(info.shape)}"
        elif type(node) is list and node[0] == _tree.SCALAR:
            value = _scalar(node)
            yield f"{pad}{label}{value.dtype} scalar {quote(value.item())}"
        else:
            yield f"{pad}{label}{quote(node)}"


def _json_tree(node: Any, names: Sequence[str]) -> Any:
    """The tree as JSON, lazily: containers as {"type", "items"}; tensors as {"tensor": name}."""
    if type(node) is not list:
        return _jsonable(node)
    tag = node[0]
    if tag == _tree.WEAK:  # [R9]
        return _object([("weak", _json_tree(node[1], names))])
    if tag == _tree.KEY:  # [R10]
        return _object([("key", node[1]), ("data", _json_tree(node[2], names))])
    if tag in (_tree.DICT, _tree.ODICT):
        return _object([("type", tag), ("items", _Lazy(
            _Lazy((_jsonable(key), _json_tree(child, names))) for key, child in _children(node)))])
    if tag in (_tree.LIST, _tree.TUPLE):
        return _object([("type", tag), ("items", _Lazy(
            _json_tree(child, names) for _, child in _children(node)))])
    if tag in (_tree.TENSOR, _tree.REF):
        return _object([("tensor", names[node[1]])])
    value = _scalar(node)
    return _object([("scalar", str(value.dtype)), ("value", _jsonable(value.item()))])


def _json_description(reader: TensorMap, path: str, names: Sequence[str],
                      infos: Sequence[TensorInfo], skeleton: Any) -> _Lazy:
    """What ``inspect --json`` writes, as a lazy JSON object."""
    version = getattr(reader, "version", None)
    save_id = getattr(reader, "save_id", None)
    file_of = _file_of(reader)
    own = os.path.basename(path)
    tensors = (_object([("name", i.name), ("dtype", str(i.dtype)), ("shape", _Lazy(i.shape)),
                        ("nbytes", i.nbytes), ("offset", i.offset), ("crc32c", i.crc32c),
                        ("file", own if file_of is None else file_of(i.name))])
               for i in infos)
    refs: Any = getattr(reader, "refs", None)  # a .sckpt reader's references, for their ids
    files = (_object([("file", file), ("tensors", count), ("nbytes", nbytes),
                      ("save_id", refs.save_ids[j].hex()), ("header_crc", refs.header_crcs[j]),
                      ("size", refs.sizes[j])])
             for j, (file, count, nbytes) in enumerate(_references(reader)))
    return _object([
        ("path", path),
        ("format", getattr(reader, "format", "sckpt")),
        ("version", f"{version[0]}.{version[1]}" if version else None),
        ("file_size", getattr(reader, "size", None)),
        ("align", getattr(reader, "align", None)),
        ("checksums", reader.has_checksums),
        ("save_id", None if save_id is None else save_id.hex()),
        ("tensor_count", len(infos)),
        ("tensor_bytes", sum(i.nbytes for i in infos)),
        ("tensors", _Lazy(tensors)),
        ("references", _Lazy(files)),
        ("metadata", _jsonable(reader.metadata)),
        ("tree", None if skeleton is fmt.NO_TREE else _json_tree(skeleton, names)),
    ])


def cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    """Print a file's tensors, metadata and tree, as they are read: nothing is built whole."""
    with _open_checkpoint(args.file, args) as reader:
        names = reader.keys()
        infos = [reader.info(name) for name in names]
        skeleton = reader.stored_tree
        if args.json:  # ASCII: every other character escaped, so nothing reaches a terminal
            _write_json(out, _json_description(reader, args.file, names, infos, skeleton))
            return EXIT_OK
        _inspect_text(reader, args.file, names, infos, skeleton, out)
    return EXIT_OK


def _inspect_text(reader: TensorMap, path: str, names: Sequence[str],
                  infos: Sequence[TensorInfo], skeleton: Any, out: TextIO) -> None:
    """inspect's output for a person: every tensor; long values and the tree cut short."""
    count = plural(len(infos), "tensor")
    total = sum(i.nbytes for i in infos)
    version = getattr(reader, "version", None)
    version = f" {version[0]}.{version[1]}" if version else ""
    _say(out, f"{path}: {getattr(reader, 'format', 'sckpt')}{version}, "
              f"{_human(reader.size)}, {count}, {_human(total)} of tensor data, "
              f"{'checksums' if reader.has_checksums else 'no checksums'}")
    save_id = getattr(reader, "save_id", None)
    if save_id is not None:
        _say(out, f"save id: {save_id.hex()}")
    file_of = _file_of(reader)  # a column "file" (the offset is in that file) for several files

    def row(i: TensorInfo) -> list[str]:
        cells = [_escape(i.name), str(i.dtype), "(" + ", ".join(map(str, i.shape)) + ")",
                 str(i.nbytes), str(i.offset)]
        return cells if file_of is None else [*cells, _escape(file_of(i.name))]
    header = ["name", "dtype", "shape", "bytes", "offset"] + ([] if file_of is None else ["file"])
    widths = list(map(len, header))
    for info in infos:  # a first pass for the widths: the rows are made again as they are printed
        widths = [max(w, len(cell)) for w, cell in zip(widths, row(info))]
    for k, cells in enumerate(itertools.chain([header], map(row, infos))):
        _say(out, "  ".join(cell.rjust(w) if c in (3, 4) else cell.ljust(w)
                            for c, (cell, w) in enumerate(zip(cells, widths))).rstrip())
        if k == 0:
            _say(out, "  ".join("-" * w for w in widths))
    _say(out, f"total: {count}, {total} bytes")
    references = _references(reader)
    if references:
        _say(out, f"refers to {plural(len(references), 'other file')} for "
                  f"{plural(sum(n for _, n, _ in references), 'tensor')} "
                  f"({_human(sum(b for _, _, b in references))}); 'safeckpt consolidate' copies "
                  "them in:")
        for file, n, nbytes in references:
            _say(out, f"  {_escape(file)}: {plural(n, 'tensor')}, {nbytes} bytes")
    if reader.metadata:
        _say(out, "metadata:")
        for key, value in reader.metadata.items():
            _say(out, f"  {_escape(key)}: {_shown(value)}")
    if skeleton is not fmt.NO_TREE:
        _say(out, "tree:")
        for line in _outline(skeleton, names, infos):
            _say(out, f"  {line}")


# -- verify -----------------------------------------------------------------------------------------

def _verify_one(path: str, args: argparse.Namespace) -> tuple[list[str], bool]:
    """Check one file (and every file it refers to, [X5], [X6]); return its lines and whether it
    held checksums."""
    with _open_checkpoint(path, args) as reader:  # opening checks the files referred to [X5]
        count = plural(len(reader), "tensor")
        for name in reader.keys():  # each array as a load makes it (a view: nothing is read)
            reader[name]  # noqa: B018 - raises if the table cannot be loaded
        if reader.has_checksums:
            reader.verify()  # each tensor's bytes in the file that holds them [X6]
            line = f"{path}: OK, {count}, every structural check and checksum passed"
            if not _references(reader):
                return [line], True
            return [line + "; bytes checked in each file:", *_checked_per_file(reader, path)], True
        why = ("safetensors files hold no checksums" if getattr(reader, "format", "")
               == "safetensors" else "saved without checksums")
    return [f"{path}: no checksums to verify; structure OK ({count}; {why}); the tensor data is "
            "unverified"], False


def _checked_per_file(reader: TensorMap, path: str) -> list[str]:
    """verify's line per file of a checkpoint with references: its tensors and bytes there."""
    own = os.path.basename(path)
    file_of = _file_of(reader) or (lambda name: own)
    found: dict[str, list[int]] = {}  # file -> [tensors, bytes]; the file itself comes first
    for name in reader.keys():
        counts = found.setdefault(file_of(name), [0, 0])
        counts[0] += 1
        counts[1] += reader.info(name).nbytes
    return [f"  {_escape(file)}: {plural(n, 'tensor')}, {nbytes} bytes "
            + ("(its own)" if file == own else
               "(referred to: its save id, size, header CRC and entries match)")
            for file, (n, nbytes) in found.items()]


def cmd_verify(args: argparse.Namespace, out: TextIO) -> int:
    """Check every file given; a line per file, the first failure's exit code."""
    first, unverified = None, False
    for path in args.files:
        try:
            lines, checked = _verify_one(path, args)
        except Exception as exc:  # report it and go on to the next file
            code = _report(exc, args)
            first = code if first is None else first
            continue
        unverified |= not checked
        for line in lines:
            _say(out, line)
    if first is not None:
        return first
    return EXIT_NO_CHECKSUMS if unverified else EXIT_OK


# -- convert ----------------------------------------------------------------------------------------

def _progress_bar(enabled: bool | str) -> Callable[[int, int], None] | None:
    """A ``progress(done, total)`` callback: tqdm when installed, else a plain line on stderr."""
    if not enabled:
        return None
    state: dict[str, Any] = {}  # "bar": tqdm, a _PlainBar or None; "done": bytes shown

    def progress(done: int, total: int) -> None:
        if "bar" not in state:
            if total < PROGRESS_MIN_BYTES and enabled != "always":
                state["bar"] = None
                return
            try:
                from tqdm import tqdm
                state["bar"] = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                    desc="convert", file=sys.stderr, leave=False)
            except ImportError:
                state["bar"] = _PlainBar(total)
            state["done"] = 0
        bar = state["bar"]
        if bar is not None:
            bar.update(done - state["done"])
            state["done"] = done
            if done >= total:
                bar.close()
    return progress


class _PlainBar:
    """The fallback when tqdm is not installed: ``convert  42% (1.0 GiB of 2.4 GiB)`` on stderr."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.shown = total, 0, -1

    def update(self, n: int) -> None:
        """Count ``n`` more bytes; redraw when the percentage changes."""
        self.done += n
        percent = 100 * self.done // self.total if self.total else 100
        if percent != self.shown:
            self.shown = percent
            sys.stderr.write(f"\rconvert {percent:3d}% ({_human(self.done)} of {_human(self.total)})")
            sys.stderr.flush()

    def close(self) -> None:
        """End the line."""
        sys.stderr.write("\n")


def cmd_convert(args: argparse.Namespace, out: TextIO) -> int:
    """Convert ``args.src`` to ``args.dst``, with a progress bar where it helps."""
    if not args.dst.lower().endswith(tuple(_convert.OUTPUTS)):
        raise _Usage(f"{args.dst}: unknown output format; name it "
                     + " or ".join("*" + suffix for suffix in _convert.OUTPUTS))
    enabled: bool | str
    if args.progress:
        enabled = "always"
    elif args.quiet:
        enabled = False
    else:
        enabled = sys.stderr.isatty()
    _refuse_http(args.dst)
    _refuse_referred(args.dst)
    result = _convert.convert(args.src, args.dst, align=args.align,
                              checksum=not args.no_checksum, progress=_progress_bar(enabled),
                              max_shard_size=args.max_shard_size, **_limits(args),
                              **_storage(args, args.src, args.dst))
    if not args.quiet:
        _say(out, f"{args.src} -> {args.dst}: {plural(result.tensors, 'tensor')}, "
                  f"{_human(result.nbytes)}")
    return EXIT_OK


def _refuse_http(dst: str) -> None:
    """A usage error for an output on http(s)://: HTTP has no atomic object write, so safeckpt
    only reads there (FORMAT.md [RS7])."""
    if dst.lower().startswith(("http://", "https://")):
        raise _Usage(f"{dst}: HTTP is read-only for safeckpt (it has no atomic object write); "
                     "write to a local path or to an object store (s3://, gs://, az://)")


def _refuse_referred(dst: str) -> None:
    """A usage error when ``dst`` is a file that another checkpoint in its directory refers to:
    replacing it would break that checkpoint [X8]."""
    if os.path.lexists(dst) and not os.path.isdir(dst):
        referring = _refs.referrers(dst)
        if referring:
            one = len(referring) == 1
            raise _Usage(f"{dst}: {', '.join(map(_escape, referring))} "
                         f"{'refers' if one else 'refer'} to it, and replacing it would break "
                         f"{'that checkpoint' if one else 'them'} [X8]; write to another path, "
                         f"or consolidate or delete {'it' if one else 'them'} first")


def cmd_consolidate(args: argparse.Namespace, out: TextIO) -> int:
    """Copy into ``args.src`` (or into a copy, ``args.dst``) every tensor it refers to."""
    dst = args.src if args.dst is None else args.dst
    in_place = dst == args.src if _remote.is_url(dst) or _remote.is_url(args.src) else (
        os.path.abspath(dst) == os.path.abspath(args.src))
    with _open_checkpoint(args.src, args) as reader:  # the files referred to, checked [X5]
        references = _references(reader)
    if in_place and not references:
        _say(out, f"{args.src}: self-contained already (it refers to no other file); left as it is")
        return EXIT_OK
    _refuse_http(dst)
    _refuse_referred(dst)
    # every byte checked against its CRC32C [X6]
    api.consolidate(args.src, dst, **_limits(args), **_storage(args, args.src, dst))
    copied = (f"{plural(sum(n for _, n, _ in references), 'tensor')} "
              f"({sum(b for _, _, b in references)} bytes) copied in from "
              + ", ".join(_escape(file) for file, _, _ in references)) if references else \
        "a copy (it referred to no other file)"
    _say(out, f"{args.src}{'' if in_place else ' -> ' + dst}: self-contained, {copied}")
    return EXIT_OK


# -- diff -------------------------------------------------------------------------------------------

def _is_complex(dtype: np.dtype) -> bool:
    """Whether ``dtype`` holds complex values: numpy's kind 'c' (complex64, complex128,
    ml_dtypes' complex32) and ml_dtypes' bcomplex32, whose kind is 'V'."""
    return dtype.kind == "c" or dtype.name == "bcomplex32"


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """The largest |a - b| over the elements (float64 or an exact int), in chunks; NaN where one
    side is NaN and the other not (NaN in both places counts as equal)."""
    a, b = a.reshape(-1), b.reshape(-1)
    exact_int = a.dtype == b.dtype and a.dtype.kind in "iu"
    worst: float = 0
    for start in range(0, a.size, DIFF_CHUNK):
        x, y = a[start:start + DIFF_CHUNK], b[start:start + DIFF_CHUNK]
        d: float
        if exact_int:  # max - min in the dtype itself: exact, no overflow
            d = int((np.maximum(x, y) - np.minimum(x, y)).max(initial=0))
        else:
            kind = np.complex128 if _is_complex(x.dtype) or _is_complex(y.dtype) else np.float64
            x, y = x.astype(kind), y.astype(kind)
            both_nan = np.isnan(x) & np.isnan(y)
            delta = np.abs(x - y)
            delta[both_nan] = 0
            if np.isnan(delta).any():
                return float("nan")
            d = float(delta.max(initial=0.0))
        worst = max(worst, d)
    return worst


def cmd_diff(args: argparse.Namespace, out: TextIO) -> int:
    """Print each difference as it is found: nothing is collected, whatever the files hold."""
    differences = 0

    def say(line: str) -> None:
        nonlocal differences
        differences += 1
        _say(out, line)

    with _convert.read_source(args.a, **_limits(args), **_storage(args, args.a)) as a, \
            _convert.read_source(args.b, **_limits(args), **_storage(args, args.b)) as b:
        ta, tb = a.tensors, b.tensors
        for name in ta:
            if name not in tb:
                x = ta[name]
                say(f"- {_escape(name)}: only in {args.a} ({x.dtype} {list(x.shape)})")
        for name in tb:
            if name not in ta:
                y = tb[name]
                say(f"+ {_escape(name)}: only in {args.b} ({y.dtype} {list(y.shape)})")
        same = 0
        for name in ta:
            if name not in tb:
                continue
            x, y = ta[name], tb[name]
            changes = []
            if x.dtype != y.dtype:
                changes.append(f"dtype {x.dtype} -> {y.dtype}")
            if tuple(x.shape) != tuple(y.shape):
                changes.append(f"shape {list(x.shape)} -> {list(y.shape)}")
            else:
                x, y = _load(x), _load(y)
                if x.dtype != y.dtype or not _same_bytes(x, y):
                    changes.append(f"max abs diff {_max_abs_diff(x, y):.6g}")
            if changes:
                say(f"~ {_escape(name)}: " + ", ".join(changes))
            else:
                same += 1
        for line in _metadata_changes(a.metadata, b.metadata):
            say(line)
        if not _tree.same(_tree_of(a), _tree_of(b)):
            say("~ the tree (structure and plain values) differs")
    _say(out, f"{same} of {plural(len(ta), 'tensor')} in {args.a} identical; "
              f"{plural(differences, 'difference')}")
    return EXIT_DIFFERENT if differences else EXIT_OK


def _load(array: np.ndarray | LazyArray) -> np.ndarray:
    """The array, read now if it is lazy."""
    return array.load() if isinstance(array, LazyArray) else array


def _same_bytes(x: np.ndarray, y: np.ndarray) -> bool:
    """Whether two arrays of one dtype hold the same bits (NaN payloads and -0.0 included)."""
    x, y = x.reshape(-1), y.reshape(-1)
    return all(np.array_equal(x[i:i + DIFF_CHUNK].view(np.uint8), y[i:i + DIFF_CHUNK].view(np.uint8))
               for i in range(0, x.size, DIFF_CHUNK))


def _metadata_changes(ma: dict[str, Any], mb: dict[str, Any]) -> Iterator[str]:
    """A line per metadata key removed, changed or added (values cut short by :func:`quote`)."""
    for key in ma:
        if key not in mb:
            yield f"- metadata[{quote(key)}] = {quote(ma[key])}"
        elif not _tree.same(ma[key], mb[key]):
            yield f"~ metadata[{quote(key)}]: {quote(ma[key])} -> {quote(mb[key])}"
    for key in mb:
        if key not in ma:
            yield f"+ metadata[{quote(key)}] = {quote(mb[key])}"


def _tree_of(source: _convert.Source) -> Any:
    """The encoded tree (structure, plain values, tensor indices), or None for a flat file."""
    return source.tree if source.tree is not fmt.NO_TREE else None


# -- main -------------------------------------------------------------------------------------------

def _storage_option(text: str) -> tuple[str, Any]:
    """argparse type: ``KEY=VALUE`` for the URLs' filesystem; VALUE is parsed as JSON when it is
    JSON (``true``, ``3``, ``{"region_name": "eu-west-1"}``), else kept as the string.

    Example:
        >>> _storage_option("anon=true"), _storage_option("endpoint_url=http://127.0.0.1:9000")
        (('anon', True), ('endpoint_url', 'http://127.0.0.1:9000'))
    """
    key, equals, value = text.partition("=")
    if not equals or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. "
                                         "endpoint_url=http://127.0.0.1:9000)")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``--storage-option`` pairs as a dict (None when none was given).

    Raises:
        _Usage: a key given twice, or options while no path on the command line is a URL.
    """
    pairs = getattr(args, "storage_option", None)
    if not pairs:
        return None
    options: dict[str, Any] = {}
    for key, value in pairs:
        if key in options:
            raise _Usage(f"--storage-option {key}=... is given twice; give each key once")
        options[key] = value
    paths = [getattr(args, name, None) for name in ("file", "src", "dst", "a", "b")]
    if not any(map(_remote.is_url, paths + list(getattr(args, "files", None) or []))):
        raise _Usage("--storage-option is for URLs (s3://, gs://, http(s)://, ...), and no path "
                     "given is one; remove it, or give a URL")
    return options


def _storage(args: argparse.Namespace, *paths: str | None) -> dict[str, Any]:
    """``{"storage_options": ...}`` when --storage-option was given and one of ``paths`` is a
    URL, else ``{}``: keyword arguments for the library call that reads or writes them."""
    options = _storage_options(args)
    return {"storage_options": options} if options and any(map(_remote.is_url, paths)) else {}


def _limits(args: argparse.Namespace) -> dict[str, Any]:
    """The reader limits given on the command line, as keyword arguments (and max_expansion,
    which only convert and diff take)."""
    return {name: getattr(args, name) for name in [*LIMITS, EXPANSION]
            if getattr(args, name, None) is not None}


def _positive(text: str) -> int:
    """argparse type: a positive int."""
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _shard_size(text: str) -> int:
    """argparse type: a size in bytes, with an optional unit (``5GB``, ``500MiB``)."""
    try:
        return _shard.parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB, 500MiB or "
                                         "1000000 (bytes)") from None


def _alignment(text: str) -> int:
    """argparse type: a power of two from ALIGN_MIN to ALIGN_MAX."""
    if not text.isdigit() or int(text) & (int(text) - 1) or not (
            fmt.ALIGN_MIN <= int(text) <= fmt.ALIGN_MAX):
        raise argparse.ArgumentTypeError(f"{text!r} is not a power of two between "
                                         f"{fmt.ALIGN_MIN} and {fmt.ALIGN_MAX}")
    return int(text)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, its usage errors on one line in our style."""

    def error(self, message: str) -> NoReturn:  # argparse's own exit code is 2 too
        self.print_usage(sys.stderr)
        _say(sys.stderr, f"safeckpt: error: {message}")
        raise SystemExit(EXIT_USAGE)


def _common_options() -> _Parser:
    """Options every subcommand takes, before or after its name: the limits and --traceback.

    Their default is SUPPRESS, so that a subcommand's parser does not overwrite with a default
    what was given before the subcommand.
    """
    common = _Parser(add_help=False)
    limits = common.add_argument_group("limits (raise them only for files you trust)")
    defaults = {"max_header_size": _human(fmt.MAX_HEADER_SIZE), "max_tensors": fmt.MAX_TENSORS,
                "max_ndim": fmt.MAX_NDIM, "max_depth": fmt.MAX_DEPTH}
    for name, (metavar, what) in LIMITS.items():
        limits.add_argument("--" + name.replace("_", "-"), type=_positive, metavar=metavar,
                            default=argparse.SUPPRESS,
                            help=f"{what} to accept (default {defaults[name]})")
    common.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                        help="on an internal error (exit 70), print the traceback to report")
    common.add_argument("--storage-option", type=_storage_option, action="append",
                        metavar="KEY=VALUE", default=argparse.SUPPRESS,
                        help="an option of the filesystem of the paths that are URLs (s3://, "
                        "gs://, http(s)://), for fsspec; repeatable. VALUE is JSON when it parses "
                        "as JSON (anon=true, client_kwargs='{\"region_name\": \"eu-west-1\"}'), "
                        "else a string (quote one that looks like JSON: key='\"1234\"'). "
                        "An S3-compatible server: endpoint_url=http://HOST:PORT; "
                        "credentials: the environment (AWS_ACCESS_KEY_ID, ...) or key=... and "
                        "secret=...")
    return common


def _expansion_option(parser: argparse.ArgumentParser) -> None:
    """--max-expansion, for the commands that read .npz and torch files (convert, diff)."""
    parser.add_argument("--max-expansion", type=_positive, metavar="N", dest=EXPANSION,
                        help="how many times its size the arrays of an .npz or torch file may "
                        f"hold (default {_convert.MAX_EXPANSION}); raise it for files you trust")


def build_parser() -> argparse.ArgumentParser:
    """The ``safeckpt`` command's parser, with its five subcommands."""
    common = _common_options()
    parser = _Parser(prog="safeckpt", parents=[common], description="Inspect, verify, convert, "
                     "consolidate and compare checkpoints (.sckpt, .safetensors, .npz, .npy, "
                     "torch .pt/.bin).",
                     epilog="exit codes: 0 ok, 1 diff found differences, 2 usage, 3 bad file, "
                     "4 checksum mismatch, 5 not found, 6 other OS error, 7 missing package, "
                     "8 verify: no checksums to verify (structure OK), 9 remote storage failed "
                     "(an error status, a timeout, a lost connection, a wrong-length response, "
                     "an object changed while read), 70 a bug in safeckpt (please report it). "
                     "Paths may be URLs (s3://bucket/model.sckpt, https://...; pip install "
                     "'safeckpt[remote]' and s3fs for s3://): read with ranged requests; "
                     "e.g. safeckpt inspect s3://bucket/model.sckpt --storage-option "
                     "endpoint_url=http://127.0.0.1:9000")
    parser.add_argument("--version", action="version", version=f"safeckpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("inspect", parents=[common],
                       help="tensor table, totals, metadata and tree outline")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("verify", parents=[common], help="every structural check and checksum; "
                       "exit 0 if all pass, 8 if a file holds no checksums")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(run=cmd_verify)

    p = sub.add_parser("convert", parents=[common], help="convert by extension: .sckpt, "
                       ".safetensors, *.safetensors.index.json, .npz, .npy, .pt/.pth/.bin/.ckpt "
                       "-> .sckpt or .safetensors (always self-contained: a checkpoint's "
                       "references are copied in)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--align", type=_alignment, default=fmt.ALIGN_DEFAULT, help="tensor "
                   f"alignment in a .sckpt output (default {fmt.ALIGN_DEFAULT})")
    p.add_argument("--no-checksum", action="store_true", help="no CRC32C in a .sckpt output")
    p.add_argument("--max-shard-size", type=_shard_size, metavar="SIZE", help="write shards of at "
                   "most SIZE tensor bytes (e.g. 5GB, 500MiB) and their index: for DST "
                   "model.safetensors, Hugging Face shards model-00001-of-0000N.safetensors and "
                   "model.safetensors.index.json")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--progress", action="store_true", help="always show a progress bar")
    shown.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    _expansion_option(p)
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("consolidate", parents=[common], help="make a checkpoint with references "
                       "self-contained: copy in every tensor it refers to in other files, each "
                       "checked against its checksum (in place, or to DST)")
    p.add_argument("src")
    p.add_argument("dst", nargs="?", help="write the copy here instead (.sckpt or .safetensors)")
    p.set_defaults(run=cmd_consolidate)

    p = sub.add_parser("diff", parents=[common], help="missing/extra tensors, dtype and shape "
                       "changes, max abs difference; exit 1 if the files differ")
    p.add_argument("a")
    p.add_argument("b")
    _expansion_option(p)
    p.set_defaults(run=cmd_diff)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (see the module docstring)."""
    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show a character gets \x..
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    try:
        _storage_options(args)  # its usage errors before any file is read
        return args.run(args, sys.stdout)
    except KeyboardInterrupt:
        sys.stderr.write("safeckpt: interrupted\n")
        return 130
    except BrokenPipeError:  # e.g. `safeckpt inspect big.sckpt | head`
        sys.stderr.close()
        return EXIT_OK
    except Exception as exc:  # one line, never a traceback (EXIT_BUG for the unexpected)
        return _report(exc, args)


def console() -> NoReturn:
    """Entry point of the ``safeckpt`` console script."""
    sys.exit(main())
