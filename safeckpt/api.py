"""The public entry points: ``open``, ``load``, ``save``, ``load_file``, ``save_file``,
``load_bytes`` and ``save_bytes`` (``safeckpt/__init__.py`` re-exports them).

This is the top of the core: it chooses between a single file and shards, and by a file's
name between .sckpt and .safetensors; the layers below (:mod:`safeckpt.shard`,
:mod:`safeckpt.reader`, :mod:`safeckpt.writer`, :mod:`safeckpt.tree`) each do one job.

Example:
    >>> import numpy as np, safeckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "w.sckpt")
    >>> safeckpt.save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, path)
    >>> with safeckpt.open(path) as f:
    ...     f.info("w").shape, f.get_slice("w")[1:].tolist()
    ((2, 3), [[3.0, 4.0, 5.0]])
"""

from __future__ import annotations

import collections.abc
import errno
import os
from typing import Any, Dict, Mapping, Optional, Sequence, TypeVar, Union

import numpy as np

from . import format as fmt
from . import refs as _refs
from . import safetensors_shards as _hf
from . import shard as _shard
from . import tree as _tree
from . import writer as _writer
from .errors import InvalidValueError, RefError
from .filekind import PathLike, kind_of, output_format
from .reader import Reader, TensorMap
from .remote import RemoteFile, RemotePath, is_url, resolve

Metadata = Optional[Mapping[str, Any]]
Prefix = Union[None, str, Sequence[Any]]


def open(path: Union[PathLike, RemotePath], *, mmap: bool = True,  # noqa: A001 - safeckpt.open
         storage_options: Optional[Dict[str, Any]] = None, fs: Any = None,
         **limits: Any) -> TensorMap:
    """Open and validate a checkpoint (one file, or shards and their index); use as a context manager.

    Parameters:
        path: a str or path-like, or a URL that fsspec opens (``s3://bucket/ckpt.sckpt``,
            ``gs://``, ``http(s)://``, ``memory://``; ``file://`` is a local path), or a path
            inside ``fs``; what it names:

            - a .sckpt or .safetensors file (told apart by their first bytes);
            - a .sckpt shard index (FORMAT.md section 9);
            - a Hugging Face index ``*.safetensors.index.json`` (section 10), or the name its
              sharded save was given (``model.safetensors``, when only its index is there);
            - a directory holding one checkpoint: its only .sckpt file, Hugging Face index or
              .safetensors file (shards are not counted).
        mmap: map the file (zero-copy arrays) or, if False, read tensors with pread into fresh
            memory (network filesystems, or a file that may shrink while open). A remote file is
            never mapped: its tensors are fetched by ranged requests into fresh memory, checked
            as FORMAT.md section 12 says.
        storage_options: for a URL, passed to fsspec (credentials, endpoint, ...).
        fs: an fsspec filesystem object; ``path`` is then a path inside it.
        limits: ``max_header_size``, ``max_tensors``, ``max_ndim``, ``max_depth``; raise them only
            for files you trust.

    Returns:
        A :class:`Reader`, or (the same interface) a :class:`safeckpt.ShardedReader` over the
        shards of an index, or a :class:`safeckpt.refs.LinkedReader` over a file with references
        and the files it refers to (FORMAT.md section 11, each checked [X5]).

    Raises:
        SafeckptError: a subclass naming the problem and the tensor; OSError for I/O.
        ValueError: a directory holding several checkpoints (they are named; open one).
        IsADirectoryError: a directory holding none (or only shards: a save did not finish).
        RemoteError: the remote storage failed or misbehaved (the URL and range named).
        InvalidValueError: ``storage_options`` or ``fs`` with a local path.

    Example:
        >>> with safeckpt.open("model.sckpt") as f:          # doctest: +SKIP
        ...     w = f["layers.0.weight"]
        >>> with safeckpt.open("s3://bucket/model.sckpt") as f:   # doctest: +SKIP
        ...     w = f["layers.0.weight"]                    # ranged requests for its bytes only
        >>> with safeckpt.open("Llama-3-8B/") as f:          # doctest: +SKIP
        ...     f.shard_of("lm_head.weight")
        'Llama-3-8B/model-00004-of-00004.safetensors'
    """
    if not isinstance(path, RemotePath):
        try:
            path = os.fsdecode(path)
        except TypeError:
            raise TypeError(f"a path is a str, bytes or os.PathLike object, not "
                            f"{type(path).__name__}; to load a checkpoint held in memory, use "
                            "safeckpt.load_bytes(data)") from None
    where = resolve(path, storage_options=storage_options, fs=fs)
    source: Union[str, RemoteFile]
    if isinstance(where, RemotePath):
        found = _remote_source(where)
        if isinstance(found, RemotePath):  # a Hugging Face index
            return _hf.SafetensorsShards(found, mmap=mmap, **limits)
        source = found
    else:
        local = where
        if os.path.isdir(local):
            local = _checkpoint_in(local)
        elif (local.lower().endswith(_hf.SUFFIX) and not os.path.lexists(local)
              and os.path.isfile(_hf.index_of(local))):  # a sharded save to this name wrote an index
            local = _hf.index_of(local)
        if kind_of(local) == "index":
            return _hf.SafetensorsShards(local, mmap=mmap, **limits)
        source = local
    reader = Reader(source, mmap=mmap, allow_index=True, allow_refs=True, **limits)
    if reader.shard_index is None and reader.refs is None:
        return reader
    try:
        if reader.refs is not None:  # some tensors are in other files of the directory [X5]
            return _refs.LinkedReader(reader, mmap=mmap, **limits)
        return _shard.ShardedReader(reader, mmap=mmap, **limits)
    except BaseException:
        reader.close()
        raise


