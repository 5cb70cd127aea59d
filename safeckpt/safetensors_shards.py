"""Hugging Face sharded safetensors: ``model.safetensors.index.json`` and the .safetensors shards it
names (docs/FORMAT.md section 10, rules [HF1]-[HF7], cited in messages).

Reading: :func:`safeckpt.open` of an index, or of the model's directory, returns a
:class:`SafetensorsShards`: a :class:`safeckpt.ShardedReader` (the same lazy interface) over
the shards, each checked against the index's ``weight_map`` when it is opened (only headers
are read). ``load``, ``load_file`` and ``safeckpt.torch.load_model`` take it as any checkpoint.

Writing: ``save_file(tensors, "out/model.safetensors", max_shard_size="5GB")`` (and ``save``,
``convert``) writes what transformers' ``save_pretrained`` writes: ``model-00001-of-0000N
.safetensors`` ... and the index ``model.safetensors.index.json``, or one ``model.safetensors``
when everything fits in one shard. Every save to a name removes the files of an earlier save to it
that a reader would take for the new one (shards, index, or single file) [HF6], [HF7].

Remote (FORMAT.md section 12): a remote index (a :class:`safeckpt.remote.RemotePath`; its size
checked before it is fetched [HF1]) gives a reader whose shards are the objects beside it; a save
to a remote path streams each shard [RS7] and writes the index last [S9].

Example:
    >>> import numpy as np, safeckpt, tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> tensors = {"a": np.zeros(300, np.float32), "b": np.ones(300, np.float32)}
    >>> safeckpt.save_file(tensors, os.path.join(folder, "model.safetensors"), max_shard_size="1KB")
    >>> sorted(os.listdir(folder))  # doctest: +NORMALIZE_WHITESPACE
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors',
     'model.safetensors.index.json']
    >>> with safeckpt.open(folder) as f:
    ...     f.keys(), os.path.basename(f.shard_of("b")), f.metadata["total_size"]
    (['a', 'b'], 'model-00002-of-00002.safetensors', 2400)
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Set, Union

from . import _fs
from . import format as fmt
from . import safetensors_writer
from . import tree as _tree
from .errors import (HeaderError, InvalidValueError, LayoutError, LimitError, SafeckptError,
                     ShardError, quote)
from .filekind import INDEX_SUFFIX, PathLike
from .reader import Reader
from .remote import RemoteFile, RemotePath
from .safetensors_format import decode_extras, refuse_constant, unique_object
from .shard import (MAX_SHARDS, ShardedReader, Target, base_name, parse_size, plain_file_name,
                    remove_file, remove_stale_shards, sibling, split)
from .writer import destination_format, stored_nbytes, warn_beyond_reader_defaults

SUFFIX = ".safetensors"
TOTAL_SIZE_KEY = "total_size"  # the index's metadata: the bytes of all tensors, as transformers writes
FORMAT_KEY = "format"  # a shard's metadata: transformers refuses a file whose "format" it does not know
DEFAULT_FORMAT = "pt"  # what transformers' save_pretrained writes: it loads into a PyTorch model
_SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}\.safetensors\Z", re.IGNORECASE)
_WHERE = "the index [HF1]"  # how JSON errors name an index


class Index(NamedTuple):
    """A checked index [HF1]-[HF3]: its ``size`` in bytes, the shard ``files`` in order, the
    tensor names each holds (``by_file``), its ``metadata`` ([ST9] extras merged) and the raw
    ``tree`` from them (``format.NO_TREE`` if none)."""

    size: int
    files: List[str]
    by_file: Dict[str, Set[str]]
    metadata: Dict[str, Any]
    tree: Any


# -- names ---------------------------------------------------------------------------------------

def index_of(path: str) -> str:
    """The index a sharded save to ``path`` writes: ``model.safetensors`` -> its ``.index.json``."""
    return path + INDEX_SUFFIX


def _index_beside(path: Target) -> Target:
    """:func:`index_of` a local path or a remote object."""
    return sibling(path, index_of(path.name)) if isinstance(path, RemotePath) else index_of(path)


def shard_files(path: Union[PathLike, RemotePath], k: int) -> List[str]:
    """The file names of ``k`` shards of a save to ``path``, as transformers names them.

    Example:
        >>> shard_files("out/model.safetensors", 2)
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    """
    name = path.name if isinstance(path, RemotePath) else os.path.basename(os.fsdecode(path))
    stem = name[:-len(SUFFIX)]
    return [f"{stem}-{j:05d}-of-{k:05d}{SUFFIX}" for j in range(1, k + 1)]


def indexes_in(entries: Iterable[str]) -> List[str]:
    """The Hugging Face indexes among a directory's ``entries`` (``*.safetensors.index.json``)."""
    return [e for e in entries if e.lower().endswith(SUFFIX + INDEX_SUFFIX) and not e.startswith(".")]


