"""The .sckpt write path: a :class:`Plan` checks and lays out a save, :func:`write_plan` writes it.

Tensor bytes go from each array's own buffer to the file (no whole-file buffer); only an array
that is not C-contiguous or not little-endian is copied, a batch at a time. :func:`stream_plan`
writes the same file to a stream, in order (a remote object, FORMAT.md [RS7]). The public functions
(``save_file``, ``save``, ``save_bytes``) are in :mod:`safeckpt.api`.

Example:
    >>> import numpy as np
    >>> plan = Plan({"w": np.ones(3, np.float32)}, {"epoch": 1}, 64, True)
    >>> plan_bytes(plan)[:8]
    b'\\x89SCK\\r\\n\\x1a\\n'
"""

from __future__ import annotations

import collections.abc
import math
import os
import sys
import warnings
from types import FrameType
from typing import (Any, BinaryIO, Callable, Container, ContextManager, Dict, List, Mapping,
                    Optional, Protocol, Sequence, Tuple, TypeVar, Union,
                    runtime_checkable)

import numpy as np

from . import _backend, _fs, dtypes, packing
from . import format as fmt
from .dtypes import (CODE_BY_DTYPE, MINOR_BY_CODE, PACKED_CODES, code_of, is_little_endian,
                     minor_of, nbytes_of, to_little_endian)
from .errors import ChecksumError, InvalidValueError, LimitError, plural, quote
from .filekind import PathLike, output_format

# A batch handed to the backend is written once the copies it holds (non-contiguous or big-endian
# arrays) reach this size, so extra memory during a save stays bounded.
_MAX_HELD_COPIES = 64 << 20
_MAX_BATCH = 4096  # tensors per backend call: amortises the call without huge pointer arrays
# [RS7]: the most bytes handed to a stream's write() at once. fsspec's buffered files copy each
# write into their buffer before they upload a part: a whole tensor in one write would double it.
PIECE = 8 << 20


class LazyArray:
    """A tensor whose bytes are fetched only when the writer reaches it (e.g. from a GPU).

    ``dtype`` and ``shape`` describe the array that ``load()`` returns; the writer calls ``load()``
    once, writes the result and drops it, so only one such copy is held at a time (at most
    ``_MAX_HELD_COPIES`` bytes of them). ``source`` is what ``load()`` copies from (a GPU tensor),
    for a caller that copies it itself (:mod:`safeckpt.snapshot`, into a pinned buffer).
    ``crc32c``, when known (a source file's table holds it), is the CRC32C of the bytes ``load()``
    returns: a save streamed to a remote object then loads the array once, not twice, and checks
    the bytes it writes against it (:func:`stream_plan`).

    Example:
        >>> lazy = LazyArray(np.float32, (2, 3), lambda: np.zeros((2, 3), np.float32))
        >>> lazy.nbytes, lazy.ndim
        (24, 2)
    """

    __slots__ = ("dtype", "shape", "load", "source", "crc32c")

    def __init__(self, dtype: Any, shape: Sequence[int], load: Callable[[], np.ndarray],
                 source: Any = None, crc32c: Optional[int] = None) -> None:
        self.dtype, self.shape, self.load = np.dtype(dtype), tuple(shape), load
        self.source, self.crc32c = source, crc32c

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=object)) * self.dtype.itemsize