def _remote_source(rp: RemotePath) -> Union[RemoteFile, RemotePath]:
    """What :func:`open` reads for a remote path: the object opened (one metadata request
    [RS1]), or the RemotePath of a Hugging Face index; a directory gives its one checkpoint
    (:func:`_checkpoint_in`), and ``model.safetensors`` that is not there its index, as locally.
    ``*.commit`` objects (FORMAT.md [RS8]) are not checkpoints: their names end otherwise."""
    if kind_of(rp.name) != "index":
        try:
            return RemoteFile(rp)
        except IsADirectoryError:
            rp = _checkpoint_in(rp)
        except FileNotFoundError:
            index = rp.parent.join(_hf.index_of(rp.name))
            if not (rp.name.lower().endswith(_hf.SUFFIX) and index.exists()):
                raise
            rp = index
    return rp if kind_of(rp.name) == "index" else RemoteFile(rp)


_Dir = TypeVar("_Dir", str, RemotePath)


def _checkpoint_in(directory: _Dir) -> _Dir:
    """The one checkpoint in ``directory`` (local, or remote: listed afresh): a .sckpt
    checkpoint, a Hugging Face index or a .safetensors file, shards not counted. Which of several
    is meant is never guessed: an index beside a plain .safetensors file may be a stale save, or
    the newer one.

    Raises:
        ValueError: several of them (named: open one by its path).
        IsADirectoryError: none (said so when only shards are there: a save did not finish [S9]).
    """
    if isinstance(directory, RemotePath):
        entries, where = directory.listdir(), directory.url
    else:
        entries, where = sorted(os.listdir(directory)), directory
    found = sorted(_shard.checkpoints_in(entries) + _hf.indexes_in(entries)
                   + _hf.singles_in(entries))
    if len(found) == 1:
        if isinstance(directory, RemotePath):
            return directory.join(found[0])
        return os.path.join(directory, found[0])
    if found:
        raise ValueError(f"{where!r} holds several checkpoints ({', '.join(found)}); open one "
                         "of them by its path")
    shards = _shard.shards_in(entries) + _hf.shards_in(entries)
    detail = (f": only shards ({shards[0]}, ...) and no index, so a save did not finish [S9]"
              if shards else "")
    raise IsADirectoryError(errno.EISDIR, "a directory with no .sckpt, .safetensors or "
                            f"*.safetensors.index.json checkpoint in it{detail}", where)