def singles_in(entries: Iterable[str]) -> List[str]:
    """The ``*.safetensors`` files among ``entries`` that are not named as shards."""
    return [e for e in entries if e.lower().endswith(SUFFIX) and not e.startswith(".")
            and not _SHARD_NAME.search(e)]


def shards_in(entries: Iterable[str]) -> List[str]:
    """The entries named as Hugging Face shards (``-0000j-of-0000k.safetensors``)."""
    return [e for e in entries if _SHARD_NAME.search(e)]


# -- read ----------------------------------------------------------------------------------------

def _read_bounded(path: Union[str, RemoteFile], where: str, max_size: int) -> bytes:
    """The bytes of the regular file (or remote object) at ``path``, refused before reading if
    over ``max_size``."""
    if isinstance(path, RemoteFile):  # its size is known (one metadata request): no GET yet
        if path.size > max_size:
            raise LimitError(f"{where}: the index is {path.size} bytes, more than "
                             f"max_header_size={max_size}; pass max_header_size=... if you trust "
                             "this file [HF1]")
        return path.read(0, path.size)  # exactly that many bytes [RS2]
    file, size = _fs.open_regular(path, where, " [HF1]")
    with file:
        if size > max_size:
            raise LimitError(f"{where}: the index is {size} bytes, more than "
                             f"max_header_size={max_size}; pass max_header_size=... if you trust "
                             "this file [HF1]")
        raw = file.read(size + 1)  # read(n) allocates n bytes first: never max_size
        if len(raw) > size:  # the file grew since fstat: the rest, up to the limit
            raw += file.read(max_size + 1 - len(raw))
    if len(raw) > max_size:
        raise LimitError(f"{where}: the index is larger than max_header_size={max_size}; pass "
                         "max_header_size=... if you trust this file [HF1]")
    return raw


def _shard_file(name: object, tensor: str, where: str) -> str:
    """A shard's file name from the weight_map: a plain ``*.safetensors`` name in the index's own
    directory [HF2], so the index never makes a reader open a file elsewhere."""
    if type(name) is not str or not plain_file_name(name):  # the type test is for mypy
        raise HeaderError(f"{where}: weight_map[{quote(tensor)}]: shard file {quote(name)} must be a "
                          "plain file name in the index's directory [HF2]")
    if not name.lower().endswith(SUFFIX):
        raise HeaderError(f"{where}: weight_map[{quote(tensor)}]: shard file {quote(name)} is not a "
                          "*.safetensors file; safeckpt opens sharded safetensors only (convert "
                          "torch shards one by one with safeckpt convert) [HF2]")
    return name


