"""Constants of the .sckpt format, and encoding/decoding of its prefix and header.

docs/FORMAT.md is the specification; rule names such as [P5] refer to it.
"""

from __future__ import annotations

import contextlib
import gc
import secrets
import struct
from typing import (Any, Callable, Dict, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence,
                    TypeVar)

import msgpack

from .errors import HeaderError, InvalidValueError, LimitError, plural, quote

MAGIC = b"\x89SCK\r\n\x1a\n"  # non-ASCII first byte and CR LF / ^Z / LF catch text-mode mangling
MAGIC_TEXT_MANGLED = b"\x89SCK\n\x1a\n"  # what a CR LF -> LF conversion makes of MAGIC
PREFIX_SIZE = 32  # magic 8, major 2, minor 2, flags 4, header_len 8, align 4, header_crc 4
PREFIX_STRUCT = struct.Struct("<8sHHIQII")
VERSION_MAJOR = 1
VERSION_MINOR = 5  # 1.1 "tree" (section 8), 1.2 shard indexes (9), 1.3 dtype codes 17, 18 (4),
# 1.4 save_id and references (11), 1.5 dtype codes 19-34 with sub-byte packing (4), weak/key nodes (8)
FLAG_TENSOR_CRC = 0x1  # the header has a crc32c column
FLAG_SHARD_INDEX = 0x2  # the file is a shard index [S1]: "must understand", so 1.1 readers refuse it
FLAG_REFS = 0x4  # some tensors are in other files [X2]: 1.3 readers refuse the file, not skip them
KNOWN_FLAGS = FLAG_TENSOR_CRC | FLAG_SHARD_INDEX | FLAG_REFS
ALIGN_MIN = 8  # natural alignment of every dtype's numpy alignment
ALIGN_MAX = 1 << 20  # 1 MiB: beyond any page, O_DIRECT or GPU-direct need; bounds padding
ALIGN_DEFAULT = 64  # a cache line, and what AVX-512 loads like

# Default reader limits; every one is a keyword argument of open()/load_file().
MAX_HEADER_SIZE = 100 << 20  # 100 MiB: about 2 million tensors with long names
MAX_TENSORS = 10_000_000
MAX_NDIM = 32  # numpy 1.x's limit, so every file loads under any numpy
MAX_DEPTH = 64  # nesting of maps and arrays in the header

# Header keys, in the order a writer writes them, and the minor version that added each: a file
# may hold only the keys of its own minor version and older ones [H8].
COLUMN_KEYS = ("dtypes", "ndims", "shape", "offsets", "nbytes")
KEY_MINOR = {"names": 0, **{key: 0 for key in COLUMN_KEYS}, "crc32c": 0, "metadata": 0, "tree": 1,
             "shards": 2, "save_id": 4, "refs": 4}
HEADER_KEYS = frozenset(KEY_MINOR)

SAVE_ID_SIZE = 16  # random bytes per save: two saves never share one [X1], [S7]
MAX_FILE_NAME = 255  # bytes: the longest file name of ext4, XFS, APFS and NTFS [S3], [X3]
MAX_REF_FILES = 99_999  # files one checkpoint may refer to [X3], as many as shards [S2]
REF_SUFFIX = ".sckpt"  # a referenced file is a .sckpt file [X3]
# The schema of the "refs" map [X3], in the order a writer writes it: the files, then one column
# per reference (the tensor table's own columns, with "file" before them).
REFS_KEYS = {"files": list, "save_ids": list, "header_crcs": list, "sizes": list, "names": list,
             "file": bytes, **{key: bytes for key in COLUMN_KEYS}, "crc32c": bytes}
_U32_MAX, _I63_MAX = (1 << 32) - 1, (1 << 63) - 1


class _NoTree:
    """The type of :data:`NO_TREE`."""

    def __repr__(self) -> str:
        return "NO_TREE"


NO_TREE = _NoTree()  # a file without "tree" (None cannot say so: a tree may be just None)
_INT_MIN = -(1 << 63)
_INT_MAX = (1 << 64) - 1
_T = TypeVar("_T")