class Plan:
    """What a save writes: checked arrays, the table's columns and the file layout.

    Made once per save, before anything is written, so every error is raised with no file touched.
    ``tree`` is an encoded skeleton (FORMAT.md section 8) or ``NO_TREE``; with one the file is
    version 1.1, else 1.0 (the lowest version that holds what is written). ``shards`` makes the
    plan a shard index (FORMAT.md section 9: no tensors, flag ``SHARD_INDEX``, version 1.2).

    ``save_id`` (16 bytes, :func:`safeckpt.format.new_save_id`) lets later checkpoints refer to
    this file; ``refs`` maps names of ``tensors`` to the :class:`safeckpt.format.Location` of
    equal bytes in another file (FORMAT.md section 11, version 1.4: the caller compared them
    [X7]). Those tensors are written as references, not as bytes: the file's own tensors come
    first, then the references, and the tree's indices are renumbered to match (a file without a
    tree gets one, so it loads back in the order given). ``names``, ``arrays`` and ``nbytes``
    are then the own tensors; ``ref_names`` the references.

    Example:
        >>> plan = Plan({"w": np.zeros(3, np.float32)}, {"step": 1}, 64, True)
        >>> plan.header_end, plan.offsets, plan.file_size    # the tensor starts at a multiple of 64
        (141, [192], 204)
    """

    def __init__(self, tensors: Mapping[str, Any], metadata: Optional[Mapping[str, Any]],
                 align: int, checksum: bool, tree: Any = fmt.NO_TREE,
                 shards: Optional[Dict[str, Any]] = None,
                 refs: Optional[Mapping[str, fmt.Location]] = None,
                 save_id: Optional[bytes] = None) -> None:
        if not isinstance(tensors, collections.abc.Mapping):
            raise InvalidValueError(f"tensors must be a dict of name -> numpy array, "
                                    f"not {type(tensors).__name__}")
        if (type(align) is not int or align & (align - 1)
                or not fmt.ALIGN_MIN <= align <= fmt.ALIGN_MAX):
            raise ValueError(f"align={align!r} must be a power of two between {fmt.ALIGN_MIN} "
                             f"and {fmt.ALIGN_MAX} [P7]")
        self.align, self.checksum, self.tree = align, bool(checksum), tree
        self.minor = 0 if tree is fmt.NO_TREE else fmt.KEY_MINOR["tree"]
        self.shards = shards
        if shards is not None:  # [S1]: no tensors, no other flag
            self.minor, self.checksum = fmt.KEY_MINOR["shards"], False
        self.metadata = fmt.check_metadata(metadata)
        self.save_id = _checked_save_id(save_id)
        self.refs: Optional[Dict[str, Any]] = None  # the "refs" map of the header
        self.ref_names: List[str] = []
        own = tensors
        if refs:
            own, self.tree = self._references(tensors, refs, tree, shards)
            tree = self.tree
        self.names: List[str] = list(own)
        self.columns, self.arrays, self.nbytes, self.direct = _columns(own)
        # dtype codes added by a later minor version (FORMAT.md section 5) raise the file's minor
        self.minor = max(self.minor, minor_of(self.columns["dtypes"]), tree_minor(tree))
        if self.refs is not None or save_id is not None:
            self.minor = max(self.minor, fmt.KEY_MINOR["refs"])
        self.flags = fmt.FLAG_TENSOR_CRC if self.checksum else 0
        if shards is not None:
            self.flags = fmt.FLAG_SHARD_INDEX
        if self.refs is not None:
            self.flags |= fmt.FLAG_REFS
        empty_crcs = bytes(4 * len(self.nbytes)) if self.checksum else None
        # Every column has a fixed width, so the header's length is known before offsets and CRCs.
        try:
            self.header_len = len(fmt.encode_header(self.names, self.columns, empty_crcs,
                                                    self.metadata, tree, shards, self.save_id,
                                                    self.refs))
        except UnicodeEncodeError as exc:
            rule = "[H5]" if exc.object in tensors else "[H7]"
            raise unicode_error(exc, tensors, rule) from None
        self.header_end = fmt.PREFIX_SIZE + self.header_len
        self._layout()

    def _references(self, tensors: Mapping[str, Any], refs: Mapping[str, fmt.Location], tree: Any,
                    shards: Optional[Dict[str, Any]]) -> Tuple[Dict[str, Any], Any]:
        """Set ``refs`` (the header's map [X3]) and ``ref_names`` for the tensors in ``refs``;
        return the own tensors and the tree renumbered for the new order (own, then references).

        Raises:
            InvalidValueError: a name of ``refs`` not in ``tensors``, a location that is not
                valid [X3] or whose byte length is not the tensor's [X4], two locations in one
                file with another save id, header CRC or size, no checksums, or a shard index.
        """
        if not self.checksum or shards is not None:
            raise InvalidValueError("references need checksum=True and a file of tensors (not a "
                                    "shard index) [X5]")
        unknown = next((name for name in refs if name not in tensors), None)
        if unknown is not None:
            raise InvalidValueError(f"refs names {quote(unknown)}, which is not one of the tensors")
        own = {name: value for name, value in tensors.items() if name not in refs}
        referred = {name: value for name, value in tensors.items() if name in refs}
        columns, _, nbytes, _ = _columns(referred)
        files: Dict[str, int] = {}
        first: List[fmt.Location] = []  # the first location in each file
        first_name: List[str] = []  # and the tensor that has it
        at: List[int] = []
        for name, size in zip(referred, nbytes):
            loc = _checked_location(name, refs[name], size)
            j = files.setdefault(loc.file, len(files))
            if j == len(first):
                first.append(loc)
                first_name.append(name)
            elif loc[1:4] != first[j][1:4]:
                raise InvalidValueError(f"refs[{quote(name)}] and refs[{quote(first_name[j])}] "
                                        f"give the file {quote(loc.file)} another save id, "
                                        "header CRC or size: two saves of one file [X5]")
            at.append(j)
        locations = [refs[name] for name in referred]
        columns["offsets"] = np.array([loc.offset for loc in locations], "<u8").tobytes()
        self.ref_names = list(referred)
        self.refs = {"files": list(files), "save_ids": [loc.save_id for loc in first],
                     "header_crcs": [loc.header_crc for loc in first],
                     "sizes": [loc.size for loc in first], "names": self.ref_names,
                     "file": np.array(at, "<u4").tobytes(), **columns,
                     "crc32c": np.array([loc.crc32c for loc in locations], "<u4").tobytes()}
        order = {name: i for i, name in enumerate([*own, *referred])}  # new index by name
        new_index = [order[name] for name in tensors]
        if new_index == sorted(new_index):  # the references are last already: nothing moves
            return own, tree
        if tree is fmt.NO_TREE:  # a flat file keeps its order through a tree [R1]
            flat: List[Any] = ["dict"]
            for name, i in zip(tensors, new_index):
                flat += [name, ["tensor", i]]
            return own, flat
        return own, _renumbered(tree, new_index)

    def _layout(self) -> None:
        """Place the tensors [T6]: sets ``offsets``, ``file_size`` and the offsets column.

        Tensor i starts at align_up(end of i-1); as every start is aligned, that is the first
        start plus the sum of the earlier sizes, each rounded up to the alignment.
        """
        align, nbytes = self.align, self.nbytes
        sizes = np.array(nbytes, "<u8")
        first = fmt.align_up(self.header_end, align)
        padded = (sizes + np.uint64(align - 1)) & ~np.uint64(align - 1)
        offsets = np.empty(len(nbytes), "<u8")
        if len(nbytes):
            offsets[0] = first
            np.cumsum(padded[:-1], out=offsets[1:])
            offsets[1:] += np.uint64(first)
        self.offsets: List[int] = offsets.tolist()
        self.file_size = int(offsets[-1]) + nbytes[-1] if nbytes else self.header_end
        self.columns["offsets"] = offsets.tobytes()

    def warn_beyond_reader_defaults(self) -> None:
        """Warn if readers with the default limits refuse the file [W4] (the metadata or the
        tree can make the header as large as anyone wants)."""
        index = self.shards is not None
        count = len(self.shards["names"]) if self.shards is not None else len(self.names)
        warn_beyond_reader_defaults(self.header_len, count, "[P5]", "[S4]" if index else "[H6]")

    def prefix_and_header(self, crcs: Sequence[int]) -> bytes:
        """The final prefix and header, once the tensors' CRCs are known."""
        crc_column = np.array(crcs, "<u4").tobytes() if self.checksum else None
        header = fmt.encode_header(self.names, self.columns, crc_column, self.metadata, self.tree,
                                   self.shards, self.save_id, self.refs)
        if len(header) != self.header_len:
            raise RuntimeError("safeckpt bug: the header changed length between encodings")
        header_crc = _backend.backend.crc32c(header)
        return fmt.encode_prefix(self.flags, len(header), self.align, header_crc, self.minor) + header