def read_index(path: Union[str, RemoteFile], *, max_header_size: int = fmt.MAX_HEADER_SIZE,
               max_tensors: int = fmt.MAX_TENSORS, max_depth: int = fmt.MAX_DEPTH,
               **_other_limits: Any) -> Index:
    """Read and check a Hugging Face index [HF1]-[HF3], an untrusted file (a local path, or a
    remote object: its size is checked before it is fetched); open no shard.

    Raises:
        LimitError: the file is over ``max_header_size``, names more than ``max_tensors``
            tensors, or nests deeper than ``max_depth``.
        HeaderError: not one strict JSON object (duplicate keys, NaN), no non-empty
            ``weight_map`` of tensor -> plain ``*.safetensors`` name, or bad ``metadata``; the
            message names the index and the tensor.
        OSError: the file cannot be read.

    Example:
        >>> read_index("model.safetensors.index.json").files   # doctest: +SKIP
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    """
    where = repr(path.where if isinstance(path, RemoteFile) else path)
    raw = _read_bounded(path, where, max_header_size)
    try:
        with fmt.collector_paused():
            index = json.loads(raw.decode("utf-8"),
                               object_pairs_hook=functools.partial(unique_object, where=_WHERE),
                               parse_constant=functools.partial(refuse_constant, where=_WHERE))
    except HeaderError as exc:
        raise HeaderError(f"{where}: {exc}") from None
    except RecursionError:
        raise LimitError(f"{where}: index nesting is too deep to decode [HF1]") from None
    except ValueError as exc:  # not UTF-8, not JSON, or an int of more than 4300 digits
        raise HeaderError(f"{where}: not a JSON index: {exc} [HF1]") from None
    weight_map = index.get("weight_map") if type(index) is dict else None
    if type(weight_map) is not dict or not weight_map:
        raise HeaderError(f"{where}: a sharded safetensors index needs a non-empty 'weight_map' "
                          "object of tensor name -> shard file [HF2]")
    if len(weight_map) > max_tensors:
        raise LimitError(f"{where}: the weight_map names {len(weight_map)} tensors, more than "
                         f"max_tensors={max_tensors}; pass max_tensors=... if you trust this file [HF2]")
    by_file: Dict[str, Set[str]] = {}
    for name, file in weight_map.items():
        if not name:
            raise HeaderError(f"{where}: tensor name '' in the weight_map is not a non-empty str [HF2]")
        by_file.setdefault(_shard_file(file, name, where), set()).add(name)
    metadata = index.get("metadata", {})
    if type(metadata) is not dict:
        raise HeaderError(f"{where}: 'metadata' must be an object, not {type(metadata).__name__} "
                          "[HF3]")
    try:
        fmt.walk_metadata(metadata, max_depth, HeaderError)
        metadata, tree = decode_extras(metadata, max_depth)
    except SafeckptError as exc:
        raise type(exc)(f"{where}: {exc} [HF3]") from None
    return Index(len(raw), sorted(by_file), by_file, metadata, tree)


class SafetensorsShards(ShardedReader):
    """A Hugging Face sharded model (an index and its .safetensors shards) as one lazy reader;
    made by :func:`safeckpt.open` of the index or its directory.

    The interface of :class:`safeckpt.ShardedReader`; ``path`` is the index, ``shards`` the
    shards in order, ``version`` None, ``format`` ``"safetensors"``. ``metadata`` is the
    index's (``total_size`` among it), then what the shards' own metadata adds (``format``).
    The tensors are the shards' in the order of their file names, each shard's in its own order
    [HF5]. Safetensors files hold no checksums: ``verify`` raises, naming the shard.

    With ``mmap=False`` a shard closed for room and reopened must be the file it was (device,
    inode, size, modification time and header), as for .sckpt shards [S7]. ``path`` may be a
    remote index (a :class:`safeckpt.remote.RemotePath`): the shards are then the objects beside
    it, each read by ranged requests ([RS1]; :attr:`path` is the index's URL).
    """

    format = "safetensors"
    shard_rule = "[HF4]"

    def __init__(self, path: Union[str, RemotePath], *, mmap: bool = True, **limits: Any) -> None:
        source: Union[str, RemoteFile] = path if isinstance(path, str) else RemoteFile(path)
        if isinstance(source, RemoteFile):  # its size now (one metadata request), no GET yet
            self._remote = source
        self.path = path if isinstance(path, str) else path.url
        where = self.where = repr(self.path)
        self.version = None
        index = read_index(source, **limits)
        self.size = index.size
        self.metadata = metadata = index.metadata

        def check(reader: Reader, j: int) -> List[str]:
            """[HF4]: a flat safetensors file holding exactly what the weight_map maps to it."""
            file = index.files[j]
            problem = None
            if reader.format != "safetensors":
                problem = "is not a safetensors file"
            elif reader.stored_tree is not fmt.NO_TREE:
                problem = "has a tree in its metadata; shards are flat files"
            if problem:
                raise ShardError(f"{where}: shard {file!r} {problem} [HF4]")
            names, expected = reader.names, index.by_file[file]
            extra = next((n for n in names if n not in expected), None)
            if extra is not None or len(names) != len(expected):
                problem = (f"holds {quote(extra)}, which the weight_map does not map to it"
                           if extra is not None else
                           f"does not hold {quote(min(expected.difference(names)))}, which the "
                           "weight_map maps to it")
                raise LayoutError(f"{where}: shard {file!r} {problem} [HF4]")
            for key, value in reader.metadata.items():
                metadata.setdefault(key, value)
            return reader.keys()

        names = self._open_shards(index.files, check, mmap, limits)
        try:
            self._stored_tree = _tree.check_tree(index.tree, names,
                                                 limits.get("max_depth", fmt.MAX_DEPTH), where)
        except BaseException:
            self.close()
            raise
        self._names = names  # last: a reader with names is open