def load_file(path: Union[PathLike, RemotePath], *, mmap: bool = True,
              verify: Optional[bool] = None, storage_options: Optional[Dict[str, Any]] = None,
              fs: Any = None, **limits: int) -> Dict[str, np.ndarray]:
    """Load every tensor of a .sckpt file as ``{name: np.ndarray}``.

    With ``mmap=True`` (default) the arrays view a private copy-on-write mapping of the file:
    no copy, writable, and the file itself never changes. ``verify``: ``None`` (auto) checks the
    CRC32C of every tensor read into fresh memory (``mmap=False``) and leaves a mapped load lazy;
    ``True`` checks every tensor (reading every page); ``False`` none. ``path`` may be a URL
    (``storage_options``) or a path inside ``fs``, as for :func:`open`: the tensors are fetched
    by parallel ranged requests, neighbours coalesced, each checked as it arrives. Limits as for
    :func:`open`.

    Example:
        >>> tensors = safeckpt.load_file("model.sckpt")    # doctest: +SKIP
        >>> tensors = safeckpt.load_file("s3://bucket/model.safetensors")  # doctest: +SKIP
    """
    with open(path, mmap=mmap, storage_options=storage_options, fs=fs, **limits) as reader:
        return reader.load_all(verify=verify)


def load_bytes(data: Union[bytes, bytearray, memoryview], *, verify: Optional[bool] = None,
               **limits: Any) -> Dict[str, np.ndarray]:
    """Load tensors from an in-memory .sckpt file; arrays view ``data`` (read-only for bytes).

    ``verify=None`` (auto) checks every tensor's CRC32C when the file has checksums: the bytes
    are in memory already, so the check reads nothing more (pass ``verify=False`` for ``data``
    that views a mapping you want to keep lazy).

    Example:
        >>> load_bytes(save_bytes({"x": np.zeros(2)}))["x"]
        array([0., 0.])
    """
    with Reader(data, **limits) as reader:
        return reader.load_all(verify=verify)


def load(path: Union[PathLike, RemotePath], *, prefix: Prefix = None,
         framework: Optional[str] = None, map_location: Any = None, device: Any = None,
         mmap: bool = True, verify: Optional[bool] = None,
         storage_options: Optional[Dict[str, Any]] = None, fs: Any = None,
         **limits: int) -> Any:
    """Load what :func:`save` saved (or any .sckpt file: a flat one loads as a dict by name).

    Parameters:
        path: a str or path-like, or a URL, or a path inside ``fs`` (see :func:`open`): only the
            tensors loaded are fetched, by ranged requests.
        prefix: load only the subtree there: ``"model"``, ``"optimizer.state.0"``, or a tuple of
            exact keys such as ``("state", 0)``. Other tensors are not read.
        framework: ``None``/``"numpy"`` for numpy arrays, ``"torch"`` for torch tensors,
            ``"jax"`` for jax arrays (see :mod:`safeckpt.jax`).
        map_location: with torch, where tensors go, as ``torch.load`` takes it: ``"cpu"``,
            ``"cuda:0"``, a ``torch.device`` or a dict mapping saved devices to devices. By
            default a tensor goes back to the device it was saved from.
        device: with torch, one device for every tensor (``"cuda:0"``, a ``torch.device``), as
            safetensors takes it: the same as ``map_location=device``.
        mmap: zero-copy views of a private mapping (default) or fresh memory read with pread.
        verify: check the CRC32C of the tensors loaded: ``None`` (auto) for those read into fresh
            memory (``mmap=False``; a mapped load stays lazy), ``True`` for all, ``False`` none.
        storage_options, fs: for a URL or a path inside an fsspec filesystem, as for :func:`open`.
        limits: ``max_header_size``, ``max_tensors``, ``max_ndim``, ``max_depth``.

    Returns:
        The object, with its types: tuples stay tuples, int keys stay ints, OrderedDicts stay
        ordered, numpy scalars keep their dtype, tied tensors are one object.

    Raises:
        SafeckptError: a subclass naming the problem, the file and the path in the tree.
        KeyError: nothing at ``prefix``.

    Example:
        >>> opt = safeckpt.load("ckpt.sckpt", prefix="optimizer", framework="torch")  # doctest: +SKIP
    """
    if device is not None:
        if framework != "torch" or map_location is not None:
            raise ValueError("device= needs framework='torch' and no map_location=")
        map_location = device
    with open(path, mmap=mmap, storage_options=storage_options, fs=fs, **limits) as reader:
        return _tree.materialize(reader, _tree.find(reader, prefix), framework=framework,
                                 map_location=map_location, verify=verify)