def _columns(tensors: Mapping[str, Any]) -> Tuple[Dict[str, bytes], List[Any], List[int], bool]:
    """Check each tensor [H5], [T2] and build the table's columns (FORMAT.md section 3), offsets
    zero; returns ``(columns, arrays, nbytes, direct)``, ``direct`` when every array can be
    written as it is (C-contiguous, little-endian)."""
    arrays: List[Any] = []
    codes, ndims, dims, nbytes = [], [], [], []
    code_by_dtype = CODE_BY_DTYPE  # a local: this loop is per tensor
    # never direct on a big-endian host, where each array goes through le_bytes (which passes
    # little-endian ones through)
    direct = not dtypes.BIG_ENDIAN_HOST
    for name, value in tensors.items():
        if type(name) is not str or not name:
            raise InvalidValueError(f"key {name!r}: tensor names must be non-empty str [H5]")
        if type(value) is not np.ndarray and type(value) is not LazyArray:
            if isinstance(value, np.generic):
                value = np.asarray(value)
            elif not isinstance(value, (np.ndarray, LazyArray)):
                raise InvalidValueError(f"tensor {name!r}: a {type(value).__module__}."
                                        f"{type(value).__name__} is not a numpy array")
        code = code_by_dtype.get(value.dtype)  # None for big-endian (or unsupported) dtypes
        if code is None or type(value) is not np.ndarray or not value.flags.c_contiguous:
            direct = False
        if code is None:
            code = code_of(value.dtype, name)
        codes.append(code)
        ndim = value.ndim
        if ndim > fmt.MAX_NDIM:
            raise LimitError(f"tensor {name!r}: {ndim} dimensions, more than readers "
                             f"accept by default ({fmt.MAX_NDIM}) [T2]")
        arrays.append(value)
        ndims.append(ndim)
        dims.extend(value.shape)
        if code in PACKED_CODES:  # written packed [T11]: ceil(count * bits / 8) bytes [T5]
            direct = False
            nbytes.append(nbytes_of(code, math.prod(value.shape)))
        else:
            nbytes.append(value.nbytes)
    columns = {
        "dtypes": bytes(codes),
        "ndims": bytes(ndims),
        "shape": np.array(dims, "<u8").tobytes(),
        "offsets": bytes(8 * len(nbytes)),
        "nbytes": np.array(nbytes, "<u8").tobytes(),
    }
    return columns, arrays, nbytes, direct


