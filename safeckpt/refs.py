"""Checkpoints with references (FORMAT.md section 11, rules [X1]-[X8]): a tensor of one file may
be a reference to equal bytes stored in another file of the same directory, so an incremental
checkpoint writes only what changed.

:func:`safeckpt.open` of such a file returns a :class:`LinkedReader`: every referenced file is
opened and checked [X5] before any tensor is handed out, and each tensor is read (mapped, or by
pread) from the file that stores it. :func:`referrers` finds the files of a directory that refer
to a given one (what must not be deleted or replaced [X8]).

Example:
    >>> import numpy as np, safeckpt, tempfile, os
    >>> from safeckpt import format as fmt, writer
    >>> d = tempfile.mkdtemp()
    >>> base = {"base": np.arange(1000, dtype=np.float32), "lora": np.zeros(8, np.float32)}
    >>> safeckpt.api.save_plan(writer.Plan(base, None, 64, True, save_id=fmt.new_save_id()),
    ...                        os.path.join(d, "step-1.sckpt"))
    >>> with safeckpt.open(os.path.join(d, "step-1.sckpt")) as prev:
    ...     where = {"base": prev.location("base")}           # bytes compared equal first [X7]
    >>> new = {"base": base["base"], "lora": np.ones(8, np.float32)}
    >>> safeckpt.api.save_plan(writer.Plan(new, None, 64, True, refs=where),
    ...                        os.path.join(d, "step-2.sckpt"))
    >>> with safeckpt.open(os.path.join(d, "step-2.sckpt")) as f:
    ...     os.path.basename(f.shard_of("base")), f["lora"].tolist(), f.references()
    ('step-1.sckpt', [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [('step-1.sckpt', 1, 4000)])
"""

from __future__ import annotations

import bisect
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union, cast

import numpy as np

from . import _fs
from . import format as fmt
from .errors import RefError, RemoteError, SafeckptError, plural, quote
from .reader import Reader, References, TensorInfo, TensorSlice
from .remote import RemoteFile, RemotePath
from .shard import ShardedReader, checkpoints_in, sibling