class Location(NamedTuple):
    """Where a tensor's bytes are, for a reference to them (FORMAT.md section 11): the file that
    stores them (a plain name in the checkpoint's directory), that file's save id, header CRC and
    size, and the tensor's offset, byte length and CRC32C in it.

    Example:
        >>> Location("step-10.sckpt", bytes(16), 0x1234, 4224, 128, 4096, 0xABCD).file
        'step-10.sckpt'
    """

    file: str
    save_id: bytes
    header_crc: int
    size: int
    offset: int
    nbytes: int
    crc32c: int


def new_save_id() -> bytes:
    """A fresh random save id [X1]: 16 bytes, new for every save.

    Example:
        >>> len(new_save_id())
        16
    """
    return secrets.token_bytes(SAVE_ID_SIZE)


def plain_file_name(name: object) -> bool:
    r"""Whether ``name`` is a plain file name in a checkpoint's own directory [S3], [HF2], [X3]: a
    non-empty str of at most :data:`MAX_FILE_NAME` UTF-8 bytes, holding no ``/``, ``\`` or NUL
    and not starting with ``.``; so a header never makes a reader open a file elsewhere (``../x``,
    ``/etc/passwd``, ``C:\x``) or a hidden one.

    Example:
        >>> plain_file_name("model-00001-of-00002.sckpt"), plain_file_name("../x.sckpt")
        (True, False)
    """
    return (type(name) is str and bool(name) and not name.startswith(".")
            and not any(c in name for c in "/\\\0")
            and len(name.encode("utf-8", "replace")) <= MAX_FILE_NAME)


def align_up(value: int, align: int) -> int:
    """Round ``value`` up to a multiple of ``align`` (a power of two)."""
    return (value + align - 1) & ~(align - 1)


def encode_prefix(flags: int, header_len: int, align: int, header_crc: int, minor: int = 0
                  ) -> bytes:
    """Return the 32-byte prefix [P1-P8]; ``minor`` is the lowest version that holds the header."""
    return PREFIX_STRUCT.pack(MAGIC, VERSION_MAJOR, minor, flags, header_len, align, header_crc)


def encode_header(names: list[str], columns: dict[str, bytes], crcs: bytes | None,
                  metadata: dict[str, Any] | None, tree: Any = NO_TREE,
                  shards: dict[str, Any] | None = None, save_id: bytes | None = None,
                  refs: dict[str, Any] | None = None) -> bytes:
    """Return the msgpack header [H1-H8].

    ``columns`` maps each of ``COLUMN_KEYS`` to its bytes; ``crcs`` is the ``crc32c`` column or
    ``None``; ``metadata`` a checked dict or ``None``; ``tree`` an encoded skeleton (section 8,
    see :mod:`safeckpt.tree`) or ``NO_TREE``; ``shards`` the ``shards`` map of a shard index
    (section 9) or ``None``; ``save_id`` 16 bytes or ``None`` and ``refs`` the ``refs`` map
    (section 11) or ``None``.
    """
    header: dict[str, Any] = {"names": names}
    for key in COLUMN_KEYS:
        header[key] = columns[key]
    if crcs is not None:
        header["crc32c"] = crcs
    if metadata:
        header["metadata"] = metadata
    if tree is not NO_TREE:
        header["tree"] = tree
    if shards is not None:
        header["shards"] = shards
    if save_id is not None:
        header["save_id"] = save_id
    if refs is not None:
        header["refs"] = refs
    return msgpack.packb(header, use_bin_type=True)