def save_file(tensors: Mapping[str, Any], path: Union[PathLike, RemotePath], *,
              metadata: Metadata = None, align: int = fmt.ALIGN_DEFAULT, checksum: bool = True,
              atomic: bool = True, max_shard_size: Union[None, int, str] = None,
              storage_options: Optional[Dict[str, Any]] = None, fs: Any = None) -> None:
    """Save a flat ``{name: np.ndarray}`` dict to a .sckpt file (or .safetensors, by its name).

    Every save writes a new file and never into the one at ``path`` (FORMAT.md [W3]): arrays that
    anyone loaded (memory-mapped) from the old file keep its bytes.

    Parameters:
        tensors: names (non-empty str) to numpy arrays or scalars of a dtype in FORMAT.md sect. 4.
        path: a str, bytes or path-like. The name chooses the format, as in
            :func:`safeckpt.convert`: ``*.safetensors`` writes a safetensors file (no checksums,
            ``align`` unused; see :mod:`safeckpt.safetensors_writer`) and then removes the index
            and shards of an earlier sharded save to that name (FORMAT.md [HF7]), any other name
            a .sckpt file; names of formats safeckpt reads but never writes (``.pt``, ``.bin``,
            ``.npz``, ``.index.json``, ...) are refused. Or a URL that fsspec writes
            (``s3://bucket/ckpt.sckpt``, ``gs://``, ``az://``, ``memory://``; ``file://`` is a
            local path), or a path inside ``fs``: the file is streamed, never whole in memory,
            and becomes visible only once complete (FORMAT.md [RS7]). ``http(s)://`` is refused
            (read-only).
        metadata: a dict with str keys of msgpack primitives (None, bool, int, float, str,
            bytes, lists and dicts of them).
        align: tensor alignment, a power of two from 8 to 1 MiB (4096 suits O_DIRECT).
        checksum: store a CRC32C per tensor, checked by ``verify``.
        atomic: write a temporary file in the same directory, fsync, rename it over ``path`` and
            fsync the directory, so a crash leaves the old file or the new one, never a mix
            [W2]. ``False`` skips the fsyncs and the second copy on disk: the old file is
            unlinked, then the new one is written at ``path``; an error removes the partial file
            (the old one is gone), a crash may leave one (readers refuse it). A remote object has
            no rename: whatever ``atomic`` says, it is written as one stream (S3: a multipart
            upload) that becomes visible only when complete and is discarded on an error, so the
            old object stays until the new one replaces it whole [RS7].
        max_shard_size: split into shards of at most this many tensor bytes (an int, or a str
            such as ``"500MB"`` or ``"2GiB"``). A .sckpt name gets shards plus an index at
            ``path`` (FORMAT.md section 9); ``*.safetensors`` gets Hugging Face shards
            (``model-00001-of-00002.safetensors`` ...) and ``model.safetensors.index.json``, as
            transformers writes them (section 10). What fits in one shard is one file at ``path``.
            Remote shards are written first, then the index, as locally [S9].
        storage_options: for a URL, passed to fsspec (credentials, endpoint, ...).
        fs: an fsspec filesystem object; ``path`` is then a path inside it.

    Raises:
        InvalidValueError: a key is not a str, a value is not an array, metadata has a value
            msgpack cannot hold, or ``path`` names a format safeckpt does not write; the message
            names it. Also ``storage_options`` or ``fs`` with a local path, and an
            ``http(s)://`` URL.
        UnsupportedDtypeError: an array's dtype cannot be stored.
        LimitError: more dimensions or deeper metadata than readers accept by default [W4].
        OSError: from the file system (a missing directory is named as such); no partial file
            is left behind. RemoteError (an OSError): the remote storage failed (the URL named);
            the upload is discarded.
        ChecksumError: streaming to a URL, an array changed while it was saved [RS7].

    Warns:
        UserWarning: the header or the tensor count is over the readers' default limit [W4];
            the message says which keyword loads the file.

    Example:
        >>> safeckpt.save_file({"w": np.zeros((2, 3))}, "w.sckpt", metadata={"step": 10})  # doctest: +SKIP
        >>> safeckpt.save_file(weights, "out/model.safetensors", max_shard_size="5GB")  # doctest: +SKIP
        >>> safeckpt.save_file(weights, "s3://bucket/run1/model.sckpt")  # doctest: +SKIP
    """
    if not isinstance(tensors, collections.abc.Mapping):
        raise InvalidValueError(f"tensors must be a dict of name -> numpy array, "
                                f"not {type(tensors).__name__}")
    target = _destination(path, storage_options, fs)
    if max_shard_size is not None:
        save_sharded(fmt.NO_TREE, list(tensors), list(tensors.values()), target,
                     metadata=metadata, align=align, checksum=checksum, atomic=atomic,
                     max_shard_size=max_shard_size)
        return
    save_plan(_writer.Plan(tensors, metadata, align, checksum), target, atomic=atomic)


