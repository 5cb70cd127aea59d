"""Sharded checkpoints: shards next to one index file (FORMAT.md section 9, rules [S1]-[S9]).

``save(obj, "model.sckpt", max_shard_size="2GB")`` writes ``model-00001-of-0000N.sckpt`` … and the
index ``model.sckpt``; ``open("model.sckpt")`` (or ``open`` of the directory) returns one lazy
:class:`ShardedReader` over all shards, with the interface of :class:`safeckpt.Reader`. Remote
checkpoints (FORMAT.md section 12) are saved and read alike: the shards beside their index in the
same remote directory, each written as a stream [RS7], each read with ranged requests [RS1].

Example:
    >>> import numpy as np, safeckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "m.sckpt")
    >>> state = {"a": np.zeros(200, np.float32), "b": np.ones(200, np.float32), "step": 3}
    >>> safeckpt.save(state, path, max_shard_size=1000)
    >>> sorted(os.listdir(os.path.dirname(path)))
    ['m-00001-of-00002.sckpt', 'm-00002-of-00002.sckpt', 'm.sckpt']
    >>> with safeckpt.open(path) as f:
    ...     f.keys(), f.tree["step"]
    (['a', 'b'], 3)
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import re
import secrets
import threading
from typing import (Any, Callable, cast, Dict, Iterable, List, Mapping, Optional, Sequence, Set,
                    Tuple, Type, Union)

import numpy as np

from . import _fs
from . import format as fmt
from . import tree as _tree
from . import writer as _writer
from .errors import HeaderError, LimitError, SafeckptError, ShardError, plural, quote
from .filekind import PathLike
from .format import SAVE_ID_SIZE, plain_file_name
from .reader import Reader, TensorInfo, TensorMap, TensorSlice
from .remote import RemoteFile, RemotePath
from .safetensors_format import LENGTH_SIZE

MAX_SHARDS = 99_999  # five digits in "-00001-of-00003" [S2], as Hugging Face names its shards
MAX_OPEN_SHARDS = 32  # mmap=False: shards a reader keeps open; others reopen when read (not 1 fd each)
SHARD_KEY = "safeckpt.shard"  # the one metadata key of a shard [S7]
SUFFIX = ".sckpt"
SHARDS_KEYS = {"files": list, "counts": list, "sizes": list, "header_crcs": list, "names": list,
               "save_id": bytes}  # the schema of the index's "shards" map [S2]
_SHARD_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.sckpt\Z")
_U32_MAX, _I63_MAX = (1 << 32) - 1, (1 << 63) - 1
# Units of max_shard_size: decimal as disk makers and Hugging Face count, binary with "i".
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*\Z", re.IGNORECASE)
Target = Union[str, RemotePath]  # where a save goes: a local path, or a remote object


# -- files beside a save's target, local or remote ---------------------------------------------

def sibling(path: Target, name: str) -> Target:
    """The file ``name`` in the directory of ``path`` (a shard beside its index).

    Example:
        >>> sibling("/ckpt/m.sckpt", "m-00001-of-00002.sckpt")
        '/ckpt/m-00001-of-00002.sckpt'
    """
    if isinstance(path, RemotePath):
        return path.parent.join(name)
    return os.path.join(os.path.dirname(os.path.abspath(path)), name)


def base_name(path: Target) -> str:
    """The file name of ``path``, without its directory."""
    return path.name if isinstance(path, RemotePath) else os.path.basename(path)


def remove_file(path: Target) -> None:
    """Delete the file or object at ``path`` (an earlier save's); nothing there is fine."""
    if isinstance(path, RemotePath):
        path.remove()
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# -- save ------------------------------------------------------------------------------------------

def parse_size(value: Union[int, str]) -> int:
    """Bytes in ``value``: a positive int, or a str such as ``"500MB"``, ``"2GiB"``, ``"1.5GB"``.

    Example:
        >>> parse_size("2GiB"), parse_size("500MB"), parse_size(4096)
        (2147483648, 500000000, 4096)
    """
    match = _SIZE.match(value) if isinstance(value, str) else None
    if type(value) is int:
        number = value
    elif match and match[2].lower() in _UNITS:
        digits, unit = match.groups()
        number = int(float(digits) * _UNITS[unit.lower()]) if "." in digits else (
            int(digits) * _UNITS[unit.lower()])
    else:
        raise ValueError(f"max_shard_size={value!r}: give a number of bytes (an int) or a str "
                         f"with a unit of {sorted(k for k in _UNITS if k)}, e.g. '2GB' or '500MiB'")
    if number < 1:
        raise ValueError(f"max_shard_size={value!r} must be at least 1 byte")
    return number


def split(nbytes: Iterable[int], limit: int) -> List[int]:
    """How many tensors go into each shard [S8]: greedy, in order, never splitting a tensor.

    Example:
        >>> split([800, 300, 2500], 1000)   # a tensor over the limit gets a shard of its own
        [1, 1, 1]
        >>> split([300, 300, 300, 300], 1000)
        [3, 1]
    """
    counts: List[int] = []
    used = 0
    for size in nbytes:
        if counts and used + size <= limit:
            counts[-1] += 1
            used += size
        else:
            counts.append(1)
            used = size
    return counts


def shard_files(path: Union[PathLike, RemotePath], k: int) -> List[str]:
    """The file names of ``k`` shards of the index at ``path``: ``stem-0000j-of-0000k.sckpt``."""
    base = path.name if isinstance(path, RemotePath) else os.path.basename(os.fsdecode(path))
    stem = base[:-len(SUFFIX)] if base.endswith(SUFFIX) and len(base) > len(SUFFIX) else base
    return [f"{stem}-{j:05d}-of-{k:05d}{SUFFIX}" for j in range(1, k + 1)]


def save_sharded(tree: Any, names: Sequence[str], arrays: Sequence[Any],
                 path: Union[PathLike, RemotePath], *, metadata: Optional[Mapping[str, Any]],
                 align: int, checksum: bool, atomic: bool,
                 max_shard_size: Union[int, str]) -> None:
    """Write shards, then the index (FORMAT.md [S8], [S9]); used by ``save`` and ``save_file``.

    Every shard plan is checked before anything is written; shards are written in parallel
    (each atomically when ``atomic``; each a stream that becomes visible whole when ``path`` is
    remote [RS7]), the index last. One shard's worth is one ordinary file.
    """
    limit = parse_size(max_shard_size)
    # a str or a RemotePath; the name checked before any shard [W5]
    target = _writer.destination_format(path, sharded=True)[0]
    arrays = list(arrays)
    counts = split([_writer.stored_nbytes(array) for array in arrays], limit)
    if len(counts) <= 1:
        _writer.write_plan(_writer.Plan(dict(zip(names, arrays)), metadata, align, checksum,
                                        tree=tree), target, atomic=atomic)
        _remove_stale(target, ())
        return
    if len(counts) > MAX_SHARDS:
        raise ValueError(f"max_shard_size={max_shard_size!r} makes {len(counts)} shards, more than "
                         f"{MAX_SHARDS}; raise max_shard_size [S8]")
    files = shard_files(target, len(counts))
    save_id = secrets.token_bytes(SAVE_ID_SIZE)
    plans: List[_writer.Plan] = []
    start = 0
    for j, count in enumerate(counts, 1):
        part = dict(zip(names[start:start + count], arrays[start:start + count]))
        shard_meta = {SHARD_KEY: {"save_id": save_id, "index": j, "count": len(counts)}}
        plans.append(_writer.Plan(part, shard_meta, align, checksum))
        start += count
    checked_metadata = fmt.check_metadata(metadata)

    def write(j: int) -> int:  # the header_crc of the shard as written binds it [S5]
        return _writer.write_plan(plans[j], sibling(target, files[j]), atomic=atomic)

    crcs = _fs.fan_out(write, range(len(plans)))  # [S9]: every shard before the index
    shards = {"files": files, "counts": counts, "sizes": [plan.file_size for plan in plans],
              "header_crcs": crcs, "names": list(names), "save_id": save_id}
    _writer.write_plan(_writer.Plan({}, checked_metadata, align, False, tree=tree, shards=shards),
                       target, atomic=atomic)
    _remove_stale(target, files)


def _remove_stale(path: Target, keep: Iterable[str]) -> None:
    """Delete shards of earlier saves to ``path`` that the new index does not name [S9]."""
    stem = shard_files(path, 1)[0][:-len("-00001-of-00001.sckpt")]
    remove_stale_shards(path, stem, SUFFIX, keep)


def remove_stale_shards(path: Target, stem: str, suffix: str, keep: Iterable[str]) -> None:
    """Delete the files ``stem-0000j-of-0000k<suffix>`` beside ``path`` that are not in ``keep``:
    the shards of earlier saves that a new index (or a single file) replaces [S9]. A remote
    directory is listed and its objects removed alike."""
    pattern = re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}" + re.escape(suffix) + r"\Z")
    kept = set(keep)
    entries = (path.parent.listdir() if isinstance(path, RemotePath) else
               os.listdir(os.path.dirname(os.path.abspath(path))))
    for entry in entries:
        if pattern.match(entry) and entry not in kept:
            remove_file(sibling(path, entry))