def check_metadata(metadata: object, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """Check that user metadata holds only msgpack primitives [H7]; return it as a dict.

    Raises:
        InvalidValueError: a key is not a str or a value has another type; the message gives the
            path, e.g. ``metadata['lr'][2]``.
        LimitError: deeper than ``max_depth`` [H3].

    Example:
        >>> check_metadata({"epoch": 3, "tags": ["a", None], "blob": b"\\x00"})
        {'epoch': 3, 'tags': ['a', None], 'blob': b'\\x00'}
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidValueError(f"metadata must be a dict with str keys, not {type(metadata).__name__}")
    walk_metadata(metadata, max_depth, InvalidValueError)
    return metadata


def walk_metadata(metadata: dict[Any, Any], max_depth: int,
                  error: Callable[[str], Exception]) -> None:
    """Check metadata's nesting [H3] and types [H7]; raise ``error`` naming the path of a bad value.

    For every metadata map a reader or writer meets: a file's (``error`` is HeaderError), a
    caller's (InvalidValueError), a safetensors header's or index's. The map itself is level 2
    of a header. Nothing recurses: the children of each container are checked in bulk (the set
    of their types, the range of their ints), and only the non-empty containers among them are
    entered, one iterator per level, so memory grows with the depth, not the size; the path of a
    bad value (``metadata['lr'][2]``) is spelled out only for the message.

    Raises:
        ``error``: a key that is not a str, an int out of range, a type msgpack does not hold.
        LimitError: deeper than ``max_depth`` [H3].

    Example:
        >>> walk_metadata({"lr": [0.1, {1: 2}]}, MAX_DEPTH, ValueError)
        Traceback (most recent call last):
        ValueError: metadata['lr'][1]: map key 1 is not a str [H7]
    """
    keys: list[Any] = []  # per level entered: the key of the container entered
    stack: list[Iterator[tuple[Any, Any]]] = []  # per level entered: its children left to enter
    value: Any = metadata
    if 2 > max_depth:  # the header map is level 1, metadata level 2
        raise LimitError(f"metadata: nesting deeper than max_depth={max_depth} [H3]")
    while True:
        is_map = isinstance(value, dict)
        if is_map and not set(map(type, value)) <= {str}:
            key = next(k for k in value if type(k) is not str)
            raise error(f"{path_of('metadata', keys)}: map key {quote(key)} is not a str [H7]")
        children = value.values() if is_map else value
        kinds = set(map(type, children))
        if int in kinds and not (_INT_MIN <= min(v for v in children if type(v) is int) and
                                 max(v for v in children if type(v) is int) <= _INT_MAX):
            key, bad = next((k, v) for k, v in _items(value)
                            if type(v) is int and not _INT_MIN <= v <= _INT_MAX)
            raise error(f"{path_of('metadata', keys + [key])}: int {quote(bad)} is outside "
                        "-2**63 .. 2**64-1 [H7]")
        nested = kinds - _LEAF_TYPES
        if nested:
            for kind in nested:  # not namedtuples such as msgpack's ExtType
                if kind is not list and kind is not tuple and not issubclass(kind, dict):
                    key = next(k for k, v in _items(value) if type(v) is kind)
                    raise error(f"{path_of('metadata', keys + [key])}: {kind.__name__} is not a "
                                "msgpack primitive (None, bool, int, float, str, bytes, list, "
                                "dict) [H7]")
            if len(stack) + 3 > max_depth:
                key = next(k for k, v in _items(value) if type(v) in nested)
                raise LimitError(f"{path_of('metadata', keys + [key])}: nesting deeper than "
                                 f"max_depth={max_depth} [H3]")
            stack.append((k, v) for k, v in _items(value) if type(v) in nested and v)
            keys.append(None)
        while stack:  # the next container to enter: in the innermost level that has one left
            item = next(stack[-1], None)
            if item is not None:
                break
            stack.pop()
            keys.pop()
        else:
            return
        keys[-1], value = item


_LEAF_TYPES = frozenset((type(None), bool, int, float, str, bytes))  # msgpack's primitives [H7]


def _items(container: Any) -> Iterable[tuple[Any, Any]]:
    """``(key or index, value)`` of a dict, list or tuple."""
    return container.items() if isinstance(container, dict) else enumerate(container)


def path_of(root: str, keys: Sequence[object]) -> str:
    """``metadata['a'][0]``: the expression that reaches a value, for a message (keys quoted)."""
    return root + "".join(f"[{quote(key)}]" for key in keys)


def _check_depth(value: object, path: str, max_depth: int) -> None:
    """[H3] for a top-level header value (level 2) of any content, e.g. an ignored key [H8];
    without recursion, entering only non-empty containers, one iterator per level."""
    if type(value) not in (dict, list):
        return
    if 2 > max_depth:
        raise LimitError(f"{path}: nesting deeper than max_depth={max_depth} [H3]")
    stack: list[Iterator[Any]] = [iter((value,))]  # per level entered: the non-empty
    # containers left to enter
    while stack:
        for item in stack[-1]:
            children = item.values() if type(item) is dict else item
            if len(stack) + 2 > max_depth and not {dict, list}.isdisjoint(map(type, children)):
                raise LimitError(f"{path}: nesting deeper than max_depth={max_depth} [H3]")
            stack.append(x for x in children if type(x) in (dict, list) and x)
            break
        else:
            stack.pop()


def unique_pairs(pairs: Sequence[tuple[Any, Any]], where: str = "map key in the header [H2]"
                 ) -> dict[Any, Any]:
    """object_pairs_hook for msgpack and json: build a dict, refusing a key given twice.

    ``where`` completes the message: "duplicate <where>: <key>".
    """
    result = dict(pairs)
    if len(result) != len(pairs):
        key = _first_repeated(k for k, _ in pairs)
        raise HeaderError(f"duplicate {where}: {quote(key)}")
    return result


def _first_repeated(items: Iterable[_T]) -> _T:
    """The first item equal to one before it (the caller knows that one is)."""
    seen = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    raise ValueError("no item is repeated")


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a header is decoded.

    A header makes up to one new container per byte, none in a cycle: the collector would walk
    them again and again as they are made (4x the decoding time, and superlinear in the size).

    Example:
        >>> with collector_paused():
        ...     value = msgpack.unpackb(b"\\x91\\x90")
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


class Header(NamedTuple):
    """A decoded and checked header (:func:`decode_header`): the parts a reader keeps."""

    positions: dict[str, int]  # each tensor name -> its position in the table, in table order
    columns: dict[str, bytes]  # each of COLUMN_KEYS -> its bytes, not yet checked [T1-T7]
    crcs: Optional[bytes]  # the crc32c column, or None without the TENSOR_CRC flag
    metadata: dict[str, Any]  # checked [H7]
    tree: Any  # the raw "tree" value (section 8), or NO_TREE
    shards: Optional[dict[Any, Any]]  # the raw "shards" map of a shard index [S1], or None
    save_id: Optional[bytes]  # 16 bytes [X1], or None
    refs: Optional["Refs"]  # the references, checked [X2, X3] and their names [X4], or None


class Refs(NamedTuple):
    """The ``refs`` map of a header (FORMAT.md section 11), checked [X2, X3] with its names [X4]:
    the referenced files, then the columns of the references, not yet checked [T1-T5] (the
    reader does that, and [X4]'s bounds)."""

    files: list[str]  # plain names ending in .sckpt, each once [X3]
    save_ids: list[bytes]  # 16 bytes each
    header_crcs: list[int]  # u32 each
    sizes: list[int]  # 32 .. 2**63-1 each
    names: list[str]  # each reference's name in the referring checkpoint
    file: bytes  # u32 per reference: its file's index in ``files``
    columns: dict[str, bytes]  # each of COLUMN_KEYS -> its bytes (offsets: in the file holding it)
    crcs: bytes  # the crc32c column


def decode_header(data: bytes, minor: int, flags: int, *, max_tensors: int = MAX_TENSORS,
                  max_depth: int = MAX_DEPTH) -> Header:
    """Decode and check the msgpack header [H1-H8]; return a :class:`Header`.

    The checks run in the order of FORMAT.md section 2: the map and its keys [H1-H3, H8], the
    names [H4-H6], the columns and the crc32c column [H4], the metadata [H7], then the tree, the
    save id and references [X1-X3], and the shards of later minor versions.
    :func:`safeckpt.tree.check_tree` validates the tree against the tensor table,
    :mod:`safeckpt.shard` the shards [S2-S6], :class:`safeckpt.Reader` the references' table [X4].

    Raises:
        HeaderError: malformed msgpack or a schema violation.
        LimitError: too many tensors [H6] or too deep [H3].

    Example:
        >>> columns = {key: b"" for key in COLUMN_KEYS}
        >>> decode_header(encode_header([], columns, None, None), 0, 0).positions
        {}
    """
    header = _unpack(data, max_depth)
    _check_keys(header, minor, max_depth)
    positions = _decode_names(header, max_tensors)
    columns = _decode_columns(header)
    crcs = _decode_crcs(header, flags, len(positions))
    metadata = _decode_metadata(header, max_depth)
    tree = header.get("tree", NO_TREE) if minor >= KEY_MINOR["tree"] else NO_TREE  # section 8
    save_id = _decode_save_id(header, minor)
    refs = _decode_refs(header, minor, flags, positions, max_tensors)
    shards = _decode_shards(header, minor, flags, len(positions), max_depth)
    return Header(positions, columns, crcs, metadata, tree, shards, save_id, refs)


def _unpack(data: bytes, max_depth: int) -> dict[Any, Any]:
    """The header as one msgpack map, no key twice [H1, H2]."""
    try:
        with collector_paused():
            header = msgpack.unpackb(
                data, raw=False, use_list=True, strict_map_key=False,
                object_pairs_hook=unique_pairs, timestamp=0,
            )
    except HeaderError:
        raise
    except (RecursionError, msgpack.StackError) as exc:  # msgpack stops at its own depth limit
        raise LimitError(f"header nesting is too deep to decode (max_depth={max_depth}) [H3]") from exc
    except Exception as exc:  # msgpack raises ValueError, TypeError and its own classes
        raise HeaderError(f"header is not one valid msgpack object: {exc} [H1]") from exc
    if not isinstance(header, dict):
        raise HeaderError(f"header must be a msgpack map, not {type(header).__name__} [H1]")
    return header


def _check_keys(header: dict[Any, Any], minor: int, max_depth: int) -> None:
    """Every key a str [H1] of the file's minor version or older [H8]; the depth of the values
    that no later step walks [H3]."""
    for key in header:
        if type(key) is not str:
            raise HeaderError(f"header key {quote(key)} is not a str [H1]")
        if minor <= VERSION_MINOR and KEY_MINOR.get(key, VERSION_MINOR + 1) > minor:
            raise HeaderError(f"unknown header key {quote(key)} in a version 1.{minor} file [H8]")
        if key not in ("names", "metadata", "tree", "shards"):  # flat, or walked later
            _check_depth(header[key], f"header[{quote(key)}]", max_depth)


def _decode_names(header: dict[str, Any], max_tensors: int) -> dict[str, int]:
    """``names`` [H4], at most ``max_tensors`` [H6], each a non-empty str given once [H5], as
    name -> position."""
    names = header.get("names")
    if type(names) is not list:
        raise HeaderError(f"header 'names' must be an array of str, not {type(names).__name__} [H4]")
    if len(names) > max_tensors:
        raise LimitError(
            f"file has {plural(len(names), 'tensor')}, more than max_tensors={max_tensors}; "
            "pass max_tensors=... if you trust this file [H6]"
        )
    # [H5], checked in bulk (types first: a hostile name may be unhashable), then the name ->
    # position lookup that readers need anyway, whose size reveals duplicates.
    if set(map(type, names)) - {str}:
        i, name = next((i, x) for i, x in enumerate(names) if type(x) is not str)
        raise HeaderError(f"tensor {i}: name {quote(name)} is not a non-empty str [H5]")
    index = dict(zip(names, range(len(names))))
    if "" in index:
        raise HeaderError(f"tensor {index['']}: name '' is not a non-empty str [H5]")
    if len(index) != len(names):
        name = _first_repeated(names)
        raise HeaderError(f"tensor {quote(name)}: the name appears twice [H5]")
    return index


def _decode_columns(header: dict[str, Any]) -> dict[str, bytes]:
    """The five columns of the tensor table, each a bin [H4] (their content: section 3)."""
    columns = {}
    for key in COLUMN_KEYS:
        value = header.get(key)
        if type(value) is not bytes:
            raise HeaderError(f"header {key!r} must be bin, not {type(value).__name__} [H4]")
        columns[key] = value
    return columns


def _decode_crcs(header: dict[str, Any], flags: int, count: int) -> bytes | None:
    """The ``crc32c`` column: 4 bytes a tensor with the TENSOR_CRC flag, absent without [H4]."""
    crcs = header.get("crc32c")
    if flags & FLAG_TENSOR_CRC:
        if type(crcs) is not bytes or len(crcs) != 4 * count:
            raise HeaderError(f"header 'crc32c' must be bin of {4 * count} bytes when the "
                              "TENSOR_CRC flag is set [H4]")
    elif crcs is not None:
        raise HeaderError("header has a 'crc32c' column but the TENSOR_CRC flag is not set [H4]")
    return crcs


def _decode_metadata(header: dict[str, Any], max_depth: int) -> dict[str, Any]:
    """``metadata``: a map of msgpack primitives [H7], within the depth limit [H3]; ``{}`` when
    absent."""
    metadata = header.get("metadata", {})
    if not isinstance(metadata, dict):
        raise HeaderError(f"header 'metadata' must be a map, not {type(metadata).__name__} [H7]")
    walk_metadata(metadata, max_depth, HeaderError)
    return metadata


def _decode_shards(header: dict[str, Any], minor: int, flags: int, count: int, max_depth: int
                   ) -> dict[Any, Any] | None:
    """The ``shards`` map of a shard index, which holds no tensors and no other flag [S1]; None
    for a file of tensors, which must not have one."""
    shards = header.get("shards") if minor >= KEY_MINOR["shards"] else None
    if flags & FLAG_SHARD_INDEX:  # [S1]
        if flags != FLAG_SHARD_INDEX or minor < KEY_MINOR["shards"] or type(shards) is not dict:
            raise HeaderError("a shard index (flag SHARD_INDEX) needs no other flag, minor version 2 "
                              "or later and a 'shards' map [S1]")
        if count:
            raise HeaderError(f"a shard index holds no tensors, this one has {count} [S1]")
        _check_depth(shards, "header['shards']", max_depth)
    elif shards is not None:
        raise HeaderError("header has a 'shards' key but not the SHARD_INDEX flag [S1]")
    return shards


def _decode_save_id(header: dict[str, Any], minor: int) -> bytes | None:
    """``save_id``: a bin of exactly 16 bytes [X1] (a file older than 1.4 holding one is refused
    by [H8]); None when absent."""
    save_id = header.get("save_id") if minor >= KEY_MINOR["save_id"] else None
    if save_id is not None and (type(save_id) is not bytes or len(save_id) != SAVE_ID_SIZE):
        raise HeaderError(f"header 'save_id' must be bin of {SAVE_ID_SIZE} bytes, not "
                          f"{quote(save_id)} [X1]")
    return save_id



def check_map_keys(value: Dict[str, Any], keys: Mapping[str, type], what: str, rule: str,
                   where: str = "") -> None:
    """Raise HeaderError unless the header map ``value`` (the ``what`` key, e.g. ``'refs'``) has
    exactly ``keys``, each holding a value of its type (``list``: an array, ``bytes``: a bin).

    Example:
        >>> check_map_keys({"files": []}, {"files": list}, "shards", "S2")
    """
    at = f"{where}: " if where else ""
    if set(value) != set(keys):
        missing = sorted(set(keys) - set(value))
        unknown = sorted(quote(key) for key in set(value) - set(keys))
        raise HeaderError(f"{at}{what!r} must have exactly the keys {list(keys)} (missing "
                          f"{missing}, unknown [{', '.join(unknown)}]) [{rule}]")
    for key, kind in keys.items():
        if type(value[key]) is not kind:
            raise HeaderError(f"{at}{what}[{key!r}] must be "
                              f"{'an array' if kind is list else 'bin'}, not "
                              f"{type(value[key]).__name__} [{rule}]")

def _decode_refs(header: dict[str, Any], minor: int, flags: int, positions: dict[str, int],
                 max_tensors: int) -> Refs | None:
    """The ``refs`` map: present exactly with the REFS flag, never with SHARD_INDEX [X2], of the
    schema :data:`REFS_KEYS` [X3], with its names [X4]; None without the flag."""
    refs = header.get("refs") if minor >= KEY_MINOR["refs"] else None
    if not flags & FLAG_REFS:
        if refs is not None:
            raise HeaderError("header has a 'refs' key but not the REFS flag [X2]")
        return None
    if flags & FLAG_SHARD_INDEX or minor < KEY_MINOR["refs"] or type(refs) is not dict:
        raise HeaderError("a file with the REFS flag needs minor version 4 or later, a 'refs' map "
                          "and no SHARD_INDEX flag [X2]")
    check_map_keys(refs, REFS_KEYS, "refs", "X3")
    files, save_ids, crcs, sizes = (refs[key] for key in ("files", "save_ids", "header_crcs",
                                                            "sizes"))
    k = len(files)
    if not 1 <= k <= MAX_REF_FILES or not len(save_ids) == len(crcs) == len(sizes) == k:
        raise HeaderError(f"refs 'files', 'save_ids', 'header_crcs' and 'sizes' must have one "
                          f"length from 1 to {MAX_REF_FILES}, not {len(files)}, {len(save_ids)}, "
                          f"{len(crcs)} and {len(sizes)} [X3]")
    for j, (name, save_id, crc, size) in enumerate(zip(files, save_ids, crcs, sizes)):
        if not plain_file_name(name) or not name.endswith(REF_SUFFIX):
            raise HeaderError(f"refs file {j} {quote(name)} is not a plain file name in the "
                              f"file's own directory ending in {REF_SUFFIX!r} [X3]")
        if type(save_id) is not bytes or len(save_id) != SAVE_ID_SIZE:
            raise HeaderError(f"refs file {quote(name)}: save_id {quote(save_id)} is not bin of "
                              f"{SAVE_ID_SIZE} bytes [X3]")
        if type(crc) is not int or not 0 <= crc <= _U32_MAX:
            raise HeaderError(f"refs file {quote(name)}: header_crc {quote(crc)} is not a u32 [X3]")
        if type(size) is not int or not PREFIX_SIZE <= size <= _I63_MAX:
            raise HeaderError(f"refs file {quote(name)}: size {quote(size)} is not an int in "
                              "32..2**63-1 [X3]")
    if len(set(files)) != k:
        raise HeaderError(f"refs file {quote(_first_repeated(files))} is named twice [X3]")
    names = _ref_names(refs["names"], positions, max_tensors)
    m = len(names)
    widths = {"file": 4, "dtypes": 1, "ndims": 1, "offsets": 8, "nbytes": 8, "crc32c": 4}
    for key, width in widths.items():
        if len(refs[key]) != width * m:
            raise HeaderError(f"refs[{key!r}] must be bin of {width * m} bytes for "
                              f"{plural(m, 'reference')}, not {len(refs[key])} [X3]")
    dims = sum(refs["ndims"])
    if len(refs["shape"]) != 8 * dims:
        raise HeaderError(f"refs['shape'] must be bin of {8 * dims} bytes (8 per dimension), not "
                          f"{len(refs['shape'])} [X3]")
    used = bytearray(k)
    for r, j in enumerate(struct.unpack(f"<{m}I", refs["file"])):
        if j >= k:
            raise HeaderError(f"reference {quote(names[r])}: file {j} is not below the "
                              f"{plural(k, 'file')} of refs['files'] [X3]")
        used[j] = 1
    if not all(used):
        raise HeaderError(f"refs file {quote(files[used.index(0)])} holds no reference [X3]")
    return Refs(files, save_ids, crcs, sizes, names, refs["file"],
                {key: refs[key] for key in COLUMN_KEYS}, refs["crc32c"])


def _ref_names(names: list[Any], positions: dict[str, int], max_tensors: int) -> list[str]:
    """The references' names: at least one [X3]; with the file's own tensors' names, non-empty
    str given once [H5] and at most ``max_tensors`` of them [H6], as [X4] says."""
    if not names:
        raise HeaderError("refs['names'] is empty: a file with the REFS flag refers to at least "
                          "one tensor [X3]")
    if len(positions) + len(names) > max_tensors:
        raise LimitError(
            f"file has {plural(len(positions), 'tensor')} and {plural(len(names), 'reference')}, "
            f"more than max_tensors={max_tensors}; pass max_tensors=... if you trust this file "
            "[H6, X4]")
    if set(map(type, names)) - {str}:
        name = next(x for x in names if type(x) is not str)
        raise HeaderError(f"reference name {quote(name)} is not a non-empty str [H5, X4]")
    if "" in names:
        raise HeaderError("reference name '' is not a non-empty str [H5, X4]")
    if len(set(names)) != len(names) or not positions.keys().isdisjoint(names):
        name = _first_repeated([*positions, *names])
        raise HeaderError(f"tensor {quote(name)}: the name appears twice (own tensors and "
                          "references together) [H5, X4]")
    return names