def save(obj: Any, path: Union[PathLike, RemotePath], *, metadata: Metadata = None,
         align: int = fmt.ALIGN_DEFAULT, checksum: bool = True, atomic: bool = True,
         max_shard_size: Union[None, int, str] = None,
         storage_options: Optional[Dict[str, Any]] = None, fs: Any = None) -> None:
    """Save a nested object (a state dict, an optimizer state, a whole training state) to a file.

    Parameters:
        obj: dicts (str or int keys, order kept), OrderedDicts, lists and tuples of numpy arrays,
            torch tensors, numpy scalars, None, bool, int (int64 and uint64 range), float, str and
            bytes. A tensor that appears twice (the same memory, e.g. tied weights) is stored once.
        path: a str or path-like, or a URL (``s3://...``) or a path inside ``fs``, as for
            :func:`safeckpt.save_file`.
        metadata, align, checksum, atomic, max_shard_size, storage_options, fs: as for
            :func:`safeckpt.save_file`.

    Raises:
        InvalidValueError: a value safeckpt does not store; the message names its path
            (``obj['scheduler']``) and the fix.
        UnsupportedDtypeError, LimitError: an unstorable dtype, nesting deeper than 64.

    Example:
        >>> safeckpt.save({"model": model.state_dict(), "step": 10}, "ckpt.sckpt")  # doctest: +SKIP
    """
    target = _destination(path, storage_options, fs)
    if max_shard_size is not None:
        save_sharded(*_tree.flatten(obj), target, metadata=metadata, align=align,
                     checksum=checksum, atomic=atomic, max_shard_size=max_shard_size)
        return
    save_plan(plan(obj, metadata=metadata, align=align, checksum=checksum), target, atomic=atomic)


def _destination(path: Any, storage_options: Optional[Dict[str, Any]], fs: Any
                 ) -> Union[str, RemotePath]:
    """Where a save goes: a local path (a str, for the local code) or a remote object
    (:func:`safeckpt.remote.resolve`), never an ``http(s)://`` one (read-only).

    Raises:
        TypeError: ``path`` is no path (the message points at ``save_bytes``).
        InvalidValueError: ``storage_options`` or ``fs`` with a local path; an http(s) URL.
    """
    if not isinstance(path, (str, bytes, os.PathLike, RemotePath)):
        output_format(path)  # raises the TypeError that says what to use instead
    target = resolve(path, storage_options=storage_options, fs=fs)
    if isinstance(target, RemotePath):
        target.check_writable()  # before anything is read or written
    return target