# -- open ------------------------------------------------------------------------------------------

def checkpoints_in(entries: Iterable[str]) -> List[str]:
    """The .sckpt checkpoints among a directory's ``entries``: files ending in ``.sckpt`` that are
    neither hidden nor named as shards (an index or a single file)."""
    return [e for e in entries if e.endswith(SUFFIX) and not e.startswith(".")
            and not _SHARD_NAME.search(e)]


def shards_in(entries: Iterable[str]) -> List[str]:
    """The entries named as .sckpt shards (``-0000j-of-0000k.sckpt``)."""
    return [e for e in entries if _SHARD_NAME.search(e)]


def check_shards(shards: Dict[str, Any], where: str, max_tensors: int = fmt.MAX_TENSORS
                 ) -> Dict[str, Any]:
    """Check an index's ``shards`` map [S2]-[S5]; return it with the start of each shard.

    Raises:
        HeaderError: a missing or unknown key, a wrong type or length, an unsafe or misnumbered
            file name, counts that do not add up, a duplicate name, an out-of-range size or CRC.
        LimitError: more names than ``max_tensors``.
    """
    fmt.check_map_keys(shards, SHARDS_KEYS, "shards", "S2", where)
    files, counts, sizes, crcs, names = (shards[key] for key in
                                         ("files", "counts", "sizes", "header_crcs", "names"))
    k = len(files)
    if not 1 <= k <= MAX_SHARDS or not len(counts) == len(sizes) == len(crcs) == k:
        raise HeaderError(f"{where}: 'files', 'counts', 'sizes' and 'header_crcs' must have one "
                          f"length from 1 to {MAX_SHARDS}, not {len(files)}, {len(counts)}, "
                          f"{len(sizes)} and {len(crcs)} [S2]")
    if len(shards["save_id"]) != SAVE_ID_SIZE:
        raise HeaderError(f"{where}: 'save_id' must be {SAVE_ID_SIZE} bytes, not "
                          f"{len(shards['save_id'])} [S2]")
    for j, name in enumerate(files, 1):
        expected = f"-{j:05d}-of-{k:05d}{SUFFIX}"
        if not plain_file_name(name) or not name.endswith(expected) or len(name) == len(expected):
            raise HeaderError(f"{where}: shard file name {quote(name)} is not a plain file name in the "
                              f"index's directory ending in {expected!r} [S3]")
    if len(names) > max_tensors:
        raise LimitError(f"{where}: the index names {len(names)} tensors, more than max_tensors="
                         f"{max_tensors}; pass max_tensors=... if you trust this file [S4]")
    for j, count in enumerate(counts, 1):
        if type(count) is not int or count < 1:
            raise HeaderError(f"{where}: shard {j} holds {quote(count)} tensors; each holds at least 1 [S4]")
    if sum(counts) != len(names):
        raise HeaderError(f"{where}: the shards hold {sum(counts)} tensors in all but 'names' has "
                          f"{len(names)} [S4]")
    if set(map(type, names)) - {str} or "" in names:
        bad = next(x for x in names if type(x) is not str or not x)
        raise HeaderError(f"{where}: tensor name {quote(bad)} is not a non-empty str [S4]")
    if len(set(names)) != len(names):
        seen: Set[str] = set()
        for twice in names:  # the first name seen a second time
            if twice in seen:
                break
            seen.add(twice)
        raise HeaderError(f"{where}: tensor {quote(twice)} is named twice in the index (two shards?) [S4]")
    for j, (size, crc) in enumerate(zip(sizes, crcs), 1):
        if type(size) is not int or not fmt.PREFIX_SIZE <= size <= _I63_MAX:
            raise HeaderError(f"{where}: shard {j} size {quote(size)} is not an int in 32..2**63-1 [S5]")
        if type(crc) is not int or not 0 <= crc <= _U32_MAX:
            raise HeaderError(f"{where}: shard {j} header_crc {quote(crc)} is not a u32 [S5]")
    return shards