# -- write ---------------------------------------------------------------------------------------

def save_sharded(tree: Any, names: Sequence[str], arrays: Sequence[Any],
                 path: Union[PathLike, RemotePath], *, metadata: Optional[Mapping[str, Any]],
                 atomic: bool, max_shard_size: Union[int, str]) -> None:
    """Write ``names``/``arrays`` as Hugging Face shards and their index [HF6].

    Tensors fill shards in order, a new one started when the next tensor would bring its tensor
    bytes over ``max_shard_size`` [S8]; one shard's worth is one plain .safetensors file at
    ``path``. Else ``<stem>-0000j-of-0000k.safetensors`` (each with ``{"format": ...}``, "pt"
    unless ``metadata`` has a str ``format``) and then ``<path>.index.json``: ``{"metadata":
    {"total_size": <tensor bytes>, ...}, "weight_map": {name: file}}``, the rest of ``metadata``
    and the ``tree`` kept as the single-file writer keeps them [ST9]. Every file is planned and
    checked before any is written; shards are written first, the index last (each atomically
    when ``atomic``; each visible only once whole when ``path`` is a remote object [RS7]); then
    files of earlier saves to ``path`` that would be taken for this one (other shards, and the
    single file or the index that this save did not write) are removed.

    Raises:
        InvalidValueError: ``path`` is not a ``*.safetensors`` name, or ``metadata`` has the key
            ``total_size`` (the index's own); and as :func:`safeckpt.safetensors_writer.save_file`.
        ValueError: a bad ``max_shard_size``, or more than 99999 shards.
        IsADirectoryError: ``path`` is a directory.
    """
    limit = parse_size(max_shard_size)
    target, kind = destination_format(path)  # a str or a RemotePath
    if kind != "safetensors":
        where = target.url if isinstance(target, RemotePath) else repr(target)
        raise InvalidValueError(f"{where}: Hugging Face shards are saved to a *.safetensors name "
                                "(e.g. 'model.safetensors') [HF6]")
    if isinstance(target, str) and os.path.isdir(target):
        raise IsADirectoryError(errno.EISDIR, "cannot save over a directory", target)
    metadata = dict(fmt.check_metadata(metadata))
    if TOTAL_SIZE_KEY in metadata:
        raise InvalidValueError(f"metadata key {TOTAL_SIZE_KEY!r} is the index's own (the bytes of "
                                "all tensors, as Hugging Face writes it) [HF6]; rename it")
    names, arrays = list(names), list(arrays)
    sizes = [stored_nbytes(array) for array in arrays]  # packed F4/F6 [ST5]
    counts = split(sizes, limit)
    given_format = metadata.get(FORMAT_KEY)
    if len(counts) <= 1:
        metadata.setdefault(FORMAT_KEY, DEFAULT_FORMAT)
        save_single(dict(zip(names, arrays)), target, metadata=metadata, tree=tree, atomic=atomic)
        return
    if len(counts) > MAX_SHARDS:
        raise ValueError(f"max_shard_size={max_shard_size!r} makes {len(counts)} shards, more than "
                         f"{MAX_SHARDS}; raise max_shard_size [S8]")
    files = shard_files(target, len(counts))
    shard_metadata = {FORMAT_KEY: given_format if type(given_format) is str else DEFAULT_FORMAT}
    plans, weight_map, start = [], {}, 0
    for file, count in zip(files, counts):
        part = dict(zip(names[start:start + count], arrays[start:start + count]))
        plans.append(safetensors_writer.plan(part, shard_metadata))
        weight_map.update(dict.fromkeys(part, file))
        start += count
    index_metadata = {TOTAL_SIZE_KEY: sum(sizes),
                      **safetensors_writer.encode_metadata(metadata, tree)}
    text = json.dumps({"metadata": index_metadata, "weight_map": weight_map}, indent=2,
                      sort_keys=True) + "\n"  # as transformers writes it (ASCII: names escaped)
    warn_beyond_reader_defaults(len(text), len(names), "[HF1]", "[HF2]")

    def write(j: int) -> None:
        safetensors_writer.write(plans[j], sibling(target, files[j]), atomic=atomic)

    _fs.fan_out(write, range(len(plans)))  # every shard before the index
    index = _index_beside(target)
    if isinstance(index, RemotePath):  # one small object, visible whole [RS7]
        index.write_small(text.encode("ascii"))
    else:
        with _fs.new_file(index, atomic) as fd:
            _fs.pwrite_all(fd, text.encode("ascii"), 0)
    _remove_earlier(target, files)