def save_sharded(tree: Any, names: Sequence[str], arrays: Sequence[Any],
                 path: Union[PathLike, RemotePath], *, metadata: Metadata, align: int,
                 checksum: bool, atomic: bool, max_shard_size: Union[int, str],
                 storage_options: Optional[Dict[str, Any]] = None, fs: Any = None) -> None:
    """Write a flattened object in shards of at most ``max_shard_size`` tensor bytes, the format
    chosen by the name: ``*.safetensors`` writes Hugging Face shards and their
    ``*.safetensors.index.json`` (:func:`safeckpt.safetensors_shards.save_sharded`; ``align``
    and ``checksum`` unused), any other name .sckpt shards and an index at ``path``
    (:func:`safeckpt.shard.save_sharded`). What fits in one shard is one ordinary file at ``path``.
    ``path`` may be remote, as for :func:`save_file`: shards first, the index last [S9], then
    the shards of an earlier save that the index does not name are removed.

    Example:
        >>> save_sharded(*_tree.flatten({"w": np.zeros(2)}), "out/model.safetensors", metadata=None,
        ...              align=64, checksum=True, atomic=True, max_shard_size="5GB")  # doctest: +SKIP
    """
    target = _destination(path, storage_options, fs)
    if _writer.destination_format(target)[1] == "safetensors":
        _hf.save_sharded(tree, names, arrays, target, metadata=metadata, atomic=atomic,
                         max_shard_size=max_shard_size)
        return
    _shard.save_sharded(tree, names, arrays, target, metadata=metadata, align=align,
                        checksum=checksum, atomic=atomic, max_shard_size=max_shard_size)


def save_bytes(tensors: Mapping[str, Any], *, metadata: Metadata = None,
               align: int = fmt.ALIGN_DEFAULT, checksum: bool = True) -> bytes:
    """Return the .sckpt file of ``tensors`` as bytes; options as for :func:`save_file`.

    Example:
        >>> load_bytes(save_bytes({"x": np.arange(3)}))["x"]
        array([0, 1, 2])
    """
    return _writer.plan_bytes(_writer.Plan(tensors, metadata, align, checksum))


def save_tree_bytes(obj: Any, *, metadata: Metadata = None, align: int = fmt.ALIGN_DEFAULT,
                    checksum: bool = True) -> bytes:
    """The file :func:`save` would write, as bytes (for tests and in-memory use).

    Example:
        >>> Reader(save_tree_bytes({"a": (1, 2)})).load()
        {'a': (1, 2)}
    """
    return _writer.plan_bytes(plan(obj, metadata=metadata, align=align, checksum=checksum))


def plan(obj: Any, *, metadata: Metadata = None, align: int = fmt.ALIGN_DEFAULT,
         checksum: bool = True, root: str = "obj") -> _writer.Plan:
    """The write plan of a nested object: its tree flattened (:func:`safeckpt.tree.flatten`),
    every value checked, nothing written yet. ``root`` names the object in messages.

    Example:
        >>> plan({"step": 3, "w": np.zeros(2)}).names
        ['w']
    """
    tree, names, arrays = _tree.flatten(obj, root=root)
    return _writer.Plan(dict(zip(names, arrays)), metadata, align, checksum, tree=tree)