class LinkedReader(ShardedReader):
    """A checkpoint file with references and the files it refers to, as one lazy reader; made by
    :func:`safeckpt.open`.

    The interface of :class:`safeckpt.Reader`: ``keys()`` (the file's own tensors, then the
    references, FORMAT.md section 11), ``reader[name]``, ``info`` (``offset`` is in the file that
    holds the tensor), ``get_slice``, ``load_all``, ``tree``, ``load(prefix)``, ``verify``,
    ``metadata``, ``close``; ``shard_of(name)``, the path of the file that holds a tensor;
    ``location(name)`` and ``raw_bytes(name)`` for a later checkpoint to refer to the same bytes;
    ``references()``, what the file refers to. Every referenced file is opened and checked [X5]
    when the reader is made; a referenced tensor's CRC32C is checked as an own one's [X6]. The
    references of a referenced file are never followed (there are no chains [X5]).

    ``path``, ``version``, ``metadata``, ``size``, ``align``, ``save_id`` and ``header_crc`` are
    those of the file itself; ``shards`` lists the referenced files, then the file itself. A
    remote file's referenced files are the objects beside it (``shards`` holds their URLs), read
    as it is [RS1]; a file is the referring one itself when it has its URL (a remote object has
    no inode), every other check of [X5] as for local files.
    """

    shard_rule = "[X5]"
    named_by = "a file that {where} refers to"
    replaced = (RefError, "[X5]")  # mmap=False: a file reopened must be the one it was

    def __init__(self, reader: Reader, *, mmap: bool = True, **limits: Any) -> None:
        refs = reader.refs
        self.where, self.path, self.version = reader.where, reader.path, reader.version
        self.metadata, self.size, self.align = reader.metadata, reader.size, reader.align
        self.save_id, self.header_crc = reader.save_id, reader.header_crc
        self._index_reader = reader  # closed with the referenced files on an error
        self._remote = reader.remote
        if refs is None or reader.path is None:
            raise RefError(f"{self.where} is not a file with references opened by its path [X2]")
        self._identity = _identity(reader)  # [X5]: no file refers to itself, by any name
        self.refs: References = refs
        members: List[List[int]] = [[] for _ in refs.files]  # the references into each file
        for r, j in enumerate(refs.file):
            members[j].append(r)
        local = [0] * len(refs.names)  # each reference's index in the file that holds it

        def check(target: Reader, j: int) -> List[str]:
            self._check_file(reader, target, j)
            for r in members[j]:
                local[r] = self._find(target, r)
            return []  # the names are set below: own tensors first, then references

        self._open_shards(refs.files, check, mmap,
                          {**limits, "allow_refs": True, "allow_index": True})
        own, k = reader.names, len(refs.files)
        self._readers = [*self._readers, reader]
        self.shards = [*self.shards, reader.path]
        self._where_is = [(k, i) for i in range(len(own))] + list(zip(refs.file, local))
        names = own + refs.names
        self._position_of = dict(zip(names, range(len(names))))
        self._stored_tree = refs.tree
        self._index_reader = None  # one of _readers now
        self._names = names  # last: a reader with names is open

    def _check_file(self, reader: Reader, target: Reader, j: int) -> None:
        """[X5]: ``target`` is the file ``refs.files[j]`` that this file was saved against."""
        refs, problem = self.refs, None
        if target.format != "sckpt" or target.shard_index is not None:
            problem = "is not a .sckpt file of tensors"
        elif not target.has_checksums:
            problem = "has no checksums (no TENSOR_CRC flag)"
        elif (refs.files[j] == os.path.basename(str(reader.path))
              or reader.save_id is not None and target.save_id == reader.save_id
              or _identity(target) == self._identity):  # a hard link or symlink to it
            problem = "is the referring file itself"
        elif target.size != refs.sizes[j]:
            problem = f"is {target.size} bytes, not {refs.sizes[j]}"
        elif target.header_crc != refs.header_crcs[j]:
            problem = (f"has header_crc {target.header_crc:#010x}, not "
                       f"{refs.header_crcs[j]:#010x}")
        elif target.save_id != refs.save_ids[j]:
            problem = ("has no save_id" if target.save_id is None else
                       f"has save_id {target.save_id.hex()}, not {refs.save_ids[j].hex()}")
        if problem:
            raise RefError(f"{self.where} refers to {target.where}, which {problem}: it is not the "
                           "file the checkpoint was saved against (saved again since, replaced, "
                           "or restored from another copy?) [X5]")

    def _find(self, target: Reader, r: int) -> int:
        """The index in ``target``'s own table of the tensor that reference ``r`` points at: at
        its offset, with its dtype, shape, byte length and CRC32C [X5]."""
        refs, table = self.refs, target.table
        offset, nbytes = refs.table.offsets[r], refs.table.nbytes[r]
        offsets, crcs = table.offsets, cast(Sequence[int], table.crcs)  # [X5]: it has them
        if nbytes:  # the one tensor at this offset with bytes is the last one there
            i = bisect.bisect_right(offsets, offset) - 1
            candidates = [i] if i >= 0 and offsets[i] == offset else []
        else:  # empty tensors may share an offset: the first of them with the dtype and shape
            candidates = self._empty_at(target).get(
                (offset, refs.table.codes[r], refs.table.shape(r)), [])
        name, entry = refs.names[r], refs.table.entry(r, refs.names[r])
        for i in candidates:
            if (table.codes[i], table.shape(i), table.nbytes[i], crcs[i]) == (
                    refs.table.codes[r], entry.shape, nbytes, entry.crc32c):
                return i
        found = ""
        if candidates:
            i = candidates[0]
            found = (f"; it has {quote(target.names[i])} there: {table.dtype(i, target.names[i])} "
                     f"{table.shape(i)}, crc32c {crcs[i]:#010x}")
        raise RefError(f"{self.where}, reference {quote(name)}: {target.where} stores no "
                       f"{entry.dtype} {entry.shape} tensor of crc32c {entry.crc32c:#010x} at "
                       f"offset {offset}{found} [X5]")

    def _empty_at(self, target: Reader) -> Dict[Tuple[int, int, Tuple[int, ...]], List[int]]:
        """``target``'s empty tensors by (offset, dtype code, shape), built once per file."""
        cache = self.__dict__.setdefault("_empty_cache", {})
        if id(target) not in cache:
            table = target.table
            found: Dict[Tuple[int, int, Tuple[int, ...]], List[int]] = {}
            for i in np.flatnonzero(np.asarray(table.nbytes, np.uint64) == 0).tolist():
                found.setdefault((table.offsets[i], table.codes[i], table.shape(i)), []).append(i)
            cache[id(target)] = found
        return cache[id(target)]

    # -- by index, not by name: a reference's name in its file may differ -----------------------

    def _position(self, name: str) -> int:
        self.check_open()
        try:
            return self._position_of[name]
        except KeyError:
            raise KeyError(f"{self.where} has no tensor {quote(name)}") from None

    def info(self, name: str) -> TensorInfo:
        """As :meth:`safeckpt.Reader.info`; ``offset`` is in the file that holds the tensor
        (:meth:`shard_of`)."""
        reader, local = self.locate(self._position(name))
        return reader.entry(local)._replace(name=name)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.load_indices([self._position(name)])[0]

    def get_slice(self, name: str) -> TensorSlice:
        reader, local = self.locate(self._position(name))
        return TensorSlice(reader, local)

    def location(self, name: str) -> Optional[fmt.Location]:
        """Where the bytes of ``name`` are stored: in this file, or in the file a reference points
        at (never a reference itself [X7]); see :meth:`safeckpt.Reader.location`."""
        reader, local = self.locate(self._position(name))
        return reader.location_at(local)

    def raw_bytes(self, name: str, *, verify: Optional[bool] = None) -> np.ndarray:
        """The stored bytes of ``name``, from the file that holds them; see
        :meth:`safeckpt.Reader.raw_bytes`."""
        reader, local = self.locate(self._position(name))
        return reader.raw_bytes_at(local, verify)

    def references(self) -> List[Tuple[str, int, int]]:
        """``(file, tensors, bytes)`` for each file this one refers to, in the order of its
        ``refs`` (file names in its directory: :attr:`shards` has their paths)."""
        self.check_open()
        return self.refs.summary()

    def verify(self, names: Optional[Sequence[str]] = None, *,
               arrays: Optional[Dict[str, np.ndarray]] = None) -> None:
        """Check the CRC32C of tensors (all by default), each in the file that holds it [T10],
        [X6]; the files in parallel. ``arrays``: as for :meth:`safeckpt.Reader.verify`.

        Raises:
            ChecksumError: names the first tensor whose bytes do not match, and its file.
        """
        all_names = self.check_open()
        groups: Dict[int, Tuple[List[str], Dict[str, np.ndarray]]] = {}
        for name in all_names if names is None else names:
            j, local = self._where_is[self._position(name)]
            stored_as = self._readers[j].names[local]  # its name in the file that holds it
            group = groups.setdefault(j, ([], {}))
            group[0].append(stored_as)
            if arrays is not None and name in arrays:
                group[1][stored_as] = arrays[name]

        def verify(item: Tuple[int, Tuple[List[str], Dict[str, np.ndarray]]]) -> None:
            j, (group_names, group_arrays) = item
            self._readers[j].verify(group_names, arrays=None if arrays is None else group_arrays)

        _fs.fan_out(verify, groups.items())

    def __repr__(self) -> str:
        if self.closed:
            return f"<safeckpt.LinkedReader {self.where} (closed)>"
        return (f"<safeckpt.LinkedReader {self.where} ({plural(len(self.keys()), 'tensor')}, "
                f"{len(self.refs.names)} in {plural(len(self.refs.files), 'other file')})>")