def _checked_save_id(save_id: Optional[bytes]) -> Optional[bytes]:
    """``save_id`` if it is None or 16 bytes [X1]."""
    if save_id is not None and (type(save_id) is not bytes or len(save_id) != fmt.SAVE_ID_SIZE):
        raise InvalidValueError(f"save_id must be {fmt.SAVE_ID_SIZE} bytes (see "
                                f"safeckpt.format.new_save_id()), not {quote(save_id)} [X1]")
    return save_id


def _checked_location(name: str, loc: Any, nbytes: int) -> fmt.Location:
    """``loc`` as a :class:`safeckpt.format.Location` that a reader accepts [X3], [X4] for tensor
    ``name`` of ``nbytes`` bytes; InvalidValueError naming the tensor otherwise."""
    problem = None
    if not isinstance(loc, fmt.Location):
        problem = f"is a {type(loc).__name__}, not a safeckpt.format.Location"
    elif not fmt.plain_file_name(loc.file) or not loc.file.endswith(fmt.REF_SUFFIX):
        problem = f"names {quote(loc.file)}, not a plain .sckpt file name in the directory [X3]"
    elif type(loc.save_id) is not bytes or len(loc.save_id) != fmt.SAVE_ID_SIZE:
        problem = f"has save_id {quote(loc.save_id)}, not {fmt.SAVE_ID_SIZE} bytes [X3]"
    elif not all(type(v) is int for v in loc[2:]):
        problem = "has a header_crc, size, offset, nbytes or crc32c that is not an int"
    elif not (0 <= loc.header_crc < 1 << 32 and 0 <= loc.crc32c < 1 << 32
              and fmt.PREFIX_SIZE <= loc.size < 1 << 63):
        problem = "has a header_crc or crc32c that is not a u32, or a size out of 32..2**63-1 [X3]"
    elif loc.nbytes != nbytes:
        problem = f"is {loc.nbytes} bytes long, the tensor {nbytes} [X4]"
    elif not 0 <= loc.offset <= loc.size - nbytes:
        problem = f"has offset {loc.offset}, outside the file of {loc.size} bytes [X4]"
    if problem:
        raise InvalidValueError(f"refs[{quote(name)}] {problem}")
    return loc