def save_plan(plan: _writer.Plan, path: Union[PathLike, RemotePath], *, atomic: bool = True,
              storage_options: Optional[Dict[str, Any]] = None, fs: Any = None) -> None:
    """Write ``plan`` to ``path`` as a new file [W2], [W3]: a ``*.safetensors`` name gets a
    safetensors file (:func:`safeckpt.safetensors_shards.save_single`, which then removes an
    earlier sharded save's index and shards [HF7]), any other a .sckpt file; names of formats
    safeckpt never writes are refused [W5]. ``path``, ``storage_options`` and ``fs`` as for
    :func:`save_file`: a remote object is streamed [RS7].

    Example:
        >>> save_plan(plan({"w": np.zeros(2)}), "w.safetensors")  # doctest: +SKIP
    """
    target, kind = _writer.destination_format(_destination(path, storage_options, fs),
                                              sharded=plan.shards is not None)
    if plan.refs is not None and kind != "sckpt":
        where = target.url if isinstance(target, RemotePath) else repr(target)
        raise InvalidValueError(f"{where}: references to other files are a .sckpt feature "
                                "(FORMAT.md section 11); save to a .sckpt name [X2]")
    if kind == "safetensors":  # and an earlier sharded save's index and shards go [HF7]
        _hf.save_single(dict(zip(plan.names, plan.arrays)), target, metadata=plan.metadata,
                        tree=plan.tree, atomic=atomic)
        return
    _writer.write_plan(plan, target, atomic=atomic)


def consolidate(src: Union[PathLike, RemotePath], dst: Union[PathLike, RemotePath], *,
                atomic: bool = True, storage_options: Optional[Dict[str, Any]] = None,
                fs: Any = None, **limits: Any) -> None:
    """Write a self-contained copy of the checkpoint ``src`` to ``dst``: every reference replaced
    by the bytes it points at, each checked against its CRC32C first (FORMAT.md [X6], [X8]).

    The copy has the same tensors, tree and metadata, no references, and a new save id when
    ``src`` had one (so later checkpoints may refer to it). ``dst`` may be ``src`` itself (the
    way to make a checkpoint independent of the files it refers to, so that they can be deleted),
    but never a file that another checkpoint in its directory refers to: replacing it would
    break that one [X8]. Any checkpoint :func:`open` reads may be given (a sharded one too); a
    ``*.safetensors`` ``dst`` gets a safetensors file.

    Parameters:
        src, dst: str or path-like, or URLs (or paths inside ``fs``), as for :func:`open` and
            :func:`save_file`.
        atomic, fs: as for :func:`save_file` (with ``fs``, both paths are inside it).
        storage_options: for whichever of ``src`` and ``dst`` is a URL (both, if both are).
        limits: reader limits for ``src``, as for :func:`open`.

    Raises:
        RefError: another checkpoint beside ``dst`` refers to it (they are named), or a file
            that ``src`` refers to is not the one it was saved against [X5].
        ChecksumError: bytes of ``src`` (its own or referenced) do not match their CRC32C.

    Example:
        >>> safeckpt.consolidate("ckpt/step-0000000030.sckpt", "full.sckpt")  # doctest: +SKIP
    """
    src_url = is_url(src)  # the options go to the URLs; with neither, resolve(dst) refuses them
    target = _destination(dst, storage_options if is_url(dst) or not src_url else None, fs)
    with open(src, storage_options=storage_options if src_url else None, fs=fs,
              **limits) as reader:
        exists = target.exists() if isinstance(target, RemotePath) else os.path.lexists(target)
        if exists:  # [X8]: never replace a file that a checkpoint refers to
            referring = _refs.referrers(target)
            if referring:
                where = target.url if isinstance(target, RemotePath) else repr(target)
                raise RefError(f"{where} is referred to by {', '.join(referring)} in its "
                               "directory: replacing it would break them [X8]; consolidate or "
                               "delete those first, or write the copy to another path")
        arrays = reader.load_all(verify=True if reader.has_checksums else None)  # [X6]
        align = getattr(reader, "align", 0)  # a .sckpt file's; safetensors has none (1)
        plan = _writer.Plan(arrays, reader.metadata,
                            align if align >= fmt.ALIGN_MIN else fmt.ALIGN_DEFAULT, True,
                            tree=reader.stored_tree,
                            save_id=None if reader.save_id is None else fmt.new_save_id())
        save_plan(plan, target, atomic=atomic)
