"""torch.distributed.checkpoint (DCP) storage without pickle: ``SafeckptWriter`` and ``SafeckptReader``.

DCP's own ``FileSystemWriter`` writes its ``.metadata`` file with ``pickle.dump`` and
``FileSystemReader`` reads it back with ``pickle.load``; every non-tensor value goes through
``torch.save`` and the default load planner reads it back with ``torch.load`` unrestricted
(full unpickling).
Loading such a checkpoint from someone else runs their code. These two classes plug into DCP
(planning, resharding and collectives stay DCP's) and store everything as .sckpt files:

- one file per rank, ``data-00000.sckpt`` …: that rank's tensor chunks, and its non-tensor values
  (``lr``, ``betas``, ``step`` …) as plain values in the file's tree (FORMAT.md section 8);
- ``metadata.sckpt``, written last by the coordinator: DCP's ``Metadata`` encoded field by field
  into plain values (no tensors), and decoded with a check of every field (:func:`decode_metadata`).

What the metadata may make torch do is bounded by the checkpoint's size: a tensor's chunks add up
to the tensor and fit in the data files that store them (torch allocates whole tensors from the
metadata when it loads without a template), and ``planner_data``, the path of each item in the
nested state dict that torch rebuilds from it, is checked against the items' names
(:func:`check_planner_data`): no list is padded past its items.

Non-tensor values: the writer takes each one from the planner (``lookup_object``, which
``DefaultSavePlanner`` and its subclasses have) instead of the ``torch.save`` bytes, and stores it
if it is a type ``safeckpt.save`` stores (dict, list, tuple, str, int, float, bool, None, bytes,
numpy scalars and arrays, tensors); anything else is refused when saving, naming its key. The
reader gives each value straight to ``DefaultLoadPlanner``'s state dict: nothing is unpickled. A
planner that overrides ``load_bytes`` gets ``torch.save`` bytes that the reader makes from the
checked plain value (its API takes nothing else), never bytes from the file.

A save is complete once ``metadata.sckpt`` exists: every rank file is written (atomically) before
it, and DCP calls ``finish`` only after all ranks wrote. A crash before leaves no metadata, and
``SafeckptReader`` refuses the directory; data files of an earlier save to the same directory are
replaced one by one, so save each checkpoint to its own directory to keep the previous one.

Remote storage (FORMAT.md section 12): both classes take an fsspec URL (``s3://bucket/run/step-100``,
``memory://``...) with ``storage_options``, or a path inside an fsspec filesystem given as ``fs``.
Each rank's file is one streamed upload, visible only once whole [RS7]; ``metadata.sckpt`` is
written last, as locally, and a save first removes the metadata of an earlier save to the same
place, so that a crash midway leaves no metadata naming a mix of old and new data files. A load
fetches only what DCP asks for: the header of each data file it needs, and of each stored chunk
the bytes that its read items cover (a resharded load reads a part of a chunk), with one
coalesced, parallel fetch per file [RS5] [RS6].

Example:
    >>> import torch.distributed.checkpoint as dcp                          # doctest: +SKIP
    >>> from safeckpt.dcp import SafeckptWriter, SafeckptReader             # doctest: +SKIP
    >>> dcp.save(state, storage_writer=SafeckptWriter("ckpt/step-100"))     # doctest: +SKIP
    >>> dcp.load(state, storage_reader=SafeckptReader("ckpt/step-100"))     # doctest: +SKIP
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import io
import math
import os
import re
import uuid
from typing import (Any, Dict, Iterable, Iterator, List, NoReturn, Optional, Set, Tuple, Union,
                    cast)

import numpy as np
import torch
# torch's private module: DefaultLoadPlanner.load_bytes puts a value into a nested state dict
# with it, and torch has no public function that does (SafeckptReader._load_value does the same)
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from . import api, remote, torch_convert, tree
from . import format as fmt
from .dtypes import CODE_BY_DTYPE, PACKED_CODES
from .errors import HeaderError, InvalidValueError, LimitError, SafeckptError, quote
from .filekind import PathLike
from .reader import TensorMap

METADATA_FILE = "metadata.sckpt"  # written last: its presence marks a complete save
DATA_FILE = "data-{:05d}.sckpt"  # one per rank (per plan)
FORMAT_NAME = "safeckpt.dcp"  # the "format" field of metadata.sckpt
FORMAT_VERSION = 1
DCP_VERSION = "1.0.0"  # the DCP metadata version these fields describe (torch's own for 2.4+)
_DATA_NAME = re.compile(r"data-\d{5,}\.sckpt\Z")
_MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
                   "preserve": torch.preserve_format}
_METADATA_KEYS = {"format", "version", "dcp_version", "state_dict_metadata", "storage",
                  "planner_data", "storage_meta"}
_TENSOR_KEYS = {"kind", "dtype", "requires_grad", "memory_format", "pin_memory", "size", "chunks"}
_STORAGE_META_KEYS = {"checkpoint_id", "save_id", "load_id", "modules"}


@dataclasses.dataclass(frozen=True)
class Location:
    """Where one DCP item is stored: a data file of the checkpoint and a key of its tree."""

    file: str
    key: str


# -- Metadata <-> plain values -------------------------------------------------------------------

def encode_metadata(metadata: Metadata) -> Dict[str, Any]:
    """DCP ``Metadata`` as plain values that ``safeckpt.save`` stores, field by field.

    Raises:
        InvalidValueError: a tensor layout or dtype that the format cannot describe, or metadata
            that :func:`decode_metadata` would refuse (e.g. a custom planner's ``planner_data``
            that is not the paths of the state dict's items).
    """
    names = {dtype: name for name, dtype in torch_convert.dtype_by_name().items()}
    formats = {value: name for name, value in _MEMORY_FORMATS.items()}
    entries: Dict[str, Dict[str, Any]] = {}
    for fqn, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, BytesStorageMetadata):
            entries[fqn] = {"kind": "bytes"}
            continue
        props = entry.properties
        if props.dtype not in names or props.layout != torch.strided:
            raise InvalidValueError(f"{fqn!r}: a {props.layout} tensor of {props.dtype} cannot be "
                                    "saved; convert it to a dense tensor of a supported dtype")
        entries[fqn] = {
            "kind": "tensor", "dtype": names[props.dtype], "requires_grad": bool(props.requires_grad),
            "memory_format": formats.get(props.memory_format, "contiguous"),
            "pin_memory": bool(props.pin_memory), "size": list(entry.size),
            "chunks": [[list(chunk.offsets), list(chunk.sizes)] for chunk in entry.chunks]}
    storage = [[index.fqn, None if index.offset is None else list(index.offset), index.index,
                location.file, location.key]
               for index, location in (metadata.storage_data or {}).items()]
    meta = metadata.storage_meta
    storage_meta = None if meta is None else {
        "checkpoint_id": None if meta.checkpoint_id is None else os.fspath(meta.checkpoint_id),
        "save_id": meta.save_id, "load_id": meta.load_id, "modules": list(meta.modules)}
    value = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dcp_version": metadata.version,
             "state_dict_metadata": entries, "storage": storage,
             "planner_data": metadata.planner_data, "storage_meta": storage_meta}
    try:
        decode_metadata(value, "the DCP metadata to save")
    except SafeckptError as exc:
        raise InvalidValueError(f"{exc}; SafeckptReader would refuse it, so it is not saved") from None
    return value


class _Checker:
    """Type checks that raise ``HeaderError`` naming the path in metadata.sckpt."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: str, problem: str) -> NoReturn:
        raise HeaderError(f"{self.where}: DCP metadata {path}: {problem}")

    def kind(self, value: Any, kinds: Tuple[type, ...], path: str, what: str) -> Any:
        if type(value) not in kinds:
            self.fail(path, f"{what} expected, not {type(value).__name__} {quote(value)}")
        return value

    def keys(self, value: Any, keys: Set[str], path: str) -> Dict[str, Any]:
        self.kind(value, (dict,), path, "a dict")
        if value.keys() != keys:
            missing = sorted(keys - value.keys())
            unknown = [key for key in value if key not in keys]
            self.fail(path, f"keys must be {sorted(keys)} (missing {missing}, unknown "
                      f"{quote(unknown)})")
        return value

    def ints(self, value: Any, path: str, length: Optional[int] = None) -> List[int]:
        self.kind(value, (list,), path, "a list of ints")
        if length is not None and len(value) != length:
            self.fail(path, f"{len(value)} dimensions where the tensor has {length}")
        for i, item in enumerate(value):
            if type(item) is not int or not 0 <= item < 1 << 63:
                self.fail(f"{path}[{i}]", f"{quote(item)} is not an int in 0..2**63-1")
        return value


# -- planner_data --------------------------------------------------------------------------------

_LEAF = "leaf"  # _PathTree: a node that is an item's value, not a container


def check_planner_data(data: Any, names: Iterable[str], where: str = "metadata.sckpt",
                       max_depth: int = fmt.MAX_DEPTH) -> None:
    """Check DCP's ``planner_data``: None, or the path of each item in the nested state dict.

    torch's ``flatten_state_dict`` names each item of a nested state dict by its path of dict
    keys (str) and list indices (int) joined by ``.``, and records the path; a load without a
    template (``_EmptyStateDictLoadPlanner``, ``dcp_to_torch_save``) rebuilds the state dict from
    the paths, padding each list with None up to its largest index. So, for a dict:

    - its keys are exactly the items' ``names``;
    - each path is a non-empty list (or tuple) of at most ``max_depth`` str keys and int indices
      >= 0 that starts with a key and spells its item's name (``".".join(map(str, path))``);
    - the paths form one tree: no path runs through another item's value or ends where other
      items are, and a container holds either str keys (a dict) or int indices (a list);
    - a list's indices are 0, 1, ... n-1, each used: no padding, so rebuilding costs memory and
      time linear in the paths. (A gap, which an empty dict inside a list leaves, is a state dict
      that torch cannot load back with or without a template.)

    Raises:
        HeaderError: the first problem, with the item's name, e.g. ``planner_data['l.9']``.
        LimitError: a path longer than ``max_depth``.

    Example:
        >>> check_planner_data({"w": ("w",), "l.0": ("l", 0)}, ["w", "l.0"])
        >>> check_planner_data({"w": ("w", 1000000)}, ["w"])
        Traceback (most recent call last):
        safeckpt.errors.HeaderError: metadata.sckpt: DCP metadata planner_data['w']: the path ('w', 1000000) does not spell its name 'w'
    """
    if data is None:
        return
    names = list(names)
    check = _Checker(where)
    check.kind(data, (dict,), "planner_data", "a dict or None")
    wanted = set(names)
    if data.keys() != wanted:
        missing = [name for name in names if name not in data]
        unknown = [name for name in data if name not in wanted]
        check.fail("planner_data", f"must have a path for each item and no other (missing "
                   f"{quote(missing)}, unknown {quote(unknown)})")
    paths = _PathTree(check)
    for name, path in data.items():
        at = f"planner_data[{quote(name)}]"
        _check_path(check, at, name, path, max_depth)
        paths.add(at, name, path)
    paths.check_lists()


def _check_path(check: _Checker, at: str, name: str, path: Any, max_depth: int) -> None:
    """One item's path on its own: a non-empty list of keys and indices that spells ``name``."""
    if type(path) not in (list, tuple) or not path:
        check.fail(at, f"must be a non-empty list of str keys and int indices, not {quote(path)}")
    if len(path) > max_depth:
        raise LimitError(f"{check.where}: DCP metadata {at}: {len(path)} keys deep, more than "
                         f"max_depth={max_depth}")
    for i, part in enumerate(path):
        if type(part) is not str and (type(part) is not int or part < 0 or i == 0):
            check.fail(f"{at}[{i}]", f"{quote(part)} is not a str key" + (
                " (a path starts with a key of the state dict)" if i == 0 else
                " or an int index >= 0"))
    if ".".join(map(str, path)) != name:
        check.fail(at, f"the path {quote(tuple(path))} does not spell its name {quote(name)}")


class _PathTree:
    """The tree that the items' paths spell, checked as paths are added.

    Node 0 is the state dict; ``children[node, key]`` is a node; ``kinds[node]`` is str (a
    dict), int (a list), None (not known yet) or _LEAF; ``lists[node]`` is [name, largest index
    + 1, number of indices used].
    """

    def __init__(self, check: _Checker) -> None:
        self.check = check
        self.children: Dict[Tuple[int, Union[str, int]], int] = {}
        self.kinds: List[Any] = [str]
        self.lists: Dict[int, List[Any]] = {}

    def add(self, at: str, name: str, path: Any) -> None:
        """Add an item's checked path: it must not run through or end at another item."""
        check, children, kinds = self.check, self.children, self.kinds
        node: int = 0
        for depth, part in enumerate(path):
            kind = kinds[node]
            if kind is _LEAF or (kind is not None and kind is not type(part)):
                container = quote(".".join(map(str, path[:depth])))
                check.fail(at, f"{container} is the value of another item" if kind is _LEAF else
                           f"{container} holds both str keys and int indices")
            if kind is None and type(part) is int:
                self.lists[node] = [".".join(map(str, path[:depth])), 0, 0]
            kinds[node] = type(part)
            child = children.get((node, part))
            if type(part) is int:
                counts = self.lists[node]
                counts[1] = max(counts[1], part + 1)
                counts[2] += child is None
            if depth == len(path) - 1:
                if child is not None:
                    check.fail(at, f"{quote(name)} also holds other items")
                children[node, part] = len(kinds)
                kinds.append(_LEAF)
            elif child is None:
                child = children[node, part] = len(kinds)
                kinds.append(None)
            node = children[node, part]

    def check_lists(self) -> None:
        """Each list uses every index from 0 to its largest: torch would pad it otherwise."""
        for container, slots, used in self.lists.values():
            if slots != used:
                self.check.fail("planner_data", f"the list {quote(container)} uses {used} of the "
                                f"indices 0..{slots - 1}: torch would pad it with {slots - used} "
                                "empty slots (an index past the items, or a gap that torch cannot "
                                "load)")


# -- decoding: the metadata's sections -----------------------------------------------------------

def decode_metadata(value: Any, where: str = "metadata.sckpt", max_ndim: int = fmt.MAX_NDIM,
                    max_depth: int = fmt.MAX_DEPTH) -> Metadata:
    """DCP ``Metadata`` from the plain values of :func:`encode_metadata`, every field checked.

    Checks: exact keys and types everywhere; dtypes from the fixed table of FORMAT.md section 4;
    chunks inside their tensor, with as many elements in all as the tensor (a tensor is never
    larger than the chunks stored for it); every storage entry names a known item, a data file by
    a plain name in the checkpoint's directory and a str key, once; every chunk and every
    non-tensor item has a storage entry; ``planner_data`` as :func:`check_planner_data` says.

    Raises:
        HeaderError: the first problem, with its path, e.g. ``state_dict_metadata['w'].chunks[1]``.
        LimitError: a tensor of more than ``max_ndim`` dimensions, a planner path of more than
            ``max_depth`` keys.

    Example:
        >>> metadata = decode_metadata(safeckpt.load("ckpt/metadata.sckpt"))  # doctest: +SKIP
    """
    check = _Checker(where)
    check.keys(value, _METADATA_KEYS, "")
    if value["format"] != FORMAT_NAME or value["version"] != FORMAT_VERSION:
        check.fail("format", f"{quote(value['format'])} version {quote(value['version'])} is not "
                   f"{FORMAT_NAME!r} version {FORMAT_VERSION}")
    check.kind(value["dcp_version"], (str, type(None)), "dcp_version", "a str or None")
    entries, chunk_sets = _decode_entries(check, value["state_dict_metadata"], max_ndim)
    storage = _decode_storage(check, value["storage"], entries, chunk_sets)
    storage_meta = _decode_storage_meta(check, value["storage_meta"])
    check_planner_data(value["planner_data"], list(entries), where, max_depth)
    return Metadata(state_dict_metadata=entries, planner_data=value["planner_data"],
                    storage_data=storage, storage_meta=storage_meta, version=value["dcp_version"])


def _decode_entries(check: _Checker, value: Any, max_ndim: int) -> Tuple[Dict[str, Any], Dict]:
    """``state_dict_metadata``: ``({fqn: storage metadata}, {fqn: {chunk offsets: sizes}})``."""
    dtypes = torch_convert.dtype_by_name()
    entries: Dict[str, Any] = {}
    chunk_sets = {}
    for fqn, entry in check.kind(value, (dict,), "state_dict_metadata", "a dict").items():
        path = f"state_dict_metadata[{quote(fqn)}]"
        check.kind(fqn, (str,), path, "a str key")
        if check.kind(entry, (dict,), path, "a dict").get("kind") == "bytes":
            check.keys(entry, {"kind"}, path)
            entries[fqn] = BytesStorageMetadata()
            continue
        entries[fqn], chunk_sets[fqn] = _decode_tensor(check, path, entry, dtypes, max_ndim)
    return entries, chunk_sets


def _decode_tensor(check: _Checker, path: str, entry: Dict[str, Any], dtypes: Dict[str, Any],
                   max_ndim: int) -> Tuple[TensorStorageMetadata, Dict[tuple, tuple]]:
    """One tensor's entry: its storage metadata and ``{chunk offsets: chunk sizes}``; the
    chunks lie inside the tensor and hold as many elements as it."""
    check.keys(entry, _TENSOR_KEYS, path)
    for key in ("kind", "dtype", "memory_format"):
        check.kind(entry[key], (str,), f"{path}.{key}", "a str")
    if entry["kind"] != "tensor" or entry["dtype"] not in dtypes or (
            entry["memory_format"] not in _MEMORY_FORMATS):
        check.fail(path, f"kind {quote(entry['kind'])}, dtype {quote(entry['dtype'])} or "
                   f"memory format {quote(entry['memory_format'])} is unknown")
    for key in ("requires_grad", "pin_memory"):
        check.kind(entry[key], (bool,), f"{path}.{key}", "a bool")
    size = check.ints(entry["size"], f"{path}.size")
    if len(size) > max_ndim:
        raise LimitError(f"{check.where}: DCP metadata {path}: {len(size)} dimensions, more than "
                         f"max_ndim={max_ndim}")
    chunks, chunk_set = [], {}
    for i, chunk in enumerate(check.kind(entry["chunks"], (list,), f"{path}.chunks", "a list")):
        cpath = f"{path}.chunks[{i}]"
        if type(chunk) is not list or len(chunk) != 2:
            check.fail(cpath, "must be [offsets, sizes]")
        offsets = check.ints(chunk[0], f"{cpath}.offsets", len(size))
        sizes = check.ints(chunk[1], f"{cpath}.sizes", len(size))
        if any(o + s > d for o, s, d in zip(offsets, sizes, size)):
            check.fail(cpath, f"offsets {offsets} + sizes {sizes} reach past the size {size}")
        chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
        chunk_set[tuple(offsets)] = tuple(sizes)
    held, elements = sum(math.prod(chunk.sizes) for chunk in chunks), math.prod(size)
    if held != elements:
        check.fail(f"{path}.chunks", f"the chunks hold {held} elements and the tensor "
                   f"{elements}: they must cover it exactly")
    properties = TensorProperties(dtype=dtypes[entry["dtype"]],
                                  requires_grad=entry["requires_grad"],
                                  memory_format=_MEMORY_FORMATS[entry["memory_format"]],
                                  pin_memory=entry["pin_memory"])
    return TensorStorageMetadata(properties, torch.Size(size), chunks), chunk_set


def _decode_storage(check: _Checker, value: Any, entries: Dict[str, Any],
                    chunk_sets: Dict[str, Dict[tuple, tuple]]) -> Dict[MetadataIndex, Location]:
    """``storage``: where each chunk and non-tensor item is, each stored exactly once."""
    storage, stored = {}, set()
    for i, item in enumerate(check.kind(value, (list,), "storage", "a list")):
        path = f"storage[{i}]"
        if type(item) is not list or len(item) != 5:
            check.fail(path, "must be [fqn, offset, index, file, key]")
        fqn, offset, hint, file, key = item
        if type(fqn) is not str or fqn not in entries:
            check.fail(path, f"{quote(fqn)} is not an item of state_dict_metadata")
        tensor = isinstance(entries[fqn], TensorStorageMetadata)
        if tensor:
            offset = tuple(check.ints(offset, f"{path}.offset", len(entries[fqn].size)))
            if offset not in chunk_sets.get(fqn, {}):
                check.fail(path, f"no chunk of {quote(fqn)} starts at {list(offset)}")
        elif offset is not None:
            check.fail(path, f"{quote(fqn)} is not a tensor: its offset must be None")
        check.kind(hint, (int, type(None)), f"{path}.index", "an int or None")
        if type(file) is not str or not _DATA_NAME.match(file):
            check.fail(path, f"data file {quote(file)} is not a plain name like 'data-00000.sckpt' "
                       "in the checkpoint's directory")
        check.kind(key, (str,), f"{path}.key", "a str")
        if (fqn, offset) in stored:
            check.fail(path, f"{quote(fqn)} at {offset} is stored twice")
        stored.add((fqn, offset))
        index = MetadataIndex(fqn, None if offset is None else list(offset), hint)
        storage[index] = Location(file, key)
    for fqn, entry in entries.items():
        wanted = ([(fqn, offset) for offset in chunk_sets.get(fqn, {})] if
                  isinstance(entry, TensorStorageMetadata) else [(fqn, None)])
        for missing in (w for w in wanted if w not in stored):
            check.fail("storage", f"nothing stores {quote(missing[0])} at {missing[1]}")
    return storage


def _decode_storage_meta(check: _Checker, meta: Any) -> Optional[StorageMeta]:
    """``storage_meta``: None, or the ids and module names of the save."""
    if meta is None:
        return None
    check.keys(meta, _STORAGE_META_KEYS, "storage_meta")
    for key in ("checkpoint_id", "save_id", "load_id"):
        check.kind(meta[key], (str, type(None)), f"storage_meta.{key}", "a str or None")
    modules = check.kind(meta["modules"], (list,), "storage_meta.modules", "a list")
    for i, module in enumerate(modules):
        check.kind(module, (str,), f"storage_meta.modules[{i}]", "a str")
    return StorageMeta(meta["checkpoint_id"], meta["save_id"], meta["load_id"], modules)


# -- writing -------------------------------------------------------------------------------------

def _item_key(index: MetadataIndex, taken: Set[str]) -> str:
    """The tree key of an item in its rank's file: the FQN, ``fqn@o1,o2`` for a chunk that does
    not start at 0, and ``~1``, ``~2`` … for a clash."""
    key = index.fqn
    if index.offset is not None and any(index.offset):
        key += "@" + ",".join(map(str, index.offset))
    if key in taken:
        suffix = 1
        while f"{key}~{suffix}" in taken:
            suffix += 1
        key = f"{key}~{suffix}"
    taken.add(key)
    return key


class _Directory:
    """A checkpoint's directory: a local path, or a place on remote storage (FORMAT.md section 12).

    ``path`` is what the user gave (DCP's ``checkpoint_id``); ``place`` is what
    :func:`safeckpt.remote.resolve` makes of it: a local path, or a :class:`~safeckpt.remote.RemotePath`.
    """

    def __init__(self, path: PathLike, storage_options: Optional[Dict[str, Any]],
                 fs: Any) -> None:
        self.path = os.fsdecode(path)
        self.place = remote.resolve(self.path, storage_options=storage_options, fs=fs)

    @property
    def is_remote(self) -> bool:
        return isinstance(self.place, remote.RemotePath)

    def file(self, name: str) -> Union[str, remote.RemotePath]:
        """The file ``name`` of the directory, for :func:`safeckpt.open` and :func:`safeckpt.save`
        (a remote object is read with ranged requests [RS1], written as one stream [RS7])."""
        place = self.place
        return place.join(name) if isinstance(place, remote.RemotePath) else os.path.join(place, name)

    def where(self, name: str) -> str:
        """The file ``name`` for messages: a quoted local path, or the URL."""
        file = self.file(name)
        return file.url if isinstance(file, remote.RemotePath) else repr(file)

    def make(self) -> None:
        """Create a local directory (object stores have none)."""
        if isinstance(self.place, str):
            os.makedirs(self.place, exist_ok=True)

    def sizes(self, names: Iterable[str]) -> Dict[str, int]:
        """The size in bytes of each file of ``names``: remote, from one listing of the
        directory (not a request per file).

        Raises:
            FileNotFoundError: a file is missing; OSError, RemoteError: as the storage says.
        """
        place = self.place
        if isinstance(place, str):
            return {name: os.stat(os.path.join(place, name)).st_size for name in names}
        listed = place.sizes()
        for name in names:
            if name not in listed:
                raise FileNotFoundError(errno.ENOENT, "no such object", place.join(name).url)
        return listed


class SafeckptWriter(StorageWriter):
    """A DCP ``StorageWriter`` that writes .sckpt files and no pickle.

    Parameters:
        path: the checkpoint's directory (created if needed), or an fsspec URL
            (``s3://bucket/run/step-100``); ``dcp.save(checkpoint_id=...)`` may change it.
        checksum: store a CRC32C per tensor (checked by ``SafeckptReader(verify=True)``, and by
            every remote read [RS4]).
        sync_files: write each local file atomically with fsync (a crash leaves old or new
            files). Remote objects are always whole or absent [RS7].
        align: tensor alignment in the files.
        storage_options: for a URL, the fsspec filesystem's options (``{"endpoint_url": ...}``).
        fs: an fsspec filesystem; ``path`` is then a path inside it.

    Raises:
        InvalidValueError: ``storage_options`` or ``fs`` with a local path.
        ImportError: a URL without fsspec (or without the filesystem's package, e.g. s3fs).

    Example:
        >>> dcp.save({"model": model.state_dict()}, storage_writer=SafeckptWriter("ckpt"))  # doctest: +SKIP
        >>> writer = SafeckptWriter("s3://bucket/run/step-100", storage_options={"anon": False})  # doctest: +SKIP
    """

    def __init__(self, path: PathLike, *, checksum: bool = True,
                 sync_files: bool = True, align: int = fmt.ALIGN_DEFAULT,
                 storage_options: Optional[Dict[str, Any]] = None, fs: Any = None) -> None:
        super().__init__()
        self.storage_options, self.fs = storage_options, fs
        self.directory = _Directory(path, storage_options, fs)
        self.checksum, self.sync_files, self.align = checksum, sync_files, align
        self.save_id = uuid.uuid4().hex
        self.rank: Optional[int] = None

    @property
    def path(self) -> str:
        """The checkpoint's directory or URL, as given."""
        return self.directory.path

    def reset(self, checkpoint_id: Optional[PathLike] = None) -> None:
        if checkpoint_id:
            self.directory = _Directory(checkpoint_id, self.storage_options, self.fs)
        self.save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """Refuse, before any file is written, a tensor whose dtype the metadata cannot name
        (e.g. torch.float4_e2m1fn_x2), then make the directory."""
        names = torch_convert.dtype_by_name().values()
        for item in plan.items:
            data = item.tensor_data
            if data is not None and data.properties.dtype not in names:
                dtype = data.properties.dtype
                raise InvalidValueError(
                    f"{item.index.fqn!r}: SafeckptWriter does not store {dtype} tensors (DCP "
                    "metadata names no such dtype); save this state with safeckpt.torch.save, "
                    f"which stores {dtype}, or give DCP a tensor of a dtype it names "
                    "(e.g. tensor.view(torch.uint8))")
        self.directory.make()
        return plan

    def prepare_global_plan(self, plans: List[SavePlan]) -> List[SavePlan]:
        # The coordinator, before any rank writes: an earlier save's metadata in a remote
        # directory goes first, so that it never names a mix of its data files and this save's
        # (as [RS8] removes a commit object before an overwrite).
        metadata = self.directory.file(METADATA_FILE)
        if isinstance(metadata, remote.RemotePath):
            metadata.remove()
        return [dataclasses.replace(plan, storage_data=DATA_FILE.format(i))
                for i, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        """Write this rank's items into one file; non-tensor values as plain values, never pickles."""
        file = plan.storage_data if isinstance(plan.storage_data, str) else DATA_FILE.format(
            self.rank or 0)
        values: Dict[str, Any] = {}
        results: List[WriteResult] = []
        taken: Set[str] = set()
        for item in plan.items:
            key = _item_key(item.index, taken)
            if item.type == WriteItemType.BYTE_IO:
                value = self._plain_value(planner, item)
                size = 0
            else:
                value = planner.resolve_data(item).detach()
                size = value.numel() * value.element_size()
            values[key] = value
            results.append(WriteResult(index=item.index, size_in_bytes=size,
                                       storage_data=Location(file, key)))
        api.save(values, self.directory.file(file), checksum=self.checksum, align=self.align,
                 atomic=self.sync_files)
        future = Future()
        future.set_result(results)
        return future

    @staticmethod
    def _plain_value(planner: SavePlanner, item: WriteItem) -> Any:
        lookup = getattr(planner, "lookup_object", None)
        if lookup is None:
            raise InvalidValueError(
                f"{item.index.fqn!r}: the planner {type(planner).__name__} gives non-tensor values "
                "only as torch.save bytes (a pickle); SafeckptWriter needs a planner with "
                "lookup_object, such as DefaultSavePlanner")
        return lookup(item.index)

    def finish(self, metadata: Metadata, results: List[List[WriteResult]]) -> None:
        """Write metadata.sckpt (coordinator only, after every rank wrote): the save is complete."""
        storage = {}
        for rank_results in results:
            storage.update({result.index: result.storage_data for result in rank_results})
        metadata = dataclasses.replace(metadata, storage_data=storage, version=DCP_VERSION,
                                       storage_meta=self.storage_meta())
        api.save(encode_metadata(metadata), self.directory.file(METADATA_FILE),
                 atomic=self.sync_files)

    def storage_meta(self) -> StorageMeta:
        return StorageMeta(checkpoint_id=self.path, save_id=self.save_id)

    @property
    def checkpoint_id(self) -> str:
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return isinstance(checkpoint_id, (str, bytes, os.PathLike))


# -- reading -------------------------------------------------------------------------------------

def _narrow(tensor: torch.Tensor, offsets: List[int], lengths: List[int]) -> torch.Tensor:
    """The part of ``tensor`` at ``offsets`` of ``lengths`` (a view)."""
    for dim, (offset, length) in enumerate(zip(offsets, lengths)):
        if offset or length != tensor.size(dim):
            tensor = tensor.narrow(dim, offset, length)
    return tensor


_BATCH_BYTES = 64 << 20  # a read_data batch: the bytes fetched (and held) at a time, as [RS5]


@dataclasses.dataclass
class _Part:
    """What one read item takes from a stored chunk (the tensor at tree ``node``, of numpy
    ``dtype``): the item's ``offsets`` and ``lengths`` in it, and the bytes fetched for it: the
    whole chunk (``span`` None) or ``span``, ``(start, end, byte strides)`` in the chunk."""

    item: ReadItem
    node: Any
    dtype: np.dtype
    offsets: List[int]
    lengths: List[int]
    span: Optional[Tuple[int, int, List[int]]]
    fetched: int


def _span(offsets: List[int], lengths: List[int], shape: Tuple[int, ...],
          itemsize: int) -> Tuple[int, int, List[int]]:
    """The bytes of a C-contiguous chunk of ``shape`` that hold its part at ``offsets`` of
    ``lengths`` (not empty): ``(start, end, byte strides)``, from the part's first element to
    its last, so exactly its bytes when it is a block of whole rows."""
    strides, step = [], itemsize
    for size in reversed(shape):
        strides.append(step)
        step *= size
    strides.reverse()
    start = sum(o * s for o, s in zip(offsets, strides))
    end = sum((o + n - 1) * s for o, n, s in zip(offsets, lengths, strides)) + itemsize
    return start, end, strides


def _batches(parts: List[_Part]) -> Iterator[List[_Part]]:
    """``parts`` in order, in runs that fetch at most _BATCH_BYTES (a larger part alone)."""
    batch: List[_Part] = []
    size = 0
    for part in parts:
        if batch and size + part.fetched > _BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(part)
        size += part.fetched
    if batch:
        yield batch


def _fetch(reader: TensorMap, parts: List[_Part], verify: Optional[bool]) -> List[torch.Tensor]:
    """The tensor of each part: whole chunks in one load (checked as ``verify`` says, and always
    when remote [RS4]), then narrowed; spans in one ``read_ranges`` per file, which then fetches
    a remote file's header again and compares it with the one read at open [RS4]."""
    whole = [part for part in parts if part.span is None]
    loaded = iter(tree.materialize(reader, [tree.LIST, *(part.node for part in whole)],
                                   framework="torch", verify=verify) if whole else ())
    reads: Dict[int, Tuple[Any, List[int], List[int], List[np.ndarray]]] = {}
    arrays: Dict[int, np.ndarray] = {}
    for k, part in enumerate(parts):
        if part.span is None or not math.prod(part.lengths):
            continue
        file_reader, j = reader.locate(part.node[1])
        start, end, strides = part.span
        dest = np.empty(end - start, np.uint8)
        arrays[k] = np.ndarray(part.lengths, part.dtype, dest, 0, strides)
        read = reads.setdefault(id(file_reader), (file_reader, [], [], []))
        read[1].append(file_reader.entry(j).offset + start)
        read[2].append(end - start)
        read[3].append(dest)
    for file_reader, offsets, lengths, dests in reads.values():
        file_reader.read_ranges(offsets, lengths, dests)  # then the header again, when remote
    names = reader.names
    return [_narrow(next(loaded), part.offsets, part.lengths) if part.span is None else
            torch_convert.from_numpy(arrays.get(k, np.empty(part.lengths, part.dtype)),
                                     names[part.node[1]])
            for k, part in enumerate(parts)]


class SafeckptReader(StorageReader):
    """A DCP ``StorageReader`` for checkpoints of :class:`SafeckptWriter`; never unpickles.

    Every file is validated as any .sckpt file is, and the metadata field by field
    (:func:`decode_metadata`), and against the sizes of the data files, before DCP plans the load.
    Data files are read in parallel threads; with ``mmap=True`` a rank reads only the pages of the
    chunks it needs. A remote checkpoint is read with ranged requests: each data file's header,
    then, in one coalesced fetch per file, the stored chunks that the read items need, or only
    the bytes of a chunk that they cover when a resharded load needs a part of it.

    Parameters:
        path: the checkpoint's directory, or an fsspec URL (``s3://bucket/run/step-100``).
        mmap: map the local data files (default) or read each item into fresh memory. Remote
            reads are always into fresh memory.
        verify: check the CRC32C of the tensors read: ``None`` (default) when they are read into
            fresh memory anyway (``mmap=False``), ``True`` always, ``False`` never. A remote
            read checks every whole chunk it fetches [RS4]; the part of a chunk that a resharded
            load fetches cannot be checked, so the data file's header is fetched again after it
            and compared with the one read at open (``ObjectChangedError``); pass ``verify=True``
            to fetch whole chunks instead and check each.
        storage_options: for a URL, the fsspec filesystem's options (``{"endpoint_url": ...}``).
        fs: an fsspec filesystem; ``path`` is then a path inside it.
        limits: ``max_header_size``, ``max_tensors``, ``max_ndim``, ``max_depth``.

    Raises:
        InvalidValueError: ``storage_options`` or ``fs`` with a local path.
        ImportError: a URL without fsspec (or without the filesystem's package, e.g. s3fs).

    Example:
        >>> dcp.load(state, storage_reader=SafeckptReader("ckpt"))    # doctest: +SKIP
        >>> dcp.load(state, storage_reader=SafeckptReader("s3://bucket/run/step-100"))  # doctest: +SKIP
    """

    def __init__(self, path: PathLike, *, mmap: bool = True, verify: Optional[bool] = None,
                 storage_options: Optional[Dict[str, Any]] = None, fs: Any = None,
                 **limits: int) -> None:
        super().__init__()
        self.storage_options, self.fs = storage_options, fs
        self.directory = _Directory(path, storage_options, fs)
        self.mmap, self.verify = mmap, verify
        self.limits: Dict[str, Any] = limits
        self.storage_data: Dict[MetadataIndex, Location] = {}
        self.load_id = uuid.uuid4().hex

    @property
    def path(self) -> str:
        """The checkpoint's directory or URL, as given."""
        return self.directory.path

    def reset(self, checkpoint_id: Optional[PathLike] = None) -> None:
        self.storage_data = {}
        if checkpoint_id:
            self.directory = _Directory(checkpoint_id, self.storage_options, self.fs)
        self.load_id = uuid.uuid4().hex

    def read_metadata(self) -> Metadata:
        """DCP's Metadata from metadata.sckpt, every field checked; no pickle.

        Raises:
            HeaderError, LimitError: as :func:`decode_metadata` says, or a data file smaller than
                the tensor chunks the metadata stores in it.
            OSError: a missing file; RemoteError: remote storage failed.
        """
        where = self.directory.where(METADATA_FILE)
        with api.open(self.directory.file(METADATA_FILE), **self.limits) as reader:
            if reader.keys():
                raise HeaderError(f"{reader.where}: DCP metadata holds no tensors, this file has "
                                  f"{len(reader)}")
            value = reader.load()
        metadata = decode_metadata(value, where, self.limits.get("max_ndim", fmt.MAX_NDIM),
                                   self.limits.get("max_depth", fmt.MAX_DEPTH))
        self._check_data_files(metadata, where)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def _check_data_files(self, metadata: Metadata, where: str) -> None:
        """Each data file holds at least the bytes of the tensor chunks the metadata stores in it:
        torch allocates whole tensors from the metadata (a load without a template), and they are
        never larger than the checkpoint's files."""
        nbytes = {}
        for fqn, entry in metadata.state_dict_metadata.items():
            if isinstance(entry, TensorStorageMetadata):
                itemsize = entry.properties.dtype.itemsize
                for chunk in entry.chunks:
                    nbytes[fqn, tuple(chunk.offsets)] = math.prod(chunk.sizes) * itemsize
        per_file: Dict[str, int] = {}
        for index, location in metadata.storage_data.items():
            if index.offset is not None:
                per_file[location.file] = (per_file.get(location.file, 0)
                                           + nbytes[index.fqn, tuple(index.offset)])
        sizes = self.directory.sizes(per_file)
        for file, stored in per_file.items():
            size = sizes[file]
            if stored > size:
                raise HeaderError(f"{where}: data file {file!r} is {size} bytes, but the DCP "
                                  f"metadata stores {stored} bytes of tensor chunks in it")

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data
        self.state_dict_metadata = metadata.state_dict_metadata
        self._chunks = {(fqn, tuple(chunk.offsets)): chunk
                        for fqn, entry in metadata.state_dict_metadata.items()
                        if isinstance(entry, TensorStorageMetadata) for chunk in entry.chunks}

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: List[LoadPlan]) -> List[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        per_file: Dict[str, List[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].file, []).append(item)
        jobs = list(per_file.items())
        if len(jobs) > 1:
            workers = min(len(jobs), os.cpu_count() or 1, 8)
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                list(pool.map(lambda job: self._read_file(job[0], job[1], planner), jobs))
        else:
            for file, items in jobs:
                self._read_file(file, items, planner)
        future = Future()
        future.set_result(None)
        return future

    def _read_file(self, file: str, items: List[ReadItem], planner: LoadPlanner) -> None:
        """Read ``items`` from one data file: plain values, then the tensor parts in batches of
        about _BATCH_BYTES, each batch one fetch (coalesced and parallel when remote)."""
        with api.open(self.directory.file(file), mmap=self.mmap, **self.limits) as reader:
            root = tree.find(reader, None)  # the file's top-level dict, indexed once
            nodes = (dict(zip(root[1::2], root[2::2]))
                     if type(root) is list and root[:1] in ([tree.DICT], [tree.ODICT]) else {})
            whole = not self.directory.is_remote or self.verify is True
            dtypes = torch_convert.dtype_by_name()
            parts: List[_Part] = []
            for item in items:
                location = self.storage_data[item.storage_index]
                node = nodes.get(location.key, nodes)  # nodes itself: no such key
                if node is nodes:
                    raise HeaderError(f"{reader.where}: has no item {quote(location.key)}, which "
                                      f"the DCP metadata says holds {quote(item.storage_index.fqn)}")
                if item.type == LoadItemType.BYTE_IO:
                    self._load_value(planner, item, tree.materialize(
                        reader, node, framework="torch", verify=self.verify))
                else:
                    parts.append(self._part(reader, item, location.key, node, dtypes, whole))
            for batch in _batches(parts):
                for part, tensor in zip(batch, _fetch(reader, batch, self.verify)):
                    target = planner.resolve_tensor(part.item).detach()
                    if target.size() != tensor.size():
                        raise HeaderError(f"{part.item.storage_index.fqn!r}: stored chunk "
                                          f"{list(tensor.size())} does not fit the target "
                                          f"{list(target.size())}")
                    target.copy_(tensor)
                    planner.commit_tensor(part.item, target)

    def _part(self, reader: TensorMap, item: ReadItem, key: str, node: Any,
              dtypes: Dict[str, torch.dtype], whole: bool) -> _Part:
        """What ``item`` reads of the tensor at ``node``, checked against the metadata's chunk
        before anything is fetched; ``whole``: fetch the whole chunk even for a part of it."""
        fqn = item.storage_index.fqn
        entry = self.state_dict_metadata[fqn]
        chunk = self._chunks.get((fqn, tuple(item.storage_index.offset)))
        index = node[1] if type(node) is list and node[0] in (tree.TENSOR, tree.REF) else None
        info = None if index is None else reader.info(reader.names[index])
        if (info is None or chunk is None or info.shape != tuple(chunk.sizes)
                or dtypes.get(info.dtype.name) != entry.properties.dtype):
            raise HeaderError(
                f"{reader.where}: {key!r} is not the {entry.properties.dtype} chunk of shape "
                f"{None if chunk is None else list(chunk.sizes)} that the DCP metadata describes")
        offsets, lengths = list(item.storage_offsets), list(item.lengths)
        if any(o + n > s for o, n, s in zip(offsets, lengths, info.shape)):
            raise HeaderError(f"{reader.where}: read of {key!r} past its shape")
        if (whole or (not any(offsets) and tuple(lengths) == info.shape)
                or CODE_BY_DTYPE.get(info.dtype) in PACKED_CODES):  # packed: no span per element
            return _Part(item, node, info.dtype, offsets, lengths, None, info.nbytes)
        span = _span(offsets, lengths, info.shape, info.dtype.itemsize) if math.prod(lengths) \
            else (0, 0, [])
        return _Part(item, node, info.dtype, offsets, lengths, span, span[1] - span[0])

    @staticmethod
    def _load_value(planner: LoadPlanner, item: ReadItem, value: Any) -> None:
        """Hand a non-tensor value to the planner without pickle (see the module docstring)."""
        if type(planner).load_bytes is DefaultLoadPlanner.load_bytes:
            if planner.flatten_state_dict:
                set_element(planner.original_state_dict, planner.mappings[item.dest_index.fqn],
                            value)
            else:
                planner.state_dict[item.dest_index.fqn] = value
            return
        data = io.BytesIO()  # a custom planner's API takes bytes: made here from a checked value
        torch.save(value, data)
        data.seek(0)
        planner.load_bytes(item, data)

    @property
    def checkpoint_id(self) -> str:
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        """Whether ``checkpoint_id`` is a directory or URL (default storage options) that holds
        a complete checkpoint: its metadata.sckpt exists. A storage failure counts as no."""
        if not isinstance(checkpoint_id, (str, bytes, os.PathLike)):
            return False
        path = os.fsdecode(checkpoint_id)
        if not remote.is_url(path):
            return os.path.isfile(os.path.join(path, METADATA_FILE))
        try:
            return cast(remote.RemotePath, remote.resolve(path)).join(METADATA_FILE).exists()
        except (ImportError, OSError, SafeckptError):
            return False