def _renumbered(tree: Any, new_index: Sequence[int]) -> Any:
    """A copy of the encoded ``tree`` whose ``tensor`` and ``ref`` nodes [R3] point at
    ``new_index[i]`` instead of ``i``; without recursion."""
    if type(tree) is not list:
        return tree
    root = list(tree)
    stack = [root]
    while stack:
        node = stack.pop()
        if node[0] in ("tensor", "ref"):
            node[1] = new_index[node[1]]
        elif node[0] != "scalar":
            for k in range(1, len(node)):
                if type(node[k]) is list:
                    node[k] = list(node[k])
                    stack.append(node[k])
    return root


# The tree nodes (FORMAT.md section 8) added after 1.1 and the minor version of each [R9] [R10].
NODE_MINOR = {"weak": 5, "key": 5}


def tree_minor(tree: Any) -> int:
    """The lowest minor version that holds a tree: the dtype codes of its scalar nodes [R5] and
    its node kinds (``weak`` and ``key`` are 1.5) [R9] [R10]; without recursion. Here, below
    :mod:`safeckpt.tree` (which re-exports it), so that the writer can use it.

    Example:
        >>> tree_minor(["dict", "lr", ["weak", ["tensor", 0]]])
        5
    """
    minor, stack = 0, [tree]
    while stack:
        node = stack.pop()
        if type(node) is list and node:
            if node[0] == "scalar":
                minor = max(minor, MINOR_BY_CODE[node[1]])
            else:
                minor = max(minor, NODE_MINOR.get(node[0], 0))
                stack.extend(node[1:])
    return minor


def unicode_error(exc: UnicodeEncodeError, names: Container[str], rule: str) -> InvalidValueError:
    """InvalidValueError for a str UTF-8 cannot encode (``exc.object``, with a lone surrogate).

    ``names`` tells a tensor name from a str of the metadata or the tree; ``rule`` is cited.
    """
    text = exc.object
    what = (f"tensor name {quote(text)}" if text in names
            else f"the str {quote(text)} (in the metadata or the tree)")
    return InvalidValueError(f"{what} is not valid Unicode: {text[exc.start:exc.end]!r} is a lone "
                             f"surrogate, which UTF-8 cannot encode {rule}")


def warn_beyond_reader_defaults(header_len: int, count: int, header_rule: str,
                                count_rule: str) -> None:
    """Warn when a reader with the default limits would refuse a file with this header [W4].

    Example: ``warn_beyond_reader_defaults(200 << 20, 1, "[P5]", "[H6]")`` warns, naming the
    keyword (``max_header_size=...``) that loads the file.
    """
    if header_len > fmt.MAX_HEADER_SIZE:
        _warn(f"the header is {header_len} bytes, more than max_header_size={fmt.MAX_HEADER_SIZE}, "
              f"the most that readers accept by default {header_rule}: load this file with "
              f"max_header_size={header_len} (or store big values as tensors, not metadata)")
    if count > fmt.MAX_TENSORS:
        _warn(f"the file names {plural(count, 'tensor')}, more than max_tensors={fmt.MAX_TENSORS}, "
              f"the most that readers accept by default {count_rule}: load this file with "
              f"max_tensors={count}")


