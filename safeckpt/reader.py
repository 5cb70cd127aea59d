"""Reading one file: :class:`Reader` (a validated .sckpt or .safetensors file) and the reader
protocol, :class:`TensorMap`, that every reader shares and the layers above use.

Every rule of docs/FORMAT.md is checked when a file is opened, before any array is handed out.
The public functions (``open``, ``load_file``, ``load_bytes``) are in :mod:`safeckpt.api`.

Example:
    >>> import numpy as np, safeckpt
    >>> data = safeckpt.save_bytes({"a": np.zeros(2), "b": np.ones((2, 2), np.int8)})
    >>> with Reader(data) as f:                        # a file in memory, checked whole
    ...     f.names, f.locate(1), f.entry(1).shape
    (['a', 'b'], (<safeckpt.Reader <bytes> (2 tensors)>, 1), (2, 2))
"""

from __future__ import annotations

import collections
import errno
import itertools
import math
import operator
import os
import shlex
import stat
import threading
from typing import (Any, Callable, Dict, Iterator, List, Literal, NoReturn, Optional, Sequence,
                    Tuple, TypeVar, Union, cast)

import numpy as np

from . import _backend, dtypes, packing
from . import format as fmt
from . import safetensors_format as _safetensors
from . import tree as _tree
from .dtypes import (DTYPE_BY_CODE, ITEMSIZE_BY_CODE, NAME_BY_CODE, NUMPY_MAX_NDIM,
                     PACKED_CODES, is_little_endian, nbytes_of)
from .errors import (ChecksumError, Code, LayoutError, ObjectChangedError, ReaderClosedError,
                     RefError, ShardError, UnsupportedDtypeError, error_for, plural, quote)
from .remote import RemoteFile

# mmap=False: tensors up to _SHARED_MAX bytes that lie next to each other in the file are read
# into shared blocks of up to _BLOCK_MAX bytes (a 20,000-tensor file: a few reads, not 20,000).
_SHARED_MAX = 1 << 20
_BLOCK_MAX = 64 << 20
_VERIFY_BATCH = 64 << 20  # verify() reads (mmap=False) and checks at most this much at a time
_REMOTE_HEAD = 64 << 10  # [RS1] the first ranged request of a remote file: prefix and header

_Self = TypeVar("_Self", bound="TensorMap")
TensorInfo = collections.namedtuple("TensorInfo", "name dtype shape nbytes offset crc32c")
TensorInfo.__doc__ = "What the header says of one tensor; ``crc32c`` is None without checksums."


def _column(data: bytes, code: Literal["Q", "I"]) -> Sequence[int]:
    """A column of little-endian u64 ("Q") or u32 ("I") as a sequence of ints, without a copy:
    a file opened for one tensor does not turn every entry into a Python int."""
    if not dtypes.BIG_ENDIAN_HOST:
        return memoryview(data).cast(code)
    return np.frombuffer(data, "<u8" if code == "Q" else "<u4").tolist()


# What a file that is not a checkpoint may be, by its first bytes (for the message).
_LOOKS_LIKE = (
    (b"PK\x03\x04", "a zip archive, as torch.save and numpy.savez write"),
    (b"\x93NUMPY", "a numpy .npy file"),
    *((b"\x80" + bytes([protocol]), "a pickle, as older torch.save writes") for protocol in range(2, 6)),
)


def _not_a_checkpoint(prefix: bytes, path: Optional[str]) -> str:
    """The end of the message for a file without the magic [P2]: its first bytes, what they look
    like, and how to convert it."""
    detail = f": it starts with {quote(bytes(prefix[:8]))}"
    kind = next((kind for magic, kind in _LOOKS_LIKE if prefix.startswith(magic)), None)
    if kind is None:
        return detail
    source, target = "FILE", "OUT.sckpt"
    if path is not None:
        stem = os.path.splitext(path)[0]
        source, target = path, stem + (".sckpt" if stem + ".sckpt" != path else "-converted.sckpt")
    return (f"{detail}, like {kind}; convert it with `safeckpt convert {shlex.quote(source)} "
            f"{shlex.quote(target)}` or safeckpt.convert(), which never unpickles")