def _identity(reader: Reader) -> Tuple[Any, ...]:
    """What makes the file of ``reader`` that file, whatever its name: the device and inode of a
    local file (a link followed), the URL of a remote object (which has no other name)."""
    if reader.remote is not None:
        return ("url", reader.remote.where)
    st = os.stat(str(reader.path))
    return st.st_dev, st.st_ino


def referrers(path: Union[str, RemotePath]) -> List[str]:
    """The .sckpt checkpoints beside ``path`` (a local path, or a remote object: its directory
    listed afresh) whose references point into it ([X8]: those must not outlive it), by their
    file names; files that do not open as checkpoints are skipped.

    Raises:
        RemoteError: the remote storage failed (a file it could not read is never taken for
            one that refers to nothing).

    Example:
        >>> referrers("ckpt/step-0000000010.sckpt")            # doctest: +SKIP
        ['step-0000000020.sckpt', 'step-0000000030.sckpt']
    """
    if isinstance(path, RemotePath):
        entries, name = path.parent.listdir(), path.name
    else:
        directory, name = os.path.split(os.path.abspath(path))
        entries = sorted(os.listdir(directory))
    found = []
    for entry in checkpoints_in(entries):
        if entry == name:
            continue
        other = sibling(path, entry)
        try:
            with Reader(RemoteFile(other) if isinstance(other, RemotePath) else other,
                        allow_refs=True, allow_index=True) as reader:
                if reader.refs is not None and name in reader.refs.files:
                    found.append(entry)
        except RemoteError:
            raise
        except (SafeckptError, OSError):
            continue
    return found