class _OpenShards:
    """The shards of one reader that hold a descriptor (``mmap=False``), least recently read
    first: past ``limit``, reading a shard closes the descriptor of the least recently read one
    that no read is using (it reopens when read again)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._open: collections.OrderedDict[_ShardFile, None] = collections.OrderedDict()

    def touch(self, shard: _ShardFile) -> None:
        with self._lock:  # then each shard's own lock (never the other way round)
            self._open[shard] = None
            self._open.move_to_end(shard)
            excess = len(self._open) - self.limit
            for other in list(self._open) if excess > 0 else ():
                if excess and other is not shard and other._release():
                    del self._open[other]
                    excess -= 1


class _ShardFile(Reader):
    """A shard read with ``pread`` (``mmap=False``) whose descriptor :class:`_OpenShards` may
    close between reads; it reopens by path, and must then be the file it was or it raises the
    error of ``replaced`` (ShardError [S7]; RefError [X5] for a file referred to): the same
    device, inode, size and modification time, and the same prefix and header bytes (a file
    system reuses a freed inode at once, so a later save's shard of the same size can have the
    first three; its header differs, as it holds that save's id).""" 

    def __init__(self, path: str, open_shards: _OpenShards,
                 replaced: Tuple[Type[SafeckptError], str] = (ShardError, "[S7]"),
                 **limits: Any) -> None:
        super().__init__(path, mmap=False, **limits)
        self._replaced = replaced  # what a changed file raises, and the rule it cites
        if self.format == "safetensors":  # a Hugging Face shard: its u64 length, then the header [ST1]
            self._head_size = LENGTH_SIZE + int.from_bytes(self._read(0, LENGTH_SIZE), "little")
        else:
            self._head_size = fmt.PREFIX_SIZE + self._header_len
        self._identity = self._identity_of(cast(int, self._fd))  # mmap=False: the descriptor stays open
        self._open_shards = open_shards
        self._pins = 0  # reads between reopening the descriptor and using it
        open_shards.touch(self)

    def pread_into(self, offsets: Sequence[int], lengths: Sequence[int], dests: Sequence[Any],
                   checksum: Union[bool, Sequence[bool]] = False) -> Any:
        with self._lock:
            if self._fd is None and self._names is not None:
                self._fd = self._reopen()
            self._pins += 1
        try:
            self._open_shards.touch(self)
            return super().pread_into(offsets, lengths, dests, checksum)
        finally:
            with self._lock:
                self._pins -= 1

    def _reopen(self) -> int:
        fd = os.open(cast(str, self.path), _fs.READ_FLAGS)  # a shard is opened by its path
        try:
            same = self._identity_of(fd) == self._identity
        except BaseException:
            os.close(fd)
            raise
        if not same:
            os.close(fd)
            error, rule = self._replaced
            raise error(f"{self.where} was replaced or changed since the checkpoint was opened "
                        f"(another save?); open the checkpoint again {rule}")
        return fd

    def _identity_of(self, fd: int) -> Tuple[int, int, int, int, bytes]:
        """Device, inode, size, modification time and a hash of the prefix and header of the file
        open at ``fd`` (kept instead of the header itself, which may be large, for each of many
        shards). The time tells apart a Hugging Face shard written again with the same header,
        which has no save id."""
        st = os.fstat(fd)
        length = min(self._head_size, st.st_size)
        head = b""
        while len(head) < length:
            more = os.pread(fd, length - len(head), len(head))
            if not more:
                break
            head += more
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                hashlib.blake2b(head, digest_size=16).digest())

    def _release(self) -> bool:
        """Close the descriptor unless a read uses it; whether none is left open."""
        with self._lock:
            if self._fd is not None and not (self._pins or self._fd_users):
                os.close(self._fd)
                self._fd = None
            return self._fd is None