class TensorMap:
    """The reader protocol: what every reader (:class:`Reader`, :class:`safeckpt.ShardedReader`)
    offers, and all that the layers above (the tree codec, the framework conversions, dcp) use.

    Public interface: ``keys()``, ``len``, ``in``, ``[name]``, ``info``, ``get_slice``,
    ``load_all``, ``tree``, ``load(prefix)``, ``verify``, ``metadata``, ``close`` and use as a
    context manager. Internal protocol, by index into :attr:`names`:

    - :attr:`where`: how messages name the file; :attr:`names`: the tensor names in order;
      :meth:`check_open`.
    - :meth:`locate` ``(i) -> (reader, j)``: the single-file :class:`Reader` that holds tensor
      ``i`` and its index there, whose :meth:`Reader.entry`, :meth:`Reader.read_ranges` and
      :meth:`Reader.check_crc` read its bytes (the GPU staging of
      :func:`safeckpt.torch_convert.device_tensors`).
    - :meth:`load_indices` ``(indices, verify)``: arrays, CRC32C checked as :meth:`verifies` says.
    - :attr:`skeleton`: the checked tree (FORMAT.md section 8), a flat file's built on first use;
      :attr:`subtree_cache`: a dict that :func:`safeckpt.tree.view` keeps its views in.

    A subclass sets ``_names`` to the list of names while it is open and to None when closed,
    ``_stored_tree`` to the checked tree or ``NO_TREE``, and ``where``.
    """

    where = "<reader>"
    path: Optional[str] = None
    metadata: Dict[str, Any]
    size: int
    save_id: Optional[bytes] = None  # the file's save_id [X1], for a file that has one
    _names: Optional[List[str]] = None
    _stored_tree: Any = fmt.NO_TREE
    _flat_skeleton: Optional[list] = None
    _subtrees: Optional[Dict[int, Any]] = None

    def check_open(self) -> List[str]:
        """The tensor names; raises ReaderClosedError after close() (in any thread)."""
        names = self._names
        if names is None:
            raise ReaderClosedError(f"{self.where}: the reader is closed")
        return names

    @property
    def names(self) -> List[str]:
        """The tensor names in storage order (the reader's own list: do not change it).

        Raises:
            ReaderClosedError: after close().
        """
        return self.check_open()

    def keys(self) -> List[str]:
        """Tensor names, in storage order."""
        return list(self.check_open())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.check_open())

    @property
    def closed(self) -> bool:
        return self._names is None

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the file(s); arrays already handed out stay valid."""
        raise NotImplementedError

    def __contains__(self, name: object) -> bool:
        raise NotImplementedError

    def __getitem__(self, name: str) -> np.ndarray:
        """The tensor as a numpy array."""
        raise NotImplementedError

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape, byte length, offset and checksum of a tensor, without reading its data."""
        raise NotImplementedError

    def get_slice(self, name: str) -> "TensorSlice":
        """A lazy handle whose ``[...]`` reads only the rows of the first axis it needs."""
        raise NotImplementedError

    def shard_of(self, name: str) -> Optional[str]:
        """The path of the file that holds ``name``."""
        raise NotImplementedError

    def location(self, name: str) -> Optional[fmt.Location]:
        """Where the bytes of ``name`` are, for a later checkpoint to refer to them (FORMAT.md
        section 11), or None when they cannot be referred to: the file that holds them has no
        ``save_id`` or no checksums (shards and safetensors files never have both).

        Raises:
            KeyError: no tensor ``name``.
        """
        self.info(name)
        return None

    def raw_bytes(self, name: str, *, verify: Optional[bool] = None) -> np.ndarray:
        """The stored bytes of ``name`` (little-endian, C order) as a 1-d uint8 array, to compare
        with a new tensor's bytes [X7]. ``verify=True`` checks its CRC32C first; else the array
        is loaded as ``reader[name]`` loads it."""
        if verify:
            self.verify([name])
        array = self[name]
        return packing.pack(array, dtypes.code_of(array.dtype, name))  # packed as stored [T11]

    def load_all(self, *, verify: Optional[bool] = None) -> Dict[str, np.ndarray]:
        """Every tensor as ``{name: array}``."""
        raise NotImplementedError

    def verifies(self, verify: Optional[bool] = None) -> bool:
        """Whether a load with this ``verify`` checks each tensor's CRC32C [T10]."""
        raise NotImplementedError

    @property
    def has_checksums(self) -> bool:
        """Whether every tensor has a stored CRC32C [T10]."""
        raise NotImplementedError

    def verify(self, names: Optional[Sequence[str]] = None, *,
               arrays: Optional[Dict[str, np.ndarray]] = None) -> None:
        """Check the CRC32C of tensors (all by default) [T10]."""
        raise NotImplementedError

    def locate(self, i: int) -> Tuple["Reader", int]:
        """The single-file reader that holds tensor ``i``, and the tensor's index there."""
        raise NotImplementedError

    def load_indices(self, indices: Sequence[int],
                     verify: Optional[bool] = None) -> List[np.ndarray]:
        """The arrays of the tensors at ``indices``, in order; CRC32C checked as
        :meth:`verifies` says for ``verify``."""
        raise NotImplementedError

    @property
    def stored_tree(self) -> Any:
        """The tree the header holds, checked [R1]-[R6], or ``format.NO_TREE`` (a flat file)."""
        return self._stored_tree

    @property
    def skeleton(self) -> Any:
        """The checked tree; a flat file's (a dict of its tensors by name) is built on first use."""
        names = self.check_open()
        if self._stored_tree is not fmt.NO_TREE:
            return self._stored_tree
        if self._flat_skeleton is None:
            self._flat_skeleton = _tree.flat_skeleton(names)
        return self._flat_skeleton

    @property
    def subtree_cache(self) -> Dict[int, Any]:
        """The :class:`safeckpt.tree.Subtree` of each container node, by ``id(node)``, so each
        builds its key index once (kept by :func:`safeckpt.tree.view`)."""
        if self._subtrees is None:
            self._subtrees = {}
        return self._subtrees

    @property
    def tree(self) -> Any:
        """The saved object's structure, lazily: containers are :class:`safeckpt.tree.Subtree`
        views that read a tensor only when it is indexed; ``.load()`` materialises a subtree.

        A file without a tree (a flat file, version 1.0) is a dict of its tensors by name.

        Example:
            >>> with safeckpt.open("ckpt.sckpt") as f:                  # doctest: +SKIP
            ...     w = f.tree["model"]["layers.0.weight"]             # reads this tensor only
            ...     opt = f.tree["optimizer"].load()
        """
        self.check_open()
        return _tree.view(self, _tree.find(self, None))

    def load(self, prefix: Union[None, str, Sequence[Any]] = None, *,
             framework: Optional[str] = None, map_location: Any = None,
             verify: Optional[bool] = None) -> Any:
        """The saved object (or the subtree at ``prefix``) with its tensors; see :func:`safeckpt.load`."""
        self.check_open()
        return _tree.materialize(self, _tree.find(self, prefix), framework=framework,
                                 map_location=map_location, verify=verify)


class TensorTable:
    """The tensor table of one file (FORMAT.md section 6), as read from its header: columns kept
    as they are (no Python int per entry until asked for), shapes built on first use.

    ``index`` maps names to positions; ``codes`` and ``ndims`` are bytes, ``offsets``, ``nbytes``,
    ``dims`` and ``crcs`` (None without checksums) sequences of ints.
    """

    def __init__(self, index: Dict[str, int], codes: bytes, ndims: bytes,
                 dims: Sequence[int], offsets: Sequence[int], nbytes: Sequence[int],
                 crcs: Optional[Sequence[int]]) -> None:
        self.index, self.codes, self.ndims, self.dims = index, codes, ndims, dims
        self.offsets, self.nbytes, self.crcs = offsets, nbytes, crcs
        self._shapes: Optional[List[Tuple[int, ...]]] = None
        self._starts: Optional[np.ndarray] = None

    def shape(self, i: int) -> Tuple[int, ...]:
        """The shape of tensor ``i``, without building every shape (a file opened for one).

        Where each shape starts in the flat ``shape`` column is summed once, in numpy, the first
        time: every later call costs the same, whatever ``i`` and the number of tensors.
        """
        if self._shapes is not None:
            return self._shapes[i]
        starts = self._starts
        if starts is None:
            starts = np.zeros(len(self.ndims) + 1, np.int64)
            np.cumsum(np.frombuffer(self.ndims, np.uint8), out=starts[1:])
            self._starts = starts
        start = int(starts[i])
        return tuple(self.dims[start:start + self.ndims[i]])

    def shapes(self) -> List[Tuple[int, ...]]:
        """The shape of every tensor, built once (from the flat ``shape`` column)."""
        if self._shapes is None:
            ndims, dims = self.ndims, self.dims
            shapes: List[Tuple[int, ...]]
            if ndims and min(ndims) == max(ndims):  # one rank for all: group in C, not in a loop
                shapes = list(zip(*[iter(dims)] * ndims[0])) if ndims[0] else [()] * len(ndims)
            else:
                it = iter(dims)
                shapes = [tuple(itertools.islice(it, k)) for k in ndims]
            self._shapes = shapes
        return self._shapes

    def dtype(self, i: int, name: str) -> np.dtype:
        """The numpy dtype of tensor ``i`` (named ``name``); UnsupportedDtypeError naming it when
        the installed ml_dtypes lacks its type."""
        return dtypes.numpy_dtype(self.codes[i], name)

    def entry(self, i: int, name: str) -> TensorInfo:
        """What the table says of tensor ``i``, as a :class:`TensorInfo`."""
        crc = self.crcs[i] if self.crcs is not None else None
        return TensorInfo(name, self.dtype(i, name), self.shape(i), self.nbytes[i],
                          self.offsets[i], crc)