def _warn(message: str) -> None:
    """``warnings.warn`` pointing at the first caller outside this package."""
    package, level = os.path.dirname(__file__), 2
    frame: Optional[FrameType] = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def stored_nbytes(array: Any) -> int:
    """The bytes a file holds for ``array`` (a numpy array or :class:`LazyArray`): its
    ``nbytes``, or its packed length for a sub-byte dtype ([T5], FORMAT.md section 4).

    Example:
        >>> stored_nbytes(np.zeros(3, np.float32))
        12
    """
    code = CODE_BY_DTYPE.get(array.dtype)
    if code in PACKED_CODES:
        return nbytes_of(code, math.prod(array.shape))
    return int(array.nbytes)


def le_bytes(array: Any) -> Tuple[np.ndarray, bool]:
    """The bytes a file holds for the array, as an array: little-endian and C-ordered (the array
    itself when it already is; a :class:`LazyArray` is loaded), packed into a new uint8 array for
    a sub-byte dtype (FORMAT.md section 4, [T11]); and whether it is a copy.

    Example:
        >>> le_bytes(np.arange(3, dtype=">i4"))[0].dtype.str
        '<i4'
    """
    if (type(array) is np.ndarray and array.flags.c_contiguous
            and is_little_endian(array.dtype) and array.dtype.itemsize > 1):
        return array, False  # the common case first: no sub-byte dtype has more than one byte
    if isinstance(array, LazyArray):
        expected = (array.dtype, array.shape)
        array = array.load()
        if (array.dtype, array.shape) != expected:
            raise RuntimeError(f"safeckpt bug: a lazy array loaded as {array.dtype} {array.shape}, "
                               f"planned {expected[0]} {expected[1]}")
    code = CODE_BY_DTYPE.get(array.dtype)
    if code in PACKED_CODES:
        return packing.pack(array, code), True
    if not is_little_endian(array.dtype):
        return to_little_endian(array), True
    if type(array) is np.ndarray and array.flags.c_contiguous:
        return array, False
    return np.ascontiguousarray(array), True


def _write(fd: int, plan: Plan) -> int:
    """Write ``plan``'s tensors, then its prefix and header, to the new file ``fd``; return the
    header's CRC32C.

    The arrays go to the backend in batches; a batch is written once the copies it holds reach
    ``_MAX_HELD_COPIES`` bytes, so the memory a save needs beyond its arrays stays bounded.
    """
    write_tensors = _backend.backend.write_tensors
    crcs: List[int] = []
    batch: List[np.ndarray] = []
    held, pos = 0, plan.header_end
    if plan.direct:  # nothing to convert: hand the arrays over in batches, no per-tensor Python
        for start in range(0, len(plan.arrays), _MAX_BATCH):
            batch_crcs, pos = write_tensors(fd, pos, plan.arrays[start:start + _MAX_BATCH],
                                            plan.align, plan.checksum)
            crcs.extend(batch_crcs or ())
    for array in () if plan.direct else plan.arrays:
        data, copied = le_bytes(array)
        batch.append(data)
        held += data.nbytes if copied else 0
        if held >= _MAX_HELD_COPIES or len(batch) >= _MAX_BATCH:
            batch_crcs, pos = write_tensors(fd, pos, batch, plan.align, plan.checksum)
            crcs.extend(batch_crcs or ())
            batch, held = [], 0
    if batch:
        batch_crcs, pos = write_tensors(fd, pos, batch, plan.align, plan.checksum)
        crcs.extend(batch_crcs or ())
    if pos != plan.file_size:
        raise RuntimeError(f"safeckpt bug: wrote {pos} bytes, planned {plan.file_size}")
    head = plan.prefix_and_header(crcs)
    _fs.pwrite_all(fd, head, 0)
    return _header_crc(head)