def save_single(tensors: Mapping[str, Any], path: Union[PathLike, RemotePath], *,
                metadata: Optional[Mapping[str, Any]] = None, tree: Any = fmt.NO_TREE,
                atomic: bool = True) -> None:
    """Write one .safetensors file (:func:`safeckpt.safetensors_writer.save_file`); then, for a
    ``<stem>.safetensors`` name, delete what an earlier sharded save to that name left: its index
    ``<stem>.safetensors.index.json``, then its shards ``<stem>-0000j-of-0000k.safetensors``
    [HF7]. Left there, they would shadow or stand beside this file: a directory holding an
    index and a plain file is refused as two checkpoints, and other tools may load the old index.

    Every save of a safetensors file goes through here (``save_file``, ``save``, ``convert``,
    one shard's worth of a sharded save). A crash between the write and the deletions leaves both;
    the directory is then refused naming them, and each still opens by its own path.

    Raises:
        As :func:`safeckpt.safetensors_writer.save_file`.

    Example:
        >>> save_single({"w": np.zeros(2)}, "out/model.safetensors")  # doctest: +SKIP
    """
    target, kind = destination_format(path)  # a str or a RemotePath
    safetensors_writer.save_file(tensors, target, metadata=metadata, tree=tree, atomic=atomic)
    if kind == "safetensors":
        _remove_earlier(target, ())


def _remove_earlier(path: Target, files: Sequence[str]) -> None:
    """Delete the files of earlier saves to ``path`` (``<stem>.safetensors``) that a reader would
    take for the save that just wrote ``files`` (its shards; none for one plain file) [HF6], [HF7]:
    the index (for a plain file: first, so that an index never names shards already gone), the
    stem's other shards, and the plain file (for shards: transformers loads a ``model.safetensors``
    before it looks for an index)."""
    if not files:
        remove_file(_index_beside(path))
    remove_stale_shards(path, base_name(path)[:-len(SUFFIX)], SUFFIX, files)
    if files:
        remove_file(path)