class References:
    """The references of a file to tensors of other files (FORMAT.md section 11), checked
    [X1]-[X4] when the file is opened; what :class:`safeckpt.refs.LinkedReader` resolves.

    ``files``, ``save_ids``, ``header_crcs``, ``sizes``: the referenced files; ``names``: the
    references' names in the checkpoint; ``file``: each reference's index in ``files``;
    ``table``: their dtypes, shapes, offsets (in the file that holds each), byte lengths and
    CRC32Cs, as a :class:`TensorTable`; ``tree``: the file's tree over its own tensors, then the
    references [R1]-[R6], or ``format.NO_TREE``.
    """

    tree: Any = fmt.NO_TREE

    def __init__(self, refs: fmt.Refs, where: str, max_ndim: int) -> None:
        self.files, self.save_ids = refs.files, refs.save_ids
        self.header_crcs, self.sizes, self.names = refs.header_crcs, refs.sizes, refs.names
        self.file = _column(refs.file, "I")
        columns = refs.columns
        _check_references(refs, where, max_ndim)
        self.table = TensorTable(dict(zip(refs.names, range(len(refs.names)))), columns["dtypes"],
                                 columns["ndims"], _column(columns["shape"], "Q"),
                                 _column(columns["offsets"], "Q"), _column(columns["nbytes"], "Q"),
                                 _column(refs.crcs, "I"))

    def location(self, r: int) -> fmt.Location:
        """Where reference ``r``'s bytes are, as its entry says."""
        j, table = self.file[r], self.table
        crcs = cast(Sequence[int], table.crcs)  # a reference always has one [X3]
        return fmt.Location(self.files[j], self.save_ids[j], self.header_crcs[j], self.sizes[j],
                            table.offsets[r], table.nbytes[r], crcs[r])

    def summary(self) -> List[Tuple[str, int, int]]:
        """``(file, references into it, their bytes)`` for each file, in the order of ``files``."""
        counts, nbytes = [0] * len(self.files), [0] * len(self.files)
        for j, size in zip(self.file, self.table.nbytes):
            counts[j] += 1
            nbytes[j] += size
        return list(zip(self.files, counts, nbytes))


def _check_references(refs: fmt.Refs, where: str, max_ndim: int) -> None:
    """[X4]: each reference's dtype, dimensions and byte length [T1]-[T5], each within the size of
    its file; the error of the rule, naming the reference.

    All references are screened at once with numpy; those the screen flags are checked exactly,
    in order, so the first real failure is the one reported (as the backends check a table).
    """
    columns = refs.columns
    file = np.frombuffer(refs.file, "<u4")
    codes = np.frombuffer(columns["dtypes"], np.uint8)
    ndims = np.frombuffer(columns["ndims"], np.uint8)
    dims = np.frombuffer(columns["shape"], "<u8")  # 8 bytes per dimension [X3]
    nbytes = np.frombuffer(columns["nbytes"], "<u8")
    ends = np.cumsum(ndims, dtype=np.int64)
    starts = ends - ndims
    flagged = (codes >= len(ITEMSIZE_BY_CODE)) | (ndims > max_ndim)  # [T1], [T2]
    big = np.concatenate(([0], np.cumsum(dims >= np.uint64(_DIM_LIMIT), dtype=np.int64)))
    flagged |= big[ends] != big[starts]  # [T3]
    # [T4] screened in floating point with a wide margin, then [T5] exact in uint64 where it passed
    itemsizes = np.array(ITEMSIZE_BY_CODE, np.uint64)[np.minimum(codes, len(ITEMSIZE_BY_CODE) - 1)]
    log_sum = np.concatenate(([0.0], np.cumsum(np.log2(np.maximum(dims, 1).astype(np.float64)))))
    flagged |= log_sum[ends] - log_sum[starts] + np.log2(itemsizes.astype(np.float64)) >= 61.0
    products = np.multiply.reduceat(np.append(dims, np.uint64(1)), starts) if len(codes) else dims
    products[ndims == 0] = 1
    bits = np.array(dtypes.BITS_BY_CODE, np.uint64)[np.minimum(codes, len(ITEMSIZE_BY_CODE) - 1)]
    three, seven = np.uint64(3), np.uint64(7)
    with np.errstate(over="ignore"):  # ceil(products * bits / 8): groups of 8, then the rest
        expected = (products >> three) * bits + (((products & seven) * bits + seven) >> three)
        flagged |= expected != nbytes
    for r in np.flatnonzero(flagged).tolist():
        code = _entry_rule(int(codes[r]), dims[starts[r]:ends[r]].tolist(), int(nbytes[r]),
                           max_ndim)
        if code:
            raise error_for(code, f"{where}, reference {quote(refs.names[r])}", _table_detail(
                code, r, columns, max_ndim, lambda: refs.sizes[file[r]]))
    room = np.array(refs.sizes, np.int64)[file] - nbytes.astype(np.int64)  # nbytes < 2**63 now
    offsets = np.frombuffer(columns["offsets"], "<u8")
    past = np.flatnonzero((room < 0) | (offsets > np.maximum(room, 0).astype(np.uint64)))
    if len(past):
        r = int(past[0])
        j = int(file[r])
        raise LayoutError(f"{where}, reference {quote(refs.names[r])}: offset {int(offsets[r])} "
                          f"and nbytes {int(nbytes[r])} run past the end of "
                          f"{quote(refs.files[j])}, {refs.sizes[j]} bytes [X4]")


_DIM_LIMIT = 1 << 63  # [T3] every dimension, [T4] every byte size is below 2**63


def _entry_rule(code: int, dims: List[int], nbytes: int, max_ndim: int) -> Code:
    """The first of [T1]-[T5] that a table entry breaks, in exact integers; OK if none."""
    if code >= len(ITEMSIZE_BY_CODE):
        return Code.DTYPE
    if len(dims) > max_ndim:
        return Code.NDIM
    if any(dim >= _DIM_LIMIT for dim in dims):
        return Code.DIM
    itemsize = ITEMSIZE_BY_CODE[code]
    if math.prod(dim for dim in dims if dim) * itemsize >= _DIM_LIMIT:
        return Code.TOO_LARGE
    if nbytes != nbytes_of(code, math.prod(dims)):
        return Code.NBYTES
    return Code.OK