@runtime_checkable
class Destination(Protocol):
    """A remote object that a save streams into: :class:`safeckpt.remote.RemotePath` (a module
    of this layer, which the writer does not import)."""

    @property
    def url(self) -> str: ...

    @property
    def name(self) -> str: ...

    def open_write(self) -> ContextManager[BinaryIO]: ...


_D = TypeVar("_D", bound=Destination)


def write_plan(plan: Plan, path: Union[str, "os.PathLike[str]", Destination], *,
               atomic: bool = True) -> int:
    """Write ``plan`` to ``path`` as a new .sckpt file and return its header's CRC32C (prefix
    bytes 28-31, which a shard index records [S5]).

    A local path gets a new file [W2], [W3] (see :func:`safeckpt._fs.new_file`); a remote object
    a stream (:func:`stream_plan`) that becomes visible only once complete [RS7], whatever
    ``atomic`` says. ``path`` is written whatever its name; :func:`safeckpt.api.save_plan` checks
    the name and writes ``*.safetensors`` names as safetensors files.

    Example:
        >>> write_plan(Plan({"w": np.zeros(2)}, None, 64, True), "w.sckpt")  # doctest: +SKIP
    """
    name = path.name if isinstance(path, Destination) else os.path.basename(path)
    if plan.refs is not None and name in plan.refs["files"]:
        where = path.url if isinstance(path, Destination) else repr(os.fspath(path))
        raise InvalidValueError(f"{where}: the plan refers to tensors in the file it would "
                                "replace; a file never refers to itself [X5], [X8]")
    if isinstance(path, Destination):
        with path.open_write() as out:
            return stream_plan(plan, out)
    plan.warn_beyond_reader_defaults()
    with _fs.new_file(os.fspath(path), atomic) as fd:
        return _write(fd, plan)


def destination_format(path: Union[PathLike, _D], *, sharded: bool = False
                       ) -> Tuple[Union[str, _D], Optional[str]]:
    """:func:`safeckpt.filekind.output_format` (the name checked [W5], the format it says) for a
    local path, given as a str, or a remote object, kept as it is (its URL checked).

    Example:
        >>> destination_format(b"out/w.safetensors")
        ('out/w.safetensors', 'safetensors')
    """
    if isinstance(path, Destination):
        return path, output_format(path.url, sharded=sharded)[1]
    return output_format(path, sharded=sharded)


def _header_crc(head: bytes) -> int:
    """The header CRC32C in a prefix [P6]."""
    return int(fmt.PREFIX_STRUCT.unpack_from(head)[-1])


def plan_bytes(plan: Plan) -> bytes:
    """The bytes of the file that ``plan`` describes.

    Example:
        >>> plan_bytes(Plan({}, None, 64, True))[:8]
        b'\\x89SCK\\r\\n\\x1a\\n'
    """
    plan.warn_beyond_reader_defaults()
    out = bytearray(plan.file_size)
    crcs: List[int] = []
    for array, offset, size in zip(plan.arrays, plan.offsets, plan.nbytes):
        data = _flat_bytes(array)
        out[offset:offset + size] = data.data
        if plan.checksum:
            crcs.append(_backend.backend.crc32c(data))
    head = plan.prefix_and_header(crcs)
    out[:len(head)] = head
    return bytes(out)