class ShardedReader(TensorMap):
    """The shards of an index as one lazy reader; made by :func:`safeckpt.open`.

    Same interface as :class:`safeckpt.Reader`: ``keys()``, ``reader[name]``, ``info``,
    ``get_slice``, ``load_all``, ``tree``, ``load(prefix)``, ``verify``, ``metadata``,
    ``header_crc`` (the index's), ``close``, and ``shard_of(name)``, the path of the shard that
    holds a tensor (``shards`` lists them all). Every shard is opened and checked [S7] when the
    reader is made; tensors are read when asked for, and ``load_all``, ``load`` and ``verify``
    work on the shards in parallel threads (the C core reads and checksums without the GIL).
    Open descriptors are bounded whatever the number of shards: a mapped shard keeps none, and
    with ``mmap=False`` at most ``MAX_OPEN_SHARDS`` stay open (a shard closed for room reopens
    when read, and must be the same file [S7]). The shards of a remote index are the objects
    beside it (``shards`` holds their URLs), each read through a
    :class:`safeckpt.remote.RemoteFile` with the index's options [RS1]; they hold no descriptor,
    and are opened in parallel threads.

    This class reads a .sckpt shard index (FORMAT.md section 9);
    :class:`safeckpt.safetensors_shards.SafetensorsShards` reads a Hugging Face index of
    .safetensors shards with the same machinery (:meth:`_open_shards`).
    """

    format = "sckpt"  # what the shards are: "sckpt", or "safetensors" (Hugging Face shards)
    shard_rule = "[S7]"  # the rule messages about a shard cite
    named_by = "a shard that the index {where} names"  # who names a file that does not open
    replaced: Tuple[Type[SafeckptError], str] = (ShardError, "[S7]")  # a shard changed on reopen
    version: Optional[Tuple[int, int]]  # the index's (major, minor); None for a Hugging Face index

    def __init__(self, index: Reader, *, mmap: bool = True, **limits: Any) -> None:
        where = self.where = index.where
        self.path, self.version, self.metadata = index.path, index.version, index.metadata
        self.size, self.header_crc = index.size, index.header_crc
        self._index_reader = index
        self._remote = index.remote
        if index.shard_index is None or index.path is None:
            raise ShardError(f"{where} is not a shard index opened by its path [S1]; open a "
                             "checkpoint with safeckpt.open()")
        shards = check_shards(index.shard_index, where, limits.get("max_tensors", fmt.MAX_TENSORS))
        names = shards["names"]
        self._stored_tree = _tree.check_tree(index.stored_tree, names, limits.get(
            "max_depth", fmt.MAX_DEPTH), where)  # [S6]
        k = len(shards["files"])
        starts = [0]
        for count in shards["counts"]:
            starts.append(starts[-1] + count)

        def check(reader: Reader, j: int) -> List[str]:
            part = names[starts[j]:starts[j + 1]]
            self._check_shard(reader, j, k, part, shards)
            return part

        self._open_shards(shards["files"], check, mmap, limits)
        self._names = names  # last: a reader with names is open

    def _open_shards(self, files: Sequence[str], check: Callable[[Reader, int], List[str]],
                     mmap: bool, limits: Dict[str, Any]) -> List[str]:
        """Open the shards ``files`` (names in the directory of :attr:`path`) under ``limits``, each
        checked by ``check(reader, j)``, which returns the names it holds in its own order; return
        all the names, shard after shard (the caller then sets ``_names``). On an error every
        shard opened so far is closed. Remote shards (beside :attr:`_remote`) are opened in
        parallel threads (each is a request or two away), then checked in order."""
        remote = self._remote
        if remote is None:
            directory = os.path.dirname(os.path.abspath(cast(str, self.path)))
            self.shards = [os.path.join(directory, name) for name in files]
        else:
            objects = [remote.rp.parent.join(name) for name in files]
            self.shards = [rp.url for rp in objects]
        readers: List[Reader] = []  # a reader per shard
        self._readers = readers
        self._where_is = []
        names: List[str] = []
        open_shards = _OpenShards(MAX_OPEN_SHARDS)

        def open_one(j: int) -> Reader:
            try:  # every rule of the shard's own format
                if remote is not None:  # [RS1], with the options the index was read with
                    return Reader(RemoteFile(objects[j], chunk_size=remote.chunk_size,
                                             max_gap=remote.max_gap,
                                             max_in_flight=remote.max_in_flight), **limits)
                return (Reader(self.shards[j], mmap=True, **limits) if mmap else
                        _ShardFile(self.shards[j], open_shards, self.replaced, **limits))
            except OSError as exc:  # missing, a directory, unreadable: the OS's error, and
                if exc.errno is None:  # which index names the file
                    raise
                named_by = self.named_by.format(where=self.where)
                raise OSError(exc.errno, f"{exc.strerror} ({named_by} {self.shard_rule})",
                              self.shards[j]) from exc

        try:
            if remote is not None:
                opened: List[Optional[Reader]] = [None] * len(files)

                def fetch(j: int) -> None:
                    opened[j] = open_one(j)

                try:
                    _fs.fan_out(fetch, range(len(files)))
                finally:  # those opened, to be closed on an error
                    readers.extend(reader for reader in opened if reader is not None)
            for j in range(len(files)):
                if remote is None:
                    readers.append(open_one(j))
                part = check(readers[j], j)
                self._where_is.extend((j, i) for i in range(len(part)))
                names.extend(part)
        except BaseException:
            self.close()
            raise
        self._position_of = dict(zip(names, range(len(names))))
        return names

    def _check_shard(self, reader: Reader, j: int, k: int, part: List[str],
                     shards: Dict[str, Any]) -> None:
        """[S7]: the shard is the one this index wrote."""
        problem = None
        if reader.stored_tree is not fmt.NO_TREE:
            problem = "has a tree; shards are flat files"
        elif reader.size != shards["sizes"][j]:
            problem = f"is {reader.size} bytes, the index says {shards['sizes'][j]}"
        elif reader.header_crc != shards["header_crcs"][j]:
            problem = (f"has header_crc {reader.header_crc:#010x}, the index says "
                       f"{shards['header_crcs'][j]:#010x}")
        elif reader.keys() != part:
            problem = f"holds other tensors than the index says ({len(reader)} vs {len(part)})"
        elif reader.metadata != {SHARD_KEY: {"save_id": shards["save_id"], "index": j + 1,
                                             "count": k}}:
            problem = "has another save's id or position in its metadata"
        if problem:
            raise ShardError(f"{self.where}: shard {reader.where} {problem}: it was not written "
                             "by the save that wrote this index (an interrupted save, or files of "
                             "two checkpoints mixed) [S7]")

    # -- the Reader interface ------------------------------------------------------------------

    def _shard_number(self, name: str) -> int:
        """The position in ``shards`` of the shard that holds ``name``."""
        self.check_open()
        try:
            return self._where_is[self._position_of[name]][0]
        except KeyError:
            raise KeyError(f"{self.where} has no tensor {quote(name)}") from None

    def _locate(self, name: str) -> Reader:
        return self._readers[self._shard_number(name)]

    def __contains__(self, name: object) -> bool:
        return name in self._position_of and self.check_open() is not None

    def info(self, name: str) -> TensorInfo:
        """As :meth:`Reader.info`; ``offset`` is within the tensor's shard."""
        return self._locate(name).info(name)

    def shard_of(self, name: str) -> str:
        """The path of the shard that holds ``name``."""
        return self.shards[self._shard_number(name)]

    def __getitem__(self, name: str) -> np.ndarray:
        return self._locate(name)[name]

    def get_slice(self, name: str) -> TensorSlice:
        return self._locate(name).get_slice(name)

    def locate(self, i: int) -> Tuple[Reader, int]:
        """The shard's reader and the position in it of checkpoint tensor ``i``."""
        j, local = self._where_is[i]
        return self._readers[j], local

    def _by_shard(self, indices: Sequence[int]) -> Dict[int, List[Tuple[int, int]]]:
        """``{shard: [(slot, position in shard), ...]}`` for checkpoint tensor ``indices``."""
        groups: Dict[int, List[Tuple[int, int]]] = {}
        for slot, i in enumerate(indices):
            j, local = self._where_is[i]
            groups.setdefault(j, []).append((slot, local))
        return groups

    def load_indices(self, indices: Iterable[int],
                     verify: Optional[bool] = None) -> List[np.ndarray]:
        """The arrays of checkpoint tensors ``indices``, in order; shards read in parallel, each
        checking CRC32C as :meth:`safeckpt.Reader.verifies` says for ``verify``."""
        self.check_open()
        indices = list(indices)
        out: List[Any] = [None] * len(indices)

        def load(group: Tuple[int, List[Tuple[int, int]]]) -> None:
            j, members = group
            arrays = self._readers[j].load_indices([local for _, local in members], verify)
            for (slot, _), array in zip(members, arrays):
                out[slot] = array

        _fs.fan_out(load, self._by_shard(indices).items())
        return out

    def load_all(self, *, verify: Optional[bool] = None) -> Dict[str, np.ndarray]:
        """Every tensor as ``{name: array}``, the shards read in parallel; ``verify`` as for
        :meth:`safeckpt.Reader.load_all`."""
        names = self.check_open()
        return dict(zip(names, self.load_indices(range(len(names)), verify)))

    @property
    def has_checksums(self) -> bool:
        return all(reader.has_checksums for reader in self._readers)

    def verify(self, names: Optional[Sequence[str]] = None, *,
               arrays: Optional[Dict[str, np.ndarray]] = None) -> None:
        """Check the CRC32C of tensors (all by default) [T10], the shards in parallel."""
        all_names = self.check_open()
        groups: Dict[int, List[str]] = {}
        for name in all_names if names is None else names:
            groups.setdefault(self._shard_number(name), []).append(name)

        def verify(group: Tuple[int, List[str]]) -> None:
            j, group_names = group
            self._readers[j].verify(group_names, arrays=arrays)

        _fs.fan_out(verify, groups.items())

    def close(self) -> None:
        """Close every shard; arrays already handed out stay valid."""
        self._names = None
        for reader in self._readers:
            reader.close()
        if self._index_reader is not None:
            self._index_reader.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else plural(len(self._names or ()), "tensor")
        return f"<safeckpt.ShardedReader {self.where} ({len(self.shards)} shards, {state})>"

    _readers: Sequence[Reader] = ()  # until __init__ opens the shards (close() may come first)
    _index_reader: Optional[Reader] = None  # the .sckpt index, open with the shards
    _remote: Optional[RemoteFile] = None  # a remote index (or referring file): how it was read
    header_crc: Optional[int] = None  # the index's (None for a Hugging Face index)
    _where_is: List[Tuple[int, int]]  # (shard, position in it) per tensor
    _position_of: Dict[str, int]  # name -> position in names
    shards: List[str] = []  # the shards' paths, in order