class Reader(TensorMap):
    """A validated .sckpt file, opened for reading; made by :func:`safeckpt.open`.

    Arrays from a memory-mapped reader view the mapping (no copy); the mapping lives as long as
    any of them, so ``close()`` never invalidates an array already handed out.

    ``source`` is a path, the bytes of a file, or a :class:`safeckpt.remote.RemoteFile` (an
    object read by ranged requests, FORMAT.md section 12: arrays are fresh memory, as with
    ``mmap=False``; :attr:`remote` is it); ``name`` replaces it in messages. A shard index
    (FORMAT.md section 9) is refused unless ``allow_index``: :func:`safeckpt.open` opens one so,
    then reads its shards with a :class:`safeckpt.ShardedReader`. Likewise a file with references
    to other files (section 11) is refused unless ``allow_refs``: this reader then checks them
    [X1]-[X4] but holds only the file's own tensors (:attr:`refs` has the others);
    :func:`safeckpt.open` reads them all with a :class:`safeckpt.refs.LinkedReader`.
    """

    format = "sckpt"  # or "safetensors": what the file is, found from its first bytes
    shard_index: Optional[Dict[str, Any]] = None  # an index's "shards" map [S2], else None
    refs: Optional["References"] = None  # the references to other files [X1]-[X4], else None
    table: TensorTable
    version: Optional[Tuple[int, int]]  # (major, minor); None for safetensors
    flags: int
    align: int
    header_crc: Optional[int]
    remote: Optional[RemoteFile] = None  # the remote object read, else None
    _fd_users = 0  # reads in flight on _fd (see pread_into)
    _head = b""  # remote: the bytes at the start of the object read when it was opened [RS1]
    _header_end = 0  # remote: where the prefix and header end, compared again [RS4]
    _ends: Any = None  # remote: each tensor's end offset (numpy), for the padding after it [RS3]

    def __init__(self, source: Union[str, "os.PathLike[str]", bytes, bytearray, memoryview,
                                     RemoteFile], *,
                 mmap: bool = True, name: Optional[str] = None,
                 max_header_size: int = fmt.MAX_HEADER_SIZE, max_tensors: int = fmt.MAX_TENSORS,
                 max_ndim: int = fmt.MAX_NDIM, max_depth: int = fmt.MAX_DEPTH,
                 allow_index: bool = False, allow_refs: bool = False) -> None:
        self._be = _backend.backend
        self._lock = threading.Lock()  # guards _fd against close() while another thread reads
        self._fd: Optional[int] = None
        # the whole file as a buffer (mapping or bytes), if not read by pread
        self._buffer: Optional[memoryview] = None
        self._mapping: Any = None  # the backend's mapping object, with mmap=True
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.path = None
            self.where = name or "<bytes>"
            self._buffer = memoryview(source).cast("B")
            size = self._buffer.nbytes
        elif isinstance(source, RemoteFile):
            self.remote, self.path = source, source.where
            self.where = name or repr(source.where)
            size = source.size
        else:
            self.path = os.fspath(source)
            self.where = name or repr(self.path)
            # O_NONBLOCK: a FIFO given as the path must not block open() until a writer comes
            # (its size is 0, so it is then refused [P1]); regular files ignore the flag.
            flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
            self._fd = os.open(self.path, flags)
        try:
            if self._fd is not None:
                st = os.fstat(self._fd)
                if stat.S_ISDIR(st.st_mode):
                    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), self.path)
                size = st.st_size
                if mmap and size >= fmt.PREFIX_SIZE:
                    self._mapping = self._be.map_file(self._fd, size)
                    self._buffer = self._mapping.buffer
            self._open(size, max_header_size, max_tensors, max_ndim, max_depth)
        except BaseException:
            self.close()
            raise
        if self._buffer is not None and self._fd is not None:
            os.close(self._fd)  # the mapping keeps the file's pages; no descriptor needed
            self._fd = None
        self.size = size
        if self.shard_index is not None and not allow_index:  # an index holds no tensors
            self.close()
            raise ShardError(f"{self.where} is a shard index, not a file of tensors; open it with "
                             "safeckpt.open(), which reads its shards [S1]")
        if self.refs is not None and not allow_refs:  # some tensors are in other files
            self.close()
            files = self.refs.files
            raise RefError(f"{self.where} refers to tensors in other files of its directory "
                           f"({', '.join(files[:3])}{', ...' if len(files) > 3 else ''}); open "
                           "it by its path with safeckpt.open(), which reads them [X5]")

    def _read(self, offset: int, length: int) -> Union[bytes, memoryview]:
        """The bytes at [offset, offset+length), which the caller has bounds-checked."""
        if self._buffer is not None:
            return self._buffer[offset:offset + length]
        if self.remote is not None:
            return self._read_head(offset + length)[offset:offset + length]
        if not length:  # e.g. the prefix of an empty file, a FIFO or a device (size 0): no pread
            return b""
        fd = cast(int, self._fd)  # no buffer: the file is open for pread
        data = os.pread(fd, length, offset)
        while len(data) < length:  # pread may return less than asked on some filesystems
            more = os.pread(fd, length - len(data), offset + len(data))
            if not more:
                raise error_for(Code.TRUNCATED, self.where, " (the file shrank while being read)")
            data += more
        return data

    def _read_head(self, end: int) -> bytes:
        """The first ``end`` bytes (at least) of a remote object, read while it is opened [RS1]:
        one ranged request for the first 64 KiB, and for a longer header one more through the
        first tensor's offset (``end`` rounded up to the alignment, once the prefix gave it)."""
        remote, head = cast(RemoteFile, self.remote), self._head
        if end > len(head):
            align = getattr(self, "align", 1)  # set by _check_prefix; safetensors has none
            stop = min(remote.size, max(-(-end // align) * align, _REMOTE_HEAD))
            head += remote.read(len(head), stop - len(head))
            self._head = head
        return head

    def _open(self, size: int, max_header_size: int, max_tensors: int, max_ndim: int,
              max_depth: int) -> None:
        """Check the file: prefix (FORMAT.md section 2), header (3), table (6), padding (7) and
        tree (8), in that order, before anything is handed out."""
        prefix = bytes(self._read(0, min(size, fmt.PREFIX_SIZE)))
        if _safetensors.looks_like(prefix):  # no magic: its u64 length, then '{' [ST2]
            return self._open_safetensors(size, max_header_size, max_tensors, max_ndim,
                                          max_depth)
        minor, flags, header_len = self._check_prefix(prefix, size, max_header_size)
        header = fmt.decode_header(self._check_header(header_len), minor, flags,
                                   max_tensors=max_tensors, max_depth=max_depth)
        index, columns, crcs, self.metadata, tree, self.shard_index, self.save_id, refs = header
        names = list(index)
        self._header_end = fmt.PREFIX_SIZE + header_len
        self._check_table(names, columns, self._header_end, size, max_ndim)
        if refs is not None:  # the tree points at own tensors and references alike
            self.refs = References(refs, self.where, min(max_ndim, NUMPY_MAX_NDIM))
            self.refs.tree = _tree.check_tree(tree, names + refs.names, max_depth, self.where)
            tree = fmt.NO_TREE  # this reader holds the own tensors only, as a flat file
        # A shard index's tree points into the tensors of its shards: safeckpt.shard checks it [S6]
        self._stored_tree = tree if self.shard_index is not None else _tree.check_tree(
            tree, names, max_depth, self.where)
        self.flags = flags
        self.table = TensorTable(index, columns["dtypes"], columns["ndims"],
                                 _column(columns["shape"], "Q"), _column(columns["offsets"], "Q"),
                                 _column(columns["nbytes"], "Q"),
                                 _column(crcs, "I") if crcs is not None else None)
        self._names = names  # last: a reader with names is open

    def _check_prefix(self, prefix: bytes, size: int, max_header_size: int) -> Tuple[int, int, int]:
        """Parse the prefix [P1]-[P7]; sets ``version``, ``align``, ``header_crc``; returns
        ``(minor, flags, header_len)``."""
        code, fields = self._be.parse_prefix(prefix, size, max_header_size)
        if code == Code.TRUNCATED and len(prefix) < fmt.PREFIX_SIZE:  # too short: truncated only
            head = prefix[:len(fmt.MAGIC)]  # if what there is starts as a checkpoint does [P1, P2]
            if not fmt.MAGIC.startswith(head):
                text = fmt.MAGIC_TEXT_MANGLED
                code = Code.MAGIC_TEXT if text.startswith(head[:len(text)]) else Code.MAGIC
        if code:
            detail = ""
            if code == Code.MAGIC:
                detail = _not_a_checkpoint(prefix, self.path)
            elif code == Code.HEADER_LIMIT:
                header_len = int.from_bytes(prefix[16:24], "little")
                detail = (f": {header_len} > {max_header_size}; pass max_header_size=... "
                          "if you trust this file")
            raise error_for(code, self.where, detail)
        self.version = fields[0], fields[1]
        flags, header_len, self.align, self.header_crc = fields[2:]
        self._header_len = header_len
        return fields[1], flags, header_len

    def _check_header(self, header_len: int) -> Any:
        """The header's bytes, once their CRC32C matches the prefix's [P6]."""
        header = self._read(fmt.PREFIX_SIZE, header_len)
        actual = self._be.crc32c(header)
        if actual != self.header_crc:
            raise error_for(Code.HEADER_CRC, self.where,
                            f" (stored {self.header_crc:#010x}, computed {actual:#010x})")
        return header

    def _check_table(self, names: List[str], columns: Dict[str, Any], header_end: int, size: int,
                     max_ndim: int) -> None:
        """Validate the tensor table [T1]-[T9] and the padding between tensors [T7]."""
        be, n = self._be, len(names)
        table = (n, columns["dtypes"], columns["ndims"], columns["shape"], columns["offsets"],
                 columns["nbytes"])
        # [T2]: never more dimensions than numpy holds, whatever max_ndim says
        code, bad = be.validate_table(*table, header_end, self.align, size,
                                      min(max_ndim, NUMPY_MAX_NDIM))
        if code:
            self._raise_table(code, bad, names, columns, max_ndim)
        if self.remote is not None:  # [RS3]: the padding before tensor 0 now, the rest as read
            first = int.from_bytes(columns["offsets"][:8], "little") if n else header_end
            if any(self._read(header_end, first - header_end)):
                self._raise_table(Code.PADDING, 0, names, columns, max_ndim)
            return
        if self._mapping is not None:
            source = self._mapping
        else:
            source = self._buffer if self._buffer is not None else self._fd
        code, bad = be.check_padding(source, n, columns["offsets"], columns["nbytes"], header_end)
        if code:
            self._raise_table(code, bad, names, columns, max_ndim)

    def _raise_table(self, code: int, index: int, names: List[str], columns: Dict[str, Any],
                     max_ndim: int) -> NoReturn:
        """Raise a table error with the tensor's name and its bad value."""
        where = self.where
        if index < len(names):
            where += f", tensor {quote(names[index])}"
        raise error_for(code, where, _table_detail(code, index, columns, max_ndim, self._size_hint))

    def _size_hint(self) -> int:
        if self._buffer is not None:
            return len(self._buffer)
        if self.remote is not None:
            return self.remote.size
        return os.fstat(cast(int, self._fd)).st_size  # no buffer: the file is open for pread

    def _open_safetensors(self, size: int, max_header_size: int, max_tensors: int, max_ndim: int,
                          max_depth: int) -> None:
        """Validate a .safetensors file [ST1]-[ST9] and fill the same table as ``_open``."""
        table = _safetensors.parse(self._read, size, where=self.where,
                                   max_header_size=max_header_size, max_tensors=max_tensors,
                                   max_ndim=max_ndim, max_depth=max_depth)
        self.format, self.version, self.align = "safetensors", None, 1
        if self.remote is not None:  # [RS4] compares the length and the JSON header again
            self._header_end = (_safetensors.LENGTH_SIZE
                                + int.from_bytes(self._head[:_safetensors.LENGTH_SIZE], "little"))
        self.flags, self.header_crc, self.shard_index = 0, None, None
        self.metadata = table.metadata
        self._stored_tree = _tree.check_tree(table.tree, table.names, max_depth, self.where)
        self.table = TensorTable(dict(zip(table.names, range(len(table.names)))), table.codes,
                                 table.ndims, table.dims, table.offsets, table.nbytes, None)
        self._names = table.names  # last: a reader with names is open

    # -- the mapping interface ------------------------------------------------------------------

    def pread_into(self, offsets: Sequence[int], lengths: Sequence[int], dests: Sequence[Any],
                   checksum: Union[bool, Sequence[bool]] = False) -> Any:
        """The backend's parallel ``read_into`` on this reader's descriptor (``mmap=False``); its
        result: the CRC32Cs asked for by ``checksum``, or None. :class:`safeckpt.shard` overrides
        it to reopen a descriptor it closed for room.

        A close() in another thread waits for no one: it marks the reader closed, and the last
        read in flight closes the descriptor, so no read ever lands on a reused descriptor number.

        A remote object is read by :meth:`RemoteFile.read_into` instead (see :meth:`_read_remote`).
        """
        if self.remote is not None:
            return self._read_remote(offsets, lengths, dests, checksum)
        with self._lock:
            if self._fd is None or self._names is None:
                raise ReaderClosedError(f"{self.where}: the reader is closed")
            fd = self._fd
            self._fd_users += 1
        try:
            return self._be.read_into(fd, offsets, lengths, dests, checksum)
        finally:
            with self._lock:
                self._fd_users -= 1
                if not self._fd_users and self._names is None and self._fd is not None:
                    os.close(self._fd)
                    self._fd = None

    def _read_remote(self, offsets: Sequence[int], lengths: Sequence[int], dests: Sequence[Any],
                     checksum: Union[bool, Sequence[bool]]) -> Any:
        """:meth:`pread_into` for a remote object, with the checks of FORMAT.md section 12: the
        padding inside and right after each range that ends a tensor [RS3], and, for a file without
        checksums, its prefix and header read again and compared with those read at open [RS4]."""
        names, remote = self.check_open(), cast(RemoteFile, self.remote)
        ends = self._ends
        if ends is None:
            ends = self._ends = (np.asarray(self.table.offsets, np.int64)
                                 + np.asarray(self.table.nbytes, np.int64))
        starts = np.asarray(offsets, np.int64)
        stops = starts + np.asarray(lengths, np.int64)
        # the padding after a range that ends tensor j runs to the next multiple of align [T6]
        at = np.minimum(np.searchsorted(ends, stops), max(len(ends) - 1, 0))
        ends_tensor = (ends[at] == stops) if len(ends) else np.zeros(len(stops), bool)
        pads = np.where(ends_tensor, np.minimum(-(-stops // self.align) * self.align, self.size)
                        - stops, 0).tolist()
        where = [self.where if not pad else f"{self.where}, tensor {quote(names[j + 1])}"
                 for pad, j in zip(pads, at.tolist())]
        try:
            crcs = remote.read_into(offsets, lengths, dests, checksum, pads, where)
            for start, stop, dest in zip(starts.tolist(), stops.tolist(), dests):
                first, last = np.searchsorted(ends, [start, stop], side="right").tolist()
                for j in range(first, last):  # tensors that end inside the range: their padding
                    end = int(ends[j])
                    pad_end = min(-(-end // self.align) * self.align, stop)
                    if end < pad_end and _bytes(dest)[end - start:pad_end - start].any():
                        raise error_for(Code.PADDING,
                                        f"{self.where}, tensor {quote(names[j + 1])}",
                                        f" (in bytes {end}-{pad_end - 1}) [RS3]")
        except LayoutError:  # padding that is not zero: a bad file, or one replaced since open
            self.check_unchanged()  # ObjectChangedError if its header changed [RS4]
            raise
        if self.table.crcs is None:
            self.check_unchanged()
        return crcs

    def check_unchanged(self) -> None:
        """For a remote object: read its prefix and header again and compare them byte for byte
        with those read when it was opened [RS4]. A load of a file without checksums runs it
        itself, and so does :meth:`read_ranges` (bytes inside tensors, which no CRC32C covers).
        Nothing to do for a local file or bytes.

        Raises:
            ObjectChangedError: they differ: the object was replaced since it was opened.
            RemoteError: the storage failed.
        """
        self.check_open()
        if self.remote is None:
            return
        again = self.remote.read(0, self._header_end)
        if again != self._head[:self._header_end]:
            raise ObjectChangedError(
                f"{self.where}: the object changed since it was opened (its prefix and header "
                "differ from those read then) [RS4]; nothing of this load is returned: open it "
                "again")

    def read_ranges(self, offsets: Sequence[int], lengths: Sequence[int],
                    dests: Sequence[np.ndarray]) -> None:
        """Copy the file's bytes at ``offsets`` into the uint8 arrays ``dests`` (ranges inside
        checked tensors): from the mapping, or by one parallel pread with ``mmap=False``, or by
        ranged requests for a remote object (then :meth:`check_unchanged`)."""
        self.check_open()
        if self._buffer is None:
            self.pread_into(offsets, lengths, dests)
            if self.remote is not None and self.table.crcs is not None:
                self.check_unchanged()  # [RS4]: parts of tensors, which no CRC32C covers
            return
        for offset, length, dest in zip(offsets, lengths, dests):
            dest[:length] = np.frombuffer(self._buffer, np.uint8, length, offset)

    def locate(self, i: int) -> Tuple["Reader", int]:
        """This reader and ``i``: a single file holds every tensor it names."""
        return self, i

    def entry(self, i: int) -> TensorInfo:
        """What the header says of tensor ``i`` (see :meth:`info`)."""
        return self.table.entry(i, self.check_open()[i])

    def _position(self, name: str) -> int:
        self.check_open()
        try:
            return self.table.index[name]
        except KeyError:
            raise KeyError(f"{self.where} has no tensor {quote(name)}") from None

    def __contains__(self, name: object) -> bool:
        self.check_open()
        return name in self.table.index

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape, byte length, offset and checksum of a tensor, without reading its data."""
        return self.table.entry(self._position(name), name)

    def __getitem__(self, name: str) -> np.ndarray:
        """The tensor as a numpy array: a view of the mapping, or fresh memory if ``mmap=False``."""
        return self.load_indices([self._position(name)])[0]

    def get_slice(self, name: str) -> "TensorSlice":
        """A lazy handle whose ``[...]`` reads only the rows of the first axis it needs.

        Example: ``reader.get_slice("emb")[100:200]`` reads 100 rows.
        """
        return TensorSlice(self, self._position(name))

    def shard_of(self, name: str) -> Optional[str]:
        """The path of the file that holds ``name``: this one (as :meth:`ShardedReader.shard_of`
        names a shard), so code written for sharded checkpoints also reads a single file.

        Example: ``safeckpt.open("model.sckpt").shard_of("w")`` is ``"model.sckpt"``.
        """
        self._position(name)
        return self.path

    def location(self, name: str) -> Optional[fmt.Location]:
        """Where the bytes of ``name`` are (this file, its save id, header CRC and size, the
        tensor's offset, length and CRC32C), for a later checkpoint to refer to them (FORMAT.md
        section 11); None when this file cannot be referred to: no ``save_id``, no checksums, or
        not a .sckpt file opened by its path.

        Raises:
            KeyError: no tensor ``name``.

        Example:
            >>> safeckpt.open("step-10.sckpt").location("w").file        # doctest: +SKIP
            'step-10.sckpt'
        """
        return self.location_at(self._position(name))

    def location_at(self, i: int) -> Optional[fmt.Location]:
        """:meth:`location` of tensor ``i``."""
        crcs, path = self.table.crcs, self.path
        if self.save_id is None or crcs is None or path is None or self.header_crc is None:
            return None
        return fmt.Location(os.path.basename(path), self.save_id, self.header_crc, self.size,
                            self.table.offsets[i], self.table.nbytes[i], crcs[i])

    def raw_bytes(self, name: str, *, verify: Optional[bool] = None) -> np.ndarray:
        """The stored bytes of ``name`` (little-endian, C order) as a read-only 1-d uint8 array:
        a view of the mapping (no copy), or read with pread (``mmap=False``); to compare with a
        new tensor's bytes before referring to them [X7]. ``verify`` as for :meth:`verifies`.

        Raises:
            KeyError: no tensor ``name``.
            ChecksumError: the bytes read do not match their CRC32C [T10].

        Example:
            >>> bytes(Reader(safeckpt.save_bytes({"a": np.int16([1, 2])})).raw_bytes("a"))
            b'\\x01\\x00\\x02\\x00'
        """
        return self.raw_bytes_at(self._position(name), verify)

    def raw_bytes_at(self, i: int, verify: Optional[bool] = None) -> np.ndarray:
        """:meth:`raw_bytes` of tensor ``i``."""
        self.check_open()
        check = self.verifies(verify)
        offset, size = self.table.offsets[i], self.table.nbytes[i]
        if self._buffer is not None:
            out = np.frombuffer(self._buffer, np.uint8, size, offset)
            if check:
                self.check_crc(i, self._be.crc32c(out))
        else:
            out = np.empty(size, np.uint8)
            if size:
                crcs = self.pread_into([offset], [size], [out], [check])
                if check:
                    self.check_crc(i, int(crcs[0]))
        out.flags.writeable = False
        return out

    def references(self) -> List[Tuple[str, int, int]]:
        """``(file, tensors, bytes)`` for each file this one refers to (FORMAT.md section 11), in
        the order of its ``refs``; empty for a file without references."""
        self.check_open()
        return [] if self.refs is None else self.refs.summary()

    def load_all(self, *, verify: Optional[bool] = None) -> Dict[str, np.ndarray]:
        """Every tensor as ``{name: array}``; with ``mmap=False`` read in parallel.

        ``verify``: see :meth:`verifies`.
        """
        names = self.check_open()
        if self._mapping is not None:
            self._advise("willneed")
        return dict(zip(names, self.load_indices(range(len(names)), verify)))

    def verifies(self, verify: Optional[bool] = None) -> bool:
        """Whether a load with this ``verify`` checks each tensor's CRC32C [T10].

        ``None`` (the default, "auto"): yes when the tensor's bytes are copied into memory anyway
        (``mmap=False``, or a reader of bytes) and the file has checksums, where the check costs
        little next to the read; no for a mapped file, whose pages stay unread until touched.
        ``True``: always (every page of a mapped tensor is read); ``False``: never. A remote
        reader checks whenever the file has checksums, whatever ``verify`` says [RS4].

        Raises:
            ChecksumError: ``verify=True`` and the file holds no checksums.
        """
        if verify is None or (self.remote is not None and self.table.crcs is not None):
            return self.table.crcs is not None and self._mapping is None  # remote: always [RS4]
        if verify and self.table.crcs is None:
            self._no_checksums()
        return bool(verify)

    def _no_checksums(self) -> None:
        why = ("safetensors files hold no checksums" if self.format == "safetensors"
               else "the file was saved with checksum=False")
        raise ChecksumError(f"{self.where}: {why}; there is nothing to verify [T10]")

    def load_indices(self, indices: Sequence[int],
                     verify: Optional[bool] = None) -> List[np.ndarray]:
        """The arrays of the tensors at ``indices``, in order; CRC32C checked as
        :meth:`verifies` says for ``verify``.

        Mapped (or bytes): views, made without a copy. Otherwise fresh memory filled by one
        parallel pread (see :func:`_plan_reads`). Checksums are computed from the bytes just
        read, never by reading again: a read holding one tensor is checksummed by the read
        itself, piece by piece while in cache (read_into's checksum); a block of several small
        ones by one crc32c_ranges call after the read.

        A packed tensor (a sub-byte dtype, FORMAT.md section 4) is always a new array, unpacked
        from its bytes once their CRC32C is checked: by default whenever the file has checksums,
        mapped or not, as for any copy [T10]; then its padding bits are checked [T11].

        Raises:
            UnsupportedDtypeError: the installed ml_dtypes lacks a tensor's type; names it.
            ChecksumError: a tensor's bytes do not match their CRC32C [T10].
            LayoutError: a packed tensor's padding bits are not zero [T11].
        """
        try:
            return self._load_indices(indices, verify)
        except UnsupportedDtypeError:  # a code this ml_dtypes lacks: name the tensor
            names, codes = self.check_open(), self.table.codes
            for i in indices:
                dtypes.numpy_dtype(codes[i], names[i])
            raise

    def _load_indices(self, indices: Sequence[int], verify: Optional[bool]) -> List[np.ndarray]:
        """:meth:`load_indices`, its dtype errors not yet naming the tensor."""
        self.check_open()
        check = self.verifies(verify)
        table = self.table
        codes, offsets, nbytes = table.codes, table.offsets, table.nbytes
        shapes = table.shapes() if len(indices) > 8 else {i: table.shape(i) for i in indices}
        buffer, ndarray, empty = self._buffer, np.ndarray, np.empty
        packed = [slot for slot, i in enumerate(indices) if codes[i] in PACKED_CODES]
        if buffer is not None:
            if check:
                self._compare(indices, self._crcs_in_buffer(indices))
            elif packed and verify is None and table.crcs is not None:  # copied: checked [T10]
                some = [indices[slot] for slot in packed]
                self._compare(some, self._crcs_in_buffer(some))
            # a packed tensor: its packed bytes (unpacked below)
            arrays = [(ndarray(shapes[i], DTYPE_BY_CODE[codes[i]], buffer, offsets[i])
                       if codes[i] not in PACKED_CODES else
                       np.frombuffer(buffer, np.uint8, nbytes[i], offsets[i]))
                      if nbytes[i] else empty(shapes[i], DTYPE_BY_CODE[codes[i]])
                      for i in indices]
            return _in_host_order(self._unpacked(arrays, indices, packed, shapes))
        arrays, reads, dests = _plan_reads(indices, table, shapes, self.align)
        if reads:
            read_crcs = self.pread_into([r[0] for r in reads], [r[1] - r[0] for r in reads], dests,
                                        [len(r[2]) == 1 for r in reads] if check else False)
        if check:
            crc32c_ranges = self._be.crc32c_ranges
            checked = [i for _, _, members in reads for _, i in members]
            computed = [read_crcs[k:k + 1] if len(members) == 1 else
                        crc32c_ranges(dest, [offsets[i] - start for _, i in members],
                                      [nbytes[i] for _, i in members])
                        for k, ((start, _, members), dest) in enumerate(zip(reads, dests))]
            empty_ones = [i for i in indices if not nbytes[i]]  # the CRC32C of no bytes is 0
            self._compare(checked + empty_ones,
                          np.concatenate(computed + [np.zeros(len(empty_ones), np.uint32)]))
        return _in_host_order(self._unpacked(arrays, indices, packed, shapes))

    def _unpacked(self, arrays: List[np.ndarray], indices: Sequence[int], packed: List[int],
                  shapes: Any) -> List[np.ndarray]:
        """``arrays`` with the packed bytes at slots ``packed`` unpacked into new arrays [T11]."""
        names, codes = self.check_open(), self.table.codes
        for slot in packed:
            i = indices[slot]
            try:
                arrays[slot] = packing.unpack(arrays[slot], codes[i], shapes[i], names[i])
            except LayoutError as exc:
                raise LayoutError(f"{self.where}, {exc}") from None
        return arrays

    def _advise(self, advice: str) -> None:
        mapping, offsets = self._mapping, self.table.offsets
        if mapping is not None and offsets:
            self._be.advise(mapping, offsets[0], self.size - offsets[0], advice)

    @property
    def has_checksums(self) -> bool:
        """Whether the file stores a CRC32C per tensor [T10]."""
        return self.table.crcs is not None

    def verify(self, names: Optional[Sequence[str]] = None, *,
               arrays: Optional[Dict[str, np.ndarray]] = None) -> None:
        """Check the CRC32C of tensors (all by default) [T10].

        One pass in C for all tensors (threads share large ones). ``arrays`` may give arrays
        loaded from this reader, so that a reader opened with ``mmap=False`` does not read them
        again; a mapped reader checks the mapping, which such arrays view.

        Raises:
            ChecksumError: names the first tensor whose bytes do not match, or says that the file
                holds no checksums (it was saved with ``checksum=False``).
        """
        all_names = self.check_open()
        if self.table.crcs is None:
            self._no_checksums()
        indices = (np.arange(len(all_names)) if names is None
                   else np.array([self._position(name) for name in names], np.intp))
        computed: Union[np.ndarray, List[int]]
        if self._buffer is not None:  # mapped, or bytes: given arrays view these very bytes
            computed = self._crcs_in_buffer(indices)
        elif arrays is not None:
            crc32c, codes = self._be.crc32c, self.table.codes
            computed = [crc32c(packing.pack(arrays[all_names[i]], codes[i])) for i in indices]
        else:
            computed = _crcs_by_pread(self.pread_into, self._be, self.table, indices)
        self._compare(indices, computed)

    def _crcs_in_buffer(self, indices: Union[Sequence[int], np.ndarray]) -> np.ndarray:
        """The CRC32C of tensors ``indices`` in the mapping (or bytes): one C call."""
        indices = np.asarray(indices, np.intp)
        return self._be.crc32c_ranges(self._buffer, np.asarray(self.table.offsets)[indices],
                                      np.asarray(self.table.nbytes)[indices])

    def _compare(self, indices: Union[Sequence[int], np.ndarray], computed: Any) -> None:
        """Raise ChecksumError naming the first of tensors ``indices`` whose stored CRC32C is not
        ``computed`` [T10]."""
        stored = np.asarray(self.table.crcs, np.uint32)[np.asarray(indices, np.intp)]
        bad = np.flatnonzero(stored != np.asarray(computed, np.uint32))
        if len(bad):
            self.check_crc(indices[bad[0]], int(computed[bad[0]]))

    def check_crc(self, i: int, computed: int) -> None:
        """Raise ChecksumError, naming tensor ``i``, if ``computed`` is not its stored CRC32C.

        Raises:
            ChecksumError: the bytes do not match [T10].
        """
        crcs = self.table.crcs
        if crcs is not None and computed != crcs[i]:
            changed = ("; the object may also have changed since it was opened [RS4]"
                       if self.remote is not None else "")
            raise error_for(Code.CRC, f"{self.where}, tensor {quote(self.check_open()[i])}",
                            f" (stored {crcs[i]:#010x}, computed {computed:#010x}){changed}")

    def close(self) -> None:
        """Release the file. Arrays already handed out stay valid; using the reader raises.

        Safe while other threads read: their reads finish or raise ReaderClosedError.
        """
        with self._lock:
            self._names = None
            self._buffer = None
            self._mapping = None
            if self._fd is not None and not self._fd_users:
                os.close(self._fd)
                self._fd = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else plural(len(self._names or ()), "tensor")
        return f"<safeckpt.Reader {self.where} ({state})>"


def _table_detail(code: int, index: int, columns: Dict[str, Any], max_ndim: int,
                  file_size: Callable[[], int]) -> str:
    """What a table error's message adds after its text: the bad value of tensor ``index``."""
    if code == Code.DTYPE:
        return (f": code {columns['dtypes'][index]}; a newer safeckpt may read it "
                f"(this one knows 0..{len(NAME_BY_CODE) - 1})")
    if code == Code.NDIM:
        ndim = columns["ndims"][index]
        return (f": {ndim} > {max_ndim}; pass max_ndim=... to allow it" if ndim > max_ndim
                else f": {ndim}, more than numpy holds ({NUMPY_MAX_NDIM})")
    if code in (Code.MISALIGNED, Code.OVERLAP, Code.GAP, Code.TENSOR_TRUNCATED, Code.NBYTES):
        offset, nbytes = (int.from_bytes(columns[k][8 * index:8 * index + 8], "little")
                          for k in ("offsets", "nbytes"))
        return f" (offset {offset}, nbytes {nbytes}, file size {file_size()})"
    if code == Code.TRAILING:
        return f" (file size {file_size()})"
    return ""


def _bytes(buffer: Any) -> np.ndarray:
    """A C-contiguous buffer (a numpy array of any dtype, a bytearray) as a 1-d uint8 array."""
    if isinstance(buffer, np.ndarray):
        return buffer.reshape(-1).view(np.uint8)
    return np.frombuffer(buffer, np.uint8)


def _in_host_order(arrays: List[np.ndarray]) -> List[np.ndarray]:
    """The arrays, with the bytes of those whose dtype numpy has in native order only swapped.

    A file's bytes are little-endian (FORMAT.md section 4). Every dtype of DTYPE_BY_CODE says so
    (``'<'``), and numpy reads such arrays without a copy on any host, except ml_dtypes' (bfloat16,
    float8), which numpy has in native order only: on a big-endian host those are copied with
    their bytes swapped. Nothing happens on a little-endian host.
    """
    if not dtypes.BIG_ENDIAN_HOST:
        return arrays
    return [array if is_little_endian(array.dtype) else array.byteswap() for array in arrays]


def _crcs_by_pread(pread_into: Callable[..., Any], be: Any, table: TensorTable,
                   indices: np.ndarray) -> np.ndarray:
    """The CRC32C of tensors ``indices``, read with ``pread_into`` in file order: neighbours share
    one read of at most _VERIFY_BATCH bytes, and a larger tensor is read in pieces of that size."""
    offsets, nbytes = np.asarray(table.offsets), np.asarray(table.nbytes)
    computed = np.zeros(len(indices), np.uint32)
    order = np.argsort(offsets[indices], kind="stable")
    k = 0
    while k < len(order):
        first = int(offsets[indices[order[k]]])
        end = first + int(nbytes[indices[order[k]]])
        j = k + 1  # take neighbours while the span stays small and the gaps short
        while j < len(order):
            start_j = int(offsets[indices[order[j]]])
            end_j = start_j + int(nbytes[indices[order[j]]])
            if end_j - first > _VERIFY_BATCH or start_j - end > _SHARED_MAX:
                break
            end, j = max(end, end_j), j + 1
        if j == k + 1 and end - first > _VERIFY_BATCH:  # one large tensor, piece by piece
            crc, piece = 0, np.empty(_VERIFY_BATCH, np.uint8)
            for at in range(first, end, _VERIFY_BATCH):
                length = min(_VERIFY_BATCH, end - at)
                pread_into([at], [length], [piece])
                crc = be.crc32c(piece[:length], crc)
            computed[order[k]] = crc
        else:
            span = np.empty(end - first, np.uint8)
            pread_into([first], [end - first], [span])
            members = indices[order[k:j]]
            computed[order[k:j]] = be.crc32c_ranges(span, offsets[members] - first, nbytes[members])
        k = j
    return computed


def _plan_reads(indices: Sequence[int], table: TensorTable, shapes: Any, align: int
                ) -> Tuple[List[Any], List[list], List[np.ndarray]]:
    """How an ``mmap=False`` load reads tensors ``indices``: ``(arrays, reads, dests)``.

    Each tensor gets fresh memory (a packed one: its packed bytes, as uint8, for the caller to
    unpack); runs of small neighbouring tensors (up to ``_SHARED_MAX``
    bytes each, ``_BLOCK_MAX`` in all) share one block, so a file of 20,000 small tensors costs
    a few reads and allocations, not 20,000. ``reads`` are ``[start, end, [(slot, index), ...]]``
    and ``dests`` the uint8 array each is read into.
    """
    codes, offsets, nbytes = table.codes, table.offsets, table.nbytes
    empty, ndarray = np.empty, np.ndarray
    arrays: List[Any] = [None] * len(indices)
    reads: List[list] = []
    block: Optional[list] = None
    for slot, i in enumerate(indices):
        size, start = nbytes[i], offsets[i]
        if not size or size > _SHARED_MAX:  # read into an array of its own
            arrays[slot] = (empty(size, np.uint8) if codes[i] in PACKED_CODES  # unpacked later
                            else empty(shapes[i], DTYPE_BY_CODE[codes[i]]))
            if size:
                reads.append([start, start + size, [(slot, i)]])
        elif block and 0 <= start - block[1] < align and start + size - block[0] <= _BLOCK_MAX:
            block[1] = start + size
            block[2].append((slot, i))
        else:
            block = [start, start + size, [(slot, i)]]
            reads.append(block)
    dests = []
    for start, end, members in reads:
        own = arrays[members[0][0]]
        if own is not None:
            dests.append(own.reshape(-1).view(np.uint8))
            continue
        memory = empty(end - start, np.uint8)  # a block of small tensors: views of one buffer
        for slot, i in members:
            arrays[slot] = (ndarray((nbytes[i],), np.uint8, memory, offsets[i] - start)
                            if codes[i] in PACKED_CODES else
                            ndarray(shapes[i], DTYPE_BY_CODE[codes[i]], memory, offsets[i] - start))
        dests.append(memory)
    return arrays, reads, dests


class TensorSlice:
    """Index one tensor lazily; made by :meth:`Reader.get_slice`.

    A packed tensor (a sub-byte dtype, FORMAT.md section 4) has no byte range per row: any index
    reads and unpacks the whole tensor, then indexes it.
    """

    def __init__(self, reader: Reader, index: int) -> None:
        self._reader, self._i = reader, index
        entry = reader.entry(index)
        self.dtype: np.dtype = entry.dtype
        self.shape: Tuple[int, ...] = entry.shape
        self._packed = reader.table.codes[index] in PACKED_CODES

    def __getitem__(self, key: Any) -> Any:
        reader = self._reader
        reader.check_open()
        if reader._buffer is not None or not self.shape or self._packed:
            # a view (only the touched pages are read), or a packed tensor unpacked whole
            return reader.load_indices([self._i])[0][key]
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
        rows = self.shape[0]
        if isinstance(first, slice):
            start, stop, step = first.indices(rows)
            picked = range(start, stop, step)
            if not picked:
                return np.empty((0,) + self.shape[1:], self.dtype)[rest]
            low, high = min(picked[0], picked[-1]), max(picked[0], picked[-1]) + 1
            block = self._rows(low, high)
            return block[picked.start - low::step][:len(picked)][(slice(None),) + rest]
        try:
            row = operator.index(first)
        except TypeError:
            return reader.load_indices([self._i])[0][key]  # fancy indexing or Ellipsis: read it all
        if not -rows <= row < rows:
            raise IndexError(f"index {row} is out of bounds for axis 0 with size {rows}")
        return self._rows(row % rows, row % rows + 1)[0][rest]

    def _rows(self, start: int, stop: int) -> np.ndarray:
        reader, i = self._reader, self._i
        out = np.empty((stop - start,) + self.shape[1:], self.dtype)
        row_bytes = out.nbytes // max(stop - start, 1)
        if out.nbytes:
            reader.read_ranges([reader.table.offsets[i] + start * row_bytes], [out.nbytes], [out])
        return _in_host_order([out])[0]

    def __repr__(self) -> str:
        return f"<TensorSlice shape={self.shape} dtype={self.dtype}>"