def stream_plan(plan: Plan, out: BinaryIO) -> int:
    """Write the file that ``plan`` describes to the stream ``out``, in order: prefix and header,
    then each tensor and its zero padding, in pieces of at most :data:`PIECE` bytes [RS7].

    The header holds every tensor's CRC32C, so with checksums a first pass computes them: each
    array is read twice, and a :class:`LazyArray` loaded twice unless its ``crc32c`` is known.
    The second pass computes each CRC again, from the very bytes it hands to ``out``, and raises
    if it differs: an array changed during the save (a training thread wrote to it) must never
    give a file whose checksums do not match. Memory beyond the arrays: one piece, and the copy of
    one array that is not C-contiguous and little-endian (or one loaded :class:`LazyArray`).

    Parameters:
        plan: what to write.
        out: a buffered binary stream, written from its start: a remote object's upload
            (:meth:`safeckpt.remote.RemotePath.open_write`, which discards it if this raises).

    Returns:
        The header's CRC32C (prefix bytes 28-31, which a shard index records [S5]).

    Raises:
        ChecksumError: a tensor's bytes changed between the two passes, or do not match the
            ``crc32c`` its :class:`LazyArray` gave; the tensor and both CRCs are named, and the
            stream holds an incomplete file (the caller discards it).

    Warns:
        UserWarning: the header or the tensor count is over the readers' default limit [W4].

    Example:
        >>> import io
        >>> out = io.BytesIO()
        >>> crc = stream_plan(Plan({"w": np.ones(3, np.float32)}, None, 64, True), out)
        >>> out.getvalue() == plan_bytes(Plan({"w": np.ones(3, np.float32)}, None, 64, True))
        True
    """
    plan.warn_beyond_reader_defaults()
    crcs = [_first_crc(array) for array in plan.arrays] if plan.checksum else []
    head = plan.prefix_and_header(crcs)
    _write_pieces(out, memoryview(head))
    pos = plan.header_end
    for i, (array, offset) in enumerate(zip(plan.arrays, plan.offsets)):
        out.write(bytes(offset - pos))  # the padding before it, less than align [W1], [T9]
        crc = stream_array(out, array, plan.checksum)
        if plan.checksum and crc != crcs[i]:
            given = type(array) is LazyArray and array.crc32c is not None
            raise ChecksumError(
                f"tensor {quote(plan.names[i])}: its bytes "
                + ("do not match the CRC32C its source gave" if given else
                   "changed while it was saved (another thread or device wrote to the array?)")
                + f": CRC32C {crcs[i]:#010x} in the header, {crc:#010x} as written; the file is "
                "incomplete and not published [RS7]; save again once the array no longer changes")
        pos = offset + plan.nbytes[i]
    if pos != plan.file_size:
        raise RuntimeError(f"safeckpt bug: streamed {pos} bytes, planned {plan.file_size}")
    return _header_crc(head)


def stream_array(out: BinaryIO, array: Any, checksum: bool = False) -> Optional[int]:
    """Write ``array``'s bytes (little-endian, C order; a :class:`LazyArray` is loaded) to ``out``
    in pieces of at most :data:`PIECE` bytes [RS7]; return their CRC32C when ``checksum``.

    With ``checksum`` each piece is copied first, and the copy is checksummed and written: bytes
    that change while they are written cannot differ from the CRC returned.

    Example:
        >>> import io
        >>> stream_array(io.BytesIO(), np.zeros(4, np.uint8), checksum=True) == 0x48674BC7
        True
    """
    data = _flat_bytes(array)
    if not checksum:
        _write_pieces(out, data.data)
        return None
    crc32c, crc = _backend.backend.crc32c, 0
    staging = np.empty(min(PIECE, data.nbytes), np.uint8)
    for start in range(0, data.nbytes, PIECE):
        piece = staging[:min(PIECE, data.nbytes - start)]
        piece[:] = data[start:start + PIECE]
        crc = crc32c(piece, crc)
        out.write(piece.data)
    return crc


def _first_crc(array: Any) -> int:
    """The CRC32C of an array's bytes, for the header a stream writes first [RS7]: a
    :class:`LazyArray`'s own ``crc32c`` when it knows it (not loaded), else computed."""
    if type(array) is LazyArray and array.crc32c is not None:
        return int(array.crc32c)
    return int(_backend.backend.crc32c(_flat_bytes(array)))


def _flat_bytes(array: Any) -> np.ndarray:
    """The bytes of :func:`le_bytes` as a flat uint8 array."""
    return le_bytes(array)[0].reshape(-1).view(np.uint8)


def _write_pieces(out: BinaryIO, view: memoryview) -> None:
    """``out.write(view)`` in pieces of at most :data:`PIECE` bytes [RS7]."""
    for start in range(0, view.nbytes, PIECE):
        out.write(view[start:start + PIECE])
